//! Wiring: start a switch (listener, engine, channel pools, background loops) from a
//! [`SwitchConfig`], and stop it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{now_ms, JournalSink, Switch, Upstream};
use crate::channel::message as ch;
use crate::crypto::{Identity, KeyStore};
use crate::engine::{ChannelConfig, ChannelTable, DispatchResult, Engine, EngineConfig};
use crate::journal::{Journal, JournalConfig, RecoveryReport};
use crate::limits;
use crate::message::ChannelId;
use crate::metrics::Metrics;
use crate::server::hub::Hub;
use crate::server::replay::ReplayGuard;
use crate::server::session::SessionConfig;
use crate::upstream::{CallError, ChannelPool, PoolConfig, Unsolicited};

/// One upstream channel: routing settings and where to reach it.
#[derive(Debug, Clone)]
pub struct ChannelSetup {
    /// Routing settings (id, products, banks, card types, enabled).
    pub route: ChannelConfig,
    /// Connection settings.
    pub pool: PoolConfig,
    /// The channel's Ed25519 public key.
    pub public_key: [u8; 32],
}

/// Everything needed to start a switch.
pub struct SwitchConfig {
    /// Lender listener address.
    pub listen: SocketAddr,
    /// Channels in priority order.
    pub channels: Vec<ChannelSetup>,
    /// Merchant keys.
    pub keys: Arc<KeyStore>,
    /// The switch's Ed25519 identity for channel logons.
    pub identity: Arc<Identity>,
    /// Secret for the keyed hashes of card and ID numbers.
    pub pii_secret: Vec<u8>,
    /// Engine settings.
    pub engine: EngineConfig,
    /// Session settings.
    pub session: SessionConfig,
    /// Lender connection limit.
    pub connections_max: usize,
    /// Deadline of one channel request.
    pub channel_deadline: Duration,
    /// Journal.
    pub journal: JournalSetup,
    /// Admin port address and bearer token (`None`: no admin port).
    pub admin: Option<(SocketAddr, String)>,
}

/// Where engine records go.
pub enum JournalSetup {
    /// A sink that keeps nothing durable (tests of the shell, `journal.policy = none`
    /// benchmarks without a data directory).
    Memory(Arc<dyn JournalSink>),
    /// The durable journal in a data directory: recovered at start, closed at stop.
    Durable(JournalConfig),
}

/// The channel pools as the engine's [`Upstream`].
pub struct Pools {
    pools: HashMap<ChannelId, ChannelPool>,
    deadline: Duration,
}

impl Upstream for Pools {
    fn call(&self, channel: ChannelId, msg: ch::Message) -> BoxFuture<'static, DispatchResult> {
        let pool = self.pools.get(&channel).cloned();
        let deadline = self.deadline;
        Box::pin(async move {
            let Some(pool) = pool else {
                return DispatchResult::NotSent;
            };
            match pool.call(msg, deadline).await {
                Ok(m) => DispatchResult::Answer(m),
                Err(CallError::NotSent(_)) => DispatchResult::NotSent,
                Err(CallError::Unknown(_)) => DispatchResult::Unknown,
            }
        })
    }
}

/// A running switch.
pub struct Running {
    /// The lender listener's address.
    pub addr: SocketAddr,
    /// Shared state (engine, metrics …).
    pub switch: Arc<Switch>,
    /// Channel pools by id.
    pub pools: HashMap<ChannelId, ChannelPool>,
    /// The durable journal, when configured.
    pub journal: Option<Journal>,
    /// The admin port's address, when configured.
    pub admin_addr: Option<SocketAddr>,
    /// What recovery found at start (durable journal only).
    pub recovery: Option<RecoveryReport>,
    /// What the admin port controls: the reload hook, shutdown requests, readiness.
    pub control: Arc<crate::admin::Control>,
    listener_tracker: TaskTracker,
    stop: CancellationToken,
}

impl Running {
    /// Wait until every channel pool has at least one logged-on connection (or `wait`
    /// passes). Returns true when all are ready.
    pub async fn wait_channels(&self, wait: Duration) -> bool {
        let all = async {
            for p in self.pools.values() {
                p.wait_ready(1).await;
            }
        };
        tokio::time::timeout(wait, all).await.is_ok()
    }

    /// Stop accepting, let sessions end, stop background loops and close upstreams.
    pub async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        self.listener_tracker.close();
        let _ = tokio::time::timeout(grace, self.listener_tracker.wait()).await;
        self.switch.shutdown.cancel();
        self.switch.tracker.close();
        let _ = tokio::time::timeout(grace, self.switch.tracker.wait()).await;
        for p in self.pools.values() {
            p.shutdown().await;
        }
        if let Some(j) = self.journal {
            // Flush and fsync what is queued, then stop the writer.
            let _ = tokio::task::spawn_blocking(move || j.close()).await;
        }
    }
}

/// Every 5 s: hand each pool's logged-on connections and drop count (kept by its echo
/// heartbeats) to channel health, and forget per-card counters of past days.
fn observe_pools(switch: &Arc<Switch>, pools: &HashMap<ChannelId, ChannelPool>) {
    let pools: Vec<(ChannelId, ChannelPool)> =
        pools.iter().map(|(id, p)| (*id, p.clone())).collect();
    switch.every(Duration::from_secs(5), move |sw| {
        for (id, p) in &pools {
            let s = p.stats();
            sw.engine
                .health()
                .observe_pool(id, s.connections_ready, s.disconnects);
        }
        sw.engine.prune_limits(now_ms());
        std::future::ready(())
    });
}

/// Start a switch.
pub async fn start(cfg: SwitchConfig) -> std::io::Result<Running> {
    let listener = TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let table = ChannelTable {
        channels: cfg.channels.iter().map(|c| c.route.clone()).collect(),
    };
    let engine = Arc::new(Engine::new(
        cfg.engine,
        table,
        &cfg.pii_secret,
        now_ms().saturating_mul(1000),
    ));
    // Recovery comes before anything can reach the engine: snapshot + journal tail,
    // orders that were in flight become PENDING and are queried below.
    let (journal_sink, journal, recovery): (Arc<dyn JournalSink>, _, _) = match cfg.journal {
        JournalSetup::Memory(sink) => (sink, None, None),
        JournalSetup::Durable(jc) => {
            let (journal, recovery) = crate::journal::open(jc).map_err(std::io::Error::other)?;
            let e = engine.clone();
            let report = tokio::task::spawn_blocking(move || recovery.apply(&e, now_ms()))
                .await
                .map_err(std::io::Error::other)?
                .map_err(std::io::Error::other)?;
            tracing::info!(
                records = report.records_replayed,
                pending = report.pending.len(),
                torn_tail = report.torn_tail.is_some(),
                "journal recovered"
            );
            journal.start_snapshots(engine.clone());
            let sink: Arc<dyn JournalSink> = Arc::new(journal.clone());
            (sink, Some(journal), Some(report))
        }
    };
    let (u_tx, u_rx) = mpsc::channel::<(ChannelId, ch::Message, Option<crate::upstream::Ack>)>(
        limits::WRITE_QUEUE_FRAMES,
    );
    let mut pools = HashMap::new();
    let background = TaskTracker::new();
    let shutdown = CancellationToken::new();
    for c in &cfg.channels {
        let (tx, mut rx) = mpsc::channel::<Unsolicited>(limits::WRITE_QUEUE_FRAMES);
        let mut pc = c.pool.clone();
        pc.channel = c.route.id.as_str().to_string();
        let pool = ChannelPool::start(pc, cfg.identity.clone(), c.public_key, tx);
        pools.insert(c.route.id, pool);
        let id = c.route.id;
        let fwd = u_tx.clone();
        let stop = shutdown.clone();
        background.spawn(async move {
            // Ends at shutdown too: the pool (which holds the sender) is closed only after
            // the background tasks have drained.
            loop {
                let u = tokio::select! {
                    _ = stop.cancelled() => return,
                    u = rx.recv() => u,
                };
                let Some(u) = u else { return };
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
        keys: cfg.keys,
        replay: ReplayGuard::new(
            cfg.session.replay_window_s as u64 * 1000,
            limits::REPLAY_IDS_PER_MERCHANT_MAX,
        ),
        hub: Hub::default(),
        metrics: Arc::new(Metrics::default()),
        session_cfg: cfg.session,
        upstream: Arc::new(Pools {
            pools: pools.clone(),
            deadline: cfg.channel_deadline,
        }),
        journal: journal_sink,
        shutdown,
        tracker: background,
    });
    switch.start_background(u_rx);
    if let Some(r) = &recovery {
        let queries: Vec<_> = r
            .pending
            .iter()
            .map(|(key, order_ref, at_ms)| crate::engine::Action::Query {
                key: *key,
                order_ref: *order_ref,
                at_ms: *at_ms,
            })
            .collect();
        switch.execute(queries, None).await;
    }
    observe_pools(&switch, &pools);
    let control = Arc::new(crate::admin::Control::new(pools.clone(), journal.clone()));
    control.mark_recovered();
    let stop = CancellationToken::new();
    let listener_tracker = TaskTracker::new();
    let admin_addr = match cfg.admin {
        Some((addr, token)) => {
            let l = TcpListener::bind(addr).await?;
            let a = l.local_addr()?;
            listener_tracker.spawn(crate::admin::serve(
                l,
                switch.clone(),
                control.clone(),
                token,
                stop.clone(),
            ));
            Some(a)
        }
        None => None,
    };
    let t = listener_tracker.clone();
    listener_tracker.spawn(crate::server::serve(
        listener,
        switch.clone(),
        cfg.connections_max.min(limits::CONNECTIONS_MAX),
        stop.clone(),
        t,
    ));
    Ok(Running {
        addr,
        switch,
        pools,
        journal,
        admin_addr,
        recovery,
        control,
        listener_tracker,
        stop,
    })
}
