//! The cgroup BPF layer on the lab: programs on the lab's own cgroups,
//! pinned under a bpf filesystem mounted in the lab's work directory (never
//! /sys/fs/bpf, never the cgroup2 root).
//!
//! Every "blocked" assertion is paired with proof that the same probe
//! reached before, and with the endpoint's request log showing nothing
//! arrived.

use std::path::PathBuf;
use std::time::Duration;

use libtest_mimic::Failed;
use metaguard_lab::probe::{Outcome, ProbeKind, ProbeResult, ProbeSpec};
use metaguard_lab::topology::{addr, Role};
use metaguard_lab::{Lab, Workload};
use metaguard_sys::bpf::{self as sys, Hook};

use crate::enforce::{arrived, expect_reached};
use crate::ensure;
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "bpf::f4_f5_nft_flushed_and_no_daemon_every_container_kind_still_gets_eperm",
        true,
        f4_f5_nft_flushed_and_no_daemon_every_container_kind_still_gets_eperm,
    ),
    (
        "bpf::reapply_keeps_one_attachment_verify_sees_both_layers_remove_spares_foreign",
        true,
        reapply_keeps_one_attachment_verify_sees_both_layers_remove_spares_foreign,
    ),
    (
        "bpf::raw_sockets_refused_for_configured_cgroups_packet_sockets_not_yet",
        true,
        raw_sockets_refused_for_configured_cgroups_packet_sockets_not_yet,
    ),
    (
        "bpf::daemon_audits_refusals_and_restart_keeps_one_attachment",
        true,
        daemon_audits_refusals_and_restart_keeps_one_attachment,
    ),
    (
        "bpf::layer_asked_for_but_not_active_verify_exits_1_with_the_reason_nft_still_guards",
        true,
        layer_asked_for_but_not_active_verify_exits_1_with_the_reason_nft_still_guards,
    ),
    (
        "bpf::netns_map_unknown_namespaces_denied_host_and_classified_ones_reach",
        true,
        netns_map_unknown_namespaces_denied_host_and_classified_ones_reach,
    ),
];

/// A bpf filesystem mounted at `<lab work dir>/bpffs` (where the lab's
/// metaguard pins: `bpffs/metaguard`). Unmounting it releases every pin
/// on it, so a failed test leaves nothing attached but its lab's cgroups
/// (removed by the lab's teardown).
pub struct BpfFs {
    pub dir: PathBuf,
}

impl BpfFs {
    pub fn mount(lab: &Lab) -> Result<BpfFs, Failed> {
        let dir = lab.work_dir().join("bpffs");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        metaguard_lab::cmd::run(
            None,
            "mount",
            &["-t", "bpf", "bpf", &dir.display().to_string()],
            None,
        )
        .map_err(|e| e.to_string())?;
        Ok(BpfFs { dir })
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.dir.join("metaguard")
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = metaguard_lab::cmd::run(
            None,
            "umount",
            &["-l", &self.dir.display().to_string()],
            None,
        );
    }
}

/// Cgroup workloads only (what the BPF layer acts on): the agent keeps
/// IMDS, every other container (bridge, awsvpc, host network — all under
/// `docker/`) is denied it. `extra` is appended.
pub fn policy(lab: &Lab, extra: &str) -> String {
    format!(
        r#"[[workload]]
name    = "ecs-agent"
cgroups = ["{agent}"]
imds    = "allow"

[[workload]]
name    = "containers"
cgroups = ["{docker}"]
imds    = "deny"
{extra}"#,
        agent = lab.cgroup_of(Workload::Agent),
        docker = lab.cgroup_root() + "/docker",
    )
}

/// `policy(lab, "")` written to the lab's `policy.toml`; its path.
pub fn policy_file(lab: &Lab) -> Result<String, Failed> {
    Ok(lab
        .write_file("policy.toml", &policy(lab, ""))?
        .display()
        .to_string())
}

pub fn apply(lab: &Lab, text: &str) -> Result<String, Failed> {
    Ok(apply_said(lab, text)?.0)
}

/// [`apply`]'s standard output and its standard error (the warnings).
pub fn apply_said(lab: &Lab, text: &str) -> Result<(String, String), Failed> {
    let path = lab.write_file("policy.toml", text)?.display().to_string();
    let out = lab.metaguard(&["apply", "--config", &path])?;
    ensure!(
        out.status.success(),
        "apply failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

pub fn http(lab: &Lab, host: &str) -> ProbeSpec {
    let mut s = lab.http_get(&format!("http://{host}/latest/meta-data/"));
    s.timeout_ms = 2000;
    s
}

fn sendto(lab: &Lab, host: &str) -> ProbeSpec {
    ProbeSpec {
        id: lab.probe_id("udp-sendto"),
        kind: ProbeKind::UdpSendTo {
            host: host.into(),
            port: addr::ECHO_UDP_PORT,
        },
        timeout_ms: 2000,
    }
}

fn socket(lab: &Lab, family: &str) -> ProbeSpec {
    ProbeSpec {
        id: lab.probe_id("socket"),
        kind: ProbeKind::Socket {
            family: family.into(),
        },
        timeout_ms: 2000,
    }
}

/// EPERM from the local stack; nothing arrived.
pub fn denied(lab: &Lab, w: Workload, spec: &ProbeSpec) -> Result<ProbeResult, Failed> {
    let r = lab.probe(w, spec)?;
    ensure!(
        r.outcome == Outcome::Denied,
        "{} → {:?}: expected EPERM, got {r:?}",
        w.label(),
        spec.kind
    );
    ensure!(
        !arrived(lab, spec),
        "{} → {:?}: the server logged the probe",
        w.label(),
        spec.kind
    );
    Ok(r)
}

fn cgroup_dir(lab: &Lab, rel: &str) -> PathBuf {
    lab.cgroup2().path(rel)
}

pub fn docker_dir(lab: &Lab) -> PathBuf {
    cgroup_dir(lab, &(lab.cgroup_root() + "/docker"))
}

/// The flushes an operator (or a config-management run) might do: every
/// nft table in the lab host and the task namespace (F4).
fn flush_nft(lab: &Lab) -> Result<(), Failed> {
    for role in [Role::Host, Role::Task1] {
        lab.run_in(role, "nft", &["flush", "ruleset"])?;
    }
    Ok(())
}

fn f4_f5_nft_flushed_and_no_daemon_every_container_kind_still_gets_eperm() -> Result<(), Failed> {
    let lab = lab()?;
    let fs = BpfFs::mount(&lab)?;
    let kinds = [
        Workload::BridgeC1,
        Workload::AwsvpcTask,
        Workload::HostNetwork,
    ];
    let hosts = [
        "169.254.169.254",
        "[fd00:ec2::254]",
        "[::ffff:169.254.169.254]",
    ];
    // Proof first: every probe reaches without protection.
    for w in kinds {
        for h in hosts {
            expect_reached(&lab, w, &http(&lab, h))?;
        }
        expect_reached(&lab, w, &sendto(&lab, "169.254.169.254"))?;
    }
    let out = apply(&lab, &policy(&lab, ""))?;
    ensure!(out.contains("bpf layer: active"), "apply: {out}");
    // The nft layer is gone and no metaguard process runs.
    flush_nft(&lab)?;
    let listed = lab.run_in(Role::Host, "nft", &["list", "ruleset"])?;
    ensure!(listed.trim().is_empty(), "nft still has rules: {listed}");
    let mut slowest = Duration::ZERO;
    for w in kinds {
        for h in hosts {
            let r = denied(&lab, w, &http(&lab, h))?;
            slowest = slowest.max(r.elapsed());
        }
        denied(&lab, w, &sendto(&lab, "169.254.169.254"))?;
        denied(&lab, w, &sendto(&lab, "fd00:ec2::254"))?;
    }
    // A refusal, not a drop: the whole probe (runtime start, resolve,
    // socket, connect) ends well before TCP's first SYN retransmission
    // (1 s) would. The bound leaves room for a loaded machine (48 ms was
    // seen with four builds running); the connect itself is measured in
    // benches/bpf.rs.
    ensure!(
        slowest < Duration::from_millis(500),
        "slowest refusal took {slowest:?}"
    );
    eprintln!("slowest refused probe (whole process-side attempt): {slowest:?}");
    // Outside the guarded cgroups, and the agent inside them, still reach.
    for w in [Workload::HostOther, Workload::Agent] {
        expect_reached(&lab, w, &http(&lab, "169.254.169.254"))?;
        expect_reached(&lab, w, &http(&lab, "[fd00:ec2::254]"))?;
    }
    // Every refusal was reported, with the caller's cgroup.
    let events = sys::PinDir::new(fs.pin_dir())
        .drain_events()
        .map_err(|e| e.to_string())?;
    let c1 = lab
        .cgroup2()
        .id(&lab.cgroup_of(Workload::BridgeC1))
        .map_err(|e| e.to_string())?;
    let imds: std::net::IpAddr = addr::IMDS_V4.into();
    ensure!(
        events.iter().any(|e| e.cgroup_id == c1
            && e.syscall == "connect"
            && e.port == 80
            && e.destination() == Some(imds)),
        "no connect event for c1: {events:?}"
    );
    ensure!(
        events.iter().any(|e| e.syscall == "sendmsg"),
        "no sendmsg event: {events:?}"
    );
    let out = lab.metaguard(&["remove"])?;
    ensure!(out.status.success(), "remove: {out:?}");
    Ok(())
}

fn reapply_keeps_one_attachment_verify_sees_both_layers_remove_spares_foreign() -> Result<(), Failed>
{
    let lab = lab()?;
    let fs = BpfFs::mount(&lab)?;
    let docker = docker_dir(&lab);
    // Someone else's program on the same cgroup, before metaguard.
    std::fs::create_dir_all(fs.dir.join("foreign")).map_err(|e| e.to_string())?;
    let foreign = sys::attach_unpinned(
        sys::OBJECT,
        &docker,
        Hook::Connect4,
        &fs.dir.join("foreign"),
    )
    .map_err(|e| e.to_string())?;
    let foreign_ids = sys::attached_programs(&docker, Hook::Connect4).map_err(|e| e.to_string())?;
    ensure!(foreign_ids.len() == 1, "foreign program: {foreign_ids:?}");
    // The foreign program allows everything: c1 still reaches.
    expect_reached(&lab, Workload::BridgeC1, &http(&lab, "169.254.169.254"))?;

    let text = policy(&lab, "");
    let first = apply(&lab, &text)?;
    ensure!(first.contains("attached 5, kept 0"), "first apply: {first}");
    // A second apply and a daemon-less "restart" (a new process finding the
    // pins) keep the attachments: none is duplicated.
    for _ in 0..2 {
        let again = apply(&lab, &text)?;
        ensure!(again.contains("attached 0, kept 5"), "re-apply: {again}");
    }
    for hook in Hook::ALL {
        let ids = sys::attached_programs(&docker, hook).map_err(|e| e.to_string())?;
        let want = if hook == Hook::Connect4 { 2 } else { 1 };
        ensure!(ids.len() == want, "{}: {ids:?}", hook.name());
    }
    denied(&lab, Workload::BridgeC2, &http(&lab, "169.254.169.254"))?;

    // verify sees both layers.
    let path = lab.write_file("policy.toml", &text)?.display().to_string();
    let out = lab.metaguard(&["verify", "--config", &path])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "verify: {stdout}");
    ensure!(
        stdout.contains("ok     host") && stdout.contains("ok     bpf "),
        "verify output: {stdout}"
    );
    // doctor shows the layer's live state.
    let out = lab.metaguard(&["doctor", "--json", "--config", &path])?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "doctor --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    ensure!(
        doc["bpf_layer"]["state"] == "active"
            && doc["bpf_layer"]["live_links"].as_array().map(Vec::len) == Some(5),
        "doctor's bpf_layer: {}",
        doc["bpf_layer"]
    );
    // Drift in the BPF layer: a link unpinned behind metaguard's back.
    let docker_id = lab
        .cgroup2()
        .id(&(lab.cgroup_root() + "/docker"))
        .map_err(|e| e.to_string())?;
    let pin = fs.pin_dir().join(format!("link-{docker_id}-connect6"));
    std::fs::remove_file(&pin).map_err(|e| format!("{}: {e}", pin.display()))?;
    let out = lab.metaguard(&["verify", "--config", &path])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.code() == Some(1)
            && stdout.contains("DRIFT  bpf")
            && stdout.contains("connect6"),
        "verify after unpinning: {stdout}"
    );
    let healed = apply(&lab, &text)?;
    ensure!(healed.contains("attached 1, kept 4"), "heal: {healed}");
    ensure!(
        sys::attached_programs(&docker, Hook::Connect6)
            .map_err(|e| e.to_string())?
            .len()
            == 1,
        "connect6 after heal"
    );

    // remove: metaguard's programs go, the foreign one stays attached.
    let out = lab.metaguard(&["remove"])?;
    ensure!(out.status.success(), "remove: {out:?}");
    for hook in Hook::ALL {
        let ids = sys::attached_programs(&docker, hook).map_err(|e| e.to_string())?;
        let want: &[u32] = if hook == Hook::Connect4 {
            &foreign_ids
        } else {
            &[]
        };
        ensure!(ids == want, "{} after remove: {ids:?}", hook.name());
    }
    ensure!(!fs.pin_dir().exists(), "pin dir left behind");
    expect_reached(&lab, Workload::BridgeC2, &http(&lab, "169.254.169.254"))?;
    drop(foreign);
    Ok(())
}

fn raw_sockets_refused_for_configured_cgroups_packet_sockets_not_yet() -> Result<(), Failed> {
    let lab = lab()?;
    let _fs = BpfFs::mount(&lab)?;
    // AF_PACKET is not here: `cgroup/sock_create` runs only in the inet
    // and inet6 socket paths, so packet sockets need another hook
    // (lsm_cgroup; not done). The probe proves it both ways below.
    let families = ["raw4", "raw6"];
    for w in [
        Workload::BridgeC1,
        Workload::HostNetwork,
        Workload::BridgeC2,
    ] {
        for f in families {
            let r = lab.probe(w, &socket(&lab, f))?;
            ensure!(r.ok(), "{} {f} before: {r:?}", w.label());
        }
    }
    let text = format!(
        r#"[[workload]]
name        = "no-raw"
cgroups     = ["{c1}", "{hostnet}"]
raw_sockets = "deny"
"#,
        c1 = lab.cgroup_of(Workload::BridgeC1),
        hostnet = lab.cgroup_of(Workload::HostNetwork),
    );
    let out = apply(&lab, &text)?;
    ensure!(out.contains("bpf layer: active"), "apply: {out}");
    for w in [Workload::BridgeC1, Workload::HostNetwork] {
        for f in families {
            let r = lab.probe(w, &socket(&lab, f))?;
            ensure!(
                r.outcome == Outcome::Denied,
                "{} {f} after: {r:?}",
                w.label()
            );
        }
        // Ordinary sockets and metadata access are untouched (imds allow).
        let r = lab.probe(w, &socket(&lab, "udp4"))?;
        ensure!(r.ok(), "{} udp4: {r:?}", w.label());
        expect_reached(&lab, w, &http(&lab, "169.254.169.254"))?;
    }
    // A cgroup not configured so keeps raw sockets.
    for f in families {
        let r = lab.probe(Workload::BridgeC2, &socket(&lab, f))?;
        ensure!(r.ok(), "c2 {f} after: {r:?}");
    }
    // The known gap, pinned so that closing it changes this test.
    let r = lab.probe(Workload::BridgeC1, &socket(&lab, "packet"))?;
    ensure!(r.ok(), "c1 packet (not covered by sock_create): {r:?}");
    let out = lab.metaguard(&["remove"])?;
    ensure!(out.status.success(), "remove: {out:?}");
    let r = lab.probe(Workload::BridgeC1, &socket(&lab, "raw4"))?;
    ensure!(r.ok(), "c1 raw4 after remove: {r:?}");
    Ok(())
}

fn layer_asked_for_but_not_active_verify_exits_1_with_the_reason_nft_still_guards(
) -> Result<(), Failed> {
    let lab = lab()?;
    expect_reached(&lab, Workload::BridgeC1, &http(&lab, "169.254.169.254"))?;
    // No bpf filesystem at the lab's pin directory.
    let path = policy_file(&lab)?;
    let out = lab.metaguard(&["apply", "--config", &path])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "apply: {stderr}");
    ensure!(
        stderr.contains("BPF layer not active"),
        "no warning: {stderr}"
    );
    ensure!(stdout.contains("bpf layer: unavailable"), "{stdout}");
    // The nft layer guards: refused fast by the network stack, not EPERM.
    let spec = http(&lab, "169.254.169.254");
    let r = lab.probe(Workload::HostNetwork, &spec)?;
    ensure!(
        matches!(r.outcome, Outcome::Refused | Outcome::Unreachable) && !arrived(&lab, &spec),
        "host-network workload: {r:?}"
    );
    // The config asks for the layer (on by default, a workload denies by
    // cgroup): the host is not guarded as configured.
    let out = lab.metaguard(&["verify", "--config", &path])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.code() == Some(1)
            && stdout.contains("ok     host")
            && stdout.contains("DRIFT  bpf ")
            && stdout.contains("asks for the BPF layer")
            && stdout.contains("is not on a bpf filesystem"),
        "verify: {stdout}"
    );
    // A bridge that denies asks for it too (the container cgroups guard
    // namespaces nobody has classified yet).
    let bridges = "[[workload]]\nname = \"bridges\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n";
    let path = lab
        .write_file("policy.toml", bridges)?
        .display()
        .to_string();
    apply(&lab, bridges)?;
    let out = lab.metaguard(&["verify", "--config", &path])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.code() == Some(1) && stdout.contains("asks for the BPF layer"),
        "verify (bridges deny): {stdout}"
    );
    // Not asked for: turned off, or nothing for it to guard.
    for (what, text) in [
        (
            "bpf = false",
            format!("[layers]\nbpf = false\n{}", policy(&lab, "")),
        ),
        (
            "bridges allowed",
            "[[workload]]\nname = \"bridges\"\nbridges = [\"docker0\"]\nimds = \"allow\"\n".into(),
        ),
    ] {
        let path = lab.write_file("policy.toml", &text)?.display().to_string();
        apply(&lab, &text)?;
        let out = lab.metaguard(&["verify", "--config", &path])?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success() && !stdout.contains("bpf"),
            "verify ({what}): {stdout}"
        );
    }
    Ok(())
}

fn daemon_audits_refusals_and_restart_keeps_one_attachment() -> Result<(), Failed> {
    use crate::daemon::{Daemon, Signal};
    let lab = lab()?;
    let _fs = BpfFs::mount(&lab)?;
    let docker = docker_dir(&lab);
    expect_reached(&lab, Workload::BridgeC1, &http(&lab, "169.254.169.254"))?;
    expect_reached(
        &lab,
        Workload::HostNetwork,
        &sendto(&lab, "169.254.169.254"),
    )?;
    let path = policy_file(&lab)?;
    let mut d = Daemon::start(&lab, &path, &[])?;
    d.wait_log("following refusal events", Duration::from_secs(5))?;
    denied(&lab, Workload::BridgeC1, &http(&lab, "169.254.169.254"))?;
    denied(
        &lab,
        Workload::HostNetwork,
        &sendto(&lab, "169.254.169.254"),
    )?;
    // One audit line per refusal, naming the caller's cgroup and the
    // destination; and the metric.
    d.wait_log_count("bpf-refusal", 2, Duration::from_secs(3))?;
    let c1 = lab
        .cgroup2()
        .id(&lab.cgroup_of(Workload::BridgeC1))
        .map_err(|e| e.to_string())?;
    let log = d.log_text();
    ensure!(
        log.lines().any(|l| l.contains("bpf-refusal")
            && l.contains(&format!("\"cgroup_id\":{c1}"))
            && l.contains("169.254.169.254:80")
            && l.contains("\"syscall\":\"connect\"")),
        "no audit line for c1's connect:\n{log}"
    );
    let mut spec = lab.http_get("http://127.0.0.1:9469/metrics");
    spec.timeout_ms = 1000;
    let r = lab.probe(Workload::HostOther, &spec)?;
    let body = r.body.unwrap_or_default();
    ensure!(
        body.contains("metaguard_bpf_refusals_total{syscall=\"connect\"} 1")
            && body.contains("metaguard_bpf_refusals_total{syscall=\"sendmsg\"} 1"),
        "metrics:\n{body}"
    );
    // SIGTERM leaves everything in place (fail-closed): no daemon, no nft
    // rules, still refused.
    d.signal(Signal::TERM)?;
    ensure!(
        d.wait_exit(Duration::from_secs(5))?.is_some(),
        "daemon did not exit"
    );
    flush_nft(&lab)?;
    denied(&lab, Workload::AwsvpcTask, &http(&lab, "[fd00:ec2::254]"))?;
    // A restarted daemon finds its pins: one attachment per hook.
    let d2 = Daemon::start(&lab, &path, &[])?;
    for hook in Hook::ALL {
        let ids = sys::attached_programs(&docker, hook).map_err(|e| e.to_string())?;
        ensure!(ids.len() == 1, "{} after restart: {ids:?}", hook.name());
    }
    let out = lab.metaguard(&["verify", "--config", &path])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success() && stdout.contains("ok     host") && stdout.contains("ok     bpf "),
        "verify with the daemon: {stdout}"
    );
    drop(d2);
    let out = lab.metaguard(&["remove"])?;
    ensure!(out.status.success(), "remove: {out:?}");
    Ok(())
}

/// The programs' namespace lookup (`mg_netns`, groundwork for issue 20),
/// driven through the pinned map: with a default entry (key 0) denying
/// IMDS and the lab host's namespace listed, a bridge container and an
/// awsvpc task (each in a namespace of its own) are refused IMDS — over
/// IPv4, IPv6 and IPv4-mapped IPv6, TCP and UDP — although their cgroup
/// allows it, while the agent and other processes of the lab's host
/// namespace still reach it; once c1's namespace is classified as allowed
/// it reaches again. No daemon runs.
fn netns_map_unknown_namespaces_denied_host_and_classified_ones_reach() -> Result<(), Failed> {
    use metaguard_core::bpf_policy::{rule_index, CLASS_IMDS, NO_RULE};
    let lab = lab()?;
    let fs = BpfFs::mount(&lab)?;
    let hosts = [
        "169.254.169.254",
        "[fd00:ec2::254]",
        "[::ffff:169.254.169.254]",
    ];
    let foreign = [Workload::BridgeC1, Workload::AwsvpcTask];
    for w in foreign {
        for h in hosts {
            expect_reached(&lab, w, &http(&lab, h))?;
        }
    }
    // Programs attached on the lab's docker cgroup, whose rule allows IMDS
    // (only raw sockets are denied there): the cgroups alone let it through.
    let text = format!(
        "[[workload]]\nname = \"containers\"\ncgroups = [\"{}/docker\"]\nraw_sockets = \"deny\"\n",
        lab.cgroup_root()
    );
    let out = apply(&lab, &text)?;
    ensure!(out.contains("bpf layer: active"), "apply: {out}");
    // This config's nft rules deny nobody anything (and the bridge
    // containers need Docker's NAT, so nft is not flushed here): every
    // refusal below is the programs'.
    for w in foreign {
        expect_reached(&lab, w, &http(&lab, "169.254.169.254"))?;
    }
    let cookie = |role| lab.netns(role).cookie().map_err(|e| e.to_string());
    let (host, c1) = (cookie(Role::Host)?, cookie(Role::C1)?);
    ensure!(host != c1 && host != 0, "cookies: host {host}, c1 {c1}");
    let pins = sys::PinDir::new(fs.pin_dir());
    let mut netns = std::collections::BTreeMap::new();
    netns.insert(host, (NO_RULE, 0));
    netns.insert(0, (rule_index(0, 0), CLASS_IMDS));
    pins.set_netns(&netns).map_err(|e| e.to_string())?;
    ensure!(
        pins.read_maps().map_err(|e| e.to_string())?.netns == netns,
        "mg_netns does not read back as written"
    );
    for w in foreign {
        for h in hosts {
            denied(&lab, w, &http(&lab, h))?;
        }
        denied(&lab, w, &sendto(&lab, "169.254.169.254"))?;
        denied(&lab, w, &sendto(&lab, "fd00:ec2::254"))?;
    }
    for w in [Workload::Agent, Workload::HostNetwork, Workload::HostOther] {
        expect_reached(&lab, w, &http(&lab, "169.254.169.254"))?;
        expect_reached(&lab, w, &http(&lab, "[fd00:ec2::254]"))?;
    }
    // Classified: c1's namespace belongs to a workload that allows IMDS.
    netns.insert(c1, (rule_index(0, 0), 0));
    pins.set_netns(&netns).map_err(|e| e.to_string())?;
    expect_reached(&lab, Workload::BridgeC1, &http(&lab, "169.254.169.254"))?;
    denied(&lab, Workload::AwsvpcTask, &http(&lab, "169.254.169.254"))?;
    // Taking the default away removes it before the listed entries.
    pins.set_netns(&std::collections::BTreeMap::new())
        .map_err(|e| e.to_string())?;
    expect_reached(&lab, Workload::AwsvpcTask, &http(&lab, "169.254.169.254"))?;
    let out = lab.metaguard(&["remove"])?;
    ensure!(out.status.success(), "remove: {out:?}");
    Ok(())
}
