//! Files of sealed settled-order chunks (see [`super::settled`]): written once, when a
//! chunk of settled orders is full, then only read — by a lookup that lands in the
//! chunk, by retention (to forget the chunk's keys) and by a restart. Snapshots refer to
//! them by number instead of rewriting every retained order each time.
//!
//! ```text
//! file    = header body
//! header  = "SLUSETL1" version:u32le(1) records:u32le seq:u64le max_finished_ms:u64le
//!           body_len:u32le crc32c(body):u32le crc32c(first 40 bytes):u32le 0:u32 (48 bytes)
//! body    = record[records] names fallback
//! record  = 128 bytes, the settled store's packed form (`SettledStore::pack`)
//! names   = merchants:u32le (len:u8 text)*  channels:u32le (len:u8 text)*
//! fallback= count:u32le (index:u32le len:u32le order)*      order: the journal codec's
//! ```
//! A record names its merchant and channel by their number in the writing process's
//! intern tables; `names` lists those tables, so a later process maps them to its own.
//! Name: `settled-{seq:016}.chunk` in the journal directory, written to a temporary
//! file, synced, renamed, and the directory synced.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::order::Order;
use crate::journal::codec::{self, Dec};
use crate::message::ChannelId;
use crate::wire::header::MerchantNo;

const MAGIC: &[u8; 8] = b"SLUSETL1";
const VERSION: u32 = 1;
/// Bytes before the first record.
pub(crate) const HEADER_LEN: usize = 48;
/// Bytes of one record.
pub(crate) const REC: usize = 128;
/// Largest body accepted on read (damage guard: 16M records would be 2 GiB).
const BODY_MAX: usize = 1 << 30;

/// The file of chunk `seq` in `dir`.
pub(crate) fn path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("settled-{seq:016}.chunk"))
}

/// Chunk files in `dir`, by number.
pub(crate) fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    crate::journal::numbered_files(dir, "settled-", ".chunk")
}

/// The intern tables a chunk's records refer to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Names {
    pub merchants: Vec<MerchantNo>,
    pub channels: Vec<ChannelId>,
}

/// A chunk as written and read back.
#[derive(Debug)]
pub(crate) struct ChunkFile {
    pub seq: u64,
    pub max_finished_ms: u64,
    pub recs: Vec<[u8; REC]>,
    pub names: Names,
    /// Exact forms of the records that do not fit one, by index in the chunk.
    pub fallback: Vec<(u32, Order)>,
}

fn put_u32(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&u32::try_from(v).unwrap_or(u32::MAX).to_le_bytes());
}

/// Write chunk `c` durably into `dir` (temporary file, sync, rename, sync the directory).
pub(crate) fn write(dir: &Path, c: &ChunkFile) -> io::Result<()> {
    let mut body = Vec::with_capacity(c.recs.len() * REC + 4096);
    for r in &c.recs {
        body.extend_from_slice(r);
    }
    put_u32(&mut body, c.names.merchants.len());
    for m in &c.names.merchants {
        body.push(m.as_str().len() as u8);
        body.extend_from_slice(m.as_str().as_bytes());
    }
    put_u32(&mut body, c.names.channels.len());
    for ch in &c.names.channels {
        body.push(ch.as_str().len() as u8);
        body.extend_from_slice(ch.as_str().as_bytes());
    }
    put_u32(&mut body, c.fallback.len());
    let mut enc = Vec::new();
    for (i, o) in &c.fallback {
        enc.clear();
        codec::encode_order(o, &mut enc);
        body.extend_from_slice(&i.to_le_bytes());
        put_u32(&mut body, enc.len());
        body.extend_from_slice(&enc);
    }
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(c.recs.len() as u32).to_le_bytes());
    h[16..24].copy_from_slice(&c.seq.to_le_bytes());
    h[24..32].copy_from_slice(&c.max_finished_ms.to_le_bytes());
    h[32..36].copy_from_slice(&(body.len() as u32).to_le_bytes());
    h[36..40].copy_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    let crc = crc32c::crc32c(&h[..40]);
    h[40..44].copy_from_slice(&crc.to_le_bytes());
    let dst = path(dir, c.seq);
    let tmp = dst.with_extension("chunk.tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&h)?;
        f.write_all(&body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &dst)?;
    crate::journal::sync_dir(dir)
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

/// Read and check chunk `seq` (every byte is checked against its checksum).
pub(crate) fn read(dir: &Path, seq: u64) -> Result<ChunkFile, String> {
    let p = path(dir, seq);
    let b = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    parse(&b, seq).map_err(|e| format!("{}: {e}", p.display()))
}

fn parse(b: &[u8], seq: u64) -> Result<ChunkFile, String> {
    if b.len() < HEADER_LEN || &b[..8] != MAGIC {
        return Err("not a settled chunk file".into());
    }
    if u32_at(b, 8) != VERSION || crc32c::crc32c(&b[..40]) != u32_at(b, 40) {
        return Err("bad header (version or checksum)".into());
    }
    let records = u32_at(b, 12) as usize;
    if u64_at(b, 16) != seq {
        return Err(format!("holds chunk {}, not {seq}", u64_at(b, 16)));
    }
    let max_finished_ms = u64_at(b, 24);
    let body_len = u32_at(b, 32) as usize;
    if body_len > BODY_MAX || b.len() != HEADER_LEN + body_len {
        return Err(format!("{} bytes, header says {body_len}", b.len()));
    }
    let body = &b[HEADER_LEN..];
    if crc32c::crc32c(body) != u32_at(b, 36) {
        return Err("body checksum mismatch".into());
    }
    let recs_len = records
        .checked_mul(REC)
        .filter(|&n| n <= body.len())
        .ok_or("fewer bytes than records")?;
    let recs = body[..recs_len]
        .chunks_exact(REC)
        .map(|r| {
            let mut a = [0u8; REC];
            a.copy_from_slice(r);
            a
        })
        .collect();
    let mut d = Dec::new(&body[recs_len..]);
    let e = |e: codec::DecodeError| e.to_string();
    let names = Names {
        merchants: names(&mut d, |t| MerchantNo::new(t).ok(), "merchant")?,
        channels: names(&mut d, |t| ChannelId::new(t).ok(), "channel")?,
    };
    let mut fallback = Vec::new();
    for _ in 0..d.u32().map_err(e)? {
        let i = d.u32().map_err(e)?;
        let n = d.u32().map_err(e)? as usize;
        let mut od = Dec::new(d.bytes(n).map_err(e)?);
        let o = codec::decode_order(&mut od).map_err(e)?;
        od.done().map_err(e)?;
        if i as usize >= records {
            return Err(format!("fallback for record {i} of {records}"));
        }
        fallback.push((i, o));
    }
    d.done().map_err(e)?;
    Ok(ChunkFile {
        seq,
        max_finished_ms,
        recs,
        names,
        fallback,
    })
}

/// A count, then that many names (`len:u8 text`).
fn names<T>(d: &mut Dec, parse: impl Fn(&str) -> Option<T>, what: &str) -> Result<Vec<T>, String> {
    let n = d.u32().map_err(|e| e.to_string())?;
    (0..n)
        .map(|_| {
            let len = d.u8().map_err(|e| e.to_string())?;
            let b = d.bytes(usize::from(len)).map_err(|e| e.to_string())?;
            std::str::from_utf8(b)
                .ok()
                .and_then(&parse)
                .ok_or_else(|| format!("bad {what} name"))
        })
        .collect()
}

/// Chunk `seq`'s file, opened for [`read_rec_at`].
pub(crate) fn open(dir: &Path, seq: u64) -> io::Result<File> {
    File::open(path(dir, seq))
}

/// Record `i` of an opened chunk file (not checked: the whole file was checked when it
/// was written or loaded).
pub(crate) fn read_rec_at(f: &File, i: usize) -> io::Result<[u8; REC]> {
    use std::os::unix::fs::FileExt;
    let mut r = [0u8; REC];
    f.read_exact_at(&mut r, (HEADER_LEN + i * REC) as u64)?;
    Ok(r)
}

/// Delete the chunk files of `dir` for which `gone(seq)` holds; returns how many.
pub(crate) fn remove_where(dir: &Path, gone: impl Fn(u64) -> bool) -> io::Result<usize> {
    let mut n = 0;
    for (seq, p) in list(dir)? {
        if gone(seq) {
            std::fs::remove_file(&p)?;
            n += 1;
        }
    }
    if n > 0 {
        crate::journal::sync_dir(dir)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_file_reads_back_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkFile {
            seq: 7,
            max_finished_ms: 123,
            recs: vec![[1u8; REC], [2u8; REC]],
            names: Names {
                merchants: vec![MerchantNo::new("M1").unwrap()],
                channels: vec![
                    ChannelId::new("CHA").unwrap(),
                    ChannelId::new("CHB").unwrap(),
                ],
            },
            fallback: Vec::new(),
        };
        write(dir.path(), &c).unwrap();
        let back = read(dir.path(), 7).unwrap();
        assert_eq!(
            (back.seq, back.max_finished_ms, &back.recs, &back.names),
            (7, 123, &c.recs, &c.names)
        );
        assert_eq!(
            read_rec_at(&open(dir.path(), 7).unwrap(), 1).unwrap(),
            [2u8; REC]
        );
        assert_eq!(list(dir.path()).unwrap().len(), 1, "no temporary file left");
        // Asked for under another number, or with a byte changed: refused.
        std::fs::copy(path(dir.path(), 7), path(dir.path(), 8)).unwrap();
        assert!(read(dir.path(), 8).unwrap_err().contains("holds chunk 7"));
        let mut b = std::fs::read(path(dir.path(), 7)).unwrap();
        b[HEADER_LEN + 5] ^= 1;
        std::fs::write(path(dir.path(), 7), &b).unwrap();
        assert!(read(dir.path(), 7).unwrap_err().contains("checksum"));
        assert_eq!(remove_where(dir.path(), |s| s < 8).unwrap(), 1);
        assert_eq!(list(dir.path()).unwrap()[0].0, 8);
    }
}
