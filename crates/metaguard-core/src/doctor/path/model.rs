//! The vocabulary of packet-path evaluation: the public flow model the
//! findings and the report read ([`Flow`], [`RuleRef`], [`Verdict`], …),
//! and the evaluator's own working types — the packet on its way
//! ([`Packet`]), what a walk collects ([`Trace`]) and the three-valued
//! logic matches are judged in ([`Truth`]).
//!
//! Owns no evaluation: the rule languages live in `ipt`/`nft`, the shared
//! walk in `walk`, the kernel's routing decisions in `route`, and the
//! flows in `flows`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use super::super::snapshot::Snapshot;

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
    /// The name the report uses (`iptables-legacy`, …, `kernel`).
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
    /// The hook's nft name (`prerouting`, …; `routing` for kernel deciders).
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

    /// A kernel decision (martian, route, sysctl) at `hook`, said in `what`.
    pub(super) fn kernel(hook: Hook, what: String) -> RuleRef {
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
    /// How the report names the sender.
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
    /// The host's 127.0.0.1 services addressed directly, without DNAT
    /// (F17; not in [`TargetKind::ALL`]: not a column of the flow table).
    HostLoopback,
}

impl TargetKind {
    pub const ALL: [TargetKind; 3] = [
        TargetKind::ImdsV4,
        TargetKind::ImdsV6,
        TargetKind::TaskCredentials,
    ];

    /// How the report names the endpoint.
    pub fn label(self) -> &'static str {
        match self {
            TargetKind::ImdsV4 => "IMDS v4",
            TargetKind::ImdsV6 => "IMDS v6",
            TargetKind::TaskCredentials => "task credentials",
            TargetKind::HostLoopback => "host 127.0.0.1 (no DNAT)",
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
    /// How the report says it (`reaches`, `blocked`, `times out`, `n/a`).
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Reaches => "reaches",
            Verdict::Blocked => "blocked",
            Verdict::TimesOut => "times out",
            Verdict::NotApplicable => "n/a",
        }
    }

    /// The endpoint gets the packet.
    pub fn reaches(self) -> bool {
        self == Verdict::Reaches
    }

    /// Blocked or timed out.
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
    /// A flow not evaluated yet: no verdict, steps or notes.
    pub(super) fn new(
        source: Source,
        interface: Option<String>,
        target: TargetKind,
        destination: String,
    ) -> Flow {
        Flow {
            source,
            interface,
            target,
            destination,
            verdict: Verdict::NotApplicable,
            expect: None,
            decided_by: None,
            steps: Vec::new(),
            assumed_not_matching: Vec::new(),
            delivered_to: None,
            established: None,
            notes: Vec::new(),
        }
    }

    /// `bridge container (docker0) → IMDS v4`.
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
    /// The snapshot config's endpoints (the first of each family), else
    /// the well-known addresses.
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

/// A packet on its way through one namespace: the first packet of a
/// connection (or, for the established check, a later one), rewritten in
/// place by NAT and routing.
#[derive(Debug, Clone)]
pub(super) struct Packet {
    pub(super) src: IpAddr,
    pub(super) dst: IpAddr,
    pub(super) sport: u16,
    pub(super) dport: u16,
    /// The destination before any DNAT (`ct original` matches).
    pub(super) orig_dst: IpAddr,
    pub(super) orig_dport: u16,
    /// The interface it came in on (`None`: locally generated).
    pub(super) iif: Option<String>,
    /// The interface routing sends it out of.
    pub(super) oif: Option<String>,
    /// First packet of a connection (ct state new); else established.
    pub(super) new: bool,
    /// A DNAT or REDIRECT rewrote the destination (`ct status dnat`).
    pub(super) dnat: bool,
    /// The sending socket's cgroup (locally generated packets).
    pub(super) cgroup: Option<String>,
    /// Loopback re-entry of a locally generated packet: no NAT.
    pub(super) no_nat: bool,
}

/// The source port every evaluated connection uses.
const EPHEMERAL_PORT: u16 = 40000;

impl Packet {
    /// The first packet of a new connection from `src` to `dst:dport`.
    pub(super) fn first(
        src: IpAddr,
        dst: IpAddr,
        dport: u16,
        iif: Option<String>,
        cgroup: Option<String>,
    ) -> Packet {
        Packet {
            src,
            dst,
            sport: EPHEMERAL_PORT,
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

    /// Whether the packet is IPv6 (by its current destination).
    pub(super) fn v6(&self) -> bool {
        self.dst.is_ipv6()
    }
}

/// Kleene's three-valued truth, in which every match is judged: a rule
/// whose matches the evaluator cannot fully judge *may* match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Truth {
    Yes,
    No,
    /// The evaluator cannot tell (an opaque match, an unknown expression).
    Maybe,
}

impl From<bool> for Truth {
    fn from(b: bool) -> Truth {
        if b {
            Truth::Yes
        } else {
            Truth::No
        }
    }
}

impl Truth {
    /// Conjunction: `No` wins, then `Maybe`.
    pub(super) fn and(self, other: Truth) -> Truth {
        match (self, other) {
            (Truth::No, _) | (_, Truth::No) => Truth::No,
            (Truth::Maybe, _) | (_, Truth::Maybe) => Truth::Maybe,
            _ => Truth::Yes,
        }
    }

    /// Disjunction: `Yes` wins, then `Maybe`.
    pub(super) fn or(self, other: Truth) -> Truth {
        match (self, other) {
            (Truth::Yes, _) | (_, Truth::Yes) => Truth::Yes,
            (Truth::Maybe, _) | (_, Truth::Maybe) => Truth::Maybe,
            _ => Truth::No,
        }
    }
}

impl std::ops::Not for Truth {
    type Output = Truth;

    /// Negation: `Maybe` stays `Maybe`.
    fn not(self) -> Truth {
        match self {
            Truth::Yes => Truth::No,
            Truth::No => Truth::Yes,
            Truth::Maybe => Truth::Maybe,
        }
    }
}

/// What a walk collects besides the verdict: the steps of note (NAT,
/// accepts) and the rules it assumed not to match.
#[derive(Debug, Default)]
pub(super) struct Trace {
    pub(super) steps: Vec<Step>,
    pub(super) uncertain: Vec<RuleRef>,
}

impl Trace {
    /// The rule that decides a flow: `decider` when one stopped it, else
    /// the last explicit accept on the way, if any.
    pub(super) fn decider(&self, decider: Option<RuleRef>) -> Option<RuleRef> {
        decider.or_else(|| {
            self.steps
                .iter()
                .rev()
                .find(|st| st.action == "accept")
                .map(|st| st.rule.clone())
        })
    }
}

/// `1.2.3.4:80`, `[fd00::1]:80`.
pub(super) fn sockaddr(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v) => format!("{v}:{port}"),
        IpAddr::V6(v) => format!("[{v}]:{port}"),
    }
}

#[cfg(test)]
mod tests;
