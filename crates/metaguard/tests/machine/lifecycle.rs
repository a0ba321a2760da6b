//! The unit's life under systemd: restart, kill -9, stop and reload, with
//! containers running throughout, each probing a denied endpoint in a
//! bounded loop that must never get through; and Docker started (or
//! restarted) after metaguard, whose new tasks must be guarded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use metaguard_lab::machine::{Host, RunningTask};
use metaguard_lab::probe::Outcome;
use metaguard_lab::standin::api::TaskSpec;

use crate::ensure;
use crate::proxy::PROXY_CONFIG;
use crate::support::{
    booted, deb, expect_active, expect_imds_untouched, expect_none_passed, host_tables, http,
    imdsv2_instance_id, install, installed, main_pid, probe_loop, why_reached, Looped, DEB_VERSION,
};

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (
        "lifecycle::restart_kill_and_stop_leave_no_window_and_the_rules_stay",
        restart_kill_and_stop_leave_no_window_and_the_rules_stay,
    ),
    (
        "lifecycle::reload_changes_the_proxy_and_no_denied_request_passes",
        reload_changes_the_proxy_and_no_denied_request_passes,
    ),
    (
        "lifecycle::docker_started_or_restarted_after_metaguard_is_followed",
        docker_started_or_restarted_after_metaguard_is_followed,
    ),
];

const INSTANCE_ID: &str = "http://169.254.169.254/latest/meta-data/instance-id";
const SENSITIVE: &str = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";

/// Runs `during` while a bounded probe loop asks `url` from the first
/// container of each task; returns what each loop saw.
pub fn with_loops(
    host: &Host,
    tasks: &[&RunningTask],
    url: &str,
    during: impl FnOnce() -> Result<(), Failed>,
) -> Result<Vec<Looped>, Failed> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let loops: Vec<_> = tasks
            .iter()
            .map(|t| {
                let stop = &stop;
                s.spawn(move || {
                    probe_loop(host, t.first(), url, stop, 3000, Duration::from_secs(180))
                })
            })
            .collect();
        let result = during();
        stop.store(true, Ordering::Relaxed);
        let seen: Result<Vec<Looped>, String> = loops
            .into_iter()
            .map(|h| h.join().map_err(|_| "a probe loop panicked".to_string())?)
            .collect();
        result?;
        Ok(seen?)
    })
}

/// Waits until `unit` is in `state`.
fn wait_state(host: &Host, unit: &str, state: &str, within: Duration) -> Result<(), Failed> {
    let m = host.machine()?;
    let deadline = Instant::now() + within;
    loop {
        let now = m.unit_state(unit)?;
        if now == state {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{unit} is {now}, not {state}, after {within:?}:\n{}",
                m.journal_text(unit)
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn restart_kill_and_stop_leave_no_window_and_the_rules_stay() -> Result<(), Failed> {
    let mut host = installed(None)?;
    let bridge = host.run_task(&TaskSpec::single("web", "bridge"))?;
    let awsvpc = host.run_task(&TaskSpec::single("api", "awsvpc"))?;
    let seen = with_loops(&host, &[&bridge, &awsvpc], INSTANCE_ID, || {
        let m = host.machine()?;
        std::thread::sleep(Duration::from_millis(300));
        let first = main_pid(&host)?;
        m.exec_ok(&["systemctl", "restart", "metaguard.service"])?;
        wait_state(
            &host,
            "metaguard.service",
            "active",
            Duration::from_secs(30),
        )?;
        let second = main_pid(&host)?;
        ensure!(first != second, "restart kept pid {first}");
        std::thread::sleep(Duration::from_millis(300));
        // kill -9 of the daemon alone; Restart=always brings it back.
        kill_daemon(m)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while main_pid(&host)? == second || m.unit_state("metaguard.service")? != "active" {
            ensure!(Instant::now() < deadline, "not restarted after kill -9");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        m.exec_ok(&["systemctl", "stop", "metaguard.service"])?;
        wait_state(
            &host,
            "metaguard.service",
            "inactive",
            Duration::from_secs(30),
        )?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    })?;
    expect_none_passed(
        &[&bridge, &awsvpc],
        &seen,
        20,
        "across restart, kill -9 and stop",
    )?;
    expect_imds_untouched(&host)?;
    let lab = host.lab()?;
    // Stopped: the rules are still in the kernel, host and task.
    ensure!(
        host_tables(&host)?.contains("table inet metaguard"),
        "host table gone after stop"
    );
    let task_tables = lab.run_in_named(&awsvpc.first().netns, "nft", &["list", "tables"])?;
    ensure!(
        task_tables.contains("table inet metaguard"),
        "task table gone after stop"
    );
    // The control: without the rules the same probe passes.
    host.machine()?.exec_ok(&["metaguard", "remove"])?;
    let r = host.probe(bridge.first(), &lab.http_get(INSTANCE_ID))?;
    ensure!(r.ok(), "without metaguard's rules: {r:?}");
    Ok(())
}

fn reload(host: &Host, config: &str) -> Result<std::process::Output, Failed> {
    host.disk()
        .write("/etc/metaguard/metaguard.toml", config, 0o644)?;
    Ok(host
        .machine()?
        .systemctl(&["reload", "metaguard.service"])?)
}

fn listening(host: &Host) -> Result<String, Failed> {
    Ok(host.machine()?.exec_ok(&["ss", "-Htln"])?)
}

fn reload_changes_the_proxy_and_no_denied_request_passes() -> Result<(), Failed> {
    let mut host = installed(None)?;
    let bridge = host.run_task(&TaskSpec::single("web", "bridge"))?;
    let awsvpc = host.run_task(&TaskSpec::single("api", "awsvpc"))?;
    let seen = with_loops(&host, &[&bridge, &awsvpc], SENSITIVE, || {
        std::thread::sleep(Duration::from_millis(300));
        // deny → proxy: listeners bound (the IMDS proxy's on the IMDS
        // address, the relay's on the task-metadata one, never port 80),
        // IMDSv2 through them, audit log.
        let out = reload(&host, PROXY_CONFIG)?;
        ensure!(out.status.success(), "reload to proxy: {out:?}");
        let ss = listening(&host)?;
        ensure!(
            ss.contains("169.254.169.254:9470") && ss.contains("169.254.170.2:9470"),
            "{ss}"
        );
        for t in [&bridge, &awsvpc] {
            let r = imdsv2_instance_id(&host, t.first())?;
            ensure!(
                r.ok(),
                "{}: IMDSv2 after the reload: {r:?}",
                t.info.network_mode
            );
        }
        ensure!(
            host.disk()
                .read("/var/log/metaguard/audit.log")?
                .contains("/latest/api/token"),
            "no audit line"
        );
        std::thread::sleep(Duration::from_millis(300));
        // [proxy] keys: another port, another audit log, a tight bucket.
        let changed = PROXY_CONFIG.replace(
            "audit.log\"",
            "audit2.log\"\nimds_port = 9471\nrate = 1\nburst = 2",
        );
        let out = reload(&host, &changed)?;
        ensure!(out.status.success(), "reload of [proxy] keys: {out:?}");
        let ss = listening(&host)?;
        ensure!(
            ss.contains("169.254.169.254:9471")
                && ss.contains("169.254.170.2:9471")
                && !ss.contains(":9470 "),
            "{ss}"
        );
        let mut statuses = Vec::new();
        for _ in 0..4 {
            let spec = http(&host, "GET", INSTANCE_ID, &[])?;
            statuses.push(host.probe(bridge.first(), &spec)?.status);
        }
        ensure!(
            statuses.contains(&Some(429)),
            "rate 1 / burst 2 throttled nothing: {statuses:?}"
        );
        let audit2 = host.disk().read("/var/log/metaguard/audit2.log")?;
        ensure!(
            audit2.contains("instance-id"),
            "nothing in the new audit log: {audit2}"
        );
        // A bad config is refused, with its line; the proxy stays.
        let out = reload(
            &host,
            &changed.replace("imds          = \"proxy\"", "imds          = \"block\""),
        )?;
        ensure!(!out.status.success(), "a bad config was reloaded");
        let status = String::from_utf8_lossy(
            &host
                .machine()?
                .systemctl(&["status", "metaguard.service"])?
                .stdout,
        )
        .into_owned();
        ensure!(
            status.contains("metaguard.toml:") && status.contains("unknown action"),
            "{status}"
        );
        ensure!(
            listening(&host)?.contains("169.254.170.2:9471"),
            "the proxy went with the bad config"
        );
        std::thread::sleep(Duration::from_millis(300));
        // proxy → deny: the listeners go, the rules reject.
        let out = reload(&host, metaguard_core::config::BUILTIN_DEFAULT_TOML)?;
        ensure!(out.status.success(), "reload back to the default: {out:?}");
        let ss = listening(&host)?;
        ensure!(
            !ss.contains("169.254.170.2:") && !ss.contains("169.254.169.254:"),
            "listeners left: {ss}"
        );
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    })?;
    expect_none_passed(&[&bridge, &awsvpc], &seen, 20, "across reloads")?;
    let lab = host.lab()?;
    let leaked: Vec<_> = lab
        .imds()
        .log()
        .entries()
        .into_iter()
        .filter(|e| e.target.contains("security-credentials"))
        .collect();
    ensure!(leaked.is_empty(), "IMDS saw {leaked:?}");
    // The control: without metaguard the path is served.
    let m = host.machine()?;
    m.exec_ok(&["systemctl", "stop", "metaguard.service"])?;
    m.exec_ok(&["metaguard", "remove"])?;
    let r = host.probe(bridge.first(), &lab.http_get(SENSITIVE))?;
    ensure!(r.ok(), "without metaguard: {r:?}");
    Ok(())
}

fn docker_started_or_restarted_after_metaguard_is_followed() -> Result<(), Failed> {
    let mut host = booted()?;
    install(&host, &deb(DEB_VERSION)?)?;
    let m = host.machine()?;
    m.exec_ok(&["systemctl", "enable", "metaguard.service"])?;
    m.exec_ok(&[
        "systemctl",
        "disable",
        "docker.socket",
        "docker.service",
        "ecs.service",
    ])?;
    host.reboot()?;
    expect_active(&host, "metaguard.service")?;
    let m = host.machine()?;
    ensure!(
        m.unit_state("docker.service")? != "active",
        "docker started at boot"
    );
    ensure!(
        !m.path("/run/docker.sock").exists(),
        "a Docker socket at boot"
    );
    let mut after = 0;
    for round in ["started", "restarted"] {
        let m = host.machine()?;
        if round == "started" {
            m.exec_ok(&[
                "systemctl",
                "start",
                "docker.socket",
                "docker.service",
                "ecs.service",
            ])?;
        } else {
            m.exec_ok(&["systemctl", "restart", "docker.service"])?;
            m.exec_ok(&["systemctl", "restart", "ecs.service"])?;
        }
        let socket = if round == "started" {
            m.journal_at("docker.socket", "Listening on", after)?
        } else {
            m.journal_at("docker.service", "Started", after)?
        }
        .ok_or("no journal line for the socket / docker start")?;
        let task = host.run_task(&TaskSpec::single(&format!("late-{round}"), "awsvpc"))?;
        let lab = host.lab()?;
        let spec = lab.http_get(INSTANCE_ID);
        let r = host.probe(task.first(), &spec)?;
        ensure!(
            !r.ok(),
            "{round}: a task of the new Docker reached IMDS: {r:?}\n{}",
            why_reached(&host, task.first())
        );
        // EPERM at connect(): the BPF programs on the machine's
        // system.slice refuse a namespace before the daemon has classified
        // it, so this does not depend on how fast the daemon follows.
        ensure!(
            r.outcome == Outcome::Denied,
            "{round}: not refused by the BPF layer: {r:?}\n{}",
            why_reached(&host, task.first())
        );
        ensure!(
            lab.imds().log().is_empty(),
            "{round}: IMDS saw {:?}",
            lab.imds().log().entries()
        );
        let followed = host
            .machine()?
            .journal_at(
                "metaguard.service",
                "the Docker API answers",
                socket.saturating_sub(1),
            )?
            .ok_or_else(|| {
                format!(
                    "{round}: metaguard never followed Docker:\n{}",
                    host.machine()
                        .map(|m| m.journal_text("metaguard.service"))
                        .unwrap_or_default()
                )
            })?;
        let ms = followed.saturating_sub(socket) as f64 / 1000.0;
        eprintln!(
            "docker {round}: metaguard followed it {ms:.1} ms after {}",
            if round == "started" {
                "its socket appeared"
            } else {
                "it started"
            }
        );
        ensure!(ms <= 1000.0, "{round}: followed after {ms} ms");
        let r = host.probe(task.first(), &lab.http_get(&task.info.credentials_url()))?;
        ensure!(r.ok(), "{round}: task credentials: {r:?}");
        after = followed;
    }
    // The gate while metaguard.service waits to be restarted after a
    // crash (RestartSec an hour here, 1 s as shipped): it waits for the
    // daemon rather than fail — up to --wait, then it fails saying so.
    let dropin = host
        .disk()
        .path("/etc/systemd/system/metaguard.service.d/restart-later.conf");
    if let Some(dir) = dropin.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&dropin, "[Service]\nRestartSec=1h\n")?;
    let m = host.machine()?;
    m.exec_ok(&["systemctl", "daemon-reload"])?;
    kill_daemon(m)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while m
        .exec_ok(&[
            "systemctl",
            "show",
            "-p",
            "SubState",
            "--value",
            "metaguard.service",
        ])?
        .trim()
        != "auto-restart"
    {
        ensure!(
            Instant::now() < deadline,
            "metaguard not waiting to restart"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = m.exec(&["/usr/bin/metaguard", "gate", "--wait", "1"])?;
    let text = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && text.contains(" s of waiting"),
        "gate while restarting, --wait 1: {:?} {text}",
        out.status
    );
    // Started while the gate waits: the gate lets the unit go.
    let out = m.exec(&[
        "sh",
        "-c",
        "(sleep 1; systemctl restart --no-block metaguard.service) & exec /usr/bin/metaguard gate --wait 30",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("after waiting"),
        "gate while metaguard restarts: {:?} {text} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("gate during metaguard's restart: {}", text.trim());
    Ok(())
}

/// kill -9 of metaguard's daemon alone (`Restart=always` brings it back).
fn kill_daemon(m: &metaguard_lab::machine::Machine) -> Result<(), Failed> {
    m.exec_ok(&[
        "systemctl",
        "kill",
        "--kill-who=main",
        "--signal=KILL",
        "metaguard.service",
    ])?;
    Ok(())
}
