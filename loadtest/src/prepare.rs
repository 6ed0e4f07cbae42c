//! `prepare`: one directory with everything a benchmark needs, consistent between the
//! switch and the simulators, so debit runs start at once:
//! - `keys/`: merchant HMAC keys, the switch's Ed25519 identity, the PII secret (0600);
//! - `sluice-fsync.toml`, `sluice-none.toml`: switch configurations (journal policy);
//! - `agreements.csv`: the stock-import file for `sluice import` (one row per channel
//!   agreement: merchant,user_id,card_no,id_no,bank_code,card_type,channel,
//!   channel_agreement_no);
//! - `sim-<CHANNEL>.csv`: the same agreements as the simulator books them
//!   (agreement_no,card_no,id_no,bank_code,card_type), loaded by `sluice-load sim`;
//! - `prepare.json`: addresses, seeds and public keys (read by `run --dir` and `sim`).

use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sluice::crypto::Identity;

use crate::data;
use crate::gen::MerchantKey;

/// One simulated channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelInfo {
    /// Channel id.
    pub id: String,
    /// Simulator address.
    pub addr: SocketAddr,
    /// Seed of its Ed25519 identity, hex.
    pub seed: String,
    /// Its public key, hex.
    pub public_key: String,
}

/// `prepare.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepared {
    /// Switch lender listener.
    pub listen: SocketAddr,
    /// Merchant numbers (`data::merchant_no(0..merchants)`).
    pub merchants: usize,
    /// Prepared cards; card `n` belongs to merchant `n % merchants`.
    pub agreements: u64,
    /// The switch's institution id at the channels.
    pub institution: String,
    /// The switch's public key, hex.
    pub switch_public_key: String,
    /// Channels, primary first.
    pub channels: Vec<ChannelInfo>,
}

impl Prepared {
    /// Read `dir/prepare.json`.
    pub fn load(dir: &Path) -> Result<Prepared> {
        let p = dir.join("prepare.json");
        let s = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(serde_json::from_str(&s)?)
    }
}

/// Read a merchant key file (`MERCHANT KEY_ID HEX` per line).
pub fn read_keys(path: &Path) -> Result<Vec<MerchantKey>> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut v = Vec::new();
    for line in s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        anyhow::ensure!(f.len() == 3, "{}: bad line {line:?}", path.display());
        v.push(MerchantKey {
            merchant: f[0].to_string(),
            key_id: f[1].parse()?,
            secret: hex::decode(f[2])?,
        });
    }
    Ok(v)
}

fn config(p: &Prepared, policy: &str) -> String {
    let mut s = format!(
        "# Written by sluice-load prepare (benchmark configuration, journal policy {policy}).\n\
         [server]\nlisten = \"{}\"\nconnections_max = 1024\ninflight_per_session = 4096\n\
         replay_window_s = 30\n\n\
         [keys]\nmerchant_keys = \"keys/merchants.txt\"\nswitch_identity = \"keys/switch.ed25519\"\n\
         pii_secret = \"keys/pii.secret\"\n\n\
         [engine]\nchannel_deadline_ms = 5000\n\n\
         [journal]\ndir = \"data-{policy}\"\npolicy = \"{policy}\"\n",
        p.listen
    );
    for c in &p.channels {
        s.push_str(&format!(
            "\n[[channel]]\nid = \"{}\"\naddresses = [\"{}\"]\npublic_key = \"{}\"\n\
             institution = \"{}\"\nconnections = 4\ninflight_per_connection = 4096\n\
             products = [\"debit\", \"payout\", \"sign\"]\n",
            c.id, c.addr, c.public_key, p.institution
        ));
    }
    s
}

/// Write the directory.
pub fn prepare(
    dir: &Path,
    agreements: u64,
    merchants: usize,
    listen: SocketAddr,
    sim_base: SocketAddr,
) -> Result<Prepared> {
    std::fs::create_dir_all(dir.join("keys"))?;
    let secret_file = |name: &str, bytes: &[u8]| -> Result<PathBuf> {
        let p = dir.join("keys").join(name);
        let _ = std::fs::remove_file(&p);
        sluice::config::write_secret_file(&p, bytes)
            .with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    };
    let (switch_id, doc) = Identity::generate();
    secret_file("switch.ed25519", &doc)?;
    secret_file(
        "pii.secret",
        hex::encode(sluice::crypto::random_secret()).as_bytes(),
    )?;
    let keys: String = (0..merchants)
        .map(|m| {
            format!(
                "{} 1 {}\n",
                data::merchant_no(m),
                hex::encode(sluice::crypto::random_secret())
            )
        })
        .collect();
    secret_file("merchants.txt", keys.as_bytes())?;
    let channels: Vec<ChannelInfo> = ["CHA", "CHB"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let seed = sluice::crypto::random_secret();
            let seed32: [u8; 32] = seed[..32].try_into().expect("32-byte seed");
            ChannelInfo {
                id: id.to_string(),
                addr: SocketAddr::new(sim_base.ip(), sim_base.port() + i as u16),
                seed: hex::encode(seed32),
                public_key: hex::encode(Identity::from_seed(&seed32).public_key()),
            }
        })
        .collect();
    let p = Prepared {
        listen,
        merchants,
        agreements,
        institution: "SLUICE01".into(),
        switch_public_key: hex::encode(switch_id.public_key()),
        channels,
    };
    for policy in ["fsync", "none"] {
        std::fs::write(
            dir.join(format!("sluice-{policy}.toml")),
            config(&p, policy),
        )?;
    }
    let mut csv = BufWriter::new(std::fs::File::create(dir.join("agreements.csv"))?);
    writeln!(
        csv,
        "merchant,user_id,card_no,id_no,bank_code,card_type,channel,channel_agreement_no"
    )?;
    let mut sims: Vec<BufWriter<std::fs::File>> = p
        .channels
        .iter()
        .map(|c| std::fs::File::create(dir.join(format!("sim-{}.csv", c.id))).map(BufWriter::new))
        .collect::<std::io::Result<_>>()?;
    for n in 0..agreements {
        let (card, id_no) = (data::card_no(n), data::id_no(n));
        let merchant = data::merchant_no((n % merchants as u64) as usize);
        for (c, sim) in p.channels.iter().zip(sims.iter_mut()) {
            let no = data::agreement_no(&c.id, n);
            writeln!(
                csv,
                "{merchant},U{n},{card},{id_no},{},debit,{},{no}",
                data::BANK,
                c.id
            )?;
            writeln!(sim, "{no},{card},{id_no},{},debit", data::BANK)?;
        }
    }
    csv.flush()?;
    for mut s in sims {
        s.flush()?;
    }
    std::fs::write(
        dir.join("prepare.json"),
        serde_json::to_string_pretty(&p)? + "\n",
    )?;
    Ok(p)
}
