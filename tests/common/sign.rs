//! Sign a card end to end with any lender client against one simulator: pre-bind, the SMS
//! code from the simulator's outbox, bind confirm. Returns the agreement id.

use sluice::client::Client;
use sluice::message::{self as lm, Message};
use sluice::sim::SimHandle;

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
