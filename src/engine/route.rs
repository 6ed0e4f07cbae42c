//! Routing: a pure function from (instruction, channel table, which channels are up) to
//! an ordered list of candidate channels and, for every other channel, why it was
//! excluded.
//!
//! This is the simplest rule (issue 4): channels in configured priority order that are
//! enabled, up, offer the product, support the bank and card type, and — for debits —
//! hold an active agreement for the card. Health scores, limits, fees and windows come
//! with the full router behind this same interface.

use crate::message::{BankCode, CardType, ChannelId};

use super::agreement::{Agreement, ChannelAgreementState};

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

/// One channel as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelConfig {
    /// Channel id (as used in responses and logs).
    pub id: ChannelId,
    /// Operator switch: a disabled channel gets no new instructions.
    pub enabled: bool,
    /// Products offered.
    pub products: Vec<Product>,
    /// Banks supported; empty means every bank.
    pub banks: Vec<BankCode>,
    /// Card types supported.
    pub card_types: Vec<CardType>,
}

impl ChannelConfig {
    /// A channel offering every product for every bank and card type.
    pub fn open(id: &str) -> ChannelConfig {
        ChannelConfig {
            id: ChannelId::new(id).expect("channel id fits"),
            enabled: true,
            products: vec![Product::Debit, Product::Payout, Product::Sign],
            banks: vec![],
            card_types: vec![CardType::Debit, CardType::Credit],
        }
    }

    fn supports(&self, bank: &BankCode, card_type: CardType) -> bool {
        (self.banks.is_empty() || self.banks.contains(bank)) && self.card_types.contains(&card_type)
    }
}

/// The channel table, in priority order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelTable {
    /// Channels, highest priority first.
    pub channels: Vec<ChannelConfig>,
}

/// Why a channel is not a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exclusion {
    /// Disabled by configuration or operator.
    Disabled,
    /// No logged-on connection.
    Down,
    /// Does not offer this product.
    ProductUnsupported,
    /// Does not support the card's bank or card type.
    BankUnsupported,
    /// The agreement has no active channel agreement there.
    NoAgreement,
}

/// The router's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Channels to try, in order.
    pub candidates: Vec<ChannelId>,
    /// Every other channel and why.
    pub excluded: Vec<(ChannelId, Exclusion)>,
}

fn decide(
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

/// Candidates for a debit under `agreement`: channels where it is actively signed,
/// primary first (agreement order), then table order.
pub fn route_debit(
    table: &ChannelTable,
    agreement: &Agreement,
    up: impl Fn(&ChannelId) -> bool,
) -> Decision {
    let mut d = decide(table, Product::Debit, up, |c| {
        match agreement.on_channel(&c.id) {
            Some(ca) if ca.state == ChannelAgreementState::Active => None,
            _ => Some(Exclusion::NoAgreement),
        }
    });
    // Agreement order (primary, then backup) takes precedence: the agreement's channel
    // stays sticky.
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

/// Candidates for an instruction that names a card (payout, signing).
pub fn route_card(
    table: &ChannelTable,
    product: Product,
    bank: &BankCode,
    card_type: CardType,
    up: impl Fn(&ChannelId) -> bool,
) -> Decision {
    decide(table, product, up, |c| {
        (!c.supports(bank, card_type)).then_some(Exclusion::BankUnsupported)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions_are_explained() {
        let mut a = ChannelConfig::open("A");
        a.enabled = false;
        let mut b = ChannelConfig::open("B");
        b.banks = vec![BankCode::new("CMB").unwrap()];
        let mut c = ChannelConfig::open("C");
        c.products = vec![Product::Debit];
        let d = ChannelConfig::open("D");
        let e = ChannelConfig::open("E");
        let t = ChannelTable {
            channels: vec![a, b, c, d, e],
        };
        let dec = route_card(
            &t,
            Product::Payout,
            &BankCode::new("ICBC").unwrap(),
            CardType::Debit,
            |id| id.as_str() != "E",
        );
        assert_eq!(dec.candidates, vec![ChannelId::new("D").unwrap()]);
        let why: Vec<_> = dec
            .excluded
            .iter()
            .map(|(c, e)| (c.as_str().to_string(), *e))
            .collect();
        assert_eq!(
            why,
            vec![
                ("A".into(), Exclusion::Disabled),
                ("B".into(), Exclusion::BankUnsupported),
                ("C".into(), Exclusion::ProductUnsupported),
                ("E".into(), Exclusion::Down),
            ]
        );
    }
}
