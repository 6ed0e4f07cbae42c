//! Fixed-width field types shared by every frame layout (lender and channel).
//!
//! Every field has one size known at compile time, so every message type has exactly one
//! length. Text is stored inline (`[u8; N]`), never on the heap: decoding a message copies
//! at most a few hundred bytes and allocates nothing.
//!
//! Padding rule (both protocols): a text field holds its value left-aligned, followed by
//! zero bytes (0x00) up to the field width. A zero byte inside the value, or a non-zero
//! byte after the first zero byte, makes the field malformed.

use std::fmt;

use bytes::{BufMut, BytesMut};

/// Why a single field could not be decoded or failed validation.
///
/// The message layer adds *which* field (its number in the layout table) and turns this
/// into the wire reason code `MALFORMED_FIELD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FieldProblem {
    /// Text that is not valid UTF-8.
    #[error("not valid UTF-8")]
    NotUtf8,
    /// A byte outside printable ASCII in an ASCII field.
    #[error("not printable ASCII")]
    NotAscii,
    /// A non-digit in a digits-only field.
    #[error("not digits only")]
    NotDigits,
    /// Zero byte inside the value or non-zero byte inside the padding.
    #[error("bad zero padding")]
    BadPadding,
    /// A required field is empty.
    #[error("empty")]
    Empty,
    /// Wrong number of characters for the field's meaning (e.g. an 18-character ID).
    #[error("wrong length")]
    WrongLength,
    /// A card number whose Luhn check digit is wrong.
    #[error("Luhn check failed")]
    Luhn,
    /// A value outside the range the protocol allows (zero amount, unknown enum value).
    #[error("value out of range")]
    OutOfRange,
    /// Reserved bytes that are not zero.
    #[error("reserved bytes not zero")]
    ReservedNotZero,
}

/// A fixed-width wire field.
///
/// `put` appends exactly `SIZE` bytes; `get` is handed exactly `SIZE` bytes.
pub trait Field: Sized {
    /// Width on the wire, in bytes.
    const SIZE: usize;
    /// Short type name used in the layout tables of `protocol/SPEC.md`.
    const KIND: &'static str;
    /// Append the field's `SIZE` bytes.
    fn put(&self, out: &mut BytesMut);
    /// Parse the field from exactly `SIZE` bytes.
    fn get(src: &[u8]) -> Result<Self, FieldProblem>;
}

macro_rules! int_field {
    ($t:ty, $kind:literal) => {
        impl Field for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            const KIND: &'static str = $kind;
            #[inline]
            fn put(&self, out: &mut BytesMut) {
                out.put_slice(&self.to_be_bytes());
            }
            #[inline]
            fn get(src: &[u8]) -> Result<Self, FieldProblem> {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(src);
                Ok(<$t>::from_be_bytes(a))
            }
        }
    };
}
int_field!(u8, "u8");
int_field!(u16, "u16 BE");
int_field!(u32, "u32 BE");
int_field!(u64, "u64 BE");

/// Reserved bytes: always sent as zero, rejected when not zero (so they can gain a
/// meaning in a later protocol version without ambiguity).
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct Reserved<const N: usize>;

impl<const N: usize> Field for Reserved<N> {
    const SIZE: usize = N;
    const KIND: &'static str = "reserved (zero)";
    #[inline]
    fn put(&self, out: &mut BytesMut) {
        out.put_bytes(0, N);
    }
    #[inline]
    fn get(src: &[u8]) -> Result<Self, FieldProblem> {
        if src.iter().all(|&b| b == 0) {
            Ok(Reserved)
        } else {
            Err(FieldProblem::ReservedNotZero)
        }
    }
}

/// Length of the value in a zero-padded field, after checking the padding rule.
#[inline]
fn padded_len(src: &[u8]) -> Result<usize, FieldProblem> {
    let len = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    if src[len..].iter().any(|&b| b != 0) {
        return Err(FieldProblem::BadPadding);
    }
    Ok(len)
}

/// 256 bytes of 0xFF, then 256 zero bytes: `KEEP_FIRST[256 - len..][..N]` is a mask
/// that keeps the first `len` bytes of an `N`-byte window (`len <= N < 256`).
static KEEP_FIRST: [u8; 512] = {
    let mut t = [0u8; 512];
    let mut i = 0;
    while i < 256 {
        t[i] = 0xFF;
        i += 1;
    }
    t
};

/// Inline storage for a zero-padded text value of at most `N` bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Inline<const N: usize> {
    bytes: [u8; N],
    len: u8,
}

impl<const N: usize> Inline<N> {
    const fn empty() -> Self {
        Inline {
            bytes: [0u8; N],
            len: 0,
        }
    }

    fn from_bytes(v: &[u8]) -> Option<Self> {
        if v.len() > N || v.contains(&0) {
            return None;
        }
        let mut bytes = [0u8; N];
        bytes[..v.len()].copy_from_slice(v);
        Some(Inline {
            bytes,
            // N is at most 255 for every field type (asserted where the types are built).
            len: v.len() as u8,
        })
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

macro_rules! text_type {
    ($(#[$m:meta])* $name:ident, $kind:literal, $check:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name<const N: usize>(Inline<N>);

        impl<const N: usize> $name<N> {
            const _FITS: () = assert!(N > 0 && N < 256, "text fields are 1..=255 bytes");

            /// An empty value (all padding).
            pub const fn empty() -> Self {
                #[allow(clippy::let_unit_value)]
                let _ = Self::_FITS;
                $name(Inline::empty())
            }

            /// Build from a string, checking width and character class.
            pub fn new(s: &str) -> Result<Self, FieldProblem> {
                let _ = Self::_FITS;
                let inline = Inline::from_bytes(s.as_bytes()).ok_or(if s.len() > N {
                    FieldProblem::WrongLength
                } else {
                    FieldProblem::BadPadding
                })?;
                let check: fn(&[u8]) -> Result<(), FieldProblem> = $check;
                check(inline.as_bytes())?;
                Ok($name(inline))
            }

            /// Rebuild a value from the bytes of one this type's constructor accepted
            /// earlier: the first `len` bytes of `window` (the rest is ignored). For
            /// sluice's compact stores, which keep only those bytes and read them back on
            /// every lookup: the character check they passed once is not repeated, and
            /// the copy is a fixed-size move, not a scan. `len` is cut to the width.
            // Not every text type is kept in a compact store.
            #[allow(dead_code)]
            #[inline]
            pub(crate) fn from_stored(window: &[u8; N], len: usize) -> Self {
                let len = len.min(N);
                let mut bytes = *window;
                // Byte j of the mask is 0xFF for j < len: one AND per vector, no branch.
                let mask = &KEEP_FIRST[256 - len..256 - len + N];
                for (b, m) in bytes.iter_mut().zip(mask) {
                    *b &= m;
                }
                let check: fn(&[u8]) -> Result<(), FieldProblem> = $check;
                debug_assert!(check(&bytes[..len]).is_ok() && !bytes[..len].contains(&0));
                $name(Inline {
                    bytes,
                    len: len as u8,
                })
            }

            /// The value without padding.
            pub fn as_str(&self) -> &str {
                // Invariant: the constructor and `get` checked the bytes are valid UTF-8.
                std::str::from_utf8(self.0.as_bytes()).unwrap_or("")
            }

            /// The value's bytes without padding.
            pub fn as_bytes(&self) -> &[u8] {
                self.0.as_bytes()
            }

            /// True when the value is empty.
            pub fn is_empty(&self) -> bool {
                self.0.len == 0
            }
        }

        impl<const N: usize> Default for $name<N> {
            fn default() -> Self {
                Self::empty()
            }
        }

        impl<const N: usize> Field for $name<N> {
            const SIZE: usize = N;
            const KIND: &'static str = $kind;
            #[inline]
            fn put(&self, out: &mut BytesMut) {
                out.put_slice(&self.0.bytes);
            }
            #[inline]
            fn get(src: &[u8]) -> Result<Self, FieldProblem> {
                let len = padded_len(src)?;
                let check: fn(&[u8]) -> Result<(), FieldProblem> = $check;
                check(&src[..len])?;
                let mut bytes = [0u8; N];
                bytes.copy_from_slice(src);
                Ok($name(Inline {
                    bytes,
                    len: len as u8,
                }))
            }
        }
    };
}

text_type!(
    /// UTF-8 text, zero-padded (names, purposes). Chinese characters take 3 bytes each.
    Text,
    "UTF-8 text",
    |b| std::str::from_utf8(b).map(|_| ()).map_err(|_| FieldProblem::NotUtf8)
);

text_type!(
    /// Printable ASCII (0x20–0x7E), zero-padded (order ids, codes, bank codes).
    Ascii,
    "ASCII",
    |b| {
        if b.iter().all(|&c| (0x20..=0x7e).contains(&c)) {
            Ok(())
        } else {
            Err(FieldProblem::NotAscii)
        }
    }
);

text_type!(
    /// ASCII digits `0`–`9` only, zero-padded.
    Digits,
    "ASCII digits",
    |b| {
        if b.iter().all(u8::is_ascii_digit) {
            Ok(())
        } else {
            Err(FieldProblem::NotDigits)
        }
    }
);

impl<const N: usize> fmt::Debug for Text<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}
impl<const N: usize> fmt::Debug for Ascii<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}
impl<const N: usize> fmt::Debug for Digits<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}
impl<const N: usize> fmt::Display for Ascii<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<F: Field + PartialEq + fmt::Debug>(v: F) {
        let mut b = BytesMut::new();
        v.put(&mut b);
        assert_eq!(b.len(), F::SIZE);
        assert_eq!(F::get(&b).unwrap(), v);
    }

    #[test]
    fn ints_are_big_endian() {
        let mut b = BytesMut::new();
        0x0102_0304u32.put(&mut b);
        assert_eq!(&b[..], &[1, 2, 3, 4]);
        roundtrip(u64::MAX - 7);
        roundtrip(0xabcdu16);
    }

    #[test]
    fn text_padding_rules() {
        roundtrip(Text::<64>::new("张三丰").unwrap());
        assert_eq!(Text::<4>::get(b"ab\0c"), Err(FieldProblem::BadPadding));
        assert_eq!(Text::<4>::get(b"\xff\xfe\0\0"), Err(FieldProblem::NotUtf8));
        assert_eq!(Text::<4>::get(b"\0\0\0\0").unwrap().as_str(), "");
        assert_eq!(Ascii::<4>::get(b"a\x01\0\0"), Err(FieldProblem::NotAscii));
        assert_eq!(Digits::<4>::get(b"12a\0"), Err(FieldProblem::NotDigits));
        assert_eq!(Text::<2>::new("abc"), Err(FieldProblem::WrongLength));
        assert_eq!(
            Reserved::<2>::get(&[0, 1]),
            Err(FieldProblem::ReservedNotZero)
        );
    }

    #[test]
    fn twenty_one_chinese_characters_fit_a_name() {
        let name: String = "欧阳".repeat(10) + "娜";
        assert_eq!(name.chars().count(), 21);
        roundtrip(Text::<64>::new(&name).unwrap());
    }
}
