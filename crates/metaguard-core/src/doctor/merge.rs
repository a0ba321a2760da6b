//! `metaguard doctor --merge FILE…`: many hosts' `doctor --json` outputs
//! into one table of host × finding (human, or JSON
//! `metaguard.doctor-merge/v1`).
//!
//! Input: a `metaguard.doctor/v1` report (`doctor --json`), or a
//! `metaguard.doctor-fix/v1` document (`doctor --fix --json`; its `after`
//! report, else its `report`). A file that is neither fails with
//! `FILE:LINE:COLUMN: …`. The host is the report's `host` (live runs
//! write the host name), else the file's name without `.json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The schema id of the merged JSON.
pub const SCHEMA: &str = "metaguard.doctor-merge/v1";

/// An input that is not a doctor report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct MergeError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// One finding as a report lists it (the fields the table needs).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct HostFinding {
    pub id: String,
    pub severity: String,
    #[serde(default)]
    pub title: String,
}

/// One host's report, as far as the merge reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostReport {
    pub host: String,
    /// The file it was read from.
    pub file: String,
    pub ok: bool,
    pub findings: Vec<HostFinding>,
}

#[derive(Deserialize)]
struct InReport {
    schema: String,
    #[serde(default)]
    host: Option<String>,
    findings: Vec<HostFinding>,
}

#[derive(Deserialize)]
struct InFix {
    schema: String,
    #[serde(default)]
    after: Option<InReport>,
    #[serde(default)]
    report: Option<InReport>,
}

/// The 1-based line and column of byte offset `at` of `text`.
fn position(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Where `"key"` first appears in `text` (1:1 if nowhere).
fn key_position(text: &str, key: &str) -> (usize, usize) {
    text.find(&format!("\"{key}\""))
        .map_or((1, 1), |at| position(text, at))
}

/// The host name a file gives when its report names none.
fn host_of_file(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    base.strip_suffix(".json").unwrap_or(base).to_string()
}

/// Reads one host's `doctor --json` output; `file` names it in errors.
pub fn parse_report(file: &str, text: &str) -> Result<HostReport, MergeError> {
    let err = |(line, column): (usize, usize), message: String| MergeError {
        file: file.to_string(),
        line,
        column,
        message,
    };
    let json_err = |e: serde_json::Error| {
        err(
            (e.line().max(1), e.column().max(1)),
            format!("not a `metaguard doctor --json` report: {e}"),
        )
    };
    let v: serde_json::Value = serde_json::from_str(text).map_err(json_err)?;
    let schema = v.get("schema").and_then(|s| s.as_str()).unwrap_or("");
    let rep: InReport = match schema {
        super::report::SCHEMA => serde_json::from_str(text).map_err(json_err)?,
        "metaguard.doctor-fix/v1" => {
            let fix: InFix = serde_json::from_str(text).map_err(json_err)?;
            let _ = fix.schema;
            match fix.after.or(fix.report) {
                Some(r) => r,
                None => {
                    return Err(err(
                        key_position(text, "schema"),
                        "a `doctor --fix --json` document without \"after\" or \"report\"".into(),
                    ))
                }
            }
        }
        "" => {
            return Err(err(
                (1, 1),
                format!(
                    "no \"schema\": expected the output of `metaguard doctor --json` ({})",
                    super::report::SCHEMA
                ),
            ))
        }
        other => {
            return Err(err(
                key_position(text, "schema"),
                format!(
                    "schema {other:?} is not a doctor report (expected {})",
                    super::report::SCHEMA
                ),
            ))
        }
    };
    let _ = rep.schema;
    for f in &rep.findings {
        if f.severity != "error" && f.severity != "warning" {
            return Err(err(
                key_position(text, "severity"),
                format!(
                    "finding {}: severity {:?} is neither error nor warning",
                    f.id, f.severity
                ),
            ));
        }
    }
    Ok(HostReport {
        host: rep
            .host
            .filter(|h| !h.trim().is_empty())
            .unwrap_or_else(|| host_of_file(file)),
        file: file.to_string(),
        ok: rep.findings.is_empty(),
        findings: rep.findings,
    })
}

/// A finding across the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FleetFinding {
    pub id: String,
    pub severity: String,
    pub title: String,
    /// The hosts that have it, in input order.
    pub hosts: Vec<String>,
}

/// The merged table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Merged {
    pub schema: &'static str,
    /// Every host is clean.
    pub ok: bool,
    pub hosts: Vec<HostReport>,
    /// By id (F1, F2, …, F10, …).
    pub findings: Vec<FleetFinding>,
}

fn id_number(id: &str) -> u32 {
    id.trim_start_matches('F').parse().unwrap_or(u32::MAX)
}

/// Merges hosts' reports.
pub fn merge(hosts: Vec<HostReport>) -> Merged {
    let mut by_id: BTreeMap<(u32, String), FleetFinding> = BTreeMap::new();
    for h in &hosts {
        for f in &h.findings {
            let e = by_id
                .entry((id_number(&f.id), f.id.clone()))
                .or_insert_with(|| FleetFinding {
                    id: f.id.clone(),
                    severity: f.severity.clone(),
                    title: f.title.clone(),
                    hosts: Vec::new(),
                });
            if f.severity == "error" {
                e.severity = "error".into();
            }
            if !e.hosts.contains(&h.host) {
                e.hosts.push(h.host.clone());
            }
        }
    }
    Merged {
        schema: SCHEMA,
        ok: hosts.iter().all(|h| h.ok),
        hosts,
        findings: by_id.into_values().collect(),
    }
}

impl Merged {
    /// The human table: one row per host, one column per finding id
    /// (`E` error, `W` warning, `.` not found), then each finding's title
    /// and how many hosts have it.
    pub fn human(&self) -> String {
        let mut o = String::new();
        let width = self
            .hosts
            .iter()
            .map(|h| h.host.chars().count())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = write!(o, "{:<width$}", "host");
        for f in &self.findings {
            let _ = write!(o, " {:>4}", f.id);
        }
        let _ = writeln!(o);
        for h in &self.hosts {
            let _ = write!(o, "{:<width$}", h.host);
            for f in &self.findings {
                let cell = match h.findings.iter().find(|x| x.id == f.id) {
                    Some(x) if x.severity == "error" => "E",
                    Some(_) => "W",
                    None => ".",
                };
                let _ = write!(o, " {cell:>4}");
            }
            if h.ok {
                let _ = write!(o, "  ok");
            }
            let _ = writeln!(o);
        }
        let _ = writeln!(o);
        if self.findings.is_empty() {
            let _ = writeln!(o, "{} host(s), no findings.", self.hosts.len());
        }
        for f in &self.findings {
            let _ = writeln!(
                o,
                "{:<4} {:<7} {}/{} hosts  {}",
                f.id,
                f.severity,
                f.hosts.len(),
                self.hosts.len(),
                f.title
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(host: Option<&str>, ids: &[(&str, &str)]) -> String {
        let findings: Vec<serde_json::Value> = ids
            .iter()
            .map(|(id, sev)| serde_json::json!({"id": id, "severity": sev, "title": format!("t {id}")}))
            .collect();
        let mut v = serde_json::json!({"schema": "metaguard.doctor/v1", "source": "this host", "ok": ids.is_empty(), "findings": findings, "flows": []});
        if let Some(h) = host {
            v["host"] = serde_json::json!(h);
        }
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    #[test]
    fn merges_hosts_by_id_in_numeric_order() {
        let a = parse_report(
            "a.json",
            &report(Some("ip-10-0-0-1"), &[("F17", "error"), ("F2", "error")]),
        );
        let b = parse_report("dir/i-0abc.json", &report(None, &[("F2", "warning")]));
        let c = parse_report("c.json", &report(Some("c"), &[]));
        let m = merge(vec![
            a.expect("a parses"),
            b.expect("b parses"),
            c.expect("c parses"),
        ]);
        assert!(!m.ok);
        let ids: Vec<&str> = m.findings.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["F2", "F17"]);
        assert_eq!(m.findings[0].hosts, ["ip-10-0-0-1", "i-0abc"]);
        assert_eq!(m.findings[0].severity, "error");
        let human = m.human();
        assert!(human.contains("i-0abc"), "{human}");
        assert!(
            human
                .lines()
                .any(|l| l.starts_with("c ") && l.ends_with("ok")),
            "{human}"
        );
    }

    #[test]
    fn bad_inputs_name_file_line_and_column() {
        let e = parse_report(
            "x.json",
            "{\n  \"schema\": \"metaguard.doctor/v1\",\n  \"findings\": [1]\n}",
        )
        .expect_err("bad finding");
        assert_eq!((e.file.as_str(), e.line), ("x.json", 3));
        let e =
            parse_report("y.json", "{\n  \"schema\": \"other/v1\"\n}").expect_err("other schema");
        assert_eq!((e.line, e.column), (2, 3));
        let e = parse_report("z.json", "not json").expect_err("not JSON");
        assert_eq!(e.line, 1);
        assert!(e.to_string().starts_with("z.json:1:"), "{e}");
    }

    #[test]
    fn a_fix_document_is_read_by_its_after_report() {
        let fix = format!(
            "{{\"schema\": \"metaguard.doctor-fix/v1\", \"dry_run\": false, \"after\": {}}}",
            report(Some("h"), &[("F14", "warning")])
        );
        let r = parse_report("f.json", &fix).expect("fix document");
        assert_eq!(r.findings.len(), 1);
        assert_eq!(r.host, "h");
    }
}
