//! Segment files: naming, the 24-byte header, the record frame, and the scan that tells a
//! torn tail (truncate it) from corruption in the middle (refuse to start).
//!
//! ```text
//! segment  = header frame*
//! header   = "SLUICEJ1" first_lsn:u64le crc32c(first 16 bytes):u32le 0:u32
//! frame    = len:u32le crc:u32le lsn:u64le payload[len]
//! crc      = crc32c(len bytes ‖ lsn bytes ‖ payload)
//! ```
//! A segment is named by its first LSN (`00000000000000000001.wal`), so sorting names
//! sorts the log. LSNs are consecutive across segments; a gap is corruption.
//!
//! **Torn tail vs corruption.** A crash can leave the unsynced end of the *last* segment
//! short, zero-filled or garbled — but every frame after a torn one is torn too, because
//! nothing is written past the end. So a bad frame in the last segment is a torn tail
//! exactly when no valid frame with a later LSN follows it; the scan looks for one (a
//! cheap LSN check at every byte offset before any CRC), and if it finds one the damage
//! is in the middle and recovery refuses, naming the file and offset. A bad frame in any
//! earlier segment is always corruption: a segment is synced before the next is created.

use std::path::{Path, PathBuf};

/// Magic at the start of every segment.
pub const MAGIC: &[u8; 8] = b"SLUICEJ1";
/// Segment header length, bytes.
pub const HEADER_LEN: usize = 24;
/// Frame header length (len, crc, lsn), bytes.
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest record payload, bytes. Records are < 300 bytes; anything longer is damage.
pub const RECORD_LEN_MAX: usize = 64 * 1024;

/// File name of the segment whose first record has `first_lsn`.
pub fn file_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}.wal")
}

/// Segment files in `dir`, sorted by first LSN.
pub fn list(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    super::numbered_files(dir, "", ".wal")
}

/// The header of a segment starting at `first_lsn`.
pub fn header(first_lsn: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&first_lsn.to_le_bytes());
    let crc = crc32c::crc32c(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Check a segment header; returns its first LSN.
pub fn parse_header(b: &[u8]) -> Option<u64> {
    if b.len() < HEADER_LEN || &b[..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(b[16..20].try_into().ok()?);
    if crc32c::crc32c(&b[..16]) != crc {
        return None;
    }
    Some(u64::from_le_bytes(b[8..16].try_into().ok()?))
}

/// Append one frame for `payload` at `lsn` to `out`.
pub fn put_frame(out: &mut Vec<u8>, lsn: u64, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    let lsn_b = lsn.to_le_bytes();
    let mut crc = crc32c::crc32c(&len);
    crc = crc32c::crc32c_append(crc, &lsn_b);
    crc = crc32c::crc32c_append(crc, payload);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&lsn_b);
    out.extend_from_slice(payload);
}

/// A valid frame at `at` in `b`: (lsn, payload range end).
fn frame_at(b: &[u8], at: usize) -> Option<(u64, &[u8], usize)> {
    let h = b.get(at..at.checked_add(FRAME_HEADER_LEN)?)?;
    let len = u32::from_le_bytes(h[0..4].try_into().ok()?) as usize;
    if len == 0 || len > RECORD_LEN_MAX {
        return None;
    }
    let crc = u32::from_le_bytes(h[4..8].try_into().ok()?);
    let lsn = u64::from_le_bytes(h[8..16].try_into().ok()?);
    let end = at + FRAME_HEADER_LEN + len;
    let payload = b.get(at + FRAME_HEADER_LEN..end)?;
    let mut c = crc32c::crc32c(&h[0..4]);
    c = crc32c::crc32c_append(c, &h[8..16]);
    c = crc32c::crc32c_append(c, payload);
    (c == crc).then_some((lsn, payload, end))
}

/// How a segment's scan ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte belonged to a valid frame.
    Clean,
    /// A torn tail starts at this offset (last segment only): truncate there.
    Torn {
        /// Offset of the first bad byte.
        offset: u64,
        /// Bytes after it.
        bytes: u64,
    },
}

/// Why a scan stopped with an error (mapped to `JournalError` by the caller).
#[derive(Debug)]
pub enum ScanError {
    /// A bad frame (or an LSN out of sequence) at this offset.
    Corrupt {
        /// Offset of the bad frame.
        offset: u64,
        /// What was wrong.
        detail: String,
    },
    /// The callback refused a record.
    Record {
        /// Offset of the frame.
        offset: u64,
        /// Why.
        detail: String,
    },
}

/// Scan the frames of one segment's bytes `b` (header included), calling `f(lsn,
/// payload)` for each; `next_lsn` is the LSN the first frame must have and is advanced.
/// `last` says whether this is the newest segment (where a torn tail is tolerated).
pub fn scan(
    b: &[u8],
    next_lsn: &mut u64,
    last: bool,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<ScanEnd, ScanError> {
    let mut at = HEADER_LEN;
    while at < b.len() {
        match frame_at(b, at) {
            Some((lsn, payload, end)) if lsn == *next_lsn => {
                f(lsn, payload).map_err(|detail| ScanError::Record {
                    offset: at as u64,
                    detail,
                })?;
                *next_lsn += 1;
                at = end;
            }
            Some((lsn, _, _)) => {
                return Err(ScanError::Corrupt {
                    offset: at as u64,
                    detail: format!("LSN {lsn} where {} was expected", *next_lsn),
                })
            }
            None => {
                if last && !valid_frame_after(b, at + 1, *next_lsn) {
                    return Ok(ScanEnd::Torn {
                        offset: at as u64,
                        bytes: (b.len() - at) as u64,
                    });
                }
                return Err(ScanError::Corrupt {
                    offset: at as u64,
                    detail: if last {
                        "bad frame (length or checksum) followed by valid records".into()
                    } else {
                        "bad frame (length or checksum) in a sealed segment".into()
                    },
                });
            }
        }
    }
    Ok(ScanEnd::Clean)
}

/// True when some valid frame with an LSN in `next_lsn..next_lsn + possible` starts at
/// or after `from` (the damage is then not a torn tail).
fn valid_frame_after(b: &[u8], from: usize, next_lsn: u64) -> bool {
    let possible = (b.len() / FRAME_HEADER_LEN) as u64 + 1;
    let mut at = from;
    while at + FRAME_HEADER_LEN < b.len() {
        let lsn = u64::from_le_bytes(b[at + 8..at + 16].try_into().unwrap_or([0; 8]));
        if lsn >= next_lsn && lsn - next_lsn <= possible && frame_at(b, at).is_some() {
            return true;
        }
        at += 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(n: u64) -> Vec<u8> {
        let mut b = header(1).to_vec();
        for lsn in 1..=n {
            put_frame(&mut b, lsn, format!("record {lsn}").as_bytes());
        }
        b
    }

    fn run(b: &[u8], last: bool) -> (Result<ScanEnd, ScanError>, u64) {
        let mut next = 1;
        let r = scan(b, &mut next, last, |_, _| Ok(()));
        (r, next)
    }

    #[test]
    fn clean_segment_scans_all() {
        let b = segment(10);
        assert_eq!(parse_header(&b), Some(1));
        let (r, next) = run(&b, true);
        assert_eq!(r.unwrap(), ScanEnd::Clean);
        assert_eq!(next, 11);
    }

    #[test]
    fn torn_tails_are_tolerated_only_in_the_last_segment() {
        let full = segment(10);
        for cut in [1, 5, 17, 20] {
            let b = &full[..full.len() - cut];
            let (r, next) = run(b, true);
            assert!(matches!(r.unwrap(), ScanEnd::Torn { .. }), "cut {cut}");
            assert_eq!(next, 10);
            assert!(matches!(run(b, false).0, Err(ScanError::Corrupt { .. })));
        }
        let mut zeros = full.clone();
        zeros.extend_from_slice(&[0u8; 4096]);
        let (r, next) = run(&zeros, true);
        assert_eq!(
            r.unwrap(),
            ScanEnd::Torn {
                offset: full.len() as u64,
                bytes: 4096
            }
        );
        assert_eq!(next, 11);
    }

    #[test]
    fn a_flipped_bit_in_the_middle_is_corruption_at_its_offset() {
        let mut b = segment(10);
        let off = HEADER_LEN + 3 * (FRAME_HEADER_LEN + 8);
        b[off + FRAME_HEADER_LEN + 2] ^= 0x10;
        match run(&b, true).0 {
            Err(ScanError::Corrupt { offset, .. }) => assert_eq!(offset, off as u64),
            other => panic!("{other:?}"),
        }
        // The same flip in the last frame is a torn tail.
        let mut b = segment(10);
        let n = b.len();
        b[n - 1] ^= 1;
        assert!(matches!(run(&b, true).0.unwrap(), ScanEnd::Torn { .. }));
    }
}
