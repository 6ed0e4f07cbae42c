//! From a decoded frame to an authenticated, typed request — and the one place where
//! framing, MAC and field errors become wire reason codes.
//!
//! Order of checks for every inbound lender frame (the spec's §6 lists the same order):
//! 1. framing (codec): magic, length range, version, type, length for type, header fields;
//! 2. MAC: the key named by (merchant number, key id) must exist and verify;
//! 3. body fields: each field's type rule, in layout order; the first failure is reported.
//!
//! Session rules (logon, merchant binding, timestamp window, request-id reuse) come after
//! these and live with the session.

use crate::crypto::{KeyStore, MacError, MacKey};
use crate::wire::codec::{FrameReject, FramingError, Inbound, RejectKind};
use crate::wire::header::{Envelope as HeaderEnvelope, Header};

use super::{decode, Malformed, Message, Outcome, Reason, Status};

use std::sync::Arc;

/// An authenticated request ready for the session.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The frame's header.
    pub header: Header,
    /// The typed message.
    pub msg: Message,
    /// The key that verified it, to sign the answer with.
    pub key: Arc<MacKey>,
}

/// Why a frame is refused, and how to address the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// Addressing read from the refused frame.
    pub envelope: HeaderEnvelope,
    /// Status REJECTED and the reason (and field number for malformed fields).
    pub outcome: Outcome,
    /// True when the MAC verified, so the answer may be signed with the same key and sent
    /// as the request's own response type; false means answer with an unsigned REJECT.
    pub authenticated: bool,
}

/// The reason code for a frame the codec could not accept.
pub fn reject_outcome(kind: RejectKind) -> Outcome {
    match kind {
        RejectKind::BadVersion => Outcome::new(Status::Rejected, Reason::BAD_VERSION),
        RejectKind::UnknownType => Outcome::new(Status::Rejected, Reason::UNKNOWN_MESSAGE_TYPE),
        RejectKind::BadLength => Outcome::new(Status::Rejected, Reason::BAD_LENGTH),
        RejectKind::MalformedHeader(field) => Outcome::malformed(field),
    }
}

/// The reason code for lost framing (the connection closes after this REJECT).
pub fn framing_outcome(_e: &FramingError) -> Outcome {
    Outcome::new(Status::Rejected, Reason::FRAMING_LOST)
}

/// The reason code for a MAC failure.
pub fn mac_outcome(e: MacError) -> Outcome {
    match e {
        MacError::UnknownKey => Outcome::new(Status::Rejected, Reason::UNKNOWN_KEY),
        MacError::BadMac => Outcome::new(Status::Rejected, Reason::BAD_MAC),
    }
}

/// The reason code for a malformed body field.
pub fn malformed_outcome(m: &Malformed) -> Outcome {
    Outcome::malformed(m.field)
}

/// Run the checks 1–3 on one decoded item.
pub fn accept(item: Inbound, keys: &KeyStore) -> Result<Verified, Refusal> {
    let frame = item.map_err(|FrameReject { envelope, kind }| Refusal {
        envelope,
        outcome: reject_outcome(kind),
        authenticated: false,
    })?;
    let key = keys.verify_frame(&frame).map_err(|e| Refusal {
        envelope: Header::envelope(&frame.bytes),
        outcome: mac_outcome(e),
        authenticated: false,
    })?;
    let msg = decode(&frame).map_err(|m| Refusal {
        envelope: Header::envelope(&frame.bytes),
        outcome: malformed_outcome(&m),
        authenticated: true,
    })?;
    Ok(Verified {
        header: frame.header,
        msg,
        key,
    })
}
