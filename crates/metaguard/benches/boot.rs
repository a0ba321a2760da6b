//! Boot timings of the package as users install it: the `.deb` (release
//! build) installed and enabled in the machine lab (a Debian rootfs booted
//! by systemd-nspawn with systemd as PID 1, stand-in Docker and ECS agent),
//! then booted 10 times, each boot with a fresh kernel state (a new lab
//! host namespace: no rules survive a reboot). Measured per boot:
//!
//! * `systemctl start` → READY: the journal's "Starting metaguard.service"
//!   to "Started metaguard.service" (READY=1 after the first apply);
//! * `systemctl start` → first rule: to the first `add table inet
//!   metaguard` that an `nft monitor` running *outside* the machine, in its
//!   network namespace, sees;
//! * boot → guarded: from the start of systemd-nspawn (the machine's
//!   power-on) to that first rule;
//! * READY → Docker starting: the ordering gap the unit enforces.
//!
//! All on CLOCK_MONOTONIC (the journal's __MONOTONIC_TIMESTAMP and the
//! observer's clock are the same kernel's).
//!
//! Run: cargo build --release -p metaguard-lab --bin mglab-standin &&
//!      sudo cargo bench -p metaguard --bench boot
//! (the rootfs comes from scripts/init-rootfs, which ./scripts/test runs).
//! `cargo test --all-targets` runs it as a smoke test: one boot, nothing
//! written.

mod common;

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use metaguard_lab::machine::{first_at, Host, HostOptions};
use metaguard_lab::topology::Role;

/// Boots measured by `cargo bench`; one under `cargo test`.
const BOOTS: usize = 10;

fn monotonic_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000
}

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metaguard"))
}

fn package() -> Result<PathBuf, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = exe()
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or("no target dir")?;
    let profile = exe()
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "release".into());
    let out = target.join("init-lab/debs/bench");
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new("bash")
        .arg(repo.join("scripts/package"))
        .args([
            "--profile",
            if profile == "debug" { "dev" } else { "release" },
        ])
        .args(["--no-build", "--output"])
        .arg(&out)
        .status()
        .map_err(|e| format!("scripts/package: {e}"))?;
    if !status.success() {
        return Err(format!("scripts/package: {status}"));
    }
    std::fs::read_dir(&out)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| "no .deb".into())
}

/// An `nft monitor` in the lab's host namespace: the monotonic time of its
/// first line about metaguard's table.
struct Observer {
    child: std::process::Child,
    first: Arc<Mutex<Option<u64>>>,
}

fn observe(lab: &metaguard_lab::Lab) -> Result<Observer, metaguard_lab::LabError> {
    let mut cmd = Command::new("nft");
    cmd.arg("monitor")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    lab.netns(Role::Host).command(&mut cmd)?;
    let mut child = cmd
        .spawn()
        .map_err(|source| metaguard_lab::LabError::Spawn {
            command: "nft monitor".into(),
            source,
        })?;
    let first = Arc::new(Mutex::new(None));
    let out = child.stdout.take();
    let seen = first.clone();
    std::thread::spawn(move || {
        let Some(out) = out else { return };
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("table inet metaguard") {
                let mut f = seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if f.is_none() {
                    *f = Some(monotonic_us());
                }
            }
        }
    });
    // nft monitor subscribes before its first read: give it that moment.
    std::thread::sleep(std::time::Duration::from_millis(50));
    Ok(Observer { child, first })
}

struct Boot {
    start_to_ready: f64,
    start_to_rule: f64,
    boot_to_guarded: f64,
    ready_to_docker: f64,
}

fn one_boot(host: &mut Host) -> Result<Boot, String> {
    let (observer, powered_on) = host
        .boot_with(|lab| Ok((observe(lab)?, monotonic_us())))
        .map_err(|e| e.to_string())?;
    let m = host.machine().map_err(|e| e.to_string())?;
    let journal = m.journal(None).map_err(|e| e.to_string())?;
    let mut observer = observer;
    let rule = *observer
        .first
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let _ = observer.child.kill();
    let _ = observer.child.wait();
    let starting = first_at(
        &journal,
        "metaguard.service",
        "Starting metaguard.service",
        0,
    )
    .ok_or("no 'Starting metaguard.service' in the journal")?;
    let ready = first_at(
        &journal,
        "metaguard.service",
        "Started metaguard.service",
        0,
    )
    .ok_or_else(|| {
        format!(
            "metaguard did not start:\n{}",
            m.journal_text("metaguard.service")
        )
    })?;
    let docker = first_at(&journal, "docker.service", "Starting docker.service", 0)
        .ok_or("no 'Starting docker.service'")?;
    let rule = rule.ok_or("the observer saw no metaguard table")?;
    host.shutdown().map_err(|e| e.to_string())?;
    let ms = |a: u64, b: u64| (b as f64 - a as f64) / 1000.0;
    Ok(Boot {
        start_to_ready: ms(starting, ready),
        start_to_rule: ms(starting, rule),
        boot_to_guarded: ms(powered_on, rule),
        ready_to_docker: ms(ready, docker),
    })
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if let Err(e) = run(full) {
        eprintln!("boot bench: {e}");
        std::process::exit(1);
    }
}

fn run(full: bool) -> Result<(), String> {
    if !metaguard_sys::process::is_root() {
        println!("boot bench skipped: needs root (sudo cargo bench -p metaguard --bench boot)");
        return Ok(());
    }
    let _ = ctrlc::set_handler(|| {
        metaguard_lab::registry::teardown_live();
        std::process::exit(130);
    });
    let deb = package()?;
    let mut host = Host::new(HostOptions::beside(&exe())).map_err(|e| e.to_string())?;
    host.boot().map_err(|e| e.to_string())?;
    let name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::copy(&deb, host.disk().path(&format!("/root/{name}"))).map_err(|e| e.to_string())?;
    let m = host.machine().map_err(|e| e.to_string())?;
    m.exec_ok(&["dpkg", "-i", &format!("/root/{name}")])
        .map_err(|e| e.to_string())?;
    m.exec_ok(&["systemctl", "enable", "metaguard.service"])
        .map_err(|e| e.to_string())?;
    host.shutdown().map_err(|e| e.to_string())?;
    let mut boots = Vec::new();
    for i in 0..if full { BOOTS } else { 1 } {
        let b = one_boot(&mut host)?;
        eprintln!(
            "boot {}: start→READY {:.1} ms, start→first rule {:.1} ms, boot→guarded {:.0} ms, READY→docker {:.1} ms",
            i + 1,
            b.start_to_ready,
            b.start_to_rule,
            b.boot_to_guarded,
            b.ready_to_docker
        );
        boots.push(b);
    }
    let row = |what: &str, f: &dyn Fn(&Boot) -> f64| {
        let s = common::stats(boots.iter().map(f).collect());
        format!("| {what} | {:.1} | {:.1} | {:.1} |", s.min, s.median, s.max)
    };
    let body = format!(
        "## Boot under systemd — `cargo build --release -p metaguard-lab --bin mglab-standin && sudo cargo bench -p metaguard --bench boot`

The release `.deb` installed with `dpkg -i` and enabled in the machine lab
(Debian bookworm rootfs, systemd 252 as PID 1 under systemd-nspawn, stand-in
`docker.socket`/`docker.service` and `ecs.service`), the built-in default
config, {BOOTS} boots, each with a fresh network namespace (nothing survives
a reboot). Journal timestamps and an `nft monitor` outside the machine, all
CLOCK_MONOTONIC. Machine: {}.

| ms | min | p50 | max |
|---|---|---|---|
{}
{}
{}
{}

`start` is systemd's \"Starting metaguard.service\" (before `ExecStartPre=metaguard daemon --check`,
which reads the config and plans); READY is \"Started\" (READY=1 after the
first apply); the first rule is the first `add table inet metaguard` the outside observer sees;
boot is the start of systemd-nspawn. Docker is ordered after READY (the drop-in's `metaguard gate`
then passes).",
        common::machine(),
        row("`systemctl start` → READY", &|b| b.start_to_ready),
        row("`systemctl start` → first rule in the kernel", &|b| b.start_to_rule),
        row("boot (nspawn start) → guarded (first rule)", &|b| b.boot_to_guarded),
        row("READY → Docker starting", &|b| b.ready_to_docker),
    );
    println!("{body}");
    if !full {
        return Ok(());
    }
    common::write_section("boot", &body)
}
