//! Reconciliation (对账): a channel's daily statement against sluice's own record.
//!
//! Every day each channel publishes the orders that became final at it that day
//! (`CHANNEL.md` §11; the simulator writes the same format). sluice's own record is its
//! journal, read without disturbing a running switch ([`crate::journal::load_read_only`]).
//! Both sides are keyed by the channel order reference (one per attempt), and each
//! statement row and each of sluice's attempts on that channel lands in one class:
//!
//! | class | meaning |
//! |---|---|
//! | `MATCHED` | both sides, same amount and final status |
//! | `CROSS_DAY` | same amount and status, but sluice learned the result on another day |
//! | `AMOUNT_MISMATCH` | both sides, amounts differ |
//! | `STATUS_MISMATCH` | both sides, statuses differ (channel SUCCESS while sluice says FAILED, PENDING or NOT_PROCESSED — an "abnormal success" — or the reverse) |
//! | `MISSING_IN_SLUICE` | on the statement, unknown to sluice |
//! | `MISSING_AT_CHANNEL` | sluice has it final on this channel that day; the statement does not |
//!
//! The result is a readable summary ([`Report::summary`]) and a CSV file of every
//! difference ([`Report::write_differences`]); `sluice recon` exits non-zero when there
//! are differences. Amounts are integer fen throughout.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use crate::engine::order::{AttemptOutcome, OrderKind, Phase};
use crate::engine::{ChannelTable, Engine, EngineConfig};
use crate::message::{ChannelId, Status};

/// Why a reconciliation could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReconError {
    /// The statement file is malformed.
    #[error("statement line {line}: {detail}")]
    Statement {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// The statement is for another day than asked.
    #[error("statement is for {found}, not {asked}")]
    WrongDate {
        /// Date in the statement header.
        found: String,
        /// Date asked for.
        asked: String,
    },
    /// A bad `--date` or `--channel`.
    #[error("{0}")]
    Argument(String),
    /// sluice's own record could not be read.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    /// Reading the statement or writing the differences failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Debit or payout, as both sides name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Collection by agreement.
    Debit,
    /// Payout to a card.
    Payout,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Debit => "DEBIT",
            Kind::Payout => "PAYOUT",
        }
    }
}

/// One statement row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementRow {
    /// sluice's order reference (the channel's key).
    pub order_ref: String,
    /// The channel's serial.
    pub serial: String,
    /// Debit or payout.
    pub kind: Kind,
    /// Amount, fen.
    pub amount_fen: u64,
    /// SUCCESS or FAILED.
    pub status: Status,
    /// The channel's code.
    pub code: String,
    /// When final at the channel, ms since the epoch.
    pub finished_at_ms: u64,
}

/// A parsed statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// `YYYY-MM-DD` from the header.
    pub date: String,
    /// Institution label from the header.
    pub institution: String,
    /// Rows in file order.
    pub rows: Vec<StatementRow>,
}

/// Parse a statement: `# sluice-sim statement DATE INSTITUTION` then
/// `ref|serial|DEBIT/PAYOUT|amount|SUCCESS/FAILED|code|finished_at_ms` lines.
pub fn parse_statement(text: &str) -> Result<Statement, ReconError> {
    let mut lines = text.lines().enumerate();
    let bad = |line: usize, detail: String| ReconError::Statement {
        line: line + 1,
        detail,
    };
    let (_, head) = lines.next().ok_or_else(|| bad(0, "empty file".into()))?;
    let mut h = head.split_whitespace();
    if h.next() != Some("#") || h.next() != Some("sluice-sim") || h.next() != Some("statement") {
        return Err(bad(0, format!("not a statement header: {head:?}")));
    }
    let date = h
        .next()
        .ok_or_else(|| bad(0, "no date".into()))?
        .to_string();
    let institution = h.next().unwrap_or("").to_string();
    let mut rows = Vec::new();
    for (i, line) in lines {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split('|').collect();
        if f.len() != 7 {
            return Err(bad(i, format!("{} fields, expected 7", f.len())));
        }
        let kind = match f[2] {
            "DEBIT" => Kind::Debit,
            "PAYOUT" => Kind::Payout,
            k => return Err(bad(i, format!("kind {k:?}"))),
        };
        let status = match f[4] {
            "SUCCESS" => Status::Success,
            "FAILED" => Status::Failed,
            s => return Err(bad(i, format!("status {s:?}"))),
        };
        rows.push(StatementRow {
            order_ref: f[0].to_string(),
            serial: f[1].to_string(),
            kind,
            amount_fen: f[3]
                .parse()
                .map_err(|_| bad(i, format!("amount {:?}", f[3])))?,
            status,
            code: f[5].to_string(),
            finished_at_ms: f[6]
                .parse()
                .map_err(|_| bad(i, format!("time {:?}", f[6])))?,
        });
    }
    Ok(Statement {
        date,
        institution,
        rows,
    })
}

/// How sluice sees one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnStatus {
    /// The order is final with this status and this attempt decided it.
    Final(Status),
    /// Still PENDING (queried until final).
    Pending,
    /// sluice holds this attempt did nothing at the channel (not sent, or NOT_PROCESSED).
    NotProcessed,
}

impl OwnStatus {
    fn name(self) -> &'static str {
        match self {
            OwnStatus::Final(s) => s.name(),
            OwnStatus::Pending => "PENDING",
            OwnStatus::NotProcessed => "NOT_PROCESSED",
        }
    }
}

/// sluice's record of one attempt on the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnEntry {
    /// Merchant number.
    pub merchant: String,
    /// Merchant's order id.
    pub order_id: String,
    /// Debit or payout.
    pub kind: Kind,
    /// Amount, fen.
    pub amount_fen: u64,
    /// Status.
    pub status: OwnStatus,
    /// When the order became final at sluice (0 while not).
    pub finished_at_ms: u64,
}

/// sluice's record of every attempt on one channel, by order reference.
#[derive(Debug, Clone, Default)]
pub struct OwnRecord {
    /// Attempts by reference.
    pub entries: HashMap<String, OwnEntry>,
}

impl OwnRecord {
    /// Every attempt on `channel` held by `engine` (an error: a settled-order chunk
    /// file could not be read).
    pub fn from_engine(engine: &Engine, channel: &ChannelId) -> std::io::Result<OwnRecord> {
        let mut entries = HashMap::new();
        engine.visit_for_snapshot(
            |_| {},
            |o| {
                let n = o.attempts.len();
                for (i, a) in o.attempts.iter().enumerate() {
                    if &a.channel != channel {
                        continue;
                    }
                    let status = if a.outcome.definitively_not_processed() {
                        OwnStatus::NotProcessed
                    } else if o.phase == Phase::Final && i + 1 == n {
                        OwnStatus::Final(o.outcome.status)
                    } else if matches!(a.outcome, AttemptOutcome::Success(_)) {
                        OwnStatus::Final(Status::Success)
                    } else if matches!(a.outcome, AttemptOutcome::Declined(_)) {
                        OwnStatus::Final(Status::Failed)
                    } else {
                        OwnStatus::Pending
                    };
                    entries.insert(
                        a.order_ref.as_str().to_string(),
                        OwnEntry {
                            merchant: o.key.0.as_str().to_string(),
                            order_id: o.key.1.as_str().to_string(),
                            kind: match o.kind {
                                OrderKind::Debit { .. } => Kind::Debit,
                                OrderKind::Payout { .. } => Kind::Payout,
                            },
                            amount_fen: o.amount,
                            status,
                            finished_at_ms: o.finished_at_ms,
                        },
                    );
                }
            },
            |_, _| {},
        )?;
        Ok(OwnRecord { entries })
    }

    /// Every attempt on `channel` in the journal in `dir` (read-only).
    pub fn from_journal(dir: &Path, channel: &ChannelId) -> Result<OwnRecord, ReconError> {
        let engine = Engine::new(
            EngineConfig::default(),
            ChannelTable::default(),
            &[0u8; 32],
            1,
        );
        crate::journal::load_read_only(dir, &engine)?;
        OwnRecord::from_engine(&engine, channel).map_err(|source| ReconError::Io {
            path: dir.display().to_string(),
            source,
        })
    }
}

/// A difference class (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Same amount and status.
    Matched,
    /// Same amount and status, different day at sluice.
    CrossDay,
    /// Amounts differ.
    AmountMismatch,
    /// Statuses differ.
    StatusMismatch,
    /// Unknown to sluice.
    MissingInSluice,
    /// Not on the statement.
    MissingAtChannel,
}

impl Class {
    /// Upper-case name used in the summary and the CSV.
    pub fn name(self) -> &'static str {
        match self {
            Class::Matched => "MATCHED",
            Class::CrossDay => "CROSS_DAY",
            Class::AmountMismatch => "AMOUNT_MISMATCH",
            Class::StatusMismatch => "STATUS_MISMATCH",
            Class::MissingInSluice => "MISSING_IN_SLUICE",
            Class::MissingAtChannel => "MISSING_AT_CHANNEL",
        }
    }
}

/// One classified reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Its class.
    pub class: Class,
    /// The order reference.
    pub order_ref: String,
    /// The statement row, when on the statement.
    pub channel: Option<StatementRow>,
    /// sluice's entry, when known.
    pub sluice: Option<OwnEntry>,
}

/// The outcome of a reconciliation.
#[derive(Debug, Clone)]
pub struct Report {
    /// Channel.
    pub channel: String,
    /// Day, `YYYY-MM-DD` (China time).
    pub date: String,
    /// Every classified reference, differences and matches, sorted by class then ref.
    pub lines: Vec<Line>,
}

/// China-time (UTC+8) day number of a timestamp — statements are cut at Beijing midnight.
pub fn cst_day(ms: u64) -> u64 {
    (ms + 8 * 3_600_000) / 86_400_000
}

/// Day number (days since 1970-01-01) of `YYYY-MM-DD` (H. Hinnant's `days_from_civil`).
pub fn parse_date(s: &str) -> Option<u64> {
    let mut p = s.split('-');
    let y: i64 = p.next()?.parse().ok()?;
    let m: i64 = p.next()?.parse().ok()?;
    let d: i64 = p.next()?.parse().ok()?;
    if p.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    u64::try_from(era * 146_097 + doe - 719_468).ok()
}

/// Classify a statement of `day` (days since the epoch, China time) against `own`.
pub fn reconcile(statement: &Statement, own: &OwnRecord, day: u64) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut seen = HashSet::new();
    for row in &statement.rows {
        seen.insert(row.order_ref.as_str());
        let mine = own.entries.get(&row.order_ref);
        let class = match mine {
            None => Class::MissingInSluice,
            Some(m) if m.amount_fen != row.amount_fen => Class::AmountMismatch,
            Some(m) if m.status != OwnStatus::Final(row.status) => Class::StatusMismatch,
            Some(m) if cst_day(m.finished_at_ms) != day => Class::CrossDay,
            Some(_) => Class::Matched,
        };
        lines.push(Line {
            class,
            order_ref: row.order_ref.clone(),
            channel: Some(row.clone()),
            sluice: mine.cloned(),
        });
    }
    for (r, m) in &own.entries {
        if seen.contains(r.as_str()) {
            continue;
        }
        // Expected on this statement: final at sluice that day through this attempt.
        if let OwnStatus::Final(_) = m.status {
            if cst_day(m.finished_at_ms) == day {
                lines.push(Line {
                    class: Class::MissingAtChannel,
                    order_ref: r.clone(),
                    channel: None,
                    sluice: Some(m.clone()),
                });
            }
        }
    }
    lines.sort_by(|a, b| (a.class, &a.order_ref).cmp(&(b.class, &b.order_ref)));
    lines
}

impl Report {
    /// Lines of one class.
    pub fn of(&self, class: Class) -> impl Iterator<Item = &Line> {
        self.lines.iter().filter(move |l| l.class == class)
    }

    /// True when every reference matched (cross-day results count as matched).
    pub fn is_clean(&self) -> bool {
        self.lines
            .iter()
            .all(|l| matches!(l.class, Class::Matched | Class::CrossDay))
    }

    /// Differences (every class but MATCHED and CROSS_DAY).
    pub fn differences(&self) -> impl Iterator<Item = &Line> {
        self.lines
            .iter()
            .filter(|l| !matches!(l.class, Class::Matched | Class::CrossDay))
    }

    /// A readable summary: counts and amounts per class, then each difference.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "reconciliation of channel {} for {}\n",
            self.channel, self.date
        );
        for class in [
            Class::Matched,
            Class::CrossDay,
            Class::AmountMismatch,
            Class::StatusMismatch,
            Class::MissingInSluice,
            Class::MissingAtChannel,
        ] {
            let (n, fen) = self.of(class).fold((0u64, 0u64), |(n, f), l| {
                let amt = l
                    .channel
                    .as_ref()
                    .map(|c| c.amount_fen)
                    .or(l.sluice.as_ref().map(|m| m.amount_fen))
                    .unwrap_or(0);
                (n + 1, f + amt)
            });
            let _ = writeln!(s, "  {:<20} {:>8}  {:>16} fen", class.name(), n, fen);
        }
        let diffs: Vec<&Line> = self.differences().collect();
        if diffs.is_empty() {
            s.push_str("no differences\n");
        } else {
            let _ = writeln!(s, "{} differences:", diffs.len());
            for l in diffs {
                let _ = writeln!(s, "  {} {}: {}", l.class.name(), l.order_ref, describe(l));
            }
        }
        s
    }

    /// Write every difference as CSV (header line first) for machines.
    pub fn write_differences(&self, path: &Path) -> Result<(), ReconError> {
        let mut s = String::from(
            "class,order_ref,merchant,order_id,kind,channel_amount_fen,sluice_amount_fen,channel_status,sluice_status,channel_code,channel_serial,channel_finished_at_ms,sluice_finished_at_ms\n",
        );
        for l in self.differences() {
            let c = l.channel.as_ref();
            let m = l.sluice.as_ref();
            let fields = [
                l.class.name().to_string(),
                l.order_ref.clone(),
                m.map(|m| m.merchant.clone()).unwrap_or_default(),
                m.map(|m| m.order_id.clone()).unwrap_or_default(),
                c.map(|c| c.kind)
                    .or(m.map(|m| m.kind))
                    .map(|k| k.name().to_string())
                    .unwrap_or_default(),
                c.map(|c| c.amount_fen.to_string()).unwrap_or_default(),
                m.map(|m| m.amount_fen.to_string()).unwrap_or_default(),
                c.map(|c| c.status.name().to_string()).unwrap_or_default(),
                m.map(|m| m.status.name().to_string()).unwrap_or_default(),
                c.map(|c| c.code.clone()).unwrap_or_default(),
                c.map(|c| c.serial.clone()).unwrap_or_default(),
                c.map(|c| c.finished_at_ms.to_string()).unwrap_or_default(),
                m.map(|m| m.finished_at_ms.to_string()).unwrap_or_default(),
            ];
            let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
            s.push_str(&row.join(","));
            s.push('\n');
        }
        std::fs::write(path, s).map_err(|e| ReconError::Io {
            path: path.display().to_string(),
            source: e,
        })
    }
}

fn describe(l: &Line) -> String {
    match (&l.channel, &l.sluice) {
        (Some(c), Some(m)) => format!(
            "channel {} {} fen ({}), sluice {} {} fen (order {}/{})",
            c.status.name(),
            c.amount_fen,
            c.code,
            m.status.name(),
            m.amount_fen,
            m.merchant,
            m.order_id
        ),
        (Some(c), None) => format!(
            "channel {} {} fen ({}, serial {}), no record at sluice",
            c.status.name(),
            c.amount_fen,
            c.code,
            c.serial
        ),
        (None, Some(m)) => format!(
            "sluice {} {} fen (order {}/{}), not on the statement",
            m.status.name(),
            m.amount_fen,
            m.merchant,
            m.order_id
        ),
        (None, None) => String::new(),
    }
}

/// RFC 4180 quoting (order ids may hold commas and quotes).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `sluice recon --channel C --date D STATEMENT`: reconcile the statement file against
/// the journal in `journal_dir`, write the differences CSV to `out`, and return the
/// report (print [`Report::summary`]; exit non-zero unless [`Report::is_clean`]).
pub fn run(
    journal_dir: &Path,
    channel: &str,
    date: &str,
    statement: &Path,
    out: &Path,
) -> Result<Report, ReconError> {
    let day = parse_date(date)
        .ok_or_else(|| ReconError::Argument(format!("--date {date:?}: expected YYYY-MM-DD")))?;
    let ch = ChannelId::new(channel).map_err(|_| {
        ReconError::Argument(format!("--channel {channel:?}: 1–8 ASCII characters"))
    })?;
    let text = std::fs::read_to_string(statement).map_err(|e| ReconError::Io {
        path: statement.display().to_string(),
        source: e,
    })?;
    let st = parse_statement(&text)?;
    if st.date != date {
        return Err(ReconError::WrongDate {
            found: st.date,
            asked: date.to_string(),
        });
    }
    let own = OwnRecord::from_journal(journal_dir, &ch)?;
    let report = Report {
        channel: channel.to_string(),
        date: date.to_string(),
        lines: reconcile(&st, &own, day),
    };
    report.write_differences(out)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_with_the_simulators_calendar() {
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2024-01-02"), Some(19_724));
        assert_eq!(
            crate::sim::ledger::civil(parse_date("2000-02-29").unwrap()),
            "2000-02-29"
        );
        assert_eq!(parse_date("2024-13-01"), None);
        assert_eq!(cst_day(16 * 3_600_000), 1);
    }

    #[test]
    fn statement_parses_and_rejects_garbage_with_a_line_number() {
        let st = parse_statement(
            "# sluice-sim statement 2024-01-02 INST\nA|S1|DEBIT|100|SUCCESS|0000|1704164645678\n",
        )
        .unwrap();
        assert_eq!(st.date, "2024-01-02");
        assert_eq!(st.rows[0].amount_fen, 100);
        match parse_statement(
            "# sluice-sim statement 2024-01-02 INST\nA|S1|DEBIT|x|SUCCESS|0000|1\n",
        ) {
            Err(ReconError::Statement { line: 2, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(csv_field("a,\"b"), "\"a,\"\"b\"");
    }
}
