//! `sluice ctl`: the operator's command line for a running switch's admin port. Prints
//! aligned tables for people (or the JSON as it is with `--json`); the exit code is
//! non-zero when the switch refused, was not ready, or could not be reached.
//!
//! Part of the `sluice` binary, not the library: it only formats what
//! [`sluice::admin`] answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use serde_json::Value;

use sluice::admin::client::{request, Answer};
use sluice::config::{self, Config};

/// How long one admin request may take (an import of millions of rows is the slow one
/// and goes through `curl`, not ctl).
const TIMEOUT: Duration = Duration::from_secs(30);

/// What to ask.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Readiness, sessions, throughput, channels and fund positions at a glance.
    Status,
    /// Readiness only (exit code 0 when ready, 1 when not).
    Ready,
    /// Every channel: up/down, breaker, success rate, latency, in-flight, overrides.
    Channels,
    /// One channel in detail.
    Channel {
        /// Channel id.
        id: String,
    },
    /// Stop routing new instructions to a channel (operator override "off"; in memory
    /// until a restart: set `enabled = false` in the config to keep it out).
    Disable {
        /// Channel id.
        id: String,
        /// Only this product (debit, payout, sign); default all.
        #[arg(long)]
        product: Option<String>,
    },
    /// Hand a channel back to its breaker (operator override "auto").
    Enable {
        /// Channel id.
        id: String,
        /// Only this product (debit, payout, sign); default all.
        #[arg(long)]
        product: Option<String>,
    },
    /// Fund positions of payout channels.
    Funds,
    /// Add to a payout channel's fund position (negative: a correction).
    Topup {
        /// Channel id.
        id: String,
        /// Amount in fen (1 yuan = 100 fen).
        #[arg(allow_hyphen_values = true)]
        amount_fen: String,
    },
    /// An order's state, every attempt and the router's reasons.
    Order {
        /// Merchant number.
        merchant: String,
        /// The merchant's order id.
        order: String,
    },
    /// Reload keys, channel table and routing policy (what SIGHUP does).
    Reload,
    /// Drain in-flight work and stop (what SIGTERM does).
    Shutdown,
    /// The Prometheus metrics page.
    Metrics,
}

/// Where the admin port is and its token.
pub struct Target {
    addr: String,
    token: String,
}

impl Target {
    /// From the flags, falling back to the configuration file's `[admin]` section.
    pub fn resolve(
        admin: Option<String>,
        token_file: Option<PathBuf>,
        config: Option<&Path>,
    ) -> Result<Target> {
        let section = match config {
            Some(p) => Some(
                Config::load(p)?
                    .admin
                    .ok_or_else(|| anyhow!("{}: no [admin] section", p.display()))?,
            ),
            None => None,
        };
        let addr = admin
            .or_else(|| section.as_ref().map(|a| a.listen.to_string()))
            .ok_or_else(|| anyhow!("give --admin ADDR or --config FILE"))?;
        let token_file = token_file
            .or_else(|| section.map(|a| a.token_file))
            .ok_or_else(|| anyhow!("give --token-file FILE or --config FILE"))?;
        // The same rule as the switch: a token others can read is refused.
        let t = config::read_secret_file(&token_file)?;
        let token = String::from_utf8_lossy(&t).trim().to_string();
        Ok(Target { addr, token })
    }

    async fn call(&self, method: &str, path: &str) -> Result<Answer> {
        request(&self.addr, &self.token, method, path, b"", TIMEOUT)
            .await
            .with_context(|| format!("admin port {}", self.addr))
    }
}

/// The error line of a refused request.
fn error_of(a: &Answer) -> String {
    serde_json::from_str::<Value>(&a.body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| a.body.trim().to_string())
}

fn parse(a: &Answer) -> Result<Value> {
    serde_json::from_str(&a.body).with_context(|| format!("not JSON: {}", a.body.trim()))
}

/// Run one command; returns the process exit code.
pub async fn run(t: &Target, cmd: Command, raw_json: bool) -> Result<i32> {
    let (method, path) = match &cmd {
        Command::Status => ("GET", "/status.json".to_string()),
        Command::Ready => ("GET", "/readyz".to_string()),
        Command::Channels => ("GET", "/channels".to_string()),
        Command::Channel { id } => ("GET", format!("/channels/{id}")),
        Command::Disable { id, product } => (
            "POST",
            format!("/channels/{id}/disable{}", product_query(product)),
        ),
        Command::Enable { id, product } => (
            "POST",
            format!("/channels/{id}/enable{}", product_query(product)),
        ),
        Command::Funds => ("GET", "/funds".to_string()),
        Command::Topup { id, amount_fen } => {
            ("POST", format!("/funds/{id}/topup?amount_fen={amount_fen}"))
        }
        Command::Order { merchant, order } => {
            ("GET", format!("/orders/{merchant}/{order}?format=json"))
        }
        Command::Reload => ("POST", "/reload".to_string()),
        Command::Shutdown => ("POST", "/shutdown".to_string()),
        Command::Metrics => ("GET", "/metrics".to_string()),
    };
    let a = t.call(method, &path).await?;
    let not_ready = matches!(cmd, Command::Ready) && a.code == 503;
    if !(200..300).contains(&a.code) && !not_ready {
        bail!("{} {}: {} ({})", method, path, error_of(&a), a.code);
    }
    if raw_json || matches!(cmd, Command::Metrics) {
        print!("{}", a.body);
        return Ok(if not_ready { 1 } else { 0 });
    }
    let v = parse(&a)?;
    match cmd {
        Command::Status => {
            print!("{}", status_text(&v));
        }
        Command::Ready => {
            if v["ready"].as_bool() == Some(true) {
                println!("ready (usable channels: {})", list(&v["usable_channels"]));
            } else {
                println!("NOT READY: {}", s(&v["reason"]));
                return Ok(1);
            }
        }
        Command::Channels => print!("{}", channels_table(&v["channels"])),
        Command::Channel { .. } => print!("{}", channel_text(&v)),
        Command::Disable { id, .. } | Command::Enable { id, .. } => {
            println!("channel {id}: overrides {}", overrides(&v["overrides"]));
        }
        Command::Funds => print!("{}", funds_table(&v["funds"])),
        Command::Topup { id, .. } => {
            println!(
                "channel {id}: balance {} reserved {} available {}",
                yuan(&v["balance_fen"]),
                yuan(&v["reserved_fen"]),
                yuan(&v["available_fen"])
            );
        }
        Command::Order { .. } => print!("{}", order_text(&v)),
        Command::Reload => println!("reloaded: {}", s(&v["reloaded"])),
        Command::Shutdown => println!("shutting down: {}", s(&v["stopping"])),
        Command::Metrics => {}
    }
    Ok(0)
}

fn product_query(p: &Option<String>) -> String {
    p.as_ref()
        .map(|p| format!("?product={p}"))
        .unwrap_or_default()
}

/// A JSON value as plain text (`-` for null).
fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        x => x.to_string(),
    }
}

fn list(v: &Value) -> String {
    v.as_array()
        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}

/// Fen as yuan with two decimals, in integers (no floating point touches money).
fn yuan(v: &Value) -> String {
    match v.as_i64() {
        Some(f) => {
            let sign = if f < 0 { "-" } else { "" };
            let a = f.unsigned_abs();
            format!("{sign}¥{}.{:02}", group(a / 100), a % 100)
        }
        None => "-".into(),
    }
}

/// 1234567 → 1,234,567.
fn group(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::new();
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map(|x| format!("{:.1}%", x * 100.0))
        .unwrap_or_else(|| "-".into())
}

fn ms(v: &Value) -> String {
    v.as_u64()
        .map(|x| format!("{x}ms"))
        .unwrap_or_else(|| "-".into())
}

fn overrides(v: &Value) -> String {
    ["debit", "payout", "sign"]
        .iter()
        .map(|p| format!("{p}={}", s(&v[*p])))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Rows under a header, columns padded to the widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter()
            .map(|r| r.get(i).map(|c| c.chars().count()).unwrap_or(0))
            .chain(std::iter::once(header[i].chars().count()))
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(c);
                l.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// The elements of a JSON array; none for anything else.
fn items(v: &Value) -> std::slice::Iter<'_, Value> {
    v.as_array().map(|a| a.as_slice()).unwrap_or(&[]).iter()
}

fn channels_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = items(v)
        .map(|c| {
            vec![
                s(&c["id"]),
                if c["usable"].as_bool() == Some(true) {
                    "usable".into()
                } else {
                    format!("NOT USABLE: {}", s(&c["unusable_reason"]))
                },
                if c["up"].as_bool() == Some(true) {
                    format!("up ({})", s(&c["connections_ready"]))
                } else {
                    "DOWN".into()
                },
                s(&c["breaker"]),
                c["health_score"]
                    .as_f64()
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or_else(|| "-".into()),
                pct(&c["success_ratio"]),
                ms(&c["latency_ms_p50"]),
                ms(&c["latency_ms_p90"]),
                s(&c["inflight"]),
                overrides(&c["overrides"]),
                yuan(&c["fund"]["available_fen"]),
            ]
        })
        .collect();
    table(
        &[
            "CHANNEL",
            "ROUTING",
            "LINK",
            "BREAKER",
            "HEALTH",
            "SUCCESS",
            "P50",
            "P90",
            "IN-FLIGHT",
            "OVERRIDES",
            "FUND AVAILABLE",
        ],
        &rows,
    )
}

fn funds_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = items(v)
        .map(|f| {
            vec![
                s(&f["channel"]),
                yuan(&f["balance_fen"]),
                yuan(&f["reserved_fen"]),
                yuan(&f["available_fen"]),
                yuan(&f["alert_fen"]),
                if f["low"].as_bool() == Some(true) {
                    "LOW".into()
                } else {
                    "ok".into()
                },
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no fund positions configured\n".into();
    }
    table(
        &[
            "CHANNEL",
            "BALANCE",
            "RESERVED",
            "AVAILABLE",
            "ALERT BELOW",
            "STATE",
        ],
        &rows,
    )
}

fn channel_text(v: &Value) -> String {
    let mut rows = vec![
        vec!["channel".into(), s(&v["id"])],
        vec![
            "routing".into(),
            if v["usable"].as_bool() == Some(true) {
                "usable".into()
            } else {
                format!("NOT USABLE: {}", s(&v["unusable_reason"]))
            },
        ],
        vec!["enabled in config".into(), s(&v["enabled"])],
        vec!["products".into(), list(&v["products"])],
        vec!["connections ready".into(), s(&v["connections_ready"])],
        vec!["breaker".into(), s(&v["breaker"])],
        vec![
            "breaker opened".into(),
            format!("{} times", s(&v["breaker_opened_total"])),
        ],
        vec!["health score".into(), s(&v["health_score"])],
        vec!["success rate".into(), pct(&v["success_ratio"])],
        vec![
            "latency p50/p90/p99".into(),
            format!(
                "{} / {} / {}",
                ms(&v["latency_ms_p50"]),
                ms(&v["latency_ms_p90"]),
                ms(&v["latency_ms_p99"])
            ),
        ],
        vec!["in flight".into(), s(&v["inflight"])],
        vec!["overrides".into(), overrides(&v["overrides"])],
        vec!["priority".into(), s(&v["priority"])],
    ];
    if let Some(w) = v["window"].as_object() {
        rows.push(vec![
            "window".into(),
            w.iter()
                .map(|(k, x)| format!("{k}={x}"))
                .collect::<Vec<_>>()
                .join(" "),
        ]);
    }
    if !v["fund"].is_null() {
        rows.push(vec![
            "fund".into(),
            format!(
                "balance {} reserved {} available {} (alert below {})",
                yuan(&v["fund"]["balance_fen"]),
                yuan(&v["fund"]["reserved_fen"]),
                yuan(&v["fund"]["available_fen"]),
                yuan(&v["fund"]["alert_fen"])
            ),
        ]);
    }
    if let Some(p) = v["pool"].as_object() {
        rows.push(vec![
            "pool".into(),
            p.iter()
                .map(|(k, x)| format!("{k}={x}"))
                .collect::<Vec<_>>()
                .join(" "),
        ]);
    }
    let mut out = table(&["FIELD", "VALUE"], &rows);
    let vols: Vec<Vec<String>> = items(&v["volumes"])
        .map(|x| {
            vec![
                s(&x["product"]),
                s(&x["day_count"]),
                yuan(&x["day_fen"]),
                yuan(&x["month_fen"]),
            ]
        })
        .collect();
    push_table(
        &mut out,
        &["PRODUCT", "TODAY COUNT", "TODAY AMOUNT", "MONTH AMOUNT"],
        &vols,
    );
    out
}

/// Append a blank line and a table to `out`, unless there are no rows.
fn push_table(out: &mut String, headers: &[&str], rows: &[Vec<String>]) {
    if !rows.is_empty() {
        out.push('\n');
        out.push_str(&table(headers, rows));
    }
}

fn order_text(v: &Value) -> String {
    let mut out = format!(
        "order {}/{} ({})\nstatus {} reason {} channel code {}\namount {}  queries {}\n",
        s(&v["merchant"]),
        s(&v["order_id"]),
        s(&v["type"]),
        s(&v["status"]),
        s(&v["reason"]),
        if v["channel_code"].as_str() == Some("") {
            "-".to_string()
        } else {
            s(&v["channel_code"])
        },
        yuan(&v["amount_fen"]),
        s(&v["queries"]),
    );
    let attempts: Vec<Vec<String>> = items(&v["attempts"])
        .enumerate()
        .map(|(i, a)| {
            vec![
                (i + 1).to_string(),
                s(&a["channel"]),
                s(&a["order_ref"]),
                s(&a["sent_at_ms"]),
                s(&a["outcome"]),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &["ATTEMPT", "CHANNEL", "ORDER REF", "SENT AT (ms)", "OUTCOME"],
        &attempts,
    ));
    let mut route: Vec<Vec<String>> = items(&v["candidates"])
        .map(|c| {
            vec![
                s(&c["channel"]),
                format!("candidate ({})", s(&c["placement"])),
                s(&c["score_milli"]),
                s(&c["fee_fen"]),
            ]
        })
        .collect();
    route.extend(items(&v["excluded"]).map(|c| {
        vec![
            s(&c["channel"]),
            format!("excluded: {}", s(&c["reason"])),
            "-".into(),
            "-".into(),
        ]
    }));
    push_table(
        &mut out,
        &["CHANNEL", "ROUTER", "SCORE x1000", "FEE (fen)"],
        &route,
    );
    out
}

fn status_text(v: &Value) -> String {
    let mut out = String::new();
    if v["ready"].as_bool() == Some(true) {
        out.push_str("ready\n");
    } else {
        out.push_str(&format!("NOT READY: {}\n", s(&v["ready_reason"])));
    }
    let last = |k: &str| {
        v["throughput"][k]
            .as_array()
            .and_then(|a| a.last())
            .and_then(Value::as_f64)
            .map(|x| format!("{x:.1}/s"))
            .unwrap_or_else(|| "-".into())
    };
    out.push_str(&format!(
        "sessions {}  in-flight {}  orders {} accepted / {} final  throughput {} orders, {} requests  BUSY {}\n",
        s(&v["sessions"]),
        s(&v["inflight"]),
        s(&v["orders_accepted_total"]),
        s(&v["orders_final_total"]),
        last("orders_per_s"),
        last("requests_per_s"),
        s(&v["busy_total"]),
    ));
    if let Some(j) = v["journal"].as_object() {
        out.push_str(&format!(
            "journal queued {}  records {}  fsync avg {:.2}ms\n",
            s(&j["queued"]),
            s(&j["records"]),
            j["fsync_ms_avg"].as_f64().unwrap_or(0.0)
        ));
    }
    out.push('\n');
    out.push_str(&channels_table(&v["channels"]));
    out.push('\n');
    out.push_str(&funds_table(&v["funds"]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn money_prints_in_yuan_without_floats() {
        assert_eq!(yuan(&json!(123456789)), "¥1,234,567.89");
        assert_eq!(yuan(&json!(-5)), "-¥0.05");
        assert_eq!(yuan(&json!(null)), "-");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xxxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A     LONGER\nxxxx  1\ny     22\n");
    }
}
