//! The bundled channel simulator: a payment company reaching the banks, speaking the
//! channel side of `protocol/CHANNEL.md` on 127.0.0.1.
//!
//! - [`bank`]: agreements, SMS codes, limits, supported banks, the payout balance;
//! - [`ledger`]: every order it accepted by the switch's order reference, duplicates
//!   counted (the oracle that proves sluice never executes an order twice), daily
//!   statement file;
//! - [`profile`]: injected behaviour (latency, outcome ratios, asynchronous results,
//!   faults, maintenance windows), changeable at run time;
//! - [`rng`]: the deterministic generator behind the injected behaviour.
//!
//! Start one in-process with [`Simulator::start`]; the returned [`SimHandle`] is how tests
//! and the load generator read the SMS outbox and the ledger and flip the profile.
//!
//! Concurrency note: the books ([`bank::Bank`]) sit behind one `std::sync::Mutex`, held
//! only for the few microseconds of a decision and never across `.await`; a decision and
//! its ledger entry are therefore atomic, which is what the ledger's oracle role needs.

pub mod bank;
pub mod ledger;
pub mod profile;
pub mod rng;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use dashmap::DashMap;
use futures::StreamExt;
use ring::rand::SystemRandom;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::channel::handshake::{self, Responded, ResponderParams, SessionKeys};
use crate::channel::message::{self as cm, *};
use crate::crypto::Identity;
use crate::message::types::{CardType, OrderType};
use crate::wire::field::{Ascii, Digits};
use crate::wire::header::MerchantNo;

pub use bank::{BankConfig, SmsMode};
pub use ledger::{EntryState, LedgerEntry};
pub use profile::{Latency, Op, Profile, ProfileError, Window};

use bank::{Bank, Draw, PayResult, VerifyResult};
use rng::Rng;

/// Frames queued for one connection's writer. Bounds memory per connection; a full queue
/// slows that connection's reader (backpressure), never grows.
const WRITE_QUEUE: usize = 8192;
/// Time a new connection has to send its LOGON_REQ.
const LOGON_TIMEOUT: Duration = Duration::from_secs(5);
/// Accepted logon clock difference, ms (same as the lender protocol's replay window).
const REPLAY_WINDOW_MS: u64 = crate::limits::REPLAY_WINDOW_S as u64 * 1000;

/// Everything the simulator needs to start.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where to listen; `127.0.0.1:0` picks a free port.
    pub listen: SocketAddr,
    /// The channel's long-term identity (signs LOGON_RSP).
    pub identity: Arc<Identity>,
    /// Institutions allowed to log on, with their configured Ed25519 public keys.
    pub institutions: Vec<(MerchantNo, [u8; 32])>,
    /// What the channel supports and allows.
    pub bank: BankConfig,
    /// Initial behaviour.
    pub profile: Profile,
    /// Seed of the behaviour generator (repeatable runs).
    pub seed: u64,
    /// In-flight limit announced at logon (0 = none); informational.
    pub inflight_max: u16,
}

impl SimConfig {
    /// A perfect channel on `127.0.0.1:0` that accepts one institution.
    pub fn new(
        identity: Arc<Identity>,
        institution: &str,
        switch_public_key: [u8; 32],
    ) -> SimConfig {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            identity,
            institutions: vec![(
                MerchantNo::new(institution).unwrap_or_default(),
                switch_public_key,
            )],
            bank: BankConfig::default(),
            profile: Profile::default(),
            seed: 1,
            inflight_max: 0,
        }
    }
}

/// One SMS the bank "sent".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sms {
    /// The sign reference of the VERIFY_REQ.
    pub sign_ref: String,
    /// The bank-reserved phone it went to.
    pub phone: String,
    /// The code.
    pub code: String,
}

macro_rules! counters {
    ($( $(#[$m:meta])* $f:ident, )*) => {
        #[derive(Debug, Default)]
        struct Counters { $( $f: AtomicU64, )* }

        /// Counters of a running simulator (a snapshot).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct SimStats { $( $(#[$m])* pub $f: u64, )* }

        impl Counters {
            fn snapshot(&self) -> SimStats {
                SimStats { $( $f: self.$f.load(Relaxed), )* }
            }
        }
    };
}

counters! {
    /// TCP connections accepted.
    connections,
    /// Connections closed at once because the profile is down.
    refused_down,
    /// Logons accepted.
    logons_ok,
    /// Logons refused (wrong key, unknown institution, stale, malformed).
    logons_refused,
    /// Session frames received with a good MAC.
    frames_in,
    /// Frames received whose MAC did not verify (dropped).
    bad_mac_in,
    /// Frames written.
    frames_out,
    /// ECHO_REQ received.
    echo_req_in,
    /// ECHO_RSP received.
    echo_rsp_in,
    /// ECHO_REQ sent (idle heartbeats).
    echo_req_out,
    /// REJECTs sent.
    rejects_out,
    /// Answers suppressed by `drop_ratio`.
    dropped_answers,
    /// Connections closed by `disconnect_every_frames`.
    injected_disconnects,
    /// Answers replaced by a corrupt-MAC frame.
    corrupt_macs_out,
    /// Answers replaced by garbage bytes.
    garbage_out,
    /// NOTIFY frames sent (every copy).
    notify_sent,
    /// NOTIFY copies that found no connection of the institution.
    notify_undelivered,
    /// NOTIFY_ACKs received.
    notify_acks,
    /// REVOKE frames sent.
    revoke_sent,
    /// REVOKE_ACKs received.
    revoke_acks,
}

enum Out {
    Frame {
        request_id: u64,
        msg: Message,
        corrupt: bool,
    },
    Garbage(Vec<u8>),
}

struct Conn {
    institution: MerchantNo,
    tx: mpsc::Sender<Out>,
    cancel: CancellationToken,
}

struct Shared {
    identity: Arc<Identity>,
    institutions: HashMap<MerchantNo, [u8; 32]>,
    inflight_max: u16,
    profile: ArcSwap<Profile>,
    bank: Mutex<Bank>,
    outbox: DashMap<String, Sms>,
    conns: DashMap<u64, Conn>,
    next_conn: AtomicU64,
    next_notify: AtomicU64,
    next_request: AtomicU64,
    seed: u64,
    stats: Counters,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Shared {
    fn bank(&self) -> MutexGuard<'_, Bank> {
        // A panic while holding the lock would be a simulator bug; keep serving regardless.
        self.bank.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Send a channel-initiated frame to one connection of `institution` (any when
    /// `None`), picked by `pick`. False when no connection could take it.
    fn send_unsolicited(&self, institution: Option<MerchantNo>, pick: u64, msg: Message) -> bool {
        let txs: Vec<mpsc::Sender<Out>> = self
            .conns
            .iter()
            .filter(|c| institution.map_or(true, |i| c.institution == i))
            .map(|c| c.tx.clone())
            .collect();
        if txs.is_empty() {
            return false;
        }
        let n = txs.len();
        for k in 0..n {
            let tx = &txs[(pick as usize + k) % n];
            let out = Out::Frame {
                request_id: self.next_request.fetch_add(1, Relaxed),
                msg: msg.clone(),
                corrupt: false,
            };
            if tx.try_send(out).is_ok() {
                return true;
            }
        }
        false
    }
}

/// The simulator entry point.
#[derive(Debug)]
pub struct Simulator;

/// A running simulator: its address, its books, its knobs. Dropping the handle does not
/// stop it; call [`SimHandle::shutdown`].
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimHandle({})", self.addr)
    }
}

impl Simulator {
    /// Bind, and serve connections until [`SimHandle::shutdown`].
    pub async fn start(cfg: SimConfig) -> std::io::Result<SimHandle> {
        cfg.profile
            .check()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let listener = TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            identity: cfg.identity,
            institutions: cfg.institutions.into_iter().collect(),
            inflight_max: cfg.inflight_max,
            profile: ArcSwap::from_pointee(cfg.profile),
            bank: Mutex::new(Bank::new(cfg.bank)),
            outbox: DashMap::new(),
            conns: DashMap::new(),
            next_conn: AtomicU64::new(1),
            next_notify: AtomicU64::new(1),
            next_request: AtomicU64::new(1),
            seed: cfg.seed,
            stats: Counters::default(),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        let s = shared.clone();
        shared.tracker.spawn(accept_loop(s, listener));
        let s = shared.clone();
        shared.tracker.spawn(revocation_loop(s));
        Ok(SimHandle { shared, addr })
    }
}

impl SimHandle {
    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The channel's Ed25519 public key (configure it in the switch).
    pub fn public_key(&self) -> [u8; 32] {
        self.shared.identity.public_key()
    }

    /// The current profile.
    pub fn profile(&self) -> Arc<Profile> {
        self.shared.profile.load_full()
    }

    /// Replace the profile. Going down drops every connection at once.
    pub fn set_profile(&self, p: Profile) -> Result<(), ProfileError> {
        p.check().map_err(ProfileError::Invalid)?;
        let down = p.down;
        self.shared.profile.store(Arc::new(p));
        if down {
            self.drop_connections();
        }
        Ok(())
    }

    /// Change the profile with a closure (e.g. `|p| p.down = true`).
    pub fn update_profile(&self, f: impl FnOnce(&mut Profile)) -> Result<(), ProfileError> {
        let mut p = (*self.profile()).clone();
        f(&mut p);
        self.set_profile(p)
    }

    /// Close every current connection (the switch sees the lines drop).
    pub fn drop_connections(&self) {
        for c in self.shared.conns.iter() {
            c.cancel.cancel();
        }
    }

    /// Logged-on connections right now.
    pub fn connections(&self) -> usize {
        self.shared.conns.len()
    }

    /// The SMS code sent for a sign reference.
    pub fn sms_for(&self, sign_ref: &str) -> Option<String> {
        self.shared.outbox.get(sign_ref).map(|s| s.code.clone())
    }

    /// Every SMS sent so far.
    pub fn outbox(&self) -> Vec<Sms> {
        self.shared.outbox.iter().map(|s| s.clone()).collect()
    }

    /// A ledger entry.
    pub fn ledger_entry(&self, r: &OrderRef) -> Option<LedgerEntry> {
        self.shared.bank().ledger.get(r).cloned()
    }

    /// Every ledger entry.
    pub fn ledger_snapshot(&self) -> Vec<LedgerEntry> {
        self.shared.bank().ledger.snapshot()
    }

    /// Times an already-known order reference arrived again (must stay 0 for sluice).
    pub fn duplicates(&self) -> u64 {
        self.shared.bank().ledger.duplicates()
    }

    /// Remaining prefunded payout balance, fen.
    pub fn payout_balance_fen(&self) -> u64 {
        self.shared.bank().balance_fen()
    }

    /// Agreements issued so far.
    pub fn agreements_issued(&self) -> u64 {
        self.shared.bank().agreements_issued()
    }

    /// Load agreements signed before the simulator started: (agreement number, card
    /// number, ID number, bank code, card type). Returns how many were new.
    pub fn preload_agreements<'a>(
        &self,
        agreements: impl IntoIterator<Item = (&'a str, &'a str, &'a str, &'a str, CardType)>,
    ) -> usize {
        let mut bank = self.shared.bank();
        agreements
            .into_iter()
            .filter(|(no, card, id_no, b, t)| bank.preload(no, card, id_no, b, *t))
            .count()
    }

    /// Make room in the ledger for `orders` more orders (see [`ledger::Ledger::reserve`]).
    pub fn reserve_orders(&self, orders: usize) {
        self.shared.bank().ledger.reserve(orders);
    }

    /// Check the books add up (balance and daily usage versus the ledger).
    pub fn check_consistency(&self) -> Result<(), String> {
        self.shared.bank().check_consistency()
    }

    /// Statement of one China-time day (see `CHANNEL.md` §11); `day` from
    /// [`ledger::cst_day`].
    pub fn statement(&self, day: u64) -> String {
        let inst = self.institution_label();
        self.shared.bank().ledger.statement(&inst, day)
    }

    /// Write the statement of `day` to `path`.
    pub fn write_statement(&self, path: &Path, day: u64) -> std::io::Result<()> {
        std::fs::write(path, self.statement(day))
    }

    fn institution_label(&self) -> String {
        let mut v: Vec<&str> = self
            .shared
            .institutions
            .keys()
            .map(|m| m.as_str())
            .collect();
        v.sort_unstable();
        v.join(",")
    }

    /// Revoke an agreement "at the bank" now and send a REVOKE notice. False when the
    /// agreement is unknown or not active.
    pub fn revoke(&self, agreement_no: &str) -> bool {
        let Some(last4) = self.shared.bank().revoke(agreement_no) else {
            return false;
        };
        send_revoke(&self.shared, agreement_no, &last4);
        true
    }

    /// Counters.
    pub fn stats(&self) -> SimStats {
        self.shared.stats.snapshot()
    }

    /// Stop accepting, close every connection, and wait for the tasks to end.
    pub async fn shutdown(self) {
        self.shared.cancel.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }
}

fn send_revoke(shared: &Shared, no: &str, last4: &str) {
    let (Ok(agreement_no), Ok(card_last4)) = (AgreementNo::new(no), Digits::new(last4)) else {
        return;
    };
    let id = shared.next_notify.fetch_add(1, Relaxed);
    let msg = Message::Revoke(Revoke {
        notify_id: id,
        agreement_no,
        card_last4,
        revoked_at_ms: now_ms(),
    });
    if shared.send_unsolicited(None, id, msg) {
        shared.stats.revoke_sent.fetch_add(1, Relaxed);
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            // Out of file descriptors or similar: back off briefly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.stats.connections.fetch_add(1, Relaxed);
        if shared.profile.load().down {
            shared.stats.refused_down.fetch_add(1, Relaxed);
            drop(stream);
            continue;
        }
        let s = shared.clone();
        shared.tracker.spawn(serve(s, stream));
    }
}

async fn revocation_loop(shared: Arc<Shared>) {
    let mut rng = Rng::new(shared.seed ^ 0x005E_ED0F_AE70);
    let tick = Duration::from_millis(100);
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let rate = shared.profile.load().revocations_per_s;
        if rate <= 0.0 || !rng.chance(rate * tick.as_secs_f64()) {
            continue;
        }
        let revoked = shared.bank().revoke_random(&mut rng);
        if let Some((no, last4)) = revoked {
            send_revoke(&shared, &no, &last4);
        }
    }
}

async fn serve(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, ChannelCodec::new());
    let first = tokio::select! {
        _ = shared.cancel.cancelled() => return,
        f = tokio::time::timeout(LOGON_TIMEOUT, reader.next()) => f,
    };
    let Ok(Some(Ok(Ok(raw)))) = first else {
        shared.stats.logons_refused.fetch_add(1, Relaxed);
        return;
    };
    let profile = shared.profile.load_full();
    let params = ResponderParams {
        now_ms: now_ms(),
        replay_window_ms: REPLAY_WINDOW_MS,
        heartbeat_s: profile.heartbeat_s,
        inflight_max: shared.inflight_max,
    };
    let answer = handshake::respond(
        &shared.identity,
        |m| shared.institutions.get(m).copied(),
        &raw,
        params,
        &SystemRandom::new(),
    );
    let (keys, institution) = match answer {
        Responded::Refused { frame, why } => {
            shared.stats.logons_refused.fetch_add(1, Relaxed);
            tracing::info!(%why, "simulator refused a logon");
            if let Some(f) = frame {
                let _ = wr.write_all(&f).await;
            }
            return;
        }
        Responded::Accepted {
            frame,
            keys,
            institution,
            ..
        } => {
            if wr.write_all(&frame).await.is_err() {
                return;
            }
            (keys, institution)
        }
    };
    shared.stats.logons_ok.fetch_add(1, Relaxed);
    let conn_id = shared.next_conn.fetch_add(1, Relaxed);
    let cancel = shared.cancel.child_token();
    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
    shared.conns.insert(
        conn_id,
        Conn {
            institution,
            tx: tx.clone(),
            cancel: cancel.clone(),
        },
    );
    // Going down stores the profile, then drops the registered connections; one that
    // logged on meanwhile (accepted before the change, registered after the drop) would
    // live on. Registered first, then checked: one of the two sees the other.
    if shared.profile.load().down {
        cancel.cancel();
    }
    let SessionKeys { send, recv } = keys;
    let hb = Duration::from_secs(profile.heartbeat_s.max(1) as u64);
    let writer = shared.tracker.spawn(write_loop(
        shared.clone(),
        wr,
        rx,
        send,
        institution,
        hb,
        cancel.clone(),
    ));
    let mut rng = Rng::new(shared.seed ^ conn_id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let ctx = ConnCtx {
        shared: shared.clone(),
        tx,
        institution,
        cancel: cancel.clone(),
    };
    let mut seq = 0u64;
    let mut frames = 0u64;
    loop {
        let item = tokio::select! {
            _ = cancel.cancelled() => break,
            i = reader.next() => i,
        };
        let raw = match item {
            None | Some(Err(_)) => break,
            Some(Ok(Err(reject))) => {
                seq += 1;
                let detail = format!("{:?}", reject.kind);
                ctx.reject(
                    reject.envelope.request_id,
                    reject.envelope.msg_type,
                    &detail,
                )
                .await;
                continue;
            }
            Some(Ok(Ok(raw))) => raw,
        };
        let my_seq = seq;
        seq += 1;
        if recv.verify_frame(my_seq, &raw).is_err() {
            shared.stats.bad_mac_in.fetch_add(1, Relaxed);
            continue;
        }
        shared.stats.frames_in.fetch_add(1, Relaxed);
        frames += 1;
        let profile = shared.profile.load_full();
        let close_after =
            profile.disconnect_every_frames > 0 && frames % profile.disconnect_every_frames == 0;
        let request_id = raw.header.request_id;
        let msg = match cm::decode(&raw) {
            Ok(m) => m,
            Err(e) => {
                ctx.reject(request_id, raw.header.msg_type, &e.to_string())
                    .await;
                continue;
            }
        };
        let is_echo = matches!(msg, Message::EchoReq(_));
        let answer = handle(&ctx, &profile, &mut rng, msg);
        if close_after {
            shared.stats.injected_disconnects.fetch_add(1, Relaxed);
            break;
        }
        if let Some(a) = answer {
            ctx.deliver(&profile, &mut rng, request_id, a, is_echo)
                .await;
        }
    }
    shared.conns.remove(&conn_id);
    cancel.cancel();
    let _ = writer.await;
}

struct ConnCtx {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Out>,
    institution: MerchantNo,
    cancel: CancellationToken,
}

impl ConnCtx {
    async fn reject(&self, request_id: u64, rejected_type: u8, detail: &str) {
        let detail: String = detail
            .chars()
            .filter(|c| (' '..='~').contains(c))
            .take(64)
            .collect();
        let (code, class) = Code::BAD_REQUEST.pair();
        let msg = Message::Reject(Reject {
            code,
            class,
            rejected_type,
            detail: Ascii::new(&detail).unwrap_or_default(),
        });
        self.shared.stats.rejects_out.fetch_add(1, Relaxed);
        let _ = self
            .tx
            .send(Out::Frame {
                request_id,
                msg,
                corrupt: false,
            })
            .await;
    }

    /// Send an answer, with the profile's latency and faults (not for echo answers).
    async fn deliver(
        &self,
        p: &Profile,
        rng: &mut Rng,
        request_id: u64,
        msg: Message,
        is_echo: bool,
    ) {
        let stats = &self.shared.stats;
        let mut out = Out::Frame {
            request_id,
            msg,
            corrupt: false,
        };
        let mut delay = Duration::ZERO;
        if !is_echo {
            if rng.chance(p.drop_ratio) {
                stats.dropped_answers.fetch_add(1, Relaxed);
                return;
            }
            if rng.chance(p.garbage_ratio) {
                stats.garbage_out.fetch_add(1, Relaxed);
                out = Out::Garbage((0..64).map(|_| rng.next_u64() as u8).collect());
            } else if rng.chance(p.bad_mac_ratio) {
                stats.corrupt_macs_out.fetch_add(1, Relaxed);
                if let Out::Frame { corrupt, .. } = &mut out {
                    *corrupt = true;
                }
            }
            delay = p.latency.sample(rng);
        }
        if delay.is_zero() {
            let _ = self.tx.send(out).await;
        } else {
            let tx = self.tx.clone();
            let cancel = self.cancel.clone();
            self.shared.tracker.spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(delay) => { let _ = tx.send(out).await; }
                }
            });
        }
    }
}

fn pair_of(c: Code) -> (RspCode, RspClass) {
    c.pair()
}

/// Decide the answer to one request (None: nothing to answer).
fn handle(ctx: &ConnCtx, p: &Profile, rng: &mut Rng, msg: Message) -> Option<Message> {
    let shared = &ctx.shared;
    let stats = &shared.stats;
    let now = now_ms();
    let draw = |rng: &mut Rng| Draw {
        not_processed: rng.chance(p.not_processed_ratio),
        decline: rng.chance(p.decline_ratio),
        asynchronous: rng.chance(p.async_ratio),
    };
    Some(match msg {
        Message::EchoReq(m) => {
            stats.echo_req_in.fetch_add(1, Relaxed);
            Message::EchoRsp(EchoRsp { nonce: m.nonce })
        }
        Message::EchoRsp(_) => {
            stats.echo_rsp_in.fetch_add(1, Relaxed);
            return None;
        }
        Message::NotifyAck(_) => {
            stats.notify_acks.fetch_add(1, Relaxed);
            return None;
        }
        Message::RevokeAck(_) => {
            stats.revoke_acks.fetch_add(1, Relaxed);
            return None;
        }
        Message::VerifyReq(r) => {
            let (code, sms_sent, agreement_no) = if p.in_maintenance(Op::Sign, now) {
                (Code::MAINTENANCE, 0, Ascii::empty())
            } else {
                match shared.bank().verify(&r, now, rng) {
                    VerifyResult::SmsSent { code, phone } => {
                        let sign_ref = r.sign_ref.as_str().to_string();
                        shared.outbox.insert(
                            sign_ref.clone(),
                            Sms {
                                sign_ref,
                                phone,
                                code,
                            },
                        );
                        (Code::OK, 1, Ascii::empty())
                    }
                    VerifyResult::AlreadySigned(no) => {
                        (Code::ALREADY_SIGNED, 0, Ascii::new(&no).unwrap_or_default())
                    }
                    VerifyResult::Declined(c) => (c, 0, Ascii::empty()),
                }
            };
            let (code, class) = pair_of(code);
            Message::VerifyRsp(VerifyRsp {
                code,
                class,
                sign_ref: r.sign_ref,
                sms_sent,
                agreement_no,
            })
        }
        Message::SignReq(r) => {
            let res = if p.in_maintenance(Op::Sign, now) {
                Err(Code::MAINTENANCE)
            } else {
                shared.bank().sign(&r, now)
            };
            let (c, no) = match res {
                Ok(no) => (Code::OK, Ascii::new(&no).unwrap_or_default()),
                Err(c) => (c, Ascii::empty()),
            };
            let (code, class) = pair_of(c);
            Message::SignRsp(SignRsp {
                code,
                class,
                sign_ref: r.sign_ref,
                agreement_no: no,
            })
        }
        Message::UnsignReq(r) => {
            let c = if p.in_maintenance(Op::Sign, now) {
                Code::MAINTENANCE
            } else {
                shared.bank().unsign(r.agreement_no.as_str())
            };
            let (code, class) = pair_of(c);
            Message::UnsignRsp(UnsignRsp {
                code,
                class,
                agreement_no: r.agreement_no,
            })
        }
        Message::PayReq(r) => {
            let d = draw(rng);
            let res = shared
                .bank()
                .pay(&r, now, p.in_maintenance(Op::Debit, now), d);
            let (code, class, serial, fin) = pay_answer(ctx, p, &res);
            Message::PayRsp(PayRsp {
                code,
                class,
                order_ref: r.order_ref,
                channel_serial: serial,
                amount: r.amount.0,
                finished_at_ms: fin,
            })
        }
        Message::PayoutReq(r) => {
            let d = draw(rng);
            let res = shared
                .bank()
                .payout(&r, now, p.in_maintenance(Op::Payout, now), d);
            let (code, class, serial, fin) = pay_answer(ctx, p, &res);
            Message::PayoutRsp(PayoutRsp {
                code,
                class,
                order_ref: r.order_ref,
                channel_serial: serial,
                amount: r.amount.0,
                finished_at_ms: fin,
            })
        }
        Message::QueryReq(r) => {
            let e = shared.bank().ledger.get(&r.order_ref).cloned();
            match e {
                Some(e) => {
                    let (c, class) = e.reported();
                    Message::QueryRsp(QueryRsp {
                        code: c.into(),
                        class,
                        order_ref: r.order_ref,
                        order_type: e.kind as u8,
                        amount: e.amount_fen,
                        channel_serial: Ascii::new(&e.serial).unwrap_or_default(),
                        finished_at_ms: e.finished_at_ms(),
                    })
                }
                None => {
                    let (code, class) = pair_of(Code::ORDER_NOT_FOUND);
                    Message::QueryRsp(QueryRsp {
                        code,
                        class,
                        order_ref: r.order_ref,
                        order_type: 0,
                        amount: 0,
                        channel_serial: Ascii::empty(),
                        finished_at_ms: 0,
                    })
                }
            }
        }
        other => {
            let (code, class) = pair_of(Code::BAD_REQUEST);
            stats.rejects_out.fetch_add(1, Relaxed);
            Message::Reject(Reject {
                code,
                class,
                rejected_type: other.code(),
                detail: Ascii::new("unexpected message type").unwrap_or_default(),
            })
        }
    })
}

/// (code, class, serial, finished_at_ms) of a PAY/PAYOUT answer; schedules the
/// notification of an asynchronous order.
fn pay_answer(ctx: &ConnCtx, p: &Profile, res: &PayResult) -> (RspCode, RspClass, Serial, u64) {
    let (answer, processing) = res.answer();
    if let Some(order_ref) = processing {
        schedule_notify(ctx, p, order_ref);
    }
    answer
}

fn schedule_notify(ctx: &ConnCtx, p: &Profile, order_ref: OrderRef) {
    let shared = ctx.shared.clone();
    let institution = ctx.institution;
    let delay = Duration::from_millis(p.async_delay_ms);
    let interval = Duration::from_millis(p.notify_interval_ms);
    let copies = p.notify_copies;
    let cancel = shared.cancel.clone();
    ctx.shared.tracker.spawn(async move {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        let Some(e) = shared.bank().finalize(&order_ref, now_ms()) else {
            return;
        };
        let (code, class) = e.reported();
        let amount = crate::message::types::Fen(e.amount_fen);
        let id = shared.next_notify.fetch_add(1, Relaxed);
        let msg = Message::Notify(Notify {
            notify_id: id,
            order_ref,
            order_type: if e.kind == OrderType::Debit {
                OrderType::Debit
            } else {
                OrderType::Payout
            },
            code: code.into(),
            class,
            amount,
            channel_serial: Ascii::new(&e.serial).unwrap_or_default(),
            finished_at_ms: e.finished_at_ms(),
        });
        for i in 0..copies {
            if i > 0 {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
            if shared.send_unsolicited(Some(institution), id + i as u64, msg.clone()) {
                shared.stats.notify_sent.fetch_add(1, Relaxed);
            } else {
                shared.stats.notify_undelivered.fetch_add(1, Relaxed);
            }
        }
    });
}

async fn write_loop(
    shared: Arc<Shared>,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Out>,
    key: SessionKey,
    institution: MerchantNo,
    heartbeat: Duration,
    cancel: CancellationToken,
) {
    let mut seq = 0u64;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let stats = &shared.stats;
    let env = |request_id| Envelope {
        request_id,
        timestamp_ms: now_ms(),
        institution,
        flags: 0,
    };
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => break,
            r = tokio::time::timeout(heartbeat, rx.recv()) => r,
        };
        let mut next = match first {
            Ok(Some(o)) => Some(o),
            Ok(None) => break,
            Err(_idle) => {
                stats.echo_req_out.fetch_add(1, Relaxed);
                let id = shared.next_request.fetch_add(1, Relaxed);
                Some(Out::Frame {
                    request_id: id,
                    msg: Message::EchoReq(EchoReq { nonce: id }),
                    corrupt: false,
                })
            }
        };
        let mut garbage = false;
        while let Some(out) = next.take() {
            match out {
                Out::Frame {
                    request_id,
                    msg,
                    corrupt,
                } => {
                    let start = buf.len();
                    cm::encode(&env(request_id), &msg, &key, seq, &mut buf);
                    seq += 1;
                    if corrupt {
                        let n = buf.len();
                        buf[n - 1] ^= 0xFF;
                        buf[start + (n - start) - 2] ^= 0x5A;
                    }
                    stats.frames_out.fetch_add(1, Relaxed);
                }
                Out::Garbage(g) => {
                    buf.extend_from_slice(&g);
                    garbage = true;
                }
            }
            if buf.len() < 60 * 1024 && !garbage {
                next = rx.try_recv().ok();
            }
        }
        if wr.write_all(&buf).await.is_err() {
            break;
        }
        buf.clear();
        if garbage {
            // The peer has lost framing; nothing after garbage can be read anyway.
            break;
        }
    }
    cancel.cancel();
    let _ = wr.shutdown().await;
}
