//! `metaguard apply | verify | remove` on the lab's emulated ECS host.
//!
//! Every "blocked" assertion is paired with proof that the same probe
//! succeeds without protection, and with the endpoint's request log showing
//! nothing arrived.

use std::time::Duration;

use libtest_mimic::Failed;
use metaguard_lab::probe::{Outcome, ProbeKind, ProbeResult, ProbeSpec};
use metaguard_lab::topology::{addr, Role};
use metaguard_lab::{Lab, Workload};

use crate::ensure;
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "enforce::bridge_container_blocked_by_every_spelling_port_and_protocol",
        true,
        bridge_container_blocked_by_every_spelling_port_and_protocol,
    ),
    (
        "enforce::awsvpc_task_and_denied_cgroup_blocked_agent_and_others_reach_imds",
        true,
        awsvpc_task_and_denied_cgroup_blocked_agent_and_others_reach_imds,
    ),
    (
        "enforce::task_credentials_and_unrelated_traffic_keep_working",
        true,
        task_credentials_and_unrelated_traffic_keep_working,
    ),
    (
        "enforce::f17_containers_cannot_reach_host_loopback_services",
        true,
        f17_containers_cannot_reach_host_loopback_services,
    ),
    (
        "enforce::verify_reports_drift_and_apply_restores",
        true,
        verify_reports_drift_and_apply_restores,
    ),
    (
        "enforce::f4_iptables_flushes_leave_metaguard_alone_and_apply_restores_after_nft_flush",
        true,
        f4_iptables_flushes_leave_metaguard_alone_and_apply_restores_after_nft_flush,
    ),
    (
        "enforce::apply_twice_is_identical_and_dry_run_touches_nothing",
        true,
        apply_twice_is_identical_and_dry_run_touches_nothing,
    ),
    (
        "enforce::remove_deletes_only_metaguards_objects",
        true,
        remove_deletes_only_metaguards_objects,
    ),
    (
        "enforce::bad_input_leaves_the_kernel_unchanged",
        true,
        bad_input_leaves_the_kernel_unchanged,
    ),
    (
        "enforce::coexists_with_iptables_legacy_and_cis_rules",
        true,
        coexists_with_iptables_legacy_and_cis_rules,
    ),
    (
        "enforce::botocore_fails_fast_when_blocked",
        true,
        botocore_fails_fast_when_blocked,
    ),
];

/// Applies the lab's policy (or `policy`), failing the test on non-zero exit.
pub fn apply(lab: &Lab, policy: Option<&str>) -> Result<String, Failed> {
    let text = policy.map_or_else(|| lab.policy_toml(), str::to_string);
    let path = lab.write_file("policy.toml", &text)?;
    let out = lab.metaguard(&["apply", "--config", &path.display().to_string()])?;
    ensure!(
        out.status.success(),
        "apply failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(path.display().to_string())
}

fn http(lab: &Lab, url: &str) -> ProbeSpec {
    let mut s = lab.http_get(url);
    s.timeout_ms = 2000;
    s
}

fn raw(lab: &Lab, udp: bool, host: &str) -> ProbeSpec {
    let (kind, port) = if udp {
        ("udp", addr::ECHO_UDP_PORT)
    } else {
        ("tcp", addr::ECHO_TCP_PORT)
    };
    ProbeSpec {
        id: lab.probe_id(kind),
        kind: if udp {
            ProbeKind::Udp {
                host: host.into(),
                port,
            }
        } else {
            ProbeKind::Tcp {
                host: host.into(),
                port,
            }
        },
        timeout_ms: 2000,
    }
}

/// Whether any lab server (IMDS, echo, agent) logged the probe.
pub fn arrived(lab: &Lab, spec: &ProbeSpec) -> bool {
    [lab.imds().log(), lab.echo_log().clone(), lab.agent().log()]
        .iter()
        .any(|log| !log.with_header("x-lab-probe", &spec.id).is_empty())
}

/// The probe succeeds and the server logged it.
pub fn expect_reached(lab: &Lab, w: Workload, spec: &ProbeSpec) -> Result<ProbeResult, Failed> {
    let r = lab.probe(w, spec)?;
    ensure!(
        r.ok(),
        "{} → {:?}: expected to reach, got {r:?}",
        w.label(),
        spec.kind
    );
    ensure!(
        arrived(lab, spec),
        "{} → {:?}: answered but not in any server log",
        w.label(),
        spec.kind
    );
    Ok(r)
}

/// The probe fails fast (rejected, not a silent drop) and nothing arrived.
fn expect_blocked(lab: &Lab, w: Workload, spec: &ProbeSpec) -> Result<ProbeResult, Failed> {
    let r = lab.probe(w, spec)?;
    ensure!(
        !r.ok(),
        "{} → {:?}: expected blocked, got {r:?}",
        w.label(),
        spec.kind
    );
    ensure!(
        matches!(
            r.outcome,
            Outcome::Refused | Outcome::Unreachable | Outcome::Denied
        ),
        "{} → {:?}: blocked but not rejected fast: {r:?}",
        w.label(),
        spec.kind
    );
    ensure!(
        r.elapsed() < Duration::from_millis(100),
        "{} → {:?}: took {:?}",
        w.label(),
        spec.kind,
        r.elapsed()
    );
    ensure!(
        !arrived(lab, spec),
        "{} → {:?}: the server logged the probe",
        w.label(),
        spec.kind
    );
    Ok(r)
}

fn spellings() -> Vec<String> {
    [
        "169.254.169.254",
        "2852039166",
        "0xa9fea9fe",
        "instance-data",
        "[fd00:ec2::254]",
        "[::ffff:169.254.169.254]",
    ]
    .iter()
    .map(|h| format!("http://{h}/latest/meta-data/iam/security-credentials/"))
    .collect()
}

fn bridge_container_blocked_by_every_spelling_port_and_protocol() -> Result<(), Failed> {
    let lab = lab()?;
    let w = Workload::BridgeC1;
    // Proof first: every probe works without protection.
    for url in spellings() {
        expect_reached(&lab, w, &http(&lab, &url))?;
    }
    for udp in [false, true] {
        for host in ["169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"] {
            expect_reached(&lab, w, &raw(&lab, udp, host))?;
        }
    }
    apply(&lab, None)?;
    for url in spellings() {
        expect_blocked(&lab, w, &http(&lab, &url))?;
    }
    for udp in [false, true] {
        for host in ["169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"] {
            expect_blocked(&lab, w, &raw(&lab, udp, host))?;
        }
    }
    // The second container on the same bridge too.
    expect_blocked(
        &lab,
        Workload::BridgeC2,
        &http(&lab, &Lab::imds_url_v4("/latest/meta-data/")),
    )?;
    Ok(())
}

fn awsvpc_task_and_denied_cgroup_blocked_agent_and_others_reach_imds() -> Result<(), Failed> {
    let lab = lab()?;
    let urls = [
        Lab::imds_url_v4("/latest/meta-data/instance-id"),
        Lab::imds_url_v6("/latest/meta-data/instance-id"),
    ];
    for w in [
        Workload::AwsvpcTask,
        Workload::HostNetwork,
        Workload::Agent,
        Workload::HostOther,
    ] {
        for u in &urls {
            expect_reached(&lab, w, &http(&lab, u))?;
        }
    }
    apply(&lab, None)?;
    for w in [Workload::AwsvpcTask, Workload::HostNetwork] {
        for u in &urls {
            expect_blocked(&lab, w, &http(&lab, u))?;
        }
        expect_blocked(&lab, w, &raw(&lab, true, "169.254.169.254"))?;
    }
    // The agent's cgroup is allowed before the deny of its parent; an
    // unrelated host process is not selected at all.
    for w in [Workload::Agent, Workload::HostOther] {
        for u in &urls {
            expect_reached(&lab, w, &http(&lab, u))?;
        }
    }
    Ok(())
}

fn task_credentials_and_unrelated_traffic_keep_working() -> Result<(), Failed> {
    let lab = lab()?;
    apply(&lab, None)?;
    for w in [
        Workload::BridgeC1,
        Workload::AwsvpcTask,
        Workload::HostNetwork,
        Workload::Agent,
    ] {
        let r = expect_reached(&lab, w, &http(&lab, &Lab::credentials_url(w)))?;
        let body: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap_or(""))?;
        ensure!(
            body.get("AccessKeyId").and_then(|v| v.as_str()).is_some(),
            "{}: {body}",
            w.label()
        );
    }
    for w in [
        Workload::BridgeC1,
        Workload::AwsvpcTask,
        Workload::HostNetwork,
    ] {
        for udp in [false, true] {
            for host in ["10.0.0.1", "fd00:10::1"] {
                expect_reached(&lab, w, &raw(&lab, udp, host))?;
            }
        }
    }
    Ok(())
}

/// F17: with route_localnet=1 (set by ecs-init), a container that routes
/// 127.0.0.1 through its gateway reaches the host's loopback services —
/// here the agent's credentials port, bypassing any policy.
fn f17_containers_cannot_reach_host_loopback_services() -> Result<(), Failed> {
    let lab = lab()?;
    let w = Workload::BridgeC1;
    let url = format!(
        "http://127.0.0.1:{}/v2/credentials/{}",
        addr::AGENT_PORT,
        w.credentials_id()
    );
    lab.route_loopback_via_gateway(Role::C1)?;
    expect_reached(&lab, w, &http(&lab, &url))?;
    apply(&lab, None)?;
    expect_blocked(&lab, w, &http(&lab, &url))?;
    // The legitimate path (DNAT of 169.254.170.2) still works.
    expect_reached(&lab, w, &http(&lab, &Lab::credentials_url(w)))?;
    Ok(())
}

fn verify(lab: &Lab, policy: &str) -> Result<(i32, String), Failed> {
    let out = lab.metaguard(&["verify", "--config", policy])?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

fn verify_reports_drift_and_apply_restores() -> Result<(), Failed> {
    let lab = lab()?;
    let policy = apply(&lab, None)?;
    let (code, out) = verify(&lab, &policy)?;
    ensure!(code == 0, "verify after apply: exit {code}:\n{out}");

    lab.run_in(Role::Host, "nft", &["delete", "table", "inet", "metaguard"])?;
    let (code, out) = verify(&lab, &policy)?;
    ensure!(
        code == 1 && out.contains("DRIFT  host") && out.contains("is missing"),
        "after table delete: exit {code}:\n{out}"
    );
    apply(&lab, None)?;

    // An altered rule: the bridge workload's IPv4 TCP reject removed, and
    // an element added to a set.
    let listing = lab.run_in(
        Role::Host,
        "nft",
        &["-a", "list", "chain", "inet", "metaguard", "wl1"],
    )?;
    let handle = listing
        .lines()
        .find(|l| l.contains("ip daddr @imds4 meta l4proto tcp reject"))
        .and_then(|l| l.rsplit("# handle ").next())
        .ok_or(format!("no rule to alter in:\n{listing}"))?
        .trim()
        .to_string();
    lab.run_in(
        Role::Host,
        "nft",
        &[
            "delete",
            "rule",
            "inet",
            "metaguard",
            "wl1",
            "handle",
            &handle,
        ],
    )?;
    lab.run_in(
        Role::Host,
        "nft",
        &[
            "add",
            "element",
            "inet",
            "metaguard",
            "imds4",
            "{ 192.0.2.1 }",
        ],
    )?;
    let (code, out) = verify(&lab, &policy)?;
    ensure!(code == 1, "after altering: exit {code}:\n{out}");
    ensure!(
        out.contains("chain wl1: rules differ")
            && out.contains("- ip daddr @imds4 meta l4proto tcp reject with tcp reset"),
        "rule diff not shown:\n{out}"
    );
    ensure!(
        out.contains("set imds4: unexpected element 192.0.2.1"),
        "element diff not shown:\n{out}"
    );

    // A task namespace without its table.
    apply(&lab, None)?;
    lab.run_in(
        Role::Task1,
        "nft",
        &["delete", "table", "inet", "metaguard"],
    )?;
    let (code, out) = verify(&lab, &policy)?;
    ensure!(
        code == 1
            && out.contains(&format!(
                "DRIFT  /run/netns/{}",
                lab.netns_name(Role::Task1)
            )),
        "task table missing: exit {code}:\n{out}"
    );
    apply(&lab, None)?;
    let (code, out) = verify(&lab, &policy)?;
    ensure!(code == 0, "after re-apply: exit {code}:\n{out}");

    // --json is a stable document.
    let out = lab.metaguard(&["verify", "--json", "--config", &policy])?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(doc["ok"] == serde_json::Value::Bool(true), "json: {doc}");
    ensure!(
        doc["namespaces"].as_array().map(Vec::len) == Some(2),
        "json: {doc}"
    );
    Ok(())
}

/// F4: iptables flushes (what dockerd restarts and config management do)
/// cannot touch metaguard's own table; `nft flush ruleset` can, and apply
/// restores it.
fn f4_iptables_flushes_leave_metaguard_alone_and_apply_restores_after_nft_flush(
) -> Result<(), Failed> {
    let lab = lab()?;
    let policy = apply(&lab, None)?;
    let w = Workload::BridgeC1;
    let url = Lab::imds_url_v4("/latest/meta-data/");
    lab.run_in(Role::Host, "iptables", &["-w", "-F"])?;
    lab.run_in(Role::Host, "iptables", &["-w", "-t", "nat", "-F"])?;
    expect_blocked(&lab, w, &http(&lab, &url))?;
    let (code, out) = verify(&lab, &policy)?;
    ensure!(
        code == 0,
        "verify after iptables flush: exit {code}:\n{out}"
    );
    lab.run_in(Role::Host, "nft", &["flush", "ruleset"])?;
    // The flush took Docker's masquerade with it; dockerd puts it back when
    // restarted, as here.
    lab.install_docker_nat()?;
    expect_reached(&lab, w, &http(&lab, &url))?;
    apply(&lab, None)?;
    expect_blocked(&lab, w, &http(&lab, &url))?;
    let (code, out) = verify(&lab, &policy)?;
    ensure!(code == 0, "verify after re-apply: exit {code}:\n{out}");
    Ok(())
}

fn rulesets(lab: &Lab) -> Result<String, Failed> {
    let mut s = String::new();
    for role in [Role::Host, Role::Task1] {
        s.push_str(&lab.run_in(role, "nft", &["list", "ruleset"])?);
    }
    Ok(s)
}

fn apply_twice_is_identical_and_dry_run_touches_nothing() -> Result<(), Failed> {
    let lab = lab()?;
    let policy = lab.write_file("policy.toml", &lab.policy_toml())?;
    let before = rulesets(&lab)?;
    let out = lab.metaguard(&[
        "apply",
        "--dry-run",
        "--config",
        &policy.display().to_string(),
    ])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "dry-run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.contains("table inet metaguard {") && stdout.contains(&lab.netns_name(Role::Task1)),
        "dry-run output:\n{stdout}"
    );
    ensure!(rulesets(&lab)? == before, "dry-run changed the ruleset");
    apply(&lab, None)?;
    let first = rulesets(&lab)?;
    apply(&lab, None)?;
    let second = rulesets(&lab)?;
    ensure!(
        first == second,
        "second apply differs:\n{first}\n---\n{second}"
    );
    ensure!(
        first.matches("table inet metaguard").count() == 2,
        "expected one table per namespace:\n{first}"
    );
    Ok(())
}

fn remove_deletes_only_metaguards_objects() -> Result<(), Failed> {
    let lab = lab()?;
    lab.run_in(Role::Host, "nft", &["add", "table", "inet", "someone_else"])?;
    lab.run_in(
        Role::Host,
        "iptables",
        &["-w", "-A", "FORWARD", "-s", "192.0.2.0/24", "-j", "DROP"],
    )?;
    lab.run_in(Role::Task1, "nft", &["add", "table", "ip", "task_other"])?;
    apply(&lab, None)?;
    let out = lab.metaguard(&["remove"])?;
    ensure!(
        out.status.success(),
        "remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let host = lab.run_in(Role::Host, "nft", &["list", "ruleset"])?;
    let task = lab.run_in(Role::Task1, "nft", &["list", "ruleset"])?;
    ensure!(
        !host.contains("metaguard") && !task.contains("metaguard"),
        "metaguard left:\n{host}\n{task}"
    );
    ensure!(
        host.contains("table inet someone_else"),
        "foreign table removed:\n{host}"
    );
    ensure!(
        task.contains("table ip task_other"),
        "foreign task table removed:\n{task}"
    );
    let ipt = lab.run_in(Role::Host, "iptables", &["-w", "-S", "FORWARD"])?;
    ensure!(
        ipt.contains("-A FORWARD -s 192.0.2.0/24 -j DROP"),
        "iptables rule removed:\n{ipt}"
    );
    let nat = lab.run_in(
        Role::Host,
        "iptables",
        &["-w", "-t", "nat", "-S", "PREROUTING"],
    )?;
    ensure!(nat.contains("DNAT"), "ecs-init's DNAT removed:\n{nat}");
    // Protection is really gone.
    expect_reached(
        &lab,
        Workload::BridgeC1,
        &http(&lab, &Lab::imds_url_v4("/latest/meta-data/")),
    )?;
    let again = lab.metaguard(&["remove"])?;
    ensure!(
        again.status.success()
            && String::from_utf8_lossy(&again.stdout).contains("nothing to remove"),
        "second remove"
    );
    Ok(())
}

fn bad_input_leaves_the_kernel_unchanged() -> Result<(), Failed> {
    let lab = lab()?;
    apply(&lab, None)?;
    let before = rulesets(&lab)?;
    let cases = [
        (
            "missing cgroup",
            lab.policy_toml()
                .replace("/docker/ecs-agent\"", "/docker/no-such-agent\""),
            "does not exist",
        ),
        (
            "bad action",
            lab.policy_toml()
                .replace("imds          = \"allow\"", "imds          = \"permit\""),
            ":5:17: imds: unknown action",
        ),
        (
            "unknown key",
            format!("{}\nextra = 1\n", lab.policy_toml()),
            "unknown field `extra`",
        ),
        (
            "proxy without an IPv4 address to listen on",
            format!(
                "[endpoints]\ntask_metadata = [\"fd00:ec2::23\"]\n{}",
                lab.policy_toml()
                    .replace("imds          = \"allow\"", "imds          = \"proxy\"")
            ),
            "needs an IPv4 task_metadata endpoint",
        ),
        (
            "path policy without the proxy action",
            format!(
                "{}\n[workload.imds_policy]\nallow = [\"/latest/meta-data/instance-id\"]\n",
                lab.policy_toml()
            ),
            "imds_policy is only used with imds = \"proxy\"",
        ),
    ];
    for (what, text, expect) in cases {
        let p = lab.write_file("bad.toml", &text)?;
        let out = lab.metaguard(&["apply", "--config", &p.display().to_string()])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "{what}: exit {:?}: {stderr}",
            out.status.code()
        );
        ensure!(stderr.contains(expect), "{what}: {stderr}");
        ensure!(rulesets(&lab)? == before, "{what}: the kernel changed");
    }
    Ok(())
}

/// Hosts on iptables-legacy with Docker-style rules and the CIS loopback
/// drop: metaguard's nft table works beside them and does not make task
/// credentials worse (F2 is the proxy's job).
fn coexists_with_iptables_legacy_and_cis_rules() -> Result<(), Failed> {
    let lab = lab()?;
    if metaguard_lab::cmd::find_tool("iptables-legacy").is_none() {
        return Err("iptables-legacy is not installed (the iptables package ships it)".into());
    }
    lab.run_in(Role::Host, "iptables-legacy", &["-w", "-N", "DOCKER-USER"])?;
    lab.run_in(
        Role::Host,
        "iptables-legacy",
        &["-w", "-A", "FORWARD", "-j", "DOCKER-USER"],
    )?;
    lab.run_in(
        Role::Host,
        "iptables-legacy",
        &["-w", "-A", "DOCKER-USER", "-j", "RETURN"],
    )?;
    apply(&lab, None)?;
    let w = Workload::BridgeC1;
    expect_blocked(
        &lab,
        w,
        &http(&lab, &Lab::imds_url_v4("/latest/meta-data/")),
    )?;
    expect_reached(&lab, w, &http(&lab, &Lab::credentials_url(w)))?;
    // CIS: -A INPUT -d 127.0.0.0/8 ! -i lo -j DROP breaks the DNAT path;
    // the outcome is the same with and without metaguard.
    crate::support::cis_loopback_drop(&lab)?;
    let mut spec = http(&lab, &Lab::credentials_url(w));
    spec.timeout_ms = 500;
    let with = lab.probe(w, &spec)?;
    lab.metaguard(&["remove"])?;
    let mut spec2 = http(&lab, &Lab::credentials_url(w));
    spec2.timeout_ms = 500;
    let without = lab.probe(w, &spec2)?;
    ensure!(
        with.outcome == without.outcome,
        "metaguard changed the CIS outcome: {with:?} vs {without:?}"
    );
    ensure!(
        with.outcome == Outcome::Timeout,
        "F2 not reproduced: {with:?}"
    );
    Ok(())
}

/// A real SDK: botocore's IMDS fetcher in a blocked bridge container gives
/// up within milliseconds instead of its 1 s timeout × attempts (F14).
fn botocore_fails_fast_when_blocked() -> Result<(), Failed> {
    let Some(python) = crate::support::python()? else {
        return Ok(());
    };
    let lab = lab()?;
    let script = r#"
import json, sys, time
from botocore.utils import InstanceMetadataFetcher
f = InstanceMetadataFetcher(timeout=1, num_attempts=2, env={})
t = time.monotonic()
creds = f.retrieve_iam_role_credentials()
print(json.dumps({"ok": bool(creds), "role": creds.get("role_name") if creds else None, "seconds": time.monotonic() - t}))
"#;
    let run = |lab: &Lab| -> Result<serde_json::Value, Failed> {
        let mut cmd = lab.command_in(Workload::BridgeC1, &python)?;
        cmd.args(["-c", script]).env_clear();
        let out = cmd.output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or("");
        serde_json::from_str(line).map_err(|e| {
            format!(
                "botocore output {stdout:?} {:?}: {e}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into()
        })
    };
    let before = run(&lab)?;
    ensure!(
        before["ok"] == true && before["role"] == "lab-instance-role",
        "botocore without metaguard: {before}"
    );
    apply(&lab, None)?;
    let after = run(&lab)?;
    ensure!(
        after["ok"] == false,
        "botocore got credentials through metaguard: {after}"
    );
    let secs = after["seconds"].as_f64().unwrap_or(99.0);
    ensure!(secs < 0.5, "botocore took {secs} s to give up (F14)");
    Ok(())
}
