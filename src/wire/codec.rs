//! Frame codec following tokio-util's `Decoder`/`Encoder` contract, shared by the lender
//! protocol (magic `SL`) and the channel link (magic `SC`).
//!
//! Decoding checks before parsing. Fewer bytes than a frame is `Ok(None)` after reserving
//! the rest. Two kinds of bad input are told apart:
//! * the header is sound (magic, length in range) but the frame is not acceptable
//!   (version, unknown type, wrong length for the type, malformed header field): the whole
//!   frame is consumed and handed up as `Err(FrameReject)` *inside* `Ok(Some(..))`, so the
//!   connection can answer a REJECT and continue;
//! * framing is lost (bad magic, length outside the allowed range): the decoder returns
//!   `Err(FramingError)`, and the connection sends a final REJECT and closes.
//!
//! The decoder never copies a frame: it splits the read buffer and freezes it into
//! [`Bytes`], which message decoding and MAC verification read in place.

use std::marker::PhantomData;

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::header::{Envelope, Header, HEADER_LEN, MAC_LEN, MIN_FRAME_LEN, VERSION};

/// What one protocol (lender or channel) tells the shared codec.
pub trait FrameKind {
    /// The two magic bytes.
    const MAGIC: [u8; 2];
    /// Largest frame this protocol defines; a length field above it means framing is lost.
    const MAX_FRAME_LEN: usize;
    /// The one total length (header + body + MAC) of a message type, `None` if unknown.
    fn frame_len(msg_type: u8) -> Option<usize>;
}

/// A frame whose framing, version, type, length and header fields are valid. Its MAC has
/// not been checked yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The decoded header.
    pub header: Header,
    /// The whole frame: header, body and MAC trailer.
    pub bytes: Bytes,
}

impl RawFrame {
    /// The body bytes (between header and MAC).
    pub fn body(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..self.bytes.len() - MAC_LEN]
    }

    /// Every byte the MAC covers: header and body.
    pub fn signed(&self) -> &[u8] {
        &self.bytes[..self.bytes.len() - MAC_LEN]
    }

    /// The 32-byte MAC trailer.
    pub fn mac(&self) -> &[u8] {
        &self.bytes[self.bytes.len() - MAC_LEN..]
    }
}

/// Why a frame with sound framing was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// Version byte is not [`VERSION`].
    BadVersion,
    /// Message type unknown to this protocol.
    UnknownType,
    /// Length field differs from the type's fixed length.
    BadLength,
    /// A header field is malformed; its field number (see `header::header_field`).
    MalformedHeader(u16),
}

/// A frame that was consumed but cannot be processed; answer a REJECT and continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameReject {
    /// What could be read of the frame's header, to address the REJECT.
    pub envelope: Envelope,
    /// What was wrong.
    pub kind: RejectKind,
}

/// The stream can no longer be split into frames; the connection must close.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    /// The first two bytes of a frame are not the protocol's magic.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 2]),
    /// The length field is outside `MIN_FRAME_LEN..=MAX_FRAME_LEN`.
    #[error("frame length {0} outside the allowed range")]
    BadLength(usize),
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Decoded item: a frame to process, or a frame to reject.
pub type Inbound = Result<RawFrame, FrameReject>;

/// The shared frame codec.
pub struct FrameCodec<P> {
    _p: PhantomData<P>,
}

impl<P> Default for FrameCodec<P> {
    fn default() -> Self {
        FrameCodec { _p: PhantomData }
    }
}

impl<P> FrameCodec<P> {
    /// A new codec.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<P: FrameKind> FrameCodec<P> {
    /// Decode one frame from a complete byte slice (tests, fuzzing, vector checks).
    pub fn decode_slice(src: &[u8]) -> Result<Option<Inbound>, FramingError> {
        let mut buf = BytesMut::from(src);
        let mut codec = FrameCodec::<P>::new();
        codec.decode(&mut buf)
    }
}

/// Bytes needed before the length field can be read.
const PREFIX_LEN: usize = 6;

impl<P: FrameKind> Decoder for FrameCodec<P> {
    type Item = Inbound;
    type Error = FramingError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, FramingError> {
        if src.len() < PREFIX_LEN {
            src.reserve(PREFIX_LEN - src.len());
            return Ok(None);
        }
        let magic = [src[0], src[1]];
        if magic != P::MAGIC {
            return Err(FramingError::BadMagic(magic));
        }
        let len = u16::from_be_bytes([src[4], src[5]]) as usize;
        if !(MIN_FRAME_LEN..=P::MAX_FRAME_LEN).contains(&len) {
            return Err(FramingError::BadLength(len));
        }
        if src.len() < len {
            src.reserve(len - src.len());
            return Ok(None);
        }
        let bytes = src.split_to(len).freeze();
        let reject = |kind| {
            Ok(Some(Err(FrameReject {
                envelope: Header::envelope(&bytes),
                kind,
            })))
        };
        if bytes[2] != VERSION {
            return reject(RejectKind::BadVersion);
        }
        match P::frame_len(bytes[3]) {
            None => return reject(RejectKind::UnknownType),
            Some(l) if l != len => return reject(RejectKind::BadLength),
            Some(_) => {}
        }
        match Header::parse(&bytes) {
            Ok(header) => Ok(Some(Ok(RawFrame { header, bytes }))),
            Err(field) => reject(RejectKind::MalformedHeader(field)),
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, FramingError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => {
                // A truncated frame at end of stream: report it as lost framing.
                let n = buf.remaining();
                buf.advance(n);
                Err(FramingError::BadLength(n))
            }
        }
    }
}

/// Something that writes one whole frame (header, body and MAC) into a buffer.
pub trait EncodeFrame {
    /// Append exactly one frame to `dst`.
    fn encode_frame(&self, dst: &mut BytesMut);
}

impl EncodeFrame for Bytes {
    fn encode_frame(&self, dst: &mut BytesMut) {
        dst.extend_from_slice(self);
    }
}

impl<P: FrameKind, T: EncodeFrame> Encoder<T> for FrameCodec<P> {
    type Error = std::io::Error;

    fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        let start = dst.len();
        item.encode_frame(dst);
        debug_assert!(
            dst.len() - start >= MIN_FRAME_LEN && dst.len() - start <= P::MAX_FRAME_LEN,
            "encoded frame length out of range"
        );
        Ok(())
    }
}
