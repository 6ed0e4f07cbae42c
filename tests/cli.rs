//! The `sluice` binary as an operator uses it: keygen, check-config, and a stock import
//! written to the journal and recovered by an engine.

use std::path::Path;
use std::process::Command;

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
