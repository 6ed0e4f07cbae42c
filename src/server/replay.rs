//! Replay protection for lender requests: a timestamp window and request ids remembered
//! per merchant number for twice that window (protocol/SPEC.md §8). Pure: the caller
//! passes the clock.
//!
//! Every lender request passes here, so the common case is one map read, one mutex and
//! one hash-set insert: the per-merchant entry is looked up under the map's read lock
//! (created once, under the write lock), and a new id costs a single keyed hash (`insert`
//! answers whether it was there). Request ids are chosen by the lender, so the id sets
//! use a randomly seeded hash (foldhash), not the unseeded FxHash the switch uses for
//! its own ids; merchant numbers reach this point only once their MAC has verified, so
//! that map's keys are the configured merchants.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use crate::engine::agreement::FxDashMap;
use crate::message::Reason;
use crate::wire::header::MerchantNo;

#[derive(Default)]
struct Seen {
    ids: HashSet<u64, foldhash::fast::RandomState>,
    /// (forget at, id), oldest first: ids are remembered in arrival order.
    expiry: VecDeque<(u64, u64)>,
}

/// Remembers request ids per merchant.
pub struct ReplayGuard {
    window_ms: u64,
    ids_max: usize,
    seen: FxDashMap<MerchantNo, Mutex<Seen>>,
}

impl ReplayGuard {
    /// A guard with a ± `window_ms` timestamp window remembering at most `ids_max` ids per
    /// merchant (ids are kept for 2 × window; beyond the bound requests are refused as
    /// OVERLOADED rather than forgetting ids early, which would open a replay hole).
    pub fn new(window_ms: u64, ids_max: usize) -> ReplayGuard {
        ReplayGuard {
            window_ms,
            ids_max,
            seen: FxDashMap::default(),
        }
    }

    /// Check and remember one request.
    pub fn check(
        &self,
        merchant: &MerchantNo,
        request_id: u64,
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), Reason> {
        if timestamp_ms.abs_diff(now_ms) > self.window_ms {
            return Err(Reason::STALE_TIMESTAMP);
        }
        match self.seen.get(merchant) {
            Some(seen) => self.remember(&seen, request_id, now_ms),
            None => {
                let seen = self.seen.entry(*merchant).or_default();
                self.remember(&seen, request_id, now_ms)
            }
        }
    }

    fn remember(&self, seen: &Mutex<Seen>, request_id: u64, now_ms: u64) -> Result<(), Reason> {
        let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
        let Seen { ids, expiry } = &mut *s;
        while let Some(&(exp, id)) = expiry.front() {
            if exp > now_ms {
                break;
            }
            expiry.pop_front();
            ids.remove(&id);
        }
        if ids.len() >= self.ids_max {
            // Full: a repeat is still told apart from a new id.
            return Err(if ids.contains(&request_id) {
                Reason::DUPLICATE_REQUEST_ID
            } else {
                Reason::OVERLOADED
            });
        }
        if !ids.insert(request_id) {
            return Err(Reason::DUPLICATE_REQUEST_ID);
        }
        expiry.push_back((now_ms + 2 * self.window_ms, request_id));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_reuse_and_expiry() {
        let g = ReplayGuard::new(1000, 3);
        let m = MerchantNo::new("M").unwrap();
        assert_eq!(g.check(&m, 1, 10_000, 11_001), Err(Reason::STALE_TIMESTAMP));
        assert_eq!(g.check(&m, 1, 10_000, 10_500), Ok(()));
        assert_eq!(
            g.check(&m, 1, 10_000, 10_600),
            Err(Reason::DUPLICATE_REQUEST_ID)
        );
        let other = MerchantNo::new("N").unwrap();
        assert_eq!(g.check(&other, 1, 10_000, 10_600), Ok(()));
        assert_eq!(g.check(&m, 2, 10_000, 10_600), Ok(()));
        assert_eq!(g.check(&m, 3, 10_000, 10_600), Ok(()));
        assert_eq!(g.check(&m, 4, 10_000, 10_600), Err(Reason::OVERLOADED));
        // Full, a repeat is still a repeat.
        assert_eq!(
            g.check(&m, 3, 10_000, 10_600),
            Err(Reason::DUPLICATE_REQUEST_ID)
        );
        // After 2 × window the first ids are forgotten (their timestamps are stale by then).
        assert_eq!(g.check(&m, 1, 12_600, 12_600), Ok(()));
    }
}
