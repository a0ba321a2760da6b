//! The BPF layer's life after the first apply: an upgrade that changes the
//! programs, pinned maps another version made, links unpinned or detached
//! behind the daemon's back, and a config that asks for a layer that
//! cannot run. Same rules as `bpf.rs`: lab cgroups only, pins only under
//! the lab's own bpf filesystem, and every "refused" paired with proof that
//! the same probe reached without protection.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use metaguard_lab::probe::{ProbeKind, ProbeSpec};
use metaguard_lab::topology::addr;
use metaguard_lab::{Lab, Workload};
use metaguard_sys::bpf::{self as sys, Attachment, Hook, MapContents, PinDir};

use crate::bpf::{apply, denied, docker_dir, http, policy, policy_file, BpfFs};
use crate::daemon::Daemon;
use crate::enforce::{arrived, expect_reached};
use crate::ensure;
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "bpf_lifecycle::unpinned_link_is_restored_by_the_daemon_within_a_second",
        true,
        unpinned_link_is_restored_by_the_daemon_within_a_second,
    ),
    (
        "bpf_lifecycle::detached_link_is_restored_by_the_daemon_within_a_second",
        true,
        detached_link_is_restored_by_the_daemon_within_a_second,
    ),
    (
        "bpf_lifecycle::upgrade_swaps_programs_in_existing_links_without_a_window",
        true,
        upgrade_swaps_programs_in_existing_links_without_a_window,
    ),
    (
        "bpf_lifecycle::pinned_maps_of_another_shape_are_refused_naming_the_map_and_the_fix",
        true,
        pinned_maps_of_another_shape_are_refused_naming_the_map_and_the_fix,
    ),
];

/// guard.bpf.c built as build.rs builds it, with one more `-D` (e.g.
/// `MG_MAX_LEVELS=16`): what another metaguard version would have loaded.
fn variant(lab: &Lab, define: &str) -> Result<Vec<u8>, Failed> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../metaguard-sys/bpf/guard.bpf.c");
    let obj = lab
        .work_dir()
        .join(format!("guard-{}.o", define.replace('=', "-")));
    let out = Command::new("clang")
        .args(["-O2", "-g", "-Wall", "-target", "bpf"])
        .arg(format!(
            "-I/usr/include/{}-linux-gnu",
            std::env::consts::ARCH
        ))
        .arg(format!("-D{define}"))
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .output()
        .map_err(|e| format!("clang: {e}"))?;
    ensure!(
        out.status.success(),
        "clang -D{define}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(std::fs::read(&obj).map_err(|e| format!("{}: {e}", obj.display()))?)
}

/// What `policy(lab, "")` asks of the layer, written by hand so that
/// another object can install it: IMDS denied below `docker/` (the agent's
/// cgroup allowed first), programs on `docker/`.
fn layer(lab: &Lab) -> Result<(MapContents, Vec<Attachment>), Failed> {
    let cg = lab.cgroup2();
    let id = |rel: &str| cg.id(rel).map_err(|e| format!("{rel}: {e}"));
    let docker = id(&(lab.cgroup_root() + "/docker"))?;
    let agent = id(&lab.cgroup_of(Workload::Agent))?;
    let mut contents = MapContents::default();
    contents.ep4.insert(addr::IMDS_V4.octets(), sys::CLASS_IMDS);
    contents.policy.insert(agent, (0, 0));
    contents.policy.insert(docker, (1, sys::CLASS_IMDS));
    let attachments = Hook::ALL
        .into_iter()
        .map(|hook| Attachment {
            cgroup_dir: docker_dir(lab),
            cgroup_id: docker,
            hook,
        })
        .collect();
    Ok((contents, attachments))
}

/// A `ConnectWatch` probe to the echo port on the IMDS address for `ms`.
fn watch(lab: &Lab, ms: u64) -> ProbeSpec {
    ProbeSpec {
        id: lab.probe_id("watch"),
        kind: ProbeKind::ConnectWatch {
            host: "169.254.169.254".into(),
            port: addr::ECHO_TCP_PORT,
            max_ms: ms,
        },
        timeout_ms: ms + 5000,
    }
}

/// (attempts, denied, connected, other) from a `ConnectWatch` body.
fn counts(body: Option<&str>) -> Result<[u64; 4], Failed> {
    let v: serde_json::Value =
        serde_json::from_str(body.unwrap_or("")).map_err(|e| format!("watch body: {e}"))?;
    let n = |k: &str| {
        v[k].as_u64()
            .ok_or_else(|| format!("watch body lacks {k}: {v}"))
    };
    Ok([n("attempts")?, n("denied")?, n("connected")?, n("other")?])
}

/// A pinned link and the program it runs.
#[derive(Debug, PartialEq, Eq)]
struct Running {
    name: String,
    link: u32,
    prog: u32,
    tag: [u8; 8],
}

/// Every pinned link, with its program.
fn programs(pins: &PinDir) -> Result<Vec<Running>, Failed> {
    let mut out = Vec::new();
    for l in pins.links().map_err(|e| e.to_string())? {
        let p = sys::program_info(l.info.prog_id).map_err(|e| e.to_string())?;
        out.push(Running {
            name: l.name(),
            link: l.info.link_id,
            prog: p.id,
            tag: p.tag,
        });
    }
    Ok(out)
}

fn upgrade_swaps_programs_in_existing_links_without_a_window() -> Result<(), Failed> {
    let lab = lab()?;
    let fs = BpfFs::mount(&lab)?;
    let w = Workload::BridgeC1;
    // Proof: without protection the watch connects, and the server logs it.
    let spec = watch(&lab, 100);
    let r = lab.probe(w, &spec)?;
    let [_, _, connected, _] = counts(r.body.as_deref())?;
    ensure!(
        connected > 0 && arrived(&lab, &spec),
        "unprotected watch did not connect: {r:?}"
    );

    // An older metaguard's programs (other instructions), attached and
    // pinned with the production maps' names and shapes.
    let old = variant(&lab, "MG_MAX_LEVELS=16")?;
    let pins = PinDir::new(fs.pin_dir());
    let (contents, attachments) = layer(&lab)?;
    let o = pins
        .apply(&old, &contents, &attachments)
        .map_err(|e| e.to_string())?;
    ensure!(o.attached.len() == 5, "old object: {o:?}");
    let before = programs(&pins)?;
    denied(&lab, w, &http(&lab, "169.254.169.254"))?;
    let path = policy_file(&lab)?;
    let out = lab.metaguard(&["verify", "--config", &path])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.code() == Some(1) && stdout.contains("runs another program"),
        "verify with the old programs: {stdout}"
    );

    // The production apply while a watch hammers the endpoint from c1.
    let spec = watch(&lab, 2500);
    let (watched, applied) = std::thread::scope(|s| {
        let t = s.spawn(|| lab.probe(w, &spec));
        // The watch runs before the apply starts and after it ends.
        std::thread::sleep(Duration::from_millis(500));
        let applied = apply(&lab, &policy(&lab, ""));
        (t.join(), applied)
    });
    let applied = applied?;
    let r = watched.map_err(|_| "the watch thread panicked")??;
    let [attempts, refused, connected, other] = counts(r.body.as_deref())?;
    eprintln!("watch during the upgrade: {attempts} connect attempts, {refused} refused");
    ensure!(
        attempts > 100 && refused == attempts && connected == 0 && other == 0,
        "a gap during the swap: {r:?}"
    );
    ensure!(!arrived(&lab, &spec), "the echo server logged the watch");
    ensure!(
        applied.contains("attached 0, kept 0, updated 5, detached 0"),
        "apply: {applied}"
    );

    // Same links, new programs.
    let after = programs(&pins)?;
    ensure!(after.len() == 5, "links after the upgrade: {after:?}");
    for (b, a) in before.iter().zip(&after) {
        ensure!(
            b.name == a.name && b.link == a.link && b.prog != a.prog && b.tag != a.tag,
            "not swapped in place: {b:?} → {a:?}"
        );
    }
    for hook in Hook::ALL {
        let ids = sys::attached_programs(&docker_dir(&lab), hook).map_err(|e| e.to_string())?;
        ensure!(ids.len() == 1, "{} after the upgrade: {ids:?}", hook.name());
    }
    denied(&lab, w, &http(&lab, "169.254.169.254"))?;
    let out = lab.metaguard(&["verify", "--config", &path])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "verify after the upgrade: {stdout}");
    // Applying again keeps them: the programs are current.
    let again = apply(&lab, &policy(&lab, ""))?;
    ensure!(again.contains("kept 5, updated 0"), "re-apply: {again}");
    let out = lab.metaguard(&["remove"])?;
    ensure!(out.status.success(), "remove: {out:?}");
    Ok(())
}

fn pinned_maps_of_another_shape_are_refused_naming_the_map_and_the_fix() -> Result<(), Failed> {
    let lab = lab()?;
    let fs = BpfFs::mount(&lab)?;
    let w = Workload::BridgeC1;
    expect_reached(&lab, w, &http(&lab, "169.254.169.254"))?;
    // Another version's layer, whose policy map holds 1024 entries.
    let other = variant(&lab, "MG_POLICY_ENTRIES=1024")?;
    let pins = PinDir::new(fs.pin_dir());
    let (contents, attachments) = layer(&lab)?;
    pins.apply(&other, &contents, &attachments)
        .map_err(|e| e.to_string())?;
    let before = programs(&pins)?;

    let path = policy_file(&lab)?;
    let out = lab.metaguard(&["apply", "--config", &path])?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "apply: {stderr}");
    ensure!(
        stderr.contains("mg_policy")
            && stderr.contains("1024 entries")
            && stderr.contains("4096 entries")
            && stderr.contains("run `metaguard remove`, then `metaguard apply`")
            && stdout.contains("bpf layer: unavailable"),
        "apply did not name the map and the fix:\n{stderr}\n{stdout}"
    );
    // Nothing was changed: the other version's programs still refuse.
    ensure!(
        programs(&pins)? == before,
        "the links changed after a refused apply"
    );
    denied(&lab, w, &http(&lab, "169.254.169.254"))?;
    let out = lab.metaguard(&["verify", "--config", &path])?;
    let verified = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.code() == Some(1) && verified.contains("mg_policy"),
        "verify: {verified}"
    );

    // The fix it names works.
    let out = lab.metaguard(&["remove"])?;
    ensure!(out.status.success(), "remove: {out:?}");
    let applied = apply(&lab, &policy(&lab, ""))?;
    ensure!(
        applied.contains("bpf layer: active") && applied.contains("attached 5"),
        "apply after remove: {applied}"
    );
    denied(&lab, w, &http(&lab, "169.254.169.254"))?;
    let out = lab.metaguard(&["remove"])?;
    ensure!(out.status.success(), "remove: {out:?}");
    Ok(())
}

fn unpinned_link_is_restored_by_the_daemon_within_a_second() -> Result<(), Failed> {
    daemon_restores("bpf-link-unpinned", |pin| {
        std::fs::remove_file(pin).map_err(|e| format!("rm {}: {e}", pin.display()).into())
    })
}

fn detached_link_is_restored_by_the_daemon_within_a_second() -> Result<(), Failed> {
    daemon_restores("bpf-link-detached", |pin| {
        sys::detach_pinned_link(pin).map_err(|e| e.to_string().into())
    })
}

/// Runs the daemon with the BPF layer, disturbs c1's `connect4` link with
/// `disturb` (given its pin), and checks that within a second the pin holds
/// a new, live link — one program per hook, the probe refused again, the
/// heal logged and counted with `cause`.
fn daemon_restores(
    cause: &str,
    disturb: impl Fn(&Path) -> Result<(), Failed>,
) -> Result<(), Failed> {
    let lab = lab()?;
    let fs = BpfFs::mount(&lab)?;
    let w = Workload::BridgeC1;
    let probe = || http(&lab, "169.254.169.254");
    // Proof: the probe reaches without protection.
    expect_reached(&lab, w, &probe())?;
    let d = Daemon::start(&lab, &policy_file(&lab)?, &[])?;
    denied(&lab, w, &probe())?;
    let docker = docker_dir(&lab);
    let docker_id = lab
        .cgroup2()
        .id(&(lab.cgroup_root() + "/docker"))
        .map_err(|e| e.to_string())?;
    let name = format!("link-{docker_id}-connect4");
    let pins = PinDir::new(fs.pin_dir());
    let link = |pins: &PinDir| -> Result<Option<sys::PinnedLink>, Failed> {
        Ok(pins
            .links()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|l| l.name() == name))
    };
    let before = link(&pins)?.ok_or("no connect4 link pinned")?;
    ensure!(before.is_live(), "connect4 link not live: {before:?}");

    // What the daemon spends while nothing happens (its periodic check).
    let idle = Duration::from_secs(3);
    let pid = d.pid() as u32;
    let cpu0 = metaguard_lab::loadgen::cpu_ns(pid).ok_or("no schedstat")?;
    std::thread::sleep(idle);
    let cpu = metaguard_lab::loadgen::cpu_ns(pid).ok_or("no schedstat")? - cpu0;
    let share = cpu as f64 / idle.as_nanos() as f64;
    eprintln!(
        "daemon CPU while idle with the BPF layer active: {:.2} ms in {idle:?} ({:.3}% of a CPU)",
        cpu as f64 / 1e6,
        share * 100.0
    );
    ensure!(
        share < 0.01,
        "the idle daemon used {:.2}% of a CPU",
        share * 100.0
    );

    let start = Instant::now();
    disturb(&before.pin).map_err(|e| {
        format!(
            "disturbing {}: {e:?}; pins now: {:?}; daemon log:\n{}",
            before.pin.display(),
            pins.links()
                .map(|l| l.iter().map(|l| l.name()).collect::<Vec<_>>()),
            d.log_text()
        )
    })?;
    let healed = loop {
        if let Some(l) = link(&pins)? {
            if l.is_live() && l.info.link_id != before.info.link_id {
                break start.elapsed();
            }
        }
        ensure!(
            start.elapsed() < Duration::from_secs(1),
            "{name} not restored within 1 s; daemon log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    eprintln!("{cause}: link restored {healed:?} after the disturbance");
    d.wait_log(&format!("\"cause\":\"{cause}\""), Duration::from_secs(1))?;
    let log = d.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("\"healed\"") && l.contains("\"layer\":\"bpf\"") && l.contains(&name))
        .ok_or_else(|| format!("no healed line naming {name}:\n{log}"))?;
    eprintln!("{line}");
    for hook in Hook::ALL {
        let ids = sys::attached_programs(&docker, hook).map_err(|e| e.to_string())?;
        ensure!(ids.len() == 1, "{} after the heal: {ids:?}", hook.name());
    }
    denied(&lab, w, &probe())?;
    let mut spec = lab.http_get("http://127.0.0.1:9469/metrics");
    spec.timeout_ms = 1000;
    let body = lab
        .probe(Workload::HostOther, &spec)?
        .body
        .unwrap_or_default();
    ensure!(
        body.contains(&format!("metaguard_heals_total{{cause=\"{cause}\"}} 1")),
        "metrics:\n{body}"
    );
    drop(d);
    let out = lab.metaguard(&["remove"])?;
    ensure!(out.status.success(), "remove: {out:?}");
    Ok(())
}
