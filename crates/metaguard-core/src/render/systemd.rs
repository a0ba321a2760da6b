//! `metaguard.service`: runs `metaguard daemon`, which applies the rules
//! before Docker and the ECS agent start (F5) and then keeps them true.
//!
//! `Type=notify` is the readiness signal: the daemon sends READY=1 after
//! its first apply, so units ordered after it (docker, ecs) start only once
//! the ruleset is in the kernel. Reload is SIGHUP (a bad config is refused,
//! the rules in force stay).
//!
//! The sandbox keeps what the daemon needs and nothing else. The capability
//! set is measured, not guessed: the deploy tests run `apply` in the lab
//! with exactly this bounding set and with each capability removed. The
//! daemon adds only a loopback listener for metrics (AF_INET/AF_INET6,
//! IPAddressAllow=localhost) and inotify.

use super::{Kind, Options, Stamp};

/// The capabilities `metaguard apply` needs (measured; see the module
/// docs): nft and conntrack netlink → `CAP_NET_ADMIN`; entering task
/// network namespaces (setns) and the private mount namespace that gives
/// `nft` the cgroup2 hierarchy on hybrid hosts → `CAP_SYS_ADMIN`.
pub const CAPABILITIES: [&str; 2] = ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"];

pub fn render(stamp: &Stamp, opts: &Options) -> String {
    let bin = &opts.binary;
    let cfg = &opts.config_path;
    let caps = CAPABILITIES.join(" ");
    format!(
        "\
# metaguard.service — keeps containers away from the instance metadata service.
{stamp}#
# Applies the rules before Docker and the ECS agent start (failure mode F5)
# and keeps them true: Type=notify, READY=1 after the first apply, so units
# ordered after this one wait until the ruleset is in the kernel.
# `systemctl reload metaguard` re-reads {cfg} (SIGHUP).
# The ruleset stays in the kernel when this unit stops or crashes
# (fail-closed); `metaguard remove` deletes it.

[Unit]
Description=metaguard: keep containers away from the instance metadata service
Documentation=man:metaguard(8) man:metaguard-apply(8)
# A firewall: loaded before the network is configured (systemd.special(7),
# network-pre.target), needs only the root file system.
DefaultDependencies=no
Wants=network-pre.target
After=local-fs.target
Before=network-pre.target docker.service containerd.service ecs.service shutdown.target
Conflicts=shutdown.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={bin} daemon --config {cfg}
ExecReload=/bin/kill -HUP $MAINPID
Restart=always
RestartSec=1s
TimeoutStartSec=60s

# Sandbox. Needs: netlink (nft, conntrack), the Docker API socket (task
# namespaces), setns into task namespaces, a private mount namespace for
# nft on hybrid cgroup hosts, its state in /run/metaguard, and a loopback
# listener for /metrics and /healthz (127.0.0.1:9469).
CapabilityBoundingSet={caps}
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
RuntimeDirectory=metaguard
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
# The BPF layer pins its programs and maps here (ProtectKernelTunables=
# makes the rest of /sys read-only); the leading - lets hosts without
# bpffs start, with the nft layer alone.
ReadWritePaths=-/sys/fs/bpf
PrivateTmp=yes
PrivateMounts=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=net mnt
RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6
IPAddressDeny=any
IPAddressAllow=localhost
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service @mount
SystemCallErrorNumber=EPERM
UMask=0077

[Install]
WantedBy=multi-user.target docker.service ecs.service
",
        stamp = stamp.lines("# ", Kind::Systemd),
    )
}
