//! The router inside the engine, without sockets: fund positions reserved, released and
//! spent per attempt; per-card daily counters; health fed by attempt outcomes opening the
//! breaker; the decision kept per order; routing metrics.

use sluice::channel::message::{self as ch, Code, Serial};
use sluice::engine::agreement::{
    Agreement, ChannelAgreement, ChannelAgreementState, CHANNELS_PER_AGREEMENT_MAX,
};
use sluice::engine::route::{Exclusion, FundConfig, Placement};
use sluice::engine::{
    Action, Actions, ChannelConfig, ChannelTable, Dispatch, DispatchResult, Engine, EngineConfig,
    Product, RoutingPolicy,
};
use sluice::health::{BreakerState, HealthConfig, Override};
use sluice::message::{self as lm, AgreementId, BankCode, CardType, ChannelId, Reason, Status};
use sluice::wire::field::Digits;
use sluice::wire::header::MerchantNo;

/// 2024-06-03 10:00 China time.
const T0: u64 = 1_717_380_000_000;

fn m() -> MerchantNo {
    MerchantNo::new("M1").unwrap()
}

fn id(s: &str) -> ChannelId {
    ChannelId::new(s).unwrap()
}

fn engine(table: Vec<ChannelConfig>) -> Engine {
    engine_with(table, RoutingPolicy::default())
}

fn engine_with(table: Vec<ChannelConfig>, routing: RoutingPolicy) -> Engine {
    Engine::new(
        EngineConfig {
            routing,
            health: HealthConfig {
                consecutive_failures: 3,
                open_ms: 1_000,
                half_open_probes: 1,
                ..HealthConfig::default()
            },
            ..EngineConfig::default()
        },
        ChannelTable { channels: table },
        &[7u8; 32],
        1000,
    )
}

fn payout(order: &str, amount: u64) -> lm::PayoutReq {
    lm::PayoutReq {
        order_id: lm::OrderId::new(order).unwrap(),
        amount: lm::Fen(amount),
        currency: lm::Currency,
        card_type: CardType::Debit,
        bank_code: BankCode::new("ICBC").unwrap(),
        card_no: lm::CardNo::new("6222021234567890128").unwrap(),
        name: lm::Name::new("李四").unwrap(),
        purpose: lm::Purpose::new("放款").unwrap(),
    }
}

fn debit(order: &str, a: AgreementId, amount: u64) -> lm::DebitReq {
    lm::DebitReq {
        order_id: lm::OrderId::new(order).unwrap(),
        agreement_id: a,
        amount: lm::Fen(amount),
        currency: lm::Currency,
        purpose: lm::Purpose::new("p").unwrap(),
    }
}

fn signed(e: &Engine, channels: &[&str]) -> AgreementId {
    let mut a = Agreement {
        id: e.new_agreement_id(),
        merchant: m(),
        card_hash: e.hasher().card("6222021234567890128"),
        id_hash: e.hasher().id("11010519491231002X"),
        card_last4: Digits::new("0128").unwrap(),
        bank: BankCode::new("ICBC").unwrap(),
        card_type: CardType::Debit,
        cancelled: false,
        channels: [None; CHANNELS_PER_AGREEMENT_MAX],
    };
    for c in channels {
        a.add_channel(ChannelAgreement {
            channel: id(c),
            agreement_no: ch::AgreementNo::new(&format!("{c}-1")).unwrap(),
            state: ChannelAgreementState::Active,
        });
    }
    e.agreements().upsert(a)
}

fn dispatches(a: &Actions) -> Vec<Dispatch> {
    a.iter()
        .filter_map(|x| match x {
            Action::Dispatch(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

fn answer(d: &Dispatch, code: Code) -> DispatchResult {
    let (code, class) = code.pair();
    let m: ch::Message = match &d.msg {
        ch::Message::PayReq(p) => ch::PayRsp {
            code,
            class,
            order_ref: p.order_ref,
            channel_serial: Serial::empty(),
            amount: p.amount.0,
            finished_at_ms: 1,
        }
        .into(),
        ch::Message::PayoutReq(p) => ch::PayoutRsp {
            code,
            class,
            order_ref: p.order_ref,
            channel_serial: Serial::empty(),
            amount: p.amount.0,
            finished_at_ms: 1,
        }
        .into(),
        other => panic!("{other:?}"),
    };
    DispatchResult::Answer(m)
}

/// Run an order to its end: answer each dispatch with the next code from `codes`.
fn run(e: &Engine, first: Actions, codes: &[Code], now: u64) -> (Vec<String>, Actions) {
    let mut channels = Vec::new();
    let mut acts = first;
    for code in codes {
        let d = dispatches(&acts);
        let Some(d) = d.first() else { break };
        channels.push(d.channel.as_str().to_string());
        acts = e.dispatch_result(&d.token, answer(d, *code), now);
    }
    (channels, acts)
}

fn reply_status(a: &Actions) -> Option<(Status, Reason)> {
    a.iter().find_map(|x| match x {
        Action::Reply(lm::Message::PayoutRsp(r)) => Some((r.result.status, r.result.reason)),
        Action::Reply(lm::Message::DebitRsp(r)) => Some((r.result.status, r.result.reason)),
        _ => None,
    })
}

fn key(order: &str) -> (MerchantNo, lm::OrderId) {
    (m(), lm::OrderId::new(order).unwrap())
}

fn funded(name: &str, fen: u64) -> ChannelConfig {
    let mut c = ChannelConfig::open(name);
    c.fund = Some(FundConfig {
        initial_fen: fen,
        alert_fen: fen / 2,
    });
    c
}

#[test]
fn fund_position_is_reserved_released_spent_and_steers_payouts() {
    let e = engine(vec![funded("A", 10_000), funded("B", 100_000)]);
    let avail = |c: &str| e.limits().fund_available(&id(c)).unwrap();

    // In flight: reserved on A.
    let acts = e.payout(m(), &payout("P1", 4_000), T0);
    assert_eq!(avail("A"), 6_000);
    // NOT_PROCESSED on A: released there, reserved on B; success spends it on B.
    let d = dispatches(&acts);
    let next = e.dispatch_result(&d[0].token, answer(&d[0], Code::BUSY), T0 + 5);
    assert_eq!((avail("A"), avail("B")), (10_000, 96_000));
    let d = dispatches(&next);
    assert_eq!(d[0].channel.as_str(), "B");
    let done = e.dispatch_result(&d[0].token, answer(&d[0], Code::OK), T0 + 9);
    assert_eq!(reply_status(&done), Some((Status::Success, Reason::OK)));
    let funds = e.limits().funds_snapshot();
    let b = funds.iter().find(|f| f.channel.as_str() == "B").unwrap();
    assert_eq!((b.balance_fen, b.reserved_fen), (96_000, 0));

    // A payout bigger than A's position goes to B, and the decision says why.
    let (chs, _) = run(
        &e,
        e.payout(m(), &payout("P2", 20_000), T0 + 10),
        &[Code::OK],
        T0 + 11,
    );
    assert_eq!(chs, vec!["B"]);
    let dec = e.route_decision(&key("P2")).expect("decision kept");
    assert_eq!(dec.candidates, vec![id("B")]);
    assert_eq!(dec.excluded, vec![(id("A"), Exclusion::FundLow)]);

    // A timeout keeps the reservation (PENDING); a decline releases it. (A's BUSY
    // lowered its success rate: B ranks first now.)
    let acts = e.payout(m(), &payout("P3", 1_000), T0 + 20);
    let d = dispatches(&acts);
    assert_eq!(d[0].channel.as_str(), "B");
    e.dispatch_result(&d[0].token, DispatchResult::Unknown, T0 + 30);
    assert_eq!(avail("B"), 75_000, "pending keeps the reservation");
    let (chs, acts) = run(
        &e,
        e.payout(m(), &payout("P4", 500), T0 + 40),
        &[Code::CARD_FROZEN],
        T0 + 41,
    );
    assert_eq!(chs, vec!["B"]);
    assert_eq!(reply_status(&acts).unwrap().0, Status::Failed);
    assert_eq!(avail("B"), 75_000, "decline released");

    // Operator top-up, metrics.
    e.limits().fund_top_up(&id("A"), 50_000).unwrap();
    assert_eq!(avail("A"), 60_000);
    let text = e.routing_metrics(T0 + 50).render_metrics();
    assert!(
        text.contains("sluice_channel_fund_fen{channel=\"B\",part=\"reserved\"} 1000"),
        "{text}"
    );
    assert!(
        text.contains("sluice_channel_volume_count{channel=\"B\",product=\"payout\"} 2"),
        "{text}"
    );
    assert!(
        text.contains(
            "sluice_channel_volume_fen{channel=\"B\",product=\"payout\",period=\"day\"} 24000"
        ),
        "{text}"
    );
}

#[test]
fn per_card_daily_limits_count_in_flight_and_release_declines() {
    let mut a = ChannelConfig::open("A");
    a.terms[Product::Debit.index()].card_daily_count = 2;
    a.terms[Product::Debit.index()].card_daily_amount_fen = 10_000;
    let e = engine(vec![a, ChannelConfig::open("B")]);
    let ag = signed(&e, &["A", "B"]);

    let (chs, _) = run(
        &e,
        e.debit(m(), &debit("D1", ag, 3_000), T0),
        &[Code::OK],
        T0,
    );
    assert_eq!(chs, vec!["A"]);
    // Declined: the card's count and amount are given back.
    let (chs, _) = run(
        &e,
        e.debit(m(), &debit("D2", ag, 3_000), T0),
        &[Code::INSUFFICIENT_FUNDS],
        T0,
    );
    assert_eq!(chs, vec!["A"]);
    // In flight (no answer yet) counts.
    let inflight = e.debit(m(), &debit("D3", ag, 3_000), T0);
    assert_eq!(dispatches(&inflight)[0].channel.as_str(), "A");
    // Third on A today: count limit → B.
    let (chs, _) = run(
        &e,
        e.debit(m(), &debit("D4", ag, 1), T0 + 1),
        &[Code::OK],
        T0 + 1,
    );
    assert_eq!(chs, vec!["B"]);
    let dec = e.route_decision(&key("D4")).unwrap();
    assert_eq!(dec.excluded, vec![(id("A"), Exclusion::DailyCountLimit)]);
    // Next local day (China time): A again.
    let tomorrow = T0 + 86_400_000;
    let (chs, _) = run(
        &e,
        e.debit(m(), &debit("D5", ag, 9_000), tomorrow),
        &[Code::OK],
        tomorrow,
    );
    assert_eq!(chs, vec!["A"]);
    // Amount limit: 9 000 + 2 000 > 10 000.
    let (chs, _) = run(
        &e,
        e.debit(m(), &debit("D6", ag, 2_000), tomorrow),
        &[Code::OK],
        tomorrow,
    );
    assert_eq!(chs, vec!["B"]);
    assert_eq!(
        e.route_decision(&key("D6")).unwrap().excluded,
        vec![(id("A"), Exclusion::DailyAmountLimit)]
    );
}

#[test]
fn channel_failures_open_the_breaker_and_probes_bring_traffic_back() {
    // Only the breaker moves traffic here (the score ignores the success rate).
    let mut p = RoutingPolicy::default();
    p.weights.stability = 0.0;
    let e = engine_with(vec![ChannelConfig::open("A"), ChannelConfig::open("B")], p);
    // Card declines are not the channel's fault: the breaker stays closed.
    for i in 0..5 {
        let (chs, _) = run(
            &e,
            e.payout(m(), &payout(&format!("X{i}"), 1), T0),
            &[Code::INSUFFICIENT_FUNDS],
            T0,
        );
        assert_eq!(chs, vec!["A"]);
    }
    // Three NOT_PROCESSED in a row: each fails over to B, then A's breaker opens.
    for i in 0..3 {
        let (chs, acts) = run(
            &e,
            e.payout(m(), &payout(&format!("N{i}"), 1), T0 + 10),
            &[Code::BUSY, Code::OK],
            T0 + 10,
        );
        assert_eq!(chs, vec!["A", "B"]);
        assert_eq!(reply_status(&acts), Some((Status::Success, Reason::OK)));
    }
    let snap = e.health().snapshot(T0 + 10);
    assert!(
        matches!(snap[0].breaker, BreakerState::Open { .. }),
        "{snap:?}"
    );
    let (chs, _) = run(
        &e,
        e.payout(m(), &payout("N3", 1), T0 + 20),
        &[Code::OK],
        T0 + 20,
    );
    assert_eq!(chs, vec!["B"], "A skipped while open");
    assert_eq!(
        e.route_decision(&key("N3")).unwrap().excluded,
        vec![(id("A"), Exclusion::BreakerOpen)]
    );
    // After open_ms: half-open, one probe goes to A first; its success closes the breaker.
    let later = T0 + 10 + 1_000;
    let (chs, _) = run(
        &e,
        e.payout(m(), &payout("H1", 1), later),
        &[Code::OK],
        later,
    );
    assert_eq!(chs, vec!["A"]);
    assert_eq!(
        e.route_decision(&key("H1")).unwrap().ranked[0].placement,
        Placement::Probe
    );
    assert_eq!(e.health().snapshot(later)[0].breaker, BreakerState::Closed);
    let (chs, _) = run(
        &e,
        e.payout(m(), &payout("H2", 1), later),
        &[Code::OK],
        later,
    );
    assert_eq!(chs, vec!["A"]);

    // Timeouts count as channel failures but never fail over (rule 2).
    for i in 0..3 {
        let acts = e.payout(m(), &payout(&format!("T{i}"), 1), later + 1);
        let d = dispatches(&acts);
        assert_eq!(d[0].channel.as_str(), "A");
        let after = e.dispatch_result(&d[0].token, DispatchResult::Unknown, later + 2);
        assert!(dispatches(&after).is_empty(), "PENDING, queried on A only");
        assert_eq!(
            reply_status(&after),
            Some((Status::Pending, Reason::OUTCOME_UNKNOWN))
        );
    }
    assert!(matches!(
        e.health().snapshot(later + 2)[0].breaker,
        BreakerState::Open { .. }
    ));

    // Operator override "on" uses A despite its open breaker; "off" closes B for payouts.
    assert!(e.set_override(&id("A"), Product::Payout, Override::On));
    assert!(e.set_override(&id("B"), Product::Payout, Override::Off));
    let (chs, _) = run(
        &e,
        e.payout(m(), &payout("O1", 1), later + 3),
        &[Code::OK],
        later + 3,
    );
    assert_eq!(chs, vec!["A"]);
    assert_eq!(
        e.route_decision(&key("O1")).unwrap().excluded,
        vec![(id("B"), Exclusion::OperatorOff)]
    );
    let text = e.routing_metrics(later + 3).render_metrics();
    assert!(
        text.contains("sluice_channel_breaker_state{channel=\"A\"} 1"),
        "{text}"
    );
    assert!(text.contains("sluice_channel_operator_override{channel=\"B\",product=\"payout\"} 1"));
}

#[test]
fn no_eligible_channel_rejects_with_no_channel_and_keeps_no_decision() {
    let mut a = ChannelConfig::open("A");
    a.terms[Product::Payout.index()].max_amount_fen = 100;
    let e = engine(vec![a]);
    let acts = e.payout(m(), &payout("BIG", 101), T0);
    assert_eq!(
        reply_status(&acts),
        Some((Status::Rejected, Reason::NO_CHANNEL))
    );
    assert!(dispatches(&acts).is_empty());
    assert!(
        e.route_decision(&key("BIG")).is_none(),
        "not accepted, nothing kept"
    );
}
