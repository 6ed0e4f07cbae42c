//! `sluice-load`: the bundled load generator for sluice.
//!
//! - `run`: drive sluice (or an echo server) with an open-loop schedule or a closed loop;
//!   print a table, write a JSON report, an HdrHistogram interval log and an SVG plot;
//! - `echo-server`: the baseline — every byte comes back;
//! - `prepare`: keys, switch configurations, the stock-import CSV and the simulators'
//!   books for N agreements;
//! - `sim`: the prepared simulated channels, agreements preloaded;
//! - `report`: one markdown table and one SVG plot from several JSON reports;
//! - `mem`: resident memory and insert rate of N agreements in the engine's store;
//! - `chaos`: a fault scenario against a real `sluice run`, invariants checked against
//!   the simulators' ledgers (`RELIABILITY.md`).
//!
//! Layout: `schedule` (open-loop send times) and `report` (histograms, tables, plots) are
//! pure; `gen` drives connections through `sluice::client`; `data` makes the synthetic
//! borrowers every other part agrees on.

mod chaos;
mod data;
mod echo;
mod gen;
mod mem;
mod prepare;
mod report;
mod schedule;
mod simrun;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use gen::{Mix, Mode, RunConfig, Target};
use schedule::Schedule;

/// The switch's allocator (see sluice's `src/main.rs`): `mem` then measures the agreement
/// store as the switch holds it.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sluice-load", version, about = "Load generator for sluice")]
struct Cli {
    /// Tokio worker threads of this process.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    Sluice,
    Echo,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Open,
    Closed,
}

#[derive(Subcommand)]
enum Cmd {
    /// Drive a switch or an echo server.
    Run {
        /// Address to connect to.
        #[arg(long)]
        addr: SocketAddr,
        /// What answers: sluice (answers checked) or echo (frames come back).
        #[arg(long, value_enum, default_value = "sluice")]
        target: TargetArg,
        /// Prepared directory (`prepare`): merchant keys and the agreements to use.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// open: send times fixed from --rate; closed: --window requests in flight per
        /// connection.
        #[arg(long, value_enum, default_value = "open")]
        mode: ModeArg,
        /// Open loop: target rate after the ramp, requests per second (a signing counts
        /// as one, though it is two round trips).
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
        /// Open loop: seconds of linear ramp from 0; closed loop: warm-up seconds. Not
        /// counted in the summary.
        #[arg(long, default_value_t = 2.0)]
        ramp: f64,
        /// Closed loop: requests in flight per connection.
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// Run length in seconds, ramp included.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Stop after this many requests (ramp included).
        #[arg(long)]
        count: Option<u64>,
        /// Persistent connections (connection k acts for merchant k % merchants).
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Merchants to use (the first N of the key file).
        #[arg(long)]
        merchants: Option<usize>,
        /// Open loop: driver tasks.
        #[arg(long, default_value_t = 2)]
        drivers: usize,
        /// Operation mix in percent: debit=N,payout=N,query=N,sign=N.
        #[arg(long, default_value = "debit=100")]
        mix: String,
        /// Debit and payout amount, fen.
        #[arg(long, default_value_t = 100)]
        amount: u64,
        /// Seconds before an unanswered request counts as an error.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// Agreement setup: requests in flight per connection.
        #[arg(long, default_value_t = 128)]
        setup_window: usize,
        /// Open loop: most calls in flight per connection (sluice's default session
        /// limit); sends past it wait and count as late from their scheduled time.
        #[arg(long, default_value_t = 1024)]
        max_inflight: usize,
        /// Shortest pacer sleep, µs.
        #[arg(long, default_value_t = 20)]
        tick_us: u64,
        /// Label in the report.
        #[arg(long, default_value = "run")]
        label: String,
        /// Write OUT.json, OUT.hlog and OUT.svg.
        #[arg(long)]
        out: Option<PathBuf>,
        /// No progress line.
        #[arg(long)]
        quiet: bool,
    },
    /// Echo every byte back (the baseline server).
    EchoServer {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:7600")]
        listen: SocketAddr,
    },
    /// Write keys, configurations, the import CSV and the simulators' books.
    Prepare {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Cards (each signed on every channel).
        #[arg(long, default_value_t = 100_000)]
        agreements: u64,
        /// Merchant numbers.
        #[arg(long, default_value_t = 8)]
        merchants: usize,
        /// Switch lender listener.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
        /// First simulator address (the next channel gets the next port).
        #[arg(long, default_value = "127.0.0.1:7501")]
        sim: SocketAddr,
    },
    /// Run the prepared simulated channels with their agreements preloaded.
    Sim {
        /// Prepared directory.
        #[arg(long)]
        dir: PathBuf,
        /// Orders each channel's ledger is sized for up front, so that it does not grow
        /// (and stall the channel while it moves its entries) during a measured run.
        #[arg(long, default_value_t = 0)]
        expect_orders: usize,
    },
    /// Combine JSON reports into a markdown table and an SVG plot.
    Report {
        /// Plot title.
        #[arg(long, default_value = "latency by percentile")]
        title: String,
        /// SVG output.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// JSON reports.
        reports: Vec<PathBuf>,
    },
    /// Inject a scenario's faults under checked load and check the invariants (no order
    /// executed twice, acknowledged orders final as told, one notification per final
    /// state, bounded memory, healthy sessions unharmed, service after the fault).
    /// Exits non-zero on any violation.
    Chaos {
        /// The scenario (`all`: each in turn).
        #[arg(value_enum)]
        scenario: chaos::Scenario,
        /// Seconds-long phases (CI) instead of the full minutes-long run.
        #[arg(long)]
        short: bool,
        /// The sluice binary [default: `sluice` next to this program].
        #[arg(long)]
        sluice_bin: Option<PathBuf>,
        /// Checked load, debits per second [default: 40 short, 200 full].
        #[arg(long)]
        rate: Option<f64>,
        /// Bound on the switch's resident memory, MiB.
        #[arg(long, default_value_t = 512)]
        rss_max_mib: u64,
        /// Keep the run directory (kept anyway when a check fails).
        #[arg(long)]
        keep: bool,
        /// Where run directories are made.
        #[arg(long, default_value_os_t = std::env::temp_dir())]
        work_dir: PathBuf,
    },
    /// Resident memory and insert rate of N agreements in the engine's store.
    Mem {
        /// Agreements.
        #[arg(long, default_value_t = 10_000_000)]
        agreements: u64,
        /// Merchants.
        #[arg(long, default_value_t = 8)]
        merchants: usize,
        /// Threads inserting.
        #[arg(long, default_value_t = 2)]
        insert_threads: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Prepare {
            dir,
            agreements,
            merchants,
            listen,
            sim,
        } => {
            let p = prepare::prepare(&dir, agreements, merchants, listen, sim)?;
            println!(
                "prepared {}: {} agreements x {} channels, {} merchants, switch {}",
                dir.display(),
                p.agreements,
                p.channels.len(),
                p.merchants,
                p.listen
            );
            Ok(())
        }
        Cmd::Report {
            title,
            svg,
            reports,
        } => {
            let rs = reports
                .iter()
                .map(|p| {
                    let s = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    Ok(serde_json::from_str(&s)?)
                })
                .collect::<Result<Vec<report::Report>>>()?;
            print!("{}", report::markdown(&rs));
            if let Some(p) = svg {
                std::fs::write(&p, report::svg(&title, &rs))?;
            }
            Ok(())
        }
        Cmd::Mem {
            agreements,
            merchants,
            insert_threads,
        } => mem::run(agreements, merchants, insert_threads.max(1)).map(|_| ()),
        cmd => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads.max(1))
            .enable_all()
            .build()?
            .block_on(async_main(cmd)),
    }
}

async fn async_main(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::EchoServer { listen } => echo::serve(listen).await,
        Cmd::Sim { dir, expect_orders } => simrun::run(&dir, expect_orders).await,
        Cmd::Chaos {
            scenario,
            short,
            sluice_bin,
            rate,
            rss_max_mib,
            keep,
            work_dir,
        } => {
            let sluice_bin = match sluice_bin {
                Some(p) => p,
                None => std::env::current_exe()?
                    .parent()
                    .context("directory of sluice-load")?
                    .join("sluice"),
            };
            // The switch runs with its bed directory as working directory, so a relative
            // path given here (the CI script passes `target/debug/sluice`) must be resolved
            // against ours first.
            let sluice_bin = std::fs::canonicalize(&sluice_bin)
                .with_context(|| format!("sluice binary {}", sluice_bin.display()))?;
            let opts = chaos::Options {
                short,
                sluice_bin,
                rate,
                rss_max_mib,
                keep,
                work_dir,
            };
            if !chaos::run(scenario, &opts).await? {
                eprintln!("chaos: invariant violated");
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Run {
            addr,
            target,
            dir,
            mode,
            rate,
            ramp,
            window,
            duration,
            count,
            connections,
            merchants,
            drivers,
            mix,
            amount,
            timeout,
            setup_window,
            max_inflight,
            tick_us,
            label,
            out,
            quiet,
        } => {
            let (mut keys, cards) = match &dir {
                Some(d) => {
                    let p = prepare::Prepared::load(d)?;
                    (
                        prepare::read_keys(&d.join("keys/merchants.txt"))?,
                        p.agreements,
                    )
                }
                None => {
                    if matches!(target, TargetArg::Sluice) {
                        bail!("--dir is needed to drive sluice (merchant keys, agreements)");
                    }
                    (
                        vec![gen::MerchantKey {
                            merchant: data::merchant_no(0),
                            key_id: 1,
                            secret: vec![0x42; 32],
                        }],
                        0,
                    )
                }
            };
            if let Some(m) = merchants {
                keys.truncate(m.max(1));
            }
            let mode = match mode {
                ModeArg::Open => {
                    if rate <= 0.0 {
                        bail!("--rate must be > 0");
                    }
                    Mode::Open(Schedule {
                        rate_per_s: rate,
                        ramp_s: ramp.max(0.0),
                    })
                }
                ModeArg::Closed => Mode::Closed {
                    window: window.max(1),
                    warmup_s: ramp.max(0.0),
                },
            };
            let cfg = RunConfig {
                label,
                addr,
                target: match target {
                    TargetArg::Sluice => Target::Sluice,
                    TargetArg::Echo => Target::Echo,
                },
                mode,
                connections,
                drivers,
                duration: Duration::from_secs_f64(duration),
                count,
                mix: Mix::parse(&mix)?,
                merchants: keys,
                cards,
                setup_window,
                inflight_per_conn: max_inflight,
                timeout: Duration::from_secs(timeout),
                amount_fen: amount,
                tick_us,
                progress: !quiet,
                hlog: out.as_ref().map(|o| o.with_extension("hlog")),
            };
            if let Some(parent) = out.as_ref().and_then(|o| o.parent()) {
                std::fs::create_dir_all(parent)?;
            }
            let r = gen::run(cfg).await?;
            print!("{}", r.table());
            if let Some(o) = out {
                std::fs::write(
                    o.with_extension("json"),
                    serde_json::to_string_pretty(&r)? + "\n",
                )?;
                std::fs::write(
                    o.with_extension("svg"),
                    report::svg(&r.label, std::slice::from_ref(&r)),
                )?;
            }
            Ok(())
        }
        _ => unreachable!("handled in main"),
    }
}
