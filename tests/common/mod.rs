//! The one shared builder for integration tests: simulated channels on 127.0.0.1:0, a
//! switch wired to them, and logged-on lender clients.
#![allow(dead_code)]

pub mod golden;

use std::sync::Arc;
use std::time::Duration;

use sluice::app::NullJournal;
use sluice::client::{Client, ClientConfig, Response};
use sluice::crypto::{single_key, Identity, KeyStore};
use sluice::engine::{ChannelConfig, EngineConfig};
use sluice::message::{self as lm, Message, Status};
use sluice::run::{ChannelSetup, Running, SwitchConfig};
use sluice::server::session::SessionConfig;
use sluice::sim::{Profile, SimConfig, SimHandle, Simulator};
use sluice::upstream::PoolConfig;

pub const MERCHANT: &str = "898100000000001";
pub const OTHER_MERCHANT: &str = "898100000000002";
pub const SECRET: [u8; 32] = [0x42; 32];
pub const OTHER_SECRET: [u8; 32] = [0x43; 32];
pub const INSTITUTION: &str = "SLUICE01";
pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const CARD: &str = "6222021234567890128";
pub const ID_NO: &str = "11010519491231002X";
pub const PHONE: &str = "13812345678";

/// Knobs for one test bed.
pub struct BedConfig {
    pub channels: Vec<&'static str>,
    pub deadline: Duration,
    pub engine: EngineConfig,
    pub inflight_max: usize,
    /// Routing settings of each channel by name (default: open to everything).
    pub route: fn(&str) -> ChannelConfig,
    /// The journal the switch writes to (default: `Bed::journal`, which keeps nothing).
    pub sink: Option<Arc<dyn sluice::app::JournalSink>>,
}

impl Default for BedConfig {
    fn default() -> Self {
        BedConfig {
            channels: vec!["CHA", "CHB"],
            deadline: Duration::from_secs(2),
            engine: EngineConfig {
                query_delay_ms: 200,
                query_backoff_max_ms: 1_000,
                not_found_grace_ms: 1_000,
                notify_retry_ms: 500,
                ..EngineConfig::default()
            },
            inflight_max: 1024,
            route: ChannelConfig::open,
            sink: None,
        }
    }
}

pub struct Bed {
    pub sims: Vec<(String, SimHandle)>,
    pub switch: Running,
    pub journal: Arc<NullJournal>,
}

impl Bed {
    pub async fn start() -> Bed {
        Bed::start_with(BedConfig::default()).await
    }

    pub async fn start_with(cfg: BedConfig) -> Bed {
        let switch_id = Arc::new(Identity::from_seed(&[1u8; 32]));
        let mut sims = Vec::new();
        let mut setups = Vec::new();
        for (i, name) in cfg.channels.iter().enumerate() {
            let chan_id = Arc::new(Identity::from_seed(&[10 + i as u8; 32]));
            let mut sc = SimConfig::new(chan_id.clone(), INSTITUTION, switch_id.public_key());
            sc.seed = 7 + i as u64;
            let sim = Simulator::start(sc).await.expect("simulator starts");
            let mut pool = PoolConfig::new(vec![sim.addr()], INSTITUTION);
            pool.connections = 2;
            setups.push(ChannelSetup {
                route: (cfg.route)(name),
                pool,
                public_key: chan_id.public_key(),
            });
            sims.push((name.to_string(), sim));
        }
        let mut keys = single_key(MERCHANT, 1, &SECRET);
        keys.extend(single_key(OTHER_MERCHANT, 1, &OTHER_SECRET));
        let journal = Arc::new(NullJournal::default());
        let switch = sluice::run::start(SwitchConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            channels: setups,
            keys: Arc::new(KeyStore::new(keys)),
            identity: switch_id,
            pii_secret: vec![9u8; 32],
            engine: cfg.engine,
            session: SessionConfig {
                inflight_max: cfg.inflight_max,
                ..SessionConfig::default()
            },
            connections_max: 64,
            channel_deadline: cfg.deadline,
            journal: sluice::run::JournalSetup::Memory(cfg.sink.unwrap_or_else(|| journal.clone())),
            admin: Some(("127.0.0.1:0".parse().unwrap(), ADMIN_TOKEN.into())),
        })
        .await
        .expect("switch starts");
        assert!(
            switch.wait_channels(Duration::from_secs(10)).await,
            "channels log on"
        );
        Bed {
            sims,
            switch,
            journal,
        }
    }

    pub fn sim(&self, name: &str) -> &SimHandle {
        &self.sims.iter().find(|(n, _)| n == name).expect("sim").1
    }

    pub fn set_profile(&self, name: &str, f: impl FnOnce(&mut Profile)) {
        self.sim(name).update_profile(f).expect("valid profile");
    }

    pub async fn client_as(&self, merchant: &str, secret: &[u8], auto_ack: bool) -> Client {
        let c = Client::connect(
            self.switch.addr,
            ClientConfig {
                merchant: merchant.into(),
                key_id: 1,
                secret: secret.to_vec(),
                auto_ack,
                timeout: Duration::from_secs(10),
            },
        )
        .await
        .expect("connect");
        let r = c.logon().await.expect("logon answered");
        assert_eq!(status(&r), Status::Success, "logon: {r:?}");
        c
    }

    pub async fn client(&self) -> Client {
        self.client_as(MERCHANT, &SECRET, true).await
    }

    /// Every ledger entry over all simulators, with the channel name.
    pub fn ledger(&self) -> Vec<(String, sluice::sim::ledger::LedgerEntry)> {
        self.sims
            .iter()
            .flat_map(|(n, s)| s.ledger_snapshot().into_iter().map(move |e| (n.clone(), e)))
            .collect()
    }

    /// Total duplicate receptions counted by the simulators (must stay 0).
    pub fn duplicates(&self) -> u64 {
        self.sims.iter().map(|(_, s)| s.duplicates()).sum()
    }

    /// Sign `card` for `MERCHANT` end to end (pre-bind, SMS from the simulator outbox,
    /// bind confirm) and return the agreement id.
    pub async fn sign(&self, c: &Client, card: &str, phone: &str) -> u64 {
        let r = c.call(prebind(card, phone)).await.unwrap();
        let Message::PreBindRsp(p) = r.msg else {
            panic!("{r:?}")
        };
        if p.result.reason == lm::Reason::ALREADY_SIGNED {
            return p.agreement_id;
        }
        assert_eq!(p.result.status, Status::Success, "{p:?}");
        let code = self.sms_code(phone).await;
        let b = bind_confirm(c, p.bind_ref, &code).await;
        assert_eq!(b.result.status, Status::Success, "{b:?}");
        b.agreement_id
    }

    /// The newest SMS code sent to `phone` by any simulator.
    pub async fn sms_code(&self, phone: &str) -> String {
        for _ in 0..100 {
            for (_, s) in &self.sims {
                if let Some(sms) = s.outbox().into_iter().rev().find(|m| m.phone == phone) {
                    return sms.code;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no SMS for {phone}");
    }

    pub fn sms_count(&self) -> usize {
        self.sims.iter().map(|(_, s)| s.outbox().len()).sum()
    }
}

/// BIND_CONFIRM_REQ with this SMS code; its answer.
pub async fn bind_confirm(c: &Client, bind_ref: u64, code: &str) -> lm::BindConfirmRsp {
    let r = c
        .call(lm::BindConfirmReq {
            bind_ref: lm::BindRef(bind_ref),
            sms_code: lm::SmsCode::new(code).unwrap(),
        })
        .await
        .unwrap();
    let Message::BindConfirmRsp(b) = r.msg else {
        panic!("{r:?}")
    };
    b
}

pub fn status(r: &Response) -> Status {
    result(r).status
}

pub fn result(r: &Response) -> lm::Outcome {
    match &r.msg {
        Message::LogonRsp(m) => m.result,
        Message::LogoffRsp(m) => m.result,
        Message::PreBindRsp(m) => m.result,
        Message::BindConfirmRsp(m) => m.result,
        Message::SignAndPayRsp(m) => m.result,
        Message::AgreementQueryRsp(m) => m.result,
        Message::AgreementCancelRsp(m) => m.result,
        Message::DebitRsp(m) => m.result,
        Message::PayoutRsp(m) => m.result,
        Message::OrderQueryRsp(m) => m.result,
        Message::Reject(m) => m.result,
        other => panic!("no result block in {other:?}"),
    }
}

pub fn prebind(card: &str, phone: &str) -> lm::PreBindReq {
    lm::PreBindReq {
        user_id: lm::UserId::new("U1").unwrap(),
        card_type: lm::CardType::Debit,
        bank_code: lm::BankCode::new("ICBC").unwrap(),
        card_no: lm::CardNo::new(card).unwrap(),
        id_no: lm::IdNo::new(ID_NO).unwrap(),
        name: lm::Name::new("张三").unwrap(),
        phone: lm::Phone::new(phone).unwrap(),
        mode: lm::BindMode::Sign,
    }
}

pub fn debit(order: &str, agreement: u64, amount: u64) -> lm::DebitReq {
    lm::DebitReq {
        order_id: lm::OrderId::new(order).unwrap(),
        agreement_id: lm::AgreementId(agreement),
        amount: lm::Fen(amount),
        currency: lm::Currency,
        purpose: lm::Purpose::new("还款").unwrap(),
    }
}

/// A Luhn-valid 19-digit card number derived from `n`.
pub fn card(n: u64) -> String {
    let base = format!("622202{:012}", n);
    for d in 0..10 {
        let c = format!("{base}{d}");
        if lm::luhn_ok(c.as_bytes()) {
            return c;
        }
    }
    unreachable!()
}
