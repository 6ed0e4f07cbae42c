//! `sluice run` killed with SIGKILL under load, restarted on the same data directory, three
//! times; then every order the lender was answered about must end in exactly one final
//! state, no acknowledged final state may change, and the simulator's ledger (the oracle)
//! must show no order executed twice. Loopback only, bounded in time.
#![cfg(unix)]

#[path = "common/process.rs"]
mod process;

use process::Node;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use sluice::client::{Client, ClientConfig};
use sluice::message::{self as lm, Message, Status};
use sluice::sim::{Latency, Profile, SimConfig, Simulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MERCHANT: &str = "898100000000001";
const TOKEN: &str = "crash-test-admin-token";

fn sluice(args: &[&str], dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn kill9(n: &mut Node) {
    assert!(Command::new("kill")
        .args(["-KILL", &n.pid])
        .status()
        .unwrap()
        .success());
    let _ = tokio::time::timeout(Duration::from_secs(10), n.child.wait()).await;
}

async fn client(port: u16, secret: &[u8]) -> Client {
    let c = Client::connect(
        format!("127.0.0.1:{port}").parse().unwrap(),
        ClientConfig {
            merchant: MERCHANT.into(),
            key_id: 1,
            secret: secret.to_vec(),
            auto_ack: true,
            timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    c.logon().await.unwrap();
    c
}

async fn admin_get(port: u16, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nauthorization: Bearer {TOKEN}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn debit(order: &str, agreement: u64) -> lm::DebitReq {
    lm::DebitReq {
        order_id: lm::OrderId::new(order).unwrap(),
        agreement_id: lm::AgreementId(agreement),
        amount: lm::Fen(100),
        currency: lm::Currency,
        purpose: lm::Purpose::new("还款").unwrap(),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_and_executes_nothing_twice() {
    tokio::time::timeout(Duration::from_secs(240), run())
        .await
        .expect("bounded");
}

async fn run() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    std::fs::create_dir(dir.join("keys")).unwrap();
    let pk = sluice(&["keygen", "identity", "keys/switch.ed25519"], dir);
    sluice(
        &[
            "keygen",
            "merchant",
            "--merchant",
            MERCHANT,
            "keys/merchants.txt",
        ],
        dir,
    );
    sluice(&["keygen", "pii", "keys/pii.secret"], dir);
    sluice::config::write_secret_file(&dir.join("keys/admin.token"), TOKEN.as_bytes()).unwrap();
    let text = std::fs::read_to_string(dir.join("keys/merchants.txt")).unwrap();
    let secret = hex::decode(text.split_whitespace().nth(2).unwrap()).unwrap();

    let chan = Arc::new(sluice::crypto::Identity::from_seed(&[4u8; 32]));
    let mut sc = SimConfig::new(
        chan.clone(),
        "SLUICE01",
        sluice::config::parse_public_key(pk.trim()).unwrap(),
    );
    sc.profile = Profile {
        latency: Latency::Uniform {
            min_ms: 1.0,
            max_ms: 40.0,
        },
        async_ratio: 0.3,
        async_delay_ms: 50,
        decline_ratio: 0.1,
        ..Profile::default()
    };
    let sim = Simulator::start(sc).await.unwrap();
    let (port, admin) = (free_port(), free_port());
    std::fs::write(
        dir.join("sluice.toml"),
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
[keys]
merchant_keys = "keys/merchants.txt"
switch_identity = "keys/switch.ed25519"
pii_secret = "keys/pii.secret"
[engine]
channel_deadline_ms = 500
query_delay_ms = 200
query_backoff_max_ms = 500
not_found_grace_ms = 1000
notify_retry_ms = 500
[journal]
dir = "data"
policy = "fsync"
[admin]
listen = "127.0.0.1:{admin}"
token_file = "keys/admin.token"
[[channel]]
id = "CHA"
addresses = ["{}"]
public_key = "{}"
institution = "SLUICE01"
connections = 2
"#,
            sim.addr(),
            hex::encode(chan.public_key())
        ),
    )
    .unwrap();

    // Sign one card (its agreement survives every crash through the journal).
    let mut node = process::start_switch(dir).await;
    let c = client(port, &secret).await;
    let agreement = process::sign_card(&c, &sim, "6222021234567890128", "13812345678").await;

    // What the lender was told, per order id.
    let told: Arc<std::sync::Mutex<HashMap<String, Vec<Status>>>> = Default::default();
    let mut sent: HashSet<String> = HashSet::new();
    for life in 0..3u64 {
        let c = Arc::new(client(port, &secret).await);
        let ids: Vec<String> = (0..300)
            .map(|i| {
                // New orders, plus retries of the previous life's orders.
                if i % 4 == 3 && life > 0 {
                    format!("L{}-{}", life - 1, i)
                } else {
                    format!("L{life}-{i}")
                }
            })
            .collect();
        sent.extend(ids.iter().cloned());
        let (c2, told2) = (c.clone(), told.clone());
        // The load runs for ~1 s; the kill lands in the middle of it.
        let load = tokio::spawn(async move {
            let mut tasks = Vec::new();
            for id in ids {
                let (c, told) = (c2.clone(), told2.clone());
                tasks.push(tokio::spawn(async move {
                    if let Ok(r) = c.call(debit(&id, agreement)).await {
                        if let Message::DebitRsp(d) = r.msg {
                            told.lock()
                                .unwrap()
                                .entry(id)
                                .or_default()
                                .push(d.result.status);
                        }
                    }
                }));
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            for t in tasks {
                let _ = t.await;
            }
        });
        tokio::time::sleep(Duration::from_millis(200 + 150 * life)).await;
        kill9(&mut node).await;
        let _ = load.await;
        node = process::start_switch(dir).await;
    }

    // Let recovered PENDING orders be queried to their final state.
    let c = client(port, &secret).await;
    let mut finals: HashMap<String, Status> = HashMap::new();
    for _ in 0..100 {
        finals.clear();
        let mut pending = 0;
        for id in &sent {
            let q = c
                .call(lm::OrderQueryReq {
                    order_id: lm::OrderId::new(id).unwrap(),
                })
                .await
                .unwrap();
            let Message::OrderQueryRsp(q) = q.msg else {
                panic!()
            };
            match q.result.status {
                Status::Success | Status::Failed => {
                    finals.insert(id.clone(), q.result.status);
                }
                Status::Rejected => {} // never accepted (unknown order)
                _ => pending += 1,
            }
        }
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let told = told.lock().unwrap().clone();
    for (id, statuses) in &told {
        let accepted = statuses
            .iter()
            .any(|s| matches!(s, Status::Success | Status::Failed | Status::Pending));
        if accepted {
            let f = finals
                .get(id)
                .unwrap_or_else(|| panic!("{id} was acknowledged ({statuses:?}) but is not final"));
            for s in statuses {
                if s.is_final() {
                    assert_eq!(s, f, "{id}: told {s:?}, ended {f:?}");
                }
            }
        }
    }
    // The oracle: no order reference twice, and at most one success per order.
    assert_eq!(sim.duplicates(), 0);
    let ledger: HashMap<String, bool> = sim
        .ledger_snapshot()
        .into_iter()
        .map(|e| (e.order_ref.as_str().to_string(), e.succeeded()))
        .collect();
    let mut refs_seen = 0;
    for id in finals.keys() {
        let page = admin_get(admin, &format!("/orders/{MERCHANT}/{id}")).await;
        let refs: Vec<&str> = page
            .lines()
            .filter(|l| l.starts_with("attempt "))
            .filter_map(|l| l.split_whitespace().nth(5))
            .collect();
        refs_seen += refs.len();
        let successes = refs
            .iter()
            .filter(|r| ledger.get(**r) == Some(&true))
            .count();
        assert!(successes <= 1, "{id} executed {successes} times: {page}");
        match finals[id] {
            Status::Success => {
                assert_eq!(successes, 1, "{id} SUCCESS but not at the channel: {page}")
            }
            _ => assert_eq!(
                successes, 0,
                "{id} FAILED but the channel executed it: {page}"
            ),
        }
    }
    let acknowledged = told
        .values()
        .filter(|v| {
            v.iter()
                .any(|s| matches!(s, Status::Success | Status::Failed | Status::Pending))
        })
        .count();
    let unanswered = sent.len() - told.len();
    eprintln!(
        "sent {} orders, {acknowledged} acknowledged, {unanswered} unanswered (cut by a kill), {} final, {refs_seen} channel attempts, {} ledger entries",
        sent.len(),
        finals.len(),
        ledger.len()
    );
    // Not vacuous: load was acknowledged, and kills cut some requests off mid-flight.
    assert!(acknowledged > 50, "{acknowledged}");
    assert!(unanswered > 0, "every kill landed after the load finished");
    assert!(refs_seen > 0 && !finals.is_empty());
    kill9(&mut node).await;
    sim.shutdown().await;
}
