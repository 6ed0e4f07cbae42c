//! The switch's TOML configuration: parsing, validation against [`crate::limits`], and
//! loading of the secret files it points to.
//!
//! Every option and its default is documented in `config/sluice.example.toml`; a test
//! checks that file loads. Validation names the key, the value and why it is wrong.
//! Secret files (merchant keys, the switch identity, the PII secret) are refused when
//! readable by group or others.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::engine::{ChannelConfig, EngineConfig, Product};
use crate::limits;
use crate::message::{BankCode, CardType, ChannelId};

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// TOML syntax or an unknown key.
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: String,
        /// Parser message (names the key and line).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{key} = {value}: {why}")]
    Invalid {
        /// Dotted key.
        key: String,
        /// The value given.
        value: String,
        /// Why it is wrong.
        why: String,
    },
    /// A secret file is readable by others.
    #[error("{path}: secret file is readable by group or others (mode {mode:o}); chmod 600 it")]
    Permissions {
        /// File.
        path: String,
        /// Its mode.
        mode: u32,
    },
}

fn invalid(key: &str, value: impl std::fmt::Display, why: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        why: why.into(),
    }
}

/// `[server]`: the lender listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address lenders connect to.
    pub listen: SocketAddr,
    /// Lender connections at once.
    pub connections_max: usize,
    /// Requests in flight per connection.
    pub inflight_per_session: usize,
    /// Default heartbeat interval, seconds.
    pub heartbeat_s: u16,
    /// Timestamp window, seconds.
    pub replay_window_s: u16,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            connections_max: limits::CONNECTIONS_DEFAULT,
            inflight_per_session: limits::INFLIGHT_PER_SESSION_DEFAULT,
            heartbeat_s: limits::HEARTBEAT_S_DEFAULT,
            replay_window_s: limits::REPLAY_WINDOW_S,
        }
    }
}

/// `[keys]`: where the secrets are.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// Merchant HMAC key file (`crypto` module docs for the format).
    pub merchant_keys: PathBuf,
    /// The switch's Ed25519 identity (PKCS#8 file from `sluice keygen identity`).
    pub switch_identity: PathBuf,
    /// Secret for keyed hashes of card and ID numbers (hex, ≥ 32 bytes).
    pub pii_secret: PathBuf,
}

/// `[engine]`: timing of channel calls, queries and notifications.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Deadline of one channel request, ms.
    pub channel_deadline_ms: u64,
    /// First query of a PENDING order after, ms.
    pub query_delay_ms: u64,
    /// Query backoff cap, ms.
    pub query_backoff_max_ms: u64,
    /// ORDER_NOT_FOUND is trusted only this long after sending, ms.
    pub not_found_grace_ms: u64,
    /// Pre-bind lifetime, ms.
    pub bind_ttl_ms: u64,
    /// First notification re-send after, ms.
    pub notify_retry_ms: u64,
    /// Notification re-send cap, ms.
    pub notify_retry_max_ms: u64,
}

impl Default for EngineSection {
    fn default() -> Self {
        let e = EngineConfig::default();
        EngineSection {
            channel_deadline_ms: limits::CHANNEL_DEADLINE_MS_DEFAULT,
            query_delay_ms: e.query_delay_ms,
            query_backoff_max_ms: e.query_backoff_max_ms,
            not_found_grace_ms: e.not_found_grace_ms,
            bind_ttl_ms: e.bind_ttl_ms,
            notify_retry_ms: e.notify_retry_ms,
            notify_retry_max_ms: e.notify_retry_max_ms,
        }
    }
}

/// `[journal]`: where and how state changes are made durable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalSection {
    /// Data directory (journal segments and snapshots).
    pub dir: PathBuf,
    /// `fsync` (default), `batch-ms:N`, or `none` (benchmarks only).
    pub policy: String,
}

impl Default for JournalSection {
    fn default() -> Self {
        JournalSection {
            dir: PathBuf::from("data"),
            policy: "fsync".into(),
        }
    }
}

/// One `[[channel]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSection {
    /// Channel id (1–8 printable ASCII).
    pub id: String,
    /// Operator switch.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Primary line first, then backups.
    pub addresses: Vec<SocketAddr>,
    /// The channel's Ed25519 public key, hex.
    pub public_key: String,
    /// The switch's institution id at this channel.
    pub institution: String,
    /// Persistent connections.
    #[serde(default = "four")]
    pub connections: usize,
    /// In-flight requests per connection.
    #[serde(default = "inflight")]
    pub inflight_per_connection: usize,
    /// `debit`, `payout`, `sign`.
    #[serde(default = "all_products")]
    pub products: Vec<String>,
    /// Bank codes supported; empty = all.
    #[serde(default)]
    pub banks: Vec<String>,
    /// `debit`, `credit`.
    #[serde(default = "all_card_types")]
    pub card_types: Vec<String>,
}

fn yes() -> bool {
    true
}
fn four() -> usize {
    4
}
fn inflight() -> usize {
    1024
}
fn all_products() -> Vec<String> {
    vec!["debit".into(), "payout".into(), "sign".into()]
}
fn all_card_types() -> Vec<String> {
    vec!["debit".into(), "credit".into()]
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[keys]`.
    pub keys: KeysConfig,
    /// `[engine]`.
    #[serde(default)]
    pub engine: EngineSection,
    /// `[journal]`.
    #[serde(default)]
    pub journal: JournalSection,
    /// `[[channel]]`, in priority order.
    #[serde(default, rename = "channel")]
    pub channels: Vec<ChannelSection>,
}

impl Config {
    /// Read, parse and validate a file. Relative paths inside are relative to the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg = Config::parse(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.keys.merchant_keys,
            &mut cfg.keys.switch_identity,
            &mut cfg.keys.pii_secret,
            &mut cfg.journal.dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// Parse and validate text.
    pub fn parse(text: &str, name: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.into(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check every value against its bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.connections_max == 0 || s.connections_max > limits::CONNECTIONS_MAX {
            return Err(invalid(
                "server.connections_max",
                s.connections_max,
                &format!("must be 1..={}", limits::CONNECTIONS_MAX),
            ));
        }
        if s.inflight_per_session == 0 || s.inflight_per_session > limits::INFLIGHT_PER_SESSION_MAX
        {
            return Err(invalid(
                "server.inflight_per_session",
                s.inflight_per_session,
                &format!("must be 1..={}", limits::INFLIGHT_PER_SESSION_MAX),
            ));
        }
        if !(limits::HEARTBEAT_S_MIN..=limits::HEARTBEAT_S_MAX).contains(&s.heartbeat_s) {
            return Err(invalid(
                "server.heartbeat_s",
                s.heartbeat_s,
                &format!(
                    "must be {}..={}",
                    limits::HEARTBEAT_S_MIN,
                    limits::HEARTBEAT_S_MAX
                ),
            ));
        }
        if s.replay_window_s == 0 || s.replay_window_s > limits::REPLAY_WINDOW_S {
            return Err(invalid(
                "server.replay_window_s",
                s.replay_window_s,
                &format!("must be 1..={}", limits::REPLAY_WINDOW_S),
            ));
        }
        let e = &self.engine;
        if !(10..=60_000).contains(&e.channel_deadline_ms) {
            return Err(invalid(
                "engine.channel_deadline_ms",
                e.channel_deadline_ms,
                "must be 10..=60000",
            ));
        }
        if e.not_found_grace_ms < e.channel_deadline_ms {
            return Err(invalid(
                "engine.not_found_grace_ms",
                e.not_found_grace_ms,
                "must be at least engine.channel_deadline_ms (a request may still be in transit)",
            ));
        }
        self.journal_policy()?;
        if self.channels.is_empty() {
            return Err(invalid(
                "channel",
                "[]",
                "at least one [[channel]] is needed",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, c) in self.channels.iter().enumerate() {
            let k = |f: &str| format!("channel[{i}].{f}");
            if ChannelId::new(&c.id).map(|x| x.is_empty()).unwrap_or(true) {
                return Err(invalid(
                    &k("id"),
                    &c.id,
                    "must be 1–8 printable ASCII characters",
                ));
            }
            if !seen.insert(c.id.clone()) {
                return Err(invalid(&k("id"), &c.id, "channel ids must be unique"));
            }
            if c.addresses.is_empty() {
                return Err(invalid(&k("addresses"), "[]", "at least one address"));
            }
            if parse_public_key(&c.public_key).is_none() {
                return Err(invalid(
                    &k("public_key"),
                    &c.public_key,
                    "must be 64 hex digits (Ed25519 public key)",
                ));
            }
            if crate::wire::header::check_merchant(&c.institution).is_err() {
                return Err(invalid(
                    &k("institution"),
                    &c.institution,
                    "must be 1–16 printable ASCII characters",
                ));
            }
            if c.connections == 0 || c.connections > crate::upstream::pool::CONNECTIONS_MAX {
                return Err(invalid(
                    &k("connections"),
                    c.connections,
                    &format!("must be 1..={}", crate::upstream::pool::CONNECTIONS_MAX),
                ));
            }
            if c.inflight_per_connection == 0
                || c.inflight_per_connection > crate::upstream::pool::INFLIGHT_PER_CONN_MAX
            {
                return Err(invalid(
                    &k("inflight_per_connection"),
                    c.inflight_per_connection,
                    &format!(
                        "must be 1..={}",
                        crate::upstream::pool::INFLIGHT_PER_CONN_MAX
                    ),
                ));
            }
            for p in &c.products {
                product(p)
                    .ok_or_else(|| invalid(&k("products"), p, "must be debit, payout or sign"))?;
            }
            for t in &c.card_types {
                card_type(t)
                    .ok_or_else(|| invalid(&k("card_types"), t, "must be debit or credit"))?;
            }
            for b in &c.banks {
                if BankCode::new(b).map(|x| x.is_empty()).unwrap_or(true) {
                    return Err(invalid(
                        &k("banks"),
                        b,
                        "bank codes are 1–8 printable ASCII characters",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The journal policy (`fsync`, `batch-ms:N` with N in 1..=1000, `none`).
    pub fn journal_policy(&self) -> Result<crate::journal::Policy, ConfigError> {
        let p = self.journal.policy.as_str();
        let bad = || {
            invalid(
                "journal.policy",
                p,
                "must be fsync, none, or batch-ms:N with N in 1..=1000",
            )
        };
        let policy: crate::journal::Policy = p.parse().map_err(|_| bad())?;
        if let crate::journal::Policy::BatchMs(n) = policy {
            if !(1..=crate::journal::BATCH_MS_MAX).contains(&n) {
                return Err(bad());
            }
        }
        Ok(policy)
    }

    /// The engine settings.
    pub fn engine_config(&self, ref_prefix: String) -> EngineConfig {
        let e = &self.engine;
        EngineConfig {
            query_delay_ms: e.query_delay_ms,
            query_backoff_max_ms: e.query_backoff_max_ms,
            not_found_grace_ms: e.not_found_grace_ms,
            bind_ttl_ms: e.bind_ttl_ms,
            notify_retry_ms: e.notify_retry_ms,
            notify_retry_max_ms: e.notify_retry_max_ms,
            ref_prefix,
            ..EngineConfig::default()
        }
    }

    /// Channel deadline.
    pub fn channel_deadline(&self) -> Duration {
        Duration::from_millis(self.engine.channel_deadline_ms)
    }

    /// The routing table entries, in priority order (validated already).
    pub fn route_table(&self) -> Vec<ChannelConfig> {
        self.channels
            .iter()
            .map(|c| ChannelConfig {
                id: ChannelId::new(&c.id).unwrap_or_default(),
                enabled: c.enabled,
                products: c.products.iter().filter_map(|p| product(p)).collect(),
                banks: c
                    .banks
                    .iter()
                    .filter_map(|b| BankCode::new(b).ok())
                    .collect(),
                card_types: c.card_types.iter().filter_map(|t| card_type(t)).collect(),
            })
            .collect()
    }
}

fn product(s: &str) -> Option<Product> {
    match s {
        "debit" => Some(Product::Debit),
        "payout" => Some(Product::Payout),
        "sign" => Some(Product::Sign),
        _ => None,
    }
}

fn card_type(s: &str) -> Option<CardType> {
    match s {
        "debit" => Some(CardType::Debit),
        "credit" => Some(CardType::Credit),
        _ => None,
    }
}

/// Parse a 32-byte hex public key.
pub fn parse_public_key(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s.trim()).ok()?;
    v.try_into().ok()
}

/// Read a secret file, refusing it when group or others may read it.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let io = |source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ConfigError::Permissions {
                path: path.display().to_string(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    std::fs::read(path).map_err(io)
}

/// Write a secret file with mode 0600 (created new; an existing file is not overwritten).
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[keys]
merchant_keys = "k"
switch_identity = "i"
pii_secret = "p"
[[channel]]
id = "CHA"
addresses = ["127.0.0.1:7501"]
public_key = "0000000000000000000000000000000000000000000000000000000000000000"
institution = "SLUICE01"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MIN, "t").unwrap();
        assert_eq!(c.server.connections_max, limits::CONNECTIONS_DEFAULT);
        assert_eq!(c.journal_policy().unwrap(), crate::journal::Policy::Fsync);
        assert_eq!(c.route_table()[0].products.len(), 3);
    }

    #[test]
    fn errors_name_key_value_and_reason() {
        let bad = MIN.replace("[keys]", "[server]\nconnections_max = 99999\n[keys]");
        let e = Config::parse(&bad, "t").unwrap_err().to_string();
        assert!(
            e.contains("server.connections_max = 99999") && e.contains("1..=4096"),
            "{e}"
        );
        let bad = MIN.replace("institution", "typo = 1\ninstitution");
        let e = Config::parse(&bad, "t").unwrap_err().to_string();
        assert!(e.contains("typo"), "{e}");
        let bad = format!("{MIN}\n[journal]\npolicy = \"sometimes\"\n");
        let e = Config::parse(&bad, "t").unwrap_err().to_string();
        assert!(e.contains("journal.policy = sometimes"), "{e}");
        let bad = MIN.replace("\"CHA\"", "\"TOOLONGID\"");
        let e = Config::parse(&bad, "t").unwrap_err().to_string();
        assert!(e.contains("channel[0].id"), "{e}");
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sluice.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        Config::parse(&text, "sluice.example.toml").unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn secret_files_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        write_secret_file(&p, b"x").unwrap();
        assert!(read_secret_file(&p).is_ok());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_secret_file(&p),
            Err(ConfigError::Permissions { .. })
        ));
    }
}
