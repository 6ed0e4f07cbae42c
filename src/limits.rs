//! Every bound in sluice, in one place, with why it has this value (TigerBeetle style).
//!
//! Configuration may lower a limit, never raise it past the compile-time maximum here;
//! the config loader checks this.

/// Largest lender frame, bytes. The largest message is SIGN_AND_PAY_REQ (see
/// `protocol/SPEC.md`); 1 KiB leaves room for growth while keeping a per-connection read
/// buffer small.
pub const FRAME_LEN_MAX: usize = crate::message::MAX_FRAME_LEN;

/// Accepted difference between a request's timestamp and the switch clock, seconds.
/// Wide enough for NTP-synchronised hosts and a slow network, narrow enough that the
/// remembered request ids of one window stay small.
pub const REPLAY_WINDOW_S: u16 = 120;
