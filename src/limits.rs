//! Every bound in sluice, in one place, with why it has this value (TigerBeetle style).
//!
//! Configuration may lower a limit, never raise it past the compile-time maximum here;
//! the config loader checks this. Names carry units.

/// Largest lender frame, bytes. The largest message is SIGN_AND_PAY_REQ (see
/// `protocol/SPEC.md`); 1 KiB leaves room for growth while keeping a per-connection read
/// buffer small.
pub const FRAME_LEN_MAX: usize = crate::message::MAX_FRAME_LEN;

/// Accepted difference between a request's timestamp and the switch clock, seconds.
/// Wide enough for NTP-synchronised hosts and a slow network, narrow enough that the
/// remembered request ids of one window stay small.
pub const REPLAY_WINDOW_S: u16 = 120;

/// Request ids remembered per merchant (for 2 × the replay window). At 5,000 requests/s
/// per merchant a 240 s memory holds 1.2M ids (~40 MB); past this bound requests are
/// answered BUSY rather than forgetting ids early.
pub const REPLAY_IDS_PER_MERCHANT_MAX: usize = 2_000_000;

/// Lender connections at once (compile-time maximum; config default below). Each costs
/// two tasks and two 8 KiB buffers; lenders keep a handful of long-lived connections.
pub const CONNECTIONS_MAX: usize = 4096;
/// Default connection limit.
pub const CONNECTIONS_DEFAULT: usize = 1024;

/// Requests in flight per lender connection (maximum / default). Beyond it the request is
/// answered BUSY at once. 1,024 covers a pipelined client at 100k orders/s with 10 ms
/// channel latency on 1 connection.
pub const INFLIGHT_PER_SESSION_MAX: usize = 16_384;
/// Default in-flight limit per connection.
pub const INFLIGHT_PER_SESSION_DEFAULT: usize = 1024;

/// Frames queued for one connection's writer. Responses (bounded by the in-flight limit)
/// plus notifications and heartbeats; when full a notification waits for the next
/// re-send instead of blocking the engine.
pub const WRITE_QUEUE_FRAMES: usize = 4096;

/// Merchant numbers one connection may log on with.
pub const MERCHANTS_PER_SESSION_MAX: usize = 16;

/// Default heartbeat interval, seconds; the idle timeout is three intervals.
pub const HEARTBEAT_S_DEFAULT: u16 = 30;
/// Shortest heartbeat a lender may ask for, seconds (bounds heartbeat traffic).
pub const HEARTBEAT_S_MIN: u16 = 5;
/// Longest heartbeat, seconds (a dead peer is noticed within 3 × this).
pub const HEARTBEAT_S_MAX: u16 = 300;

/// Deadline of one channel request, milliseconds. Channels answer in tens to hundreds of
/// ms; past 5 s the outcome is UNKNOWN and the order is queried.
pub const CHANNEL_DEADLINE_MS_DEFAULT: u64 = 5_000;

/// Notifications pushed to a session right after its logon (the rest follow with the
/// re-send timer), so a logon after a long outage cannot flood the write queue.
pub const NOTIFY_ON_LOGON_MAX: usize = 1024;

/// Notifications re-sent per timer tick (1 s).
pub const NOTIFY_RESEND_PER_TICK_MAX: usize = 10_000;
