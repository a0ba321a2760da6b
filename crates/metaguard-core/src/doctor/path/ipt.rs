//! The iptables dialect of the evaluator (both backends, legacy and nft).
//!
//! Owns: the built-in tables' base chains and their fixed priorities
//! (raw -300, mangle -150, nat -100 / 100, filter 0, security 50), and
//! judging one `iptables-save` rule against a packet — its matches in
//! three-valued logic ([`Truth`]), its target as a [`RuleOutcome`]. The
//! walk itself (jumps, NAT rewrites, policies) is `walk`'s.

use std::net::IpAddr;

use super::super::iptables_save::{Chain, Cond, Save, Table, Target};
use super::model::{Backend, Hook, Packet, RuleRef, Truth};
use super::walk::{BaseChain, BaseRules, Netns, RuleDialect, RuleOutcome};

/// The built-in tables, in the order their base chains are listed.
const TABLES: [&str; 5] = ["raw", "mangle", "nat", "filter", "security"];

/// The priority of `table`'s built-in chain at `hook`, if it has one.
fn priority(table: &str, hook: Hook) -> Option<i32> {
    use Hook::*;
    Some(match (table, hook) {
        ("raw", Prerouting | Output) => -300,
        ("mangle", Prerouting | Input | Forward | Output | Postrouting) => -150,
        ("nat", Prerouting | Output) => -100,
        ("nat", Input | Postrouting) => 100,
        ("filter", Input | Forward | Output) => 0,
        ("security", Input | Forward | Output) => 50,
        _ => return None,
    })
}

/// The built-in chain's name at `hook` (`PREROUTING`, …).
fn builtin_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Prerouting => "PREROUTING",
        Hook::Input => "INPUT",
        Hook::Forward => "FORWARD",
        Hook::Output => "OUTPUT",
        Hook::Postrouting => "POSTROUTING",
        Hook::Routing => "",
    }
}

/// The base chains `save` has at `hook`, in table order.
pub(super) fn base_chains(
    save: &Save,
    backend: Backend,
    hook: Hook,
) -> impl Iterator<Item = BaseChain<'_>> {
    TABLES.into_iter().filter_map(move |tname| {
        let (table, prio) = (save.table(tname)?, priority(tname, hook)?);
        let chain = table.chain(builtin_name(hook))?;
        Some(BaseChain {
            prio,
            nat: tname == "nat",
            rules: BaseRules::Iptables {
                table,
                chain,
                backend,
            },
        })
    })
}

/// One iptables table at one hook, as the walker sees it.
#[derive(Debug)]
pub(super) struct IptRules<'n, 'a> {
    ns: &'n Netns<'a>,
    table: &'a Table,
    backend: Backend,
    hook: Hook,
}

impl<'n, 'a> IptRules<'n, 'a> {
    pub(super) fn new(ns: &'n Netns<'a>, table: &'a Table, backend: Backend, hook: Hook) -> Self {
        IptRules {
            ns,
            table,
            backend,
            hook,
        }
    }

    /// Whether one condition holds for `p`.
    fn cond(&self, cond: &Cond, p: &Packet) -> Truth {
        match cond {
            Cond::Src(c) => c.contains(p.src).into(),
            Cond::Dst(c) => c.contains(p.dst).into(),
            Cond::InIface(pat) => p.iif.as_deref().is_some_and(|i| pat.matches(i)).into(),
            Cond::OutIface(pat) => p.oif.as_deref().is_some_and(|o| pat.matches(o)).into(),
            Cond::Proto(pr) => matches!(pr.as_str(), "tcp" | "6" | "all" | "0").into(),
            Cond::Dport(ports) => ports.contains(p.dport).into(),
            Cond::Sport(ports) => ports.contains(p.sport).into(),
            Cond::AnyPort(ports) => (ports.contains(p.dport) || ports.contains(p.sport)).into(),
            Cond::SrcType(types) => self.addrtype(types, p.src),
            Cond::DstType(types) => self.addrtype(types, p.dst),
            Cond::CtState(states) => states.iter().fold(Truth::No, |any, s| {
                any.or(match s.as_str() {
                    "NEW" => p.new.into(),
                    "ESTABLISHED" => (!p.new).into(),
                    "RELATED" | "INVALID" | "UNTRACKED" | "SNAT" => Truth::No,
                    "DNAT" => p.dnat.into(),
                    _ => Truth::Maybe,
                })
            }),
            Cond::CtStatus(st) => {
                if st.iter().all(|s| s == "NONE") {
                    p.new.into()
                } else if st
                    .iter()
                    .all(|s| s == "CONFIRMED" || s == "SEEN_REPLY" || s == "ASSURED")
                {
                    (!p.new).into()
                } else {
                    Truth::Maybe
                }
            }
            Cond::Opaque(_) => Truth::Maybe,
        }
    }

    /// `-m addrtype`: whether `ip` is of any of `types`.
    fn addrtype(&self, types: &[String], ip: IpAddr) -> Truth {
        let mut any = Truth::No;
        for t in types {
            let r = match t.as_str() {
                "LOCAL" => self.ns.is_local(ip).into(),
                "UNICAST" => (!ip.is_multicast()).into(),
                "MULTICAST" => ip.is_multicast().into(),
                "BROADCAST" | "ANYCAST" | "BLACKHOLE" | "UNREACHABLE" | "PROHIBIT" | "NAT"
                | "XRESOLVE" | "THROW" => Truth::No,
                _ => Truth::Maybe,
            };
            if r == Truth::Yes {
                return Truth::Yes;
            }
            any = any.or(r);
        }
        any
    }
}

impl<'a> RuleDialect for IptRules<'_, 'a> {
    type Chain = &'a Chain;

    fn rule_count(&self, chain: &'a Chain) -> usize {
        chain.rules.len()
    }

    fn judge(
        &self,
        chain: &'a Chain,
        idx: usize,
        p: &Packet,
        _depth: usize,
    ) -> RuleOutcome<&'a Chain> {
        let r = &chain.rules[idx];
        let mut m = Truth::Yes;
        for mt in &r.matches {
            let x = self.cond(&mt.cond, p);
            m = m.and(if mt.neg { !x } else { x });
            if m == Truth::No {
                break;
            }
        }
        match m {
            Truth::No => return RuleOutcome::Next,
            Truth::Maybe => {
                return RuleOutcome::Unsure {
                    listed: !matches!(r.target, Target::None | Target::Other(_)),
                }
            }
            Truth::Yes => {}
        }
        let nat_table = self.table.name == "nat";
        match &r.target {
            Target::Accept | Target::SourceNat(_) => RuleOutcome::Accept,
            Target::Drop => RuleOutcome::Drop,
            Target::Reject(_) => RuleOutcome::Reject,
            Target::Return => RuleOutcome::Return,
            Target::Jump(j) => self
                .table
                .chain(j)
                .map_or(RuleOutcome::Next, RuleOutcome::Jump),
            Target::Goto(j) => self
                .table
                .chain(j)
                .map_or(RuleOutcome::Next, RuleOutcome::Goto),
            Target::Dnat { addr, port } if nat_table => RuleOutcome::Dnat {
                addr: *addr,
                port: *port,
            },
            Target::Redirect { port } if nat_table => RuleOutcome::Redirect { port: *port },
            Target::Dnat { .. } | Target::Redirect { .. } | Target::None | Target::Other(_) => {
                RuleOutcome::Next
            }
        }
    }

    fn policy_drops(&self, chain: &'a Chain) -> bool {
        chain.policy.as_deref() == Some("DROP")
    }

    fn rule_ref(&self, chain: &'a Chain, idx: Option<usize>, v6: bool) -> RuleRef {
        RuleRef {
            backend: self.backend,
            family: if v6 { "ip6".into() } else { "ip".into() },
            table: self.table.name.clone(),
            chain: chain.name.clone(),
            hook: self.hook,
            position: idx.map(|i| i + 1),
            handle: None,
            rule: match idx {
                Some(i) => chain.rules[i].text.clone(),
                None => format!("policy {}", chain.policy.as_deref().unwrap_or("ACCEPT")),
            },
            netns: self.ns.label.clone(),
            args: idx.map(|i| chain.rules[i].args.clone()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests;
