//! The link between sluice and an upstream payment channel (`protocol/CHANNEL.md`).
//!
//! Same framing as the lender protocol (48-byte header, magic `SC`, fixed-length frames,
//! 32-byte trailer), no I/O here:
//! - [`message`]: layouts, response codes and their four classes, encoding and decoding
//!   with the per-connection session MAC (sequence-numbered HMAC-SHA256);
//! - [`handshake`]: the mutually authenticated logon (Ed25519 signatures, X25519 ephemeral
//!   keys, HKDF-SHA256 session keys).
//!
//! The simulator (`crate::sim`) speaks the channel side, the upstream pool
//! (`crate::upstream`) the switch side.

pub mod examples;
pub mod handshake;
pub mod message;

pub use handshake::{ClientHandshake, Established, HandshakeError, SessionKeys};
pub use message::{
    ChannelCodec, Code, Message, OrderRef, RspClass, RspCode, SessionKey, MAX_FRAME_LEN,
};
