//! The operator's admin port (loopback by default, bearer token required): health,
//! Prometheus metrics, and stock agreement import through the running switch.
//!
//! Written as a small HTTP/1.1 subset (one request per connection, `Content-Length`
//! bodies, bounded sizes) rather than with hyper: three endpoints for operators on
//! loopback do not justify hyper's dependency tree in every build; the operations issue
//! may move this to hyper/axum when the endpoint list grows.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /healthz` | `ok` while the process serves |
//! | `GET /metrics` | Prometheus text: routing and channel health, lender latency, counters |
//! | `GET /orders/MERCHANT/ORDER_ID` | an order's state, attempts and the router's decision |
//! | `POST /agreements/import` | body: the stock import CSV (`src/import.rs`); each agreement is journaled before the answer |

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::app::{now_ms, Switch};
use crate::engine::Record;

/// Largest request head (request line and headers), bytes.
const HEAD_MAX: usize = 16 * 1024;
/// Largest request body, bytes: a 2M-row import file is about 180 MB.
const BODY_MAX: usize = 512 * 1024 * 1024;
/// Time a client has to send its whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Serve the admin port until `stop` fires. `token` is compared in constant time.
pub async fn serve(listener: TcpListener, sw: Arc<Switch>, token: String, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let sw = sw.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, &sw, &token)).await;
        });
    }
}

async fn respond(s: &mut TcpStream, code: u16, reason: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}

async fn handle(mut s: TcpStream, sw: &Arc<Switch>, token: &str) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > HEAD_MAX {
            return respond(&mut s, 431, "Request Header Fields Too Large", "").await;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let mut length = 0usize;
    let mut auth = "";
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse().unwrap_or(usize::MAX);
            } else if k.eq_ignore_ascii_case("authorization") {
                auth = v;
            }
        }
    }
    let presented = auth.strip_prefix("Bearer ").unwrap_or("");
    let authorized = {
        use subtle::ConstantTimeEq;
        presented.len() == token.len() && bool::from(presented.as_bytes().ct_eq(token.as_bytes()))
    };
    if !authorized {
        return respond(&mut s, 401, "Unauthorized", "admin token required\n").await;
    }
    if length > BODY_MAX {
        return respond(&mut s, 413, "Payload Too Large", "").await;
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; (length - body.len()).min(1 << 20)];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    match (method, path) {
        ("GET", "/healthz") => respond(&mut s, 200, "OK", "ok\n").await,
        ("GET", "/metrics") => respond(&mut s, 200, "OK", &metrics(sw)).await,
        ("GET", p) if p.starts_with("/orders/") => match order_text(sw, &p["/orders/".len()..]) {
            Some(t) => respond(&mut s, 200, "OK", &t).await,
            None => respond(&mut s, 404, "Not Found", "no such order\n").await,
        },
        ("POST", "/agreements/import") => {
            let Ok(text) = String::from_utf8(body) else {
                return respond(&mut s, 400, "Bad Request", "body is not UTF-8\n").await;
            };
            let sw2 = sw.clone();
            let (agreements, bad) = tokio::task::spawn_blocking(move || {
                let e = &sw2.engine;
                let known =
                    |c: &crate::message::ChannelId| e.table().channels.iter().any(|x| &x.id == c);
                let (rows, mut bad) = crate::import::parse(&text, e.hasher(), &known, 2, None);
                let (agreements, bad2) = crate::import::group(rows, || e.new_agreement_id());
                bad.extend(bad2);
                bad.sort_by_key(|b| b.line);
                (agreements, bad)
            })
            .await
            .map_err(std::io::Error::other)?;
            let mut written = 0u64;
            for a in agreements {
                let id = sw.engine.agreements().upsert(a);
                if let Some(a) = sw.engine.agreements().get(id) {
                    // Durable before the operator is told it was imported.
                    sw.journal.append(Record::Agreement(Box::new(a))).await?;
                    written += 1;
                }
            }
            let mut out = format!("{written} agreements imported, {} bad lines\n", bad.len());
            for b in &bad {
                let _ = writeln!(out, "line {}: {}", b.line, b.reason);
            }
            let code = if bad.is_empty() { 200 } else { 422 };
            respond(
                &mut s,
                code,
                if code == 200 {
                    "OK"
                } else {
                    "Unprocessable Entity"
                },
                &out,
            )
            .await
        }
        _ => respond(&mut s, 404, "Not Found", "unknown endpoint\n").await,
    }
}

/// `GET /orders/MERCHANT/ORDER_ID`: the order's state, every attempt, and the router's
/// decision with the reason each other channel was excluded. No card data.
fn order_text(sw: &Switch, rest: &str) -> Option<String> {
    let (m, o) = rest.split_once('/')?;
    let key = (
        crate::wire::header::MerchantNo::new(m).ok()?,
        crate::message::OrderId::new(o).ok()?,
    );
    let order = sw.engine.order(&key)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "order {m}/{o}\nstatus {} reason {} channel_code {:?}\namount_fen {}\naccepted_at_ms {} finished_at_ms {}",
        order.outcome.status.name(),
        order.outcome.reason.name(),
        order.outcome.channel_code.as_str(),
        order.amount,
        order.accepted_at_ms,
        order.finished_at_ms
    );
    for (i, a) in order.attempts.iter().enumerate() {
        let _ = writeln!(
            out,
            "attempt {} channel {} order_ref {} sent_at_ms {} outcome {:?}",
            i + 1,
            a.channel,
            a.order_ref,
            a.sent_at_ms,
            a.outcome
        );
    }
    if let Some(d) = sw.engine.route_decision(&key) {
        for r in &d.ranked {
            let _ = writeln!(
                out,
                "candidate {} score_milli {} fee_fen {} placement {:?}",
                r.channel, r.score_milli, r.fee_fen, r.placement
            );
        }
        for (c, why) in &d.excluded {
            let _ = writeln!(out, "excluded {c} {}", why.name());
        }
    }
    Some(out)
}

/// The Prometheus text exposition of everything the switch measures.
pub fn metrics(sw: &Switch) -> String {
    let mut out = sw.engine.routing_metrics(now_ms()).render_metrics();
    let c = &sw.metrics.counters;
    for (name, v) in [
        ("sluice_requests_busy_total", &c.busy),
        ("sluice_frames_bad_mac_total", &c.bad_mac),
        ("sluice_frames_malformed_total", &c.malformed),
        ("sluice_requests_refused_total", &c.session_refused),
        ("sluice_connections_refused_total", &c.connections_refused),
        ("sluice_connections_total", &c.connections),
    ] {
        let _ = writeln!(
            out,
            "# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let s = &sw.engine.stats;
    let _ = writeln!(
        out,
        "# TYPE sluice_orders_accepted_total counter\nsluice_orders_accepted_total {}\n# TYPE sluice_orders_final_total counter\nsluice_orders_final_total {}\n# TYPE sluice_channel_result_mismatches_total counter\nsluice_channel_result_mismatches_total {}\n# TYPE sluice_notifications_unacked gauge\nsluice_notifications_unacked {}",
        s.orders_accepted.load(Ordering::Relaxed),
        s.orders_final.load(Ordering::Relaxed),
        s.mismatches.load(Ordering::Relaxed),
        sw.engine.outbox_len()
    );
    let _ = writeln!(out, "# TYPE sluice_request_latency_us summary");
    for (name, m) in sw.metrics.lender_summary() {
        for (q, v) in [("0.5", m.p50_us), ("0.99", m.p99_us), ("0.999", m.p999_us)] {
            let _ = writeln!(
                out,
                "sluice_request_latency_us{{type=\"{name}\",quantile=\"{q}\"}} {v}"
            );
        }
        let _ = writeln!(
            out,
            "sluice_request_latency_us_count{{type=\"{name}\"}} {}",
            m.count
        );
    }
    let _ = writeln!(out, "# TYPE sluice_upstream_latency_us summary");
    for (ch, m) in sw.metrics.upstream_summary() {
        for (q, v) in [("0.5", m.p50_us), ("0.99", m.p99_us), ("0.999", m.p999_us)] {
            let _ = writeln!(
                out,
                "sluice_upstream_latency_us{{channel=\"{ch}\",quantile=\"{q}\"}} {v}"
            );
        }
        let _ = writeln!(
            out,
            "sluice_upstream_latency_us_count{{channel=\"{ch}\"}} {}",
            m.count
        );
    }
    out
}
