//! The rules of one workload — its `imds` and `task_metadata` decisions —
//! as written into the host table's workload chain or a task's table.

use std::fmt::Write as _;

use super::family;
use super::proxy::{listener, probe_rule, task_path, Service, HOST_MARK_TAG, SYN};
use crate::config::{Action, Config};

/// Where a workload's chain runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hook {
    /// Host prerouting, traffic entering from a bridge.
    Bridge,
    /// Host output, processes selected by cgroup (workload index).
    HostOutput(usize),
    /// Output inside a task namespace.
    Task,
}

/// The rules of one workload.
pub(super) fn write_decisions(
    out: &mut String,
    indent: &str,
    config: &Config,
    i: usize,
    hook: Hook,
) {
    let w = &config.workloads[i];
    let (imds, tmd) = (w.imds, w.task_metadata);
    let bridge = hook == Hook::Bridge;
    let imds_port = config.proxy.imds_port;
    let (imds_proxied, tmd_proxied) = config.proxies();
    for (set, action) in [("imds", imds), ("tmd", tmd)] {
        let service = if set == "imds" {
            Service::Imds
        } else {
            Service::Relay
        };
        if action.via_proxy() {
            // Only HTTP on port 80 goes on (to the proxy); any other port
            // or protocol is refused as with deny. The task-metadata
            // addresses also carry the IMDS proxy's port. Observe: port
            // 80 goes to the proxy (which forwards everything and records
            // it), everything else is untouched.
            let observe = action == Action::Observe;
            let ports = if set == "tmd" && imds_proxied {
                format!("{{ 80, {imds_port} }}")
            } else {
                "80".to_string()
            };
            for v6 in [false, true] {
                let (fam, sfx) = family(v6);
                let to = match (set, hook) {
                    // A task's table DNATs to the task-metadata address,
                    // the host on to the IMDS proxy.
                    ("imds", Hook::Task) => task_path(config, v6),
                    _ => listener(config, service, v6),
                };
                let Some(to) = to else {
                    if observe {
                        continue; // untouched, as with allow
                    }
                    // No proxy listener in this family: fail closed.
                    let _ = writeln!(
                        out,
                        "{indent}{fam} daddr @{set}{sfx} meta l4proto tcp reject with tcp reset"
                    );
                    let _ = writeln!(
                        out,
                        "{indent}{fam} daddr @{set}{sfx} reject with icmpx admin-prohibited"
                    );
                    continue;
                };
                if !observe {
                    let _ = writeln!(
                        out,
                        "{indent}{fam} daddr @{set}{sfx} tcp dport != {ports} reject with tcp reset"
                    );
                    let _ = writeln!(
                        out,
                        "{indent}{fam} daddr @{set}{sfx} meta l4proto != tcp reject with icmpx admin-prohibited"
                    );
                }
                match hook {
                    // Observe: to the proxy if it listens, straight on
                    // (as with allow) if not.
                    Hook::Bridge if observe => {
                        out.push_str(&probe_rule(indent, "", set, v6, "80", to));
                    }
                    // To the proxy if it listens; refused at once if not.
                    Hook::Bridge => {
                        out.push_str(&probe_rule(indent, "", set, v6, "80", to));
                        let _ = writeln!(
                            out,
                            "{indent}{fam} daddr @{set}{sfx} tcp dport 80 {SYN} reject with tcp reset"
                        );
                    }
                    Hook::HostOutput(idx) => {
                        let _ = writeln!(
                            out,
                            "{indent}{fam} daddr @{set}{sfx} tcp dport 80 meta mark set 0x{:08x}",
                            HOST_MARK_TAG | (idx as u32 & 0xffff)
                        );
                    }
                    Hook::Task => {}
                }
            }
            continue;
        }
        if action == Action::Allow && set == "tmd" && tmd_proxied && bridge {
            // Relayed while the relay listens, so that no id a proxied
            // workload owns is handed to it (F13); straight on to the
            // agent as without metaguard when it does not.
            for v6 in [false, true] {
                if let Some(to) = listener(config, Service::Relay, v6) {
                    out.push_str(&probe_rule(indent, "", set, v6, "80", to));
                }
            }
            continue;
        }
        if action != Action::Deny {
            continue;
        }
        for (fam, suffix) in [("ip", "4"), ("ip6", "6")] {
            let _ = writeln!(
                out,
                "{indent}{fam} daddr @{set}{suffix} meta l4proto tcp reject with tcp reset"
            );
            let _ = writeln!(
                out,
                "{indent}{fam} daddr @{set}{suffix} reject with icmpx admin-prohibited"
            );
        }
    }
    let guards = |a: Action| matches!(a, Action::Deny | Action::Proxy);
    if bridge && (guards(imds) || guards(tmd)) {
        // F17: nothing entering from a container bridge is addressed to the
        // host's loopback legitimately (DNATed credentials traffic still
        // carries 169.254.170.2 here, before NAT). With route_localnet=1 it
        // would otherwise reach the agent's port and local services directly.
        let _ = writeln!(
            out,
            "{indent}ip daddr 127.0.0.0/8 reject with icmpx admin-prohibited"
        );
        let _ = writeln!(
            out,
            "{indent}ip6 daddr ::1 reject with icmpx admin-prohibited"
        );
    }
}
