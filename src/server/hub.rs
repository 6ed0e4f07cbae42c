//! Which lender connections can take notifications for which merchant number.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::mpsc;

use crate::crypto::MacKey;
use crate::engine::Notification;
use crate::message::{Envelope, Message, Outgoing};
use crate::wire::header::MerchantNo;

use super::session::WriteItem;

/// A logged-on connection's write queue and the key it logged on with.
#[derive(Clone)]
pub struct Link {
    /// Session id.
    pub session: u64,
    /// The connection's writer queue.
    pub tx: mpsc::Sender<WriteItem>,
    /// Key id of the logon.
    pub key_id: u16,
    /// Key of the logon (signs switch-initiated frames).
    pub key: Arc<MacKey>,
}

/// Merchant number → logged-on connections.
#[derive(Default)]
pub struct Hub {
    links: DashMap<MerchantNo, Vec<Link>>,
    seq: std::sync::atomic::AtomicU64,
}

impl Hub {
    /// Register a logon.
    pub fn register(&self, merchant: MerchantNo, link: Link) {
        let mut v = self.links.entry(merchant).or_default();
        v.retain(|l| l.session != link.session);
        v.push(link);
    }

    /// Logged-on sessions now (a session logged on for several merchants counts once).
    pub fn sessions(&self) -> usize {
        let mut ids: Vec<u64> = self
            .links
            .iter()
            .flat_map(|e| e.value().iter().map(|l| l.session).collect::<Vec<_>>())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// Forget a session for one merchant (logoff) or all (`None`, connection closed).
    pub fn unregister(&self, session: u64, merchant: Option<&MerchantNo>) {
        match merchant {
            Some(m) => {
                if let Some(mut v) = self.links.get_mut(m) {
                    v.retain(|l| l.session != session);
                }
            }
            None => {
                for mut v in self.links.iter_mut() {
                    v.retain(|l| l.session != session);
                }
            }
        }
        self.links.retain(|_, v| !v.is_empty());
    }

    /// Queue a notification on one connection of its merchant, without waiting. Returns
    /// false when none could take it now (it stays in the engine's outbox and is re-sent).
    pub fn deliver(&self, n: &Notification, now_ms: u64) -> bool {
        let Some(links) = self.links.get(&n.merchant).map(|v| v.clone()) else {
            return false;
        };
        let request_id = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) | 1 << 63;
        for l in links {
            let item = WriteItem::frame(Outgoing {
                env: Envelope {
                    request_id,
                    timestamp_ms: now_ms,
                    key_id: l.key_id,
                    merchant: n.merchant,
                    flags: 0,
                },
                msg: Message::Notify(n.msg.clone()),
                key: Some(l.key.clone()),
            });
            if l.tx.try_send(item).is_ok() {
                return true;
            }
        }
        false
    }
}
