//! Reconciliation with seeded differences: a statement written by the simulator's own
//! ledger code against sluice's journal.

use std::path::Path;

use sluice::channel::message::{self as ch, OrderRef, Serial};
use sluice::channel::Code;
use sluice::engine::agreement::{
    Agreement, ChannelAgreement, ChannelAgreementState, CHANNELS_PER_AGREEMENT_MAX,
};
use sluice::engine::{
    Action, ChannelConfig, ChannelTable, DispatchResult, Engine, EngineConfig, Record,
};
use sluice::journal::{self, Journal, JournalConfig};
use sluice::message::{self as lm, AgreementId, BankCode, CardType, ChannelId, OrderType};
use sluice::recon::{self, Class};
use sluice::sim::ledger::{cst_day, EntryState, Ledger, LedgerEntry};
use sluice::wire::field::Digits;
use sluice::wire::header::MerchantNo;

const M: &str = "898100000000001";
/// 2024-01-02 10:00 China time.
const T0: u64 = 1_704_160_800_000;

fn setup(dir: &Path) -> (Engine, Journal) {
    let (j, r) = journal::open(JournalConfig::new(dir)).unwrap();
    let e = Engine::new(
        EngineConfig::default(),
        ChannelTable {
            channels: vec![ChannelConfig::open("CHA")],
        },
        &[9u8; 32],
        1,
    );
    r.apply(&e, T0).unwrap();
    let mut a = Agreement {
        id: AgreementId(1),
        merchant: MerchantNo::new(M).unwrap(),
        card_hash: [1; 16],
        id_hash: [2; 16],
        card_last4: Digits::new("0128").unwrap(),
        bank: BankCode::new("ICBC").unwrap(),
        card_type: CardType::Debit,
        cancelled: false,
        channels: [None; CHANNELS_PER_AGREEMENT_MAX],
    };
    a.add_channel(ChannelAgreement {
        channel: ChannelId::new("CHA").unwrap(),
        agreement_no: ch::AgreementNo::new("A-1").unwrap(),
        state: ChannelAgreementState::Active,
    });
    j.append_blocking(&Record::Agreement(Box::new(a.clone())))
        .unwrap();
    e.agreements().upsert(a);
    (e, j)
}

/// Debit `order` for `amount`; answer it with `code` (or leave it in flight). Returns its
/// order reference.
fn order(
    e: &Engine,
    j: &Journal,
    order: &str,
    amount: u64,
    code: Option<Code>,
    at_ms: u64,
) -> OrderRef {
    let req = lm::DebitReq {
        order_id: lm::OrderId::new(order).unwrap(),
        agreement_id: AgreementId(1),
        amount: lm::Fen(amount),
        currency: lm::Currency,
        purpose: lm::Purpose::new("还款").unwrap(),
    };
    let mut dispatch = None;
    for a in e.debit(MerchantNo::new(M).unwrap(), &req, at_ms) {
        match a {
            Action::Journal(r) => j.append_blocking(&r).unwrap(),
            Action::Dispatch(d) => dispatch = Some(d),
            _ => {}
        }
    }
    let d = dispatch.unwrap();
    let r = *d.msg.order_ref().unwrap();
    let result = match code {
        Some(c) => {
            let (code, class) = c.pair();
            DispatchResult::Answer(
                ch::PayRsp {
                    code,
                    class,
                    order_ref: r,
                    channel_serial: Serial::new("X").unwrap(),
                    amount,
                    finished_at_ms: at_ms,
                }
                .into(),
            )
        }
        None => DispatchResult::Unknown,
    };
    for a in e.dispatch_result(&d.token, result, at_ms + 5) {
        if let Action::Journal(r) = a {
            j.append_blocking(&r).unwrap();
        }
    }
    r
}

fn entry(r: &OrderRef, amount: u64, code: Code, at_ms: u64) -> LedgerEntry {
    LedgerEntry {
        order_ref: *r,
        kind: OrderType::Debit,
        amount_fen: amount,
        serial: format!("SER-{r}"),
        card_key: String::new(),
        received_at_ms: at_ms,
        state: EntryState::Final {
            code,
            finished_at_ms: at_ms + 3,
        },
        duplicates: 0,
    }
}

#[test]
fn seeded_differences_are_each_found_and_written_for_machines() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    let (e, j) = setup(&jdir);
    let mut ledger = Ledger::default();
    // 20 clean orders, successes and declines.
    for i in 0..20u64 {
        let code = if i % 4 == 0 {
            Code::INSUFFICIENT_FUNDS
        } else {
            Code::OK
        };
        let r = order(&e, &j, &format!("OK-{i}"), 100 + i, Some(code), T0 + i);
        ledger.insert(entry(&r, 100 + i, code, T0 + i));
    }
    // Amount mismatch: the channel moved a different amount.
    let r = order(&e, &j, "AMT", 500, Some(Code::OK), T0 + 100);
    ledger.insert(entry(&r, 5000, Code::OK, T0 + 100));
    // Status mismatch: sluice holds FAILED, the channel says SUCCESS.
    let r = order(
        &e,
        &j,
        "STAT",
        700,
        Some(Code::INSUFFICIENT_FUNDS),
        T0 + 200,
    );
    ledger.insert(entry(&r, 700, Code::OK, T0 + 200));
    // "Abnormal success": sluice still PENDING (no answer), channel SUCCESS.
    let r = order(&e, &j, "PEND", 800, None, T0 + 300);
    ledger.insert(entry(&r, 800, Code::OK, T0 + 300));
    // Missing at the channel: final at sluice, not on the statement.
    order(&e, &j, "GONE", 900, Some(Code::OK), T0 + 400);
    // Missing in sluice: a reference sluice never sent.
    ledger.insert(entry(
        &OrderRef::new("ZZ-UNKNOWN").unwrap(),
        42,
        Code::OK,
        T0 + 500,
    ));
    j.close().unwrap();

    let day = cst_day(T0);
    let stmt = dir.path().join("CHA-2024-01-02.txt");
    ledger.write_statement(&stmt, "SLUICE01", day).unwrap();
    let out = dir.path().join("diff.csv");
    let rep = recon::run(&jdir, "CHA", "2024-01-02", &stmt, &out).unwrap();
    let count = |c| rep.of(c).count();
    assert_eq!(count(Class::Matched), 20, "{}", rep.summary());
    assert_eq!(count(Class::AmountMismatch), 1);
    assert_eq!(count(Class::StatusMismatch), 2);
    assert_eq!(count(Class::MissingAtChannel), 1);
    assert_eq!(count(Class::MissingInSluice), 1);
    assert!(!rep.is_clean());
    let summary = rep.summary();
    assert!(
        summary.contains("AMOUNT_MISMATCH") && summary.contains("5 differences"),
        "{summary}"
    );
    assert!(
        summary.contains("channel SUCCESS 800 fen (0000), sluice PENDING"),
        "{summary}"
    );
    let csv = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + 5, "{csv}");
    assert!(lines[0].starts_with("class,order_ref,"));
    assert!(
        csv.contains("AMOUNT_MISMATCH") && csv.contains(",5000,500,"),
        "{csv}"
    );
    assert!(
        csv.contains("MISSING_AT_CHANNEL") && csv.contains(",GONE,"),
        "{csv}"
    );
    assert!(csv.contains("MISSING_IN_SLUICE,ZZ-UNKNOWN,"), "{csv}");
}

#[test]
fn a_clean_day_reconciles_and_wrong_dates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    let (e, j) = setup(&jdir);
    let mut ledger = Ledger::default();
    for i in 0..5u64 {
        let r = order(&e, &j, &format!("C-{i}"), 10 + i, Some(Code::OK), T0 + i);
        ledger.insert(entry(&r, 10 + i, Code::OK, T0 + i));
    }
    // Still in flight at sluice, not final at the channel: on neither side's day list.
    order(&e, &j, "OPEN", 1, None, T0 + 9);
    drop(j);
    let stmt = dir.path().join("s.txt");
    ledger
        .write_statement(&stmt, "SLUICE01", cst_day(T0))
        .unwrap();
    let out = dir.path().join("d.csv");
    let rep = recon::run(&jdir, "CHA", "2024-01-02", &stmt, &out).unwrap();
    assert!(rep.is_clean(), "{}", rep.summary());
    assert_eq!(rep.of(Class::Matched).count(), 5);
    assert!(rep.summary().contains("no differences"));
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 1);
    assert!(matches!(
        recon::run(&jdir, "CHA", "2024-01-03", &stmt, &out),
        Err(recon::ReconError::WrongDate { .. })
    ));
}
