//! The payment paths end to end through real TCP: lender client → switch → simulated
//! channels. Money-safety claims are checked against the simulators' ledgers (the
//! oracle), not against the switch's own records.

mod common;

use std::time::Duration;

use common::*;
use sluice::message::{self as lm, Message, Reason, Status};
use sluice::sim::{EntryState, Latency};

const WAIT: Duration = Duration::from_secs(10);

fn limit<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(Duration::from_secs(60), f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_debit_notify() {
    limit(async {
        let bed = Bed::start().await;
        let c = bed.client().await;
        let agreement = bed.sign(&c, CARD, PHONE).await;
        assert_ne!(agreement, 0);

        let r = c.call(debit("D-1", agreement, 12_345)).await.unwrap();
        let Message::DebitRsp(d) = &r.msg else {
            panic!("{r:?}")
        };
        assert_eq!(d.result.status, Status::Success, "{d:?}");
        assert_eq!(d.channel.as_str(), "CHA");

        let n = c.next_notification(WAIT).await.expect("one notification");
        assert_eq!(n.order_id.as_str(), "D-1");
        assert_eq!(n.result.status, Status::Success);
        assert_eq!(n.amount, 12_345);
        assert!(
            c.next_notification(Duration::from_millis(1500))
                .await
                .is_none(),
            "exactly one notification"
        );

        let ledger = bed.ledger();
        assert_eq!(ledger.len(), 1);
        assert_eq!(ledger[0].0, "CHA");
        assert_eq!(ledger[0].1.amount_fen, 12_345);
        assert!(matches!(
            ledger[0].1.state,
            EntryState::Final {
                code: sluice::channel::Code::OK,
                ..
            }
        ));
        assert_eq!(bed.duplicates(), 0);

        let q = c
            .call(lm::OrderQueryReq {
                order_id: lm::OrderId::new("D-1").unwrap(),
            })
            .await
            .unwrap();
        let Message::OrderQueryRsp(q) = q.msg else {
            panic!()
        };
        assert_eq!(
            (q.result.status, q.amount, q.attempts),
            (Status::Success, 12_345, 1)
        );
        bed.switch.shutdown(Duration::from_secs(2)).await;
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payout_pays_the_card_once() {
    limit(async {
        let bed = Bed::start().await;
        let c = bed.client().await;
        let req = lm::PayoutReq {
            order_id: lm::OrderId::new("P-1").unwrap(),
            amount: lm::Fen(500_000),
            currency: lm::Currency,
            card_type: lm::CardType::Debit,
            bank_code: lm::BankCode::new("ICBC").unwrap(),
            card_no: lm::CardNo::new(CARD).unwrap(),
            name: lm::Name::new("李四").unwrap(),
            purpose: lm::Purpose::new("借款发放").unwrap(),
        };
        let before = bed.sim("CHA").payout_balance_fen();
        let r = c.call(req.clone()).await.unwrap();
        assert_eq!(status(&r), Status::Success, "{r:?}");
        let again = c.call(req).await.unwrap();
        assert_eq!(result(&again).reason, Reason::DUPLICATE_ORDER);
        assert_eq!(status(&again), Status::Success);
        assert_eq!(bed.ledger().len(), 1);
        assert_eq!(bed.sim("CHA").payout_balance_fen(), before - 500_000);
        let n = c.next_notification(WAIT).await.unwrap();
        assert_eq!(n.order_type, lm::OrderType::Payout as u8);
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_sign_returns_the_existing_agreement_without_sms() {
    limit(async {
        let bed = Bed::start().await;
        let c = bed.client().await;
        let first = bed.sign(&c, CARD, PHONE).await;
        let sms = bed.sms_count();
        let r = c.call(prebind(CARD, PHONE)).await.unwrap();
        let Message::PreBindRsp(p) = r.msg else {
            panic!()
        };
        assert_eq!(
            (p.result.status, p.result.reason),
            (Status::Success, Reason::ALREADY_SIGNED)
        );
        assert_eq!(p.agreement_id, first);
        assert_eq!(bed.sms_count(), sms, "no SMS on re-sign");
        let q = c
            .call(lm::AgreementQueryReq {
                agreement_id: lm::AgreementId(first),
            })
            .await
            .unwrap();
        let Message::AgreementQueryRsp(q) = q.msg else {
            panic!()
        };
        assert_eq!(q.state, lm::AgreementState::Active as u8);
        assert_eq!(q.card_last4.as_str(), "0128");
        assert_eq!(q.primary_channel.as_str(), "CHA");
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_and_pay_signs_then_debits_once() {
    limit(async {
        let bed = Bed::start().await;
        let c = bed.client().await;
        let req = lm::SignAndPayReq {
            user_id: lm::UserId::new("U9").unwrap(),
            card_type: lm::CardType::Debit,
            bank_code: lm::BankCode::new("ICBC").unwrap(),
            card_no: lm::CardNo::new(CARD).unwrap(),
            id_no: lm::IdNo::new(ID_NO).unwrap(),
            name: lm::Name::new("张三").unwrap(),
            phone: lm::Phone::new(PHONE).unwrap(),
            order_id: lm::OrderId::new("SP-1").unwrap(),
            amount: lm::Fen(777),
            currency: lm::Currency,
            purpose: lm::Purpose::new("首期").unwrap(),
        };
        let r = c.call(req.clone()).await.unwrap();
        let Message::SignAndPayRsp(s) = r.msg else {
            panic!()
        };
        assert_eq!(s.result.status, Status::Pending, "{s:?}");
        let code = bed.sms_code(PHONE).await;
        let b = common::bind_confirm(&c, s.bind_ref, &code).await;
        assert_eq!(b.result.status, Status::Success);
        let n = c.next_notification(WAIT).await.expect("debit notified");
        assert_eq!(
            (n.order_id.as_str(), n.amount, n.result.status),
            ("SP-1", 777, Status::Success)
        );
        assert_eq!(n.agreement_id, b.agreement_id);
        assert!(
            c.next_unmatched(Duration::from_millis(500)).await.is_none(),
            "the confirm is answered once; the debit only by notification"
        );
        // Sign-and-pay again for the signed card: ALREADY_SIGNED semantics via the order id.
        let again = c.call(req).await.unwrap();
        assert_eq!(result(&again).reason, Reason::DUPLICATE_ORDER);
        assert_eq!(bed.ledger().len(), 1);
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_bank_revocation_stop_debits() {
    limit(async {
        let bed = Bed::start().await;
        let c = bed.client().await;
        let a1 = bed.sign(&c, CARD, PHONE).await;
        let r = c
            .call(lm::AgreementCancelReq {
                agreement_id: lm::AgreementId(a1),
            })
            .await
            .unwrap();
        assert_eq!(status(&r), Status::Success);
        let r = c.call(debit("C-1", a1, 100)).await.unwrap();
        assert_eq!(result(&r).reason, Reason::AGREEMENT_REVOKED);

        let card2 = card(42);
        let a2 = bed.sign(&c, &card2, "13900000000").await;
        let no = bed
            .switch
            .switch
            .engine
            .agreements()
            .get(lm::AgreementId(a2))
            .unwrap()
            .active_channels()
            .next()
            .unwrap()
            .agreement_no;
        assert!(
            bed.sim("CHA").revoke(no.as_str()),
            "simulator revokes at the bank"
        );
        let n = c
            .next_notification(WAIT)
            .await
            .expect("revocation notified");
        assert_eq!(n.kind, lm::NotifyKind::AgreementRevoked);
        assert_eq!(n.agreement_id, a2);
        let r = c.call(debit("C-2", a2, 100)).await.unwrap();
        assert_eq!(result(&r).reason, Reason::AGREEMENT_REVOKED);
        assert!(bed.ledger().is_empty(), "no debit reached a channel");
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_debit_never_reaches_the_channel_twice() {
    limit(async {
        let bed = Bed::start().await;
        let c = bed.client().await;
        let a = bed.sign(&c, CARD, PHONE).await;
        bed.set_profile("CHA", |p| p.latency = Latency::Fixed { ms: 300.0 });
        // Twice while in flight, on two connections, then once after final.
        let c2 = bed.client().await;
        let (r1, r2) = tokio::join!(c.call(debit("R-1", a, 900)), c2.call(debit("R-1", a, 900)));
        let (r1, r2) = (r1.unwrap(), r2.unwrap());
        // One of them executes; the other is told the original's durable state
        // (DUPLICATE_ORDER) or, if it raced the acceptance's journal write, BUSY. Never a
        // second execution either way.
        let reasons = [result(&r1).reason, result(&r2).reason];
        assert!(
            reasons.contains(&Reason::DUPLICATE_ORDER) || reasons.contains(&Reason::OVERLOADED),
            "{reasons:?}"
        );
        let again = c2.call(debit("R-1", a, 900)).await.unwrap();
        assert_eq!(result(&again).reason, Reason::DUPLICATE_ORDER);
        let after = c.call(debit("R-1", a, 900)).await.unwrap();
        assert_eq!(
            (status(&after), result(&after).reason),
            (Status::Success, Reason::DUPLICATE_ORDER)
        );
        let conflict = c.call(debit("R-1", a, 901)).await.unwrap();
        assert_eq!(result(&conflict).reason, Reason::ORDER_CONFLICT);
        let ledger = bed.ledger();
        assert_eq!(ledger.len(), 1, "{ledger:?}");
        assert_eq!(bed.duplicates(), 0);
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_goes_pending_then_query_settles_with_one_notification() {
    limit(async {
        let bed = Bed::start_with(BedConfig {
            deadline: Duration::from_millis(300),
            ..BedConfig::default()
        })
        .await;
        let c = bed.client().await;
        let a = bed.sign(&c, CARD, PHONE).await;
        bed.set_profile("CHA", |p| p.latency = Latency::Fixed { ms: 2000.0 });
        let r = c.call(debit("T-1", a, 4_200)).await.unwrap();
        assert_eq!(
            (status(&r), result(&r).reason),
            (Status::Pending, Reason::OUTCOME_UNKNOWN),
            "{r:?}"
        );
        assert_eq!(result(&r).status, Status::Pending);
        bed.set_profile("CHA", |p| p.latency = Latency::Fixed { ms: 0.0 });
        let n = c
            .next_notification(WAIT)
            .await
            .expect("final result notified");
        assert_eq!(
            (n.order_id.as_str(), n.result.status),
            ("T-1", Status::Success)
        );
        assert!(
            c.next_notification(Duration::from_secs(2)).await.is_none(),
            "one notification only"
        );
        let ledger = bed.ledger();
        assert_eq!(ledger.len(), 1, "executed once, on CHA only: {ledger:?}");
        assert_eq!(ledger[0].0, "CHA");
        assert_eq!(bed.duplicates(), 0);
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_channel_notifications_give_one_lender_notification() {
    limit(async {
        let bed = Bed::start().await;
        let c = bed.client().await;
        let a = bed.sign(&c, CARD, PHONE).await;
        bed.set_profile("CHA", |p| {
            p.async_ratio = 1.0;
            p.async_delay_ms = 100;
            p.notify_copies = 4;
            p.notify_interval_ms = 50;
        });
        let r = c.call(debit("N-1", a, 1_000)).await.unwrap();
        assert_eq!(
            (status(&r), result(&r).reason),
            (Status::Pending, Reason::OK)
        );
        let n = c.next_notification(WAIT).await.expect("notified");
        assert_eq!(n.result.status, Status::Success);
        assert!(c
            .next_notification(Duration::from_millis(1500))
            .await
            .is_none());
        assert_eq!(bed.ledger().len(), 1);
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_processed_fails_over_to_the_backup_channel() {
    limit(async {
        let bed = Bed::start().await;
        let c = bed.client().await;
        let req = |id: &str| lm::PayoutReq {
            order_id: lm::OrderId::new(id).unwrap(),
            amount: lm::Fen(100),
            currency: lm::Currency,
            card_type: lm::CardType::Debit,
            bank_code: lm::BankCode::new("ICBC").unwrap(),
            card_no: lm::CardNo::new(CARD).unwrap(),
            name: lm::Name::new("李四").unwrap(),
            purpose: lm::Purpose::new("放款").unwrap(),
        };
        bed.set_profile("CHA", |p| p.not_processed_ratio = 1.0);
        let r = c.call(req("F-1")).await.unwrap();
        let Message::PayoutRsp(p) = &r.msg else {
            panic!()
        };
        assert_eq!(
            (p.result.status, p.channel.as_str()),
            (Status::Success, "CHB")
        );
        let ledger = bed.ledger();
        assert_eq!(ledger.len(), 1);
        assert_eq!(ledger[0].0, "CHB");
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_refusals_keep_the_session_usable() {
    limit(async {
        let bed = Bed::start().await;
        let c = bed.client().await;

        // Stale timestamp.
        let mut env = c.envelope();
        env.timestamp_ms -= 10 * 60 * 1000;
        let r = c
            .call_with(
                env,
                &lm::OrderQueryReq {
                    order_id: lm::OrderId::new("x").unwrap(),
                }
                .into(),
            )
            .await
            .unwrap();
        assert_eq!(result(&r).reason, Reason::STALE_TIMESTAMP);

        // Reused request id.
        let env = c.envelope();
        let q: Message = lm::OrderQueryReq {
            order_id: lm::OrderId::new("x").unwrap(),
        }
        .into();
        let r = c.call_with(env, &q).await.unwrap();
        assert_eq!(result(&r).reason, Reason::UNKNOWN_ORDER);
        let r = c.call_with(env, &q).await.unwrap();
        assert_eq!(result(&r).reason, Reason::DUPLICATE_REQUEST_ID);

        // Wrong merchant for the session: a frame MAC'd with the other merchant's key.
        c.add_key(OTHER_MERCHANT, 1, &OTHER_SECRET);
        let mut env = c.envelope();
        env.merchant = sluice::wire::header::MerchantNo::new(OTHER_MERCHANT).unwrap();
        let r = c.call_with(env, &q).await.unwrap();
        assert!(r.authenticated);
        assert_eq!(result(&r).reason, Reason::MERCHANT_NOT_ALLOWED);

        // Bad MAC.
        let env = c.envelope();
        let mut b = bytes::BytesMut::new();
        lm::encode(
            &env,
            &q,
            Some(&sluice::crypto::MacKey::new(&[1u8; 32])),
            &mut b,
        );
        let r = c.call_raw(env.request_id, b.freeze()).await.unwrap();
        assert!(matches!(r.msg, Message::Reject(_)));
        assert_eq!(result(&r).reason, Reason::BAD_MAC);

        // Malformed field (amount 0) with a good MAC: the response type, field 3.
        let env = c.envelope();
        let mut b = bytes::BytesMut::new();
        lm::encode(
            &env,
            &debit("M-1", 1, 5).into(),
            Some(&sluice::crypto::MacKey::new(&SECRET)),
            &mut b,
        );
        b[88..96].fill(0);
        let n = b.len();
        let mac = sluice::crypto::MacKey::new(&SECRET).sign(&b[..n - 32]);
        b[n - 32..].copy_from_slice(&mac);
        let r = c.call_raw(env.request_id, b.freeze()).await.unwrap();
        let Message::DebitRsp(d) = &r.msg else {
            panic!("{r:?}")
        };
        assert_eq!(
            (d.result.reason, d.result.field),
            (Reason::MALFORMED_FIELD, 3)
        );

        // Not logged on: a fresh connection that skips LOGON.
        let fresh = sluice::client::Client::connect(
            bed.switch.addr,
            sluice::client::ClientConfig {
                merchant: MERCHANT.into(),
                key_id: 1,
                secret: SECRET.to_vec(),
                auto_ack: true,
                timeout: Duration::from_secs(5),
            },
        )
        .await
        .unwrap();
        let r = fresh.call(q.clone()).await.unwrap();
        assert_eq!(result(&r).reason, Reason::NOT_LOGGED_ON);

        // And the first session still works.
        let r = c.call(lm::EchoReq { nonce: 5 }).await.unwrap();
        assert!(matches!(r.msg, Message::EchoRsp(lm::EchoRsp { nonce: 5 })));
        let m = &bed.switch.switch.metrics.counters;
        assert!(m.bad_mac.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_signing_gives_debits_a_second_channel() {
    limit(async {
        let bed = Bed::start().await;
        let c = bed.client().await;
        let a = bed.sign(&c, CARD, PHONE).await;
        // Backup signing of a card with no agreement is refused.
        let mut lone = prebind(&card(7), "13700000001");
        lone.mode = lm::BindMode::Backup;
        let r = c.call(lone).await.unwrap();
        assert_eq!(result(&r).reason, Reason::UNKNOWN_AGREEMENT);

        let mut req = prebind(CARD, PHONE);
        req.mode = lm::BindMode::Backup;
        let sms_before = bed.sim("CHB").outbox().len();
        let r = c.call(req).await.unwrap();
        let Message::PreBindRsp(p) = r.msg else {
            panic!("{r:?}")
        };
        assert_eq!(p.result.status, Status::Success, "{p:?}");
        assert_eq!(
            bed.sim("CHB").outbox().len(),
            sms_before + 1,
            "the backup SMS comes from CHB"
        );
        let code = bed.sim("CHB").outbox().last().unwrap().code.clone();
        let b = common::bind_confirm(&c, p.bind_ref, &code).await;
        assert_eq!(
            (b.result.status, b.agreement_id, b.channel.as_str()),
            (Status::Success, a, "CHB")
        );
        let q = c
            .call(lm::AgreementQueryReq {
                agreement_id: lm::AgreementId(a),
            })
            .await
            .unwrap();
        let Message::AgreementQueryRsp(q) = q.msg else {
            panic!()
        };
        assert_eq!(
            (q.primary_channel.as_str(), q.backup_channel.as_str()),
            ("CHA", "CHB")
        );

        // The primary answers "not processed": the debit moves to the backup, once.
        bed.set_profile("CHA", |p| p.not_processed_ratio = 1.0);
        let r = c.call(debit("BK-1", a, 321)).await.unwrap();
        let Message::DebitRsp(d) = &r.msg else {
            panic!()
        };
        assert_eq!(
            (d.result.status, d.channel.as_str()),
            (Status::Success, "CHB")
        );
        let ledger = bed.ledger();
        assert_eq!(ledger.len(), 1);
        assert_eq!(ledger[0].0, "CHB");
        assert_eq!(bed.duplicates(), 0);
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_answered_busy_at_once() {
    limit(async {
        let bed = Bed::start_with(BedConfig {
            inflight_max: 1,
            ..BedConfig::default()
        })
        .await;
        let c = bed.client().await;
        let a = bed.sign(&c, CARD, PHONE).await;
        bed.set_profile("CHA", |p| p.latency = Latency::Fixed { ms: 1500.0 });
        let slow = c.call(debit("B-1", a, 100));
        let fast = async {
            // Let the first request take the session's only in-flight slot.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t0 = std::time::Instant::now();
            let r = c.call(debit("B-2", a, 100)).await.unwrap();
            (r, t0.elapsed())
        };
        let (r1, (r2, waited)) = tokio::join!(slow, fast);
        assert_eq!(status(&r1.unwrap()), Status::Success);
        assert_eq!(
            (status(&r2), result(&r2).reason),
            (Status::Busy, Reason::OVERLOADED)
        );
        assert!(
            waited < Duration::from_millis(1000),
            "BUSY without waiting for the slot"
        );
        // Nothing was done for the BUSY order: the same id is accepted afterwards.
        bed.set_profile("CHA", |p| p.latency = Latency::Fixed { ms: 0.0 });
        let r = c.call(debit("B-2", a, 100)).await.unwrap();
        assert_eq!(
            (status(&r), result(&r).reason),
            (Status::Success, Reason::OK)
        );
        assert_eq!(bed.ledger().len(), 2);
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_three_heartbeats() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    limit(async {
        let bed = Bed::start().await;
        let mut s = tokio::net::TcpStream::connect(bed.switch.addr)
            .await
            .unwrap();
        let env = lm::Envelope {
            request_id: 1,
            timestamp_ms: sluice::app::now_ms(),
            key_id: 1,
            merchant: sluice::wire::header::MerchantNo::new(MERCHANT).unwrap(),
            flags: 0,
        };
        let mut b = bytes::BytesMut::new();
        let logon: Message = lm::LogonReq {
            heartbeat_s: 5,
            client_name: sluice::wire::field::Ascii::new("silent").unwrap(),
        }
        .into();
        lm::encode(
            &env,
            &logon,
            Some(&sluice::crypto::MacKey::new(&SECRET)),
            &mut b,
        );
        s.write_all(&b).await.unwrap();
        // Read everything the switch sends (LOGON_RSP, then ECHO_REQs it never gets
        // answers to) until it closes the connection.
        let t0 = std::time::Instant::now();
        let mut buf = vec![0u8; 4096];
        let mut got = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got += n,
                Err(_) => panic!("not closed within 30 s"),
            }
        }
        let idle = t0.elapsed();
        assert!(got > 0, "logon answered");
        assert!(
            idle >= Duration::from_secs(14) && idle < Duration::from_secs(25),
            "closed after ~3 x 5 s of silence, took {idle:?}"
        );
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_imports_stock_agreements_and_serves_metrics() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn http(addr: std::net::SocketAddr, req: String) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
    limit(async {
        let bed = Bed::start().await;
        let admin = bed.switch.admin_addr.expect("admin port");
        let no_token = http(admin, "GET /metrics HTTP/1.1\r\n\r\n".into()).await;
        assert!(no_token.starts_with("HTTP/1.1 401"), "{no_token}");

        // The simulator knows the card's channel agreement; sluice learns it by import.
        let c = bed.client().await;
        let signed = bed.sign(&c, &card(5), "13600000005").await;
        let no = bed
            .switch
            .switch
            .engine
            .agreements()
            .get(lm::AgreementId(signed))
            .unwrap()
            .active_channels()
            .next()
            .unwrap()
            .agreement_no;
        let stock = card(6);
        let csv = format!(
            "merchant,user_id,card_no,id_no,bank_code,card_type,channel,channel_agreement_no\n\
             {MERCHANT},U6,{stock},{ID_NO},ICBC,debit,CHA,{no}\n\
             {MERCHANT},U7,6222021234567890127,{ID_NO},ICBC,debit,CHA,X1\n"
        );
        let r = http(
            admin,
            format!(
                "POST /agreements/import HTTP/1.1\r\nauthorization: Bearer {ADMIN_TOKEN}\r\ncontent-length: {}\r\n\r\n{csv}",
                csv.len()
            ),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 422"), "{r}");
        assert!(r.contains("1 agreements imported, 1 bad lines"), "{r}");
        assert!(r.contains("line 3:") && !r.contains("6222021234567890127"), "{r}");
        // The imported card is signed for this merchant now: re-signing answers
        // ALREADY_SIGNED with the imported agreement, and it can be debited.
        let p = c.call(prebind(&stock, "13600000006")).await.unwrap();
        let Message::PreBindRsp(p) = p.msg else { panic!() };
        assert_eq!(p.result.reason, Reason::ALREADY_SIGNED);
        let d = c.call(debit("IMP-1", p.agreement_id, 50)).await.unwrap();
        assert_eq!(status(&d), Status::Success, "{d:?}");
        assert!(bed.journal.records.load(std::sync::atomic::Ordering::Relaxed) > 0);

        let m = http(
            admin,
            format!("GET /metrics HTTP/1.1\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"),
        )
        .await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(m.contains("sluice_orders_accepted_total"), "{m}");
        assert!(m.contains("sluice_request_latency_us{type=\"DEBIT_REQ\""), "{m}");
        let o = http(
            admin,
            format!(
                "GET /orders/{MERCHANT}/IMP-1 HTTP/1.1\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
            ),
        )
        .await;
        assert!(o.starts_with("HTTP/1.1 200"), "{o}");
        assert!(o.contains("status SUCCESS") && o.contains("attempt 1 channel CHA"), "{o}");
        assert!(o.contains("excluded CHB"), "CHB holds no agreement for the card: {o}");
    })
    .await
    .expect("bounded");
}

/// A bed journaling to `sink`, a client that acknowledges notifications itself, and a
/// card it signed.
async fn signed_with_sink(
    sink: std::sync::Arc<dyn sluice::app::JournalSink>,
) -> (Bed, sluice::client::Client, u64) {
    let bed = Bed::start_with(BedConfig {
        sink: Some(sink),
        ..BedConfig::default()
    })
    .await;
    let c = bed.client().await;
    let agreement = bed.sign(&c, CARD, PHONE).await;
    (bed, c, agreement)
}

/// A NOTIFY_ACK's journal record is written off the session's reader: the lender's next
/// request on the same connection is answered while that record still waits for the
/// journal. (It used to be awaited inline: one journal round trip — an fsync — per ack
/// held every later frame of the connection in the socket, seconds under load.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_ack_record_does_not_hold_the_lenders_next_request() {
    use sluice::app::JournalSink;
    use sluice::engine::Record;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Journals everything at once, except ack records: those wait for the gate.
    struct HoldAcks {
        gate: Arc<tokio::sync::Semaphore>,
        held: AtomicU64,
    }
    impl JournalSink for HoldAcks {
        fn append(&self, rec: Record) -> futures::future::BoxFuture<'static, std::io::Result<()>> {
            if matches!(rec, Record::NotifyAcked { .. }) {
                self.held.fetch_add(1, Ordering::SeqCst);
                let gate = self.gate.clone();
                Box::pin(async move {
                    let _p = gate.acquire().await;
                    Ok(())
                })
            } else {
                Box::pin(async { Ok(()) })
            }
        }
    }
    let sink = Arc::new(HoldAcks {
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
        held: AtomicU64::new(0),
    });
    let (_bed, c, agreement) = signed_with_sink(sink.clone()).await; // the bed lives to the end
    let r = c.call(debit("ACK-1", agreement, 100)).await.unwrap();
    assert_eq!(status(&r), Status::Success, "{r:?}");
    let t = std::time::Instant::now();
    while sink.held.load(Ordering::SeqCst) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no ack was journaled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The ack's record is held; the next request must still be read and answered.
    let q = tokio::time::timeout(
        Duration::from_secs(5),
        c.call(lm::OrderQueryReq {
            order_id: lm::OrderId::new("ACK-1").unwrap(),
        }),
    )
    .await
    .expect("answered while the ack's record waits for the journal")
    .unwrap();
    assert_eq!(status(&q), Status::Success, "{q:?}");
    sink.gate.add_permits(1_000);
}

/// A NOTIFY_ACK's record goes to the journal without a task waiting for it when the
/// journal can queue it at once (`JournalSink::try_append_detached`), and the waiting
/// way when it cannot; either way it is journaled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_record_is_queued_detached_when_the_journal_can() {
    use sluice::app::JournalSink;
    use sluice::engine::Record;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    #[derive(Default)]
    struct Counts {
        detached: AtomicU64,
        waited: AtomicU64,
        refuse_detached: AtomicBool,
    }
    impl JournalSink for Counts {
        fn append(&self, rec: Record) -> futures::future::BoxFuture<'static, std::io::Result<()>> {
            if matches!(rec, Record::NotifyAcked { .. }) {
                self.waited.fetch_add(1, Ordering::SeqCst);
            }
            Box::pin(async { Ok(()) })
        }
        fn try_append_detached(&self, rec: &Record) -> bool {
            assert!(
                matches!(rec, Record::NotifyAcked { .. }),
                "only records nothing waits for are detached: {rec:?}"
            );
            if self.refuse_detached.load(Ordering::SeqCst) {
                return false;
            }
            self.detached.fetch_add(1, Ordering::SeqCst);
            true
        }
    }
    let sink = Arc::new(Counts::default());
    let (_bed, c, agreement) = signed_with_sink(sink.clone()).await; // the bed lives to the end
    async fn wait_for(what: &str, f: impl Fn() -> bool) {
        let t = std::time::Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let r = c.call(debit("DET-1", agreement, 100)).await.unwrap();
    assert_eq!(status(&r), Status::Success, "{r:?}");
    wait_for("the first ack, detached", || {
        sink.detached.load(Ordering::SeqCst) == 1
    })
    .await;
    sink.refuse_detached.store(true, Ordering::SeqCst);
    let r = c.call(debit("DET-2", agreement, 100)).await.unwrap();
    assert_eq!(status(&r), Status::Success, "{r:?}");
    wait_for("the second ack, waited for", || {
        sink.waited.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(sink.detached.load(Ordering::SeqCst), 1);
}
