//! The journal on disk: group commit, policies, and torn-write handling (truncated tail,
//! flipped bits, zero-filled tail, damage in the middle).

use std::path::Path;
use std::sync::Arc;

use sluice::app::JournalSink;
use sluice::engine::agreement::{
    Agreement, ChannelAgreement, ChannelAgreementState, CHANNELS_PER_AGREEMENT_MAX,
};
use sluice::engine::{ChannelConfig, ChannelTable, Engine, EngineConfig, Record};
use sluice::journal::{self, JournalConfig, JournalError, Policy};
use sluice::message::{AgreementId, BankCode, CardType, ChannelId};
use sluice::wire::field::Digits;
use sluice::wire::header::MerchantNo;

fn engine() -> Engine {
    Engine::new(
        EngineConfig::default(),
        ChannelTable {
            channels: vec![ChannelConfig::open("CHA")],
        },
        &[9u8; 32],
        1,
    )
}

fn agreement(id: u64) -> Record {
    let mut a = Agreement {
        id: AgreementId(id),
        merchant: MerchantNo::new("898100000000001").unwrap(),
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
        agreement_no: sluice::channel::message::AgreementNo::new(&format!("A-{id}")).unwrap(),
        state: ChannelAgreementState::Active,
    });
    Record::Agreement(Box::new(a))
}

fn cfg(dir: &Path) -> JournalConfig {
    JournalConfig::new(dir)
}

/// Write agreements 1..=n in one segment and close.
fn write_agreements(dir: &Path, n: u64) {
    let (j, r) = journal::open(cfg(dir)).unwrap();
    r.apply(&engine(), 0).unwrap();
    for id in 1..=n {
        j.append_blocking(&agreement(id)).unwrap();
    }
    j.close().unwrap();
}

fn segment_file(dir: &Path) -> std::path::PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v.pop().unwrap()
}

/// Reopen and count the agreements that came back.
fn recovered(dir: &Path) -> Result<(usize, journal::RecoveryReport), JournalError> {
    let (_j, r) = journal::open(cfg(dir))?;
    let e = engine();
    let rep = r.apply(&e, 0)?;
    Ok((e.agreements().len(), rep))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_batches_many_sessions_and_everything_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (j, r) = journal::open(cfg(dir.path())).unwrap();
    r.apply(&engine(), 0).unwrap();
    let j = Arc::new(j);
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let j = j.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50u64 {
                j.append(agreement(1 + t * 50 + i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let st = j.stats();
    assert_eq!(st.records, 3200);
    assert!(
        st.batches < 3200 && st.batch_records_max > 1,
        "group commit shares fsyncs: {st:?}"
    );
    assert_eq!(st.durable_lsn, 3200);
    j.close().unwrap();
    drop(j);
    let (n, rep) = recovered(dir.path()).unwrap();
    assert_eq!(n, 3200);
    assert_eq!(rep.records_replayed, 3200);
    assert!(rep.torn_tail.is_none());
}

#[test]
fn truncated_tail_is_cut_off_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    write_agreements(dir.path(), 100);
    let seg = segment_file(dir.path());
    let len = std::fs::metadata(&seg).unwrap().len();
    for cut in [1u64, 7, 20, 40] {
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        let now = std::fs::metadata(&seg).unwrap().len();
        f.set_len(now - cut).unwrap();
        drop(f);
        let (n, rep) = recovered(dir.path()).unwrap();
        assert!(n < 100, "cut {cut}: the torn record is gone");
        let torn = rep.torn_tail.expect("reported");
        assert_eq!(torn.file, seg);
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            torn.offset,
            "truncated on disk"
        );
    }
    assert!(std::fs::metadata(&seg).unwrap().len() < len);
    // After the cut the journal is clean and appendable again.
    let (n_before, rep) = recovered(dir.path()).unwrap();
    assert!(rep.torn_tail.is_none());
    let (j, r) = journal::open(cfg(dir.path())).unwrap();
    r.apply(&engine(), 0).unwrap();
    j.append_blocking(&agreement(10_000)).unwrap();
    j.close().unwrap();
    drop(j);
    assert_eq!(recovered(dir.path()).unwrap().0, n_before + 1);
}

#[test]
fn zero_filled_tail_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    write_agreements(dir.path(), 50);
    let seg = segment_file(dir.path());
    let len = std::fs::metadata(&seg).unwrap().len();
    let mut b = std::fs::read(&seg).unwrap();
    b.extend_from_slice(&[0u8; 8192]);
    std::fs::write(&seg, &b).unwrap();
    let (n, rep) = recovered(dir.path()).unwrap();
    assert_eq!(n, 50);
    assert_eq!(rep.torn_tail.unwrap().offset, len);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len);
    // Zeroes over the last record (a block the crash never wrote).
    let mut b = std::fs::read(&seg).unwrap();
    let n_bytes = b.len();
    for x in &mut b[n_bytes - 30..] {
        *x = 0;
    }
    std::fs::write(&seg, &b).unwrap();
    assert_eq!(recovered(dir.path()).unwrap().0, 49);
}

#[test]
fn flipped_bit_in_the_last_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    write_agreements(dir.path(), 50);
    let seg = segment_file(dir.path());
    let mut b = std::fs::read(&seg).unwrap();
    let n = b.len();
    b[n - 5] ^= 0x04;
    std::fs::write(&seg, &b).unwrap();
    let (count, rep) = recovered(dir.path()).unwrap();
    assert_eq!(count, 49);
    assert!(rep.torn_tail.is_some());
}

#[test]
fn flipped_bits_in_the_middle_refuse_to_start_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    write_agreements(dir.path(), 50);
    let seg = segment_file(dir.path());
    let mut b = std::fs::read(&seg).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x80;
    std::fs::write(&seg, &b).unwrap();
    let before = b.len() as u64;
    match recovered(dir.path()) {
        Err(JournalError::Corrupt { file, offset, .. }) => {
            assert_eq!(file, seg);
            assert!(
                offset <= at as u64 && offset + 200 > at as u64,
                "offset {offset} near {at}"
            );
            let msg = JournalError::Corrupt {
                file,
                offset,
                detail: String::new(),
            }
            .to_string();
            assert!(
                msg.contains(".wal") && msg.contains(&format!("offset {offset}")),
                "{msg}"
            );
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        before,
        "nothing truncated"
    );
}

#[test]
fn a_damaged_length_field_in_the_middle_is_not_mistaken_for_a_tail() {
    let dir = tempfile::tempdir().unwrap();
    write_agreements(dir.path(), 50);
    let seg = segment_file(dir.path());
    let mut b = std::fs::read(&seg).unwrap();
    // The first frame's length field (right after the 24-byte header).
    b[24 + 1] ^= 0xFF;
    std::fs::write(&seg, &b).unwrap();
    assert!(matches!(
        recovered(dir.path()),
        Err(JournalError::Corrupt { offset: 24, .. })
    ));
}

#[test]
fn segments_roll_and_a_sealed_segment_never_has_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.segment_bytes = 4096;
    let (j, r) = journal::open(c.clone()).unwrap();
    r.apply(&engine(), 0).unwrap();
    for id in 1..=300 {
        j.append_blocking(&agreement(id)).unwrap();
    }
    j.close().unwrap();
    drop(j);
    let segs: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "wal")
        })
        .collect();
    assert!(segs.len() > 5, "{} segments", segs.len());
    let (_j, r) = journal::open(c.clone()).unwrap();
    let e = engine();
    r.apply(&e, 0).unwrap();
    assert_eq!(e.agreements().len(), 300);
    drop(_j);
    // Truncating a sealed (non-last) segment is corruption, not a torn tail.
    let mut v: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    let f = std::fs::OpenOptions::new().write(true).open(&v[1]).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 3).unwrap();
    match journal::open(c) {
        Err(JournalError::Corrupt { file, .. }) => assert_eq!(file, v[1]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn policies_parse_and_are_checked() {
    assert_eq!("fsync".parse::<Policy>().unwrap(), Policy::Fsync);
    assert_eq!("none".parse::<Policy>().unwrap(), Policy::None);
    assert_eq!("batch-ms:5".parse::<Policy>().unwrap(), Policy::BatchMs(5));
    assert_eq!(
        "batch-ms 10".parse::<Policy>().unwrap(),
        Policy::BatchMs(10)
    );
    assert!("sometimes".parse::<Policy>().is_err());
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.policy = Policy::BatchMs(0);
    assert!(matches!(journal::open(c), Err(JournalError::Config(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_ms_and_none_policies_write_everything_in_order() {
    for policy in [Policy::BatchMs(5), Policy::None] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.policy = policy;
        let (j, r) = journal::open(c).unwrap();
        r.apply(&engine(), 0).unwrap();
        for id in 1..=500 {
            j.append(agreement(id)).await.unwrap();
        }
        if policy == Policy::BatchMs(5) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert_eq!(j.stats().durable_lsn, 500, "synced within the window");
        }
        j.sync().await.unwrap();
        drop(j);
        assert_eq!(recovered(dir.path()).unwrap().0, 500, "{policy:?}");
    }
}

#[test]
fn a_halted_journal_writes_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let (j, r) = journal::open(cfg(dir.path())).unwrap();
    r.apply(&engine(), 0).unwrap();
    j.append_blocking(&agreement(1)).unwrap();
    j.halt();
    assert!(j.append_blocking(&agreement(2)).is_err());
    assert_eq!(recovered(dir.path()).unwrap().0, 1);
}

/// Consecutive records go to the journal as one append: all of them are durable when it
/// resolves, in order, and many such appends from many tasks interleave without loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_all_makes_every_record_durable_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.queue_max = 64; // tasks must wait for queue slots, several records at a time
    let (j, r) = journal::open(c).unwrap();
    r.apply(&engine(), 0).unwrap();
    let j = Arc::new(j);
    let mut tasks = Vec::new();
    for t in 0..20u64 {
        let j = j.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..10u64 {
                let base = 1 + t * 1000 + b * 10;
                let recs = (base..base + 1 + b % 4).map(agreement).collect();
                j.append_all(recs).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Empty batch resolves at once.
    j.append_all(Vec::new()).await.unwrap();
    Arc::try_unwrap(j).ok().unwrap().close().unwrap();
    let (n, rep) = recovered(dir.path()).unwrap();
    // 20 tasks x (10 appends of 1..=4 records: 1+2+3+4+1+2+3+4+1+2 = 23).
    assert_eq!(n, 20 * 23);
    assert_eq!(rep.records_replayed, 20 * 23);
}

/// Snapshots wait for at least half as many records as the last one had entries, so a
/// growing state does not make every record pay for rewriting it more often; a trigger
/// queued during a snapshot is not a second one right after it.
#[test]
fn the_snapshot_interval_grows_with_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.policy = Policy::None;
    c.snapshot_every_records = 100;
    let (j, r) = journal::open(c).unwrap();
    let e = Arc::new(engine());
    r.apply(&e, 0).unwrap();
    let snapshots = || journal::snapshot::list(dir.path()).unwrap().len();
    let wait_for = |n: usize| {
        let t = std::time::Instant::now();
        while snapshots() < n {
            assert!(t.elapsed().as_secs() < 30, "snapshot {n} never came");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    // 1000 agreements in the engine: the first snapshot (after 100 records) holds them.
    for id in 1..=1000 {
        if let Record::Agreement(a) = agreement(id) {
            e.agreements().upsert(*a);
        }
    }
    j.start_snapshots(e.clone());
    for id in 1..=100 {
        j.append_blocking(&agreement(id)).unwrap();
    }
    wait_for(1);
    // Now 500 records are needed, not 100.
    for id in 1..=300 {
        j.append_blocking(&agreement(id)).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        snapshots(),
        1,
        "a snapshot after 300 records with 1000 entries"
    );
    for id in 1..=250 {
        j.append_blocking(&agreement(id)).unwrap();
    }
    wait_for(2);
    j.close().unwrap();
}
