//! Run-time counters the router reads: per-card daily amounts and counts per channel and
//! product, payout fund positions (头寸), and per-channel daily and monthly volume.
//!
//! Accounting follows the attempt, not the order:
//! - when an attempt starts on a channel, its amount is **reserved**: added to the card's
//!   daily counter there (if that channel limits cards) and to the fund position's
//!   reserved part (payouts on a channel with a fund position);
//! - when the attempt definitively did nothing or was declined, the reservation is
//!   **released**;
//! - when it succeeded, the fund reservation is **spent** (balance and reserved both go
//!   down), the card counter keeps it, and the channel's volume grows;
//! - while it is PENDING (timeout, processing) the reservation stays.
//!
//! Counting in-flight amounts against the card's limit is stricter than counting only
//! successes: a burst of concurrent debits cannot overshoot the limit.
//!
//! The fund position is a routing hint kept in memory (started from the config, moved by
//! operators' top-ups): the channel's own check (FUNDS_POSITION_LOW, a NOT_PROCESSED code)
//! stays authoritative and safe to fail over from. A concurrent reservation may take the
//! available amount slightly below zero; it only steers routing.
//!
//! Concurrency note: `DashMap`s; each update happens under one entry's lock and never
//! calls back into another map while holding it.

use dashmap::DashMap;
use rustc_hash::FxBuildHasher;

use crate::health::{FundSnapshot, VolumeSnapshot};
use crate::message::ChannelId;

use super::agreement::PiiHash;
use super::route::{ChannelTable, LocalTime, Product};

/// One card's usage of one channel and product on one local day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardCounter {
    /// Channel.
    pub channel: ChannelId,
    /// Product.
    pub product: Product,
    /// Local day (days since 1970-01-01 in the channel's time zone).
    pub day: i64,
    /// Amount reserved or spent, fen.
    pub amount_fen: u64,
    /// Instructions reserved or done.
    pub count: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Fund {
    balance_fen: i64,
    reserved_fen: i64,
    alert_fen: i64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Volume {
    day: i64,
    day_fen: u64,
    day_count: u64,
    month: i64,
    month_fen: u64,
}

/// Card counters, fund positions and volumes. FxHash: the keys are keyed hashes and
/// configured ids, not attacker-chosen, and the router reads these maps per decision.
#[derive(Debug, Default)]
pub struct LimitsBook {
    cards: DashMap<PiiHash, Vec<CardCounter>, FxBuildHasher>,
    funds: DashMap<ChannelId, Fund, FxBuildHasher>,
    volumes: DashMap<(ChannelId, Product), Volume, FxBuildHasher>,
}

fn fen(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

impl LimitsBook {
    /// An empty book.
    pub fn new() -> LimitsBook {
        LimitsBook::default()
    }

    /// This card's usage of `channel`/`product` on local `day`: (amount fen, count).
    pub fn card_usage(
        &self,
        card: &PiiHash,
        channel: &ChannelId,
        product: Product,
        day: i64,
    ) -> (u64, u32) {
        self.cards
            .get(card)
            .and_then(|v| {
                v.iter()
                    .find(|c| &c.channel == channel && c.product == product && c.day == day)
                    .map(|c| (c.amount_fen, c.count))
            })
            .unwrap_or((0, 0))
    }

    /// Every counter of this card (one lookup for a whole routing decision).
    pub fn card_counters(&self, card: &PiiHash) -> Vec<CardCounter> {
        self.cards.get(card).map(|v| v.clone()).unwrap_or_default()
    }

    /// Add an attempt's amount to the card's counter.
    pub fn reserve_card(
        &self,
        card: &PiiHash,
        channel: ChannelId,
        product: Product,
        day: i64,
        amount_fen: u64,
    ) {
        let mut v = self.cards.entry(*card).or_default();
        // Older days are of no use to anyone: drop them while here.
        v.retain(|c| c.day + 1 >= day);
        match v
            .iter_mut()
            .find(|c| c.channel == channel && c.product == product && c.day == day)
        {
            Some(c) => {
                c.amount_fen = c.amount_fen.saturating_add(amount_fen);
                c.count = c.count.saturating_add(1);
            }
            None => v.push(CardCounter {
                channel,
                product,
                day,
                amount_fen,
                count: 1,
            }),
        }
    }

    /// Take a released attempt off the card's counter.
    pub fn release_card(
        &self,
        card: &PiiHash,
        channel: ChannelId,
        product: Product,
        day: i64,
        amount_fen: u64,
    ) {
        if let Some(mut v) = self.cards.get_mut(card) {
            if let Some(c) = v
                .iter_mut()
                .find(|c| c.channel == channel && c.product == product && c.day == day)
            {
                c.amount_fen = c.amount_fen.saturating_sub(amount_fen);
                c.count = c.count.saturating_sub(1);
            }
        }
    }

    /// Cards with counters held (memory bound check, tests).
    pub fn cards_tracked(&self) -> usize {
        self.cards.len()
    }

    /// Forget card counters of days before yesterday (UTC−12 … UTC+14 all covered by
    /// keeping two days back). Called periodically.
    pub fn prune(&self, now_ms: u64) {
        let today = LocalTime::at(now_ms, 0).day;
        self.cards.retain(|_, v| {
            v.retain(|c| c.day + 2 >= today);
            !v.is_empty()
        });
    }

    /// Create fund positions for channels that configure one (a reload keeps the
    /// run-time balance of existing positions and only updates the alert threshold).
    pub fn configure_funds(&self, table: &ChannelTable) {
        for c in &table.channels {
            if let Some(f) = c.fund {
                self.funds
                    .entry(c.id)
                    .and_modify(|x| x.alert_fen = fen(f.alert_fen))
                    .or_insert(Fund {
                        balance_fen: fen(f.initial_fen),
                        reserved_fen: 0,
                        alert_fen: fen(f.alert_fen),
                    });
            }
        }
    }

    /// Available (balance − reserved) fund of a channel; `None` when not tracked.
    pub fn fund_available(&self, channel: &ChannelId) -> Option<i64> {
        self.funds
            .get(channel)
            .map(|f| f.balance_fen - f.reserved_fen)
    }

    /// Reserve a payout's amount. False when the channel has no fund position.
    pub fn fund_reserve(&self, channel: &ChannelId, amount_fen: u64) -> bool {
        match self.funds.get_mut(channel) {
            Some(mut f) => {
                f.reserved_fen = f.reserved_fen.saturating_add(fen(amount_fen));
                true
            }
            None => false,
        }
    }

    /// Release a reservation (the payout did not happen).
    pub fn fund_release(&self, channel: &ChannelId, amount_fen: u64) {
        if let Some(mut f) = self.funds.get_mut(channel) {
            f.reserved_fen = f.reserved_fen.saturating_sub(fen(amount_fen));
        }
    }

    /// Spend a reservation (the payout succeeded).
    pub fn fund_spend(&self, channel: &ChannelId, amount_fen: u64) {
        if let Some(mut f) = self.funds.get_mut(channel) {
            f.reserved_fen = f.reserved_fen.saturating_sub(fen(amount_fen));
            f.balance_fen = f.balance_fen.saturating_sub(fen(amount_fen));
        }
    }

    /// Operator top-up (or correction, when negative). Returns the new position, or
    /// `None` for a channel without a fund position.
    pub fn fund_top_up(&self, channel: &ChannelId, delta_fen: i64) -> Option<FundSnapshot> {
        let mut f = self.funds.get_mut(channel)?;
        f.balance_fen = f.balance_fen.saturating_add(delta_fen);
        Some(FundSnapshot {
            channel: *channel,
            balance_fen: f.balance_fen,
            reserved_fen: f.reserved_fen,
            alert_fen: f.alert_fen,
        })
    }

    /// Every fund position.
    pub fn funds_snapshot(&self) -> Vec<FundSnapshot> {
        let mut v: Vec<FundSnapshot> = self
            .funds
            .iter()
            .map(|e| FundSnapshot {
                channel: *e.key(),
                balance_fen: e.balance_fen,
                reserved_fen: e.reserved_fen,
                alert_fen: e.alert_fen,
            })
            .collect();
        v.sort_by(|a, b| a.channel.as_str().cmp(b.channel.as_str()));
        v
    }

    /// Count a success in the channel's volume.
    pub fn add_volume(&self, channel: ChannelId, product: Product, at: LocalTime, amount: u64) {
        let month = at.month();
        let mut v = self.volumes.entry((channel, product)).or_default();
        if v.day != at.day {
            v.day = at.day;
            v.day_fen = 0;
            v.day_count = 0;
        }
        if v.month != month {
            v.month = month;
            v.month_fen = 0;
        }
        v.day_fen = v.day_fen.saturating_add(amount);
        v.day_count += 1;
        v.month_fen = v.month_fen.saturating_add(amount);
    }

    /// Volume of `month` (fee tiers), fen.
    pub fn month_volume(&self, channel: &ChannelId, product: Product, month: i64) -> u64 {
        self.volumes
            .get(&(*channel, product))
            .filter(|v| v.month == month)
            .map(|v| v.month_fen)
            .unwrap_or(0)
    }

    /// Today's and this month's volume per channel and product, in each channel's time
    /// zone (channels not in `table` use UTC+8).
    pub fn volumes_snapshot(&self, table: &ChannelTable, now_ms: u64) -> Vec<VolumeSnapshot> {
        let mut out: Vec<VolumeSnapshot> = self
            .volumes
            .iter()
            .map(|e| {
                let (channel, product) = *e.key();
                let offset = table
                    .channels
                    .iter()
                    .find(|c| c.id == channel)
                    .map(|c| c.utc_offset_min)
                    .unwrap_or(480);
                let lt = LocalTime::at(now_ms, offset);
                let today = e.day == lt.day;
                VolumeSnapshot {
                    channel,
                    product: product.name(),
                    day_fen: if today { e.day_fen } else { 0 },
                    day_count: if today { e.day_count } else { 0 },
                    month_fen: if e.month == lt.month() {
                        e.month_fen
                    } else {
                        0
                    },
                }
            })
            .collect();
        out.sort_by(|a, b| (a.channel.as_str(), a.product).cmp(&(b.channel.as_str(), b.product)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::route::{ChannelConfig, FundConfig};

    fn id(s: &str) -> ChannelId {
        ChannelId::new(s).unwrap()
    }

    #[test]
    fn card_counters_reserve_release_and_forget_old_days() {
        let b = LimitsBook::new();
        let card = [7u8; 16];
        b.reserve_card(&card, id("A"), Product::Debit, 100, 500);
        b.reserve_card(&card, id("A"), Product::Debit, 100, 300);
        b.reserve_card(&card, id("B"), Product::Debit, 100, 1);
        assert_eq!(b.card_usage(&card, &id("A"), Product::Debit, 100), (800, 2));
        assert_eq!(b.card_usage(&card, &id("A"), Product::Payout, 100), (0, 0));
        b.release_card(&card, id("A"), Product::Debit, 100, 300);
        assert_eq!(b.card_usage(&card, &id("A"), Product::Debit, 100), (500, 1));
        assert_eq!(b.card_usage(&card, &id("A"), Product::Debit, 101), (0, 0));
        b.reserve_card(&card, id("A"), Product::Debit, 102, 1);
        assert_eq!(
            b.card_usage(&card, &id("A"), Product::Debit, 100),
            (0, 0),
            "days before yesterday dropped on touch"
        );
        b.prune(1_000 * 86_400_000);
        assert_eq!(b.cards_tracked(), 0);
    }

    #[test]
    fn fund_position_reserve_release_spend_top_up() {
        let b = LimitsBook::new();
        let mut c = ChannelConfig::open("P");
        c.fund = Some(FundConfig {
            initial_fen: 10_000,
            alert_fen: 2_000,
        });
        let t = ChannelTable {
            channels: vec![c.clone(), ChannelConfig::open("Q")],
        };
        b.configure_funds(&t);
        assert_eq!(b.fund_available(&id("Q")), None);
        assert!(!b.fund_reserve(&id("Q"), 1));
        assert!(b.fund_reserve(&id("P"), 4_000));
        assert!(b.fund_reserve(&id("P"), 3_000));
        assert_eq!(b.fund_available(&id("P")), Some(3_000));
        b.fund_release(&id("P"), 3_000);
        b.fund_spend(&id("P"), 4_000);
        let s = b.funds_snapshot()[0];
        assert_eq!((s.balance_fen, s.reserved_fen), (6_000, 0));
        let s = b.fund_top_up(&id("P"), 1_500).unwrap();
        assert_eq!(s.available_fen(), 7_500);
        // A reload keeps the run-time balance, updates the alert.
        let mut c2 = c;
        c2.fund = Some(FundConfig {
            initial_fen: 1,
            alert_fen: 9,
        });
        b.configure_funds(&ChannelTable { channels: vec![c2] });
        let s = b.funds_snapshot()[0];
        assert_eq!((s.balance_fen, s.alert_fen), (7_500, 9));
    }

    #[test]
    fn volumes_roll_over_by_day_and_month() {
        let b = LimitsBook::new();
        let t = ChannelTable {
            channels: vec![ChannelConfig::open("A")],
        };
        let day_ms = 86_400_000u64;
        // 2024-01-31 12:00 China time, then 2024-02-01.
        let jan31 =
            (crate::engine::route::days_from_civil(2024, 1, 31) as u64) * day_ms + 4 * 3_600_000;
        let at = |ms| LocalTime::at(ms, 480);
        b.add_volume(id("A"), Product::Payout, at(jan31), 100);
        b.add_volume(id("A"), Product::Payout, at(jan31), 50);
        let v = b.volumes_snapshot(&t, jan31)[0];
        assert_eq!((v.day_fen, v.day_count, v.month_fen), (150, 2, 150));
        assert_eq!(
            b.month_volume(&id("A"), Product::Payout, at(jan31).month()),
            150
        );
        let feb1 = jan31 + day_ms;
        assert_eq!(
            b.volumes_snapshot(&t, feb1)[0].month_fen,
            0,
            "new month reads zero"
        );
        b.add_volume(id("A"), Product::Payout, at(feb1), 7);
        let v = b.volumes_snapshot(&t, feb1)[0];
        assert_eq!((v.day_fen, v.day_count, v.month_fen), (7, 1, 7));
    }
}
