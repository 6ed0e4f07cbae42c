//! The chaos test bed: a prepared directory, the simulated channels in this process (their
//! ledgers are the oracle), and `sluice run` as a child process that can be SIGKILLed and
//! restarted on the same data directory.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sluice::client::{Client, ClientConfig};
use sluice::message::{self as lm, Message, Reason, Status};
use sluice::sim::{Profile, SimHandle};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::data;
use crate::gen::MerchantKey;
use crate::prepare::{self, Prepared};

/// Switch settings a scenario may change.
#[derive(Debug, Clone)]
pub struct SwitchLimits {
    /// `server.connections_max`.
    pub connections_max: usize,
    /// `server.inflight_per_session`.
    pub inflight_per_session: usize,
}

impl Default for SwitchLimits {
    fn default() -> Self {
        SwitchLimits {
            connections_max: 256,
            inflight_per_session: 1024,
        }
    }
}

/// A running `sluice run` child.
pub struct Node {
    child: tokio::process::Child,
    /// Its process id (for `kill -KILL` and `/proc/PID/status`).
    pub pid: u32,
}

/// Everything a scenario runs against.
pub struct Bed {
    /// The prepared directory (keys, configuration, journal, the switch's log).
    pub dir: PathBuf,
    sluice_bin: PathBuf,
    /// Lender listener of the switch.
    pub listen: SocketAddr,
    /// Merchant keys: merchant 0 carries the checked load, merchant 1 the hostile traffic.
    pub keys: Vec<MerchantKey>,
    /// The simulated channels (id, handle), primary first.
    pub sims: Vec<(String, SimHandle)>,
    /// The channels' normal behaviour, restored after a fault.
    pub base_profile: Profile,
    /// The switch, when running.
    pub node: Option<Node>,
    /// Agreement ids of merchant 0's prepared cards.
    pub agreements: Vec<u64>,
    /// Agreement id of merchant 1's first card (the hostile lender's replays).
    pub agreement_m1: u64,
    /// Times the switch was started.
    pub starts: u32,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Two consecutive free ports (the prepared channels sit on `base` and `base + 1`).
fn free_pair() -> Result<SocketAddr> {
    for _ in 0..100 {
        let a = TcpListener::bind("127.0.0.1:0")?;
        let port = a.local_addr()?.port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    bail!("no two consecutive free ports")
}

fn config(p: &Prepared, limits: &SwitchLimits) -> String {
    // Short engine timers so PENDING orders settle within seconds; final orders move to
    // their compact settled form after one second, so repeats, queries and restarts in
    // every scenario meet settled orders; a snapshot every 10,000 records (the smallest
    // allowed), so restarts load snapshots and the settled-order chunk files they list;
    // fsync so that what the lender was told survives SIGKILL (money-safety rule 3).
    let mut s = format!(
        "# Written by sluice-load chaos.\n\
         [server]\nlisten = \"{}\"\nconnections_max = {}\ninflight_per_session = {}\n\
         heartbeat_s = 5\n\n\
         [keys]\nmerchant_keys = \"keys/merchants.txt\"\nswitch_identity = \"keys/switch.ed25519\"\n\
         pii_secret = \"keys/pii.secret\"\n\n\
         [engine]\nchannel_deadline_ms = 500\nquery_delay_ms = 200\nquery_backoff_max_ms = 1000\n\
         not_found_grace_ms = 1500\nnotify_retry_ms = 1000\nnotify_retry_max_ms = 2000\n\
         order_detail_ms = 1000\n\n\
         [journal]\ndir = \"data\"\npolicy = \"fsync\"\nsnapshot_every_records = 10000\n",
        p.listen, limits.connections_max, limits.inflight_per_session
    );
    for c in &p.channels {
        s.push_str(&format!(
            "\n[[channel]]\nid = \"{}\"\naddresses = [\"{}\"]\npublic_key = \"{}\"\n\
             institution = \"{}\"\nconnections = 2\n\
             products = [\"debit\", \"payout\", \"sign\"]\n",
            c.id, c.addr, c.public_key, p.institution
        ));
    }
    s
}

impl Bed {
    /// Prepare `dir` (keys, `cards` agreements on two channels, imported into the journal),
    /// start the simulators with `profile`, and start the switch.
    pub async fn start(
        dir: &Path,
        sluice_bin: &Path,
        cards: u64,
        profile: Profile,
        limits: &SwitchLimits,
    ) -> Result<Bed> {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let p = prepare::prepare(dir, cards, 2, listen, free_pair()?)?;
        std::fs::write(dir.join("chaos.toml"), config(&p, limits))?;
        let out = std::process::Command::new(sluice_bin)
            .args(["import", "--config", "chaos.toml", "agreements.csv"])
            .current_dir(dir)
            .output()
            .with_context(|| format!("running {}", sluice_bin.display()))?;
        if !out.status.success() {
            bail!("sluice import: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut sims = Vec::new();
        for (id, sim, _) in crate::simrun::start(dir).await? {
            sim.set_profile(profile.clone())?;
            sims.push((id, sim));
        }
        let keys = prepare::read_keys(&dir.join("keys/merchants.txt"))?;
        let mut bed = Bed {
            dir: dir.to_path_buf(),
            sluice_bin: sluice_bin.to_path_buf(),
            listen,
            keys,
            sims,
            base_profile: profile,
            node: None,
            agreements: Vec::new(),
            agreement_m1: 0,
            starts: 0,
        };
        bed.start_switch().await?;
        bed.agreements = bed.learn_agreements(0, cards).await?;
        bed.agreement_m1 = bed.learn_agreements(1, 2).await?[0];
        Ok(bed)
    }

    /// Start `sluice run` and wait for its "listening" line. Its log goes to
    /// `sluice.log` in the directory (appended across restarts).
    pub async fn start_switch(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("sluice.log"))?;
        let mut child = tokio::process::Command::new(&self.sluice_bin)
            .args(["run", "--config", "chaos.toml"])
            .current_dir(&self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.sluice_bin.display()))?;
        let pid = child.id().context("child pid")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("sluice run did not start within 60 s")??
            .unwrap_or_default();
        if !first.contains("listening") {
            bail!("sluice run: unexpected first line {first:?} (see sluice.log)");
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.node = Some(Node { child, pid });
        self.starts += 1;
        Ok(())
    }

    /// SIGKILL the switch and reap it.
    pub async fn kill_switch(&mut self) -> Result<()> {
        if let Some(mut n) = self.node.take() {
            n.child.start_kill()?;
            tokio::time::timeout(Duration::from_secs(10), n.child.wait())
                .await
                .context("killed switch did not exit")??;
        }
        Ok(())
    }

    /// A logged-on client for merchant `m`.
    pub async fn client(&self, m: usize, timeout: Duration) -> Result<Client> {
        let k = &self.keys[m];
        let c = Client::connect(
            self.listen,
            ClientConfig {
                merchant: k.merchant.clone(),
                key_id: k.key_id,
                secret: k.secret.clone(),
                auto_ack: true,
                timeout,
            },
        )
        .await?;
        let r = c.logon().await?;
        match crate::gen::outcome(&r.msg) {
            Some(o) if o.status == Status::Success => Ok(c),
            other => bail!("logon refused: {other:?}"),
        }
    }

    /// Agreement ids of merchant `m`'s prepared cards among the first `cards` (card `n`
    /// belongs to merchant `n % 2`; imported, so PREBIND answers ALREADY_SIGNED with the
    /// id).
    async fn learn_agreements(&self, m: usize, cards: u64) -> Result<Vec<u64>> {
        let c = self.client(m, Duration::from_secs(10)).await?;
        let mut ids = Vec::new();
        for n in (m as u64..cards).step_by(2) {
            let r = c.call(data::prebind(n)).await?;
            match r.msg {
                Message::PreBindRsp(p) if p.result.reason == Reason::ALREADY_SIGNED => {
                    ids.push(p.agreement_id)
                }
                other => bail!("card {n} is not imported: {other:?}"),
            }
        }
        Ok(ids)
    }

    /// Restore every channel's normal behaviour.
    pub fn heal_channels(&self) -> Result<()> {
        for (_, s) in &self.sims {
            s.set_profile(self.base_profile.clone())?;
        }
        Ok(())
    }

    /// A clean debit on a fresh connection: the switch still serves after the fault.
    pub async fn clean_debit(&self, order_id: &str, amount_fen: u64) -> Result<lm::Outcome> {
        let c = self.client(0, Duration::from_secs(10)).await?;
        let r = c
            .call(lm::DebitReq {
                order_id: lm::OrderId::new(order_id)?,
                agreement_id: lm::AgreementId(self.agreements[0]),
                amount: lm::Fen(amount_fen),
                currency: lm::Currency,
                purpose: lm::Purpose::new("chaos")?,
            })
            .await?;
        match r.msg {
            Message::DebitRsp(d) => Ok(d.result),
            other => bail!("clean debit answered {other:?}"),
        }
    }

    /// Stop everything.
    pub async fn shutdown(mut self) {
        let _ = self.kill_switch().await;
        for (_, s) in self.sims {
            s.shutdown().await;
        }
    }
}
