//! The BPF layer under the shipped unit: `bpf()` allowed by its syscall
//! filter, its pins under /sys/fs/bpf writable in its sandbox, `verify`
//! reporting the layer active, and a link that someone unpins or detaches
//! with bpftool restored by the daemon within a second.

use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use metaguard_lab::machine::Host;
use metaguard_lab::probe::Outcome;
use metaguard_lab::standin::api::TaskSpec;

use crate::ensure;
use crate::support::{bpf_config, installed_with, HOSTNET_SLICE};

pub const TESTS: &[(&str, crate::TestFn)] = &[(
    "bpf::the_layer_runs_under_the_unit_and_a_detached_or_unpinned_link_is_back_within_a_second",
    the_layer_runs_under_the_unit_and_a_detached_or_unpinned_link_is_back_within_a_second,
)];

const PINS: &str = "/sys/fs/bpf/metaguard";

/// `bpftool -j link show pinned PIN` inside the machine: the link's
/// cgroup id (0: detached), or `None` when nothing is pinned there.
fn pinned_cgroup(host: &Host, pin: &str) -> Result<Option<u64>, Failed> {
    let out = host
        .machine()?
        .exec(&["bpftool", "-j", "link", "show", "pinned", pin])?;
    if !out.status.success() {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(Some(v["cgroup_id"].as_u64().unwrap_or(0)))
}

/// Waits until `pin` holds a link attached to a cgroup; how long it took.
fn wait_attached(host: &Host, pin: &str, within: Duration) -> Result<Duration, Failed> {
    let start = Instant::now();
    loop {
        if pinned_cgroup(host, pin)?.is_some_and(|c| c != 0) {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < within,
            "{pin} not back within {within:?}:\n{}",
            host.machine()?.journal_text("metaguard.service")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn the_layer_runs_under_the_unit_and_a_detached_or_unpinned_link_is_back_within_a_second(
) -> Result<(), Failed> {
    let mut host = installed_with(|h| bpf_config(h).map(Some))?;
    let m = host.machine()?;
    let verify = m.exec(&["metaguard", "verify"])?;
    let text = String::from_utf8_lossy(&verify.stdout).into_owned();
    ensure!(
        verify.status.success() && text.contains(&format!("ok     bpf {PINS}")),
        "verify: {}\n{text}{}",
        verify.status,
        String::from_utf8_lossy(&verify.stderr)
    );
    let task = host.run_task(&TaskSpec::single("batch", "host").in_slice(HOSTNET_SLICE))?;
    let imds = "http://169.254.169.254/latest/meta-data/instance-id";
    let denied = |host: &Host| -> Result<(), Failed> {
        let spec = host.lab()?.http_get(imds);
        let r = host.probe(task.first(), &spec)?;
        // EPERM at connect(): the BPF program, before any packet (the nft
        // rules alone would answer with a reset, "refused").
        ensure!(
            r.outcome == Outcome::Denied,
            "not refused by the BPF layer: {r:?}"
        );
        Ok(())
    };
    denied(&host)?;
    let links = host.machine()?.path(PINS);
    let pin = std::fs::read_dir(&links)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("link-") && n.ends_with("-connect4"))
        .map(|n| format!("{PINS}/{n}"))
        .ok_or("no connect4 link pinned")?;
    // Unpinned (the program detaches with its last reference).
    let m = host.machine()?;
    m.exec_ok(&["rm", &pin])?;
    let unpinned = wait_attached(&host, &pin, Duration::from_secs(1))?;
    denied(&host)?;
    // Detached: the pin stays, the link no longer runs.
    m.exec_ok(&["bpftool", "link", "detach", "pinned", &pin])?;
    let detached = wait_attached(&host, &pin, Duration::from_secs(1))?;
    denied(&host)?;
    eprintln!(
        "measured under systemd: unpinned link back in {:.0} ms, detached link back in {:.0} ms",
        unpinned.as_secs_f64() * 1000.0,
        detached.as_secs_f64() * 1000.0
    );
    let journal = m.journal_text("metaguard.service");
    for cause in ["bpf-link-unpinned", "bpf-link-detached"] {
        ensure!(
            journal.contains(cause),
            "no heal with cause {cause}:\n{journal}"
        );
    }
    // The control: without metaguard the same probe reaches IMDS.
    m.exec_ok(&["systemctl", "stop", "metaguard.service"])?;
    m.exec_ok(&["metaguard", "remove"])?;
    let r = host.probe(task.first(), &host.lab()?.http_get(imds))?;
    ensure!(r.ok(), "without metaguard: {r:?}");
    Ok(())
}
