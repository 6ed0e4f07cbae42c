//! Crash tests under load (issue 6 item 3), in process: the switch runs with the real
//! journal against simulated channels; at a random moment it "crashes" — its journal is
//! halted (nothing more becomes durable, every later append fails, so nothing more is
//! told to anyone), its lines to the channels are cut and its memory abandoned — then a
//! new switch recovers from the same data directory while the simulators keep running.
//! After several crashes everything is let settle and checked against the simulators'
//! ledgers (the oracle) and the lender's own record:
//! - every order acknowledged to the lender has exactly one final state;
//! - a final state the lender was told never changes;
//! - no order was executed twice (at most one successful ledger entry per order, no
//!   duplicate reference at any channel), and no money moved for an order sluice lost
//!   (every ledger entry belongs to an order sluice holds);
//! - sluice's final state agrees with the ledger.
//!
//! The same harness is the reference for wiring the journal into `run::start`.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{debit, prebind, CARD, INSTITUTION, MERCHANT, PHONE, SECRET};
use futures::future::BoxFuture;
use sluice::app::{now_ms, Switch, Upstream};
use sluice::channel::message as ch;
use sluice::client::{Client, ClientConfig};
use sluice::crypto::{single_key, Identity, KeyStore};
use sluice::engine::order::Phase;
use sluice::engine::{Action, ChannelConfig, ChannelTable, DispatchResult, Engine, EngineConfig};
use sluice::journal::{self, Journal, JournalConfig};
use sluice::message::{self as lm, ChannelId, Message, Status};
use sluice::metrics::Metrics;
use sluice::server::hub::Hub;
use sluice::server::replay::ReplayGuard;
use sluice::server::session::SessionConfig;
use sluice::sim::{Latency, SimConfig, SimHandle, Simulator};
use sluice::upstream::{CallError, ChannelPool, PoolConfig, Unsolicited};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const CHANNELS: [&str; 2] = ["CHA", "CHB"];

struct Pools(HashMap<ChannelId, ChannelPool>);

impl Upstream for Pools {
    fn call(&self, channel: ChannelId, msg: ch::Message) -> BoxFuture<'static, DispatchResult> {
        let pool = self.0.get(&channel).cloned();
        Box::pin(async move {
            let Some(pool) = pool else {
                return DispatchResult::NotSent;
            };
            match pool.call(msg, Duration::from_secs(1)).await {
                Ok(m) => DispatchResult::Answer(m),
                Err(CallError::NotSent(_)) => DispatchResult::NotSent,
                Err(CallError::Unknown(_)) => DispatchResult::Unknown,
            }
        })
    }
}

/// One life of the switch.
struct Node {
    addr: std::net::SocketAddr,
    switch: Arc<Switch>,
    journal: Journal,
    pools: Vec<ChannelPool>,
    stop: CancellationToken,
}

/// Start a switch on `dir`: open the journal, recover into a fresh engine, schedule the
/// queries of PENDING orders, start snapshots, then serve.
async fn start_node(
    dir: &Path,
    sims: &[SimHandle],
    switch_id: &Arc<Identity>,
    life: u32,
) -> (Node, journal::RecoveryReport) {
    let mut jc = JournalConfig::new(dir);
    jc.snapshot_every_records = 500; // snapshots happen during the test, under load
    let (journal, recovery) = journal::open(jc).expect("journal opens");
    let engine = Arc::new(Engine::new(
        EngineConfig {
            query_delay_ms: 200,
            query_backoff_max_ms: 500,
            not_found_grace_ms: 1_000,
            notify_retry_ms: 500,
            ref_prefix: format!("L{life}x"),
            ..EngineConfig::default()
        },
        ChannelTable {
            channels: CHANNELS.iter().map(|c| ChannelConfig::open(c)).collect(),
        },
        &[9u8; 32],
        now_ms().saturating_mul(1000),
    ));
    let e = engine.clone();
    let report = tokio::task::spawn_blocking(move || recovery.apply(&e, now_ms()))
        .await
        .unwrap()
        .expect("recovers");
    journal.start_snapshots(engine.clone());

    let (u_tx, u_rx) = mpsc::channel(4096);
    let mut pools = HashMap::new();
    let tracker = TaskTracker::new();
    for (name, sim) in CHANNELS.iter().zip(sims) {
        let (tx, mut rx) = mpsc::channel::<Unsolicited>(4096);
        let mut pc = PoolConfig::new(vec![sim.addr()], INSTITUTION);
        pc.connections = 2;
        pc.channel = name.to_string();
        let pool = ChannelPool::start(pc, switch_id.clone(), sim.public_key(), tx);
        let id = ChannelId::new(name).unwrap();
        pools.insert(id, pool);
        let fwd = u_tx.clone();
        tracker.spawn(async move {
            while let Some(u) = rx.recv().await {
                let item = match u {
                    Unsolicited::Notification { notify, ack } => (id, notify.into(), Some(ack)),
                    Unsolicited::Revocation { revoke, ack } => (id, revoke.into(), Some(ack)),
                    Unsolicited::LateReply { message, .. } => (id, message, None),
                };
                if fwd.send(item).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(u_tx);
    let switch = Arc::new(Switch {
        engine,
        keys: Arc::new(KeyStore::new(single_key(MERCHANT, 1, &SECRET))),
        replay: ReplayGuard::new(240_000, 1_000_000),
        hub: Hub::default(),
        metrics: Arc::new(Metrics::default()),
        session_cfg: SessionConfig::default(),
        upstream: Arc::new(Pools(pools.clone())),
        journal: Arc::new(journal.clone()),
        shutdown: CancellationToken::new(),
        tracker,
    });
    switch.start_background(u_rx);
    for (key, order_ref, at_ms) in &report.pending {
        let q = Action::Query {
            key: *key,
            order_ref: *order_ref,
            at_ms: *at_ms,
        };
        switch.execute(vec![q], None).await;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let lt = TaskTracker::new();
    lt.spawn(sluice::server::serve(
        listener,
        switch.clone(),
        64,
        stop.clone(),
        lt.clone(),
    ));
    let pools: Vec<ChannelPool> = pools.into_values().collect();
    for p in &pools {
        let _ = tokio::time::timeout(Duration::from_secs(10), p.wait_ready(1)).await;
    }
    (
        Node {
            addr,
            switch,
            journal,
            pools,
            stop,
        },
        report,
    )
}

impl Node {
    /// Crash: nothing more becomes durable or is told to anyone; lines cut; memory left.
    async fn crash(self) {
        self.journal.halt();
        self.stop.cancel();
        self.switch.shutdown.cancel();
        for p in &self.pools {
            p.shutdown().await;
        }
    }
}

async fn client(addr: std::net::SocketAddr) -> Client {
    let c = Client::connect(
        addr,
        ClientConfig {
            merchant: MERCHANT.into(),
            key_id: 1,
            secret: SECRET.to_vec(),
            auto_ack: true,
            timeout: Duration::from_secs(5),
        },
    )
    .await
    .expect("connect");
    c.logon().await.expect("logon");
    c
}

/// What the lender knows of one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    /// Sent, no answer yet (or the answer was lost with the connection).
    Nothing,
    /// Accepted, outcome pending.
    Pending,
    /// Final.
    Final(Status),
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Send `orders` with up to 16 in flight; record what each reply said.
async fn send_orders(
    c: Arc<Client>,
    agreement: u64,
    orders: Vec<String>,
    told: Arc<std::sync::Mutex<HashMap<String, Told>>>,
) {
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for o in orders {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (c, told) = (c.clone(), told.clone());
        tasks.push(tokio::spawn(async move {
            let amount = 100 + (o.len() as u64 * 7);
            told.lock()
                .unwrap()
                .entry(o.clone())
                .or_insert(Told::Nothing);
            let r = c.call(debit(&o, agreement, amount)).await;
            drop(permit);
            if let Ok(r) = r {
                if let Message::DebitRsp(d) = r.msg {
                    let t = match d.result.status {
                        Status::Success | Status::Failed => Told::Final(d.result.status),
                        Status::Pending => Told::Pending,
                        _ => return,
                    };
                    let mut g = told.lock().unwrap();
                    let cur = g.get(&o).copied().unwrap_or(Told::Nothing);
                    if let (Told::Final(a), Told::Final(b)) = (cur, t) {
                        assert_eq!(a, b, "order {o}: the lender was told two final states");
                    }
                    if !matches!(cur, Told::Final(_)) {
                        g.insert(o, t);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_at_random_moments_under_load_then_everything_settles_exactly_once() {
    tokio::time::timeout(Duration::from_secs(120), crash_run())
        .await
        .expect("bounded in time");
}

async fn crash_run() {
    let dir = tempfile::tempdir().unwrap();
    let switch_id = Arc::new(Identity::from_seed(&[1u8; 32]));
    let mut sims = Vec::new();
    for i in 0..CHANNELS.len() {
        let chan_id = Arc::new(Identity::from_seed(&[10 + i as u8; 32]));
        let mut sc = SimConfig::new(chan_id, INSTITUTION, switch_id.public_key());
        sc.seed = 7 + i as u64;
        let sim = Simulator::start(sc).await.unwrap();
        sim.update_profile(|p| {
            p.latency = Latency::Fixed { ms: 15.0 };
            p.async_ratio = 0.3;
            p.async_delay_ms = 300;
            p.decline_ratio = 0.1;
            p.not_processed_ratio = 0.05;
        })
        .unwrap();
        sims.push(sim);
    }
    let mut seed = now_ms() | 1;
    eprintln!("crash test seed {seed}");
    let told: Arc<std::sync::Mutex<HashMap<String, Told>>> = Arc::default();

    // Life 0: sign the card (an agreement record in the journal).
    let (node, _) = start_node(dir.path(), &sims, &switch_id, 0).await;
    let c = client(node.addr).await;
    let r = c.call(prebind(CARD, PHONE)).await.unwrap();
    let Message::PreBindRsp(p) = r.msg else {
        panic!("{r:?}")
    };
    let mut code = None;
    for _ in 0..100 {
        code = sims
            .iter()
            .find_map(|s| s.outbox().into_iter().rev().find(|m| m.phone == PHONE))
            .map(|m| m.code);
        if code.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = common::bind_confirm(&c, p.bind_ref, &code.unwrap()).await;
    assert_eq!(b.result.status, Status::Success);
    let agreement = b.agreement_id;
    drop(c);

    let mut node = Some(node);
    let mut total_pending_recovered = 0;
    for life in 1..=4u32 {
        let n = node.take().unwrap();
        let c = Arc::new(client(n.addr).await);
        // New orders of this life plus every order the lender has no final answer for
        // (a lender retries with the same order id; idempotency makes that safe).
        let mut orders: Vec<String> = (0..150).map(|i| format!("L{life}-{i}")).collect();
        orders.extend(
            told.lock()
                .unwrap()
                .iter()
                .filter(|(_, t)| !matches!(t, Told::Final(_)))
                .map(|(o, _)| o.clone()),
        );
        let load = tokio::spawn(send_orders(c.clone(), agreement, orders, told.clone()));
        if life < 4 {
            // Crash at a random moment under load.
            let wait_ms = 30 + rng(&mut seed) % 400;
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            n.crash().await;
            let _ = tokio::time::timeout(Duration::from_secs(10), load).await;
            drop(c);
            let (next, report) = start_node(dir.path(), &sims, &switch_id, life + 1).await;
            eprintln!(
                "life {life}: crashed after {wait_ms} ms; recovered {} records, {} pending, {} failed, torn {:?}",
                report.records_replayed,
                report.pending.len(),
                report.failed_orders,
                report.torn_tail
            );
            total_pending_recovered += report.pending.len();
            node = Some(next);
        } else {
            load.await.unwrap();
            node = Some(n);
        }
    }
    let node = node.unwrap();
    let engine = node.switch.engine.clone();
    // Settle: every order sluice holds reaches a final state.
    let c = client(node.addr).await;
    let keys: Vec<String> = told.lock().unwrap().keys().cloned().collect();
    let key = |o: &str| {
        (
            sluice::wire::header::MerchantNo::new(MERCHANT).unwrap(),
            lm::OrderId::new(o).unwrap(),
        )
    };
    let mut settled = false;
    for _ in 0..200 {
        settled = keys.iter().all(|o| {
            engine
                .order(&key(o))
                .map_or(true, |x| x.phase == Phase::Final)
        });
        if settled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled, "every order reached a final state");
    // The lender's final word on each order (a query is what a lender does after a loss).
    let told = told.lock().unwrap().clone();
    let mut acked = 0;
    for (o, t) in &told {
        let x = engine.order(&key(o));
        match t {
            Told::Nothing => {}
            Told::Pending | Told::Final(_) => {
                acked += 1;
                let x = x.unwrap_or_else(|| panic!("order {o} was acknowledged and lost"));
                assert_eq!(x.phase, Phase::Final, "{o}");
                if let Told::Final(s) = t {
                    assert_eq!(
                        x.outcome.status, *s,
                        "order {o}: final state changed across a crash"
                    );
                }
            }
        }
    }
    // The ledgers: no duplicate references, no orphan executions, at most one success per
    // order, and sluice's final status agrees with the money.
    for s in &sims {
        assert_eq!(s.duplicates(), 0, "a reference reached a channel twice");
        s.check_consistency().unwrap();
    }
    let mut ref_to_order = HashMap::new();
    for o in told.keys() {
        if let Some(x) = engine.order(&key(o)) {
            for a in &x.attempts {
                ref_to_order.insert(a.order_ref, o.clone());
            }
        }
    }
    let mut successes: HashMap<String, u32> = HashMap::new();
    let mut executed = 0;
    for s in &sims {
        for e in s.ledger_snapshot() {
            let o = ref_to_order.get(&e.order_ref).unwrap_or_else(|| {
                panic!("money moved for {} which sluice does not know", e.order_ref)
            });
            if e.succeeded() {
                *successes.entry(o.clone()).or_default() += 1;
                executed += 1;
            }
        }
    }
    for o in told.keys() {
        let n = successes.get(o).copied().unwrap_or(0);
        assert!(n <= 1, "order {o} executed {n} times");
        if let Some(x) = engine.order(&key(o)) {
            let ok = x.outcome.status == Status::Success;
            assert_eq!(
                ok,
                n == 1,
                "order {o}: sluice says {:?}, ledger successes {n}",
                x.outcome
            );
        }
    }
    eprintln!(
        "crash test: {} orders, {acked} acknowledged, {executed} executed, {total_pending_recovered} pending orders recovered",
        told.len()
    );
    assert!(acked > 300, "the load ran: {acked} acknowledged");
    drop(c);
    node.crash().await;
    for s in sims {
        s.shutdown().await;
    }
}
