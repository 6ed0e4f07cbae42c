//! The invariants of a chaos run, checked against the simulators' ledgers (the oracle)
//! and the lender side's own record of what the switch told it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sluice::client::Client;
use sluice::message::{self as lm, Message, Status};
use sluice::sim::SimHandle;

use super::load::{Book, Record};

/// One invariant's verdict.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Short name.
    pub name: &'static str,
    /// Passed?
    pub ok: bool,
    /// Figures or the first violations.
    pub detail: String,
}

/// Query every order of `book` until it is final or `deadline` passes; returns the last
/// status per order id (REJECTED: the switch does not know the order).
pub async fn settle(c: &Client, book: &Book, deadline: Duration) -> HashMap<String, Status> {
    let ids: Vec<String> = book
        .orders
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    let mut last: HashMap<String, Status> = HashMap::new();
    let start = Instant::now();
    let mut todo = ids;
    loop {
        let mut next = Vec::new();
        for chunk in todo.chunks(64) {
            let answers = futures::future::join_all(chunk.iter().map(|id| async move {
                let r = c
                    .call(lm::OrderQueryReq {
                        order_id: lm::OrderId::new(id).expect("order id fits"),
                    })
                    .await;
                (id, r)
            }))
            .await;
            for (id, r) in answers {
                match r.map(|r| r.msg) {
                    Ok(Message::OrderQueryRsp(q)) => {
                        last.insert(id.clone(), q.result.status);
                        if q.result.status == Status::Pending {
                            next.push(id.clone());
                        }
                    }
                    _ => next.push(id.clone()),
                }
            }
        }
        if next.is_empty() || start.elapsed() > deadline {
            return last;
        }
        todo = next;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// What the channels' ledgers say, reduced to what the invariants need.
#[derive(Debug, Default)]
pub struct LedgerView {
    /// Successful executions per amount (each checked order has its own amount).
    pub by_amount: HashMap<u64, u32>,
    /// Order references that arrived more than once (`SimHandle::duplicates`).
    pub dups: u64,
    /// Inconsistencies the ledgers report about themselves.
    pub problems: Vec<String>,
    /// Ledger entries in all.
    pub entries: usize,
}

/// Read every channel's ledger.
pub fn ledger(sims: &[(String, SimHandle)]) -> LedgerView {
    let mut by_amount: HashMap<u64, u32> = HashMap::new();
    let (mut dups, mut problems, mut entries) = (0, Vec::new(), 0);
    for (id, s) in sims {
        for e in s.ledger_snapshot() {
            entries += 1;
            if e.succeeded() {
                *by_amount.entry(e.amount_fen).or_default() += 1;
            }
        }
        dups += s.duplicates();
        if let Err(p) = s.check_consistency() {
            problems.push(format!("{id}: {p}"));
        }
    }
    LedgerView {
        by_amount,
        dups,
        problems,
        entries,
    }
}

fn first(v: &[String]) -> String {
    let mut s = v.iter().take(3).cloned().collect::<Vec<_>>().join("; ");
    if v.len() > 3 {
        s.push_str(&format!("; … {} in all", v.len()));
    }
    s
}

/// The money-safety and notification invariants over every order in `book`.
pub fn orders(book: &Book, finals: &HashMap<String, Status>, view: &LedgerView) -> Vec<Verdict> {
    let LedgerView {
        by_amount: exec,
        dups,
        problems,
        entries,
    } = view;
    let dups = *dups;
    let orders = book.orders.lock().unwrap_or_else(|e| e.into_inner());
    let notified = book.notified.lock().unwrap_or_else(|e| e.into_inner());
    let (mut twice, mut not_final, mut wrong_state, mut lost, mut unnotified) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut acked, mut final_n, mut notify_repeats) = (0u64, 0u64, 0u64);
    let mut failed_by: std::collections::BTreeMap<&str, u64> = Default::default();
    for (id, rec) in orders.iter() {
        let Record { amount, told, .. } = rec;
        let executed = exec.get(amount).copied().unwrap_or(0);
        if executed > 1 {
            twice.push(format!("{id} executed {executed} times"));
        }
        let state = finals.get(id).copied();
        if let Some((_, r)) = told.iter().find(|(s, _)| *s == Status::Failed) {
            *failed_by.entry(r.name()).or_default() += 1;
        }
        if rec.acknowledged() {
            acked += 1;
            match state {
                Some(s) if s.is_final() => {}
                other => not_final.push(format!("{id} told {told:?}, now {other:?}")),
            }
        }
        if let Some(s) = state.filter(|s| s.is_final()) {
            final_n += 1;
            if let Some((t, _)) = told.iter().find(|(t, _)| t.is_final() && *t != s) {
                wrong_state.push(format!("{id} told {t:?}, final {s:?}"));
            }
            let want = u32::from(s == Status::Success);
            if executed != want && executed <= 1 {
                wrong_state.push(format!("{id} final {s:?}, executed {executed} times"));
            }
            let ns = notified.get(id).map(Vec::as_slice).unwrap_or(&[]);
            let mut ids: Vec<u64> = ns.iter().map(|(n, _)| *n).collect();
            ids.sort_unstable();
            ids.dedup();
            notify_repeats += (ns.len() - ids.len()) as u64;
            // Delivery is at least once (a NOTIFY is re-sent until acknowledged), so the
            // same notify id may arrive again; a second notify id or result may not.
            if ids.len() != 1 || ns.iter().any(|(_, st)| *st != s) {
                unnotified.push(format!("{id} final {s:?}, notified {ns:?}"));
            }
        } else if executed > 0 {
            // Money moved for an order the switch does not call final.
            lost.push(format!(
                "{id} executed but switch says {state:?} (told {told:?})"
            ));
        }
    }
    let mut out = vec![
        Verdict {
            name: "no order executed twice",
            ok: twice.is_empty() && dups == 0 && problems.is_empty(),
            detail: if twice.is_empty() && dups == 0 && problems.is_empty() {
                format!(
                    "{} orders, {entries} ledger entries, 0 duplicates",
                    orders.len()
                )
            } else {
                format!(
                    "{}; ledger duplicates {dups}; {}",
                    first(&twice),
                    problems.join("; ")
                )
            },
        },
        Verdict {
            name: "acknowledged orders final, as told",
            ok: not_final.is_empty() && wrong_state.is_empty() && lost.is_empty(),
            detail: if not_final.is_empty() && wrong_state.is_empty() && lost.is_empty() {
                format!(
                    "{acked} acknowledged, {final_n} final, ledger agrees; told FAILED: {failed_by:?}"
                )
            } else {
                first(&[not_final, wrong_state, lost].concat())
            },
        },
    ];
    out.push(Verdict {
        name: "every final state notified once",
        ok: unnotified.is_empty(),
        detail: if unnotified.is_empty() {
            format!("{final_n} notified, {notify_repeats} re-deliveries of the same notify id")
        } else {
            format!(
                "{} ({} notifications received for {} orders)",
                first(&unnotified),
                notified.values().map(Vec::len).sum::<usize>(),
                notified.len()
            )
        },
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(orders: &[(&str, u64, &[Status])], notified: &[(&str, u64, Status)]) -> Book {
        let b = Book::default();
        for (id, amount, told) in orders {
            b.sent(id, *amount);
            let mut o = b.orders.lock().unwrap();
            let r = o.get_mut(*id).unwrap();
            r.told = told.iter().map(|s| (*s, lm::Reason::OK)).collect();
        }
        for (id, n, s) in notified {
            b.notified
                .lock()
                .unwrap()
                .entry(id.to_string())
                .or_default()
                .push((*n, *s));
        }
        b
    }

    fn view(exec: &[(u64, u32)]) -> LedgerView {
        LedgerView {
            by_amount: exec.iter().copied().collect(),
            entries: exec.len(),
            ..LedgerView::default()
        }
    }

    fn oks(v: &[Verdict]) -> Vec<bool> {
        v.iter().map(|v| v.ok).collect()
    }

    #[test]
    fn a_clean_run_passes() {
        let b = book(
            &[
                ("A", 101, &[Status::Pending]),
                ("B", 102, &[Status::Failed]),
            ],
            &[
                ("A", 1, Status::Success),
                ("A", 1, Status::Success),
                ("B", 2, Status::Failed),
            ],
        );
        let finals = [("A".into(), Status::Success), ("B".into(), Status::Failed)].into();
        assert_eq!(
            oks(&orders(&b, &finals, &view(&[(101, 1)]))),
            [true, true, true]
        );
    }

    #[test]
    fn every_violation_is_caught() {
        let finals: HashMap<String, Status> = [("A".into(), Status::Success)].into();
        let notes = [("A", 1, Status::Success)];
        // Executed twice.
        let b = book(&[("A", 101, &[Status::Success])], &notes);
        assert!(!oks(&orders(&b, &finals, &view(&[(101, 2)])))[0]);
        // Told FAILED, ended SUCCESS.
        let b = book(&[("A", 101, &[Status::Failed])], &notes);
        assert!(!oks(&orders(&b, &finals, &view(&[(101, 1)])))[1]);
        // SUCCESS without an execution at the channel.
        let b = book(&[("A", 101, &[Status::Success])], &notes);
        assert!(!oks(&orders(&b, &finals, &view(&[])))[1]);
        // Acknowledged but never final.
        let b = book(&[("A", 101, &[Status::Pending])], &[]);
        let pending = [("A".into(), Status::Pending)].into();
        assert!(!oks(&orders(&b, &pending, &view(&[])))[1]);
        // Executed though the switch does not know the order (answered BUSY).
        let b = book(&[("A", 101, &[Status::Busy])], &[]);
        let unknown = [("A".into(), Status::Rejected)].into();
        assert!(!oks(&orders(&b, &unknown, &view(&[(101, 1)])))[1]);
        // Two notify ids, or none, or another result.
        for n in [
            &[("A", 1, Status::Success), ("A", 2, Status::Success)][..],
            &[][..],
            &[("A", 1, Status::Failed)][..],
        ] {
            let b = book(&[("A", 101, &[Status::Success])], n);
            assert!(!oks(&orders(&b, &finals, &view(&[(101, 1)])))[2], "{n:?}");
        }
    }
}
