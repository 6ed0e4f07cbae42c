//! The admin port's `/metrics`: the Prometheus text exposition of everything the switch
//! measures (routing and channel health from the engine, lender and upstream latency,
//! answers by type/status/reason, sessions, in-flight, the journal).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::views::readiness;
use super::Control;
use crate::app::{now_ms, Switch};
use crate::message::ChannelId;

/// The Prometheus text exposition of everything the switch measures.
pub fn metrics(sw: &Switch, ctl: &Control) -> String {
    let mut out = sw.engine.routing_metrics(now_ms()).render_metrics();
    let c = &sw.metrics.counters;
    for (name, help, v) in [
        (
            "sluice_requests_busy_total",
            "Requests answered BUSY.",
            &c.busy,
        ),
        (
            "sluice_frames_bad_mac_total",
            "Frames refused for a bad MAC or unknown key.",
            &c.bad_mac,
        ),
        (
            "sluice_frames_malformed_total",
            "Frames refused as malformed.",
            &c.malformed,
        ),
        (
            "sluice_requests_refused_total",
            "Requests refused by session rules.",
            &c.session_refused,
        ),
        (
            "sluice_connections_refused_total",
            "Connections refused at the limit.",
            &c.connections_refused,
        ),
        (
            "sluice_connections_total",
            "Lender connections accepted.",
            &c.connections,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
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
    let held = sw.engine.order_count();
    let settled = sw.engine.settled_count();
    let _ = writeln!(
        out,
        "# HELP sluice_orders_held Orders in memory (idempotency retention), by form: live (in progress or within engine.order_detail_ms of final) or settled (compact).\n# TYPE sluice_orders_held gauge\nsluice_orders_held{{form=\"live\"}} {}\nsluice_orders_held{{form=\"settled\"}} {}",
        held.saturating_sub(settled),
        settled
    );
    let _ = writeln!(
        out,
        "# HELP sluice_sessions Logged-on lender sessions.\n# TYPE sluice_sessions gauge\nsluice_sessions {}\n# HELP sluice_requests_inflight Lender requests holding an in-flight slot.\n# TYPE sluice_requests_inflight gauge\nsluice_requests_inflight {}",
        sw.hub.sessions(),
        c.inflight.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP sluice_answers_total Answers and notifications carrying an order's or agreement's outcome, by message type, status and reason (a notification counts at each delivery).\n# TYPE sluice_answers_total counter"
    );
    for ((t, st, r), n) in sw.metrics.answers() {
        let _ = writeln!(
            out,
            "sluice_answers_total{{type=\"{t}\",status=\"{st}\",reason=\"{r}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP sluice_request_duration_us Lender request latency, decode to response written, µs.\n# TYPE sluice_request_duration_us histogram"
    );
    for (name, buckets, count, sum) in sw.metrics.lender_buckets() {
        for (le, n) in crate::metrics::LATENCY_BUCKETS_US.iter().zip(&buckets) {
            let _ = writeln!(
                out,
                "sluice_request_duration_us_bucket{{type=\"{name}\",le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "sluice_request_duration_us_bucket{{type=\"{name}\",le=\"+Inf\"}} {count}\nsluice_request_duration_us_sum{{type=\"{name}\"}} {sum}\nsluice_request_duration_us_count{{type=\"{name}\"}} {count}"
        );
    }
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
    let _ = writeln!(
        out,
        "# HELP sluice_channel_inflight Channel calls holding an in-flight slot.\n# TYPE sluice_channel_inflight gauge"
    );
    let mut ids: Vec<&ChannelId> = ctl.pools.keys().collect();
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    for id in ids {
        let _ = writeln!(
            out,
            "sluice_channel_inflight{{channel=\"{id}\"}} {}",
            ctl.pools[id].stats().inflight
        );
    }
    if let Some(j) = &ctl.journal {
        let st = j.stats();
        let _ = writeln!(
            out,
            "# HELP sluice_journal_queued_records Records queued for the journal writer or being written.\n# TYPE sluice_journal_queued_records gauge\nsluice_journal_queued_records {}\n# HELP sluice_journal_records_total Records written.\n# TYPE sluice_journal_records_total counter\nsluice_journal_records_total {}\n# HELP sluice_journal_fsync_seconds Time in fdatasync.\n# TYPE sluice_journal_fsync_seconds summary\nsluice_journal_fsync_seconds_sum {}\nsluice_journal_fsync_seconds_count {}\n# HELP sluice_journal_failed 1 when the journal writer has failed (fail-stop).\n# TYPE sluice_journal_failed gauge\nsluice_journal_failed {}",
            st.queued,
            st.records,
            st.fsync_us_total as f64 / 1e6,
            st.fsyncs,
            u8::from(j.failure().is_some())
        );
    }
    let (ready, _) = readiness(sw, ctl);
    let _ = writeln!(
        out,
        "# HELP sluice_ready 1 when /readyz answers 200.\n# TYPE sluice_ready gauge\nsluice_ready {}",
        u8::from(ready)
    );
    out
}
