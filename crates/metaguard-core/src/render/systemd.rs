//! `metaguard.service`, and the drop-in that holds Docker, containerd and
//! the ECS agent back until it is ready.
//!
//! The unit runs `metaguard daemon`, which applies the rules before Docker
//! and the ECS agent start (F5) and then keeps them true. `Type=notify`
//! is the readiness signal: READY=1 after the first apply. The drop-in
//! orders the container units after it and runs `metaguard gate` first,
//! which fails while metaguard is enabled but its daemon is not ready — so
//! a metaguard that cannot start keeps containers from starting
//! (fail-closed) without tying their lifetime to its own (a `Requires=`
//! would stop Docker whenever metaguard stops or restarts).
//!
//! The sandbox is the tightest that runs every feature — the default
//! config, the proxy, the BPF layer — measured under a real systemd by the
//! machine tests, and each setting that is looser than the strictest
//! choice says why. The capability set is measured too: the deploy tests
//! run `apply` with exactly this bounding set and with each capability
//! removed.

use super::{Kind, Options, Stamp};

/// The capabilities the daemon needs: nft, conntrack, rtnetlink (links,
/// the proxy's policy routing), sock_diag and the proxy's transparent
/// listeners (`IP_TRANSPARENT`) → `CAP_NET_ADMIN`; entering task network
/// namespaces (setns), the private mount namespace that gives `nft` the
/// cgroup2 hierarchy on hybrid hosts, and `bpf()` for the cgroup programs
/// → `CAP_SYS_ADMIN`. No port below 1024 is bound (the proxy's listeners
/// are on `[proxy] imds_port`), so not `CAP_NET_BIND_SERVICE`.
pub const CAPABILITIES: [&str; 2] = ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"];

/// The units the drop-in goes into: whatever starts containers.
pub const GATED_UNITS: [&str; 3] = ["docker.service", "containerd.service", "ecs.service"];

/// The drop-in's file name in each `<unit>.d/` directory.
pub const DROPIN_NAME: &str = "metaguard.conf";

pub(super) fn render(stamp: &Stamp, opts: &Options) -> String {
    let bin = &opts.binary;
    let cfg = &opts.config_path;
    let caps = CAPABILITIES.join(" ");
    let gated = GATED_UNITS.join(" ");
    format!(
        "\
# metaguard.service — keeps containers away from the instance metadata service.
{stamp}#
# Applies the rules before the network is configured and before Docker,
# containerd and the ECS agent start (failure mode F5); Type=notify: READY=1
# once the rules are in the kernel. The drop-ins {dropin} of
# {gated} order those after this unit and run `metaguard gate`
# first: while this unit is enabled but its daemon is not ready, they do not
# start (fail-closed).
# `systemctl reload metaguard` checks {cfg}, then has the daemon
# apply it and waits for the outcome; a bad config is refused and the rules
# in force stay. Stopping, restarting or a crash leaves the rules in the
# kernel (fail-closed); `metaguard remove` deletes them.

[Unit]
Description=metaguard: keep containers away from the instance metadata service
Documentation=man:metaguard(8) man:metaguard-daemon(8)
# A firewall: loaded before the network is configured (systemd.special(7),
# network-pre.target), needs only the root file system.
DefaultDependencies=no
Wants=network-pre.target
After=local-fs.target
Before=network-pre.target {gated} shutdown.target
Conflicts=shutdown.target

[Service]
Type=notify
NotifyAccess=main
# Refuses a config this unit cannot run (with its file, line and what to
# change: e.g. an audit_log where the sandbox below cannot write) before
# anything in the kernel changes.
ExecStartPre={bin} daemon --check --config {cfg}
ExecStart={bin} daemon --config {cfg}
# Checks the config, sends SIGHUP to the daemon and waits for its answer
# (no /bin/kill: minimal hosts have no procps).
ExecReload={bin} reload --config {cfg}
Restart=always
RestartSec=1s
# A config error (exit 2) is not cured by restarting.
RestartPreventExitStatus=2
TimeoutStartSec=60s

# Sandbox: the tightest that runs the default config, the proxy and the BPF
# layer (measured under systemd by the machine tests).
CapabilityBoundingSet={caps}
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
# Its state: the namespaces it wrote tables into, the policy routing it
# added for its proxy, its daemon record (for `metaguard gate` and
# `metaguard reload`).
RuntimeDirectory=metaguard
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
# Where [proxy] audit_log may point (e.g. /var/log/metaguard/audit.log).
LogsDirectory=metaguard
LogsDirectoryMode=0750
# Observe mode's records (/var/lib/metaguard/observe, docs/observe.md):
# they outlive restarts and reboots.
StateDirectory=metaguard
StateDirectoryMode=0700
# Instead of ProtectKernelTunables=yes, which would also make the BPF
# layer's pin directory read-only whatever ReadWritePaths= says (systemd
# 252): the same paths read-only, except the pins and the one sysctl the
# proxy sets (net.ipv4.tcp_fwmark_accept: a connection carries its SYN's
# mark, the caller's identity).
ReadOnlyPaths=/proc/sys /sys -/proc/sysrq-trigger -/proc/latency_stats -/proc/acpi -/proc/timer_stats -/proc/fs -/proc/irq
ReadWritePaths=-/sys/fs/bpf -/proc/sys/net/ipv4/tcp_fwmark_accept
PrivateTmp=yes
PrivateMounts=yes
PrivateDevices=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=net mnt
RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6
# No IPAddressDeny=: the proxy accepts containers' connections from any
# address (bridge subnets, ENIs, the host's own) and connects to IMDS and
# the agent; who reaches it is decided by metaguard's own rules and by the
# caller's identity. /metrics and /healthz listen on loopback only.
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
# bpf() is in @privileged, far wider than the BPF layer needs; @mount for
# nft's private mount namespace on hybrid cgroup hosts. Nothing it runs
# sets priorities or resource limits (@resources).
SystemCallFilter=@system-service @mount bpf
SystemCallFilter=~@resources
SystemCallErrorNumber=EPERM
UMask=0077

[Install]
WantedBy=multi-user.target {gated}
",
        stamp = stamp.lines("# ", Kind::Systemd),
        dropin = DROPIN_NAME,
    )
}

/// The drop-in for each of [`GATED_UNITS`].
pub(super) fn render_dropin(stamp: &Stamp, opts: &Options) -> String {
    let bin = &opts.binary;
    let gated = GATED_UNITS.join(", ");
    format!(
        "\
# {DROPIN_NAME} — a drop-in for {gated}.
{stamp}#
# Starts the unit after metaguard.service and only when metaguard's daemon
# is ready — or when metaguard.service is not enabled at all: `metaguard
# gate` fails (exit 1, with the reason in `systemctl status`) while it is
# enabled but not running, so no container starts unguarded (F5). While
# metaguard.service is starting or restarting (its 1 s after a crash), the
# gate waits up to 30 s for the daemon instead.
# It does not tie the unit to metaguard's lifetime: stopping or restarting
# metaguard leaves the unit running, and the rules stay in the kernel.
# To start the unit without metaguard on one host, mask this file:
#   ln -s /dev/null /etc/systemd/system/docker.service.d/{DROPIN_NAME}

[Unit]
After=metaguard.service

[Service]
ExecStartPre={bin} gate
",
        stamp = stamp.lines("# ", Kind::SystemdDropin),
    )
}
