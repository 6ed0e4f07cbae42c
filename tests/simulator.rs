//! The channel simulator against a minimal raw client (no pool): signing, debits and
//! payouts, limits, duplicates, asynchronous results with repeated notifications,
//! revocations, maintenance windows, run-time profile changes, statement and ledger.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use ring::rand::SystemRandom;
use sluice::channel::handshake::{ClientHandshake, HandshakeError, LogonParams, SessionKeys};
use sluice::channel::message::{self as cm, *};
use sluice::crypto::Identity;
use sluice::message::types::{CardType, Currency, Fen};
use sluice::message::SmsCode;
use sluice::sim::{
    ledger, BankConfig, Op, Profile, SimConfig, SimHandle, Simulator, SmsMode, Window,
};
use sluice::wire::field::{Ascii, Text};
use sluice::wire::header::MerchantNo;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::codec::Framed;

const INST: &str = "SLUICE01";
const LIMIT: Duration = Duration::from_secs(10);

struct Client {
    io: Framed<TcpStream, ChannelCodec>,
    keys: SessionKeys,
    send_seq: u64,
    recv_seq: u64,
    next_id: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

impl Client {
    async fn connect(sim: &SimHandle, me: &Identity) -> Result<Client, HandshakeError> {
        let s = TcpStream::connect(sim.addr()).await.unwrap();
        let mut io = Framed::new(s, ChannelCodec::new());
        let p = LogonParams {
            institution: MerchantNo::new(INST).unwrap(),
            request_id: 1,
            timestamp_ms: now_ms(),
            heartbeat_s: 30,
            client_name: Ascii::new("test").unwrap(),
        };
        let (hs, req) = ClientHandshake::start(me, &p, &SystemRandom::new()).unwrap();
        io.send(req).await.unwrap();
        let rsp = match io.next().await {
            Some(Ok(Ok(raw))) => raw,
            other => panic!("no logon answer: {other:?}"),
        };
        let est = hs.finish(&rsp, &sim.public_key())?;
        Ok(Client {
            io,
            keys: est.keys,
            send_seq: 0,
            recv_seq: 0,
            next_id: 2,
        })
    }

    async fn send(&mut self, msg: Message) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send_with(id, msg).await;
        id
    }

    async fn send_with(&mut self, id: u64, msg: Message) {
        let env = Envelope {
            request_id: id,
            timestamp_ms: now_ms(),
            institution: MerchantNo::new(INST).unwrap(),
            flags: 0,
        };
        let f = cm::encode_to_bytes(&env, &msg, &self.keys.send, self.send_seq);
        self.send_seq += 1;
        self.io.send(f).await.unwrap();
    }

    /// Next frame with a good MAC: (request id, message); None on close.
    async fn recv(&mut self) -> Option<(u64, Message)> {
        loop {
            let raw = match timeout(LIMIT, self.io.next())
                .await
                .expect("recv timed out")
            {
                Some(Ok(Ok(raw))) => raw,
                _ => return None,
            };
            let seq = self.recv_seq;
            self.recv_seq += 1;
            if self.keys.recv.verify_frame(seq, &raw).is_err() {
                continue;
            }
            return Some((raw.header.request_id, cm::decode(&raw).unwrap()));
        }
    }

    /// Send a request and wait for its answer (skipping unsolicited frames).
    async fn call(&mut self, msg: Message) -> Message {
        let id = self.send(msg).await;
        loop {
            let (rid, m) = self.recv().await.expect("connection closed");
            if rid == id && m.is_response() {
                return m;
            }
        }
    }
}

async fn start(profile: Profile, bank: BankConfig) -> (SimHandle, Arc<Identity>) {
    let me = Arc::new(Identity::from_seed(&[1; 32]));
    let ch = Arc::new(Identity::from_seed(&[2; 32]));
    let mut cfg = SimConfig::new(ch, INST, me.public_key());
    cfg.profile = profile;
    cfg.bank = bank;
    (Simulator::start(cfg).await.unwrap(), me)
}

fn verify_req(sign_ref: &str, card: &str) -> Message {
    VerifyReq {
        sign_ref: SignRef::new(sign_ref).unwrap(),
        card_type: CardType::Debit,
        bank_code: Ascii::new("ICBC").unwrap(),
        card_no: sluice::message::types::CardNo::new(card).unwrap(),
        id_no: sluice::channel::examples::id_no(),
        name: sluice::channel::examples::name(),
        phone: sluice::channel::examples::phone(),
    }
    .into()
}

async fn sign(c: &mut Client, sim: &SimHandle, sref: &str, card: &str) -> AgreementNo {
    let Message::VerifyRsp(v) = c.call(verify_req(sref, card)).await else {
        panic!()
    };
    assert_eq!(v.class, RspClass::Success);
    if v.code.as_str() == "0001" {
        return AgreementNo::new(v.agreement_no.as_str()).unwrap();
    }
    let code = sim.sms_for(sref).expect("SMS in the outbox");
    let Message::SignRsp(s) = c
        .call(
            SignReq {
                sign_ref: SignRef::new(sref).unwrap(),
                sms_code: SmsCode::new(&code).unwrap(),
            }
            .into(),
        )
        .await
    else {
        panic!()
    };
    assert_eq!(s.code.as_str(), "0000");
    AgreementNo::new(s.agreement_no.as_str()).unwrap()
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

fn payout(order_ref: &str, fen: u64) -> Message {
    PayoutReq {
        order_ref: OrderRef::new(order_ref).unwrap(),
        amount: Fen(fen),
        currency: Currency,
        card_type: CardType::Debit,
        bank_code: Ascii::new("CMB").unwrap(),
        card_no: sluice::channel::examples::card(),
        name: sluice::channel::examples::name(),
        purpose: Text::new("放款").unwrap(),
    }
    .into()
}

fn code_of(m: &Message) -> (String, RspClass) {
    let (c, k) = m.result().expect("a response");
    (c.as_str().to_string(), k)
}

const CARD: &str = "6222021234567890128";

#[tokio::test]
async fn signing_is_idempotent_and_checks_the_code() {
    timeout(LIMIT, async {
        let (sim, me) = start(Profile::default(), BankConfig::default()).await;
        let mut c = Client::connect(&sim, &me).await.unwrap();
        let agr = sign(&mut c, &sim, "B1", CARD).await;
        // Re-signing the same card and ID: existing number, no SMS.
        let before = sim.outbox().len();
        let Message::VerifyRsp(v) = c.call(verify_req("B2", CARD)).await else {
            panic!()
        };
        assert_eq!(v.code.as_str(), "0001");
        assert_eq!(v.agreement_no.as_str(), agr.as_str());
        assert_eq!(v.sms_sent, 0);
        assert_eq!(sim.outbox().len(), before);
        // A wrong code on a new card.
        let _ = c.call(verify_req("B3", "4111111111111111")).await;
        let m = c
            .call(
                SignReq {
                    sign_ref: SignRef::new("B3").unwrap(),
                    sms_code: SmsCode::new("0000").unwrap(),
                }
                .into(),
            )
            .await;
        assert_eq!(code_of(&m), ("1008".into(), RspClass::Declined));
        // Unsign, then paying on it is declined.
        let m = c.call(UnsignReq { agreement_no: agr }.into()).await;
        assert_eq!(code_of(&m).0, "0000");
        let m = c.call(pay("P-after-unsign", agr, 100)).await;
        assert_eq!(code_of(&m), ("1002".into(), RspClass::Declined));
        assert_eq!(sim.agreements_issued(), 1);
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn deterministic_sms_mode_uses_the_phone_tail() {
    timeout(LIMIT, async {
        let bank = BankConfig {
            sms_mode: SmsMode::Deterministic,
            ..Default::default()
        };
        let (sim, me) = start(Profile::default(), bank).await;
        let mut c = Client::connect(&sim, &me).await.unwrap();
        let _ = c.call(verify_req("B1", CARD)).await;
        assert_eq!(sim.sms_for("B1").unwrap(), "345678"); // phone 13812345678
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn debits_limits_duplicates_and_the_ledger() {
    timeout(LIMIT, async {
        let bank = BankConfig {
            per_txn_max_fen: 10_000,
            daily_max_fen: 15_000,
            payout_balance_fen: 20_000,
            ..Default::default()
        };
        let (sim, me) = start(Profile::default(), bank).await;
        let mut c = Client::connect(&sim, &me).await.unwrap();
        let agr = sign(&mut c, &sim, "B1", CARD).await;
        let m = c.call(pay("P1", agr, 9_000)).await;
        assert_eq!(code_of(&m), ("0000".into(), RspClass::Success));
        // Same reference again: not executed, counted.
        let m = c.call(pay("P1", agr, 9_000)).await;
        assert_eq!(code_of(&m), ("3001".into(), RspClass::Processing));
        assert_eq!(sim.duplicates(), 1);
        let m = c.call(pay("P2", agr, 10_001)).await;
        assert_eq!(code_of(&m).0, "1004");
        let m = c.call(pay("P3", agr, 7_000)).await;
        assert_eq!(code_of(&m).0, "1005", "9 000 + 7 000 > daily 15 000");
        let m = c
            .call(pay("P4", AgreementNo::new("AGR-nope").unwrap(), 1))
            .await;
        assert_eq!(code_of(&m).0, "1002");
        // Payouts draw the prefunded balance; too little is NOT_PROCESSED, never declined.
        let m = c.call(payout("O1", 5_000)).await;
        assert_eq!(code_of(&m).0, "0000", "card daily total 14 000");
        let m = c.call(payout("O2", 1_001)).await;
        assert_eq!(code_of(&m).0, "1005");
        assert_eq!(sim.payout_balance_fen(), 15_000);
        // Query.
        let m = c
            .call(
                QueryReq {
                    order_ref: OrderRef::new("P1").unwrap(),
                }
                .into(),
            )
            .await;
        let Message::QueryRsp(q) = m else { panic!() };
        assert_eq!(
            (q.code.as_str(), q.amount, q.order_type),
            ("0000", 9_000, 1)
        );
        let m = c
            .call(
                QueryReq {
                    order_ref: OrderRef::new("never").unwrap(),
                }
                .into(),
            )
            .await;
        assert_eq!(code_of(&m).0, "1011");
        sim.check_consistency().unwrap();
        // Statement of today.
        let day = ledger::cst_day(now_ms());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stmt.txt");
        sim.write_statement(&path, day).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# sluice-sim statement "));
        let rows: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(rows.len(), 6, "{text}");
        assert!(rows
            .iter()
            .any(|r| r.starts_with("P1|CH") && r.contains("|DEBIT|9000|SUCCESS|0000|")));
        assert!(rows
            .iter()
            .any(|r| r.starts_with("O1|") && r.contains("|PAYOUT|5000|SUCCESS|")));
        assert!(!text.contains(CARD), "no card numbers in the statement");
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn payout_balance_too_low_is_not_processed() {
    timeout(LIMIT, async {
        let bank = BankConfig {
            payout_balance_fen: 1_000,
            ..Default::default()
        };
        let (sim, me) = start(Profile::default(), bank).await;
        let mut c = Client::connect(&sim, &me).await.unwrap();
        let m = c.call(payout("O1", 1_001)).await;
        assert_eq!(code_of(&m), ("2003".into(), RspClass::NotProcessed));
        assert!(sim.ledger_entry(&OrderRef::new("O1").unwrap()).is_none());
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn asynchronous_results_are_notified_repeatedly() {
    timeout(LIMIT, async {
        let profile = Profile {
            async_ratio: 1.0,
            async_delay_ms: 50,
            notify_copies: 3,
            notify_interval_ms: 20,
            ..Default::default()
        };
        let (sim, me) = start(profile, BankConfig::default()).await;
        let mut c = Client::connect(&sim, &me).await.unwrap();
        let agr = sign(&mut c, &sim, "B1", CARD).await;
        let m = c.call(pay("P1", agr, 100)).await;
        assert_eq!(code_of(&m), ("3000".into(), RspClass::Processing));
        let m = c
            .call(
                QueryReq {
                    order_ref: OrderRef::new("P1").unwrap(),
                }
                .into(),
            )
            .await;
        assert_eq!(code_of(&m).1, RspClass::Processing);
        let mut ids = Vec::new();
        while ids.len() < 3 {
            let (rid, m) = c.recv().await.unwrap();
            if let Message::Notify(n) = m {
                assert_eq!(n.order_ref.as_str(), "P1");
                assert_eq!(n.class, RspClass::Success);
                ids.push(n.notify_id);
                c.send_with(
                    rid,
                    NotifyAck {
                        notify_id: n.notify_id,
                    }
                    .into(),
                )
                .await;
            }
        }
        assert!(ids.iter().all(|&i| i == ids[0]), "same notify id each time");
        let m = c
            .call(
                QueryReq {
                    order_ref: OrderRef::new("P1").unwrap(),
                }
                .into(),
            )
            .await;
        assert_eq!(code_of(&m).0, "0000");
        assert_eq!(sim.stats().notify_acks, 3);
        sim.check_consistency().unwrap();
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn revocation_notice_then_pay_is_declined() {
    timeout(LIMIT, async {
        let (sim, me) = start(Profile::default(), BankConfig::default()).await;
        let mut c = Client::connect(&sim, &me).await.unwrap();
        let agr = sign(&mut c, &sim, "B1", CARD).await;
        assert!(sim.revoke(agr.as_str()));
        let (_, m) = c.recv().await.unwrap();
        let Message::Revoke(r) = m else {
            panic!("{m:?}")
        };
        assert_eq!(r.agreement_no, agr);
        assert_eq!(r.card_last4.as_str(), "0128");
        let m = c.call(pay("P1", agr, 100)).await;
        assert_eq!(code_of(&m), ("1003".into(), RspClass::Declined));
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn maintenance_window_and_down_profile() {
    timeout(LIMIT, async {
        let profile = Profile {
            maintenance: vec![Window {
                from: "00:00".into(),
                to: "24:00".into(),
                ops: vec![Op::Payout],
            }],
            ..Default::default()
        };
        let (sim, me) = start(profile, BankConfig::default()).await;
        let mut c = Client::connect(&sim, &me).await.unwrap();
        let m = c.call(payout("O1", 100)).await;
        assert_eq!(code_of(&m), ("2002".into(), RspClass::NotProcessed));
        // Flip down: the line drops, new connections are closed at once.
        sim.update_profile(|p| p.down = true).unwrap();
        assert!(c.recv().await.is_none());
        let s = TcpStream::connect(sim.addr()).await.unwrap();
        let mut io = Framed::new(s, ChannelCodec::new());
        assert!(io.next().await.is_none());
        sim.update_profile(|p| p.down = false).unwrap();
        let mut c = Client::connect(&sim, &me).await.unwrap();
        let m = c.call(EchoReq { nonce: 1 }.into()).await;
        assert_eq!(m, Message::EchoRsp(EchoRsp { nonce: 1 }));
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn wrong_switch_key_is_refused_and_bad_macs_are_counted() {
    timeout(LIMIT, async {
        let (sim, me) = start(Profile::default(), BankConfig::default()).await;
        let stranger = Identity::from_seed(&[9; 32]);
        let e = Client::connect(&sim, &stranger).await.err().unwrap();
        assert_eq!(e, HandshakeError::Refused(Code::AUTH_FAILED.into()));
        assert_eq!(sim.stats().logons_refused, 1);
        let mut c = Client::connect(&sim, &me).await.unwrap();
        // A frame MAC'd with the wrong sequence number is dropped; the link stays up.
        c.send_seq += 5;
        let _ = c.send(EchoReq { nonce: 1 }.into()).await;
        c.send_seq -= 5; // the simulator counted that frame too (as its number 0)
        let m = c.call(EchoReq { nonce: 2 }.into()).await;
        assert_eq!(m, Message::EchoRsp(EchoRsp { nonce: 2 }));
        assert_eq!(sim.stats().bad_mac_in, 1);
        // An answer is never answered (no ping-pong).
        c.send(EchoRsp { nonce: 3 }.into()).await;
        let m = c.call(EchoReq { nonce: 4 }.into()).await;
        assert_eq!(m, Message::EchoRsp(EchoRsp { nonce: 4 }));
        let s = sim.stats();
        assert_eq!((s.echo_rsp_in, s.echo_req_out), (1, 0));
        sim.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn many_orders_under_faults_keep_the_ledger_exact() {
    timeout(Duration::from_secs(20), async {
        let profile = Profile {
            decline_ratio: 0.1,
            not_processed_ratio: 0.1,
            async_ratio: 0.2,
            async_delay_ms: 10,
            latency: sluice::sim::Latency::Uniform {
                min_ms: 0.0,
                max_ms: 3.0,
            },
            ..Default::default()
        };
        let (sim, me) = start(profile, BankConfig::default()).await;
        let mut c = Client::connect(&sim, &me).await.unwrap();
        let agr = sign(&mut c, &sim, "B1", CARD).await;
        let n = 400u64;
        let mut sent = std::collections::HashMap::new();
        for i in 0..n {
            let id = c.send(pay(&format!("P{i}"), agr, 10 + i)).await;
            sent.insert(id, i);
        }
        let (mut ok, mut declined, mut np, mut processing) = (0u64, 0u64, 0u64, 0u64);
        let mut answered = 0;
        while answered < n {
            let (rid, m) = c.recv().await.unwrap();
            if !m.is_response() || !sent.contains_key(&rid) {
                continue;
            }
            answered += 1;
            match code_of(&m).1 {
                RspClass::Success => ok += 1,
                RspClass::Declined => declined += 1,
                RspClass::NotProcessed => np += 1,
                RspClass::Processing => processing += 1,
            }
        }
        assert!(ok > 0 && declined > 0 && np > 0 && processing > 0);
        let entries = sim.ledger_snapshot();
        assert_eq!(
            entries.len() as u64,
            n - np,
            "not-processed orders are not recorded"
        );
        assert_eq!(sim.duplicates(), 0);
        sim.check_consistency().unwrap();
        sim.shutdown().await;
    })
    .await
    .unwrap();
}
