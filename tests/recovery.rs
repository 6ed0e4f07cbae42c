//! Recovery of the engine from the journal and snapshots: what the lender was told
//! survives a restart, open orders are queried (never re-sent), idempotency holds for the
//! retention, ids never repeat.

use std::path::Path;

use sluice::channel::message::{self as ch, OrderRef, RspClass, RspCode, Serial};
use sluice::channel::Code;
use sluice::engine::agreement::{
    Agreement, ChannelAgreement, ChannelAgreementState, CHANNELS_PER_AGREEMENT_MAX,
};
use sluice::engine::order::Phase;
use sluice::engine::{
    Action, Actions, ChannelConfig, ChannelTable, Dispatch, DispatchResult, Engine, EngineConfig,
    Record,
};
use sluice::journal::{self, Journal, JournalConfig, JournalError, RecoveryReport};
use sluice::message::{self as lm, AgreementId, BankCode, CardType, ChannelId, Reason, Status};
use sluice::wire::field::Digits;
use sluice::wire::header::MerchantNo;

const M: &str = "898100000000001";
const DAY_MS: u64 = 86_400_000;
const T0: u64 = 1_700_000_000_000;

struct Rig {
    engine: Engine,
    journal: Journal,
}

fn open_with(
    dir: &Path,
    prefix: &str,
    now_ms: u64,
    f: impl FnOnce(&mut JournalConfig),
) -> (Rig, RecoveryReport) {
    let mut cfg = JournalConfig::new(dir);
    f(&mut cfg);
    let (journal, rec) = journal::open(cfg).unwrap();
    let engine = Engine::new(
        EngineConfig {
            ref_prefix: prefix.into(),
            ..EngineConfig::default()
        },
        ChannelTable {
            channels: vec![ChannelConfig::open("CHA"), ChannelConfig::open("CHB")],
        },
        &[9u8; 32],
        1,
    );
    let report = rec.apply(&engine, now_ms).unwrap();
    (Rig { engine, journal }, report)
}

fn open(dir: &Path, prefix: &str, now_ms: u64) -> (Rig, RecoveryReport) {
    open_with(dir, prefix, now_ms, |_| {})
}

impl Rig {
    /// Carry out actions like the shell: journal first (durably), collect dispatches.
    fn run(&self, actions: Actions) -> (Vec<Dispatch>, Vec<lm::Message>) {
        let mut d = Vec::new();
        let mut replies = Vec::new();
        for a in actions {
            match a {
                Action::Journal(r) => {
                    self.journal.append_blocking(&r).unwrap();
                    self.engine.record_durable(&r);
                }
                Action::Dispatch(x) => d.push(x),
                Action::Reply(m) => replies.push(m),
                _ => {}
            }
        }
        (d, replies)
    }

    fn add_agreement(&self, id: u64) {
        let mut a = Agreement {
            id: AgreementId(id),
            merchant: MerchantNo::new(M).unwrap(),
            card_hash: (id as u128).to_le_bytes(),
            id_hash: [7; 16],
            card_last4: Digits::new("0128").unwrap(),
            bank: BankCode::new("ICBC").unwrap(),
            card_type: CardType::Debit,
            cancelled: false,
            channels: [None; CHANNELS_PER_AGREEMENT_MAX],
        };
        a.add_channel(ChannelAgreement {
            channel: ChannelId::new("CHA").unwrap(),
            agreement_no: ch::AgreementNo::new(&format!("A-{id}")).unwrap(),
            state: ChannelAgreementState::Active,
        });
        self.journal
            .append_blocking(&Record::Agreement(Box::new(a.clone())))
            .unwrap();
        self.engine.agreements().upsert(a);
    }

    fn debit(&self, order: &str, agreement: u64, now_ms: u64) -> (Vec<Dispatch>, Vec<lm::Message>) {
        let req = lm::DebitReq {
            order_id: lm::OrderId::new(order).unwrap(),
            agreement_id: AgreementId(agreement),
            amount: lm::Fen(1234),
            currency: lm::Currency,
            purpose: lm::Purpose::new("还款").unwrap(),
        };
        self.run(self.engine.debit(merchant(), &req, now_ms))
    }

    fn answer(&self, d: &Dispatch, code: Code, now_ms: u64) -> (Vec<Dispatch>, Vec<lm::Message>) {
        let r = pay_rsp(order_ref_of(d), code);
        self.run(self.engine.dispatch_result(&d.token, r, now_ms))
    }

    /// Debit `{prefix}-{i}` for each `i` on agreements 1..=10 and answer it at once:
    /// success for even `i`, insufficient funds for odd ones (all final).
    fn finish_debits(&self, prefix: &str, range: std::ops::Range<u64>, at: u64) {
        for i in range {
            let (d, _) = self.debit(&format!("{prefix}-{i}"), 1 + i % 10, at);
            let code = if i % 2 == 0 {
                Code::OK
            } else {
                Code::INSUFFICIENT_FUNDS
            };
            self.answer(&d[0], code, at + 1);
        }
    }
}

fn merchant() -> MerchantNo {
    MerchantNo::new(M).unwrap()
}

fn key(order: &str) -> (MerchantNo, lm::OrderId) {
    (merchant(), lm::OrderId::new(order).unwrap())
}

fn order_ref_of(d: &Dispatch) -> OrderRef {
    *d.msg.order_ref().expect("an order message")
}

fn pay_rsp(order_ref: OrderRef, code: Code) -> DispatchResult {
    let (code, class): (RspCode, RspClass) = code.pair();
    DispatchResult::Answer(
        ch::PayRsp {
            code,
            class,
            order_ref,
            channel_serial: Serial::new("SER1").unwrap(),
            amount: 1234,
            finished_at_ms: T0,
        }
        .into(),
    )
}

fn status_of(m: &lm::Message) -> (Status, Reason) {
    match m {
        lm::Message::DebitRsp(d) => (d.result.status, d.result.reason),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_final_order_survives_restart_and_a_repeat_is_a_duplicate_not_a_debit() {
    let dir = tempfile::tempdir().unwrap();
    let (rig, _) = open(dir.path(), "S1", T0);
    rig.add_agreement(5);
    let (d, _) = rig.debit("D-1", 5, T0);
    assert_eq!(d.len(), 1);
    let (_, replies) = rig.answer(&d[0], Code::OK, T0 + 10);
    assert_eq!(status_of(&replies[0]), (Status::Success, Reason::OK));
    assert_eq!(rig.engine.outbox_len(), 1, "notification pending");
    drop(rig); // crash: no close, no snapshot

    let (rig, rep) = open(dir.path(), "S2", T0 + 1000);
    assert!(rep.pending.is_empty());
    let o = rig.engine.order(&key("D-1")).expect("order restored");
    assert_eq!((o.phase, o.outcome.status), (Phase::Final, Status::Success));
    assert_eq!(o.finished_at_ms, T0 + 10);
    let (again, replies) = rig.debit("D-1", 5, T0 + 2000);
    assert!(again.is_empty(), "never sent twice");
    assert_eq!(
        status_of(&replies[0]),
        (Status::Success, Reason::DUPLICATE_ORDER)
    );
    // The unacknowledged notification is delivered again, with the same id.
    let n = rig.engine.notifications_for(&merchant(), 10);
    assert_eq!(n.len(), 1);
    let notify_id = n[0].msg.notify_id;
    assert_eq!(n[0].msg.result.status, Status::Success);
    rig.run(rig.engine.notify_ack(&merchant(), notify_id));
    // Ids of this start are past every id of the last one.
    assert!(rig.engine.new_agreement_id().0 > notify_id);
    drop(rig);

    let (rig, _) = open(dir.path(), "S3", T0 + 3000);
    assert_eq!(
        rig.engine.outbox_len(),
        0,
        "acknowledged stays acknowledged"
    );
}

#[test]
fn an_order_in_flight_at_the_crash_is_queried_on_its_channel_never_resent() {
    let dir = tempfile::tempdir().unwrap();
    let (rig, _) = open(dir.path(), "S1", T0);
    rig.add_agreement(5);
    let (d, _) = rig.debit("D-2", 5, T0);
    let sent_ref = order_ref_of(&d[0]);
    assert_eq!(d[0].channel.as_str(), "CHA");
    drop(rig); // crash while the channel holds the order

    let (rig, rep) = open(dir.path(), "S2", T0 + 5000);
    assert_eq!(rep.pending.len(), 1);
    let (k, r, _) = rep.pending[0];
    assert_eq!((k, r), (key("D-2"), sent_ref));
    let o = rig.engine.order(&k).unwrap();
    assert_eq!(
        (o.phase, o.outcome.status, o.outcome.reason),
        (Phase::Pending, Status::Pending, Reason::OUTCOME_UNKNOWN)
    );
    // The lender asking again gets PENDING, and nothing is dispatched.
    let (none, replies) = rig.debit("D-2", 5, T0 + 5001);
    assert!(none.is_empty());
    assert_eq!(status_of(&replies[0]).0, Status::Pending);
    // The query goes to the same channel about the same reference.
    let q = rig.engine.query_due(&k, &r, T0 + 5002);
    let Action::Dispatch(qd) = &q[0] else {
        panic!("{q:?}")
    };
    assert_eq!(qd.channel.as_str(), "CHA");
    assert!(matches!(&qd.msg, ch::Message::QueryReq(x) if x.order_ref == sent_ref));
    let (code, class) = Code::OK.pair();
    let ans = DispatchResult::Answer(
        ch::QueryRsp {
            code,
            class,
            order_ref: sent_ref,
            order_type: 1,
            amount: 1234,
            channel_serial: Serial::new("SER1").unwrap(),
            finished_at_ms: T0,
        }
        .into(),
    );
    let (more, _) = rig.run(rig.engine.dispatch_result(&qd.token, ans, T0 + 5003));
    assert!(more.is_empty());
    assert_eq!(
        rig.engine.order(&k).unwrap().outcome.status,
        Status::Success
    );
    drop(rig);
    let (rig, rep) = open(dir.path(), "S3", T0 + 6000);
    assert!(rep.pending.is_empty());
    assert_eq!(
        rig.engine.order(&k).unwrap().outcome.status,
        Status::Success
    );
}

#[test]
fn an_order_that_never_reached_a_channel_is_failed_and_that_is_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let (rig, _) = open(dir.path(), "S1", T0);
    rig.add_agreement(5);
    let req = lm::DebitReq {
        order_id: lm::OrderId::new("D-3").unwrap(),
        agreement_id: AgreementId(5),
        amount: lm::Fen(99),
        currency: lm::Currency,
        purpose: lm::Purpose::new("x").unwrap(),
    };
    let actions = rig.engine.debit(merchant(), &req, T0);
    // Crash after the first record (accepted) became durable, before the attempt record.
    let Action::Journal(first) = &actions[0] else {
        panic!()
    };
    rig.journal.append_blocking(first).unwrap();
    drop(rig);

    let (rig, rep) = open(dir.path(), "S2", T0 + 100);
    assert_eq!(rep.failed_orders, 1);
    assert!(rep.pending.is_empty());
    let o = rig.engine.order(&key("D-3")).unwrap();
    assert_eq!(
        (o.phase, o.outcome.status, o.outcome.reason),
        (Phase::Final, Status::Failed, Reason::NO_CHANNEL)
    );
    assert_eq!(rig.engine.outbox_len(), 1, "the lender is told");
    drop(rig);
    let (rig, rep) = open(dir.path(), "S3", T0 + 200);
    assert_eq!(rep.failed_orders, 0, "already final on disk");
    assert_eq!(
        rig.engine.order(&key("D-3")).unwrap().outcome.reason,
        Reason::NO_CHANNEL
    );
}

#[test]
fn idempotency_lasts_the_retention_then_the_order_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let (rig, _) = open(dir.path(), "S1", T0);
    rig.add_agreement(5);
    let (d, _) = rig.debit("D-4", 5, T0);
    rig.answer(&d[0], Code::INSUFFICIENT_FUNDS, T0 + 1);
    drop(rig);
    let (rig, _) = open(dir.path(), "S2", T0 + 6 * DAY_MS);
    assert!(rig.engine.order(&key("D-4")).is_some(), "within 7 days");
    drop(rig);
    let (rig, rep) = open(dir.path(), "S3", T0 + 7 * DAY_MS + 10);
    assert_eq!(rep.evicted_orders, 1);
    assert!(
        rig.engine.order(&key("D-4")).is_none(),
        "past the retention"
    );
    drop(rig);
    // A shorter configured retention.
    let dir = tempfile::tempdir().unwrap();
    let (rig, _) = open_with(dir.path(), "S1", T0, |c| c.retention_ms = 1000);
    rig.add_agreement(5);
    let (d, _) = rig.debit("D-5", 5, T0);
    rig.answer(&d[0], Code::OK, T0 + 1);
    drop(rig);
    let (rig, _) = open_with(dir.path(), "S2", T0 + 2000, |c| c.retention_ms = 1000);
    assert!(rig.engine.order(&key("D-5")).is_none());
}

#[test]
fn snapshot_plus_tail_restores_everything_and_replays_only_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (rig, _) = open(dir.path(), "S1", T0);
    for id in 1..=300 {
        rig.add_agreement(id);
    }
    let mut pending_refs = Vec::new();
    for i in 0..100 {
        let (d, _) = rig.debit(&format!("A-{i}"), 1 + i % 300, T0);
        match i % 3 {
            0 => {
                rig.answer(&d[0], Code::OK, T0 + 1);
            }
            1 => {
                rig.answer(&d[0], Code::INSUFFICIENT_FUNDS, T0 + 1);
            }
            _ => pending_refs.push(order_ref_of(&d[0])),
        }
    }
    let cancel = rig.engine.agreement_cancel(
        merchant(),
        &lm::AgreementCancelReq {
            agreement_id: AgreementId(7),
        },
    );
    rig.run(cancel);
    let info = rig.journal.snapshot(&rig.engine, T0 + 2).unwrap();
    assert_eq!((info.agreements, info.orders), (300, 100));
    // The tail: more orders after the snapshot.
    for i in 0..20 {
        let (d, _) = rig.debit(&format!("B-{i}"), 100 + i, T0 + 3);
        rig.answer(&d[0], Code::OK, T0 + 4);
    }
    // Every agreement id the lender may know is journaled; after a restart new ids are
    // past all of them. (An id handed out but never journaled was never told to anyone;
    // in production the restart's time-based base also moves past those.)
    let mut last_agreement = 0;
    rig.engine
        .agreements()
        .for_each(|a| last_agreement = last_agreement.max(a.id.0));
    drop(rig);

    let (rig, rep) = open(dir.path(), "S2", T0 + 10);
    assert!(rep.snapshot.is_some());
    assert_eq!(rep.snapshot_agreements, 300);
    assert_eq!(
        rep.records_replayed,
        20 * 3,
        "accepted, attempt, final per tail order"
    );
    assert_eq!(rig.engine.agreements().len(), 300);
    assert_eq!(rig.engine.order_count(), 120);
    assert_eq!(rep.pending.len(), pending_refs.len());
    for r in &pending_refs {
        assert!(rep.pending.iter().any(|p| &p.1 == r));
    }
    assert_eq!(
        rig.engine.agreements().get(AgreementId(7)).unwrap().state(),
        lm::AgreementState::Cancelled
    );
    assert!(rig.engine.new_agreement_id().0 > last_agreement);
    // Every final order is still idempotent.
    let (d, replies) = rig.debit("A-0", 1, T0 + 11);
    assert!(d.is_empty());
    assert_eq!(
        status_of(&replies[0]),
        (Status::Success, Reason::DUPLICATE_ORDER)
    );
}

#[test]
fn settled_orders_keep_idempotency_through_snapshot_and_restart() {
    // Final orders past the detail window are held compactly; a snapshot writes them, a
    // restart brings them back compactly, and every one still answers as a duplicate.
    let dir = tempfile::tempdir().unwrap();
    let (rig, _) = open(dir.path(), "S1", T0);
    for id in 1..=10 {
        rig.add_agreement(id);
    }
    rig.finish_debits("C", 0..40, T0);
    let detail = EngineConfig::default().settle_after_ms;
    assert_eq!(
        rig.engine.settle_due(T0 + detail),
        0,
        "still in its detail window"
    );
    assert_eq!(rig.engine.settle_due(T0 + detail + 2), 40);
    let info = rig.journal.snapshot(&rig.engine, T0 + detail + 3).unwrap();
    assert_eq!(info.orders, 40, "settled orders are in the snapshot");
    // A tail after the snapshot: recent, so live after the restart.
    for i in 0..5 {
        let (d, _) = rig.debit(&format!("T-{i}"), 1 + i, T0 + detail + 4);
        rig.answer(&d[0], Code::OK, T0 + detail + 5);
    }
    let recon_before =
        sluice::recon::OwnRecord::from_engine(&rig.engine, &ChannelId::new("CHA").unwrap())
            .unwrap();
    drop(rig);

    let (rig, _) = open(dir.path(), "S2", T0 + detail + 10);
    assert_eq!(rig.engine.order_count(), 45);
    assert_eq!(
        rig.engine.settled_count(),
        40,
        "restored straight into the compact form"
    );
    for i in 0..40 {
        let (d, replies) = rig.debit(&format!("C-{i}"), 1 + i % 10, T0 + detail + 11);
        assert!(d.is_empty(), "C-{i} sent again");
        let want = if i % 2 == 0 {
            Status::Success
        } else {
            Status::Failed
        };
        assert_eq!(status_of(&replies[0]), (want, Reason::DUPLICATE_ORDER));
    }
    // Reconciliation sees the same attempts before and after.
    let recon_after =
        sluice::recon::OwnRecord::from_engine(&rig.engine, &ChannelId::new("CHA").unwrap())
            .unwrap();
    assert_eq!(recon_after.entries.len(), 45);
    for (r, e) in &recon_before.entries {
        let a = &recon_after.entries[r];
        assert_eq!(
            (&a.order_id, a.amount_fen, a.status, a.finished_at_ms),
            (&e.order_id, e.amount_fen, e.status, e.finished_at_ms)
        );
    }
}

fn chunk_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("settled-") && n.ends_with(".chunk"))
        .collect();
    v.sort();
    v
}

/// Every order `K-{i}` for `i` in `range` repeats as a duplicate with its own outcome
/// (even i: success, odd: declined) and is not sent anywhere again.
fn assert_repeats_are_duplicates(rig: &Rig, range: std::ops::Range<u64>, now_ms: u64) {
    for i in range {
        let (d, replies) = rig.debit(&format!("K-{i}"), 1 + i % 10, now_ms);
        assert!(d.is_empty(), "K-{i} sent again");
        let want = if i % 2 == 0 {
            Status::Success
        } else {
            Status::Failed
        };
        assert_eq!(
            status_of(&replies[0]),
            (want, Reason::DUPLICATE_ORDER),
            "K-{i}"
        );
    }
}

#[test]
fn settled_chunks_on_disk_keep_idempotency_through_restarts_and_retention() {
    // Full chunks of settled orders (4096 each) go to their own files, and snapshots
    // refer to them instead of copying them; a restart loads them back; files no
    // snapshot refers to are removed; retention removes old files two snapshots later.
    const CHUNK: u64 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let fast = |c: &mut JournalConfig| c.policy = journal::Policy::None;
    let (rig, _) = open_with(dir.path(), "S1", T0, fast);
    for id in 1..=10 {
        rig.add_agreement(id);
    }
    let n = 2 * CHUNK + 100;
    rig.finish_debits("K", 0..n, T0);
    let detail = EngineConfig::default().settle_after_ms;
    assert_eq!(rig.engine.settle_due(T0 + detail + 2), n as usize);
    assert_eq!(chunk_files(dir.path()).len(), 2, "two full chunks written");
    let info = rig.journal.snapshot(&rig.engine, T0 + detail + 3).unwrap();
    assert_eq!(
        (info.chunks, info.orders),
        (2, 100),
        "the full chunks are referred to, the rest copied"
    );
    // Orders whose records are only on disk still answer as duplicates.
    assert_repeats_are_duplicates(&rig, 0..10, T0 + detail + 4);
    assert_repeats_are_duplicates(&rig, CHUNK..CHUNK + 10, T0 + detail + 4);
    // More orders settle after the snapshot: a third file, which no snapshot refers to.
    let t1 = T0 + detail + 10;
    rig.finish_debits("K", n..n + CHUNK, t1);
    assert_eq!(rig.engine.settle_due(t1 + detail + 2), CHUNK as usize);
    assert_eq!(chunk_files(dir.path()).len(), 3);
    drop(rig);

    // A crash before the next snapshot: the third file is removed at the restart, and
    // its orders come back from the journal's tail.
    let t2 = t1 + detail + 20;
    let (rig, rep) = open_with(dir.path(), "S2", t2, fast);
    assert_eq!(
        rep.snapshot_orders, n,
        "two chunks from files plus 100 copied"
    );
    assert_eq!(
        chunk_files(dir.path()).len(),
        2,
        "the unreferred file is gone"
    );
    assert_eq!(rig.engine.order_count() as u64, n + CHUNK);
    assert_repeats_are_duplicates(&rig, 0..n + CHUNK, t2 + 1);
    // The tail's orders settle again, after the 100 the snapshot copied: a third full
    // chunk (numbered 2 again) and 100 left over.
    rig.engine.settle_due(t2 + detail + 2);
    let info = rig.journal.snapshot(&rig.engine, t2 + detail + 3).unwrap();
    assert_eq!((info.chunks, info.orders), (3, 100), "{info:?}");
    drop(rig);

    // Second restart: everything from files and the snapshot; nothing replayed twice.
    let t3 = t2 + detail + 10;
    let (rig, rep) = open_with(dir.path(), "S3", t3, fast);
    assert_eq!(rig.engine.order_count() as u64, n + CHUNK);
    assert_eq!(rig.engine.settled_count() as u64, n + CHUNK);
    assert_eq!(rep.records_replayed, 0);
    assert_repeats_are_duplicates(&rig, 0..n + CHUNK, t3 + 1);

    // Past the retention every order is forgotten; the files go once neither kept
    // snapshot refers to them (the older one is the fallback).
    // (An agreement between snapshots moves the journal on: a snapshot at an unchanged
    // position replaces the last one instead of adding one.)
    let late = t3 + 8 * DAY_MS;
    rig.journal.snapshot(&rig.engine, late).unwrap();
    assert_eq!(rig.engine.order_count(), 0);
    assert_eq!(
        chunk_files(dir.path()).len(),
        3,
        "the fallback still refers to them"
    );
    rig.add_agreement(11);
    rig.journal.snapshot(&rig.engine, late + 1).unwrap();
    assert_eq!(chunk_files(dir.path()).len(), 3);
    rig.add_agreement(12);
    rig.journal.snapshot(&rig.engine, late + 2).unwrap();
    assert_eq!(chunk_files(dir.path()), Vec::<String>::new());
}

#[test]
fn snapshots_prune_old_segments_and_keep_one_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let small = |c: &mut JournalConfig| c.segment_bytes = 4096;
    let (rig, _) = open_with(dir.path(), "S1", T0, small);
    for round in 0..4u64 {
        for id in 1..=100 {
            rig.add_agreement(round * 1000 + id);
        }
        rig.journal.snapshot(&rig.engine, T0).unwrap();
    }
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".snap")).count(),
        2,
        "{names:?}"
    );
    assert!(
        names.iter().filter(|n| n.ends_with(".wal")).count() < 20,
        "{names:?}"
    );
    drop(rig);
    let (rig, _) = open_with(dir.path(), "S2", T0, small);
    assert_eq!(rig.engine.agreements().len(), 400);
    drop(rig);
    // A damaged newest snapshot refuses to start, naming it; moving it away falls back.
    let mut snaps: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .collect();
    snaps.sort();
    let newest = snaps.pop().unwrap();
    let mut b = std::fs::read(&newest).unwrap();
    let n = b.len();
    b[n / 2] ^= 1;
    std::fs::write(&newest, &b).unwrap();
    let (_j, r) = journal::open(JournalConfig::new(dir.path())).unwrap();
    let e = Engine::new(
        EngineConfig::default(),
        ChannelTable::default(),
        &[9u8; 32],
        1,
    );
    match r.apply(&e, T0) {
        Err(JournalError::Snapshot { file, .. }) => assert_eq!(file, newest),
        other => panic!("{other:?}"),
    }
    drop(_j);
    std::fs::rename(&newest, dir.path().join("bad.snap.moved")).unwrap();
    let (rig, _) = open_with(dir.path(), "S3", T0, small);
    assert_eq!(
        rig.engine.agreements().len(),
        400,
        "older snapshot + its journal"
    );
}

#[test]
fn a_revocation_notice_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (rig, _) = open(dir.path(), "S1", T0);
    rig.add_agreement(9);
    let revoke: ch::Message = ch::Revoke {
        notify_id: 1,
        agreement_no: ch::AgreementNo::new("A-9").unwrap(),
        card_last4: Digits::new("0128").unwrap(),
        revoked_at_ms: T0,
    }
    .into();
    rig.run(
        rig.engine
            .channel_unsolicited(&ChannelId::new("CHA").unwrap(), &revoke, T0),
    );
    drop(rig);
    let (rig, _) = open(dir.path(), "S2", T0 + 1);
    assert_eq!(
        rig.engine.agreements().get(AgreementId(9)).unwrap().state(),
        lm::AgreementState::Revoked
    );
    let n = rig.engine.notifications_for(&merchant(), 10);
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].msg.kind, lm::NotifyKind::AgreementRevoked);
}

/// Process CPU time (user + system, all threads), seconds, from `/proc/self/stat`: on a
/// shared machine wall time measures the neighbours, CPU time measures us.
fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Recovery speed in records (and agreements) per CPU-second. Run with
/// `cargo test --release --test recovery recovery_speed -- --ignored --nocapture`;
/// `SLUICE_AGREEMENTS=10000000` for the 10M-agreement restart.
#[test]
#[ignore]
fn recovery_speed() {
    let agreements: u64 = std::env::var("SLUICE_AGREEMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let (rig, _) = open_with(dir.path(), "S1", T0, |c| c.policy = journal::Policy::None);
    let mut recs = Vec::new();
    for i in 0..333_334u64 {
        let key = (
            merchant(),
            lm::OrderId::new(&format!("ORD-{i:016}")).unwrap(),
        );
        let r = OrderRef::new(&format!("S1O{i:x}")).unwrap();
        recs.push(Record::OrderAccepted {
            key,
            kind: sluice::engine::order::OrderKind::Debit {
                agreement: AgreementId(1),
            },
            amount: 100 + i,
            purpose: lm::Purpose::new("还款").unwrap(),
            at_ms: T0 + i,
        });
        recs.push(Record::AttemptStarted {
            key,
            channel: ChannelId::new("CHA").unwrap(),
            order_ref: r,
            at_ms: T0 + i,
        });
        recs.push(Record::OrderFinal {
            key,
            outcome: lm::Outcome::new(Status::Success, Reason::OK),
            order_ref: Some(r),
            notify_id: 1_000_000_000 + i,
            at_ms: T0 + i,
        });
    }
    rig.journal.append_all_blocking(&recs).unwrap();
    drop(recs);
    rig.journal.close().unwrap();
    drop(rig);
    let (wall, cpu) = (std::time::Instant::now(), cpu_s());
    let (rig, rep) = open_with(dir.path(), "S2", T0, |c| c.policy = journal::Policy::None);
    let (w, c) = (wall.elapsed().as_secs_f64(), cpu_s() - cpu);
    eprintln!(
        "replay: {} records in {w:.2} s wall, {c:.2} s CPU: {:.0} records/s wall, {:.0} records per CPU-second",
        rep.records_replayed,
        rep.records_replayed as f64 / w,
        rep.records_replayed as f64 / c.max(0.01)
    );
    drop(rig);

    let sdir = tempfile::tempdir().unwrap();
    let (rig, _) = open_with(sdir.path(), "S1", T0, |c| c.policy = journal::Policy::None);
    let t = std::time::Instant::now();
    for id in 1..=agreements {
        let mut a = Agreement {
            id: AgreementId(id),
            merchant: merchant(),
            card_hash: (id as u128).to_le_bytes(),
            id_hash: [7; 16],
            card_last4: Digits::new("0128").unwrap(),
            bank: BankCode::new("ICBC").unwrap(),
            card_type: CardType::Debit,
            cancelled: false,
            channels: [None; CHANNELS_PER_AGREEMENT_MAX],
        };
        a.add_channel(ChannelAgreement {
            channel: ChannelId::new("CHA").unwrap(),
            agreement_no: ch::AgreementNo::new(&format!("AGR-{id:012}")).unwrap(),
            state: ChannelAgreementState::Active,
        });
        rig.engine.agreements().upsert(a);
    }
    eprintln!(
        "built {agreements} agreements in memory in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let info = rig.journal.snapshot(&rig.engine, T0).unwrap();
    eprintln!("snapshot: {} bytes, {} ms", info.bytes, info.took_ms);
    rig.journal.close().unwrap();
    drop(rig);
    let (wall, cpu) = (std::time::Instant::now(), cpu_s());
    let (rig, rep) = open_with(sdir.path(), "S2", T0, |c| c.policy = journal::Policy::None);
    let (w, c) = (wall.elapsed().as_secs_f64(), cpu_s() - cpu);
    assert_eq!(rep.snapshot_agreements, agreements);
    assert_eq!(rig.engine.agreements().len() as u64, agreements);
    eprintln!(
        "restart with {agreements} agreements: ready in {w:.2} s wall, {c:.2} s CPU ({:.0} agreements per CPU-second)",
        agreements as f64 / c.max(0.01)
    );
}
