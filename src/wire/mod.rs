//! Framing shared by both protocols: fixed-width fields, the 48-byte header, and the
//! tokio-util codec. Knows nothing of sockets or business rules.

pub mod codec;
pub mod field;
pub mod header;
pub mod layout;
