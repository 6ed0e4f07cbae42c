//! A lender-side client for the sluice protocol: one persistent connection, many requests
//! in flight matched by request id, heartbeats answered, notifications delivered to the
//! caller (and acknowledged, unless the caller asks to do it itself).
//!
//! Used by the integration tests, the demo instructions and the load generator.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::app::now_ms;
use crate::crypto::{single_key, KeyStore};
use crate::message::{self as lm, Envelope, LenderCodec, Message};
use crate::wire::header::{Header, MerchantNo};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection closed before the answer.
    #[error("connection closed")]
    Closed,
    /// No answer within the client's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// A response frame as received.
#[derive(Debug, Clone)]
pub struct Response {
    /// Its header.
    pub header: Header,
    /// Its message.
    pub msg: Message,
    /// True when its MAC verified with the client's key (unsigned REJECTs do not).
    pub authenticated: bool,
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Merchant number.
    pub merchant: String,
    /// Key id.
    pub key_id: u16,
    /// Key secret.
    pub secret: Vec<u8>,
    /// Acknowledge notifications automatically after handing them to the caller.
    pub auto_ack: bool,
    /// How long `call` waits for an answer.
    pub timeout: Duration,
}

struct Shared {
    pending: DashMap<u64, oneshot::Sender<Response>>,
    out: mpsc::Sender<Bytes>,
    keys: KeyStore,
    key_id: u16,
    merchant: MerchantNo,
}

/// The process's request id counter (SPEC §8: ids are unique per merchant number across
/// all connections, "one counter per process does both"), seeded with the clock in
/// microseconds so ids do not repeat across restarts either. A counter per client,
/// seeded from the clock in milliseconds, gave two clients created in the same
/// millisecond the same ids: the second one's logon was refused as a replay.
fn next_request_id() -> u64 {
    static NEXT: std::sync::OnceLock<AtomicU64> = std::sync::OnceLock::new();
    NEXT.get_or_init(|| AtomicU64::new(now_ms() * 1000))
        .fetch_add(1, Ordering::Relaxed)
}

impl Shared {
    fn frame(&self, env: &Envelope, msg: &Message) -> Bytes {
        let mut b = BytesMut::with_capacity(lm::MAX_FRAME_LEN);
        let key = self.keys.get(&env.merchant, env.key_id);
        lm::encode(env, msg, key.as_deref(), &mut b);
        b.freeze()
    }

    fn env(&self) -> Envelope {
        Envelope {
            request_id: next_request_id(),
            timestamp_ms: now_ms(),
            key_id: self.key_id,
            merchant: self.merchant,
            flags: 0,
        }
    }
}

/// A connected lender client.
pub struct Client {
    shared: Arc<Shared>,
    notifications: Mutex<mpsc::Receiver<lm::Notify>>,
    unmatched: Mutex<mpsc::Receiver<Response>>,
    timeout: Duration,
    /// The writer and reader tasks, ended on drop so that the connection closes with the
    /// client (they hold each other's halves alive otherwise, and the switch would go on
    /// delivering NOTIFYs to a connection nobody reads).
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for Client {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Client {
    /// Connect (no logon yet).
    pub async fn connect(
        addr: std::net::SocketAddr,
        cfg: ClientConfig,
    ) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(4096);
        let shared = Arc::new(Shared {
            pending: DashMap::new(),
            out: out_tx,
            keys: KeyStore::new(single_key(&cfg.merchant, cfg.key_id, &cfg.secret)),
            key_id: cfg.key_id,
            merchant: MerchantNo::new(&cfg.merchant).unwrap_or_default(),
        });
        let writer = tokio::spawn(async move {
            let mut sink = FramedWrite::new(wr, LenderCodec::new());
            while let Some(first) = out_rx.recv().await {
                let mut next = Some(first);
                while let Some(b) = next {
                    if sink.feed(b).await.is_err() {
                        return;
                    }
                    next = out_rx.try_recv().ok();
                }
                if SinkExt::<Bytes>::flush(&mut sink).await.is_err() {
                    return;
                }
            }
        });
        let (n_tx, n_rx) = mpsc::channel(65_536);
        let (u_tx, u_rx) = mpsc::channel(1024);
        let sh = shared.clone();
        let auto_ack = cfg.auto_ack;
        let reader = tokio::spawn(async move {
            let mut frames = FramedRead::new(rd, LenderCodec::new());
            while let Some(Ok(Ok(raw))) = frames.next().await {
                let authenticated = sh.keys.verify_frame(&raw).is_ok();
                let Ok(msg) = lm::decode(&raw) else { continue };
                let code = raw.header.msg_type;
                if !authenticated && code != lm::Reject::CODE {
                    continue; // a forged frame: ignore
                }
                match msg {
                    Message::Notify(n) => {
                        if auto_ack {
                            let env = Envelope {
                                request_id: raw.header.request_id,
                                ..sh.env()
                            };
                            let ack = sh.frame(
                                &env,
                                &lm::NotifyAck {
                                    notify_id: n.notify_id,
                                }
                                .into(),
                            );
                            let _ = sh.out.try_send(ack);
                        }
                        let _ = n_tx.try_send(n);
                    }
                    Message::EchoReq(e) => {
                        let env = Envelope {
                            request_id: raw.header.request_id,
                            ..sh.env()
                        };
                        let _ = sh
                            .out
                            .try_send(sh.frame(&env, &lm::EchoRsp { nonce: e.nonce }.into()));
                    }
                    msg => {
                        let r = Response {
                            header: raw.header,
                            msg,
                            authenticated,
                        };
                        match sh.pending.remove(&raw.header.request_id) {
                            Some((_, tx)) => {
                                let _ = tx.send(r);
                            }
                            None => {
                                let _ = u_tx.try_send(r);
                            }
                        }
                    }
                }
            }
            sh.pending.clear();
        });
        Ok(Client {
            shared,
            notifications: Mutex::new(n_rx),
            unmatched: Mutex::new(u_rx),
            timeout: cfg.timeout,
            tasks: [writer, reader],
        })
    }

    /// A fresh envelope (new request id, current time, the client's key).
    pub fn envelope(&self) -> Envelope {
        self.shared.env()
    }

    /// Add a key (another merchant number on this connection, or a rotated key id).
    /// Frames are signed with the key of their envelope's (merchant, key id).
    pub fn add_key(&self, merchant: &str, key_id: u16, secret: &[u8]) {
        let mut all: crate::crypto::KeyMap = single_key(merchant, key_id, secret);
        all.extend(
            self.shared
                .keys
                .snapshot()
                .iter()
                .map(|(k, v)| (*k, v.clone())),
        );
        self.shared.keys.replace(all);
    }

    /// Log on with the client's merchant number.
    pub async fn logon(&self) -> Result<Response, ClientError> {
        self.call(lm::LogonReq {
            heartbeat_s: 0,
            client_name: crate::wire::field::Ascii::new("sluice-client").unwrap_or_default(),
        })
        .await
    }

    /// Send a request and wait for its response.
    pub async fn call(&self, msg: impl Into<Message>) -> Result<Response, ClientError> {
        let env = self.envelope();
        self.call_with(env, &msg.into()).await
    }

    /// Send a request with a chosen envelope (tests of stale timestamps, reused ids).
    pub async fn call_with(&self, env: Envelope, msg: &Message) -> Result<Response, ClientError> {
        let frame = self.shared.frame(&env, msg);
        self.call_raw(env.request_id, frame).await
    }

    /// Send raw bytes expected to be answered under `request_id`.
    pub async fn call_raw(&self, request_id: u64, frame: Bytes) -> Result<Response, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.shared.pending.insert(request_id, tx);
        self.shared
            .out
            .send(frame)
            .await
            .map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => {
                self.shared.pending.remove(&request_id);
                Err(ClientError::Timeout(self.timeout))
            }
        }
    }

    /// Send raw bytes without waiting for anything.
    pub async fn send_raw(&self, frame: Bytes) -> Result<(), ClientError> {
        self.shared
            .out
            .send(frame)
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// The next notification, waiting up to `wait`.
    pub async fn next_notification(&self, wait: Duration) -> Option<lm::Notify> {
        let mut rx = self.notifications.lock().await;
        tokio::time::timeout(wait, rx.recv()).await.ok().flatten()
    }

    /// The next response that matched no pending request (e.g. a REJECT with request id
    /// 0), waiting up to `wait`.
    pub async fn next_unmatched(&self, wait: Duration) -> Option<Response> {
        let mut rx = self.unmatched.lock().await;
        tokio::time::timeout(wait, rx.recv()).await.ok().flatten()
    }

    /// Acknowledge a notification by hand (clients made with `auto_ack: false`).
    pub async fn ack(&self, notify_id: u64) -> Result<(), ClientError> {
        let env = self.envelope();
        let f = self.shared.frame(&env, &lm::NotifyAck { notify_id }.into());
        self.send_raw(f).await
    }
}
