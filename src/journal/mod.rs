//! The journal: an append-only, checksummed, group-committed log of agreement changes and
//! order state transitions, with snapshots, so that a restart loses nothing the lender
//! was told (DESIGN.md §4 rule 3) and replays only a short tail.
//!
//! # Shape
//! - [`codec`]: the byte encoding of [`Record`]s (and of snapshot entries).
//! - [`segment`]: segment files, record frames (CRC32C), the torn-tail scan.
//! - `writer`: the dedicated writer thread: one `write` + one `fdatasync` per batch of
//!   many sessions' records (group commit), behind a bounded queue.
//! - [`snapshot`]: the engine's state as of a journal position, loaded on every core.
//! - `engine::replay`: how records and snapshot entries are applied to the engine.
//!
//! # Use
//! ```no_run
//! # async fn f(engine: std::sync::Arc<sluice::engine::Engine>) -> Result<(), sluice::journal::JournalError> {
//! use sluice::journal::{self, JournalConfig};
//! let (journal, recovery) = journal::open(JournalConfig::new("/var/lib/sluice/journal"))?;
//! let report = recovery.apply(&engine, sluice::app::now_ms())?; // before serving
//! journal.start_snapshots(engine.clone());
//! // schedule report.pending as queries; hand `journal` to the switch as its JournalSink
//! # Ok(()) }
//! ```
//!
//! # Durability policies
//! See [`Policy`]: `fsync` (default; a reply waits for `fdatasync`), `batch-ms N` (a
//! reply waits for the `write` only; up to N ms of acknowledged records can be lost on a
//! *power* failure, none on a process crash), `none` (benchmarks only; logged loudly).

pub mod codec;
pub mod segment;
pub mod snapshot;
mod writer;

use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::BoxFuture;
use tokio::sync::Semaphore;

use crate::app::JournalSink;
use crate::channel::message::OrderRef;
use crate::engine::order::OrderKey;
use crate::engine::{Engine, Record};

pub use snapshot::SnapshotInfo;
pub(crate) use writer::sync_dir;

use writer::{Done, Item};

/// The files of `dir` named `{prefix}{number}{suffix}`, by number.
pub(crate) fn numbered_files(
    dir: &Path,
    prefix: &str,
    suffix: &str,
) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let number = name
            .strip_prefix(prefix)
            .and_then(|n| n.strip_suffix(suffix))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = number {
            v.push((n, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

/// Largest segment file, bytes: bounds the memory a recovery holds per segment and the
/// work lost when one is damaged.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 30;
/// Default segment size: 64 MiB ≈ 700k records; a sealed segment is deleted as a whole
/// once a snapshot covers it.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Most records queued for (or being written by) the writer. At 100k records/s and a
/// 5 ms fsync, ~500 are in flight; 64k absorbs bursts and stalls of a slow disk, and
/// bounds the queue's memory (~10 MiB) — beyond it appenders wait (backpressure).
pub const QUEUE_MAX_DEFAULT: usize = 65_536;
/// Compile-time maximum of the queue bound.
pub const QUEUE_MAX_MAX: usize = 1 << 20;
/// Default records between snapshots. A restart replays at most about this many
/// (~3 s at the measured 1.34M records/s). Not fewer: a snapshot rewrites every live
/// order, and at 20k debits/s (~80k records/s, 1.2M live orders in the 60 s detail
/// window) one every 1M records was one every 12 s and ~16 % of the switch's CPU, which
/// tipped a 2-core machine into overload once the window had filled (BENCHMARKS.md,
/// ninth session).
pub const SNAPSHOT_EVERY_RECORDS_DEFAULT: u64 = 4_000_000;
/// Default idempotency retention: a final order is remembered 7 days, across restarts.
pub const RETENTION_MS_DEFAULT: u64 = 7 * 24 * 3_600_000;
/// Longest `batch-ms` window accepted: more would make "bounded loss" meaningless.
pub const BATCH_MS_MAX: u64 = 1_000;

/// When an appended record counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Each batch is `fdatasync`ed before its appenders are answered. Nothing the lender
    /// was told is lost, even on power failure. The default.
    Fsync,
    /// Appenders are answered once the batch is *written* (in the OS page cache); the
    /// file is synced at least every N ms. A process crash loses nothing; a power failure
    /// or kernel crash can lose the last ≤ N ms of acknowledged records.
    BatchMs(u64),
    /// Appenders are answered once the batch is written; no append ever waits for a sync.
    /// A helper thread writes the file back every 4 MiB in the background, and segment
    /// ends and snapshots are synced. For benchmarks only: a power failure can lose
    /// anything written since the last of those. Logged as a warning.
    None,
}

impl FromStr for Policy {
    type Err = JournalError;
    /// `fsync`, `batch-ms:N` (or `batch-ms N`, `batch-ms=N`), `none`.
    fn from_str(s: &str) -> Result<Policy, JournalError> {
        let s = s.trim();
        let bad = || {
            JournalError::Config(format!(
                "journal policy {s:?}: expected fsync, batch-ms:N or none"
            ))
        };
        match s {
            "fsync" => Ok(Policy::Fsync),
            "none" => Ok(Policy::None),
            _ => {
                let n = s
                    .strip_prefix("batch-ms")
                    .map(|r| r.trim_start_matches([':', '=', ' ']))
                    .ok_or_else(bad)?;
                Ok(Policy::BatchMs(n.parse().map_err(|_| bad())?))
            }
        }
    }
}

/// Journal settings.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// Data directory: segments (`*.wal`) and snapshots (`snapshot-*.snap`).
    pub dir: PathBuf,
    /// Durability policy.
    pub policy: Policy,
    /// A segment is sealed and a new one started past this size, bytes.
    pub segment_bytes: u64,
    /// Records queued for the writer at most (backpressure beyond).
    pub queue_max: usize,
    /// A snapshot is taken after this many records (when snapshots are started).
    pub snapshot_every_records: u64,
    /// How long a final order is remembered for idempotency, ms.
    pub retention_ms: u64,
}

impl JournalConfig {
    /// Defaults for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> JournalConfig {
        JournalConfig {
            dir: dir.into(),
            policy: Policy::Fsync,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            queue_max: QUEUE_MAX_DEFAULT,
            snapshot_every_records: SNAPSHOT_EVERY_RECORDS_DEFAULT,
            retention_ms: RETENTION_MS_DEFAULT,
        }
    }

    fn check(&self) -> Result<(), JournalError> {
        let bad = |s: String| Err(JournalError::Config(s));
        if self.segment_bytes < 4096 || self.segment_bytes > SEGMENT_BYTES_MAX {
            return bad(format!(
                "segment_bytes {} outside 4096..={SEGMENT_BYTES_MAX}",
                self.segment_bytes
            ));
        }
        if self.queue_max == 0 || self.queue_max > QUEUE_MAX_MAX {
            return bad(format!(
                "queue_max {} outside 1..={QUEUE_MAX_MAX}",
                self.queue_max
            ));
        }
        if self.snapshot_every_records == 0 {
            return bad("snapshot_every_records must be > 0".into());
        }
        if let Policy::BatchMs(ms) = self.policy {
            if ms == 0 || ms > BATCH_MS_MAX {
                return bad(format!("batch-ms {ms} outside 1..={BATCH_MS_MAX}"));
            }
        }
        Ok(())
    }
}

/// Why the journal cannot open, recover or write.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("journal I/O on {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Damage in the middle of the log (not a torn tail): starting would lose or invent
    /// state, so the switch refuses. The operator restores the file or truncates it by
    /// hand, knowingly.
    #[error("journal corrupt in {} at offset {offset}: {detail}; refusing to start", file.display())]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Byte offset of the bad frame.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// A snapshot is damaged. Snapshots are written whole and renamed into place, so this
    /// is damage, not a crash; the previous snapshot is kept with the journal it needs:
    /// move the bad one away to recover from the older.
    #[error("snapshot {} damaged at offset {offset}: {detail}; refusing to start (move it away to recover from the previous snapshot)", file.display())]
    Snapshot {
        /// The snapshot file.
        file: PathBuf,
        /// Byte offset.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// A setting is out of range.
    #[error("journal config: {0}")]
    Config(String),
}

impl JournalError {
    fn io(path: &Path, source: io::Error) -> JournalError {
        JournalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Writer counters.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    records: AtomicU64,
    bytes: AtomicU64,
    batches: AtomicU64,
    batch_records_max: AtomicU64,
    fsyncs: AtomicU64,
    fsync_us_total: AtomicU64,
}

/// A copy of the writer's counters (metrics, benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Records written since open.
    pub records: u64,
    /// Bytes written since open (frames).
    pub bytes: u64,
    /// Group commits (writes).
    pub batches: u64,
    /// Largest batch, records.
    pub batch_records_max: u64,
    /// `fdatasync` calls.
    pub fsyncs: u64,
    /// Time spent in `fdatasync`, µs.
    pub fsync_us_total: u64,
    /// Highest LSN known durable.
    pub durable_lsn: u64,
    /// Next LSN to be assigned.
    pub next_lsn: u64,
    /// Records queued for the writer or being written now.
    pub queued: u64,
}

/// State shared by the handles, the writer and the snapshot thread.
pub(crate) struct Shared {
    cfg: JournalConfig,
    next_lsn: AtomicU64,
    durable_lsn: AtomicU64,
    stats: Stats,
    since_snapshot: AtomicU64,
    /// Records after which the next snapshot is due: `snapshot_every_records`, or half
    /// the entries of the last snapshot when that is more (see [`Journal::snapshot`]).
    snapshot_threshold: AtomicU64,
    snapshot_trigger: Mutex<Option<crossbeam::channel::Sender<()>>>,
    snapshot_lock: Mutex<()>,
    halted: std::sync::atomic::AtomicBool,
    /// A sync on the syncer thread failed: the writer fails every later item.
    sync_failed: std::sync::atomic::AtomicBool,
    /// Tests: while set, the syncer waits for one message per sync job.
    #[cfg(test)]
    sync_gate: Mutex<Option<crossbeam::channel::Receiver<()>>>,
    /// Why the writer failed (fail-stop), or `None` while it writes; read by readiness.
    failure: Mutex<Option<String>>,
}

#[cfg(test)]
impl Shared {
    /// Tests: hold the syncer until the test lets one sync through.
    fn test_sync_gate(&self) {
        let gate = self.sync_gate.lock().ok().and_then(|g| g.clone());
        if let Some(rx) = gate {
            let _ = rx.recv();
        }
    }
}

/// A handle on the open journal; cheap to clone. The writer thread runs until every
/// handle is dropped, then syncs and stops.
#[derive(Clone)]
pub struct Journal {
    tx: crossbeam::channel::Sender<Item>,
    slots: Arc<Semaphore>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.shared.cfg.dir)
            .field("policy", &self.shared.cfg.policy)
            .finish()
    }
}

/// A torn tail found and cut off at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment.
    pub file: PathBuf,
    /// Where it was truncated.
    pub offset: u64,
    /// Bytes dropped.
    pub bytes: u64,
}

/// What [`open`] found on disk, to be applied to a fresh engine with
/// [`Recovery::apply`] before the switch serves.
pub struct Recovery {
    snapshot: Option<(PathBuf, snapshot::SnapshotHeader)>,
    segments: Vec<(PathBuf, Vec<u8>)>,
    replay_from_lsn: u64,
    torn: Option<TornTail>,
    journal: Journal,
}

impl std::fmt::Debug for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recovery")
            .field("snapshot", &self.snapshot)
            .field("segments", &self.segments.len())
            .field("replay_from_lsn", &self.replay_from_lsn)
            .field("torn", &self.torn)
            .finish()
    }
}

/// What a recovery did.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// The snapshot loaded, if any.
    pub snapshot: Option<PathBuf>,
    /// Agreements from the snapshot.
    pub snapshot_agreements: u64,
    /// Orders from the snapshot.
    pub snapshot_orders: u64,
    /// Of those, settled orders from the chunk files the snapshot lists.
    pub snapshot_orders_from_chunk_files: u64,
    /// Journal records replayed after the snapshot.
    pub records_replayed: u64,
    /// A torn tail cut off at open.
    pub torn_tail: Option<TornTail>,
    /// Orders that may have reached a channel without a final state: now PENDING, to be
    /// queried on their channel (order, attempt reference, when). Schedule each as an
    /// `Action::Query`; never re-send them.
    pub pending: Vec<(OrderKey, OrderRef, u64)>,
    /// Orders that provably never reached a channel: failed (`NO_CHANNEL`), journaled,
    /// notification queued.
    pub failed_orders: usize,
    /// Final orders dropped as older than the retention.
    pub evicted_orders: usize,
    /// Wall time of the recovery, ms.
    pub took_ms: u64,
}

/// Open (or create) the journal in `cfg.dir`: find the newest snapshot, check every
/// segment it needs (cutting off a torn tail, refusing on damage in the middle), and
/// start the writer after the last valid record.
pub fn open(cfg: JournalConfig) -> Result<(Journal, Recovery), JournalError> {
    cfg.check()?;
    let dir = cfg.dir.clone();
    std::fs::create_dir_all(&dir).map_err(|e| JournalError::io(&dir, e))?;
    if cfg.policy == Policy::None {
        tracing::warn!(dir = %dir.display(), "JOURNAL POLICY none: records are never synced; a power failure can lose acknowledged orders. Benchmarks only.");
    }
    for e in std::fs::read_dir(&dir).map_err(|e| JournalError::io(&dir, e))? {
        let p = e.map_err(|e| JournalError::io(&dir, e))?.path();
        if p.extension().is_some_and(|x| x == "tmp") {
            let _ = std::fs::remove_file(&p);
        }
    }
    let snap = match snapshot::list(&dir)
        .map_err(|e| JournalError::io(&dir, e))?
        .pop()
    {
        Some((_, path)) => {
            let h = snapshot::read_header(&path)?;
            Some((path, h))
        }
        None => None,
    };
    let replay_from_lsn = snap.as_ref().map(|(_, h)| h.replay_from_lsn).unwrap_or(1);
    let segs = segment::list(&dir).map_err(|e| JournalError::io(&dir, e))?;
    let start = segs
        .iter()
        .rposition(|(first, _)| *first <= replay_from_lsn)
        .unwrap_or(0);
    let mut next_lsn = segs.get(start).map(|s| s.0).unwrap_or(replay_from_lsn);
    if next_lsn > replay_from_lsn {
        return Err(JournalError::Corrupt {
            file: segs[start].1.clone(),
            offset: 0,
            detail: format!("the log starts at LSN {next_lsn} but must start at or before {replay_from_lsn} (a segment is missing)"),
        });
    }
    let mut kept = Vec::new();
    let mut torn = None;
    let n = segs.len();
    for (i, (first, path)) in segs.iter().enumerate().skip(start) {
        let last = i + 1 == n;
        let mut bytes = std::fs::read(path).map_err(|e| JournalError::io(path, e))?;
        match segment::parse_header(&bytes) {
            Some(f) if f == *first && f == next_lsn => {}
            Some(f) if f == *first => {
                return Err(JournalError::Corrupt {
                    file: path.clone(),
                    offset: 0,
                    detail: format!("segment starts at LSN {f} but the log is at {next_lsn}"),
                })
            }
            _ if last && bytes.len() <= segment::HEADER_LEN && bytes.iter().all(|b| *b == 0)
                || last && bytes.len() < segment::HEADER_LEN =>
            {
                // Created but its header never reached the disk: an empty segment.
                tracing::warn!(file = %path.display(), "journal: torn segment header rewritten");
                let t =
                    writer::create_segment(&dir, *first).map_err(|e| JournalError::io(path, e))?;
                drop(t);
                bytes = segment::header(*first).to_vec();
            }
            _ => {
                return Err(JournalError::Corrupt {
                    file: path.clone(),
                    offset: 0,
                    detail: "bad segment header".into(),
                })
            }
        }
        let end = segment::scan(&bytes, &mut next_lsn, last, |_, _| Ok(()))
            .map_err(|e| scan_error(path, e))?;
        if let segment::ScanEnd::Torn { offset, bytes: cut } = end {
            tracing::warn!(file = %path.display(), offset, bytes = cut, "journal: torn tail truncated (a write the crash interrupted; never acknowledged)");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| JournalError::io(path, e))?;
            f.set_len(offset).map_err(|e| JournalError::io(path, e))?;
            f.sync_all().map_err(|e| JournalError::io(path, e))?;
            bytes.truncate(offset as usize);
            torn = Some(TornTail {
                file: path.clone(),
                offset,
                bytes: cut,
            });
        }
        kept.push((path.clone(), bytes));
    }
    if next_lsn < replay_from_lsn {
        let file = kept
            .last()
            .map(|k| k.0.clone())
            .unwrap_or_else(|| dir.clone());
        return Err(JournalError::Corrupt {
            file,
            offset: 0,
            detail: format!(
                "the log ends before LSN {replay_from_lsn}, where the snapshot says replay starts"
            ),
        });
    }
    let tail = match kept.last() {
        Some((path, bytes)) => {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(|e| JournalError::io(path, e))?;
            writer::Tail {
                file,
                path: path.clone(),
                len_bytes: bytes.len() as u64,
            }
        }
        None => writer::create_segment(&dir, next_lsn).map_err(|e| JournalError::io(&dir, e))?,
    };
    let shared = Arc::new(Shared {
        next_lsn: AtomicU64::new(next_lsn),
        durable_lsn: AtomicU64::new(next_lsn - 1),
        stats: Stats::default(),
        since_snapshot: AtomicU64::new(next_lsn - replay_from_lsn),
        snapshot_threshold: AtomicU64::new(cfg.snapshot_every_records),
        snapshot_trigger: Mutex::new(None),
        snapshot_lock: Mutex::new(()),
        halted: std::sync::atomic::AtomicBool::new(false),
        sync_failed: std::sync::atomic::AtomicBool::new(false),
        #[cfg(test)]
        sync_gate: Mutex::new(None),
        failure: Mutex::new(None),
        cfg,
    });
    let (tx, rx) = crossbeam::channel::unbounded();
    let sh = shared.clone();
    std::thread::Builder::new()
        .name("sluice-journal".into())
        .spawn(move || writer::run(rx, tail, next_lsn, sh))
        .map_err(|e| JournalError::io(&dir, e))?;
    let journal = Journal {
        tx,
        slots: Arc::new(Semaphore::new(shared.cfg.queue_max)),
        shared,
    };
    let recovery = Recovery {
        snapshot: snap,
        segments: kept,
        replay_from_lsn,
        torn,
        journal: journal.clone(),
    };
    Ok((journal, recovery))
}

/// Load the journal in `dir` into `engine` **read-only** (tools such as `sluice recon`,
/// possibly while a switch is writing the same directory): snapshot plus every record,
/// nothing truncated, no writer, nothing settled or evicted. A torn tail (or a record
/// being written right now) ends the read. Returns the records replayed.
pub fn load_read_only(dir: &Path, engine: &Engine) -> Result<u64, JournalError> {
    let snaps = snapshot::list(dir).map_err(|e| JournalError::io(dir, e))?;
    let from = match snaps.last() {
        Some((_, path)) => snapshot::load(path, engine, 0, 0)?.0.replay_from_lsn,
        None => 1,
    };
    let segs = segment::list(dir).map_err(|e| JournalError::io(dir, e))?;
    let start = segs.iter().rposition(|(f, _)| *f <= from).unwrap_or(0);
    let mut replayed = 0u64;
    let n = segs.len();
    for (i, (_, path)) in segs.iter().enumerate().skip(start) {
        let bytes = std::fs::read(path).map_err(|e| JournalError::io(path, e))?;
        let Some(mut next) = segment::parse_header(&bytes) else {
            if i + 1 == n {
                break;
            }
            return Err(JournalError::Corrupt {
                file: path.clone(),
                offset: 0,
                detail: "bad segment header".into(),
            });
        };
        segment::scan(&bytes, &mut next, i + 1 == n, |lsn, payload| {
            if lsn >= from {
                let rec = codec::decode(payload).map_err(|e| format!("record {lsn}: {e}"))?;
                engine.replay(rec, 0);
                replayed += 1;
            }
            Ok(())
        })
        .map_err(|e| scan_error(path, e))?;
    }
    Ok(replayed)
}

fn scan_error(path: &Path, e: segment::ScanError) -> JournalError {
    match e {
        segment::ScanError::Corrupt { offset, detail }
        | segment::ScanError::Record { offset, detail } => JournalError::Corrupt {
            file: path.to_path_buf(),
            offset,
            detail,
        },
    }
}

impl Recovery {
    /// Restore `engine` (fresh, nothing served yet): load the snapshot, replay the tail,
    /// then settle what the crash left open (see `Engine::finish_recovery`): orders
    /// possibly at a channel become PENDING and are listed in
    /// [`RecoveryReport::pending`] for querying; orders that never reached one are failed
    /// and that is journaled (durably) before this returns.
    ///
    /// Blocking and CPU-bound (seconds for millions of records); call it before serving,
    /// from `spawn_blocking` or a plain thread when inside a runtime.
    pub fn apply(self, engine: &Engine, now_ms: u64) -> Result<RecoveryReport, JournalError> {
        let started = Instant::now();
        let retention_ms = self.journal.shared.cfg.retention_ms;
        let cutoff_ms = now_ms.saturating_sub(retention_ms);
        let mut report = RecoveryReport {
            torn_tail: self.torn.clone(),
            ..RecoveryReport::default()
        };
        // The engine keeps full chunks of settled orders in files beside the journal.
        let dir = &self.journal.shared.cfg.dir;
        engine.keep_settled_in(dir);
        if self.snapshot.is_none() {
            // No snapshot refers to any chunk file: whatever is there is left from a run
            // that crashed before its first snapshot (its orders are in the journal).
            crate::engine::chunk_file::remove_where(dir, |_| true)
                .map_err(|e| JournalError::io(dir, e))?;
        }
        if let Some((path, _)) = &self.snapshot {
            let (_, loaded) = snapshot::load(path, engine, now_ms, cutoff_ms)?;
            report.snapshot = Some(path.clone());
            report.snapshot_agreements = loaded.agreements;
            report.snapshot_orders = loaded.orders;
            report.snapshot_orders_from_chunk_files = loaded.from_chunk_files;
        }
        let (replayed, resumed) = replay_and_settle(
            engine,
            &self.segments,
            self.replay_from_lsn,
            now_ms,
            retention_ms,
        )?;
        report.records_replayed = replayed;
        for rec in &resumed.failed {
            self.journal
                .append_blocking(rec)
                .map_err(|e| JournalError::io(&self.journal.shared.cfg.dir, e))?;
        }
        report.pending = resumed.pending;
        report.failed_orders = resumed.failed.len();
        report.evicted_orders = resumed.evicted;
        report.took_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            snapshot = ?report.snapshot, agreements = report.snapshot_agreements,
            orders = report.snapshot_orders,
            from_chunk_files = report.snapshot_orders_from_chunk_files,
            replayed = report.records_replayed,
            pending = report.pending.len(), failed = report.failed_orders,
            evicted = report.evicted_orders, took_ms = report.took_ms,
            "journal recovered"
        );
        Ok(report)
    }
}

/// The part of [`Recovery::apply`] after the snapshot: replay the checked segments'
/// records from LSN `from` on, then settle what the crash left open. Returns the records
/// replayed and what [`Engine::finish_recovery`] found; the caller journals
/// `failed` durably before serving and queries `pending`. Also the recovery path of the
/// deterministic simulation (`dst`), which keeps its segment in memory.
pub(crate) fn replay_and_settle(
    engine: &Engine,
    segments: &[(PathBuf, Vec<u8>)],
    from: u64,
    now_ms: u64,
    retention_ms: u64,
) -> Result<(u64, crate::engine::Resumed), JournalError> {
    let replayed = replay_parallel(engine, segments, from, now_ms)?;
    Ok((replayed, engine.finish_recovery(now_ms, retention_ms)))
}

/// Records per hand-off from the reader to a replay worker.
const REPLAY_BATCH: usize = 1024;

/// Replay the segments' records from `from` on into `engine` on every core.
///
/// The reader checks and decodes frames in LSN order and routes each record by what it
/// changes: order records by order key, agreement records by agreement id — so every
/// entity's records are applied in order by one worker, and workers never share an entity.
/// Acknowledgements and revocation notices (which touch notifications queued by other
/// entities' records) are kept aside and applied afterwards, in LSN order.
fn replay_parallel(
    engine: &Engine,
    segments: &[(PathBuf, Vec<u8>)],
    from: u64,
    now_ms: u64,
) -> Result<u64, JournalError> {
    use std::hash::{BuildHasher, Hash};
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    let hasher = std::hash::RandomState::new();
    let mut later: Vec<Record> = Vec::new();
    let mut replayed = 0u64;
    std::thread::scope(|s| -> Result<(), JournalError> {
        let mut txs = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = crossbeam::channel::bounded::<Vec<Record>>(4);
            txs.push(tx);
            s.spawn(move || {
                for batch in rx.iter() {
                    for rec in batch {
                        engine.replay(rec, now_ms);
                    }
                }
            });
        }
        let mut pending: Vec<Vec<Record>> = (0..workers)
            .map(|_| Vec::with_capacity(REPLAY_BATCH))
            .collect();
        let mut read = || -> Result<(), JournalError> {
            for (path, bytes) in segments {
                let Some(mut next) = segment::parse_header(bytes) else {
                    continue;
                };
                segment::scan(bytes, &mut next, true, |lsn, payload| {
                    if lsn < from {
                        return Ok(());
                    }
                    let rec = codec::decode(payload).map_err(|e| format!("record {lsn}: {e}"))?;
                    replayed += 1;
                    let w = match &rec {
                        Record::OrderAccepted { key, .. }
                        | Record::AttemptStarted { key, .. }
                        | Record::AttemptOutcome { key, .. }
                        | Record::OrderFinal { key, .. } => {
                            let mut h = hasher.build_hasher();
                            key.hash(&mut h);
                            std::hash::Hasher::finish(&h) as usize % workers
                        }
                        Record::Agreement(a) => (a.id.0 as usize) % workers,
                        Record::NotifyAcked { .. } | Record::RevocationNotice { .. } => {
                            later.push(rec);
                            return Ok(());
                        }
                    };
                    pending[w].push(rec);
                    if pending[w].len() >= REPLAY_BATCH {
                        let b =
                            std::mem::replace(&mut pending[w], Vec::with_capacity(REPLAY_BATCH));
                        txs[w]
                            .send(b)
                            .map_err(|_| "replay worker stopped".to_string())?;
                    }
                    Ok(())
                })
                .map_err(|e| scan_error(path, e))?;
            }
            Ok(())
        };
        let res = read();
        for (w, b) in pending.into_iter().enumerate() {
            if !b.is_empty() {
                let _ = txs[w].send(b);
            }
        }
        drop(txs);
        res
    })?;
    for rec in later {
        engine.replay(rec, now_ms);
    }
    Ok(replayed)
}

impl Journal {
    /// The settings it was opened with.
    pub fn config(&self) -> &JournalConfig {
        &self.shared.cfg
    }

    /// Append from a thread (not an async task): blocks until durable per policy.
    /// Bypasses the queue bound (start-up and tools only).
    pub fn append_blocking(&self, rec: &Record) -> io::Result<()> {
        let mut payload = Vec::with_capacity(128);
        codec::encode(rec, &mut payload);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.tx
            .send(Item::Append {
                payload,
                done: Done::Blocking(tx),
                permit: None,
            })
            .map_err(|_| io::Error::other("journal writer stopped"))?;
        rx.recv()
            .map_err(|_| io::Error::other("journal writer stopped"))?
    }

    /// Append many records from a thread (bulk agreement import, tools): they are queued
    /// in chunks so the writer commits them in large batches; returns once all are
    /// durable per policy. Bypasses the queue bound like [`Journal::append_blocking`].
    pub fn append_all_blocking<'a>(
        &self,
        recs: impl IntoIterator<Item = &'a Record>,
    ) -> io::Result<u64> {
        const CHUNK: usize = 8192;
        let stopped = || io::Error::other("journal writer stopped");
        let mut n = 0u64;
        let mut it = recs.into_iter().peekable();
        while it.peek().is_some() {
            let (tx, rx) = std::sync::mpsc::sync_channel(CHUNK);
            let mut sent = 0;
            for rec in it.by_ref().take(CHUNK) {
                let mut payload = Vec::with_capacity(128);
                codec::encode(rec, &mut payload);
                self.tx
                    .send(Item::Append {
                        payload,
                        done: Done::Blocking(tx.clone()),
                        permit: None,
                    })
                    .map_err(|_| stopped())?;
                sent += 1;
            }
            drop(tx);
            for _ in 0..sent {
                rx.recv().map_err(|_| stopped())??;
            }
            n += sent as u64;
        }
        Ok(n)
    }

    /// Make everything appended so far durable, whatever the policy (blocking).
    pub fn sync_blocking(&self) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.tx
            .send(Item::Sync(Done::Blocking(tx)))
            .map_err(|_| io::Error::other("journal writer stopped"))?;
        rx.recv()
            .map_err(|_| io::Error::other("journal writer stopped"))?
    }

    /// Make everything appended so far durable, whatever the policy (graceful shutdown).
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Item::Sync(Done::Async(tx)))
            .map_err(|_| io::Error::other("journal writer stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("journal writer stopped"))?
    }

    /// Writer counters.
    pub fn stats(&self) -> JournalStats {
        let s = &self.shared.stats;
        JournalStats {
            records: s.records.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            batch_records_max: s.batch_records_max.load(Ordering::Relaxed),
            fsyncs: s.fsyncs.load(Ordering::Relaxed),
            fsync_us_total: s.fsync_us_total.load(Ordering::Relaxed),
            durable_lsn: self.shared.durable_lsn.load(Ordering::Acquire),
            next_lsn: self.shared.next_lsn.load(Ordering::Acquire),
            queued: self
                .shared
                .cfg
                .queue_max
                .saturating_sub(self.slots.available_permits()) as u64,
        }
    }

    /// Why the journal can take no more records (the writer failed or stopped), or
    /// `None` while it works (readiness).
    pub fn failure(&self) -> Option<String> {
        if self.shared.halted.load(Ordering::Acquire) {
            return Some("journal halted".into());
        }
        self.shared
            .failure
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Take a snapshot of `engine` now (blocking; the engine keeps serving meanwhile),
    /// then delete what no snapshot needs any more — keeping the previous snapshot and
    /// the journal under it as a fallback — and forget final orders past the retention.
    pub fn snapshot(&self, engine: &Engine, now_ms: u64) -> Result<SnapshotInfo, JournalError> {
        let _one = self
            .shared
            .snapshot_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let dir = &self.shared.cfg.dir;
        let cutoff_ms = now_ms.saturating_sub(self.shared.cfg.retention_ms);
        let from = self.shared.next_lsn.load(Ordering::Acquire);
        let (tmp, info) = snapshot::write(dir, engine, from, now_ms, cutoff_ms)
            .map_err(|e| JournalError::io(dir, e))?;
        // Every record below `from` must be durable before a snapshot claims to cover it.
        self.sync_blocking().map_err(|e| JournalError::io(dir, e))?;
        snapshot::publish(dir, &tmp, from).map_err(|e| JournalError::io(dir, e))?;
        let next = self.shared.next_lsn.load(Ordering::Acquire);
        self.shared
            .since_snapshot
            .store(next.saturating_sub(from), Ordering::Relaxed);
        // A snapshot rewrites every agreement and every order not in a settled chunk file,
        // so taking one every fixed number of records would cost more per record as that
        // state grows (600 MB every 30 s with 5M orders copied at 8.8k orders/s, before
        // chunk files). The next one waits for at least half as many records as this one
        // had entries: the cost per record stays bounded, and a restart replays at most
        // about that many.
        let half = (info.agreements + info.orders + info.notifications) / 2;
        self.shared.snapshot_threshold.store(
            self.shared.cfg.snapshot_every_records.max(half),
            Ordering::Relaxed,
        );
        prune(dir).map_err(|e| JournalError::io(dir, e))?;
        let kept: Vec<PathBuf> = snapshot::list(dir)
            .map_err(|e| JournalError::io(dir, e))?
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        let chunks_removed =
            snapshot::prune_chunks(dir, &kept).map_err(|e| JournalError::io(dir, e))?;
        let evicted = engine.evict_final_orders_before(cutoff_ms);
        tracing::info!(
            lsn = from,
            agreements = info.agreements,
            orders = info.orders,
            settled_chunks = info.chunks,
            chunks_removed,
            bytes = info.bytes,
            took_ms = info.took_ms,
            evicted,
            "journal snapshot written"
        );
        Ok(info)
    }

    /// Start the snapshot thread: a snapshot every `snapshot_every_records` records.
    /// It runs until [`Journal::close`].
    pub fn start_snapshots(&self, engine: Arc<Engine>) {
        let (tx, rx) = crossbeam::channel::bounded::<()>(1);
        if let Ok(mut g) = self.shared.snapshot_trigger.lock() {
            *g = Some(tx);
        }
        let j = self.clone();
        let spawned = std::thread::Builder::new()
            .name("sluice-snapshot".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // A trigger queued while the last snapshot was being written may be
                    // stale: the count restarted when that one was published.
                    if j.shared.since_snapshot.load(Ordering::Relaxed)
                        < j.shared.snapshot_threshold.load(Ordering::Relaxed)
                    {
                        continue;
                    }
                    if let Err(e) = j.snapshot(&engine, crate::app::now_ms()) {
                        tracing::error!(error = %e, "journal snapshot failed; the journal keeps growing until the next try");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "journal snapshot thread not started");
        }
    }

    /// Stop the snapshot thread and sync. The writer thread ends (after a final sync)
    /// once every handle is dropped.
    pub fn close(&self) -> io::Result<()> {
        if let Ok(mut g) = self.shared.snapshot_trigger.lock() {
            g.take();
        }
        self.sync_blocking()
    }

    /// Simulate a crash (tests): from now on the writer writes and syncs nothing and
    /// fails every append, as if the process had died; what was already written stays
    /// in the file (the OS page cache survives a process crash).
    pub fn halt(&self) {
        self.shared.halted.store(true, Ordering::Release);
        if let Ok(mut g) = self.shared.snapshot_trigger.lock() {
            g.take();
        }
    }
}

/// Keep the two newest snapshots and the segments the older one needs.
fn prune(dir: &Path) -> io::Result<()> {
    let snaps = snapshot::list(dir)?;
    let keep = snaps.len().saturating_sub(2);
    for (_, p) in &snaps[..keep] {
        std::fs::remove_file(p)?;
    }
    let Some(&(keep_from, _)) = snaps.get(keep) else {
        return Ok(());
    };
    let segs = segment::list(dir)?;
    for w in segs.windows(2) {
        if w[1].0 <= keep_from {
            std::fs::remove_file(&w[0].1)?;
        }
    }
    writer::sync_dir(dir)
}

impl JournalSink for Journal {
    fn append(&self, rec: Record) -> BoxFuture<'static, io::Result<()>> {
        self.append_all(vec![rec])
    }

    fn try_append_detached(&self, rec: &Record) -> bool {
        // A queue slot like any append (the queue stays bounded); none free, the caller
        // waits for one the usual way.
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            return false;
        };
        let mut payload = Vec::with_capacity(128);
        codec::encode(rec, &mut payload);
        self.tx
            .send(Item::Append {
                payload,
                done: Done::Silent,
                permit: Some(permit),
            })
            .is_ok()
    }

    fn append_all(&self, recs: Vec<Record>) -> BoxFuture<'static, io::Result<()>> {
        // Encoding happens here, on the appending task, in parallel across sessions;
        // the writer only frames and writes.
        let payloads: Vec<Vec<u8>> = recs
            .iter()
            .map(|rec| {
                let mut payload = Vec::with_capacity(128);
                codec::encode(rec, &mut payload);
                payload
            })
            .collect();
        let tx = self.tx.clone();
        let slots = self.slots.clone();
        Box::pin(async move {
            let n = u32::try_from(payloads.len()).unwrap_or(u32::MAX);
            if n == 0 {
                return Ok(());
            }
            let permit = slots
                .acquire_many_owned(n)
                .await
                .map_err(|_| io::Error::other("journal closed"))?;
            let (done, rx) = tokio::sync::oneshot::channel();
            let (mut done, mut permit) = (Some(done), Some(permit));
            let last = payloads.len() - 1;
            for (i, payload) in payloads.into_iter().enumerate() {
                // The writer completes items in queue order and fails every item after a
                // failure, so the last record's answer speaks for all of them; it also
                // holds the queue slots of all of them.
                let (done, permit) = if i == last {
                    (done.take().map(Done::Async), permit.take())
                } else {
                    (Some(Done::Silent), None)
                };
                tx.send(Item::Append {
                    payload,
                    done: done.unwrap_or(Done::Silent),
                    permit,
                })
                .map_err(|_| io::Error::other("journal writer stopped"))?;
            }
            rx.await
                .map_err(|_| io::Error::other("journal writer stopped"))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn open_with(dir: &Path, policy: Policy) -> Journal {
        let mut cfg = JournalConfig::new(dir);
        cfg.policy = policy;
        let (j, r) = open(cfg).unwrap();
        drop(r);
        j
    }

    fn acked(n: u64) -> Vec<Record> {
        (0..n)
            .map(|id| Record::NotifyAcked { notify_id: id })
            .collect()
    }

    /// Hold the syncer: every sync job waits for one message on the returned sender.
    fn hold_syncs(j: &Journal) -> crossbeam::channel::Sender<()> {
        let (tx, rx) = crossbeam::channel::unbounded();
        *j.shared.sync_gate.lock().unwrap() = Some(rx);
        tx
    }

    /// Ask for a sync from another thread and return once the writer has taken it (its
    /// batch is counted before the writer completes or hands off its items).
    fn sync_in_background(j: &Journal) -> std::sync::mpsc::Receiver<io::Result<()>> {
        let before = j.stats().batches;
        let (tx, rx) = std::sync::mpsc::channel();
        let j2 = j.clone();
        std::thread::spawn(move || tx.send(j2.sync_blocking()).unwrap());
        wait_until("the writer takes the sync", || j.stats().batches > before);
        rx
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "timed out waiting: {what}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Every record in `dir`'s segments, in LSN order.
    fn records_in(dir: &Path) -> Vec<Record> {
        let mut out = Vec::new();
        let segs = segment::list(dir).unwrap();
        let mut next = segs.first().map(|s| s.0).unwrap_or(1);
        for (i, (_, path)) in segs.iter().enumerate() {
            let bytes = std::fs::read(path).unwrap();
            segment::scan(&bytes, &mut next, i + 1 == segs.len(), |_, payload| {
                out.push(codec::decode(payload).map_err(|e| e.to_string())?);
                Ok(())
            })
            .unwrap();
        }
        out
    }

    /// A detached record is written in queue order among waited-for ones, and counts
    /// against the queue bound like them.
    #[test]
    fn detached_appends_are_written_in_queue_order() {
        let dir = tempfile::tempdir().unwrap();
        let j = open_with(dir.path(), Policy::Fsync);
        let rec = |id| Record::NotifyAcked { notify_id: id };
        j.append_blocking(&rec(1)).unwrap();
        assert!(j.try_append_detached(&rec(2)));
        j.append_blocking(&rec(3)).unwrap();
        assert!(j.try_append_detached(&rec(4)));
        j.close().unwrap();
        let ids: Vec<u64> = records_in(dir.path())
            .into_iter()
            .map(|r| match r {
                Record::NotifyAcked { notify_id } => notify_id,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(ids, [1, 2, 3, 4]);
    }

    /// With the writer's queue full a detached append is refused (the caller then waits
    /// for a slot), and it takes a slot of its own while queued.
    #[test]
    fn a_full_queue_refuses_a_detached_append() {
        let dir = tempfile::tempdir().unwrap();
        let j = open_with(dir.path(), Policy::None);
        let all = j.slots.available_permits();
        let held = j.slots.clone().try_acquire_many_owned(all as u32).unwrap();
        assert!(!j.try_append_detached(&Record::NotifyAcked { notify_id: 1 }));
        drop(held);
        assert!(j.try_append_detached(&Record::NotifyAcked { notify_id: 2 }));
        j.sync_blocking().unwrap();
        wait_until("the slot is given back", || {
            j.slots.available_permits() == all
        });
        j.close().unwrap();
        assert_eq!(
            records_in(dir.path()),
            [Record::NotifyAcked { notify_id: 2 }]
        );
    }

    /// After a failed write a detached record fails like any other: nothing after the
    /// failure is written, and the next waited-for append reports the failure.
    #[test]
    fn a_failed_journal_fails_what_follows_a_detached_append() {
        let dir = tempfile::tempdir().unwrap();
        let j = open_with(dir.path(), Policy::Fsync);
        j.append_blocking(&Record::NotifyAcked { notify_id: 1 })
            .unwrap();
        j.shared.halted.store(true, Ordering::Release);
        assert!(j.try_append_detached(&Record::NotifyAcked { notify_id: 2 }));
        assert!(j
            .append_blocking(&Record::NotifyAcked { notify_id: 3 })
            .is_err());
        assert!(j.failure().is_some());
        j.shared.halted.store(false, Ordering::Release);
        assert_eq!(
            records_in(dir.path()),
            [Record::NotifyAcked { notify_id: 1 }]
        );
    }

    /// A snapshot's (or a close's) sync runs off the writer: appends are answered while
    /// it is held, and it completes, durable through what was written before it, once the
    /// syncer may run.
    #[test]
    fn an_explicit_sync_does_not_hold_appends_back() {
        for policy in [Policy::None, Policy::BatchMs(1_000)] {
            let dir = tempfile::tempdir().unwrap();
            let j = open_with(dir.path(), policy);
            j.append_all_blocking(&acked(100)).unwrap();
            let gate = hold_syncs(&j);
            let rx = sync_in_background(&j);
            // The sync is handed to the (held) syncer; the writer keeps taking appends.
            j.append_all_blocking(&acked(1_000)).unwrap();
            assert!(
                rx.try_recv().is_err(),
                "{policy:?}: the sync finished while held"
            );
            assert!(
                j.stats().durable_lsn < 100,
                "{policy:?}: durable before the sync"
            );
            gate.send(()).unwrap();
            rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
            assert!(j.stats().durable_lsn >= 100, "{policy:?}: {:?}", j.stats());
            *j.shared.sync_gate.lock().unwrap() = None;
            drop(gate);
            j.close().unwrap();
            assert_eq!(j.stats().durable_lsn, j.stats().next_lsn - 1);
        }
    }

    /// Under `none` nobody asks for a sync, yet the file is written back every
    /// BACKGROUND_SYNC_BYTES, so a roll or a snapshot finds little left to sync.
    #[test]
    fn policy_none_writes_back_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let j = open_with(dir.path(), Policy::None);
        let mut payload = Vec::new();
        codec::encode(&Record::NotifyAcked { notify_id: 1 }, &mut payload);
        let frame = payload.len() as u64 + 16;
        let n = 3 * writer::BACKGROUND_SYNC_BYTES / frame;
        j.append_all_blocking(&acked(n)).unwrap();
        wait_until("a background write-back", || j.stats().durable_lsn > 0);
        let s = j.stats();
        assert!(s.fsyncs >= 1, "{s:?}");
        assert!(s.durable_lsn < s.next_lsn, "{s:?}");
        j.close().unwrap();
    }

    /// Under `fsync` every batch is synced inline: a later explicit sync has nothing to
    /// hand off and completes at once, even with the syncer held.
    #[test]
    fn under_fsync_an_explicit_sync_needs_no_syncer() {
        let dir = tempfile::tempdir().unwrap();
        let j = open_with(dir.path(), Policy::Fsync);
        j.append_all_blocking(&acked(10)).unwrap();
        let _gate = hold_syncs(&j);
        j.sync_blocking().unwrap();
        assert_eq!(j.stats().durable_lsn, 10);
    }

    /// A failed sync on the syncer fails the journal: every later append fails.
    #[test]
    fn a_failed_sync_on_the_syncer_fails_later_appends() {
        let dir = tempfile::tempdir().unwrap();
        let j = open_with(dir.path(), Policy::None);
        j.append_all_blocking(&acked(10)).unwrap();
        let gate = hold_syncs(&j);
        let rx = sync_in_background(&j);
        // Only the syncer sees this: the writer has no batch while it is set (it checks
        // at the start of a batch, and the sync's batch is past that).
        j.shared.halted.store(true, Ordering::Release);
        gate.send(()).unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap().is_err());
        j.shared.halted.store(false, Ordering::Release);
        assert!(j.failure().is_some());
        assert!(j
            .append_blocking(&Record::NotifyAcked { notify_id: 99 })
            .is_err());
        assert_eq!(j.stats().durable_lsn, 0);
    }
}
