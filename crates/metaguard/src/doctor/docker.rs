//! The Docker side of the snapshot (`docker.json` `containers` and
//! `daemon`): the running containers from the Docker API, and the daemon's
//! own firewall settings and proxy environment. Read-only.
//!
//! A snapshot keeps no secret: of a container's or dockerd's environment
//! only the names, and the values of proxy settings with any
//! `user:password@` removed (`metaguard_core::doctor::env::snapshot_env`).

use std::collections::BTreeMap;
use std::path::Path;

use metaguard_core::doctor::env::{is_proxy_var, redact, snapshot_env};
use serde_json::{json, Value};

/// Docker's daemon configuration file.
const DAEMON_JSON: &str = "/etc/docker/daemon.json";

/// The running containers, in snapshot form; empty when there is no
/// Docker API at `socket` or it does not answer (said on stderr).
pub fn containers(socket: &Path) -> Vec<Value> {
    let facts = match crate::discovery::docker::containers(socket, Path::new("/proc")) {
        Ok(Some(f)) => f,
        Ok(None) => return Vec::new(),
        Err(e) => {
            eprintln!("metaguard doctor: containers not listed ({e:#}); F12, F13 and the containers' proxy settings are not judged");
            return Vec::new();
        }
    };
    let pause_ns: Vec<&str> = facts
        .iter()
        .filter(|c| c.is_ecs_pause())
        .filter_map(|c| c.netns.as_deref())
        .collect();
    facts
        .iter()
        .map(|c| {
            let mode = if c.host_network {
                "host"
            } else if c.is_ecs_pause() || c.netns.as_deref().is_some_and(|n| pause_ns.contains(&n))
            {
                "awsvpc"
            } else {
                "bridge"
            };
            json!({
                "name": c.name,
                "network_mode": mode,
                "labels": c.labels,
                "cgroup": c.cgroup,
                "netns": c.netns,
                "env": snapshot_env(c.env.iter().map(String::as_str)),
            })
        })
        .collect()
}

/// The first process named `dockerd`.
fn dockerd_pid() -> Option<u32> {
    let rd = std::fs::read_dir("/proc").ok()?;
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "dockerd")
        })
}

/// Proxy settings of an environment given as `KEY=VALUE` items (redacted).
fn proxy_env<'a>(vars: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, String> {
    vars.into_iter()
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| is_proxy_var(k))
        .map(|(k, v)| (k.to_string(), redact(v)))
        .collect()
}

/// The daemon's firewall settings and proxy environment.
pub fn daemon() -> Value {
    let pid = dockerd_pid();
    let cfg: Option<Value> = std::fs::read_to_string(DAEMON_JSON)
        .ok()
        .and_then(|t| match serde_json::from_str(&t) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("metaguard doctor: {DAEMON_JSON} is not JSON ({e}); its firewall settings are not judged");
                None
            }
        });
    let get = |k: &str| cfg.as_ref().and_then(|c| c.get(k)).cloned();
    let (env, source) = match pid.and_then(|p| {
        std::fs::read(format!("/proc/{p}/environ"))
            .ok()
            .map(|b| (p, b))
    }) {
        Some((p, bytes)) => {
            let text = String::from_utf8_lossy(&bytes);
            (
                proxy_env(text.split('\0')),
                Some(format!("/proc/{p}/environ")),
            )
        }
        None => match unit_environment() {
            Some(vars) => (
                proxy_env(vars.iter().map(String::as_str)),
                Some("systemctl show docker.service -p Environment".to_string()),
            ),
            None => (BTreeMap::new(), None),
        },
    };
    json!({
        "running": pid.is_some(),
        "iptables": get("iptables"),
        "ip6tables": get("ip6tables"),
        "bridge": get("bridge"),
        "env": env,
        "env_source": source,
    })
}

/// `Environment=` of docker.service (systemd hosts where dockerd is not
/// running or its environment cannot be read).
fn unit_environment() -> Option<Vec<String>> {
    if !Path::new("/run/systemd/system").is_dir() {
        return None;
    }
    let cmd = metaguard_sys::tool::command(
        "systemctl",
        &["show", "-p", "Environment", "--value", "docker.service"],
    )
    .ok()?;
    let out = metaguard_sys::tool::run(cmd, None, None).ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        out.stdout
            .split_whitespace()
            .map(|s| s.trim_matches('"').to_string())
            .collect(),
    )
}
