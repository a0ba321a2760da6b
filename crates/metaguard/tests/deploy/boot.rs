//! F5 in the lab: the boothook, run in the lab's host namespace twice (as
//! cloud-init runs it on two boots), loads the same ruleset as
//! `metaguard apply`, and bridge containers are blocked from their first
//! packet. Also: the unit's capability bounding set is exactly what the
//! daemon needs — measured by starting it under `setpriv` with that set
//! and with each capability taken away.

use std::path::{Path, PathBuf};

use libtest_mimic::Failed;
use metaguard_lab::matrix::{Matrix, Target, Verdict};
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, LabOptions, Workload};

use crate::ensure;
use crate::support::{as_cloud_init_runs_it, exe, render, Scratch};
use crate::Needs;

pub const TESTS: &[(&str, Needs, crate::TestFn)] = &[
    (
        "boot::f5_boothook_twice_matches_apply_and_blocks_containers_from_the_first_packet",
        Needs::Root,
        f5_boothook_twice_matches_apply_and_blocks_containers_from_the_first_packet,
    ),
    (
        "boot::f5_boothook_without_the_binary_loads_the_same_ruleset",
        Needs::Root,
        f5_boothook_without_the_binary_loads_the_same_ruleset,
    ),
    (
        "boot::unit_capability_set_is_what_the_daemon_needs",
        Needs::Root,
        unit_capability_set_is_what_the_daemon_needs,
    ),
];

fn lab() -> Result<Lab, Failed> {
    Lab::start(LabOptions::new(exe())).map_err(|e| format!("lab: {e}").into())
}

/// A stand-in for the installed binary: the binary under test with its own
/// state directory, so parallel labs do not share /run/metaguard.
fn wrapper(dir: &Scratch) -> Result<PathBuf, Failed> {
    let state = dir.join("state");
    let p = dir.join("metaguard");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\nexec {} --state-dir {} \"$@\"\n",
            exe().display(),
            state.display()
        ),
    )?;
    set_mode(&p, 0o755)?;
    Ok(p)
}

fn set_mode(p: &Path, mode: u32) -> Result<(), Failed> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Writes the boothook as cloud-init's handler does (mode 0700, without
/// its first line) and returns its path.
fn boothook(dir: &Scratch, binary: &Path, installed: &Path) -> Result<PathBuf, Failed> {
    let text = render(&[
        "boothook",
        "--binary",
        &binary.display().to_string(),
        "--installed-config",
        &installed.display().to_string(),
    ])?;
    let p = dir.join("part-001");
    std::fs::write(&p, as_cloud_init_runs_it(&text)?)?;
    set_mode(&p, 0o700)?;
    Ok(p)
}

/// Runs the boothook in the lab's host namespace. It runs in a private
/// mount namespace where /run/systemd is hidden, so its last resort
/// (masking docker) can never reach the machine running the tests.
fn run_boothook(lab: &Lab, hook: &Path) -> Result<String, Failed> {
    let hook = hook.display().to_string();
    lab.run_in(
        Role::Host,
        "unshare",
        &[
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "if [ -d /run/systemd ]; then mount -t tmpfs none /run/systemd; fi; exec \"$0\"",
            &hook,
        ],
    )
    .map_err(|e| format!("boothook: {e}").into())
}

fn ruleset(lab: &Lab) -> Result<String, Failed> {
    lab.run_in(Role::Host, "nft", &["list", "table", "inet", "metaguard"])
        .map_err(|e| format!("nft list: {e}").into())
}

fn f5_boothook_twice_matches_apply_and_blocks_containers_from_the_first_packet(
) -> Result<(), Failed> {
    let dir = Scratch::new("boot")?;
    let lab = lab()?;
    let binary = wrapper(&dir)?;
    let installed = dir.join("etc/metaguard/metaguard.toml");
    let hook = boothook(&dir, &binary, &installed)?;
    ensure!(
        lab.imds().log().is_empty(),
        "containers reached IMDS before the first boot"
    );

    // Boot 1 and boot 2.
    let first_out = run_boothook(&lab, &hook)?;
    let first = ruleset(&lab)?;
    let config_1 = std::fs::read(&installed)?;
    let second_out = run_boothook(&lab, &hook)?;
    let second = ruleset(&lab)?;
    ensure!(
        first == second,
        "second boot changed the ruleset:\n{first}\n---\n{second}"
    );
    ensure!(
        std::fs::read(&installed)? == config_1,
        "second boot changed the config"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("etc/metaguard"))?
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "metaguard.toml")
        .collect();
    ensure!(
        leftovers.is_empty(),
        "boothook left files behind: {leftovers:?}"
    );
    ensure!(
        config_1 == metaguard_core::config::BUILTIN_DEFAULT_TOML.as_bytes(),
        "installed config is not the rendered one"
    );
    for out in [&first_out, &second_out] {
        ensure!(out.contains("applied"), "boothook did not run apply: {out}");
    }

    // The same as `metaguard apply` with the installed config.
    let installed_s = installed.display().to_string();
    let binary_s = binary.display().to_string();
    lab.run_in(Role::Host, &binary_s, &["apply", "--config", &installed_s])?;
    let applied = ruleset(&lab)?;
    ensure!(
        applied == first,
        "boothook and apply differ:\n{first}\n--- apply:\n{applied}"
    );

    // The containers' first packets to IMDS are refused; task credentials
    // still work (the agent emulator answers).
    let m = Matrix::measure(&lab, &[Workload::BridgeC1, Workload::BridgeC2])?;
    for w in [Workload::BridgeC1, Workload::BridgeC2] {
        for (t, want) in [
            (Target::ImdsV4, Verdict::Blocked),
            (Target::ImdsV6, Verdict::Blocked),
            (Target::TaskCredentials, Verdict::Reached),
        ] {
            let cell = m.cell(w, t).ok_or("missing cell")?;
            ensure!(
                cell.verdict == want,
                "{} → {}: {:?}, want {want:?} ({:?})",
                w.label(),
                t.label(),
                cell.verdict,
                cell.result
            );
        }
    }
    ensure!(
        lab.imds().log().is_empty(),
        "a container reached IMDS: {:?}",
        lab.imds().log().entries()
    );
    Ok(())
}

fn f5_boothook_without_the_binary_loads_the_same_ruleset() -> Result<(), Failed> {
    let dir = Scratch::new("boot-fallback")?;
    let lab = lab()?;
    let installed = dir.join("etc/metaguard/metaguard.toml");
    let hook = boothook(&dir, &dir.join("not-installed/metaguard"), &installed)?;
    let out = run_boothook(&lab, &hook)?;
    ensure!(out.is_empty() || !out.contains("applied by /"), "{out}");
    let fallback = ruleset(&lab)?;
    run_boothook(&lab, &hook)?;
    ensure!(
        ruleset(&lab)? == fallback,
        "second boot changed the fallback ruleset"
    );

    let binary = wrapper(&dir)?;
    let installed_s = installed.display().to_string();
    lab.run_in(
        Role::Host,
        &binary.display().to_string(),
        &["apply", "--config", &installed_s],
    )?;
    let applied = ruleset(&lab)?;
    ensure!(
        applied == fallback,
        "embedded ruleset and apply differ:\n{fallback}\n--- apply:\n{applied}"
    );
    let m = Matrix::measure(&lab, &[Workload::BridgeC1])?;
    let cell = m
        .cell(Workload::BridgeC1, Target::ImdsV4)
        .ok_or("missing cell")?;
    ensure!(cell.verdict == Verdict::Blocked, "{:?}", cell.result);
    Ok(())
}

/// The capabilities in the rendered unit's CapabilityBoundingSet=.
fn unit_capabilities() -> Result<Vec<String>, Failed> {
    let unit = render(&["systemd"])?;
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .ok_or("no CapabilityBoundingSet= in the unit")?;
    Ok(line.split_whitespace().map(str::to_string).collect())
}

/// Starts `metaguard daemon` under `setpriv` with only `caps` in the
/// bounding set (and so in the permitted set of the exec'd root process),
/// in the lab's host namespace; Ok once it reports ready (then it is
/// stopped), Err with its output when it exits or stalls first.
fn daemon_with_caps(lab: &Lab, config: &Path, caps: &[String]) -> Result<(), String> {
    use std::io::Read as _;
    let mut set = String::from("-all");
    for c in caps {
        set.push_str(&format!(
            ",+{}",
            c.trim_start_matches("CAP_").to_ascii_lowercase()
        ));
    }
    let mut cmd = std::process::Command::new("setpriv");
    cmd.arg(format!("--bounding-set={set}"))
        .arg(format!("--inh-caps={set}"))
        .arg("--")
        .arg(exe())
        .arg("--state-dir")
        .arg(state_dir(lab))
        .arg("--docker-socket")
        .arg(lab.work_dir().join("no-docker.sock"))
        .arg("--bpf-pin-dir")
        .arg(lab.work_dir().join("bpffs/metaguard"))
        .args(["daemon", "--metrics", "127.0.0.1:0", "--config"])
        .arg(config)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    lab.netns(Role::Host)
        .command(&mut cmd)
        .map_err(|e| e.to_string())?;
    let mut child = cmd.spawn().map_err(|e| format!("setpriv: {e}"))?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let ready = loop {
        if let Ok(Some(_)) = child.try_wait() {
            break false;
        }
        if ready_file(lab).is_some() || std::time::Instant::now() > deadline {
            break ready_file(lab).is_some();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let _ = child.wait();
    let log = rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .unwrap_or_default();
    let _ = std::fs::remove_file(state_dir(lab).join("daemon.json"));
    if ready {
        Ok(())
    } else {
        Err(log)
    }
}

fn state_dir(lab: &Lab) -> PathBuf {
    lab.work_dir().join("caps-state")
}

/// The daemon's record once it reported ready.
fn ready_file(lab: &Lab) -> Option<String> {
    std::fs::read_to_string(state_dir(lab).join("daemon.json"))
        .ok()
        .filter(|t| t.contains("\"ready\": true"))
}

fn unit_capability_set_is_what_the_daemon_needs() -> Result<(), Failed> {
    let dir = Scratch::new("caps")?;
    let lab = lab()?;
    // What the unit must cover: bridges (with the credentials relay: a
    // transparent listener on 169.254.170.2:9470 and the policy routing
    // that leads to it), a task namespace to enter, and host processes by
    // cgroup (on a hybrid host like this one, nft then runs in a private
    // mount namespace with cgroup2 at /sys/fs/cgroup).
    let config = dir.join("caps.toml");
    std::fs::write(
        &config,
        format!(
            "[[workload]]\nname = \"bridges\"\nbridges = [\"docker0\"]\nimds = \"deny\"\ntask_metadata = \"proxy\"\n\n\
             [[workload]]\nname = \"task\"\nnetns = [\"/run/netns/{}\"]\nimds = \"deny\"\n\n\
             [[workload]]\nname = \"hostnet\"\ncgroups = [\"{}\"]\nimds = \"deny\"\n",
            lab.netns_name(Role::Task1),
            lab.cgroup_of(Workload::HostNetwork)
        ),
    )?;
    let caps = unit_capabilities()?;
    daemon_with_caps(&lab, &config, &caps)
        .map_err(|e| format!("the daemon does not start with the unit's set {caps:?}: {e}"))?;
    let task = lab
        .run_in(Role::Task1, "nft", &["list", "table", "inet", "metaguard"])
        .map_err(|e| format!("no table in the task namespace: {e}"))?;
    ensure!(task.contains("reject"), "{task}");
    let mut needed = Vec::new();
    for drop in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != drop).cloned().collect();
        if let Err(e) = daemon_with_caps(&lab, &config, &fewer) {
            needed.push((drop.clone(), e));
        }
    }
    eprintln!(
        "measured: the daemon needs {:?}",
        needed.iter().map(|(c, _)| c).collect::<Vec<_>>()
    );
    ensure!(
        needed.len() == caps.len(),
        "the unit grants more than the daemon needs: it starts without {:?}",
        caps.iter()
            .filter(|c| !needed.iter().any(|(n, _)| n == *c))
            .collect::<Vec<_>>()
    );
    // And nothing at all is not enough (the measurement is real).
    ensure!(
        daemon_with_caps(&lab, &config, &[]).is_err(),
        "the daemon starts without capabilities?"
    );
    Ok(())
}
