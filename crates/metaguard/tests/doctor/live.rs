//! Live doctor tests on the lab (root). Every command that changes state
//! runs inside a lab namespace (`lab.run_in`, `lab.metaguard`): nothing
//! touches the root network namespace.

use libtest_mimic::Failed;
use metaguard_lab::imds::TokenMode;
use metaguard_lab::matrix::{Matrix, Target, Verdict};
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, LabOptions, Workload};

use crate::{ensure, exe, fixtures_dir};

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "live::clean_lab_reports_clean",
        true,
        clean_lab_reports_clean,
    ),
    (
        "live::f1_route_localnet_off_breaks_credentials",
        true,
        f1_route_localnet_off_breaks_credentials,
    ),
    (
        "live::f2_cis_drop_breaks_credentials",
        true,
        f2_cis_drop_breaks_credentials,
    ),
    (
        "live::f3_fix_in_wrong_backend_does_not_take",
        true,
        f3_fix_in_wrong_backend_does_not_take,
    ),
    (
        "live::f4_docker_restart_wipes_rule",
        true,
        f4_docker_restart_wipes_rule,
    ),
    (
        "live::f6_awsvpc_task_bypasses_docker_user",
        true,
        f6_awsvpc_task_bypasses_docker_user,
    ),
    ("live::f8_ipv6_bypass", true, f8_ipv6_bypass),
    (
        "live::f1_fix_does_not_open_f17",
        true,
        f1_fix_does_not_open_f17,
    ),
    (
        "live::f17_route_localnet_reach_around",
        true,
        f17_route_localnet_reach_around,
    ),
    (
        "live::f14_silent_drop_makes_sdks_wait",
        true,
        f14_silent_drop_makes_sdks_wait,
    ),
    (
        "live::f14_nft_table_drop_makes_sdks_wait",
        true,
        f14_nft_table_drop_makes_sdks_wait,
    ),
    (
        "live::f13_container_reads_another_tasks_credentials",
        true,
        f13_container_reads_another_tasks_credentials,
    ),
    (
        "live::f12_credential_variables_where_task_metadata_is_denied",
        true,
        f12_credential_variables_where_task_metadata_is_denied,
    ),
    (
        "live::f18_proxy_without_no_proxy",
        true,
        f18_proxy_without_no_proxy,
    ),
    ("live::f20_imdsv1_enabled", true, f20_imdsv1_enabled),
    (
        "live::f19_hop_limit_1_measured_from_a_bridge",
        true,
        f19_hop_limit_1_measured_from_a_bridge,
    ),
    (
        "live::f16_proxy_adds_x_forwarded_for",
        true,
        f16_proxy_adds_x_forwarded_for,
    ),
    (
        "live::f23_table_from_another_version",
        true,
        f23_table_from_another_version,
    ),
];

/// The F17 guard a careful operator adds on a host ecs-init set up: drop
/// 127/8 arriving off `lo` unless it was DNATed (ecs-init's DNAT of
/// 169.254.170.2 to 127.0.0.1:51679 keeps working).
const F17_GUARD: &str = "-d 127.0.0.0/8 ! -i lo -m conntrack ! --ctstate DNAT -j DROP";

struct Guarded {
    lab: Lab,
    config: String,
}

fn sh(lab: &Lab, role: Role, prog: &str, args: &str) -> Result<(), Failed> {
    let a: Vec<&str> = args.split_whitespace().collect();
    lab.run_in(role, prog, &a)
        .map(drop)
        .map_err(|e| format!("{prog} {args}: {e}").into())
}

/// A lab guarded the way a careful operator would without metaguard: the
/// AWS DOCKER-USER rule in both families and the F17 guard (in `backend`'s
/// iptables), and blackhole routes in the awsvpc task. Doctor knows the task namespace
/// from the config.
fn guarded(legacy: bool) -> Result<Guarded, Failed> {
    let lab = Lab::start(LabOptions::new(exe())).map_err(|e| format!("lab: {e}"))?;
    let (v4, v6) = if legacy {
        ("iptables-legacy", "ip6tables-legacy")
    } else {
        ("iptables", "ip6tables")
    };
    sh(&lab, Role::Host, v4, &format!("-w -I INPUT 1 {F17_GUARD}"))?;
    sh(&lab, Role::Host, v4, "-w -N DOCKER-USER")?;
    sh(&lab, Role::Host, v4, "-w -A FORWARD -j DOCKER-USER")?;
    sh(
        &lab,
        Role::Host,
        v4,
        "-w -A DOCKER-USER -d 169.254.169.254/32 -j REJECT --reject-with icmp-admin-prohibited",
    )?;
    sh(&lab, Role::Host, v6, "-w -N DOCKER-USER")?;
    sh(&lab, Role::Host, v6, "-w -A FORWARD -j DOCKER-USER")?;
    sh(
        &lab,
        Role::Host,
        v6,
        "-w -A DOCKER-USER -d fd00:ec2::254/128 -j REJECT --reject-with icmp6-adm-prohibited",
    )?;
    sh(
        &lab,
        Role::Task1,
        "ip",
        "route add blackhole 169.254.169.254/32",
    )?;
    sh(
        &lab,
        Role::Task1,
        "ip",
        "-6 route add blackhole fd00:ec2::254/128",
    )?;
    let task = format!("/run/netns/{}", lab.netns_name(Role::Task1));
    let toml = format!(
        "[[workload]]\nname = \"bridge-containers\"\nbridges = [\"docker0\", \"br-*\", \"ecs-bridge\"]\nimds = \"deny\"\ntask_metadata = \"allow\"\n\n[[workload]]\nname = \"awsvpc-tasks\"\nnetns = [\"{task}\"]\nimds = \"deny\"\n"
    );
    let config = lab
        .write_file("doctor.toml", &toml)
        .map_err(|e| e.to_string())?
        .display()
        .to_string();
    Ok(Guarded { lab, config })
}

/// Runs `doctor --json [extra…]` in the lab host; returns (exit, finding ids, stdout).
fn doctor(g: &Guarded, extra: &[&str]) -> Result<(Option<i32>, Vec<String>, String), Failed> {
    let mut args = vec!["doctor", "--json", "--config", &g.config];
    args.extend_from_slice(extra);
    let out = g.lab.metaguard(&args).map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(2) {
        return Err(format!("doctor {extra:?} exited 2: {stderr}").into());
    }
    let v: serde_json::Value =
        serde_json::from_str(&stdout).map_err(|e| format!("not JSON ({e}): {stdout} {stderr}"))?;
    let report = match (v.get("after"), v.get("report")) {
        (Some(after), _) => after,
        (None, Some(report)) => report,
        _ => &v,
    };
    let mut ids: Vec<String> = report["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    Ok((out.status.code(), ids, stdout))
}

fn cell(m: &Matrix, w: Workload, t: Target) -> Verdict {
    m.cell(w, t).map_or(Verdict::Other, |c| c.verdict)
}

/// The root namespace's network state (read-only): addresses, routes and
/// the nft ruleset, without lifetimes that count down by themselves.
fn root_state() -> Result<String, Failed> {
    let mut out = String::new();
    for (prog, args) in [
        ("ip", &["addr", "show"][..]),
        ("ip", &["route", "show", "table", "all"]),
        ("ip", &["-6", "route", "show", "table", "all"]),
        ("nft", &["list", "ruleset"]),
    ] {
        let text = metaguard_lab::cmd::run(None, prog, args, None).map_err(|e| e.to_string())?;
        out.extend(
            text.lines()
                .filter(|l| !l.contains("valid_lft"))
                .map(|l| format!("{l}\n")),
        );
    }
    Ok(out)
}

/// The whole cycle: clean → break → exactly `ids` → --fix → probes → clean;
/// the root namespace is the same before and after.
fn cycle(
    legacy: bool,
    brk: impl FnOnce(&Guarded) -> Result<(), Failed>,
    ids: &[&str],
    broken: &[(Workload, Target, Verdict)],
) -> Result<(), Failed> {
    let before = root_state()?;
    cycle_in_lab(legacy, brk, ids, broken)?;
    ensure!(
        root_state()? == before,
        "the root network namespace changed during a doctor test"
    );
    Ok(())
}

fn cycle_in_lab(
    legacy: bool,
    brk: impl FnOnce(&Guarded) -> Result<(), Failed>,
    ids: &[&str],
    broken: &[(Workload, Target, Verdict)],
) -> Result<(), Failed> {
    let g = guarded(legacy)?;
    let (code, found, out) = doctor(&g, &[])?;
    ensure!(
        code == Some(0) && found.is_empty(),
        "guarded lab not clean: {found:?}\n{out}"
    );
    brk(&g)?;
    let workloads: Vec<Workload> = broken.iter().map(|b| b.0).collect();
    let m = Matrix::measure(&g.lab, &workloads).map_err(|e| e.to_string())?;
    for (w, t, v) in broken {
        ensure!(
            cell(&m, *w, *t) == *v,
            "after the break, {w:?} {t:?} is {:?}, expected {v:?}",
            cell(&m, *w, *t)
        );
    }
    let (code, found, out) = doctor(&g, &[])?;
    ensure!(
        code == Some(1) && found == ids,
        "broken lab: expected {ids:?}, got {found:?} (exit {code:?})\n{out}"
    );
    let (code, found_dry, out) = doctor(&g, &["--fix", "--dry-run"])?;
    ensure!(
        code == Some(1) && found_dry == ids,
        "dry run changed something or reported otherwise: {found_dry:?}\n{out}"
    );
    let (_, still, _) = doctor(&g, &[])?;
    ensure!(still == ids, "--dry-run changed the host: now {still:?}");
    let (code, after, out) = doctor(&g, &["--fix"])?;
    ensure!(
        code == Some(0) && after.is_empty(),
        "--fix left {after:?} (exit {code:?})\n{out}"
    );
    let m = Matrix::measure(&g.lab, &workloads).map_err(|e| e.to_string())?;
    for (w, t, v) in broken {
        let want = if *v == Verdict::Reached {
            Verdict::Blocked
        } else {
            Verdict::Reached
        };
        ensure!(
            cell(&m, *w, *t) == want,
            "after --fix, {w:?} {t:?} is {:?}, expected {want:?}",
            cell(&m, *w, *t)
        );
    }
    let (code, again, out) = doctor(&g, &[])?;
    ensure!(
        code == Some(0) && again.is_empty(),
        "doctor after --fix: {again:?}\n{out}"
    );
    Ok(())
}

fn clean_lab_reports_clean() -> Result<(), Failed> {
    let g = guarded(false)?;
    // IMDSv2 only (the lab's IMDS answers v1 too by default: F20).
    g.lab.imds().set_token_mode(TokenMode::Required);
    let (code, found, out) = doctor(&g, &[])?;
    ensure!(code == Some(0) && found.is_empty(), "{found:?}\n{out}");
    // --probe from a short-lived namespace on docker0 agrees with the static verdicts.
    let (code, _, out) = doctor(&g, &["--probe"])?;
    ensure!(code == Some(0), "--probe disagrees (exit {code:?}):\n{out}");
    ensure!(
        out.contains("\"probes\""),
        "no probes in the report:\n{out}"
    );
    Ok(())
}

fn f1_route_localnet_off_breaks_credentials() -> Result<(), Failed> {
    cycle(
        false,
        |g| {
            sh(
                &g.lab,
                Role::Host,
                "sysctl",
                "-q -w net.ipv4.conf.all.route_localnet=0",
            )
        },
        &["F1"],
        &[(
            Workload::BridgeC1,
            Target::TaskCredentials,
            Verdict::Blocked,
        )],
    )
}

fn f2_cis_drop_breaks_credentials() -> Result<(), Failed> {
    cycle(
        false,
        |g| {
            sh(
                &g.lab,
                Role::Host,
                "iptables",
                "-w -I INPUT -d 127.0.0.0/8 ! -i lo -j DROP",
            )
        },
        &["F2"],
        &[
            (
                Workload::BridgeC1,
                Target::TaskCredentials,
                Verdict::Blocked,
            ),
            (
                Workload::AwsvpcTask,
                Target::TaskCredentials,
                Verdict::Blocked,
            ),
        ],
    )
}

fn f3_fix_in_wrong_backend_does_not_take() -> Result<(), Failed> {
    cycle(
        false,
        accept_in_wrong_backend,
        &["F2", "F3"],
        &[
            (
                Workload::BridgeC1,
                Target::TaskCredentials,
                Verdict::Blocked,
            ),
            (
                Workload::AwsvpcTask,
                Target::TaskCredentials,
                Verdict::Blocked,
            ),
        ],
    )
}

fn f4_docker_restart_wipes_rule() -> Result<(), Failed> {
    cycle(
        false,
        |g| sh(&g.lab, Role::Host, "iptables", "-w -F DOCKER-USER"),
        &["F4"],
        &[(Workload::BridgeC1, Target::ImdsV4, Verdict::Reached)],
    )
}

fn f6_awsvpc_task_bypasses_docker_user() -> Result<(), Failed> {
    cycle(
        false,
        |g| {
            sh(
                &g.lab,
                Role::Task1,
                "ip",
                "route del blackhole 169.254.169.254/32",
            )?;
            sh(
                &g.lab,
                Role::Task1,
                "ip",
                "-6 route del blackhole fd00:ec2::254/128",
            )
        },
        &["F6"],
        &[
            (Workload::AwsvpcTask, Target::ImdsV4, Verdict::Reached),
            (Workload::AwsvpcTask, Target::ImdsV6, Verdict::Reached),
        ],
    )
}

fn f8_ipv6_bypass() -> Result<(), Failed> {
    cycle(
        false,
        |g| sh(&g.lab, Role::Host, "ip6tables", "-w -F DOCKER-USER"),
        &["F8"],
        &[(Workload::BridgeC1, Target::ImdsV6, Verdict::Reached)],
    )
}

/// Removes the F17 guard `guarded` added (the host as ecs-init leaves it).
fn unguard_f17(g: &Guarded, legacy: bool) -> Result<(), Failed> {
    let v4 = if legacy {
        "iptables-legacy"
    } else {
        "iptables"
    };
    sh(&g.lab, Role::Host, v4, &format!("-w -D INPUT {F17_GUARD}"))
}

/// F1's fix on a host without the F17 guard: it puts the guard in before it
/// turns route_localnet on, so credentials come back and F17 stays closed.
fn f1_fix_does_not_open_f17() -> Result<(), Failed> {
    cycle(
        false,
        |g| {
            unguard_f17(g, false)?;
            sh(
                &g.lab,
                Role::Host,
                "sysctl",
                "-q -w net.ipv4.conf.all.route_localnet=0",
            )
        },
        &["F1"],
        &[(
            Workload::BridgeC1,
            Target::TaskCredentials,
            Verdict::Blocked,
        )],
    )
}

/// Makes `role` route 127.0.0.0/8 through its gateway (the F17 attack; the
/// container has NET_ADMIN in its own namespace). Bridge containers use the
/// lab's helper; the awsvpc task routes via ecs-bridge.
fn route_loopback_via_gateway(g: &Guarded, role: Role) -> Result<(), Failed> {
    if role != Role::Task1 {
        return g
            .lab
            .route_loopback_via_gateway(role)
            .map_err(|e| e.to_string().into());
    }
    for args in [
        "route add 127.0.0.0/8 via 169.254.172.1 dev ecs-eth0 table 100",
        "rule add to 127.0.0.0/8 lookup 100 pref 100",
        "rule add lookup local pref 1000",
        "rule del pref 0",
    ] {
        sh(&g.lab, role, "ip", args)?;
    }
    sh(
        &g.lab,
        role,
        "sysctl",
        "-q -w net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.ecs-eth0.route_localnet=1",
    )
}

/// Whether `w` gets an HTTP answer from `url`.
fn answers(g: &Guarded, w: Workload, url: &str) -> Result<bool, Failed> {
    let mut spec = g.lab.http_get(url);
    spec.timeout_ms = 1500;
    let r = g.lab.probe(w, &spec).map_err(|e| e.to_string())?;
    Ok(r.ok())
}

/// The lab as ecs-init leaves it (DNAT to 127.0.0.1:51679, route_localnet=1,
/// no guard): a bridge container and an awsvpc task that route 127.0.0.1 via
/// their gateway reach the agent's port directly. Doctor names F17; `--fix`
/// blocks that route and keeps task credentials working, and names nothing new.
fn f17_route_localnet_reach_around() -> Result<(), Failed> {
    let before = root_state()?;
    let g = guarded(false)?;
    unguard_f17(&g, false)?;
    let (code, found, out) = doctor(&g, &[])?;
    ensure!(
        code == Some(1) && found == ["F17"],
        "ecs-init lab: expected [F17], got {found:?} (exit {code:?})\n{out}"
    );
    let workloads = [
        (Workload::BridgeC1, Role::C1),
        (Workload::AwsvpcTask, Role::Task1),
    ];
    for (w, role) in workloads {
        route_loopback_via_gateway(&g, role)?;
        let direct = format!(
            "http://127.0.0.1:{}/v2/credentials/{}",
            metaguard_lab::topology::addr::AGENT_PORT,
            w.credentials_id()
        );
        ensure!(
            answers(&g, w, &direct)?,
            "{w:?}: the direct route to {direct} does not answer before the fix"
        );
    }
    let (code, after, out) = doctor(&g, &["--fix"])?;
    ensure!(
        code == Some(0) && after.is_empty(),
        "--fix left {after:?} (exit {code:?})\n{out}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    ensure!(
        v["new_after_fix"].as_array().is_some_and(Vec::is_empty),
        "--fix opened new findings: {}",
        v["new_after_fix"]
    );
    for (w, _) in workloads {
        let direct = format!(
            "http://127.0.0.1:{}/v2/credentials/{}",
            metaguard_lab::topology::addr::AGENT_PORT,
            w.credentials_id()
        );
        ensure!(
            !answers(&g, w, &direct)?,
            "{w:?}: {direct} still answers after --fix"
        );
        let creds = Lab::credentials_url(w);
        ensure!(
            answers(&g, w, &creds)?,
            "{w:?}: task credentials ({creds}) broken by --fix"
        );
    }
    let (code, again, out) = doctor(&g, &[])?;
    ensure!(
        code == Some(0) && again.is_empty(),
        "doctor after --fix: {again:?}\n{out}"
    );
    drop(g);
    ensure!(
        root_state()? == before,
        "the root network namespace changed during a doctor test"
    );
    Ok(())
}

/// Replaces the DOCKER-USER reject `guarded` added by a silent DROP (in
/// `backend`'s iptables): the AWS knowledge-center recipe as often copied.
fn drop_instead_of_reject(g: &Guarded, legacy: bool) -> Result<(), Failed> {
    let v4 = if legacy {
        "iptables-legacy"
    } else {
        "iptables"
    };
    sh(
        &g.lab,
        Role::Host,
        v4,
        "-w -R DOCKER-USER 1 -d 169.254.169.254/32 -j DROP",
    )
}

/// How a bridge container's IMDS request fails, and how long it takes.
fn imds_failure(g: &Guarded) -> Result<(metaguard_lab::probe::Outcome, u64), Failed> {
    let mut spec = g.lab.http_get(&Lab::imds_url_v4("/latest/meta-data/"));
    spec.timeout_ms = 1500;
    let r = g
        .lab
        .probe(Workload::BridgeC1, &spec)
        .map_err(|e| e.to_string())?;
    Ok((r.outcome, r.elapsed_us / 1000))
}

/// F14: the IMDS guard drops instead of rejecting; a bridge container's
/// request waits its whole timeout. Doctor names F14; `--fix` puts an ICMP
/// reject before the drop: the request fails at once, still blocked, and
/// doctor names nothing new.
fn f14_silent_drop_makes_sdks_wait() -> Result<(), Failed> {
    f14_cycle(|g| drop_instead_of_reject(g, false))
}

/// F14 with the drop in an nft table of its own (the DOCKER-USER reject
/// removed): `--fix` inserts the rule's matches with an icmpx reject
/// before its handle, and nft takes the rule text doctor renders.
fn f14_nft_table_drop_makes_sdks_wait() -> Result<(), Failed> {
    f14_cycle(|g| {
        sh(
            &g.lab,
            Role::Host,
            "iptables",
            "-w -D DOCKER-USER -d 169.254.169.254/32 -j REJECT --reject-with icmp-admin-prohibited",
        )?;
        g.lab
            .run_in(
                Role::Host,
                "nft",
                &["add table inet guard; add chain inet guard filter_fw { type filter hook forward priority 0; policy accept; }; add rule inet guard filter_fw ip daddr 169.254.169.254 counter drop"],
            )
            .map(drop)
            .map_err(|e| format!("nft: {e}").into())
    })
}

fn f14_cycle(brk: impl FnOnce(&Guarded) -> Result<(), Failed>) -> Result<(), Failed> {
    use metaguard_lab::probe::Outcome;
    let before = root_state()?;
    let g = guarded(false)?;
    brk(&g)?;
    let (outcome, ms) = imds_failure(&g)?;
    ensure!(
        outcome == Outcome::Timeout,
        "after the break IMDS should time out, got {outcome:?} in {ms} ms"
    );
    let (code, found, out) = doctor(&g, &[])?;
    ensure!(
        code == Some(1) && found == ["F14"],
        "DROP lab: expected [F14], got {found:?} (exit {code:?})\n{out}"
    );
    let (code, after, out) = doctor(&g, &["--fix"])?;
    ensure!(
        code == Some(0) && after.is_empty(),
        "--fix left {after:?} (exit {code:?})\n{out}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    ensure!(
        v["new_after_fix"].as_array().is_some_and(Vec::is_empty),
        "--fix opened new findings: {}",
        v["new_after_fix"]
    );
    // Rejected: an ICMP answer, well before the 1.5 s timeout (the bound is
    // loose so that a loaded machine does not fail it).
    let (outcome, ms) = imds_failure(&g)?;
    ensure!(
        outcome == Outcome::Unreachable && ms < 1000,
        "after --fix IMDS should be refused at once, got {outcome:?} in {ms} ms"
    );
    let (code, again, out) = doctor(&g, &[])?;
    ensure!(
        code == Some(0) && again.is_empty(),
        "doctor after --fix: {again:?}\n{out}"
    );
    drop(g);
    ensure!(
        root_state()? == before,
        "the root network namespace changed during a doctor test"
    );
    Ok(())
}

/// Serves the lab's Docker API: its containers carry the credential
/// variables of four tasks (F13 on the guarded lab's config).
fn with_docker(g: &mut Guarded) -> Result<(), Failed> {
    g.lab.start_docker_api().map_err(|e| e.to_string())?;
    Ok(())
}

/// The bridge containers and the awsvpc task denied task metadata (their
/// credentials flows are then not F13's), with the Docker API: the
/// credential variables the agent injected are F12.
fn deny_task_metadata(g: &mut Guarded) -> Result<(), Failed> {
    let task = format!("/run/netns/{}", g.lab.netns_name(Role::Task1));
    let toml = format!(
        "[[workload]]\nname = \"bridge-containers\"\nbridges = [\"docker0\", \"br-*\", \"ecs-bridge\"]\nimds = \"deny\"\ntask_metadata = \"deny\"\n\n[[workload]]\nname = \"awsvpc-tasks\"\nnetns = [\"{task}\"]\nimds = \"deny\"\ntask_metadata = \"deny\"\n"
    );
    g.lab
        .write_file("doctor.toml", &toml)
        .map_err(|e| e.to_string())?;
    with_docker(g)
}

/// A container started with a proxy and no NO_PROXY (added to the lab's
/// Docker API after its own containers; backed by this test's process).
fn proxied_container(g: &mut Guarded) -> Result<(), Failed> {
    start_proxied(g, "localhost,169.254.169.254")
}

/// (Re)starts the proxied container with `no_proxy`.
fn start_proxied(g: &mut Guarded, no_proxy: &str) -> Result<(), Failed> {
    use metaguard_lab::docker::FakeContainer;
    let docker = g.lab.start_docker_api().map_err(|e| e.to_string())?;
    docker.start(FakeContainer {
        id: FakeContainer::id_for("doctor-proxied"),
        name: "proxied-app".into(),
        image: "public.ecr.aws/lab/app:latest".into(),
        labels: Default::default(),
        env: vec![
            "HTTPS_PROXY=http://user:secret@proxy.internal:3128".into(),
            format!("NO_PROXY={no_proxy}"),
        ],
        network_mode: "bridge".into(),
        pid: std::process::id(),
        sandbox_key: String::new(),
        user: String::new(),
        cgroup_parent: String::new(),
        running: true,
        addresses: Vec::new(),
    });
    Ok(())
}

/// F13: with four tasks' credentials on the host and task metadata
/// allowed, doctor names F13, and a bridge container indeed reads the
/// awsvpc task's credentials with that task's id. (The fix is a config
/// change — the relay of proxy mode — so `--fix` has nothing to apply.)
fn f13_container_reads_another_tasks_credentials() -> Result<(), Failed> {
    let mut g = guarded(false)?;
    with_docker(&mut g)?;
    let (code, found, out) = doctor(&g, &[])?;
    ensure!(
        code == Some(1) && found == ["F13"],
        "expected [F13], got {found:?} (exit {code:?})\n{out}"
    );
    ensure!(
        out.contains("tasks hold credentials on this host"),
        "no task evidence:\n{out}"
    );
    let other = Lab::credentials_url(Workload::AwsvpcTask);
    ensure!(
        answers(&g, Workload::BridgeC1, &other)?,
        "a bridge container should read the awsvpc task's credentials ({other})"
    );
    let (code, _, out) = doctor(&g, &["--fix", "--dry-run"])?;
    ensure!(
        code == Some(1) && out.contains("task_metadata = \\\"proxy\\\""),
        "the dry run should show the manual fix:\n{out}"
    );
    Ok(())
}

/// F12: the agent's credential variables in containers whose workload is
/// denied task metadata, named per container.
fn f12_credential_variables_where_task_metadata_is_denied() -> Result<(), Failed> {
    let mut g = guarded(false)?;
    deny_task_metadata(&mut g)?;
    let (code, found, out) = doctor(&g, &[])?;
    ensure!(
        code == Some(1) && found == ["F12"],
        "expected [F12], got {found:?} (exit {code:?})\n{out}"
    );
    ensure!(
        out.contains("container ecs-lab-web-1-app-c1")
            && out.contains("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
        "F12 evidence does not name the container and variable:\n{out}"
    );
    ensure!(
        !out.contains("/v2/credentials/"),
        "a credentials id leaked into the report:\n{out}"
    );
    Ok(())
}

/// F18: a container with HTTPS_PROXY and a NO_PROXY that misses
/// 169.254.170.2; the proxy's password never reaches the report.
fn f18_proxy_without_no_proxy() -> Result<(), Failed> {
    let mut g = guarded(false)?;
    proxied_container(&mut g)?;
    let (code, found, out) = doctor(&g, &[])?;
    ensure!(
        code == Some(1) && found == ["F13", "F18"],
        "expected [F13, F18], got {found:?} (exit {code:?})\n{out}"
    );
    ensure!(
        out.contains("container proxied-app") && out.contains("169.254.170.2 not exempted"),
        "F18 evidence:\n{out}"
    );
    ensure!(!out.contains("secret"), "the proxy password leaked:\n{out}");
    // The operator's fix: the container restarted with both addresses
    // exempted. F18 goes; F13 (several tasks' credentials) stays.
    start_proxied(&mut g, "localhost,169.254.169.254,169.254.170.2")?;
    let (_, found, out) = doctor(&g, &[])?;
    ensure!(found == ["F13"], "after NO_PROXY: {found:?}\n{out}");
    Ok(())
}

/// F20: the lab's IMDS answers tokenless requests; `--probe` sees a
/// tokenless GET answered 200 from the host's namespace. Requiring tokens
/// (what `aws ec2 modify-instance-metadata-options --http-tokens required`
/// does) clears it. Without `--probe` nothing is sent and nothing is named.
fn f20_imdsv1_enabled() -> Result<(), Failed> {
    let g = guarded(false)?;
    let (code, found, out) = doctor(&g, &[])?;
    ensure!(code == Some(0) && found.is_empty(), "{found:?}\n{out}");
    let (code, found, out) = doctor(&g, &["--probe"])?;
    ensure!(
        code == Some(1) && found == ["F20"],
        "expected [F20], got {found:?} (exit {code:?})\n{out}"
    );
    ensure!(
        out.contains("from host: GET /latest/meta-data/ without a token answered 200"),
        "F20 evidence:\n{out}"
    );
    g.lab.imds().set_token_mode(TokenMode::Required);
    let (code, found, out) = doctor(&g, &["--probe"])?;
    ensure!(
        code == Some(0) && found.is_empty(),
        "after requiring tokens: {found:?}\n{out}"
    );
    Ok(())
}

/// Bridge containers allowed IMDS (no DOCKER-USER rule, a config that
/// allows it), tokens required.
fn bridge_allowed_imds(g: &Guarded, legacy: bool) -> Result<(), Failed> {
    let (v4, v6) = if legacy {
        ("iptables-legacy", "ip6tables-legacy")
    } else {
        ("iptables", "ip6tables")
    };
    let toml = "[[workload]]\nname = \"bridge-containers\"\nbridges = [\"docker0\", \"br-*\", \"ecs-bridge\"]\nimds = \"allow\"\ntask_metadata = \"allow\"\n";
    g.lab
        .write_file("doctor.toml", toml)
        .map_err(|e| e.to_string())?;
    sh(&g.lab, Role::Host, v4, "-w -F DOCKER-USER")?;
    sh(&g.lab, Role::Host, v6, "-w -F DOCKER-USER")?;
    g.lab.imds().set_token_mode(TokenMode::Required);
    Ok(())
}

/// F19: hop limit 1 with bridge containers allowed IMDS: from the host the
/// token PUT is answered; from a namespace on docker0 it gets nothing
/// while a connection to IMDS works. A hop limit of 2 clears it.
fn f19_hop_limit_1_measured_from_a_bridge() -> Result<(), Failed> {
    let g = guarded(false)?;
    bridge_allowed_imds(&g, false)?;
    let (code, found, out) = doctor(&g, &["--probe"])?;
    ensure!(
        found.is_empty(),
        "hop limit 2: expected nothing, got {found:?} (exit {code:?})\n{out}"
    );
    g.lab.imds().set_put_response_hop_limit(1);
    let (code, found, out) = doctor(&g, &["--probe"])?;
    ensure!(
        code == Some(1) && found == ["F19"],
        "hop limit 1: expected [F19], got {found:?} (exit {code:?})\n{out}"
    );
    g.lab.imds().set_put_response_hop_limit(2);
    let (_, found, out) = doctor(&g, &["--probe"])?;
    ensure!(found.is_empty(), "hop limit 2 again: {found:?}\n{out}");
    Ok(())
}

/// A proxy on the lab host (172.17.0.1:8181, in the lab's host namespace)
/// that adds `X-Forwarded-For` to every request it passes to IMDS — the
/// F16 breakage. Runs until the lab's namespace goes away (bounded: one
/// thread per connection, the test makes a handful).
fn start_xff_proxy(g: &Guarded) -> Result<(), Failed> {
    use std::io::{Read as _, Write as _};
    let listener = g
        .lab
        .netns(Role::Host)
        .spawn_thread("xff-proxy-bind", || {
            std::net::TcpListener::bind("172.17.0.1:8181")
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "bind thread panicked")??;
    // Threads started by a thread inside the lab's host namespace are in
    // it too: the upstream connections leave from there.
    g.lab
        .netns(Role::Host)
        .spawn_thread("xff-proxy", move || {
            for conn in listener.incoming().take(16) {
                let Ok(mut client) = conn else { continue };
                let peer = client
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                        match client.read(&mut b) {
                            Ok(1) => head.push(b[0]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let Some((first, rest)) = text.split_once("\r\n") else {
                        return;
                    };
                    let req = format!(
                        "{first}\r\nX-Forwarded-For: {peer}\r\nConnection: close\r\n{rest}"
                    );
                    let Ok(mut up) = std::net::TcpStream::connect("169.254.169.254:80") else {
                        return;
                    };
                    if up.write_all(req.as_bytes()).is_err() {
                        return;
                    }
                    let mut answer = Vec::new();
                    let _ = up.read_to_end(&mut answer);
                    let _ = client.write_all(&answer);
                });
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The DNAT of bridge containers' IMDS requests to the XFF proxy.
const XFF_DNAT: &str = "-t nat -I PREROUTING 1 -i docker0 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 172.17.0.1:8181";

/// Tokens required, the XFF proxy started and bridge containers' IMDS
/// requests DNATed to it (in `legacy`'s iptables).
fn behind_xff_proxy(g: &Guarded, legacy: bool) -> Result<(), Failed> {
    g.lab.imds().set_token_mode(TokenMode::Required);
    start_xff_proxy(g)?;
    let v4 = if legacy {
        "iptables-legacy"
    } else {
        "iptables"
    };
    sh(&g.lab, Role::Host, v4, &format!("-w {XFF_DNAT}"))
}

/// F16: bridge containers' IMDS requests DNATed to a proxy that adds
/// X-Forwarded-For: from a namespace on docker0 the token PUT is refused
/// (403). Doctor names F16 (and F15, the IP-keyed proxy); without the
/// proxy (DNAT removed) nothing is named.
fn f16_proxy_adds_x_forwarded_for() -> Result<(), Failed> {
    let g = guarded(false)?;
    behind_xff_proxy(&g, false)?;
    let (code, found, out) = doctor(&g, &["--probe"])?;
    ensure!(
        code == Some(1) && found == ["F15", "F16"],
        "expected [F15, F16], got {found:?} (exit {code:?})\n{out}"
    );
    ensure!(
        out.contains("from bridge docker0: PUT /latest/api/token answered 403"),
        "F16 evidence:\n{out}"
    );
    sh(
        &g.lab,
        Role::Host,
        "iptables",
        &format!(
            "-w {}",
            XFF_DNAT.replace("-I PREROUTING 1", "-D PREROUTING")
        ),
    )?;
    let (code, found, out) = doctor(&g, &["--probe"])?;
    ensure!(
        code == Some(0) && found.is_empty(),
        "without the proxy: {found:?}\n{out}"
    );
    Ok(())
}

/// `metaguard apply` with the lab's doctor config (in the lab's host
/// namespace, as every lab command).
fn apply(g: &Guarded) -> Result<(), Failed> {
    let out = g
        .lab
        .metaguard(&["apply", "--config", &g.config])
        .map_err(|e| e.to_string())?;
    ensure!(
        out.status.success(),
        "metaguard apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// An `inet metaguard` table as an older metaguard left it: applied, then
/// a chain this version does not render added (a stand-in for a renamed
/// chain).
fn table_from_another_version(g: &mut Guarded) -> Result<(), Failed> {
    apply(g)?;
    sh(
        &g.lab,
        Role::Host,
        "nft",
        "add chain inet metaguard imds_guard_v0",
    )
}

/// F23: doctor is silent on the table this version applied, names F23
/// once the table holds a chain this version does not render, and is
/// silent again after `metaguard apply` replaced it.
fn f23_table_from_another_version() -> Result<(), Failed> {
    let mut g = guarded(false)?;
    apply(&g)?;
    let (code, found, out) = doctor(&g, &[])?;
    ensure!(
        code == Some(0) && found.is_empty(),
        "after apply: {found:?}\n{out}"
    );
    table_from_another_version(&mut g)?;
    let (code, found, out) = doctor(&g, &[])?;
    ensure!(
        code == Some(1) && found == ["F23"],
        "expected [F23], got {found:?} (exit {code:?})\n{out}"
    );
    ensure!(out.contains("imds_guard_v0"), "F23 evidence:\n{out}");
    apply(&g)?;
    let (code, found, out) = doctor(&g, &[])?;
    ensure!(
        code == Some(0) && found.is_empty(),
        "after apply again: {found:?}\n{out}"
    );
    Ok(())
}

/// `ethtool -S` of an ENA interface (c6i) whose link-local allowance was
/// exceeded — the lab has no ENA device, so F21's fixtures carry this text.
const ENA_STATS: &str = "# ethtool -S ens5 (driver ena)
NIC statistics:
     tx_timeout: 0
     suspend: 0
     resume: 0
     wd_expired: 0
     interface_up: 1
     interface_down: 0
     admin_q_pause: 0
     bw_in_allowance_exceeded: 0
     bw_out_allowance_exceeded: 0
     pps_allowance_exceeded: 0
     conntrack_allowance_exceeded: 0
     linklocal_allowance_exceeded: 1873
     queue_0_tx_cnt: 918273
     queue_0_rx_cnt: 1203948
";

/// Edits a fixture after collection: what the lab cannot produce.
fn post_collect(name: &str, dir: &std::path::Path) -> Result<(), Failed> {
    if name.starts_with("f21-") {
        std::fs::write(dir.join("ethtool-stats.txt"), ENA_STATS)?;
    }
    if name.starts_with("f22-") {
        // dockerd running with "iptables": false in daemon.json (there is
        // no dockerd in the lab).
        let p = dir.join("docker.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
        v["daemon"] = serde_json::json!({"running": true, "iptables": false, "ip6tables": null, "bridge": null, "env": {}, "env_source": "/proc/812/environ"});
        std::fs::write(&p, serde_json::to_string_pretty(&v)? + "\n")?;
    }
    Ok(())
}

/// Writes the lab-made fixtures (run on purpose, see main.rs). With
/// `METAGUARD_FIXTURES=name,name` only those are written.
pub fn generate_fixtures() -> Result<(), Failed> {
    type Break = fn(&mut Guarded) -> Result<(), Failed>;
    let scenarios: &[(&str, bool, &str, Break)] = &[
        ("clean", false, "", |_| Ok(())),
        ("f1-route-localnet-off", false, "F1", |g| {
            unguard_f17(g, false)?;
            sh(
                &g.lab,
                Role::Host,
                "sysctl",
                "-q -w net.ipv4.conf.all.route_localnet=0",
            )
        }),
        ("f2-cis-drop-nft", false, "F2", |g| {
            sh(
                &g.lab,
                Role::Host,
                "iptables-nft",
                "-w -I INPUT -d 127.0.0.0/8 ! -i lo -j DROP",
            )
        }),
        ("f2-cis-hardened-legacy", true, "F2", |g| cis_legacy(g)),
        ("f3-accept-in-wrong-backend", false, "F2 F3", |g| {
            accept_in_wrong_backend(g)
        }),
        ("f4-docker-user-flushed-nft", false, "F4", |g| {
            sh(&g.lab, Role::Host, "iptables-nft", "-w -F DOCKER-USER")
        }),
        ("f4-docker-user-flushed-legacy", true, "F4", |g| {
            sh(&g.lab, Role::Host, "iptables-legacy", "-w -F DOCKER-USER")
        }),
        ("f6-awsvpc-unguarded", false, "F6", |g| {
            sh(
                &g.lab,
                Role::Task1,
                "ip",
                "route del blackhole 169.254.169.254/32",
            )?;
            sh(
                &g.lab,
                Role::Task1,
                "ip",
                "-6 route del blackhole fd00:ec2::254/128",
            )
        }),
        ("f8-ipv6-bypass-nft", false, "F8", |g| {
            sh(&g.lab, Role::Host, "ip6tables-nft", "-w -F DOCKER-USER")
        }),
        ("f8-ipv6-bypass-legacy", true, "F8", |g| {
            sh(&g.lab, Role::Host, "ip6tables-legacy", "-w -F DOCKER-USER")
        }),
        ("f10-agent-publishes-port-80", false, "F10", |g| {
            sh(&g.lab, Role::Host, "iptables-nft", "-w -t nat -N DOCKER")?;
            sh(
                &g.lab,
                Role::Host,
                "iptables-nft",
                "-w -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
            )?;
            sh(&g.lab, Role::Host, "iptables-nft", "-w -t nat -A DOCKER -d 169.254.170.2/32 ! -i docker0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 172.17.0.5:51679")
        }),
        ("f11-established-accepted-first", false, "F11", |g| {
            sh(
                &g.lab,
                Role::Host,
                "iptables-nft",
                "-w -I FORWARD 1 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            )
        }),
        ("f15-ip-keyed-imds-proxy", false, "F15", |g| {
            sh(&g.lab, Role::Host, "iptables-nft", "-w -t nat -I PREROUTING 1 -i docker0 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 172.17.0.1:8181")?;
            sh(&g.lab, Role::Host, "iptables-nft", "-w -D DOCKER-USER -d 169.254.169.254/32 -j REJECT --reject-with icmp-admin-prohibited")
        }),
        ("f17-route-localnet-reach-around-nft", false, "F17", |g| {
            unguard_f17(g, false)
        }),
        ("f17-route-localnet-reach-around-legacy", true, "F17", |g| {
            unguard_f17(g, true)
        }),
        ("f14-drop-instead-of-reject-nft", false, "F14", |g| {
            drop_instead_of_reject(g, false)
        }),
        ("f14-drop-instead-of-reject-legacy", true, "F14", |g| {
            drop_instead_of_reject(g, true)
        }),
        ("f13-other-tasks-credentials-nft", false, "F13", with_docker),
        (
            "f13-other-tasks-credentials-legacy",
            true,
            "F13",
            with_docker,
        ),
        (
            "f12-credential-variables-denied-nft",
            false,
            "F12",
            deny_task_metadata,
        ),
        (
            "f12-credential-variables-denied-legacy",
            true,
            "F12",
            deny_task_metadata,
        ),
        (
            "f18-proxy-without-no-proxy-nft",
            false,
            "F13 F18",
            proxied_container,
        ),
        (
            "f18-proxy-without-no-proxy-legacy",
            true,
            "F13 F18",
            proxied_container,
        ),
        ("f21-linklocal-allowance-nft", false, "F21", |_| Ok(())),
        ("f21-linklocal-allowance-legacy", true, "F21", |_| Ok(())),
        ("f22-docker-firewall-off-nft", false, "F22", |_| Ok(())),
        ("f22-docker-firewall-off-legacy", true, "F22", |_| Ok(())),
        (
            "f23-table-from-another-version-nft",
            false,
            "F23",
            table_from_another_version,
        ),
        (
            "f23-table-from-another-version-legacy",
            true,
            "F23",
            table_from_another_version,
        ),
        ("f20-imdsv1-enabled-probed-nft", false, "F20", |_| Ok(())),
        ("f20-imdsv1-enabled-probed-legacy", true, "F20", |_| Ok(())),
        ("f19-hop-limit-1-probed-nft", false, "F19", |g| {
            bridge_allowed_imds(g, false)?;
            g.lab.imds().set_put_response_hop_limit(1);
            Ok(())
        }),
        ("f19-hop-limit-1-probed-legacy", true, "F19", |g| {
            bridge_allowed_imds(g, true)?;
            g.lab.imds().set_put_response_hop_limit(1);
            Ok(())
        }),
        ("f16-proxy-adds-xff-probed-nft", false, "F15 F16", |g| {
            behind_xff_proxy(g, false)
        }),
        ("f16-proxy-adds-xff-probed-legacy", true, "F15 F16", |g| {
            behind_xff_proxy(g, true)
        }),
    ];
    let only = std::env::var("METAGUARD_FIXTURES").ok();
    for (name, legacy, expected, brk) in scenarios {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|n| n == *name))
        {
            continue;
        }
        let mut g = guarded(*legacy)?;
        brk(&mut g)?;
        let dir = fixtures_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let dir_arg = dir.display().to_string();
        let mut args = vec!["doctor", "--collect", &dir_arg, "--config", &g.config];
        // `*-probed-*` fixtures hold what --probe saw (probes.json).
        if name.contains("-probed-") {
            args.push("--probe");
        }
        let out = g.lab.metaguard(&args).map_err(|e| e.to_string())?;
        ensure!(
            out.status.success(),
            "collect {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        post_collect(name, &dir)?;
        std::fs::write(dir.join("expected"), format!("{expected}\n"))?;
        eprintln!("wrote {}", dir.display());
    }
    Ok(())
}

/// A CIS-hardened host: the hardening in iptables-legacy (INPUT policy
/// DROP, loopback rules, established, ssh), Docker/ecs-init in iptables-nft.
/// F3: the CIS DROP in iptables-legacy, and the ACCEPT meant to let the
/// agent's port through added with iptables-nft, where it does not help.
fn accept_in_wrong_backend(g: &Guarded) -> Result<(), Failed> {
    sh(
        &g.lab,
        Role::Host,
        "iptables-legacy",
        "-w -I INPUT -d 127.0.0.0/8 ! -i lo -j DROP",
    )?;
    for i in ["docker0", "ecs-bridge"] {
        sh(
            &g.lab,
            Role::Host,
            "iptables-nft",
            &format!("-w -I INPUT -i {i} -d 127.0.0.0/8 -p tcp -m tcp --dport 51679 -j ACCEPT"),
        )?;
    }
    Ok(())
}

fn cis_legacy(g: &Guarded) -> Result<(), Failed> {
    for r in [
        "-w -A INPUT -i lo -j ACCEPT",
        "-w -A INPUT -s 127.0.0.0/8 ! -i lo -j DROP",
        "-w -A INPUT -d 127.0.0.0/8 ! -i lo -j DROP",
        "-w -A INPUT -p tcp -m conntrack --ctstate ESTABLISHED -j ACCEPT",
        "-w -A INPUT -p udp -m conntrack --ctstate ESTABLISHED -j ACCEPT",
        "-w -A INPUT -p icmp -m conntrack --ctstate ESTABLISHED -j ACCEPT",
        "-w -A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT",
        "-w -A OUTPUT -o lo -j ACCEPT",
        "-w -A OUTPUT -p tcp -m conntrack --ctstate NEW,ESTABLISHED -j ACCEPT",
        "-w -A OUTPUT -p udp -m conntrack --ctstate NEW,ESTABLISHED -j ACCEPT",
        "-w -A OUTPUT -p icmp -m conntrack --ctstate NEW,ESTABLISHED -j ACCEPT",
        "-w -P INPUT DROP",
    ] {
        sh(&g.lab, Role::Host, "iptables-legacy", r)?;
    }
    Ok(())
}
