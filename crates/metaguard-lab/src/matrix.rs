//! The reachability matrix: which workload reaches which metadata
//! endpoint, proven from both ends — the client's result *and* the
//! emulator's request log.

use std::fmt::Write as _;

use serde::Serialize;

use crate::probe::{Outcome, ProbeResult};
use crate::topology::{Lab, Workload};
use crate::LabError;

/// A column of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Target {
    ImdsV4,
    ImdsV6,
    TaskCredentials,
}

impl Target {
    pub const ALL: [Target; 3] = [Target::ImdsV4, Target::ImdsV6, Target::TaskCredentials];

    pub fn label(self) -> &'static str {
        match self {
            Target::ImdsV4 => "IMDS v4",
            Target::ImdsV6 => "IMDS v6",
            Target::TaskCredentials => "task credentials",
        }
    }

    fn url(self, w: Workload) -> String {
        match self {
            Target::ImdsV4 => Lab::imds_url_v4("/latest/meta-data/instance-id"),
            Target::ImdsV6 => Lab::imds_url_v6("/latest/meta-data/instance-id"),
            Target::TaskCredentials => Lab::credentials_url(w),
        }
    }
}

/// What one probe showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// HTTP 200 and the server logged the request.
    Reached,
    /// The server logged nothing and the client failed.
    Blocked,
    /// Anything else (an error status, or client and log disagree).
    Other,
}

/// One cell.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub target: Target,
    pub verdict: Verdict,
    /// The server's request log holds this probe.
    pub arrived: bool,
    pub result: ProbeResult,
}

impl Cell {
    fn text(&self) -> String {
        let ms = self.result.elapsed().as_secs_f64() * 1000.0;
        match (self.verdict, self.result.outcome, self.result.status) {
            (Verdict::Reached, _, Some(s)) => format!("reached {s} {ms:.0}ms"),
            (_, Outcome::Answered, Some(s)) => format!("HTTP {s} {ms:.0}ms"),
            (_, outcome, _) => format!("{} {ms:.0}ms", outcome.as_str()),
        }
    }
}

/// A row per workload, a cell per target.
#[derive(Debug, Clone, Serialize)]
pub struct Matrix {
    pub rows: Vec<(Workload, Vec<Cell>)>,
    /// Row labels other than [`Workload::label`] (a lab variant's role:
    /// c2 as the ECS agent on a bridge).
    #[serde(skip)]
    pub labels: Vec<(Workload, &'static str)>,
}

impl Matrix {
    /// Probes every (workload, target) pair, in parallel, and checks each
    /// probe against the emulators' logs.
    pub fn measure(lab: &Lab, workloads: &[Workload]) -> Result<Matrix, LabError> {
        let jobs: Vec<(Workload, Target)> = workloads
            .iter()
            .flat_map(|w| Target::ALL.iter().map(move |t| (*w, *t)))
            .collect();
        let results: Vec<Result<Cell, LabError>> = std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|(w, t)| s.spawn(move || probe_cell(lab, *w, *t)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(LabError::ProbeOutput("probe thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut rows: Vec<(Workload, Vec<Cell>)> =
            workloads.iter().map(|w| (*w, Vec::new())).collect();
        for ((w, _), cell) in jobs.iter().zip(results) {
            let cell = cell?;
            if let Some((_, cells)) = rows.iter_mut().find(|(rw, _)| rw == w) {
                cells.push(cell);
            }
        }
        Ok(Matrix {
            rows,
            labels: Vec::new(),
        })
    }

    pub fn cell(&self, w: Workload, t: Target) -> Option<&Cell> {
        self.rows
            .iter()
            .find(|(rw, _)| *rw == w)
            .and_then(|(_, cells)| cells.iter().find(|c| c.target == t))
    }
}

fn probe_cell(lab: &Lab, w: Workload, t: Target) -> Result<Cell, LabError> {
    let spec = lab.http_get(&t.url(w));
    let log = match t {
        Target::TaskCredentials => lab.agent().log(),
        Target::ImdsV4 | Target::ImdsV6 => lab.imds().log(),
    };
    // metaguard's relay forwards no probe header: a credentials request is
    // also known by its id (one probe per workload and target).
    let for_id = || {
        log.entries()
            .iter()
            .filter(|e| t == Target::TaskCredentials && e.target.contains(w.credentials_id()))
            .count()
    };
    let before = for_id();
    let result = lab.probe(w, &spec)?;
    let arrived = !log.with_header("x-lab-probe", &spec.id).is_empty() || for_id() > before;
    let verdict = match (arrived, result.ok()) {
        (true, true) => Verdict::Reached,
        (false, false) if result.outcome != Outcome::Answered => Verdict::Blocked,
        _ => Verdict::Other,
    };
    Ok(Cell {
        target: t,
        verdict,
        arrived,
        result,
    })
}

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

fn paint(text: &str, verdict: Verdict, width: usize, color: bool) -> String {
    let padded = format!("{text:<width$}");
    if !color {
        return padded;
    }
    let c = match verdict {
        Verdict::Reached => RED,
        Verdict::Blocked => GREEN,
        Verdict::Other => YELLOW,
    };
    format!("{c}{padded}{RESET}")
}

/// Renders one or two matrices side by side (`titles` name them). Cells:
/// `reached 200 3ms` means the endpoint answered and logged the request;
/// `refused 0ms` / `timeout 1000ms` mean the client failed and the
/// endpoint's log shows nothing arrived. With `color`, reaching a metadata
/// endpoint is red and blocked is green (the point of view of an attacker's
/// target, not of a health check).
pub fn render(matrices: &[(&str, &Matrix)], color: bool) -> String {
    const ROW_W: usize = 23;
    const CELL_W: usize = 19;
    let mut out = String::new();
    let group_w = CELL_W * Target::ALL.len();
    let _ = write!(out, "{:ROW_W$}", "");
    for (title, _) in matrices {
        let t = if color {
            format!("{BOLD}{title:<group_w$}{RESET}")
        } else {
            format!("{title:<group_w$}")
        };
        let _ = write!(out, "│ {t}");
    }
    out.push('\n');
    let _ = write!(out, "{:ROW_W$}", "workload");
    for _ in matrices {
        out.push_str("│ ");
        for t in Target::ALL {
            let _ = write!(out, "{:<CELL_W$}", t.label());
        }
    }
    out.push('\n');
    let rule =
        "─".repeat(ROW_W) + &("┼".to_string() + &"─".repeat(group_w + 1)).repeat(matrices.len());
    out.push_str(&rule);
    out.push('\n');
    let rows = matrices.first().map(|(_, m)| m.rows.len()).unwrap_or(0);
    for i in 0..rows {
        let w = matrices[0].1.rows[i].0;
        let label = matrices[0]
            .1
            .labels
            .iter()
            .find(|(lw, _)| *lw == w)
            .map_or(w.label(), |(_, l)| *l);
        let _ = write!(out, "{label:ROW_W$}");
        for (_, m) in matrices {
            out.push_str("│ ");
            for t in Target::ALL {
                match m.cell(w, t) {
                    Some(c) => out.push_str(&paint(&c.text(), c.verdict, CELL_W, color)),
                    None => {
                        let _ = write!(out, "{:<CELL_W$}", "-");
                    }
                }
            }
        }
        out.push('\n');
    }
    out
}
