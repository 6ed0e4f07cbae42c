//! Read-only views of a running switch for the admin port: readiness, channels, fund
//! positions, an order with its attempts and the router's reasons, the status page's
//! data. JSON for machines; the order also as text for people. No card data anywhere.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::{history, percent_decode, Control};
use crate::app::{now_ms, Switch};
use crate::engine::{ChannelConfig, Product};
use crate::health::{BreakerState, FundSnapshot, HealthSnapshot, Override};
use crate::message::ChannelId;

fn pool_ready(ctl: &Control, id: &ChannelId) -> u64 {
    ctl.pools.get(id).map(|p| p.ready() as u64).unwrap_or(0)
}

/// Why a channel cannot take new instructions now, or `None` when it can (for at least
/// one product).
fn unusable(ctl: &Control, c: &ChannelConfig, h: Option<&HealthSnapshot>) -> Option<String> {
    if !c.enabled {
        return Some("disabled in configuration".into());
    }
    if pool_ready(ctl, &c.id) == 0 {
        return Some("no logged-on connection".into());
    }
    if let Some(h) = h {
        if matches!(h.breaker, BreakerState::Open { .. }) {
            return Some("breaker open".into());
        }
        if c.products
            .iter()
            .all(|p| h.overrides[p.index()] == Override::Off)
        {
            return Some("disabled by the operator".into());
        }
    }
    None
}

pub(super) fn readiness(sw: &Switch, ctl: &Control) -> (bool, Value) {
    let mut problems = Vec::new();
    if !ctl.recovered.load(Ordering::Acquire) {
        problems.push("journal recovery not finished".to_string());
    }
    if let Some(j) = &ctl.journal {
        if let Some(why) = j.failure() {
            problems.push(format!("journal writer not working: {why}"));
        }
    }
    if sw.shutdown.is_cancelled() || ctl.stop_requested.is_cancelled() {
        problems.push("shutting down".into());
    }
    let table = sw.engine.table();
    let health = sw.engine.health().snapshot(now_ms());
    let mut usable = Vec::new();
    let mut not = Vec::new();
    for c in &table.channels {
        let h = health.iter().find(|h| h.channel == c.id);
        match unusable(ctl, c, h) {
            None => usable.push(c.id.to_string()),
            Some(why) => not.push(format!("{}: {why}", c.id)),
        }
    }
    if usable.is_empty() {
        problems.push(if !not.is_empty() {
            format!("no usable channel ({})", not.join("; "))
        } else {
            "no channel configured".into()
        });
    }
    let ready = problems.is_empty();
    (
        ready,
        json!({
            "ready": ready,
            "reason": problems.join("; "),
            "usable_channels": usable,
        }),
    )
}

fn opt_ms(v: Option<u64>) -> Value {
    v.map(Value::from).unwrap_or(Value::Null)
}

pub(super) fn fund_json(f: &FundSnapshot) -> Value {
    json!({
        "channel": f.channel.as_str(),
        "balance_fen": f.balance_fen,
        "reserved_fen": f.reserved_fen,
        "available_fen": f.available_fen(),
        "alert_fen": f.alert_fen,
        "low": f.available_fen() < f.alert_fen,
    })
}

pub(super) fn funds_json(sw: &Switch) -> Vec<Value> {
    sw.engine
        .limits()
        .funds_snapshot()
        .iter()
        .map(fund_json)
        .collect()
}

/// The router's view of a channel's health as one number in 0..=1: its stability and
/// latency terms with the policy's weights (the cost term depends on the order, so it is
/// left out). An unmeasured latency counts as the policy's reference latency.
fn health_score(sw: &Switch, h: Option<&HealthSnapshot>) -> f64 {
    let w = sw.engine.policy().weights;
    let (ws, wl) = (w.stability as f64, w.latency as f64);
    if ws + wl <= 0.0 {
        return 1.0;
    }
    let s = h.map(|h| h.success_ppm as f64 / 1e6).unwrap_or(1.0);
    let r = w.latency_ref_ms.max(1) as f64;
    let l = h
        .and_then(|h| h.latency_ms_p90)
        .map(|v| v as f64)
        .unwrap_or(r);
    let score = (ws * s + wl * r / (r + l)) / (ws + wl);
    (score * 1000.0).round() / 1000.0
}

fn channel_json(
    sw: &Switch,
    ctl: &Control,
    c: &ChannelConfig,
    h: Option<&HealthSnapshot>,
    fund: Option<&FundSnapshot>,
) -> Value {
    let ready = pool_ready(ctl, &c.id);
    let inflight = ctl
        .pools
        .get(&c.id)
        .map(|p| p.stats().inflight)
        .unwrap_or(0);
    let overrides: serde_json::Map<String, Value> = Product::ALL
        .iter()
        .map(|p| {
            (
                p.name().to_string(),
                Value::from(h.map(|h| h.overrides[p.index()]).unwrap_or_default().name()),
            )
        })
        .collect();
    json!({
        "id": c.id.as_str(),
        "enabled": c.enabled,
        "up": ready > 0,
        "usable": unusable(ctl, c, h).is_none(),
        "unusable_reason": unusable(ctl, c, h),
        "connections_ready": ready,
        "products": c.products.iter().map(|p| p.name()).collect::<Vec<_>>(),
        "breaker": h.map(|h| h.breaker.name()).unwrap_or("closed"),
        "breaker_opened_total": h.map(|h| h.breaker_opened_total).unwrap_or(0),
        "health_score": health_score(sw, h),
        "success_ratio": h.map(|h| h.success_ppm as f64 / 1e6).unwrap_or(1.0),
        "window": h.map(|h| json!({
            "ok": h.window_ok,
            "failures": h.window_failures,
            "declined": h.window_neutral,
            "timeouts": h.window_timeouts,
            "not_sent": h.window_not_sent,
            "not_processed": h.window_not_processed,
        })),
        "latency_ms_p50": opt_ms(h.and_then(|h| h.latency_ms_p50)),
        "latency_ms_p90": opt_ms(h.and_then(|h| h.latency_ms_p90)),
        "latency_ms_p99": opt_ms(h.and_then(|h| h.latency_ms_p99)),
        "inflight": inflight,
        "overrides": overrides,
        "fund": fund.map(fund_json),
    })
}

pub(super) fn channels_json(sw: &Switch, ctl: &Control) -> Vec<Value> {
    let table = sw.engine.table();
    let rm = sw.engine.routing_metrics(now_ms());
    table
        .channels
        .iter()
        .map(|c| {
            channel_json(
                sw,
                ctl,
                c,
                rm.health.iter().find(|h| h.channel == c.id),
                rm.funds.iter().find(|f| f.channel == c.id),
            )
        })
        .collect()
}

pub(super) fn find_channel(sw: &Switch, id: &str) -> Option<ChannelConfig> {
    sw.engine
        .table()
        .channels
        .iter()
        .find(|c| c.id.as_str() == id)
        .cloned()
}

pub(super) fn channel_detail(sw: &Switch, ctl: &Control, id: &str) -> Option<Value> {
    let c = find_channel(sw, id)?;
    let rm = sw.engine.routing_metrics(now_ms());
    let mut v = channel_json(
        sw,
        ctl,
        &c,
        rm.health.iter().find(|h| h.channel == c.id),
        rm.funds.iter().find(|f| f.channel == c.id),
    );
    let pool = ctl.pools.get(&c.id).map(|p| {
        let s = p.stats();
        json!({
            "connections_ready": s.connections_ready,
            "inflight": s.inflight,
            "connect_attempts": s.connect_attempts,
            "connect_failures": s.connect_failures,
            "disconnects": s.disconnects,
            "completed": s.completed,
            "timeouts": s.timeouts,
            "saturated": s.saturated,
            "no_connection": s.no_connection,
            "late_replies": s.late_replies,
            "latency_us_p50": s.latency_us_p50,
            "latency_us_p99": s.latency_us_p99,
            "latency_us_max": s.latency_us_max,
        })
    });
    let volumes: Vec<Value> = rm
        .volumes
        .iter()
        .filter(|x| x.channel == c.id)
        .map(|x| {
            json!({
                "product": x.product,
                "day_fen": x.day_fen,
                "day_count": x.day_count,
                "month_fen": x.month_fen,
            })
        })
        .collect();
    v["priority"] = json!(c.priority);
    v["banks"] = json!(c.banks.iter().map(|b| b.as_str()).collect::<Vec<_>>());
    v["pool"] = pool.unwrap_or(Value::Null);
    v["volumes"] = json!(volumes);
    Some(v)
}

fn order_key(m: &str, o: &str) -> Option<crate::engine::order::OrderKey> {
    Some((
        crate::wire::header::MerchantNo::new(m).ok()?,
        crate::message::OrderId::new(&percent_decode(o)).ok()?,
    ))
}

fn attempt_outcome(o: &crate::engine::order::AttemptOutcome) -> String {
    format!("{o:?}")
}

/// `GET /orders/MERCHANT/ORDER_ID`: the order's state, every attempt, and the router's
/// decision with the reason each other channel was excluded. No card data.
pub(super) fn order_text(sw: &Switch, m: &str, o: &str) -> Option<String> {
    let key = order_key(m, o)?;
    let order = sw.engine.order(&key)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "order {m}/{o}\ntype {}\nstatus {} reason {} channel_code {:?}\namount_fen {}\naccepted_at_ms {} finished_at_ms {}\nqueries {}",
        order_type(&order.kind),
        order.outcome.status.name(),
        order.outcome.reason.name(),
        order.outcome.channel_code.as_str(),
        order.amount,
        order.accepted_at_ms,
        order.finished_at_ms,
        order.queries,
    );
    for (i, a) in order.attempts.iter().enumerate() {
        let _ = writeln!(
            out,
            "attempt {} channel {} order_ref {} sent_at_ms {} outcome {}",
            i + 1,
            a.channel,
            a.order_ref,
            a.sent_at_ms,
            attempt_outcome(&a.outcome)
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
    } else {
        let _ = writeln!(
            out,
            "router reasons not held (memory only, until engine.order_detail_ms after the order is final or while fewer than engine.order_detail_max final orders are held, and not across restarts)"
        );
    }
    Some(out)
}

fn order_type(k: &crate::engine::order::OrderKind) -> &'static str {
    match k {
        crate::engine::order::OrderKind::Debit { .. } => "debit",
        crate::engine::order::OrderKind::Payout { .. } => "payout",
    }
}

pub(super) fn order_json(sw: &Switch, m: &str, o: &str) -> Option<Value> {
    let key = order_key(m, o)?;
    let order = sw.engine.order(&key)?;
    let d = sw.engine.route_decision(&key);
    Some(json!({
        "merchant": m,
        "order_id": key.1.as_str(),
        "type": order_type(&order.kind),
        "status": order.outcome.status.name(),
        "reason": order.outcome.reason.name(),
        "channel_code": order.outcome.channel_code.as_str(),
        "amount_fen": order.amount,
        "accepted_at_ms": order.accepted_at_ms,
        "finished_at_ms": order.finished_at_ms,
        "queries": order.queries,
        "attempts": order.attempts.iter().map(|a| json!({
            "channel": a.channel.as_str(),
            "order_ref": a.order_ref.to_string(),
            "sent_at_ms": a.sent_at_ms,
            "outcome": attempt_outcome(&a.outcome),
        })).collect::<Vec<_>>(),
        "candidates": d.as_ref().map(|d| d.ranked.iter().map(|r| json!({
            "channel": r.channel.as_str(),
            "score_milli": r.score_milli,
            "fee_fen": r.fee_fen,
            "placement": format!("{:?}", r.placement),
        })).collect::<Vec<_>>()),
        "excluded": d.as_ref().map(|d| d.excluded.iter().map(|(c, why)| json!({
            "channel": c.as_str(),
            "reason": why.name(),
        })).collect::<Vec<_>>()),
    }))
}

pub(super) fn status_json(sw: &Switch, ctl: &Control) -> Value {
    let (ready, r) = readiness(sw, ctl);
    let hist = ctl.history();
    let mut channels = channels_json(sw, ctl);
    for c in &mut channels {
        let id = c["id"].as_str().unwrap_or("").to_string();
        c["history"] = hist.channel_series(&id);
    }
    let c = &sw.metrics.counters;
    let journal = ctl.journal.as_ref().map(|j| {
        let s = j.stats();
        json!({
            "queued": s.queued,
            "records": s.records,
            "fsyncs": s.fsyncs,
            "fsync_ms_avg": if s.fsyncs == 0 { 0.0 } else { s.fsync_us_total as f64 / s.fsyncs as f64 / 1000.0 },
        })
    });
    json!({
        "now_ms": now_ms(),
        "sample_ms": history::SAMPLE_MS,
        "ready": ready,
        "ready_reason": r["reason"],
        "sessions": sw.hub.sessions(),
        "inflight": c.inflight.load(Ordering::Relaxed),
        "busy_total": c.busy.load(Ordering::Relaxed),
        "orders_accepted_total": sw.engine.stats.orders_accepted.load(Ordering::Relaxed),
        "orders_final_total": sw.engine.stats.orders_final.load(Ordering::Relaxed),
        "journal": journal,
        "channels": channels,
        "funds": funds_json(sw),
        "throughput": hist.throughput_series(),
    })
}
