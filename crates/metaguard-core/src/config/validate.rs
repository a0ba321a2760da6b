//! The checks of one `[[workload]]`: its selector entries (bridge globs,
//! namespace paths, cgroups, containers) and its decisions.

use std::ops::Range;

use serde_spanned::Spanned;

use crate::proxy_path::PathPolicy;

use super::parse::{parse_action, parse_path_globs, Ctx, RawWorkload, SpannedList};
use super::{
    Action, ConfigError, ContainerRef, NetnsSelector, Selector, TmdsMode, Workload, IFNAMSIZ_MAX,
};

pub(super) fn validate_workload(
    cx: &Ctx<'_>,
    span: Range<usize>,
    w: RawWorkload,
) -> Result<Workload, ConfigError> {
    let name = match w.name {
        Some(n) if !n.get_ref().trim().is_empty() => n.into_inner(),
        Some(n) => {
            return Err(cx.err(
                n.span(),
                "workload name is empty",
                Some("name every workload"),
            ))
        }
        None => {
            return Err(cx.err(
                span,
                "workload has no name",
                Some(r#"add name = "…" to this [[workload]]"#),
            ))
        }
    };

    let given: Vec<(&'static str, &SpannedList)> = [
        ("bridges", w.bridges.as_ref()),
        ("netns", w.netns.as_ref()),
        ("cgroups", w.cgroups.as_ref()),
        ("containers", w.containers.as_ref()),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect();
    let (kind, list) = match given.as_slice() {
        [] => {
            return Err(cx.err(
                span,
                format!("workload {name:?} has no selector"),
                Some("give it exactly one of bridges, netns, cgroups, containers"),
            ))
        }
        [one] => *one,
        [_, second, ..] => {
            let kinds: Vec<&str> = given.iter().map(|(k, _)| *k).collect();
            return Err(cx.err(
                second.1.span(),
                format!(
                    "workload {name:?} has more than one kind of selector ({})",
                    kinds.join(", ")
                ),
                Some("split it into one [[workload]] per selector kind"),
            ));
        }
    };
    if list.get_ref().is_empty() {
        return Err(cx.err(
            list.span(),
            format!("workload {name:?}: {kind} is empty, so it selects nothing"),
            Some("list at least one entry, or remove the workload"),
        ));
    }
    let items = list.get_ref();
    let selector = match kind {
        "bridges" => Selector::Bridges(
            items
                .iter()
                .map(|i| check_bridge_glob(cx, i))
                .collect::<Result<_, _>>()?,
        ),
        "netns" => Selector::Netns(
            items
                .iter()
                .map(|i| check_netns(cx, i))
                .collect::<Result<_, _>>()?,
        ),
        "cgroups" => Selector::Cgroups(
            items
                .iter()
                .map(|i| check_cgroup(cx, "cgroups", i))
                .collect::<Result<_, _>>()?,
        ),
        _ => Selector::Containers(
            items
                .iter()
                .map(|i| check_container(cx, i))
                .collect::<Result<_, _>>()?,
        ),
    };

    let raw_sockets = match &w.raw_sockets {
        None => Action::Allow,
        Some(v) => match v.get_ref().as_str() {
            "deny" if kind == "cgroups" => Action::Deny,
            "deny" => {
                return Err(cx.err(
                    v.span(),
                    format!("workload {name:?}: raw_sockets = \"deny\" needs a cgroups selector"),
                    Some("raw and packet sockets are refused by cgroup BPF programs; select the workload by cgroups"),
                ))
            }
            "allow" => Action::Allow,
            other => {
                return Err(cx.err(
                    v.span(),
                    format!("raw_sockets: unknown action {other:?}"),
                    Some(r#"use "deny" or "allow""#),
                ))
            }
        },
    };
    let imds = parse_action(cx, "imds", w.imds)?;
    let task_metadata = parse_action(cx, "task_metadata", w.task_metadata)?;
    let credentials_ids = match w.credentials_ids {
        None => Vec::new(),
        Some(ids) => ids
            .into_inner()
            .into_iter()
            .map(|id| {
                let ok = !id.get_ref().is_empty()
                    && id
                        .get_ref()
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if ok {
                    Ok(id.into_inner())
                } else {
                    Err(cx.err(
                        id.span(),
                        format!("credentials id {:?} is not a valid id", id.get_ref()),
                        Some("ids are letters, digits, '-' and '_' (the last segment of AWS_CONTAINER_CREDENTIALS_RELATIVE_URI)"),
                    ))
                }
            })
            .collect::<Result<_, _>>()?,
    };
    let imds_policy = match w.imds_policy {
        None => PathPolicy::default_imds(),
        Some(p) if imds != Action::Proxy => {
            return Err(cx.err(
                p.span(),
                format!("workload {name:?}: imds_policy is only used with imds = \"proxy\""),
                Some("set imds = \"proxy\" or remove the imds_policy table"),
            ))
        }
        Some(p) => {
            let p = p.into_inner();
            PathPolicy {
                allow: parse_path_globs(cx, "imds_policy.allow", p.allow)?,
                deny: parse_path_globs(cx, "imds_policy.deny", p.deny)?,
            }
        }
    };
    let tmds = match w.tmds {
        None => TmdsMode::default(),
        Some(v) if task_metadata != Action::Proxy => {
            return Err(cx.err(
                v.span(),
                format!("workload {name:?}: tmds is only used with task_metadata = \"proxy\""),
                Some("set task_metadata = \"proxy\" or remove tmds"),
            ))
        }
        Some(v) => match v.get_ref().as_str() {
            "allow" => TmdsMode::Allow,
            "deny" => TmdsMode::Deny,
            "redact" => TmdsMode::Redact,
            other => {
                return Err(cx.err(
                    v.span(),
                    format!("tmds: unknown mode {other:?}"),
                    Some(r#"use one of "allow", "deny", "redact""#),
                ))
            }
        },
    };
    Ok(Workload {
        name,
        selector,
        imds,
        task_metadata,
        credentials_ids,
        raw_sockets,
        imds_policy,
        tmds,
    })
}

pub(super) fn check_bridge_glob(
    cx: &Ctx<'_>,
    item: &Spanned<String>,
) -> Result<String, ConfigError> {
    let s = item.get_ref();
    let body = s.strip_suffix('*').unwrap_or(s);
    let problem = if s.is_empty() || s == "*" {
        Some("an interface glob must name something (\"*\" alone would select every interface)")
    } else if body.contains('*') || body.contains('?') || body.contains('[') {
        Some("only a single trailing '*' is supported (nft matches iifname \"br-*\" natively)")
    } else if body.len() > IFNAMSIZ_MAX {
        Some("interface names are at most 15 bytes long")
    } else if body.bytes().any(|b| {
        b == b'/' || b == b'"' || b == b'\\' || b.is_ascii_whitespace() || b.is_ascii_control()
    }) {
        Some("interface names cannot hold '/', quotes, backslashes or white space")
    } else {
        None
    };
    match problem {
        None => Ok(s.clone()),
        Some(why) => Err(cx.err(
            item.span(),
            format!("bridges: {s:?} is not a usable interface glob"),
            Some(why),
        )),
    }
}

pub(super) fn check_netns(
    cx: &Ctx<'_>,
    item: &Spanned<String>,
) -> Result<NetnsSelector, ConfigError> {
    let s = item.get_ref();
    if s == "ecs-tasks" {
        return Ok(NetnsSelector::EcsTasks);
    }
    if s.is_empty() || s.split('/').any(|seg| seg == "..") {
        return Err(cx.err(
            item.span(),
            format!("netns: {s:?} is not a usable namespace path"),
            Some("use an absolute path glob like \"/run/netns/task-*\", a name under /run/netns, or \"ecs-tasks\""),
        ));
    }
    let path = if s.starts_with('/') {
        s.clone()
    } else {
        format!("/run/netns/{s}")
    };
    globset::Glob::new(&path).map_err(|e| {
        cx.err(
            item.span(),
            format!("netns: {s:?} is not a valid glob: {}", e.kind()),
            None,
        )
    })?;
    Ok(NetnsSelector::Path(path))
}

pub(super) fn check_cgroup(
    cx: &Ctx<'_>,
    key: &str,
    item: &Spanned<String>,
) -> Result<String, ConfigError> {
    let s = item.get_ref();
    let trimmed = s.trim_matches('/');
    let bad = trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        || trimmed
            .bytes()
            .any(|b| b == b'"' || b == b'\\' || b.is_ascii_control());
    if bad {
        return Err(cx.err(
            item.span(),
            format!("{key}: {s:?} is not a usable cgroup v2 path"),
            Some("write a subtree relative to the cgroup2 root, like \"docker\" or \"system.slice/docker-abc.scope\" (the root itself cannot be selected)"),
        ));
    }
    Ok(trimmed.to_string())
}

pub(super) fn check_container(
    cx: &Ctx<'_>,
    item: &Spanned<String>,
) -> Result<ContainerRef, ConfigError> {
    let s = item.get_ref();
    if let Some(label) = s.strip_prefix("label:") {
        return match label.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok(ContainerRef::Label {
                key: k.to_string(),
                value: v.to_string(),
            }),
            _ => Err(cx.err(
                item.span(),
                format!("containers: {s:?} is not a label selector"),
                Some("write label selectors as \"label:KEY=VALUE\""),
            )),
        };
    }
    let name = s.strip_prefix('/').unwrap_or(s);
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(cx.err(
            item.span(),
            format!("containers: {s:?} is not a container name"),
            Some("container names are letters, digits, '_', '.' and '-'; use \"label:K=V\" to select by label"),
        ));
    }
    Ok(ContainerRef::Name(name.to_string()))
}
