//! The I/O shell around the engine: carries out [`Action`]s in order (journal before
//! anything that depends on it), talks to channels through an [`Upstream`], schedules
//! queries of PENDING orders, re-sends unacknowledged notifications, and feeds the
//! channels' unsolicited frames back into the engine.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::channel::message as ch;
use crate::crypto::{KeyStore, MacKey};
use crate::engine::order::OrderKey;
use crate::engine::{Action, Actions, DispatchResult, Engine, Record};
use crate::limits;
use crate::message::{ChannelId, Envelope, Message, Outgoing};
use crate::metrics::Metrics;
use crate::server::hub::Hub;
use crate::server::replay::ReplayGuard;
use crate::server::session::{SessionConfig, WriteItem};
use crate::wire::header::Header;

/// Wall clock in ms since the Unix epoch (timestamps on the wire and in the journal).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sends a message to a channel and says what came of it.
pub trait Upstream: Send + Sync + 'static {
    /// Send `msg` on `channel`. `NotSent` only when the bytes provably never reached the
    /// channel's socket; after that, a missing answer is `Unknown`.
    fn call(&self, channel: ChannelId, msg: ch::Message) -> BoxFuture<'static, DispatchResult>;
}

/// Makes journal records durable.
pub trait JournalSink: Send + Sync + 'static {
    /// Resolve once `rec` is durable under the configured policy.
    fn append(&self, rec: Record) -> BoxFuture<'static, std::io::Result<()>>;

    /// Queue `rec` with nobody waiting for it, for a record no answer depends on (a
    /// lender's NOTIFY_ACK). True when it is queued: it is then written in queue order
    /// with the records around it, and if writing it fails the journal fails (every
    /// later append fails, so the switch still stops). False when it cannot be queued
    /// at once (the writer's queue is full, or this sink has no queue): the caller
    /// appends it the waiting way. Saves the appender a task, a future and a wake-up.
    fn try_append_detached(&self, rec: &Record) -> bool {
        let _ = rec;
        false
    }

    /// Resolve once every record of `recs` (in order) is durable. The default appends
    /// one at a time; a journal with a writer queue hands them over at once, so the
    /// appender waits for (and is woken by) the writer once instead of once per record.
    fn append_all(&self, recs: Vec<Record>) -> BoxFuture<'static, std::io::Result<()>> {
        let each: Vec<_> = recs.into_iter().map(|r| self.append(r)).collect();
        Box::pin(async move {
            for f in each {
                f.await?;
            }
            Ok(())
        })
    }
}

/// A journal that keeps nothing: for tests of the engine shell and for benchmarks with
/// journaling off. Counts what it was given.
#[derive(Default)]
pub struct NullJournal {
    /// Records appended.
    pub records: std::sync::atomic::AtomicU64,
}

impl JournalSink for NullJournal {
    fn append(&self, _rec: Record) -> BoxFuture<'static, std::io::Result<()>> {
        self.records
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(async { Ok(()) })
    }
}

/// Where a lender request's reply goes.
pub struct ReplyTo {
    /// The session's writer queue.
    pub tx: mpsc::Sender<WriteItem>,
    /// The request's header (request id, merchant, key id).
    pub header: Header,
    /// The key that verified the request.
    pub key: Arc<MacKey>,
    /// When the request was read.
    pub started: Instant,
}

/// Everything a running switch shares.
pub struct Switch {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Merchant keys.
    pub keys: Arc<KeyStore>,
    /// Replay protection.
    pub replay: ReplayGuard,
    /// Logged-on sessions per merchant.
    pub hub: Hub,
    /// Histograms and counters.
    pub metrics: Arc<Metrics>,
    /// Session settings.
    pub session_cfg: SessionConfig,
    /// Channels.
    pub upstream: Arc<dyn Upstream>,
    /// Journal.
    pub journal: Arc<dyn JournalSink>,
    /// Stops background tasks.
    pub shutdown: CancellationToken,
    /// Tracks background tasks for a drained shutdown.
    pub tracker: TaskTracker,
}

/// Records whose durability the engine is told of (`Engine::record_durable`): what a
/// duplicate or a query may report depends on them.
fn marks_durable(r: &Record) -> bool {
    matches!(
        r,
        Record::OrderAccepted { .. }
            | Record::AttemptOutcome { .. }
            | Record::OrderFinal { .. }
            | Record::RevocationNotice { .. }
    )
}

impl Switch {
    /// Queue the leading journal records of `actions` that nothing waits for (no reply
    /// and no engine mark depends on them, such as a NOTIFY_ACK's) without waiting for
    /// them ([`JournalSink::try_append_detached`]); returns the actions left, from the
    /// first one that could not be queued so, for [`Switch::execute`] in order.
    pub fn execute_detached(&self, actions: Actions) -> Actions {
        let mut it = actions.into_iter().peekable();
        while let Some(Action::Journal(r)) = it.peek() {
            if marks_durable(r) || !self.journal.try_append_detached(r) {
                break;
            }
            it.next();
        }
        it.collect()
    }

    /// Carry out `actions` in order. A journal record is durable before any later action
    /// runs; dispatch results are fed back to the engine and their actions run next.
    pub async fn execute(self: &Arc<Self>, actions: Actions, reply: Option<&ReplyTo>) {
        let mut q: VecDeque<Action> = actions.into();
        while let Some(a) = q.pop_front() {
            match a {
                Action::Journal(r) => {
                    // Consecutive records have nothing between them that must wait for
                    // the first: they go to the journal as one append.
                    let mut recs = vec![r];
                    while let Some(Action::Journal(_)) = q.front() {
                        if let Some(Action::Journal(r)) = q.pop_front() {
                            recs.push(r);
                        }
                    }
                    let marks: Vec<Record> =
                        recs.iter().filter(|r| marks_durable(r)).cloned().collect();
                    let appended = if recs.len() == 1 {
                        let r = recs.pop().expect("one record");
                        self.journal.append(r).await
                    } else {
                        self.journal.append_all(recs).await
                    };
                    if let Err(e) = appended {
                        // Fail-stop: nothing that depends on this record may happen.
                        tracing::error!(error = %e, "journal append failed; stopping");
                        self.shutdown.cancel();
                        return;
                    }
                    for r in &marks {
                        self.engine.record_durable(r);
                    }
                }
                Action::Dispatch(d) => {
                    let t = Instant::now();
                    let r = self.upstream.call(d.channel, d.msg).await;
                    self.metrics
                        .record_upstream(&d.channel, t.elapsed().as_micros() as u64);
                    let more = self.engine.dispatch_result(&d.token, r, now_ms());
                    for a in more.into_iter().rev() {
                        q.push_front(a);
                    }
                }
                Action::Reply(msg) => {
                    if let Some(rt) = reply {
                        self.reply(rt, msg).await;
                    }
                }
                Action::Notify(n) => {
                    self.hub.deliver(&n, now_ms());
                }
                Action::Query {
                    key,
                    order_ref,
                    at_ms,
                } => self.schedule_query(key, order_ref, at_ms),
            }
        }
    }

    async fn reply(&self, rt: &ReplyTo, msg: Message) {
        let item = WriteItem {
            out: Outgoing {
                env: Envelope {
                    request_id: rt.header.request_id,
                    timestamp_ms: now_ms(),
                    key_id: rt.header.key_id,
                    merchant: rt.header.merchant,
                    flags: 0,
                },
                msg,
                key: Some(rt.key.clone()),
            },
            started: Some((rt.header.msg_type, rt.started)),
            close: false,
        };
        let _ = rt.tx.send(item).await;
    }

    fn schedule_query(self: &Arc<Self>, key: OrderKey, order_ref: ch::OrderRef, at_ms: u64) {
        let sw = self.clone();
        self.tracker.spawn(async move {
            let wait = at_ms.saturating_sub(now_ms());
            tokio::select! {
                _ = sw.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
            let actions = sw.engine.query_due(&key, &order_ref, now_ms());
            sw.execute(actions, None).await;
        });
    }

    /// Run `f` every `period` until shutdown, as a tracked task.
    pub fn every<F, Fut>(self: &Arc<Self>, period: Duration, mut f: F)
    where
        F: FnMut(Arc<Switch>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let sw = self.clone();
        self.tracker.spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = sw.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                f(sw.clone()).await;
            }
        });
    }

    /// Start the background loops: notification re-sends, and the channels' unsolicited
    /// frames (channel, frame, acknowledgement to send once the frame's effects are
    /// durable).
    pub fn start_background(
        self: &Arc<Self>,
        mut unsolicited: mpsc::Receiver<(ChannelId, ch::Message, Option<crate::upstream::Ack>)>,
    ) {
        self.every(Duration::from_secs(1), |sw| async move {
            let now = now_ms();
            for n in sw
                .engine
                .notifications_due(now, limits::NOTIFY_RESEND_PER_TICK_MAX)
            {
                sw.hub.deliver(&n, now);
            }
        });
        // Final orders past their detail window move to their compact form, on a
        // blocking thread: a second's worth of orders at saturation is tens of ms of work,
        // which must not sit on a session worker.
        self.every(Duration::from_secs(1), |sw| async move {
            let engine = sw.engine.clone();
            let moved = tokio::task::spawn_blocking(move || engine.settle_due(now_ms())).await;
            if let Ok(n) = moved {
                if n > 0 {
                    tracing::trace!(orders = n, "final orders settled");
                }
            }
        });
        let sw = self.clone();
        self.tracker.spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = sw.shutdown.cancelled() => return,
                    n = unsolicited.recv() => n,
                };
                let Some((channel, msg, ack)) = next else {
                    return;
                };
                let actions = sw.engine.channel_unsolicited(&channel, &msg, now_ms());
                let sw2 = sw.clone();
                sw.tracker.spawn(async move {
                    sw2.execute(actions, None).await;
                    // Acknowledge only after the journal has the result (the channel
                    // repeats an unacknowledged notice).
                    if let Some(a) = ack {
                        a.ack();
                    }
                });
            }
        });
    }
}
