//! The typed form of an `iptables-save` file: a [`Save`] of [`Table`]s of
//! [`Chain`]s of [`Rule`]s, each rule a list of (maybe negated)
//! [`Cond`]itions and a [`Target`], with the value types they use
//! ([`Cidr`], [`IfacePattern`], [`Ports`]) and the [`Family`] of a file.
//!
//! Owns no grammar: the parser in [`super`] builds these; the evaluator
//! (`doctor::path`) and the checks read them.

use std::net::IpAddr;

/// Address family of a save file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4 (`iptables-save`).
    Ip,
    /// IPv6 (`ip6tables-save`).
    Ip6,
}

/// An address with a prefix length (`10.0.0.0/8`, `fd00::/64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// Parses `ADDR`, `ADDR/LEN` or `ADDR/DOTTED.MASK`.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, m) = match s.split_once('/') {
            Some((a, m)) => (a, Some(m)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match m {
            None => max,
            Some(m) => match m.parse::<u8>() {
                Ok(l) if l <= max => l,
                Ok(_) => return None,
                Err(_) => {
                    // Dotted mask (old iptables-save): count leading ones.
                    let mask: std::net::Ipv4Addr = m.parse().ok()?;
                    let bits = u32::from(mask);
                    let ones = bits.leading_ones();
                    if bits.checked_shl(ones).unwrap_or(0) != 0 {
                        return None;
                    }
                    ones as u8
                }
            },
        };
        Some(Cidr { addr, len })
    }

    /// Whether `ip` lies inside (families must agree). A prefix longer
    /// than the family's width (`len` is public; nft JSON can say
    /// `"len": 200`) contains nothing.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let width = if self.addr.is_ipv4() { 32 } else { 128 };
        let Some(host_bits) = u32::checked_sub(width, u32::from(self.len)) else {
            return false;
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(host_bits).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// An interface name pattern: `eth0`, or `veth+` (prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfacePattern(pub String);

impl IfacePattern {
    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_suffix('+') {
            Some(prefix) => name.starts_with(prefix),
            None => self.0 == name,
        }
    }
}

/// A port set: single ports and inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports(pub Vec<(u16, u16)>);

impl Ports {
    /// Parses `80`, `80:90`, `22,80:90` (an empty bound is open).
    pub(super) fn parse(s: &str) -> Option<Ports> {
        let mut v = Vec::new();
        for part in s.split(',') {
            let (a, b) = match part.split_once(':') {
                Some((a, b)) => (a, b),
                None => (part, part),
            };
            let a: u16 = if a.is_empty() { 0 } else { a.parse().ok()? };
            let b: u16 = if b.is_empty() {
                u16::MAX
            } else {
                b.parse().ok()?
            };
            v.push((a, b));
        }
        Some(Ports(v))
    }

    pub fn contains(&self, p: u16) -> bool {
        self.0.iter().any(|(a, b)| (*a..=*b).contains(&p))
    }
}

/// One condition of a rule. `neg` inverts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    Src(Cidr),
    Dst(Cidr),
    InIface(IfacePattern),
    OutIface(IfacePattern),
    /// Protocol name or number, lower case (`tcp`, `udp`, `6`, `all`).
    Proto(String),
    Dport(Ports),
    Sport(Ports),
    /// `-m multiport --ports`: either port.
    AnyPort(Ports),
    /// `-m addrtype --src-type` (type names upper case, comma separated).
    SrcType(Vec<String>),
    DstType(Vec<String>),
    /// `--ctstate` / `--state` (upper case).
    CtState(Vec<String>),
    /// `--ctstatus` (upper case).
    CtStatus(Vec<String>),
    /// Something this parser does not evaluate: it may match.
    Opaque(String),
}

/// A condition, maybe negated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub neg: bool,
    pub cond: Cond,
}

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Accept,
    Drop,
    /// `REJECT [--reject-with TYPE]`.
    Reject(Option<String>),
    Return,
    /// `-j CHAIN` (a user chain).
    Jump(String),
    /// `-g CHAIN`.
    Goto(String),
    /// `DNAT --to-destination ADDR[:PORT]` (IPv6 as `[ADDR]:PORT`).
    Dnat {
        addr: Option<IpAddr>,
        port: Option<u16>,
    },
    /// `REDIRECT [--to-ports PORT]`.
    Redirect {
        port: Option<u16>,
    },
    /// SNAT / MASQUERADE: source rewriting; ends the nat chain.
    SourceNat(String),
    /// A rule without `-j` (counting only).
    None,
    /// Any other target (LOG, MARK, CT, …): does not end evaluation.
    Other(String),
}

/// One `-A` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// 1-based line in the file.
    pub line: usize,
    /// The line as written, without a leading counter and without `-A CHAIN`.
    pub text: String,
    /// The arguments after `-A CHAIN`, for copying a rule.
    pub args: Vec<String>,
    pub matches: Vec<Match>,
    pub target: Target,
}

/// A chain: built-in ones have a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// `Some("ACCEPT")`/`Some("DROP")` for built-in chains, `None` for `-`.
    pub policy: Option<String>,
    pub rules: Vec<Rule>,
}

/// One `*table` … `COMMIT` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub chains: Vec<Chain>,
}

impl Table {
    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// A whole save file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Save {
    pub tables: Vec<Table>,
}

impl Save {
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Number of rules in every table.
    pub fn rule_count(&self) -> usize {
        self.tables
            .iter()
            .flat_map(|t| &t.chains)
            .map(|c| c.rules.len())
            .sum()
    }

    /// Whether any table holds a rule or a non-ACCEPT policy.
    pub fn is_empty(&self) -> bool {
        self.tables
            .iter()
            .flat_map(|t| &t.chains)
            .all(|c| c.rules.is_empty() && c.policy.as_deref().is_none_or(|p| p == "ACCEPT"))
    }
}
