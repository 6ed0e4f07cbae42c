//! Agreements: sluice's stable agreement id, mapped to one channel agreement number per
//! signed channel; card and ID numbers kept only as keyed hashes plus the last four digits.
//!
//! Concurrency note: both maps are `DashMap`s. The index entry for (merchant, card hash)
//! is inserted only after the agreement itself, so a reader that finds an id in the index
//! always finds the agreement. Guards are never held across `.await` (the engine is
//! synchronous).

use dashmap::DashMap;
use ring::hmac;

use crate::channel::message::AgreementNo;
use crate::message::{AgreementId, AgreementState, BankCode, CardType, ChannelId};
use crate::wire::field::Digits;
use crate::wire::header::MerchantNo;

/// A `DashMap` with the Fx hasher, for keys no outsider chooses (ids sluice issues,
/// keyed hashes, channel agreement numbers): SipHash's flooding resistance buys nothing
/// there and costs a large share of a lookup (`benches/engine.rs`, recovery profile).
pub type FxDashMap<K, V> = DashMap<K, V, rustc_hash::FxBuildHasher>;

/// A keyed hash of a card or ID number: HMAC-SHA256 under the server's PII secret,
/// truncated to 128 bits (collision-resistant for any realistic card population, and not
/// reversible without the secret, unlike a plain hash of a 19-digit number).
pub type PiiHash = [u8; 16];

/// Hashes personal numbers with the server's secret.
pub struct PiiHasher {
    key: hmac::Key,
}

impl std::fmt::Debug for PiiHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PiiHasher(..)")
    }
}

impl PiiHasher {
    /// A hasher keyed with `secret` (≥ 32 bytes; from the server's secret file).
    pub fn new(secret: &[u8]) -> PiiHasher {
        PiiHasher {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// Hash of a card number. The domain tag keeps card and ID hashes apart.
    pub fn card(&self, card_no: &str) -> PiiHash {
        self.hash(b"card:", card_no)
    }

    /// Hash of an ID number.
    pub fn id(&self, id_no: &str) -> PiiHash {
        self.hash(b"id:", id_no)
    }

    fn hash(&self, tag: &[u8], v: &str) -> PiiHash {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(tag);
        ctx.update(v.as_bytes());
        let t = ctx.sign();
        let mut out = [0u8; 16];
        out.copy_from_slice(&t.as_ref()[..16]);
        out
    }
}

/// Status of one channel agreement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelAgreementState {
    /// Usable for debits.
    Active,
    /// Cancelled by the merchant (unsigned at the channel).
    Cancelled,
    /// Revoked by the card holder at the bank.
    Revoked,
}

/// The agreement with one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelAgreement {
    /// The channel.
    pub channel: ChannelId,
    /// The channel's agreement number (协议号).
    pub agreement_no: AgreementNo,
    /// Its state.
    pub state: ChannelAgreementState,
}

/// Most channels one agreement can be signed on (primary and backup, plus one spare
/// during a migration); fixed so an agreement needs no heap allocation.
pub const CHANNELS_PER_AGREEMENT_MAX: usize = 3;

/// One agreement, as sluice keeps it. No clear card or ID number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// sluice's agreement id (what the lender uses).
    pub id: AgreementId,
    /// The merchant that signed it.
    pub merchant: MerchantNo,
    /// Keyed hash of the card number.
    pub card_hash: PiiHash,
    /// Keyed hash of the ID number.
    pub id_hash: PiiHash,
    /// Last four digits of the card, for operators and the lender.
    pub card_last4: Digits<4>,
    /// Card's bank.
    pub bank: BankCode,
    /// Card type.
    pub card_type: CardType,
    /// Set when the merchant cancelled it.
    pub cancelled: bool,
    /// Channel agreements, primary first.
    pub channels: [Option<ChannelAgreement>; CHANNELS_PER_AGREEMENT_MAX],
}

impl Agreement {
    /// State as the lender sees it.
    pub fn state(&self) -> AgreementState {
        if self.cancelled {
            AgreementState::Cancelled
        } else if self.active_channels().next().is_some() {
            AgreementState::Active
        } else {
            AgreementState::Revoked
        }
    }

    /// Channel agreements usable for debits, primary first.
    pub fn active_channels(&self) -> impl Iterator<Item = &ChannelAgreement> {
        self.channels
            .iter()
            .flatten()
            .filter(|c| c.state == ChannelAgreementState::Active)
    }

    /// The channel agreement on `channel`, if any.
    pub fn on_channel(&self, channel: &ChannelId) -> Option<&ChannelAgreement> {
        self.channels
            .iter()
            .flatten()
            .find(|c| &c.channel == channel)
    }

    /// Add or reactivate the agreement on a channel. Returns false when all slots are used.
    pub fn add_channel(&mut self, ca: ChannelAgreement) -> bool {
        for slot in self.channels.iter_mut() {
            match slot {
                Some(c) if c.channel == ca.channel => {
                    *c = ca;
                    return true;
                }
                None => {
                    *slot = Some(ca);
                    return true;
                }
                _ => {}
            }
        }
        false
    }
}

/// All agreements, by id, with the index by (merchant, card hash) and by channel
/// agreement number (for bank-side revocation notices).
#[derive(Default)]
pub struct AgreementStore {
    by_id: FxDashMap<AgreementId, Agreement>,
    by_card: FxDashMap<(MerchantNo, PiiHash), AgreementId>,
    by_channel_no: FxDashMap<(ChannelId, AgreementNo), AgreementId>,
}

impl AgreementStore {
    /// An empty store.
    pub fn new() -> AgreementStore {
        AgreementStore::default()
    }

    /// Number of agreements.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// A copy of an agreement.
    pub fn get(&self, id: AgreementId) -> Option<Agreement> {
        self.by_id.get(&id).map(|a| a.clone())
    }

    /// The agreement of this merchant for this card, if any.
    pub fn find_by_card(&self, merchant: &MerchantNo, card_hash: &PiiHash) -> Option<AgreementId> {
        self.by_card.get(&(*merchant, *card_hash)).map(|v| *v)
    }

    /// The agreement behind a channel agreement number.
    pub fn find_by_channel_no(&self, channel: &ChannelId, no: &AgreementNo) -> Option<AgreementId> {
        self.by_channel_no.get(&(*channel, *no)).map(|v| *v)
    }

    /// Insert a new agreement or merge the channel agreements into the existing one for the
    /// same (merchant, card). Returns the agreement's id.
    pub fn upsert(&self, a: Agreement) -> AgreementId {
        let key = (a.merchant, a.card_hash);
        if let Some(existing) = self.find_by_card(&a.merchant, &a.card_hash) {
            if let Some(mut cur) = self.by_id.get_mut(&existing) {
                for ca in a.channels.iter().flatten() {
                    cur.add_channel(*ca);
                    self.by_channel_no
                        .insert((ca.channel, ca.agreement_no), existing);
                }
                cur.cancelled = false;
                return existing;
            }
        }
        let id = a.id;
        for ca in a.channels.iter().flatten() {
            self.by_channel_no.insert((ca.channel, ca.agreement_no), id);
        }
        self.by_id.insert(id, a);
        self.by_card.insert(key, id);
        id
    }

    /// Visit every agreement (journal snapshots). Holds one shard's read lock at a time;
    /// `f` must not touch the store.
    pub fn for_each(&self, mut f: impl FnMut(&Agreement)) {
        for a in self.by_id.iter() {
            f(a.value());
        }
    }

    /// Change an agreement in place under its shard lock.
    pub fn update<R>(&self, id: AgreementId, f: impl FnOnce(&mut Agreement) -> R) -> Option<R> {
        self.by_id.get_mut(&id).map(|mut a| f(&mut a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agreement(id: u64, card: &str, ch: &str, no: &str) -> Agreement {
        let h = PiiHasher::new(&[9u8; 32]);
        let mut a = Agreement {
            id: AgreementId(id),
            merchant: MerchantNo::new("M1").unwrap(),
            card_hash: h.card(card),
            id_hash: h.id("11010519491231002X"),
            card_last4: Digits::new(&card[card.len() - 4..]).unwrap(),
            bank: BankCode::new("ICBC").unwrap(),
            card_type: CardType::Debit,
            cancelled: false,
            channels: [None; CHANNELS_PER_AGREEMENT_MAX],
        };
        a.add_channel(ChannelAgreement {
            channel: ChannelId::new(ch).unwrap(),
            agreement_no: AgreementNo::new(no).unwrap(),
            state: ChannelAgreementState::Active,
        });
        a
    }

    #[test]
    fn keyed_hash_depends_on_secret_and_domain() {
        let a = PiiHasher::new(&[1u8; 32]);
        let b = PiiHasher::new(&[2u8; 32]);
        assert_ne!(a.card("6222021234567890128"), b.card("6222021234567890128"));
        assert_ne!(a.card("123"), a.id("123"));
        assert_eq!(a.card("6222021234567890128"), a.card("6222021234567890128"));
    }

    #[test]
    fn same_card_merges_into_one_agreement_with_backup_channel() {
        let s = AgreementStore::new();
        let id = s.upsert(agreement(1, "6222021234567890128", "CHA", "A-1"));
        let id2 = s.upsert(agreement(2, "6222021234567890128", "CHB", "B-1"));
        assert_eq!(id, id2);
        let a = s.get(id).unwrap();
        assert_eq!(a.active_channels().count(), 2);
        assert_eq!(
            s.find_by_channel_no(
                &ChannelId::new("CHB").unwrap(),
                &AgreementNo::new("B-1").unwrap()
            ),
            Some(id)
        );
        s.update(id, |a| {
            for c in a.channels.iter_mut().flatten() {
                c.state = ChannelAgreementState::Revoked;
            }
        });
        assert_eq!(s.get(id).unwrap().state(), AgreementState::Revoked);
    }
}
