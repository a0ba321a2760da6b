//! `metaguard report [--config PATH] [--since DUR] [--json] [--suggest]`:
//! what observe mode recorded, and what `--config` would break if it were
//! enforced (docs/observe.md). Reads the observe log (`proxy::observe`),
//! asks `core::observe` (the proxy's own decision code) about each
//! access, and prints a table, JSON or a suggested config. Needs no root
//! beyond reading the log's directory.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metaguard_core::config::{Origin, BUILTIN_DEFAULT_TOML};
use metaguard_core::observe::{self, Report, Window};
use metaguard_core::Config;

use super::{config, ConfigArg};

/// `report`'s arguments, validated.
#[derive(Debug)]
pub struct Args<'a> {
    pub config: &'a ConfigArg,
    /// `--since`, as given and in seconds.
    pub since: Option<(String, u64)>,
    pub json: bool,
    pub suggest: bool,
    pub observe_dir: &'a Path,
}

/// `--since`'s value parser: a usage error (exit 2) when not a duration.
pub fn parse_since(s: &str) -> Result<(String, u64), String> {
    observe::parse_since(s)
        .map(|secs| (s.to_string(), secs))
        .map_err(|e| e.to_string().replace("--since ", ""))
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The config as it would be enforced (`mode = "observe"` ignored).
fn enforced(arg: &ConfigArg) -> anyhow::Result<Config> {
    let (config, text) = config::load_with_text(arg)?;
    Ok(match &config.origin {
        Origin::BuiltinDefault => {
            let mut c = Config::parse_enforced(BUILTIN_DEFAULT_TOML, "<built-in default>")?;
            c.origin = Origin::BuiltinDefault;
            c
        }
        Origin::File(path) => Config::parse_enforced(&text, path)?,
    })
}

pub fn run(args: &Args<'_>) -> anyhow::Result<ExitCode> {
    let config = enforced(args.config)?;
    let cutoff = args.since.as_ref().map(|(_, s)| now() - *s as f64);
    let read = metaguard_proxy::observe::read(args.observe_dir, cutoff)?;
    if read.missing {
        eprintln!(
            "metaguard: no observe records in {}: nothing was observed here yet (run `metaguard daemon` with a config that observes; docs/observe.md)",
            args.observe_dir.display()
        );
    }
    if read.skipped > 0 {
        eprintln!(
            "warning: skipped {} line(s) in {} that are not observe records (cut short by a crash, or corrupt)",
            read.skipped,
            args.observe_dir.display()
        );
    }
    if args.suggest {
        print!(
            "{}",
            observe::suggest_with(&config, &read.records, &read.connections)
        );
        return Ok(ExitCode::SUCCESS);
    }
    let window = Window {
        since: args.since.as_ref().map(|(s, _)| s.clone()),
        skipped_lines: read.skipped,
        truncated: read.truncated,
        ..Window::default()
    };
    let report = observe::report_with(&config, &read.records, &read.connections, window);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn when(t: f64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs_f64(t.max(0.0)))
}

/// "first – last", or one time when they are the same second.
fn span(first: f64, last: f64) -> String {
    let (a, b) = (when(first), when(last));
    if a == b {
        a
    } else {
        format!("{a} – {b}")
    }
}

/// The report as a table: one line per access, grouped per workload and
/// caller.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let w = &r.window;
    let _ = writeln!(out, "config: {}", r.config);
    match (w.from, w.to) {
        (Some(from), Some(to)) => {
            let _ = write!(
                out,
                "window: {}, {} request(s)",
                span(from, to),
                r.summary.requests
            );
            let conns = w.records.saturating_sub(r.summary.requests);
            if conns > 0 {
                let _ = write!(out, ", {conns} connection record(s)");
            }
        }
        _ => {
            let _ = write!(out, "window: no records");
        }
    }
    if let Some(s) = &w.since {
        let _ = write!(out, " (--since {s})");
    }
    let _ = writeln!(out);
    if w.truncated {
        let _ = writeln!(
            out,
            "TRUNCATED: rotation dropped older records; the window starts at the oldest record kept"
        );
    }
    if w.skipped_lines > 0 {
        let _ = writeln!(
            out,
            "skipped: {} line(s) that are not records",
            w.skipped_lines
        );
    }
    for wl in &r.workloads {
        let actions = match (wl.imds, wl.task_metadata) {
            (Some(i), Some(t)) => format!("imds = {i}, task_metadata = {t}"),
            _ => "not in the config: untouched".to_string(),
        };
        if wl.workload.is_empty() {
            // Connection records of a namespace the daemon had not
            // classified yet (its workload was not known).
            let _ = writeln!(out, "\nno workload (a namespace not classified yet)");
        } else {
            let _ = writeln!(out, "\nworkload {} ({actions})", wl.workload);
        }
        if !wl.needs_credentials_ids.is_empty() {
            let _ = writeln!(
                out,
                "  needs credentials_ids: {} (used by callers the relay knows no id of; proxy would refuse them — see --suggest)",
                wl.needs_credentials_ids.join(", ")
            );
        }
        for c in &wl.callers {
            let who = match &c.container {
                Some(ci) => {
                    let mut s = format!(
                        "container {} ({})",
                        if ci.name.is_empty() { "?" } else { &ci.name },
                        ci.id.chars().take(12).collect::<String>()
                    );
                    if let Some(i) = &ci.image {
                        let _ = write!(s, " image {i}");
                    }
                    if let Some(f) = &ci.task_family {
                        let _ = write!(s, " task family {f}");
                    }
                    if let Some(a) = &ci.task_arn {
                        let _ = write!(s, " task {a}");
                    }
                    s
                }
                None => c.caller.clone(),
            };
            let _ = writeln!(out, "  {who}");
            for a in &c.accesses {
                let versions = if a.service == "imds" {
                    format!("v1 {:>4} v2 {:>4}", a.v1, a.v2)
                } else {
                    format!("{:14}", "")
                };
                let _ = writeln!(
                    out,
                    "    {:<5} {:<13} {:<4} {:<46} ×{:<5} {versions}  {}{}",
                    if a.would == "deny" { "DENY" } else { "allow" },
                    a.service,
                    a.method,
                    a.path,
                    a.count,
                    span(a.first_seen, a.last_seen),
                    if a.would == "deny" {
                        format!("  ({})", a.rule)
                    } else {
                        String::new()
                    }
                );
                if a.over_limit > 0 {
                    let _ = writeln!(
                        out,
                        "          over [proxy] rate or max_connections ×{} (served under observe; proxy would refuse them)",
                        a.over_limit
                    );
                }
                if !a.access_key_ids.is_empty() {
                    let _ = writeln!(out, "          AccessKeyId {}", a.access_key_ids.join(", "));
                }
            }
            for k in &c.connections {
                let mark = match k.would {
                    "deny" => "DENY",
                    "requests" => "http",
                    _ => "allow",
                };
                let _ = writeln!(
                    out,
                    "    {mark:<5} {:<13} conn {:<46} ×{:<5} {:<14}  {}{}",
                    k.service,
                    format!("{}/{} ({})", k.protocol, k.port, k.families.join(", ")),
                    k.count,
                    "",
                    span(k.first_seen, k.last_seen),
                    if k.would == "deny" {
                        format!("  ({})", k.rule)
                    } else {
                        String::new()
                    }
                );
                let pids: Vec<String> = k.pids.iter().map(ToString::to_string).collect();
                let _ = writeln!(
                    out,
                    "          comm {}; pid {}; cgroup {}",
                    k.comms.join(", "),
                    pids.join(", "),
                    k.cgroups.join(", ")
                );
            }
        }
    }
    let s = &r.summary;
    let _ = writeln!(
        out,
        "\n{} access(es) in {} request(s); the config would deny {} of them ({} request(s))",
        s.accesses, s.requests, s.would_deny, s.would_deny_requests
    );
    if s.connections > 0 {
        let _ = writeln!(
            out,
            "{} connection(s) recorded; the config would refuse {} of them (http: port-80 TCP under proxy, decided by its requests)",
            s.connections, s.would_deny_connections
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaguard_core::observe::{Connection, ContainerInfo, KIND_CONNECTION, RECORD_VERSION};

    fn conn(workload: &str, protocol: &str, port: u16) -> Connection {
        Connection {
            v: RECORD_VERSION,
            kind: KIND_CONNECTION.into(),
            time: 1_796_623_166.0,
            first: 1_796_623_165.0,
            count: 2,
            service: "imds".into(),
            workload: workload.into(),
            container: Some(ContainerInfo {
                id: "0d73cbc6e4e8ffff".into(),
                name: "c1".into(),
                ..ContainerInfo::default()
            }),
            caller: "container c1".into(),
            cgroup: "docker/c1".into(),
            pid: 17574,
            comm: "dig".into(),
            family: "ipv4".into(),
            protocol: protocol.into(),
            port,
            syscall: "sendmsg".into(),
        }
    }

    #[test]
    fn the_table_lists_connections_with_their_processes() {
        let config = Config::parse_enforced(
            "[[workload]]\nname = \"containers\"\nbridges = [\"docker0\"]\nimds = \"proxy\"\n",
            "t.toml",
        )
        .expect("config");
        let r = observe::report_with(
            &config,
            &[],
            &[
                conn("containers", "udp", 53),
                conn("containers", "tcp", 80),
                conn("", "udp", 53),
            ],
            Window::default(),
        );
        let t = table(&r);
        assert!(t.contains(", 0 request(s), 3 connection record(s)"), "{t}");
        assert!(
            t.contains("no workload (a namespace not classified yet)"),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.contains("DENY  imds          conn udp/53 (ipv4)")
                    && l.contains("only HTTP on TCP port 80")),
            "{t}"
        );
        assert!(t.contains("http  imds          conn tcp/80 (ipv4)"), "{t}");
        assert!(t.contains("comm dig; pid 17574; cgroup docker/c1"), "{t}");
        assert!(
            t.contains("6 connection(s) recorded; the config would refuse 2 of them"),
            "{t}"
        );
    }
}
