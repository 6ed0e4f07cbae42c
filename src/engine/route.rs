//! Routing: a pure function from (instruction, channel table, routing policy, per-channel
//! state snapshot) to an ordered list of candidate channels and, for every other channel,
//! why it was excluded (linkerd's `SelectRoute` shape: no I/O, no clock, no locks).
//!
//! # Eligibility
//! A channel is a candidate only when every check passes; the first failing check is the
//! exclusion reported, in this order: disabled in config → operator override off →
//! product not offered → merchant class not allowed → no active agreement (debits) → bank
//! not supported → card type not supported → amount under the minimum / over the maximum →
//! holiday closure → service window closed → per-card daily amount / count limit → payout
//! fund position too low → no logged-on connection → breaker open (or half-open with every
//! probe out). An operator override "on" skips the breaker check.
//!
//! # Ordering: "stability first, then performance, then cost"
//! For each eligible channel, with `S` the smoothed success rate in [0, 1] (see
//! [`crate::health`]), `L` its 90th percentile latency in ms, `F` its fee for this amount
//! (fen) and `F_min` the cheapest eligible fee:
//!
//! ```text
//! score = w_s · S  +  w_l · r / (r + L)  +  w_c · (F_min + 1) / (F + 1)
//! ```
//!
//! with defaults `w_s = 1000`, `w_l = 100`, `w_c = 10` and `r = latency_ref_ms = 200`
//! (a channel without latency samples counts as fast as the fastest measured eligible
//! channel, or `L = r` when none is measured: optimistic, so it gets traffic). One point of success rate (1 %)
//! is worth 10 points, going from 50 ms to 100 ms costs about 13, paying twice the
//! cheapest fee costs about 5. Scores are compared in bands of `band` points (default 5):
//! within a band the configured `priority` (lower first) decides, so two equally healthy
//! channels do not swap places on noise; then the exact score, then table order.
//!
//! Placed ahead of the score order, in this order:
//! 1. a merchant rule's channel (force a channel for a merchant, a merchant class, a
//!    product, amounts below a bound; `exclusive` excludes every other channel);
//! 2. half-open channels with a probe left (the breaker needs live probes to close);
//! 3. for a debit, the agreement's primary channel while it is healthy (breaker closed and
//!    success rate ≥ `sticky_min_success_ppm`): an agreement's channel stays sticky;
//! 4. otherwise, with probability `explore_ppm`, one random other candidate goes first so
//!    every channel's health estimate stays fresh (payouts and non-sticky debits; never
//!    signing, whose channel becomes the card's agreement channel).
//!
//! When every otherwise eligible channel is excluded only by its breaker, they are all
//! tried anyway in score order (`panic_routing`, after Envoy's panic threshold).
//!
//! Money never touches a float here: fees are integer fen (rates in ppm, rounded up);
//! only the score, which is not money, is a float.

use std::collections::HashMap;

use crate::health::{BreakerState, HealthView, Override};
use crate::message::{BankCode, CardType, ChannelId};
use crate::wire::field::Ascii;
use crate::wire::header::MerchantNo;

use super::agreement::{Agreement, ChannelAgreementState};

/// A merchant class (e.g. `microloan`), configured per merchant number.
pub type MerchantClass = Ascii<16>;

/// What an instruction asks of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Product {
    /// Debit by agreement (代扣).
    Debit,
    /// Payout to a card (代付).
    Payout,
    /// Signing (identity check + sign).
    Sign,
}

impl Product {
    /// Every product, in index order.
    pub const ALL: [Product; 3] = [Product::Debit, Product::Payout, Product::Sign];

    /// Index into per-product arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Config and metrics name.
    pub fn name(self) -> &'static str {
        match self {
            Product::Debit => "debit",
            Product::Payout => "payout",
            Product::Sign => "sign",
        }
    }
}

/// A daily closed period in the channel's local time: `[from, to)` minutes after
/// midnight; `to < from` spans midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Start, minutes after local midnight (inclusive).
    pub from_min: u16,
    /// End, minutes after local midnight (exclusive); 1440 for midnight.
    pub to_min: u16,
}

impl Window {
    /// Parse `"HH:MM"` bounds (`"24:00"` allowed as an end).
    pub fn parse(from: &str, to: &str) -> Option<Window> {
        let m = |s: &str| -> Option<u16> {
            let (h, m) = s.split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
        };
        let (from_min, to_min) = (m(from)?, m(to)?);
        (from_min != to_min && from_min < 1440).then_some(Window { from_min, to_min })
    }

    /// True when `minute` (after local midnight) is inside the window.
    pub fn contains(&self, minute: u16) -> bool {
        if self.from_min <= self.to_min {
            minute >= self.from_min && minute < self.to_min
        } else {
            minute >= self.from_min || minute < self.to_min
        }
    }
}

/// Local calendar position of an instant in a channel's fixed UTC offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// Days since 1970-01-01 in local time.
    pub day: i64,
    /// Minutes after local midnight.
    pub minute: u16,
}

impl LocalTime {
    /// `now_ms` (since the epoch, UTC) at `utc_offset_min`.
    pub fn at(now_ms: u64, utc_offset_min: i32) -> LocalTime {
        let local = now_ms as i64 + utc_offset_min as i64 * 60_000;
        LocalTime {
            day: local.div_euclid(86_400_000),
            minute: (local.rem_euclid(86_400_000) / 60_000) as u16,
        }
    }

    /// Month index (year · 12 + month − 1) of the local day.
    pub fn month(&self) -> i64 {
        let (y, m, _) = civil_from_days(self.day);
        y * 12 + m as i64 - 1
    }
}

/// Days since 1970-01-01 of a civil date (H. Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil date (year, month 1–12, day 1–31) of a day number.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// Parse `"YYYY-MM-DD"` into a day number.
pub fn parse_date(s: &str) -> Option<i64> {
    let mut it = s.splitn(3, '-');
    let (y, m, d) = (it.next()?, it.next()?, it.next()?);
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    if !(1..=12).contains(&m) || d == 0 {
        return None;
    }
    let day = days_from_civil(y, m, d);
    (civil_from_days(day) == (y, m, d)).then_some(day)
}

/// A fee rate that applies once the month's volume on the channel reaches a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeeTier {
    /// Month-to-date successful volume from which this rate applies, fen.
    pub from_month_fen: u64,
    /// Rate, parts per million of the amount.
    pub rate_ppm: u32,
}

/// A channel's fee for one product, integer fen only.
///
/// `fee = clamp(fixed_fen + ⌈amount · rate_ppm / 10⁶⌉, min_fen, max_fen)`, where
/// `rate_ppm` is replaced by the highest tier whose `from_month_fen` the month's volume has
/// reached. The proportional part is rounded **up** to a whole fen (channels bill at
/// least that, and the estimate stays conservative); `max_fen = 0` means no cap.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FeeModel {
    /// Fixed part per instruction, fen.
    pub fixed_fen: u64,
    /// Proportional part, ppm of the amount (e.g. 1500 = 0.15 %).
    pub rate_ppm: u32,
    /// Minimum fee, fen.
    pub min_fen: u64,
    /// Maximum fee, fen (0 = no cap).
    pub max_fen: u64,
    /// Volume tiers, ascending `from_month_fen`.
    pub tiers: Vec<FeeTier>,
}

impl FeeModel {
    /// Fee for `amount_fen` when the month's volume is `month_fen`.
    pub fn fee_fen(&self, amount_fen: u64, month_fen: u64) -> u64 {
        let rate = self
            .tiers
            .iter()
            .rev()
            .find(|t| month_fen >= t.from_month_fen)
            .map(|t| t.rate_ppm)
            .unwrap_or(self.rate_ppm);
        let prop = (amount_fen as u128 * rate as u128).div_ceil(1_000_000);
        let fee = (self.fixed_fen as u128 + prop).min(u64::MAX as u128) as u64;
        let fee = fee.max(self.min_fen);
        if self.max_fen > 0 {
            fee.min(self.max_fen)
        } else {
            fee
        }
    }
}

/// A channel's terms for one product.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProductTerms {
    /// Smallest amount per instruction, fen (0 = none).
    pub min_amount_fen: u64,
    /// Largest amount per instruction, fen (0 = none).
    pub max_amount_fen: u64,
    /// Per card and local day: most amount, fen (0 = none). Counted by sluice per card
    /// hash (successful and in-flight instructions).
    pub card_daily_amount_fen: u64,
    /// Per card and local day: most instructions (0 = none).
    pub card_daily_count: u32,
    /// Fee model.
    pub fee: FeeModel,
    /// Daily closed periods in local time.
    pub closed: Vec<Window>,
    /// Closed all day on the channel's holidays.
    pub holiday_closed: bool,
}

/// A payout channel's prefunded balance (头寸) settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FundConfig {
    /// Balance at start, fen (run-time changes: reservations and operator top-ups).
    pub initial_fen: u64,
    /// Alert when the available amount falls below this, fen.
    pub alert_fen: u64,
}

/// One channel as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelConfig {
    /// Channel id (as used in responses and logs).
    pub id: ChannelId,
    /// Config switch: a disabled channel gets no new instructions.
    pub enabled: bool,
    /// Products offered.
    pub products: Vec<Product>,
    /// Banks supported; empty means every bank.
    pub banks: Vec<BankCode>,
    /// Card types supported.
    pub card_types: Vec<CardType>,
    /// Merchant classes allowed; empty means every merchant.
    pub merchant_classes: Vec<MerchantClass>,
    /// Preference among channels whose scores are in the same band; lower first.
    pub priority: u32,
    /// The channel's fixed UTC offset, minutes (China: +480, no DST).
    pub utc_offset_min: i32,
    /// Local holidays (days since 1970-01-01).
    pub holidays: Vec<i64>,
    /// Terms per product, indexed by [`Product::index`].
    pub terms: [ProductTerms; 3],
    /// Payout fund position; `None` = not tracked.
    pub fund: Option<FundConfig>,
}

impl ChannelConfig {
    /// A channel offering every product for every bank, card type and merchant, without
    /// limits, fees, windows or fund position.
    pub fn open(id: &str) -> ChannelConfig {
        ChannelConfig {
            id: ChannelId::new(id).expect("channel id fits"),
            enabled: true,
            products: vec![Product::Debit, Product::Payout, Product::Sign],
            banks: vec![],
            card_types: vec![CardType::Debit, CardType::Credit],
            merchant_classes: vec![],
            priority: 100,
            utc_offset_min: 480,
            holidays: vec![],
            terms: Default::default(),
            fund: None,
        }
    }

    /// The terms for a product.
    pub fn terms(&self, p: Product) -> &ProductTerms {
        &self.terms[p.index()]
    }
}

/// The channel table, in configured order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelTable {
    /// Channels, in configured order (the last tie-breaker).
    pub channels: Vec<ChannelConfig>,
}

/// A per-merchant override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Only this merchant (any when `None`).
    pub merchant: Option<MerchantNo>,
    /// Only merchants of this class (any when `None`).
    pub merchant_class: Option<MerchantClass>,
    /// Only this product (any when `None`).
    pub product: Option<Product>,
    /// Only amounts strictly below this, fen (any when `None`).
    pub amount_below_fen: Option<u64>,
    /// The channel placed first.
    pub channel: ChannelId,
    /// Exclude every other channel (no failover elsewhere).
    pub exclusive: bool,
}

impl Rule {
    fn matches(&self, req: &Request<'_>, class: Option<&MerchantClass>) -> bool {
        self.merchant.map_or(true, |m| m == req.merchant)
            && self
                .merchant_class
                .as_ref()
                .map_or(true, |c| Some(c) == class)
            && self.product.map_or(true, |p| p == req.product)
            && self.amount_below_fen.map_or(true, |b| req.amount_fen < b)
    }
}

/// Score weights (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreWeights {
    /// Weight of the success rate.
    pub stability: f32,
    /// Weight of the latency term.
    pub latency: f32,
    /// Weight of the cost term.
    pub cost: f32,
    /// Latency at which the latency term is one half, ms.
    pub latency_ref_ms: u32,
    /// Width of a score band inside which `priority` decides.
    pub band: f32,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        ScoreWeights {
            stability: 1000.0,
            latency: 100.0,
            cost: 10.0,
            latency_ref_ms: 200,
            band: 5.0,
        }
    }
}

/// Routing settings that are not per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingPolicy {
    /// Score weights.
    pub weights: ScoreWeights,
    /// Share of instructions that try another eligible channel first, ppm. `0` here (so
    /// code that builds an engine by hand routes deterministically); the config file's
    /// default is 1 % (`routing.explore_ppm = 10000`).
    pub explore_ppm: u32,
    /// An agreement's primary channel stays first while its success rate is at least this
    /// (and its breaker closed), ppm.
    pub sticky_min_success_ppm: u32,
    /// Merchant number → class.
    pub merchant_classes: HashMap<MerchantNo, MerchantClass>,
    /// Overrides, first match wins.
    pub rules: Vec<Rule>,
    /// When every otherwise eligible channel is excluded only by its breaker, route to
    /// them anyway (Envoy's "panic threshold"): a NOT_PROCESSED or unsent attempt fails
    /// over safely and a timeout only makes the order PENDING, which beats refusing every
    /// instruction because the last channel had a bad minute.
    pub panic_routing: bool,
}

impl Default for RoutingPolicy {
    fn default() -> Self {
        RoutingPolicy {
            weights: ScoreWeights::default(),
            explore_ppm: 0,
            sticky_min_success_ppm: 900_000,
            merchant_classes: HashMap::new(),
            rules: Vec::new(),
            panic_routing: true,
        }
    }
}

/// The instruction being routed.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Product.
    pub product: Product,
    /// Merchant.
    pub merchant: MerchantNo,
    /// Amount, fen (0 for signing).
    pub amount_fen: u64,
    /// The card's bank.
    pub bank: BankCode,
    /// The card's type.
    pub card_type: CardType,
    /// For debits: the agreement.
    pub agreement: Option<&'a Agreement>,
    /// Now, ms since the epoch (UTC).
    pub now_ms: u64,
    /// A random number (exploration draw).
    pub explore: u64,
}

/// One channel's run-time state for this instruction, aligned with the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelState {
    /// Has a logged-on connection (as far as the engine was told).
    pub up: bool,
    /// Health.
    pub health: HealthView,
    /// Operator override for this product.
    pub operator: Override,
    /// This card's amount today on this channel and product, fen.
    pub card_day_fen: u64,
    /// This card's instructions today on this channel and product.
    pub card_day_count: u32,
    /// Month-to-date volume on this channel and product, fen (fee tiers).
    pub month_volume_fen: u64,
    /// Payout fund available (balance − reserved), fen; `None` = not tracked.
    pub fund_available_fen: Option<i64>,
}

impl Default for ChannelState {
    fn default() -> Self {
        ChannelState {
            up: true,
            health: HealthView::default(),
            operator: Override::Auto,
            card_day_fen: 0,
            card_day_count: 0,
            month_volume_fen: 0,
            fund_available_fen: None,
        }
    }
}

/// Why a channel is not a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exclusion {
    /// Disabled by configuration.
    Disabled,
    /// Closed by the operator for this product.
    OperatorOff,
    /// Does not offer this product.
    ProductUnsupported,
    /// The merchant's class is not allowed on this channel.
    MerchantClassNotAllowed,
    /// The agreement has no active channel agreement there.
    NoAgreement,
    /// Does not support the card's bank.
    BankUnsupported,
    /// Does not support the card type.
    CardTypeUnsupported,
    /// Amount under the channel's per-instruction minimum.
    AmountBelowMin,
    /// Amount over the channel's per-instruction maximum.
    AmountAboveMax,
    /// Closed today (holiday).
    HolidayClosed,
    /// Inside a daily closed period.
    WindowClosed,
    /// The card's daily amount on this channel would be exceeded.
    DailyAmountLimit,
    /// The card's daily count on this channel would be exceeded.
    DailyCountLimit,
    /// Payout fund position below the amount.
    FundLow,
    /// No logged-on connection.
    Down,
    /// Circuit breaker open.
    BreakerOpen,
    /// Circuit breaker half-open with every probe already out.
    BreakerProbing,
    /// A merchant rule sends this instruction exclusively to another channel.
    RuleExclusive,
}

impl Exclusion {
    /// Stable name for the admin endpoint and logs.
    pub fn name(self) -> &'static str {
        match self {
            Exclusion::Disabled => "disabled",
            Exclusion::OperatorOff => "operator_off",
            Exclusion::ProductUnsupported => "product_unsupported",
            Exclusion::MerchantClassNotAllowed => "merchant_class_not_allowed",
            Exclusion::NoAgreement => "no_agreement",
            Exclusion::BankUnsupported => "bank_unsupported",
            Exclusion::CardTypeUnsupported => "card_type_unsupported",
            Exclusion::AmountBelowMin => "amount_below_min",
            Exclusion::AmountAboveMax => "amount_above_max",
            Exclusion::HolidayClosed => "holiday_closed",
            Exclusion::WindowClosed => "window_closed",
            Exclusion::DailyAmountLimit => "daily_amount_limit",
            Exclusion::DailyCountLimit => "daily_count_limit",
            Exclusion::FundLow => "fund_low",
            Exclusion::Down => "down",
            Exclusion::BreakerOpen => "breaker_open",
            Exclusion::BreakerProbing => "breaker_probing",
            Exclusion::RuleExclusive => "rule_exclusive",
        }
    }
}

/// Why a candidate sits where it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A merchant rule put it first.
    Rule,
    /// Half-open breaker probe.
    Probe,
    /// The agreement's primary channel, healthy.
    Sticky,
    /// Exploration draw.
    Explore,
    /// Every eligible channel's breaker is open: tried anyway (panic routing).
    Panic,
    /// Score order.
    Score,
}

/// One candidate with what decided its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranked {
    /// Channel.
    pub channel: ChannelId,
    /// Score × 1000, rounded.
    pub score_milli: i64,
    /// Estimated fee, fen.
    pub fee_fen: u64,
    /// What placed it.
    pub placement: Placement,
}

/// The router's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Channels to try, in order.
    pub candidates: Vec<ChannelId>,
    /// The same, with scores, fees and placement.
    pub ranked: Vec<Ranked>,
    /// Every other channel and why.
    pub excluded: Vec<(ChannelId, Exclusion)>,
}

fn exclusion(
    c: &ChannelConfig,
    st: &ChannelState,
    req: &Request<'_>,
    class: Option<&MerchantClass>,
) -> Option<Exclusion> {
    let p = req.product;
    if !c.enabled {
        return Some(Exclusion::Disabled);
    }
    if st.operator == Override::Off {
        return Some(Exclusion::OperatorOff);
    }
    if !c.products.contains(&p) {
        return Some(Exclusion::ProductUnsupported);
    }
    if !c.merchant_classes.is_empty() && !class.is_some_and(|k| c.merchant_classes.contains(k)) {
        return Some(Exclusion::MerchantClassNotAllowed);
    }
    if let Some(a) = req.agreement {
        if !a
            .on_channel(&c.id)
            .is_some_and(|ca| ca.state == ChannelAgreementState::Active)
        {
            return Some(Exclusion::NoAgreement);
        }
    }
    if !c.banks.is_empty() && !c.banks.contains(&req.bank) {
        return Some(Exclusion::BankUnsupported);
    }
    if !c.card_types.contains(&req.card_type) {
        return Some(Exclusion::CardTypeUnsupported);
    }
    let t = c.terms(p);
    if p != Product::Sign {
        if req.amount_fen < t.min_amount_fen {
            return Some(Exclusion::AmountBelowMin);
        }
        if t.max_amount_fen > 0 && req.amount_fen > t.max_amount_fen {
            return Some(Exclusion::AmountAboveMax);
        }
    }
    if t.holiday_closed || !t.closed.is_empty() {
        let lt = LocalTime::at(req.now_ms, c.utc_offset_min);
        if t.holiday_closed && c.holidays.contains(&lt.day) {
            return Some(Exclusion::HolidayClosed);
        }
        if t.closed.iter().any(|w| w.contains(lt.minute)) {
            return Some(Exclusion::WindowClosed);
        }
    }
    if p != Product::Sign {
        if t.card_daily_amount_fen > 0
            && st.card_day_fen.saturating_add(req.amount_fen) > t.card_daily_amount_fen
        {
            return Some(Exclusion::DailyAmountLimit);
        }
        if t.card_daily_count > 0 && st.card_day_count >= t.card_daily_count {
            return Some(Exclusion::DailyCountLimit);
        }
    }
    if p == Product::Payout {
        if let Some(avail) = st.fund_available_fen {
            if avail < req.amount_fen.min(i64::MAX as u64) as i64 {
                return Some(Exclusion::FundLow);
            }
        }
    }
    if !st.up {
        return Some(Exclusion::Down);
    }
    if st.operator != Override::On {
        match st.health.breaker {
            BreakerState::Open { .. } => return Some(Exclusion::BreakerOpen),
            BreakerState::HalfOpen { probes_left: 0, .. } => {
                return Some(Exclusion::BreakerProbing)
            }
            _ => {}
        }
    }
    None
}

fn push_eligible(eligible: &mut Vec<(usize, u64, f32, Placement)>, i: usize) {
    eligible.push((i, 0, 0.0, Placement::Score));
}

/// Route one instruction. `states` is aligned with `table.channels` (missing entries
/// count as [`ChannelState::default`]).
pub fn route(
    req: &Request<'_>,
    table: &ChannelTable,
    policy: &RoutingPolicy,
    states: &[ChannelState],
) -> Decision {
    let n = table.channels.len();
    let class = if policy.merchant_classes.is_empty() {
        None
    } else {
        policy.merchant_classes.get(&req.merchant)
    };
    let rule = policy.rules.iter().find(|r| r.matches(req, class));
    let default_state = ChannelState::default();
    let mut excluded = Vec::new();
    // (table index, fee, score, placement)
    let mut eligible: Vec<(usize, u64, f32, Placement)> = Vec::with_capacity(n);
    for (i, c) in table.channels.iter().enumerate() {
        let st = states.get(i).unwrap_or(&default_state);
        let why = exclusion(c, st, req, class).or_else(|| match rule {
            Some(r) if r.exclusive && r.channel != c.id => Some(Exclusion::RuleExclusive),
            _ => None,
        });
        match why {
            Some(e) => excluded.push((c.id, e)),
            None => push_eligible(&mut eligible, i),
        }
    }
    let panic = eligible.is_empty()
        && policy.panic_routing
        && excluded
            .iter()
            .any(|(_, e)| matches!(e, Exclusion::BreakerOpen | Exclusion::BreakerProbing));
    if panic {
        excluded.retain(|(id, e)| {
            let tripped = matches!(e, Exclusion::BreakerOpen | Exclusion::BreakerProbing);
            if tripped {
                if let Some(i) = table.channels.iter().position(|c| &c.id == id) {
                    push_eligible(&mut eligible, i);
                }
            }
            !tripped
        });
    }
    for e in eligible.iter_mut() {
        let st = states.get(e.0).unwrap_or(&default_state);
        e.1 = table.channels[e.0]
            .terms(req.product)
            .fee
            .fee_fen(req.amount_fen, st.month_volume_fen);
    }
    let w = &policy.weights;
    let min_fee = eligible.iter().map(|e| e.1).min().unwrap_or(0);
    let r = w.latency_ref_ms.max(1) as f32;
    // A channel without latency samples (new, or its window just cleared) is assumed as
    // fast as the fastest measured one: optimistic, like the success prior, so it gets
    // traffic and a measurement.
    let unmeasured = eligible
        .iter()
        .filter_map(|e| states.get(e.0).and_then(|s| s.health.latency_ms_p90))
        .min()
        .map(|v| v as f32)
        .unwrap_or(r);
    for e in eligible.iter_mut() {
        let h = &states.get(e.0).unwrap_or(&default_state).health;
        let s = h.success_ppm as f32 / 1e6;
        let l = h.latency_ms_p90.map(|v| v as f32).unwrap_or(unmeasured);
        let cost = (min_fee as f32 + 1.0) / (e.1 as f32 + 1.0);
        e.2 = w.stability * s + w.latency * r / (r + l) + w.cost * cost;
    }
    let band = if w.band > 0.0 {
        w.band
    } else {
        f32::MIN_POSITIVE
    };
    eligible.sort_unstable_by(|a, b| {
        let (ca, cb) = (&table.channels[a.0], &table.channels[b.0]);
        let (ba, bb) = ((a.2 / band).floor(), (b.2 / band).floor());
        bb.total_cmp(&ba)
            .then(ca.priority.cmp(&cb.priority))
            .then(b.2.total_cmp(&a.2))
            .then(a.0.cmp(&b.0))
    });
    // (table index, fee, score, placement), moved to the front by the placements below,
    // most binding first.
    if panic {
        for e in eligible.iter_mut() {
            e.3 = Placement::Panic;
        }
    }
    let mut order = eligible;
    let mut front = 0;
    let lift = |order: &mut Vec<(usize, u64, f32, Placement)>,
                pos: usize,
                why: Placement,
                front: &mut usize| {
        let mut x = order.remove(pos);
        x.3 = why;
        order.insert(*front, x);
        *front += 1;
    };
    if let Some(r) = rule {
        if let Some(pos) = order
            .iter()
            .position(|x| table.channels[x.0].id == r.channel)
        {
            lift(&mut order, pos, Placement::Rule, &mut front);
        }
    }
    let start = front;
    for pos in start..order.len() {
        let s = states.get(order[pos].0).unwrap_or(&default_state);
        if s.operator != Override::On && matches!(s.health.breaker, BreakerState::HalfOpen { .. }) {
            lift(&mut order, pos, Placement::Probe, &mut front);
        }
    }
    if front == 0 {
        let primary = req.agreement.and_then(|a| {
            a.channels
                .iter()
                .flatten()
                .find(|c| c.state == ChannelAgreementState::Active)
                .map(|c| c.channel)
        });
        if let Some(p) = primary {
            if let Some(pos) = order.iter().position(|x| table.channels[x.0].id == p) {
                let h = &states.get(order[pos].0).unwrap_or(&default_state).health;
                if h.breaker == BreakerState::Closed
                    && h.success_ppm >= policy.sticky_min_success_ppm
                {
                    lift(&mut order, pos, Placement::Sticky, &mut front);
                }
            }
        }
    }
    // Signing is not explored: the channel it picks becomes the card's agreement channel
    // for good.
    if front == 0
        && !panic
        && req.product != Product::Sign
        && order.len() >= 2
        && (req.explore % 1_000_000) < policy.explore_ppm as u64
    {
        let pos = 1 + ((req.explore >> 32) % (order.len() as u64 - 1)) as usize;
        lift(&mut order, pos, Placement::Explore, &mut front);
    }
    let ranked: Vec<Ranked> = order
        .iter()
        .map(|&(i, fee, score, placement)| Ranked {
            channel: table.channels[i].id,
            score_milli: (score as f64 * 1000.0).round() as i64,
            fee_fen: fee,
            placement,
        })
        .collect();
    Decision {
        candidates: ranked.iter().map(|x| x.channel).collect(),
        ranked,
        excluded,
    }
}

/// The issue-4 router, kept as the baseline its bench (`benches/engine.rs`) compares
/// against: static eligibility only (enabled, product, bank, card type, agreement, up),
/// configured order, no limits, windows, health or fees. The engine uses [`route`].
fn static_route(
    table: &ChannelTable,
    product: Product,
    up: impl Fn(&ChannelId) -> bool,
    extra: impl Fn(&ChannelConfig) -> Option<Exclusion>,
) -> Decision {
    let mut d = Decision::default();
    for c in &table.channels {
        let why = if !c.enabled {
            Some(Exclusion::Disabled)
        } else if !c.products.contains(&product) {
            Some(Exclusion::ProductUnsupported)
        } else if let Some(e) = extra(c) {
            Some(e)
        } else if !up(&c.id) {
            Some(Exclusion::Down)
        } else {
            None
        };
        match why {
            None => d.candidates.push(c.id),
            Some(e) => d.excluded.push((c.id, e)),
        }
    }
    d
}

/// Baseline (issue 4): debit candidates where the agreement is active, agreement order.
pub fn route_debit(
    table: &ChannelTable,
    agreement: &Agreement,
    up: impl Fn(&ChannelId) -> bool,
) -> Decision {
    let mut d = static_route(table, Product::Debit, up, |c| {
        match agreement.on_channel(&c.id) {
            Some(ca) if ca.state == ChannelAgreementState::Active => None,
            _ => Some(Exclusion::NoAgreement),
        }
    });
    let pos = |id: &ChannelId| {
        agreement
            .channels
            .iter()
            .flatten()
            .position(|c| &c.channel == id)
            .unwrap_or(usize::MAX)
    };
    d.candidates.sort_by_key(pos);
    d
}

/// Baseline (issue 4): candidates for a payout or signing by bank and card type.
pub fn route_card(
    table: &ChannelTable,
    product: Product,
    bank: &BankCode,
    card_type: CardType,
    up: impl Fn(&ChannelId) -> bool,
) -> Decision {
    static_route(table, product, up, |c| {
        if !c.banks.is_empty() && !c.banks.contains(bank) {
            Some(Exclusion::BankUnsupported)
        } else if !c.card_types.contains(&card_type) {
            Some(Exclusion::CardTypeUnsupported)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::message::AgreementNo;
    use crate::engine::agreement::{ChannelAgreement, CHANNELS_PER_AGREEMENT_MAX};
    use crate::message::AgreementId;
    use crate::wire::field::Digits;

    fn id(s: &str) -> ChannelId {
        ChannelId::new(s).unwrap()
    }

    fn m() -> MerchantNo {
        MerchantNo::new("M1").unwrap()
    }

    /// 2024-06-03 (a Monday) at 10:00 China time.
    const MONDAY_10H: u64 = 1_717_380_000_000;

    fn req(product: Product, amount: u64) -> Request<'static> {
        Request {
            product,
            merchant: m(),
            amount_fen: amount,
            bank: BankCode::new("ICBC").unwrap(),
            card_type: CardType::Debit,
            agreement: None,
            now_ms: MONDAY_10H,
            explore: 999_999,
        }
    }

    fn table(ids: &[&str]) -> ChannelTable {
        ChannelTable {
            channels: ids.iter().map(|c| ChannelConfig::open(c)).collect(),
        }
    }

    fn quiet() -> RoutingPolicy {
        RoutingPolicy {
            explore_ppm: 0,
            ..RoutingPolicy::default()
        }
    }

    fn why(d: &Decision) -> Vec<(&str, Exclusion)> {
        d.excluded.iter().map(|(c, e)| (c.as_str(), *e)).collect()
    }

    fn names(d: &Decision) -> Vec<&str> {
        d.candidates.iter().map(|c| c.as_str()).collect()
    }

    fn agreement(channels: &[(&str, ChannelAgreementState)]) -> Agreement {
        let mut a = Agreement {
            id: AgreementId(1),
            merchant: m(),
            card_hash: [1; 16],
            id_hash: [2; 16],
            card_last4: Digits::new("0128").unwrap(),
            bank: BankCode::new("ICBC").unwrap(),
            card_type: CardType::Debit,
            cancelled: false,
            channels: [None; CHANNELS_PER_AGREEMENT_MAX],
        };
        for (c, s) in channels {
            a.add_channel(ChannelAgreement {
                channel: id(c),
                agreement_no: AgreementNo::new(&format!("{c}-1")).unwrap(),
                state: *s,
            });
        }
        a
    }

    #[test]
    fn calendar_helpers() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(parse_date("2024-02-29"), Some(days_from_civil(2024, 2, 29)));
        assert_eq!(parse_date("2023-02-29"), None);
        assert_eq!(parse_date("2024-13-01"), None);
        assert_eq!(parse_date("24-01-01"), None);
        for d in [-1000, 0, 19_000, 20_000, 60_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        let lt = LocalTime::at(MONDAY_10H, 480);
        assert_eq!(lt.minute, 600);
        assert_eq!(lt.day, parse_date("2024-06-03").unwrap());
        assert_eq!(lt.month(), 2024 * 12 + 5);
        // 16:30 UTC is already the next day in China.
        let lt = LocalTime::at(MONDAY_10H + 14 * 3_600_000 + 1_800_000, 480);
        assert_eq!((lt.day, lt.minute), (parse_date("2024-06-04").unwrap(), 30));
        let w = Window::parse("17:00", "21:00").unwrap();
        assert!(w.contains(17 * 60) && w.contains(20 * 60 + 59) && !w.contains(21 * 60));
        let night = Window::parse("23:00", "01:00").unwrap();
        assert!(night.contains(23 * 60 + 30) && night.contains(30) && !night.contains(60));
        assert!(Window::parse("17:00", "17:00").is_none());
        assert!(Window::parse("7:00", "9:00").is_none());
        assert!(Window::parse("10:00", "24:00").is_some());
    }

    #[test]
    fn fees_are_integer_rounded_up_capped_and_tiered() {
        let f = FeeModel {
            fixed_fen: 10,
            rate_ppm: 1_500, // 0.15 %
            min_fen: 50,
            max_fen: 2_500,
            tiers: vec![
                FeeTier {
                    from_month_fen: 100_000_000,
                    rate_ppm: 1_000,
                },
                FeeTier {
                    from_month_fen: 1_000_000_000,
                    rate_ppm: 800,
                },
            ],
        };
        assert_eq!(f.fee_fen(100, 0), 50, "minimum");
        // 0.15 % of 100 001 fen = 150.0015 → 151 (rounded up), + 10 fixed.
        assert_eq!(f.fee_fen(100_001, 0), 161);
        assert_eq!(f.fee_fen(100_000_000, 0), 2_500, "cap");
        assert_eq!(f.fee_fen(100_000, 100_000_000), 110, "first tier");
        assert_eq!(f.fee_fen(100_000, 5_000_000_000), 90, "second tier");
        assert_eq!(FeeModel::default().fee_fen(u64::MAX, 0), 0);
        let big = FeeModel {
            rate_ppm: 1_000_000,
            fixed_fen: u64::MAX,
            ..FeeModel::default()
        };
        assert_eq!(big.fee_fen(u64::MAX, 0), u64::MAX, "saturates, no overflow");
    }

    #[test]
    fn every_exclusion_reason_is_reported() {
        let mut cs: Vec<ChannelConfig> = Vec::new();
        let mut st: Vec<ChannelState> = Vec::new();
        let mut add = |name: &str, f: &dyn Fn(&mut ChannelConfig, &mut ChannelState)| {
            let mut c = ChannelConfig::open(name);
            let mut s = ChannelState::default();
            f(&mut c, &mut s);
            cs.push(c);
            st.push(s);
        };
        let payout = Product::Payout.index();
        add("DIS", &|c, _| c.enabled = false);
        add("OPOFF", &|_, s| s.operator = Override::Off);
        add("PROD", &|c, _| c.products = vec![Product::Debit]);
        add("CLASS", &|c, _| {
            c.merchant_classes = vec![MerchantClass::new("bank").unwrap()]
        });
        add("BANK", &|c, _| {
            c.banks = vec![BankCode::new("CMB").unwrap()]
        });
        add("CTYPE", &|c, _| c.card_types = vec![CardType::Credit]);
        add("MIN", &|c, _| c.terms[payout].min_amount_fen = 1_001);
        add("MAX", &|c, _| c.terms[payout].max_amount_fen = 999);
        add("HOLI", &|c, _| {
            c.holidays = vec![parse_date("2024-06-03").unwrap()];
            c.terms[payout].holiday_closed = true;
        });
        add("WIN", &|c, _| {
            c.terms[payout].closed = vec![Window::parse("09:30", "10:30").unwrap()]
        });
        add("DAYAMT", &|c, s| {
            c.terms[payout].card_daily_amount_fen = 5_000;
            s.card_day_fen = 4_001;
        });
        add("DAYCNT", &|c, s| {
            c.terms[payout].card_daily_count = 3;
            s.card_day_count = 3;
        });
        add("FUND", &|_, s| s.fund_available_fen = Some(999));
        add("DOWN", &|_, s| s.up = false);
        add("OPEN", &|_, s| {
            s.health.breaker = BreakerState::Open { until_ms: u64::MAX }
        });
        add("PROBE", &|_, s| {
            s.health.breaker = BreakerState::HalfOpen {
                probes_left: 0,
                successes: 0,
            }
        });
        add("OK", &|c, s| {
            // Limits that are not reached, a window not open now, a holiday not today,
            // a fund just big enough, a forced-on channel with an open breaker.
            c.terms[payout].card_daily_amount_fen = 5_000;
            s.card_day_fen = 4_000;
            c.terms[payout].closed = vec![Window::parse("17:00", "21:00").unwrap()];
            c.holidays = vec![parse_date("2024-10-01").unwrap()];
            c.terms[payout].holiday_closed = true;
            s.fund_available_fen = Some(1_000);
            s.operator = Override::On;
            s.health.breaker = BreakerState::Open { until_ms: u64::MAX };
        });
        let t = ChannelTable { channels: cs };
        let d = route(&req(Product::Payout, 1_000), &t, &quiet(), &st);
        assert_eq!(names(&d), vec!["OK"]);
        assert_eq!(
            why(&d),
            vec![
                ("DIS", Exclusion::Disabled),
                ("OPOFF", Exclusion::OperatorOff),
                ("PROD", Exclusion::ProductUnsupported),
                ("CLASS", Exclusion::MerchantClassNotAllowed),
                ("BANK", Exclusion::BankUnsupported),
                ("CTYPE", Exclusion::CardTypeUnsupported),
                ("MIN", Exclusion::AmountBelowMin),
                ("MAX", Exclusion::AmountAboveMax),
                ("HOLI", Exclusion::HolidayClosed),
                ("WIN", Exclusion::WindowClosed),
                ("DAYAMT", Exclusion::DailyAmountLimit),
                ("DAYCNT", Exclusion::DailyCountLimit),
                ("FUND", Exclusion::FundLow),
                ("DOWN", Exclusion::Down),
                ("OPEN", Exclusion::BreakerOpen),
                ("PROBE", Exclusion::BreakerProbing),
            ]
        );
        // Every reason has a distinct name.
        let mut n: Vec<_> = d.excluded.iter().map(|(_, e)| e.name()).collect();
        n.sort();
        n.dedup();
        assert_eq!(n.len(), d.excluded.len());
    }

    #[test]
    fn no_agreement_and_rule_exclusive_are_reported() {
        let t = table(&["A", "B", "C"]);
        let a = agreement(&[
            ("B", ChannelAgreementState::Active),
            ("C", ChannelAgreementState::Revoked),
        ]);
        let mut r = req(Product::Debit, 100);
        r.agreement = Some(&a);
        let d = route(&r, &t, &quiet(), &[]);
        assert_eq!(names(&d), vec!["B"]);
        assert_eq!(
            why(&d),
            vec![("A", Exclusion::NoAgreement), ("C", Exclusion::NoAgreement)]
        );
        let mut p = quiet();
        p.rules.push(Rule {
            merchant: None,
            merchant_class: None,
            product: Some(Product::Payout),
            amount_below_fen: None,
            channel: id("C"),
            exclusive: true,
        });
        let d = route(&req(Product::Payout, 100), &t, &p, &[]);
        assert_eq!(names(&d), vec!["C"]);
        assert_eq!(d.ranked[0].placement, Placement::Rule);
        assert_eq!(
            why(&d),
            vec![
                ("A", Exclusion::RuleExclusive),
                ("B", Exclusion::RuleExclusive)
            ]
        );
        // Debits do not match a payout rule.
        let d = route(&req(Product::Debit, 100), &t, &p, &[]);
        assert_eq!(names(&d), vec!["A", "B", "C"]);
    }

    #[test]
    fn merchant_rules_force_by_class_and_amount() {
        let t = table(&["A", "B"]);
        let mut p = quiet();
        p.merchant_classes
            .insert(m(), MerchantClass::new("microloan").unwrap());
        p.rules.push(Rule {
            merchant: None,
            merchant_class: Some(MerchantClass::new("microloan").unwrap()),
            product: None,
            amount_below_fen: Some(10_000),
            channel: id("B"),
            exclusive: false,
        });
        let d = route(&req(Product::Payout, 9_999), &t, &p, &[]);
        assert_eq!(
            names(&d),
            vec!["B", "A"],
            "forced first, the other stays a fallback"
        );
        let d = route(&req(Product::Payout, 10_000), &t, &p, &[]);
        assert_eq!(names(&d), vec!["A", "B"], "not below the bound");
        let mut other = req(Product::Payout, 1);
        other.merchant = MerchantNo::new("M2").unwrap();
        assert_eq!(names(&route(&other, &t, &p, &[])), vec!["A", "B"]);
        // Class-restricted channel: allowed for the class, not for others.
        let mut t2 = table(&["A", "B"]);
        t2.channels[0].merchant_classes = vec![MerchantClass::new("microloan").unwrap()];
        assert_eq!(
            names(&route(&req(Product::Payout, 1), &t2, &p, &[])),
            vec!["B", "A"]
        );
        let d = route(&other, &t2, &p, &[]);
        assert_eq!(why(&d), vec![("A", Exclusion::MerchantClassNotAllowed)]);
    }

    fn healthy(success_ppm: u32, p90: Option<u32>) -> ChannelState {
        ChannelState {
            health: HealthView {
                breaker: BreakerState::Closed,
                success_ppm,
                calls: 100,
                latency_ms_p90: p90,
            },
            ..ChannelState::default()
        }
    }

    #[test]
    fn score_puts_stability_first_then_latency_then_cost() {
        let t = table(&["A", "B"]);
        let p = quiet();
        let r = req(Product::Payout, 100_000);
        // Stability: 95 % vs 99 % beats a 4x latency advantage.
        let d = route(
            &r,
            &t,
            &p,
            &[healthy(950_000, Some(50)), healthy(990_000, Some(200))],
        );
        assert_eq!(names(&d), vec!["B", "A"]);
        // Same band of stability: latency decides.
        let d = route(
            &r,
            &t,
            &p,
            &[healthy(990_000, Some(400)), healthy(990_000, Some(40))],
        );
        assert_eq!(names(&d), vec!["B", "A"]);
        // Same stability and latency: the cheaper channel…
        let mut t2 = table(&["A", "B"]);
        t2.channels[0].terms[1].fee.rate_ppm = 3_000;
        t2.channels[1].terms[1].fee.rate_ppm = 1_000;
        let same = [healthy(990_000, Some(50)), healthy(990_000, Some(50))];
        let d = route(&r, &t2, &p, &same);
        assert_eq!(names(&d), vec!["B", "A"]);
        assert_eq!((d.ranked[0].fee_fen, d.ranked[1].fee_fen), (100, 300));
        assert!(d.ranked[0].score_milli > d.ranked[1].score_milli);
        // …but within a band, priority decides first when it is set.
        t2.channels[0].priority = 1;
        let mut wide = quiet();
        wide.weights.band = 100.0;
        let d = route(&r, &t2, &wide, &same);
        assert_eq!(names(&d), vec!["A", "B"]);
        // Equal everything: table order.
        let d = route(&r, &t, &p, &same);
        assert_eq!(names(&d), vec!["A", "B"]);
        assert!(d.ranked.iter().all(|x| x.placement == Placement::Score));
    }

    #[test]
    fn half_open_channels_get_probes_first() {
        let t = table(&["A", "B"]);
        let mut probing = healthy(600_000, None);
        probing.health.breaker = BreakerState::HalfOpen {
            probes_left: 1,
            successes: 0,
        };
        let d = route(
            &req(Product::Payout, 1),
            &t,
            &quiet(),
            &[healthy(990_000, None), probing],
        );
        assert_eq!(names(&d), vec!["B", "A"]);
        assert_eq!(d.ranked[0].placement, Placement::Probe);
    }

    #[test]
    fn all_breakers_open_routes_in_panic_mode_unless_disabled() {
        let t = table(&["A", "B", "C"]);
        let mut open = healthy(400_000, None);
        open.health.breaker = BreakerState::Open { until_ms: u64::MAX };
        let mut worse = open;
        worse.health.success_ppm = 100_000;
        let down = ChannelState {
            up: false,
            ..ChannelState::default()
        };
        let states = [worse, open, down];
        let d = route(&req(Product::Payout, 1), &t, &quiet(), &states);
        assert_eq!(names(&d), vec!["B", "A"]);
        assert!(d.ranked.iter().all(|x| x.placement == Placement::Panic));
        assert_eq!(why(&d), vec![("C", Exclusion::Down)]);
        let strict = RoutingPolicy {
            panic_routing: false,
            ..quiet()
        };
        let d = route(&req(Product::Payout, 1), &t, &strict, &states);
        assert!(d.candidates.is_empty());
        assert_eq!(
            why(&d),
            vec![
                ("A", Exclusion::BreakerOpen),
                ("B", Exclusion::BreakerOpen),
                ("C", Exclusion::Down)
            ]
        );
        // Signing is never explored.
        let always = RoutingPolicy {
            explore_ppm: 1_000_000,
            ..quiet()
        };
        let d = route(&req(Product::Sign, 0), &table(&["A", "B"]), &always, &[]);
        assert_eq!(names(&d), vec!["A", "B"]);
    }

    #[test]
    fn agreement_channel_is_sticky_unless_unhealthy() {
        let t = table(&["A", "B"]);
        let a = agreement(&[
            ("B", ChannelAgreementState::Active),
            ("A", ChannelAgreementState::Active),
        ]);
        let mut r = req(Product::Debit, 100);
        r.agreement = Some(&a);
        let fast_a = [healthy(990_000, Some(10)), healthy(990_000, Some(300))];
        let d = route(&r, &t, &quiet(), &fast_a);
        assert_eq!(
            names(&d),
            vec!["B", "A"],
            "primary B stays although A scores higher"
        );
        assert_eq!(d.ranked[0].placement, Placement::Sticky);
        let sick_b = [healthy(990_000, Some(10)), healthy(700_000, Some(300))];
        let d = route(&r, &t, &quiet(), &sick_b);
        assert_eq!(
            names(&d),
            vec!["A", "B"],
            "unhealthy primary loses stickiness"
        );
        // Sticky debits are not explored.
        let mut always = quiet();
        always.explore_ppm = 1_000_000;
        let d = route(&r, &t, &always, &fast_a);
        assert_eq!(names(&d), vec!["B", "A"]);
    }

    #[test]
    fn exploration_sends_a_small_share_elsewhere() {
        let t = table(&["A", "B", "C"]);
        let p = RoutingPolicy {
            explore_ppm: 10_000, // 1 %
            ..RoutingPolicy::default()
        };
        let mut firsts = std::collections::HashMap::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut r = req(Product::Payout, 1);
            r.explore = x;
            let d = route(&r, &t, &p, &[]);
            *firsts
                .entry(d.candidates[0].as_str().to_string())
                .or_insert(0u32) += 1;
            assert_eq!(d.candidates.len(), 3);
        }
        let a = firsts["A"];
        assert!((98_700..99_300).contains(&a), "{firsts:?}");
        assert!(firsts["B"] > 300 && firsts["C"] > 300, "{firsts:?}");
    }
}
