//! Measurements and their presentation: HDR histograms of latency (from the scheduled
//! send time) and of service time (from the actual send), counts by status and reason,
//! the end-of-run table, the JSON report, and an SVG latency-by-percentile plot in the
//! usual HdrHistogram shape (x: percentile on a log scale of 1 / (1 - p)).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded, ns (2 minutes; anything slower is clamped and still counted).
pub const LATENCY_NS_MAX: u64 = 120_000_000_000;

/// A fresh latency histogram: 1 ns .. 2 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid histogram bounds")
}

/// Record `ns`, clamped into range.
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns.clamp(1, LATENCY_NS_MAX));
}

/// The usual latency quantiles, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Values recorded.
    pub count: u64,
    /// Mean, µs.
    pub mean: f64,
    /// Median, µs.
    pub p50: f64,
    /// 90th percentile, µs.
    pub p90: f64,
    /// 99th percentile, µs.
    pub p99: f64,
    /// 99.9th percentile, µs.
    pub p999: f64,
    /// Maximum, µs.
    pub max: f64,
}

impl Summary {
    /// Summarise a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Summary {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// Percentile curve points: (percentile in %, µs), 1 - p spaced evenly on a log scale
/// from 0 % to 99.9999 %, then the maximum.
pub fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut v: Vec<(f64, f64)> = (0..=60)
        .map(|k| {
            let q = 1.0 - 10f64.powf(-(k as f64) / 10.0);
            (q * 100.0, h.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect();
    v.push((100.0, h.max() as f64 / 1000.0));
    v
}

/// Everything one run measured, as written to the JSON report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Free label (the script names each run).
    pub label: String,
    /// `sluice` or `echo`.
    pub target: String,
    /// Address driven.
    pub addr: String,
    /// `open` or `closed`.
    pub mode: String,
    /// Persistent connections.
    pub connections: usize,
    /// Closed loop: requests in flight per connection.
    pub window: usize,
    /// Open loop: target rate, sends per second.
    pub rate_per_s: f64,
    /// Ramp, seconds (not counted in the summary).
    pub ramp_s: f64,
    /// Measured window after the ramp, seconds.
    pub measured_s: f64,
    /// Operation mix, e.g. `debit=100`.
    pub mix: String,
    /// Merchant numbers used.
    pub merchants: usize,
    /// Requests sent in the measured window.
    pub sent: u64,
    /// Answers received for them (any status).
    pub completed: u64,
    /// Calls that got no answer (timeout, connection closed) or were still open at the end.
    pub errors: u64,
    /// Completed per second of measured window.
    pub throughput_per_s: f64,
    /// Latency from the scheduled send time (open loop) or the send (closed loop).
    pub latency_us: Summary,
    /// Latency from the moment the frame was handed to the connection.
    pub service_us: Summary,
    /// Answers by `STATUS/REASON` (or the echoed message type, or the error).
    pub counts: BTreeMap<String, u64>,
    /// Latency by percentile (see [`curve`]).
    pub curve: Vec<(f64, f64)>,
}

fn fmt_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// Thousands separators for a count.
pub fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Report {
    /// The end-of-run table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let how = if self.mode == "open" {
            format!("open loop at {}/s", grouped(self.rate_per_s as u64))
        } else {
            format!("closed loop, window {}", self.window)
        };
        let _ = writeln!(
            s,
            "{} — {} {} ({}), {} connections, {} merchants, mix {}",
            self.label, self.target, self.addr, how, self.connections, self.merchants, self.mix
        );
        let _ = writeln!(
            s,
            "  throughput {:>12}/s   sent {}  completed {}  errors {}  over {:.1} s",
            grouped(self.throughput_per_s as u64),
            grouped(self.sent),
            grouped(self.completed),
            grouped(self.errors),
            self.measured_s
        );
        let _ = writeln!(
            s,
            "  {:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "", "p50", "p90", "p99", "p99.9", "max", "mean"
        );
        for (name, m) in [("latency", &self.latency_us), ("service", &self.service_us)] {
            let _ = writeln!(
                s,
                "  {:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                name,
                fmt_us(m.p50),
                fmt_us(m.p90),
                fmt_us(m.p99),
                fmt_us(m.p999),
                fmt_us(m.max),
                fmt_us(m.mean)
            );
        }
        for (k, v) in &self.counts {
            let _ = writeln!(s, "  {k:<40} {:>12}", grouped(*v));
        }
        s
    }
}

/// Markdown table of several reports (BENCHMARKS.md).
pub fn markdown(reports: &[Report]) -> String {
    let mut s = String::from(
        "| run | mode | conns | rate or window | throughput/s | p50 | p90 | p99 | p99.9 | max | answers |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let load = if r.mode == "open" {
            format!("{}/s", grouped(r.rate_per_s as u64))
        } else {
            format!("window {}", r.window)
        };
        let counts: Vec<String> = r
            .counts
            .iter()
            .map(|(k, v)| format!("{k} {}", grouped(*v)))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            r.mode,
            r.connections,
            load,
            grouped(r.throughput_per_s as u64),
            fmt_us(r.latency_us.p50),
            fmt_us(r.latency_us.p90),
            fmt_us(r.latency_us.p99),
            fmt_us(r.latency_us.p999),
            fmt_us(r.latency_us.max),
            counts.join(", ")
        );
    }
    s
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// SVG plot of latency by percentile for one or more runs (log-log, like HdrHistogram's
/// plotter).
pub fn svg(title: &str, reports: &[Report]) -> String {
    let (w, h, ml, mr, mt, mb) = (960.0, 540.0, 80.0, 260.0, 40.0, 60.0);
    let pw = w - ml - mr;
    let ph = h - mt - mb;
    let x_of = |pct: f64| -> f64 {
        let tail = (1.0 - pct / 100.0).max(1e-6);
        (-tail.log10()).clamp(0.0, 6.0) / 6.0 * pw + ml
    };
    let all: Vec<f64> = reports
        .iter()
        .flat_map(|r| r.curve.iter().map(|p| p.1.max(1.0)))
        .collect();
    let lo = all.iter().cloned().fold(f64::MAX, f64::min).max(1.0);
    let hi = all.iter().cloned().fold(1.0, f64::max);
    let (y0, y1) = (
        lo.log10().floor(),
        (hi.log10().ceil()).max(lo.log10().floor() + 1.0),
    );
    let y_of = |us: f64| -> f64 { mt + ph - (us.max(1.0).log10() - y0) / (y1 - y0) * ph };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="15" text-anchor="middle">{}</text>"#,
        ml + pw / 2.0,
        xml(title)
    );
    for (k, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"]
        .iter()
        .enumerate()
    {
        let x = ml + k as f64 / 6.0 * pw;
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{mt}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            mt + ph,
            mt + ph + 18.0
        );
    }
    let mut e = y0;
    while e <= y1 {
        let y = y_of(10f64.powf(e));
        let us = 10f64.powf(e);
        let label = if us >= 1000.0 {
            format!("{} ms", us / 1000.0)
        } else {
            format!("{us} µs")
        };
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{label}</text>"##,
            ml + pw,
            ml - 6.0,
            y + 4.0
        );
        e += 1.0;
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text><text x="18" y="{}" transform="rotate(-90 18 {})" text-anchor="middle">latency (log)</text>"#,
        ml + pw / 2.0,
        h - 16.0,
        mt + ph / 2.0,
        mt + ph / 2.0
    );
    for (i, r) in reports.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<String> = r
            .curve
            .iter()
            .map(|(p, us)| format!("{:.1},{:.1}", x_of(*p), y_of(*us)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        let ly = mt + 14.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="14" height="4" fill="{c}"/><text x="{}" y="{}">{}</text>"#,
            ml + pw + 12.0,
            ly - 4.0,
            ml + pw + 32.0,
            ly,
            xml(&r.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut h = histogram();
        for us in 1..=1000u64 {
            record(&mut h, us * 1000);
        }
        let mut counts = BTreeMap::new();
        counts.insert("SUCCESS/OK".to_string(), 990);
        counts.insert("REJECTED/UNKNOWN_AGREEMENT".to_string(), 10);
        Report {
            label: "echo <direct>".into(),
            target: "echo".into(),
            addr: "127.0.0.1:7600".into(),
            mode: "open".into(),
            connections: 8,
            rate_per_s: 50_000.0,
            measured_s: 10.0,
            mix: "debit=100".into(),
            merchants: 4,
            sent: 1000,
            completed: 1000,
            throughput_per_s: 100.0,
            latency_us: Summary::of(&h),
            service_us: Summary::of(&h),
            counts,
            curve: curve(&h),
            ..Report::default()
        }
    }

    #[test]
    fn summary_quantiles_in_microseconds() {
        let r = sample();
        assert_eq!(r.latency_us.count, 1000);
        assert!(
            (r.latency_us.p50 - 500.0).abs() <= 1.0,
            "{:?}",
            r.latency_us
        );
        assert!((r.latency_us.p99 - 990.0).abs() <= 1.0);
        assert!((r.latency_us.max - 1000.0).abs() <= 1.0);
        assert_eq!(r.curve.first().map(|p| p.0), Some(0.0));
        assert_eq!(r.curve.last().map(|p| p.0), Some(100.0));
    }

    #[test]
    fn table_markdown_and_svg_render() {
        let r = sample();
        let t = r.table();
        assert!(t.contains("open loop at 50,000/s"), "{t}");
        assert!(t.contains("REJECTED/UNKNOWN_AGREEMENT"), "{t}");
        assert!(t.contains("500 µs"), "{t}");
        let md = markdown(std::slice::from_ref(&r));
        assert!(md
            .lines()
            .nth(2)
            .unwrap()
            .starts_with("| echo <direct> | open | 8 | 50,000/s"));
        let svg = svg("t", &[r.clone(), r]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("echo &lt;direct&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        let json = serde_json::to_string(&sample()).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.latency_us, sample().latency_us);
    }

    #[test]
    fn grouping() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(1234567), "1,234,567");
        assert_eq!(grouped(100), "100");
    }
}
