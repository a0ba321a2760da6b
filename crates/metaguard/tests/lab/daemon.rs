//! `metaguard daemon` in the lab: heals every kind of flush within a
//! second, guards workloads that appear while it runs from their first
//! packet, survives SIGKILL fail-closed, reloads on SIGHUP all or nothing,
//! and serves metrics that pass promtool and no container can reach.

use std::process::Child;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use metaguard_lab::host_rules;
use metaguard_lab::probe::{Outcome, ProbeKind, ProbeSpec};
use metaguard_lab::topology::{addr, Role};
use metaguard_lab::{Lab, Workload};

pub use metaguard_lab::daemon::{Daemon, Signal};

use crate::ensure;
use crate::support::{imds_logged, lab};

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "daemon::f4_heals_every_kind_of_flush_within_a_second",
        true,
        f4_heals_every_kind_of_flush_within_a_second,
    ),
    (
        "daemon::new_bridge_ports_and_bridges_are_blocked_from_the_first_packet",
        true,
        new_bridge_ports_and_bridges_are_blocked_from_the_first_packet,
    ),
    (
        "daemon::new_awsvpc_task_namespace_is_blocked_from_the_first_packet",
        true,
        new_awsvpc_task_namespace_is_blocked_from_the_first_packet,
    ),
    (
        "daemon::sigkill_leaves_rules_and_restart_adds_no_duplicates",
        true,
        sigkill_leaves_rules_and_restart_adds_no_duplicates,
    ),
    (
        "daemon::sighup_refuses_a_bad_config_and_applies_a_good_one",
        true,
        sighup_refuses_a_bad_config_and_applies_a_good_one,
    ),
    (
        "daemon::metrics_pass_promtool_and_no_container_reaches_them",
        true,
        metrics_pass_promtool_and_no_container_reaches_them,
    ),
    (
        "daemon::sigterm_leaves_rules_unless_remove_on_exit",
        true,
        sigterm_leaves_rules_unless_remove_on_exit,
    ),
    (
        "daemon::cgroups_that_appear_or_are_recreated_later_are_guarded",
        true,
        cgroups_that_appear_or_are_recreated_later_are_guarded,
    ),
];

/// A probe that is blocked *by metaguard* (rejected quickly, nothing
/// arrived), not merely failing.
pub fn blocked_now(lab: &Lab, w: Workload, url: &str) -> Result<bool, Failed> {
    let mut spec = lab.http_get(url);
    spec.timeout_ms = 300;
    let r = lab.probe(w, &spec)?;
    let arrived = imds_logged(lab, &spec);
    Ok(!arrived
        && matches!(
            r.outcome,
            Outcome::Refused | Outcome::Unreachable | Outcome::Denied
        ))
}

/// Polls every 50 ms until the probe is blocked again; returns the time.
pub fn time_to_blocked(
    lab: &Lab,
    w: Workload,
    url: &str,
    limit: Duration,
) -> Result<Duration, Failed> {
    let start = Instant::now();
    loop {
        if blocked_now(lab, w, url)? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(format!("{} not blocked again within {limit:?}", w.label()).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn f4_heals_every_kind_of_flush_within_a_second() -> Result<(), Failed> {
    let lab = lab()?;
    let policy = lab
        .write_file("policy.toml", &lab.policy_toml())?
        .display()
        .to_string();
    let d = Daemon::start(&lab, &policy, &[])?;
    // IPv6: routed, so the probe needs no NAT that a flush would remove.
    let url = Lab::imds_url_v6("/latest/meta-data/");
    let w = Workload::BridgeC1;
    ensure!(blocked_now(&lab, w, &url)?, "not blocked after start");
    let disruptions: &[(&str, &[&str])] = &[
        (
            "iptables -F; iptables -t nat -F",
            &["sh", "-c", "iptables -w -F && iptables -w -t nat -F"],
        ),
        (
            "iptables-save | iptables-restore",
            &["sh", "-c", "iptables-save | iptables-restore -w"],
        ),
        ("nft flush ruleset", &["nft", "flush", "ruleset"]),
        (
            "nft delete table inet metaguard",
            &["nft", "delete", "table", "inet", "metaguard"],
        ),
        (
            "nft flush chain inet metaguard wl1",
            &["nft", "flush", "chain", "inet", "metaguard", "wl1"],
        ),
        (
            "nft delete element inet metaguard imds6",
            &[
                "nft",
                "delete",
                "element",
                "inet",
                "metaguard",
                "imds6",
                "{ fd00:ec2::254 }",
            ],
        ),
    ];
    let mut report = Vec::new();
    for (what, argv) in disruptions {
        lab.run_in(Role::Host, argv[0], &argv[1..])?;
        let t = time_to_blocked(&lab, w, &url, Duration::from_secs(1))?;
        report.push(format!("{what}: {t:?}"));
    }
    // 20 flushes; the worst heal time is reported.
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        lab.run_in(Role::Host, "nft", &["flush", "ruleset"])?;
        worst = worst.max(time_to_blocked(&lab, w, &url, Duration::from_secs(1))?);
    }
    eprintln!(
        "heal times (50 ms polling): {}; worst of 20 flushes: {worst:?}",
        report.join(", ")
    );
    let log = d.log_text();
    for cause in [
        "ruleset-flushed",
        "table-deleted",
        "chain-altered",
        "set-altered",
    ] {
        ensure!(
            log.contains(&format!("\"cause\":\"{cause}\"")),
            "no heal with cause {cause} in:\n{log}"
        );
    }
    ensure!(
        log.contains("\"by\":\"nft["),
        "heals do not name the process:\n{log}"
    );
    // iptables flushes do not touch metaguard's table: no heal logged for them.
    ensure!(
        !log.contains("\"by\":\"iptables"),
        "healed after an iptables change:\n{log}"
    );
    lab.install_docker_nat()?;
    let out = lab.metaguard(&["verify", "--config", &policy])?;
    ensure!(
        out.status.success(),
        "verify after heals: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

pub fn first_contact(lab: &Lab, host: &str) -> ProbeSpec {
    ProbeSpec {
        id: lab.probe_id("first"),
        kind: ProbeKind::FirstContact {
            host: host.into(),
            port: addr::ECHO_TCP_PORT,
            max_ms: 3000,
        },
        timeout_ms: 4000,
    }
}

fn expect_first_contact_refused(
    lab: &Lab,
    child: Child,
    spec: &ProbeSpec,
    what: &str,
) -> Result<(), Failed> {
    let r = lab.finish_probe(child)?;
    ensure!(
        r.outcome == Outcome::Refused,
        "{what}: first contact was not refused: {r:?}"
    );
    ensure!(
        lab.echo_log()
            .with_header("x-lab-probe", &spec.id)
            .is_empty(),
        "{what}: the probe arrived"
    );
    Ok(())
}

fn new_bridge_ports_and_bridges_are_blocked_from_the_first_packet() -> Result<(), Failed> {
    let mut lab = lab()?;
    let policy = lab
        .write_file("policy.toml", &lab.policy_toml())?
        .display()
        .to_string();
    let _d = Daemon::start(&lab, &policy, &[])?;
    let host = lab.netns_name(Role::Host);
    for (suffix, bridge, v4, gw, new_bridge) in [
        ("c3", "docker0", "172.17.0.9", "172.17.0.1", false),
        ("c4", "br-feed01", "172.18.0.2", "172.18.0.1", true),
    ] {
        let ns = lab.add_netns(suffix)?;
        lab.ip_in(
            &host,
            &format!("link add veth{suffix} type veth peer name eth0 netns {ns}\n"),
        )?;
        lab.ip_in(
            &ns,
            &format!("link set eth0 up\naddr add {v4}/16 dev eth0\nroute add default via {gw}\n"),
        )?;
        // The container is already trying before its port is plugged in.
        let spec = first_contact(&lab, "169.254.169.254");
        let child = lab.spawn_probe_in(&ns, &spec)?;
        std::thread::sleep(Duration::from_millis(200));
        if new_bridge {
            lab.ip_in(&host, &format!("link add {bridge} type bridge\naddr add {gw}/16 dev {bridge}\nlink set {bridge} up\n"))?;
            lab.run_in(
                Role::Host,
                "iptables",
                &host_rules::args("-A", &host_rules::masquerade("172.18.0.0/16", bridge)),
            )?;
        }
        lab.ip_in(
            &host,
            &format!("link set veth{suffix} master {bridge} up\n"),
        )?;
        expect_first_contact_refused(&lab, child, &spec, bridge)?;
        // And the same container reaches an unrelated address (proof the
        // plumbing works, so "refused" came from metaguard).
        let unrelated = first_contact(&lab, "10.0.0.1");
        let child = lab.spawn_probe_in(&ns, &unrelated)?;
        let r = lab.finish_probe(child)?;
        ensure!(r.ok(), "{bridge}: unrelated address not reached: {r:?}");
    }
    Ok(())
}

fn new_awsvpc_task_namespace_is_blocked_from_the_first_packet() -> Result<(), Failed> {
    let mut lab = lab()?;
    // Every task namespace of this lab, present and future.
    let glob = format!(
        "/run/netns/{}",
        lab.netns_name(Role::Task1).replace("task1", "task*")
    );
    let policy_text = lab.policy_toml().replace(
        &format!("/run/netns/{}", lab.netns_name(Role::Task1)),
        &glob,
    );
    let policy = lab
        .write_file("policy.toml", &policy_text)?
        .display()
        .to_string();
    let d = Daemon::start(&lab, &policy, &[])?;
    let ns = lab.add_netns("task2")?;
    d.wait_log("new namespace guarded", Duration::from_secs(2))?;
    let spec = first_contact(&lab, "169.254.169.254");
    let child = lab.spawn_probe_in(&ns, &spec)?;
    std::thread::sleep(Duration::from_millis(100));
    // The ENI arrives: a veth from the VPC switch into the task.
    let vpc = lab.netns_name(Role::Vpc);
    lab.ip_in(&vpc, &format!("link add vpc-task2 type veth peer name eth0 netns {ns}\nlink set vpc-task2 master vpcbr up\n"))?;
    lab.ip_in(
        &ns,
        "link set eth0 up\naddr add 10.0.0.21/24 dev eth0\nroute add default via 10.0.0.1\n",
    )?;
    expect_first_contact_refused(&lab, child, &spec, "task2")?;
    let unrelated = first_contact(&lab, "10.0.0.1");
    let r = lab.finish_probe(lab.spawn_probe_in(&ns, &unrelated)?)?;
    ensure!(r.ok(), "task2: unrelated address not reached: {r:?}");
    let log = d.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("new namespace guarded"))
        .unwrap_or("");
    eprintln!("new task namespace guarded: {line}");
    Ok(())
}

fn host_tables(lab: &Lab) -> Result<usize, Failed> {
    Ok(lab
        .run_in(Role::Host, "nft", &["list", "tables"])?
        .matches("table inet metaguard")
        .count())
}

fn sigkill_leaves_rules_and_restart_adds_no_duplicates() -> Result<(), Failed> {
    let lab = lab()?;
    let policy = lab
        .write_file("policy.toml", &lab.policy_toml())?
        .display()
        .to_string();
    let url = Lab::imds_url_v4("/latest/meta-data/");
    ensure!(
        !blocked_now(&lab, Workload::BridgeC1, &url)?,
        "blocked before the daemon ran"
    );
    let mut d = Daemon::start(&lab, &policy, &[])?;
    d.signal(Signal::KILL)?;
    d.wait_exit(Duration::from_secs(5))?;
    ensure!(
        blocked_now(&lab, Workload::BridgeC1, &url)?,
        "not blocked after SIGKILL"
    );
    let _d2 = Daemon::start(&lab, &policy, &[])?;
    ensure!(host_tables(&lab)? == 1, "duplicate tables after restart");
    let out = lab.metaguard(&["verify", "--config", &policy])?;
    ensure!(
        out.status.success(),
        "verify after restart: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

fn sighup_refuses_a_bad_config_and_applies_a_good_one() -> Result<(), Failed> {
    let lab = lab()?;
    let path = lab.write_file("policy.toml", &lab.policy_toml())?;
    let policy = path.display().to_string();
    let d = Daemon::start(&lab, &policy, &[])?;
    let url = Lab::imds_url_v4("/latest/meta-data/");
    let before = lab.run_in(Role::Host, "nft", &["list", "table", "inet", "metaguard"])?;
    std::fs::write(
        &path,
        lab.policy_toml()
            .replace("imds          = \"allow\"", "imds          = \"alow\""),
    )?;
    d.signal(Signal::HUP)?;
    d.wait_log("reload refused", Duration::from_secs(5))?;
    let log = d.log_text();
    ensure!(
        log.contains(&format!("{policy}:5:17: imds: unknown action")),
        "no line/column in the log:\n{log}"
    );
    ensure!(
        lab.run_in(Role::Host, "nft", &["list", "table", "inet", "metaguard"])? == before,
        "rules changed by a bad reload"
    );
    ensure!(
        blocked_now(&lab, Workload::BridgeC1, &url)?,
        "not blocked after a bad reload"
    );
    // A valid new policy: bridge containers may use IMDS now.
    std::fs::write(
        &path,
        lab.policy_toml().replace(
            "bridges       = [\"docker0\", \"br-*\", \"ecs-bridge\"]\nimds          = \"deny\"",
            "bridges       = [\"docker0\", \"br-*\", \"ecs-bridge\"]\nimds          = \"allow\"",
        ),
    )?;
    d.signal(Signal::HUP)?;
    d.wait_log("reloaded: new config applied", Duration::from_secs(5))?;
    let mut spec = lab.http_get(&url);
    spec.timeout_ms = 1000;
    let r = lab.probe(Workload::BridgeC1, &spec)?;
    ensure!(
        r.ok(),
        "bridge container still blocked after a good reload: {r:?}"
    );
    ensure!(
        blocked_now(&lab, Workload::AwsvpcTask, &url)?,
        "the task lost its protection on reload"
    );
    Ok(())
}

fn metrics_pass_promtool_and_no_container_reaches_them() -> Result<(), Failed> {
    let lab = lab()?;
    let policy = lab
        .write_file("policy.toml", &lab.policy_toml())?
        .display()
        .to_string();
    let d = Daemon::start(&lab, &policy, &[])?;
    // Cause one heal, so the counters are not all zero.
    lab.run_in(Role::Host, "nft", &["delete", "table", "inet", "metaguard"])?;
    d.wait_log("healed", Duration::from_secs(2))?;
    let mut spec = lab.http_get("http://127.0.0.1:9469/metrics");
    spec.timeout_ms = 1000;
    let r = lab.probe(Workload::HostOther, &spec)?;
    ensure!(r.ok(), "metrics from the host: {r:?}");
    let body = r.body.unwrap_or_default();
    ensure!(
        body.contains("metaguard_heals_total{cause=\"table-deleted\"} 1"),
        "metrics:\n{body}"
    );
    ensure!(
        body.contains("metaguard_workloads_guarded{kind=\"bridges\"} 3"),
        "metrics:\n{body}"
    );
    let health = lab.probe(
        Workload::HostOther,
        &lab.http_get("http://127.0.0.1:9469/healthz"),
    )?;
    ensure!(health.ok(), "healthz: {health:?}");
    crate::support::promtool_check(&body)?;
    // From a container: the host's bridge address (nothing listens there)…
    let r = lab.probe(
        Workload::BridgeC1,
        &lab.http_get("http://172.17.0.1:9469/metrics"),
    )?;
    ensure!(!r.ok(), "metrics reachable on the bridge address: {r:?}");
    // …and 127.0.0.1 routed through the bridge (F17), which metaguard rejects.
    lab.route_loopback_via_gateway(Role::C1)?;
    let mut spec = lab.http_get("http://127.0.0.1:9469/metrics");
    spec.timeout_ms = 1000;
    let r = lab.probe(Workload::BridgeC1, &spec)?;
    ensure!(
        !r.ok() && r.outcome != Outcome::Timeout,
        "metrics via routed loopback: {r:?}"
    );
    Ok(())
}

fn sigterm_leaves_rules_unless_remove_on_exit() -> Result<(), Failed> {
    let lab = lab()?;
    let policy = lab
        .write_file("policy.toml", &lab.policy_toml())?
        .display()
        .to_string();
    let mut d = Daemon::start(&lab, &policy, &[])?;
    d.signal(Signal::TERM)?;
    ensure!(
        d.wait_exit(Duration::from_secs(5))? == Some(0),
        "exit code after SIGTERM"
    );
    ensure!(host_tables(&lab)? == 1, "rules gone after SIGTERM");
    let mut d = Daemon::start(&lab, &policy, &["--remove-on-exit"])?;
    d.signal(Signal::TERM)?;
    ensure!(
        d.wait_exit(Duration::from_secs(5))? == Some(0),
        "exit code after SIGTERM"
    );
    ensure!(
        host_tables(&lab)? == 0,
        "rules left after SIGTERM with --remove-on-exit"
    );
    ensure!(
        lab.run_in(Role::Task1, "nft", &["list", "tables"])?
            .is_empty(),
        "task table left"
    );
    // Bad metrics address: refused before anything changes.
    let out = lab.metaguard(&["daemon", "--config", &policy, "--metrics", "0.0.0.0:9469"])?;
    ensure!(
        out.status.code() == Some(2),
        "non-loopback metrics accepted"
    );
    ensure!(
        host_tables(&lab)? == 0,
        "rules applied despite the bad flag"
    );
    Ok(())
}

/// Docker creates its cgroups after metaguard starts at boot, and re-creates
/// them on restart (new ids). The daemon starts without them (a warning),
/// and guards each as it appears.
fn cgroups_that_appear_or_are_recreated_later_are_guarded() -> Result<(), Failed> {
    let lab = lab()?;
    let late = format!("{}/docker/late1", lab.cgroup_root());
    let policy = lab
        .write_file(
            "policy.toml",
            &format!("[[workload]]\nname = \"late\"\ncgroups = [\"{late}\"]\nimds = \"deny\"\n"),
        )?
        .display()
        .to_string();
    // apply refuses a cgroup that does not exist…
    let out = lab.metaguard(&["apply", "--config", &policy])?;
    ensure!(
        out.status.code() == Some(2),
        "apply accepted a missing cgroup"
    );
    // …the daemon starts and waits for it.
    let d = Daemon::start(&lab, &policy, &[])?;
    ensure!(
        d.log_text().contains("does not exist yet"),
        "no warning:\n{}",
        d.log_text()
    );
    let url = Lab::imds_url_v4("/latest/meta-data/");
    let cg = lab.cgroup2();
    // Every cgroup event reloads the host rules once: wait for the one
    // after each change before the next step (the removal's too, or it
    // would count for the re-creation's).
    let updates = |d: &Daemon| d.log_text().matches("host rules updated").count();
    for round in 1..=2 {
        let before = updates(&d);
        cg.create(&late)?;
        d.wait_log_count("host rules updated", before + 1, Duration::from_secs(3))?;
        let mut spec = lab.http_get(&url);
        spec.timeout_ms = 500;
        let r = lab.probe_in_cgroup(&late, &spec)?;
        ensure!(
            r.outcome == Outcome::Refused,
            "round {round}: a process in the new cgroup was not refused: {r:?}"
        );
        ensure!(!imds_logged(&lab, &spec), "round {round}: arrived");
        // Docker restarts: the cgroup goes away and comes back with a new id.
        let before = updates(&d);
        cg.remove(&late, 3)?;
        d.wait_log_count("host rules updated", before + 1, Duration::from_secs(3))?;
    }
    // Proof the probe works from a cgroup nobody guards.
    let free = format!("{}/docker/free1", lab.cgroup_root());
    cg.create(&free)?;
    let r = lab.probe_in_cgroup(&free, &lab.http_get(&url))?;
    cg.remove(&free, 3)?;
    ensure!(r.ok(), "unguarded cgroup did not reach IMDS: {r:?}");
    Ok(())
}
