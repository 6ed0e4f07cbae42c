//! Drive one debit through an engine to a durable SUCCESS the lender acknowledged, with
//! no I/O: every journal record is taken as durable at once and the channel answers OK.
//! Shared by `tests/order_memory.rs` and `benches/engine.rs` (included by `#[path]`), which
//! fill an engine with final orders this way.

use sluice::channel::message::{self as ch, Code};
use sluice::engine::{Action, DispatchResult, Engine};
use sluice::message as lm;
use sluice::wire::header::MerchantNo;

/// Debit `req` for `merchant` at `at_ms` and carry it to SUCCESS, acknowledged.
pub fn debit_to_success(e: &Engine, merchant: MerchantNo, req: &lm::DebitReq, at_ms: u64) {
    for act in e.debit(merchant, req, at_ms) {
        match act {
            Action::Journal(r) => e.record_durable(&r),
            Action::Dispatch(d) => {
                let ch::Message::PayReq(p) = &d.msg else {
                    panic!("{:?}", d.msg)
                };
                let (code, class) = Code::OK.pair();
                let rsp = ch::Message::PayRsp(ch::PayRsp {
                    code,
                    class,
                    order_ref: p.order_ref,
                    channel_serial: ch::Serial::new("S1").unwrap(),
                    amount: p.amount.0,
                    finished_at_ms: at_ms,
                });
                for r in e.dispatch_result(&d.token, DispatchResult::Answer(rsp), at_ms) {
                    match r {
                        Action::Journal(r) => e.record_durable(&r),
                        Action::Notify(nt) => drop(e.notify_ack(&merchant, nt.msg.notify_id)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
}
