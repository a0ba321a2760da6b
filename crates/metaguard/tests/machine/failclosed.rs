//! Fail closed at boot: when metaguard cannot start — a broken config, no
//! nft, a config the unit's sandbox cannot run — Docker, containerd and the
//! ECS agent do not start either (the drop-in's `metaguard gate`), both
//! units' status says why, and nothing in the kernel changed.

use libtest_mimic::Failed;
use metaguard_lab::machine::Host;

use crate::ensure;
use crate::support::{booted, deb, host_tables, install, DEB_VERSION};

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (
        "failclosed::a_broken_config_keeps_docker_from_starting",
        a_broken_config_keeps_docker_from_starting,
    ),
    (
        "failclosed::without_nft_docker_does_not_start",
        without_nft_docker_does_not_start,
    ),
    (
        "failclosed::an_audit_log_the_sandbox_cannot_write_is_refused_at_exec_start_pre",
        an_audit_log_the_sandbox_cannot_write_is_refused_at_exec_start_pre,
    ),
];

/// Installs, enables, lets `prepare` break something, reboots; then
/// checks that metaguard failed, that Docker and the agent did not run,
/// that the statuses say why (`why` in metaguard's), and that the kernel
/// holds no metaguard table. Returns metaguard's status text.
fn boot_broken(
    prepare: impl FnOnce(&Host) -> Result<(), Failed>,
    why: &[&str],
) -> Result<String, Failed> {
    let mut host = booted()?;
    install(&host, &deb(DEB_VERSION)?)?;
    host.machine()?
        .exec_ok(&["systemctl", "enable", "metaguard.service"])?;
    prepare(&host)?;
    host.reboot()?;
    let m = host.machine()?;
    ensure!(
        m.unit_state("metaguard.service")? != "active",
        "metaguard started"
    );
    for unit in ["docker.service", "ecs.service"] {
        let state = m.unit_state(unit)?;
        ensure!(
            state != "active",
            "{unit} is {state}:\n{}",
            m.journal_text(unit)
        );
    }
    let status = |unit: &str| -> Result<String, Failed> {
        let out = m.systemctl(&["status", "--lines=30", unit])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // Docker keeps retrying (Restart=always): each try is a new invocation,
    // whose status may not show the last one's lines yet; its journal does.
    let docker = m.journal_text("docker.service");
    ensure!(
        docker.contains("held back (fail-closed)")
            && docker.contains("Control process exited, code=exited, status=1/FAILURE"),
        "docker's journal does not say why:\n{docker}"
    );
    let mg = format!(
        "{}\n{}",
        status("metaguard.service")?,
        m.journal_text("metaguard.service")
    );
    for w in why {
        ensure!(mg.contains(w), "metaguard's status lacks {w:?}:\n{mg}");
    }
    let tables = host_tables(&host)?;
    ensure!(
        !tables.contains("metaguard"),
        "the kernel changed: {tables}"
    );
    // A client of the socket-activated Docker API cannot start it either.
    let docker_api = host.docker()?.inspect("nothing");
    ensure!(docker_api.is_err(), "the Docker API answered");
    ensure!(
        host.machine()?.unit_state("docker.service")? != "active",
        "a client started docker"
    );
    Ok(mg)
}

fn a_broken_config_keeps_docker_from_starting() -> Result<(), Failed> {
    boot_broken(
        |h| {
            h.disk().write(
                "/etc/metaguard/metaguard.toml",
                "[[workload]]\nname = \"bridge-containers\"\nbridges = [\"docker0\"]\nimds = \"block\"\n",
                0o644,
            )?;
            Ok(())
        },
        &[
            "/etc/metaguard/metaguard.toml:4:8: imds: unknown action \"block\"",
            "help: use one of",
        ],
    )
    .map(drop)
}

fn without_nft_docker_does_not_start() -> Result<(), Failed> {
    boot_broken(
        |h| {
            let nft = h.disk().path("/usr/sbin/nft");
            std::fs::rename(&nft, nft.with_file_name("nft.moved-away"))?;
            Ok(())
        },
        &[
            "ExecStartPre=/usr/bin/metaguard daemon --check",
            "`nft` is not installed (apt-get install nftables)",
        ],
    )
    .map(drop)
}

fn an_audit_log_the_sandbox_cannot_write_is_refused_at_exec_start_pre() -> Result<(), Failed> {
    let status = boot_broken(
        |h| {
            h.disk().write(
                "/etc/metaguard/metaguard.toml",
                "[proxy]\naudit_log = \"/etc/metaguard/audit.log\"\n\n[[workload]]\nname = \"bridge-containers\"\nbridges = [\"docker0\"]\nimds = \"proxy\"\n",
                0o644,
            )?;
            Ok(())
        },
        &[
            "ExecStartPre=/usr/bin/metaguard daemon --check",
            "/etc/metaguard/metaguard.toml:2:13: proxy.audit_log: cannot open /etc/metaguard/audit.log",
            "Read-only file system",
            "/var/log/metaguard/",
        ],
    )?;
    ensure!(
        !status.contains("Main PID"),
        "the daemon itself ran:\n{status}"
    );
    Ok(())
}
