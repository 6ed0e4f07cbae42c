//! Message authentication: per-merchant HMAC-SHA256 keys with key ids, a key store that
//! can be swapped at run time (rotation without restart), and Ed25519 for channel links.
//!
//! All comparisons of MACs go through `ring::hmac::verify`, which is constant-time.
//!
//! ## Key file format (`keys.txt`)
//! UTF-8 text, one key per line: `MERCHANT_NO KEY_ID HEX_SECRET`, separated by spaces or
//! tabs. `MERCHANT_NO` is printable ASCII (at most 16 bytes), `KEY_ID` a decimal number
//! 1–65535, `HEX_SECRET` 32 to 64 bytes written as 64 to 128 hex digits. Blank lines and
//! lines starting with `#` are ignored. Several keys per merchant may be listed at once
//! (during a rotation both the old and the new key id verify). A (merchant, key id) pair
//! may appear only once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ring::hmac;
use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair};

use crate::wire::codec::RawFrame;
use crate::wire::field::Field;
use crate::wire::header::{MerchantNo, MAC_LEN};

/// Shortest accepted HMAC secret, in bytes (the HMAC-SHA256 output size; RFC 2104 §3).
pub const SECRET_MIN: usize = 32;
/// Longest accepted HMAC secret, in bytes (one SHA-256 block).
pub const SECRET_MAX: usize = 64;

/// Why a frame's MAC was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// No key with this id for this merchant.
    #[error("unknown key")]
    UnknownKey,
    /// The MAC did not verify.
    #[error("bad MAC")]
    BadMac,
}

/// Why a key file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// File path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("line {line}: {why}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// One HMAC-SHA256 key.
#[derive(Clone)]
pub struct MacKey {
    key: hmac::Key,
}

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

impl MacKey {
    /// A key from its secret bytes.
    pub fn new(secret: &[u8]) -> MacKey {
        MacKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// HMAC-SHA256 of `data`.
    #[inline]
    pub fn sign(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let tag = hmac::sign(&self.key, data);
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Constant-time check of `mac` against `data`.
    #[inline]
    pub fn verify(&self, data: &[u8], mac: &[u8]) -> Result<(), MacError> {
        hmac::verify(&self.key, data, mac).map_err(|_| MacError::BadMac)
    }

    /// Verify a decoded frame's trailer.
    #[inline]
    pub fn verify_frame(&self, frame: &RawFrame) -> Result<(), MacError> {
        self.verify(frame.signed(), frame.mac())
    }
}

/// Keys by (merchant number, key id). FxHash: the keys are configured by the operator,
/// not chosen by an attacker, so a DoS-resistant hasher buys nothing and costs ~30 ns a
/// lookup on the hot path (measured in `benches/wire.rs`).
pub type KeyMap = HashMap<(MerchantNo, u16), Arc<MacKey>, rustc_hash::FxBuildHasher>;

/// The merchant key store. Reads are lock-free snapshots; `replace` swaps in a new key set
/// atomically, so rotation needs no restart and never blocks verification.
#[derive(Default)]
pub struct KeyStore {
    keys: ArcSwap<KeyMap>,
}

impl KeyStore {
    /// A store holding `keys`.
    pub fn new(keys: KeyMap) -> KeyStore {
        KeyStore {
            keys: ArcSwap::from_pointee(keys),
        }
    }

    /// Load from a key file (format in the module docs).
    pub fn load(path: &Path) -> Result<KeyStore, KeyFileError> {
        Ok(KeyStore::new(read_key_file(path)?))
    }

    /// Replace every key at once (rotation, reload).
    pub fn replace(&self, keys: KeyMap) {
        self.keys.store(Arc::new(keys));
    }

    /// The key for (merchant, key id).
    pub fn get(&self, merchant: &MerchantNo, key_id: u16) -> Option<Arc<MacKey>> {
        self.keys.load().get(&(*merchant, key_id)).cloned()
    }

    /// The current key set.
    pub fn snapshot(&self) -> Arc<KeyMap> {
        self.keys.load_full()
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.keys.load().len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Verify a frame with the key its header names.
    pub fn verify_frame(&self, frame: &RawFrame) -> Result<Arc<MacKey>, MacError> {
        let key = self
            .get(&frame.header.merchant, frame.header.key_id)
            .ok_or(MacError::UnknownKey)?;
        key.verify_frame(frame)?;
        Ok(key)
    }
}

/// Parse key file text (format in the module docs).
pub fn parse_key_file(text: &str) -> Result<KeyMap, KeyFileError> {
    let mut keys = KeyMap::default();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let err = |why: String| KeyFileError::Line { line, why };
        let parts: Vec<&str> = l.split_whitespace().collect();
        let [merchant, key_id, secret] = parts[..] else {
            return Err(err(format!(
                "expected 3 fields `MERCHANT_NO KEY_ID HEX_SECRET`, found {}",
                parts.len()
            )));
        };
        let m = crate::wire::header::check_merchant(merchant)
            .map_err(|p| err(format!("merchant number {merchant:?}: {p}")))?;
        let id: u16 = key_id
            .parse()
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| err(format!("key id {key_id:?}: expected 1..=65535")))?;
        let bytes =
            hex::decode(secret).map_err(|e| err(format!("secret is not hex digits: {e}")))?;
        if !(SECRET_MIN..=SECRET_MAX).contains(&bytes.len()) {
            return Err(err(format!(
                "secret is {} bytes, expected {SECRET_MIN}..={SECRET_MAX}",
                bytes.len()
            )));
        }
        if keys
            .insert((m, id), Arc::new(MacKey::new(&bytes)))
            .is_some()
        {
            return Err(err(format!("key {merchant} {id} listed twice")));
        }
    }
    Ok(keys)
}

/// Read and parse a key file.
pub fn read_key_file(path: &Path) -> Result<KeyMap, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_key_file(&text)
}

/// A fresh random HMAC secret of `SECRET_MIN` bytes.
pub fn random_secret() -> [u8; SECRET_MIN] {
    let mut s = [0u8; SECRET_MIN];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut s).expect("system RNG");
    s
}

/// Ed25519 signature length.
pub const SIG_LEN: usize = 64;
/// Ed25519 public key length.
pub const PUBLIC_KEY_LEN: usize = 32;

/// A long-term Ed25519 identity (switch or channel), used to sign channel-link logons.
pub struct Identity {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", hex::encode(self.public_key()))
    }
}

impl Identity {
    /// Generate a new identity; returns it and its PKCS#8 document to store.
    pub fn generate() -> (Identity, Vec<u8>) {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("system RNG");
        let doc = pkcs8.as_ref().to_vec();
        (Identity::from_pkcs8(&doc).expect("fresh key parses"), doc)
    }

    /// Load from a PKCS#8 v2 document.
    pub fn from_pkcs8(doc: &[u8]) -> Result<Identity, ring::error::KeyRejected> {
        Ok(Identity {
            pair: Ed25519KeyPair::from_pkcs8(doc)?,
        })
    }

    /// Deterministic identity from a 32-byte seed (tests, vectors, demo).
    pub fn from_seed(seed: &[u8; 32]) -> Identity {
        Identity {
            pair: Ed25519KeyPair::from_seed_unchecked(seed).expect("32-byte seed"),
        }
    }

    /// The public key to configure on the other side.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        let mut out = [0u8; PUBLIC_KEY_LEN];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// Sign `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; SIG_LEN] {
        let mut out = [0u8; SIG_LEN];
        out.copy_from_slice(self.pair.sign(msg).as_ref());
        out
    }
}

/// Verify an Ed25519 signature.
pub fn ed25519_verify(public_key: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), MacError> {
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(msg, sig)
        .map_err(|_| MacError::BadMac)
}

/// Convenience for tests and tools: a key map with one key.
pub fn single_key(merchant: &str, key_id: u16, secret: &[u8]) -> KeyMap {
    let m = MerchantNo::new(merchant).expect("valid merchant number");
    debug_assert_eq!(MerchantNo::SIZE, 16);
    let mut map = KeyMap::default();
    map.insert((m, key_id), Arc::new(MacKey::new(secret)));
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let k = MacKey::new(b"Jefe");
        assert_eq!(
            hex::encode(k.sign(b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(k
            .verify(
                b"what do ya want for nothing?",
                &k.sign(b"what do ya want for nothing?")
            )
            .is_ok());
        assert_eq!(k.verify(b"x", &[0u8; 32]), Err(MacError::BadMac));
    }

    #[test]
    fn key_file_parses_and_reports_lines() {
        let good = "# demo\n898100000000001 1 ".to_string()
            + &"ab".repeat(32)
            + "\n\n898100000000001 2 "
            + &"cd".repeat(32);
        let keys = parse_key_file(&good).unwrap();
        assert_eq!(keys.len(), 2);
        let bad = "898100000000001 1 abcd";
        match parse_key_file(bad) {
            Err(KeyFileError::Line { line: 1, why }) => assert!(why.contains("2 bytes"), "{why}"),
            other => panic!("{other:?}"),
        }
        let dup = format!("m 1 {}\nm 1 {}", "ab".repeat(32), "ab".repeat(32));
        assert!(matches!(
            parse_key_file(&dup),
            Err(KeyFileError::Line { line: 2, .. })
        ));
        assert!(matches!(
            parse_key_file("m 0 00"),
            Err(KeyFileError::Line { line: 1, .. })
        ));
    }

    #[test]
    fn ed25519_sign_verify() {
        let id = Identity::from_seed(&[7u8; 32]);
        let sig = id.sign(b"logon");
        assert!(ed25519_verify(&id.public_key(), b"logon", &sig).is_ok());
        assert!(ed25519_verify(&id.public_key(), b"logoff", &sig).is_err());
    }

    #[test]
    fn rotation_swaps_keys_without_rebuilding_the_store() {
        let store = KeyStore::new(single_key("M1", 1, &[1u8; 32]));
        let m = MerchantNo::new("M1").unwrap();
        assert!(store.get(&m, 1).is_some());
        store.replace(single_key("M1", 2, &[2u8; 32]));
        assert!(store.get(&m, 1).is_none());
        assert!(store.get(&m, 2).is_some());
    }
}
