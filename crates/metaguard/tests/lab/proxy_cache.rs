//! The proxy's answer cache in the lab (docs/proxy.md): botocore in
//! containers keeps its credentials through an outage of IMDS and the
//! agent until their `Expiration` and fails cleanly after it, nothing is
//! served past `Expiration` and every stale answer is audited and
//! counted; and many containers polling credentials and the instance id
//! cost the link-local budget once per key per validity window instead
//! of once per request.
//!
//! Credentials are short-lived here (the emulators' lifetime is set to
//! seconds), so expiry falls inside a test of seconds rather than the
//! hours real credentials live; the outage is a TCP reset for every
//! connection to IMDS and to the agent, made by nft rules in the lab's
//! own VPC and host namespaces.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use libtest_mimic::Failed;
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, Workload};
use serde_json::Value;

use crate::daemon::Daemon;
use crate::ensure;
use crate::proxy::audit_lines;
use crate::proxy_metrics::{parse, scrape, value};
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "proxy_cache::outage_credentials_last_until_expiration_never_past_it_and_are_audited",
        true,
        outage_credentials_last_until_expiration_never_past_it_and_are_audited,
    ),
    (
        "proxy_cache::many_containers_cost_one_upstream_request_per_key_per_validity_window",
        true,
        many_containers_cost_one_upstream_request_per_key_per_validity_window,
    ),
];

/// botocore's own IMDSv2 and container-credentials requests in a loop
/// for `argv[1]` seconds, one round every `argv[2]` seconds, with the
/// relative credentials URI `argv[3]` (and a timeout of `argv[4]` s, 1 by
/// default); prints every round's outcome as one
/// JSON list: when, and the access key and `Expiration` each flow got
/// (the raw documents: botocore's providers would stretch an IMDS
/// `Expiration` that is near).
const BOTOCORE_LOOP: &str = r#"
import json, sys, time
from botocore.utils import InstanceMetadataFetcher, ContainerMetadataFetcher
duration, step, rel = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 1
imds = InstanceMetadataFetcher(timeout=timeout, num_attempts=1, env={})
ContainerMetadataFetcher.TIMEOUT_SECONDS = timeout
ContainerMetadataFetcher.RETRY_ATTEMPTS = 1
task = ContainerMetadataFetcher()
out = []
end = time.time() + duration
while True:
    rec = {"t": time.time()}
    try:
        tok = imds._fetch_metadata_token()
        iid = imds._get_request("latest/meta-data/instance-id", None, tok).text
        role = imds._get_iam_role(tok)
        c = imds._get_credentials(role, tok)
        rec["imds"] = {"ok": True, "key": c["AccessKeyId"], "exp": c["Expiration"], "iid": iid,
                       "t_end": time.time()}
    except Exception as e:
        rec["imds"] = {"ok": False, "error": repr(e)[:200]}
    try:
        c = task.retrieve_uri(rel)
        rec["task"] = {"ok": True, "key": c["AccessKeyId"], "exp": c["Expiration"],
                       "t_end": time.time()}
    except Exception as e:
        rec["task"] = {"ok": False, "error": repr(e)[:200]}
    out.append(rec)
    if time.time() >= end:
        break
    time.sleep(step)
print(json.dumps(out))
"#;

/// Both services proxied for docker0 (c1, c2 and the extra namespaces of
/// the budget test), the instance role readable, no rate limit in the way
/// of the load.
fn policy(lab: &Lab, ids: &[String]) -> Result<(String, std::path::PathBuf), Failed> {
    let audit = lab.work_dir().join("audit-cache.jsonl");
    let ids: Vec<String> = ids.iter().map(|i| format!("{i:?}")).collect();
    let text = format!(
        r#"
[proxy]
audit_log = "{}"
rate = 100000
burst = 100000
max_connections = 1000

[[workload]]
name            = "containers"
bridges         = ["docker0"]
imds            = "proxy"
task_metadata   = "proxy"
credentials_ids = [{}]

[workload.imds_policy]
allow = ["/latest/api/token", "/latest/meta-data/instance-id", "/latest/meta-data/iam/security-credentials/",
         "/latest/meta-data/iam/security-credentials/*"]

[layers]
bpf = false
"#,
        audit.display(),
        ids.join(", ")
    );
    let path = lab.write_file("cache.toml", &text)?;
    Ok((path.display().to_string(), audit))
}

/// IMDS and the agent refuse every connection (TCP reset), or again
/// accept them: a table of the test's own in the VPC namespace (IMDS)
/// and the lab host's (the agent on 127.0.0.1:51679).
fn outage(lab: &Lab, on: bool) -> Result<(), Failed> {
    let table = "mgtest_outage";
    for (role, rule) in [
        (Role::Vpc, "type filter hook input priority 0; tcp dport 80 reject with tcp reset"),
        (
            Role::Host,
            "type filter hook output priority 0; ip daddr 127.0.0.1 tcp dport 51679 reject with tcp reset",
        ),
    ] {
        let script = if on {
            format!("table inet {table} {{\n chain c {{\n  {};\n }}\n}}\n", rule.replacen("; ", ";\n  ", 1))
        } else {
            format!("delete table inet {table}\n")
        };
        let file = lab.write_file(&format!("outage-{}.nft", role_name(role)), &script)?;
        lab.run_in(role, "nft", &["-f", &file.display().to_string()])?;
    }
    Ok(())
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Vpc => "vpc",
        _ => "host",
    }
}

/// Seconds since the Unix epoch of an RFC 3339 `Expiration`
/// (`2026-12-07T10:00:00Z`), read as the proxy reads it.
fn epoch(rfc3339: &str) -> Option<f64> {
    let doc = serde_json::json!({ "Expiration": rfc3339 }).to_string();
    let t = metaguard_proxy::cache::expiration(doc.as_bytes())?;
    Some(t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs_f64())
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs [`BOTOCORE_LOOP`] as `w` with its own task's credentials URI.
fn botocore_loop(
    lab: &Lab,
    python: &std::path::Path,
    w: Workload,
    secs: f64,
    step: f64,
) -> Result<Vec<Value>, Failed> {
    let rel = format!("/v2/credentials/{}", w.credentials_id());
    let v = crate::support::sdk_json(
        lab,
        w,
        python,
        &[
            "-c",
            BOTOCORE_LOOP,
            &secs.to_string(),
            &step.to_string(),
            &rel,
        ],
        &[],
        "botocore loop",
    )?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn outage_credentials_last_until_expiration_never_past_it_and_are_audited() -> Result<(), Failed> {
    let Some(python) = crate::support::python()? else {
        return Ok(());
    };
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let w = Workload::BridgeC1;
    let (config, audit) = policy(&lab, &[w.credentials_id().to_string()])?;
    let daemon = Daemon::start(&lab, &config, &[])?;
    // The outage lasts `METAGUARD_OUTAGE_SECS` (23 s by default, what CI
    // affords; 60 for the issue's full run), with credentials minted now
    // that expire inside it: 20 s, or 15 s before its end for a longer one.
    let outage_secs = env_secs("METAGUARD_OUTAGE_SECS", 23, 10, 300);
    let lifetime = Duration::from_secs(if outage_secs >= 40 {
        outage_secs - 15
    } else {
        20
    });
    lab.imds().set_credentials_lifetime(lifetime);
    lab.agent().set_credentials_lifetime(lifetime);
    let warm = botocore_loop(&lab, &python, w, 0.0, 0.0)?;
    ensure!(
        warm.len() == 1 && warm[0]["imds"]["ok"] == true && warm[0]["task"]["ok"] == true,
        "before the outage: {warm:?}\n{}",
        daemon.log_text()
    );
    outage(&lab, true)?;
    let outage_end = now() + outage_secs as f64;
    let expires = ["imds", "task"]
        .map(|f| epoch(warm[0][f]["exp"].as_str().unwrap_or_default()).unwrap_or(0.0));
    // Until 3 s past the later Expiration, and the outage's length.
    let run = (expires[0].max(expires[1]) + 3.0).max(outage_end) - now();
    let rounds = botocore_loop(&lab, &python, w, run, 0.25);
    outage(&lab, false)?;
    let rounds = rounds?;
    let mut served = BTreeMap::new();
    for (i, flow) in ["imds", "task"].into_iter().enumerate() {
        let mut failed_at: Option<f64> = None;
        let mut last_ok: Option<f64> = None;
        for r in &rounds {
            let f = &r[flow];
            let t = r["t"].as_f64().unwrap_or(0.0);
            if f["ok"] == true {
                // When this flow's credentials were in hand: a round's
                // end also waits for the other flow (a relay that cannot
                // reach the agent answers only at its deadline).
                let t_end = f["t_end"].as_f64().unwrap_or(f64::INFINITY);
                let exp = epoch(f["exp"].as_str().unwrap_or_default()).unwrap_or(0.0);
                ensure!(
                    f["key"] == warm[0][flow]["key"] && exp == expires[i],
                    "{flow}: during the outage, other credentials than those held: {f}"
                );
                ensure!(
                    t_end < exp,
                    "{flow}: served past Expiration ({t_end} ≥ {exp}): {r}"
                );
                ensure!(
                    failed_at.is_none(),
                    "{flow}: credentials again after a failure: {rounds:?}"
                );
                last_ok = Some(t);
            } else {
                failed_at.get_or_insert(t);
            }
        }
        let (Some(last_ok), Some(failed_at)) = (last_ok, failed_at) else {
            return Err(format!("{flow}: never served, or never failed: {rounds:?}").into());
        };
        // Served up to the guard (1 s) plus a round before Expiration.
        ensure!(
            last_ok >= expires[i] - 2.5 && failed_at >= expires[i] - 2.0,
            "{flow}: last served {:.1} s, first failure {:.1} s before Expiration",
            expires[i] - last_ok,
            expires[i] - failed_at
        );
        served.insert(
            flow,
            (
                expires[i] - last_ok,
                failed_at - rounds[0]["t"].as_f64().unwrap_or(0.0),
            ),
        );
    }
    // Every stale answer audited, and counted once.
    let lines = audit_lines(&audit);
    let stale: Vec<&Value> = lines.iter().filter(|l| l["cache"] == "stale").collect();
    ensure!(
        stale.iter().any(|l| l["service"] == "imds")
            && stale.iter().any(|l| l["service"] == "task_metadata")
            && stale.iter().all(|l| l["status"] == 200
                && l["rule"]
                    .as_str()
                    .is_some_and(|r| r.contains("served stale"))),
        "stale answers in the audit log: {stale:?}"
    );
    let m = parse(&scrape(&lab)?);
    for service in ["imds", "task_metadata"] {
        let audited = stale.iter().filter(|l| l["service"] == service).count() as f64;
        let counted = value(
            &m,
            "metaguard_proxy_stale_answers_total",
            &[("service", service)],
        );
        let by_cache = value(
            &m,
            "metaguard_proxy_cache_total",
            &[("service", service), ("result", "stale")],
        );
        ensure!(
            audited == counted && counted == by_cache,
            "{service}: {audited} stale answers audited, {counted} counted, {by_cache} by result"
        );
    }
    eprintln!(
        "measured: outage of {run:.0} s, credentials living {lifetime:?}: {} rounds; \
         last served / first failure (s before Expiration; s into the outage): {served:?}; \
         {} stale answers audited",
        rounds.len(),
        stale.len()
    );
    Ok(())
}

/// A whole number of seconds from the environment, `default` without it,
/// kept within `min..=max`.
fn env_secs(name: &str, default: u64, min: u64, max: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .clamp(min, max)
}

/// How many containers the budget test runs (50 when
/// `METAGUARD_BUDGET_CONTAINERS=50`; 16 by default: two python
/// interpreters importing botocore per container and round are what the
/// 2-core CI machine pays for, and 16 already show the difference).
fn containers() -> usize {
    std::env::var("METAGUARD_BUDGET_CONTAINERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
        .clamp(2, 100)
}

/// The extra containers: namespaces on docker0 (like a CNI plugin's),
/// each with a credentials id of its own. Their names and ids.
fn add_containers(lab: &mut Lab, n: usize) -> Result<Vec<(String, String)>, Failed> {
    let mut out = Vec::new();
    for i in 0..n {
        let ns = lab.add_docker0_netns(
            &format!("b{i}"),
            &format!("vethb{i}"),
            &format!("172.17.1.{}", 10 + i),
        )?;
        let id = format!("b{i}-budget-credentials");
        lab.agent()
            .add_credentials(&id, &format!("arn:aws:iam::111122223333:role/b{i}"));
        out.push((ns, id));
    }
    Ok(out)
}

/// Every container's loop at once, for `secs`; each container's rounds.
fn run_all(
    lab: &Lab,
    python: &std::path::Path,
    boxes: &[(String, String)],
    secs: f64,
) -> Result<Vec<Vec<Value>>, Failed> {
    std::thread::scope(|s| {
        let handles: Vec<_> = boxes
            .iter()
            .map(|(ns, id)| {
                s.spawn(move || -> Result<Vec<Value>, Failed> {
                    let rel = format!("/v2/credentials/{id}");
                    let out = lab.run_in_named(
                        ns,
                        &python.display().to_string(),
                        // A 3 s timeout: dozens of interpreters share 2 CPUs.
                        &["-c", BOTOCORE_LOOP, &secs.to_string(), "1", &rel, "3"],
                    )?;
                    let v: Value = serde_json::from_str(out.lines().last().unwrap_or(""))
                        .map_err(|e| format!("botocore in {ns}: {e}: {out}"))?;
                    Ok(v.as_array().cloned().unwrap_or_default())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a loop thread panicked".into()))
            })
            .collect()
    })
}

/// Upstream requests by (method, path) in an emulator's log since `from`.
fn counts(entries: &[metaguard_lab::log::LoggedRequest]) -> BTreeMap<(String, String), usize> {
    let mut m = BTreeMap::new();
    for e in entries {
        *m.entry((e.method.clone(), e.target.clone())).or_default() += 1;
    }
    m
}

fn many_containers_cost_one_upstream_request_per_key_per_validity_window() -> Result<(), Failed> {
    let Some(python) = crate::support::python()? else {
        return Ok(());
    };
    let n = containers();
    let mut lab = lab()?;
    let boxes = add_containers(&mut lab, n)?;
    let lifetime = Duration::from_secs(8);
    lab.imds().set_credentials_lifetime(lifetime);
    lab.agent().set_credentials_lifetime(lifetime);
    // `METAGUARD_BUDGET_SECS` (16 s by default; 60 for the issue's full
    // run).
    let secs = env_secs("METAGUARD_BUDGET_SECS", 16, 4, 300) as f64;
    // Rounds that failed, and containers that never succeeded: the
    // machine's 2 CPUs are shared by dozens of interpreters, so a round may
    // time out now and then, with or without the proxy (bounded below).
    let failures = |rounds: &[Vec<Value>]| {
        let failed = rounds
            .iter()
            .flatten()
            .filter(|r| r["imds"]["ok"] != true || r["task"]["ok"] != true)
            .count();
        let never = rounds
            .iter()
            .filter(|rs| {
                !rs.iter()
                    .any(|r| r["imds"]["ok"] == true && r["task"]["ok"] == true)
            })
            .count();
        let total: usize = rounds.iter().map(Vec::len).sum();
        (failed, never, total)
    };
    let ok = |rounds: &[Vec<Value>]| {
        let (failed, never, total) = failures(rounds);
        never == 0 && failed * 10 <= total
    };
    // Without metaguard: every request of every container reaches them.
    lab.imds().log().clear();
    lab.agent().log().clear();
    let direct = run_all(&lab, &python, &boxes, secs)?;
    let (imds_direct, agent_direct) = (lab.imds().log().len(), lab.agent().log().len());
    ensure!(
        ok(&direct),
        "without metaguard: (failed rounds, containers never served, rounds) {:?}",
        failures(&direct)
    );
    // Through the proxy.
    let ids: Vec<String> = boxes.iter().map(|(_, id)| id.clone()).collect();
    let (config, _audit) = policy(&lab, &ids)?;
    let daemon = Daemon::start(&lab, &config, &[])?;
    lab.imds().log().clear();
    lab.agent().log().clear();
    let started = now();
    let proxied = run_all(&lab, &python, &boxes, secs)?;
    let elapsed = now() - started;
    ensure!(
        ok(&proxied),
        "through the proxy: {proxied:?}\n{}",
        daemon.log_text()
    );
    let imds = counts(&lab.imds().log().entries());
    let agent = counts(&lab.agent().log().entries());
    // One request per key per validity window: the instance id and the
    // proxy's own token once; the role listing once a minute; each set of
    // credentials once per generation (new ones are minted every half
    // lifetime, and the proxy asks again from then on).
    let windows = (elapsed / (lifetime.as_secs_f64() / 2.0)).ceil() as usize + 1;
    let get = |m: &BTreeMap<(String, String), usize>, p: &str| {
        m.get(&("GET".to_string(), p.to_string()))
            .copied()
            .unwrap_or(0)
    };
    let role = "/latest/meta-data/iam/security-credentials/lab-instance-role";
    // The role listing is kept `ROLE_LISTING_TTL` (a minute).
    let listing_windows =
        (elapsed / metaguard_proxy::cache::ROLE_LISTING_TTL.as_secs_f64()).ceil() as usize;
    ensure!(
        get(&imds, "/latest/meta-data/instance-id") == 1
            && (1..=listing_windows)
                .contains(&get(&imds, "/latest/meta-data/iam/security-credentials/"))
            && imds.get(&("PUT".into(), "/latest/api/token".into())) == Some(&1)
            && get(&imds, role) <= windows
            && imds.len() == 4,
        "IMDS, {n} containers for {elapsed:.1} s, at most {windows} windows: {imds:?}"
    );
    for (_, id) in &boxes {
        let got = get(&agent, &format!("/v2/credentials/{id}"));
        ensure!(
            (1..=windows).contains(&got),
            "agent, {id}: {got} requests for at most {windows} windows: {agent:?}"
        );
    }
    let (imds_proxied, agent_proxied): (usize, usize) = (imds.values().sum(), agent.values().sum());
    let rounds: usize = proxied.iter().map(Vec::len).sum();
    eprintln!(
        "measured: {n} containers × {secs} s of botocore (token, instance-id, role, role credentials, \
         task credentials every second; credentials living {lifetime:?}): upstream requests without \
         metaguard: IMDS {imds_direct}, agent {agent_direct}; through the proxy ({rounds} rounds): \
         IMDS {imds_proxied} ({imds:?}), agent {agent_proxied} ({n} ids, at most {windows} windows each); \
         (failed rounds, containers never served, rounds): without {:?}, with {:?}",
        failures(&direct),
        failures(&proxied)
    );
    Ok(())
}
