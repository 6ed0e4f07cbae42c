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

use crate::engine::route::{
    self, FeeModel, FeeTier, FundConfig, MerchantClass, ProductTerms, RoutingPolicy, Rule,
    ScoreWeights,
};
use crate::engine::{ChannelConfig, EngineConfig, Product};
use crate::health::HealthConfig;
use crate::limits;
use crate::message::{BankCode, CardType, ChannelId};
use crate::wire::header::MerchantNo;

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
    /// Full detail of a final order kept this long, ms; then its compact form.
    pub order_detail_ms: u64,
    /// At most this many final orders in full detail; past it the oldest go to their
    /// compact form early (bounds memory and snapshots at high order rates).
    pub order_detail_max: usize,
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
            order_detail_ms: e.settle_after_ms,
            order_detail_max: e.detailed_final_max,
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
    /// How long a final order is remembered (duplicate requests answered from it, across
    /// restarts), hours; 1..=8760, default 168 (7 days).
    pub retention_hours: u64,
    /// A snapshot is taken after this many journal records (restart replays at most about
    /// this many); 10_000..=1_000_000_000, default 4_000_000.
    pub snapshot_every_records: u64,
}

impl Default for JournalSection {
    fn default() -> Self {
        JournalSection {
            dir: PathBuf::from("data"),
            policy: "fsync".into(),
            retention_hours: crate::journal::RETENTION_MS_DEFAULT / 3_600_000,
            snapshot_every_records: crate::journal::SNAPSHOT_EVERY_RECORDS_DEFAULT,
        }
    }
}

/// `[admin]`: the operator's HTTP port (loopback by default, bearer token required).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Address; keep it on loopback or a management network.
    #[serde(default = "admin_listen")]
    pub listen: SocketAddr,
    /// File holding the bearer token (mode 0600; `sluice keygen pii` makes a suitable one).
    pub token_file: PathBuf,
}

fn admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7480))
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
    /// Merchant classes allowed (see `[routing.merchant_classes]`); empty = every merchant.
    #[serde(default)]
    pub merchant_classes: Vec<String>,
    /// Preference among channels of similar score; lower first.
    #[serde(default = "priority_default")]
    pub priority: u32,
    /// The channel's fixed UTC offset, minutes (service windows, days of daily limits).
    #[serde(default = "china_offset")]
    pub utc_offset_min: i32,
    /// Local holidays, `YYYY-MM-DD`.
    #[serde(default)]
    pub holidays: Vec<String>,
    /// `[channel.debit]`: debit terms.
    #[serde(default)]
    pub debit: ProductSection,
    /// `[channel.payout]`: payout terms and fund position.
    #[serde(default)]
    pub payout: ProductSection,
    /// `[channel.sign]`: signing terms.
    #[serde(default)]
    pub sign: ProductSection,
}

/// `[channel.debit]`, `[channel.payout]`, `[channel.sign]`: a channel's terms for one
/// product. Zero means "no limit" for every limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProductSection {
    /// Smallest amount per instruction, fen.
    pub min_amount_fen: u64,
    /// Largest amount per instruction, fen.
    pub max_amount_fen: u64,
    /// Per card and local day: most amount, fen.
    pub card_daily_amount_fen: u64,
    /// Per card and local day: most instructions.
    pub card_daily_count: u32,
    /// Fee: fixed part per instruction, fen.
    pub fee_fixed_fen: u64,
    /// Fee: proportional part, ppm of the amount (rounded up to a fen).
    pub fee_rate_ppm: u32,
    /// Fee: minimum, fen.
    pub fee_min_fen: u64,
    /// Fee: maximum, fen.
    pub fee_max_fen: u64,
    /// Fee: monthly volume tiers, ascending.
    pub fee_tiers: Vec<FeeTierSection>,
    /// Daily closed periods, local time.
    pub closed: Vec<WindowSection>,
    /// Closed on the channel's holidays.
    pub holiday_closed: bool,
    /// Payout only: prefunded balance at start, fen (absent = not tracked).
    pub fund_fen: Option<u64>,
    /// Payout only: alert when the available fund falls below this, fen.
    pub fund_alert_fen: u64,
}

impl Default for ProductSection {
    fn default() -> Self {
        ProductSection {
            min_amount_fen: 0,
            max_amount_fen: 0,
            card_daily_amount_fen: 0,
            card_daily_count: 0,
            fee_fixed_fen: 0,
            fee_rate_ppm: 0,
            fee_min_fen: 0,
            fee_max_fen: 0,
            fee_tiers: vec![],
            closed: vec![],
            holiday_closed: true,
            fund_fen: None,
            fund_alert_fen: 0,
        }
    }
}

/// One fee tier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeeTierSection {
    /// Month-to-date volume from which `rate_ppm` applies, fen.
    pub from_month_fen: u64,
    /// Rate, ppm.
    pub rate_ppm: u32,
}

/// One daily closed period.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSection {
    /// `HH:MM`, inclusive.
    pub from: String,
    /// `HH:MM`, exclusive (`24:00` allowed; before `from` = spans midnight).
    pub to: String,
}

/// `[routing]`: how channels are ranked, per-merchant overrides, health thresholds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingSection {
    /// Share of instructions sent to another eligible channel first, ppm.
    pub explore_ppm: u32,
    /// An agreement's primary channel stays first while its success rate is at least
    /// this, ppm.
    pub sticky_min_success_ppm: u32,
    /// Score weight of the success rate.
    pub weight_stability: f64,
    /// Score weight of latency.
    pub weight_latency: f64,
    /// Score weight of the fee.
    pub weight_cost: f64,
    /// Latency at which the latency term is one half, ms.
    pub latency_ref_ms: u32,
    /// Score band inside which channel `priority` decides.
    pub score_band: f64,
    /// Route to breaker-open channels when they are all that is left.
    pub panic_routing: bool,
    /// Merchant number → merchant class.
    pub merchant_classes: std::collections::HashMap<String, String>,
    /// `[[routing.rule]]`: overrides, first match wins.
    pub rule: Vec<RuleSection>,
    /// `[routing.health]`.
    pub health: HealthSection,
}

impl Default for RoutingSection {
    fn default() -> Self {
        let p = RoutingPolicy::default();
        RoutingSection {
            explore_ppm: 10_000,
            sticky_min_success_ppm: p.sticky_min_success_ppm,
            weight_stability: p.weights.stability as f64,
            weight_latency: p.weights.latency as f64,
            weight_cost: p.weights.cost as f64,
            latency_ref_ms: p.weights.latency_ref_ms,
            score_band: p.weights.band as f64,
            panic_routing: p.panic_routing,
            merchant_classes: Default::default(),
            rule: vec![],
            health: HealthSection::default(),
        }
    }
}

/// `[[routing.rule]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    /// Only this merchant number.
    pub merchant: Option<String>,
    /// Only merchants of this class.
    pub merchant_class: Option<String>,
    /// Only this product.
    pub product: Option<String>,
    /// Only amounts strictly below this, fen.
    pub amount_below_fen: Option<u64>,
    /// The channel placed first.
    pub channel: String,
    /// Exclude every other channel.
    #[serde(default)]
    pub exclusive: bool,
}

/// `[routing.health]`: see `crate::health` for the breaker's rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    /// Sliding window, ms.
    pub window_ms: u64,
    /// Calls in the window before the failure rate counts.
    pub min_calls: u32,
    /// Failure share that opens the breaker, ppm.
    pub failure_rate_ppm: u32,
    /// Failures in a row that open the breaker (0 = off).
    pub consecutive_failures: u32,
    /// First open period, ms.
    pub open_ms: u64,
    /// Longest open period, ms.
    pub open_max_ms: u64,
    /// Probes in half-open.
    pub half_open_probes: u32,
}

impl Default for HealthSection {
    fn default() -> Self {
        let h = HealthConfig::default();
        HealthSection {
            window_ms: h.window_ms,
            min_calls: h.min_calls,
            failure_rate_ppm: h.failure_rate_ppm,
            consecutive_failures: h.consecutive_failures,
            open_ms: h.open_ms,
            open_max_ms: h.open_max_ms,
            half_open_probes: h.half_open_probes,
        }
    }
}

fn priority_default() -> u32 {
    100
}
fn china_offset() -> i32 {
    480
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
    /// `[admin]`: the operator's HTTP port; absent = no admin port.
    #[serde(default)]
    pub admin: Option<AdminSection>,
    /// `[[channel]]`, in priority order.
    #[serde(default, rename = "channel")]
    pub channels: Vec<ChannelSection>,
    /// `[routing]`.
    #[serde(default)]
    pub routing: RoutingSection,
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
        if let Some(a) = cfg.admin.as_mut() {
            let p = &mut a.token_file;
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
        if !(1_000..=86_400_000).contains(&e.order_detail_ms) {
            return Err(invalid(
                "engine.order_detail_ms",
                e.order_detail_ms,
                "must be 1000..=86400000 (one second to one day)",
            ));
        }
        if e.order_detail_max > 100_000_000 {
            return Err(invalid(
                "engine.order_detail_max",
                e.order_detail_max,
                "must be 0..=100000000 (0: every final order is compacted at the next pass)",
            ));
        }
        self.journal_config()?;
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
            for m in &c.merchant_classes {
                merchant_class(m).ok_or_else(|| {
                    invalid(
                        &k("merchant_classes"),
                        m,
                        "classes are 1–16 printable ASCII characters",
                    )
                })?;
            }
            if !(-720..=840).contains(&c.utc_offset_min) {
                return Err(invalid(
                    &k("utc_offset_min"),
                    c.utc_offset_min,
                    "must be -720..=840 (UTC-12 to UTC+14)",
                ));
            }
            for d in &c.holidays {
                route::parse_date(d)
                    .ok_or_else(|| invalid(&k("holidays"), d, "dates are YYYY-MM-DD"))?;
            }
            for (name, p) in [
                ("debit", &c.debit),
                ("payout", &c.payout),
                ("sign", &c.sign),
            ] {
                validate_product(&|f: &str| k(&format!("{name}.{f}")), name, p)?;
            }
        }
        self.validate_routing()
    }

    fn validate_routing(&self) -> Result<(), ConfigError> {
        let r = &self.routing;
        if r.explore_ppm > 500_000 {
            return Err(invalid(
                "routing.explore_ppm",
                r.explore_ppm,
                "must be 0..=500000 (exploration is a small share of traffic)",
            ));
        }
        if r.sticky_min_success_ppm > 1_000_000 {
            return Err(invalid(
                "routing.sticky_min_success_ppm",
                r.sticky_min_success_ppm,
                "must be 0..=1000000",
            ));
        }
        for (key, v) in [
            ("routing.weight_stability", r.weight_stability),
            ("routing.weight_latency", r.weight_latency),
            ("routing.weight_cost", r.weight_cost),
            ("routing.score_band", r.score_band),
        ] {
            if !(v.is_finite() && (0.0..=1e6).contains(&v)) {
                return Err(invalid(key, v, "must be a number in 0..=1000000"));
            }
        }
        if r.latency_ref_ms == 0 {
            return Err(invalid("routing.latency_ref_ms", 0, "must be at least 1"));
        }
        for (m, class) in &r.merchant_classes {
            let key = format!("routing.merchant_classes.{m}");
            if crate::wire::header::check_merchant(m).is_err() {
                return Err(invalid(
                    &key,
                    m,
                    "merchant numbers are 1–16 printable ASCII",
                ));
            }
            merchant_class(class).ok_or_else(|| {
                invalid(&key, class, "classes are 1–16 printable ASCII characters")
            })?;
        }
        for (i, rule) in r.rule.iter().enumerate() {
            let k = |f: &str| format!("routing.rule[{i}].{f}");
            if !self.channels.iter().any(|c| c.id == rule.channel) {
                return Err(invalid(
                    &k("channel"),
                    &rule.channel,
                    "must name a configured [[channel]]",
                ));
            }
            if let Some(m) = &rule.merchant {
                if crate::wire::header::check_merchant(m).is_err() {
                    return Err(invalid(
                        &k("merchant"),
                        m,
                        "merchant numbers are 1–16 printable ASCII",
                    ));
                }
            }
            if let Some(c) = &rule.merchant_class {
                merchant_class(c).ok_or_else(|| {
                    invalid(
                        &k("merchant_class"),
                        c,
                        "classes are 1–16 printable ASCII characters",
                    )
                })?;
            }
            if let Some(p) = &rule.product {
                product(p)
                    .ok_or_else(|| invalid(&k("product"), p, "must be debit, payout or sign"))?;
            }
        }
        let h = &r.health;
        let checks: [(&str, u64, u64, u64); 6] = [
            ("window_ms", h.window_ms, 1_000, 3_600_000),
            ("min_calls", h.min_calls as u64, 1, 1_000_000),
            ("failure_rate_ppm", h.failure_rate_ppm as u64, 1, 1_000_000),
            (
                "consecutive_failures",
                h.consecutive_failures as u64,
                0,
                10_000,
            ),
            ("open_ms", h.open_ms, 100, 3_600_000),
            ("half_open_probes", h.half_open_probes as u64, 1, 1_000),
        ];
        for (f, v, lo, hi) in checks {
            if !(lo..=hi).contains(&v) {
                return Err(invalid(
                    &format!("routing.health.{f}"),
                    v,
                    &format!("must be {lo}..={hi}"),
                ));
            }
        }
        if h.open_max_ms < h.open_ms || h.open_max_ms > 86_400_000 {
            return Err(invalid(
                "routing.health.open_max_ms",
                h.open_max_ms,
                "must be routing.health.open_ms..=86400000",
            ));
        }
        Ok(())
    }

    /// The journal's settings: directory, policy, retention, snapshot interval.
    pub fn journal_config(&self) -> Result<crate::journal::JournalConfig, ConfigError> {
        let j = &self.journal;
        if !(1..=8760).contains(&j.retention_hours) {
            return Err(invalid(
                "journal.retention_hours",
                j.retention_hours,
                "must be 1..=8760 (one hour to one year)",
            ));
        }
        if !(10_000..=1_000_000_000).contains(&j.snapshot_every_records) {
            return Err(invalid(
                "journal.snapshot_every_records",
                j.snapshot_every_records,
                "must be 10000..=1000000000",
            ));
        }
        let mut jc = crate::journal::JournalConfig::new(&j.dir);
        jc.policy = self.journal_policy()?;
        jc.retention_ms = j.retention_hours * 3_600_000;
        jc.snapshot_every_records = j.snapshot_every_records;
        Ok(jc)
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
            settle_after_ms: e.order_detail_ms,
            detailed_final_max: e.order_detail_max,
            ref_prefix,
            routing: self.routing_policy(),
            health: self.health_config(),
            ..EngineConfig::default()
        }
    }

    /// The routing policy (validated already).
    pub fn routing_policy(&self) -> RoutingPolicy {
        let r = &self.routing;
        RoutingPolicy {
            weights: ScoreWeights {
                stability: r.weight_stability as f32,
                latency: r.weight_latency as f32,
                cost: r.weight_cost as f32,
                latency_ref_ms: r.latency_ref_ms,
                band: r.score_band as f32,
            },
            explore_ppm: r.explore_ppm,
            sticky_min_success_ppm: r.sticky_min_success_ppm,
            panic_routing: r.panic_routing,
            merchant_classes: r
                .merchant_classes
                .iter()
                .filter_map(|(m, c)| Some((MerchantNo::new(m).ok()?, merchant_class(c)?)))
                .collect(),
            rules: r
                .rule
                .iter()
                .filter_map(|x| {
                    Some(Rule {
                        merchant: match &x.merchant {
                            Some(m) => Some(MerchantNo::new(m).ok()?),
                            None => None,
                        },
                        merchant_class: match &x.merchant_class {
                            Some(c) => Some(merchant_class(c)?),
                            None => None,
                        },
                        product: match &x.product {
                            Some(p) => Some(product(p)?),
                            None => None,
                        },
                        amount_below_fen: x.amount_below_fen,
                        channel: ChannelId::new(&x.channel).ok()?,
                        exclusive: x.exclusive,
                    })
                })
                .collect(),
        }
    }

    /// Health thresholds (validated already).
    pub fn health_config(&self) -> HealthConfig {
        let h = &self.routing.health;
        HealthConfig {
            window_ms: h.window_ms,
            min_calls: h.min_calls,
            failure_rate_ppm: h.failure_rate_ppm,
            consecutive_failures: h.consecutive_failures,
            open_ms: h.open_ms,
            open_max_ms: h.open_max_ms,
            half_open_probes: h.half_open_probes,
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
                merchant_classes: c
                    .merchant_classes
                    .iter()
                    .filter_map(|m| merchant_class(m))
                    .collect(),
                priority: c.priority,
                utc_offset_min: c.utc_offset_min,
                holidays: c
                    .holidays
                    .iter()
                    .filter_map(|d| route::parse_date(d))
                    .collect(),
                terms: [&c.debit, &c.payout, &c.sign].map(product_terms),
                fund: c.payout.fund_fen.map(|f| FundConfig {
                    initial_fen: f,
                    alert_fen: c.payout.fund_alert_fen,
                }),
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

fn merchant_class(s: &str) -> Option<MerchantClass> {
    MerchantClass::new(s).ok().filter(|c| !c.is_empty())
}

fn product_terms(p: &ProductSection) -> ProductTerms {
    ProductTerms {
        min_amount_fen: p.min_amount_fen,
        max_amount_fen: p.max_amount_fen,
        card_daily_amount_fen: p.card_daily_amount_fen,
        card_daily_count: p.card_daily_count,
        fee: FeeModel {
            fixed_fen: p.fee_fixed_fen,
            rate_ppm: p.fee_rate_ppm,
            min_fen: p.fee_min_fen,
            max_fen: p.fee_max_fen,
            tiers: p
                .fee_tiers
                .iter()
                .map(|t| FeeTier {
                    from_month_fen: t.from_month_fen,
                    rate_ppm: t.rate_ppm,
                })
                .collect(),
        },
        closed: p
            .closed
            .iter()
            .filter_map(|w| route::Window::parse(&w.from, &w.to))
            .collect(),
        holiday_closed: p.holiday_closed,
    }
}

fn validate_product(
    k: &dyn Fn(&str) -> String,
    name: &str,
    p: &ProductSection,
) -> Result<(), ConfigError> {
    if p.max_amount_fen > 0 && p.max_amount_fen < p.min_amount_fen {
        return Err(invalid(
            &k("max_amount_fen"),
            p.max_amount_fen,
            "must be 0 (no maximum) or at least min_amount_fen",
        ));
    }
    if p.fee_rate_ppm > 1_000_000 {
        return Err(invalid(
            &k("fee_rate_ppm"),
            p.fee_rate_ppm,
            "must be 0..=1000000 (a fee above the amount is a typo)",
        ));
    }
    if p.fee_max_fen > 0 && p.fee_max_fen < p.fee_min_fen {
        return Err(invalid(
            &k("fee_max_fen"),
            p.fee_max_fen,
            "must be 0 (no cap) or at least fee_min_fen",
        ));
    }
    let mut last = None;
    for t in &p.fee_tiers {
        if t.rate_ppm > 1_000_000 {
            return Err(invalid(
                &k("fee_tiers.rate_ppm"),
                t.rate_ppm,
                "must be 0..=1000000",
            ));
        }
        if last.is_some_and(|l| t.from_month_fen <= l) {
            return Err(invalid(
                &k("fee_tiers.from_month_fen"),
                t.from_month_fen,
                "tiers must be in strictly ascending from_month_fen",
            ));
        }
        last = Some(t.from_month_fen);
    }
    for w in &p.closed {
        if route::Window::parse(&w.from, &w.to).is_none() {
            return Err(invalid(
                &k("closed"),
                format!("{}-{}", w.from, w.to),
                "windows are HH:MM to HH:MM (24:00 allowed as an end), not empty",
            ));
        }
    }
    if name != "payout" && p.fund_fen.is_some() {
        return Err(invalid(
            &k("fund_fen"),
            p.fund_fen.unwrap_or(0),
            "a fund position applies to payouts only",
        ));
    }
    if p.fund_fen.is_some_and(|f| f > i64::MAX as u64) {
        return Err(invalid(
            &k("fund_fen"),
            p.fund_fen.unwrap_or(0),
            "too large",
        ));
    }
    Ok(())
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
    fn journal_retention_and_snapshot_interval_are_checked_and_applied() {
        let mut c = Config::default();
        let jc = c.journal_config().unwrap();
        assert_eq!(jc.retention_ms, crate::journal::RETENTION_MS_DEFAULT);
        c.journal.retention_hours = 24;
        c.journal.snapshot_every_records = 50_000;
        let jc = c.journal_config().unwrap();
        assert_eq!(
            (jc.retention_ms, jc.snapshot_every_records),
            (86_400_000, 50_000)
        );
        c.journal.retention_hours = 0;
        let e = c.journal_config().unwrap_err().to_string();
        assert!(
            e.contains("journal.retention_hours") && e.contains('0'),
            "{e}"
        );
        c.journal.retention_hours = 24;
        c.journal.snapshot_every_records = 5;
        let e = c.journal_config().unwrap_err().to_string();
        assert!(e.contains("journal.snapshot_every_records"), "{e}");
    }

    #[test]
    fn routing_options_map_to_the_router() {
        let text = format!(
            "{MIN}priority = 7\nutc_offset_min = 0\nholidays = [\"2024-10-01\"]\nmerchant_classes = [\"microloan\"]\n\
             [channel.payout]\nmax_amount_fen = 5000000\ncard_daily_count = 3\nfee_rate_ppm = 1500\n\
             fee_tiers = [{{ from_month_fen = 100, rate_ppm = 900 }}]\n\
             closed = [{{ from = \"17:00\", to = \"21:00\" }}]\nfund_fen = 1000\nfund_alert_fen = 10\n\
             [routing]\nexplore_ppm = 0\n[routing.merchant_classes]\n\"898100000000001\" = \"microloan\"\n\
             [[routing.rule]]\nmerchant_class = \"microloan\"\nchannel = \"CHA\"\nexclusive = true\n\
             [routing.health]\nopen_ms = 500\nopen_max_ms = 1000\n"
        );
        let c = Config::parse(&text, "t").unwrap();
        let ch = &c.route_table()[0];
        assert_eq!((ch.priority, ch.utc_offset_min), (7, 0));
        assert_eq!(ch.holidays, vec![route::parse_date("2024-10-01").unwrap()]);
        let t = ch.terms(Product::Payout);
        assert_eq!(
            (t.max_amount_fen, t.card_daily_count, t.fee.rate_ppm),
            (5_000_000, 3, 1_500)
        );
        assert_eq!(t.fee.tiers.len(), 1);
        assert_eq!(
            t.closed,
            vec![route::Window::parse("17:00", "21:00").unwrap()]
        );
        assert!(t.holiday_closed);
        assert_eq!(ch.fund.unwrap().initial_fen, 1_000);
        let e = c.engine_config("S".into());
        assert_eq!(e.routing.explore_ppm, 0);
        assert_eq!(e.routing.rules.len(), 1);
        assert_eq!(e.routing.merchant_classes.len(), 1);
        assert_eq!((e.health.open_ms, e.health.open_max_ms), (500, 1_000));
        // Defaults keep an old config valid and the router open.
        let d = Config::parse(MIN, "t").unwrap();
        assert_eq!(d.route_table()[0].utc_offset_min, 480);
        assert_eq!(d.engine_config("S".into()).health, HealthConfig::default());
    }

    #[test]
    fn routing_errors_name_key_value_and_reason() {
        let cases = [
            ("[channel.payout]\nclosed = [{ from = \"17:00\", to = \"25:00\" }]\n", "channel[0].payout.closed = 17:00-25:00"),
            ("[channel.debit]\nfund_fen = 5\n", "channel[0].debit.fund_fen = 5"),
            ("[channel.payout]\nmin_amount_fen = 10\nmax_amount_fen = 5\n", "channel[0].payout.max_amount_fen = 5"),
            ("[channel.payout]\nfee_tiers = [{ from_month_fen = 9, rate_ppm = 1 }, { from_month_fen = 9, rate_ppm = 1 }]\n", "fee_tiers.from_month_fen = 9"),
            ("holidays = [\"2024-02-30\"]\n", "channel[0].holidays = 2024-02-30"),
            ("utc_offset_min = 900\n", "channel[0].utc_offset_min = 900"),
            ("[routing]\nexplore_ppm = 900000\n", "routing.explore_ppm = 900000"),
            ("[[routing.rule]]\nchannel = \"NOPE\"\n", "routing.rule[0].channel = NOPE"),
            ("[routing.health]\nopen_ms = 1000\nopen_max_ms = 10\n", "routing.health.open_max_ms = 10"),
            ("[routing.health]\nhalf_open_probes = 0\n", "routing.health.half_open_probes = 0"),
        ];
        for (extra, want) in cases {
            let e = Config::parse(&format!("{MIN}{extra}"), "t")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
    }

    #[test]
    fn order_detail_bounds_are_checked_and_applied() {
        let d = Config::parse(MIN, "t").unwrap().engine_config("S".into());
        assert_eq!(
            (d.settle_after_ms, d.detailed_final_max),
            (
                crate::engine::SETTLE_AFTER_MS_DEFAULT,
                crate::engine::DETAILED_FINAL_MAX_DEFAULT
            )
        );
        let text = MIN.replace(
            "[keys]",
            "[engine]\norder_detail_ms = 5000\norder_detail_max = 250\n[keys]",
        );
        let e = Config::parse(&text, "t").unwrap().engine_config("S".into());
        assert_eq!((e.settle_after_ms, e.detailed_final_max), (5_000, 250));
        let bad = MIN.replace("[keys]", "[engine]\norder_detail_max = 100000001\n[keys]");
        let err = Config::parse(&bad, "t").unwrap_err().to_string();
        assert!(
            err.contains("engine.order_detail_max = 100000001") && err.contains("0..=100000000"),
            "{err}"
        );
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
