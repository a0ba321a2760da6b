//! Collecting the snapshot from the live host (read-only).
//!
//! Every file of `metaguard_core::doctor::snapshot` is produced by the
//! tool the operator would run (`ip -j`, `iptables-*-save`, `nft -j`) or
//! read from /proc and /etc. Tools that are missing leave their file out
//! (the backend is then absent), never fail the collection.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use metaguard_core::config::{NetnsSelector, Selector};
use metaguard_core::Config;
use metaguard_sys::netns::Netns;
use metaguard_sys::tool;

/// Runs `tool args` (inside `ns`), returning stdout when it succeeded.
fn run(ns: Option<&Netns>, tool: &str, args: &[&str]) -> anyhow::Result<Option<String>> {
    let Ok(cmd) = tool::command(tool, args) else {
        return Ok(None);
    };
    let out = tool::run(cmd, ns, None)?;
    Ok(out.status.success().then_some(out.stdout))
}

/// The state of one namespace (`ns` None: this process's).
fn net_state(
    ns: Option<&Netns>,
    prefix: &str,
    files: &mut BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let mut put = |name: &str, text: Option<String>| {
        if let Some(t) = text {
            files.insert(format!("{prefix}{name}"), t);
        }
    };
    put("ip-addr.json", run(ns, "ip", &["-j", "addr", "show"])?);
    put(
        "ip-link.json",
        run(ns, "ip", &["-j", "-d", "link", "show"])?,
    );
    put(
        "ip-route.json",
        run(ns, "ip", &["-j", "-4", "route", "show"])?,
    );
    put(
        "ip6-route.json",
        run(ns, "ip", &["-j", "-6", "route", "show"])?,
    );
    for (file, tool) in [
        ("iptables-legacy-save.txt", "iptables-legacy-save"),
        ("ip6tables-legacy-save.txt", "ip6tables-legacy-save"),
        ("iptables-nft-save.txt", "iptables-nft-save"),
        ("ip6tables-nft-save.txt", "ip6tables-nft-save"),
    ] {
        put(
            file,
            run(ns, tool, &[])?.filter(|t| t.lines().any(|l| l.starts_with('*'))),
        );
    }
    put(
        "nft-ruleset.json",
        run(ns, "nft", &["-j", "list", "ruleset"])?,
    );
    // /proc/sys/net shows the namespace of the reading process: read it
    // with sysctl inside the namespace.
    let mut keys = vec![
        "net.ipv4.ip_forward".to_string(),
        "net.ipv6.conf.all.forwarding".to_string(),
        // br_netfilter (F14: a TCP reset of bridged traffic); absent
        // without the module.
        "net.bridge.bridge-nf-call-iptables".to_string(),
    ];
    if let Some(out) = run(ns, "sysctl", &["-a", "-r", "route_localnet"])? {
        for l in out.lines() {
            if let Some((k, _)) = l.split_once('=') {
                keys.push(k.trim().to_string());
            }
        }
    }
    keys.dedup();
    let args: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut sys = String::new();
    for k in args {
        if let Some(v) = run(ns, "sysctl", &[k])? {
            sys.push_str(&v);
        }
    }
    put("sysctl.txt", Some(sys));
    Ok(())
}

/// Collects the whole snapshot. `config`: the intent (its text is kept as
/// metaguard.toml when it came from a file) and the awsvpc namespaces to
/// look into.
pub fn collect(
    config: &Config,
    config_text: Option<&str>,
    docker_socket: &Path,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    net_state(None, "", &mut files)?;
    if let Ok(t) = std::fs::read_to_string("/etc/ecs/ecs.config") {
        // Registry credentials (ECS_ENGINE_AUTH_DATA) never enter a
        // snapshot, which users attach to bug reports.
        files.insert(
            "ecs.config".into(),
            metaguard_core::doctor::env::snapshot_ecs_config(&t),
        );
    }
    if let Some(t) = config_text {
        files.insert("metaguard.toml".into(), t.to_string());
    }
    let cg = metaguard_sys::cgroup::Cgroup2::discover(Path::new("/proc/self/mountinfo")).ok();
    files.insert(
        "cgroup.txt".into(),
        match &cg {
            Some(c) => format!("cgroup2 {}\n", c.mount().display()),
            None => "none\n".into(),
        },
    );
    let docker = serde_json::json!({
        "host_network_containers": cg.as_ref().map(host_network_containers).unwrap_or_default(),
        "containers": super::docker::containers(docker_socket),
        "daemon": super::docker::daemon(),
    });
    files.insert(
        "docker.json".into(),
        serde_json::to_string_pretty(&docker)? + "\n",
    );
    if let Some(stats) = ethtool_stats(files.get("ip-link.json").map(String::as_str))? {
        files.insert("ethtool-stats.txt".into(), stats);
    }
    if let Some(boot) = boot()? {
        files.insert("boot.json".into(), boot);
    }
    for path in task_namespaces(config) {
        let Ok(ns) = Netns::open_not_root(&path) else {
            continue;
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "task".into());
        let prefix = format!("tasks/{name}/");
        files.insert(format!("{prefix}netns"), format!("{}\n", path.display()));
        net_state(Some(&ns), &prefix, &mut files)?;
    }
    Ok(files)
}

/// Namespace files the config's `netns` selectors name (globs with one
/// `*` in the file name are expanded; "ecs-tasks" needs the Docker API and
/// is skipped).
fn task_namespaces(config: &Config) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for w in &config.workloads {
        let Selector::Netns(sels) = &w.selector else {
            continue;
        };
        for s in sels {
            let NetnsSelector::Path(p) = s else { continue };
            let p = if p.starts_with('/') {
                PathBuf::from(p)
            } else {
                Path::new("/run/netns").join(p)
            };
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match (name.split_once('*'), p.parent()) {
                (Some((pre, post)), Some(dir)) => {
                    if let Ok(rd) = std::fs::read_dir(dir) {
                        let mut v: Vec<PathBuf> = rd
                            .flatten()
                            .map(|e| e.path())
                            .filter(|e| {
                                e.file_name().is_some_and(|n| {
                                    let n = n.to_string_lossy();
                                    n.starts_with(pre) && n.ends_with(post)
                                })
                            })
                            .collect();
                        v.sort();
                        out.extend(v);
                    }
                }
                _ => {
                    if p.exists() {
                        out.push(p);
                    }
                }
            }
        }
    }
    out.dedup();
    out
}

/// Containers whose processes share this process's network namespace:
/// cgroups named like Docker's (`docker/<64 hex>`, `docker-<64 hex>.scope`).
fn host_network_containers(cg: &metaguard_sys::cgroup::Cgroup2) -> Vec<serde_json::Value> {
    let me = std::fs::metadata("/proc/self/ns/net")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let mut out = Vec::new();
    let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    for (dir, strip) in [("docker", false), ("system.slice", true)] {
        let Ok(rd) = std::fs::read_dir(cg.mount().join(dir)) else {
            continue;
        };
        for e in rd.flatten().take(10_000) {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = if strip {
                name.strip_prefix("docker-")
                    .and_then(|n| n.strip_suffix(".scope"))
                    .unwrap_or("")
            } else {
                name.as_str()
            };
            if !is_id(id) {
                continue;
            }
            let rel = format!("{dir}/{name}");
            let Ok(pids) = cg.pids(&rel) else { continue };
            let Some(pid) = pids.first() else { continue };
            let ino = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
            if ino.is_some() && ino == me {
                out.push(serde_json::json!({"name": &id[..12], "cgroup": rel}));
            }
        }
    }
    out
}

/// `ethtool -S` of each ENA interface of this namespace (the link-local
/// allowance counter, F21): physical links (no `linkinfo` kind) whose
/// `ethtool -i` says `driver: ena`. `None` without ethtool or ENA.
fn ethtool_stats(links: Option<&str>) -> anyhow::Result<Option<String>> {
    let names: Vec<String> = links
        .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|l| l.get("linkinfo").is_none())
        .filter_map(|l| l.get("ifname").and_then(|n| n.as_str()).map(str::to_string))
        .filter(|n| n != "lo")
        .collect();
    let mut out = String::new();
    for name in names {
        let Some(info) = run(None, "ethtool", &["-i", &name])? else {
            continue;
        };
        let driver = info
            .lines()
            .find_map(|l| l.strip_prefix("driver:"))
            .map(str::trim)
            .unwrap_or("");
        if driver != "ena" {
            continue;
        }
        if let Some(stats) = run(None, "ethtool", &["-S", &name])? {
            out.push_str(&metaguard_core::doctor::ethtool::header(&name, driver));
            out.push('\n');
            out.push_str(&stats);
            if !stats.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

/// Unit ordering and boothooks, on systemd hosts.
fn boot() -> anyhow::Result<Option<String>> {
    if !Path::new("/run/systemd/system").is_dir() {
        return Ok(None);
    }
    let mut units = serde_json::Map::new();
    for unit in ["docker.service", "ecs.service", "metaguard.service"] {
        let Some(out) = run(
            None,
            "systemctl",
            &["show", "-p", "LoadState,ActiveState,Before,After", unit],
        )?
        else {
            continue;
        };
        let mut m = BTreeMap::new();
        for l in out.lines() {
            if let Some((k, v)) = l.split_once('=') {
                m.insert(k.to_string(), v.to_string());
            }
        }
        if m.get("LoadState").map(String::as_str) != Some("loaded") {
            continue;
        }
        let list = |k: &str| {
            m.get(k)
                .map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        units.insert(
            unit.into(),
            serde_json::json!({"before": list("Before"), "after": list("After"), "active": m.get("ActiveState")}),
        );
    }
    let mut hooks = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/var/lib/cloud/instance/boothooks") {
        for e in rd.flatten().take(100) {
            if std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("169.254.169.254")) {
                hooks.push(e.path().display().to_string());
            }
        }
    }
    let doc = serde_json::json!({"units": units, "boothooks_with_imds_rule": hooks});
    Ok(Some(serde_json::to_string_pretty(&doc)? + "\n"))
}

/// Writes the files under `dir` (created; existing files are replaced).
pub fn write(dir: &Path, files: &BTreeMap<String, String>) -> anyhow::Result<()> {
    for (name, text) in files {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

/// Reads a snapshot directory: every known file that exists.
pub fn read(dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    use metaguard_core::doctor::snapshot::{FILES, TASK_FILES};
    if !dir.is_dir() {
        anyhow::bail!(
            "{}: not a directory (expected a snapshot from `metaguard doctor --collect DIR`)",
            dir.display()
        );
    }
    let mut files = BTreeMap::new();
    let mut load = |rel: String| -> anyhow::Result<()> {
        let p = dir.join(&rel);
        match std::fs::read(&p) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|e| {
                    let line = e.as_bytes()[..e.utf8_error().valid_up_to()]
                        .iter()
                        .filter(|b| **b == b'\n')
                        .count()
                        + 1;
                    anyhow::anyhow!("{}:{line}: not UTF-8 text", p.display())
                })?;
                files.insert(rel, text);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    };
    for f in FILES {
        load((*f).to_string())?;
    }
    if let Ok(rd) = std::fs::read_dir(dir.join("tasks")) {
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            for f in TASK_FILES {
                load(format!("tasks/{n}/{f}"))?;
            }
        }
    }
    Ok(files)
}
