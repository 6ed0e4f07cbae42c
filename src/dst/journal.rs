//! The simulated disk: one journal segment in memory, written with the real frame format
//! (`journal::segment`, `journal::codec`), with a durability boundary. Records become
//! durable only at an fsync; a crash keeps the durable prefix and an arbitrary part of
//! the rest, possibly cut mid-frame or followed by garbage (a torn tail), and recovery
//! reads it back with the real segment scan.

use crate::engine::Record;
use crate::journal::{codec, segment};
use crate::sim::rng::Rng;

/// The in-memory segment.
#[derive(Debug)]
pub struct SimJournal {
    /// Segment bytes: header then frames.
    bytes: Vec<u8>,
    /// End offset of the durable prefix.
    durable_end: usize,
    /// LSN the next record gets.
    next_lsn: u64,
    /// Highest durable LSN (0: none).
    durable_lsn: u64,
    /// End offset of every frame (for the lying-disk sabotage).
    ends: Vec<usize>,
}

/// What a crash left and what recovery read back.
pub struct Survivors {
    /// Records that survived (LSNs `1..=records`).
    pub records: u64,
    /// Bytes of a torn tail the scan cut off.
    pub torn_bytes: u64,
    /// Records that were not durable but survived anyway.
    pub extra_records: u64,
}

impl Default for SimJournal {
    fn default() -> Self {
        SimJournal {
            bytes: segment::header(1).to_vec(),
            durable_end: segment::HEADER_LEN,
            next_lsn: 1,
            durable_lsn: 0,
            ends: Vec::new(),
        }
    }
}

impl SimJournal {
    /// Append a record (not yet durable); returns its LSN.
    pub fn append(&mut self, r: &Record) -> u64 {
        let mut payload = Vec::with_capacity(128);
        codec::encode(r, &mut payload);
        let lsn = self.next_lsn;
        segment::put_frame(&mut self.bytes, lsn, &payload);
        self.ends.push(self.bytes.len());
        self.next_lsn += 1;
        lsn
    }

    /// fsync: everything written so far is durable.
    pub fn sync(&mut self) {
        self.durable_end = self.bytes.len();
        self.durable_lsn = self.next_lsn - 1;
    }

    /// The segment as recovery reads it (after a crash: durable, torn tail cut).
    pub fn segment(&self) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        vec![(segment::file_name(1).into(), self.bytes.clone())]
    }

    /// LSN the next record gets.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Highest durable LSN.
    pub fn durable_lsn(&self) -> u64 {
        self.durable_lsn
    }

    /// True when written records wait for an fsync.
    pub fn dirty(&self) -> bool {
        self.durable_end < self.bytes.len()
    }

    /// Crash: keep the durable prefix and a random part of the rest, maybe garbled, then
    /// recover as `journal::open` does (scan, cut the torn tail) and decode every record.
    /// Err when the scan refuses the log (damage the recovery would not start on).
    /// `lie` (sabotage): the disk loses durable records too.
    pub fn crash_and_recover(&mut self, rng: &mut Rng, lie: bool) -> Result<Survivors, String> {
        if lie && self.durable_lsn > 0 {
            let keep = rng.below(self.durable_lsn) as usize;
            self.durable_end = if keep == 0 {
                segment::HEADER_LEN
            } else {
                self.ends[keep - 1]
            };
            self.durable_lsn = keep as u64;
        }
        let extra = self.bytes.len() - self.durable_end;
        let keep = self.durable_end + rng.below(extra as u64 + 1) as usize;
        self.bytes.truncate(keep);
        if extra > 0 && rng.chance(0.3) {
            // Garbage where an interrupted write left the sector half old, half new.
            let n = 1 + rng.below(40) as usize;
            for _ in 0..n {
                let b = if rng.chance(0.5) {
                    0
                } else {
                    rng.below(256) as u8
                };
                self.bytes.push(b);
            }
        }
        let mut next = 1u64;
        let end = segment::scan(&self.bytes, &mut next, true, |lsn, payload| {
            codec::decode(payload).map_err(|e| format!("record {lsn}: {e}"))?;
            Ok(())
        })
        .map_err(|e| format!("journal refused after crash: {e:?}"))?;
        let mut torn_bytes = 0;
        if let segment::ScanEnd::Torn { offset, bytes } = end {
            if (offset as usize) < self.durable_end {
                return Err(format!(
                    "torn tail at {offset} inside the durable prefix (ends at {})",
                    self.durable_end
                ));
            }
            self.bytes.truncate(offset as usize);
            torn_bytes = bytes;
        }
        let extra_records = (next - 1).saturating_sub(self.durable_lsn);
        self.ends.truncate((next - 1) as usize);
        self.next_lsn = next;
        self.sync();
        Ok(Survivors {
            records: next - 1,
            torn_bytes,
            extra_records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_the_durable_prefix_and_cuts_a_torn_tail() {
        let recs = crate::journal::codec::tests::sample_records();
        for seed in 0..200 {
            let mut j = SimJournal::default();
            let mut rng = Rng::new(seed);
            let durable = (seed as usize) % recs.len();
            for r in &recs[..durable] {
                j.append(r);
            }
            j.sync();
            for r in &recs[durable..] {
                j.append(r);
            }
            let s = j.crash_and_recover(&mut rng, false).expect("recovers");
            assert!(s.records as usize >= durable, "seed {seed}");
            let mut read = Vec::new();
            let mut next = 1;
            for (_, b) in j.segment() {
                segment::scan(&b, &mut next, true, |_, p| {
                    read.push(codec::decode(p).unwrap());
                    Ok(())
                })
                .unwrap();
            }
            assert_eq!(&read[..], &recs[..s.records as usize], "seed {seed}");
            // Appending after recovery continues the log.
            j.append(&recs[0]);
            j.sync();
            let again = j.crash_and_recover(&mut rng, false).expect("recovers");
            assert_eq!(again.records, s.records + 1);
        }
    }
}
