//! `sluice::client::Client` lifecycle, found by the chaos runner: clients of one merchant
//! created back to back must all log on (request ids come from one process-wide counter),
//! and a dropped client must close its connection, so that the switch delivers
//! notifications to a client somebody still reads.

mod common;

use std::time::Duration;

use common::*;
use sluice::message::Status;

fn limit<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(Duration::from_secs(60), f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_created_in_the_same_millisecond_all_log_on() {
    limit(async {
        let bed = Bed::start().await;
        // Connect several at once: with a per-client counter seeded from the clock in
        // milliseconds, clients of the same millisecond reused each other's request ids
        // and all but the first logon were refused DUPLICATE_REQUEST_ID.
        let clients =
            futures::future::join_all((0..8).map(|_| bed.client_as(MERCHANT, &SECRET, true))).await;
        assert_eq!(clients.len(), 8);
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_closes_and_notifications_reach_the_live_one() {
    limit(async {
        let bed = Bed::start().await;
        // The first logged-on connection is the one the switch notifies first; drop it.
        let first = bed.client().await;
        let agreement = bed.sign(&first, CARD, PHONE).await;
        drop(first);
        let live = bed.client().await;
        // Give the switch a moment to see the close (bounded polling below anyway).
        let mut notified = None;
        for i in 0..20 {
            let r = live
                .call(debit(&format!("D-drop-{i}"), agreement, 100 + i))
                .await
                .unwrap();
            assert_eq!(status(&r), Status::Success, "{r:?}");
            if let Some(n) = live.next_notification(Duration::from_millis(500)).await {
                notified = Some(n);
                break;
            }
        }
        let n = notified.expect("the live client receives the notifications");
        assert!(n.order_id.as_str().starts_with("D-drop-"));
    })
    .await
    .expect("bounded");
}
