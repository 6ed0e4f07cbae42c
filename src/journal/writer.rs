//! The one writer thread: group commit.
//!
//! Sessions encode their record (in parallel, on their own tasks) and queue it; the
//! writer takes everything queued at once, frames it with consecutive LSNs into one
//! buffer, issues one `write` and — under [`Policy::Fsync`] — one `fdatasync`, then
//! completes every waiter of the batch. Under load a batch holds hundreds of records, so
//! the fsync cost is shared; when idle a batch is one record and latency is one fsync.
//!
//! It is an OS thread, not a task: `write` and `fdatasync` block, and a dedicated thread
//! keeps them off the async workers without `spawn_blocking` churn per batch.
//!
//! Syncs that nobody's append waits for run on a second thread, the *syncer*, so that
//! appends keep flowing meanwhile: an explicit [`Item::Sync`] (a snapshot making the log
//! under it durable, a graceful close) and, under [`Policy::None`], a background
//! write-back every [`BACKGROUND_SYNC_BYTES`]. The syncer calls `fdatasync` on a clone of
//! the tail's file descriptor, which writes back everything written to the file before
//! the call. Before this, the writer ran those syncs inline: under `none` a snapshot's
//! sync wrote back the whole never-synced segment (up to 64 MiB) while every append
//! waited, 1.8-2.1 s at 22.7k debits/s (BENCHMARKS.md).
//!
//! Concurrency note: a segment roll still syncs the old segment inline, before the next
//! segment gets its first record, so the log on disk never has a newer segment beside a
//! torn older one (recovery truncates a torn tail only in the last segment). The
//! background write-back keeps what that inline sync has left to do small. A sync handed
//! to the syncer covers every record written before the hand-off, whatever segment it is
//! in: older segments were synced by their roll.
//!
//! Failure is fail-stop: after a failed write or fsync the file's state is unknown
//! (a failed fsync may have dropped dirty pages), so every later append fails too and the
//! shell stops the switch (app.rs). Nothing is retried.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, RecvTimeoutError};
use tokio::sync::OwnedSemaphorePermit;

use super::segment;
use super::{Policy, Shared};

/// Most records in one group commit (bounds the batch buffer and the time waiters of
/// the first record wait for the last one's framing).
pub const BATCH_RECORDS_MAX: usize = 8192;

/// Bytes written under [`Policy::None`] after which the syncer writes them back in the
/// background (nobody waits for it). Without it the kernel leaves a segment dirty for up
/// to 30 s (`dirty_expire_centisecs`), so the inline sync at a segment roll wrote back up
/// to 64 MiB while every append waited. 4 MiB is ~25k records: at 100k records/s one
/// background sync every ~0.25 s, each a few ms of disk time.
pub const BACKGROUND_SYNC_BYTES: u64 = 4 << 20;

/// Sync jobs queued for the syncer. Explicit syncs come from a handful of threads (the
/// snapshot thread, a closing switch) and background ones are only queued when none is
/// waiting, so the queue stays short; when it is full the writer waits (backpressure).
const SYNC_QUEUE_MAX: usize = 16;

/// Who waits for an item.
pub enum Done {
    /// An async appender.
    Async(tokio::sync::oneshot::Sender<io::Result<()>>),
    /// A thread (recovery, snapshots, benches).
    Blocking(std::sync::mpsc::SyncSender<io::Result<()>>),
    /// Nobody: a record queued ahead of others in one append, whose last record's
    /// waiter learns the result for all (the writer completes items in queue order, and
    /// a failure fails every later item).
    Silent,
}

impl Done {
    fn complete(self, r: &io::Result<()>) {
        let r = match r {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        match self {
            Done::Async(tx) => {
                let _ = tx.send(r);
            }
            Done::Blocking(tx) => {
                let _ = tx.send(r);
            }
            Done::Silent => {}
        }
    }
}

/// What the writer is asked to do.
pub enum Item {
    /// Append an encoded record.
    Append {
        /// `codec::encode` output.
        payload: Vec<u8>,
        /// Completed when durable per policy.
        done: Done,
        /// The queue slot, released when the batch is done (bounds queued + in-write).
        permit: Option<OwnedSemaphorePermit>,
    },
    /// Make everything before this durable whatever the policy (snapshots, close).
    Sync(Done),
}

/// The open segment the writer appends to.
pub struct Tail {
    /// Its file, positioned at the end.
    pub file: File,
    /// Its path (for errors).
    pub path: PathBuf,
    /// Bytes in it.
    pub len_bytes: u64,
}

/// Fsync a directory so a created, renamed or removed entry is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Create a new segment starting at `first_lsn`, header synced.
pub fn create_segment(dir: &Path, first_lsn: u64) -> io::Result<Tail> {
    let path = dir.join(segment::file_name(first_lsn));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    file.write_all(&segment::header(first_lsn))?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(Tail {
        file,
        path,
        len_bytes: segment::HEADER_LEN as u64,
    })
}

/// One sync for the syncer thread.
struct SyncJob {
    /// A clone of the tail segment's descriptor at the hand-off.
    file: File,
    /// The last LSN written before the hand-off: durable once the sync returns.
    upto_lsn: u64,
    /// Who waits for it; `None` for a background write-back.
    done: Option<Done>,
}

/// Run the syncer until the writer drops its sender. A failed sync fails the journal
/// (fail-stop, as a failed inline sync does): the writer sees `sync_failed` at its next
/// batch and fails every later item.
fn syncer(rx: Receiver<SyncJob>, shared: Arc<Shared>) {
    for job in rx {
        #[cfg(test)]
        shared.test_sync_gate();
        let result = if shared.halted.load(Ordering::Acquire) {
            Err(io::Error::other("journal halted (simulated crash)"))
        } else {
            let t = Instant::now();
            let r = job.file.sync_data();
            shared
                .stats
                .fsync_us_total
                .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
            shared.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            r
        };
        match &result {
            Ok(()) => {
                shared.durable_lsn.fetch_max(job.upto_lsn, Ordering::AcqRel);
            }
            Err(e) => {
                tracing::error!(error = %e, "journal sync failed; the journal is now failed (fail-stop)");
                if let Ok(mut g) = shared.failure.lock() {
                    g.get_or_insert_with(|| format!("sync failed: {e}"));
                }
                shared.sync_failed.store(true, Ordering::Release);
            }
        }
        if let Some(d) = job.done {
            d.complete(&result);
        }
    }
}

/// Hand a sync of everything written so far to the syncer. Without a descriptor clone
/// (out of descriptors) the sync runs here instead: slower, never skipped.
fn hand_off(
    syncs: &crossbeam::channel::Sender<SyncJob>,
    tail: &Tail,
    upto_lsn: u64,
    done: Option<Done>,
    shared: &Shared,
) {
    match tail.file.try_clone() {
        Ok(file) => {
            let job = SyncJob {
                file,
                upto_lsn,
                done,
            };
            if let Err(e) = syncs.send(job) {
                if let Some(d) = e.into_inner().done {
                    d.complete(&Err(io::Error::other("journal syncer stopped")));
                }
            }
        }
        Err(_) => {
            let r = tail.file.sync_data();
            match &r {
                Ok(()) => {
                    shared.durable_lsn.fetch_max(upto_lsn, Ordering::AcqRel);
                }
                Err(e) => {
                    if let Ok(mut g) = shared.failure.lock() {
                        g.get_or_insert_with(|| format!("sync failed: {e}"));
                    }
                    shared.sync_failed.store(true, Ordering::Release);
                }
            }
            if let Some(d) = done {
                d.complete(&r);
            }
        }
    }
}

/// Run the writer until every sender is gone.
pub fn run(rx: Receiver<Item>, tail: Tail, next_lsn: u64, shared: Arc<Shared>) {
    let (syncs, jobs) = crossbeam::channel::bounded(SYNC_QUEUE_MAX);
    let sh = shared.clone();
    let syncer = std::thread::Builder::new()
        .name("sluice-journal-sync".into())
        .spawn(move || syncer(jobs, sh));
    let syncer = match syncer {
        Ok(h) => h,
        Err(e) => {
            // Without a syncer nothing could be made durable off this thread: fail-stop.
            tracing::error!(error = %e, "journal syncer thread not started; the journal is failed");
            if let Ok(mut g) = shared.failure.lock() {
                *g = Some(format!("syncer thread not started: {e}"));
            }
            shared.sync_failed.store(true, Ordering::Release);
            let (dead, _) = crossbeam::channel::bounded(0);
            return write_loop(rx, tail, next_lsn, &shared, dead);
        }
    };
    write_loop(rx, tail, next_lsn, &shared, syncs);
    let _ = syncer.join();
}

/// The writer's loop; returns when every sender is gone, after dropping `syncs` and
/// syncing what is left.
fn write_loop(
    rx: Receiver<Item>,
    mut tail: Tail,
    mut next_lsn: u64,
    shared: &Shared,
    syncs: crossbeam::channel::Sender<SyncJob>,
) {
    let policy = shared.cfg.policy;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut batch: Vec<Item> = Vec::with_capacity(BATCH_RECORDS_MAX);
    let mut dirty_since: Option<Instant> = None;
    let mut failed: Option<String> = None;
    // Bytes written since the last background write-back was queued (policy none).
    let mut unsynced_bytes: u64 = 0;
    loop {
        // Block for the first item; under batch-ms wake up in time to sync dirty data.
        let first = match (policy, dirty_since) {
            (Policy::BatchMs(ms), Some(t)) => {
                let wait = Duration::from_millis(ms).saturating_sub(t.elapsed());
                match rx.recv_timeout(wait) {
                    Ok(i) => Some(i),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            _ => match rx.recv() {
                Ok(i) => Some(i),
                Err(_) => break,
            },
        };
        batch.clear();
        batch.extend(first);
        while batch.len() < BATCH_RECORDS_MAX {
            match rx.try_recv() {
                Ok(i) => batch.push(i),
                Err(_) => break,
            }
        }
        if failed.is_none() && shared.halted.load(Ordering::Acquire) {
            failed = Some("halted (simulated crash)".into());
        }
        if failed.is_none() && shared.sync_failed.load(Ordering::Acquire) {
            failed = Some("a sync on the syncer thread failed".into());
        }
        if let Some(why) = &failed {
            let e: io::Result<()> = Err(io::Error::other(format!("journal failed earlier: {why}")));
            for i in batch.drain(..) {
                match i {
                    Item::Append { done, .. } | Item::Sync(done) => done.complete(&e),
                }
            }
            continue;
        }
        buf.clear();
        let mut records = 0u64;
        for i in &batch {
            if let Item::Append { payload, .. } = i {
                segment::put_frame(&mut buf, next_lsn, payload);
                next_lsn += 1;
                records += 1;
            }
        }
        // Published before the write: a snapshot that reads it covers every record below
        // (their engine changes happened before they were queued).
        shared.next_lsn.store(next_lsn, Ordering::Release);
        let mut result = Ok(());
        if !buf.is_empty() {
            result = tail.file.write_all(&buf);
            tail.len_bytes += buf.len() as u64;
            unsynced_bytes += buf.len() as u64;
            if dirty_since.is_none() {
                dirty_since = Some(Instant::now());
            }
        }
        // Explicit syncs (`Item::Sync`) are not done here: see the syncer, below.
        let sync_now = match policy {
            Policy::Fsync => records > 0,
            Policy::BatchMs(ms) => {
                dirty_since.is_some_and(|t| t.elapsed() >= Duration::from_millis(ms))
            }
            Policy::None => false,
        };
        if result.is_ok() && sync_now && dirty_since.is_some() {
            let t = Instant::now();
            result = tail.file.sync_data();
            shared
                .stats
                .fsync_us_total
                .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
            shared.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            dirty_since = None;
            unsynced_bytes = 0;
            shared.durable_lsn.fetch_max(next_lsn - 1, Ordering::AcqRel);
        }
        if result.is_ok() && tail.len_bytes >= shared.cfg.segment_bytes {
            result = roll(&shared.cfg.dir, &mut tail, next_lsn);
            dirty_since = None;
            unsynced_bytes = 0;
            if result.is_ok() {
                shared.durable_lsn.fetch_max(next_lsn - 1, Ordering::AcqRel);
            }
        }
        // A background write-back under `none`, when none is queued yet (one may be
        // running): bounds what a roll's inline sync and a snapshot's sync find dirty.
        if result.is_ok()
            && policy == Policy::None
            && unsynced_bytes >= BACKGROUND_SYNC_BYTES
            && syncs.is_empty()
        {
            hand_off(&syncs, &tail, next_lsn - 1, None, shared);
            unsynced_bytes = 0;
        }
        if let Err(e) = &result {
            tracing::error!(file = %tail.path.display(), error = %e, "journal write failed; the journal is now failed (fail-stop)");
            failed = Some(e.to_string());
            if let Ok(mut g) = shared.failure.lock() {
                *g = failed.clone();
            }
        }
        let st = &shared.stats;
        st.records.fetch_add(records, Ordering::Relaxed);
        st.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        st.batches.fetch_add(1, Ordering::Relaxed);
        st.batch_records_max.fetch_max(records, Ordering::Relaxed);
        // Under fsync every waiter is durable here; under batch-ms / none it is written
        // (in the page cache: survives a process crash, not a power loss).
        for i in batch.drain(..) {
            match i {
                Item::Append { done, permit, .. } => {
                    done.complete(&result);
                    drop(permit);
                }
                // Everything written is already synced here (fsync policy, or nothing
                // written since the last sync): nothing to hand off.
                Item::Sync(done) if result.is_err() || dirty_since.is_none() => {
                    done.complete(&result)
                }
                // The syncer syncs what this batch wrote, and whatever came before it,
                // while this thread goes on appending.
                Item::Sync(done) => hand_off(&syncs, &tail, next_lsn - 1, Some(done), shared),
            }
        }
        if records > 0 {
            let since = shared.since_snapshot.fetch_add(records, Ordering::Relaxed) + records;
            if since >= shared.snapshot_threshold.load(Ordering::Relaxed) {
                if let Some(t) = shared.snapshot_trigger.lock().ok().and_then(|g| g.clone()) {
                    let _ = t.try_send(());
                }
            }
        }
    }
    if let Ok(mut g) = shared.failure.lock() {
        g.get_or_insert_with(|| "journal writer stopped".into());
    }
    drop(syncs);
    if failed.is_none()
        && dirty_since.is_some()
        && !shared.halted.load(Ordering::Acquire)
        && tail.file.sync_data().is_ok()
    {
        shared.durable_lsn.fetch_max(next_lsn - 1, Ordering::AcqRel);
    }
}

/// Seal the current segment (synced) and start the next.
fn roll(dir: &Path, tail: &mut Tail, next_lsn: u64) -> io::Result<()> {
    tail.file.sync_data()?;
    *tail = create_segment(dir, next_lsn)?;
    Ok(())
}
