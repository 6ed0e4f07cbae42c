//! The `sluice` binary as an operator uses it: keygen, check-config, and a stock import
//! written to the journal and recovered by an engine.

#[path = "common/process.rs"]
mod process;

use std::path::Path;
use std::process::Command;

/// The admin token of the `sluice run` tests (at least 16 characters).
const ADMIN_TOKEN: &str = "cli-test-admin-token-0123";

fn sluice(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("sluice runs")
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn keygen_check_config_and_import_into_the_journal() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    std::fs::create_dir(dir.join("keys")).unwrap();
    let pk = ok(&sluice(&["keygen", "identity", "keys/switch.ed25519"], dir));
    assert_eq!(pk.trim().len(), 64, "prints the public key");
    ok(&sluice(
        &[
            "keygen",
            "merchant",
            "--merchant",
            "898100000000001",
            "keys/merchants.txt",
        ],
        dir,
    ));
    ok(&sluice(&["keygen", "pii", "keys/pii.secret"], dir));
    // Keys are never overwritten.
    assert!(!sluice(&["keygen", "pii", "keys/pii.secret"], dir)
        .status
        .success());
    let cfg = format!(
        r#"
[keys]
merchant_keys = "keys/merchants.txt"
switch_identity = "keys/switch.ed25519"
pii_secret = "keys/pii.secret"
[journal]
dir = "data"
[[channel]]
id = "CHA"
addresses = ["127.0.0.1:7501"]
public_key = "{}"
institution = "SLUICE01"
"#,
        pk.trim()
    );
    std::fs::write(dir.join("sluice.toml"), cfg).unwrap();
    let out = ok(&sluice(&["check-config", "sluice.toml"], dir));
    assert!(out.contains("ok"), "{out}");

    // A key file readable by others is refused.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("keys/pii.secret");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let bad = sluice(&["check-config", "sluice.toml"], dir);
        assert!(!bad.status.success());
        assert!(String::from_utf8_lossy(&bad.stderr).contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    let mut csv = String::from(
        "merchant,user_id,card_no,id_no,bank_code,card_type,channel,channel_agreement_no\n",
    );
    for i in 0..500u64 {
        let base = format!("622202{:012}", i);
        let card = (0..10)
            .map(|d| format!("{base}{d}"))
            .find(|c| sluice::message::luhn_ok(c.as_bytes()))
            .unwrap();
        csv.push_str(&format!(
            "898100000000001,U{i},{card},11010519491231002X,ICBC,debit,CHA,A{i:06}\n"
        ));
    }
    csv.push_str("898100000000001,Ux,6222021234567890127,11010519491231002X,ICBC,debit,CHA,Ax\n");
    std::fs::write(dir.join("stock.csv"), &csv).unwrap();
    let out = sluice(&["import", "--config", "sluice.toml", "stock.csv"], dir);
    assert!(
        !out.status.success(),
        "a bad line makes the exit status non-zero"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stock.csv:502:"), "{stderr}");
    assert!(
        !stderr.contains("6222021234567890127"),
        "no card number in reports"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("500 agreements journaled"));

    // A fresh engine recovering that data directory has the 500 agreements.
    let engine = sluice::engine::Engine::new(
        sluice::engine::EngineConfig::default(),
        sluice::engine::ChannelTable::default(),
        &[0u8; 32],
        1,
    );
    let (journal, recovery) =
        sluice::journal::open(sluice::journal::JournalConfig::new(dir.join("data"))).unwrap();
    recovery.apply(&engine, sluice::app::now_ms()).unwrap();
    assert_eq!(engine.agreements().len(), 500);
    journal.close().unwrap();
}

/// A directory ready for `sluice run --config sluice.toml`: keys made with `keygen`
/// (merchant M1), one simulated channel CHA, a free lender port and, when `admin` is
/// given, an `[admin]` section on that port with a token file. Returns the simulator and
/// the lender port.
async fn run_dir(dir: &Path, admin: Option<u16>) -> (sluice::sim::SimHandle, u16) {
    use std::sync::Arc;
    std::fs::create_dir(dir.join("keys")).unwrap();
    let pk = ok(&sluice(&["keygen", "identity", "keys/switch.ed25519"], dir));
    ok(&sluice(
        &[
            "keygen",
            "merchant",
            "--merchant",
            "M1",
            "keys/merchants.txt",
        ],
        dir,
    ));
    ok(&sluice(&["keygen", "pii", "keys/pii.secret"], dir));
    let switch_pk = sluice::config::parse_public_key(pk.trim()).unwrap();
    let chan = Arc::new(sluice::crypto::Identity::from_seed(&[3u8; 32]));
    let sim = sluice::sim::Simulator::start(sluice::sim::SimConfig::new(
        chan.clone(),
        "SLUICE01",
        switch_pk,
    ))
    .await
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
[journal]
dir = "data"
[[channel]]
id = "CHA"
addresses = ["{}"]
public_key = "{}"
institution = "SLUICE01"
connections = 1
[channel.payout]
fund_fen = 100000
fund_alert_fen = 20000
{}"#,
            sim.addr(),
            hex::encode(chan.public_key()),
            admin
                .map(|a| format!(
                    "[admin]\nlisten = \"127.0.0.1:{a}\"\ntoken_file = \"keys/admin.token\"\n"
                ))
                .unwrap_or_default()
        ),
    )
    .unwrap();
    if admin.is_some() {
        sluice::config::write_secret_file(&dir.join("keys/admin.token"), ADMIN_TOKEN.as_bytes())
            .unwrap();
    }
    (sim, port)
}

/// `sluice run` as a process: SIGHUP swaps in new merchant keys without dropping the
/// sessions already logged on; SIGTERM stops it cleanly.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reloads_keys_on_sighup_and_stops_on_sigterm() {
    use sluice::client::{Client, ClientConfig};
    use sluice::message::{Message, Reason, Status};
    use std::time::Duration;

    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (sim, port) = run_dir(dir, None).await;
    let mut node = process::start_switch(dir).await;
    let pid = node.pid.clone();

    let secret_of = |merchant: &str| -> Vec<u8> {
        let text = std::fs::read_to_string(dir.join("keys/merchants.txt")).unwrap();
        let line = text.lines().find(|l| l.starts_with(merchant)).unwrap();
        hex::decode(line.split_whitespace().nth(2).unwrap()).unwrap()
    };
    let client = |merchant: &str, secret: Vec<u8>| ClientConfig {
        merchant: merchant.into(),
        key_id: 1,
        secret,
        auto_ack: true,
        timeout: Duration::from_secs(5),
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let c1 = Client::connect(addr, client("M1", secret_of("M1")))
        .await
        .unwrap();
    let r = c1.logon().await.unwrap();
    assert!(matches!(r.msg, Message::LogonRsp(ref l) if l.result.status == Status::Success));

    ok(&sluice(
        &[
            "keygen",
            "merchant",
            "--merchant",
            "M2",
            "keys/merchants.txt",
        ],
        dir,
    ));
    let c2 = Client::connect(addr, client("M2", secret_of("M2")))
        .await
        .unwrap();
    let before = c2.logon().await.unwrap();
    let Message::Reject(rj) = before.msg else {
        panic!("{before:?}")
    };
    assert_eq!(
        rj.result.reason,
        Reason::UNKNOWN_KEY,
        "M2 unknown before the reload"
    );

    let hup = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(hup.success());
    let mut logged_on = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let c = Client::connect(addr, client("M2", secret_of("M2")))
            .await
            .unwrap();
        if matches!(c.logon().await.unwrap().msg, Message::LogonRsp(ref l) if l.result.status == Status::Success)
        {
            logged_on = true;
            break;
        }
    }
    assert!(logged_on, "M2 logs on after SIGHUP");
    // The session that was logged on before the reload is still up.
    let e = c1
        .call(sluice::message::EchoReq { nonce: 9 })
        .await
        .unwrap();
    assert!(matches!(e.msg, Message::EchoRsp(_)));

    // The channel table reloads too: sign a card, then disable CHA in the file and SIGHUP;
    // new debits find no channel while the session stays up.
    use sluice::message as lm;
    let agreement = process::sign_card(&c1, &sim, "6222021234567890128", "13812345678").await;
    let debit = |id: &str| lm::DebitReq {
        order_id: lm::OrderId::new(id).unwrap(),
        agreement_id: lm::AgreementId(agreement),
        amount: lm::Fen(100),
        currency: lm::Currency,
        purpose: lm::Purpose::new("还款").unwrap(),
    };
    let r = c1.call(debit("H-1")).await.unwrap();
    assert!(
        matches!(r.msg, Message::DebitRsp(ref d) if d.result.status == Status::Success),
        "{r:?}"
    );
    let cfg = std::fs::read_to_string(dir.join("sluice.toml")).unwrap();
    std::fs::write(
        dir.join("sluice.toml"),
        cfg.replace("id = \"CHA\"", "id = \"CHA\"\nenabled = false"),
    )
    .unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let mut refused = false;
    for i in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = c1.call(debit(&format!("H-{}", i + 2))).await.unwrap();
        if matches!(r.msg, Message::DebitRsp(ref d) if d.result.reason == Reason::NO_CHANNEL) {
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "a disabled channel gets no new debits after SIGHUP"
    );

    let term = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(term.success());
    let status = tokio::time::timeout(Duration::from_secs(20), node.child.wait())
        .await
        .expect("stops after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    sim.shutdown().await;
}

/// `sluice ctl` against `sluice run` (its `[admin]` section): readiness, the channel
/// table, disable / enable, a fund top-up, an order's attempts, reload (a merchant key
/// added to the file works afterwards) and a graceful shutdown; errors exit non-zero
/// with one line.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_operates_a_running_switch() {
    use sluice::client::{Client, ClientConfig};
    use sluice::message::{self as lm, Message, Status};
    use std::time::Duration;

    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (sim, port) = run_dir(dir, Some(admin)).await;
    let mut node = process::start_switch(dir).await;
    let ctl = |args: &[&str]| {
        let mut a = vec!["ctl", "--config", "sluice.toml"];
        a.extend_from_slice(args);
        let out = sluice(&a, dir);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Ready once the channel has logged on (bounded).
    let mut ready = (None, String::new(), String::new());
    for _ in 0..100 {
        ready = ctl(&["ready"]);
        if ready.0 == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready.0, Some(0), "{ready:?}");
    assert_eq!(ready.1.trim(), "ready (usable channels: CHA)");

    let (code, table, _) = ctl(&["channels"]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("CHANNEL  ROUTING"), "{table}");
    let row = lines
        .iter()
        .find(|l| l.starts_with("CHA "))
        .expect("CHA row");
    // Columns line up: the breaker state sits under its header.
    let col = lines[0].find("BREAKER").unwrap();
    assert_eq!(&row[col..col + 6], "closed", "{table}");
    assert!(
        row.contains("usable") && row.contains("¥1,000.00"),
        "{table}"
    );

    let (code, raw, _) = ctl(&["--json", "channels"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&raw).expect("--json prints JSON");
    assert_eq!(v["channels"][0]["id"], "CHA", "{raw}");
    let (code, out, _) = ctl(&["disable", "CHA"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        out.trim(),
        "channel CHA: overrides debit=off payout=off sign=off"
    );
    let (code, out, _) = ctl(&["ready"]);
    assert_eq!(code, Some(1), "not ready with the only channel disabled");
    assert!(
        out.contains("NOT READY") && out.contains("disabled by the operator"),
        "{out}"
    );
    let (code, out, _) = ctl(&["enable", "CHA"]);
    assert_eq!(
        (code, out.trim()),
        (
            Some(0),
            "channel CHA: overrides debit=auto payout=auto sign=auto"
        )
    );

    let (code, out, _) = ctl(&["topup", "CHA", "5000"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        out.trim(),
        "channel CHA: balance ¥1,050.00 reserved ¥0.00 available ¥1,050.00"
    );
    let (code, out, err) = ctl(&["topup", "CHA", "-12.5"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("whole number") && err.contains("(400)"),
        "{err}"
    );
    let (code, _, err) = ctl(&["channel", "NOPE"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown channel"), "{err}");

    // A debit, then its attempts and the router's reasons.
    let secret_of = |merchant: &str| -> Vec<u8> {
        let text = std::fs::read_to_string(dir.join("keys/merchants.txt")).unwrap();
        let line = text.lines().find(|l| l.starts_with(merchant)).unwrap();
        hex::decode(line.split_whitespace().nth(2).unwrap()).unwrap()
    };
    let client = |merchant: &str| ClientConfig {
        merchant: merchant.into(),
        key_id: 1,
        secret: secret_of(merchant),
        auto_ack: true,
        timeout: Duration::from_secs(5),
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let c1 = Client::connect(addr, client("M1")).await.unwrap();
    assert!(
        matches!(c1.logon().await.unwrap().msg, Message::LogonRsp(ref l) if l.result.status == Status::Success)
    );
    let agreement = process::sign_card(&c1, &sim, "6222021234567890128", "13812345678").await;
    let r = c1
        .call(lm::DebitReq {
            order_id: lm::OrderId::new("CTL-1").unwrap(),
            agreement_id: lm::AgreementId(agreement),
            amount: lm::Fen(12345),
            currency: lm::Currency,
            purpose: lm::Purpose::new("还款").unwrap(),
        })
        .await
        .unwrap();
    assert!(
        matches!(r.msg, Message::DebitRsp(ref d) if d.result.status == Status::Success),
        "{r:?}"
    );
    let (code, out, _) = ctl(&["order", "M1", "CTL-1"]);
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("order M1/CTL-1 (debit)\nstatus SUCCESS reason OK"),
        "{out}"
    );
    assert!(out.contains("amount ¥123.45"), "{out}");
    let attempt = out
        .lines()
        .find(|l| l.starts_with("1 "))
        .expect("attempt row");
    assert!(
        attempt.contains("CHA") && attempt.contains("Success"),
        "{out}"
    );
    assert!(out.contains("candidate ("), "the router's placement: {out}");
    let (_, status, _) = ctl(&["status"]);
    assert!(status.starts_with("ready\nsessions 1"), "{status}");

    // Reload: a key added to the file works after `ctl reload`, no signal needed.
    ok(&sluice(
        &[
            "keygen",
            "merchant",
            "--merchant",
            "M2",
            "keys/merchants.txt",
        ],
        dir,
    ));
    let (code, out, _) = ctl(&["reload"]);
    assert_eq!(
        (code, out.trim()),
        (Some(0), "reloaded: 2 merchant keys, 1 channels")
    );
    let c2 = Client::connect(addr, client("M2")).await.unwrap();
    assert!(
        matches!(c2.logon().await.unwrap().msg, Message::LogonRsp(ref l) if l.result.status == Status::Success)
    );

    // Flags instead of --config; a token file others can read is refused.
    let flags = |tf: &str| {
        sluice(
            &[
                "ctl",
                "--admin",
                &format!("127.0.0.1:{admin}"),
                "--token-file",
                tf,
                "funds",
            ],
            dir,
        )
    };
    let out = ok(&flags("keys/admin.token"));
    assert!(out.contains("CHA") && out.contains("¥1,050.00"), "{out}");
    std::fs::write(dir.join("loose.token"), ADMIN_TOKEN).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("loose.token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let loose = flags("loose.token");
    assert!(!loose.status.success());

    // Graceful shutdown: the process drains and exits 0.
    let (code, out, _) = ctl(&["shutdown"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("shutting down"), "{out}");
    let status = tokio::time::timeout(Duration::from_secs(20), node.child.wait())
        .await
        .expect("stops after ctl shutdown")
        .unwrap();
    assert!(status.success(), "{status:?}");
    sim.shutdown().await;
}

/// Docs match code: the README lists exactly the `ctl` commands the binary has, and
/// every admin endpoint it documents is served (per the admin module's own table, which
/// `tests/admin.rs` exercises), and the other way round.
#[test]
fn readme_documents_every_ctl_command_and_admin_endpoint() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let help = ok(&sluice(&["ctl", "--help"], root));
    let mut commands: Vec<String> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    commands.sort();
    let listed = readme
        .split("operate a running switch:")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let mut documented: Vec<String> = listed
        .split('|')
        .filter_map(|p| p.split_whitespace().next().map(str::to_string))
        .collect();
    documented.sort();
    assert_eq!(
        documented, commands,
        "README's ctl commands vs `sluice ctl --help`"
    );

    let endpoints = |text: &str| -> Vec<String> {
        let mut v: Vec<String> = text
            .split('`')
            .filter(|t| t.starts_with("GET /") || t.starts_with("POST /"))
            .map(|t| {
                t.split(['?', '['])
                    .next()
                    .unwrap()
                    .trim_end()
                    .replace("MERCHANT/ORDER_ID", "M/O")
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let section = readme
        .split("Admin port (`[admin]`")
        .nth(1)
        .unwrap()
        .split("### ")
        .next()
        .unwrap();
    let module = std::fs::read_to_string(root.join("src/admin/mod.rs")).unwrap();
    let table: String = module
        .lines()
        .filter(|l| l.starts_with("//! | `"))
        .collect::<Vec<_>>()
        .join("\n");
    let in_readme = endpoints(section);
    let in_code = endpoints(&table);
    // README rows may name two paths in one cell (`/disable`, `/enable`): compare the
    // ones with a method.
    for e in &in_readme {
        assert!(
            in_code.contains(e),
            "README documents {e}, the admin module does not"
        );
    }
    for e in &in_code {
        let short = e.rsplit_once('/').map(|(_, l)| format!("/{l}")).unwrap();
        assert!(
            in_readme.contains(e) || section.contains(&format!("`{short}`")),
            "the admin module serves {e}, README does not document it"
        );
    }
    assert!(in_code.len() >= 14, "{in_code:?}");
}
