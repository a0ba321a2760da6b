//! Packet-path evaluation: what happens to the first packet of a
//! connection from each workload to each metadata endpoint.
//!
//! # The flow model
//!
//! Sources (present when the snapshot shows them):
//! * **bridge container** — one per bridge (`docker0`, `br-*`; every
//!   bridge but `ecs-bridge`): the packet enters the host on the bridge
//!   from the bridge's first free address (gateway + 1).
//! * **awsvpc task** — credentials: enters the host on `ecs-bridge` from
//!   the task's `ecs-eth0` address; IMDS: leaves through the task's own ENI
//!   *inside the task namespace* and never crosses the host (F6), so it is
//!   evaluated in the task namespace's snapshot (`tasks/…`) if there is
//!   one, else judged by `ECS_AWSVPC_BLOCK_IMDS` in ecs.config.
//! * **host-network process**, **agent** — locally generated on the host,
//!   from the cgroup of a host-network container / the ECS agent.
//!
//! Targets: IMDS v4 and v6 (remote: the packet must leave the host) and
//! task credentials (169.254.170.2:80, served on the host by the agent —
//! ecs-init DNATs bridges to 127.0.0.1:51679 and REDIRECTs host callers).
//!
//! # The hooks
//!
//! Forwarded or delivered: prerouting → routing decision → input (local)
//! or forward → postrouting. Locally generated: output → postrouting →
//! (local destination) prerouting without NAT → input on `lo`.
//!
//! At each hook every base chain of *both* iptables backends (legacy and
//! nft, built-in chains at their fixed priorities: raw -300, mangle -150,
//! nat -100 (prerouting, output) / 100, filter 0, security 50) and of every
//! nft table of the packet's family (`ip`/`ip6`/`inet`) runs in priority
//! order. A drop or reject in any of them is final; an accept only ends
//! that base chain. NAT chains see only the first packet of a connection.
//! DNAT/REDIRECT change the destination for everything after them. The
//! nft tables that iptables-nft manages (`ip`/`ip6` `filter`, `nat`, …,
//! listed in the iptables-nft-save output) are evaluated once, through
//! that output, because their nft JSON holds opaque `xt` expressions.
//!
//! Routing: a destination is local when it is an address of the host (or
//! 127/8, ::1). A packet to 127/8 that arrived on another interface than
//! `lo` is a martian unless `route_localnet` is 1 (all or that interface):
//! it vanishes (F1). Forwarding needs `ip_forward` / `forwarding` = 1. The
//! route lookup is longest-prefix over the main table; blackhole,
//! unreachable and prohibit routes fail the connection at once.
//!
//! # Uncertainty
//!
//! Matches the evaluator does not understand (opaque iptables matches,
//! unknown nft expressions) never decide: the rule is assumed not to
//! match, and the flow lists it in `assumed_not_matching`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;
use serde_json::Value;

use super::iptables_save::{self as ipt, Cond, Save, Target as IptTarget};
use super::nft;
use super::snapshot::{NetState, Route, Snapshot};
use crate::config::{Action, NetnsSelector, Selector};

/// Which program's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Backend {
    #[serde(rename = "iptables-legacy")]
    Legacy,
    #[serde(rename = "iptables-nft")]
    IptablesNft,
    #[serde(rename = "nft")]
    Nft,
    /// A kernel decision (martian, routing, sysctl) or an agent setting.
    #[serde(rename = "kernel")]
    Kernel,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy",
            Backend::IptablesNft => "iptables-nft",
            Backend::Nft => "nft",
            Backend::Kernel => "kernel",
        }
    }
}

/// A netfilter hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
    /// Routing decision (not a hook; for kernel deciders).
    Routing,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
            Hook::Routing => "routing",
        }
    }
}

/// A rule (or a kernel decision) that a flow met.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    pub backend: Backend,
    /// `ip`, `ip6`, `inet` (empty for kernel decisions).
    pub family: String,
    pub table: String,
    pub chain: String,
    pub hook: Hook,
    /// 1-based position in the chain (iptables).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    /// Rule handle (nft).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
    /// The rule as text (`-A INPUT …`, nft syntax, or a sentence).
    pub rule: String,
    /// The namespace the rule lives in, when not the host's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// iptables: the arguments after `-A CHAIN` (to copy the rule).
    #[serde(skip)]
    pub args: Vec<String>,
}

impl RuleRef {
    /// `iptables-nft ip filter INPUT #1: -A INPUT …`.
    pub fn describe(&self) -> String {
        if self.backend == Backend::Kernel {
            return format!("kernel ({}): {}", self.hook.as_str(), self.rule);
        }
        let pos = match (self.position, self.handle) {
            (Some(p), _) => format!(" #{p}"),
            (None, Some(h)) => format!(" handle {h}"),
            _ => String::new(),
        };
        let ns = self
            .netns
            .as_ref()
            .map(|n| format!(" [netns {n}]"))
            .unwrap_or_default();
        format!(
            "{} {} {} {}{pos}{ns}: {}",
            self.backend.as_str(),
            self.family,
            self.table,
            self.chain,
            self.rule
        )
    }

    fn kernel(hook: Hook, what: String) -> RuleRef {
        RuleRef {
            backend: Backend::Kernel,
            family: String::new(),
            table: String::new(),
            chain: String::new(),
            hook,
            position: None,
            handle: None,
            rule: what,
            netns: None,
            args: Vec::new(),
        }
    }
}

/// Who sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    BridgeContainer,
    AwsvpcTask,
    HostNetwork,
    Agent,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::BridgeContainer => "bridge container",
            Source::AwsvpcTask => "awsvpc task",
            Source::HostNetwork => "host-network process",
            Source::Agent => "ECS agent",
        }
    }
}

/// Which endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    ImdsV4,
    ImdsV6,
    TaskCredentials,
}

impl TargetKind {
    pub const ALL: [TargetKind; 3] = [
        TargetKind::ImdsV4,
        TargetKind::ImdsV6,
        TargetKind::TaskCredentials,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TargetKind::ImdsV4 => "IMDS v4",
            TargetKind::ImdsV6 => "IMDS v6",
            TargetKind::TaskCredentials => "task credentials",
        }
    }
}

/// What happens to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The endpoint gets the packet.
    Reaches,
    /// Refused at once (reject, unreachable/blackhole route).
    Blocked,
    /// Silently dropped: the client waits for its timeout.
    TimesOut,
    /// The source cannot send this at all (no address of that family).
    NotApplicable,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Reaches => "reaches",
            Verdict::Blocked => "blocked",
            Verdict::TimesOut => "times out",
            Verdict::NotApplicable => "n/a",
        }
    }

    pub fn reaches(self) -> bool {
        self == Verdict::Reaches
    }

    pub fn stopped(self) -> bool {
        matches!(self, Verdict::Blocked | Verdict::TimesOut)
    }
}

/// What the configuration wants for a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Reach,
    Block,
}

/// One step of note along the path (NAT, accepts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub action: String,
    pub rule: RuleRef,
}

/// The evaluation of one (source, target) pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flow {
    pub source: Source,
    /// The interface the packet enters on (bridges, ecs-bridge).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    pub target: TargetKind,
    /// Destination as the workload asks for it (`169.254.169.254:80`).
    pub destination: String,
    pub verdict: Verdict,
    /// What the configuration wants (`None`: untouched).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<Expect>,
    /// The rule or kernel decision that decides (a drop, reject or
    /// martian; for `reaches`, the last explicit accept, if any).
    pub decided_by: Option<RuleRef>,
    /// NAT and explicit accepts met on the way.
    pub steps: Vec<Step>,
    /// Rules with matches the evaluator cannot judge, assumed not to match.
    pub assumed_not_matching: Vec<RuleRef>,
    /// Address the packet finally went to (after DNAT).
    pub delivered_to: Option<String>,
    /// For IMDS flows: the verdict of an already-established connection.
    #[serde(skip)]
    pub established: Option<(Verdict, Option<RuleRef>)>,
    /// Free-text remarks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Flow {
    pub fn name(&self) -> String {
        match &self.interface {
            Some(i) => format!("{} ({i}) → {}", self.source.label(), self.target.label()),
            None => format!("{} → {}", self.source.label(), self.target.label()),
        }
    }
}

/// The endpoints and ports the flows go to (from the config).
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub imds4: Ipv4Addr,
    pub imds6: Ipv6Addr,
    pub creds: Ipv4Addr,
    pub agent_port: u16,
}

impl Endpoints {
    pub fn of(snap: &Snapshot) -> Endpoints {
        let c = &snap.config;
        let v4 = |l: &[IpAddr], d: Ipv4Addr| {
            l.iter()
                .find_map(|a| match a {
                    IpAddr::V4(v) => Some(*v),
                    IpAddr::V6(_) => None,
                })
                .unwrap_or(d)
        };
        Endpoints {
            imds4: v4(&c.endpoints.imds, Ipv4Addr::new(169, 254, 169, 254)),
            imds6: c
                .endpoints
                .imds
                .iter()
                .find_map(|a| match a {
                    IpAddr::V6(v) => Some(*v),
                    IpAddr::V4(_) => None,
                })
                .unwrap_or(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
            creds: v4(&c.endpoints.task_metadata, Ipv4Addr::new(169, 254, 170, 2)),
            agent_port: c.agent_credentials.port(),
        }
    }
}

/// A packet on its way.
#[derive(Debug, Clone)]
struct Packet {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    orig_dst: IpAddr,
    orig_dport: u16,
    iif: Option<String>,
    oif: Option<String>,
    /// First packet of a connection (ct state new); else established.
    new: bool,
    dnat: bool,
    cgroup: Option<String>,
    /// Loopback re-entry of a locally generated packet: no NAT.
    no_nat: bool,
}

impl Packet {
    fn v6(&self) -> bool {
        self.dst.is_ipv6()
    }
}

/// Three-valued match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tri {
    Yes,
    No,
    Maybe,
}

fn tri(b: bool) -> Tri {
    if b {
        Tri::Yes
    } else {
        Tri::No
    }
}

fn and(a: Tri, b: Tri) -> Tri {
    match (a, b) {
        (Tri::No, _) | (_, Tri::No) => Tri::No,
        (Tri::Maybe, _) | (_, Tri::Maybe) => Tri::Maybe,
        _ => Tri::Yes,
    }
}

fn not(a: Tri) -> Tri {
    match a {
        Tri::Yes => Tri::No,
        Tri::No => Tri::Yes,
        Tri::Maybe => Tri::Maybe,
    }
}

/// How a chain ended.
#[derive(Debug, Clone)]
enum Res {
    /// Fell off the end (or RETURN).
    Fallthrough,
    Accept(RuleRef),
    Drop(RuleRef),
    Reject(RuleRef),
}

/// What the path collects.
#[derive(Debug, Default)]
struct Trace {
    steps: Vec<Step>,
    uncertain: Vec<RuleRef>,
}

/// One namespace to evaluate in.
struct Ns<'a> {
    st: &'a NetState,
    label: Option<String>,
}

#[derive(Clone, Copy)]
enum BaseSrc<'a> {
    Ipt(&'a ipt::Table, &'a ipt::Chain, Backend),
    Nft(&'a nft::Table, &'a nft::Chain),
}

struct Base<'a> {
    prio: i32,
    nat: bool,
    src: BaseSrc<'a>,
}

const IPT_TABLES: [&str; 5] = ["raw", "mangle", "nat", "filter", "security"];

fn ipt_prio(table: &str, hook: Hook) -> Option<i32> {
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

impl<'a> Ns<'a> {
    fn saves(&self, v6: bool) -> [(Option<&'a Save>, Backend); 2] {
        if v6 {
            [
                (self.st.legacy6.as_ref(), Backend::Legacy),
                (self.st.iptnft6.as_ref(), Backend::IptablesNft),
            ]
        } else {
            [
                (self.st.legacy4.as_ref(), Backend::Legacy),
                (self.st.iptnft4.as_ref(), Backend::IptablesNft),
            ]
        }
    }

    /// Whether nft table (family, name) is iptables-nft's, evaluated through the save file.
    fn owned_by_iptables_nft(&self, family: &str, name: &str) -> bool {
        let save = match family {
            "ip" => self.st.iptnft4.as_ref(),
            "ip6" => self.st.iptnft6.as_ref(),
            _ => None,
        };
        save.is_some_and(|s| s.table(name).is_some())
    }

    fn bases(&self, hook: Hook, v6: bool) -> Vec<Base<'a>> {
        let mut out = Vec::new();
        for (save, backend) in self.saves(v6) {
            let Some(save) = save else { continue };
            for tname in IPT_TABLES {
                let (Some(t), Some(prio)) = (save.table(tname), ipt_prio(tname, hook)) else {
                    continue;
                };
                if let Some(c) = t.chain(builtin_name(hook)) {
                    out.push(Base {
                        prio,
                        nat: tname == "nat",
                        src: BaseSrc::Ipt(t, c, backend),
                    });
                }
            }
        }
        if let Some(rs) = &self.st.nft {
            for t in &rs.tables {
                let fam_ok = match t.family.as_str() {
                    "inet" => true,
                    "ip" => !v6,
                    "ip6" => v6,
                    _ => false,
                };
                if !fam_ok || self.owned_by_iptables_nft(&t.family, &t.name) {
                    continue;
                }
                for c in &t.chains {
                    if c.hook.as_deref() == Some(hook.as_str()) {
                        out.push(Base {
                            prio: c.prio.unwrap_or(0),
                            nat: c.kind.as_deref() == Some("nat"),
                            src: BaseSrc::Nft(t, c),
                        });
                    }
                }
            }
        }
        out.sort_by_key(|b| b.prio);
        out
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v) if v.is_loopback() => true,
            IpAddr::V6(v) if v.is_loopback() => true,
            _ => self.st.addrs.iter().any(|a| a.addr == ip),
        }
    }

    fn sysctl(&self, key: &str) -> Option<&str> {
        self.st.sysctls.get(key).map(String::as_str)
    }

    fn route_localnet(&self, iface: &str) -> bool {
        let on = |k: String| self.sysctl(&k).is_some_and(|v| v == "1");
        on("net.ipv4.conf.all.route_localnet".into())
            || on(format!("net.ipv4.conf.{iface}.route_localnet"))
    }

    fn lookup(&self, dst: IpAddr) -> Option<&'a Route> {
        let routes = if dst.is_ipv6() {
            &self.st.routes6
        } else {
            &self.st.routes4
        };
        routes
            .iter()
            .filter(|r| r.dst.is_none_or(|c| c.contains(dst)))
            .max_by_key(|r| r.dst.map_or(0, |c| i32::from(c.len) + 1))
    }

    fn rref_ipt(
        &self,
        t: &ipt::Table,
        c: &ipt::Chain,
        backend: Backend,
        hook: Hook,
        idx: Option<usize>,
        v6: bool,
    ) -> RuleRef {
        RuleRef {
            backend,
            family: if v6 { "ip6".into() } else { "ip".into() },
            table: t.name.clone(),
            chain: c.name.clone(),
            hook,
            position: idx.map(|i| i + 1),
            handle: None,
            rule: match idx {
                Some(i) => c.rules[i].text.clone(),
                None => format!("policy {}", c.policy.as_deref().unwrap_or("ACCEPT")),
            },
            netns: self.label.clone(),
            args: idx.map(|i| c.rules[i].args.clone()).unwrap_or_default(),
        }
    }

    fn rref_nft(
        &self,
        t: &nft::Table,
        c: &nft::Chain,
        hook: Hook,
        rule: Option<&nft::Rule>,
    ) -> RuleRef {
        RuleRef {
            backend: Backend::Nft,
            family: t.family.clone(),
            table: t.name.clone(),
            chain: c.name.clone(),
            hook,
            position: None,
            handle: rule.and_then(|r| r.handle),
            rule: match rule {
                Some(r) => r.text(),
                None => format!("policy {}", c.policy.as_deref().unwrap_or("accept")),
            },
            netns: self.label.clone(),
            args: Vec::new(),
        }
    }

    // ---- iptables ----

    fn ipt_cond(&self, cond: &Cond, p: &Packet) -> Tri {
        match cond {
            Cond::Src(c) => tri(c.contains(p.src)),
            Cond::Dst(c) => tri(c.contains(p.dst)),
            Cond::InIface(pat) => tri(p.iif.as_deref().is_some_and(|i| pat.matches(i))),
            Cond::OutIface(pat) => tri(p.oif.as_deref().is_some_and(|o| pat.matches(o))),
            Cond::Proto(pr) => tri(matches!(pr.as_str(), "tcp" | "6" | "all" | "0")),
            Cond::Dport(ports) => tri(ports.contains(p.dport)),
            Cond::Sport(ports) => tri(ports.contains(p.sport)),
            Cond::AnyPort(ports) => tri(ports.contains(p.dport) || ports.contains(p.sport)),
            Cond::SrcType(types) => self.addrtype(types, p.src),
            Cond::DstType(types) => self.addrtype(types, p.dst),
            Cond::CtState(states) => {
                let mut any = Tri::No;
                for s in states {
                    let t = match s.as_str() {
                        "NEW" => tri(p.new),
                        "ESTABLISHED" => tri(!p.new),
                        "RELATED" | "INVALID" | "UNTRACKED" | "SNAT" => Tri::No,
                        "DNAT" => tri(p.dnat),
                        _ => Tri::Maybe,
                    };
                    any = match (any, t) {
                        (Tri::Yes, _) | (_, Tri::Yes) => Tri::Yes,
                        (Tri::Maybe, _) | (_, Tri::Maybe) => Tri::Maybe,
                        _ => Tri::No,
                    };
                }
                any
            }
            Cond::CtStatus(st) => {
                if st.iter().all(|s| s == "NONE") {
                    tri(p.new)
                } else if st
                    .iter()
                    .all(|s| s == "CONFIRMED" || s == "SEEN_REPLY" || s == "ASSURED")
                {
                    tri(!p.new)
                } else {
                    Tri::Maybe
                }
            }
            Cond::Opaque(_) => Tri::Maybe,
        }
    }

    fn addrtype(&self, types: &[String], ip: IpAddr) -> Tri {
        let mut any = Tri::No;
        for t in types {
            let r = match t.as_str() {
                "LOCAL" => tri(self.is_local(ip)),
                "UNICAST" => tri(!ip.is_multicast()),
                "MULTICAST" => tri(ip.is_multicast()),
                "BROADCAST" | "ANYCAST" | "BLACKHOLE" | "UNREACHABLE" | "PROHIBIT" | "NAT"
                | "XRESOLVE" | "THROW" => Tri::No,
                _ => Tri::Maybe,
            };
            if r == Tri::Yes {
                return Tri::Yes;
            }
            if r == Tri::Maybe {
                any = Tri::Maybe;
            }
        }
        any
    }

    #[allow(clippy::too_many_arguments)]
    fn eval_ipt(
        &self,
        t: &ipt::Table,
        c: &ipt::Chain,
        backend: Backend,
        hook: Hook,
        p: &mut Packet,
        tr: &mut Trace,
        depth: usize,
    ) -> Res {
        if depth > 64 {
            return Res::Fallthrough;
        }
        for (idx, r) in c.rules.iter().enumerate() {
            let mut m = Tri::Yes;
            for mt in &r.matches {
                let x = self.ipt_cond(&mt.cond, p);
                m = and(m, if mt.neg { not(x) } else { x });
                if m == Tri::No {
                    break;
                }
            }
            let v6 = p.v6();
            let rr = || self.rref_ipt(t, c, backend, hook, Some(idx), v6);
            match m {
                Tri::No => continue,
                Tri::Maybe => {
                    if !matches!(r.target, IptTarget::None | IptTarget::Other(_)) {
                        tr.uncertain.push(rr());
                    }
                    continue;
                }
                Tri::Yes => {}
            }
            match &r.target {
                IptTarget::Accept => return Res::Accept(rr()),
                IptTarget::Drop => return Res::Drop(rr()),
                IptTarget::Reject(_) => return Res::Reject(rr()),
                IptTarget::Return => return Res::Fallthrough,
                IptTarget::Jump(j) | IptTarget::Goto(j) => {
                    let Some(callee) = t.chain(j) else { continue };
                    match self.eval_ipt(t, callee, backend, hook, p, tr, depth + 1) {
                        Res::Fallthrough => {
                            if matches!(r.target, IptTarget::Goto(_)) {
                                return Res::Fallthrough;
                            }
                        }
                        other => return other,
                    }
                }
                IptTarget::Dnat { addr, port } => {
                    if t.name != "nat" {
                        continue;
                    }
                    if let Some(a) = addr {
                        p.dst = *a;
                    }
                    if let Some(pt) = port {
                        p.dport = *pt;
                    }
                    p.dnat = true;
                    tr.steps.push(Step {
                        action: format!("dnat to {}", sockaddr(p.dst, p.dport)),
                        rule: rr(),
                    });
                    return Res::Accept(rr());
                }
                IptTarget::Redirect { port } => {
                    if t.name != "nat" {
                        continue;
                    }
                    p.dst = self.redirect_addr(p);
                    if let Some(pt) = port {
                        p.dport = *pt;
                    }
                    p.dnat = true;
                    tr.steps.push(Step {
                        action: format!("redirect to {}", sockaddr(p.dst, p.dport)),
                        rule: rr(),
                    });
                    return Res::Accept(rr());
                }
                IptTarget::SourceNat(_) => return Res::Accept(rr()),
                IptTarget::None | IptTarget::Other(_) => {}
            }
        }
        Res::Fallthrough
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
                .st
                .addrs
                .iter()
                .find(|a| &a.ifname == i && a.addr.is_ipv6() == p.v6())
                .map_or(lo, |a| a.addr),
        }
    }

    // ---- nft ----

    fn nft_left(&self, left: &Value, p: &Packet, hook: Hook) -> PVal {
        let Some((k, b)) = left.as_object().and_then(|o| o.iter().next()) else {
            return PVal::Unknown;
        };
        let s = |key: &str| b.get(key).and_then(Value::as_str).unwrap_or("");
        match k.as_str() {
            "payload" => match (s("protocol"), s("field")) {
                ("ip", f) if !p.v6() => match f {
                    "daddr" => PVal::Addr(p.dst),
                    "saddr" => PVal::Addr(p.src),
                    "protocol" => PVal::Proto,
                    _ => PVal::Unknown,
                },
                ("ip6", f) if p.v6() => match f {
                    "daddr" => PVal::Addr(p.dst),
                    "saddr" => PVal::Addr(p.src),
                    "nexthdr" => PVal::Proto,
                    _ => PVal::Unknown,
                },
                ("ip", _) | ("ip6", _) => PVal::Absent,
                ("tcp" | "th", "dport") => PVal::Num(u64::from(p.dport)),
                ("tcp" | "th", "sport") => PVal::Num(u64::from(p.sport)),
                ("udp" | "icmp" | "icmpv6" | "sctp" | "udplite", _) => PVal::Absent,
                _ => PVal::Unknown,
            },
            "meta" => match s("key") {
                "l4proto" | "protocol" if s("key") == "l4proto" => PVal::Proto,
                "protocol" => PVal::Str(if p.v6() { "ip6".into() } else { "ip".into() }),
                "nfproto" => PVal::Str(if p.v6() { "ipv6".into() } else { "ipv4".into() }),
                "iifname" | "iif" => PVal::Str(p.iif.clone().unwrap_or_default()),
                "oifname" | "oif" => PVal::Str(p.oif.clone().unwrap_or_default()),
                _ => PVal::Unknown,
            },
            "ct" => match (s("key"), b.get("dir").and_then(Value::as_str)) {
                ("state", _) => PVal::Flags(vec![if p.new { "new" } else { "established" }]),
                ("status", _) => {
                    let mut f = Vec::new();
                    if p.dnat {
                        f.push("dnat");
                    }
                    if !p.new {
                        f.extend(["confirmed", "seen-reply", "assured"]);
                    }
                    PVal::Flags(f)
                }
                ("daddr" | "ip daddr" | "ip6 daddr", Some("original")) => PVal::Addr(p.orig_dst),
                ("proto-dst", Some("original")) => PVal::Num(u64::from(p.orig_dport)),
                ("daddr", Some("reply")) | ("saddr", Some("original")) => PVal::Unknown,
                _ => PVal::Unknown,
            },
            "socket" => match s("key") {
                "cgroupv2" if hook == Hook::Output => match &p.cgroup {
                    Some(c) => PVal::Cgroup(c.clone()),
                    None => PVal::Unknown,
                },
                "cgroupv2" => PVal::Absent,
                _ => PVal::Unknown,
            },
            _ => PVal::Unknown,
        }
    }

    fn nft_match(&self, t: &nft::Table, b: &Value, p: &Packet, hook: Hook) -> Tri {
        let Some(left) = b.get("left") else {
            return Tri::Maybe;
        };
        let Some(right) = b.get("right") else {
            return Tri::Maybe;
        };
        let lv = self.nft_left(left, p, hook);
        let op = b.get("op").and_then(Value::as_str).unwrap_or("==");
        if lv == PVal::Absent {
            // A match on a header the packet does not have never matches
            // (nft adds an implicit dependency), negated or not.
            return Tri::No;
        }
        let r = value_in(&lv, right, t);
        match op {
            "==" | "in" => r,
            "!=" => not(r),
            _ => Tri::Maybe,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn eval_nft(
        &self,
        t: &nft::Table,
        c: &nft::Chain,
        hook: Hook,
        p: &mut Packet,
        tr: &mut Trace,
        depth: usize,
    ) -> Res {
        if depth > 64 {
            return Res::Fallthrough;
        }
        'rules: for r in &c.rules {
            let rr = |p: &Packet| {
                let _ = p;
                self.rref_nft(t, c, hook, Some(r))
            };
            for e in &r.exprs {
                let Some((k, b)) = e.as_object().and_then(|o| o.iter().next()) else {
                    continue;
                };
                let verdict: Option<Value> = match k.as_str() {
                    "match" => match self.nft_match(t, b, p, hook) {
                        Tri::Yes => None,
                        Tri::No => continue 'rules,
                        Tri::Maybe => {
                            if rule_has_verdict(r) {
                                tr.uncertain.push(rr(p));
                            }
                            continue 'rules;
                        }
                    },
                    "accept" | "drop" | "return" | "continue" | "jump" | "goto" => Some(e.clone()),
                    "reject" => Some(serde_json::json!({"reject": null})),
                    "vmap" => {
                        let key = b
                            .get("key")
                            .map(|k| self.nft_left(k, p, hook))
                            .unwrap_or(PVal::Unknown);
                        if key == PVal::Absent {
                            continue 'rules;
                        }
                        match vmap_lookup(&key, b.get("data"), t) {
                            Lookup::Found(v) => Some(v),
                            Lookup::Missing => continue 'rules,
                            Lookup::Unknown => {
                                tr.uncertain.push(rr(p));
                                continue 'rules;
                            }
                        }
                    }
                    "dnat" | "redirect" => {
                        if c.kind.as_deref() != Some("nat") && depth == 0 {
                            continue;
                        }
                        if k == "dnat" {
                            match b
                                .get("addr")
                                .and_then(Value::as_str)
                                .and_then(|a| a.parse::<IpAddr>().ok())
                            {
                                Some(a) => p.dst = a,
                                None => {
                                    tr.uncertain.push(rr(p));
                                    continue 'rules;
                                }
                            }
                        } else {
                            p.dst = self.redirect_addr(p);
                        }
                        if let Some(pt) = b
                            .get("port")
                            .and_then(Value::as_u64)
                            .and_then(|x| u16::try_from(x).ok())
                        {
                            p.dport = pt;
                        }
                        p.dnat = true;
                        tr.steps.push(Step {
                            action: format!("{k} to {}", sockaddr(p.dst, p.dport)),
                            rule: rr(p),
                        });
                        return Res::Accept(rr(p));
                    }
                    "snat" | "masquerade" => return Res::Accept(rr(p)),
                    "xt" => {
                        tr.uncertain.push(rr(p));
                        continue 'rules;
                    }
                    // counter, log, limit, meta set, mangle, notrack, …
                    _ => None,
                };
                if let Some(v) = verdict {
                    let Some((vk, vb)) = v.as_object().and_then(|o| o.iter().next()) else {
                        continue;
                    };
                    match vk.as_str() {
                        "accept" => return Res::Accept(rr(p)),
                        "drop" => return Res::Drop(rr(p)),
                        "reject" => return Res::Reject(rr(p)),
                        "return" => return Res::Fallthrough,
                        "continue" => continue 'rules,
                        "jump" | "goto" => {
                            let Some(callee) = vb
                                .get("target")
                                .and_then(Value::as_str)
                                .and_then(|n| t.chain(n))
                            else {
                                continue 'rules;
                            };
                            match self.eval_nft(t, callee, hook, p, tr, depth + 1) {
                                Res::Fallthrough => {
                                    if vk == "goto" {
                                        return Res::Fallthrough;
                                    }
                                    continue 'rules;
                                }
                                other => return other,
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        Res::Fallthrough
    }

    // ---- hooks ----

    /// Runs every base chain at `hook`. `Some(verdict, decider)` when the
    /// packet is stopped.
    fn hook(&self, hook: Hook, p: &mut Packet, tr: &mut Trace) -> Option<(Verdict, RuleRef)> {
        let bases = self.bases(hook, p.v6());
        for (i, b) in bases.iter().enumerate() {
            if let Some(stop) = self.base(b, hook, p, tr) {
                // The other base chains at this hook still run in the
                // kernel's view of "an accept elsewhere": record their
                // explicit accepts (F3), on a copy of the packet.
                for rest in &bases[i + 1..] {
                    let mut q = p.clone();
                    let mut t2 = Trace::default();
                    let _ = self.base(rest, hook, &mut q, &mut t2);
                    tr.steps
                        .extend(t2.steps.into_iter().filter(|s| s.action == "accept"));
                }
                return Some(stop);
            }
        }
        None
    }

    fn base(
        &self,
        b: &Base<'a>,
        hook: Hook,
        p: &mut Packet,
        tr: &mut Trace,
    ) -> Option<(Verdict, RuleRef)> {
        {
            if b.nat && (!p.new || p.no_nat) {
                return None;
            }
            let res = match b.src {
                BaseSrc::Ipt(t, c, backend) => {
                    let r = self.eval_ipt(t, c, backend, hook, p, tr, 0);
                    match r {
                        Res::Fallthrough if c.policy.as_deref() == Some("DROP") => {
                            Res::Drop(self.rref_ipt(t, c, backend, hook, None, p.v6()))
                        }
                        other => other,
                    }
                }
                BaseSrc::Nft(t, c) => {
                    let r = self.eval_nft(t, c, hook, p, tr, 0);
                    match r {
                        Res::Fallthrough if c.policy.as_deref() == Some("drop") => {
                            Res::Drop(self.rref_nft(t, c, hook, None))
                        }
                        other => other,
                    }
                }
            };
            match res {
                Res::Drop(r) => return Some((Verdict::TimesOut, r)),
                Res::Reject(r) => return Some((Verdict::Blocked, r)),
                Res::Accept(r) => {
                    if !tr.steps.iter().any(|s| s.rule == r) {
                        tr.steps.push(Step {
                            action: "accept".into(),
                            rule: r,
                        });
                    }
                }
                Res::Fallthrough => {}
            }
        }
        None
    }

    // A private helper whose error is the flow's final verdict, built once
    // per flow: boxing it would buy nothing.
    #[allow(clippy::result_large_err)]
    fn route_out(&self, p: &mut Packet, hook: Hook) -> Result<(), (Verdict, RuleRef)> {
        match self.lookup(p.dst) {
            None => Err((
                Verdict::Blocked,
                RuleRef::kernel(hook, format!("no route to {} (network unreachable)", p.dst)),
            )),
            Some(r) if matches!(r.kind.as_str(), "blackhole" | "unreachable" | "prohibit") => {
                Err((
                    Verdict::Blocked,
                    RuleRef {
                        netns: self.label.clone(),
                        ..RuleRef::kernel(
                            Hook::Routing,
                            format!(
                                "{} route {}",
                                r.kind,
                                r.dst.map_or("default".into(), |c| c.to_string())
                            ),
                        )
                    },
                ))
            }
            Some(r) => {
                p.oif = r.dev.clone();
                Ok(())
            }
        }
    }

    /// A packet that enters on `p.iif`. `local_service`: the target is
    /// served on this host (nothing answers it elsewhere).
    fn enter(
        &self,
        p: &mut Packet,
        tr: &mut Trace,
        local_service: bool,
    ) -> (Verdict, Option<RuleRef>) {
        if let Some(d) = self.hook(Hook::Prerouting, p, tr) {
            return (d.0, Some(d.1));
        }
        if self.is_local(p.dst) {
            let iif = p.iif.clone().unwrap_or_default();
            let martian = match p.dst {
                IpAddr::V4(v) => v.is_loopback() && iif != "lo" && !self.route_localnet(&iif),
                IpAddr::V6(v) => v.is_loopback() && iif != "lo",
            };
            if martian {
                return (
                    Verdict::TimesOut,
                    Some(RuleRef::kernel(
                        Hook::Routing,
                        format!(
                            "martian: {} arrived on {iif} with net.ipv4.conf.all.route_localnet=0 and net.ipv4.conf.{iif}.route_localnet=0; the kernel drops it",
                            sockaddr(p.dst, p.dport)
                        ),
                    )),
                );
            }
            if let Some(d) = self.hook(Hook::Input, p, tr) {
                return (d.0, Some(d.1));
            }
            return (Verdict::Reaches, None);
        }
        let fwd_key = if p.v6() {
            "net.ipv6.conf.all.forwarding"
        } else {
            "net.ipv4.ip_forward"
        };
        if self.sysctl(fwd_key) == Some("0") {
            return (
                Verdict::TimesOut,
                Some(RuleRef::kernel(
                    Hook::Routing,
                    format!("{fwd_key}=0: the host does not forward"),
                )),
            );
        }
        if let Err(d) = self.route_out(p, Hook::Routing) {
            return (d.0, Some(d.1));
        }
        if let Some(d) = self.hook(Hook::Forward, p, tr) {
            return (d.0, Some(d.1));
        }
        if let Some(d) = self.hook(Hook::Postrouting, p, tr) {
            return (d.0, Some(d.1));
        }
        if local_service {
            return unanswered(p, "rewrote");
        }
        (Verdict::Reaches, None)
    }

    /// A locally generated packet.
    fn local_out(
        &self,
        p: &mut Packet,
        tr: &mut Trace,
        local_service: bool,
    ) -> (Verdict, Option<RuleRef>) {
        if self.is_local(p.dst) {
            p.oif = Some("lo".into());
        } else if let Err(d) = self.route_out(p, Hook::Output) {
            return (d.0, Some(d.1));
        }
        let before = p.dst;
        if let Some(d) = self.hook(Hook::Output, p, tr) {
            return (d.0, Some(d.1));
        }
        if p.dst != before {
            if self.is_local(p.dst) {
                p.oif = Some("lo".into());
            } else if let Err(d) = self.route_out(p, Hook::Output) {
                return (d.0, Some(d.1));
            }
        }
        if let Some(d) = self.hook(Hook::Postrouting, p, tr) {
            return (d.0, Some(d.1));
        }
        if self.is_local(p.dst) {
            p.iif = Some("lo".into());
            p.no_nat = true;
            p.cgroup = None;
            if let Some(d) = self.hook(Hook::Prerouting, p, tr) {
                return (d.0, Some(d.1));
            }
            if let Some(d) = self.hook(Hook::Input, p, tr) {
                return (d.0, Some(d.1));
            }
            return (Verdict::Reaches, None);
        }
        if local_service {
            return unanswered(p, "redirected");
        }
        (Verdict::Reaches, None)
    }
}

fn rule_has_verdict(r: &nft::Rule) -> bool {
    r.exprs.iter().any(|e| {
        e.as_object()
            .and_then(|o| o.keys().next())
            .is_some_and(|k| {
                matches!(
                    k.as_str(),
                    "accept"
                        | "drop"
                        | "reject"
                        | "jump"
                        | "goto"
                        | "vmap"
                        | "dnat"
                        | "redirect"
                        | "return"
                )
            })
    })
}

fn sockaddr(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v) => format!("{v}:{port}"),
        IpAddr::V6(v) => format!("[{v}]:{port}"),
    }
}

/// A value taken from the packet for an nft match.
#[derive(Debug, Clone, PartialEq)]
enum PVal {
    Addr(IpAddr),
    Num(u64),
    Str(String),
    /// The L4 protocol (always tcp here).
    Proto,
    Flags(Vec<&'static str>),
    Cgroup(String),
    /// The packet has no such header: no match.
    Absent,
    Unknown,
}

/// Whether `v` equals / lies in `right`.
fn value_in(v: &PVal, right: &Value, t: &nft::Table) -> Tri {
    if *v == PVal::Unknown {
        return Tri::Maybe;
    }
    match right {
        Value::String(s) if s.starts_with('@') => match t.sets.get(&s[1..]) {
            Some(set) => any_of(v, set.elems.iter(), t),
            None => Tri::Maybe,
        },
        Value::Array(a) => {
            if let PVal::Flags(f) = v {
                return tri(a.iter().filter_map(Value::as_str).any(|x| f.contains(&x)));
            }
            any_of(v, a.iter(), t)
        }
        Value::Object(o) if o.contains_key("set") => match o.get("set") {
            Some(Value::Array(a)) => {
                if let PVal::Flags(f) = v {
                    return tri(a.iter().filter_map(Value::as_str).any(|x| f.contains(&x)));
                }
                any_of(v, a.iter(), t)
            }
            Some(other) => value_in(v, other, t),
            None => Tri::Maybe,
        },
        other => elem_eq(v, other),
    }
}

fn any_of<'v>(v: &PVal, it: impl Iterator<Item = &'v Value>, t: &nft::Table) -> Tri {
    let mut acc = Tri::No;
    for e in it {
        // Map entries are [key, data]; set entries may be {"elem": {"val": …}}.
        let e = match e {
            Value::Array(kv) if kv.len() == 2 => &kv[0],
            Value::Object(o) if o.contains_key("elem") => {
                o.get("elem").and_then(|x| x.get("val")).unwrap_or(e)
            }
            other => other,
        };
        match value_in(v, e, t) {
            Tri::Yes => return Tri::Yes,
            Tri::Maybe => acc = Tri::Maybe,
            Tri::No => {}
        }
    }
    acc
}

fn elem_eq(v: &PVal, right: &Value) -> Tri {
    match (v, right) {
        (PVal::Addr(a), Value::String(s)) => match s.parse::<IpAddr>() {
            Ok(b) => tri(*a == b || mapped_eq(*a, b)),
            Err(_) => Tri::Maybe,
        },
        (PVal::Addr(a), Value::Object(o)) => {
            if let Some(p) = o.get("prefix") {
                let addr = p
                    .get("addr")
                    .and_then(Value::as_str)
                    .and_then(|x| x.parse::<IpAddr>().ok());
                let len = p
                    .get("len")
                    .and_then(Value::as_u64)
                    .and_then(|l| u8::try_from(l).ok());
                return match (addr, len) {
                    (Some(addr), Some(len)) => tri(ipt::Cidr { addr, len }.contains(*a)),
                    _ => Tri::Maybe,
                };
            }
            if let Some(Value::Array(r)) = o.get("range") {
                let lo = r
                    .first()
                    .and_then(Value::as_str)
                    .and_then(|x| x.parse::<IpAddr>().ok());
                let hi = r
                    .get(1)
                    .and_then(Value::as_str)
                    .and_then(|x| x.parse::<IpAddr>().ok());
                return match (lo, hi) {
                    (Some(lo), Some(hi)) if lo.is_ipv4() == a.is_ipv4() => {
                        tri(lo <= *a && *a <= hi)
                    }
                    (Some(_), Some(_)) => Tri::No,
                    _ => Tri::Maybe,
                };
            }
            Tri::Maybe
        }
        (PVal::Num(n), Value::Number(m)) => tri(m.as_u64() == Some(*n)),
        (PVal::Num(n), Value::String(s)) => match service_port(s) {
            Some(p) => tri(u64::from(p) == *n),
            None => Tri::Maybe,
        },
        (PVal::Num(n), Value::Object(o)) => match o.get("range").and_then(Value::as_array) {
            Some(r) if r.len() == 2 => match (r[0].as_u64(), r[1].as_u64()) {
                (Some(a), Some(b)) => tri(a <= *n && *n <= b),
                _ => Tri::Maybe,
            },
            _ => Tri::Maybe,
        },
        (PVal::Proto, Value::String(s)) => tri(s == "tcp"),
        (PVal::Proto, Value::Number(m)) => tri(m.as_u64() == Some(6)),
        (PVal::Str(a), Value::String(s)) => tri(ifname_match(s, a)),
        (PVal::Flags(f), Value::String(s)) => tri(f.contains(&s.as_str())),
        (PVal::Cgroup(c), Value::String(s)) => {
            let s = s.trim_matches('/');
            tri(c == s || c.starts_with(&format!("{s}/")))
        }
        (PVal::Cgroup(_), _) => Tri::Maybe,
        _ => Tri::Maybe,
    }
}

fn mapped_eq(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(x), IpAddr::V6(y)) | (IpAddr::V6(y), IpAddr::V4(x)) => {
            y.to_ipv4_mapped() == Some(x)
        }
        _ => false,
    }
}

fn service_port(s: &str) -> Option<u16> {
    match s {
        "http" => Some(80),
        "https" => Some(443),
        other => other.parse().ok(),
    }
}

/// nft's interface-name wildcard: a trailing `*` (unescaped) matches a prefix.
fn ifname_match(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) if !prefix.ends_with('\\') => name.starts_with(prefix),
        _ => pattern.replace("\\*", "*") == name,
    }
}

enum Lookup {
    Found(Value),
    Missing,
    Unknown,
}

fn vmap_lookup(key: &PVal, data: Option<&Value>, t: &nft::Table) -> Lookup {
    let elems: Vec<&Value> = match data {
        Some(Value::String(s)) if s.starts_with('@') => match t.sets.get(&s[1..]) {
            Some(set) => set.elems.iter().collect(),
            None => return Lookup::Unknown,
        },
        Some(Value::Object(o)) => match o.get("set") {
            Some(Value::Array(a)) => a.iter().collect(),
            _ => return Lookup::Unknown,
        },
        _ => return Lookup::Unknown,
    };
    let mut unknown = false;
    // Interval maps keyed by name: exact names win over wildcards is not a
    // rule of nft; the first element that matches in nft's order does. The
    // JSON lists elements sorted, which is that order for disjoint keys.
    for e in elems {
        let Some(kv) = e.as_array().filter(|kv| kv.len() == 2) else {
            unknown = true;
            continue;
        };
        match elem_eq_or_in(key, &kv[0], t) {
            Tri::Yes => return Lookup::Found(kv[1].clone()),
            Tri::Maybe => unknown = true,
            Tri::No => {}
        }
    }
    if unknown {
        Lookup::Unknown
    } else {
        Lookup::Missing
    }
}

fn elem_eq_or_in(v: &PVal, k: &Value, t: &nft::Table) -> Tri {
    value_in(v, k, t)
}

// ---- the flows ----

/// Everything the analysis needs about one source.
#[derive(Debug, Clone)]
struct SourceSpec {
    source: Source,
    iface: Option<String>,
    src4: Option<Ipv4Addr>,
    src6: Option<Ipv6Addr>,
    cgroup: Option<String>,
}

fn next_addr(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V4(v) => IpAddr::V4(Ipv4Addr::from(u32::from(v).wrapping_add(1))),
        IpAddr::V6(v) => IpAddr::V6(Ipv6Addr::from(u128::from(v).wrapping_add(1))),
    }
}

fn iface_addr(st: &NetState, iface: &str, v6: bool) -> Option<IpAddr> {
    st.addrs
        .iter()
        .filter(|a| a.ifname == iface && a.addr.is_ipv6() == v6)
        .find(|a| !matches!(a.addr, IpAddr::V6(v) if (v.segments()[0] & 0xffc0) == 0xfe80))
        .map(|a| a.addr)
}

/// Bridges that carry bridge-mode containers.
pub fn container_bridges(snap: &Snapshot) -> Vec<String> {
    let st = &snap.host;
    let mut out: Vec<String> = st
        .links
        .iter()
        .filter(|l| l.name != "ecs-bridge")
        .filter(|l| match &l.kind {
            Some(k) => {
                k == "bridge"
                    && (l.name == "docker0"
                        || l.name.starts_with("br-")
                        || l.name.starts_with("docker"))
            }
            None => l.name == "docker0" || l.name.starts_with("br-"),
        })
        .map(|l| l.name.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether the host runs awsvpc tasks.
pub fn has_awsvpc(snap: &Snapshot) -> bool {
    snap.host.links.iter().any(|l| l.name == "ecs-bridge")
        || !snap.tasks.is_empty()
        || snap
            .ecs_config
            .get("ECS_ENABLE_TASK_ENI")
            .is_some_and(|v| v == "true")
}

fn bridge_glob(g: &str, name: &str) -> bool {
    match g.strip_suffix('*') {
        Some(p) => name.starts_with(p),
        None => g == name,
    }
}

/// (imds, task_metadata) actions the config gives a source; `None` when no
/// workload selects it.
fn intent(snap: &Snapshot, s: &SourceSpec) -> Option<(Action, Action)> {
    for w in &snap.config.workloads {
        let hit = match (&w.selector, s.source) {
            (Selector::Bridges(gs), Source::BridgeContainer) => s
                .iface
                .as_deref()
                .is_some_and(|i| gs.iter().any(|g| bridge_glob(g, i))),
            (Selector::Netns(ns), Source::AwsvpcTask) => {
                !ns.is_empty()
                    && ns
                        .iter()
                        .any(|n| matches!(n, NetnsSelector::EcsTasks | NetnsSelector::Path(_)))
            }
            (Selector::Cgroups(cs), Source::HostNetwork | Source::Agent) => {
                s.cgroup.as_deref().is_some_and(|c| {
                    cs.iter().any(|p| {
                        c == p
                            || c.starts_with(&format!("{p}/"))
                            || c.ends_with(&format!("/{p}"))
                            || c.contains(&format!("/{p}/"))
                    })
                })
            }
            (Selector::Containers(_), _) => false,
            _ => false,
        };
        if hit {
            return Some((w.imds, w.task_metadata));
        }
    }
    None
}

/// Evaluates every flow of the snapshot.
pub fn evaluate(snap: &Snapshot) -> Vec<Flow> {
    let ep = Endpoints::of(snap);
    let host = Ns {
        st: &snap.host,
        label: None,
    };
    let mut specs = Vec::new();
    for b in container_bridges(snap) {
        let src4 = iface_addr(&snap.host, &b, false).and_then(|a| match next_addr(a) {
            IpAddr::V4(v) => Some(v),
            IpAddr::V6(_) => None,
        });
        let src6 = iface_addr(&snap.host, &b, true).and_then(|a| match next_addr(a) {
            IpAddr::V6(v) => Some(v),
            IpAddr::V4(_) => None,
        });
        specs.push(SourceSpec {
            source: Source::BridgeContainer,
            iface: Some(b),
            src4,
            src6,
            cgroup: None,
        });
    }
    if has_awsvpc(snap) {
        let src4 = iface_addr(&snap.host, "ecs-bridge", false).and_then(|a| match next_addr(a) {
            IpAddr::V4(v) => Some(v),
            IpAddr::V6(_) => None,
        });
        specs.push(SourceSpec {
            source: Source::AwsvpcTask,
            iface: Some("ecs-bridge".into()),
            src4,
            src6: None,
            cgroup: None,
        });
    }
    let hostnet_cg = snap.docker.host_network_containers.first().map_or_else(
        || "docker/host-network-container".to_string(),
        |c| c.cgroup.clone(),
    );
    specs.push(SourceSpec {
        source: Source::HostNetwork,
        iface: None,
        src4: None,
        src6: None,
        cgroup: Some(hostnet_cg),
    });
    specs.push(SourceSpec {
        source: Source::Agent,
        iface: None,
        src4: None,
        src6: None,
        cgroup: Some(
            snap.docker
                .agent_cgroup
                .clone()
                .unwrap_or_else(|| "docker/ecs-agent".into()),
        ),
    });

    let mut flows = Vec::new();
    for s in &specs {
        let acts = intent(snap, s);
        for target in TargetKind::ALL {
            let act = acts.map(|(i, t)| {
                if target == TargetKind::TaskCredentials {
                    t
                } else {
                    i
                }
            });
            let expect = match act {
                Some(Action::Allow) => Some(Expect::Reach),
                Some(Action::Deny | Action::Proxy) => Some(Expect::Block),
                None => None,
            };
            let mut f = flow_one(snap, &host, &ep, s, target);
            f.expect = expect;
            flows.push(f);
        }
    }
    flows
}

fn host_src(ns: &Ns<'_>, dst: IpAddr) -> Option<IpAddr> {
    let v6 = dst.is_ipv6();
    let r = ns.lookup(dst)?;
    let dev = r.dev.as_deref()?;
    iface_addr(ns.st, dev, v6)
}

fn new_packet(
    src: IpAddr,
    dst: IpAddr,
    dport: u16,
    iif: Option<String>,
    cgroup: Option<String>,
) -> Packet {
    Packet {
        src,
        dst,
        sport: 40000,
        dport,
        orig_dst: dst,
        orig_dport: dport,
        iif,
        oif: None,
        new: true,
        dnat: false,
        cgroup,
        no_nat: false,
    }
}

fn flow_one(
    snap: &Snapshot,
    host: &Ns<'_>,
    ep: &Endpoints,
    s: &SourceSpec,
    target: TargetKind,
) -> Flow {
    let (dst, dport): (IpAddr, u16) = match target {
        TargetKind::ImdsV4 => (IpAddr::V4(ep.imds4), 80),
        TargetKind::ImdsV6 => (IpAddr::V6(ep.imds6), 80),
        TargetKind::TaskCredentials => (IpAddr::V4(ep.creds), 80),
    };
    let mut flow = Flow {
        source: s.source,
        interface: s.iface.clone(),
        target,
        destination: sockaddr(dst, dport),
        verdict: Verdict::NotApplicable,
        expect: None,
        decided_by: None,
        steps: Vec::new(),
        assumed_not_matching: Vec::new(),
        delivered_to: None,
        established: None,
        notes: Vec::new(),
    };
    let local_service = target == TargetKind::TaskCredentials;
    // awsvpc IMDS: inside the task namespace, not through the host.
    if s.source == Source::AwsvpcTask && target != TargetKind::TaskCredentials {
        flow.interface = None;
        return awsvpc_imds(snap, ep, flow, dst, dport);
    }
    let mut tr = Trace::default();
    let run = |p: &mut Packet, tr: &mut Trace| -> (Verdict, Option<RuleRef>) {
        match s.source {
            Source::BridgeContainer | Source::AwsvpcTask => host.enter(p, tr, local_service),
            Source::HostNetwork | Source::Agent => host.local_out(p, tr, local_service),
        }
    };
    let src: Option<IpAddr> = match s.source {
        Source::BridgeContainer | Source::AwsvpcTask => {
            if dst.is_ipv6() {
                s.src6.map(IpAddr::V6)
            } else {
                s.src4.map(IpAddr::V4)
            }
        }
        Source::HostNetwork | Source::Agent => {
            host_src(host, dst).or_else(|| if host.is_local(dst) { Some(dst) } else { None })
        }
    };
    let Some(src) = src else {
        flow.notes.push(match &s.iface {
            Some(i) => format!(
                "{i} has no {} address",
                if dst.is_ipv6() { "IPv6" } else { "IPv4" }
            ),
            None => format!("the host has no route to {dst}"),
        });
        if s.iface.is_none() {
            flow.verdict = Verdict::Blocked;
            flow.decided_by = Some(RuleRef::kernel(
                Hook::Routing,
                format!("no route to {dst} (network unreachable)"),
            ));
        }
        return flow;
    };
    let mut p = new_packet(src, dst, dport, s.iface.clone(), s.cgroup.clone());
    let (v, d) = run(&mut p, &mut tr);
    flow.verdict = v;
    flow.decided_by = d.or_else(|| {
        tr.steps
            .iter()
            .rev()
            .find(|st| st.action == "accept")
            .map(|st| st.rule.clone())
    });
    flow.delivered_to = Some(sockaddr(p.dst, p.dport));
    flow.steps = tr.steps;
    flow.assumed_not_matching = tr.uncertain;
    if target != TargetKind::TaskCredentials && flow.verdict.stopped() && !p.dnat {
        let mut tr2 = Trace::default();
        let mut p2 = new_packet(src, dst, dport, s.iface.clone(), s.cgroup.clone());
        p2.new = false;
        let (v2, d2) = run(&mut p2, &mut tr2);
        let d2 = d2.or_else(|| {
            tr2.steps
                .iter()
                .rev()
                .find(|st| st.action == "accept")
                .map(|st| st.rule.clone())
        });
        flow.established = Some((v2, d2));
    }
    flow
}

fn awsvpc_imds(snap: &Snapshot, ep: &Endpoints, mut flow: Flow, dst: IpAddr, dport: u16) -> Flow {
    if let Some(task) = snap.tasks.first() {
        let ns = Ns {
            st: &task.state,
            label: Some(task.netns.clone().unwrap_or_else(|| task.name.clone())),
        };
        let Some(src) = host_src(&ns, dst) else {
            flow.verdict = match ns.lookup(dst) {
                Some(r) if matches!(r.kind.as_str(), "blackhole" | "unreachable" | "prohibit") => {
                    Verdict::Blocked
                }
                Some(_) => Verdict::NotApplicable,
                None => Verdict::Blocked,
            };
            flow.decided_by = Some(RuleRef {
                netns: ns.label.clone(),
                ..RuleRef::kernel(
                    Hook::Routing,
                    match ns.lookup(dst) {
                        Some(r) => format!(
                            "{} route {} in the task namespace",
                            r.kind,
                            r.dst.map_or("default".into(), |c| c.to_string())
                        ),
                        None => format!("no route to {dst} in the task namespace"),
                    },
                )
            });
            return flow;
        };
        let mut tr = Trace::default();
        let mut p = new_packet(src, dst, dport, None, None);
        let (v, d) = ns.local_out(&mut p, &mut tr, false);
        flow.verdict = v;
        flow.decided_by = d.or_else(|| {
            tr.steps
                .iter()
                .rev()
                .find(|st| st.action == "accept")
                .map(|st| st.rule.clone())
        });
        flow.steps = tr.steps;
        flow.assumed_not_matching = tr.uncertain;
        flow.delivered_to = Some(sockaddr(p.dst, p.dport));
        flow.notes.push(format!(
            "evaluated in task namespace {} (the task's ENI; host rules are not crossed)",
            task.name
        ));
        if snap.tasks.len() > 1 {
            flow.notes.push(format!(
                "{} task namespaces in the snapshot; the first is shown",
                snap.tasks.len()
            ));
        }
        return flow;
    }
    let _ = ep;
    let block = snap
        .ecs_config
        .get("ECS_AWSVPC_BLOCK_IMDS")
        .is_some_and(|v| v == "true");
    if block {
        flow.verdict = Verdict::Blocked;
        flow.decided_by = Some(RuleRef::kernel(
            Hook::Routing,
            "ECS_AWSVPC_BLOCK_IMDS=true in ecs.config: the agent adds blackhole routes in each task namespace".into(),
        ));
    } else {
        flow.verdict = Verdict::Reaches;
        flow.decided_by = Some(RuleRef::kernel(
            Hook::Routing,
            "the task's own ENI inside the task namespace: the host's FORWARD/DOCKER-USER rules are never crossed, and ECS_AWSVPC_BLOCK_IMDS is not true".into(),
        ));
        flow.notes
            .push("no task namespace in the snapshot; judged from ecs.config".into());
    }
    flow
}

/// Names of every nft table evaluated directly (not through iptables-nft).
pub fn nft_tables(st: &NetState) -> BTreeSet<(String, String)> {
    let ns = Ns { st, label: None };
    st.nft
        .iter()
        .flat_map(|rs| &rs.tables)
        .filter(|t| !ns.owned_by_iptables_nft(&t.family, &t.name))
        .map(|t| (t.family.clone(), t.name.clone()))
        .collect()
}

/// The verdict for a packet to a local service's address that no rule
/// turned into a local destination (`done` says what would have: "rewrote"
/// for DNAT, "redirected" for REDIRECT): it leaves and times out.
fn unanswered(p: &Packet, done: &str) -> (Verdict, Option<RuleRef>) {
    (
        Verdict::TimesOut,
        Some(RuleRef::kernel(
            Hook::Routing,
            format!(
                "{} is not local and nothing {done} it: the packet leaves through {}, where nothing answers",
                sockaddr(p.dst, p.dport),
                p.oif.as_deref().unwrap_or("?")
            ),
        )),
    )
}
