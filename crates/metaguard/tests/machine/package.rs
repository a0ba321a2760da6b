//! The package's life: `dpkg -i` of a newer build while containers keep
//! probing a denied endpoint (the postinst restarts the daemon; the rules
//! and BPF programs are replaced in place — no window), then
//! `dpkg --purge`, which must leave no metaguard object in the kernel (nft
//! tables, addresses on lo, the sysctl, BPF pins and links) and no file.

use std::time::Duration;

use libtest_mimic::Failed;
use metaguard_lab::standin::api::TaskSpec;

use crate::ensure;
use crate::lifecycle::with_loops;
use crate::support::{
    bpf_config, deb, expect_imds_untouched, expect_none_passed, host_tables, install,
    installed_with, main_pid, HOSTNET_SLICE,
};

pub const TESTS: &[(&str, crate::TestFn)] = &[(
    "package::upgrade_leaves_no_window_and_purge_leaves_nothing",
    upgrade_leaves_no_window_and_purge_leaves_nothing,
)];

const INSTANCE_ID: &str = "http://169.254.169.254/latest/meta-data/instance-id";

fn upgrade_leaves_no_window_and_purge_leaves_nothing() -> Result<(), Failed> {
    // Everything metaguard can put into the kernel: tables in the host and
    // in task namespaces, the proxy's policy routing and its sysctl, the
    // BPF layer's links and pins.
    let mut host = installed_with(|h| {
        Ok(Some(bpf_config(h)?.replacen(
            "task_metadata = \"allow\"",
            "task_metadata = \"proxy\"",
            1,
        )))
    })?;
    let bridge = host.run_task(&TaskSpec::single("web", "bridge"))?;
    let awsvpc = host.run_task(&TaskSpec::single("api", "awsvpc"))?;
    let hostnet = host.run_task(&TaskSpec::single("batch", "host").in_slice(HOSTNET_SLICE))?;
    let newer = deb("0.1.0-2")?;
    let before = main_pid(&host)?;
    let seen = with_loops(&host, &[&bridge, &awsvpc, &hostnet], INSTANCE_ID, || {
        std::thread::sleep(Duration::from_millis(300));
        install(&host, &newer)?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    })?;
    expect_none_passed(
        &[&bridge, &awsvpc, &hostnet],
        &seen,
        10,
        "during the upgrade",
    )?;
    expect_imds_untouched(&host)?;
    let lab = host.lab()?;
    let m = host.machine()?;
    let status = m.exec_ok(&["dpkg-query", "-W", "-f", "${Version}", "metaguard"])?;
    ensure!(status == "0.1.0-2", "installed: {status}");
    let after = main_pid(&host)?;
    ensure!(
        before != after && m.unit_state("metaguard.service")? == "active",
        "the upgrade did not restart the daemon ({before} → {after})"
    );
    let verify = m.exec(&["metaguard", "verify"])?;
    ensure!(
        verify.status.success(),
        "verify after the upgrade: {}",
        String::from_utf8_lossy(&verify.stdout)
    );

    let rules = m.exec_ok(&["ip", "-4", "rule", "show"])?;
    ensure!(
        rules.contains("lookup 19783"),
        "no policy rule before the purge: {rules}"
    );

    // Purge.
    let cgroups = format!("/sys/fs/cgroup/{}", host.cgroup_root());
    let programs_before = m.exec_ok(&["bpftool", "cgroup", "tree", &cgroups])?;
    ensure!(
        programs_before.contains("mg_connect4"),
        "no BPF program before the purge:\n{programs_before}"
    );
    m.exec_ok(&["dpkg", "--purge", "metaguard"])?;
    let programs = m.exec_ok(&["bpftool", "cgroup", "tree", &cgroups])?;
    ensure!(!programs.contains("mg_"), "BPF programs left:\n{programs}");
    ensure!(!m.path("/sys/fs/bpf/metaguard").exists(), "pins left");
    let tables = host_tables(&host)?;
    ensure!(!tables.contains("metaguard"), "host tables left: {tables}");
    for t in [&bridge, &awsvpc] {
        if t.info.network_mode == "awsvpc" {
            let inside = lab.run_in_named(&t.first().netns, "nft", &["list", "tables"])?;
            ensure!(!inside.contains("metaguard"), "task table left: {inside}");
        }
    }
    for family in ["-4", "-6"] {
        let rules = m.exec_ok(&["ip", family, "rule", "show"])?;
        ensure!(!rules.contains("19783"), "policy rules left: {rules}");
        let routes = m.exec_ok(&["ip", family, "route", "show", "table", "all"])?;
        ensure!(!routes.contains("table 19783"), "routes left: {routes}");
    }
    let lo = m.exec_ok(&["ip", "-br", "addr", "show", "dev", "lo"])?;
    ensure!(
        !lo.contains("169.254.170") && !lo.contains("fd00:ec2::23"),
        "addresses left on lo: {lo}"
    );
    let fwmark = m.exec_ok(&["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"])?;
    ensure!(fwmark.trim() == "0", "tcp_fwmark_accept left at {fwmark}");
    let listed = m.exec(&["dpkg", "-L", "metaguard"])?;
    ensure!(
        !listed.status.success(),
        "dpkg still lists metaguard's files"
    );
    for path in [
        "/usr/bin/metaguard",
        "/etc/metaguard",
        "/run/metaguard",
        "/var/log/metaguard",
        "/lib/systemd/system/metaguard.service",
        "/lib/systemd/system/docker.service.d/metaguard.conf",
        "/etc/systemd/system/multi-user.target.wants/metaguard.service",
        "/etc/systemd/system/docker.service.d",
    ] {
        ensure!(!m.path(path).exists(), "{path} left after the purge");
    }
    // Docker runs on, and its containers are no longer guarded.
    ensure!(
        m.unit_state("docker.service")? == "active",
        "docker stopped"
    );
    let r = host.probe(bridge.first(), &lab.http_get(INSTANCE_ID))?;
    ensure!(r.ok(), "after the purge: {r:?}");
    Ok(())
}
