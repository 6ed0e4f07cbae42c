//! `chaos`: drive a real `sluice run` (child process) against in-process simulated channels
//! with checked load, inject one scenario's faults, let everything settle, and check the
//! invariants against the simulators' ledgers and what the lender side was told:
//! - no order executed twice (per order, at most one successful ledger entry; no order
//!   reference sent twice; each ledger consistent);
//! - every acknowledged order (answered SUCCESS, FAILED or PENDING) final, in the state
//!   told, and the ledger agrees (SUCCESS ⇔ executed once, FAILED ⇔ not executed);
//! - every final state notified with exactly one notify id and the same result;
//! - the switch's resident memory bounded;
//! - a healthy session's p99 not harmed (a probe connection, baseline vs. fault phase);
//! - the switch still serves after the fault (a clean debit on a new connection).
//!
//! Phases: baseline (load, no fault) → attack (faults) → recovery (faults removed, load
//! continues) → settle (queries until every order is final, notifications arrive).
//! `--short` runs each phase for seconds (CI); the full run is documented in
//! RELIABILITY.md.

mod bed;
mod check;
mod hostile;
mod load;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::ValueEnum;
use sluice::message::Status;
use sluice::sim::{Latency, Profile};

use bed::{Bed, SwitchLimits};
use check::Verdict;
use load::{Book, Load, Pool, Probe, PHASE_ATTACK, PHASE_BASELINE, PHASE_RECOVERY};

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Channel CHA killed (connections dropped and refused) and restarted, repeatedly.
    ChannelKillRestart,
    /// CHA answers after 3 s (past the switch's 500 ms deadline).
    ChannelSlow,
    /// Both channels replace 30% of answers with garbage bytes and 10% with corrupt MACs.
    ChannelGarbage,
    /// Both channels drop each connection after every N frames (the N-th is executed,
    /// unanswered).
    ChannelDisconnectEveryN,
    /// CHA executes every instruction and answers none.
    ChannelSilent,
    /// The switch SIGKILLed and restarted under load, several times.
    SwitchSigkill,
    /// Hostile lender connections beside the clean load.
    LenderHostile,
    /// Twice the measured saturation load.
    Overload,
    /// Every scenario in turn.
    All,
}

impl Scenario {
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    fn each() -> Vec<Scenario> {
        Scenario::value_variants()
            .iter()
            .copied()
            .filter(|s| *s != Scenario::All)
            .collect()
    }
}

/// Options of `sluice-load chaos`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds-long phases (CI).
    pub short: bool,
    /// The `sluice` binary.
    pub sluice_bin: PathBuf,
    /// Checked load, debits per second.
    pub rate: Option<f64>,
    /// Bound on the switch's resident memory, MiB.
    pub rss_max_mib: u64,
    /// Keep the run directory (it is kept anyway when a check fails).
    pub keep: bool,
    /// Where run directories go.
    pub work_dir: PathBuf,
}

/// The result of one scenario.
pub struct Outcome {
    /// Scenario name.
    pub scenario: String,
    /// The load that ran.
    pub load: String,
    /// The faults injected (and counted).
    pub faults: String,
    /// Every invariant.
    pub verdicts: Vec<Verdict>,
    /// Wall time.
    pub seconds: f64,
}

impl Outcome {
    /// True when every invariant held.
    pub fn ok(&self) -> bool {
        self.verdicts.iter().all(|v| v.ok)
    }
}

struct Timing {
    baseline: Duration,
    attack: Duration,
    recovery: Duration,
    settle: Duration,
}

/// Run `scenario` (every one for `All`); print a table per scenario. Returns whether every
/// invariant of every scenario held.
pub async fn run(scenario: Scenario, opts: &Options) -> Result<bool> {
    let list = if scenario == Scenario::All {
        Scenario::each()
    } else {
        vec![scenario]
    };
    let mut all_ok = true;
    for s in list {
        let o = run_one(s, opts)
            .await
            .with_context(|| format!("scenario {}", s.name()))?;
        print!("{}", table(&o));
        all_ok &= o.ok();
    }
    Ok(all_ok)
}

/// One scenario's result as a markdown table.
pub fn table(o: &Outcome) -> String {
    let mut s = format!(
        "\n### {} — {} ({:.0} s)\n\n| | |\n|---|---|\n| load held | {} |\n| faults injected | {} |\n",
        o.scenario,
        if o.ok() { "PASS" } else { "FAIL" },
        o.seconds,
        o.load,
        o.faults
    );
    for v in &o.verdicts {
        s.push_str(&format!(
            "| {} | {} — {} |\n",
            v.name,
            if v.ok { "ok" } else { "VIOLATED" },
            v.detail.replace('|', "/")
        ));
    }
    s
}

fn base_profile() -> Profile {
    Profile {
        latency: Latency::Uniform {
            min_ms: 2.0,
            max_ms: 20.0,
        },
        async_ratio: 0.2,
        async_delay_ms: 200,
        decline_ratio: 0.05,
        notify_copies: 2,
        notify_interval_ms: 100,
        ..Profile::default()
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn run_one(scenario: Scenario, opts: &Options) -> Result<Outcome> {
    let t0 = Instant::now();
    let name = scenario.name();
    let t = if opts.short {
        Timing {
            baseline: Duration::from_secs(2),
            attack: Duration::from_secs(5),
            recovery: Duration::from_secs(2),
            settle: Duration::from_secs(30),
        }
    } else {
        Timing {
            baseline: Duration::from_secs(20),
            attack: Duration::from_secs(60),
            recovery: Duration::from_secs(20),
            settle: Duration::from_secs(120),
        }
    };
    let rate = opts.rate.unwrap_or(if opts.short { 40.0 } else { 200.0 });
    let cards = if opts.short { 64 } else { 2000 };
    let mut limits = SwitchLimits::default();
    match scenario {
        Scenario::LenderHostile => limits.connections_max = 64,
        Scenario::Overload => limits.inflight_per_session = 16,
        _ => {}
    }
    let dir = opts
        .work_dir
        .join(format!("sluice-chaos-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut bed = Bed::start(&dir, &opts.sluice_bin, cards, base_profile(), &limits).await?;
    eprintln!(
        "chaos {name}: switch on {}, run directory {}",
        bed.listen,
        dir.display()
    );

    let book = Arc::new(Book::default());
    let pool = Pool::new(
        4,
        bed.listen,
        bed.keys[0].clone(),
        book.clone(),
        Duration::from_secs(10),
    );
    pool.maintain().await;
    let stop_all = Arc::new(AtomicBool::new(false));
    let stop_load = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(AtomicU8::new(PHASE_BASELINE));
    let pid = Arc::new(AtomicU32::new(
        bed.node.as_ref().map(|n| n.pid).unwrap_or(0),
    ));
    let rss_peak = Arc::new(AtomicU64::new(0));
    let agreements = Arc::new(bed.agreements.clone());

    // Keep the pool's connections up (they die when the switch is killed).
    let maint = {
        let (pool, stop) = (pool.clone(), stop_all.clone());
        tokio::spawn(async move {
            while !stop.load(Relaxed) {
                pool.maintain().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let sampler = {
        let (pid, peak, stop) = (pid.clone(), rss_peak.clone(), stop_all.clone());
        tokio::spawn(async move {
            while !stop.load(Relaxed) {
                if let Some(k) = rss_kib(pid.load(Relaxed)) {
                    peak.fetch_max(k, Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let load = tokio::spawn(Load::run(
        pool.clone(),
        book.clone(),
        agreements.clone(),
        "C".into(),
        load::AMOUNT_LOAD,
        rate,
        stop_load.clone(),
    ));
    let probe_debits = matches!(scenario, Scenario::LenderHostile | Scenario::Overload);
    let probe = tokio::spawn(Probe::run(
        bed.listen,
        bed.keys[0].clone(),
        book.clone(),
        agreements[0],
        probe_debits,
        "P".into(),
        phase.clone(),
        stop_load.clone(),
    ));

    tokio::time::sleep(t.baseline).await;
    phase.store(PHASE_ATTACK, Relaxed);
    let cha = &bed.sims[0].1;
    let before = cha.stats();
    let mut extra: Vec<Verdict> = Vec::new();
    let mut hostile_tally: Option<Arc<hostile::Tally>> = None;
    let faults: String;
    let mut extra_load = String::new();
    match scenario {
        Scenario::ChannelKillRestart => {
            let end = Instant::now() + t.attack;
            let mut kills = 0;
            while Instant::now() < end {
                cha.update_profile(|p| p.down = true)?;
                kills += 1;
                tokio::time::sleep(Duration::from_millis(1000)).await;
                cha.update_profile(|p| p.down = false)?;
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
            let s = cha.stats();
            faults = format!(
                "CHA killed and restarted {kills}× (1 s down each; {} connections refused while down)",
                s.refused_down - before.refused_down
            );
        }
        Scenario::ChannelSlow => {
            cha.update_profile(|p| p.latency = Latency::Fixed { ms: 3000.0 })?;
            tokio::time::sleep(t.attack).await;
            faults = format!(
                "CHA answers after 3 s for {} s (switch deadline 500 ms)",
                t.attack.as_secs()
            );
        }
        // Garbage and dropped connections on *both* channels: with one faulty channel
        // the health breaker routes around it after a few faults, and little is tested.
        Scenario::ChannelGarbage => {
            let before: Vec<_> = bed.sims.iter().map(|(_, s)| s.stats()).collect();
            for (_, s) in &bed.sims {
                s.update_profile(|p| {
                    p.garbage_ratio = 0.3;
                    p.bad_mac_ratio = 0.1;
                })?;
            }
            tokio::time::sleep(t.attack).await;
            let (mut garbage, mut macs) = (0, 0);
            for ((_, s), b) in bed.sims.iter().zip(&before) {
                let st = s.stats();
                garbage += st.garbage_out - b.garbage_out;
                macs += st.corrupt_macs_out - b.corrupt_macs_out;
            }
            faults = format!(
                "CHA and CHB: {garbage} answers replaced by garbage, {macs} by corrupt MACs"
            );
        }
        Scenario::ChannelDisconnectEveryN => {
            let n = if opts.short { 10 } else { 50 };
            let before: Vec<_> = bed.sims.iter().map(|(_, s)| s.stats()).collect();
            for (_, s) in &bed.sims {
                s.update_profile(|p| p.disconnect_every_frames = n)?;
            }
            tokio::time::sleep(t.attack).await;
            let drops: u64 = bed
                .sims
                .iter()
                .zip(&before)
                .map(|((_, s), b)| s.stats().injected_disconnects - b.injected_disconnects)
                .sum();
            faults = format!("CHA and CHB drop their connections every {n} frames: {drops} drops");
        }
        Scenario::ChannelSilent => {
            cha.update_profile(|p| p.drop_ratio = 1.0)?;
            tokio::time::sleep(t.attack).await;
            let s = cha.stats();
            faults = format!(
                "CHA silent: {} instructions executed and never answered",
                s.dropped_answers - before.dropped_answers
            );
        }
        Scenario::SwitchSigkill => {
            let kills = if opts.short { 3 } else { 10 };
            let gap = t.attack / kills;
            for _ in 0..kills {
                tokio::time::sleep(gap / 2).await;
                bed.kill_switch().await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                bed.start_switch().await?;
                pid.store(bed.node.as_ref().map(|n| n.pid).unwrap_or(0), Relaxed);
                tokio::time::sleep(gap / 2).await;
            }
            faults = format!(
                "switch SIGKILLed and restarted {kills}× under load ({} lender reconnections)",
                pool.connects.load(Relaxed)
            );
        }
        Scenario::LenderHostile => {
            let stop = Arc::new(AtomicBool::new(false));
            let tally = Arc::new(hostile::Tally::default());
            let h = tokio::spawn(hostile::run(
                bed.listen,
                bed.keys[1].clone(),
                bed.agreement_m1,
                limits.connections_max,
                stop.clone(),
                tally.clone(),
            ));
            tokio::time::sleep(t.attack).await;
            stop.store(true, Relaxed);
            let _ = h.await;
            let g = |a: &AtomicU64| a.load(Relaxed);
            faults = format!(
                "random bytes on {} conns ({} closed), {} truncated frames, {} oversize lengths ({} closed), \
                 {} garbage bodies ({} refused), {} bad MACs ({} refused), {} replays ({} refused), \
                 {} slowloris conns ({} closed), flood of limit+{} conns ({} closed at once)",
                g(&tally.random_conns),
                g(&tally.random_closed),
                g(&tally.truncated),
                g(&tally.oversize),
                g(&tally.oversize_closed),
                g(&tally.garbage_body),
                g(&tally.garbage_body_refused),
                g(&tally.bad_mac),
                g(&tally.bad_mac_refused),
                g(&tally.replays),
                g(&tally.replays_refused),
                g(&tally.slowloris),
                g(&tally.slowloris_closed),
                g(&tally.flood_excess),
                g(&tally.flood_closed),
            );
            hostile_tally = Some(tally);
        }
        Scenario::Overload => {
            let sat = calibrate(&pool, &book, &agreements, limits.inflight_per_session).await;
            let offered = (2.0 * sat).max(2.0 * rate);
            let busy0 = book.busy.load(Relaxed);
            let stop = Arc::new(AtomicBool::new(false));
            let over = tokio::spawn(Load::run(
                pool.clone(),
                book.clone(),
                agreements.clone(),
                "O".into(),
                load::AMOUNT_OVERLOAD,
                offered,
                stop.clone(),
            ));
            tokio::time::sleep(t.attack).await;
            stop.store(true, Relaxed);
            let o = over.await?;
            let busy = book.busy.load(Relaxed) - busy0;
            extra_load = format!(
                "; overload {:.0}/s offered (2× measured saturation {sat:.0}/s) for {} s, {} sent",
                offered,
                t.attack.as_secs(),
                o.sent.load(Relaxed)
            );
            faults = format!("2× saturation: {busy} answered BUSY");
            extra.push(Verdict {
                name: "overload answered BUSY",
                ok: busy > 0,
                detail: format!("{busy} BUSY answers, session limit 16 in flight"),
            });
        }
        Scenario::All => unreachable!("expanded by run()"),
    }
    phase.store(PHASE_RECOVERY, Relaxed);
    bed.heal_channels()?;
    tokio::time::sleep(t.recovery).await;
    stop_load.store(true, Relaxed);
    let l = load.await?;
    let probe = probe.await?;

    // A lender retries what it got no answer for, with the same order id.
    let mut retried = 0;
    if scenario == Scenario::SwitchSigkill {
        let c = load::connect(bed.listen, &bed.keys[0], Duration::from_secs(10)).await?;
        let c = Arc::new(c);
        load::spawn_notify_drain(c.clone(), book.clone());
        let unanswered: Vec<(String, u64)> = book
            .orders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, r)| r.told.is_empty())
            .map(|(id, r)| (id.clone(), r.amount))
            .collect();
        for (id, amount) in unanswered {
            let i = amount - load::AMOUNT_LOAD;
            let agreement =
                agreements[(crate::gen::splitmix(i) % agreements.len() as u64) as usize];
            if id.starts_with('C') {
                let r = c.call(load::debit(&id, agreement, amount)).await;
                book.answered(&id, &r);
                retried += 1;
            }
        }
    }

    // The switch still serves: a clean debit on a new connection.
    let clean = bed.clean_debit("CLEAN-1", load::AMOUNT_CLEAN).await;
    book.sent("CLEAN-1", load::AMOUNT_CLEAN);
    let served_ok = matches!(
        clean.as_ref().map(|o| o.status),
        Ok(Status::Success | Status::Pending | Status::Failed)
    );
    if let Ok(out) = &clean {
        let mut o = book.orders.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = o.get_mut("CLEAN-1") {
            r.told.push((out.status, out.reason));
        }
    }
    let clean = clean.map(|o| format!("{} {}", o.status.name(), o.reason.name()));

    // Settle: every order final, then its notification.
    let c = Arc::new(load::connect(bed.listen, &bed.keys[0], Duration::from_secs(10)).await?);
    load::spawn_notify_drain(c.clone(), book.clone());
    let finals = check::settle(&c, &book, t.settle).await;
    let wait_notes = Instant::now();
    loop {
        let missing = {
            let n = book.notified.lock().unwrap_or_else(|e| e.into_inner());
            finals
                .iter()
                .filter(|(id, s)| s.is_final() && !n.contains_key(*id))
                .count()
        };
        if missing == 0 || wait_notes.elapsed() > Duration::from_secs(15) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_all.store(true, Relaxed);
    let _ = maint.await;
    let _ = sampler.await;

    let mut verdicts = check::orders(&book, &finals, &check::ledger(&bed.sims));
    if let Some(t) = &hostile_tally {
        extra.push(hostile_verdict(t, &bed.sims));
    }
    let peak_mib = rss_peak.load(Relaxed) / 1024;
    verdicts.push(Verdict {
        name: "memory bounded",
        ok: peak_mib > 0 && peak_mib <= opts.rss_max_mib,
        detail: format!("peak RSS {peak_mib} MiB (bound {} MiB)", opts.rss_max_mib),
    });
    let base = probe.p99_ms(PHASE_BASELINE);
    // Overload is expected to slow everyone while it lasts: there the recovery phase is
    // compared; a killed switch serves nobody while down: not compared.
    let (cmp_phase, cmp_name) = if scenario == Scenario::Overload {
        (PHASE_RECOVERY, "after")
    } else {
        (PHASE_ATTACK, "during")
    };
    if scenario != Scenario::SwitchSigkill {
        let during = probe.p99_ms(cmp_phase);
        let (ok, detail) = match (base, during) {
            (Some(b), Some(d)) => {
                let limit = (10.0 * b).max(250.0);
                (
                    d <= limit,
                    format!(
                        "probe p99 {b:.1} ms baseline, {d:.1} ms {cmp_name} the fault (limit {limit:.0} ms; {}+{} samples)",
                        probe.samples(PHASE_BASELINE),
                        probe.samples(cmp_phase)
                    ),
                )
            }
            _ => (false, "probe got no answers".into()),
        };
        verdicts.push(Verdict {
            name: "healthy session's latency",
            ok,
            detail,
        });
    }
    verdicts.push(Verdict {
        name: "serves after the fault",
        ok: served_ok,
        detail: format!("clean debit on a new connection: {clean:?}"),
    });
    verdicts.extend(extra);

    let (acked, told_n) = {
        let o = book.orders.lock().unwrap_or_else(|e| e.into_inner());
        (
            o.values().filter(|r| r.acknowledged()).count(),
            o.values().filter(|r| !r.told.is_empty()).count(),
        )
    };
    let out = Outcome {
        scenario: name.clone(),
        load: format!(
            "{rate:.0} debits/s on 4 connections for {} s ({} sent, {} answered, {acked} acknowledged, {} skipped while the switch was down, {retried} retried), probe every 20 ms{extra_load}",
            (t.baseline + t.attack + t.recovery).as_secs(),
            l.sent.load(Relaxed),
            told_n,
            l.skipped.load(Relaxed)
        ),
        faults,
        verdicts,
        seconds: t0.elapsed().as_secs_f64(),
    };
    pool.close();
    bed.shutdown().await;
    if out.ok() && !opts.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("chaos {name}: run directory kept: {}", dir.display());
    }
    Ok(out)
}

/// The hostile-lender verdict, after settling (the replayed debits' first copies are final).
fn hostile_verdict(tally: &hostile::Tally, sims: &[(String, sluice::sim::SimHandle)]) -> Verdict {
    let g = |a: &AtomicU64| a.load(Relaxed);
    // The replayed debits are real: each may have executed once, never twice.
    let exec = check::ledger(sims).by_amount;
    let replay_exec: Vec<u32> = (0..g(&tally.replays))
        .map(|k| exec.get(&(load::AMOUNT_REPLAY + k)).copied().unwrap_or(0))
        .collect();
    let replays_twice = replay_exec.iter().filter(|&&n| n > 1).count();
    let replays_once = replay_exec.iter().filter(|&&n| n == 1).count();
    let ok_refusals = g(&tally.accepted_bad) == 0
        && replays_twice == 0
        && g(&tally.replays_refused) == g(&tally.replays)
        && g(&tally.bad_mac_refused) > 0
        && g(&tally.garbage_body_refused) > 0
        && g(&tally.oversize_closed) == g(&tally.oversize)
        && g(&tally.flood_closed) >= g(&tally.flood_excess);
    Verdict {
        name: "hostile input refused",
        ok: ok_refusals,
        detail: format!(
            "{} bad frames accepted; replayed debits executed once: {replays_once}, twice: {replays_twice}; every replay refused: {}; every oversize length closed: {}; flood past limit closed: {}",
            g(&tally.accepted_bad),
            g(&tally.replays_refused) == g(&tally.replays),
            g(&tally.oversize_closed) == g(&tally.oversize),
            g(&tally.flood_closed) >= g(&tally.flood_excess)
        ),
    }
}

/// Saturation throughput: a closed loop with the session limit in flight on every
/// connection for two seconds (these debits are checked like every other).
async fn calibrate(
    pool: &Arc<Pool>,
    book: &Arc<Book>,
    agreements: &Arc<Vec<u64>>,
    window: usize,
) -> f64 {
    let end = Instant::now() + Duration::from_secs(2);
    let n = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..4 * window {
        let (pool, book, agreements, n, done) = (
            pool.clone(),
            book.clone(),
            agreements.clone(),
            n.clone(),
            done.clone(),
        );
        tasks.spawn(async move {
            while Instant::now() < end {
                let Some(c) = pool.get(w) else { return };
                let i = n.fetch_add(1, Relaxed);
                let id = format!("K{i}");
                let amount = load::AMOUNT_CALIBRATE + i;
                book.sent(&id, amount);
                let r = c
                    .call(load::debit(
                        &id,
                        agreements[i as usize % agreements.len()],
                        amount,
                    ))
                    .await;
                book.answered(&id, &r);
                // Only accepted work counts; a BUSY answer is cheap and says the loop
                // is past the limit (back off a little).
                match r.as_ref().ok().and_then(|r| crate::gen::outcome(&r.msg)) {
                    Some(o) if o.status == Status::Busy => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Some(_) => {
                        done.fetch_add(1, Relaxed);
                    }
                    None => {}
                }
            }
        });
    }
    let t = Instant::now();
    while tasks.join_next().await.is_some() {}
    done.load(Relaxed) as f64 / t.elapsed().as_secs_f64()
}
