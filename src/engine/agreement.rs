//! Agreements: sluice's stable agreement id, mapped to one channel agreement number per
//! signed channel; card and ID numbers kept only as keyed hashes plus the last four digits.
//!
//! [`AgreementStore`] keeps them compact (see its layout note); lookups hand out copies
//! ([`Agreement`]), changes go through [`AgreementStore::update`] under one chunk's lock.
//! Locks are never held across `.await` (the engine is synchronous).

use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use dashmap::DashMap;
use ring::hmac;
use zerocopy::FromBytes;

use crate::channel::message::AgreementNo;
use crate::message::{AgreementId, AgreementState, BankCode, CardType, ChannelId};
use crate::wire::field::{Ascii, Digits, Field};
use crate::wire::header::MerchantNo;

/// A `DashMap` with the Fx hasher, for keys no outsider chooses (ids sluice issues,
/// keyed hashes, channel agreement numbers): SipHash's flooding resistance buys nothing
/// there and costs a large share of a lookup (`benches/engine.rs`, recovery profile).
pub type FxDashMap<K, V> = DashMap<K, V, rustc_hash::FxBuildHasher>;

/// A keyed hash of a card or ID number: HMAC-SHA256 under the server's PII secret,
/// truncated to 128 bits (collision-resistant for any realistic card population, and not
/// reversible without the secret, unlike a plain hash of a 19-digit number).
pub type PiiHash = [u8; 16];

/// Hashes personal numbers with the server's secret.
pub struct PiiHasher {
    key: hmac::Key,
}

impl std::fmt::Debug for PiiHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PiiHasher(..)")
    }
}

impl PiiHasher {
    /// A hasher keyed with `secret` (≥ 32 bytes; from the server's secret file).
    pub fn new(secret: &[u8]) -> PiiHasher {
        PiiHasher {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// Hash of a card number. The domain tag keeps card and ID hashes apart.
    pub fn card(&self, card_no: &str) -> PiiHash {
        self.hash(b"card:", card_no)
    }

    /// Hash of an ID number.
    pub fn id(&self, id_no: &str) -> PiiHash {
        self.hash(b"id:", id_no)
    }

    fn hash(&self, tag: &[u8], v: &str) -> PiiHash {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(tag);
        ctx.update(v.as_bytes());
        let t = ctx.sign();
        let mut out = [0u8; 16];
        out.copy_from_slice(&t.as_ref()[..16]);
        out
    }
}

/// Status of one channel agreement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelAgreementState {
    /// Usable for debits.
    Active,
    /// Cancelled by the merchant (unsigned at the channel).
    Cancelled,
    /// Revoked by the card holder at the bank.
    Revoked,
}

/// The agreement with one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelAgreement {
    /// The channel.
    pub channel: ChannelId,
    /// The channel's agreement number (协议号).
    pub agreement_no: AgreementNo,
    /// Its state.
    pub state: ChannelAgreementState,
}

/// Most channels one agreement can be signed on (primary and backup, plus one spare
/// during a migration); fixed so an agreement needs no heap allocation.
pub const CHANNELS_PER_AGREEMENT_MAX: usize = 3;

/// One agreement, as sluice keeps it. No clear card or ID number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// sluice's agreement id (what the lender uses).
    pub id: AgreementId,
    /// The merchant that signed it.
    pub merchant: MerchantNo,
    /// Keyed hash of the card number.
    pub card_hash: PiiHash,
    /// Keyed hash of the ID number.
    pub id_hash: PiiHash,
    /// Last four digits of the card, for operators and the lender.
    pub card_last4: Digits<4>,
    /// Card's bank.
    pub bank: BankCode,
    /// Card type.
    pub card_type: CardType,
    /// Set when the merchant cancelled it.
    pub cancelled: bool,
    /// Channel agreements, primary first.
    pub channels: [Option<ChannelAgreement>; CHANNELS_PER_AGREEMENT_MAX],
}

impl Agreement {
    /// State as the lender sees it.
    pub fn state(&self) -> AgreementState {
        if self.cancelled {
            AgreementState::Cancelled
        } else if self.active_channels().next().is_some() {
            AgreementState::Active
        } else {
            AgreementState::Revoked
        }
    }

    /// Channel agreements usable for debits, primary first.
    pub fn active_channels(&self) -> impl Iterator<Item = &ChannelAgreement> {
        self.channels
            .iter()
            .flatten()
            .filter(|c| c.state == ChannelAgreementState::Active)
    }

    /// The channel agreement on `channel`, if any.
    pub fn on_channel(&self, channel: &ChannelId) -> Option<&ChannelAgreement> {
        self.channels
            .iter()
            .flatten()
            .find(|c| &c.channel == channel)
    }

    /// Add or reactivate the agreement on a channel. Returns false when all slots are used.
    pub fn add_channel(&mut self, ca: ChannelAgreement) -> bool {
        for slot in self.channels.iter_mut() {
            match slot {
                Some(c) if c.channel == ca.channel => {
                    *c = ca;
                    return true;
                }
                None => {
                    *slot = Some(ca);
                    return true;
                }
                _ => {}
            }
        }
        false
    }
}

/// An agreement's channel agreements, as [`Agreement::channels`].
type Channels = [Option<ChannelAgreement>; CHANNELS_PER_AGREEMENT_MAX];

/// Agreements per chunk of the record arena: a chunk holds the ids
/// `first_id .. first_id + CHUNK`, so 256 ids sluice handed out in a row share one chunk.
const CHUNK_BITS: u32 = 8;
const CHUNK: usize = 1 << CHUNK_BITS;
const CHUNK_MASK: u64 = CHUNK as u64 - 1;
/// Bytes kept inline for the channel agreement numbers of one agreement: two numbers of
/// the protocol's full width (32) always fit; a third that does not goes to the spill map.
const NOS_INLINE: usize = 64;
/// Width of a channel agreement number.
const NO_WIDTH: usize = <AgreementNo as Field>::SIZE;

const F_PRESENT: u8 = 1;
const F_CANCELLED: u8 = 2;
/// The channel agreements did not fit inline; they are in `AgreementStore::spilled`.
const F_SPILLED: u8 = 4;

/// One agreement as stored: 128 bytes, no pointers. Merchant, bank and channel codes are
/// indexes into small intern tables; the channel agreement numbers are packed back to
/// back in `nos`. (An [`Agreement`] is ~200 bytes and kept three indexes of owned keys
/// beside it; at 10M agreements that was 6.1 GiB — issue 7 asks for ≤ 2 GiB.)
#[derive(Clone, Copy)]
struct Packed {
    card_hash: PiiHash,
    id_hash: PiiHash,
    merchant: u32,
    bank: u32,
    /// Interned channel index + 1 per slot of `Agreement::channels`; 0 = empty slot.
    channels: [u32; CHANNELS_PER_AGREEMENT_MAX],
    last4: [u8; 4],
    nos: [u8; NOS_INLINE],
    lens: [u8; CHANNELS_PER_AGREEMENT_MAX],
    states: [u8; CHANNELS_PER_AGREEMENT_MAX],
    card_type: u8,
    flags: u8,
}

impl Packed {
    const EMPTY: Packed = Packed {
        card_hash: [0; 16],
        id_hash: [0; 16],
        merchant: 0,
        bank: 0,
        channels: [0; CHANNELS_PER_AGREEMENT_MAX],
        last4: [0; 4],
        nos: [0; NOS_INLINE],
        lens: [0; CHANNELS_PER_AGREEMENT_MAX],
        states: [0; CHANNELS_PER_AGREEMENT_MAX],
        card_type: 0,
        flags: 0,
    };

    fn present(&self) -> bool {
        self.flags & F_PRESENT != 0
    }
}

fn state_code(s: ChannelAgreementState) -> u8 {
    match s {
        ChannelAgreementState::Active => 0,
        ChannelAgreementState::Cancelled => 1,
        ChannelAgreementState::Revoked => 2,
    }
}

fn state_from(c: u8) -> ChannelAgreementState {
    match c {
        0 => ChannelAgreementState::Active,
        1 => ChannelAgreementState::Cancelled,
        _ => ChannelAgreementState::Revoked,
    }
}

impl Packed {
    /// The record as the 16 words it is stored in (little-endian field bytes).
    fn words(&self) -> Words {
        let mut b = [0u8; 128];
        b[0..16].copy_from_slice(&self.card_hash);
        b[16..32].copy_from_slice(&self.id_hash);
        b[32..36].copy_from_slice(&self.merchant.to_le_bytes());
        b[36..40].copy_from_slice(&self.bank.to_le_bytes());
        for (i, c) in self.channels.iter().enumerate() {
            b[40 + 4 * i..44 + 4 * i].copy_from_slice(&c.to_le_bytes());
        }
        b[52..56].copy_from_slice(&self.last4);
        b[56..120].copy_from_slice(&self.nos);
        b[120..123].copy_from_slice(&self.lens);
        b[123..126].copy_from_slice(&self.states);
        b[126] = self.card_type;
        b[127] = self.flags;
        std::array::from_fn(|i| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[8 * i..8 * i + 8]);
            u64::from_le_bytes(w)
        })
    }

    fn from_words(w: &Words) -> Packed {
        let mut b = [0u8; 128];
        for (i, w) in w.iter().enumerate() {
            b[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
        }
        let u32_at = |at: usize| {
            let mut v = [0u8; 4];
            v.copy_from_slice(&b[at..at + 4]);
            u32::from_le_bytes(v)
        };
        let mut p = Packed {
            merchant: u32_at(32),
            bank: u32_at(36),
            channels: [u32_at(40), u32_at(44), u32_at(48)],
            card_type: b[126],
            flags: b[127],
            ..Packed::EMPTY
        };
        p.card_hash.copy_from_slice(&b[0..16]);
        p.id_hash.copy_from_slice(&b[16..32]);
        p.last4.copy_from_slice(&b[52..56]);
        p.nos.copy_from_slice(&b[56..120]);
        p.lens.copy_from_slice(&b[120..123]);
        p.states.copy_from_slice(&b[123..126]);
        p
    }
}

/// A consistent copy of one agreement's record ([`AgreementStore::record`]), decoded
/// field by field: each accessor reads only the words it needs.
pub struct AgreementRecord<'s> {
    store: &'s AgreementStore,
    id: u64,
    w: Words,
    /// The channel agreements of a record that did not fit them inline (rare).
    spilled: Option<Box<Channels>>,
}

impl AgreementRecord<'_> {
    /// sluice's agreement id.
    pub fn id(&self) -> AgreementId {
        AgreementId(self.id)
    }

    /// The merchant that signed it.
    pub fn merchant(&self) -> MerchantNo {
        self.store.merchants.get(self.w[4] as u32)
    }

    /// Keyed hash of the card number.
    pub fn card_hash(&self) -> PiiHash {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&self.w[0].to_le_bytes());
        h[8..].copy_from_slice(&self.w[1].to_le_bytes());
        h
    }

    /// The agreement on `channel`, if it has one there.
    pub fn on_channel(&self, channel: &ChannelId) -> Option<ChannelAgreement> {
        if let Some(c) = &self.spilled {
            return c.iter().flatten().find(|c| &c.channel == channel).copied();
        }
        let w = &self.w;
        let tail = w[15].to_le_bytes();
        let codes = [w[5] as u32, (w[5] >> 32) as u32, w[6] as u32];
        let mut at = 0;
        for (i, &code) in codes.iter().enumerate() {
            if code == 0 {
                continue;
            }
            let len = usize::from(tail[i]);
            if self.store.channel_codes.get(code - 1) == *channel {
                let mut nos = [0u8; NOS_INLINE + NO_WIDTH];
                for (k, w) in w[7..15].iter().enumerate() {
                    nos[8 * k..8 * k + 8].copy_from_slice(&w.to_le_bytes());
                }
                let from = at.min(NOS_INLINE);
                let mut window = [0u8; NO_WIDTH];
                window.copy_from_slice(&nos[from..from + NO_WIDTH]);
                return Some(ChannelAgreement {
                    channel: *channel,
                    // Stored from a valid AgreementNo.
                    agreement_no: AgreementNo(Ascii::from_stored(&window, len)),
                    state: state_from(tail[3 + i]),
                });
            }
            at += len;
        }
        None
    }

    /// Every field.
    pub fn decode(&self) -> Agreement {
        self.store
            .decode(self.id, &self.w, self.spilled.as_deref().copied())
            .expect("a record is only handed out when present")
    }
}

/// Words of one stored record.
const WORDS: usize = 16;
type Words = [u64; WORDS];

/// The flags byte of a stored record (the last byte of [`Packed::words`]).
fn flags_of(w: &Words) -> u8 {
    (w[WORDS - 1] >> 56) as u8
}

/// One record slot: a [`Packed`] held in atomic words, so readers copy it without a
/// lock (see [`Chunk`]). Aligned to 128 bytes: a record is exactly the two cache lines
/// the adjacent-line prefetcher fetches together, never three.
#[derive(zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::KnownLayout)]
#[repr(C, align(128))]
struct Slot([AtomicU64; WORDS]);

/// Size of a transparent huge page on x86-64 (and of the arena's full-grown regions).
const HUGE_PAGE: usize = 2 << 20;
/// Chunks per region once the arena has grown: one huge page of records.
const REGION_CHUNKS_MAX: usize = HUGE_PAGE / (CHUNK * std::mem::size_of::<Slot>());

/// A block of record slots from its own anonymous mapping, shared by the chunks cut
/// from it.
///
/// Why not `Box<[Slot]>` per chunk: a lookup of a random agreement among millions is a
/// DRAM miss on the record *plus* a page walk for its 4 KiB page (25k page-table
/// entries per 100 MB of records, far more than the TLB holds, and in a VM each walk is
/// two-dimensional). The allocator gives no huge pages unless asked with `madvise`, and
/// `madvise` on an allocator's memory needs `unsafe`, which the crate forbids. A
/// `memmap2` mapping can be advised safely; a full-grown region is one 2 MiB-aligned
/// huge page (`MADV_HUGEPAGE`, which this machine's `madvise` THP mode honours), so a
/// lookup's page walk mostly hits the TLB. `benches/engine.rs` `agreement_lookup_1M`
/// has the figures (BENCHMARKS.md).
///
/// Self-referential (the slots borrow the mapping), hence `ouroboros`; the slots are
/// a checked zerocopy cast of the mapping's bytes (page-aligned, zero-filled by the
/// kernel, which is a valid empty record).
#[ouroboros::self_referencing]
struct Region {
    map: memmap2::MmapMut,
    #[borrows(mut map)]
    slots: &'this [Slot],
}

impl Region {
    /// A region of `chunks` chunks of slots. Full-grown ones are asked to be huge pages.
    fn map(chunks: usize) -> Region {
        let bytes = chunks * CHUNK * std::mem::size_of::<Slot>();
        let huge = bytes % HUGE_PAGE == 0;
        // A huge page needs a 2 MiB-aligned range: map one page more and use the aligned
        // part (the rest is never touched, so it costs address space only).
        let len = if huge { bytes + HUGE_PAGE } else { bytes };
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_anon()
            .unwrap_or_else(|e| panic!("agreement arena: cannot map {len} bytes: {e}"));
        let skip = if huge {
            (HUGE_PAGE - map.as_ptr() as usize % HUGE_PAGE) % HUGE_PAGE
        } else {
            0
        };
        if huge {
            // Advice only: without transparent huge pages the records sit in small
            // pages, as they did in boxed chunks.
            let _ = map.advise_range(memmap2::Advice::HugePage, skip, bytes);
        }
        RegionBuilder {
            map,
            slots_builder: |m: &mut memmap2::MmapMut| {
                let b: &[Slot] = <[Slot]>::mut_from_bytes(&mut m[skip..skip + bytes])
                    .expect("a mapping is page-aligned and a whole number of slots");
                b
            },
        }
        .build()
    }
}

/// Cuts chunks' slots from regions that double in size up to [`REGION_CHUNKS_MAX`]
/// chunks (a small store keeps small mappings; a large one gets huge pages).
#[derive(Default)]
struct RegionCursor {
    current: Option<Arc<Region>>,
    /// Chunks the current region has left.
    left: usize,
    /// Chunks cut so far, from all regions.
    cut: usize,
}

impl RegionCursor {
    /// The region and first slot of the next chunk.
    fn next(&mut self) -> (Arc<Region>, usize) {
        let region = match &self.current {
            Some(r) if self.left > 0 => r.clone(),
            _ => {
                let chunks = self.cut.clamp(1, REGION_CHUNKS_MAX);
                let r = Arc::new(Region::map(chunks));
                self.current = Some(r.clone());
                self.left = chunks;
                r
            }
        };
        let first = (region.borrow_slots().len() / CHUNK - self.left) * CHUNK;
        self.left -= 1;
        self.cut += 1;
        (region, first)
    }
}

/// A chunk of the arena: 256 record slots under one sequence lock.
///
/// Readers never write shared memory (a lock's read-modify-write costs a cache miss on
/// the lock's line, serialises the CPU's memory accesses, and makes two reading threads
/// fight over that line): they read `seq`, copy the record's words, and read `seq`
/// again; an odd or changed sequence means a writer was inside, and they copy again.
/// Writers hold `writer` (rare: upsert, update), make `seq` odd, store the words, and
/// make it even again. All shared data is atomic, so a torn copy is only ever discarded,
/// never undefined.
struct Chunk {
    first_id: u64,
    seq: AtomicU64,
    writer: Mutex<()>,
    /// The region holding this chunk's slots, from slot `first` on.
    region: Arc<Region>,
    first: usize,
}

impl Chunk {
    fn new(first_id: u64, (region, first): (Arc<Region>, usize)) -> Chunk {
        Chunk {
            first_id,
            seq: AtomicU64::new(0),
            writer: Mutex::new(()),
            region,
            first,
        }
    }

    #[inline]
    fn slot(&self, off: usize) -> &[AtomicU64; WORDS] {
        &self.region.borrow_slots()[self.first + off].0
    }

    /// Exclusive right to change this chunk's records.
    fn lock(&self) -> MutexGuard<'_, ()> {
        // Records change only inside `publish`, which cannot panic halfway; a poisoned
        // lock still guards consistent records.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A consistent copy of record `off`, plus `extra` read inside the same window (so
    /// state a writer changes inside its window, such as the spill map, matches the copy).
    #[inline]
    fn read<X>(&self, off: usize, mut extra: impl FnMut(&Words) -> X) -> (Words, X) {
        let slot = self.slot(off);
        let mut spins = 0u32;
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let w: Words = std::array::from_fn(|i| slot[i].load(Ordering::Relaxed));
                let x = extra(&w);
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == s1 {
                    return (w, x);
                }
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Record `off` as its writer sees it (the caller holds `writer`, so it is stable).
    fn current(&self, _held: &MutexGuard<'_, ()>, off: usize) -> Words {
        let slot = self.slot(off);
        std::array::from_fn(|i| slot[i].load(Ordering::Relaxed))
    }

    /// Replace record `off` (the caller holds `writer`); `inside` runs inside the write
    /// window, where readers discard what they copied.
    fn publish(&self, _held: &MutexGuard<'_, ()>, off: usize, p: &Packed, inside: impl FnOnce()) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        inside();
        for (w, v) in self.slot(off).iter().zip(p.words()) {
            w.store(v, Ordering::Relaxed);
        }
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }
}

/// Chunks per directory segment: a segment maps 2^12 consecutive chunk numbers (1M ids).
const SEG_BITS: u32 = 12;
const SEG: usize = 1 << SEG_BITS;
/// Segment table size (a power of two) and how many segments it takes before further
/// ones go to the sparse map (keeps linear probing short and always terminating).
const DIR_SLOTS: usize = 1024;
const DIR_SEGMENTS_MAX: usize = DIR_SLOTS * 3 / 4;

/// The directory entries of one run of [`SEG`] chunk numbers.
struct Segment {
    /// Chunk number >> SEG_BITS.
    no: u64,
    /// Chunk ordinal + 1 per chunk number; 0 = no chunk.
    ords: Box<[AtomicU32]>,
}

/// Chunk number (`id >> CHUNK_BITS`) → chunk ordinal, readable without a lock.
///
/// Ids come in dense runs (one per start of the switch: each start continues from a
/// time-based base), so the directory is a small open-addressing table of segments,
/// each a flat array over 2^12 consecutive chunk numbers: a lookup is one or two probes
/// and one array read, all plain loads. Entries and segments are only ever added (under
/// `grow`), never removed. Ids from older, sparse data cost a 16 KiB segment each until
/// the table holds [`DIR_SEGMENTS_MAX`] segments; chunk numbers after that go to a
/// sparse map (slower, still exact).
struct Directory {
    table: Box<[OnceLock<Segment>]>,
    segments: AtomicUsize,
    sparse: FxDashMap<u64, u32>,
    sparse_used: AtomicBool,
    grow: Mutex<()>,
}

impl Directory {
    fn new() -> Directory {
        Directory {
            table: (0..DIR_SLOTS).map(|_| OnceLock::new()).collect(),
            segments: AtomicUsize::new(0),
            sparse: FxDashMap::default(),
            sparse_used: AtomicBool::new(false),
            grow: Mutex::new(()),
        }
    }

    fn home(no: u64) -> usize {
        (no.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - DIR_SLOTS.trailing_zeros())) as usize
    }

    /// The segment holding chunk numbers `no << SEG_BITS ..`, if there is one.
    fn segment(&self, no: u64) -> Option<&Segment> {
        let mut h = Directory::home(no);
        loop {
            match self.table[h].get() {
                Some(s) if s.no == no => return Some(s),
                Some(_) => h = (h + 1) % DIR_SLOTS,
                None => return None,
            }
        }
    }

    #[inline]
    fn get(&self, key: u64) -> Option<u32> {
        if let Some(s) = self.segment(key >> SEG_BITS) {
            return s.ords[key as usize % SEG]
                .load(Ordering::Acquire)
                .checked_sub(1);
        }
        if self.sparse_used.load(Ordering::Acquire) {
            return self.get_sparse(key);
        }
        None
    }

    #[cold]
    #[inline(never)]
    fn get_sparse(&self, key: u64) -> Option<u32> {
        self.sparse.get(&key).map(|o| *o)
    }

    /// The ordinal for `key`, calling `create` (which adds the chunk) when it has none.
    fn get_or_create(&self, key: u64, create: impl FnOnce() -> u32) -> u32 {
        let _g = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ord) = self.get(key) {
            return ord;
        }
        let ord = create();
        let no = key >> SEG_BITS;
        let seg = match self.segment(no) {
            Some(s) => Some(s),
            None if self.segments.load(Ordering::Relaxed) < DIR_SEGMENTS_MAX => {
                let mut h = Directory::home(no);
                while self.table[h].get().is_some() {
                    h = (h + 1) % DIR_SLOTS;
                }
                self.segments.fetch_add(1, Ordering::Relaxed);
                Some(self.table[h].get_or_init(|| Segment {
                    no,
                    ords: (0..SEG).map(|_| AtomicU32::new(0)).collect(),
                }))
            }
            // The table is full for good, so this segment never appears later.
            None => None,
        };
        match seg {
            Some(s) => s.ords[key as usize % SEG].store(ord + 1, Ordering::Release),
            None => {
                self.sparse_used.store(true, Ordering::Release);
                self.sparse.insert(key, ord);
            }
        }
        ord
    }
}

/// Small append-only table of codes (merchants, banks, channels) so a record stores a
/// `u32` instead of the code. Codes are few (configured merchants and channels, bank
/// codes); the table never shrinks.
pub(super) struct Interner<T> {
    ids: FxDashMap<T, u32>,
    list: boxcar::Vec<T>,
    /// The first [`INTERN_FAST`] codes again, each set before its index is handed out:
    /// a lookup by index on every read is one load and one check instead of boxcar's
    /// bucket arithmetic.
    first: Box<[OnceLock<T>]>,
}

/// Codes per intern table with the fast lookup (merchants, banks, channels are fewer).
const INTERN_FAST: usize = 256;

impl<T: Copy + Eq + std::hash::Hash> Interner<T> {
    pub(super) fn new() -> Self {
        Interner {
            ids: FxDashMap::default(),
            list: boxcar::Vec::new(),
            first: (0..INTERN_FAST).map(|_| OnceLock::new()).collect(),
        }
    }

    pub(super) fn intern(&self, v: T) -> u32 {
        if let Some(i) = self.ids.get(&v) {
            return *i;
        }
        *self.ids.entry(v).or_insert_with(|| {
            let i = self.list.push(v);
            if let Some(f) = self.first.get(i) {
                let _ = f.set(v);
            }
            u32::try_from(i).expect("fewer than 2^32 codes")
        })
    }

    pub(super) fn lookup(&self, v: &T) -> Option<u32> {
        self.ids.get(v).map(|i| *i)
    }

    /// Every code, by number.
    pub(super) fn to_vec(&self) -> Vec<T> {
        (0..).map_while(|i| self.list.get(i).copied()).collect()
    }

    pub(super) fn get(&self, i: u32) -> T {
        // Indexes only come from `intern` of this table.
        match self.first.get(i as usize).and_then(OnceLock::get) {
            Some(v) => *v,
            None => self.list[i as usize],
        }
    }
}

/// A 64-bit fingerprint stored as two `u32`s so an index entry is 12 bytes, not 16.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Fp([u32; 2]);

impl Fp {
    fn of(v: u64) -> Fp {
        Fp([v as u32, (v >> 32) as u32])
    }

    fn value(self) -> u64 {
        u64::from(self.0[0]) | u64::from(self.0[1]) << 32
    }
}

impl std::hash::Hash for Fp {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.value());
    }
}

// Fingerprints are already uniformly mixed: hashing them again is wasted time.
impl nohash_hasher::IsEnabled for Fp {}

type FpMap = HashMap<Fp, u32, nohash_hasher::BuildNoHashHasher<Fp>>;

/// Shards of an index; picked by bits 32..38 of the fingerprint, which are used neither
/// for the bucket (low bits) nor for the control byte (top 7 bits) of the shard's table.
const INDEX_SHARDS: usize = 64;

/// A sharded map from a 64-bit fingerprint to a record slot. A fingerprint says "look
/// here": the record is always checked, and the rare key whose fingerprint is taken by
/// another key is kept in a spill map beside the index.
struct FpIndex {
    shards: Box<[RwLock<FpMap>]>,
}

impl FpIndex {
    fn new() -> FpIndex {
        FpIndex {
            shards: (0..INDEX_SHARDS)
                .map(|_| RwLock::new(FpMap::default()))
                .collect(),
        }
    }

    fn shard(&self, fp: u64) -> &RwLock<FpMap> {
        &self.shards[(fp >> 32) as usize % INDEX_SHARDS]
    }

    fn get(&self, fp: u64) -> Option<u32> {
        read(self.shard(fp)).get(&Fp::of(fp)).copied()
    }

    /// Insert when free; otherwise the slot already there.
    fn insert_or_get(&self, fp: u64, slot: u32) -> Result<(), u32> {
        match write(self.shard(fp)).entry(Fp::of(fp)) {
            std::collections::hash_map::Entry::Occupied(e) => Err(*e.get()),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(slot);
                Ok(())
            }
        }
    }

    fn reserve(&self, n: usize) {
        for s in self.shards.iter() {
            write(s).reserve(n / INDEX_SHARDS + 1);
        }
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A panic never leaves a record half-written (each write is one assignment), so a
    // poisoned lock still guards consistent data.
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// The murmur3 finaliser: spreads every input bit over the whole word.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// Fingerprint of (merchant, card hash). The card hash is a keyed HMAC and already
/// uniform; mixing once more keeps the shards balanced even for hashes that are not
/// (tests, tools).
fn card_fp(merchant: u32, card_hash: &PiiHash) -> u64 {
    let mut h = [0u8; 8];
    h.copy_from_slice(&card_hash[..8]);
    fmix64(u64::from_le_bytes(h) ^ (u64::from(merchant) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Fingerprint of (channel, channel agreement number): FNV-1a, then mixed.
fn no_fp(channel: u32, no: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(channel);
    for &b in no {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    fmix64(h)
}

/// All agreements, by id, with the index by (merchant, card hash) and by channel
/// agreement number (for bank-side revocation notices).
///
/// Layout (issue 7: 10M agreements in ≤ 2 GiB, lookup ≤ 200 ns): records live in an
/// arena of fixed-size chunks, one chunk per run of 256 consecutive ids (ids come from
/// [`AgreementStore::next_id`], so they are dense); a lookup by id is one probe of a
/// lock-free directory ([`Directory`]) and one copy of a 128-byte record under its
/// chunk's sequence lock ([`Chunk`]), which readers never write to. The two secondary
/// indexes map a 64-bit fingerprint to a 32-bit slot number (12 bytes an entry), and the
/// record is checked on every hit, so a fingerprint collision costs a spill-map entry,
/// never a wrong answer.
///
/// Concurrency: a record is written before any index points at it, so a reader that
/// finds a slot in an index finds the record. Lock order: chunk (writer lock), then
/// intern tables or the spill maps; no path holds an index shard while taking a chunk
/// lock. Readers take no chunk lock at all.
pub struct AgreementStore {
    /// `id >> CHUNK_BITS` → chunk ordinal in `chunks`.
    dir: Directory,
    chunks: boxcar::Vec<Chunk>,
    /// Where new chunks' slots come from (used under the directory's grow lock).
    regions: Mutex<RegionCursor>,
    by_card: FpIndex,
    by_channel_no: FpIndex,
    /// Keys whose fingerprint another slot holds in the index (a fingerprint collision,
    /// or a second holder of the same key).
    card_spill: FxDashMap<(u32, PiiHash), u32>,
    no_spill: FxDashMap<(u32, AgreementNo), u32>,
    spills: AtomicUsize,
    /// Channel agreements of records whose numbers do not fit inline, by slot.
    spilled: FxDashMap<u32, [Option<ChannelAgreement>; CHANNELS_PER_AGREEMENT_MAX]>,
    merchants: Interner<MerchantNo>,
    banks: Interner<BankCode>,
    channel_codes: Interner<ChannelId>,
    len: AtomicUsize,
    next_id: AtomicU64,
    card_fp: fn(u32, &PiiHash) -> u64,
    no_fp: fn(u32, &[u8]) -> u64,
}

impl Default for AgreementStore {
    fn default() -> Self {
        AgreementStore::new()
    }
}

impl AgreementStore {
    /// An empty store; ids start at 1 (see [`AgreementStore::advance_ids_past`]).
    pub fn new() -> AgreementStore {
        AgreementStore {
            dir: Directory::new(),
            chunks: boxcar::Vec::new(),
            regions: Mutex::new(RegionCursor::default()),
            by_card: FpIndex::new(),
            by_channel_no: FpIndex::new(),
            card_spill: FxDashMap::default(),
            no_spill: FxDashMap::default(),
            spills: AtomicUsize::new(0),
            spilled: FxDashMap::default(),
            merchants: Interner::new(),
            banks: Interner::new(),
            channel_codes: Interner::new(),
            len: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            card_fp,
            no_fp,
        }
    }

    /// A store whose fingerprints all collide: every secondary-index key but the first
    /// goes through the spill maps (tests of the collision path).
    #[cfg(test)]
    fn with_colliding_fingerprints() -> AgreementStore {
        AgreementStore {
            card_fp: |_, _| 42,
            no_fp: |_, _| 42,
            ..AgreementStore::new()
        }
    }

    /// Number of agreements.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A new agreement id. Agreement ids have their own sequence so that they are dense
    /// (the arena stores runs of consecutive ids together).
    pub fn next_id(&self) -> AgreementId {
        AgreementId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// The id [`AgreementStore::next_id`] would hand out now.
    pub fn peek_next_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    /// Make every later [`AgreementStore::next_id`] at least `id + 1`.
    pub fn advance_ids_past(&self, id: u64) {
        self.next_id
            .fetch_max(id.saturating_add(1), Ordering::Relaxed);
    }

    /// Make room for `agreements` more agreements in the indexes (recovery, bulk import),
    /// so they are not rebuilt while growing.
    pub fn reserve(&self, agreements: usize) {
        self.by_card.reserve(agreements);
        self.by_channel_no.reserve(agreements.saturating_mul(2));
    }

    #[inline]
    fn slot_of(&self, id: u64) -> Option<u32> {
        let ord = self.dir.get(id >> CHUNK_BITS)?;
        Some(ord << CHUNK_BITS | (id & CHUNK_MASK) as u32)
    }

    /// The slot for `id`, creating its chunk when needed.
    fn slot_for_new(&self, id: u64) -> u32 {
        if let Some(s) = self.slot_of(id) {
            return s;
        }
        let key = id >> CHUNK_BITS;
        let ord = self.dir.get_or_create(key, || {
            let slots = self
                .regions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .next();
            let ord = self.chunks.push(Chunk::new(key << CHUNK_BITS, slots));
            assert!(
                ord < 1 << (32 - CHUNK_BITS),
                "agreement arena full (2^24 chunks)"
            );
            ord as u32
        });
        ord << CHUNK_BITS | (id & CHUNK_MASK) as u32
    }

    #[inline]
    fn chunk(&self, slot: u32) -> &Chunk {
        // Slots only come from `slot_of`/`slot_for_new`, whose chunk exists.
        &self.chunks[(slot >> CHUNK_BITS) as usize]
    }

    fn id_of(&self, slot: u32) -> u64 {
        self.chunk(slot).first_id + u64::from(slot) % CHUNK as u64
    }

    /// Run `f` on a consistent copy of the record in `slot` if one is there.
    fn with<R>(&self, slot: u32, f: impl FnOnce(&Packed) -> R) -> Option<R> {
        let (w, ()) = self.chunk(slot).read(slot as usize % CHUNK, |_| ());
        let p = Packed::from_words(&w);
        p.present().then(|| f(&p))
    }

    /// A consistent copy of the words in `slot`, with its spilled channel agreements if
    /// it has any. Those are read inside the record's read window: a writer changes the
    /// spill map inside its write window, so the two always match.
    fn load(&self, slot: u32) -> (Words, Option<Channels>) {
        self.chunk(slot).read(slot as usize % CHUNK, |w| {
            (flags_of(w) & F_SPILLED != 0)
                .then(|| self.spilled.get(&slot).map(|c| *c).unwrap_or_default())
        })
    }

    /// The agreement `id` from its record's words (see [`Packed::words`]), if present.
    /// Straight from the words, without a [`Packed`] in between: a lookup's cost past the
    /// record's cache miss is these few moves, and the fewer there are, the sooner the
    /// CPU can start the next lookup's miss.
    #[inline(always)]
    fn decode(&self, id: u64, w: &Words, spilled: Option<Channels>) -> Option<Agreement> {
        let tail = w[15].to_le_bytes();
        let flags = tail[7];
        if flags & F_PRESENT == 0 {
            return None;
        }
        let hash = |a: u64, b: u64| {
            let mut h = [0u8; 16];
            h[..8].copy_from_slice(&a.to_le_bytes());
            h[8..].copy_from_slice(&b.to_le_bytes());
            h
        };
        let last4 = ((w[6] >> 32) as u32).to_le_bytes();
        // Stored zero-padded from valid digits: the length is the count of non-zero bytes.
        let last4_len = (32 - u32::from_le_bytes(last4).leading_zeros()).div_ceil(8);
        let channels = match spilled {
            Some(c) => c,
            None => {
                let mut c = [None; CHANNELS_PER_AGREEMENT_MAX];
                self.inline_channels(w, &mut c);
                c
            }
        };
        // Built in the return slot, not in a local moved out (a 208-byte `memcpy` call).
        Some(Agreement {
            id: AgreementId(id),
            merchant: self.merchants.get(w[4] as u32),
            card_hash: hash(w[0], w[1]),
            id_hash: hash(w[2], w[3]),
            // Stored from a valid value.
            card_last4: Digits::from_stored(&last4, last4_len as usize),
            bank: self.banks.get((w[4] >> 32) as u32),
            card_type: CardType::from_u8(tail[6]).expect("stored card type"),
            cancelled: flags & F_CANCELLED != 0,
            channels,
        })
    }

    /// The channel agreements kept inline in a record's words (not spilled).
    #[inline(always)]
    fn inline_channels(&self, w: &Words, out: &mut Channels) {
        let tail = w[15].to_le_bytes();
        let codes = [w[5] as u32, (w[5] >> 32) as u32, w[6] as u32];
        // The numbers are back to back in words 7..15; each is rebuilt from a fixed
        // 32-byte window at its offset (a move, no scan), so the window may run past them.
        let mut nos = [0u8; NOS_INLINE + NO_WIDTH];
        for (i, w) in w[7..15].iter().enumerate() {
            nos[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
        }
        let mut at = 0;
        for (i, o) in out.iter_mut().enumerate() {
            if codes[i] == 0 {
                *o = None;
                continue;
            }
            let len = usize::from(tail[i]);
            let from = at.min(NOS_INLINE);
            let mut window = [0u8; NO_WIDTH];
            window.copy_from_slice(&nos[from..from + NO_WIDTH]);
            at += len;
            *o = Some(ChannelAgreement {
                channel: self.channel_codes.get(codes[i] - 1),
                // Stored from a valid AgreementNo.
                agreement_no: AgreementNo(Ascii::from_stored(&window, len)),
                state: state_from(tail[3 + i]),
            });
        }
    }

    /// Replace the record in `slot` (the caller holds its chunk's writer lock; `was` is
    /// the record there now), updating the spill map inside the write window.
    fn publish(
        &self,
        held: &MutexGuard<'_, ()>,
        slot: u32,
        was: &Words,
        new: &Packed,
        spill: Option<Channels>,
    ) {
        self.chunk(slot)
            .publish(held, slot as usize % CHUNK, new, || match spill {
                Some(c) => {
                    self.spilled.insert(slot, c);
                }
                None if flags_of(was) & F_SPILLED != 0 => {
                    self.spilled.remove(&slot);
                }
                None => {}
            });
    }

    /// The record for `a`, and its channel agreements when they do not fit inline (they
    /// go to the spill map when the record is published).
    fn pack(&self, a: &Agreement) -> (Packed, Option<Channels>) {
        let mut p = Packed {
            card_hash: a.card_hash,
            id_hash: a.id_hash,
            merchant: self.merchants.intern(a.merchant),
            bank: self.banks.intern(a.bank),
            card_type: a.card_type as u8,
            flags: F_PRESENT | if a.cancelled { F_CANCELLED } else { 0 },
            ..Packed::EMPTY
        };
        p.last4[..a.card_last4.as_bytes().len()].copy_from_slice(a.card_last4.as_bytes());
        let inline: usize = a
            .channels
            .iter()
            .flatten()
            .map(|c| c.agreement_no.as_str().len())
            .sum();
        if inline <= NOS_INLINE {
            let mut at = 0;
            for (i, c) in a.channels.iter().enumerate() {
                if let Some(c) = c {
                    let no = c.agreement_no.as_str().as_bytes();
                    p.channels[i] = self.channel_codes.intern(c.channel) + 1;
                    p.states[i] = state_code(c.state);
                    p.lens[i] = no.len() as u8;
                    p.nos[at..at + no.len()].copy_from_slice(no);
                    at += no.len();
                }
            }
            (p, None)
        } else {
            p.flags |= F_SPILLED;
            (p, Some(a.channels))
        }
    }

    /// A copy of an agreement, every field decoded: [`AgreementStore::record`] then
    /// [`AgreementRecord::decode`].
    pub fn get(&self, id: AgreementId) -> Option<Agreement> {
        self.record(id).map(|r| r.decode())
    }

    /// The lookup: a consistent copy of agreement `id`'s record (its 128 bytes, read
    /// under the chunk's sequence lock), decoded field by field on demand.
    ///
    /// Why a record and not a decoded [`Agreement`]: building the 208-byte value
    /// (interned codes, three channel agreement numbers) is some 400 instructions, enough
    /// to fill the CPU's reorder window while the record's cache miss is outstanding, so
    /// the next lookup's miss could not start under it. A debit reads the whole agreement
    /// once (routing) and then only its card hash and the routed channel's agreement;
    /// those come straight from the copied words.
    #[inline]
    pub fn record(&self, id: AgreementId) -> Option<AgreementRecord<'_>> {
        let slot = self.slot_of(id.0)?;
        let (w, ()) = self.chunk(slot).read(slot as usize % CHUNK, |_| ());
        let flags = flags_of(&w);
        if flags & F_PRESENT == 0 {
            return None;
        }
        if flags & F_SPILLED != 0 {
            return self.record_spilled(id.0, slot);
        }
        Some(AgreementRecord {
            store: self,
            id: id.0,
            w,
            spilled: None,
        })
    }

    /// [`AgreementStore::record`] of a record whose channel agreements are in the spill
    /// map: they are copied inside the record's read window.
    #[cold]
    #[inline(never)]
    fn record_spilled(&self, id: u64, slot: u32) -> Option<AgreementRecord<'_>> {
        let (w, spilled) = self.load(slot);
        (flags_of(&w) & F_PRESENT != 0).then(|| AgreementRecord {
            store: self,
            id,
            w,
            spilled: spilled.map(Box::new),
        })
    }

    /// The slot holding (merchant, card): the spill map first (exact keys, latest
    /// holder), then the index (checked against the record).
    fn card_slot(&self, merchant: u32, card_hash: &PiiHash) -> Option<u32> {
        let holds = |slot: u32| {
            self.with(slot, |p| {
                p.merchant == merchant && &p.card_hash == card_hash
            })
        };
        if self.spills.load(Ordering::Relaxed) != 0 {
            if let Some(s) = self.card_spill.get(&(merchant, *card_hash)).map(|s| *s) {
                if holds(s) == Some(true) {
                    return Some(s);
                }
            }
        }
        let slot = self.by_card.get((self.card_fp)(merchant, card_hash))?;
        (holds(slot) == Some(true)).then_some(slot)
    }

    /// The agreement of this merchant for this card, if any.
    pub fn find_by_card(&self, merchant: &MerchantNo, card_hash: &PiiHash) -> Option<AgreementId> {
        let m = self.merchants.lookup(merchant)?;
        self.card_slot(m, card_hash)
            .map(|s| AgreementId(self.id_of(s)))
    }

    fn has_no(&self, slot: u32, channel: u32, no: &AgreementNo) -> bool {
        let code = self.channel_codes.get(channel);
        let (w, spilled) = self.load(slot);
        (flags_of(&w) & F_PRESENT != 0) && {
            let channels = spilled.unwrap_or_else(|| {
                let mut c = [None; CHANNELS_PER_AGREEMENT_MAX];
                self.inline_channels(&w, &mut c);
                c
            });
            channels
                .iter()
                .flatten()
                .any(|c| c.channel == code && &c.agreement_no == no)
        }
    }

    /// The agreement behind a channel agreement number: the spill map first (exact keys,
    /// latest holder), then the index (checked against the record). One number held by
    /// two agreements (one card signed by two merchants: the channel issues one agreement
    /// per card) answers its latest holder.
    pub fn find_by_channel_no(&self, channel: &ChannelId, no: &AgreementNo) -> Option<AgreementId> {
        let c = self.channel_codes.lookup(channel)?;
        let spilled = if self.spills.load(Ordering::Relaxed) != 0 {
            self.no_spill
                .get(&(c, *no))
                .map(|s| *s)
                .filter(|&s| self.has_no(s, c, no))
        } else {
            None
        };
        let slot = spilled.or_else(|| {
            self.by_channel_no
                .get((self.no_fp)(c, no.as_str().as_bytes()))
                .filter(|&s| self.has_no(s, c, no))
        })?;
        Some(AgreementId(self.id_of(slot)))
    }

    /// Point (merchant, card) at `slot`: in the index when its fingerprint is free (or
    /// already points here), otherwise in the spill map.
    fn index_card(&self, merchant: u32, card_hash: &PiiHash, slot: u32) {
        let fp = (self.card_fp)(merchant, card_hash);
        match self.by_card.insert_or_get(fp, slot) {
            Ok(()) => {}
            Err(s) if s == slot => {}
            Err(_) => {
                self.card_spill.insert((merchant, *card_hash), slot);
                self.spills.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn index_no(&self, ca: &ChannelAgreement, slot: u32) {
        let c = self.channel_codes.intern(ca.channel);
        let fp = (self.no_fp)(c, ca.agreement_no.as_str().as_bytes());
        match self.by_channel_no.insert_or_get(fp, slot) {
            Ok(()) => {}
            Err(s) if s == slot => {}
            Err(_) => {
                self.no_spill.insert((c, ca.agreement_no), slot);
                self.spills.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Insert a new agreement or merge the channel agreements into the existing one for the
    /// same (merchant, card). Returns the agreement's id.
    pub fn upsert(&self, a: Agreement) -> AgreementId {
        let m = self.merchants.intern(a.merchant);
        if let Some(slot) = self.card_slot(m, &a.card_hash) {
            let id = self.id_of(slot);
            let merged = {
                let chunk = self.chunk(slot);
                let g = chunk.lock();
                let (was, spilled) = self.load(slot);
                self.decode(id, &was, spilled).map(|mut cur| {
                    for ca in a.channels.iter().flatten() {
                        cur.add_channel(*ca);
                    }
                    cur.cancelled = false;
                    let (p, spill) = self.pack(&cur);
                    self.publish(&g, slot, &was, &p, spill);
                })
            };
            if merged.is_some() {
                for ca in a.channels.iter().flatten() {
                    self.index_no(ca, slot);
                }
                return AgreementId(id);
            }
        }
        self.insert_new(a, m)
    }

    /// Store an agreement exactly as given, without looking for one of the same card
    /// first (restoring a snapshot, whose entries are distinct agreements). Another
    /// agreement of the same (merchant, card) stays stored; card lookups find this one.
    pub fn insert_exact(&self, a: Agreement) -> AgreementId {
        let m = self.merchants.intern(a.merchant);
        self.insert_new(a, m)
    }

    fn insert_new(&self, a: Agreement, merchant: u32) -> AgreementId {
        let id = a.id;
        self.advance_ids_past(id.0);
        let slot = self.slot_for_new(id.0);
        let was_present = {
            let (packed, spill) = self.pack(&a);
            let chunk = self.chunk(slot);
            let g = chunk.lock();
            let was = chunk.current(&g, slot as usize % CHUNK);
            self.publish(&g, slot, &was, &packed, spill);
            flags_of(&was) & F_PRESENT != 0
        };
        if !was_present {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        for ca in a.channels.iter().flatten() {
            self.index_no(ca, slot);
        }
        self.index_card(merchant, &a.card_hash, slot);
        id
    }

    /// Visit every agreement (journal snapshots). Each is a consistent copy; no lock is
    /// held while `f` runs.
    pub fn for_each(&self, mut f: impl FnMut(&Agreement)) {
        for (ord, chunk) in self.chunks.iter() {
            for off in 0..CHUNK {
                let slot = (ord << CHUNK_BITS | off) as u32;
                let (w, spilled) = self.load(slot);
                if let Some(a) = self.decode(chunk.first_id + off as u64, &w, spilled) {
                    f(&a);
                }
            }
        }
    }

    /// Change an agreement in place under its chunk's lock. New channel agreement
    /// numbers are indexed.
    pub fn update<R>(&self, id: AgreementId, f: impl FnOnce(&mut Agreement) -> R) -> Option<R> {
        let slot = self.slot_of(id.0)?;
        let (r, before, after) = {
            let chunk = self.chunk(slot);
            let g = chunk.lock();
            let (was, spilled) = self.load(slot);
            let mut a = self.decode(id.0, &was, spilled)?;
            let before = a.clone();
            let r = f(&mut a);
            a.id = id;
            let (p, spill) = self.pack(&a);
            self.publish(&g, slot, &was, &p, spill);
            (r, before, a)
        };
        for ca in after.channels.iter().flatten() {
            let known = before
                .channels
                .iter()
                .flatten()
                .any(|b| b.channel == ca.channel && b.agreement_no == ca.agreement_no);
            if !known {
                self.index_no(ca, slot);
            }
        }
        if (after.merchant, after.card_hash) != (before.merchant, before.card_hash) {
            self.index_card(
                self.merchants.intern(after.merchant),
                &after.card_hash,
                slot,
            );
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agreement(id: u64, card: &str, ch: &str, no: &str) -> Agreement {
        let h = PiiHasher::new(&[9u8; 32]);
        let mut a = Agreement {
            id: AgreementId(id),
            merchant: MerchantNo::new("M1").unwrap(),
            card_hash: h.card(card),
            id_hash: h.id("11010519491231002X"),
            card_last4: Digits::new(&card[card.len() - 4..]).unwrap(),
            bank: BankCode::new("ICBC").unwrap(),
            card_type: CardType::Debit,
            cancelled: false,
            channels: [None; CHANNELS_PER_AGREEMENT_MAX],
        };
        a.add_channel(ChannelAgreement {
            channel: ChannelId::new(ch).unwrap(),
            agreement_no: AgreementNo::new(no).unwrap(),
            state: ChannelAgreementState::Active,
        });
        a
    }

    #[test]
    fn keyed_hash_depends_on_secret_and_domain() {
        let a = PiiHasher::new(&[1u8; 32]);
        let b = PiiHasher::new(&[2u8; 32]);
        assert_ne!(a.card("6222021234567890128"), b.card("6222021234567890128"));
        assert_ne!(a.card("123"), a.id("123"));
        assert_eq!(a.card("6222021234567890128"), a.card("6222021234567890128"));
    }

    #[test]
    fn same_card_merges_into_one_agreement_with_backup_channel() {
        let s = AgreementStore::new();
        let id = s.upsert(agreement(1, "6222021234567890128", "CHA", "A-1"));
        let id2 = s.upsert(agreement(2, "6222021234567890128", "CHB", "B-1"));
        assert_eq!(id, id2);
        let a = s.get(id).unwrap();
        assert_eq!(a.active_channels().count(), 2);
        assert_eq!(
            s.find_by_channel_no(
                &ChannelId::new("CHB").unwrap(),
                &AgreementNo::new("B-1").unwrap()
            ),
            Some(id)
        );
        s.update(id, |a| {
            for c in a.channels.iter_mut().flatten() {
                c.state = ChannelAgreementState::Revoked;
            }
        });
        assert_eq!(s.get(id).unwrap().state(), AgreementState::Revoked);
    }

    #[test]
    fn record_is_128_bytes() {
        assert_eq!(std::mem::size_of::<Packed>(), 128);
        assert_eq!(std::mem::size_of::<Slot>(), 128);
        assert_eq!(std::mem::align_of::<Slot>(), 128);
        assert_eq!(std::mem::size_of::<(Fp, u32)>(), 12);
    }

    #[test]
    fn chunks_are_cut_from_doubling_regions_up_to_one_aligned_huge_page() {
        let mut cursor = RegionCursor::default();
        let cuts: Vec<_> = (0..3 * REGION_CHUNKS_MAX + 5)
            .map(|_| cursor.next())
            .collect();
        // Regions in the order they were mapped, with the chunks cut from each.
        let mut regions: Vec<(Arc<Region>, Vec<usize>)> = Vec::new();
        for (r, first) in cuts {
            match regions.last_mut() {
                Some((last, firsts)) if Arc::ptr_eq(last, &r) => firsts.push(first),
                _ => regions.push((r, vec![first])),
            }
        }
        let sizes: Vec<usize> = regions
            .iter()
            .map(|(r, _)| r.borrow_slots().len() / CHUNK)
            .collect();
        assert_eq!(&sizes[..9], &[1, 1, 2, 4, 8, 16, 32, 64, 64]);
        for (r, firsts) in &regions {
            let slots = r.borrow_slots();
            // Each chunk of a region once, in order, none past its end.
            let expect: Vec<usize> = (0..firsts.len()).map(|k| k * CHUNK).collect();
            assert_eq!(firsts, &expect);
            assert!(firsts.len() * CHUNK <= slots.len());
            if slots.len() == REGION_CHUNKS_MAX * CHUNK {
                assert_eq!(std::mem::size_of_val(*slots), HUGE_PAGE);
                assert_eq!(slots.as_ptr() as usize % HUGE_PAGE, 0, "huge page aligned");
            }
            // Zero-filled by the kernel: an empty record.
            assert!(slots
                .iter()
                .all(|s| s.0.iter().all(|w| w.load(Ordering::Relaxed) == 0)));
        }
    }

    #[test]
    fn sparse_ids_past_the_segment_table_still_found() {
        let s = AgreementStore::new();
        // One id per directory segment, more than the segment table takes, then ids at
        // the top of the range and neighbours in segments and chunks already there.
        let mut ids: Vec<u64> = (0..DIR_SEGMENTS_MAX as u64 + 40)
            .map(|k| (k * 7919 + 3) << (SEG_BITS + CHUNK_BITS))
            .collect();
        ids.extend([u64::MAX - 1, u64::MAX - 300, 5, 6, 5 + 256, ids[3] + 1]);
        for (n, &id) in ids.iter().enumerate() {
            let mut a = agreement(id, "6222021234567890128", "CHA", &format!("A-{n}"));
            a.card_hash[..8].copy_from_slice(&id.to_le_bytes());
            assert_eq!(s.insert_exact(a), AgreementId(id));
        }
        assert!(s.dir.sparse_used.load(Ordering::Relaxed));
        // One chunk per id: the arena is past its small regions, into full-grown ones.
        assert!(s.regions.lock().unwrap().cut > 2 * REGION_CHUNKS_MAX);
        assert_eq!(s.len(), ids.len());
        for (n, &id) in ids.iter().enumerate() {
            let a = s.get(AgreementId(id)).unwrap();
            assert_eq!(a.id, AgreementId(id));
            let ca = a.channels[0].unwrap();
            assert_eq!(ca.agreement_no.as_str(), format!("A-{n}"));
            assert_eq!(s.find_by_card(&a.merchant, &a.card_hash), Some(a.id));
            assert_eq!(s.get(AgreementId(id ^ 2)), None);
        }
        assert_eq!(s.peek_next_id(), u64::MAX);
    }

    #[test]
    fn record_words_round_trip() {
        let s = AgreementStore::new();
        let mut a = agreement(1, "6222021234567890128", "CHA", "A-1");
        a.cancelled = true;
        a.channels[1] = Some(ChannelAgreement {
            channel: ChannelId::new("CHB").unwrap(),
            agreement_no: AgreementNo::new("B-22").unwrap(),
            state: ChannelAgreementState::Revoked,
        });
        let (p, spill) = s.pack(&a);
        assert!(spill.is_none());
        let q = Packed::from_words(&p.words());
        assert_eq!(q.words(), p.words());
        assert_eq!(q.card_hash, a.card_hash);
        assert_eq!(s.decode(1, &p.words(), None), Some(a));
    }

    /// The version `k` of one agreement: every field a reader can see says `k`, and every
    /// third version has three full-width numbers, so the channels spill.
    fn version(base: &Agreement, k: u64) -> Agreement {
        let mut a = base.clone();
        a.id_hash = [k as u8; 16];
        a.id_hash[..8].copy_from_slice(&k.to_le_bytes());
        a.card_last4 = Digits::new(&format!("{:04}", k % 10_000)).unwrap();
        a.cancelled = k % 2 == 1;
        let width = if k % 3 == 0 { 31 } else { 8 };
        for (i, (slot, ch)) in a.channels.iter_mut().zip(["CHA", "CHB", "CHC"]).enumerate() {
            *slot = Some(ChannelAgreement {
                channel: ChannelId::new(ch).unwrap(),
                agreement_no: AgreementNo::new(&format!("{i}{k:0>width$}")).unwrap(),
                state: ChannelAgreementState::Active,
            });
        }
        a
    }

    #[test]
    fn readers_never_see_a_torn_record() {
        let s = AgreementStore::new();
        let base = agreement(0, "6222021234567890128", "CHA", "A-0");
        // Two agreements in one chunk, one in another: writers rewrite the first and
        // third, readers read all three.
        let ids: Vec<AgreementId> = (0..3)
            .map(|i| {
                let mut a = version(&base, 0);
                a.id = AgreementId(if i == 2 { 1000 } else { 10 + i });
                a.card_hash[0] = i as u8;
                s.upsert(a)
            })
            .collect();
        const WRITES: u64 = 3_000;
        let done = AtomicBool::new(false);
        let (s, ids, base, done) = (&s, &ids, &base, &done);
        std::thread::scope(|sc| {
            let reader = sc.spawn(move || {
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) || reads < 1000 {
                    for &id in ids {
                        let got = s.get(id).unwrap();
                        let mut k = [0u8; 8];
                        k.copy_from_slice(&got.id_hash[..8]);
                        let mut want = version(base, u64::from_le_bytes(k));
                        want.id = id;
                        want.card_hash = got.card_hash;
                        assert_eq!(got, want, "a torn record");
                        reads += 1;
                    }
                }
            });
            let writers: Vec<_> = [ids[0], ids[2]]
                .into_iter()
                .map(|id| {
                    sc.spawn(move || {
                        for k in 1..=WRITES {
                            s.update(id, |a| {
                                let card = a.card_hash;
                                *a = version(base, k);
                                a.card_hash = card;
                            })
                            .unwrap();
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            done.store(true, Ordering::Relaxed);
            reader.join().unwrap();
        });
        for id in [ids[0], ids[2]] {
            assert_eq!(s.get(id).unwrap().id_hash[..8], WRITES.to_le_bytes());
        }
    }

    #[test]
    fn long_numbers_spill_and_come_back() {
        for s in [
            AgreementStore::new(),
            AgreementStore::with_colliding_fingerprints(),
        ] {
            let long = |c: char| format!("{c}").repeat(32);
            let mut a = agreement(7, "6222021234567890128", "CHA", &long('a'));
            a.add_channel(ChannelAgreement {
                channel: ChannelId::new("CHB").unwrap(),
                agreement_no: AgreementNo::new(&long('b')).unwrap(),
                state: ChannelAgreementState::Active,
            });
            let id = s.upsert(a.clone());
            assert_eq!(s.get(id).unwrap(), a, "two full-width numbers fit inline");
            // A third full-width number does not fit inline: it spills, and still reads back.
            let c = agreement(8, "6222021234567890128", "CHC", &long('c'));
            assert_eq!(s.upsert(c), id);
            let got = s.get(id).unwrap();
            assert_eq!(got.active_channels().count(), 3);
            for (ch, no) in [("CHA", 'a'), ("CHB", 'b'), ("CHC", 'c')] {
                let (ch, no) = (
                    ChannelId::new(ch).unwrap(),
                    AgreementNo::new(&long(no)).unwrap(),
                );
                assert_eq!(got.on_channel(&ch).unwrap().agreement_no, no);
                assert_eq!(s.find_by_channel_no(&ch, &no), Some(id));
            }
            // Revoking the third channel shrinks nothing, and the record stays exact.
            s.update(id, |a| a.channels[2] = None);
            let mut want = got.clone();
            want.channels[2] = None;
            assert_eq!(s.get(id).unwrap(), want);
        }
    }

    /// A card hash whose fingerprint equals `base`'s (same first 8 bytes).
    #[test]
    fn fingerprint_collisions_never_give_a_wrong_answer() {
        let s = AgreementStore::new();
        let a = agreement(1, "6222021234567890128", "CHA", "A-1");
        let mut b = agreement(2, "6222020000000000016", "CHA", "A-2");
        b.card_hash[..8].copy_from_slice(&a.card_hash[..8]);
        assert_ne!(a.card_hash, b.card_hash);
        let (ia, ib) = (s.upsert(a.clone()), s.upsert(b.clone()));
        assert_ne!(ia, ib);
        assert_eq!(s.find_by_card(&a.merchant, &a.card_hash), Some(ia));
        assert_eq!(s.find_by_card(&b.merchant, &b.card_hash), Some(ib));
        let mut c = a.clone();
        c.card_hash[15] ^= 1;
        assert_eq!(s.find_by_card(&c.merchant, &c.card_hash), None);
    }

    #[test]
    fn concurrent_writers_and_readers_see_every_agreement() {
        let s = AgreementStore::new();
        let h = PiiHasher::new(&[5u8; 32]);
        const PER: u64 = 2_000;
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let (s, h) = (&s, &h);
                sc.spawn(move || {
                    for i in 0..PER {
                        let n = t * PER + i;
                        let card = format!("6222{n:015}");
                        let mut a = agreement(0, "6222021234567890128", "CHA", &format!("A-{n}"));
                        a.id = s.next_id();
                        a.card_hash = h.card(&card);
                        let id = s.upsert(a.clone());
                        // Readers racing the writers always find what was written.
                        assert_eq!(s.get(id).unwrap(), a);
                        assert_eq!(s.find_by_card(&a.merchant, &a.card_hash), Some(id));
                    }
                });
            }
        });
        assert_eq!(s.len() as u64, 4 * PER);
        let mut n = 0;
        s.for_each(|a| {
            n += 1;
            let no = a.channels[0].unwrap();
            assert_eq!(
                s.find_by_channel_no(&no.channel, &no.agreement_no),
                Some(a.id)
            );
        });
        assert_eq!(n, 4 * PER);
    }

    mod model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashMap;

        #[derive(Debug, Clone)]
        enum Op {
            /// Upsert card `card` of merchant `m` signed on channel `ch` with number `no`.
            Upsert {
                m: u8,
                card: u8,
                ch: u8,
                no: u8,
                long: bool,
            },
            /// Set one channel's state of an agreement picked by `pick`.
            Revoke {
                pick: u8,
                slot: u8,
            },
            Cancel {
                pick: u8,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0..3u8, 0..12u8, 0..4u8, 0..20u8, any::<bool>())
                    .prop_map(|(m, card, ch, no, long)| Op::Upsert { m, card, ch, no, long }),
                2 => (any::<u8>(), 0..3u8).prop_map(|(pick, slot)| Op::Revoke { pick, slot }),
                1 => any::<u8>().prop_map(|pick| Op::Cancel { pick }),
            ]
        }

        fn no(ch: u8, no: u8, long: bool) -> AgreementNo {
            let s = format!("N{ch}-{no}");
            let s = if long { format!("{s:X<32}") } else { s };
            AgreementNo::new(&s).unwrap()
        }

        /// The old store, written plainly: what the compact one must behave like.
        #[derive(Default)]
        struct Model {
            by_id: HashMap<AgreementId, Agreement>,
            by_card: HashMap<(MerchantNo, PiiHash), AgreementId>,
            /// Every agreement that ever held a (channel, number).
            holders: HashMap<(ChannelId, AgreementNo), std::collections::HashSet<AgreementId>>,
        }

        impl Model {
            fn upsert(&mut self, a: Agreement) -> AgreementId {
                if let Some(id) = self.by_card.get(&(a.merchant, a.card_hash)) {
                    let cur = self.by_id.get_mut(id).unwrap();
                    for ca in a.channels.iter().flatten() {
                        cur.add_channel(*ca);
                    }
                    cur.cancelled = false;
                    return *id;
                }
                self.by_card.insert((a.merchant, a.card_hash), a.id);
                self.by_id.insert(a.id, a.clone());
                a.id
            }
        }

        fn run(store: AgreementStore, ops: Vec<Op>) {
            let h = PiiHasher::new(&[3u8; 32]);
            let mut model = Model::default();
            let mut ids: Vec<AgreementId> = Vec::new();
            for op in ops {
                match op {
                    Op::Upsert {
                        m,
                        card,
                        ch,
                        no: n,
                        long,
                    } => {
                        let card_no = format!("62220200000000{card:02}");
                        let mut a = Agreement {
                            id: store.next_id(),
                            merchant: MerchantNo::new(&format!("M{m}")).unwrap(),
                            card_hash: h.card(&card_no),
                            id_hash: h.id(&card_no),
                            card_last4: Digits::new(&card_no[card_no.len() - 4..]).unwrap(),
                            bank: BankCode::new("ICBC").unwrap(),
                            card_type: CardType::Debit,
                            cancelled: false,
                            channels: [None; CHANNELS_PER_AGREEMENT_MAX],
                        };
                        a.add_channel(ChannelAgreement {
                            channel: ChannelId::new(&format!("CH{ch}")).unwrap(),
                            agreement_no: no(ch, n, long),
                            state: ChannelAgreementState::Active,
                        });
                        let want = model.upsert(a.clone());
                        let ca = a.channels[0].unwrap();
                        model
                            .holders
                            .entry((ca.channel, ca.agreement_no))
                            .or_default()
                            .insert(want);
                        assert_eq!(store.upsert(a), want);
                        if !ids.contains(&want) {
                            ids.push(want);
                        }
                    }
                    Op::Revoke { pick, slot } if !ids.is_empty() => {
                        let id = ids[pick as usize % ids.len()];
                        let f = |a: &mut Agreement| {
                            if let Some(c) = a.channels[slot as usize].as_mut() {
                                c.state = ChannelAgreementState::Revoked;
                            }
                        };
                        f(model.by_id.get_mut(&id).unwrap());
                        store.update(id, f).unwrap();
                    }
                    Op::Cancel { pick } if !ids.is_empty() => {
                        let id = ids[pick as usize % ids.len()];
                        model.by_id.get_mut(&id).unwrap().cancelled = true;
                        store.update(id, |a| a.cancelled = true).unwrap();
                    }
                    _ => {}
                }
                assert_eq!(store.len(), model.by_id.len());
            }
            let mut seen = 0;
            store.for_each(|a| {
                seen += 1;
                assert_eq!(Some(a), model.by_id.get(&a.id));
            });
            assert_eq!(seen, model.by_id.len());
            let absent = ChannelId::new("NONE").unwrap();
            for (id, a) in &model.by_id {
                assert_eq!(store.get(*id).as_ref(), Some(a));
                // The record's accessors decode the same fields as the full copy, for
                // inline and spilled channel agreements alike.
                let r = store.record(*id).expect("present");
                assert_eq!(r.id(), *id);
                assert_eq!(r.merchant(), a.merchant);
                assert_eq!(r.card_hash(), a.card_hash);
                assert_eq!(r.decode(), *a);
                for ca in a.channels.iter().flatten() {
                    assert_eq!(
                        r.on_channel(&ca.channel).as_ref(),
                        a.on_channel(&ca.channel)
                    );
                }
                assert_eq!(r.on_channel(&absent), None);
                assert_eq!(store.find_by_card(&a.merchant, &a.card_hash), Some(*id));
                for ca in a.channels.iter().flatten() {
                    // One channel number held by two agreements (the same card signed by
                    // two merchants: the channel issues one agreement per card) is indexed
                    // once, for its latest holder; a number only ever held by one
                    // agreement must always be found.
                    let found = store.find_by_channel_no(&ca.channel, &ca.agreement_no);
                    let holders = &model.holders[&(ca.channel, ca.agreement_no)];
                    if holders.len() == 1 {
                        assert_eq!(found, Some(*id));
                    }
                    if let Some(found) = found {
                        assert!(model.by_id[&found]
                            .channels
                            .iter()
                            .flatten()
                            .any(|c| c.channel == ca.channel && c.agreement_no == ca.agreement_no));
                    }
                }
            }
            assert_eq!(store.get(AgreementId(u64::MAX)), None);
            assert!(store.record(AgreementId(u64::MAX)).is_none());
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]
            #[test]
            fn compact_store_behaves_like_the_plain_one(ops in proptest::collection::vec(op(), 1..120)) {
                run(AgreementStore::new(), ops.clone());
                run(AgreementStore::with_colliding_fingerprints(), ops);
            }
        }
    }
}
