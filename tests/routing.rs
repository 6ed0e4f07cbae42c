//! Routing against simulated channels over real TCP: a channel that starts answering
//! NOT_PROCESSED, slows past the deadline, or goes down loses new orders to the healthy
//! channel within a second; in-flight orders are never duplicated (checked on the
//! simulators' ledgers); traffic returns after the channel recovers (half-open probes).

mod common;

use std::time::{Duration, Instant};

use common::*;
use sluice::engine::order::AttemptOutcome;
use sluice::engine::route::Exclusion;
use sluice::health::{BreakerState, HealthConfig};
use sluice::message::{self as lm, Message, Reason, Status};
use sluice::sim::Latency;
use sluice::wire::header::MerchantNo;

fn limit<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(Duration::from_secs(60), f)
}

fn bed_config(deadline_ms: u64) -> BedConfig {
    let mut c = BedConfig {
        deadline: Duration::from_millis(deadline_ms),
        ..BedConfig::default()
    };
    c.engine.health = HealthConfig {
        window_ms: 2_000,
        consecutive_failures: 3,
        open_ms: 500,
        open_max_ms: 2_000,
        half_open_probes: 2,
        ..HealthConfig::default()
    };
    c
}

fn payout(order: &str) -> lm::PayoutReq {
    lm::PayoutReq {
        order_id: lm::OrderId::new(order).unwrap(),
        amount: lm::Fen(100),
        currency: lm::Currency,
        card_type: lm::CardType::Debit,
        bank_code: lm::BankCode::new("ICBC").unwrap(),
        card_no: lm::CardNo::new(CARD).unwrap(),
        name: lm::Name::new("李四").unwrap(),
        purpose: lm::Purpose::new("放款").unwrap(),
    }
}

fn key(order: &str) -> (MerchantNo, lm::OrderId) {
    (
        MerchantNo::new(MERCHANT).unwrap(),
        lm::OrderId::new(order).unwrap(),
    )
}

/// One payout: (status, reason, channel, attempts).
async fn pay(
    bed: &Bed,
    c: &sluice::client::Client,
    order: &str,
) -> (Status, Reason, String, usize) {
    let r = c.call(payout(order)).await.unwrap();
    let Message::PayoutRsp(p) = &r.msg else {
        panic!("{r:?}")
    };
    let attempts = bed
        .switch
        .switch
        .engine
        .order(&key(order))
        .map(|o| o.attempts.len())
        .unwrap_or(0);
    (
        p.result.status,
        p.result.reason,
        p.channel.as_str().to_string(),
        attempts,
    )
}

/// Every order executed at most once over all ledgers, on the channel of its successful
/// or pending attempt, and never on a channel that answered NOT_PROCESSED or was not sent.
fn assert_ledgers_consistent(bed: &Bed, orders: &[String]) {
    assert_eq!(bed.duplicates(), 0, "a simulator saw a duplicate");
    let ledger = bed.ledger();
    let engine = &bed.switch.switch.engine;
    let mut executed = 0;
    for o in orders {
        let order = engine.order(&key(o)).expect("order known");
        let mut entries_for_order = 0;
        for a in &order.attempts {
            let hits: Vec<_> = ledger
                .iter()
                .filter(|(_, e)| e.order_ref == a.order_ref)
                .collect();
            match a.outcome {
                AttemptOutcome::NotSent | AttemptOutcome::NotProcessed(_) => {
                    assert!(hits.is_empty(), "{o}: {a:?} reached a ledger: {hits:?}")
                }
                _ => {
                    for (ch, _) in &hits {
                        assert_eq!(ch, a.channel.as_str(), "{o}: executed elsewhere");
                    }
                }
            }
            entries_for_order += hits.len();
        }
        assert!(
            entries_for_order <= 1,
            "{o} executed {entries_for_order} times"
        );
        executed += entries_for_order;
    }
    assert_eq!(executed, ledger.len(), "ledger entries from unknown orders");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_processed_channel_loses_new_orders_within_a_second_and_regains_them() {
    limit(async {
        let bed = Bed::start_with(bed_config(2_000)).await;
        let c = bed.client().await;
        let mut orders = Vec::new();
        for i in 0..2 {
            let id = format!("W{i}");
            assert_eq!(
                pay(&bed, &c, &id).await,
                (Status::Success, Reason::OK, "CHA".into(), 1)
            );
            orders.push(id);
        }

        bed.set_profile("CHA", |p| p.not_processed_ratio = 1.0);
        let t0 = Instant::now();
        let mut failed_over = 0;
        let moved_after = loop {
            let id = format!("N{}", orders.len());
            let (status, _, ch, attempts) = pay(&bed, &c, &id).await;
            orders.push(id.clone());
            assert_eq!((status, ch.as_str()), (Status::Success, "CHB"), "{id}");
            if attempts == 1 {
                break t0.elapsed();
            }
            failed_over += 1;
            assert!(
                failed_over <= 3,
                "still trying CHA after {failed_over} failures"
            );
        };
        assert!(moved_after < Duration::from_secs(1), "{moved_after:?}");
        // CHA lost first place (its success rate fell, or its breaker opened); it stays a
        // fallback only while its breaker is closed.
        let last = orders.last().unwrap();
        let d = bed.switch.switch.engine.route_decision(&key(last)).unwrap();
        assert_eq!(d.candidates[0].as_str(), "CHB");
        assert!(
            d.candidates.len() == 2
                || d.excluded == vec![(d.excluded[0].0, Exclusion::BreakerOpen)],
            "{d:?}"
        );

        // Recovery: once the failures leave the window (or the breaker's open period
        // ends and its probes succeed), CHA gets its traffic back.
        bed.set_profile("CHA", |p| p.not_processed_ratio = 0.0);
        let t1 = Instant::now();
        let mut on_cha = 0;
        while on_cha < 4 {
            if t1.elapsed() >= Duration::from_secs(20) {
                let last = orders.last().unwrap();
                panic!(
                    "traffic did not return: last decision {:?}; health {:?}",
                    bed.switch.switch.engine.route_decision(&key(last)),
                    bed.switch
                        .switch
                        .engine
                        .health()
                        .snapshot(sluice::app::now_ms())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let id = format!("R{}", orders.len());
            let (status, _, ch, attempts) = pay(&bed, &c, &id).await;
            orders.push(id);
            assert_eq!(status, Status::Success);
            if ch == "CHA" {
                assert_eq!(attempts, 1);
                on_cha += 1;
            }
        }
        let snap = bed
            .switch
            .switch
            .engine
            .health()
            .snapshot(sluice::app::now_ms());
        let cha = snap.iter().find(|s| s.channel.as_str() == "CHA").unwrap();
        assert_eq!(cha.breaker, BreakerState::Closed);
        assert_ledgers_consistent(&bed, &orders);
        bed.switch.shutdown(Duration::from_secs(2)).await;
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_channel_keeps_its_pending_orders_and_new_orders_move() {
    limit(async {
        let bed = Bed::start_with(bed_config(300)).await;
        let c = bed.client().await;
        let mut orders: Vec<String> = Vec::new();
        assert_eq!(pay(&bed, &c, "W0").await.2, "CHA");
        orders.push("W0".into());

        bed.set_profile("CHA", |p| p.latency = Latency::Fixed { ms: 800.0 });
        let t0 = Instant::now();
        // Three at once: each times out on CHA and stays PENDING there.
        let (a, b, d) = tokio::join!(
            pay(&bed, &c, "S1"),
            pay(&bed, &c, "S2"),
            pay(&bed, &c, "S3")
        );
        for r in [&a, &b, &d] {
            assert_eq!(
                (r.0, r.1, r.2.as_str(), r.3),
                (Status::Pending, Reason::OUTCOME_UNKNOWN, "CHA", 1),
                "never sent elsewhere after a timeout"
            );
        }
        orders.extend(["S1", "S2", "S3"].map(String::from));
        let (status, _, ch, attempts) = pay(&bed, &c, "S4").await;
        orders.push("S4".into());
        assert_eq!((status, ch.as_str(), attempts), (Status::Success, "CHB", 1));
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());

        // CHA speeds up again: the pending orders settle there (queries), once each.
        bed.set_profile("CHA", |p| p.latency = Latency::Fixed { ms: 0.0 });
        let mut settled = std::collections::HashSet::new();
        while settled.len() < 3 {
            let n = c
                .next_notification(Duration::from_secs(10))
                .await
                .expect("pending orders notified");
            if n.order_id.as_str().starts_with('S') && n.order_id.as_str() != "S4" {
                assert_eq!(
                    (n.result.status, n.channel.as_str()),
                    (Status::Success, "CHA")
                );
                settled.insert(n.order_id.as_str().to_string());
            }
        }
        // And new orders return to CHA after its half-open probes.
        let t1 = Instant::now();
        loop {
            assert!(
                t1.elapsed() < Duration::from_secs(20),
                "traffic did not return"
            );
            let id = format!("R{}", orders.len());
            let (status, _, ch, _) = pay(&bed, &c, &id).await;
            orders.push(id);
            assert_eq!(status, Status::Success);
            let back = bed
                .switch
                .switch
                .engine
                .health()
                .snapshot(sluice::app::now_ms())
                .iter()
                .any(|s| s.channel.as_str() == "CHA" && s.breaker == BreakerState::Closed);
            if ch == "CHA" && back {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_ledgers_consistent(&bed, &orders);
        bed.switch.shutdown(Duration::from_secs(2)).await;
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_down_fails_over_unsent_orders_and_comes_back() {
    limit(async {
        let bed = Bed::start_with(bed_config(2_000)).await;
        let c = bed.client().await;
        let mut orders: Vec<String> = Vec::new();
        assert_eq!(pay(&bed, &c, "W0").await.2, "CHA");
        orders.push("W0".into());

        bed.set_profile("CHA", |p| p.down = true);
        let cha = sluice::message::ChannelId::new("CHA").unwrap();
        let pool = bed.switch.pools.get(&cha).unwrap().clone();
        while pool.ready() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t0 = Instant::now();
        let moved_after = loop {
            let id = format!("D{}", orders.len());
            let (status, _, ch, attempts) = pay(&bed, &c, &id).await;
            orders.push(id);
            assert_eq!((status, ch.as_str()), (Status::Success, "CHB"));
            if attempts == 1 {
                break t0.elapsed();
            }
            assert!(orders.len() < 10, "still trying CHA");
        };
        assert!(moved_after < Duration::from_secs(1), "{moved_after:?}");

        bed.set_profile("CHA", |p| p.down = false);
        tokio::time::timeout(Duration::from_secs(10), pool.wait_ready(1))
            .await
            .expect("CHA reconnects");
        let t1 = Instant::now();
        let mut on_cha = 0;
        while on_cha < 3 {
            assert!(
                t1.elapsed() < Duration::from_secs(8),
                "traffic did not return"
            );
            let id = format!("R{}", orders.len());
            let (status, _, ch, _) = pay(&bed, &c, &id).await;
            orders.push(id);
            assert_eq!(status, Status::Success);
            if ch == "CHA" {
                on_cha += 1;
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        assert_ledgers_consistent(&bed, &orders);
        let text = bed
            .switch
            .switch
            .engine
            .routing_metrics(sluice::app::now_ms())
            .render_metrics();
        assert!(text.contains("sluice_channel_breaker_opened_total{channel=\"CHA\"}"));
        bed.switch.shutdown(Duration::from_secs(2)).await;
    })
    .await
    .expect("bounded");
}
