//! The doctor's report: what [`analyze`] returns, its JSON form
//! (`metaguard.doctor/v1`, documented in docs/doctor.md) and the human
//! rendering (grouped; coloured when asked).

use std::fmt::Write as _;

use serde::Serialize;

use super::findings::{self, Finding, Severity};
use super::path::{self, Flow, Source, TargetKind, Verdict};
use super::snapshot::Snapshot;

/// The schema id of the JSON report.
pub const SCHEMA: &str = "metaguard.doctor/v1";

/// Sizes of what was analysed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub iptables_rules: usize,
    pub nft_rules: usize,
    /// nft tables evaluated directly (`family name`).
    pub nft_tables: Vec<String>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// What was analysed (`this host` or the snapshot directory).
    pub source: String,
    /// The host's name, on a live run (`--merge` keys hosts by it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// No findings.
    pub ok: bool,
    pub findings: Vec<Finding>,
    pub flows: Vec<Flow>,
    pub notes: Vec<String>,
    pub stats: Stats,
}

/// Evaluates the flows and runs the checks.
pub fn analyze(snap: &Snapshot, source: &str) -> Report {
    let flows = path::evaluate(snap);
    let mut findings = findings::check(snap, &flows);
    findings.sort_by_key(|f| f.id.trim_start_matches('F').parse::<u32>().unwrap_or(0));
    let mut notes = Vec::new();
    let st = &snap.host;
    let count = |s: &Option<super::iptables_save::Save>| s.as_ref().map_or(0, |s| s.rule_count());
    let legacy = count(&st.legacy4) + count(&st.legacy6);
    let iptnft = count(&st.iptnft4) + count(&st.iptnft6);
    if legacy > 0 && iptnft > 0 {
        notes.push(format!(
            "both iptables backends hold rules (legacy: {legacy}, nft: {iptnft}); the kernel runs both — fixes go in the backend that holds the problem"
        ));
    }
    for f in &flows {
        if f.target == TargetKind::TaskCredentials
            && f.verdict.stopped()
            && f.steps
                .iter()
                .all(|s| !s.action.starts_with("dnat") && !s.action.starts_with("redirect"))
            && !snap
                .host
                .addrs
                .iter()
                .any(|a| a.addr.to_string() == f.destination.trim_end_matches(":80"))
        {
            notes.push(format!("{}: nothing DNATs 169.254.170.2 on this host (no ecs-init?); task credentials are not served here", f.name()));
        }
    }
    if snap.boot.is_none() {
        notes.push("no boot.json: boot ordering (F5) not checked".into());
    }
    if snap.imds_options.is_none() {
        notes.push("no imds-options.json: the IMDSv2 hop limit (F9) not checked".into());
    }
    if findings.is_empty() {
        notes.push("for a guard that survives Docker restarts and covers every mode: `metaguard apply` (or the daemon)".into());
    }
    notes.dedup();
    let mut nft_tables: Vec<String> = path::nft_tables(st)
        .into_iter()
        .map(|(f, n)| format!("{f} {n}"))
        .collect();
    nft_tables.sort();
    Report {
        schema: SCHEMA,
        source: source.to_string(),
        host: None,
        ok: findings.is_empty(),
        findings,
        flows,
        notes,
        stats: Stats {
            iptables_rules: legacy + iptnft,
            nft_rules: st.nft.as_ref().map_or(0, |r| r.rule_count()),
            nft_tables,
        },
    }
}

/// The finding ids of `after` that `before` did not have: what a fix
/// opened. `--fix` shows them and fails when there are any.
pub fn new_findings(before: &Report, after: &Report) -> Vec<&'static str> {
    after
        .findings
        .iter()
        .map(|f| f.id)
        .filter(|id| !before.findings.iter().any(|b| b.id == *id))
        .collect()
}

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl Report {
    /// The human rendering. `color`: ANSI colours.
    pub fn human(&self, color: bool) -> String {
        let c = |code: &'static str| if color { code } else { "" };
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{}metaguard doctor{} — {}",
            c(BOLD),
            c(RESET),
            self.source
        );
        let _ = writeln!(o);
        // Flow table.
        let _ = writeln!(
            o,
            "{}Flows{} (verdict for a new connection; ! = not what the config wants)",
            c(BOLD),
            c(RESET)
        );
        let mut rows: Vec<(String, Vec<&Flow>)> = Vec::new();
        for f in &self.flows {
            let key = match &f.interface {
                Some(i) if f.source != Source::AwsvpcTask => format!("{} ({i})", f.source.label()),
                _ => f.source.label().to_string(),
            };
            match rows.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(f),
                None => rows.push((key, vec![f])),
            }
        }
        let _ = write!(o, "  {:<32}", "workload");
        for t in TargetKind::ALL {
            let _ = write!(o, "{:<20}", t.label());
        }
        let _ = writeln!(o);
        for (k, fs) in &rows {
            let _ = write!(o, "  {k:<32}");
            for t in TargetKind::ALL {
                let Some(f) = fs.iter().find(|f| f.target == t) else {
                    let _ = write!(o, "{:<20}", "-");
                    continue;
                };
                let bad = match f.expect {
                    Some(path::Expect::Block) => f.verdict.reaches(),
                    Some(path::Expect::Reach) => f.verdict.stopped(),
                    None => {
                        f.target == TargetKind::TaskCredentials
                            && f.verdict.stopped()
                            && f.steps.iter().any(|s| {
                                s.action.starts_with("dnat") || s.action.starts_with("redirect")
                            })
                    }
                };
                let text = format!("{}{}", f.verdict.as_str(), if bad { " !" } else { "" });
                let col = match (bad, f.verdict) {
                    (true, _) => c(RED),
                    (false, Verdict::NotApplicable) => c(DIM),
                    (false, _) => c(GREEN),
                };
                let _ = write!(o, "{col}{text:<20}{}", c(RESET));
            }
            let _ = writeln!(o);
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "{}Deciding rules{}", c(BOLD), c(RESET));
        for f in &self.flows {
            if f.verdict == Verdict::NotApplicable {
                continue;
            }
            let by = f
                .decided_by
                .as_ref()
                .map_or_else(|| "no rule (policies accept)".to_string(), |d| d.describe());
            let _ = writeln!(o, "  {:<52} {:<10} {}", f.name(), f.verdict.as_str(), by);
            for s in f.steps.iter().filter(|s| s.action != "accept") {
                let _ = writeln!(o, "  {:<52} {:<10} {}", "", s.action, s.rule.describe());
            }
            for u in &f.assumed_not_matching {
                let _ = writeln!(o, "  {:<52} {:<10} {}", "", "assumed ≠", u.describe());
            }
        }
        let _ = writeln!(o);
        if self.findings.is_empty() {
            let _ = writeln!(
                o,
                "{}No findings.{} None of the known failure modes applies.",
                c(GREEN),
                c(RESET)
            );
        } else {
            let _ = writeln!(
                o,
                "{}Findings ({}){}",
                c(BOLD),
                self.findings.len(),
                c(RESET)
            );
            for f in &self.findings {
                let (sev, col) = match f.severity {
                    Severity::Error => ("error", c(RED)),
                    Severity::Warning => ("warning", c(YELLOW)),
                };
                let _ = writeln!(o);
                let _ = writeln!(o, "{col}{}{} {sev}{}: {}", c(BOLD), f.id, c(RESET), f.title);
                for fl in &f.flows {
                    let _ = writeln!(o, "    flow      {fl}");
                }
                for e in &f.evidence {
                    let _ = writeln!(o, "    evidence  {e}");
                }
                let _ = writeln!(o, "    why       {}", wrap(&f.explanation, 14, 96));
                let _ = writeln!(o, "    fix       {}", f.fix.summary);
                for cmd in &f.fix.commands {
                    let _ = writeln!(o, "              $ {cmd}");
                }
                for m in &f.fix.manual {
                    let _ = writeln!(o, "              - {m}");
                }
                if let Some(r) = &f.fix.refused {
                    let _ = writeln!(o, "              (--fix will not act: {r})");
                }
                let _ = writeln!(o, "    durable   {}", wrap(&f.fix.durable, 14, 96));
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(o);
            let _ = writeln!(o, "{}Notes{}", c(BOLD), c(RESET));
            for n in &self.notes {
                let _ = writeln!(o, "  - {n}");
            }
        }
        o
    }
}

fn wrap(text: &str, indent: usize, width: usize) -> String {
    let mut out = String::new();
    let mut col = indent;
    for (i, w) in text.split_whitespace().enumerate() {
        if i > 0 {
            if col + 1 + w.len() > width {
                out.push('\n');
                out.push_str(&" ".repeat(indent));
                col = indent;
            } else {
                out.push(' ');
                col += 1;
            }
        }
        out.push_str(w);
        col += w.len();
    }
    out
}
