//! The proxy's metrics after real traffic: every `metaguard_proxy_*`
//! series equals what the clients saw — requests by service, workload,
//! decision and status (allowed, denied, throttled, failed upstream), the
//! upstream latency histogram's count per service, upstream failures,
//! connections refused at the per-workload cap — and the scrape passes
//! promtool. The audit log has one line for each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libtest_mimic::Failed;
use metaguard_lab::topology::{addr, Role};
use metaguard_lab::{Lab, Workload};

use crate::daemon::{Daemon, Signal};
use crate::ensure;
use crate::proxy::{audit_lines, json_body};
use crate::support::{curl_codes, lab, promtool_check};

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[(
    "proxy_metrics::every_proxy_metric_counts_the_traffic_clients_saw_and_passes_promtool",
    true,
    every_proxy_metric_counts_the_traffic_clients_saw_and_passes_promtool,
)];

/// The metric families the proxy registers.
const FAMILIES: [(&str, &str); 6] = [
    ("metaguard_proxy_requests_total", "counter"),
    ("metaguard_proxy_upstream_seconds", "histogram"),
    ("metaguard_proxy_upstream_errors_total", "counter"),
    ("metaguard_proxy_refused_connections_total", "counter"),
    ("metaguard_proxy_cache_total", "counter"),
    ("metaguard_proxy_stale_answers_total", "counter"),
];

/// c1 ("one", by its namespace) and every other docker0 container ("two")
/// proxied for both services; a small bucket and two connections each;
/// no answer cache, so that every allowed request is one upstream
/// observation (the cache's own counts are checked in `proxy_cache`).
fn config(lab: &Lab, audit: &Path, agent: &str) -> String {
    format!(
        r#"
[agent]
credentials = "{agent}"

[proxy]
audit_log = "{}"
rate = 2
burst = 20
max_connections = 2
cache = false

[[workload]]
name = "one"
netns = ["{}"]
imds = "proxy"
task_metadata = "proxy"

[[workload]]
name = "two"
bridges = ["docker0"]
imds = "proxy"
task_metadata = "proxy"
"#,
        audit.display(),
        Path::new("/run/netns")
            .join(lab.netns_name(Role::C1))
            .display()
    )
}

/// One sample of a scrape.
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub fn parse(body: &str) -> Vec<Sample> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect();
            Some(Sample {
                name: name.to_string(),
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

/// The sum of `name`'s samples whose labels include every pair of `with`.
pub fn value(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
        .map(|s| s.value)
        .sum()
}

pub fn scrape(lab: &Lab) -> Result<String, Failed> {
    let r = lab.probe(
        Workload::HostOther,
        &lab.http_get("http://127.0.0.1:9469/metrics"),
    )?;
    ensure!(r.ok(), "metrics: {r:?}");
    Ok(r.body.unwrap_or_default())
}

/// The proxy's decision for an answer the client saw.
fn decision(status: u16) -> &'static str {
    match status {
        200 => "allow",
        403 => "deny",
        429 => "throttle",
        _ => "error",
    }
}

fn every_proxy_metric_counts_the_traffic_clients_saw_and_passes_promtool() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let audit = lab.work_dir().join("audit.jsonl");
    let path: PathBuf = lab.write_file(
        "metrics.toml",
        &config(&lab, &audit, &format!("127.0.0.1:{}", addr::AGENT_PORT)),
    )?;
    let daemon = Daemon::start(&lab, &path.display().to_string(), &[])?;
    let before = parse(&scrape(&lab)?);
    ensure!(
        value(&before, "metaguard_proxy_requests_total", &[]) == 0.0,
        "requests counted before any traffic"
    );
    let imds = |p: &str| Lab::imds_url_v4(p);
    let creds = |w: Workload| Lab::credentials_url(w);
    let (one, two) = (Workload::BridgeC1, Workload::BridgeC2);
    // (workload's name, service, URLs) — answers recorded as seen.
    let batches: Vec<(Workload, &str, &str, Vec<String>)> = vec![
        (
            one,
            "one",
            "imds",
            vec![
                imds("/latest/meta-data/instance-id"),
                Lab::imds_url_v6("/latest/meta-data/instance-id"),
                imds("/latest/meta-data/placement/region"),
                imds("/latest/meta-data/iam/security-credentials/"),
                imds("/latest/user-data"),
            ],
        ),
        (
            one,
            "one",
            "task_metadata",
            vec![creds(one), creds(one), creds(two)],
        ),
        (
            two,
            "two",
            "imds",
            vec![
                imds("/latest/meta-data/instance-id"),
                imds("/latest/meta-data/iam/info"),
            ],
        ),
        (
            two,
            "two",
            "task_metadata",
            vec![creds(two), creds(one), creds(one)],
        ),
        // Back to back, more than "two"'s bucket holds: some are throttled.
        (
            two,
            "two",
            "imds",
            vec![imds("/latest/meta-data/instance-id"); 40],
        ),
    ];
    let mut seen: BTreeMap<(String, String, u16), usize> = BTreeMap::new();
    let mut total = 0;
    for (w, name, service, urls) in &batches {
        let codes = curl_codes(&lab, *w, urls)?;
        ensure!(
            codes.len() == urls.len() && codes.iter().all(|c| [200, 403, 429].contains(c)),
            "{name} {service}: {codes:?}\n{}",
            daemon.log_text()
        );
        for c in codes {
            *seen
                .entry((name.to_string(), service.to_string(), c))
                .or_default() += 1;
            total += 1;
        }
    }
    let throttled: usize = seen
        .iter()
        .filter(|((_, _, c), _)| *c == 429)
        .map(|(_, n)| n)
        .sum();
    ensure!(throttled > 0, "nothing was throttled: {seen:?}");
    eprintln!("requests as the clients saw them: {seen:?}");
    // "two" at its cap of two connections: a third is closed at once.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut sh = lab.command_in(two, "bash")?;
        sh.args([
            "-c",
            &format!("exec 3<>/dev/tcp/{}/80 && sleep 3", addr::TASK_METADATA_V4),
        ]);
        holders.push(sh.spawn()?);
    }
    std::thread::sleep(Duration::from_millis(300));
    let refused = curl_codes(&lab, two, &[creds(two)])?;
    for mut h in holders {
        let _ = h.wait();
    }
    ensure!(
        refused == [0],
        "a third connection of \"two\" should be closed unanswered: {refused:?}"
    );
    // The agent gone (moved to a port nothing listens on): a 502.
    std::fs::write(&path, config(&lab, &audit, "127.0.0.1:9"))?;
    daemon.signal(Signal::HUP)?;
    daemon.wait_log("reloaded: new config applied", Duration::from_secs(5))?;
    // The 502 names the caller's workload, like every refusal.
    let failed = lab.probe(one, &lab.http_get(&creds(one)))?;
    ensure!(
        failed.status == Some(502) && json_body(&failed)["workload"] == "one",
        "relay with the agent gone: {failed:?}"
    );
    *seen
        .entry(("one".into(), "task_metadata".into(), 502))
        .or_default() += 1;
    total += 1;

    let body = scrape(&lab)?;
    promtool_check(&body)?;
    for (family, kind) in FAMILIES {
        ensure!(
            body.contains(&format!("# TYPE {family} {kind}\n"))
                && body.contains(&format!("# HELP {family} ")),
            "{family}: no HELP/TYPE {kind}:\n{body}"
        );
    }
    let m = parse(&body);
    let requests = "metaguard_proxy_requests_total";
    for ((workload, service, status), n) in &seen {
        let got = value(
            &m,
            requests,
            &[
                ("service", service),
                ("workload", workload),
                ("decision", decision(*status)),
                ("status", &status.to_string()),
            ],
        );
        ensure!(
            got == *n as f64,
            "{requests} {workload} {service} {status}: {got}, clients saw {n}\n{body}"
        );
    }
    ensure!(
        value(&m, requests, &[]) == total as f64,
        "{requests}: {} in all, clients made {total}\n{body}",
        value(&m, requests, &[])
    );
    // Every request forwarded and answered is one observation.
    for service in ["imds", "task_metadata"] {
        let forwarded: usize = seen
            .iter()
            .filter(|((_, s, c), _)| s == service && *c == 200)
            .map(|(_, n)| n)
            .sum();
        let count = value(
            &m,
            "metaguard_proxy_upstream_seconds_count",
            &[("service", service)],
        );
        let inf = value(
            &m,
            "metaguard_proxy_upstream_seconds_bucket",
            &[("service", service), ("le", "+Inf")],
        );
        let sum = value(
            &m,
            "metaguard_proxy_upstream_seconds_sum",
            &[("service", service)],
        );
        eprintln!(
            "upstream {service}: {count} answers, mean {:.2} ms",
            sum / count * 1000.0
        );
        ensure!(
            count == forwarded as f64 && inf == count && sum > 0.0 && sum / count < 0.5,
            "upstream_seconds {service}: count {count}, +Inf {inf}, sum {sum}; forwarded {forwarded}"
        );
        let mut buckets: Vec<(f64, f64)> = m
            .iter()
            .filter(|s| {
                s.name == "metaguard_proxy_upstream_seconds_bucket"
                    && s.labels.get("service").is_some_and(|x| x == service)
            })
            .filter_map(|s| Some((s.labels.get("le")?.parse().ok()?, s.value)))
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        ensure!(
            buckets.windows(2).all(|p| p[0].1 <= p[1].1),
            "upstream_seconds {service}: buckets not cumulative: {buckets:?}"
        );
    }
    for (service, n) in [("imds", 0.0), ("task_metadata", 1.0)] {
        let got = value(
            &m,
            "metaguard_proxy_upstream_errors_total",
            &[("service", service)],
        );
        ensure!(got == n, "upstream_errors_total {service}: {got}, want {n}");
    }
    let refusals = "metaguard_proxy_refused_connections_total";
    ensure!(
        value(
            &m,
            refusals,
            &[("workload", "two"), ("reason", "connection-limit")]
        ) == 1.0
            && value(&m, refusals, &[]) == 1.0,
        "{refusals}:\n{body}"
    );
    // The audit log: a line per request and one for the refused connection.
    let lines = audit_lines(&audit);
    let refused_lines = lines
        .iter()
        .filter(|l| l["decision"] == "refused-connection")
        .count();
    ensure!(
        lines.len() == total + 1 && refused_lines == 1,
        "audit: {} lines ({refused_lines} refused connections) for {total} requests",
        lines.len()
    );
    Ok(())
}
