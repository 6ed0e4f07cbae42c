//! The upstream pool against in-process simulators on 127.0.0.1: pipelining with
//! thousands in flight, out-of-order answers, deadline → UNKNOWN and the late reply,
//! disconnect → UNKNOWN and reconnect, saturation, logon with wrong keys, bad MACs,
//! repeated notifications, heartbeats without ping-pong, endless reconnecting, and the
//! simulator ledger as the oracle of "never executed twice".

use std::sync::Arc;
use std::time::Duration;

use sluice::channel::message::*;
use sluice::crypto::Identity;
use sluice::message::types::{Currency, Fen};
use sluice::message::SmsCode;
use sluice::sim::{Latency, Profile, SimConfig, SimHandle, Simulator};
use sluice::upstream::{
    CallError, ChannelPool, NotSentReason, PoolConfig, UnknownReason, Unsolicited,
};
use sluice::wire::field::{Ascii, Text};
use tokio::sync::mpsc;
use tokio::time::timeout;

const INST: &str = "SLUICE01";
const LIMIT: Duration = Duration::from_secs(20);
const DL: Duration = Duration::from_secs(5);

struct Setup {
    sim: SimHandle,
    pool: ChannelPool,
    unsolicited: mpsc::Receiver<Unsolicited>,
}

fn switch_id() -> Arc<Identity> {
    Arc::new(Identity::from_seed(&[1; 32]))
}

async fn sim_with(profile: Profile) -> SimHandle {
    let mut cfg = SimConfig::new(
        Arc::new(Identity::from_seed(&[2; 32])),
        INST,
        switch_id().public_key(),
    );
    cfg.profile = profile;
    Simulator::start(cfg).await.unwrap()
}

fn pool_cfg(sim: &SimHandle, connections: usize) -> PoolConfig {
    let mut c = PoolConfig::new(vec![sim.addr()], INST);
    c.connections = connections;
    c.backoff_base = Duration::from_millis(5);
    c.backoff_max = Duration::from_millis(50);
    c
}

async fn setup(profile: Profile, connections: usize, tune: impl FnOnce(&mut PoolConfig)) -> Setup {
    let sim = sim_with(profile).await;
    let mut cfg = pool_cfg(&sim, connections);
    tune(&mut cfg);
    let (tx, rx) = mpsc::channel(1024);
    let pool = ChannelPool::start(cfg, switch_id(), sim.public_key(), tx);
    timeout(Duration::from_secs(5), pool.wait_ready(connections))
        .await
        .unwrap();
    Setup {
        sim,
        pool,
        unsolicited: rx,
    }
}

async fn sign(s: &Setup) -> AgreementNo {
    let verify: Message = VerifyReq {
        sign_ref: SignRef::new("B1").unwrap(),
        card_type: sluice::message::types::CardType::Debit,
        bank_code: Ascii::new("ICBC").unwrap(),
        card_no: sluice::channel::examples::card(),
        id_no: sluice::channel::examples::id_no(),
        name: sluice::channel::examples::name(),
        phone: sluice::channel::examples::phone(),
    }
    .into();
    let r = s.pool.call(verify, DL).await.unwrap();
    assert_eq!(r.result().unwrap().1, RspClass::Success);
    let code = s.sim.sms_for("B1").unwrap();
    let r = s
        .pool
        .call(
            SignReq {
                sign_ref: SignRef::new("B1").unwrap(),
                sms_code: SmsCode::new(&code).unwrap(),
            }
            .into(),
            DL,
        )
        .await
        .unwrap();
    let Message::SignRsp(r) = r else {
        panic!("{r:?}")
    };
    AgreementNo::new(r.agreement_no.as_str()).unwrap()
}

fn pay(order_ref: &str, agr: AgreementNo, fen: u64) -> Message {
    PayReq {
        order_ref: OrderRef::new(order_ref).unwrap(),
        agreement_no: agr,
        amount: Fen(fen),
        currency: Currency,
        purpose: Text::new("还款").unwrap(),
    }
    .into()
}

fn query(order_ref: &str) -> Message {
    QueryReq {
        order_ref: OrderRef::new(order_ref).unwrap(),
    }
    .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_in_flight_out_of_order_all_matched() {
    timeout(LIMIT, async {
        let profile = Profile {
            latency: Latency::Uniform {
                min_ms: 0.0,
                max_ms: 20.0,
            },
            ..Default::default()
        };
        let s = setup(profile, 4, |c| c.inflight_max_per_conn = 2048).await;
        let agr = sign(&s).await;
        let n = 5000;
        let mut tasks = Vec::new();
        for i in 0..n {
            let pool = s.pool.clone();
            tasks.push(tokio::spawn(async move {
                let r = format!("P{i}");
                let m = pool.call(pay(&r, agr, 1 + i as u64), DL).await.unwrap();
                // The answer is this request's, whatever order the answers came in.
                assert_eq!(m.order_ref().unwrap().as_str(), r);
                let Message::PayRsp(p) = m else { panic!() };
                assert_eq!(p.amount, 1 + i as u64);
                assert_eq!(p.class, RspClass::Success);
            }));
        }
        let mut peak = 0;
        while tasks.iter().any(|t| !t.is_finished()) {
            peak = peak.max(s.pool.stats().inflight);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(peak >= 1000, "peak in flight {peak}");
        let st = s.pool.stats();
        assert_eq!(st.completed, n as u64 + 2);
        assert_eq!(st.inflight, 0);
        assert!(st.latency_us_p50 > 0 && st.latency_us_p99 >= st.latency_us_p50);
        assert_eq!(s.sim.ledger_snapshot().len(), n);
        assert_eq!(s.sim.duplicates(), 0);
        s.sim.check_consistency().unwrap();
        s.pool.shutdown().await;
        s.sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn deadline_gives_unknown_then_the_late_reply_settles_it() {
    timeout(LIMIT, async {
        let mut s = setup(Profile::default(), 1, |_| {}).await;
        let agr = sign(&s).await;
        s.sim
            .update_profile(|p| p.latency = Latency::Fixed { ms: 1000.0 })
            .unwrap();
        let t0 = std::time::Instant::now();
        let r = s
            .pool
            .call(pay("P1", agr, 100), Duration::from_millis(50))
            .await;
        assert_eq!(r, Err(CallError::Unknown(UnknownReason::Timeout)));
        // Generous bound (loaded CI machines): the point is that the caller does not wait
        // for the 1 s answer.
        assert!(
            t0.elapsed() < Duration::from_millis(800),
            "deadline honoured"
        );
        // The channel did execute it; the late answer reaches the engine.
        let u = timeout(Duration::from_secs(2), s.unsolicited.recv())
            .await
            .unwrap()
            .unwrap();
        let Unsolicited::LateReply {
            order_ref,
            message,
            waited,
            ..
        } = u
        else {
            panic!("{u:?}")
        };
        assert_eq!(order_ref.unwrap().as_str(), "P1");
        assert_eq!(message.result().unwrap().1, RspClass::Success);
        assert!(waited >= Duration::from_millis(800));
        assert!(s
            .sim
            .ledger_entry(&OrderRef::new("P1").unwrap())
            .unwrap()
            .succeeded());
        let st = s.pool.stats();
        assert_eq!((st.timeouts, st.late_replies, st.inflight), (1, 1, 0));
        s.pool.shutdown().await;
        s.sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn disconnect_mid_flight_is_unknown_and_the_pool_reconnects() {
    timeout(LIMIT, async {
        let s = setup(Profile::default(), 2, |_| {}).await;
        let agr = sign(&s).await;
        s.sim
            .update_profile(|p| p.latency = Latency::Fixed { ms: 500.0 })
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let pool = s.pool.clone();
            tasks.push(tokio::spawn(async move {
                pool.call(pay(&format!("P{i}"), agr, 100), DL).await
            }));
        }
        while s.pool.stats().inflight < 20 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.sim.drop_connections();
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(
                r,
                Err(CallError::Unknown(UnknownReason::Disconnected)),
                "never failed"
            );
        }
        // Reconnected; querying shows the channel executed every one of them.
        s.sim
            .update_profile(|p| p.latency = Latency::Fixed { ms: 0.0 })
            .unwrap();
        timeout(Duration::from_secs(5), s.pool.wait_ready(2))
            .await
            .unwrap();
        for i in 0..20 {
            let m = s.pool.call(query(&format!("P{i}")), DL).await.unwrap();
            assert_eq!(m.result().unwrap().0.as_str(), "0000");
        }
        let st = s.pool.stats();
        assert!(
            st.disconnects >= 2 && st.unknown_disconnected == 20,
            "{st:?}"
        );
        assert_eq!(s.sim.duplicates(), 0);
        s.pool.shutdown().await;
        s.sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn saturation_is_refused_at_once_never_queued() {
    timeout(LIMIT, async {
        let s = setup(Profile::default(), 1, |c| c.inflight_max_per_conn = 4).await;
        s.sim
            .update_profile(|p| p.latency = Latency::Fixed { ms: 1500.0 })
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..4 {
            let pool = s.pool.clone();
            tasks.push(tokio::spawn(async move {
                pool.call(query(&format!("Q{i}")), DL).await
            }));
        }
        while s.pool.stats().inflight < 4 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let t0 = std::time::Instant::now();
        let r = s.pool.call(query("Q9"), DL).await;
        assert_eq!(r, Err(CallError::NotSent(NotSentReason::Saturated)));
        // Refused without waiting for a slot (the in-flight calls take 1.5 s).
        assert!(t0.elapsed() < Duration::from_millis(1000));
        for t in tasks {
            assert!(t.await.unwrap().is_ok());
        }
        assert_eq!(s.pool.stats().saturated, 1);
        s.pool.shutdown().await;
        s.sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn logon_with_a_wrong_key_is_refused_on_both_sides() {
    timeout(LIMIT, async {
        let sim = sim_with(Profile::default()).await;
        // The channel does not know this switch key.
        let (tx, _rx) = mpsc::channel(16);
        let stranger = Arc::new(Identity::from_seed(&[9; 32]));
        let pool = ChannelPool::start(pool_cfg(&sim, 1), stranger, sim.public_key(), tx.clone());
        while pool.stats().logon_rejected < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(pool.ready(), 0);
        assert_eq!(
            pool.call(query("Q"), DL).await,
            Err(CallError::NotSent(NotSentReason::NoConnection))
        );
        assert!(sim.stats().logons_refused >= 3);
        pool.shutdown().await;
        // The switch does not accept a channel signing with another key.
        let before = sim.stats().logons_ok;
        let wrong_channel_key = Identity::from_seed(&[8; 32]).public_key();
        let pool = ChannelPool::start(pool_cfg(&sim, 1), switch_id(), wrong_channel_key, tx);
        while pool.stats().logon_rejected < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(pool.ready(), 0);
        assert!(
            sim.stats().logons_ok > before,
            "the channel accepted, the switch refused"
        );
        pool.shutdown().await;
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bad_mac_from_the_channel_is_dropped_and_counted() {
    timeout(LIMIT, async {
        let s = setup(Profile::default(), 1, |_| {}).await;
        s.sim.update_profile(|p| p.bad_mac_ratio = 1.0).unwrap();
        let r = s.pool.call(query("Q1"), Duration::from_millis(100)).await;
        assert_eq!(r, Err(CallError::Unknown(UnknownReason::Timeout)));
        s.sim.update_profile(|p| p.bad_mac_ratio = 0.0).unwrap();
        // The link stays up and in sync: the next answer verifies.
        let m = s.pool.call(query("Q2"), DL).await.unwrap();
        assert_eq!(m.result().unwrap().0.as_str(), "1011");
        let st = s.pool.stats();
        assert_eq!((st.bad_macs, st.disconnects), (1, 0));
        s.pool.shutdown().await;
        s.sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn repeated_notifications_reach_the_engine_and_are_acked() {
    timeout(LIMIT, async {
        let profile = Profile {
            async_ratio: 1.0,
            async_delay_ms: 20,
            notify_copies: 3,
            notify_interval_ms: 10,
            ..Default::default()
        };
        let mut s = setup(profile, 2, |_| {}).await;
        let agr = sign(&s).await;
        let m = s.pool.call(pay("P1", agr, 100), DL).await.unwrap();
        assert_eq!(m.result().unwrap().1, RspClass::Processing);
        let mut ids = Vec::new();
        while ids.len() < 3 {
            match s.unsolicited.recv().await.unwrap() {
                Unsolicited::Notification { notify, ack } => {
                    assert_eq!(notify.order_ref.as_str(), "P1");
                    assert_eq!(notify.class, RspClass::Success);
                    ids.push(notify.notify_id);
                    assert!(ack.ack());
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(ids.iter().all(|&i| i == ids[0]));
        while s.sim.stats().notify_acks < 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Revocation notices come the same way.
        assert!(s.sim.revoke(agr.as_str()));
        let Unsolicited::Revocation { revoke, ack } = s.unsolicited.recv().await.unwrap() else {
            panic!()
        };
        assert_eq!(revoke.agreement_no, agr);
        assert!(ack.ack());
        s.pool.shutdown().await;
        s.sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn heartbeats_only_when_idle_and_never_answered_with_heartbeats() {
    timeout(LIMIT, async {
        let s = setup(Profile::default(), 1, |c| {
            c.heartbeat = Duration::from_millis(50)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(550)).await;
        let sim = s.sim.stats();
        // ~11 at 50 ms; a loaded machine delays timers, so only require that heartbeats
        // flow and stay bounded by the interval.
        assert!((2..=12).contains(&sim.echo_req_in), "{sim:?}");
        assert_eq!(
            sim.echo_rsp_in, 0,
            "an ECHO_RSP is never answered, nor sent unasked"
        );
        assert_eq!(s.pool.stats().heartbeats_sent, sim.echo_req_in);
        assert_eq!(s.pool.stats().unmatched, 0);
        s.pool.shutdown().await;
        s.sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn reconnecting_never_gives_up() {
    timeout(Duration::from_secs(30), async {
        let sim = sim_with(Profile {
            down: true,
            ..Default::default()
        })
        .await;
        let mut cfg = pool_cfg(&sim, 1);
        cfg.backoff_base = Duration::from_millis(1);
        cfg.backoff_max = Duration::from_millis(2);
        let (tx, _rx) = mpsc::channel(16);
        let pool = ChannelPool::start(cfg, switch_id(), sim.public_key(), tx);
        while pool.stats().connect_failures < 300 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.ready(), 0);
        sim.update_profile(|p| p.down = false).unwrap();
        timeout(Duration::from_secs(5), pool.wait_ready(1))
            .await
            .unwrap();
        let m = pool.call(EchoReq { nonce: 7 }.into(), DL).await.unwrap();
        assert_eq!(m, Message::EchoRsp(EchoRsp { nonce: 7 }));
        assert!(pool.stats().connect_attempts > 300);
        pool.shutdown().await;
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_faults_every_order_is_executed_at_most_once_and_settles() {
    timeout(Duration::from_secs(90), async {
        let profile = Profile {
            latency: Latency::Uniform {
                min_ms: 0.0,
                max_ms: 10.0,
            },
            decline_ratio: 0.05,
            not_processed_ratio: 0.05,
            async_ratio: 0.2,
            async_delay_ms: 10,
            drop_ratio: 0.02,
            disconnect_every_frames: 150,
            ..Default::default()
        };
        let s = setup(Profile::default(), 3, |_| {}).await;
        let agr = sign(&s).await;
        s.sim.set_profile(profile).unwrap();
        let n = 600;
        let mut tasks = Vec::new();
        for i in 0..n {
            // Paced a little, so the load spans several disconnect/reconnect cycles
            // instead of landing all at once on connections that may all be down.
            if i % 5 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let pool = s.pool.clone();
            tasks.push(tokio::spawn(async move {
                let r = format!("P{i}");
                (
                    r.clone(),
                    pool.call(pay(&r, agr, 100), Duration::from_millis(300))
                        .await,
                )
            }));
        }
        let mut unknown = Vec::new();
        let mut final_or_np = 0;
        for t in tasks {
            let (r, res) = t.await.unwrap();
            match res {
                Ok(m) => {
                    let class = m.result().unwrap().1;
                    if class == RspClass::Processing {
                        unknown.push(r);
                    } else {
                        final_or_np += 1;
                    }
                }
                Err(CallError::Unknown(_)) | Err(CallError::NotSent(_)) => unknown.push(r),
            }
        }
        assert!(final_or_np > 0 && !unknown.is_empty());
        // Settle every unclear order by querying the same channel (as the engine will).
        s.sim.update_profile(|p| *p = Profile::default()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await; // async results finalise
        timeout(Duration::from_secs(5), s.pool.wait_ready(3))
            .await
            .unwrap();
        for r in &unknown {
            // Asynchronous results finalise after their delay; on a loaded machine that
            // can take longer than the 10 ms configured, so query until final (bounded).
            let mut tries = 0;
            loop {
                let m = s.pool.call(query(r), DL).await.unwrap();
                if m.result().unwrap().1 != RspClass::Processing {
                    break;
                }
                tries += 1;
                assert!(tries < 100, "{r} still processing after 5 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert_eq!(s.sim.duplicates(), 0, "no order reference executed twice");
        s.sim.check_consistency().unwrap();
        assert!(s.sim.stats().injected_disconnects > 0);
        s.pool.shutdown().await;
        s.sim.shutdown().await;
    })
    .await
    .unwrap();
}
