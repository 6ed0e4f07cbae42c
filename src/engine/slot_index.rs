//! The settled store's index: from a key's 64-bit fingerprint to the slots of records
//! that may hold the key, 8 bytes an entry (issue 7: memory per retained order).
//!
//! A multimap, and only a filter: every slot it gives is checked against its record by
//! the caller, so two keys that share the bits kept here cost a record read, never a
//! wrong answer. Open addressing with linear probing over `u64` entries
//! `tag:u32 | slot:u32`, in 256 shards that each double on their own, so no single
//! reallocation copies the whole index (fingerprints are uniform, so the shards still
//! reach their limit at about the same time: RSS grows in steps). A `DashMap<u64, u64>`
//! costs 16 bytes an entry plus control bytes: 52 bytes per settled order measured with
//! 2M orders, 35 with this.
//!
//! The entry's home bucket comes from its tag, so an entry can be moved without its
//! key (growth, and backward-shift deletion, which leaves no tombstones). The shard is
//! picked by fingerprint bits 24..32 and the tag is bits 32..63 with the top bit set
//! (an entry is never 0, the empty mark): 39 bits of the fingerprint are kept.
//!
//! Written by hand: the crates that offer compact hash tables (hashbrown's raw table,
//! `indexmap`) keep whole keys and values, which is what this avoids.
//!
//! Slots are kept modulo 2^32: the caller resolves them against its lowest live slot,
//! which holds as long as fewer than 2^32 settled orders are held at once (4 billion
//! orders, ~200 GB of index; the retention bounds it far below).

use smallvec::SmallVec;

const SHARDS: usize = 256;
/// Entries per shard when it is first used.
const MIN_CAP: usize = 64;

/// Slots that may hold a key, as kept (modulo 2^32).
pub(crate) type Candidates = SmallVec<[u32; 4]>;

pub(crate) struct SlotIndex {
    shards: Box<[std::sync::RwLock<Table>]>,
}

#[derive(Default)]
struct Table {
    /// Power-of-two length (or empty); 0 marks a free bucket.
    entries: Vec<u64>,
    len: usize,
}

fn shard_of(fp: u64) -> usize {
    (fp >> 24) as usize % SHARDS
}

fn tag_of(fp: u64) -> u32 {
    (fp >> 32) as u32 | 0x8000_0000
}

fn entry(tag: u32, slot: u32) -> u64 {
    u64::from(tag) << 32 | u64::from(slot)
}

impl Table {
    fn mask(&self) -> usize {
        self.entries.len().wrapping_sub(1)
    }

    fn home(&self, tag: u32) -> usize {
        tag as usize & self.mask()
    }

    fn candidates(&self, tag: u32, out: &mut Candidates) {
        if self.entries.is_empty() {
            return;
        }
        let mut i = self.home(tag);
        loop {
            let e = self.entries[i];
            if e == 0 {
                return;
            }
            if (e >> 32) as u32 == tag {
                out.push(e as u32);
            }
            i = (i + 1) & self.mask();
        }
    }

    /// Position of exactly this entry.
    fn find(&self, e: u64) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        let mut i = self.home((e >> 32) as u32);
        loop {
            match self.entries[i] {
                0 => return None,
                x if x == e => return Some(i),
                _ => i = (i + 1) & self.mask(),
            }
        }
    }

    fn put(&mut self, e: u64) {
        let mut i = self.home((e >> 32) as u32);
        while self.entries[i] != 0 {
            i = (i + 1) & self.mask();
        }
        self.entries[i] = e;
    }

    fn insert(&mut self, e: u64) {
        // Grow at 7/8 full: probes for a miss stay short, and 8 bytes an entry become
        // 9.1 to 18.3 with the free buckets.
        if (self.len + 1) * 8 > self.entries.len() * 7 {
            let cap = (self.entries.len() * 2).max(MIN_CAP);
            let old = std::mem::replace(&mut self.entries, vec![0; cap]);
            for x in old.into_iter().filter(|&x| x != 0) {
                self.put(x);
            }
        }
        self.put(e);
        self.len += 1;
    }

    /// Remove the entry at `i`, moving later entries of its run back so that no probe
    /// sequence is cut (no tombstones).
    fn remove_at(&mut self, mut hole: usize) {
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let e = self.entries[j];
            if e == 0 {
                break;
            }
            let home = self.home((e >> 32) as u32);
            // `e` may fill the hole when its home is not in (hole, j] (cyclically).
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.entries[hole] = e;
                hole = j;
            }
        }
        self.entries[hole] = 0;
        self.len -= 1;
    }
}

impl SlotIndex {
    pub(crate) fn new() -> SlotIndex {
        SlotIndex {
            shards: (0..SHARDS)
                .map(|_| std::sync::RwLock::new(Table::default()))
                .collect(),
        }
    }

    fn read(&self, fp: u64) -> std::sync::RwLockReadGuard<'_, Table> {
        self.shards[shard_of(fp)]
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, fp: u64) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.shards[shard_of(fp)]
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The slots kept for fingerprints that agree with `fp` in the bits kept.
    pub(crate) fn candidates(&self, fp: u64) -> Candidates {
        let mut out = Candidates::new();
        self.read(fp).candidates(tag_of(fp), &mut out);
        out
    }

    /// Add `slot` for `fp` if the candidates are still `seen` (the caller checked them
    /// and none holds its key); otherwise nothing, and false: look again.
    pub(crate) fn insert_if_unchanged(&self, fp: u64, seen: &Candidates, slot: u32) -> bool {
        let tag = tag_of(fp);
        let mut t = self.write(fp);
        let mut now = Candidates::new();
        t.candidates(tag, &mut now);
        if &now != seen {
            return false;
        }
        t.insert(entry(tag, slot));
        true
    }

    /// Point the entry (`fp`, `old`) at `new`; false when that entry is gone.
    pub(crate) fn replace(&self, fp: u64, old: u32, new: u32) -> bool {
        let tag = tag_of(fp);
        let mut t = self.write(fp);
        match t.find(entry(tag, old)) {
            Some(i) => {
                t.entries[i] = entry(tag, new);
                true
            }
            None => false,
        }
    }

    /// Remove the entry (`fp`, `slot`); false when there is none.
    pub(crate) fn remove(&self, fp: u64, slot: u32) -> bool {
        let mut t = self.write(fp);
        match t.find(entry(tag_of(fp), slot)) {
            Some(i) => {
                t.remove_at(i);
                true
            }
            None => false,
        }
    }

    /// True when `slot` is kept for `fp`.
    pub(crate) fn holds(&self, fp: u64, slot: u32) -> bool {
        self.read(fp).find(entry(tag_of(fp), slot)).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32),
        Remove(u64, u32),
        Replace(u64, u32, u32),
    }

    /// Fingerprints from a small set that share shards, tags and homes often.
    fn fp() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0u64..8).prop_map(|x| x << 32),
            (0u64..8).prop_map(|x| x << 40 | 1 << 24),
            any::<u64>(),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (fp(), 0u32..50).prop_map(|(f, s)| Op::Insert(f, s)),
            2 => (fp(), 0u32..50).prop_map(|(f, s)| Op::Remove(f, s)),
            1 => (fp(), 0u32..50, 0u32..50).prop_map(|(f, a, b)| Op::Replace(f, a, b)),
        ]
    }

    /// Model: per kept (shard, tag), the multiset of slots.
    fn key(fp: u64) -> (usize, u32) {
        (shard_of(fp), tag_of(fp))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn the_index_behaves_like_a_multimap(ops in prop::collection::vec(op(), 1..400)) {
            let ix = SlotIndex::new();
            let mut model: HashMap<(usize, u32), Vec<u32>> = HashMap::new();
            let mut fps = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(f, s) => {
                        let seen = ix.candidates(f);
                        prop_assert!(ix.insert_if_unchanged(f, &seen, s));
                        model.entry(key(f)).or_default().push(s);
                        fps.push(f);
                    }
                    Op::Remove(f, s) => {
                        let m = model.entry(key(f)).or_default();
                        let had = m.iter().position(|&x| x == s);
                        prop_assert_eq!(ix.remove(f, s), had.is_some());
                        if let Some(i) = had {
                            m.swap_remove(i);
                        }
                    }
                    Op::Replace(f, a, b) => {
                        let m = model.entry(key(f)).or_default();
                        let had = m.iter().position(|&x| x == a);
                        prop_assert_eq!(ix.replace(f, a, b), had.is_some());
                        if let Some(i) = had {
                            m[i] = b;
                        }
                    }
                }
                for &f in &fps {
                    let mut got: Vec<u32> = ix.candidates(f).into_vec();
                    let mut want = model.get(&key(f)).cloned().unwrap_or_default();
                    got.sort_unstable();
                    want.sort_unstable();
                    prop_assert_eq!(&got, &want);
                }
            }
            let total: usize = model.values().map(Vec::len).sum();
            let held: usize = ix.shards.iter().map(|s| s.read().unwrap().len).sum();
            prop_assert_eq!(held, total);
        }
    }

    #[test]
    fn a_changed_run_makes_the_insert_look_again() {
        let ix = SlotIndex::new();
        let seen = ix.candidates(7 << 32);
        assert!(ix.insert_if_unchanged(7 << 32, &seen, 1));
        // `seen` is stale now: another entry with the same tag went in.
        assert!(!ix.insert_if_unchanged(7 << 32, &seen, 2));
        assert_eq!(ix.candidates(7 << 32).into_vec(), vec![1]);
    }

    #[test]
    fn eight_bytes_an_entry_before_the_free_buckets() {
        let ix = SlotIndex::new();
        let n = 200_000u32;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for s in 0..n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let seen = ix.candidates(x);
            assert!(ix.insert_if_unchanged(x, &seen, s));
        }
        let cap: usize = ix
            .shards
            .iter()
            .map(|s| s.read().unwrap().entries.len())
            .sum();
        let per = (cap * 8) as f64 / f64::from(n);
        assert!((9.0..=19.0).contains(&per), "{per} bytes an entry");
    }
}
