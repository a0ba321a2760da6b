//! The repair side of a finding: [`FixAction`], one change `--fix` can
//! make, spelled as the exact command line (and the namespace it runs
//! in), and [`Fix`], the actions with the manual and durable steps or the
//! reason `--fix` refuses.

use serde::Serialize;

use super::super::path::Backend;

/// One change `--fix` can make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FixAction {
    /// Insert an iptables rule at `position` (1-based) of `chain`.
    IptablesInsert {
        backend: Backend,
        family: String,
        table: String,
        chain: String,
        position: usize,
        args: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
    },
    /// Insert an nft rule before the rule with `before_handle` (append when None).
    NftInsert {
        family: String,
        table: String,
        chain: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        before_handle: Option<u64>,
        rule: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
    },
    /// `sysctl -w KEY=VALUE`.
    Sysctl { key: String, value: String },
    /// `ip addr add ADDR dev DEV`.
    AddrAdd { addr: String, dev: String },
    /// `ip [-6] route add ROUTE` in `netns`.
    RouteAdd {
        v6: bool,
        route: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
    },
    /// `conntrack -D -d DESTINATION`.
    ConntrackDelete { destination: String },
}

impl FixAction {
    /// The exact command line.
    pub fn argv(&self) -> Vec<String> {
        let s = |x: &str| x.to_string();
        match self {
            FixAction::IptablesInsert {
                backend,
                family,
                table,
                chain,
                position,
                args,
                ..
            } => {
                let prog = match (backend, family.as_str()) {
                    (Backend::Legacy, "ip6") => "ip6tables-legacy",
                    (Backend::Legacy, _) => "iptables-legacy",
                    (_, "ip6") => "ip6tables-nft",
                    _ => "iptables-nft",
                };
                let mut v = vec![
                    s(prog),
                    s("-w"),
                    s("-t"),
                    table.clone(),
                    s("-I"),
                    chain.clone(),
                    position.to_string(),
                ];
                v.extend(args.iter().cloned());
                v
            }
            FixAction::NftInsert {
                family,
                table,
                chain,
                before_handle,
                rule,
                ..
            } => {
                let mut v = match before_handle {
                    Some(_) => vec![s("nft"), s("insert"), s("rule")],
                    None => vec![s("nft"), s("add"), s("rule")],
                };
                v.extend([family.clone(), table.clone(), chain.clone()]);
                if let Some(h) = before_handle {
                    v.extend([s("position"), h.to_string()]);
                }
                v.push(rule.clone());
                v
            }
            FixAction::Sysctl { key, value } => {
                vec![s("sysctl"), s("-w"), format!("{key}={value}")]
            }
            FixAction::AddrAdd { addr, dev } => vec![
                s("ip"),
                s("addr"),
                s("add"),
                addr.clone(),
                s("dev"),
                dev.clone(),
            ],
            FixAction::RouteAdd { v6, route, .. } => {
                let mut v = vec![s("ip")];
                if *v6 {
                    v.push(s("-6"));
                }
                v.extend([s("route"), s("add")]);
                v.extend(route.split_whitespace().map(str::to_string));
                v
            }
            FixAction::ConntrackDelete { destination } => {
                vec![s("conntrack"), s("-D"), s("-d"), destination.clone()]
            }
        }
    }

    /// The namespace the action runs in (`None`: the host's).
    pub fn netns(&self) -> Option<&str> {
        match self {
            FixAction::IptablesInsert { netns, .. }
            | FixAction::NftInsert { netns, .. }
            | FixAction::RouteAdd { netns, .. } => netns.as_deref(),
            _ => None,
        }
    }

    /// A shell line (for display).
    pub fn shell(&self) -> String {
        let cmd = self
            .argv()
            .iter()
            .map(|a| {
                if a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@".contains(c))
                {
                    a.clone()
                } else {
                    format!("'{}'", a.replace('\'', "'\\''"))
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        match self.netns() {
            Some(ns) => format!("nsenter --net={ns} {cmd}"),
            None => cmd,
        }
    }
}

/// How to repair a finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fix {
    pub summary: String,
    /// What `--fix` applies, in order.
    pub actions: Vec<FixAction>,
    /// The same, as shell lines.
    pub commands: Vec<String>,
    /// Steps only an operator can take.
    pub manual: Vec<String>,
    /// Why `--fix` will not act (ambiguous), if so.
    pub refused: Option<String>,
    /// The fix that lasts.
    pub durable: String,
}

impl Fix {
    /// A fix that `--fix` applies as `actions` (shown as shell lines).
    pub(super) fn new(
        summary: impl Into<String>,
        actions: Vec<FixAction>,
        durable: impl Into<String>,
    ) -> Fix {
        let commands = actions.iter().map(FixAction::shell).collect();
        Fix {
            summary: summary.into(),
            actions,
            commands,
            manual: Vec::new(),
            refused: None,
            durable: durable.into(),
        }
    }

    /// Adds a step only an operator can take.
    pub(super) fn manual(mut self, m: impl Into<String>) -> Fix {
        self.manual.push(m.into());
        self
    }

    /// `--fix` will not act, for `why`: the actions are dropped.
    pub(super) fn refuse(mut self, why: impl Into<String>) -> Fix {
        self.refused = Some(why.into());
        self.actions.clear();
        self.commands.clear();
        self
    }
}
