//! The operator's admin port (loopback by default, bearer token required): health and
//! readiness, Prometheus metrics, channels (list, detail, disable / enable), fund
//! top-ups, an order's attempts and routing reasons, stock agreement import, reload,
//! graceful shutdown, and a self-refreshing status page.
//!
//! Written as a small HTTP/1.1 subset (one request per connection, `Content-Length`
//! bodies, bounded sizes) rather than with hyper: a dozen endpoints for operators on
//! loopback do not justify hyper's dependency tree in every build, and the subset is
//! small enough to read in one sitting. [`client`] is its counterpart for `sluice ctl`.
//!
//! Answers are JSON (`{"error": "..."}` on one line for errors) except `/healthz`,
//! `/metrics` (Prometheus text), `/status` (HTML) and `/orders/…` (text for people;
//! `?format=json` for machines). Unknown path → 404, wrong method → 405, missing or
//! wrong token → 401, bad input → 400.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /healthz` | `ok` while the process serves |
//! | `GET /readyz` | 200 when recovery is done, the journal writer works and a channel is usable; 503 with the reason otherwise |
//! | `GET /metrics` | Prometheus text: orders by type/status/reason, latency histograms, sessions, in-flight, BUSY, channel health and breakers, funds, journal |
//! | `GET /channels` | every channel: up/down, breaker, success rate, latency, in-flight, overrides, fund |
//! | `GET /channels/ID` | one channel, with connection-pool counters and today's volumes |
//! | `POST /channels/ID/disable[?product=debit\|payout\|sign]` | operator override *off*: the router stops choosing it (all products by default) |
//! | `POST /channels/ID/enable[?product=…]` | back to *auto*: the breaker decides |
//! | `GET /funds` | fund positions |
//! | `POST /funds/ID/topup?amount_fen=N` | add N fen (negative: correction) to a payout channel's fund position |
//! | `GET /orders/MERCHANT/ORDER_ID[?format=json]` | an order's state, every attempt and the router's reasons |
//! | `POST /agreements/import` | body: the stock import CSV (`src/import.rs`); each agreement is journaled before the answer |
//! | `POST /reload` | what SIGHUP does: keys, channel table, routing policy |
//! | `POST /shutdown` | what SIGTERM does: drain and stop |
//! | `GET /status` | the status page (HTML); `GET /status.json` its data |
//!
//! Files: this one is the server, the routing and the operator's actions; `views.rs`
//! the read-only views (readiness, channels, funds, orders, status data); `prometheus.rs`
//! `/metrics`; `history.rs` the charts' ring of samples; `status.html` the page;
//! `client.rs` the client behind `sluice ctl`.
//!
//! The status page is opened in a browser, which cannot set a bearer header from a URL:
//! `GET /status?token=T` and `GET /status.json?token=T` (these two read-only paths only)
//! also accept the token as a query parameter, and the page's script reuses it.

pub mod client;
mod history;
mod prometheus;
mod views;

pub use prometheus::metrics;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::app::Switch;
use crate::engine::{Product, Record};
use crate::health::Override;
use crate::journal::Journal;
use crate::message::ChannelId;
use crate::upstream::ChannelPool;

use history::History;
use views::{
    channel_detail, channels_json, find_channel, fund_json, funds_json, order_json, order_text,
    readiness, status_json,
};

/// Largest request head (request line and headers), bytes.
const HEAD_MAX: usize = 16 * 1024;
/// Largest request body, bytes: a 2M-row import file is about 180 MB.
const BODY_MAX: usize = 512 * 1024 * 1024;
/// Time a client has to send its whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest fund top-up or correction in one call, fen (¥10 billion): a typo with extra
/// digits is refused instead of making a channel look funded.
pub const TOPUP_FEN_MAX: i64 = 1_000_000_000_000;

/// What the reload hook does: re-read configuration and keys, swap them in; a summary
/// or the reason it was refused (the running configuration is then unchanged).
pub type ReloadFn = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// What the admin port can see and do beyond the shared [`Switch`]: the channel pools
/// (readiness, in-flight), the journal (failure, queue), the reload hook set by the
/// binary (it owns the configuration file), and the shutdown request the binary waits
/// on next to its signals.
pub struct Control {
    pub(super) pools: HashMap<ChannelId, ChannelPool>,
    pub(super) journal: Option<Journal>,
    reload: OnceLock<ReloadFn>,
    pub(super) stop_requested: CancellationToken,
    pub(super) recovered: AtomicBool,
    history: Mutex<History>,
}

impl Control {
    /// Control over these pools and journal.
    pub fn new(pools: HashMap<ChannelId, ChannelPool>, journal: Option<Journal>) -> Control {
        Control {
            pools,
            journal,
            reload: OnceLock::new(),
            stop_requested: CancellationToken::new(),
            recovered: AtomicBool::new(false),
            history: Mutex::new(History::new(history::SAMPLES_MAX)),
        }
    }

    /// Install the reload hook (`POST /reload`); only the first call counts. Without
    /// one (the demo has no configuration file) reload answers 409.
    pub fn set_reload(&self, f: ReloadFn) {
        let _ = self.reload.set(f);
    }

    /// Fires when an operator asked for a graceful shutdown (`POST /shutdown`).
    pub fn shutdown_requested(&self) -> CancellationToken {
        self.stop_requested.clone()
    }

    /// Recovery is finished and its pending orders are being queried (readiness).
    pub fn mark_recovered(&self) {
        self.recovered.store(true, Ordering::Release);
    }

    pub(super) fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serve the admin port until `stop` fires. `token` is compared in constant time.
pub async fn serve(
    listener: TcpListener,
    sw: Arc<Switch>,
    ctl: Arc<Control>,
    token: String,
    stop: CancellationToken,
) {
    let sampler = tokio::spawn(history::sample_loop(sw.clone(), ctl.clone(), stop.clone()));
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let sw = sw.clone();
        let ctl = ctl.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, &sw, &ctl, &token)).await;
        });
    }
    let _ = sampler.await;
}

/// One answer.
struct Reply {
    code: u16,
    content_type: &'static str,
    body: String,
}

impl Reply {
    fn text(code: u16, body: impl Into<String>) -> Reply {
        Reply {
            code,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    fn json(code: u16, v: &Value) -> Reply {
        Reply {
            code,
            content_type: "application/json",
            body: format!("{v}\n"),
        }
    }

    /// An error: one JSON line with the reason.
    fn error(code: u16, why: impl Into<String>) -> Reply {
        Reply::json(code, &json!({ "error": why.into() }))
    }

    fn method(allowed: &str) -> Reply {
        Reply::error(405, format!("method not allowed: use {allowed}"))
    }
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

async fn respond(s: &mut TcpStream, r: &Reply) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        r.code,
        reason_phrase(r.code),
        r.content_type,
        r.body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(r.body.as_bytes()).await?;
    s.shutdown().await
}

/// A parsed request.
struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn param(&self, k: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// `%XX` and `+` decoding of one query component (lossy on invalid UTF-8).
pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn token_ok(presented: &str, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    presented.len() == token.len() && bool::from(presented.as_bytes().ct_eq(token.as_bytes()))
}

async fn handle(
    mut s: TcpStream,
    sw: &Arc<Switch>,
    ctl: &Arc<Control>,
    token: &str,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > HEAD_MAX {
            return respond(&mut s, &Reply::error(431, "request head too large")).await;
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
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut req = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: parse_query(query),
        body: Vec::new(),
    };
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
    // The status page and its data also take the token from the URL (a browser cannot
    // set a header from an address); every other path needs the header.
    let url_token = (req.method == "GET" && (req.path == "/status" || req.path == "/status.json"))
        .then(|| req.param("token"))
        .flatten();
    let presented = auth.strip_prefix("Bearer ").or(url_token).unwrap_or("");
    if !token_ok(presented, token) {
        if req.method == "GET" && req.path == "/status" {
            // A person at a browser: say how to get in.
            return respond(
                &mut s,
                &Reply {
                    code: 401,
                    content_type: "text/html; charset=utf-8",
                    body: "<!doctype html><title>sluice: token required</title>\
                           <p>The status page needs the admin token: open \
                           <code>/status?token=TOKEN</code> (the token is in the file named by \
                           <code>[admin] token_file</code>; <code>sluice demo</code> prints the \
                           whole address).</p>\n"
                        .into(),
                },
            )
            .await;
        }
        return respond(&mut s, &Reply::error(401, "admin token required")).await;
    }
    if length > BODY_MAX {
        return respond(&mut s, &Reply::error(413, "body too large")).await;
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
    req.body = body;
    let shutdown = req.method == "POST" && req.path == "/shutdown";
    let reply = route(sw, ctl, req).await;
    let r = respond(&mut s, &reply).await;
    if shutdown && reply.code == 202 {
        // After the answer is out: the drain stops this port.
        ctl.stop_requested.cancel();
    }
    r
}

async fn route(sw: &Arc<Switch>, ctl: &Arc<Control>, req: Request) -> Reply {
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let get = req.method == "GET";
    let post = req.method == "POST";
    match segs.as_slice() {
        ["healthz"] if get => Reply::text(200, "ok\n"),
        ["readyz"] if get => {
            let (ready, v) = readiness(sw, ctl);
            Reply::json(if ready { 200 } else { 503 }, &v)
        }
        ["metrics"] if get => Reply::text(200, metrics(sw, ctl)),
        ["channels"] if get => Reply::json(200, &json!({ "channels": channels_json(sw, ctl) })),
        ["channels", id] if get => match channel_detail(sw, ctl, id) {
            Some(v) => Reply::json(200, &v),
            None => Reply::error(404, format!("unknown channel {id:?}")),
        },
        ["channels", id, action @ ("disable" | "enable")] if post => {
            set_override(sw, id, action, req.param("product"))
        }
        ["funds"] if get => Reply::json(200, &json!({ "funds": funds_json(sw) })),
        ["funds", id, "topup"] if post => top_up(sw, id, req.param("amount_fen")),
        ["orders", m, o] if get => match req.param("format") {
            Some("json") => match order_json(sw, m, o) {
                Some(v) => Reply::json(200, &v),
                None => Reply::error(404, "no such order"),
            },
            None | Some("text") => match order_text(sw, m, o) {
                Some(t) => Reply::text(200, t),
                None => Reply::text(404, "no such order\n"),
            },
            Some(f) => Reply::error(400, format!("format {f:?}: expected text or json")),
        },
        ["agreements", "import"] if post => import(sw, req.body).await,
        ["reload"] if post => match ctl.reload.get().cloned() {
            None => Reply::error(
                409,
                "this process has no configuration file to reload (demo)",
            ),
            Some(f) => match tokio::task::spawn_blocking(move || f()).await {
                Ok(Ok(summary)) => {
                    tracing::info!(%summary, "admin: reloaded keys and routes");
                    Reply::json(200, &json!({ "reloaded": summary }))
                }
                Ok(Err(why)) => {
                    tracing::error!(error = %why, "admin: reload refused; the running configuration is unchanged");
                    Reply::error(
                        422,
                        format!("reload refused (running configuration unchanged): {why}"),
                    )
                }
                Err(e) => Reply::error(500, format!("reload failed: {e}")),
            },
        },
        ["shutdown"] if post => {
            tracing::info!("admin: shutdown requested: draining in-flight work");
            Reply::json(
                202,
                &json!({ "stopping": "draining in-flight work, then exiting" }),
            )
        }
        ["status"] if get => Reply {
            code: 200,
            content_type: "text/html; charset=utf-8",
            body: STATUS_PAGE.to_string(),
        },
        ["status.json"] if get => Reply::json(200, &status_json(sw, ctl)),
        // Known paths with the wrong method.
        ["healthz" | "readyz" | "metrics" | "channels" | "funds" | "status" | "status.json"]
        | ["channels", _]
        | ["orders", _, _] => Reply::method("GET"),
        ["channels", _, "disable" | "enable"]
        | ["funds", _, "topup"]
        | ["agreements", "import"]
        | ["reload" | "shutdown"] => Reply::method("POST"),
        _ => Reply::error(404, format!("unknown endpoint {}", req.path)),
    }
}

/// The status page: self-contained HTML, CSS and script (no CDN: operators' machines
/// often have no internet).
const STATUS_PAGE: &str = include_str!("status.html");

fn set_override(sw: &Switch, id: &str, action: &str, product: Option<&str>) -> Reply {
    let Some(c) = find_channel(sw, id) else {
        return Reply::error(404, format!("unknown channel {id:?}"));
    };
    let products: Vec<Product> = match product {
        None | Some("all") => Product::ALL.to_vec(),
        Some(p) => match Product::ALL.iter().find(|x| x.name() == p) {
            Some(x) => vec![*x],
            None => {
                return Reply::error(
                    400,
                    format!("product {p:?}: expected debit, payout, sign or all"),
                )
            }
        },
    };
    let o = if action == "disable" {
        Override::Off
    } else {
        Override::Auto
    };
    for p in &products {
        sw.engine.set_override(&c.id, *p, o);
    }
    let names: Vec<&str> = products.iter().map(|p| p.name()).collect();
    tracing::warn!(channel = %c.id, products = ?names, state = o.name(), "admin: operator override");
    let h = sw.engine.health();
    let overrides: serde_json::Map<String, Value> = Product::ALL
        .iter()
        .map(|p| {
            (
                p.name().to_string(),
                Value::from(h.override_of(&c.id, p.index()).name()),
            )
        })
        .collect();
    Reply::json(
        200,
        &json!({ "channel": c.id.as_str(), "overrides": overrides }),
    )
}

fn top_up(sw: &Switch, id: &str, amount: Option<&str>) -> Reply {
    let Some(raw) = amount else {
        return Reply::error(400, "amount_fen is required (e.g. ?amount_fen=1000000)");
    };
    let delta: i64 = match raw.parse() {
        Ok(v) => v,
        Err(_) => {
            return Reply::error(
                400,
                format!("amount_fen {raw:?}: expected a whole number of fen"),
            )
        }
    };
    if delta == 0 || delta.unsigned_abs() > TOPUP_FEN_MAX as u64 {
        return Reply::error(
            400,
            format!("amount_fen {delta}: must be non-zero and at most {TOPUP_FEN_MAX} in size"),
        );
    }
    let Some(c) = find_channel(sw, id) else {
        return Reply::error(404, format!("unknown channel {id:?}"));
    };
    match sw.engine.limits().fund_top_up(&c.id, delta) {
        Some(f) => {
            tracing::warn!(channel = %c.id, delta_fen = delta, balance_fen = f.balance_fen, "admin: fund top-up");
            Reply::json(200, &fund_json(&f))
        }
        None => Reply::error(
            409,
            format!("channel {id} has no fund position (configure [channel.fund])"),
        ),
    }
}

async fn import(sw: &Arc<Switch>, body: Vec<u8>) -> Reply {
    let Ok(text) = String::from_utf8(body) else {
        return Reply::error(400, "body is not UTF-8");
    };
    let sw2 = sw.clone();
    let parsed = tokio::task::spawn_blocking(move || {
        let e = &sw2.engine;
        let known = |c: &ChannelId| e.table().channels.iter().any(|x| &x.id == c);
        let (rows, mut bad) = crate::import::parse(&text, e.hasher(), &known, 2, None);
        let (agreements, bad2) = crate::import::group(rows, || e.new_agreement_id());
        bad.extend(bad2);
        bad.sort_by_key(|b| b.line);
        (agreements, bad)
    })
    .await;
    let Ok((agreements, bad)) = parsed else {
        return Reply::error(500, "import task failed");
    };
    let mut written = 0u64;
    for a in agreements {
        let id = sw.engine.agreements().upsert(a);
        if let Some(a) = sw.engine.agreements().get(id) {
            // Durable before the operator is told it was imported.
            if let Err(e) = sw.journal.append(Record::Agreement(Box::new(a))).await {
                return Reply::text(
                    500,
                    format!("journal append failed after {written} agreements: {e}\n"),
                );
            }
            written += 1;
        }
    }
    let mut out = format!("{written} agreements imported, {} bad lines\n", bad.len());
    for b in &bad {
        let _ = writeln!(out, "line {}: {}", b.line, b.reason);
    }
    Reply::text(if bad.is_empty() { 200 } else { 422 }, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        assert_eq!(
            parse_query("amount_fen=100&product=debit&x=a%2Fb+c"),
            vec![
                ("amount_fen".to_string(), "100".to_string()),
                ("product".to_string(), "debit".to_string()),
                ("x".to_string(), "a/b c".to_string()),
            ]
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%41"), "A");
    }

    #[test]
    fn token_comparison_needs_the_exact_token() {
        assert!(token_ok("abcdef", "abcdef"));
        assert!(!token_ok("abcdeg", "abcdef"));
        assert!(!token_ok("abcde", "abcdef"));
        assert!(!token_ok("", "abcdef"));
    }
}
