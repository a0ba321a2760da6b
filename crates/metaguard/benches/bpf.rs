//! The cgroup BPF layer's cost per `connect()` (root only), on the lab:
//!
//! * UDP `connect()` from bridge container c1 to 10.0.0.1:5353 — no packet
//!   leaves, so the call is the route lookup plus the connect hooks; timed
//!   per call inside the container's cgroup — with metaguard's programs
//!   attached to the container's parent cgroup (`docker`, which the
//!   programs walk up to) versus the same policy with `[layers] bpf =
//!   false`. The nft table is the same in both, and UDP connect sends no
//!   packet, so the difference is the hook.
//! * the built-in default policy (bridges and task namespaces): programs
//!   on the container cgroup that also look up the socket's network
//!   namespace (`bpf_get_netns_cookie` + one hash lookup) — the check
//!   issue 20 adds — in the same rounds.
//! * the refusal itself: `connect()` to 169.254.169.254 (EPERM).
//! * observe (`mode = "observe"` on the same policy: the programs let
//!   IMDS through and report each call): `connect()` to 10.0.0.1 (the
//!   check an observed workload's unrelated calls pay) and to
//!   169.254.169.254 (observed: an event with `comm` on the ring buffer,
//!   which the bench drains before and after, so no reserve fails).
//! * TCP connects/s to 10.0.0.1:8080 with and without the hook.
//!
//! Rounds alternate with/without; the added cost is taken per round.
//! `sudo cargo bench -p metaguard --bench bpf` rewrites the `bpf` section of
//! BENCHMARKS.md; under `cargo test` it runs once, small, as a smoke test.

use std::path::PathBuf;

use metaguard_lab::probe::{ProbeKind, ProbeSpec};
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, LabOptions, Workload};

mod common;

fn main() {
    common::main_as_root("bpf", "network namespaces, bpf", run);
}

/// bpffs at `<lab>/bpffs`, unmounted (releasing every pin) on drop.
struct BpfFs(PathBuf);

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ =
            metaguard_lab::cmd::run(None, "umount", &["-l", &self.0.display().to_string()], None);
    }
}

fn policy(lab: &Lab, bpf: bool) -> String {
    format!("[layers]\nbpf = {bpf}\n\n{}", workloads(lab))
}

/// The same workloads under `mode = "observe"`.
fn observe_policy(lab: &Lab) -> String {
    format!("mode = \"observe\"\n\n{}", workloads(lab))
}

fn workloads(lab: &Lab) -> String {
    format!(
        "[[workload]]\nname = \"agent\"\ncgroups = [\"{agent}\"]\nimds = \"allow\"\n\n\
         [[workload]]\nname = \"containers\"\ncgroups = [\"{docker}\"]\nimds = \"deny\"\n",
        agent = lab.cgroup_of(Workload::Agent),
        docker = lab.cgroup_root() + "/docker",
    )
}

/// The built-in default policy, its container cgroups the lab's `docker`.
fn default_policy(lab: &Lab) -> String {
    format!(
        "{}\n[layers]\ncontainer_cgroups = [\"{}/docker\"]\n",
        metaguard_core::config::BUILTIN_DEFAULT_TOML,
        lab.cgroup_root()
    )
}

fn apply(lab: &Lab, text: &str, expect: &str) -> Result<(), String> {
    let path = lab
        .write_file("bench-bpf.toml", text)
        .map_err(|e| e.to_string())?;
    let out = lab
        .metaguard(&["apply", "--config", &path.display().to_string()])
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains(expect) {
        return Err(format!(
            "apply: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// (median ns, mean ns, errors) of `count` UDP connects from c1.
fn connect_cost(lab: &Lab, host: &str, count: u32) -> Result<(f64, f64, f64), String> {
    let spec = ProbeSpec {
        id: lab.probe_id("bench-bpf"),
        kind: ProbeKind::ConnectCost {
            host: host.into(),
            port: metaguard_lab::topology::addr::ECHO_UDP_PORT,
            count,
        },
        timeout_ms: 30_000,
    };
    let r = lab
        .probe(Workload::BridgeC1, &spec)
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(r.body.as_deref().unwrap_or("")).map_err(|e| format!("{e}: {r:?}"))?;
    Ok((
        v["median_ns"].as_f64().unwrap_or(0.0),
        v["mean_ns"].as_f64().unwrap_or(0.0),
        v["errors"].as_f64().unwrap_or(0.0),
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn range(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn run(full: bool) -> Result<(), String> {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_metaguard"));
    let lab = Lab::start(LabOptions::new(exe)).map_err(|e| e.to_string())?;
    lab.run_in(Role::C1, "sysctl", &["-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
        .map_err(|e| e.to_string())?;
    let dir = lab.work_dir().join("bpffs");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    metaguard_lab::cmd::run(
        None,
        "mount",
        &["-t", "bpf", "bpf", &dir.display().to_string()],
        None,
    )
    .map_err(|e| e.to_string())?;
    let _fs = BpfFs(dir);

    let rounds = if full { 7 } else { 1 };
    let count = if full { 200_000 } else { 1_000 };
    let tcp = if full { 3000 } else { 50 };
    let (mut off, mut on, mut added, mut denied) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut off_mean, mut on_mean) = (Vec::new(), Vec::new());
    let (mut ns, mut ns_added) = (Vec::new(), Vec::new());
    let (mut tcp_off, mut tcp_on, mut tcp_ratio) = (Vec::new(), Vec::new(), Vec::new());
    let (mut obs, mut obs_added, mut obs_event) = (Vec::new(), Vec::new(), Vec::new());
    let (mut imds_off, mut obs_event_added) = (Vec::new(), Vec::new());
    // Observed calls fill the ring buffer (256 KiB, 88-byte events + 8
    // bytes of header: ~2 700); nobody else drains it here.
    let observed_calls = if full { 2_000 } else { 200 };
    let drain = |lab: &Lab| -> Result<usize, String> {
        let pins = metaguard_sys::bpf::PinDir::new(lab.work_dir().join("bpffs/metaguard"));
        let mut events = pins.events().map_err(|e| e.to_string())?;
        Ok(events.drain().len())
    };
    for _ in 0..rounds {
        apply(&lab, &policy(&lab, false), "bpf layer: disabled")?;
        let (m0, a0, e0) = connect_cost(&lab, "10.0.0.1", count)?;
        // The same call to IMDS without a hook (a UDP connect sends
        // nothing, so the nft layer does not see it): the observed call's
        // baseline.
        let (m0i, _, e0i) = connect_cost(&lab, "169.254.169.254", observed_calls)?;
        let t0 = common::connect_rate(&lab, tcp)?;
        apply(&lab, &policy(&lab, true), "bpf layer: active")?;
        let (m1, a1, e1) = connect_cost(&lab, "10.0.0.1", count)?;
        let (md, _, ed) = connect_cost(&lab, "169.254.169.254", count / 10)?;
        let t1 = common::connect_rate(&lab, tcp)?;
        apply(&lab, &default_policy(&lab), "bpf layer: active")?;
        let (m2, _, e2) = connect_cost(&lab, "10.0.0.1", count)?;
        let (_, _, ed2) = connect_cost(&lab, "169.254.169.254", count / 10)?;
        apply(&lab, &observe_policy(&lab), "bpf layer: active")?;
        let (m3, _, e3) = connect_cost(&lab, "10.0.0.1", count)?;
        drain(&lab)?;
        let (m4, _, e4) = connect_cost(&lab, "169.254.169.254", observed_calls)?;
        let reported = drain(&lab)?;
        if e0 + e0i + e1 + e2 + e3 + e4 > 0.0
            || ed < f64::from(count / 10)
            || ed2 < f64::from(count / 10)
            || reported < observed_calls as usize
        {
            return Err(format!(
                "unexpected results: errors {e0}/{e1}/{e2}/{e3}/{e4}, denied {ed}/{ed2}, observed events {reported} of {observed_calls}"
            ));
        }
        obs.push(m3);
        obs_added.push(m3 - m0);
        obs_event.push(m4);
        imds_off.push(m0i);
        obs_event_added.push(m4 - m0i);
        ns.push(m2);
        ns_added.push(m2 - m0);
        off.push(m0);
        on.push(m1);
        off_mean.push(a0);
        on_mean.push(a1);
        added.push(m1 - m0);
        denied.push(md);
        tcp_off.push(t0);
        tcp_on.push(t1);
        tcp_ratio.push(t1 / t0);
    }
    let row = |name: &str, v: &[f64], unit: &str| {
        let (lo, hi) = range(v);
        format!(
            "| {name} | {lo:.0}{unit} | {:.0}{unit} | {hi:.0}{unit} |\n",
            median(v.to_vec())
        )
    };
    let mut report = String::from("| per UDP `connect()` from c1 (median of each round's calls) | min | median | max |\n|---|---:|---:|---:|\n");
    report += &row("no hook (`[layers] bpf = false`) → 10.0.0.1", &off, " ns");
    report += &row("hook attached → 10.0.0.1 (allowed)", &on, " ns");
    report += &row("**added by the hook** (per round)", &added, " ns");
    report += &row("hook → 169.254.169.254 (EPERM)", &denied, " ns");
    report += &row(
        "default policy: namespace + cgroup check → 10.0.0.1 (allowed)",
        &ns,
        " ns",
    );
    report += &row(
        "**added by the default policy's check** (per round)",
        &ns_added,
        " ns",
    );
    report += &row(
        "observe (`mode = \"observe\"`): hook → 10.0.0.1 (allowed)",
        &obs,
        " ns",
    );
    report += &row(
        "**added by the hook under observe** (per round)",
        &obs_added,
        " ns",
    );
    report += &row(
        "no hook → 169.254.169.254 (the same call, nothing observes it)",
        &imds_off,
        " ns",
    );
    report += &row(
        "observe: hook → 169.254.169.254 (allowed, event reported)",
        &obs_event,
        " ns",
    );
    report += &row(
        "**added by observing a call** (per round)",
        &obs_event_added,
        " ns",
    );
    report += &row("mean, no hook", &off_mean, " ns");
    report += &row("mean, hook", &on_mean, " ns");
    report +=
        "\n| TCP connects/s, c1 → 10.0.0.1:8080 | min | median | max |\n|---|---:|---:|---:|\n";
    report += &row("no hook", &tcp_off, "");
    report += &row("hook attached", &tcp_on, "");
    let (lo, hi) = range(&tcp_ratio);
    report += &format!(
        "| ratio (hook / none, per round) | {lo:.3} | {:.3} | {hi:.3} |\n",
        median(tcp_ratio.clone())
    );
    println!("{report}");
    let _ = lab.metaguard(&["remove"]);
    if full {
        common::write_section(
            "bpf",
            &format!(
                "## BPF layer — `sudo cargo bench -p metaguard --bench bpf`\n\n\
                 Lab: bridge container c1 (its own network namespace; cgroup `…/docker/c1`). Policy: the agent's cgroup \
                 allowed, `…/docker` denied IMDS; programs attached to `…/docker` (they walk the caller's ancestors, \
                 3 levels here). {rounds} alternating rounds: the same policy with `[layers] bpf = false` (no \
                 programs), then `true`, then the built-in default policy (bridges, task namespaces) with \
                 `container_cgroups = [\"…/docker\"]`, whose programs also look up c1's network namespace \
                 (c1 is listed: docker0, IMDS denied; 10.0.0.1 passes), then the first policy under `mode = \"observe\"` \
                 (IMDS let through and reported: {observed_calls} calls to it, the ring buffer drained before and after); \
                 {count} timed UDP `connect()` calls each (no packet is sent: the call is the \
                 route lookup plus the hook), then {tcp} TCP connects. Timing includes ~20–40 ns of `Instant::now`. \
                 Goal: ≤ 1 µs added per `connect()`. Machine: {}.\n\n{report}",
                common::machine()
            ),
        )?;
    }
    Ok(())
}
