//! The 48-byte frame header shared by the lender protocol and the channel link.
//!
//! ```text
//! off size field
//!   0    2 magic        "SL" (lender) or "SC" (channel link)
//!   2    1 version      1
//!   3    1 msg_type
//!   4    2 length       total frame length in bytes, header + body + MAC (u16 BE)
//!   6    2 flags        bit 0 = RESEND; all other bits zero
//!   8    8 request_id   u64 BE, correlates a response with its request
//!  16    8 timestamp_ms u64 BE, sender's clock, ms since 1970-01-01T00:00:00Z
//!  24    2 key_id       u16 BE, selects the MAC key
//!  26    6 reserved     zero
//!  32   16 merchant_no  ASCII, zero-padded
//! ```

use bytes::{BufMut, BytesMut};

use super::field::{Ascii, Field, FieldProblem, Reserved};

/// Bytes in the header.
pub const HEADER_LEN: usize = 48;
/// Bytes in the MAC trailer (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Protocol version carried in every header.
pub const VERSION: u8 = 1;
/// Smallest possible frame: header, empty body, MAC.
pub const MIN_FRAME_LEN: usize = HEADER_LEN + MAC_LEN;

/// Header flag: the sender is re-sending a request it may have sent before (after a lost
/// connection). Informational; idempotency does not depend on it.
pub const FLAG_RESEND: u16 = 0x0001;
/// Every flag this version knows.
pub const FLAGS_KNOWN: u16 = FLAG_RESEND;

/// Field numbers of header fields in `MALFORMED_FIELD` answers (body fields count from 1).
pub mod header_field {
    /// `flags` has unknown bits set.
    pub const FLAGS: u16 = 105;
    /// `reserved` bytes are not zero.
    pub const RESERVED: u16 = 109;
    /// `merchant_no` is not zero-padded printable ASCII, or is empty.
    pub const MERCHANT_NO: u16 = 110;
}

/// A merchant number (商户号): printable ASCII, at most 16 bytes.
pub type MerchantNo = Ascii<16>;

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message type code.
    pub msg_type: u8,
    /// Total frame length (header + body + MAC).
    pub length: u16,
    /// Flag bits (`FLAG_*`).
    pub flags: u16,
    /// Correlation id chosen by the sender of a request, echoed in its response.
    pub request_id: u64,
    /// Sender's wall clock, milliseconds since the Unix epoch (UTC).
    pub timestamp_ms: u64,
    /// Which of the merchant's keys (or which session key) made the MAC.
    pub key_id: u16,
    /// The merchant number the frame acts for.
    pub merchant: MerchantNo,
}

/// Fields that can be read from any frame whose first 48 bytes arrived, even when the rest
/// of the header is malformed; used to address a REJECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Envelope {
    /// Message type byte as received.
    pub msg_type: u8,
    /// Request id as received.
    pub request_id: u64,
    /// Key id as received.
    pub key_id: u16,
    /// Merchant number if it was well-formed, else empty.
    pub merchant: MerchantNo,
}

impl Header {
    /// Append the 48 header bytes with the given magic.
    pub fn put(&self, magic: [u8; 2], out: &mut BytesMut) {
        out.put_slice(&magic);
        out.put_u8(VERSION);
        out.put_u8(self.msg_type);
        out.put_u16(self.length);
        out.put_u16(self.flags);
        out.put_u64(self.request_id);
        out.put_u64(self.timestamp_ms);
        out.put_u16(self.key_id);
        out.put_bytes(0, 6);
        self.merchant.put(out);
    }

    /// Parse bytes 2..48 of a header whose magic was already checked. Returns the
    /// malformed header field's number on error.
    pub fn parse(b: &[u8]) -> Result<Header, u16> {
        debug_assert!(b.len() >= HEADER_LEN);
        let flags = u16::from_be_bytes([b[6], b[7]]);
        if flags & !FLAGS_KNOWN != 0 {
            return Err(header_field::FLAGS);
        }
        Reserved::<6>::get(&b[26..32]).map_err(|_| header_field::RESERVED)?;
        let merchant = MerchantNo::get(&b[32..48]).map_err(|_| header_field::MERCHANT_NO)?;
        if merchant.is_empty() {
            return Err(header_field::MERCHANT_NO);
        }
        Ok(Header {
            msg_type: b[3],
            length: u16::from_be_bytes([b[4], b[5]]),
            flags,
            request_id: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            timestamp_ms: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            key_id: u16::from_be_bytes([b[24], b[25]]),
            merchant,
        })
    }

    /// Best-effort addressing information from a full header, for rejects.
    pub fn envelope(b: &[u8]) -> Envelope {
        debug_assert!(b.len() >= HEADER_LEN);
        Envelope {
            msg_type: b[3],
            request_id: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            key_id: u16::from_be_bytes([b[24], b[25]]),
            merchant: MerchantNo::get(&b[32..48]).unwrap_or_default(),
        }
    }
}

/// Everything that can be wrong with a header, for callers that build their own.
pub fn check_merchant(s: &str) -> Result<MerchantNo, FieldProblem> {
    let m = MerchantNo::new(s)?;
    if m.is_empty() {
        return Err(FieldProblem::Empty);
    }
    Ok(m)
}
