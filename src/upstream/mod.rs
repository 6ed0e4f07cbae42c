//! Upstream pools: per channel, persistent pipelined connections with logon, correlation
//! ids, per-request deadlines on the monotonic clock, heartbeats, reconnect with jittered
//! exponential backoff, bounded in-flight requests, and a bounded queue of unsolicited
//! frames (notifications, revocations, late replies) for the engine.
//!
//! - [`pool`]: the API the engine calls ([`ChannelPool`]), slots and reconnection;
//! - [`conn`]: one connection's logon, reader, writer and teardown.

pub mod conn;
pub mod pool;

pub use conn::ConnectError;
pub use pool::{
    Ack, CallError, ChannelPool, NotSentReason, PoolConfig, PoolStats, UnknownReason, Unsolicited,
};
