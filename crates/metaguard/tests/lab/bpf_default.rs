//! The BPF layer under the default policy (bridges and task namespaces, no
//! `cgroups` workload): programs on the lab's container cgroups refuse the
//! metadata endpoints to every network namespace nobody has classified —
//! so a container or task created after `apply` is refused from its first
//! attempt, with metaguard's nft tables deleted and no daemon running.
//!
//! The policy is the built-in default's text with one addition: `[layers]
//! container_cgroups` names the lab's own `docker` and `system.slice`
//! subtrees instead of the host's (and the lab's metaguard is fenced into
//! the lab's cgroups by `--bpf-attach-within` besides).

use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use metaguard_core::config::BUILTIN_DEFAULT_TOML;
use metaguard_lab::probe::{Outcome, ProbeKind, ProbeResult, ProbeSpec};
use metaguard_lab::topology::{addr, Role};
use metaguard_lab::{Lab, Workload};
use metaguard_sys::bpf as sys;

use crate::bpf::{apply, apply_said};
use crate::daemon::Daemon;
use crate::enforce::{arrived, expect_reached};
use crate::ensure;
use crate::proxy::audit_lines;
use crate::proxy_reload::imdsv2_instance_id;
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "bpf_default::new_bridge_container_and_task_refused_from_first_attempt_with_nft_gone",
        true,
        new_bridge_container_and_task_refused_from_first_attempt_with_nft_gone,
    ),
    (
        "bpf_default::allowing_workload_is_refused_until_classified_then_reaches",
        true,
        allowing_workload_is_refused_until_classified_then_reaches,
    ),
    (
        "bpf_default::a_container_cgroup_made_after_the_daemon_started_gets_the_programs",
        true,
        a_container_cgroup_made_after_the_daemon_started_gets_the_programs,
    ),
    (
        "bpf_default::containers_outside_every_attach_point_are_named",
        true,
        containers_outside_every_attach_point_are_named,
    ),
    (
        "bpf_default::containers_selectors_resolve_to_cgroups_and_namespaces",
        true,
        containers_selectors_resolve_to_cgroups_and_namespaces,
    ),
    (
        "bpf_default::proxied_namespaces_pass_the_hooks_to_the_proxy_unclassified_ones_are_refused",
        true,
        proxied_namespaces_pass_the_hooks_to_the_proxy_unclassified_ones_are_refused,
    ),
];

/// The built-in default policy, with the container cgroups moved into the
/// lab's subtree; `before` is put ahead of its workloads.
fn default_policy(lab: &Lab, before: &str) -> String {
    let root = lab.cgroup_root();
    format!(
        "{before}\n{BUILTIN_DEFAULT_TOML}\n[layers]\ncontainer_cgroups = [\"{root}/docker\", \"{root}/system.slice\"]\n"
    )
}

/// `GET /latest/meta-data/` at `host`, with a 5 s timeout: what must reach
/// does so on a machine loaded with builds (a refusal is EPERM at once).
fn http(lab: &Lab, host: &str) -> ProbeSpec {
    let mut s = lab.http_get(&format!("http://{host}/latest/meta-data/"));
    s.timeout_ms = 5000;
    s
}

/// A namespace made by the test: its lab name and the cgroup its
/// processes run in.
struct Made {
    netns: String,
    cgroup: String,
}

/// A bridge container as Docker makes one: a namespace, a veth on docker0,
/// addresses and default routes, and a cgroup under the lab's `docker`.
fn bridge_container(lab: &mut Lab, suffix: &str, n: u8) -> Result<Made, Failed> {
    let ns = lab.add_netns(suffix)?;
    let host = lab.netns_name(Role::Host);
    lab.ip_in(
        &host,
        &format!(
            "link add veth{suffix} type veth peer name eth0 netns {ns}\nlink set veth{suffix} master docker0 up\n"
        ),
    )?;
    lab.ip_in(
        &ns,
        &format!(
            "link set eth0 up\naddr add 172.17.0.{n}/16 dev eth0\naddr add fd00:17::{n}/64 dev eth0 nodad\nroute add default via 172.17.0.1\nroute add default via fd00:17::1\n"
        ),
    )?;
    cgroup(lab, suffix, ns)
}

/// An awsvpc task as the ECS CNI plugins make one: an ENI into the VPC
/// carrying the default routes, and `ecs-eth0` on ecs-bridge for the
/// credentials endpoint.
fn awsvpc_task(lab: &mut Lab, suffix: &str, n: u8) -> Result<Made, Failed> {
    let ns = lab.add_netns(suffix)?;
    let (host, vpc) = (lab.netns_name(Role::Host), lab.netns_name(Role::Vpc));
    lab.ip_in(
        &vpc,
        &format!(
            "link add vpc-{suffix} type veth peer name eth0 netns {ns}\nlink set vpc-{suffix} master vpcbr up\n"
        ),
    )?;
    lab.ip_in(
        &host,
        &format!(
            "link add veth{suffix} type veth peer name ecs-eth0 netns {ns}\nlink set veth{suffix} master ecs-bridge up\n"
        ),
    )?;
    lab.ip_in(
        &ns,
        &format!(
            "link set eth0 up\naddr add 10.0.0.{n}/24 dev eth0\naddr add fd00:10::{n}/64 dev eth0 nodad\nroute add default via 10.0.0.1\nroute add default via fd00:10::1\nlink set ecs-eth0 up\naddr add 169.254.172.{n}/22 dev ecs-eth0\nroute add 169.254.170.2/32 via 169.254.172.1 dev ecs-eth0\n"
        ),
    )?;
    cgroup(lab, suffix, ns)
}

fn cgroup(lab: &Lab, suffix: &str, netns: String) -> Result<Made, Failed> {
    let cgroup = format!("{}/docker/{suffix}", lab.cgroup_root());
    lab.cgroup2().create(&cgroup).map_err(|e| e.to_string())?;
    Ok(Made { netns, cgroup })
}

fn udp(lab: &Lab, host: &str) -> ProbeSpec {
    ProbeSpec {
        id: lab.probe_id("udp-sendto"),
        kind: ProbeKind::UdpSendTo {
            host: host.into(),
            port: addr::ECHO_UDP_PORT,
        },
        timeout_ms: 5000,
    }
}

/// Every way to IMDS the issue names: TCP (HTTP) and UDP, over IPv4, IPv6
/// and IPv4-mapped IPv6.
fn imds_probes(lab: &Lab) -> Vec<ProbeSpec> {
    vec![
        http(lab, "169.254.169.254"),
        http(lab, "[fd00:ec2::254]"),
        http(lab, "[::ffff:169.254.169.254]"),
        udp(lab, "169.254.169.254"),
        udp(lab, "fd00:ec2::254"),
        udp(lab, "::ffff:169.254.169.254"),
    ]
}

fn run(lab: &Lab, m: &Made, spec: &ProbeSpec) -> Result<ProbeResult, Failed> {
    Ok(lab.probe_as(&m.netns, &m.cgroup, spec)?)
}

fn reached(lab: &Lab, m: &Made, spec: &ProbeSpec) -> Result<(), Failed> {
    let r = run(lab, m, spec)?;
    ensure!(
        r.ok() && arrived(lab, spec),
        "{} → {:?}: expected to reach, got {r:?}",
        m.netns,
        spec.kind
    );
    Ok(())
}

fn refused(lab: &Lab, m: &Made, spec: &ProbeSpec) -> Result<(), Failed> {
    let r = run(lab, m, spec)?;
    ensure!(
        r.outcome == Outcome::Denied,
        "{} → {:?}: expected EPERM, got {r:?}",
        m.netns,
        spec.kind
    );
    ensure!(
        !arrived(lab, spec),
        "{} → {:?}: refused, yet a server logged it",
        m.netns,
        spec.kind
    );
    Ok(())
}

/// Deletes every table metaguard made in `roles`' namespaces: its whole
/// nft layer. Docker's and ecs-init's rules stay (the credentials DNAT).
fn delete_metaguard_tables(lab: &Lab, roles: &[Role]) -> Result<(), Failed> {
    lab.delete_metaguard_tables(roles)?;
    for &role in roles {
        let left = lab.run_in(role, "nft", &["list", "tables"])?;
        ensure!(
            !left.contains("metaguard"),
            "metaguard tables left in {role:?}: {left}"
        );
    }
    Ok(())
}

fn credentials(lab: &Lab) -> ProbeSpec {
    let mut s = lab.http_get(&Lab::credentials_url(Workload::BridgeC1));
    s.timeout_ms = 5000;
    s
}

fn new_bridge_container_and_task_refused_from_first_attempt_with_nft_gone() -> Result<(), Failed> {
    let mut lab = lab()?;
    let pins = lab.mount_bpffs()?;
    // Without metaguard, containers and tasks like those made below reach
    // IMDS every way, and their task credentials.
    let open_c = bridge_container(&mut lab, "c3", 13)?;
    let open_t = awsvpc_task(&mut lab, "task2", 22)?;
    for m in [&open_c, &open_t] {
        for spec in imds_probes(&lab) {
            reached(&lab, m, &spec)?;
        }
        reached(&lab, m, &credentials(&lab))?;
    }

    let out = apply(&lab, &default_policy(&lab, ""))?;
    ensure!(out.contains("bpf layer: active"), "apply: {out}");
    // metaguard's nft layer goes; no metaguard process runs.
    delete_metaguard_tables(&lab, &[Role::Host, Role::Task1])?;

    // Created now: nobody has classified their namespaces.
    let new_c = bridge_container(&mut lab, "c4", 14)?;
    let new_t = awsvpc_task(&mut lab, "task3", 23)?;
    for m in [&new_c, &new_t] {
        for spec in imds_probes(&lab) {
            refused(&lab, m, &spec)?;
        }
        // The default keeps task credentials (task_metadata = "allow").
        reached(&lab, m, &credentials(&lab))?;
    }
    // Those that existed at apply were classified by their bridges
    // (docker0, ecs-bridge: IMDS denied): refused too.
    for m in [&open_c, &open_t] {
        refused(&lab, m, &http(&lab, "169.254.169.254"))?;
        reached(&lab, m, &credentials(&lab))?;
    }
    // The agent and an unrelated host process, in the guarded cgroups but
    // on the host's network, still reach IMDS.
    for w in [Workload::Agent, Workload::HostOther] {
        expect_reached(&lab, w, &http(&lab, "169.254.169.254"))?;
        expect_reached(&lab, w, &http(&lab, "[fd00:ec2::254]"))?;
    }
    // Each refusal was an event with the caller's cgroup.
    let events = sys::PinDir::new(&pins)
        .drain_events()
        .map_err(|e| e.to_string())?;
    let c4 = lab.cgroup2().id(&new_c.cgroup).map_err(|e| e.to_string())?;
    ensure!(
        events
            .iter()
            .any(|e| e.cgroup_id == c4 && e.syscall == "connect" && e.port == 80),
        "no connect event for c4: {events:?}"
    );
    // verify sees both layers: the nft tables are gone (drift), the BPF
    // layer is in place.
    let path = lab.work_dir().join("policy.toml").display().to_string();
    let v = lab.metaguard(&["verify", "--config", &path])?;
    let text = String::from_utf8_lossy(&v.stdout).into_owned();
    ensure!(v.status.code() == Some(1), "verify: {v:?}");
    ensure!(
        text.contains("DRIFT  host") && text.contains("ok     bpf "),
        "verify: {text}"
    );
    let out = lab.metaguard(&["remove"])?;
    ensure!(out.status.success(), "remove: {out:?}");
    Ok(())
}

fn allowing_workload_is_refused_until_classified_then_reaches() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.mount_bpffs()?;
    let glob = format!(
        "/run/netns/{}",
        lab.netns_name(Role::Host).replace("host", "ok*")
    );
    // Tasks (IMDS through their own ENI, not a host bridge, so the nft
    // layer's bridge rules do not see it) in namespaces this glob selects.
    let allowing =
        format!("[[workload]]\nname = \"allowed\"\nnetns = [\"{glob}\"]\nimds = \"allow\"\n");
    let text = default_policy(&lab, &allowing);
    // Without a daemon: a namespace made after apply is unknown — refused,
    // although its workload allows IMDS.
    apply(&lab, &text)?;
    let early = awsvpc_task(&mut lab, "ok1", 31)?;
    refused(&lab, &early, &http(&lab, "169.254.169.254"))?;
    // Applying again classifies it.
    apply(&lab, &text)?;
    reached(&lab, &early, &http(&lab, "169.254.169.254"))?;

    // With the daemon: it classifies new namespaces as they appear.
    let path = lab.work_dir().join("policy.toml").display().to_string();
    let d = Daemon::start(&lab, &path, &[])?;
    let started = Instant::now();
    let late = awsvpc_task(&mut lab, "ok2", 32)?;
    let made = started.elapsed();
    // Every attempt is refused (nothing arrives) until the namespace is
    // classified, then it reaches; never anything else.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut refusals = 0;
    loop {
        let spec = http(&lab, "169.254.169.254");
        let r = run(&lab, &late, &spec)?;
        if r.ok() && arrived(&lab, &spec) {
            break;
        }
        ensure!(
            r.outcome == Outcome::Denied && !arrived(&lab, &spec),
            "before classification: expected EPERM, got {r:?}"
        );
        refusals += 1;
        ensure!(
            Instant::now() < deadline,
            "not classified within 3 s; daemon log: {}",
            d.log_text()
        );
    }
    eprintln!(
        "allowing workload: namespace made in {made:?}, reached {:?} after it was made, {refusals} refused attempt(s) before",
        started.elapsed()
    );
    d.wait_log("bpf namespace map updated", Duration::from_secs(1))?;
    for line in d
        .log_text()
        .lines()
        .filter(|l| l.contains("bpf namespace map updated"))
    {
        eprintln!("daemon: {line}");
    }
    // A neighbour on the same bridge in the default workload stays refused.
    let other = bridge_container(&mut lab, "c5", 33)?;
    refused(&lab, &other, &http(&lab, "169.254.169.254"))?;
    Ok(())
}

/// `ecstasks.slice` (the ECS agent's, at its first task) and cgroupfs
/// Docker's `docker` (at its first container) appear after metaguard has
/// started: the daemon attaches the programs when such a subtree is made.
/// The control: a bridge container's process in a cgroup no program runs
/// for is refused by the nft layer (a reset), not by the programs (EPERM).
fn a_container_cgroup_made_after_the_daemon_started_gets_the_programs() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.mount_bpffs()?;
    let root = lab.cgroup_root();
    let late = format!("{root}/ecstasks.slice");
    let text = format!("{BUILTIN_DEFAULT_TOML}\n[layers]\ncontainer_cgroups = [\"{late}\"]\n");
    let path = lab.write_file("policy.toml", &text)?.display().to_string();
    ensure!(
        !lab.cgroup2().exists(&late),
        "{late} exists before the daemon starts"
    );
    let d = Daemon::start(&lab, &path, &[])?;
    // Said at start: nothing covers containers yet.
    d.wait_log(
        "none of [layers] container_cgroups exists",
        Duration::from_secs(1),
    )?;
    let c = bridge_container(&mut lab, "c8", 38)?;
    let spec = http(&lab, "169.254.169.254");
    let before = run(&lab, &c, &spec)?;
    ensure!(
        !before.ok() && before.outcome != Outcome::Denied && !arrived(&lab, &spec),
        "before the subtree exists: expected the nft layer's refusal, got {before:?}"
    );
    let made = Instant::now();
    let task = Made {
        netns: c.netns.clone(),
        cgroup: format!("{late}/task-c8"),
    };
    lab.cgroup2()
        .create(&task.cgroup)
        .map_err(|e| e.to_string())?;
    let deadline = made + Duration::from_secs(3);
    loop {
        let spec = http(&lab, "169.254.169.254");
        let r = run(&lab, &task, &spec)?;
        ensure!(
            !r.ok() && !arrived(&lab, &spec),
            "in {}: reached IMDS: {r:?}",
            task.cgroup
        );
        if r.outcome == Outcome::Denied {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no EPERM within 3 s of making {late}: {r:?}; daemon log: {}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "container cgroup made after start: programs refuse in it {:?} after it was made",
        made.elapsed()
    );
    d.wait_log("bpf layer updated", Duration::from_secs(1))?;
    Ok(())
}

/// IMDSv2 (a token PUT, then a GET with it) from a made namespace: the
/// status of the GET, or the PUT's outcome when it got no token.
fn imdsv2(lab: &Lab, m: &Made) -> Result<Result<u16, ProbeResult>, Failed> {
    let mut put = lab.http_get(&Lab::imds_url_v4("/latest/api/token"));
    if let ProbeKind::Http {
        method, headers, ..
    } = &mut put.kind
    {
        *method = "PUT".into();
        headers.push(("X-aws-ec2-metadata-token-ttl-seconds".into(), "60".into()));
    }
    let r = run(lab, m, &put)?;
    let token = match (&r.status, &r.body) {
        (Some(200), Some(t)) if !t.is_empty() => t.clone(),
        _ => return Ok(Err(r)),
    };
    let mut get = lab.http_get(&Lab::imds_url_v4("/latest/meta-data/instance-id"));
    if let ProbeKind::Http { headers, .. } = &mut get.kind {
        headers.push(("X-aws-ec2-metadata-token".into(), token));
    }
    Ok(Ok(run(lab, m, &get)?.status.unwrap_or(0)))
}

fn proxied_namespaces_pass_the_hooks_to_the_proxy_unclassified_ones_are_refused(
) -> Result<(), Failed> {
    use metaguard_core::bpf_policy::{CLASS_IMDS, CLASS_TASK_METADATA};
    let mut lab = lab()?;
    let pins = lab.mount_bpffs()?;
    let docker = lab.start_docker_api()?;
    let audit = lab.work_dir().join("audit.jsonl");
    let root = lab.cgroup_root();
    let text = format!(
        "[proxy]\naudit_log = \"{}\"\n\n[[workload]]\nname = \"containers\"\nbridges = [\"docker0\", \"ecs-bridge\"]\nimds = \"proxy\"\ntask_metadata = \"proxy\"\n\n[layers]\ncontainer_cgroups = [\"{root}/docker\", \"{root}/system.slice\"]\n",
        audit.display()
    );
    let path = lab
        .write_file("proxy-bpf.toml", &text)?
        .display()
        .to_string();
    let d = Daemon::start(&lab, &path, &[])?;
    // Unclassified namespaces must not reach what is proxied: the default
    // refuses both classes.
    let maps = sys::PinDir::new(&pins)
        .read_maps()
        .map_err(|e| e.to_string())?;
    ensure!(
        maps.netns.get(&0).map(|d| d.1) == Some(CLASS_IMDS | CLASS_TASK_METADATA),
        "namespace default: {:?}",
        maps.netns.get(&0)
    );
    // c1 is classified (docker0, proxied: no bits): its connect passes the
    // hook and the nft redirect takes it to the proxy.
    let got = imdsv2_instance_id(&lab, Workload::BridgeC1)?;
    if got != Some(("200".to_string(), lab.instance_id().to_string())) {
        let cookie = lab.netns(Role::C1).cookie().map_err(|e| e.to_string())?;
        let r = lab.probe(Workload::BridgeC1, &http(&lab, "169.254.169.254"))?;
        return Err(format!(
            "c1: IMDSv2 through the proxy: {got:?}; c1 cookie {cookie}, map {:?}; a GET: {r:?}\n{}",
            maps.netns,
            d.log_text()
        )
        .into());
    }
    let proxied = |lines: &[serde_json::Value]| {
        lines
            .iter()
            .filter(|l| l["service"] == "imds" && l["status"] == 200)
            .count()
    };
    let before = proxied(&audit_lines(&audit));
    ensure!(
        before >= 1,
        "no proxy audit line for c1: {:?}",
        audit_lines(&audit)
    );

    // A new bridge container: refused while unclassified — unless the
    // daemon, re-planning on some other event, has already found it on
    // docker0; then the proxy served it (an audit line). Never direct.
    let m = bridge_container(&mut lab, "c6", 16)?;
    let spec = http(&lab, "169.254.169.254");
    let r = run(&lab, &m, &spec)?;
    let served = proxied(&audit_lines(&audit)) > before;
    ensure!(
        (r.outcome == Outcome::Denied && !arrived(&lab, &spec)) || (r.ok() && served),
        "c6's first attempt, unclassified: {r:?} (proxy audit line: {served})"
    );
    let before = proxied(&audit_lines(&audit));
    // Docker reports it (an event): the daemon classifies it, and its
    // IMDSv2 goes through the proxy (an audit line), never direct.
    docker.start(metaguard_lab::docker::FakeContainer {
        id: metaguard_lab::docker::FakeContainer::id_for(&format!("{}-c6", lab.id())),
        name: "c6".into(),
        image: "lab/app".into(),
        labels: Default::default(),
        env: Vec::new(),
        network_mode: "bridge".into(),
        pid: 0,
        sandbox_key: format!("/run/netns/{}", m.netns),
        user: String::new(),
        cgroup_parent: String::new(),
        running: true,
        addresses: Vec::new(),
    });
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match imdsv2(&lab, &m)? {
            Ok(200) => break,
            Ok(other) => return Err(format!("c6: IMDSv2 GET answered {other}").into()),
            Err(r) => {
                ensure!(
                    r.outcome == Outcome::Denied && Instant::now() < deadline,
                    "c6 before classification: {r:?}\n{}",
                    d.log_text()
                );
            }
        }
    }
    ensure!(
        proxied(&audit_lines(&audit)) > before,
        "c6's IMDSv2 reached without the proxy: {:?}",
        audit_lines(&audit)
    );
    Ok(())
}

fn containers_selectors_resolve_to_cgroups_and_namespaces() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.mount_bpffs()?;
    lab.start_docker_api()?;
    let all = [
        Workload::BridgeC1,
        Workload::BridgeC2,
        Workload::HostNetwork,
        Workload::Agent,
        Workload::HostOther,
    ];
    for w in all {
        expect_reached(&lab, w, &http(&lab, "169.254.169.254"))?;
    }
    // By name and by label, through the lab's Docker API: a host-network
    // container (decided by its cgroup) and a bridge container (by its
    // namespace); the agent, also by name, allowed.
    let root = lab.cgroup_root();
    let text = format!(
        r#"[[workload]]
name = "agent"
containers = ["ecs-agent"]
imds = "allow"

[[workload]]
name = "worker"
containers = ["label:com.amazonaws.ecs.container-name=worker"]
imds = "deny"

[[workload]]
name = "web"
containers = ["ecs-lab-web-1-app-c1"]
imds = "deny"

[layers]
container_cgroups = ["{root}/docker", "{root}/system.slice"]
"#
    );
    let out = apply(&lab, &text)?;
    ensure!(out.contains("bpf layer: active"), "apply: {out}");
    delete_metaguard_tables(&lab, &[Role::Host, Role::C1])?;
    denied_by_bpf(&lab, Workload::HostNetwork)?;
    denied_by_bpf(&lab, Workload::BridgeC1)?;
    // c2 is a known container no workload selects: untouched, as in the
    // nft layer; the agent and host processes reach.
    for w in [Workload::BridgeC2, Workload::Agent, Workload::HostOther] {
        expect_reached(&lab, w, &http(&lab, "169.254.169.254"))?;
    }
    Ok(())
}

/// A container whose cgroup is below none of the attach points (here
/// `container_cgroups` leaves out the lab's `docker`, where c1 lives) gets
/// no program: `apply` names it, and with the nft tables gone it reaches
/// IMDS. With its parent listed, no warning, and EPERM.
fn containers_outside_every_attach_point_are_named() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.mount_bpffs()?;
    lab.start_docker_api()?;
    let root = lab.cgroup_root();
    let apply_stderr = |lab: &Lab, container_cgroups: &str| -> Result<String, Failed> {
        let text = format!(
            "{BUILTIN_DEFAULT_TOML}\n[layers]\ncontainer_cgroups = [{container_cgroups}]\n"
        );
        Ok(apply_said(lab, &text)?.1)
    };
    let warning = "below none of its attach points";
    let err = apply_stderr(&lab, &format!("\"{root}/system.slice\""))?;
    let line = err
        .lines()
        .find(|l| l.contains(warning))
        .unwrap_or_default();
    ensure!(
        line.contains("ecs-lab-web-1-app-c1") && line.contains(&format!("{root}/docker/")),
        "apply did not name c1's container: {err}"
    );
    eprintln!("apply: {line}");
    delete_metaguard_tables(&lab, &[Role::Host, Role::C1])?;
    expect_reached(&lab, Workload::BridgeC1, &http(&lab, "169.254.169.254"))?;
    let err = apply_stderr(&lab, &format!("\"{root}/system.slice\", \"{root}/docker\""))?;
    ensure!(!err.contains(warning), "still warned: {err}");
    delete_metaguard_tables(&lab, &[Role::Host, Role::C1])?;
    denied_by_bpf(&lab, Workload::BridgeC1)?;
    Ok(())
}

fn denied_by_bpf(lab: &Lab, w: Workload) -> Result<(), Failed> {
    let spec = http(lab, "169.254.169.254");
    let r = lab.probe(w, &spec)?;
    ensure!(
        r.outcome == Outcome::Denied && !arrived(lab, &spec),
        "{}: expected EPERM with nothing arrived, got {r:?}",
        w.label()
    );
    Ok(())
}
