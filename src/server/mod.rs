//! The lender-facing TCP server: an accept loop bounded by a connection limit, and one
//! [`session`] per connection.

pub mod hub;
pub mod replay;
pub mod session;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Switch;
use crate::metrics::Metrics;

/// Accept lender connections until `shutdown` fires. Past `connections_max` a new
/// connection is closed at once (and counted): overload is refused, not queued.
pub async fn serve(
    listener: TcpListener,
    sw: Arc<Switch>,
    connections_max: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(connections_max));
    let ids = AtomicU64::new(1);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            Metrics::inc(&sw.metrics.counters.connections_refused);
            tracing::warn!(%peer, "connection limit reached; refusing");
            drop(stream);
            continue;
        };
        Metrics::inc(&sw.metrics.counters.connections);
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let sw = sw.clone();
        let stop = shutdown.clone();
        tracker.spawn(async move {
            session::run(stream, sw, id, stop).await;
            drop(permit);
        });
    }
}
