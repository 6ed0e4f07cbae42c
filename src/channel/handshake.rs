//! The mutually authenticated logon of the channel link, without I/O (`CHANNEL.md` §4).
//!
//! 1. The switch sends LOGON_REQ with a fresh X25519 ephemeral public key and nonce,
//!    signed with its long-term Ed25519 key over every byte before the signature.
//! 2. The channel checks the institution id, the signature (with the switch's public key
//!    configured at the channel) and the timestamp, and answers LOGON_RSP with its own
//!    ephemeral key and nonce and `SHA-256(LOGON_REQ)`, signed with the channel's key.
//!    A refusal is also signed, then the channel closes.
//! 3. Both derive, from the X25519 shared secret and the transcript hash
//!    `TH = SHA-256(LOGON_REQ ‖ LOGON_RSP)` (whole frames, zero trailers included):
//!    `PRK = HKDF-Extract(salt = TH, IKM = shared secret)`,
//!    `K_sc = HKDF-Expand(PRK, "sluice channel v1 switch->channel mac", 32)`,
//!    `K_cs = HKDF-Expand(PRK, "sluice channel v1 channel->switch mac", 32)`.
//!    One key per direction, so a frame reflected back at its sender never verifies.
//!
//! Every later frame carries the session MAC (see [`super::message`]); the first one a
//! side receives proves the peer holds its ephemeral private key.

use bytes::{Bytes, BytesMut};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::digest::{self, SHA256};
use ring::hkdf;
use ring::rand::SecureRandom;

use super::message::{
    self, Blob, Code, Envelope, LogonReq, LogonRsp, Message, RspClass, RspCode, SessionKey,
    KEY_ID_LOGON,
};
use crate::crypto::{ed25519_verify, Identity, SIG_LEN};
use crate::wire::codec::RawFrame;
use crate::wire::field::Ascii;
use crate::wire::header::{MerchantNo, MAC_LEN};

/// HKDF info of the switch → channel MAC key.
pub const INFO_SWITCH_TO_CHANNEL: &[u8] = b"sluice channel v1 switch->channel mac";
/// HKDF info of the channel → switch MAC key.
pub const INFO_CHANNEL_TO_SWITCH: &[u8] = b"sluice channel v1 channel->switch mac";

/// Why a logon did not establish a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The frame is not the expected logon message, or its key id is not 0.
    #[error("expected a logon frame")]
    NotLogon,
    /// A logon body field is malformed.
    #[error("malformed logon: {0}")]
    Malformed(#[from] message::Malformed),
    /// The institution id is not configured at the channel.
    #[error("unknown institution")]
    UnknownInstitution,
    /// The Ed25519 signature does not verify with the configured public key.
    #[error("logon signature does not verify")]
    BadSignature,
    /// LOGON_REQ timestamp outside the replay window.
    #[error("logon timestamp outside the replay window")]
    StaleTimestamp,
    /// LOGON_RSP does not answer our LOGON_REQ (digest or request id differ).
    #[error("logon response does not answer our request")]
    NotOurRequest,
    /// The channel refused the logon with this code (its signature verified).
    #[error("logon refused by the channel: {0}")]
    Refused(RspCode),
    /// The peer's ephemeral key was rejected by X25519.
    #[error("ephemeral key rejected")]
    BadKeyExchange,
    /// The random number generator failed.
    #[error("random number generator failed")]
    Rng,
}

/// The two session MAC keys of one connection, from one side's point of view.
#[derive(Debug, Clone)]
pub struct SessionKeys {
    /// MACs frames this side sends.
    pub send: SessionKey,
    /// Verifies frames this side receives.
    pub recv: SessionKey,
}

/// Raw derived key bytes (for vectors and tests): (switch→channel, channel→switch).
pub fn derive_key_bytes(shared: &[u8], transcript_hash: &[u8]) -> ([u8; 32], [u8; 32]) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, transcript_hash).extract(shared);
    let expand = |info: &[u8]| {
        let mut out = [0u8; 32];
        // HKDF_SHA256 as the length type asks for exactly 32 bytes, which is always legal.
        if let Ok(okm) = prk.expand(&[info], hkdf::HKDF_SHA256) {
            let _ = okm.fill(&mut out);
        }
        out
    };
    (
        expand(INFO_SWITCH_TO_CHANNEL),
        expand(INFO_CHANNEL_TO_SWITCH),
    )
}

/// `SHA-256(LOGON_REQ ‖ LOGON_RSP)` over the whole frames.
pub fn transcript_hash(req: &[u8], rsp: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&SHA256);
    ctx.update(req);
    ctx.update(rsp);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&SHA256, b).as_ref());
    out
}

/// The bytes a logon signature covers: the frame up to the signature field.
fn signed_part(frame: &[u8]) -> &[u8] {
    &frame[..frame.len() - MAC_LEN - SIG_LEN]
}

/// Encode a logon message, sign it, and write the signature into its last body field.
fn sign_logon(identity: &Identity, env: &Envelope, msg: &Message) -> Bytes {
    let mut b = BytesMut::new();
    message::encode_logon(env, msg, &mut b);
    let n = b.len();
    let sig = identity.sign(signed_part(&b));
    b[n - MAC_LEN - SIG_LEN..n - MAC_LEN].copy_from_slice(&sig);
    b.freeze()
}

fn ephemeral(rng: &dyn SecureRandom) -> Result<(EphemeralPrivateKey, [u8; 32]), HandshakeError> {
    let k = EphemeralPrivateKey::generate(&X25519, rng).map_err(|_| HandshakeError::Rng)?;
    let p = k.compute_public_key().map_err(|_| HandshakeError::Rng)?;
    let mut pubk = [0u8; 32];
    pubk.copy_from_slice(p.as_ref());
    Ok((k, pubk))
}

fn agree(
    k: EphemeralPrivateKey,
    peer: &[u8; 32],
    th: &[u8; 32],
) -> Result<([u8; 32], [u8; 32]), HandshakeError> {
    agreement::agree_ephemeral(k, &UnparsedPublicKey::new(&X25519, peer), |shared| {
        derive_key_bytes(shared, th)
    })
    .map_err(|_| HandshakeError::BadKeyExchange)
}

/// Header values and parameters of a LOGON_REQ.
#[derive(Debug, Clone)]
pub struct LogonParams {
    /// The switch's institution id at the channel.
    pub institution: MerchantNo,
    /// Correlation id of the logon.
    pub request_id: u64,
    /// The switch's wall clock, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Heartbeat interval the switch will use, seconds.
    pub heartbeat_s: u16,
    /// Label for the channel's logs.
    pub client_name: Ascii<16>,
}

/// What the switch learned from a successful logon.
#[derive(Debug, Clone)]
pub struct Established {
    /// The session MAC keys (send = switch→channel).
    pub keys: SessionKeys,
    /// Channel's heartbeat interval, seconds.
    pub heartbeat_s: u16,
    /// Channel's in-flight limit for this connection (0 = none announced).
    pub inflight_max: u16,
}

/// The switch's side of a logon in progress: holds the ephemeral private key until the
/// answer arrives.
pub struct ClientHandshake {
    eph: EphemeralPrivateKey,
    req: Bytes,
    request_id: u64,
}

impl std::fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientHandshake(request_id {})", self.request_id)
    }
}

impl ClientHandshake {
    /// Build the signed LOGON_REQ frame to send. `rng` supplies the ephemeral key and
    /// then the nonce (use `ring::rand::SystemRandom` outside vector generation).
    pub fn start(
        identity: &Identity,
        p: &LogonParams,
        rng: &dyn SecureRandom,
    ) -> Result<(ClientHandshake, Bytes), HandshakeError> {
        let (eph, eph_pub) = ephemeral(rng)?;
        let mut nonce = [0u8; 32];
        rng.fill(&mut nonce).map_err(|_| HandshakeError::Rng)?;
        let msg = Message::LogonReq(LogonReq {
            heartbeat_s: p.heartbeat_s,
            client_name: p.client_name,
            ephemeral_key: Blob(eph_pub),
            nonce: Blob(nonce),
            signature: Blob([0u8; 64]),
        });
        let env = Envelope {
            request_id: p.request_id,
            timestamp_ms: p.timestamp_ms,
            institution: p.institution,
            flags: 0,
        };
        let req = sign_logon(identity, &env, &msg);
        Ok((
            ClientHandshake {
                eph,
                req: req.clone(),
                request_id: p.request_id,
            },
            req,
        ))
    }

    /// Check the channel's LOGON_RSP and derive the session keys.
    pub fn finish(
        self,
        rsp: &RawFrame,
        channel_public_key: &[u8; 32],
    ) -> Result<Established, HandshakeError> {
        if rsp.header.msg_type != LogonRsp::CODE || rsp.header.key_id != KEY_ID_LOGON {
            return Err(HandshakeError::NotLogon);
        }
        let Message::LogonRsp(m) = message::decode(rsp)? else {
            return Err(HandshakeError::NotLogon);
        };
        ed25519_verify(channel_public_key, signed_part(&rsp.bytes), &m.signature.0)
            .map_err(|_| HandshakeError::BadSignature)?;
        if rsp.header.request_id != self.request_id || m.req_digest.0 != sha256(&self.req) {
            return Err(HandshakeError::NotOurRequest);
        }
        if m.class != RspClass::Success {
            return Err(HandshakeError::Refused(m.code));
        }
        let th = transcript_hash(&self.req, &rsp.bytes);
        let (sc, cs) = agree(self.eph, &m.ephemeral_key.0, &th)?;
        Ok(Established {
            keys: SessionKeys {
                send: SessionKey::new(&sc),
                recv: SessionKey::new(&cs),
            },
            heartbeat_s: m.heartbeat_s,
            inflight_max: m.inflight_max,
        })
    }
}

/// The channel's parameters for answering a logon.
#[derive(Debug, Clone, Copy)]
pub struct ResponderParams {
    /// The channel's wall clock, ms since the Unix epoch (checks and stamps the answer).
    pub now_ms: u64,
    /// Accepted difference between the LOGON_REQ timestamp and `now_ms`, ms.
    pub replay_window_ms: u64,
    /// Heartbeat interval the channel will use, seconds.
    pub heartbeat_s: u16,
    /// In-flight limit announced to the switch (0 = none).
    pub inflight_max: u16,
}

/// The channel's answer to a LOGON_REQ.
// Built once per connection and consumed at once: boxing the keys would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Responded {
    /// Logon accepted: send `frame`, then use `keys` (send = channel→switch).
    Accepted {
        /// The LOGON_RSP frame to send.
        frame: Bytes,
        /// The session keys.
        keys: SessionKeys,
        /// The institution that logged on.
        institution: MerchantNo,
        /// The switch's announced heartbeat interval, seconds.
        heartbeat_s: u16,
    },
    /// Logon refused: send `frame` (when present) and close.
    Refused {
        /// A signed refusal LOGON_RSP; `None` when the request could not even be addressed.
        frame: Option<Bytes>,
        /// Why.
        why: HandshakeError,
    },
}

/// Answer a LOGON_REQ on the channel side. `switch_key` looks up the configured public key
/// of an institution.
pub fn respond(
    identity: &Identity,
    switch_key: impl Fn(&MerchantNo) -> Option<[u8; 32]>,
    req: &RawFrame,
    p: ResponderParams,
    rng: &dyn SecureRandom,
) -> Responded {
    let env = Envelope {
        request_id: req.header.request_id,
        timestamp_ms: p.now_ms,
        institution: req.header.merchant,
        flags: 0,
    };
    let digest = Blob(sha256(&req.bytes));
    let refuse = |code: Code, why: HandshakeError| {
        let msg = Message::LogonRsp(LogonRsp {
            code: code.into(),
            class: code.class(),
            heartbeat_s: 0,
            inflight_max: 0,
            req_digest: digest,
            ephemeral_key: Blob([0u8; 32]),
            nonce: Blob([0u8; 32]),
            signature: Blob([0u8; 64]),
        });
        Responded::Refused {
            frame: Some(sign_logon(identity, &env, &msg)),
            why,
        }
    };
    if req.header.msg_type != LogonReq::CODE || req.header.key_id != KEY_ID_LOGON {
        return Responded::Refused {
            frame: None,
            why: HandshakeError::NotLogon,
        };
    }
    let m = match message::decode(req) {
        Ok(Message::LogonReq(m)) => m,
        Ok(_) => return refuse(Code::BAD_REQUEST, HandshakeError::NotLogon),
        Err(e) => return refuse(Code::BAD_REQUEST, HandshakeError::Malformed(e)),
    };
    let Some(pk) = switch_key(&req.header.merchant) else {
        return refuse(
            Code::UNKNOWN_INSTITUTION,
            HandshakeError::UnknownInstitution,
        );
    };
    if ed25519_verify(&pk, signed_part(&req.bytes), &m.signature.0).is_err() {
        return refuse(Code::AUTH_FAILED, HandshakeError::BadSignature);
    }
    if req.header.timestamp_ms.abs_diff(p.now_ms) > p.replay_window_ms {
        return refuse(Code::STALE_LOGON, HandshakeError::StaleTimestamp);
    }
    let (eph, eph_pub) = match ephemeral(rng) {
        Ok(v) => v,
        Err(e) => return refuse(Code::BUSY, e),
    };
    let mut nonce = [0u8; 32];
    if rng.fill(&mut nonce).is_err() {
        return refuse(Code::BUSY, HandshakeError::Rng);
    }
    let msg = Message::LogonRsp(LogonRsp {
        code: Code::OK.into(),
        class: RspClass::Success,
        heartbeat_s: p.heartbeat_s,
        inflight_max: p.inflight_max,
        req_digest: digest,
        ephemeral_key: Blob(eph_pub),
        nonce: Blob(nonce),
        signature: Blob([0u8; 64]),
    });
    let frame = sign_logon(identity, &env, &msg);
    let th = transcript_hash(&req.bytes, &frame);
    match agree(eph, &m.ephemeral_key.0, &th) {
        Ok((sc, cs)) => Responded::Accepted {
            frame,
            keys: SessionKeys {
                send: SessionKey::new(&cs),
                recv: SessionKey::new(&sc),
            },
            institution: req.header.merchant,
            heartbeat_s: m.heartbeat_s,
        },
        Err(e) => refuse(Code::BAD_KEY_EXCHANGE, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::message::{ChannelCodec, EchoReq};
    use ring::rand::SystemRandom;

    fn raw(b: &[u8]) -> RawFrame {
        ChannelCodec::decode_slice(b).unwrap().unwrap().unwrap()
    }

    fn params(now: u64) -> (LogonParams, ResponderParams) {
        (
            LogonParams {
                institution: MerchantNo::new("SLUICE01").unwrap(),
                request_id: 1,
                timestamp_ms: now,
                heartbeat_s: 10,
                client_name: Ascii::new("test").unwrap(),
            },
            ResponderParams {
                now_ms: now + 5,
                replay_window_ms: 120_000,
                heartbeat_s: 15,
                inflight_max: 0,
            },
        )
    }

    #[test]
    fn both_sides_derive_matching_directional_keys() {
        let rng = SystemRandom::new();
        let sw = Identity::from_seed(&[1; 32]);
        let ch = Identity::from_seed(&[2; 32]);
        let (lp, rp) = params(1_700_000_000_000);
        let (hs, req) = ClientHandshake::start(&sw, &lp, &rng).unwrap();
        let Responded::Accepted { frame, keys, .. } =
            respond(&ch, |_| Some(sw.public_key()), &raw(&req), rp, &rng)
        else {
            panic!("refused")
        };
        let est = hs.finish(&raw(&frame), &ch.public_key()).unwrap();
        assert_eq!(est.heartbeat_s, 15);
        let env = Envelope {
            request_id: 2,
            timestamp_ms: 0,
            institution: lp.institution,
            flags: 0,
        };
        let f = message::encode_to_bytes(&env, &EchoReq { nonce: 1 }.into(), &est.keys.send, 0);
        assert!(keys.recv.verify_frame(0, &raw(&f)).is_ok());
        // Reflection: a frame the switch sent does not verify as coming from the channel.
        assert!(est.keys.recv.verify_frame(0, &raw(&f)).is_err());
        let g = message::encode_to_bytes(&env, &EchoReq { nonce: 1 }.into(), &keys.send, 0);
        assert!(est.keys.recv.verify_frame(0, &raw(&g)).is_ok());
    }

    #[test]
    fn wrong_keys_are_refused_on_both_sides() {
        let rng = SystemRandom::new();
        let sw = Identity::from_seed(&[1; 32]);
        let ch = Identity::from_seed(&[2; 32]);
        let other = Identity::from_seed(&[3; 32]);
        let (lp, rp) = params(1_700_000_000_000);
        // Channel side: switch signed with a key the channel does not have configured.
        let (hs, req) = ClientHandshake::start(&other, &lp, &rng).unwrap();
        let r = respond(&ch, |_| Some(sw.public_key()), &raw(&req), rp, &rng);
        let Responded::Refused {
            frame: Some(f),
            why: HandshakeError::BadSignature,
        } = r
        else {
            panic!("{r:?}")
        };
        // The switch learns the refusal code, authenticated by the channel's signature.
        assert_eq!(
            hs.finish(&raw(&f), &ch.public_key()).unwrap_err(),
            HandshakeError::Refused(Code::AUTH_FAILED.into())
        );
        // Switch side: the answer is signed by a key other than the configured one.
        let (hs, req) = ClientHandshake::start(&sw, &lp, &rng).unwrap();
        let Responded::Accepted { frame, .. } =
            respond(&other, |_| Some(sw.public_key()), &raw(&req), rp, &rng)
        else {
            panic!("refused")
        };
        assert_eq!(
            hs.finish(&raw(&frame), &ch.public_key()).unwrap_err(),
            HandshakeError::BadSignature
        );
    }

    #[test]
    fn stale_unknown_and_replayed_answers_are_refused() {
        let rng = SystemRandom::new();
        let sw = Identity::from_seed(&[1; 32]);
        let ch = Identity::from_seed(&[2; 32]);
        let (lp, mut rp) = params(1_700_000_000_000);
        let (hs1, req1) = ClientHandshake::start(&sw, &lp, &rng).unwrap();
        let r = respond(&ch, |_| None, &raw(&req1), rp, &rng);
        assert!(matches!(
            r,
            Responded::Refused {
                why: HandshakeError::UnknownInstitution,
                ..
            }
        ));
        let Responded::Accepted { frame: old, .. } =
            respond(&ch, |_| Some(sw.public_key()), &raw(&req1), rp, &rng)
        else {
            panic!()
        };
        drop(hs1);
        // An old LOGON_RSP replayed against a new LOGON_REQ does not match its digest.
        let (hs2, _req2) = ClientHandshake::start(&sw, &lp, &rng).unwrap();
        assert_eq!(
            hs2.finish(&raw(&old), &ch.public_key()).unwrap_err(),
            HandshakeError::NotOurRequest
        );
        rp.now_ms += 121_000;
        let r = respond(&ch, |_| Some(sw.public_key()), &raw(&req1), rp, &rng);
        assert!(matches!(
            r,
            Responded::Refused {
                why: HandshakeError::StaleTimestamp,
                ..
            }
        ));
    }
}
