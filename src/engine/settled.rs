//! Final orders past their detail window, kept in a compact form for the rest of the
//! idempotency retention (issue 7: memory per retained order).
//!
//! A live [`Order`] carries what it needs while it can still change: the statement text to
//! re-send, the channels not tried yet, the query backoff, the router's decision, an index
//! entry per channel reference. Once it is final, durable and older than
//! `EngineConfig::settle_after_ms`, none of that is read again. What stays is what a
//! repeated request (same content or not), an ORDER_QUERY, a snapshot and reconciliation
//! need: the content that identifies a repeat, the outcome, the times, and the attempts
//! with their channel references.
//!
//! Concurrency rule (see `Engine::settle_final_orders_before`): an order is inserted here
//! *before* it is removed from the live map, and readers look in the live map first, so a
//! reader never misses an order that is moving between the two.

use std::path::{Path, PathBuf};

use smallvec::SmallVec;

use super::chunk_file;
use super::slot_index::SlotIndex;

use super::order::{Attempt, AttemptOutcome, Order, OrderKey, OrderKind, Phase};
use crate::channel::message::{OrderRef, RspCode};
use crate::message::{AgreementId, ChannelId, Outcome, Purpose, Reason, Status};
use crate::wire::field::Ascii;
use crate::wire::header::MerchantNo;

/// A settled (final, durable, past its detail window) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Debit or payout, with the content that identifies a repeat.
    pub kind: OrderKind,
    /// Amount in fen.
    pub amount: u64,
    /// The final outcome (durable).
    pub outcome: Outcome,
    /// When the order was accepted.
    pub accepted_at_ms: u64,
    /// When it became final.
    pub finished_at_ms: u64,
    /// Every attempt, oldest first (one inline; failovers spill to the heap).
    pub attempts: SmallVec<[Attempt; 1]>,
}

impl Settled {
    /// The settled form of a final order.
    pub fn of(o: &Order) -> Settled {
        debug_assert_eq!(o.phase, Phase::Final);
        Settled {
            kind: o.kind,
            amount: o.amount,
            outcome: o.outcome,
            accepted_at_ms: o.accepted_at_ms,
            finished_at_ms: o.finished_at_ms,
            attempts: o.attempts.iter().copied().collect(),
        }
    }

    /// The channel of the last attempt (empty when none).
    pub fn channel(&self) -> ChannelId {
        self.attempts.last().map(|a| a.channel).unwrap_or_default()
    }

    /// The order as a live [`Order`] would show it (snapshots, reconciliation, the admin
    /// view). The statement text and the query count are not kept: empty and 0.
    pub fn to_order(&self, key: OrderKey) -> Order {
        Order {
            key,
            kind: self.kind,
            amount: self.amount,
            purpose: Purpose::default(),
            phase: Phase::Final,
            outcome: self.outcome,
            attempts: self.attempts.to_vec(),
            remaining: Vec::new(),
            accepted_at_ms: self.accepted_at_ms,
            finished_at_ms: self.finished_at_ms,
            queries: 0,
            durable: Some(self.outcome),
            decision: None,
        }
    }
}

/// What a repeated request, a query or the admin view needs of an order, live or settled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Facts {
    pub kind: OrderKind,
    pub amount: u64,
    /// The latest durable state (`None` until the acceptance is durable).
    pub durable: Option<Outcome>,
    pub channel: ChannelId,
    pub attempts: u8,
    pub accepted_at_ms: u64,
    pub finished_at_ms: u64,
}

impl Facts {
    pub fn of_order(o: &Order) -> Facts {
        Facts {
            kind: o.kind,
            amount: o.amount,
            durable: o.durable,
            channel: o.channel(),
            attempts: o.attempts.len() as u8,
            accepted_at_ms: o.accepted_at_ms,
            finished_at_ms: o.finished_at_ms,
        }
    }

    pub fn of_settled(s: &Settled) -> Facts {
        Facts {
            kind: s.kind,
            amount: s.amount,
            durable: Some(s.outcome),
            channel: s.channel(),
            attempts: s.attempts.len() as u8,
            accepted_at_ms: s.accepted_at_ms,
            finished_at_ms: s.finished_at_ms,
        }
    }

    /// True when a repeated request has the same content.
    pub fn same_content(&self, kind: &OrderKind, amount: u64) -> bool {
        &self.kind == kind && self.amount == amount
    }
}

// ----- the store ---------------------------------------------------------------------

/// Bytes of one packed settled order (layout in [`pack`]).
const REC: usize = chunk_file::REC;
/// Records per chunk: eviction frees whole chunks, and a full chunk is written to its
/// own file once (512 KiB).
const CHUNK: usize = 4096;
/// Channel id meaning "no attempt".
const NO_CHANNEL: u16 = u16::MAX;
/// Flag: the order does not fit the packed form (more than one attempt, or an attempt
/// sent later than its acceptance); its exact form is in `fallback`.
const F_FALLBACK: u8 = 1;

type Rec = [u8; REC];

/// Settled orders held compactly: 128-byte records appended in the order orders settle
/// (which is about the order they finished in), in chunks that retention frees whole,
/// and an 8-byte-per-entry index ([`SlotIndex`]) from a keyed 64-bit fingerprint of the
/// order key to the slots of records that may hold it. Every candidate is checked against
/// its record's key, so keys that share the fingerprint bits kept cost a record read,
/// never a wrong answer.
///
/// With a directory attached ([`SettledStore::attach_dir`], the journal's), a full chunk
/// is written to its own file ([`chunk_file`]) and its records leave memory: what stays
/// per order is the index entry. A lookup that lands in such a chunk reads its record
/// from the file (one `pread`); most lookups are for new order ids and miss the index.
/// Snapshots refer to the files by number instead of rewriting them.
///
/// Written by hand rather than with a map of `Settled` values: a hash map of 200-byte
/// entries at a typical load factor costs ~480 bytes per order (measured), this ~160 in
/// memory, or the index entry alone once the chunk is on disk.
///
/// Concurrency: a record is in the arena before the index points at it; readers go
/// index → arena under the arena's read lock. Writers are the settling pass, snapshot
/// restore and retention, all rare next to reads.
pub(crate) struct SettledStore {
    arena: std::sync::RwLock<Arena>,
    index: SlotIndex,
    /// Exact forms of orders that do not fit a record, by slot.
    fallback: dashmap::DashMap<u64, Settled>,
    merchants: super::agreement::Interner<MerchantNo>,
    channels: super::agreement::Interner<ChannelId>,
    keyed: std::collections::hash_map::RandomState,
    /// All ones; tests narrow it to force fingerprint collisions.
    fp_mask: u64,
    len: std::sync::atomic::AtomicUsize,
    /// Where full chunks are written; unset: every chunk stays in memory.
    dir: std::sync::OnceLock<PathBuf>,
    /// One writer of chunk files at a time.
    sealing: std::sync::Mutex<()>,
    /// Chunk files open for record reads.
    open: OpenFiles,
}

struct Arena {
    /// Slot of the first record of `chunks[0]`.
    first_slot: u64,
    chunks: std::collections::VecDeque<Chunk>,
    /// Records per chunk ([`CHUNK`]; smaller in tests and the simulation).
    chunk_len: usize,
    /// Number of the next chunk started (chunk numbers name their files and go on across
    /// restarts).
    next_seq: u64,
}

struct Chunk {
    seq: u64,
    /// The records while the chunk is in memory; empty once it is on disk.
    recs: Vec<Rec>,
    /// Records in the chunk.
    len: usize,
    /// Written to its file, records dropped from memory.
    on_disk: bool,
    /// Latest `finished_at_ms` in the chunk: the chunk goes when that is past retention.
    max_finished_ms: u64,
    /// For a chunk loaded from a file another process wrote: its intern numbers → ours.
    remap: Option<std::sync::Arc<Remap>>,
}

/// Intern numbers of a chunk file's records mapped to this process's.
struct Remap {
    merchants: Vec<u32>,
    channels: Vec<u16>,
}

impl Remap {
    fn apply(&self, r: &mut Rec) {
        let m = u32::from_le_bytes([r[0], r[1], r[2], r[3]]) as usize;
        if let Some(&to) = self.merchants.get(m) {
            r[0..4].copy_from_slice(&to.to_le_bytes());
        }
        let ch = u16::from_le_bytes([r[88], r[89]]);
        if ch != NO_CHANNEL {
            if let Some(&to) = self.channels.get(usize::from(ch)) {
                r[88..90].copy_from_slice(&to.to_le_bytes());
            }
        }
    }
}

impl Arena {
    fn new(chunk_len: usize) -> Arena {
        Arena {
            first_slot: 0,
            chunks: std::collections::VecDeque::new(),
            chunk_len,
            next_seq: 0,
        }
    }

    fn next_slot(&self) -> u64 {
        let full = self.chunks.len().saturating_sub(1) * self.chunk_len;
        self.first_slot + (full + self.chunks.back().map_or(0, |c| c.len)) as u64
    }

    /// A new chunk at the end (the last one must be full).
    fn start_chunk(&mut self, seq: u64) -> &mut Chunk {
        self.next_seq = self.next_seq.max(seq + 1);
        self.chunks.push_back(Chunk {
            seq,
            recs: Vec::with_capacity(self.chunk_len),
            len: 0,
            on_disk: false,
            max_finished_ms: 0,
            remap: None,
        });
        self.chunks.back_mut().expect("just pushed")
    }

    fn push(&mut self, r: Rec, finished_ms: u64) -> u64 {
        let slot = self.next_slot();
        // The index keeps slots modulo 2^32. Unreachable in practice: 2^32 orders held
        // at once would be ~200 GB of index.
        assert!(
            slot - self.first_slot < u64::from(u32::MAX),
            "more than 2^32 settled orders held"
        );
        if !matches!(self.chunks.back(), Some(c) if c.len < self.chunk_len) {
            let seq = self.next_seq;
            self.start_chunk(seq);
        }
        let c = self.chunks.back_mut().expect("just ensured");
        c.recs.push(r);
        c.len += 1;
        c.max_finished_ms = c.max_finished_ms.max(finished_ms);
        slot
    }

    /// A slot the index keeps modulo 2^32, in full: the one at or after `first_slot`
    /// (fewer than 2^32 slots are ever held at once; see `push`).
    fn resolve(&self, s: u32) -> u64 {
        self.first_slot + u64::from(s.wrapping_sub(self.first_slot as u32))
    }

    /// The chunk holding `slot` and the slot's place in it.
    fn locate(&self, slot: u64) -> Option<(&Chunk, usize)> {
        let i = usize::try_from(slot.checked_sub(self.first_slot)?).ok()?;
        let c = self.chunks.get(i / self.chunk_len)?;
        (i % self.chunk_len < c.len).then_some((c, i % self.chunk_len))
    }
}

fn put_text(dst: &mut [u8], s: &[u8]) {
    dst[..s.len()].copy_from_slice(s);
}

/// Zero-padded text back (values never contain NUL: the wire pads with it).
fn text(src: &[u8]) -> &str {
    let n = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    std::str::from_utf8(&src[..n]).unwrap_or("")
}

fn u64_at(r: &Rec, at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&r[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Chunk files kept open for record reads (one file descriptor each).
const OPEN_FILES: usize = 64;

/// The chunk files read most recently, newest first, kept open: a lookup that lands on
/// disk is then one `pread` instead of open, `pread` and close (the open and close were
/// most of its 6.9 µs; `benches/engine.rs` `settled_1M`). Bounded by [`OPEN_FILES`];
/// files of chunks that left the arena are closed at once.
///
/// Kept by hand, not with an LRU crate: 64 entries in a `Vec` with move-to-front is a few
/// lines, and a lookup that reaches it has just paid for a system call anyway.
///
/// A chunk file never changes after it is written, so an open descriptor always reads
/// what the file held; if the file is removed while open, reads still see those bytes
/// (the same ones a fresh open would have given before the removal).
#[derive(Default)]
struct OpenFiles(std::sync::Mutex<Vec<(u64, std::sync::Arc<std::fs::File>)>>);

impl OpenFiles {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<(u64, std::sync::Arc<std::fs::File>)>> {
        // Holds no invariant a panic could break halfway.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chunk `seq`'s file, from the open ones or opened now (outside the lock).
    fn get(&self, dir: &Path, seq: u64) -> std::io::Result<std::sync::Arc<std::fs::File>> {
        {
            let mut l = self.list();
            if let Some(at) = l.iter().position(|(s, _)| *s == seq) {
                let e = l.remove(at);
                let f = e.1.clone();
                l.insert(0, e);
                return Ok(f);
            }
        }
        let f = std::sync::Arc::new(chunk_file::open(dir, seq)?);
        let mut l = self.list();
        if !l.iter().any(|(s, _)| *s == seq) {
            l.insert(0, (seq, f.clone()));
            l.truncate(OPEN_FILES);
        }
        Ok(f)
    }

    /// Close the files of chunks below `seq` (they left the arena).
    fn close_below(&self, seq: u64) {
        self.list().retain(|(s, _)| *s >= seq);
    }

    #[cfg(test)]
    fn seqs(&self) -> Vec<u64> {
        self.list().iter().map(|(s, _)| *s).collect()
    }
}

/// A record that could not be read from its chunk file (logged once per failure; the
/// caller decides what is safe to answer).
fn unreadable(seq: u64, e: &dyn std::fmt::Display) {
    tracing::error!(chunk = seq, error = %e, "settled orders: a chunk file could not be read");
}

impl SettledStore {
    pub(crate) fn new() -> SettledStore {
        SettledStore::with_chunk_len(CHUNK)
    }

    /// A store with `chunk_len` records per chunk (tests and the simulation use small
    /// chunks so that they fill).
    pub(crate) fn with_chunk_len(chunk_len: usize) -> SettledStore {
        SettledStore {
            arena: std::sync::RwLock::new(Arena::new(chunk_len.max(1))),
            index: SlotIndex::new(),
            fallback: dashmap::DashMap::new(),
            merchants: super::agreement::Interner::new(),
            channels: super::agreement::Interner::new(),
            keyed: std::collections::hash_map::RandomState::new(),
            fp_mask: u64::MAX,
            len: std::sync::atomic::AtomicUsize::new(0),
            dir: std::sync::OnceLock::new(),
            sealing: std::sync::Mutex::new(()),
            open: OpenFiles::default(),
        }
    }

    /// Write full chunks to files in `dir` from now on (the journal directory). Set once,
    /// before the store is used; a later call is ignored.
    pub(crate) fn attach_dir(&self, dir: &Path) {
        let _ = self.dir.set(dir.to_path_buf());
    }

    /// The directory full chunks are written to, if any.
    pub(crate) fn dir(&self) -> Option<&Path> {
        self.dir.get().map(PathBuf::as_path)
    }

    fn fp(&self, key: &OrderKey) -> u64 {
        use std::hash::BuildHasher;
        self.keyed.hash_one(key) & self.fp_mask
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Arena> {
        self.arena.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Arena> {
        self.arena.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The record in `slot` (`None`: no such slot, e.g. evicted), from memory or from
    /// its chunk's file.
    fn rec(&self, arena: &Arena, slot: u64) -> std::io::Result<Option<Rec>> {
        let Some((c, i)) = arena.locate(slot) else {
            return Ok(None);
        };
        if !c.on_disk {
            return Ok(c.recs.get(i).copied());
        }
        let dir = self
            .dir()
            .ok_or_else(|| std::io::Error::other("no chunk directory"))?;
        let mut r = self
            .open
            .get(dir, c.seq)
            .and_then(|f| chunk_file::read_rec_at(&f, i))
            .inspect_err(|e| unreadable(c.seq, e))?;
        if let Some(m) = &c.remap {
            m.apply(&mut r);
        }
        Ok(Some(r))
    }

    /// All records of a chunk (a copy), from memory or from its file.
    fn recs_of(
        &self,
        seq: u64,
        recs: Vec<Rec>,
        on_disk: bool,
        remap: Option<&Remap>,
    ) -> std::io::Result<Vec<Rec>> {
        if !on_disk {
            return Ok(recs);
        }
        let dir = self
            .dir()
            .ok_or_else(|| std::io::Error::other("no chunk directory"))?;
        let mut f = chunk_file::read(dir, seq).map_err(|e| {
            unreadable(seq, &e);
            std::io::Error::other(e)
        })?;
        if let Some(m) = remap {
            f.recs.iter_mut().for_each(|r| m.apply(r));
        }
        Ok(f.recs)
    }

    /// Record layout (little-endian):
    /// `0..4` merchant (interned) · `4..36` order id · `36` kind (0 debit, 1 payout) ·
    /// `37..53` agreement id or card hash · `53..61` amount · `61` status · `62..64`
    /// reason · `64..72` channel code · `72..80` finished at · `80..88` accepted at ·
    /// `88..90` channel of the attempt (interned; `u16::MAX` none) · `90..122` its
    /// reference · `122` its outcome · `123..127` its code · `127` flags.
    /// The attempt's send time is the acceptance time (the first attempt starts with
    /// the acceptance); an order that does not fit goes to `fallback` as well.
    fn pack(&self, key: &OrderKey, s: &Settled) -> Rec {
        let mut r = [0u8; REC];
        r[0..4].copy_from_slice(&self.merchants.intern(key.0).to_le_bytes());
        put_text(&mut r[4..36], key.1.as_str().as_bytes());
        match s.kind {
            OrderKind::Debit { agreement } => {
                r[36] = 0;
                r[37..45].copy_from_slice(&agreement.0.to_le_bytes());
            }
            OrderKind::Payout { card_hash } => {
                r[36] = 1;
                r[37..53].copy_from_slice(&card_hash);
            }
        }
        r[53..61].copy_from_slice(&s.amount.to_le_bytes());
        r[61] = s.outcome.status as u8;
        r[62..64].copy_from_slice(&(s.outcome.reason as u16).to_le_bytes());
        put_text(&mut r[64..72], s.outcome.channel_code.as_str().as_bytes());
        r[72..80].copy_from_slice(&s.finished_at_ms.to_le_bytes());
        r[80..88].copy_from_slice(&s.accepted_at_ms.to_le_bytes());
        let mut fits = s.attempts.len() <= 1 && s.outcome.field == 0;
        match s.attempts.first() {
            Some(a) => {
                let ch = self.channels.intern(a.channel);
                fits &= ch < u32::from(NO_CHANNEL) && a.sent_at_ms == s.accepted_at_ms;
                r[88..90].copy_from_slice(&(ch.min(u32::from(NO_CHANNEL)) as u16).to_le_bytes());
                put_text(&mut r[90..122], a.order_ref.as_str().as_bytes());
                let (tag, code) = a.outcome.tag();
                r[122] = tag;
                if let Some(c) = code {
                    put_text(&mut r[123..127], c.0.as_str().as_bytes());
                }
            }
            None => r[88..90].copy_from_slice(&NO_CHANNEL.to_le_bytes()),
        }
        if !fits {
            r[127] |= F_FALLBACK;
        }
        r
    }

    fn key_of(&self, r: &Rec) -> Option<OrderKey> {
        let m = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
        let id = crate::message::OrderId::new(text(&r[4..36])).ok()?;
        Some((self.merchants.get(m), id))
    }

    fn unpack(&self, slot: u64, r: &Rec) -> Option<Settled> {
        if r[127] & F_FALLBACK != 0 {
            return self.fallback.get(&slot).map(|s| s.clone());
        }
        let kind = match r[36] {
            0 => OrderKind::Debit {
                agreement: AgreementId(u64_at(r, 37)),
            },
            _ => {
                let mut card_hash = [0u8; 16];
                card_hash.copy_from_slice(&r[37..53]);
                OrderKind::Payout { card_hash }
            }
        };
        let accepted_at_ms = u64_at(r, 80);
        let ch = u16::from_le_bytes([r[88], r[89]]);
        let mut attempts = SmallVec::new();
        if ch != NO_CHANNEL {
            attempts.push(Attempt {
                channel: self.channels.get(u32::from(ch)),
                order_ref: OrderRef::new(text(&r[90..122])).ok()?,
                sent_at_ms: accepted_at_ms,
                outcome: AttemptOutcome::from_tag(
                    r[122],
                    RspCode(Ascii::new(text(&r[123..127])).unwrap_or_default()),
                )?,
            });
        }
        Some(Settled {
            kind,
            amount: u64_at(r, 53),
            outcome: Outcome {
                status: Status::from_u8(r[61])?,
                reason: Reason::from_u16(u16::from_le_bytes([r[62], r[63]]))?,
                field: 0,
                channel_code: Ascii::new(text(&r[64..72])).ok()?,
            },
            accepted_at_ms,
            finished_at_ms: u64_at(r, 72),
            attempts,
        })
    }

    /// The slot holding `key`: the index's candidates, each checked against its record.
    /// An error: a candidate's record could not be read and no other one holds the key.
    fn slot_of(&self, arena: &Arena, key: &OrderKey) -> std::io::Result<Option<u64>> {
        let mut failed = None;
        for c in self.index.candidates(self.fp(key)) {
            let slot = arena.resolve(c);
            match self.rec(arena, slot) {
                Ok(Some(r)) if self.key_of(&r).as_ref() == Some(key) => return Ok(Some(slot)),
                Ok(_) => {}
                Err(e) => failed = Some(e),
            }
        }
        failed.map_or(Ok(None), Err)
    }

    /// The settled order with this key (`None` too when its record cannot be read;
    /// that is logged).
    pub(crate) fn get(&self, key: &OrderKey) -> Option<Settled> {
        let arena = self.read();
        let slot = self.slot_of(&arena, key).ok()??;
        let r = self.rec(&arena, slot).ok()??;
        self.unpack(slot, &r)
    }

    /// True when an order with this key is settled. Most calls are for new order ids:
    /// one index probe that misses.
    ///
    /// Fails closed: when the record the index points at cannot be read (a chunk file
    /// damaged or gone), the key counts as settled, so a new order under that id is not
    /// executed (rule 1); the error is logged.
    pub(crate) fn contains_key(&self, key: &OrderKey) -> bool {
        if self.index.candidates(self.fp(key)).is_empty() {
            return false;
        }
        let arena = self.read();
        self.slot_of(&arena, key).map_or(true, |s| s.is_some())
    }

    /// Number of settled orders.
    pub(crate) fn len(&self) -> usize {
        self.len.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Add settled orders (a key already present points at its new record). A chunk
    /// filled by them is written to its file when a directory is attached.
    pub(crate) fn insert_all(&self, orders: &[(OrderKey, Settled)]) {
        let mut placed = Vec::with_capacity(orders.len());
        let mut filled = false;
        {
            let mut arena = self.write();
            for (key, s) in orders {
                let r = self.pack(key, s);
                let slot = arena.push(r, s.finished_at_ms);
                filled |= arena
                    .chunks
                    .back()
                    .is_some_and(|c| c.len == arena.chunk_len);
                if r[127] & F_FALLBACK != 0 {
                    self.fallback.insert(slot, s.clone());
                }
                placed.push((*key, slot));
            }
        }
        // The records exist; now the index may point at them.
        for (key, slot) in placed {
            self.point(&key, slot);
        }
        if filled {
            if let Err(e) = self.seal() {
                tracing::error!(error = %e, "settled orders: a full chunk could not be written; it stays in memory and is tried again");
            }
        }
    }

    /// Point the index at `slot` for `key` (replacing the entry of an older record of the
    /// same key).
    ///
    /// Lock order: no index shard is held while the arena lock is taken (readers hold
    /// the arena lock while they probe the index), so the candidates are read and
    /// checked first, and the index then changed only if they are unchanged.
    fn point(&self, key: &OrderKey, slot: u64) {
        let fp = self.fp(key);
        let s32 = slot as u32;
        let added = loop {
            let seen = self.index.candidates(fp);
            let held = if seen.is_empty() {
                None
            } else {
                let arena = self.read();
                // An unreadable record does not count as this key's: at worst the key
                // gets a second entry, both checked on every lookup.
                seen.iter().copied().find(|&c| {
                    matches!(self.rec(&arena, arena.resolve(c)),
                        Ok(Some(r)) if self.key_of(&r).as_ref() == Some(key))
                })
            };
            match held {
                Some(old) if old == s32 => break false,
                Some(old) => {
                    if self.index.replace(fp, old, s32) {
                        break false;
                    }
                }
                None => {
                    if self.index.insert_if_unchanged(fp, &seen, s32) {
                        break true;
                    }
                }
            }
            // Changed meanwhile: look again.
        };
        if added {
            self.len.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Forget `key` (its record stays until its chunk is evicted, unreachable).
    ///
    /// Not written to chunk files: a restart that loads the chunk finds the key again.
    /// The one caller, a restore that found a newer live copy of the order
    /// (`Engine::restore_order`), keeps that copy, and it is what later snapshots hold
    /// and restore after the chunks (a final order never changes, so both copies say
    /// the same).
    pub(crate) fn remove(&self, key: &OrderKey) {
        let slot = {
            let arena = self.read();
            self.slot_of(&arena, key)
        };
        let Ok(Some(slot)) = slot else { return };
        if self.index.remove(self.fp(key), slot as u32) {
            self.len.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.fallback.remove(&slot);
    }

    /// Free the chunks whose every order finished before `cutoff_ms` (retention).
    /// Returns how many orders were forgotten. Their files stay until no snapshot kept
    /// refers to them (`journal::snapshot::prune_chunks`).
    pub(crate) fn evict_before(&self, cutoff_ms: u64) -> usize {
        let mut popped = Vec::new();
        {
            let mut arena = self.write();
            while arena
                .chunks
                .front()
                .is_some_and(|c| c.max_finished_ms < cutoff_ms)
            {
                let c = arena.chunks.pop_front().expect("just checked");
                let first = arena.first_slot;
                arena.first_slot += arena.chunk_len as u64;
                if arena.chunks.is_empty() {
                    // The next record starts a fresh chunk at the next slot.
                    arena.first_slot = first + c.len as u64;
                }
                popped.push((first, c));
            }
            let lowest = arena.chunks.front().map_or(arena.next_seq, |c| c.seq);
            self.open.close_below(lowest);
        }
        let mut n = 0;
        for (first, c) in popped {
            // The keys are read after the lock is released (from the file when on disk);
            // a chunk whose file cannot be read leaves its index entries behind, pointing
            // at slots that no longer exist (they answer "not held").
            let Ok(recs) = self.recs_of(c.seq, c.recs, c.on_disk, c.remap.as_deref()) else {
                continue;
            };
            for (i, r) in recs.iter().enumerate() {
                let Some(key) = self.key_of(r) else { continue };
                let slot = first + i as u64;
                let hit = self.index.remove(self.fp(&key), slot as u32);
                self.fallback.remove(&slot);
                n += usize::from(hit);
            }
        }
        self.len.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        n
    }

    /// Visit every settled order, oldest record first (see [`SettledStore::for_each_from`]).
    #[cfg(test)]
    pub(crate) fn for_each(&self, f: impl FnMut(OrderKey, Settled)) -> std::io::Result<()> {
        self.for_each_from(0, f)
    }

    /// Visit the settled orders in chunks numbered `from_seq` or later, oldest record
    /// first (snapshots keep that order, so a restore keeps chunks in finishing order
    /// and retention keeps freeing them). Chunks on disk are read from their files; a
    /// file that cannot be read ends the visit with its error.
    ///
    /// The arena lock is held only to copy one chunk at a time, so a snapshot of
    /// millions of settled orders never holds up settling or lookups for long.
    pub(crate) fn for_each_from(
        &self,
        from_seq: u64,
        mut f: impl FnMut(OrderKey, Settled),
    ) -> std::io::Result<()> {
        let mut cursor = self.read().first_slot;
        loop {
            let (first, seq, recs, on_disk, remap, len, chunk_len) = {
                let arena = self.read();
                let start = cursor.max(arena.first_slot);
                let Ok(i) = usize::try_from(start - arena.first_slot) else {
                    return Ok(());
                };
                let Some(c) = arena.chunks.get(i / arena.chunk_len) else {
                    return Ok(());
                };
                let chunk_first = start - (i % arena.chunk_len) as u64;
                let recs = if c.on_disk || c.seq < from_seq {
                    Vec::new()
                } else {
                    c.recs.clone()
                };
                (
                    chunk_first,
                    c.seq,
                    recs,
                    c.on_disk,
                    c.remap.clone(),
                    c.len,
                    arena.chunk_len,
                )
            };
            if len == 0 {
                return Ok(());
            }
            if seq >= from_seq {
                let recs = self.recs_of(seq, recs, on_disk, remap.as_deref())?;
                for (i, r) in recs.iter().enumerate() {
                    let slot = first + i as u64;
                    if slot < cursor {
                        continue;
                    }
                    let Some(key) = self.key_of(r) else { continue };
                    // Only the record the index points at (not one a re-insert replaced).
                    let current = self.index.holds(self.fp(&key), slot as u32);
                    if current {
                        if let Some(s) = self.unpack(slot, r) {
                            f(key, s);
                        }
                    }
                }
            }
            cursor = first + len as u64;
            if len < chunk_len {
                return Ok(());
            }
        }
    }

    /// Write every full chunk still in memory to its file and drop its records from
    /// memory. Returns how many were written. Stops at the first failure: that chunk
    /// stays in memory (snapshots copy it) and is tried again at the next call.
    pub(crate) fn seal(&self) -> std::io::Result<usize> {
        let Some(dir) = self.dir() else {
            return Ok(0);
        };
        let _one = match self.sealing.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            // Another thread is sealing; it goes on until no full chunk is left.
            Err(std::sync::TryLockError::WouldBlock) => return Ok(0),
        };
        let mut n = 0;
        loop {
            let job = {
                let a = self.read();
                a.chunks
                    .iter()
                    .enumerate()
                    .find(|(_, c)| !c.on_disk && c.len == a.chunk_len)
                    .map(|(i, c)| {
                        let first = a.first_slot + (i * a.chunk_len) as u64;
                        (first, c.seq, c.recs.clone(), c.max_finished_ms)
                    })
            };
            let Some((first, seq, recs, max_finished_ms)) = job else {
                return Ok(n);
            };
            let fallback = recs
                .iter()
                .enumerate()
                .filter(|(_, r)| r[127] & F_FALLBACK != 0)
                .filter_map(|(i, r)| {
                    let key = self.key_of(r)?;
                    let s = self.fallback.get(&(first + i as u64))?;
                    Some((i as u32, s.to_order(key)))
                })
                .collect();
            let names = chunk_file::Names {
                merchants: self.merchants.to_vec(),
                channels: self.channels.to_vec(),
            };
            chunk_file::write(
                dir,
                &chunk_file::ChunkFile {
                    seq,
                    max_finished_ms,
                    recs,
                    names,
                    fallback,
                },
            )?;
            let mut a = self.write();
            if let Some(c) = a.chunks.iter_mut().find(|c| c.seq == seq) {
                c.on_disk = true;
                c.recs = Vec::new();
            }
            n += 1;
        }
    }

    /// The chunks a snapshot refers to instead of copying: `[lo, hi)`, the run of
    /// consecutive chunks on disk at the front. `lo` is the oldest chunk still held (or
    /// the next number when none is), so no snapshot taken later needs a file below it.
    pub(crate) fn disk_range(&self) -> (u64, u64) {
        let a = self.read();
        let lo = a.chunks.front().map_or(a.next_seq, |c| c.seq);
        let mut hi = lo;
        for c in &a.chunks {
            if !(c.on_disk && c.seq == hi) {
                break;
            }
            hi += 1;
        }
        (lo, hi)
    }

    /// Number the next chunk at least `seq` (a restore: files from that number on are
    /// not referred to by the snapshot loaded, and are overwritten).
    pub(crate) fn number_chunks_from(&self, seq: u64) {
        let mut a = self.write();
        a.next_seq = a.next_seq.max(seq);
    }

    /// Put back chunk `seq` from its file in `dir` (a restore: chunks in order, before
    /// any other settled order is inserted). Chunks at the front whose orders all
    /// finished before `cutoff_ms` are skipped (retention). With a directory attached
    /// the records stay on disk; without one (read-only tools) they are kept in memory.
    /// Returns how many orders it put back.
    pub(crate) fn load_chunk(&self, dir: &Path, seq: u64, cutoff_ms: u64) -> Result<usize, String> {
        let f = chunk_file::read(dir, seq)?;
        let on_disk = self.dir().is_some();
        let remap = Remap {
            merchants: f
                .names
                .merchants
                .iter()
                .map(|m| self.merchants.intern(*m))
                .collect(),
            channels: f
                .names
                .channels
                .iter()
                .map(|c| {
                    u16::try_from(self.channels.intern(*c))
                        .ok()
                        .filter(|&c| c != NO_CHANNEL)
                        .ok_or_else(|| format!("chunk {seq}: too many channels"))
                })
                .collect::<Result<_, _>>()?,
        };
        let identity = remap
            .merchants
            .iter()
            .enumerate()
            .all(|(i, &m)| m as usize == i)
            && remap
                .channels
                .iter()
                .enumerate()
                .all(|(i, &c)| usize::from(c) == i);
        let mut recs = f.recs;
        if !identity {
            recs.iter_mut().for_each(|r| remap.apply(r));
        }
        let first = {
            let mut a = self.write();
            a.next_seq = a.next_seq.max(seq + 1);
            if a.chunks.is_empty() && f.max_finished_ms < cutoff_ms {
                return Ok(0);
            }
            if recs.len() != a.chunk_len {
                return Err(format!(
                    "chunk {seq} holds {} records, {} expected",
                    recs.len(),
                    a.chunk_len
                ));
            }
            if a.chunks.back().is_some_and(|c| c.len < a.chunk_len) {
                return Err(format!("chunk {seq} loaded after other settled orders"));
            }
            let first = a.next_slot();
            let c = a.start_chunk(seq);
            c.len = recs.len();
            c.max_finished_ms = f.max_finished_ms;
            c.on_disk = on_disk;
            if on_disk {
                c.remap = (!identity).then(|| std::sync::Arc::new(remap));
            } else {
                c.recs = recs.clone();
            }
            first
        };
        for (i, o) in f.fallback {
            self.fallback.insert(first + u64::from(i), Settled::of(&o));
        }
        let mut n = 0;
        for (i, r) in recs.iter().enumerate() {
            let slot = first + i as u64;
            // A record whose exact form was dropped had been replaced: not current.
            if r[127] & F_FALLBACK != 0 && !self.fallback.contains_key(&slot) {
                continue;
            }
            let Some(key) = self.key_of(r) else { continue };
            self.point(&key, slot);
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::OrderId;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn key(m: u8, i: u32) -> OrderKey {
        (
            MerchantNo::new(&format!("M{m}")).unwrap(),
            OrderId::new(&format!("ORDER-{i:08}")).unwrap(),
        )
    }

    fn attempt(ch: &str, r: u32, sent: u64, outcome: AttemptOutcome) -> Attempt {
        Attempt {
            channel: ChannelId::new(ch).unwrap(),
            order_ref: OrderRef::new(&format!("S1O{r:x}")).unwrap(),
            sent_at_ms: sent,
            outcome,
        }
    }

    /// A settled order of every shape: debit or payout, success, declined, no channel,
    /// one attempt or a failover, no attempt at all.
    fn settled(i: u32, finished: u64) -> Settled {
        let code = RspCode(Ascii::new("1001").unwrap());
        let kind = if i % 2 == 0 {
            OrderKind::Debit {
                agreement: AgreementId(u64::from(i) + 1),
            }
        } else {
            OrderKind::Payout {
                card_hash: [i as u8; 16],
            }
        };
        let (status, reason, attempts): (_, _, SmallVec<[Attempt; 1]>) = match i % 5 {
            0 => (
                Status::Success,
                Reason::OK,
                [attempt("CHA", i, 5, AttemptOutcome::Success(code))].into(),
            ),
            1 => (
                Status::Failed,
                Reason::CHANNEL_DECLINED,
                [attempt("CHB", i, 5, AttemptOutcome::Declined(code))].into(),
            ),
            2 => (
                Status::Success,
                Reason::OK,
                smallvec::smallvec![
                    attempt("CHA", i, 5, AttemptOutcome::NotProcessed(code)),
                    attempt("CHB", i + 1, 6, AttemptOutcome::Success(code)),
                ],
            ),
            3 => (Status::Failed, Reason::NO_CHANNEL, SmallVec::new()),
            _ => (
                Status::Failed,
                Reason::NO_CHANNEL,
                [attempt("CHA", i, 5, AttemptOutcome::NotSent)].into(),
            ),
        };
        Settled {
            kind,
            amount: u64::from(i) * 100 + 1,
            outcome: Outcome {
                status,
                reason,
                field: 0,
                channel_code: Ascii::new(if i % 5 == 1 { "1001" } else { "" }).unwrap(),
            },
            accepted_at_ms: 5,
            finished_at_ms: finished,
            attempts,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(Vec<(u8, u32)>),
        Remove(u8, u32),
    }

    /// Operations on ids below `ids` (few ids: many repeats and removals of one key).
    fn op(ids: u32) -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => prop::collection::vec((0u8..3, 0..ids), 1..50).prop_map(Op::Insert),
            2 => (0u8..3, 0..ids).prop_map(|(m, i)| Op::Remove(m, i)),
        ]
    }

    /// Apply `ops` (on ids below `ids`) to `store` and to a map; they must agree.
    fn check_against_model(store: &SettledStore, ops: &[Op], ids: u32) {
        let mut model: HashMap<OrderKey, Settled> = HashMap::new();
        let mut version = 0u64;
        for op in ops {
            match op {
                Op::Insert(keys) => {
                    version += 1;
                    let batch: Vec<_> = keys
                        .iter()
                        .map(|&(m, i)| (key(m, i), settled(i, 100 + version)))
                        .collect();
                    // A key twice in one batch: the later record wins, as in the model.
                    store.insert_all(&batch);
                    model.extend(batch);
                }
                Op::Remove(m, i) => {
                    store.remove(&key(*m, *i));
                    model.remove(&key(*m, *i));
                }
            }
        }
        assert_eq!(store.len(), model.len());
        for m in 0..3 {
            for i in 0..ids {
                let k = key(m, i);
                assert_eq!(store.get(&k), model.get(&k).cloned(), "{k:?}");
                assert_eq!(store.contains_key(&k), model.contains_key(&k));
            }
        }
        let mut seen = HashMap::new();
        store
            .for_each(|k, s| assert!(seen.insert(k, s).is_none(), "visited twice"))
            .unwrap();
        assert_eq!(seen, model);
    }

    /// A store with chunks on disk, then a new store put back from its files and the
    /// rest copied, as a snapshot and its load do.
    fn reload_round_trip(ops: &[Op], ids: u32, fp_mask: u64) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SettledStore::with_chunk_len(8);
        store.fp_mask = fp_mask;
        store.attach_dir(dir.path());
        check_against_model(&store, ops, ids);
        let before = all(&store);
        // As a snapshot and its load do: the chunks on disk by number, the rest copied.
        let (lo, hi) = store.disk_range();
        let mut rest = Vec::new();
        store.for_each_from(hi, |k, s| rest.push((k, s))).unwrap();
        let mut again = SettledStore::with_chunk_len(8);
        again.fp_mask = fp_mask;
        again.attach_dir(dir.path());
        // Other intern numbers than the writer's: the files' names are mapped.
        again.merchants.intern(MerchantNo::new("OTHER").unwrap());
        again.channels.intern(ChannelId::new("CHZ").unwrap());
        again.number_chunks_from(hi);
        for seq in lo..hi {
            again.load_chunk(dir.path(), seq, 0).unwrap();
        }
        again.insert_all(&rest);
        for (k, s) in &before {
            assert_eq!(again.get(k), Some(s.clone()));
            assert!(again.contains_key(k));
        }
        // `remove` is not written to chunk files (see its note): a key removed after
        // its chunk was written comes back, with a version once inserted.
        let mut inserted: HashMap<OrderKey, Vec<Settled>> = HashMap::new();
        let mut version = 0u64;
        for op in ops {
            if let Op::Insert(keys) = op {
                version += 1;
                for &(m, i) in keys {
                    inserted
                        .entry(key(m, i))
                        .or_default()
                        .push(settled(i, 100 + version));
                }
            }
        }
        for (k, s) in all(&again) {
            if !before.contains_key(&k) {
                assert!(ops
                    .iter()
                    .any(|o| matches!(o, Op::Remove(m, i) if key(*m, *i) == k)));
                assert!(inserted[&k].contains(&s));
            }
        }
    }

    fn all(store: &SettledStore) -> HashMap<OrderKey, Settled> {
        let mut m = HashMap::new();
        store
            .for_each(|k, s| assert!(m.insert(k, s).is_none()))
            .unwrap();
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn the_store_behaves_like_a_map(ops in prop::collection::vec(op(400), 1..40)) {
            check_against_model(&SettledStore::new(), &ops, 400);
        }

        #[test]
        fn the_store_behaves_like_a_map_with_chunks_on_disk(
            ops in prop::collection::vec(op(400), 1..40)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = SettledStore::with_chunk_len(8);
            store.attach_dir(dir.path());
            check_against_model(&store, &ops, 400);
            // Every full chunk is on disk and holds no records in memory.
            let a = store.read();
            for c in a.chunks.iter().filter(|c| c.len == 8) {
                prop_assert!(c.on_disk && c.recs.is_empty());
            }
        }

        #[test]
        fn chunks_on_disk_come_back_in_a_new_store(ops in prop::collection::vec(op(400), 1..40)) {
            reload_round_trip(&ops, 400, u64::MAX);
        }

        #[test]
        fn chunks_on_disk_come_back_in_a_new_store_when_fingerprints_collide(
            ops in prop::collection::vec(op(12), 1..60)
        ) {
            reload_round_trip(&ops, 12, 0x7);
        }

        #[test]
        fn the_store_behaves_like_a_map_when_fingerprints_collide(
            ops in prop::collection::vec(op(12), 1..60)
        ) {
            let mut store = SettledStore::new();
            store.fp_mask = 0x7;
            check_against_model(&store, &ops, 12);
        }
    }

    #[test]
    fn keys_sharing_a_fingerprint_each_keep_one_entry() {
        let mut store = SettledStore::new();
        store.fp_mask = 0; // every key has the same fingerprint
        let (a, b) = (key(0, 1), key(0, 2));
        store.insert_all(&[(a, settled(1, 9)), (b, settled(2, 9))]);
        assert_eq!(store.index.candidates(0).len(), 2);
        store.remove(&a);
        store.insert_all(&[(b, settled(3, 10))]);
        assert_eq!(store.len(), 1);
        assert_eq!(
            store.index.candidates(0).len(),
            1,
            "b's entry replaced, a's gone"
        );
        assert_eq!(store.get(&b), Some(settled(3, 10)));
        assert_eq!(store.get(&a), None);
        let mut visited = Vec::new();
        store.for_each(|k, s| visited.push((k, s))).unwrap();
        assert_eq!(visited, vec![(b, settled(3, 10))]);
    }

    #[test]
    fn a_plain_order_fits_one_record_and_a_failover_keeps_every_attempt() {
        let store = SettledStore::new();
        store.insert_all(&[(key(0, 0), settled(0, 9)), (key(0, 2), settled(2, 9))]);
        assert_eq!(
            store.fallback.len(),
            1,
            "only the failover needs its exact form"
        );
        assert_eq!(store.get(&key(0, 2)).unwrap().attempts.len(), 2);
        assert_eq!(std::mem::size_of::<Rec>(), 128);
    }

    #[test]
    fn retention_frees_whole_chunks_and_forgets_their_orders() {
        let store = SettledStore::new();
        let n = CHUNK as u32 * 3 + 10;
        let batch: Vec<_> = (0..n)
            .map(|i| (key(1, i), settled(i, 1_000 + u64::from(i))))
            .collect();
        store.insert_all(&batch);
        assert_eq!(store.len(), n as usize);
        // The first chunk's newest order finished at 1000 + CHUNK - 1.
        assert_eq!(store.evict_before(1_000 + CHUNK as u64 - 1), 0);
        assert_eq!(store.evict_before(1_000 + CHUNK as u64), CHUNK);
        assert!(store.get(&key(1, 0)).is_none());
        assert!(store.get(&key(1, CHUNK as u32)).is_some());
        // Everything, the partly filled last chunk included; then new orders still go in.
        assert_eq!(store.evict_before(u64::MAX), n as usize - CHUNK);
        assert_eq!(store.len(), 0);
        store.insert_all(&[(key(2, 7), settled(7, 5))]);
        assert_eq!(store.get(&key(2, 7)), Some(settled(7, 5)));
        let mut visited = 0;
        store.for_each(|_, _| visited += 1).unwrap();
        assert_eq!(visited, 1);
        assert!(store.fallback.len() <= 1);
    }

    #[test]
    fn lookups_on_disk_keep_few_files_open_and_close_those_of_evicted_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = SettledStore::with_chunk_len(4);
        store.attach_dir(dir.path());
        let chunks = 2 * OPEN_FILES as u32 + 8;
        let n = 4 * chunks;
        let batch: Vec<_> = (0..n)
            .map(|i| (key(1, i), settled(i, 1_000 + u64::from(i))))
            .collect();
        store.insert_all(&batch);
        assert_eq!(
            store.disk_range().1 - store.disk_range().0,
            u64::from(chunks)
        );
        // Every order reads back from its file, twice over; at most OPEN_FILES stay open,
        // the most recently read.
        for _ in 0..2 {
            for (k, s) in &batch {
                assert_eq!(store.get(k).as_ref(), Some(s));
            }
        }
        let open = store.open.seqs();
        let last = u64::from(chunks) - 1;
        assert_eq!(
            open,
            (last + 1 - OPEN_FILES as u64..=last)
                .rev()
                .collect::<Vec<_>>()
        );
        // Orders of the oldest chunks read last, so their files are the open ones; then
        // the first half leaves with retention, and its files are closed.
        for (k, _) in &batch[..4 * OPEN_FILES] {
            assert!(store.get(k).is_some());
        }
        assert_eq!(
            store.open.seqs(),
            (0..OPEN_FILES as u64).rev().collect::<Vec<_>>()
        );
        let half = n / 2;
        assert_eq!(store.evict_before(1_000 + u64::from(half)), half as usize);
        let lowest = u64::from(chunks / 2);
        assert_eq!(store.open.seqs(), Vec::<u64>::new());
        assert!(store.get(&batch[n as usize - 1].0).is_some());
        // A chunk file gone while not open: its orders count as held (fail closed, rule 1)
        // and cannot be read; one that is open still reads the bytes it held.
        assert!(!store.open.seqs().contains(&lowest));
        std::fs::remove_file(chunk_file::path(dir.path(), lowest)).unwrap();
        std::fs::remove_file(chunk_file::path(dir.path(), last)).unwrap();
        let (gone, open_gone) = (key(1, half), key(1, n - 1));
        assert!(store.contains_key(&gone));
        assert_eq!(store.get(&gone), None);
        assert!(!store.contains_key(&key(1, n + 1)));
        assert_eq!(
            store.get(&open_gone).as_ref(),
            Some(&batch[n as usize - 1].1)
        );
    }

    #[test]
    fn readers_never_miss_while_a_writer_settles_and_evicts() {
        let store = SettledStore::new();
        let n = 20_000u32;
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
                    let b: Vec<_> = chunk.iter().map(|&i| (key(0, i), settled(i, 10))).collect();
                    store.insert_all(&b);
                    // Nothing is past retention: eviction must free nothing.
                    let freed = store.evict_before(5);
                    done.store(freed != 0, std::sync::atomic::Ordering::Release);
                    assert_eq!(freed, 0);
                }
                done.store(true, std::sync::atomic::Ordering::Release);
            });
            s.spawn(|| {
                // Keys go in in order: each is found, then found again (never lost).
                let mut found = 0u32;
                while found < n {
                    if store.contains_key(&key(0, found)) {
                        assert_eq!(store.get(&key(0, found)), Some(settled(found, 10)));
                        found += 1;
                    } else if done.load(std::sync::atomic::Ordering::Acquire)
                        && !store.contains_key(&key(0, found))
                    {
                        panic!("key {found} missing after the writer finished");
                    } else {
                        std::thread::yield_now();
                    }
                }
            });
        });
        assert_eq!(store.len(), n as usize);
    }
}
