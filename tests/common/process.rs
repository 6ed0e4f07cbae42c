//! Helpers for tests that drive `sluice run` as a process: start it, and sign a card
//! through it.

use sluice::client::Client;
use sluice::message::{self as lm, Message};
use sluice::sim::SimHandle;

/// A `sluice run` child process.
pub struct Node {
    pub child: tokio::process::Child,
    pub pid: String,
}

/// Start `sluice run --config sluice.toml` in `dir` and wait for its "listening" line.
pub async fn start_switch(dir: &std::path::Path) -> Node {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config", "sluice.toml"])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap().to_string();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let l = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
        .await
        .expect("started in time")
        .unwrap()
        .unwrap();
    assert!(l.contains("listening"), "{l}");
    Node { child, pid }
}

/// Sign a card end to end (pre-bind, the SMS code from the simulator's outbox, bind
/// confirm); returns the agreement id.
pub async fn sign_card(c: &Client, sim: &SimHandle, card: &str, phone: &str) -> u64 {
    let r = c
        .call(lm::PreBindReq {
            user_id: lm::UserId::new("U1").unwrap(),
            card_type: lm::CardType::Debit,
            bank_code: lm::BankCode::new("ICBC").unwrap(),
            card_no: lm::CardNo::new(card).unwrap(),
            id_no: lm::IdNo::new("11010519491231002X").unwrap(),
            name: lm::Name::new("张三").unwrap(),
            phone: lm::Phone::new(phone).unwrap(),
            mode: lm::BindMode::Sign,
        })
        .await
        .unwrap();
    let Message::PreBindRsp(p) = r.msg else {
        panic!("{r:?}")
    };
    let code = sim
        .outbox()
        .into_iter()
        .rev()
        .find(|m| m.phone == phone)
        .expect("SMS sent")
        .code;
    let r = c
        .call(lm::BindConfirmReq {
            bind_ref: lm::BindRef(p.bind_ref),
            sms_code: lm::SmsCode::new(&code).unwrap(),
        })
        .await
        .unwrap();
    let Message::BindConfirmRsp(b) = r.msg else {
        panic!("{r:?}")
    };
    assert_ne!(b.agreement_id, 0, "{b:?}");
    b.agreement_id
}
