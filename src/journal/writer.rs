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

/// Run the writer until every sender is gone.
pub fn run(rx: Receiver<Item>, mut tail: Tail, mut next_lsn: u64, shared: Arc<Shared>) {
    let policy = shared.cfg.policy;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut batch: Vec<Item> = Vec::with_capacity(BATCH_RECORDS_MAX);
    let mut dirty_since: Option<Instant> = None;
    let mut failed: Option<String> = None;
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
        let mut sync_asked = false;
        for i in &batch {
            match i {
                Item::Append { payload, .. } => {
                    segment::put_frame(&mut buf, next_lsn, payload);
                    next_lsn += 1;
                    records += 1;
                }
                Item::Sync(_) => sync_asked = true,
            }
        }
        // Published before the write: a snapshot that reads it covers every record below
        // (their engine changes happened before they were queued).
        shared.next_lsn.store(next_lsn, Ordering::Release);
        let mut result = Ok(());
        if !buf.is_empty() {
            result = tail.file.write_all(&buf);
            tail.len_bytes += buf.len() as u64;
            if dirty_since.is_none() {
                dirty_since = Some(Instant::now());
            }
        }
        let sync_now = match policy {
            Policy::Fsync => records > 0 || sync_asked,
            Policy::BatchMs(ms) => {
                sync_asked || dirty_since.is_some_and(|t| t.elapsed() >= Duration::from_millis(ms))
            }
            Policy::None => sync_asked,
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
            shared.durable_lsn.store(next_lsn - 1, Ordering::Release);
        }
        if result.is_ok() && tail.len_bytes >= shared.cfg.segment_bytes {
            result = roll(&shared.cfg.dir, &mut tail, next_lsn);
            dirty_since = None;
            if result.is_ok() {
                shared.durable_lsn.store(next_lsn - 1, Ordering::Release);
            }
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
                Item::Sync(done) => done.complete(&result),
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
    if failed.is_none() && dirty_since.is_some() && !shared.halted.load(Ordering::Acquire) {
        let _ = tail.file.sync_data();
        shared.durable_lsn.store(next_lsn - 1, Ordering::Release);
    }
}

/// Seal the current segment (synced) and start the next.
fn roll(dir: &Path, tail: &mut Tail, next_lsn: u64) -> io::Result<()> {
    tail.file.sync_data()?;
    *tail = create_segment(dir, next_lsn)?;
    Ok(())
}
