//! The evaluator skeleton both rule languages share.
//!
//! Owns: which base chains run at a hook and in what order (both iptables
//! backends and every nft table of the packet's family, by priority), what
//! a base chain's end means for the packet (a drop or reject is final, an
//! accept ends only that chain), and the walk of one chain — rule by rule,
//! jumps, gotos, returns, NAT rewrites, the recursion limit — over any
//! [`RuleDialect`].
//!
//! A dialect (`ipt` for iptables-save rules, `nft` for nft JSON) only
//! judges one rule against the packet and names rules; it never walks.
//! Routing and the order of hooks belong to `route`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::super::iptables_save::{Chain as IptChain, Save, Table as IptTable};
use super::super::nft::{Chain as NftChain, Table as NftTable};
use super::super::snapshot::NetState;
use super::ipt::{self, IptRules};
use super::model::{sockaddr, Backend, Hook, Packet, RuleRef, Step, Trace, Verdict};
use super::nft::{self as nft_eval, NftRules};

/// How deep jumps may nest before a chain is taken to fall through (a
/// guard against loops the parsers let through).
const MAX_JUMP_DEPTH: usize = 64;

/// One network namespace to evaluate in: its state, and its label for
/// rules that do not live on the host.
#[derive(Debug)]
pub(super) struct Netns<'a> {
    pub(super) state: &'a NetState,
    /// The namespace's name or path (`None`: the host).
    pub(super) label: Option<String>,
}

/// How the walk of a chain ended.
#[derive(Debug, Clone)]
pub(super) enum ChainEnd {
    /// Fell off the end (or RETURN).
    Fallthrough,
    Accept(RuleRef),
    Drop(RuleRef),
    Reject(RuleRef),
}

/// What one rule does to the packet, as its dialect judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RuleOutcome<C> {
    /// The rule does not match, or matches without a verdict: next rule.
    Next,
    /// The rule may match; the evaluator cannot tell. It is assumed not to
    /// match, and listed in the flow's `assumed_not_matching` when
    /// `listed` (it would have decided something).
    Unsure {
        listed: bool,
    },
    /// Accept (also SNAT/MASQUERADE, which end the nat chain).
    Accept,
    Drop,
    Reject,
    /// RETURN: the chain falls through to its caller.
    Return,
    /// Walk `C`; its fall-through continues with the next rule.
    Jump(C),
    /// Walk `C` instead of the rest of this chain.
    Goto(C),
    /// DNAT to `addr` (kept when `None`) and `port` (kept when `None`).
    Dnat {
        addr: Option<IpAddr>,
        port: Option<u16>,
    },
    /// REDIRECT to the namespace's own address, and `port` if given.
    Redirect {
        port: Option<u16>,
    },
}

/// One rule language as the walker sees it: chains of rules, each rule
/// judged against the packet to a [`RuleOutcome`].
pub(super) trait RuleDialect {
    /// A chain of this language (a reference into the ruleset).
    type Chain: Copy;

    /// How many rules `chain` holds.
    fn rule_count(&self, chain: Self::Chain) -> usize;

    /// What rule `idx` of `chain` does to `p`. `depth` is the jump depth
    /// (0 in the base chain).
    fn judge(
        &self,
        chain: Self::Chain,
        idx: usize,
        p: &Packet,
        depth: usize,
    ) -> RuleOutcome<Self::Chain>;

    /// Whether `chain`'s policy drops what falls off its end.
    fn policy_drops(&self, chain: Self::Chain) -> bool;

    /// The reference of rule `idx` of `chain`, or of its policy (`None`);
    /// `v6` is the packet's family when the rule was met.
    fn rule_ref(&self, chain: Self::Chain, idx: Option<usize>, v6: bool) -> RuleRef;
}

/// Where a base chain's rules come from.
#[derive(Debug, Clone, Copy)]
pub(super) enum BaseRules<'a> {
    /// A built-in chain of an iptables-save file.
    Iptables {
        table: &'a IptTable,
        chain: &'a IptChain,
        backend: Backend,
    },
    /// A base chain of an nft table.
    Nft {
        table: &'a NftTable,
        chain: &'a NftChain,
    },
}

/// A base chain at a hook.
#[derive(Debug)]
pub(super) struct BaseChain<'a> {
    /// Its priority (lower runs first).
    pub(super) prio: i32,
    /// A NAT chain: sees only the first packet of a connection.
    pub(super) nat: bool,
    pub(super) rules: BaseRules<'a>,
}

impl<'a> Netns<'a> {
    /// The host's namespace.
    pub(super) fn host(state: &'a NetState) -> Netns<'a> {
        Netns { state, label: None }
    }

    /// The iptables save files of one family, with their backend.
    fn saves(&self, v6: bool) -> [(Option<&'a Save>, Backend); 2] {
        if v6 {
            [
                (self.state.legacy6.as_ref(), Backend::Legacy),
                (self.state.iptnft6.as_ref(), Backend::IptablesNft),
            ]
        } else {
            [
                (self.state.legacy4.as_ref(), Backend::Legacy),
                (self.state.iptnft4.as_ref(), Backend::IptablesNft),
            ]
        }
    }

    /// Whether nft table (family, name) is iptables-nft's, evaluated through the save file.
    fn owned_by_iptables_nft(&self, family: &str, name: &str) -> bool {
        let save = match family {
            "ip" => self.state.iptnft4.as_ref(),
            "ip6" => self.state.iptnft6.as_ref(),
            _ => None,
        };
        save.is_some_and(|s| s.table(name).is_some())
    }

    /// The nft tables of the packet's family evaluated directly (not
    /// through iptables-nft).
    fn direct_nft_tables(&self, v6: bool) -> impl Iterator<Item = &'a NftTable> + '_ {
        self.state
            .nft
            .iter()
            .flat_map(|rs| &rs.tables)
            .filter(move |t| match t.family.as_str() {
                "inet" => true,
                "ip" => !v6,
                "ip6" => v6,
                _ => false,
            })
            .filter(|t| !self.owned_by_iptables_nft(&t.family, &t.name))
    }

    /// Every base chain at `hook`, in the order the kernel runs them.
    fn base_chains(&self, hook: Hook, v6: bool) -> Vec<BaseChain<'a>> {
        let mut out = Vec::new();
        for (save, backend) in self.saves(v6) {
            if let Some(save) = save {
                out.extend(ipt::base_chains(save, backend, hook));
            }
        }
        for t in self.direct_nft_tables(v6) {
            out.extend(nft_eval::base_chains(t, hook));
        }
        // Stable: equal priorities keep iptables first, then nft in order.
        out.sort_by_key(|b| b.prio);
        out
    }

    /// Runs every base chain at `hook`. `Some(verdict, decider)` when the
    /// packet is stopped.
    pub(super) fn hook(
        &self,
        hook: Hook,
        p: &mut Packet,
        tr: &mut Trace,
    ) -> Option<(Verdict, RuleRef)> {
        let bases = self.base_chains(hook, p.v6());
        for (i, b) in bases.iter().enumerate() {
            if let Some(stop) = self.run_base(b, hook, p, tr) {
                // The other base chains at this hook still run in the
                // kernel's view of "an accept elsewhere": record their
                // explicit accepts (F3), on a copy of the packet.
                for rest in &bases[i + 1..] {
                    let mut q = p.clone();
                    let mut t2 = Trace::default();
                    let _ = self.run_base(rest, hook, &mut q, &mut t2);
                    tr.steps
                        .extend(t2.steps.into_iter().filter(|s| s.action == "accept"));
                }
                return Some(stop);
            }
        }
        None
    }

    /// Runs one base chain: `Some` when it stops the packet; an accept is
    /// recorded as a step and lets the packet on.
    fn run_base(
        &self,
        b: &BaseChain<'a>,
        hook: Hook,
        p: &mut Packet,
        tr: &mut Trace,
    ) -> Option<(Verdict, RuleRef)> {
        if b.nat && (!p.new || p.no_nat) {
            return None;
        }
        let end = match b.rules {
            BaseRules::Iptables {
                table,
                chain,
                backend,
            } => self.run_chain(&IptRules::new(self, table, backend, hook), chain, p, tr),
            BaseRules::Nft { table, chain } => {
                self.run_chain(&NftRules::new(self, table, hook), chain, p, tr)
            }
        };
        match end {
            ChainEnd::Drop(r) => return Some((Verdict::TimesOut, r)),
            ChainEnd::Reject(r) => return Some((Verdict::Blocked, r)),
            ChainEnd::Accept(r) => {
                if !tr.steps.iter().any(|s| s.rule == r) {
                    tr.steps.push(Step {
                        action: "accept".into(),
                        rule: r,
                    });
                }
            }
            ChainEnd::Fallthrough => {}
        }
        None
    }

    /// Walks a base chain, then applies its policy to a fall-through.
    pub(super) fn run_chain<D: RuleDialect>(
        &self,
        d: &D,
        chain: D::Chain,
        p: &mut Packet,
        tr: &mut Trace,
    ) -> ChainEnd {
        match self.walk(d, chain, p, tr, 0) {
            ChainEnd::Fallthrough if d.policy_drops(chain) => {
                ChainEnd::Drop(d.rule_ref(chain, None, p.v6()))
            }
            other => other,
        }
    }

    /// Walks `chain` rule by rule: the one control flow of every dialect.
    pub(super) fn walk<D: RuleDialect>(
        &self,
        d: &D,
        chain: D::Chain,
        p: &mut Packet,
        tr: &mut Trace,
        depth: usize,
    ) -> ChainEnd {
        if depth > MAX_JUMP_DEPTH {
            return ChainEnd::Fallthrough;
        }
        for idx in 0..d.rule_count(chain) {
            let outcome = d.judge(chain, idx, p, depth);
            // Named with the family the packet had when the rule met it.
            let v6 = p.v6();
            let rule = || d.rule_ref(chain, Some(idx), v6);
            match outcome {
                RuleOutcome::Next => {}
                RuleOutcome::Unsure { listed } => {
                    if listed {
                        tr.uncertain.push(rule());
                    }
                }
                RuleOutcome::Accept => return ChainEnd::Accept(rule()),
                RuleOutcome::Drop => return ChainEnd::Drop(rule()),
                RuleOutcome::Reject => return ChainEnd::Reject(rule()),
                RuleOutcome::Return => return ChainEnd::Fallthrough,
                RuleOutcome::Jump(callee) => match self.walk(d, callee, p, tr, depth + 1) {
                    ChainEnd::Fallthrough => {}
                    other => return other,
                },
                RuleOutcome::Goto(callee) => return self.walk(d, callee, p, tr, depth + 1),
                RuleOutcome::Dnat { addr, port } => {
                    if let Some(a) = addr {
                        p.dst = a;
                    }
                    return self.rewritten(p, port, "dnat", rule(), tr);
                }
                RuleOutcome::Redirect { port } => {
                    p.dst = self.redirect_addr(p);
                    return self.rewritten(p, port, "redirect", rule(), tr);
                }
            }
        }
        ChainEnd::Fallthrough
    }

    /// Finishes a DNAT/REDIRECT (`what`) by `rule`: the port, the
    /// conntrack status, the step; the nat chain accepts.
    fn rewritten(
        &self,
        p: &mut Packet,
        port: Option<u16>,
        what: &str,
        rule: RuleRef,
        tr: &mut Trace,
    ) -> ChainEnd {
        if let Some(pt) = port {
            p.dport = pt;
        }
        p.dnat = true;
        tr.steps.push(Step {
            action: format!("{what} to {}", sockaddr(p.dst, p.dport)),
            rule: rule.clone(),
        });
        ChainEnd::Accept(rule)
    }

    /// REDIRECT: loopback for local packets, else the incoming interface's
    /// first address.
    fn redirect_addr(&self, p: &Packet) -> IpAddr {
        let lo = if p.v6() {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        };
        match &p.iif {
            None => lo,
            Some(i) => self
                .state
                .addrs
                .iter()
                .find(|a| &a.ifname == i && a.addr.is_ipv6() == p.v6())
                .map_or(lo, |a| a.addr),
        }
    }
}

/// Names of every nft table evaluated directly (not through iptables-nft).
pub fn nft_tables(st: &NetState) -> BTreeSet<(String, String)> {
    let ns = Netns::host(st);
    st.nft
        .iter()
        .flat_map(|rs| &rs.tables)
        .filter(|t| !ns.owned_by_iptables_nft(&t.family, &t.name))
        .map(|t| (t.family.clone(), t.name.clone()))
        .collect()
}

#[cfg(test)]
mod tests;
