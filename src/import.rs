//! Stock agreement import (存量迁移): bulk-load agreements signed before sluice, from a CSV
//! file, hashing card and ID numbers on the way in.
//!
//! ## File format
//! UTF-8 CSV, one channel agreement per line, comma-separated, no quoting (no field may
//! contain a comma), optional header line starting with `merchant`:
//!
//! ```text
//! merchant,user_id,card_no,id_no,bank_code,card_type,channel,channel_agreement_no
//! 898100000000001,U0001,6222021234567890128,11010519491231002X,ICBC,debit,CHA,A0000001
//! ```
//!
//! `card_type` is `debit` or `credit`. Several lines for the same merchant and card (one per
//! channel) make one agreement signed on several channels, primary first. Every bad line is
//! reported with its line number and reason; good lines are imported.
//!
//! Written by hand rather than with the `csv` crate: the format has no quoting, the parser
//! is ~40 lines, and splitting the file into per-thread chunks on line boundaries is what
//! makes millions of rows per second possible.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::channel::message::AgreementNo;
use crate::engine::agreement::{
    Agreement, ChannelAgreement, ChannelAgreementState, PiiHash, PiiHasher,
    CHANNELS_PER_AGREEMENT_MAX,
};
use crate::message::{BankCode, CardNo, CardType, ChannelId, IdNo};
use crate::wire::field::Digits;
use crate::wire::header::{check_merchant, MerchantNo};

/// A bad line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong (never contains the card or ID number).
    pub reason: String,
}

/// One parsed line, already hashed (no clear card or ID number is kept).
#[derive(Debug, Clone)]
pub struct Row {
    /// Line number.
    pub line: usize,
    /// Merchant.
    pub merchant: MerchantNo,
    /// Keyed card hash.
    pub card_hash: [u8; 16],
    /// Keyed ID hash.
    pub id_hash: [u8; 16],
    /// Last four digits.
    pub last4: Digits<4>,
    /// Bank.
    pub bank: BankCode,
    /// Card type.
    pub card_type: CardType,
    /// Channel.
    pub channel: ChannelId,
    /// Channel agreement number.
    pub agreement_no: AgreementNo,
}

/// The keyed hashes of the previous line's card and ID number. A card signed on several
/// channels has one line per channel, normally next to each other; those lines reuse the
/// hashes instead of computing the two HMACs again (they are most of a line's cost).
/// Holds clear numbers only in memory, only until the next line.
#[derive(Default)]
pub struct LastHashes {
    card: String,
    card_hash: PiiHash,
    id: String,
    id_hash: PiiHash,
}

impl LastHashes {
    fn card(&mut self, hasher: &PiiHasher, card: &str) -> PiiHash {
        if self.card.is_empty() || self.card != card {
            self.card.clear();
            self.card.push_str(card);
            self.card_hash = hasher.card(card);
        }
        self.card_hash
    }

    fn id(&mut self, hasher: &PiiHasher, id: &str) -> PiiHash {
        if self.id.is_empty() || self.id != id {
            self.id.clear();
            self.id.push_str(id);
            self.id_hash = hasher.id(id);
        }
        self.id_hash
    }
}

/// Parse one line. `known` says whether a channel id is configured.
pub fn parse_line(
    line_no: usize,
    line: &str,
    hasher: &PiiHasher,
    known: &dyn Fn(&ChannelId) -> bool,
) -> Result<Row, BadRow> {
    parse_line_with(line_no, line, hasher, known, &mut LastHashes::default())
}

/// [`parse_line`], reusing the previous line's hashes when the card or ID is the same.
pub fn parse_line_with(
    line_no: usize,
    line: &str,
    hasher: &PiiHasher,
    known: &dyn Fn(&ChannelId) -> bool,
    last: &mut LastHashes,
) -> Result<Row, BadRow> {
    let bad = |reason: String| BadRow {
        line: line_no,
        reason,
    };
    let mut f = [""; 8];
    let mut n = 0;
    for part in line.trim_end_matches('\r').split(',') {
        if n < 8 {
            f[n] = part;
        }
        n += 1;
    }
    if n != 8 {
        return Err(bad(format!("expected 8 fields, found {n}")));
    }
    let [merchant, _user, card, id, bank, card_type, channel, no] = f;
    let merchant = check_merchant(merchant.trim()).map_err(|e| bad(format!("merchant: {e}")))?;
    let card = CardNo::new(card.trim()).map_err(|e| bad(format!("card_no: {e}")))?;
    let id = IdNo::new(id.trim()).map_err(|e| bad(format!("id_no: {e}")))?;
    let bank = BankCode::new(bank.trim())
        .ok()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| bad("bank_code: 1–8 printable ASCII characters".into()))?;
    let card_type = match card_type.trim() {
        "debit" | "1" => CardType::Debit,
        "credit" | "2" => CardType::Credit,
        // Echo the value only when it cannot be a card or ID number: a file whose columns
        // are shifted puts those numbers here, and bad-line reasons are printed and logged.
        other if other.len() <= 16 && !other.bytes().any(|b| b.is_ascii_digit()) => {
            return Err(bad(format!("card_type: {other:?} is not debit or credit")))
        }
        _ => {
            return Err(bad(
                "card_type: not debit or credit (value not shown)".into()
            ))
        }
    };
    let channel = ChannelId::new(channel.trim())
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| bad("channel: 1–8 printable ASCII characters".into()))?;
    if !known(&channel) {
        return Err(bad(format!("channel: {channel} is not configured")));
    }
    let agreement_no =
        AgreementNo::new(no.trim()).map_err(|e| bad(format!("channel_agreement_no: {e}")))?;
    let c = card.expose();
    Ok(Row {
        line: line_no,
        merchant,
        card_hash: last.card(hasher, c),
        id_hash: last.id(hasher, id.expose()),
        last4: Digits::new(&c[c.len() - 4..]).unwrap_or_default(),
        bank,
        card_type,
        channel,
        agreement_no,
    })
}

/// Split `text` into at most about `threads` chunks on line boundaries, each with the line
/// number of its first line. Pure, so the fuzzer can check chunking without threads.
pub fn split_chunks(text: &str, threads: usize) -> Vec<(usize, &str)> {
    let threads = threads.clamp(1, 64);
    let target = text.len() / threads + 1;
    let mut chunks = Vec::new();
    let (mut start, mut line) = (0usize, 1usize);
    while start < text.len() {
        let mut end = (start + target).min(text.len());
        while end < text.len() && text.as_bytes()[end - 1] != b'\n' {
            end += 1;
        }
        let chunk = &text[start..end];
        chunks.push((line, chunk));
        line += chunk.bytes().filter(|&b| b == b'\n').count();
        start = end;
    }
    chunks
}

/// Parse one chunk whose first line is line `first` of the file: rows and bad lines, in
/// order. Blank lines and a header on line 1 are skipped.
pub fn parse_chunk(
    first: usize,
    chunk: &str,
    hasher: &PiiHasher,
    known: &dyn Fn(&ChannelId) -> bool,
    progress: Option<&AtomicUsize>,
) -> (Vec<Row>, Vec<BadRow>) {
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    let mut last = LastHashes::default();
    for (i, l) in chunk.lines().enumerate() {
        let n = first + i;
        if let (Some(p), true) = (progress, i % 4096 == 4095) {
            p.fetch_add(4096, Ordering::Relaxed);
        }
        if l.trim().is_empty() || (n == 1 && l.starts_with("merchant")) {
            continue;
        }
        match parse_line_with(n, l, hasher, known, &mut last) {
            Ok(r) => rows.push(r),
            Err(b) => bad.push(b),
        }
    }
    (rows, bad)
}

/// Parse a whole file's text on `threads` threads. Returns rows in file order and every
/// bad line (sorted by line number).
pub fn parse(
    text: &str,
    hasher: &PiiHasher,
    known: &(dyn Fn(&ChannelId) -> bool + Sync),
    threads: usize,
    progress: Option<&AtomicUsize>,
) -> (Vec<Row>, Vec<BadRow>) {
    let chunks = split_chunks(text, threads);
    let results: Vec<(Vec<Row>, Vec<BadRow>)> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|&(first, chunk)| {
                s.spawn(move || parse_chunk(first, chunk, hasher, known, progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for (r, b) in results {
        rows.extend(r);
        bad.extend(b);
    }
    (rows, bad)
}

/// Group rows into agreements (one per merchant and card, channels in file order).
/// `new_id` issues agreement ids. Rows that would exceed the channels per agreement, or
/// repeat a channel of the same card with another number, are reported.
pub fn group(
    rows: Vec<Row>,
    mut new_id: impl FnMut() -> crate::message::AgreementId,
) -> (Vec<Agreement>, Vec<BadRow>) {
    let mut index: HashMap<(MerchantNo, [u8; 16]), usize, rustc_hash::FxBuildHasher> =
        HashMap::with_capacity_and_hasher(rows.len(), Default::default());
    let mut out: Vec<Agreement> = Vec::with_capacity(rows.len());
    let mut bad = Vec::new();
    for r in rows {
        let ca = ChannelAgreement {
            channel: r.channel,
            agreement_no: r.agreement_no,
            state: ChannelAgreementState::Active,
        };
        match index.get(&(r.merchant, r.card_hash)) {
            Some(&i) => {
                let a = &mut out[i];
                if let Some(existing) = a.on_channel(&r.channel) {
                    if existing.agreement_no != r.agreement_no {
                        bad.push(BadRow {
                            line: r.line,
                            reason: format!(
                                "card already has agreement {} on channel {}",
                                existing.agreement_no, r.channel
                            ),
                        });
                    }
                    continue;
                }
                if !a.add_channel(ca) {
                    bad.push(BadRow {
                        line: r.line,
                        reason: format!(
                            "more than {CHANNELS_PER_AGREEMENT_MAX} channels for one card"
                        ),
                    });
                }
            }
            None => {
                let mut a = Agreement {
                    id: new_id(),
                    merchant: r.merchant,
                    card_hash: r.card_hash,
                    id_hash: r.id_hash,
                    card_last4: r.last4,
                    bank: r.bank,
                    card_type: r.card_type,
                    cancelled: false,
                    channels: [None; CHANNELS_PER_AGREEMENT_MAX],
                };
                a.add_channel(ca);
                index.insert((r.merchant, r.card_hash), out.len());
                out.push(a);
            }
        }
    }
    (out, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(c: &ChannelId) -> bool {
        matches!(c.as_str(), "CHA" | "CHB")
    }

    /// Found by the `import_parser` fuzz target: with columns shifted, a card number
    /// landed in `card_type` and was echoed into the reason, which is printed and logged.
    #[test]
    fn a_card_number_in_the_card_type_column_is_not_echoed() {
        let h = PiiHasher::new(&[1u8; 32]);
        let line = "M1,U1,6222021234567890128,11010519491231002X,ICBC,6222021234567890128,CHA,A1";
        let bad = parse_line(3, line, &h, &known).unwrap_err();
        assert_eq!(bad.line, 3);
        assert!(bad.reason.starts_with("card_type"), "{bad:?}");
        assert!(!bad.reason.contains("6222021234567890128"), "{bad:?}");
        let typo = parse_line(
            4,
            &line.replace(",6222021234567890128,C", ",Debit,C"),
            &h,
            &known,
        );
        assert!(
            typo.unwrap_err().reason.contains("\"Debit\""),
            "a typo is still shown"
        );
    }

    #[test]
    fn reused_hashes_equal_fresh_ones() {
        let h = PiiHasher::new(&[4u8; 32]);
        // Same card with another ID, a card coming back after another, a bad line between.
        let text = "M1,U1,6222021234567890128,11010519491231002X,ICBC,debit,CHA,A1\n\
            M1,U1,6222021234567890128,110105194912310028,ICBC,debit,CHB,B1\n\
            M1,U2,4111111111111111,110105194912310028,ICBC,debit,CHA,A2\n\
            M1,U2,4111111111111112,110105194912310028,ICBC,debit,CHA,A9\n\
            M1,U1,6222021234567890128,11010519491231002X,ICBC,debit,CHB,B2\n";
        let (rows, bad) = parse(text, &h, &known, 1, None);
        assert_eq!(bad.len(), 1, "the Luhn failure");
        assert_eq!(rows.len(), 4);
        for r in &rows {
            let line = text.lines().nth(r.line - 1).unwrap();
            let fresh = parse_line(r.line, line, &h, &known).unwrap();
            assert_eq!((r.card_hash, r.id_hash), (fresh.card_hash, fresh.id_hash));
        }
        assert_eq!(rows[0].card_hash, rows[1].card_hash);
        assert_ne!(rows[0].id_hash, rows[1].id_hash);
        assert_eq!(rows[1].id_hash, rows[2].id_hash);
        assert_eq!(rows[0].card_hash, rows[3].card_hash);
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number_and_reason() {
        let h = PiiHasher::new(&[1u8; 32]);
        let text =
            "merchant,user_id,card_no,id_no,bank_code,card_type,channel,channel_agreement_no\n\
            M1,U1,6222021234567890128,11010519491231002X,ICBC,debit,CHA,A1\n\
            M1,U1,6222021234567890128,11010519491231002X,ICBC,debit,CHB,B1\n\
            M1,U2,6222021234567890127,11010519491231002X,ICBC,debit,CHA,A2\n\
            M1,U3,6222021234567890128,110105194912310,ICBC,debit,CHA,A3\n\
            M1,U4,4111111111111111,11010519491231002X,ICBC,savings,CHA,A4\n\
            M1,U5,4111111111111111,11010519491231002X,ICBC,debit,CHZ,A5\n\
            M1,U6,4111111111111111\n\
            \n\
            M2,U7,4111111111111111,11010519491231002X,CMB,credit,CHB,B7\n";
        let (rows, bad) = parse(text, &h, &known, 3, None);
        let lines: Vec<usize> = bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![4, 5, 6, 7, 8], "{bad:?}");
        assert!(bad[0].reason.contains("Luhn"), "{:?}", bad[0]);
        assert!(bad[2].reason.contains("card_type"));
        assert!(bad[3].reason.contains("not configured"));
        assert!(bad[4].reason.contains("8 fields"));
        for b in &bad {
            assert!(
                !b.reason.contains("6222021234567890127"),
                "no card numbers in reports"
            );
        }
        let mut n = 0;
        let (agreements, bad2) = group(rows, || {
            n += 1;
            crate::message::AgreementId(n)
        });
        assert!(bad2.is_empty());
        assert_eq!(agreements.len(), 2);
        assert_eq!(agreements[0].active_channels().count(), 2);
        assert_eq!(agreements[0].card_last4.as_str(), "0128");
    }
}
