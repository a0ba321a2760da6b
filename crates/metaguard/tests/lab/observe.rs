//! Observe mode in the lab (docs/observe.md): under `mode = "observe"` the
//! mixed lab's traffic — a bridge container on IMDSv1, one on IMDSv2 with
//! the instance role and its task credentials, an awsvpc task using only
//! its task credentials, a host-network container, the ECS agent — all
//! passes, and `metaguard report` lists exactly those accesses, each
//! attributed to its workload and container; enforcing `--suggest`'s config
//! serves the same traffic and refuses a new path or workload; a daemon
//! killed mid-traffic loses no record of a request it answered; the size
//! cap rotates and the report says its window is truncated; a CNI
//! namespace the relay knows no id of is reported as needing
//! `credentials_ids`, and served once they are filled in. With the BPF
//! layer on, every connection of an observed workload (UDP, other ports)
//! is recorded with its pid and comm, and nothing of an `allow` one.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use libtest_mimic::Failed;
use metaguard_lab::daemon::Signal;
use metaguard_lab::probe::{ProbeKind, ProbeResult};
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, Workload};
use serde_json::Value;

use crate::daemon::Daemon;
use crate::ensure;
use crate::proxy::{get, json_body};
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "observe::mixed_lab_report_attributes_every_access_and_blocks_nothing",
        true,
        mixed_lab_report_attributes_every_access_and_blocks_nothing,
    ),
    (
        "observe::enforcing_the_suggestion_denies_nothing_observed_and_the_rest",
        true,
        enforcing_the_suggestion_denies_nothing_observed_and_the_rest,
    ),
    (
        "observe::a_daemon_killed_mid_traffic_loses_no_answered_record",
        true,
        a_daemon_killed_mid_traffic_loses_no_answered_record,
    ),
    (
        "observe::the_cap_rotates_keeps_the_newest_and_the_report_says_truncated",
        true,
        the_cap_rotates_keeps_the_newest_and_the_report_says_truncated,
    ),
    (
        "observe::a_cni_namespace_is_reported_as_needing_credentials_ids_and_served_once_they_are_filled_in",
        true,
        a_cni_namespace_is_reported_as_needing_credentials_ids_and_served_once_they_are_filled_in,
    ),
    (
        "observe::over_the_proxys_limits_observed_traffic_is_served_and_proxied_is_not",
        true,
        over_the_proxys_limits_observed_traffic_is_served_and_proxied_is_not,
    ),
    (
        "observe::bpf_records_every_connection_with_pid_and_comm_and_refuses_none",
        true,
        bpf_records_every_connection_with_pid_and_comm_and_refuses_none,
    ),
];

const IMDS: &str = "http://169.254.169.254";
const ROLE_PATH: &str = "/latest/meta-data/iam/security-credentials/lab-instance-role";

/// The lab's policy as it would be enforced (the agent keeps IMDS; every
/// container is denied IMDS and gets only its own task credentials), under
/// `mode = "observe"` (or not). The task namespaces' workload comes before
/// the bridges its traffic crosses (ecs-bridge): a caller is its first
/// workload's for the proxy and the report, while both workloads' rules
/// apply to it (docs/observe.md, "Limits").
fn policy(lab: &Lab, observe: bool) -> Result<String, Failed> {
    let text = format!(
        r#"{mode}
[[workload]]
name          = "ecs-agent"
cgroups       = ["{agent}"]
imds          = "allow"

[[workload]]
name          = "tasks"
netns         = ["ecs-tasks"]
imds          = "deny"
task_metadata = "proxy"

[[workload]]
name          = "containers"
bridges       = ["docker0", "ecs-bridge"]
imds          = "deny"
task_metadata = "proxy"

[[workload]]
name          = "host-network"
cgroups       = ["{root}/docker"]
imds          = "deny"
task_metadata = "proxy"
"#,
        mode = if observe { "mode = \"observe\"\n" } else { "" },
        agent = lab.cgroup_of(Workload::Agent),
        root = lab.cgroup_root(),
    );
    let name = if observe {
        "observe.toml"
    } else {
        "enforce.toml"
    };
    Ok(lab.write_file(name, &text)?.display().to_string())
}

fn observe_dir(lab: &Lab) -> PathBuf {
    lab.work_dir().join("observe")
}

fn daemon(lab: &Lab, config: &str, extra: &[&str]) -> Result<Daemon, Failed> {
    let dir = observe_dir(lab).display().to_string();
    let mut args = vec!["--observe-dir", dir.as_str()];
    args.extend_from_slice(extra);
    Ok(Daemon::start(lab, config, &args)?)
}

fn http(
    lab: &Lab,
    w: Workload,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<ProbeResult, Failed> {
    let mut spec = lab.http_get(url);
    if let ProbeKind::Http {
        method: m,
        headers: h,
        ..
    } = &mut spec.kind
    {
        *m = method.to_string();
        h.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    }
    Ok(lab.probe(w, &spec)?)
}

/// The mixed traffic; every request must succeed. Returns what was sent,
/// as (workload label, service, method, path) — the accesses the report
/// must list.
fn traffic(lab: &Lab) -> Result<(), Failed> {
    let ok = |what: &str, r: &ProbeResult| -> Result<(), Failed> {
        ensure!(r.ok(), "{what}: blocked or failed under observe: {r:?}");
        Ok(())
    };
    // c1: IMDSv1, instance-id, twice.
    for _ in 0..2 {
        let r = get(
            lab,
            Workload::BridgeC1,
            &format!("{IMDS}/latest/meta-data/instance-id"),
        )?;
        ok("c1 IMDSv1 instance-id", &r)?;
    }
    // c2: IMDSv2 (token, then the instance role's credentials) and its
    // own task credentials.
    let t = http(
        lab,
        Workload::BridgeC2,
        "PUT",
        &format!("{IMDS}/latest/api/token"),
        &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
    )?;
    ok("c2 token PUT", &t)?;
    let token = t.body.clone().unwrap_or_default();
    let r = http(
        lab,
        Workload::BridgeC2,
        "GET",
        &format!("{IMDS}{ROLE_PATH}"),
        &[("X-aws-ec2-metadata-token", token.trim())],
    )?;
    ok("c2 IMDSv2 role credentials", &r)?;
    ok(
        "c2 task credentials",
        &get(
            lab,
            Workload::BridgeC2,
            &Lab::credentials_url(Workload::BridgeC2),
        )?,
    )?;
    // The awsvpc task: its task credentials only.
    ok(
        "task credentials",
        &get(
            lab,
            Workload::AwsvpcTask,
            &Lab::credentials_url(Workload::AwsvpcTask),
        )?,
    )?;
    // The host-network container: IMDSv1.
    ok(
        "host-network IMDSv1",
        &get(
            lab,
            Workload::HostNetwork,
            &format!("{IMDS}/latest/meta-data/instance-id"),
        )?,
    )?;
    // The agent: IMDS (allow: not observed).
    ok(
        "agent IMDS",
        &get(
            lab,
            Workload::Agent,
            &format!("{IMDS}/latest/meta-data/instance-id"),
        )?,
    )?;
    Ok(())
}

fn report(lab: &Lab, config: &str, extra: &[&str]) -> Result<std::process::Output, Failed> {
    let dir = observe_dir(lab).display().to_string();
    let mut args = vec!["report", "--config", config, "--observe-dir", dir.as_str()];
    args.extend_from_slice(extra);
    Ok(lab.metaguard(&args)?)
}

fn report_json(lab: &Lab, config: &str) -> Result<Value, Failed> {
    let out = report(lab, config, &["--json"])?;
    ensure!(
        out.status.success(),
        "report --json: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The report with what differs per run (times, ids, the lab's prefix,
/// keys) replaced, for the snapshot.
fn normalized(mut v: Value, lab: &Lab) -> Value {
    fn walk(v: &mut Value, prefix: &str) {
        match v {
            Value::Object(m) => {
                // The awsvpc task's container (either of two) shows its image.
                let task = m
                    .get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.starts_with("ecs-lab-api-1-"));
                if let (true, Some(image)) = (task, m.get_mut("image")) {
                    *image = Value::from("<the image of that container>");
                }
                for (k, x) in m.iter_mut() {
                    match k.as_str() {
                        "from" | "to" | "first_seen" | "last_seen" if x.is_number() => {
                            *x = Value::from(0)
                        }
                        "id" => *x = Value::from("<id>"),
                        "caller" => *x = Value::from("<caller>"),
                        "config" => *x = Value::from("<config>"),
                        "access_key_ids" => {
                            if let Value::Array(a) = x {
                                a.iter_mut().for_each(|k| *k = Value::from("<key>"));
                            }
                        }
                        "path" => {
                            if let Some(s) = x.as_str() {
                                if let Some(rest) = s.strip_prefix("/v2/credentials/") {
                                    let _ = rest;
                                    *x = Value::from("/v2/credentials/<id>…");
                                }
                            }
                        }
                        _ => walk(x, prefix),
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, prefix)),
            // Which of the awsvpc task's two containers (the pause one,
            // the application, sharing one namespace) answers for it is
            // the directory's choice; the test checks it is one of them.
            Value::String(s) if s.starts_with("ecs-lab-api-1-") => {
                *s = "<a container of the awsvpc task>".into();
            }
            Value::String(s) => *s = s.replace(prefix, "<lab>"),
            _ => {}
        }
    }
    walk(&mut v, lab.id());
    v
}

/// Every entry of list `field` (`accesses`, `connections`) of every caller
/// in `report`, with its workload's name and its container's name (`-`
/// for none).
fn entries<'a>(report: &'a Value, field: &'a str) -> Vec<(String, String, &'a Value)> {
    let mut out = Vec::new();
    for w in report["workloads"].as_array().into_iter().flatten() {
        let workload = w["workload"].as_str().unwrap_or_default();
        for c in w["callers"].as_array().into_iter().flatten() {
            let name = c["container"]["name"].as_str().unwrap_or("-");
            for e in c[field].as_array().into_iter().flatten() {
                out.push((workload.to_string(), name.to_string(), e));
            }
        }
    }
    out
}

fn accesses(report: &Value) -> Vec<(String, String, String, String, String, u64)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    entries(report, "accesses")
        .into_iter()
        .map(|(w, name, a)| {
            (
                w,
                name,
                text(&a["service"]),
                text(&a["method"]),
                text(&a["path"]),
                a["count"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn mixed_lab_report_attributes_every_access_and_blocks_nothing() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let observe = policy(&lab, true)?;
    let d = daemon(&lab, &observe, &[])?;
    traffic(&lab)?;
    let v = report_json(&lab, &observe)?;
    let got = accesses(&v);
    let cred = |w: Workload| format!("/v2/credentials/{}…", &w.credentials_id()[..4]);
    let want = vec![
        (
            "containers".to_string(),
            "ecs-lab-web-1-app-c1".to_string(),
            "imds".to_string(),
            "GET".to_string(),
            "/latest/meta-data/instance-id".to_string(),
            2,
        ),
        (
            "containers".into(),
            "ecs-lab-web-1-sidecar-c2".to_string(),
            "imds".into(),
            "GET".into(),
            ROLE_PATH.into(),
            1,
        ),
        (
            "containers".into(),
            "ecs-lab-web-1-sidecar-c2".to_string(),
            "imds".into(),
            "PUT".into(),
            "/latest/api/token".into(),
            1,
        ),
        (
            "containers".into(),
            "ecs-lab-web-1-sidecar-c2".to_string(),
            "task_metadata".into(),
            "GET".into(),
            cred(Workload::BridgeC2),
            1,
        ),
        (
            "host-network".into(),
            "ecs-lab-batch-1-worker-h1".to_string(),
            "imds".into(),
            "GET".into(),
            "/latest/meta-data/instance-id".into(),
            1,
        ),
    ];
    // The awsvpc task's credentials come over ecs-bridge (the first
    // workload that selects it) from one of its task's containers.
    let task: Vec<_> = got
        .iter()
        .filter(|a| a.4 == cred(Workload::AwsvpcTask))
        .collect();
    ensure!(
        task.len() == 1 && task[0].1.contains("ecs-lab-api-1-") && task[0].2 == "task_metadata",
        "the awsvpc task's credentials: {task:?} in {got:?}\n{}",
        d.log_text()
    );
    let mut rest: Vec<_> = got
        .iter()
        .filter(|a| a.4 != cred(Workload::AwsvpcTask))
        .cloned()
        .collect();
    rest.sort();
    ensure!(
        rest == want,
        "the report's accesses:\n got {rest:?}\nwant {want:?}\n{}",
        serde_json::to_string_pretty(&v)?
    );
    // v1/v2, the instance role's AccessKeyId, and what enforcing would break.
    let text = serde_json::to_string(&v)?;
    ensure!(
        v["summary"]["would_deny"] == 4 && v["window"]["truncated"] == false,
        "the enforced config would deny every IMDS access of the containers: {}",
        serde_json::to_string_pretty(&v)?
    );
    ensure!(
        text.contains("\"access_key_ids\":[\"ASIA"),
        "no AccessKeyId: {text}"
    );
    let records = std::fs::read_to_string(observe_dir(&lab).join("observe.jsonl"))?;
    ensure!(
        !records.contains("SecretAccessKey")
            && !records.contains(Workload::BridgeC2.credentials_id()),
        "a secret or a whole credentials id in the records: {records}"
    );
    insta::assert_snapshot!(
        "observe_mixed_lab_report",
        serde_json::to_string_pretty(&normalized(v, &lab))?
    );
    // The table names the same, and marks what would break.
    let out = report(&lab, &observe, &[])?;
    let table = String::from_utf8_lossy(&out.stdout);
    if std::env::var_os("METAGUARD_OBSERVE_SHOW").is_some() {
        // For docs/observe.md's walkthrough: the real output.
        let suggested = report(&lab, &observe, &["--suggest"])?;
        eprintln!(
            "--- observe.toml\n{}\n--- report\n{table}\n--- report --suggest\n{}",
            std::fs::read_to_string(&observe)?,
            String::from_utf8_lossy(&suggested.stdout)
        );
    }
    ensure!(
        table.contains("DENY  imds")
            && table.contains("would deny 4")
            && table.contains("image public.ecr.aws/nginx/nginx:1.27"),
        "the table: {table}"
    );
    Ok(())
}

fn enforcing_the_suggestion_denies_nothing_observed_and_the_rest() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let observe = policy(&lab, true)?;
    let mut d = daemon(&lab, &observe, &[])?;
    traffic(&lab)?;
    let out = report(&lab, &observe, &["--suggest"])?;
    ensure!(
        out.status.success(),
        "--suggest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let suggested = String::from_utf8_lossy(&out.stdout).to_string();
    let path = lab
        .write_file("suggested.toml", &suggested)?
        .display()
        .to_string();
    d.kill();
    let d = daemon(&lab, &path, &[])?;
    // The same traffic passes under the suggestion, enforced.
    traffic(&lab).map_err(|e| format!("{e:?}\nsuggested:\n{suggested}\n{}", d.log_text()))?;
    // A new path, and a workload's service nobody observed, are refused.
    let r = get(
        &lab,
        Workload::BridgeC1,
        &format!("{IMDS}/latest/meta-data/ami-id"),
    )?;
    ensure!(r.status == Some(403), "a new IMDS path: {r:?}\n{suggested}");
    let r = get(
        &lab,
        Workload::AwsvpcTask,
        &format!("{IMDS}/latest/meta-data/instance-id"),
    )?;
    ensure!(
        !r.ok(),
        "the task's IMDS (never observed): {r:?}\n{suggested}"
    );
    let r = get(
        &lab,
        Workload::HostNetwork,
        &Lab::credentials_url(Workload::HostNetwork),
    )?;
    ensure!(
        !r.ok(),
        "the host-network container's credentials (never observed): {r:?}\n{suggested}"
    );
    let r = get(
        &lab,
        Workload::BridgeC1,
        &Lab::credentials_url(Workload::BridgeC2),
    )?;
    ensure!(
        r.status == Some(403),
        "c1 asking for c2's credentials: {r:?}\n{suggested}"
    );
    let body = json_body(&r);
    ensure!(
        body["rule"].as_str().is_some_and(|s| s.contains("F13")),
        "{body}"
    );
    Ok(())
}

/// A GET from lab namespace `netns` (no cgroup).
fn get_in(lab: &Lab, netns: &str, url: &str) -> Result<ProbeResult, Failed> {
    let child = lab.spawn_probe_in(netns, &lab.http_get(url))?;
    Ok(lab.finish_probe(child)?)
}

/// A namespace a CNI plugin made (no Docker container shows it, so the
/// relay knows none of its credentials ids) uses its own credentials under
/// observe: the report says its workload needs `credentials_ids`, the
/// suggestion leaves the line to fill in (and keeps `allow`, so enforcing
/// it as printed serves what was observed), and once the operator writes
/// the full id and `proxy`, the namespace gets its own credentials and
/// nobody else's (F13).
fn a_cni_namespace_is_reported_as_needing_credentials_ids_and_served_once_they_are_filled_in(
) -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let cni = lab.add_docker0_netns("cni1", "vethcni1", "172.17.0.50")?;
    let cni_id = "cni1-5e2d9a41-credentials";
    lab.agent()
        .add_credentials(cni_id, "arn:aws:iam::111122223333:role/lab-cni1");
    let creds = |id: &str| format!("http://169.254.170.2/v2/credentials/{id}");
    let policy = format!(
        r#"mode = "observe"

[[workload]]
name          = "cni"
netns         = ["/run/netns/{prefix}-cni*"]
imds          = "deny"
task_metadata = "proxy"

[[workload]]
name          = "containers"
bridges       = ["docker0", "ecs-bridge"]
imds          = "deny"
task_metadata = "proxy"
"#,
        prefix = format_args!("mglab-{}", lab.id()),
    );
    let observe = lab
        .write_file("observe-cni.toml", &policy)?
        .display()
        .to_string();
    let mut d = daemon(&lab, &observe, &[])?;
    let r = get_in(&lab, &cni, &creds(cni_id))?;
    ensure!(
        r.ok(),
        "the CNI namespace's own credentials under observe: {r:?}\n{}",
        d.log_text()
    );
    let r = get(
        &lab,
        Workload::BridgeC1,
        &Lab::credentials_url(Workload::BridgeC1),
    )?;
    ensure!(r.ok(), "c1's own credentials under observe: {r:?}");
    let v = report_json(&lab, &observe)?;
    let needs = |name: &str| {
        v["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["workload"] == name)
            .map(|w| w["needs_credentials_ids"].clone())
    };
    ensure!(
        needs("cni") == Some(serde_json::json!(["cni1…"]))
            && needs("containers") == Some(Value::Null),
        "needs_credentials_ids: {}",
        serde_json::to_string_pretty(&v)?
    );
    let table = String::from_utf8_lossy(&report(&lab, &observe, &[])?.stdout).to_string();
    ensure!(table.contains("needs credentials_ids: cni1…"), "{table}");
    let out = report(&lab, &observe, &["--suggest"])?;
    let suggested = String::from_utf8_lossy(&out.stdout).to_string();
    let placeholder = "# credentials_ids = [\"<full credentials id cni1…>\"]";
    ensure!(
        out.status.success()
            && suggested.contains(placeholder)
            && !suggested.contains(cni_id)
            && !suggested.contains(Workload::BridgeC1.credentials_id()),
        "the suggestion: {suggested}"
    );
    // As printed, it serves what was observed.
    let printed = lab
        .write_file("suggested-cni.toml", &suggested)?
        .display()
        .to_string();
    d.kill();
    let mut d = daemon(&lab, &printed, &[])?;
    let r = get_in(&lab, &cni, &creds(cni_id))?;
    ensure!(
        r.ok(),
        "the suggestion as printed: {r:?}\n{suggested}\n{}",
        d.log_text()
    );
    // Filled in as its comment says: the namespace's own credentials and
    // nobody else's, and no IMDS (never observed).
    let filled = suggested
        .replace(placeholder, &format!("credentials_ids = [\"{cni_id}\"]"))
        .replace(
            "task_metadata = \"allow\"  # ids the relay cannot",
            "task_metadata = \"proxy\"  # ids the relay cannot",
        );
    ensure!(filled != suggested, "nothing to fill in: {suggested}");
    let filled_path = lab
        .write_file("filled-cni.toml", &filled)?
        .display()
        .to_string();
    d.kill();
    let d = daemon(&lab, &filled_path, &[])?;
    let r = get_in(&lab, &cni, &creds(cni_id))?;
    ensure!(
        r.ok(),
        "its own credentials, filled in: {r:?}\n{filled}\n{}",
        d.log_text()
    );
    let r = get_in(&lab, &cni, &creds(Workload::BridgeC1.credentials_id()))?;
    ensure!(
        r.status == Some(403)
            && json_body(&r)["rule"]
                .as_str()
                .is_some_and(|s| s.contains("F13")),
        "c1's credentials from the CNI namespace: {r:?}\n{filled}"
    );
    let r = get_in(&lab, &cni, &format!("{IMDS}/latest/meta-data/instance-id"))?;
    ensure!(
        !r.ok(),
        "the namespace's IMDS (never observed): {r:?}\n{filled}"
    );
    Ok(())
}

/// `[proxy] rate`, `burst` and `max_connections` never refuse observed
/// traffic (docs/observe.md): from c1, one connection held open while a
/// second makes a request, then 8 requests at once, against `max_connections
/// = 1`, `rate = 1`, `burst = 2`. Under `proxy` the second connection is
/// closed unanswered and the burst ends in 429s; under `observe` every
/// request is answered, and the records say what `proxy` would have
/// refused (`over_limit`), with the decision the proxy took (`allow`).
fn over_the_proxys_limits_observed_traffic_is_served_and_proxied_is_not() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let url = format!("{IMDS}/latest/meta-data/instance-id");
    // The held connection sends nothing (the proxy's header timeout is
    // 5 s); the second connects a second later, while it is open.
    let mut script = format!(
        "exec 3<>/dev/tcp/169.254.169.254/80; sleep 1; \
         curl -s -m 5 -o /dev/null -w 'held:%{{http_code}} ' {url}; exec 3>&-; sleep 0.5; curl -s -m 10"
    );
    for _ in 0..8 {
        script.push_str(&format!(" -o /dev/null -w '%{{http_code}} ' {url}"));
    }
    script.push_str("; true");
    let mut codes = Vec::new();
    for action in ["proxy", "observe"] {
        let policy = if action == "proxy" {
            "\n[workload.imds_policy]\nallow = [\"/latest/meta-data/instance-id\"]\n"
        } else {
            ""
        };
        let text = format!(
            "[proxy]\nrate = 1\nburst = 2\nmax_connections = 1\n\n\
             [[workload]]\nname = \"containers\"\nbridges = [\"docker0\", \"ecs-bridge\"]\n\
             imds = \"{action}\"\n{policy}"
        );
        let path = lab
            .write_file(&format!("limits-{action}.toml"), &text)?
            .display()
            .to_string();
        let mut d = daemon(&lab, &path, &[])?;
        let started = std::time::Instant::now();
        let out = lab.run_in(Role::C1, "bash", &["-c", &script])?;
        let took = started.elapsed();
        d.kill();
        codes.push((
            action,
            out.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>(),
            took,
        ));
    }
    // The bucket holds at most `burst` (2) tokens when the 8 start, and
    // refills by 1 a second while they run (at most the whole run, less
    // its 1.5 s of sleeps): at least this many are over the rate.
    let over_rate =
        |took: Duration| 8usize.saturating_sub(3 + took.as_secs().saturating_sub(1) as usize);
    let (_, proxied, took) = &codes[0];
    ensure!(
        proxied.first().map(String::as_str) == Some("held:000")
            && proxied.iter().filter(|c| *c == "429").count() >= over_rate(*took),
        "proxy: the second connection closed unanswered, the burst throttled: {proxied:?} in {took:?}"
    );
    let (_, observed, _) = &codes[1];
    ensure!(
        observed.len() == 9
            && observed[0] == "held:200"
            && observed[1..].iter().all(|c| c == "200"),
        "observe: everything answered: {observed:?}"
    );
    let read = std::fs::read_to_string(observe_dir(&lab).join("observe.jsonl"))?;
    let recs: Vec<Value> = read
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let over: Vec<&str> = recs
        .iter()
        .map(|r| r["over_limit"].as_str().unwrap_or("-"))
        .collect();
    ensure!(
        recs.len() == 9
            && recs
                .iter()
                .all(|r| r["decision"] == "allow" && r["status"] == 200)
            && over[0] == "connections"
            && over.iter().filter(|o| **o == "rate").count() >= over_rate(codes[1].2),
        "the records' over_limit: {over:?}\n{read}"
    );
    if std::env::var_os("METAGUARD_OBSERVE_SHOW").is_some() {
        eprintln!("limits: {codes:?}; observed records' over_limit: {over:?}");
    }
    let v = report_json(&lab, &path_of(&lab, "limits-observe.toml"))?;
    let over_total: u64 = v["workloads"][0]["callers"][0]["accesses"][0]["over_limit"]
        .as_u64()
        .unwrap_or(0);
    ensure!(over_total >= 1, "the report's over_limit: {v}");
    Ok(())
}

fn path_of(lab: &Lab, name: &str) -> String {
    lab.work_dir().join(name).display().to_string()
}

fn a_daemon_killed_mid_traffic_loses_no_answered_record() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let observe = policy(&lab, true)?;
    let mut d = daemon(&lab, &observe, &[])?;
    // The host-network container's port-80 connections go to the proxy
    // or are refused (no daemon): every answer it gets is the proxy's, so
    // each must have its record.
    let lab = Arc::new(lab);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (lab, stop) = (lab.clone(), stop.clone());
        std::thread::spawn(move || -> (u64, u64) {
            let (mut sent, mut answered) = (0, 0);
            while !stop.load(Ordering::Relaxed) && sent < 2000 {
                sent += 1;
                let url = format!("{IMDS}/latest/meta-data/instance-id");
                if get(&lab, Workload::HostNetwork, &url).is_ok_and(|r| r.ok()) {
                    answered += 1;
                }
            }
            (sent, answered)
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    d.signal(Signal::KILL)?;
    let _ = d.wait_exit(Duration::from_secs(5))?;
    let d = daemon(&lab, &observe, &[])?;
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let (sent, answered) = load.join().map_err(|_| "the load thread panicked")?;
    let v = report_json(&lab, &observe)?;
    let recorded: u64 = accesses(&v)
        .iter()
        .filter(|a| a.0 == "host-network")
        .map(|a| a.5)
        .sum();
    ensure!(
        answered >= 10 && recorded >= answered && recorded <= sent,
        "sent {sent}, answered {answered}, recorded {recorded}\n{}",
        d.log_text()
    );
    ensure!(v["window"]["skipped_lines"].as_u64() == Some(0), "{v}");
    if std::env::var_os("METAGUARD_OBSERVE_SHOW").is_some() {
        eprintln!("restart: sent {sent}, answered {answered}, recorded {recorded}");
    }
    Ok(())
}

fn the_cap_rotates_keeps_the_newest_and_the_report_says_truncated() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let observe = policy(&lab, true)?;
    // 8 files of 4 KiB: some 90 records.
    let _d = daemon(&lab, &observe, &["--observe-max-bytes", "32768"])?;
    // 300 requests on one connection (curl's URL globbing), then a last,
    // different one.
    lab.run_in(
        Role::C1,
        "curl",
        &[
            "-s",
            "-m",
            "60",
            "-o",
            "/dev/null",
            &format!("{IMDS}/latest/meta-data/n[1-300]"),
        ],
    )?;
    let last = get(
        &lab,
        Workload::BridgeC1,
        &format!("{IMDS}/latest/meta-data/instance-id"),
    )?;
    ensure!(last.ok(), "{last:?}");
    let dir = observe_dir(&lab);
    let files: Vec<(String, u64)> = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                e.metadata().map_or(0, |m| m.len()),
            )
        })
        .collect();
    let total: u64 = files.iter().map(|f| f.1).sum();
    let logs = files
        .iter()
        .filter(|f| f.0.starts_with("observe.jsonl"))
        .count();
    ensure!(logs == 8 && total <= 32768 + 4096, "files: {files:?}");
    let v = report_json(&lab, &observe)?;
    let got = accesses(&v);
    let records: u64 = got.iter().map(|a| a.5).sum();
    ensure!(
        v["window"]["truncated"] == true && records < 301 && records > 50,
        "records {records}, window {}",
        v["window"]
    );
    // The newest are kept: the last request and the last of the 300.
    ensure!(
        got.iter().any(|a| a.4 == "/latest/meta-data/instance-id")
            && got.iter().any(|a| a.4 == "/latest/meta-data/n300")
            && !got.iter().any(|a| a.4 == "/latest/meta-data/n1"),
        "{got:?}"
    );
    let table = String::from_utf8_lossy(&report(&lab, &observe, &[])?.stdout).to_string();
    ensure!(table.contains("TRUNCATED"), "{table}");
    // A window inside what is kept is whole.
    let out = report(&lab, &observe, &["--json", "--since", "1d"])?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["window"]["truncated"] == true,
        "a day back reaches past the dropped records: {}",
        v["window"]
    );
    let bad = report(&lab, &observe, &["--since", "yesterday"])?;
    ensure!(
        bad.status.code() == Some(2),
        "a bad --since: {:?}",
        bad.status
    );
    Ok(())
}

/// The connection test's policy: the bridge containers and the
/// host-network container (by its cgroup), `imds` as given (`observe` via
/// `mode`, or `allow`); a third workload on the lab's `system.slice`
/// observes IMDS either way, so the log is open and programs are attached
/// in the control too.
fn connections_policy(lab: &Lab, observe: bool) -> Result<String, Failed> {
    let root = lab.cgroup_root();
    let (mode, action) = if observe {
        ("mode = \"observe\"\n", "deny")
    } else {
        ("", "allow")
    };
    let text = format!(
        r#"{mode}
[[workload]]
name          = "containers"
bridges       = ["docker0"]
imds          = "{action}"
task_metadata = "allow"

[[workload]]
name          = "host-network"
cgroups       = ["{root}/docker/hostnet1"]
imds          = "{action}"
task_metadata = "allow"

[[workload]]
name          = "elsewhere"
cgroups       = ["{root}/system.slice"]
imds          = "observe"

[layers]
container_cgroups = ["{root}/docker", "{root}/system.slice"]
"#
    );
    let name = if observe {
        "connections-observe.toml"
    } else {
        "connections-allow.toml"
    };
    Ok(lab.write_file(name, &text)?.display().to_string())
}

/// UDP (`sendto`) and TCP (`connect`) to IMDS's echo ports, IPv4 and IPv6,
/// from c1; HTTP to IMDS from the host-network container. Every probe must
/// be answered. Returns the probes' (pid, comm) per workload.
fn connection_traffic(lab: &Lab) -> Result<Vec<(Workload, u32, String)>, Failed> {
    use metaguard_lab::probe::ProbeSpec;
    use metaguard_lab::topology::addr;
    let mut out = Vec::new();
    let mut run = |w: Workload, spec: ProbeSpec| -> Result<(), Failed> {
        let r = lab.probe(w, &spec)?;
        ensure!(
            r.ok(),
            "{:?} from {}: refused or failed: {r:?}",
            spec.kind,
            w.label()
        );
        out.push((w, r.pid.unwrap_or(0), r.comm.clone().unwrap_or_default()));
        Ok(())
    };
    for host in ["169.254.169.254", "fd00:ec2::254"] {
        run(
            Workload::BridgeC1,
            ProbeSpec {
                id: lab.probe_id("udp-sendto"),
                kind: ProbeKind::UdpSendTo {
                    host: host.into(),
                    port: addr::ECHO_UDP_PORT,
                },
                timeout_ms: 5000,
            },
        )?;
        run(
            Workload::BridgeC1,
            ProbeSpec {
                id: lab.probe_id("tcp"),
                kind: ProbeKind::Tcp {
                    host: host.into(),
                    port: addr::ECHO_TCP_PORT,
                },
                timeout_ms: 5000,
            },
        )?;
    }
    let mut spec = lab.http_get(&format!("{IMDS}/latest/meta-data/instance-id"));
    spec.timeout_ms = 5000;
    run(Workload::HostNetwork, spec)?;
    Ok(out)
}

/// (workload, container name, service, protocol, port).
type ConnKey = (String, String, String, String, u64);

/// The connections of `report`: their key and the entry.
fn connections_of(report: &Value) -> Vec<(ConnKey, Value)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let mut out: Vec<(ConnKey, Value)> = entries(report, "connections")
        .into_iter()
        .map(|(w, name, k)| {
            let key = (
                w,
                name,
                text(&k["service"]),
                text(&k["protocol"]),
                k["port"].as_u64().unwrap_or(0),
            );
            (key, k.clone())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn bpf_records_every_connection_with_pid_and_comm_and_refuses_none() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.mount_bpffs()?;
    lab.start_docker_api()?;
    let observe = connections_policy(&lab, true)?;
    let d = daemon(&lab, &observe, &[])?;
    let sent = connection_traffic(&lab)?;
    // Runs are written once their 1 s window has passed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (v, got) = loop {
        let v = report_json(&lab, &observe)?;
        let got = connections_of(&v);
        if got.len() >= 3 || std::time::Instant::now() > deadline {
            break (v, got);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let keys: Vec<_> = got.iter().map(|(k, _)| k.clone()).collect();
    let c1 = "ecs-lab-web-1-app-c1".to_string();
    let h1 = "ecs-lab-batch-1-worker-h1".to_string();
    let key = |w: &str, c: &String, p: &str, port: u16| {
        (
            w.to_string(),
            c.clone(),
            "imds".to_string(),
            p.to_string(),
            u64::from(port),
        )
    };
    let want = vec![
        key(
            "containers",
            &c1,
            "tcp",
            metaguard_lab::topology::addr::ECHO_TCP_PORT,
        ),
        key(
            "containers",
            &c1,
            "udp",
            metaguard_lab::topology::addr::ECHO_UDP_PORT,
        ),
        key("host-network", &h1, "tcp", 80),
    ];
    ensure!(
        keys == want,
        "connections:\n got {keys:?}\nwant {want:?}\n{}\n{}",
        serde_json::to_string_pretty(&v)?,
        d.log_text()
    );
    for ((w, _, _, proto, _), k) in &got {
        let label = if w == "containers" {
            Workload::BridgeC1
        } else {
            Workload::HostNetwork
        };
        let mine: Vec<&(Workload, u32, String)> =
            sent.iter().filter(|(sw, _, _)| *sw == label).collect();
        let pids: Vec<u64> = k["pids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .collect();
        let comms: Vec<&str> = k["comms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        // Each connection kind came from probes of that workload: their
        // pids, their comm.
        ensure!(
            !pids.is_empty()
                && pids
                    .iter()
                    .all(|p| mine.iter().any(|(_, pid, _)| u64::from(*pid) == *p)),
            "{w} {proto}: pids {pids:?}, the probes' {mine:?}"
        );
        ensure!(
            !comms.is_empty() && comms.iter().all(|c| mine.iter().any(|(_, _, m)| m == c)),
            "{w} {proto}: comms {comms:?}, the probes' {mine:?}"
        );
        let families = k["families"].to_string();
        if w == "containers" {
            ensure!(
                families == r#"["ipv4","ipv6"]"#,
                "{w} {proto}: families {families}"
            );
            // Enforced, `imds = "deny"` would refuse them.
            ensure!(k["would"] == "deny", "{w} {proto}: {k}");
        }
        ensure!(
            k["cgroups"].to_string().contains("docker/"),
            "{w} {proto}: cgroups {}",
            k["cgroups"]
        );
    }
    // The host-network container's HTTP is also a request, next to it.
    ensure!(
        accesses(&v)
            .iter()
            .any(|a| a.0 == "host-network" && a.1 == h1 && a.4 == "/latest/meta-data/instance-id"),
        "the host-network request: {}",
        serde_json::to_string_pretty(&v)?
    );
    // Nothing was refused by the programs.
    let log = d.log_text();
    ensure!(
        !log.contains("bpf-refusal"),
        "a refusal under observe: {log}"
    );
    let table = String::from_utf8_lossy(&report(&lab, &observe, &[])?.stdout).to_string();
    if std::env::var_os("METAGUARD_OBSERVE_SHOW").is_some() {
        // For docs/observe.md: the real output.
        let records = std::fs::read_to_string(observe_dir(&lab).join("observe.jsonl"))?;
        let suggested = report(&lab, &observe, &["--suggest"])?;
        eprintln!(
            "--- records\n{records}\n--- report\n{table}\n--- report --suggest\n{}",
            String::from_utf8_lossy(&suggested.stdout)
        );
    }
    ensure!(
        table.contains("conn udp/5353 (ipv4, ipv6)") && table.contains("connection(s) recorded"),
        "the table: {table}"
    );
    drop(d);

    // A restarted daemon reads on from where the first left the pinned
    // ring buffer (its consumer position is not 0 any more: aya's reader
    // alone would read past the end forever and leave the ring full).
    let d = daemon(&lab, &observe, &[])?;
    let sent = connection_traffic(&lab)?;
    let pid = u64::from(sent[0].1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = report_json(&lab, &observe)?;
        let seen = connections_of(&v)
            .iter()
            .any(|(_, k)| k["pids"].as_array().into_iter().flatten().any(|p| p == pid));
        if seen {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no connection record after a restart (pid {pid}): {}\n{}",
            serde_json::to_string_pretty(&v)?,
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    drop(d);

    // Control: the same probes, the workloads `allow` — no connection
    // record (only `elsewhere` observes, and it sends nothing).
    std::fs::remove_dir_all(observe_dir(&lab))?;
    let allow = connections_policy(&lab, false)?;
    let d = daemon(&lab, &allow, &[])?;
    connection_traffic(&lab)?;
    std::thread::sleep(Duration::from_millis(1500));
    drop(d);
    let v = report_json(&lab, &allow)?;
    ensure!(
        connections_of(&v).is_empty() && v["summary"]["connections"] == 0,
        "connections recorded for allow: {}",
        serde_json::to_string_pretty(&v)?
    );
    Ok(())
}
