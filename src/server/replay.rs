//! Replay protection for lender requests: a timestamp window and request ids remembered
//! per merchant number for twice that window (protocol/SPEC.md §8). Pure: the caller
//! passes the clock.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use dashmap::DashMap;

use crate::message::Reason;
use crate::wire::header::MerchantNo;

#[derive(Default)]
struct Seen {
    ids: HashSet<u64>,
    expiry: VecDeque<(u64, u64)>,
}

/// Remembers request ids per merchant.
pub struct ReplayGuard {
    window_ms: u64,
    ids_max: usize,
    seen: DashMap<MerchantNo, Mutex<Seen>>,
}

impl ReplayGuard {
    /// A guard with a ± `window_ms` timestamp window remembering at most `ids_max` ids per
    /// merchant (ids are kept for 2 × window; beyond the bound requests are refused as
    /// OVERLOADED rather than forgetting ids early, which would open a replay hole).
    pub fn new(window_ms: u64, ids_max: usize) -> ReplayGuard {
        ReplayGuard {
            window_ms,
            ids_max,
            seen: DashMap::new(),
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
        let entry = self.seen.entry(*merchant).or_default();
        let mut s = entry.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(&(exp, id)) = s.expiry.front() {
            if exp > now_ms {
                break;
            }
            s.expiry.pop_front();
            s.ids.remove(&id);
        }
        if s.ids.contains(&request_id) {
            return Err(Reason::DUPLICATE_REQUEST_ID);
        }
        if s.ids.len() >= self.ids_max {
            return Err(Reason::OVERLOADED);
        }
        s.ids.insert(request_id);
        s.expiry
            .push_back((now_ms + 2 * self.window_ms, request_id));
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
        // After 2 × window the first ids are forgotten (their timestamps are stale by then).
        assert_eq!(g.check(&m, 1, 12_600, 12_600), Ok(()));
    }
}
