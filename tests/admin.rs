//! The admin port end to end against a running switch and simulated channels:
//! readiness, channel list and detail, disable / enable (a debit is routed elsewhere),
//! fund top-ups, order detail, status page and its data, metrics, and the error codes.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use sluice::admin::client::{request, Answer};
use sluice::message::{self as lm, Message, Status};

fn limit<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(Duration::from_secs(60), f)
}

async fn call(bed: &Bed, method: &str, path: &str) -> Answer {
    let addr = bed.switch.admin_addr.expect("admin port").to_string();
    request(
        &addr,
        ADMIN_TOKEN,
        method,
        path,
        b"",
        Duration::from_secs(10),
    )
    .await
    .expect("admin answers")
}

fn json(a: &Answer) -> Value {
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {}", a.body))
}

/// Sign CARD on CHA (primary) and CHB (backup); returns the agreement id.
async fn sign_on_both(bed: &Bed, c: &sluice::client::Client) -> u64 {
    let a = bed.sign(c, CARD, PHONE).await;
    let mut req = prebind(CARD, PHONE);
    req.mode = lm::BindMode::Backup;
    let r = c.call(req).await.unwrap();
    let Message::PreBindRsp(p) = r.msg else {
        panic!("{r:?}")
    };
    assert_eq!(p.result.status, Status::Success, "{p:?}");
    let code = bed.sim("CHB").outbox().last().unwrap().code.clone();
    let b = common::bind_confirm(c, p.bind_ref, &code).await;
    assert_eq!(
        (b.result.status, b.channel.as_str()),
        (Status::Success, "CHB")
    );
    a
}

/// The channel that executed an order, from the order detail endpoint.
async fn executed_on(bed: &Bed, order: &str) -> (Value, String) {
    let a = call(
        bed,
        "GET",
        &format!("/orders/{MERCHANT}/{order}?format=json"),
    )
    .await;
    assert_eq!(a.code, 200, "{}", a.body);
    let v = json(&a);
    let ch = v["attempts"]
        .as_array()
        .and_then(|x| x.last())
        .map(|x| x["channel"].as_str().unwrap().to_string())
        .unwrap_or_default();
    (v, ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_a_channel_routes_debits_elsewhere_until_enabled() {
    limit(async {
        let bed = Bed::start().await;
        let r = call(&bed, "GET", "/readyz").await;
        assert_eq!(r.code, 200, "{}", r.body);
        assert_eq!(
            json(&r)["usable_channels"],
            serde_json::json!(["CHA", "CHB"])
        );

        let c = bed.client().await;
        let a = sign_on_both(&bed, &c).await;
        let d = c.call(debit("ADM-1", a, 100)).await.unwrap();
        assert_eq!(status(&d), Status::Success, "{d:?}");
        let (_, first) = executed_on(&bed, "ADM-1").await;
        assert_eq!(first, "CHA", "the primary takes the debit while usable");

        let off = call(&bed, "POST", "/channels/CHA/disable").await;
        assert_eq!(off.code, 200, "{}", off.body);
        assert_eq!(json(&off)["overrides"]["debit"], "off");
        let list = json(&call(&bed, "GET", "/channels").await);
        let cha = &list["channels"][0];
        assert_eq!(
            (
                cha["id"].as_str(),
                cha["usable"].as_bool(),
                cha["up"].as_bool()
            ),
            (Some("CHA"), Some(false), Some(true)),
            "{cha}"
        );
        assert_eq!(cha["unusable_reason"], "disabled by the operator");

        let d = c.call(debit("ADM-2", a, 100)).await.unwrap();
        assert_eq!(status(&d), Status::Success, "{d:?}");
        let (order, second) = executed_on(&bed, "ADM-2").await;
        assert_eq!(second, "CHB", "CHA is disabled: {order}");
        let excluded = order["excluded"].as_array().unwrap();
        assert!(
            excluded
                .iter()
                .any(|e| e["channel"] == "CHA" && e["reason"] == "operator_off"),
            "the router says why CHA was not chosen: {order}"
        );
        // The simulators' ledgers agree: CHB executed ADM-2, CHA did not.
        let ledger = bed.ledger();
        let on = |ch: &str| {
            ledger
                .iter()
                .filter(|(n, e)| n == ch && e.succeeded())
                .count()
        };
        assert_eq!((on("CHA"), on("CHB")), (1, 1), "{ledger:?}");

        // Text form for people: every attempt and the router's reasons.
        let t = call(&bed, "GET", &format!("/orders/{MERCHANT}/ADM-2")).await;
        assert!(
            t.body.contains("attempt 1 channel CHB")
                && t.body.contains("excluded CHA operator_off"),
            "{}",
            t.body
        );

        // Disabling the other one too: not ready, with the reason.
        assert_eq!(call(&bed, "POST", "/channels/CHB/disable").await.code, 200);
        let r = call(&bed, "GET", "/readyz").await;
        assert_eq!(r.code, 503, "{}", r.body);
        assert!(
            json(&r)["reason"]
                .as_str()
                .unwrap()
                .contains("no usable channel"),
            "{}",
            r.body
        );

        let on = call(&bed, "POST", "/channels/CHA/enable").await;
        assert_eq!(json(&on)["overrides"]["debit"], "auto");
        assert_eq!(call(&bed, "POST", "/channels/CHB/enable").await.code, 200);
        assert_eq!(call(&bed, "GET", "/readyz").await.code, 200);
        let d = c.call(debit("ADM-3", a, 100)).await.unwrap();
        assert_eq!(status(&d), Status::Success, "{d:?}");
        assert_eq!(executed_on(&bed, "ADM-3").await.1, "CHA");

        // One product only.
        let p = call(&bed, "POST", "/channels/CHA/disable?product=payout").await;
        let v = json(&p);
        assert_eq!(
            (
                v["overrides"]["payout"].as_str(),
                v["overrides"]["debit"].as_str()
            ),
            (Some("off"), Some("auto"))
        );
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_clear_and_have_the_right_codes() {
    limit(async {
        let bed = Bed::start().await;
        let addr = bed.switch.admin_addr.unwrap().to_string();
        let t = Duration::from_secs(10);
        let wrong = request(&addr, "not-the-token", "GET", "/channels", b"", t)
            .await
            .unwrap();
        assert_eq!(wrong.code, 401);
        // The status page takes the token in its address; other paths do not.
        let page = request(
            &addr,
            "",
            "GET",
            &format!("/status?token={ADMIN_TOKEN}"),
            b"",
            t,
        )
        .await
        .unwrap();
        assert_eq!(page.code, 200);
        assert!(page.body.contains("<svg") && page.body.contains("/status.json"));
        let other = request(
            &addr,
            "",
            "GET",
            &format!("/channels?token={ADMIN_TOKEN}"),
            b"",
            t,
        )
        .await
        .unwrap();
        assert_eq!(other.code, 401);
        let bare = request(&addr, "", "GET", "/status", b"", t).await.unwrap();
        assert_eq!(bare.code, 401);
        assert!(bare.body.contains("/status?token=TOKEN"), "{}", bare.body);

        for (method, path, code, says) in [
            ("GET", "/nope", 404, "unknown endpoint"),
            ("POST", "/channels", 405, "use GET"),
            ("GET", "/channels/CHA/disable", 405, "use POST"),
            ("GET", "/shutdown", 405, "use POST"),
            ("DELETE", "/readyz", 405, "use GET"),
            ("GET", "/channels/NOPE", 404, "unknown channel"),
            ("POST", "/channels/NOPE/disable", 404, "unknown channel"),
            (
                "POST",
                "/channels/CHA/disable?product=loans",
                400,
                "expected debit",
            ),
            ("POST", "/funds/CHA/topup", 400, "amount_fen is required"),
            (
                "POST",
                "/funds/CHA/topup?amount_fen=12.5",
                400,
                "whole number",
            ),
            ("POST", "/funds/CHA/topup?amount_fen=0", 400, "non-zero"),
            (
                "POST",
                "/funds/CHA/topup?amount_fen=99999999999999999",
                400,
                "at most",
            ),
            (
                "POST",
                "/funds/NOPE/topup?amount_fen=5",
                404,
                "unknown channel",
            ),
            (
                "POST",
                "/funds/CHA/topup?amount_fen=5",
                409,
                "no fund position",
            ),
            (
                "GET",
                "/orders/898100000000001/NOPE?format=json",
                404,
                "no such order",
            ),
            (
                "GET",
                "/orders/898100000000001/X?format=xml",
                400,
                "expected text or json",
            ),
            ("POST", "/reload", 409, "no configuration file"),
        ] {
            let a = call(&bed, method, path).await;
            assert_eq!(a.code, code, "{method} {path}: {}", a.body);
            assert!(a.body.contains(says), "{method} {path}: {}", a.body);
            if a.code != 404 || a.body.starts_with('{') {
                assert_eq!(a.body.lines().count(), 1, "one line: {}", a.body);
            }
        }
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn funds_top_up_and_status_data_and_metrics() {
    limit(async {
        let bed = Bed::start_with(BedConfig {
            route: |name| {
                let mut c = sluice::engine::ChannelConfig::open(name);
                c.fund = Some(sluice::engine::route::FundConfig {
                    initial_fen: 10_000,
                    alert_fen: 5_000,
                });
                c
            },
            ..BedConfig::default()
        })
        .await;
        let f = json(&call(&bed, "POST", "/funds/CHB/topup?amount_fen=2500").await);
        assert_eq!(
            (
                f["balance_fen"].as_i64(),
                f["available_fen"].as_i64(),
                f["low"].as_bool()
            ),
            (Some(12_500), Some(12_500), Some(false))
        );
        let f = json(&call(&bed, "POST", "/funds/CHB/topup?amount_fen=-8000").await);
        assert_eq!(
            (f["balance_fen"].as_i64(), f["low"].as_bool()),
            (Some(4_500), Some(true))
        );
        let funds = json(&call(&bed, "GET", "/funds").await);
        assert_eq!(funds["funds"].as_array().unwrap().len(), 2);

        let c = bed.client().await;
        let a = bed.sign(&c, CARD, PHONE).await;
        for i in 0..3 {
            let d = c.call(debit(&format!("ST-{i}"), a, 100)).await.unwrap();
            assert_eq!(status(&d), Status::Success, "{d:?}");
        }
        // The history ring samples every 2 s: wait (bounded) for two samples after the
        // debits so the charts have a line.
        let mut v = Value::Null;
        for _ in 0..50 {
            v = json(&call(&bed, "GET", "/status.json").await);
            let t = v["channels"][0]["history"]["t"]
                .as_array()
                .map(|a| a.len())
                .unwrap_or(0);
            if t >= 2 && v["sessions"].as_u64() == Some(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(v["sessions"], 1, "{v}");
        assert_eq!(v["orders_accepted_total"], 3, "{v}");
        assert_eq!(v["ready"], true, "{v}");
        let cha = &v["channels"][0];
        assert_eq!(
            (cha["id"].as_str(), cha["breaker"].as_str()),
            (Some("CHA"), Some("closed"))
        );
        assert!(cha["history"]["t"].as_array().unwrap().len() >= 2, "{cha}");
        assert!(
            cha["latency_ms_p50"].as_u64().is_some(),
            "answers were measured: {cha}"
        );
        let score = cha["health_score"].as_f64().unwrap();
        assert!(
            score > 0.5 && score <= 1.0,
            "all answered fast and well: {cha}"
        );
        assert_eq!(v["funds"][1]["channel"], "CHB");

        let detail = json(&call(&bed, "GET", "/channels/CHA").await);
        assert_eq!(detail["window"]["ok"], 3, "{detail}");
        assert_eq!(detail["pool"]["connections_ready"], 2, "{detail}");
        assert!(
            detail["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["product"] == "debit" && x["day_count"] == 3),
            "{detail}"
        );

        let m = call(&bed, "GET", "/metrics").await.body;
        for needle in [
            "sluice_answers_total{type=\"DEBIT_RSP\",status=\"SUCCESS\",reason=\"OK\"} 3",
            "sluice_request_duration_us_bucket{type=\"DEBIT_REQ\",le=\"+Inf\"} 3",
            "sluice_request_duration_us_count{type=\"DEBIT_REQ\"} 3",
            "sluice_sessions 1",
            "sluice_orders_held{form=\"live\"} 3",
            "sluice_orders_held{form=\"settled\"} 0",
            "sluice_requests_inflight 0",
            "sluice_requests_busy_total 0",
            "sluice_channel_breaker_state{channel=\"CHA\"} 0",
            "sluice_channel_success_ratio{channel=\"CHA\"}",
            "sluice_channel_fund_fen{channel=\"CHB\"",
            "sluice_channel_inflight{channel=\"CHA\"} 0",
            "sluice_ready 1",
        ] {
            assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
        }
    })
    .await
    .expect("bounded");
}

/// Readiness follows the journal writer: a switch on a durable journal is ready, and
/// not ready (503, naming the journal) once the journal can take no more records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_needs_a_working_journal_writer() {
    use std::sync::Arc;
    limit(async {
        let dir = tempfile::tempdir().unwrap();
        let switch_id = Arc::new(sluice::crypto::Identity::from_seed(&[1u8; 32]));
        let chan_id = Arc::new(sluice::crypto::Identity::from_seed(&[10u8; 32]));
        let sim = sluice::sim::Simulator::start(sluice::sim::SimConfig::new(
            chan_id.clone(),
            INSTITUTION,
            switch_id.public_key(),
        ))
        .await
        .unwrap();
        let running = sluice::run::start(sluice::run::SwitchConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            channels: vec![sluice::run::ChannelSetup {
                route: sluice::engine::ChannelConfig::open("CHA"),
                pool: sluice::upstream::PoolConfig::new(vec![sim.addr()], INSTITUTION),
                public_key: chan_id.public_key(),
            }],
            keys: Arc::new(sluice::crypto::KeyStore::new(sluice::crypto::single_key(
                MERCHANT, 1, &SECRET,
            ))),
            identity: switch_id,
            pii_secret: vec![9u8; 32],
            engine: sluice::engine::EngineConfig::default(),
            session: sluice::server::session::SessionConfig::default(),
            connections_max: 8,
            channel_deadline: Duration::from_secs(2),
            journal: sluice::run::JournalSetup::Durable(sluice::journal::JournalConfig::new(
                dir.path(),
            )),
            admin: Some(("127.0.0.1:0".parse().unwrap(), ADMIN_TOKEN.into())),
        })
        .await
        .unwrap();
        assert!(running.wait_channels(Duration::from_secs(10)).await);
        let addr = running.admin_addr.unwrap().to_string();
        let ready = || async {
            request(
                &addr,
                ADMIN_TOKEN,
                "GET",
                "/readyz",
                b"",
                Duration::from_secs(10),
            )
            .await
            .unwrap()
        };
        let r = ready().await;
        assert_eq!(r.code, 200, "{}", r.body);
        let m = request(
            &addr,
            ADMIN_TOKEN,
            "GET",
            "/metrics",
            b"",
            Duration::from_secs(10),
        )
        .await
        .unwrap()
        .body;
        assert!(
            m.contains("sluice_journal_failed 0") && m.contains("sluice_journal_queued_records 0"),
            "{m}"
        );

        running.journal.as_ref().unwrap().halt();
        let r = ready().await;
        assert_eq!(r.code, 503, "{}", r.body);
        assert!(
            json(&r)["reason"].as_str().unwrap().contains("journal"),
            "{}",
            r.body
        );
        running.shutdown(Duration::from_secs(2)).await;
        sim.shutdown().await;
    })
    .await
    .expect("bounded");
}
