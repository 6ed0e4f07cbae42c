//! Write coalescing for the socket writers (lender sessions, channel connections).
//!
//! A writer already writes everything queued at once, but under load requests finish one
//! at a time, so its queue mostly held one frame: one `writev` per answer (BENCHMARKS.md,
//! sixth session). More frames are usually one scheduler turn away (requests finishing
//! on the other worker right now), so a writer waits that one turn before it writes.

use tokio::sync::mpsc;

/// Gives the scheduler one turn, then takes what arrived on `rx` meanwhile, if anything.
/// When nothing else is runnable the turn comes straight back.
pub(crate) async fn next_after_one_turn<T>(rx: &mut mpsc::Receiver<T>) -> Option<T> {
    tokio::task::yield_now().await;
    rx.try_recv().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn takes_a_frame_queued_by_a_task_that_ran_during_the_turn() {
        let (tx, mut rx) = mpsc::channel::<u32>(4);
        // Runnable, not yet run: it can only send during the writer's turn.
        let sender = tokio::spawn(async move { tx.send(7).await.unwrap() });
        assert_eq!(rx.try_recv().ok(), None);
        assert_eq!(next_after_one_turn(&mut rx).await, Some(7));
        sender.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn comes_back_empty_when_nothing_else_runs() {
        let (_tx, mut rx) = mpsc::channel::<u32>(4);
        assert_eq!(next_after_one_turn(&mut rx).await, None);
    }
}
