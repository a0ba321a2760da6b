//! The raw TOML shape (serde, unknown keys rejected, every value spanned)
//! and its parsing into the validated model, section by section.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use serde::Deserialize;
use serde_spanned::Spanned;

use crate::location::{line_at, Position};
use crate::proxy_path::PathGlob;

use super::validate::{check_cgroup, validate_workload};
use super::{
    Action, AgentContainer, Config, ConfigError, Endpoints, Layers, Mode, Origin, ProxySettings,
    AGENT_CONTAINER_PREFIX, DEFAULT_AGENT_CREDENTIALS, DEFAULT_IMDS, DEFAULT_TASK_METADATA,
};

// ---------------------------------------------------------------------------
// Raw TOML shape.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) mode: Option<Spanned<String>>,
    pub(super) endpoints: Option<RawEndpoints>,
    pub(super) agent: Option<RawAgent>,
    pub(super) layers: Option<RawLayers>,
    pub(super) proxy: Option<RawProxy>,
    #[serde(default)]
    pub(super) workload: Vec<Spanned<RawWorkload>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub(super) imds_port: Option<Spanned<i64>>,
    pub(super) rate: Option<Spanned<i64>>,
    pub(super) burst: Option<Spanned<i64>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) audit_log: Option<Spanned<String>>,
    pub(super) cache: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPathPolicy {
    #[serde(default)]
    pub(super) allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) deny: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoints {
    pub(super) imds: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) task_metadata: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLayers {
    pub(super) bpf: Option<bool>,
    pub(super) container_cgroups: Option<SpannedList>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub(super) credentials: Option<Spanned<String>>,
}

pub(super) type SpannedList = Spanned<Vec<Spanned<String>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkload {
    pub(super) name: Option<Spanned<String>>,
    pub(super) bridges: Option<SpannedList>,
    pub(super) netns: Option<SpannedList>,
    pub(super) cgroups: Option<SpannedList>,
    pub(super) containers: Option<SpannedList>,
    pub(super) imds: Option<Spanned<String>>,
    pub(super) task_metadata: Option<Spanned<String>>,
    pub(super) credentials_ids: Option<SpannedList>,
    pub(super) raw_sockets: Option<Spanned<String>>,
    pub(super) imds_policy: Option<Spanned<RawPathPolicy>>,
    pub(super) tmds: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------

pub(super) struct Ctx<'a> {
    pub(super) text: &'a str,
    pub(super) origin: &'a str,
}

impl Ctx<'_> {
    pub(super) fn err(
        &self,
        span: Range<usize>,
        message: impl Into<String>,
        hint: Option<&str>,
    ) -> ConfigError {
        let pos = Position::of(self.text, span.start);
        ConfigError {
            origin: self.origin.to_string(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
            source_line: line_at(self.text, span.start).to_string(),
            hint: hint.map(str::to_string),
        }
    }
}

impl Config {
    /// Parses and validates `text`; `origin` names it in errors (a path).
    /// With `mode = "observe"` the workloads' actions are the observed
    /// ones ([`Mode::Observe`]).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Self::parse_mode(text, origin, true)
    }

    /// [`Config::parse`], with every action as written even under
    /// `mode = "observe"`: what the file would do if enforced (what
    /// `metaguard report` asks). `mode` is still validated and reported.
    pub fn parse_enforced(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Self::parse_mode(text, origin, false)
    }

    fn parse_mode(text: &str, origin: &str, honour_mode: bool) -> Result<Config, ConfigError> {
        let cx = Ctx { text, origin };
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(&cx, &e))?;
        let mode = match raw.mode {
            None => Mode::Enforce,
            Some(m) => match m.get_ref().as_str() {
                "enforce" => Mode::Enforce,
                "observe" => Mode::Observe,
                other => {
                    return Err(cx.err(
                        m.span(),
                        format!("mode: unknown mode {other:?}"),
                        Some(r#"use "enforce" (the default) or "observe"; mode is a top-level key, before any [table]"#),
                    ))
                }
            },
        };

        let endpoints = match raw.endpoints {
            None => Endpoints {
                imds: default_ips(&DEFAULT_IMDS),
                task_metadata: default_ips(&DEFAULT_TASK_METADATA),
            },
            Some(e) => Endpoints {
                imds: match e.imds {
                    None => default_ips(&DEFAULT_IMDS),
                    Some(list) => parse_ip_list(&cx, "endpoints.imds", list)?,
                },
                task_metadata: match e.task_metadata {
                    None => default_ips(&DEFAULT_TASK_METADATA),
                    Some(list) => parse_ip_list(&cx, "endpoints.task_metadata", list)?,
                },
            },
        };
        if let Some(overlap) = endpoints
            .imds
            .iter()
            .find(|ip| endpoints.task_metadata.contains(ip))
        {
            return Err(cx.err(
                0..0,
                format!("{overlap} is listed both as an imds and a task_metadata endpoint"),
                Some("each address belongs to exactly one endpoint class"),
            ));
        }

        let default_agent: SocketAddr = DEFAULT_AGENT_CREDENTIALS
            .parse()
            .unwrap_or_else(|e| unreachable!("default agent address: {e}"));
        let (agent_credentials, agent_container) = match raw.agent.and_then(|a| a.credentials) {
            None => (default_agent, None),
            Some(s) => match s.get_ref().strip_prefix(AGENT_CONTAINER_PREFIX) {
                Some(rest) => (default_agent, Some(agent_container(&cx, &s, rest)?)),
                None => {
                    let addr = s.get_ref().parse::<SocketAddr>().map_err(|_| {
                        cx.err(
                            s.span(),
                            format!(
                                "agent.credentials: {:?} is not an IP:PORT address",
                                s.get_ref()
                            ),
                            Some(r#"write it like "127.0.0.1:51679" or "[::1]:51679", or "container:ecs-agent:51679" for an agent running in a container on a bridge"#),
                        )
                    })?;
                    (addr, None)
                }
            },
        };

        let mut names = BTreeSet::new();
        let mut workloads = Vec::with_capacity(raw.workload.len());
        for w in raw.workload {
            let span = w.span();
            let w = w.into_inner();
            let workload = validate_workload(&cx, span.clone(), w)?;
            if !names.insert(workload.name.clone()) {
                return Err(cx.err(
                    span,
                    format!("workload name {:?} is used twice", workload.name),
                    Some("give every [[workload]] a unique name"),
                ));
            }
            workloads.push(workload);
        }
        if mode == Mode::Observe && honour_mode {
            for w in &mut workloads {
                for a in [&mut w.imds, &mut w.task_metadata] {
                    if matches!(*a, Action::Deny | Action::Proxy) {
                        *a = Action::Observe;
                    }
                }
                w.raw_sockets = Action::Allow;
            }
        }

        Ok(Config {
            origin: Origin::File(origin.to_string()),
            mode,
            endpoints,
            agent_credentials,
            agent_container,
            workloads,
            layers: parse_layers(&cx, raw.layers)?,
            proxy: parse_proxy(&cx, raw.proxy)?,
        })
    }
}

pub(super) fn parse_layers(cx: &Ctx<'_>, raw: Option<RawLayers>) -> Result<Layers, ConfigError> {
    let mut layers = Layers::default();
    let Some(raw) = raw else { return Ok(layers) };
    layers.bpf = raw.bpf.unwrap_or(true);
    if let Some(list) = raw.container_cgroups {
        layers.container_cgroups.clear();
        layers.container_cgroups_named = true;
        for item in list.get_ref() {
            let path = check_cgroup(cx, "container_cgroups", item)?;
            if !layers.container_cgroups.contains(&path) {
                layers.container_cgroups.push(path);
            }
        }
    }
    Ok(layers)
}

pub(super) fn parse_proxy(
    cx: &Ctx<'_>,
    raw: Option<RawProxy>,
) -> Result<ProxySettings, ConfigError> {
    let mut p = ProxySettings::default();
    let Some(raw) = raw else { return Ok(p) };
    let int = |key: &str, v: Spanned<i64>, min: i64, max: i64| -> Result<u32, ConfigError> {
        let n = *v.get_ref();
        if n < min || n > max {
            return Err(cx.err(
                v.span(),
                format!("proxy.{key}: {n} is out of range"),
                Some(&format!("use a whole number from {min} to {max}")),
            ));
        }
        Ok(n as u32)
    };
    if let Some(v) = raw.imds_port {
        let span = v.span();
        p.imds_port = int("imds_port", v, 1, 65535)? as u16;
        if p.imds_port == 80 {
            return Err(cx.err(
                span,
                "proxy.imds_port: 80 is the port callers ask for; the proxy's listeners must be on another",
                Some("pick another port, e.g. 9470 (the default)"),
            ));
        }
    }
    if let Some(v) = raw.rate {
        p.rate = int("rate", v, 1, 1_000_000)?;
    }
    if let Some(v) = raw.burst {
        p.burst = int("burst", v, 1, 1_000_000)?;
    }
    if let Some(v) = raw.max_connections {
        p.max_connections = int("max_connections", v, 1, 1_000_000)?;
    }
    if let Some(v) = raw.audit_log {
        if !v.get_ref().starts_with('/') {
            return Err(cx.err(
                v.span(),
                format!("proxy.audit_log: {:?} is not an absolute path", v.get_ref()),
                Some("write an absolute file path, e.g. \"/var/log/metaguard/audit.log\", or remove the key to log to the daemon's stderr"),
            ));
        }
        p.audit_log = Some(v.into_inner());
    }
    if let Some(v) = raw.cache {
        p.cache = v;
    }
    Ok(p)
}

pub(super) fn parse_path_globs(
    cx: &Ctx<'_>,
    key: &str,
    list: Vec<Spanned<String>>,
) -> Result<Vec<PathGlob>, ConfigError> {
    list.into_iter()
        .map(|g| {
            let s = g.get_ref();
            let bad = !s.starts_with('/')
                || s.contains(['?', '#', '%', '\\'])
                || s.split('/').any(|seg| seg == "." || seg == "..")
                || s.split('/').any(|seg| seg.contains('*') && seg != "*" && seg != "**");
            if bad {
                Err(cx.err(
                    g.span(),
                    format!("{key}: {s:?} is not a path glob"),
                    Some("write canonical paths like \"/latest/meta-data/placement/**\": absolute, no query, no '.'/'..'; '*' is one whole segment, '**' any number"),
                ))
            } else {
                Ok(PathGlob::new(s))
            }
        })
        .collect()
}

pub(super) fn toml_error(cx: &Ctx<'_>, e: &toml::de::Error) -> ConfigError {
    let span = e.span().unwrap_or(0..0);
    let message = e.message().trim().to_string();
    let hint = if message.starts_with("unknown field") {
        Some("check the spelling; the keys are listed in docs/config.md and interface.md")
    } else {
        None
    };
    cx.err(span, message, hint)
}

pub(super) fn default_ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|e| unreachable!("default endpoint {s}: {e}"))
        })
        .collect()
}

pub(super) fn parse_ip_list(
    cx: &Ctx<'_>,
    key: &str,
    list: SpannedList,
) -> Result<Vec<IpAddr>, ConfigError> {
    let span = list.span();
    let list = list.into_inner();
    if list.is_empty() {
        return Err(cx.err(
            span,
            format!("{key} is empty: metaguard would guard nothing there"),
            Some("remove the key to use the defaults"),
        ));
    }
    let mut out: Vec<IpAddr> = Vec::with_capacity(list.len());
    for item in list {
        let ip = parse_ip(item.get_ref()).ok_or_else(|| {
            cx.err(
                item.span(),
                format!("{key}: {:?} is not an IP address", item.get_ref()),
                Some("write a plain IPv4 or IPv6 address, like \"169.254.169.254\" or \"fd00:ec2::254\""),
            )
        })?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// Parses an endpoint address. IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is
/// folded to IPv4: the kernel treats both spellings as one destination, and
/// the rule builder covers the mapped form of every IPv4 endpoint anyway.
pub(super) fn parse_ip(s: &str) -> Option<IpAddr> {
    let ip: IpAddr = s.trim().parse().ok()?;
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    })
}

pub(super) fn parse_action(
    cx: &Ctx<'_>,
    key: &str,
    v: Option<Spanned<String>>,
) -> Result<Action, ConfigError> {
    let Some(v) = v else {
        return Ok(Action::Allow);
    };
    match v.get_ref().as_str() {
        "deny" => Ok(Action::Deny),
        "allow" => Ok(Action::Allow),
        "proxy" => Ok(Action::Proxy),
        "observe" => Ok(Action::Observe),
        other => Err(cx.err(
            v.span(),
            format!("{key}: unknown action {other:?}"),
            Some(r#"use one of "deny", "allow", "proxy", "observe""#),
        )),
    }
}

/// `container:REF:PORT` (after the prefix: `rest`): a container reference
/// as a `containers` selector takes it, and the port the agent serves
/// credentials on inside it.
fn agent_container(
    cx: &Ctx<'_>,
    s: &Spanned<String>,
    rest: &str,
) -> Result<AgentContainer, ConfigError> {
    let hint = Some(
        r#"write it like "container:ecs-agent:51679" (a container name, or "label:KEY=VALUE", then the agent's port)"#,
    );
    let Some((reference, port)) = rest.rsplit_once(':') else {
        return Err(cx.err(
            s.span(),
            format!("agent.credentials: {:?} names no port", s.get_ref()),
            hint,
        ));
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => {
            return Err(cx.err(
                s.span(),
                format!("agent.credentials: {port:?} is not a port"),
                hint,
            ))
        }
    };
    let container =
        super::validate::check_container(cx, &Spanned::new(s.span(), reference.to_string()))?;
    Ok(AgentContainer { container, port })
}
