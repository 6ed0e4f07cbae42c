//! Cost of one routing decision, against the naive alternative.
//!
//! - `route/pure`: [`sluice::engine::route::route`] over 4 channels with realistic terms
//!   (bank lists, fee tiers, a 17:00–21:00 payout window, holidays, card daily limits, a
//!   fund position) and a prepared state snapshot;
//! - `route/engine_preview`: the same through the engine, including the snapshot it takes
//!   (health locks, card counters, fund positions) — what a payout pays;
//! - `route/naive`: the straightforward design — string ids and hash maps, windows and
//!   dates parsed and formatted per decision, health computed from the raw outcomes of
//!   the window (filter, collect, sort for the percentile) under a global mutex, string
//!   exclusion reasons.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use sluice::engine::route::{
    self, ChannelState, ChannelTable, FeeModel, FeeTier, FundConfig, Request, RoutingPolicy, Window,
};
use sluice::engine::{ChannelConfig, Engine, EngineConfig, Product};
use sluice::health::{BreakerState, HealthView, Observation};
use sluice::message::{BankCode, CardType};
use sluice::wire::header::MerchantNo;

/// 2024-06-03 10:00 China time.
const NOW: u64 = 1_717_380_000_000;
const BANKS: [&str; 10] = [
    "ICBC", "ABC", "BOC", "CCB", "CMB", "BOCOM", "CIB", "SPDB", "CMBC", "PSBC",
];

fn table() -> ChannelTable {
    let mut channels = Vec::new();
    for (i, name) in ["CHA", "CHB", "CHC", "CHD"].iter().enumerate() {
        let mut c = ChannelConfig::open(name);
        if i % 2 == 1 {
            c.banks = BANKS.iter().map(|b| BankCode::new(b).unwrap()).collect();
        }
        c.holidays = (0..10)
            .map(|d| route::parse_date("2024-10-01").unwrap() + d)
            .collect();
        let p = &mut c.terms[Product::Payout.index()];
        p.max_amount_fen = 5_000_000;
        p.card_daily_amount_fen = 20_000_000;
        p.card_daily_count = 10;
        p.closed = vec![Window::parse("17:00", "21:00").unwrap()];
        p.holiday_closed = true;
        p.fee = FeeModel {
            fixed_fen: 100 + i as u64,
            rate_ppm: 1_000,
            min_fen: 100,
            max_fen: 2_500,
            tiers: vec![FeeTier {
                from_month_fen: 100_000_000,
                rate_ppm: 800,
            }],
        };
        if i < 2 {
            c.fund = Some(FundConfig {
                initial_fen: 1_000_000_000,
                alert_fen: 10_000_000,
            });
        }
        channels.push(c);
    }
    ChannelTable { channels }
}

fn states() -> Vec<ChannelState> {
    (0..4)
        .map(|i| ChannelState {
            health: HealthView {
                breaker: BreakerState::Closed,
                success_ppm: 990_000 - i * 1_000,
                calls: 200,
                latency_ms_p90: Some(40 + i * 10),
            },
            card_day_fen: 10_000,
            card_day_count: 1,
            month_volume_fen: 200_000_000,
            fund_available_fen: (i < 2).then_some(500_000_000),
            ..ChannelState::default()
        })
        .collect()
}

fn request() -> Request<'static> {
    Request {
        product: Product::Payout,
        merchant: MerchantNo::new("898100000000001").unwrap(),
        amount_fen: 300_000,
        bank: BankCode::new("CMB").unwrap(),
        card_type: CardType::Debit,
        agreement: None,
        now_ms: NOW,
        explore: 123_456_789,
    }
}

mod naive {
    use super::*;

    pub struct Channel {
        pub id: String,
        pub enabled: bool,
        pub products: Vec<String>,
        pub banks: Vec<String>,
        pub card_types: Vec<String>,
        pub max_amount: u64,
        pub daily_amount: u64,
        pub daily_count: u32,
        pub fee_fixed: u64,
        pub fee_rate_ppm: u32,
        pub fee_min: u64,
        pub fee_max: u64,
        pub tiers: Vec<(u64, u32)>,
        pub closed: Vec<(String, String)>,
        pub holidays: Vec<String>,
        pub fund: Option<i64>,
        pub priority: u32,
    }

    /// (time ms, ok, latency ms) samples of one channel.
    pub type Samples = VecDeque<(u64, bool, u64)>;
    /// (card, channel, date) → (amount, count).
    pub type Daily = HashMap<(String, String, String), (u64, u32)>;

    pub struct World {
        pub channels: Vec<Channel>,
        /// Per channel: (time ms, ok, latency ms) of the last 30 s.
        pub health: Mutex<HashMap<String, Samples>>,
        /// (card, channel, date) → (amount, count).
        pub daily: Mutex<Daily>,
        pub month_volume: Mutex<HashMap<String, u64>>,
    }

    fn date(now_ms: u64) -> (String, String) {
        let local = now_ms as i64 + 480 * 60_000;
        let day = local.div_euclid(86_400_000);
        let (y, m, d) = route::civil_from_days(day);
        let min = local.rem_euclid(86_400_000) / 60_000;
        (
            format!("{y:04}-{m:02}-{d:02}"),
            format!("{:02}:{:02}", min / 60, min % 60),
        )
    }

    pub fn route(
        w: &World,
        product: &str,
        bank: &str,
        card_type: &str,
        card: &str,
        amount: u64,
        now_ms: u64,
    ) -> (Vec<String>, Vec<(String, String)>) {
        let (today, hhmm) = date(now_ms);
        let mut excluded = Vec::new();
        let mut scored: Vec<(String, f64, u32)> = Vec::new();
        let health = w.health.lock().unwrap();
        let daily = w.daily.lock().unwrap();
        let volume = w.month_volume.lock().unwrap();
        for c in &w.channels {
            let why = if !c.enabled {
                Some("disabled")
            } else if !c.products.iter().any(|p| p == product) {
                Some("product unsupported")
            } else if !c.banks.is_empty() && !c.banks.iter().any(|b| b == bank) {
                Some("bank unsupported")
            } else if !c.card_types.iter().any(|t| t == card_type) {
                Some("card type unsupported")
            } else if c.max_amount > 0 && amount > c.max_amount {
                Some("amount above max")
            } else if c.holidays.contains(&today) {
                Some("holiday")
            } else if c.closed.iter().any(|(f, t)| {
                if f <= t {
                    hhmm >= *f && hhmm < *t
                } else {
                    hhmm >= *f || hhmm < *t
                }
            }) {
                Some("window closed")
            } else {
                let (a, n) = daily
                    .get(&(card.to_string(), c.id.clone(), today.clone()))
                    .copied()
                    .unwrap_or((0, 0));
                if c.daily_amount > 0 && a + amount > c.daily_amount {
                    Some("daily amount")
                } else if c.daily_count > 0 && n >= c.daily_count {
                    Some("daily count")
                } else if c.fund.is_some_and(|f| f < amount as i64) {
                    Some("fund low")
                } else {
                    None
                }
            };
            if let Some(why) = why {
                excluded.push((c.id.clone(), why.to_string()));
                continue;
            }
            let samples = health.get(&c.id);
            let recent: Vec<&(u64, bool, u64)> = samples
                .map(|s| s.iter().filter(|x| x.0 + 30_000 > now_ms).collect())
                .unwrap_or_default();
            let ok = recent.iter().filter(|x| x.1).count() as f64;
            let success = (ok + 5.0) / (recent.len() as f64 + 5.0);
            let mut lat: Vec<u64> = recent.iter().map(|x| x.2).collect();
            lat.sort_unstable();
            let p90 = lat
                .get((lat.len() * 9 / 10).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or(200) as f64;
            let month = volume.get(&c.id).copied().unwrap_or(0);
            let rate = c
                .tiers
                .iter()
                .rev()
                .find(|t| month >= t.0)
                .map(|t| t.1)
                .unwrap_or(c.fee_rate_ppm);
            let fee = (c.fee_fixed + (amount * rate as u64).div_ceil(1_000_000))
                .max(c.fee_min)
                .min(c.fee_max) as f64;
            let score = 1000.0 * success + 100.0 * 200.0 / (200.0 + p90) + 10.0 * 100.0 / fee;
            scored.push((c.id.clone(), score, c.priority));
        }
        scored.sort_by(|a, b| {
            (b.1 / 5.0)
                .floor()
                .partial_cmp(&(a.1 / 5.0).floor())
                .unwrap()
                .then(a.2.cmp(&b.2))
                .then(b.1.partial_cmp(&a.1).unwrap())
        });
        (scored.into_iter().map(|s| s.0).collect(), excluded)
    }

    pub fn world() -> World {
        let t = super::table();
        let mut health = HashMap::new();
        let mut daily = HashMap::new();
        let mut volume = HashMap::new();
        for (i, c) in t.channels.iter().enumerate() {
            let id = c.id.as_str().to_string();
            let samples: VecDeque<_> = (0..200u64)
                .map(|k| {
                    (
                        NOW - 29_000 + k * 100,
                        k % 100 != 0,
                        30 + (k * 7 + i as u64) % 40,
                    )
                })
                .collect();
            health.insert(id.clone(), samples);
            daily.insert(
                (
                    "6222021234567890128".to_string(),
                    id.clone(),
                    "2024-06-03".to_string(),
                ),
                (10_000, 1),
            );
            volume.insert(id, 200_000_000);
        }
        World {
            channels: t
                .channels
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let p = c.terms(Product::Payout);
                    Channel {
                        id: c.id.as_str().to_string(),
                        enabled: true,
                        products: vec!["debit".into(), "payout".into(), "sign".into()],
                        banks: c.banks.iter().map(|b| b.as_str().to_string()).collect(),
                        card_types: vec!["debit".into(), "credit".into()],
                        max_amount: p.max_amount_fen,
                        daily_amount: p.card_daily_amount_fen,
                        daily_count: p.card_daily_count,
                        fee_fixed: p.fee.fixed_fen,
                        fee_rate_ppm: p.fee.rate_ppm,
                        fee_min: p.fee.min_fen,
                        fee_max: p.fee.max_fen,
                        tiers: p
                            .fee
                            .tiers
                            .iter()
                            .map(|t| (t.from_month_fen, t.rate_ppm))
                            .collect(),
                        closed: vec![("17:00".into(), "21:00".into())],
                        holidays: (1..=10).map(|d| format!("2024-10-{d:02}")).collect(),
                        fund: (i < 2).then_some(500_000_000),
                        priority: 100,
                    }
                })
                .collect(),
            health: Mutex::new(health),
            daily: Mutex::new(daily),
            month_volume: Mutex::new(volume),
        }
    }
}

fn bench(c: &mut Criterion) {
    let t = table();
    let st = states();
    let policy = RoutingPolicy {
        explore_ppm: 10_000,
        ..RoutingPolicy::default()
    };
    let req = request();
    let d = route::route(&req, &t, &policy, &st);
    assert_eq!(d.candidates.len(), 4, "{d:?}");

    let engine = Engine::new(EngineConfig::default(), t.clone(), &[7u8; 32], 1);
    let card = engine.hasher().card("6222021234567890128");
    for (i, ch) in t.channels.iter().enumerate() {
        for k in 0..200u64 {
            engine.health().record(
                &ch.id,
                Observation::Ok {
                    latency_ms: 30 + (k * 7 + i as u64) % 40,
                },
                NOW - 29_000 + k * 100,
            );
        }
    }
    assert_eq!(engine.route_preview(&req, Some(&card)).candidates.len(), 4);

    let world = naive::world();
    let (n, _) = naive::route(
        &world,
        "payout",
        "CMB",
        "debit",
        "6222021234567890128",
        300_000,
        NOW,
    );
    assert_eq!(n.len(), 4);

    let mut g = c.benchmark_group("route");
    g.bench_function("pure", |b| {
        b.iter(|| route::route(black_box(&req), &t, &policy, black_box(&st)))
    });
    g.bench_function("engine_preview", |b| {
        b.iter(|| engine.route_preview(black_box(&req), Some(&card)))
    });
    g.bench_function("naive", |b| {
        b.iter(|| {
            naive::route(
                &world,
                black_box("payout"),
                "CMB",
                "debit",
                "6222021234567890128",
                black_box(300_000),
                NOW,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
