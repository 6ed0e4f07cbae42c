//! One upstream connection: connect, logon, then a reader and a writer task around a
//! table of requests in flight. Knows nothing of slots, routing or business rules.
//!
//! Concurrency note (who resolves a call, and how):
//! - the caller inserts its entry into `pending`, then `try_send`s the frame to the
//!   writer queue; if that fails the frame was never queued: the caller removes its
//!   entry and reports NOT SENT;
//! - the writer encodes and writes frames in queue order;
//! - on teardown the queue is **closed first**, then what is left in it is resolved NOT
//!   SENT (never written), then every entry still in `pending` is resolved UNKNOWN (it
//!   may have reached the channel). A caller racing with teardown either got its frame
//!   into the queue before the close (and is resolved by the drain) or fails `try_send`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use futures::StreamExt;
use ring::rand::SystemRandom;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::pool::{
    Ack, CallError, Counters, NotSentReason, PoolConfig, UnknownReason, Unsolicited,
};
use crate::channel::handshake::{ClientHandshake, Established, HandshakeError, LogonParams};
use crate::channel::message::{self as cm, ChannelCodec, EchoReq, EchoRsp, Envelope, Message};
use crate::crypto::Identity;
use crate::wire::field::Ascii;

/// What a caller waits on.
pub(crate) type Reply = Result<Message, CallError>;

/// A request the caller is (or was) waiting for.
pub(crate) struct Pending {
    /// `None` once the caller's deadline passed: a reply is then a late reply.
    pub(crate) tx: Option<oneshot::Sender<Reply>>,
    /// When the caller started (latency is measured from here).
    pub(crate) started: Instant,
}

/// One frame for the writer.
pub(crate) enum WriteItem {
    /// A caller's request: resolved NOT SENT if still queued at teardown.
    Request {
        /// Correlation id.
        id: u64,
        /// The request.
        msg: Message,
    },
    /// A frame of the link itself (echo answer, acks): dropped at teardown.
    Control {
        /// Request id to put in the header.
        id: u64,
        /// The frame.
        msg: Message,
    },
}

impl std::fmt::Debug for WriteItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteItem")
    }
}

/// A logged-on connection, shared by callers, its reader and its writer.
pub(crate) struct Live {
    /// The writer queue (bounded: in-flight limit plus control headroom).
    pub(crate) tx: mpsc::Sender<WriteItem>,
    /// Requests in flight (and timed-out ones kept for late replies).
    pending: Mutex<HashMap<u64, Pending>>,
    /// Calls holding a slot on this connection (≤ `inflight_max_per_conn`).
    pub(crate) inflight: AtomicUsize,
    /// Cancelled when the connection ends.
    pub(crate) cancel: CancellationToken,
}

impl Live {
    pub(crate) fn pending(&self) -> MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a connection attempt did not produce a logged-on connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed or timed out.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The logon did not complete in time or the line closed during it.
    #[error("logon: no answer")]
    NoAnswer,
    /// The logon was refused or the channel's signature did not verify.
    #[error("logon: {0}")]
    Handshake(#[from] HandshakeError),
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Connect to `addr` and log on.
pub(crate) async fn connect(
    cfg: &PoolConfig,
    identity: &Identity,
    channel_key: &[u8; 32],
    addr: SocketAddr,
    request_id: u64,
) -> Result<
    (
        FramedRead<OwnedReadHalf, ChannelCodec>,
        OwnedWriteHalf,
        Established,
    ),
    ConnectError,
> {
    let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Connect(std::io::ErrorKind::TimedOut.into()))?
        .map_err(ConnectError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, ChannelCodec::new());
    let params = LogonParams {
        institution: cfg.institution,
        request_id,
        timestamp_ms: now_ms(),
        heartbeat_s: cfg.heartbeat.as_secs().clamp(1, u16::MAX as u64) as u16,
        client_name: Ascii::new(&cfg.client_name).unwrap_or_default(),
    };
    let (hs, req) = ClientHandshake::start(identity, &params, &SystemRandom::new())?;
    wr.write_all(&req).await.map_err(ConnectError::Connect)?;
    let rsp = match tokio::time::timeout(cfg.logon_timeout, reader.next()).await {
        Ok(Some(Ok(Ok(raw)))) => raw,
        _ => return Err(ConnectError::NoAnswer),
    };
    let est = hs.finish(&rsp, channel_key)?;
    Ok((reader, wr, est))
}

/// Queue capacity for link frames (echo answers, acks) beyond the in-flight limit.
pub(crate) const CONTROL_HEADROOM: usize = 256;

/// Create the shared state of a new connection.
pub(crate) fn live(
    cfg: &PoolConfig,
    parent: &CancellationToken,
) -> (Arc<Live>, mpsc::Receiver<WriteItem>) {
    let (tx, rx) = mpsc::channel(cfg.inflight_max_per_conn + CONTROL_HEADROOM);
    (
        Arc::new(Live {
            tx,
            pending: Mutex::new(HashMap::new()),
            inflight: AtomicUsize::new(0),
            cancel: parent.child_token(),
        }),
        rx,
    )
}

/// Everything the reader and writer need besides the socket.
pub(crate) struct LinkCtx<'a> {
    pub(crate) cfg: &'a PoolConfig,
    pub(crate) stats: &'a Counters,
    pub(crate) hist: &'a Mutex<hdrhistogram::Histogram<u64>>,
    pub(crate) unsolicited: &'a mpsc::Sender<Unsolicited>,
    pub(crate) next_id: &'a std::sync::atomic::AtomicU64,
}

/// Run a logged-on connection until it fails or is cancelled, then resolve everything
/// still in flight on it (NOT SENT for what never left the queue, UNKNOWN for the rest).
pub(crate) async fn run(
    ctx: LinkCtx<'_>,
    live: Arc<Live>,
    rx: mpsc::Receiver<WriteItem>,
    mut reader: FramedRead<OwnedReadHalf, ChannelCodec>,
    wr: OwnedWriteHalf,
    est: Established,
) {
    let keys = est.keys;
    let writer = write_loop(&ctx, &live, rx, wr, keys.send);
    let idle_limit = ctx
        .cfg
        .heartbeat
        .max(Duration::from_secs(est.heartbeat_s.max(1) as u64))
        * 3;
    let reader_fut = async {
        let mut seq = 0u64;
        let mut sweep = tokio::time::interval(Duration::from_millis(500));
        loop {
            let item = tokio::select! {
                _ = live.cancel.cancelled() => break,
                _ = sweep.tick() => {
                    sweep_late(&live, ctx.cfg.late_window, ctx.stats);
                    continue;
                }
                r = tokio::time::timeout(idle_limit, reader.next()) => r,
            };
            let raw = match item {
                Err(_) => {
                    ctx.stats.idle_closes.fetch_add(1, Relaxed);
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    ctx.stats.framing_errors.fetch_add(1, Relaxed);
                    tracing::warn!(error = %e, "channel framing lost");
                    break;
                }
                Ok(Some(Ok(Err(_reject)))) => {
                    seq += 1;
                    ctx.stats.malformed.fetch_add(1, Relaxed);
                    continue;
                }
                Ok(Some(Ok(Ok(raw)))) => raw,
            };
            let s = seq;
            seq += 1;
            if keys.recv.verify_frame(s, &raw).is_err() {
                ctx.stats.bad_macs.fetch_add(1, Relaxed);
                continue;
            }
            let Ok(msg) = cm::decode(&raw) else {
                ctx.stats.malformed.fetch_add(1, Relaxed);
                continue;
            };
            on_frame(&ctx, &live, raw.header.request_id, msg);
        }
        live.cancel.cancel();
    };
    let ((), rx) = tokio::join!(reader_fut, writer);
    teardown(&ctx, &live, rx);
}

fn sweep_late(live: &Live, window: Duration, stats: &Counters) {
    let now = Instant::now();
    let mut p = live.pending();
    let before = p.len();
    p.retain(|_, e| e.started + window > now);
    let gone = before - p.len();
    if gone > 0 {
        stats.late_expired.fetch_add(gone as u64, Relaxed);
    }
}

fn on_frame(ctx: &LinkCtx<'_>, live: &Arc<Live>, request_id: u64, msg: Message) {
    let stats = ctx.stats;
    match msg {
        Message::EchoReq(m) => {
            // Answer; never start a heartbeat of our own because of it.
            let _ = live.tx.try_send(WriteItem::Control {
                id: request_id,
                msg: EchoRsp { nonce: m.nonce }.into(),
            });
        }
        Message::Notify(n) => {
            let ack = Ack::new(
                live.tx.clone(),
                request_id,
                cm::NotifyAck {
                    notify_id: n.notify_id,
                }
                .into(),
            );
            if ctx
                .unsolicited
                .try_send(Unsolicited::Notification { notify: n, ack })
                .is_err()
            {
                // Not acknowledged: the channel repeats it later.
                stats.unsolicited_dropped.fetch_add(1, Relaxed);
            }
        }
        Message::Revoke(r) => {
            let ack = Ack::new(
                live.tx.clone(),
                request_id,
                cm::RevokeAck {
                    notify_id: r.notify_id,
                }
                .into(),
            );
            if ctx
                .unsolicited
                .try_send(Unsolicited::Revocation { revoke: r, ack })
                .is_err()
            {
                stats.unsolicited_dropped.fetch_add(1, Relaxed);
            }
        }
        m if m.is_response() => {
            let entry = live.pending().remove(&request_id);
            match entry {
                Some(Pending {
                    tx: Some(tx),
                    started,
                }) => {
                    let us = started.elapsed().as_micros() as u64;
                    if let Ok(mut h) = ctx.hist.lock() {
                        let _ = h.record(us.max(1));
                    }
                    stats.completed.fetch_add(1, Relaxed);
                    if let Err(Ok(m)) = tx.send(Ok(m)) {
                        // The caller went away (its future was dropped): still hand it up.
                        late(ctx, request_id, m, started);
                    }
                }
                Some(Pending { tx: None, started }) => late(ctx, request_id, m, started),
                None if matches!(m, Message::EchoRsp(_)) => {} // answer to our heartbeat
                None => {
                    stats.unmatched.fetch_add(1, Relaxed);
                }
            }
        }
        _ => {
            stats.unexpected.fetch_add(1, Relaxed);
        }
    }
}

fn late(ctx: &LinkCtx<'_>, request_id: u64, message: Message, started: Instant) {
    ctx.stats.late_replies.fetch_add(1, Relaxed);
    let order_ref = message.order_ref().copied();
    let item = Unsolicited::LateReply {
        request_id,
        order_ref,
        message,
        waited: started.elapsed(),
    };
    if ctx.unsolicited.try_send(item).is_err() {
        ctx.stats.unsolicited_dropped.fetch_add(1, Relaxed);
    }
}

/// A write batch stops taking requests past this many encoded bytes (the buffer holds 64 KiB).
const WRITE_BATCH_BYTES: usize = 60 * 1024;

async fn write_loop(
    ctx: &LinkCtx<'_>,
    live: &Live,
    mut rx: mpsc::Receiver<WriteItem>,
    mut wr: OwnedWriteHalf,
    key: cm::SessionKey,
) -> mpsc::Receiver<WriteItem> {
    let mut seq = 0u64;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let env = |request_id| Envelope {
        request_id,
        timestamp_ms: now_ms(),
        institution: ctx.cfg.institution,
        flags: 0,
    };
    loop {
        let first = tokio::select! {
            _ = live.cancel.cancelled() => break,
            r = tokio::time::timeout(ctx.cfg.heartbeat, rx.recv()) => r,
        };
        let mut next = match first {
            Ok(Some(item)) => Some(item),
            Ok(None) => break,
            Err(_idle) => {
                // Nothing sent for a heartbeat interval: probe. Only idleness triggers this.
                ctx.stats.heartbeats_sent.fetch_add(1, Relaxed);
                let id = ctx.next_id.fetch_add(1, Relaxed);
                Some(WriteItem::Control {
                    id,
                    msg: EchoReq { nonce: id }.into(),
                })
            }
        };
        let mut yielded = false;
        loop {
            while let Some(item) = next.take() {
                let (WriteItem::Request { id, msg } | WriteItem::Control { id, msg }) = item;
                cm::encode(&env(id), &msg, &key, seq, &mut buf);
                seq += 1;
                if buf.len() < WRITE_BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if yielded || buf.len() >= WRITE_BATCH_BYTES {
                break;
            }
            yielded = true;
            next = crate::coalesce::next_after_one_turn(&mut rx).await;
        }
        if wr.write_all(&buf).await.is_err() {
            break;
        }
        buf.clear();
    }
    live.cancel.cancel();
    let _ = wr.shutdown().await;
    rx
}

fn teardown(ctx: &LinkCtx<'_>, live: &Live, mut rx: mpsc::Receiver<WriteItem>) {
    rx.close();
    while let Ok(item) = rx.try_recv() {
        if let WriteItem::Request { id, .. } = item {
            if let Some(Pending { tx: Some(tx), .. }) = live.pending().remove(&id) {
                ctx.stats.not_sent_closed.fetch_add(1, Relaxed);
                let _ = tx.send(Err(CallError::NotSent(NotSentReason::Closed)));
            }
        }
    }
    let drained: Vec<Pending> = live.pending().drain().map(|(_, p)| p).collect();
    for p in drained {
        if let Some(tx) = p.tx {
            ctx.stats.unknown_disconnected.fetch_add(1, Relaxed);
            let _ = tx.send(Err(CallError::Unknown(UnknownReason::Disconnected)));
        }
    }
}
