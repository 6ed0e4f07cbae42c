//! Snapshots: the engine's durable state (agreements, retained orders, unacknowledged
//! notifications) as of a journal position, so a restart replays only the tail.
//!
//! ```text
//! file   = header block* end
//! header = "SLUSNAP1" version:u32le(1) agreements:u32le replay_from_lsn:u64le seq:u64le
//!          taken_at_ms:u64le crc32c(first 40 bytes):u32le 0:u32          (48 bytes)
//! block  = kind:u8 0:u8 0:u16 count:u32le len:u32le crc32c(payload):u32le payload[len]
//! end    = block of kind 0xFF with count = entries in the file, len 0
//! ```
//! `agreements` is how many agreement entries follow (saturating; 0 = not recorded), so
//! a load sizes its indexes once. kinds: 1 agreements, 2 orders, 3 notifications; a payload is `count` entries back to
//! back in the `codec` encoding. Kind 4, settled chunks, is the first block when present:
//! one entry `lo:u64le hi:u64le`, the settled-order chunk files `lo..hi` (see
//! `engine::chunk_file`) that hold settled orders this snapshot does not copy; the
//! orders block then holds only the other orders. A load puts those chunks back first. Blocks are independent, so loading decodes them on every
//! core at once (10M agreements in seconds).
//!
//! **Taken while the switch runs.** `replay_from_lsn` is read before the state is
//! visited; every record below it had changed the engine before it was queued, so its
//! effect is in the snapshot; records from it on are replayed over the snapshot, which
//! is harmless because replay is idempotent (`engine::replay`). The snapshot is written
//! to a temporary file, the journal is synced through `replay_from_lsn - 1`, then the
//! file is synced and renamed: a snapshot never exists without the journal under it.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::codec::{self, Dec, OutboxEntry};
use super::JournalError;
use crate::engine::order::Phase;
use crate::engine::Engine;

const MAGIC: &[u8; 8] = b"SLUSNAP1";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 48;
const BLOCK_HEADER_LEN: usize = 16;
/// Target payload per block: large enough that framing is noise, small enough that a
/// loader thread's share of work is even.
const BLOCK_BYTES: usize = 256 * 1024;
/// Largest block accepted on load (damage guard).
const BLOCK_BYTES_MAX: usize = 16 * 1024 * 1024;

const KIND_AGREEMENTS: u8 = 1;
const KIND_ORDERS: u8 = 2;
const KIND_OUTBOX: u8 = 3;
const KIND_CHUNKS: u8 = 4;
const KIND_END: u8 = 0xFF;

/// File name of the snapshot replaying from `lsn`.
pub fn file_name(lsn: u64) -> String {
    format!("snapshot-{lsn:020}.snap")
}

/// Snapshots in `dir`, sorted by replay LSN.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    super::numbered_files(dir, "snapshot-", ".snap")
}

/// What a snapshot header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Agreement entries in the file (saturating at `u32::MAX`; 0 = not recorded).
    pub agreements: u32,
    /// Replay the journal from this LSN on.
    pub replay_from_lsn: u64,
    /// The engine's id sequence when it was taken.
    pub seq: u64,
    /// When it was taken, ms since the epoch.
    pub taken_at_ms: u64,
}

/// What writing a snapshot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Replay position.
    pub replay_from_lsn: u64,
    /// Agreements written.
    pub agreements: u64,
    /// Orders written.
    pub orders: u64,
    /// Notifications written.
    pub notifications: u64,
    /// Settled-order chunk files referred to (their orders are not in `orders`).
    pub chunks: u64,
    /// File size.
    pub bytes: u64,
    /// Time taken to visit and write, ms.
    pub took_ms: u64,
}

struct BlockWriter<W: Write> {
    out: W,
    kind: u8,
    count: u32,
    buf: Vec<u8>,
    entries: u64,
    bytes: u64,
}

impl<W: Write> BlockWriter<W> {
    fn entry(&mut self, kind: u8, f: &dyn Fn(&mut Vec<u8>)) -> io::Result<()> {
        if kind != self.kind || self.buf.len() >= BLOCK_BYTES {
            self.flush()?;
            self.kind = kind;
        }
        f(&mut self.buf);
        self.count += 1;
        self.entries += 1;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        self.block(self.kind, self.count)?;
        self.count = 0;
        self.buf.clear();
        Ok(())
    }

    fn block(&mut self, kind: u8, count: u32) -> io::Result<()> {
        let mut h = [0u8; BLOCK_HEADER_LEN];
        h[0] = kind;
        h[4..8].copy_from_slice(&count.to_le_bytes());
        h[8..12].copy_from_slice(&(self.buf.len() as u32).to_le_bytes());
        h[12..16].copy_from_slice(&crc32c::crc32c(&self.buf).to_le_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(&self.buf)?;
        self.bytes += (BLOCK_HEADER_LEN + self.buf.len()) as u64;
        Ok(())
    }
}

/// Write a snapshot of `engine` replaying from `replay_from_lsn` into `dir` (as a
/// temporary file; the caller syncs the journal, then calls [`publish`]). Final orders
/// that finished before `cutoff_ms` are left out (idempotency retention).
pub fn write(
    dir: &Path,
    engine: &Engine,
    replay_from_lsn: u64,
    now_ms: u64,
    cutoff_ms: u64,
) -> io::Result<(PathBuf, SnapshotInfo)> {
    let started = std::time::Instant::now();
    let tmp = dir.join(format!("{}.tmp", file_name(replay_from_lsn)));
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    // The sequence is written in the header, so the header goes last: reserve it.
    out.write_all(&[0u8; HEADER_LEN])?;
    let w = BlockWriter {
        out,
        kind: 0,
        count: 0,
        buf: Vec::with_capacity(BLOCK_BYTES + 1024),
        entries: 0,
        bytes: HEADER_LEN as u64,
    };
    // Encoding happens under one map shard's read lock at a time; file writes go through
    // a 1 MiB buffer, so the lock is held for memory copies, not disk waits.
    let w = RefCell::new(w);
    let err: RefCell<Option<io::Error>> = RefCell::new(None);
    let (agreements, orders, notifications) = (Cell::new(0u64), Cell::new(0u64), Cell::new(0u64));
    let put = |kind: u8, f: &dyn Fn(&mut Vec<u8>)| {
        if let Err(e) = w.borrow_mut().entry(kind, f) {
            err.borrow_mut().get_or_insert(e);
        }
    };
    // Settled chunks already on disk are referred to, not copied: first, so a load puts
    // them back before any other order (a later copy of a key wins).
    let (lo, hi) = engine.settled_disk_range();
    put(KIND_CHUNKS, &|b| {
        b.extend_from_slice(&lo.to_le_bytes());
        b.extend_from_slice(&hi.to_le_bytes());
    });
    let visited = engine.visit_for_snapshot_from(
        hi,
        |a| {
            agreements.set(agreements.get() + 1);
            put(KIND_AGREEMENTS, &|b| codec::encode_agreement(a, b));
        },
        |o| {
            if o.phase == Phase::Final && o.finished_at_ms < cutoff_ms {
                return;
            }
            orders.set(orders.get() + 1);
            put(KIND_ORDERS, &|b| codec::encode_order(o, b));
        },
        |m, n| {
            notifications.set(notifications.get() + 1);
            let e = OutboxEntry {
                merchant: *m,
                msg: n.clone(),
            };
            put(KIND_OUTBOX, &|b| codec::encode_outbox(&e, b));
        },
    );
    if let Some(e) = err.into_inner() {
        return Err(e);
    }
    let seq = visited?;
    let (agreements, orders, notifications) = (agreements.get(), orders.get(), notifications.get());
    let mut w = w.into_inner();
    w.flush()?;
    let total = w.entries;
    w.buf.clear();
    w.block(KIND_END, total as u32)?;
    let bytes = w.bytes;
    let mut file = w.out.into_inner().map_err(|e| e.into_error())?;
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&u32::try_from(agreements).unwrap_or(u32::MAX).to_le_bytes());
    h[16..24].copy_from_slice(&replay_from_lsn.to_le_bytes());
    h[24..32].copy_from_slice(&seq.to_le_bytes());
    h[32..40].copy_from_slice(&now_ms.to_le_bytes());
    let crc = crc32c::crc32c(&h[..40]);
    h[40..44].copy_from_slice(&crc.to_le_bytes());
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&h)?;
    file.sync_all()?;
    Ok((
        tmp,
        SnapshotInfo {
            replay_from_lsn,
            agreements,
            orders,
            notifications,
            chunks: hi - lo,
            bytes,
            took_ms: started.elapsed().as_millis() as u64,
        },
    ))
}

/// Make a written snapshot the current one (rename, then sync the directory).
pub fn publish(dir: &Path, tmp: &Path, replay_from_lsn: u64) -> io::Result<PathBuf> {
    let path = dir.join(file_name(replay_from_lsn));
    std::fs::rename(tmp, &path)?;
    super::writer::sync_dir(dir)?;
    Ok(path)
}

/// Read and check a snapshot's header.
pub fn read_header(path: &Path) -> Result<SnapshotHeader, JournalError> {
    let mut f = File::open(path).map_err(|e| JournalError::io(path, e))?;
    let mut h = [0u8; HEADER_LEN];
    f.read_exact(&mut h).map_err(|_| JournalError::Snapshot {
        file: path.to_path_buf(),
        offset: 0,
        detail: "shorter than its header".into(),
    })?;
    parse_header(&h).ok_or_else(|| JournalError::Snapshot {
        file: path.to_path_buf(),
        offset: 0,
        detail: "bad header (magic, version or checksum)".into(),
    })
}

fn parse_header(h: &[u8; HEADER_LEN]) -> Option<SnapshotHeader> {
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(a)
    };
    if &h[..8] != MAGIC || u32_at(8) != VERSION || crc32c::crc32c(&h[..40]) != u32_at(40) {
        return None;
    }
    Some(SnapshotHeader {
        agreements: u32_at(12),
        replay_from_lsn: u64_at(16),
        seq: u64_at(24),
        taken_at_ms: u64_at(32),
    })
}

/// Counts of what a snapshot load put back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Agreements.
    pub agreements: u64,
    /// Orders.
    pub orders: u64,
    /// Notifications.
    pub notifications: u64,
    /// Of `orders`, settled orders put back from chunk files.
    pub from_chunk_files: u64,
}

/// Load a snapshot into a fresh `engine`, decoding blocks on every core. Final orders
/// that finished before `cutoff_ms` are skipped.
pub fn load(
    path: &Path,
    engine: &Engine,
    now_ms: u64,
    cutoff_ms: u64,
) -> Result<(SnapshotHeader, Loaded), JournalError> {
    let bad = |offset: u64, detail: String| JournalError::Snapshot {
        file: path.to_path_buf(),
        offset,
        detail,
    };
    let file = File::open(path).map_err(|e| JournalError::io(path, e))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)
        .map_err(|_| bad(0, "shorter than its header".into()))?;
    let header = parse_header(&h).ok_or_else(|| bad(0, "bad header".into()))?;
    engine.restore_seq_past(header.seq.saturating_sub(1));
    // Size the agreement indexes once rather than growing them entry by entry.
    engine.agreements().reserve(header.agreements as usize);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    let (tx, rx) = crossbeam::channel::bounded::<(u8, u32, Vec<u8>, u64)>(threads * 2);
    let first_err: Mutex<Option<JournalError>> = Mutex::new(None);
    let totals = Mutex::new(Loaded::default());
    let reader_result = std::thread::scope(|s| {
        for _ in 0..threads {
            let rx = rx.clone();
            let (first_err, totals) = (&first_err, &totals);
            s.spawn(move || {
                let mut mine = Loaded::default();
                for (kind, count, payload, offset) in rx.iter() {
                    if let Err(detail) =
                        load_block(engine, kind, count, &payload, now_ms, cutoff_ms, &mut mine)
                    {
                        if let Ok(mut g) = first_err.lock() {
                            g.get_or_insert(JournalError::Snapshot {
                                file: path.to_path_buf(),
                                offset,
                                detail,
                            });
                        }
                    }
                }
                if let Ok(mut t) = totals.lock() {
                    t.agreements += mine.agreements;
                    t.orders += mine.orders;
                    t.notifications += mine.notifications;
                }
            });
        }
        drop(rx);
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut read = || -> Result<(), JournalError> {
            let mut offset = HEADER_LEN as u64;
            let mut entries = 0u64;
            let mut first = true;
            loop {
                let mut bh = [0u8; BLOCK_HEADER_LEN];
                r.read_exact(&mut bh)
                    .map_err(|_| bad(offset, "truncated: no end block".into()))?;
                let kind = bh[0];
                let count = u32::from_le_bytes([bh[4], bh[5], bh[6], bh[7]]);
                let len = u32::from_le_bytes([bh[8], bh[9], bh[10], bh[11]]) as usize;
                let crc = u32::from_le_bytes([bh[12], bh[13], bh[14], bh[15]]);
                if kind == KIND_END {
                    if u64::from(count) != entries || len != 0 {
                        return Err(bad(
                            offset,
                            format!("end block says {count} entries, read {entries}"),
                        ));
                    }
                    return Ok(());
                }
                if len > BLOCK_BYTES_MAX {
                    return Err(bad(offset, format!("block of {len} bytes")));
                }
                let mut payload = vec![0u8; len];
                r.read_exact(&mut payload)
                    .map_err(|_| bad(offset, "truncated block".into()))?;
                if crc32c::crc32c(&payload) != crc {
                    return Err(bad(offset, "block checksum mismatch".into()));
                }
                entries += u64::from(count);
                if std::mem::take(&mut first) {
                    let (lo, hi) = if kind == KIND_CHUNKS {
                        let mut d = Dec::new(&payload);
                        let range = (|| Ok::<_, codec::DecodeError>((d.u64()?, d.u64()?)))()
                            .map_err(|e| bad(offset, e.to_string()))?;
                        d.done().map_err(|e| bad(offset, e.to_string()))?;
                        range
                    } else {
                        (0, 0)
                    };
                    let n = restore_chunks(engine, dir, lo, hi, cutoff_ms)
                        .map_err(|e| bad(offset, e))?;
                    if let Ok(mut t) = totals.lock() {
                        t.orders += n as u64;
                        t.from_chunk_files += n as u64;
                    }
                    if kind == KIND_CHUNKS {
                        offset += (BLOCK_HEADER_LEN + len) as u64;
                        continue;
                    }
                } else if kind == KIND_CHUNKS {
                    return Err(bad(
                        offset,
                        "settled chunks listed after other blocks".into(),
                    ));
                }
                if tx.send((kind, count, payload, offset)).is_err() {
                    return Err(bad(offset, "loader threads stopped".into()));
                }
                offset += (BLOCK_HEADER_LEN + len) as u64;
            }
        };
        let res = read();
        // Closing the queue lets the loader threads finish; the scope joins them.
        drop(tx);
        res
    });
    reader_result?;
    if let Some(e) = first_err.into_inner().ok().flatten() {
        return Err(e);
    }
    Ok((header, totals.into_inner().unwrap_or_default()))
}

/// Put back the settled-order chunks `lo..hi` from `dir`, oldest first; returns the
/// orders put back. When the engine keeps its chunks in `dir` (not a read-only load),
/// chunk files from `hi` on are removed first: no snapshot kept refers to them (a crash
/// came before the next snapshot), and new chunks are numbered from `hi` again.
fn restore_chunks(
    engine: &Engine,
    dir: &Path,
    lo: u64,
    hi: u64,
    cutoff_ms: u64,
) -> Result<usize, String> {
    if engine.settled_dir() == Some(dir) {
        crate::engine::chunk_file::remove_where(dir, |seq| seq >= hi)
            .map_err(|e| format!("removing unreferenced settled chunks: {e}"))?;
    }
    engine.number_settled_chunks_from(hi);
    let mut n = 0;
    for seq in lo..hi {
        n += engine.restore_settled_chunk(dir, seq, cutoff_ms)?;
    }
    Ok(n)
}

/// The settled chunks `[lo, hi)` a snapshot refers to (`None`: it refers to none, a
/// snapshot from before settled chunks were written to files).
pub fn chunk_range(path: &Path) -> io::Result<Option<(u64, u64)>> {
    let mut f = File::open(path)?;
    let mut h = [0u8; HEADER_LEN + BLOCK_HEADER_LEN + 16];
    if f.read_exact(&mut h).is_err() || h[HEADER_LEN] != KIND_CHUNKS {
        return Ok(None);
    }
    let p = &h[HEADER_LEN + BLOCK_HEADER_LEN..];
    let crc = u32::from_le_bytes(
        h[HEADER_LEN + 12..HEADER_LEN + 16]
            .try_into()
            .expect("4 bytes"),
    );
    if crc32c::crc32c(p) != crc {
        return Err(io::Error::other(format!(
            "{}: settled chunk block damaged",
            path.display()
        )));
    }
    let lo = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
    let hi = u64::from_le_bytes(p[8..].try_into().expect("8 bytes"));
    Ok(Some((lo, hi)))
}

/// Remove the settled chunk files in `dir` that none of `kept` (the snapshots kept)
/// refers to any more: those below the lowest `lo`. Chunks are evicted from the front
/// only, so the running engine holds none of them either. Nothing is removed when no
/// kept snapshot lists chunks.
pub fn prune_chunks(dir: &Path, kept: &[PathBuf]) -> io::Result<usize> {
    let mut low = None::<u64>;
    for p in kept {
        if let Some((lo, _)) = chunk_range(p)? {
            low = Some(low.map_or(lo, |l| l.min(lo)));
        }
    }
    match low {
        Some(low) => crate::engine::chunk_file::remove_where(dir, |seq| seq < low),
        None => Ok(0),
    }
}

fn load_block(
    engine: &Engine,
    kind: u8,
    count: u32,
    payload: &[u8],
    now_ms: u64,
    cutoff_ms: u64,
    n: &mut Loaded,
) -> Result<(), String> {
    let mut d = Dec::new(payload);
    for _ in 0..count {
        match kind {
            KIND_AGREEMENTS => {
                let a = codec::get_agreement(&mut d).map_err(|e| e.to_string())?;
                engine.restore_agreement_fresh(a);
                n.agreements += 1;
            }
            KIND_ORDERS => {
                let o = codec::decode_order(&mut d).map_err(|e| e.to_string())?;
                if !(o.phase == Phase::Final && o.finished_at_ms < cutoff_ms) {
                    engine.restore_order(o, now_ms);
                    n.orders += 1;
                }
            }
            KIND_OUTBOX => {
                let e = codec::decode_outbox(&mut d).map_err(|e| e.to_string())?;
                engine.restore_notification(e.merchant, e.msg, now_ms);
                n.notifications += 1;
            }
            other => return Err(format!("unknown block kind {other}")),
        }
    }
    d.done().map_err(|e| e.to_string())
}
