//! The `sluice` command: run the switch, run a demo, run a channel simulator, make keys,
//! check a configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use sluice::config::{self, Config};
use sluice::crypto::{self, Identity, KeyStore};
use sluice::engine::{ChannelConfig, EngineConfig};
use sluice::journal::{JournalConfig, Policy};
use sluice::message::ChannelId;
use sluice::run::JournalSetup;
use sluice::run::{ChannelSetup, SwitchConfig};
use sluice::server::session::SessionConfig;
use sluice::sim::{Profile, SimConfig, Simulator, SmsMode};
use sluice::upstream::PoolConfig;

#[path = "cli/ctl.rs"]
mod ctl;

/// mimalloc instead of glibc malloc. Every request allocates (its task, journal payloads,
/// oneshot channels, the order's entries) and is freed on another worker thread. Under
/// closed-loop load glibc spent ~9 % of the switch's CPU in its arena locks (`futex` wake
/// and wait from `malloc`/`free`) and ~6 % in `sysmalloc`, growing back heaps it had just
/// trimmed (`posix_memalign` of tokio's task cells). mimalloc keeps per-thread free lists
/// and frees across threads without a lock. Built without its transparent-huge-page
/// advice (`no_thp`): 2 MiB faults doubled the import's system time on a VM whose THP is
/// `madvise`-only. Measured in BENCHMARKS.md (sixth session).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A transaction switch for consumer lenders"
)]
struct Cli {
    /// Log format: human or json.
    #[arg(long, global = true, default_value = "human")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the switch from a configuration file.
    Run {
        /// Configuration file (see config/sluice.example.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the switch with two simulated channels in one process (embedded config).
    Demo {
        /// Lender listener.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
        /// Directory for the demo's key file.
        #[arg(long, default_value = "sluice-demo")]
        dir: PathBuf,
        /// Stop by itself after this many seconds (0 = run until Ctrl-C).
        #[arg(long, default_value_t = 0)]
        seconds: u64,
        /// Admin port (status page, metrics, `sluice ctl`); port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:7480")]
        admin: SocketAddr,
    },
    /// Run a simulated upstream payment channel.
    ChannelSim {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:7501")]
        listen: SocketAddr,
        /// 32-byte seed of the channel's Ed25519 identity, hex (demo and tests), or use
        /// --identity.
        #[arg(long)]
        seed: Option<String>,
        /// The channel's Ed25519 identity (PKCS#8 file).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// The switch's public key, hex.
        #[arg(long)]
        switch_public_key: String,
        /// The switch's institution id.
        #[arg(long, default_value = "SLUICE01")]
        institution: String,
        /// Behaviour profile (TOML).
        #[arg(long)]
        profile: Option<PathBuf>,
        /// SMS codes are the phone's last six digits (load tests).
        #[arg(long)]
        deterministic_sms: bool,
    },
    /// Make keys (files are created with mode 0600 and never overwritten).
    Keygen {
        #[command(subcommand)]
        what: Keygen,
    },
    /// Import stock agreements from a CSV file (format in `src/import.rs` and the README).
    Import {
        /// Configuration file: channel ids are checked against it and cards hashed with
        /// its PII secret.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only validate and report; write nothing. Without it the agreements are written
        /// to the configured journal directory; the switch must not be running on it
        /// (start it afterwards: it recovers them).
        #[arg(long)]
        check: bool,
        /// The CSV file.
        file: PathBuf,
    },
    /// Reconcile a channel's daily statement with sluice's own record (对账).
    Recon {
        /// Configuration file (its journal directory is read, never written).
        #[arg(long, short)]
        config: PathBuf,
        /// Channel id.
        #[arg(long)]
        channel: String,
        /// Day, YYYY-MM-DD (China time).
        #[arg(long)]
        date: String,
        /// Machine-readable differences (CSV).
        #[arg(long, default_value = "recon-differences.csv")]
        out: PathBuf,
        /// The channel's statement file.
        statement: PathBuf,
    },
    /// Validate a configuration file and the secret files it names.
    CheckConfig {
        /// Configuration file.
        config: PathBuf,
    },
    /// Talk to a running switch's admin port (tables for people, `--json` for scripts).
    Ctl {
        /// Admin address (default: the `[admin]` section of --config).
        #[arg(long)]
        admin: Option<String>,
        /// File holding the admin token (default: the `[admin]` section of --config).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The switch's configuration file (for its `[admin]` section).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the admin port's JSON as it is.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        what: ctl::Command,
    },
}

#[derive(Subcommand)]
enum Keygen {
    /// An Ed25519 identity (switch or channel); prints the public key.
    Identity {
        /// Output file (PKCS#8).
        out: PathBuf,
    },
    /// A merchant HMAC key; appends a line to the key file.
    Merchant {
        /// Merchant number.
        #[arg(long)]
        merchant: String,
        /// Key id (1..=65535).
        #[arg(long, default_value_t = 1)]
        key_id: u16,
        /// Key file.
        out: PathBuf,
    },
    /// The secret for keyed hashes of card and ID numbers.
    Pii {
        /// Output file (hex).
        out: PathBuf,
    },
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr; stdout carries what commands print for people and scripts.
    // Colours only on a terminal: log files and journald get plain text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logs(&cli.log);
    match cli.cmd {
        Cmd::Keygen { what } => keygen(what),
        Cmd::Recon {
            config,
            channel,
            date,
            out,
            statement,
        } => {
            let cfg = Config::load(&config)?;
            let report = sluice::recon::run(&cfg.journal.dir, &channel, &date, &statement, &out)?;
            print!("{}", report.summary());
            println!("differences written to {}", out.display());
            if !report.is_clean() {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Import {
            config,
            check,
            file,
        } => import(config.as_deref(), check, &file),
        Cmd::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            load_secrets(&cfg)?;
            println!(
                "{}: ok ({} channels, journal policy {:?})",
                config.display(),
                cfg.channels.len(),
                cfg.journal_policy()?
            );
            Ok(())
        }
        cmd => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(async move {
                match cmd {
                    Cmd::Run { config } => run(&config).await,
                    Cmd::Demo {
                        listen,
                        dir,
                        seconds,
                        admin,
                    } => demo(listen, &dir, seconds, admin).await,
                    Cmd::ChannelSim {
                        listen,
                        seed,
                        identity,
                        switch_public_key,
                        institution,
                        profile,
                        deterministic_sms,
                    } => {
                        channel_sim(
                            listen,
                            seed,
                            identity,
                            &switch_public_key,
                            &institution,
                            profile,
                            deterministic_sms,
                        )
                        .await
                    }
                    Cmd::Ctl {
                        admin,
                        token_file,
                        config,
                        json,
                        what,
                    } => {
                        let code = match ctl::Target::resolve(admin, token_file, config.as_deref())
                        {
                            Ok(t) => ctl::run(&t, what, json).await,
                            Err(e) => Err(e),
                        };
                        match code {
                            Ok(c) => std::process::exit(c),
                            Err(e) => {
                                // One line for the operator, not a backtrace.
                                eprintln!("sluice ctl: {e:#}");
                                std::process::exit(1)
                            }
                        }
                    }
                    Cmd::Keygen { .. }
                    | Cmd::CheckConfig { .. }
                    | Cmd::Import { .. }
                    | Cmd::Recon { .. } => {
                        unreachable!()
                    }
                }
            }),
    }
}

fn keygen(what: Keygen) -> Result<()> {
    match what {
        Keygen::Identity { out } => {
            let (id, doc) = Identity::generate();
            config::write_secret_file(&out, &doc)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", hex::encode(id.public_key()));
        }
        Keygen::Merchant {
            merchant,
            key_id,
            out,
        } => {
            sluice::wire::header::check_merchant(&merchant)
                .map_err(|e| anyhow::anyhow!("merchant {merchant:?}: {e}"))?;
            let line = format!(
                "{merchant} {key_id} {}\n",
                hex::encode(crypto::random_secret())
            );
            if out.exists() {
                config::read_secret_file(&out)?;
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new().append(true).open(&out)?;
                f.write_all(line.as_bytes())?;
                f.sync_all()?;
            } else {
                config::write_secret_file(&out, line.as_bytes())?;
            }
            // Parse it back so a bad file is noticed now, not at start-up.
            crypto::read_key_file(&out)?;
            println!("added key {merchant} {key_id} to {}", out.display());
        }
        Keygen::Pii { out } => {
            config::write_secret_file(&out, hex::encode(crypto::random_secret()).as_bytes())?;
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}

fn import(config: Option<&Path>, check: bool, file: &Path) -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (cfg, secrets) = match config {
        Some(c) => {
            let cfg = Config::load(c)?;
            let s = load_secrets(&cfg)?;
            (Some(cfg), Some(s))
        }
        None if check => (None, None),
        None => bail!("give --config (to hash with the switch's PII secret) or --check"),
    };
    let hasher = sluice::engine::agreement::PiiHasher::new(
        secrets
            .as_ref()
            .map(|s| s.pii.as_slice())
            .unwrap_or(&[0u8; 32]),
    );
    let channels: Option<Vec<String>> = cfg
        .as_ref()
        .map(|c| c.channels.iter().map(|c| c.id.clone()).collect());
    let t0 = std::time::Instant::now();
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let total = text.bytes().filter(|&b| b == b'\n').count();
    let known = |c: &sluice::message::ChannelId| {
        channels
            .as_ref()
            .map(|ids| ids.iter().any(|i| i == c.as_str()))
            .unwrap_or(true)
    };
    let done = AtomicUsize::new(0);
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} rows {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (rows, mut bad) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            sluice::import::parse(
                &text,
                &hasher,
                &known,
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
                Some(&done),
            )
        });
        while !h.is_finished() {
            bar.set_position(done.load(Ordering::Relaxed) as u64);
            std::thread::sleep(Duration::from_millis(100));
        }
        h.join().expect("parser thread")
    });
    bar.finish_and_clear();
    // Ids come from the data directory's engine (past every id it has issued), so an
    // import never reuses an agreement id.
    let target = match (&cfg, &secrets, check) {
        (Some(cfg), Some(sec), false) => {
            let engine = sluice::engine::Engine::new(
                cfg.engine_config(ref_prefix()),
                sluice::engine::ChannelTable {
                    channels: cfg.route_table(),
                },
                &sec.pii,
                sluice::app::now_ms().saturating_mul(1000),
            );
            let (journal, recovery) = sluice::journal::open(cfg.journal_config()?)?;
            recovery.apply(&engine, sluice::app::now_ms())?;
            Some((engine, journal))
        }
        _ => None,
    };
    let mut next = 1u64;
    let (agreements, bad2) = sluice::import::group(rows, || match &target {
        Some((e, _)) => e.new_agreement_id(),
        None => {
            next += 1;
            sluice::message::AgreementId(next)
        }
    });
    bad.extend(bad2);
    bad.sort_by_key(|b| b.line);
    for b in &bad {
        eprintln!("{}:{}: {}", file.display(), b.line, b.reason);
    }
    let mut written = 0;
    if let Some((engine, journal)) = &target {
        // Merge into existing agreements of the same card (re-imports are idempotent),
        // then journal the resulting agreement once.
        let records: Vec<sluice::engine::Record> = agreements
            .into_iter()
            .filter_map(|a| {
                let id = engine.agreements().upsert(a);
                engine
                    .agreements()
                    .get(id)
                    .map(|a| sluice::engine::Record::Agreement(Box::new(a)))
            })
            .collect();
        written = journal.append_all_blocking(&records)?;
        journal.close()?;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{} lines, {} bad lines, {} agreements journaled, {:.2} s ({:.0} rows/s){}",
        total,
        bad.len(),
        written,
        secs,
        total as f64 / secs.max(1e-9),
        if target.is_none() {
            " [check only: nothing written]"
        } else {
            ""
        }
    );
    if !bad.is_empty() {
        bail!(
            "{} bad lines (the good ones were imported unless --check)",
            bad.len()
        );
    }
    Ok(())
}

struct Secrets {
    keys: KeyStore,
    identity: Identity,
    pii: Vec<u8>,
}

fn load_secrets(cfg: &Config) -> Result<Secrets> {
    config::read_secret_file(&cfg.keys.merchant_keys)?;
    let keys = KeyStore::load(&cfg.keys.merchant_keys)?;
    let doc = config::read_secret_file(&cfg.keys.switch_identity)?;
    let identity = Identity::from_pkcs8(&doc)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.keys.switch_identity.display()))?;
    let pii_hex = config::read_secret_file(&cfg.keys.pii_secret)?;
    let pii = hex::decode(String::from_utf8_lossy(&pii_hex).trim())
        .with_context(|| format!("{}: not hex", cfg.keys.pii_secret.display()))?;
    if pii.len() < 32 {
        bail!(
            "{}: PII secret must be at least 32 bytes",
            cfg.keys.pii_secret.display()
        );
    }
    Ok(Secrets {
        keys,
        identity,
        pii,
    })
}

fn journal_setup(jc: JournalConfig) -> JournalSetup {
    if jc.policy == Policy::None {
        tracing::warn!(
            "journal policy none: records are written but never synced; a crash can lose \
             acknowledged state (benchmarks only)"
        );
    }
    JournalSetup::Durable(jc)
}

fn ref_prefix() -> String {
    // Start time in seconds, base 36: channel order references never repeat across
    // restarts.
    let mut n = sluice::app::now_ms() / 1000;
    let mut s = Vec::new();
    while n > 0 {
        let d = (n % 36) as u8;
        s.push(if d < 10 { b'0' + d } else { b'A' + d - 10 });
        n /= 36;
    }
    s.reverse();
    format!("S{}", String::from_utf8_lossy(&s))
}

async fn run(path: &Path) -> Result<()> {
    let cfg = Config::load(path)?;
    let secrets = load_secrets(&cfg)?;
    let channels = cfg
        .route_table()
        .into_iter()
        .zip(&cfg.channels)
        .map(|(route, c)| {
            let mut pool = PoolConfig::new(c.addresses.clone(), &c.institution);
            pool.connections = c.connections;
            pool.inflight_max_per_conn = c.inflight_per_connection;
            ChannelSetup {
                route,
                pool,
                public_key: config::parse_public_key(&c.public_key).unwrap_or_default(),
            }
        })
        .collect();
    let sw = SwitchConfig {
        listen: cfg.server.listen,
        channels,
        keys: Arc::new(secrets.keys),
        identity: Arc::new(secrets.identity),
        pii_secret: secrets.pii,
        engine: cfg.engine_config(ref_prefix()),
        session: SessionConfig {
            heartbeat_s: cfg.server.heartbeat_s,
            inflight_max: cfg.server.inflight_per_session,
            replay_window_s: cfg.server.replay_window_s,
        },
        connections_max: cfg.server.connections_max,
        channel_deadline: cfg.channel_deadline(),
        journal: journal_setup(cfg.journal_config()?),
        admin: match &cfg.admin {
            Some(a) => {
                let t = config::read_secret_file(&a.token_file)?;
                let token = String::from_utf8_lossy(&t).trim().to_string();
                if token.len() < 16 {
                    bail!(
                        "{}: admin token must be at least 16 characters",
                        a.token_file.display()
                    );
                }
                Some((a.listen, token))
            }
            None => None,
        },
    };
    let running = sluice::run::start(sw).await?;
    {
        let (sw, p) = (running.switch.clone(), path.to_path_buf());
        let ids: Vec<ChannelId> = running.pools.keys().copied().collect();
        running.control.set_reload(Arc::new(move || {
            reload(&p, &sw, &ids).map_err(|e| format!("{e:#}"))
        }));
    }
    tracing::info!(addr = %running.addr, admin = ?running.admin_addr, "sluice listening");
    println!("sluice listening on {}", running.addr);
    let asked = running.control.shutdown_requested();
    let stop = loop {
        let signal = tokio::select! {
            s = wait_for_stop_or_reload() => s,
            _ = asked.cancelled() => Signal::Stop(Stop::Drain),
        };
        match signal {
            Signal::Stop(stop) => break stop,
            Signal::Reload => match reload(path, &running.switch, &ids_of(&running)) {
                Ok(summary) => tracing::info!(%summary, "SIGHUP: reloaded keys and routes"),
                Err(e) => tracing::error!(
                    error = %e,
                    "SIGHUP: reload refused; the running configuration is unchanged"
                ),
            },
        }
    };
    running.shutdown(stop.grace()).await;
    tracing::info!("stopped");
    Ok(())
}

fn ids_of(running: &sluice::run::Running) -> Vec<ChannelId> {
    running.pools.keys().copied().collect()
}

/// What a signal asks for.
enum Signal {
    Stop(Stop),
    Reload,
}

async fn wait_for_stop_or_reload() -> Signal {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        tokio::select! {
            s = wait_for_stop(0) => Signal::Stop(s),
            _ = hup.recv() => Signal::Reload,
        }
    }
    #[cfg(not(unix))]
    Signal::Stop(wait_for_stop(0).await)
}

/// SIGHUP: re-read the configuration and the merchant key file; swap in the keys, the
/// channel table and the routing policy without touching sessions. Connection settings
/// (addresses, pools, listener, journal) need a restart and are reported, not applied.
fn reload(path: &Path, sw: &sluice::app::Switch, pools: &[ChannelId]) -> Result<String> {
    let cfg = Config::load(path)?;
    config::read_secret_file(&cfg.keys.merchant_keys)?;
    let keys = crypto::read_key_file(&cfg.keys.merchant_keys)?;
    let n_keys = keys.len();
    let table = sluice::engine::ChannelTable {
        channels: cfg.route_table(),
    };
    let unknown: Vec<String> = table
        .channels
        .iter()
        .filter(|c| !pools.contains(&c.id))
        .map(|c| c.id.to_string())
        .collect();
    if !unknown.is_empty() {
        bail!(
            "channels {unknown:?} have no connections in this process; adding a channel \
             needs a restart"
        );
    }
    sw.keys.replace(keys);
    sw.engine.set_table(table);
    sw.engine.set_policy(cfg.routing_policy());
    Ok(format!(
        "{n_keys} merchant keys, {} channels",
        cfg.channels.len()
    ))
}

/// How the process was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM (or the demo's timer): drain in-flight work within the grace period.
    Drain,
    /// SIGINT: stop fast.
    Fast,
}

impl Stop {
    fn grace(self) -> Duration {
        match self {
            Stop::Drain => Duration::from_secs(10),
            Stop::Fast => Duration::from_millis(500),
        }
    }
}

/// Wait for SIGINT/SIGTERM, or `seconds` when non-zero.
async fn wait_for_stop(seconds: u64) -> Stop {
    let timer = async {
        if seconds == 0 {
            std::future::pending::<()>().await
        } else {
            tokio::time::sleep(Duration::from_secs(seconds)).await
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping fast"); Stop::Fast }
            _ = term.recv() => { tracing::info!("SIGTERM: draining in-flight work"); Stop::Drain }
            _ = timer => { tracing::info!("time is up: draining"); Stop::Drain }
        }
    }
    #[cfg(not(unix))]
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Stop::Fast,
        _ = timer => Stop::Drain,
    }
}

/// The demo's fixed identities and merchant key (documented in the README; never use
/// them outside a demo).
const DEMO_MERCHANT: &str = "898100000000001";
const DEMO_INSTITUTION: &str = "SLUICE01";

async fn demo(listen: SocketAddr, dir: &Path, seconds: u64, admin: SocketAddr) -> Result<()> {
    let switch_id = Arc::new(Identity::from_seed(&[1u8; 32]));
    let mut setups = Vec::new();
    let mut sims = Vec::new();
    for (i, name) in ["CHA", "CHB"].iter().enumerate() {
        let chan_id = Arc::new(Identity::from_seed(&[10 + i as u8; 32]));
        let mut sc = SimConfig::new(chan_id.clone(), DEMO_INSTITUTION, switch_id.public_key());
        sc.bank.sms_mode = SmsMode::Deterministic;
        sc.profile = Profile {
            latency: sluice::sim::Latency::Lognormal {
                p50_ms: 2.0,
                p99_ms: 20.0,
            },
            ..Profile::default()
        };
        sc.seed = 100 + i as u64;
        let sim = Simulator::start(sc).await?;
        let mut pool = PoolConfig::new(vec![sim.addr()], DEMO_INSTITUTION);
        pool.connections = 2;
        let mut route = ChannelConfig::open(name);
        // Prefunded payout accounts, so the status page and `ctl funds` have positions
        // to show: ¥500,000 each, alert below ¥50,000.
        route.fund = Some(sluice::engine::route::FundConfig {
            initial_fen: 50_000_000,
            alert_fen: 5_000_000,
        });
        setups.push(ChannelSetup {
            route,
            pool,
            public_key: chan_id.public_key(),
        });
        sims.push((name.to_string(), sim));
    }
    std::fs::create_dir_all(dir)?;
    let key_file = dir.join("merchant.keys");
    let secret = sluice::message::examples::SECRET;
    if !key_file.exists() {
        config::write_secret_file(
            &key_file,
            format!("{DEMO_MERCHANT} 1 {}\n", hex::encode(secret)).as_bytes(),
        )?;
    }
    let keys = KeyStore::load(&key_file)?;
    let admin_token = hex::encode(crypto::random_secret());
    let token_file = dir.join("admin.token");
    let _ = std::fs::remove_file(&token_file);
    config::write_secret_file(&token_file, admin_token.as_bytes())?;
    // The demo's channels are simulated afresh each run, so its journal starts empty too.
    let journal_dir = dir.join("journal");
    if journal_dir.exists() {
        std::fs::remove_dir_all(&journal_dir)?;
    }
    let running = sluice::run::start(SwitchConfig {
        listen,
        channels: setups,
        keys: Arc::new(keys),
        identity: switch_id,
        pii_secret: vec![0x5a; 32],
        engine: EngineConfig {
            ref_prefix: ref_prefix(),
            query_delay_ms: 500,
            ..EngineConfig::default()
        },
        session: SessionConfig::default(),
        connections_max: 256,
        channel_deadline: Duration::from_secs(2),
        journal: journal_setup(JournalConfig::new(&journal_dir)),
        admin: Some((admin, admin_token.clone())),
    })
    .await
    .with_context(|| format!("listening on {listen}"))?;
    let ready = running.wait_channels(Duration::from_secs(10)).await;
    println!("sluice demo");
    println!("  lender port     {}", running.addr);
    for (n, s) in &sims {
        println!("  channel {n}     simulated at {}", s.addr());
    }
    println!("  channels ready  {ready}");
    println!("  merchant        {DEMO_MERCHANT}, key id 1");
    println!("  key file        {}", key_file.display());
    println!("  SMS codes       the phone's last six digits (deterministic demo mode)");
    println!("  journal         {} (fsync)", journal_dir.display());
    if let Some(a) = running.admin_addr {
        println!("  admin port      {a}  (token in {})", token_file.display());
        println!("  status page     http://{a}/status?token={admin_token}");
        println!(
            "  ctl             sluice ctl --admin {a} --token-file {} status",
            token_file.display()
        );
    }
    println!();
    println!("Drive it with the Python client (standard library only):");
    println!(
        "  python3 protocol/clients/python/demo.py --port {} --key-file {}",
        running.addr.port(),
        key_file.display()
    );
    println!("Stop with Ctrl-C.");
    let asked = running.control.shutdown_requested();
    let stop = tokio::select! {
        s = wait_for_stop(seconds) => s,
        _ = asked.cancelled() => Stop::Drain,
    };
    running.shutdown(stop.grace()).await;
    for (_, s) in sims {
        s.shutdown().await;
    }
    println!("sluice demo stopped");
    Ok(())
}

async fn channel_sim(
    listen: SocketAddr,
    seed: Option<String>,
    identity: Option<PathBuf>,
    switch_public_key: &str,
    institution: &str,
    profile: Option<PathBuf>,
    deterministic_sms: bool,
) -> Result<()> {
    let id = match (seed, identity) {
        (Some(s), None) => {
            let b: [u8; 32] = hex::decode(s)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("--seed must be 32 bytes of hex"))?;
            Identity::from_seed(&b)
        }
        (None, Some(p)) => Identity::from_pkcs8(&config::read_secret_file(&p)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        _ => bail!("give exactly one of --seed and --identity"),
    };
    let pk = config::parse_public_key(switch_public_key)
        .ok_or_else(|| anyhow::anyhow!("--switch-public-key must be 64 hex digits"))?;
    let id = Arc::new(id);
    let mut sc = SimConfig::new(id.clone(), institution, pk);
    sc.listen = listen;
    if deterministic_sms {
        sc.bank.sms_mode = SmsMode::Deterministic;
    }
    if let Some(p) = profile {
        sc.profile = Profile::from_toml(&std::fs::read_to_string(&p)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    }
    let sim = Simulator::start(sc).await?;
    println!(
        "channel simulator on {} public key {}",
        sim.addr(),
        hex::encode(id.public_key())
    );
    wait_for_stop(0).await;
    sim.shutdown().await;
    Ok(())
}
