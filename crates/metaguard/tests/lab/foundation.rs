//! The lab itself: built without touching the root namespace, every
//! workload reaches the metadata endpoints before protection (so later
//! "blocked" results mean something), clean-up is complete, leftovers of
//! crashed runs are removed, and the probe refuses the root namespace.

use std::net::IpAddr;
use std::process::Command;

use libtest_mimic::Failed;
use metaguard_lab::matrix::{Matrix, Target, Verdict};
use metaguard_lab::registry::{self, LabRecord};
use metaguard_lab::topology::{addr, Role};
use metaguard_lab::{Lab, Workload};

use crate::ensure;
use crate::support::{exe, imds_logged, lab, netns_of, root_netns_state};

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "foundation::lab_never_touches_the_root_netns",
        true,
        lab_never_touches_the_root_netns,
    ),
    (
        "foundation::before_protection_every_workload_reaches_imds",
        true,
        before_protection_every_workload_reaches_imds,
    ),
    (
        "foundation::task_credentials_work_through_ecs_init_dnat",
        true,
        task_credentials_work_through_ecs_init_dnat,
    ),
    (
        "foundation::f1_without_route_localnet_credentials_time_out",
        true,
        f1_without_route_localnet_credentials_time_out,
    ),
    (
        "foundation::probes_run_in_the_workloads_cgroup",
        true,
        probes_run_in_the_workloads_cgroup,
    ),
    (
        "foundation::instance_data_name_and_other_spellings_resolve",
        true,
        instance_data_name_and_other_spellings_resolve,
    ),
    (
        "foundation::echo_services_log_tcp_and_udp_probes",
        true,
        echo_services_log_tcp_and_udp_probes,
    ),
    (
        "foundation::two_labs_in_a_row_leave_nothing",
        true,
        two_labs_in_a_row_leave_nothing,
    ),
    (
        "foundation::leftover_of_a_killed_lab_is_removed",
        true,
        leftover_of_a_killed_lab_is_removed,
    ),
    (
        "foundation::probe_refuses_the_root_netns",
        false,
        probe_refuses_the_root_netns,
    ),
    (
        "foundation::demo_prints_before_and_after_and_cleans_up",
        true,
        demo_prints_before_and_after_and_cleans_up,
    ),
];

fn lab_never_touches_the_root_netns() -> Result<(), Failed> {
    let before = root_netns_state()?;
    {
        let lab = lab()?;
        let m = Matrix::measure(&lab, &[Workload::BridgeC1, Workload::AwsvpcTask])?;
        ensure!(m.rows.len() == 2, "matrix has {} rows", m.rows.len());
        let during = root_netns_state()?;
        ensure!(
            before == during,
            "root netns changed while a lab ran:\n{}",
            diff(&before, &during)
        );
    }
    let after = root_netns_state()?;
    ensure!(
        before == after,
        "root netns changed by a lab run:\n{}",
        diff(&before, &after)
    );
    Ok(())
}

fn diff(a: &str, b: &str) -> String {
    let mut out = String::new();
    for l in a.lines().filter(|l| !b.contains(*l)) {
        out.push_str(&format!("- {l}\n"));
    }
    for l in b.lines().filter(|l| !a.contains(*l)) {
        out.push_str(&format!("+ {l}\n"));
    }
    out
}

fn before_protection_every_workload_reaches_imds() -> Result<(), Failed> {
    let lab = lab()?;
    let rows = [
        Workload::BridgeC1,
        Workload::BridgeC2,
        Workload::AwsvpcTask,
        Workload::HostNetwork,
        Workload::Agent,
        Workload::HostOther,
    ];
    let m = Matrix::measure(&lab, &rows)?;
    for w in rows {
        for t in [Target::ImdsV4, Target::ImdsV6] {
            let c = m.cell(w, t).ok_or("missing cell")?;
            ensure!(
                c.verdict == Verdict::Reached,
                "{} → {}: {:?}",
                w.label(),
                t.label(),
                c
            );
            ensure!(
                c.result.body.as_deref() == Some(lab.instance_id()),
                "{} → {}: body {:?}",
                w.label(),
                t.label(),
                c.result.body
            );
        }
    }
    // The emulator's log shows where each request came from: containers are
    // masqueraded behind the host (IPv4) like Docker does, routed (IPv6);
    // the task uses its own ENI.
    let log = lab.imds().log();
    let peer_of = |w: Workload, t: Target| -> Option<IpAddr> {
        let c = m.cell(w, t)?;
        log.with_header("x-lab-probe", &c.result.id)
            .first()
            .map(|r| r.peer.ip())
    };
    ensure!(
        peer_of(Workload::BridgeC1, Target::ImdsV4) == Some(IpAddr::V4(addr::HOST_V4)),
        "c1 v4 peer {:?}",
        peer_of(Workload::BridgeC1, Target::ImdsV4)
    );
    ensure!(
        peer_of(Workload::BridgeC1, Target::ImdsV6) == Some("fd00:17::2".parse()?),
        "c1 v6 peer {:?}",
        peer_of(Workload::BridgeC1, Target::ImdsV6)
    );
    ensure!(
        peer_of(Workload::AwsvpcTask, Target::ImdsV4) == Some(IpAddr::V4(addr::TASK_ENI_V4)),
        "task v4 peer"
    );
    ensure!(
        peer_of(Workload::AwsvpcTask, Target::ImdsV6) == Some(IpAddr::V6(addr::TASK_ENI_V6)),
        "task v6 peer"
    );
    ensure!(
        peer_of(Workload::HostNetwork, Target::ImdsV4) == Some(IpAddr::V4(addr::HOST_V4)),
        "hostnet v4 peer"
    );
    Ok(())
}

fn task_credentials_work_through_ecs_init_dnat() -> Result<(), Failed> {
    let lab = lab()?;
    let rows = [
        Workload::BridgeC1,
        Workload::AwsvpcTask,
        Workload::HostNetwork,
    ];
    let m = Matrix::measure(&lab, &rows)?;
    for w in rows {
        let c = m.cell(w, Target::TaskCredentials).ok_or("missing cell")?;
        ensure!(c.verdict == Verdict::Reached, "{}: {:?}", w.label(), c);
        let body: serde_json::Value = serde_json::from_str(c.result.body.as_deref().unwrap_or(""))?;
        for key in [
            "RoleArn",
            "AccessKeyId",
            "SecretAccessKey",
            "Token",
            "Expiration",
        ] {
            ensure!(
                body.get(key).and_then(|v| v.as_str()).is_some(),
                "{}: no {key} in {body}",
                w.label()
            );
        }
    }
    // The agent sees every caller as local (DNAT to 127.0.0.1).
    let entries = lab.agent().log().entries();
    ensure!(
        entries.len() == 3,
        "agent log has {} entries",
        entries.len()
    );
    Ok(())
}

/// F1: ecs-init's DNAT to 127.0.0.1 needs route_localnet=1; without it the
/// kernel drops the rewritten packets as martians and clients time out.
fn f1_without_route_localnet_credentials_time_out() -> Result<(), Failed> {
    let lab = lab()?;
    let w = Workload::BridgeC1;
    let ok = lab.probe(w, &lab.http_get(&Lab::credentials_url(w)))?;
    ensure!(ok.ok(), "with route_localnet=1: {ok:?}");
    lab.run_in(
        Role::Host,
        "sysctl",
        &["-q", "-w", "net.ipv4.conf.all.route_localnet=0"],
    )?;
    let spec = lab.http_get(&Lab::credentials_url(w));
    let r = lab.probe(w, &spec)?;
    ensure!(
        r.outcome == metaguard_lab::probe::Outcome::Timeout,
        "without route_localnet: {r:?}"
    );
    ensure!(
        lab.agent()
            .log()
            .with_header("x-lab-probe", &spec.id)
            .is_empty(),
        "agent saw the request"
    );
    Ok(())
}

fn probes_run_in_the_workloads_cgroup() -> Result<(), Failed> {
    let lab = lab()?;
    for w in [Workload::HostNetwork, Workload::Agent, Workload::BridgeC1] {
        let r = lab.probe(w, &lab.http_get(&Lab::imds_url_v4("/latest/meta-data/")))?;
        let want = format!("/{}", lab.cgroup_of(w));
        // The cgroup path is relative to the probe's cgroup namespace root;
        // in the init cgroup namespace that is the hierarchy root.
        ensure!(
            r.cgroup.as_deref() == Some(want.as_str()),
            "{}: cgroup {:?}, want {want}",
            w.label(),
            r.cgroup
        );
    }
    Ok(())
}

fn instance_data_name_and_other_spellings_resolve() -> Result<(), Failed> {
    let lab = lab()?;
    for host in [
        "instance-data",
        "2852039166",
        "0xa9fea9fe",
        "169.254.169.254",
        "[fd00:ec2::254]",
    ] {
        let spec = lab.http_get(&format!("http://{host}/latest/meta-data/instance-id"));
        let r = lab.probe(Workload::BridgeC1, &spec)?;
        ensure!(r.ok(), "{host}: {r:?}");
        ensure!(imds_logged(&lab, &spec), "{host}: not in the IMDS log");
    }
    Ok(())
}

fn echo_services_log_tcp_and_udp_probes() -> Result<(), Failed> {
    use metaguard_lab::probe::{ProbeKind, ProbeSpec};
    let lab = lab()?;
    for (kind, port) in [("tcp", addr::ECHO_TCP_PORT), ("udp", addr::ECHO_UDP_PORT)] {
        for host in ["169.254.169.254", "fd00:ec2::254", "10.0.0.1"] {
            let id = lab.probe_id(kind);
            let k = if kind == "tcp" {
                ProbeKind::Tcp {
                    host: host.into(),
                    port,
                }
            } else {
                ProbeKind::Udp {
                    host: host.into(),
                    port,
                }
            };
            let spec = ProbeSpec {
                id: id.clone(),
                kind: k,
                timeout_ms: 1000,
            };
            let r = lab.probe(Workload::BridgeC1, &spec)?;
            ensure!(r.ok(), "{kind} {host}: {r:?}");
            ensure!(
                r.body.as_deref() == Some(format!("MGPROBE {id}").as_str()),
                "{kind} {host}: echo {:?}",
                r.body
            );
            ensure!(
                lab.echo_log().with_header("x-lab-probe", &id).len() == 1,
                "{kind} {host}: not logged once"
            );
        }
    }
    Ok(())
}

fn two_labs_in_a_row_leave_nothing() -> Result<(), Failed> {
    for _ in 0..2 {
        let lab = lab()?;
        let id = lab.id().to_string();
        let cg = lab.cgroup2().path(&lab.cgroup_root());
        ensure!(netns_of(&id).len() == 5, "lab {id} has {:?}", netns_of(&id));
        ensure!(cg.exists(), "no cgroup {}", cg.display());
        drop(lab);
        ensure!(netns_of(&id).is_empty(), "left behind: {:?}", netns_of(&id));
        ensure!(!cg.exists(), "left behind: {}", cg.display());
        ensure!(
            !std::path::Path::new(&format!("/etc/netns/mglab-{id}-host")).exists(),
            "left /etc/netns"
        );
        ensure!(
            !std::path::Path::new(&format!("{}/{id}.json", registry::STATE_DIR)).exists(),
            "left the record"
        );
    }
    Ok(())
}

/// A lab whose process was SIGKILLed leaves namespaces, cgroups and a
/// record; the next lab finds the dead owner and removes them.
fn leftover_of_a_killed_lab_is_removed() -> Result<(), Failed> {
    // A process that is certainly gone: started and reaped here.
    let mut child = Command::new("true").spawn()?;
    let pid = child.id();
    child.wait()?;
    let id = format!("dead{:03x}", pid & 0xfff);
    let ns = format!("mglab-{id}-host");
    let cg =
        metaguard_sys::cgroup::Cgroup2::discover(std::path::Path::new("/proc/self/mountinfo"))?;
    let cg_root = format!("metaguard-lab/{id}");
    let rec = LabRecord {
        id: id.clone(),
        owner_pid: pid,
        owner_start_time: 1,
        netns: vec![ns.clone()],
        cgroup_mount: Some(cg.mount().to_path_buf()),
        cgroup_root: Some(cg_root.clone()),
        etc_netns: vec![],
        work_dir: None,
        mounts: vec![],
        extra_cgroup_trees: vec![],
    };
    // Other tests start labs meanwhile, and each start reaps dead labs
    // and unrecorded namespaces: the leftovers are made first and
    // recorded last (a reap in between may take the namespace early,
    // which is what is asserted anyway), and `ip netns add` is retried
    // when a reap removes its file half-way.
    netns_add_racing_reapers(&ns)?;
    // A process the killed lab started in its namespace (a daemon, nginx):
    // it would keep the namespace alive; the reap ends it by pid.
    let mut inside = Command::new("sleep");
    inside.arg("60");
    let spawned = metaguard_sys::netns::Netns::named(&ns)
        .map_err(|e| e.to_string())
        .and_then(|n| n.command(&mut inside).map_err(|e| e.to_string()))
        .and_then(|()| inside.spawn().map_err(|e| e.to_string()));
    // A concurrent reap may have taken the namespace already.
    let mut inside = match spawned {
        Ok(child) => Some(child),
        Err(e) if netns_of(&id).is_empty() => {
            eprintln!("namespace reaped before the process started: {e}");
            None
        }
        Err(e) => return Err(e.into()),
    };
    cg.create(&format!("{cg_root}/docker/c1"))?;
    registry::record(std::path::Path::new(registry::STATE_DIR), &rec)?;
    // An orphan namespace without any record is removed too.
    // Unique per process: test runs may overlap on a shared machine.
    let orphan_id = format!("orph{:x}", std::process::id());
    let orphan = format!("mglab-{orphan_id}-host");
    netns_add_racing_reapers(&orphan)?;
    // Forget it in this process, as a crash would.
    let lab = lab()?;
    ensure!(
        netns_of(&id).is_empty(),
        "leftover netns still there: {:?}",
        netns_of(&id)
    );
    ensure!(netns_of(&orphan_id).is_empty(), "orphan netns still there");
    ensure!(!cg.path(&cg_root).exists(), "leftover cgroup still there");
    if let Some(child) = inside.as_mut() {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the process in the leftover's namespace was not ended".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        use std::os::unix::process::ExitStatusExt;
        ensure!(
            status.signal() == Some(9),
            "ended by {status:?}, not SIGKILL"
        );
    }
    drop(lab);
    Ok(())
}

/// `ip netns add NAME` while other tests start labs: each start reaps
/// namespaces no record claims, and may unlink the file `ip` has just
/// created before it binds the namespace onto it ("Bind /proc/self/ns/net
/// -> /run/netns/NAME failed: No such file or directory"). Retried.
fn netns_add_racing_reapers(name: &str) -> Result<(), Failed> {
    for attempt in 1..=5 {
        match metaguard_lab::cmd::run(None, "ip", &["netns", "add", name], None) {
            Ok(_) => return Ok(()),
            Err(e) if attempt == 5 => return Err(e.into()),
            Err(_) => {
                let _ = metaguard_lab::cmd::run(None, "ip", &["netns", "delete", name], None);
            }
        }
    }
    Ok(())
}

/// The probe must never send from the root namespace: run directly from
/// the test (root netns), it refuses before resolving or connecting.
fn probe_refuses_the_root_netns() -> Result<(), Failed> {
    let in_root = metaguard_sys::netns::current_thread_id()
        .is_ok_and(|id| metaguard_sys::netns::is_root(id).unwrap_or(false));
    ensure!(
        in_root,
        "test runner is not in the root netns; this test needs it"
    );
    let spec = r#"{"id":"x","kind":"tcp","host":"169.254.169.254","port":80,"timeout_ms":100}"#;
    let out = Command::new(exe()).args(["lab-probe", spec]).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2),
        "exit {:?}: {stderr}",
        out.status.code()
    );
    ensure!(
        stderr.contains("root network namespace"),
        "stderr: {stderr}"
    );
    ensure!(
        out.stdout.is_empty(),
        "printed a result: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

fn demo_prints_before_and_after_and_cleans_up() -> Result<(), Failed> {
    let start = std::time::Instant::now();
    let out = Command::new(exe())
        .args(["demo", "--color", "never"])
        .output()?;
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "demo failed: {stderr}");
    // Row: label │ before (3 cells) │ after (3 cells) │ the BPF layer
    // alone, metaguard's nft tables deleted (3 cells).
    let expected_after = [
        ("bridge container", [false, false, true]),
        ("awsvpc task", [false, false, true]),
        ("host-network workload", [false, false, true]),
        ("ECS agent", [true, true, true]),
    ];
    for (row, after) in expected_after {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .ok_or(format!("no row {row}:\n{stdout}"))?;
        let parts: Vec<&str> = line.split('│').collect();
        ensure!(
            parts.len() == 4,
            "row {row} has no before/after/BPF-alone columns: {line}"
        );
        ensure!(
            parts[1].matches("reached 200").count() == 3,
            "before: row {row} not reached everywhere: {line}"
        );
        for (table, part, fast) in [
            ("after", parts[2], &["refused", "unreachable", "denied"][..]),
            ("BPF alone", parts[3], &["denied"][..]),
        ] {
            let cells: Vec<&str> = part
                .split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect();
            ensure!(cells.len() == 3, "{table}: row {row}: {cells:?}");
            for (cell, reach) in cells.iter().zip(after) {
                ensure!(
                    cell.starts_with("reached 200") == reach,
                    "{table}: row {row}: {cell:?} (expected reached={reach}): {line}"
                );
                if !reach {
                    ensure!(
                        fast.iter().any(|f| cell.starts_with(f)),
                        "{table}: row {row}: {cell:?} not refused fast ({fast:?})"
                    );
                }
            }
        }
    }
    ensure!(elapsed.as_secs() < 30, "demo took {elapsed:?}");
    // "metaguard demo: lab <id> ready …" (not the reaper's "removed
    // leftover lab <id>", which may come first).
    let id = stderr
        .split("metaguard demo: lab ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .ok_or(format!("no lab id in {stderr}"))?;
    ensure!(netns_of(id).is_empty(), "demo left {:?}", netns_of(id));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(
        !mounts.contains(&format!("metaguard-lab/{id}")),
        "demo left a mount: {mounts}"
    );
    Ok(())
}
