//! One lender connection: a reader that decodes, authenticates and dispatches frames, and
//! a writer that batches responses and flushes when its queue is empty.
//!
//! Requests that reach a channel run as their own tasks, bounded by the session's
//! in-flight semaphore, and are answered as they complete (not in order). Everything the
//! reader can answer at once (refusals, logon, echo, queries) it answers inline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::app::{now_ms, ReplyTo, Switch};
use crate::crypto::MacKey;
use crate::limits;
use crate::message::inbound::{accept, framing_outcome, Refusal, Verified};
use crate::message::{
    self as lm, Envelope, LenderCodec, Message, Outcome, Outgoing, Reason, Status,
};
use crate::metrics::Metrics;
use crate::wire::header::{Header, MerchantNo};

use super::hub::Link;

/// One frame for the writer, with when its request was read (for the latency histogram).
#[derive(Debug)]
pub struct WriteItem {
    /// The frame.
    pub out: Outgoing,
    /// Request type and read time, for responses.
    pub started: Option<(u8, Instant)>,
    /// Close the connection after writing this frame.
    pub close: bool,
}

impl WriteItem {
    /// A frame with no latency to record.
    pub fn frame(out: Outgoing) -> WriteItem {
        WriteItem {
            out,
            started: None,
            close: false,
        }
    }
}

/// Per-session settings.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Heartbeat interval the switch uses when the lender proposes none.
    pub heartbeat_s: u16,
    /// Requests in flight per connection.
    pub inflight_max: usize,
    /// Timestamp window, seconds.
    pub replay_window_s: u16,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            heartbeat_s: limits::HEARTBEAT_S_DEFAULT,
            inflight_max: limits::INFLIGHT_PER_SESSION_DEFAULT,
            replay_window_s: limits::REPLAY_WINDOW_S,
        }
    }
}

#[derive(Clone)]
struct Bound {
    merchant: MerchantNo,
    key_id: u16,
    key: Arc<MacKey>,
}

struct Session {
    id: u64,
    sw: Arc<Switch>,
    tx: mpsc::Sender<WriteItem>,
    merchants: Mutex<Vec<Bound>>,
    inflight: Arc<Semaphore>,
    heartbeat_s: AtomicU64,
}

fn respond_env(h: &Header) -> Envelope {
    Envelope {
        request_id: h.request_id,
        timestamp_ms: now_ms(),
        key_id: h.key_id,
        merchant: h.merchant,
        flags: 0,
    }
}

/// Serve one lender connection until it closes, idles out, or `shutdown` fires.
pub async fn run(stream: TcpStream, sw: Arc<Switch>, id: u64, shutdown: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel(limits::WRITE_QUEUE_FRAMES);
    let writer = tokio::spawn(write_loop(wr, rx, sw.metrics.clone()));
    let s = Arc::new(Session {
        id,
        sw: sw.clone(),
        tx,
        merchants: Mutex::new(Vec::new()),
        inflight: Arc::new(Semaphore::new(sw.session_cfg.inflight_max)),
        heartbeat_s: AtomicU64::new(sw.session_cfg.heartbeat_s as u64),
    });
    tracing::info!(session = id, ?peer, "lender connected");
    let mut frames = FramedRead::with_capacity(rd, LenderCodec::new(), 8 * 1024);
    let mut last_rx = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_echo = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                let hb = Duration::from_secs(s.heartbeat_s.load(Ordering::Relaxed));
                if last_rx.elapsed() > hb * 3 {
                    tracing::info!(session = id, "idle timeout");
                    break;
                }
                if last_rx.elapsed() >= hb && last_echo.elapsed() >= hb {
                    last_echo = Instant::now();
                    s.send_echo();
                }
            }
            next = frames.next() => {
                last_rx = Instant::now();
                match next {
                    None => break,
                    Some(Err(e)) => {
                        Metrics::inc(&sw.metrics.counters.malformed);
                        tracing::warn!(session = id, error = %e, "framing lost; closing");
                        let msg = lm::reject(0, framing_outcome(&e), "framing lost");
                        let _ = s.tx.send(WriteItem {
                            out: Outgoing { env: Envelope { request_id: 0, timestamp_ms: now_ms(), key_id: 0, merchant: MerchantNo::empty(), flags: 0 }, msg, key: None },
                            started: None,
                            close: true,
                        }).await;
                        break;
                    }
                    Some(Ok(item)) => {
                        let started = Instant::now();
                        match accept(item, &sw.keys) {
                            Ok(v) => s.handle(v, started).await,
                            Err(r) => s.refuse(r, started).await,
                        }
                    }
                }
            }
        }
    }
    sw.hub.unregister(id, None);
    drop(s);
    // The writer ends when every sender (this session and its in-flight tasks) is gone.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    tracing::info!(session = id, "lender disconnected");
}

async fn write_loop(
    wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::Receiver<WriteItem>,
    metrics: Arc<Metrics>,
) {
    let mut sink = FramedWrite::new(wr, LenderCodec::new());
    let mut done = Vec::with_capacity(64);
    while let Some(first) = rx.recv().await {
        let mut close = false;
        let mut next = Some(first);
        let mut yielded = false;
        // Feed everything queued, wait one scheduler turn for more (`crate::coalesce`),
        // then flush once.
        loop {
            while let Some(item) = next {
                close |= item.close;
                if let Some(s) = item.started {
                    done.push(s);
                }
                metrics.record_answer(&item.out.msg);
                if sink.feed(item.out).await.is_err() {
                    return;
                }
                next = if close { None } else { rx.try_recv().ok() };
            }
            if close || yielded {
                break;
            }
            yielded = true;
            next = crate::coalesce::next_after_one_turn(&mut rx).await;
        }
        if SinkExt::<Outgoing>::flush(&mut sink).await.is_err() {
            return;
        }
        for (code, t) in done.drain(..) {
            metrics.record_lender(code, t.elapsed().as_micros() as u64);
        }
        if close {
            return;
        }
    }
}

impl Session {
    fn bound(&self, m: &MerchantNo) -> Option<Bound> {
        let v = self.merchants.lock().unwrap_or_else(|p| p.into_inner());
        v.iter().find(|b| &b.merchant == m).cloned()
    }

    fn any_bound(&self) -> bool {
        !self
            .merchants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn send_echo(&self) {
        let first = self
            .merchants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first()
            .cloned();
        if let Some(b) = first {
            let out = Outgoing {
                env: Envelope {
                    request_id: now_ms() | 1 << 63,
                    timestamp_ms: now_ms(),
                    key_id: b.key_id,
                    merchant: b.merchant,
                    flags: 0,
                },
                msg: lm::EchoReq { nonce: now_ms() }.into(),
                key: Some(b.key),
            };
            let _ = self.tx.try_send(WriteItem::frame(out));
        }
    }

    async fn send(&self, h: &Header, msg: Message, key: Option<Arc<MacKey>>, started: Instant) {
        let item = WriteItem {
            out: Outgoing {
                env: respond_env(h),
                msg,
                key,
            },
            started: Some((h.msg_type, started)),
            close: false,
        };
        let _ = self.tx.send(item).await;
    }

    /// Answer a frame refused by the codec or the MAC/field checks.
    async fn refuse(&self, r: Refusal, started: Instant) {
        let m = &self.sw.metrics.counters;
        match r.outcome.reason {
            Reason::BAD_MAC | Reason::UNKNOWN_KEY => Metrics::inc(&m.bad_mac),
            _ => Metrics::inc(&m.malformed),
        }
        let e = r.envelope;
        let key = self.sw.keys.get(&e.merchant, e.key_id);
        let h = Header {
            msg_type: e.msg_type,
            length: 0,
            flags: 0,
            request_id: e.request_id,
            timestamp_ms: 0,
            key_id: if key.is_some() { e.key_id } else { 0 },
            merchant: e.merchant,
        };
        let msg = if r.authenticated {
            lm::refusal(e.msg_type, r.outcome)
        } else {
            None
        }
        .unwrap_or_else(|| lm::reject(e.msg_type, r.outcome, r.outcome.reason.name()));
        tracing::debug!(
            session = self.id,
            reason = r.outcome.reason.name(),
            field = r.outcome.field,
            "frame refused"
        );
        self.send(&h, msg, key, started).await;
    }

    async fn refuse_verified(&self, v: &Verified, outcome: Outcome, started: Instant) {
        Metrics::inc(&self.sw.metrics.counters.session_refused);
        let msg = lm::refusal(v.header.msg_type, outcome)
            .unwrap_or_else(|| lm::reject(v.header.msg_type, outcome, outcome.reason.name()));
        self.send(&v.header, msg, Some(v.key.clone()), started)
            .await;
    }

    async fn handle(self: &Arc<Self>, v: Verified, started: Instant) {
        let h = v.header;
        // Debug level: the whole request for tracing a lender's problem. Borrower data
        // prints masked by type (the PII fields' Debug), never in clear.
        tracing::debug!(session = self.id, merchant = %h.merchant, request = ?v.msg, "request");
        let rejected = |reason| Outcome::new(Status::Rejected, reason);
        if !lm::is_lender_request(h.msg_type) {
            return self
                .refuse_verified(&v, rejected(Reason::UNEXPECTED_MESSAGE), started)
                .await;
        }
        match &v.msg {
            Message::EchoRsp(_) => return,
            Message::EchoReq(e) => {
                let msg = lm::EchoRsp { nonce: e.nonce }.into();
                return self.send(&h, msg, Some(v.key.clone()), started).await;
            }
            _ => {}
        }
        let now = now_ms();
        if let Err(reason) = self
            .sw
            .replay
            .check(&h.merchant, h.request_id, h.timestamp_ms, now)
        {
            let status = if reason == Reason::OVERLOADED {
                Status::Busy
            } else {
                Status::Rejected
            };
            return self
                .refuse_verified(&v, Outcome::new(status, reason), started)
                .await;
        }
        if let Message::LogonReq(l) = &v.msg {
            return self.logon(&v, l, started).await;
        }
        if self.bound(&h.merchant).is_none() {
            let reason = if self.any_bound() {
                Reason::MERCHANT_NOT_ALLOWED
            } else {
                Reason::NOT_LOGGED_ON
            };
            return self.refuse_verified(&v, rejected(reason), started).await;
        }
        let sw = &self.sw;
        let m = h.merchant;
        match &v.msg {
            Message::LogoffReq(_) => {
                let last = {
                    let mut b = self.merchants.lock().unwrap_or_else(|p| p.into_inner());
                    b.retain(|x| x.merchant != m);
                    b.is_empty()
                };
                sw.hub.unregister(self.id, Some(&m));
                let item = WriteItem {
                    out: Outgoing {
                        env: respond_env(&h),
                        msg: lm::LogoffRsp {
                            result: Outcome::ok(),
                        }
                        .into(),
                        key: Some(v.key.clone()),
                    },
                    started: Some((h.msg_type, started)),
                    close: last,
                };
                let _ = self.tx.send(item).await;
            }
            Message::NotifyAck(a) => {
                let actions = sw.engine.notify_ack(&m, a.notify_id);
                // The ack's record is journaled off the reader: nothing waits on it (an
                // ack has no answer, and if a crash comes first the notification is only
                // sent again under the same id). Awaiting it here held this lender's
                // next frames in the socket for one journal round trip per ack.
                let rest = sw.execute_detached(actions);
                if !rest.is_empty() {
                    let sw = sw.clone();
                    sw.tracker
                        .clone()
                        .spawn(async move { sw.execute(rest, None).await });
                }
            }
            Message::OrderQueryReq(q) => {
                let msg = sw.engine.order_query(m, q);
                self.send(&h, msg, Some(v.key.clone()), started).await;
            }
            Message::AgreementQueryReq(q) => {
                let msg = sw.engine.agreement_query(m, q);
                self.send(&h, msg, Some(v.key.clone()), started).await;
            }
            _ => {
                let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
                    Metrics::inc(&sw.metrics.counters.busy);
                    return self
                        .refuse_verified(
                            &v,
                            Outcome::new(Status::Busy, Reason::OVERLOADED),
                            started,
                        )
                        .await;
                };
                let gauge = crate::metrics::InflightGauge::new(&sw.metrics);
                let this = self.clone();
                tokio::spawn(async move {
                    let _gauge = gauge;
                    let now = now_ms();
                    let e = &this.sw.engine;
                    let actions = match &v.msg {
                        Message::DebitReq(r) => e.debit(m, r, now),
                        Message::PayoutReq(r) => e.payout(m, r, now),
                        Message::PreBindReq(r) => e.prebind(m, r, now),
                        Message::BindConfirmReq(r) => e.bind_confirm(m, r, now),
                        Message::SignAndPayReq(r) => e.sign_and_pay(m, r, now),
                        Message::AgreementCancelReq(r) => e.agreement_cancel(m, r),
                        _ => vec![],
                    };
                    let reply = ReplyTo {
                        tx: this.tx.clone(),
                        header: v.header,
                        key: v.key.clone(),
                        started,
                    };
                    // Boxed: the engine's state machine for the whole request (~2 KB)
                    // is allocated once here instead of being part of the spawned
                    // future, which tokio moves into its task cell and copies again
                    // when the task completes (memmove was ~6 % of the switch's CPU).
                    Box::pin(this.sw.execute(actions, Some(&reply))).await;
                    drop(permit);
                });
            }
        }
    }

    async fn logon(self: &Arc<Self>, v: &Verified, l: &lm::LogonReq, started: Instant) {
        let h = v.header;
        let cfg = &self.sw.session_cfg;
        let count = {
            let mut b = self.merchants.lock().unwrap_or_else(|p| p.into_inner());
            if !b.iter().any(|x| x.merchant == h.merchant) {
                if b.len() >= limits::MERCHANTS_PER_SESSION_MAX {
                    None
                } else {
                    b.push(Bound {
                        merchant: h.merchant,
                        key_id: h.key_id,
                        key: v.key.clone(),
                    });
                    Some(b.len())
                }
            } else {
                Some(b.len())
            }
        };
        let Some(count) = count else {
            return self
                .refuse_verified(
                    v,
                    Outcome::new(Status::Rejected, Reason::MERCHANT_NOT_ALLOWED),
                    started,
                )
                .await;
        };
        let hb = if l.heartbeat_s == 0 {
            cfg.heartbeat_s
        } else {
            l.heartbeat_s
                .clamp(limits::HEARTBEAT_S_MIN, limits::HEARTBEAT_S_MAX)
        };
        if count == 1 {
            self.heartbeat_s.store(hb as u64, Ordering::Relaxed);
        }
        let hb = self.heartbeat_s.load(Ordering::Relaxed) as u16;
        let rsp = lm::LogonRsp {
            result: Outcome::ok(),
            session_id: self.id,
            heartbeat_s: hb,
            idle_timeout_s: hb.saturating_mul(3),
            replay_window_s: cfg.replay_window_s,
            inflight_max: cfg.inflight_max.min(u16::MAX as usize) as u16,
        };
        self.send(&h, rsp.into(), Some(v.key.clone()), started)
            .await;
        tracing::info!(session = self.id, merchant = %h.merchant, client = l.client_name.as_str(), "logon");
        self.sw.hub.register(
            h.merchant,
            Link {
                session: self.id,
                tx: self.tx.clone(),
                key_id: h.key_id,
                key: v.key.clone(),
            },
        );
        for n in self
            .sw
            .engine
            .notifications_for(&h.merchant, limits::NOTIFY_ON_LOGON_MAX)
        {
            self.sw.hub.deliver(&n, now_ms());
        }
    }
}
