//! The snapshot: everything the doctor looks at, in typed form.
//!
//! A snapshot is a directory that `metaguard doctor --collect DIR` writes
//! (or that a bug report attaches). Core does no I/O: the binary reads the
//! files and hands their text in as a map from relative path to content;
//! [`Snapshot::parse`] turns it into this form or fails naming the file
//! and the line.
//!
//! | file | content | needed |
//! |---|---|---|
//! | `ip-addr.json` | `ip -j addr show` | yes |
//! | `ip-link.json` | `ip -j -d link show` | no (bridges are then recognised by name) |
//! | `ip-route.json`, `ip6-route.json` | `ip -j -4 route show`, `ip -j -6 route show` | no |
//! | `sysctl.txt` | `sysctl` lines `key = value` (forwarding, route_localnet) | no |
//! | `iptables-legacy-save.txt`, `ip6tables-legacy-save.txt` | `iptables-legacy-save`, `ip6tables-legacy-save` | no |
//! | `iptables-nft-save.txt`, `ip6tables-nft-save.txt` | `iptables-nft-save`, `ip6tables-nft-save` | no |
//! | `nft-ruleset.json` | `nft -j list ruleset` | no |
//! | `ecs.config` | `/etc/ecs/ecs.config`, secrets replaced by `***` (`env::snapshot_ecs_config`) | no |
//! | `docker.json` | `{"host_network_containers": [{"name", "cgroup"}], "agent_cgroup", "published": [{"host_ip", "host_port", "container_port", "container"}], "containers": [{"name", "network_mode", "labels", "cgroup", "netns", "env": {NAME: null \| proxy value}}], "daemon": {"running", "iptables", "ip6tables", "bridge", "env", "env_source"}}` | no |
//! | `cgroup.txt` | the cgroup layout (`cgroup2 <mount>` / `v1`) | no |
//! | `boot.json` | `{"units": {"docker.service": {"before": [], "after": []}, …}, "boothooks_with_imds_rule": []}` | no (F5 is then not judged) |
//! | `imds-options.json` | the instance's `MetadataOptions` (from `aws ec2 describe-instances`) | no (F9 is then not judged) |
//! | `probes.json` | `--probe`'s HTTP requests to IMDS from the host's and a bridge's namespace: `{"imds": [{"from", "token_put", "tokenless_get", "connect"}]}` | no (F16, F19, F20's probe part are then not judged) |
//! | `ethtool-stats.txt` | `ethtool -S` of each ENA interface, after a `# ethtool -S IFACE (driver ena)` line ([`super::ethtool`]) | no (F21 is then not judged) |
//! | `metaguard.toml` | the metaguard config (intent); absent: the built-in default | no |
//! | `tasks/<name>/…` | `netns` (the namespace path), `ip-addr.json`, `ip-route.json`, `ip6-route.json`, rulesets as above, of an awsvpc task namespace | no |
//!
//! A file that is absent means "not present on that host" (no legacy
//! tables, no nft ruleset); a file that is present must parse.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;

use super::iptables_save::{self, Cidr, Family, Save};
use super::nft::{self, Ruleset};
use crate::config::Config;

/// A snapshot file that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct SnapshotError {
    /// The path relative to the snapshot directory.
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// An interface address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub ifname: String,
    pub addr: IpAddr,
    pub prefix: u8,
}

/// A link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    /// `bridge`, `veth`, … (`ip -d`), when known.
    pub kind: Option<String>,
    pub master: Option<String>,
}

/// A route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `None` is the default route.
    pub dst: Option<Cidr>,
    pub dev: Option<String>,
    pub gateway: Option<IpAddr>,
    /// `unicast`, `blackhole`, `unreachable`, `prohibit`, `local`, …
    pub kind: String,
}

/// One network namespace's state (the host's, or an awsvpc task's).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetState {
    pub legacy4: Option<Save>,
    pub legacy6: Option<Save>,
    pub iptnft4: Option<Save>,
    pub iptnft6: Option<Save>,
    pub nft: Option<Ruleset>,
    pub addrs: Vec<Addr>,
    pub links: Vec<Link>,
    pub routes4: Vec<Route>,
    pub routes6: Vec<Route>,
    pub sysctls: BTreeMap<String, String>,
}

/// An awsvpc task namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub name: String,
    /// The namespace file (for `--fix`).
    pub netns: Option<String>,
    pub state: NetState,
}

/// A port published by a container (`docker.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Published {
    pub host_ip: String,
    pub host_port: u16,
    #[serde(default)]
    pub container_port: Option<u16>,
    #[serde(default)]
    pub container: Option<String>,
}

/// A container on the host network (`docker.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct HostNetContainer {
    pub name: String,
    pub cgroup: String,
}

/// A running container, as the Docker API inspects it (`docker.json`
/// `containers`). Only the environment's *names* are kept, except the
/// proxy settings (`HTTP_PROXY`, `NO_PROXY`, …), whose values are kept
/// with any `user:password@` removed: a snapshot carries no secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct DockerContainer {
    pub name: String,
    /// `bridge`, `host`, `none`, `container:<id>`, or a network's name.
    pub network_mode: String,
    pub labels: BTreeMap<String, String>,
    /// cgroup v2 path relative to the root.
    pub cgroup: Option<String>,
    /// Its network namespace file, when it has its own stack.
    pub netns: Option<String>,
    /// Variable name → value (proxy settings) or `null` (any other).
    pub env: BTreeMap<String, Option<String>>,
}

/// The Docker daemon: whether it runs, its own firewall settings
/// (`/etc/docker/daemon.json`) and the proxy settings of its environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct DockerDaemon {
    /// A dockerd process was found.
    pub running: bool,
    /// `"iptables"` in daemon.json (absent: Docker's default, true).
    pub iptables: Option<bool>,
    /// `"ip6tables"` in daemon.json.
    pub ip6tables: Option<bool>,
    /// `"bridge"` in daemon.json (`none`: no docker0).
    pub bridge: Option<String>,
    /// Proxy settings of dockerd's environment (`/proc/<pid>/environ`, or
    /// its systemd unit's `Environment=`), with `user:password@` removed.
    pub env: BTreeMap<String, String>,
    /// Where `env` was read.
    pub env_source: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct Docker {
    pub host_network_containers: Vec<HostNetContainer>,
    pub agent_cgroup: Option<String>,
    pub published: Vec<Published>,
    /// Running containers (Docker API); empty without the API.
    pub containers: Vec<DockerContainer>,
    /// The daemon; `None`: not looked at (older snapshots).
    pub daemon: Option<DockerDaemon>,
}

/// Ordering of one systemd unit.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct Unit {
    pub before: Vec<String>,
    pub after: Vec<String>,
    pub active: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct Boot {
    pub units: BTreeMap<String, Unit>,
    pub boothooks_with_imds_rule: Vec<String>,
}

/// The instance's metadata options (AWS `MetadataOptions`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct ImdsOptions {
    #[serde(rename = "HttpPutResponseHopLimit")]
    pub hop_limit: Option<u8>,
    #[serde(rename = "HttpTokens")]
    pub tokens: Option<String>,
    #[serde(rename = "HttpEndpoint")]
    pub endpoint: Option<String>,
    #[serde(rename = "HttpProtocolIpv6")]
    pub ipv6: Option<String>,
}

/// One HTTP request a probe made (`probes.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct HttpProbe {
    /// `answered`, `timeout`, `refused`, `unreachable` or `error`.
    pub outcome: String,
    /// The HTTP status, when answered.
    pub status: Option<u16>,
    /// The answer carried `X-aws-ec2-metadata-token-ttl-seconds`.
    pub ttl_header: bool,
    /// The start of the answer's body (at most 200 characters; never a
    /// token: token answers are not kept).
    pub body: Option<String>,
}

/// IMDS as seen from one namespace with `--probe` (`probes.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct ImdsProbe {
    /// `host` (doctor's own namespace) or `bridge <name>` (a short-lived
    /// namespace plugged into the bridge like a container).
    pub from: String,
    /// `PUT /latest/api/token` with a TTL header (IMDSv2's first step).
    pub token_put: Option<HttpProbe>,
    /// `GET /latest/meta-data/` without a token (IMDSv1).
    pub tokenless_get: Option<HttpProbe>,
    /// A plain TCP connect to IMDS port 80: `answered` when it connects.
    pub connect: Option<String>,
}

/// What `--probe` observed over HTTP (`probes.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Probes {
    pub imds: Vec<ImdsProbe>,
}

/// The whole snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub host: NetState,
    pub ecs_config: BTreeMap<String, String>,
    pub docker: Docker,
    pub cgroup: Option<String>,
    pub boot: Option<Boot>,
    pub imds_options: Option<ImdsOptions>,
    /// What `--probe` observed over HTTP; `None`: no probe ran.
    pub probes: Option<Probes>,
    /// `ethtool -S` of the ENA interfaces (`ethtool-stats.txt`).
    pub ethtool: BTreeMap<String, super::ethtool::Stats>,
    /// The intent: metaguard.toml, or the built-in default.
    pub config: Config,
    pub tasks: Vec<Task>,
}

/// The files a snapshot directory may hold (besides `tasks/<name>/…`).
pub const FILES: &[&str] = &[
    "ip-addr.json",
    "ip-link.json",
    "ip-route.json",
    "ip6-route.json",
    "sysctl.txt",
    "iptables-legacy-save.txt",
    "ip6tables-legacy-save.txt",
    "iptables-nft-save.txt",
    "ip6tables-nft-save.txt",
    "nft-ruleset.json",
    "ecs.config",
    "docker.json",
    "cgroup.txt",
    "boot.json",
    "imds-options.json",
    "probes.json",
    "ethtool-stats.txt",
    "metaguard.toml",
];

/// Files of a task namespace directory.
pub const TASK_FILES: &[&str] = &[
    "netns",
    "ip-addr.json",
    "ip-route.json",
    "ip6-route.json",
    "sysctl.txt",
    "iptables-legacy-save.txt",
    "ip6tables-legacy-save.txt",
    "iptables-nft-save.txt",
    "ip6tables-nft-save.txt",
    "nft-ruleset.json",
];

fn json_err(file: &str, e: &serde_json::Error) -> SnapshotError {
    SnapshotError {
        file: file.into(),
        line: e.line(),
        message: format!("not valid JSON: {e}"),
    }
}

fn shape(file: &str, line: usize, message: impl Into<String>) -> SnapshotError {
    SnapshotError {
        file: file.into(),
        line,
        message: message.into(),
    }
}

fn parse_json(file: &str, text: &str) -> Result<Value, SnapshotError> {
    serde_json::from_str(text).map_err(|e| json_err(file, &e))
}

fn parse_addrs(file: &str, text: &str) -> Result<Vec<Addr>, SnapshotError> {
    let v = parse_json(file, text)?;
    let arr = v
        .as_array()
        .ok_or_else(|| shape(file, 1, "expected a JSON array (ip -j addr show)"))?;
    let mut out = Vec::new();
    for (i, l) in arr.iter().enumerate() {
        let Some(ifname) = l.get("ifname").and_then(Value::as_str) else {
            return Err(shape(file, 1, format!("entry {i}: missing \"ifname\"")));
        };
        for a in l
            .get("addr_info")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(local), Some(len)) = (
                a.get("local").and_then(Value::as_str),
                a.get("prefixlen").and_then(Value::as_u64),
            ) else {
                continue;
            };
            let addr: IpAddr = local.parse().map_err(|_| {
                shape(
                    file,
                    1,
                    format!("entry {i} ({ifname}): bad address {local:?}"),
                )
            })?;
            out.push(Addr {
                ifname: ifname.to_string(),
                addr,
                prefix: u8::try_from(len).unwrap_or(0),
            });
        }
    }
    Ok(out)
}

fn parse_links(file: &str, text: &str) -> Result<Vec<Link>, SnapshotError> {
    let v = parse_json(file, text)?;
    let arr = v
        .as_array()
        .ok_or_else(|| shape(file, 1, "expected a JSON array (ip -j -d link show)"))?;
    let mut out = Vec::new();
    for (i, l) in arr.iter().enumerate() {
        let Some(name) = l.get("ifname").and_then(Value::as_str) else {
            return Err(shape(file, 1, format!("entry {i}: missing \"ifname\"")));
        };
        out.push(Link {
            name: name.to_string(),
            kind: l
                .get("linkinfo")
                .and_then(|li| li.get("info_kind"))
                .and_then(Value::as_str)
                .map(str::to_string),
            master: l.get("master").and_then(Value::as_str).map(str::to_string),
        });
    }
    Ok(out)
}

fn parse_routes(file: &str, text: &str, v6: bool) -> Result<Vec<Route>, SnapshotError> {
    let v = parse_json(file, text)?;
    let arr = v
        .as_array()
        .ok_or_else(|| shape(file, 1, "expected a JSON array (ip -j route show)"))?;
    let mut out = Vec::new();
    for (i, r) in arr.iter().enumerate() {
        let Some(dst) = r.get("dst").and_then(Value::as_str) else {
            return Err(shape(file, 1, format!("entry {i}: missing \"dst\"")));
        };
        let dst = if dst == "default" {
            None
        } else {
            let c = Cidr::parse(dst)
                .ok_or_else(|| shape(file, 1, format!("entry {i}: bad destination {dst:?}")))?;
            if c.addr.is_ipv6() != v6 {
                return Err(shape(
                    file,
                    1,
                    format!("entry {i}: destination {dst:?} is of the other family"),
                ));
            }
            Some(c)
        };
        out.push(Route {
            dst,
            dev: r.get("dev").and_then(Value::as_str).map(str::to_string),
            gateway: r
                .get("gateway")
                .and_then(Value::as_str)
                .and_then(|g| g.parse().ok()),
            kind: r
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("unicast")
                .to_string(),
        });
    }
    Ok(out)
}

fn parse_sysctl(file: &str, text: &str) -> Result<BTreeMap<String, String>, SnapshotError> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(shape(
                file,
                i + 1,
                format!("expected `key = value`, found {line:?}"),
            ));
        };
        let k = k.trim().replace('/', ".");
        if k.is_empty() {
            return Err(shape(file, i + 1, "empty sysctl name"));
        }
        out.insert(k, v.trim().to_string());
    }
    Ok(out)
}

fn parse_ecs_config(file: &str, text: &str) -> Result<BTreeMap<String, String>, SnapshotError> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err(shape(
                file,
                i + 1,
                format!("expected `KEY=value`, found {line:?}"),
            ));
        };
        out.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
    }
    Ok(out)
}

fn typed<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, SnapshotError> {
    serde_json::from_str(text).map_err(|e| json_err(file, &e))
}

fn parse_state(files: &BTreeMap<String, String>, prefix: &str) -> Result<NetState, SnapshotError> {
    let get = |name: &str| {
        files
            .get(&format!("{prefix}{name}"))
            .map(|t| (format!("{prefix}{name}"), t))
    };
    let save = |name: &str, fam: Family| -> Result<Option<Save>, SnapshotError> {
        match get(name) {
            None => Ok(None),
            Some((file, text)) => iptables_save::parse(text, fam)
                .map(Some)
                .map_err(|e| shape(&file, e.line, e.message)),
        }
    };
    let mut st = NetState {
        legacy4: save("iptables-legacy-save.txt", Family::Ip)?,
        legacy6: save("ip6tables-legacy-save.txt", Family::Ip6)?,
        iptnft4: save("iptables-nft-save.txt", Family::Ip)?,
        iptnft6: save("ip6tables-nft-save.txt", Family::Ip6)?,
        ..NetState::default()
    };
    if let Some((file, text)) = get("nft-ruleset.json") {
        st.nft = Some(nft::parse(text).map_err(|e| match e {
            nft::NftJsonError::Json { line, message, .. } => shape(&file, line, message),
            nft::NftJsonError::Shape(m) => shape(&file, 1, m),
        })?);
    }
    if let Some((file, text)) = get("ip-addr.json") {
        st.addrs = parse_addrs(&file, text)?;
    }
    if let Some((file, text)) = get("ip-link.json") {
        st.links = parse_links(&file, text)?;
    }
    if st.links.is_empty() {
        // Links without details: the names of the addressed interfaces.
        let mut names: Vec<String> = st.addrs.iter().map(|a| a.ifname.clone()).collect();
        names.dedup();
        st.links = names
            .into_iter()
            .map(|name| Link {
                name,
                kind: None,
                master: None,
            })
            .collect();
    }
    if let Some((file, text)) = get("ip-route.json") {
        st.routes4 = parse_routes(&file, text, false)?;
    }
    if let Some((file, text)) = get("ip6-route.json") {
        st.routes6 = parse_routes(&file, text, true)?;
    }
    if let Some((file, text)) = get("sysctl.txt") {
        st.sysctls = parse_sysctl(&file, text)?;
    }
    Ok(st)
}

impl Snapshot {
    /// Parses the files of a snapshot directory (relative path → text).
    pub fn parse(files: &BTreeMap<String, String>) -> Result<Snapshot, SnapshotError> {
        if !files.contains_key("ip-addr.json") {
            return Err(shape(
                "ip-addr.json",
                0,
                "missing: a snapshot needs at least ip-addr.json (`metaguard doctor --collect DIR` writes every file)",
            ));
        }
        let host = parse_state(files, "")?;
        let ecs_config = match files.get("ecs.config") {
            Some(t) => parse_ecs_config("ecs.config", t)?,
            None => BTreeMap::new(),
        };
        let docker = match files.get("docker.json") {
            Some(t) => typed("docker.json", t)?,
            None => Docker::default(),
        };
        let boot = match files.get("boot.json") {
            Some(t) => Some(typed("boot.json", t)?),
            None => None,
        };
        let imds_options = match files.get("imds-options.json") {
            Some(t) => Some(typed("imds-options.json", t)?),
            None => None,
        };
        let probes = match files.get("probes.json") {
            Some(t) => Some(typed("probes.json", t)?),
            None => None,
        };
        let ethtool = match files.get("ethtool-stats.txt") {
            Some(t) => super::ethtool::parse(t)
                .map_err(|e| shape("ethtool-stats.txt", e.line, e.message))?,
            None => BTreeMap::new(),
        };
        let config = match files.get("metaguard.toml") {
            Some(t) => Config::parse(t, "metaguard.toml")
                .map_err(|e| shape("metaguard.toml", e.line, e.message.clone()))?,
            None => Config::builtin_default(),
        };
        let mut names: Vec<&str> = files
            .keys()
            .filter_map(|k| k.strip_prefix("tasks/"))
            .filter_map(|k| k.split_once('/').map(|(n, _)| n))
            .collect();
        names.dedup();
        let mut tasks = Vec::new();
        for name in names {
            let prefix = format!("tasks/{name}/");
            tasks.push(Task {
                name: name.to_string(),
                netns: files
                    .get(&format!("{prefix}netns"))
                    .map(|t| t.trim().to_string()),
                state: parse_state(files, &prefix)?,
            });
        }
        Ok(Snapshot {
            host,
            ecs_config,
            docker,
            cgroup: files.get("cgroup.txt").map(|t| t.trim().to_string()),
            boot,
            imds_options,
            probes,
            ethtool,
            config,
            tasks,
        })
    }
}
