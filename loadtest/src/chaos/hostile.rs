//! Hostile lender traffic, each attack on its own connections while the clean load runs:
//! random bytes, truncated frames, oversize lengths, a valid header with a garbage body,
//! bad MACs at a high rate, replayed frames, slowloris connections and a connection flood
//! past the switch's limit. Merchant 1 is the attacker's merchant number (merchant 0
//! carries the checked load), so notifications for its orders never reach the load's
//! connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use sluice::crypto::MacKey;
use sluice::message::{self as lm, Envelope, LenderCodec, Message, Reason, Status};
use sluice::sim::rng::Rng;
use sluice::wire::header::MerchantNo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use super::load::{debit, AMOUNT_REPLAY};
use crate::gen::MerchantKey;

/// What the attacks did and saw.
#[derive(Default)]
pub struct Tally {
    /// Connections with random bytes.
    pub random_conns: AtomicU64,
    /// ... closed by the switch.
    pub random_closed: AtomicU64,
    /// Truncated frames sent (then the connection closed).
    pub truncated: AtomicU64,
    /// Oversize-length headers sent.
    pub oversize: AtomicU64,
    /// ... answered by closing the connection.
    pub oversize_closed: AtomicU64,
    /// Signed frames with a garbage body.
    pub garbage_body: AtomicU64,
    /// ... answered REJECTED (and the connection kept).
    pub garbage_body_refused: AtomicU64,
    /// Frames with a bad MAC.
    pub bad_mac: AtomicU64,
    /// ... answered REJECT/BAD_MAC.
    pub bad_mac_refused: AtomicU64,
    /// Bad or garbage frames that were *accepted* (a violation).
    pub accepted_bad: AtomicU64,
    /// Replayed frames.
    pub replays: AtomicU64,
    /// ... refused as replays.
    pub replays_refused: AtomicU64,
    /// Slowloris connections opened.
    pub slowloris: AtomicU64,
    /// ... closed by the switch.
    pub slowloris_closed: AtomicU64,
    /// Flood connections opened past the limit.
    pub flood_excess: AtomicU64,
    /// Flood connections the switch closed at once.
    pub flood_closed: AtomicU64,
}

fn frame(key: &MacKey, merchant: MerchantNo, request_id: u64, msg: &Message) -> Bytes {
    let env = Envelope {
        request_id,
        timestamp_ms: sluice::app::now_ms(),
        key_id: 1,
        merchant,
        flags: 0,
    };
    let mut b = BytesMut::new();
    lm::encode(&env, msg, Some(key), &mut b);
    b.freeze()
}

fn logon() -> Message {
    lm::LogonReq {
        heartbeat_s: 0,
        client_name: sluice::wire::field::Ascii::new("chaos-hostile").unwrap_or_default(),
    }
    .into()
}

/// True when the peer closed the connection within `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Run every attack until `stop`. `connections_max` is the switch's limit; the flood
/// opens that many plus 50.
pub async fn run(
    addr: SocketAddr,
    key: MerchantKey,
    agreement: u64,
    connections_max: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mk = MacKey::new(&key.secret);
    let merchant = MerchantNo::new(&key.merchant).unwrap_or_default();
    let base_id = sluice::app::now_ms() * 1000 + (1 << 40);
    let mut tasks = tokio::task::JoinSet::new();

    // Random bytes, truncated frames, oversize lengths: fresh connections in a loop.
    {
        let (stop, t, mk) = (stop.clone(), tally.clone(), mk.clone());
        tasks.spawn(async move {
            let mut rng = Rng::new(7);
            let mut i = 0u64;
            while !stop.load(Relaxed) {
                let Ok(mut s) = TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                match i % 3 {
                    0 => {
                        let n = 1 + rng.below(2000) as usize;
                        let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                        t.random_conns.fetch_add(1, Relaxed);
                        if s.write_all(&bytes).await.is_ok()
                            && closed_within(&mut s, Duration::from_secs(2)).await
                        {
                            t.random_closed.fetch_add(1, Relaxed);
                        }
                    }
                    1 => {
                        let f = frame(&mk, merchant, base_id + i, &logon());
                        let cut = 1 + rng.below(f.len() as u64 - 1) as usize;
                        let _ = s.write_all(&f[..cut]).await;
                        t.truncated.fetch_add(1, Relaxed);
                    }
                    _ => {
                        let mut f = frame(&mk, merchant, base_id + i, &logon()).to_vec();
                        f[4..6].copy_from_slice(&60_000u16.to_be_bytes());
                        t.oversize.fetch_add(1, Relaxed);
                        if s.write_all(&f).await.is_ok()
                            && closed_within(&mut s, Duration::from_secs(2)).await
                        {
                            t.oversize_closed.fetch_add(1, Relaxed);
                        }
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    // Garbage bodies and bad MACs at a high rate on one logged-on connection.
    {
        let (stop, t, mk) = (stop.clone(), tally.clone(), mk.clone());
        tasks.spawn(async move {
            let Ok(s) = TcpStream::connect(addr).await else {
                return;
            };
            let (rd, mut wr) = s.into_split();
            let reader_t = t.clone();
            let reader = tokio::spawn(async move {
                let mut frames = FramedRead::new(rd, LenderCodec::new());
                while let Some(Ok(Ok(raw))) = frames.next().await {
                    let Ok(msg) = lm::decode(&raw) else { continue };
                    let Some(o) = crate::gen::outcome(&msg) else {
                        continue;
                    };
                    // Request ids tell the attack: bit 0 set = bad MAC, clear = garbage.
                    let logon = raw.header.request_id == base_id;
                    if logon {
                        continue;
                    }
                    let bad_mac = raw.header.request_id & 1 == 1;
                    match (bad_mac, o.status, o.reason) {
                        (true, Status::Rejected, Reason::BAD_MAC) => {
                            reader_t.bad_mac_refused.fetch_add(1, Relaxed);
                        }
                        (false, Status::Rejected, _) => {
                            reader_t.garbage_body_refused.fetch_add(1, Relaxed);
                        }
                        (_, Status::Success | Status::Pending | Status::Failed, _) => {
                            reader_t.accepted_bad.fetch_add(1, Relaxed);
                        }
                        _ => {}
                    }
                }
            });
            if wr
                .write_all(&frame(&mk, merchant, base_id, &logon()))
                .await
                .is_err()
            {
                return;
            }
            let mut rng = Rng::new(11);
            let mut n = 1u64;
            while !stop.load(Relaxed) {
                for _ in 0..10 {
                    let msg = debit(&format!("G{n}"), 1, 100);
                    let mut f = frame(&mk, merchant, base_id + 2 * n, &msg).to_vec();
                    let body = sluice::wire::header::HEADER_LEN..f.len() - 32;
                    for b in &mut f[body] {
                        *b = rng.next_u64() as u8;
                    }
                    // Re-sign the garbage: a valid header and MAC around a garbage body.
                    let mac = mk.sign(&f[..f.len() - 32]);
                    let l = f.len();
                    f[l - 32..].copy_from_slice(&mac);
                    t.garbage_body.fetch_add(1, Relaxed);
                    let mut g = frame(&mk, merchant, base_id + 2 * n + 1, &msg).to_vec();
                    let l = g.len();
                    g[l - 1] ^= 0x5a;
                    t.bad_mac.fetch_add(1, Relaxed);
                    if wr.write_all(&f).await.is_err() || wr.write_all(&g).await.is_err() {
                        return;
                    }
                    n += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            reader.abort();
        });
    }

    // Replayed frames: a signed debit sent, then the very same bytes again.
    {
        let (stop, t, key) = (stop.clone(), tally.clone(), key.clone());
        tasks.spawn(async move {
            let Ok(c) = super::load::connect(addr, &key, Duration::from_secs(10)).await else {
                return;
            };
            let mut k = 0u64;
            while !stop.load(Relaxed) {
                let env = Envelope {
                    request_id: base_id + (1 << 32) + k,
                    timestamp_ms: sluice::app::now_ms(),
                    key_id: key.key_id,
                    merchant,
                    flags: 0,
                };
                // A real debit: the first copy executes, the replay must not.
                let msg = debit(&format!("R{k}"), agreement, AMOUNT_REPLAY + k);
                let _ = c.call_with(env, &msg).await;
                t.replays.fetch_add(1, Relaxed);
                if let Ok(r) = c.call_with(env, &msg).await {
                    match crate::gen::outcome(&r.msg) {
                        Some(o) if o.reason == Reason::DUPLICATE_REQUEST_ID => {
                            t.replays_refused.fetch_add(1, Relaxed);
                        }
                        Some(o) if o.status == Status::Rejected => {
                            t.replays_refused.fetch_add(1, Relaxed);
                        }
                        _ => {}
                    }
                }
                k += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }

    // Slowloris: a logon frame one byte every 200 ms, on a few connections.
    for i in 0..3u64 {
        let (stop, t, mk) = (stop.clone(), tally.clone(), mk.clone());
        tasks.spawn(async move {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                return;
            };
            t.slowloris.fetch_add(1, Relaxed);
            let f = frame(&mk, merchant, base_id + (2 << 32) + i, &logon());
            for b in f.iter().cycle() {
                if stop.load(Relaxed) {
                    return;
                }
                if s.write_all(&[*b]).await.is_err()
                    || closed_within(&mut s, Duration::from_millis(200)).await
                {
                    t.slowloris_closed.fetch_add(1, Relaxed);
                    return;
                }
            }
        });
    }

    // The flood: connections_max + 50 idle connections held until the end.
    {
        let (stop, t) = (stop.clone(), tally.clone());
        tasks.spawn(async move {
            // Let the other attacks and the clean load hold their connections first.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut held = Vec::new();
            for _ in 0..connections_max + 50 {
                match TcpStream::connect(addr).await {
                    Ok(s) => held.push(s),
                    Err(_) => {
                        t.flood_closed.fetch_add(1, Relaxed);
                    }
                }
            }
            t.flood_excess.store(50, Relaxed);
            // Those past the limit are closed at once by the switch.
            let closed = futures::future::join_all(
                held.iter_mut()
                    .map(|s| closed_within(s, Duration::from_millis(500))),
            )
            .await
            .into_iter()
            .filter(|c| *c)
            .count();
            t.flood_closed.fetch_add(closed as u64, Relaxed);
            while !stop.load(Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            drop(held);
        });
    }
    while tasks.join_next().await.is_some() {}
}
