//! The policy of `metaguard exec`: which destinations a supervised command
//! may send to, and which environment variables it must not see.
//!
//! Owns: parsing `ADDR[/PREFIX][:PORT]` rules (`--allow`, `--deny`), the
//! default deny list (every metadata endpoint, both families), the optional
//! link-local ranges, IPv4-mapped/compatible/NAT64 normalisation of
//! destinations, and the default list of scrubbed variables.
//!
//! Must not: read sockaddrs out of memory or talk to the kernel — the
//! supervisor in `metaguard_sys::seccomp` decodes what the child passed and
//! asks [`ExecPolicy::decide`]. Pure functions only.
//!
//! Decision order: a destination matching an `--allow` rule is allowed;
//! otherwise one matching a deny rule (under any spelling the kernel could
//! route to the same IPv4 host, see [`candidates`]) is denied; everything
//! else is allowed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::{DEFAULT_IMDS, DEFAULT_TASK_METADATA};

/// Variables the ECS agent, EKS Pod Identity and the SDKs use to find the
/// credentials and task metadata endpoints; removed from the child's
/// environment by default.
pub const DEFAULT_SCRUB_ENV: [&str; 6] = [
    "ECS_CONTAINER_METADATA_URI",
    "ECS_CONTAINER_METADATA_URI_V4",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
];

/// The link-local ranges `--deny-link-local` adds.
pub const LINK_LOCAL: [&str; 2] = ["169.254.0.0/16", "fe80::/10"];

/// One `ADDR[/PREFIX][:PORT]` rule: a network and, optionally, one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Network address with the host bits cleared; IPv4-mapped IPv6 rules
    /// are stored as IPv4.
    addr: IpAddr,
    prefix: u8,
    port: Option<u16>,
}

/// Why a rule was refused, with the text it was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{text:?}: empty rule")]
    Empty { text: String },
    #[error("{text:?}: {addr:?} is not an IPv4 or IPv6 address (write 169.254.169.254, fd00:ec2::254 or [fd00:ec2::254]:80)")]
    Addr { text: String, addr: String },
    #[error("{text:?}: prefix {prefix:?} is not a number from 0 to {max}")]
    Prefix {
        text: String,
        prefix: String,
        max: u8,
    },
    #[error("{text:?}: host bits are set below /{prefix}; did you mean {suggest}?")]
    HostBits {
        text: String,
        prefix: u8,
        suggest: String,
    },
    #[error("{text:?}: port {port:?} is not a number from 1 to 65535")]
    Port { text: String, port: String },
    #[error("{text:?}: an IPv6 address with a port is written in brackets: [ADDR]:PORT or [ADDR/PREFIX]:PORT")]
    Brackets { text: String },
}

impl Rule {
    /// A rule matching exactly one address (any port).
    pub fn host(addr: IpAddr) -> Rule {
        let addr = canonical(addr);
        Rule {
            addr,
            prefix: max_prefix(addr),
            port: None,
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Parses `ADDR`, `ADDR/PREFIX`, `V4:PORT`, `V4/PREFIX:PORT`,
    /// `[V6]:PORT`, `[V6/PREFIX]:PORT` (also `[V6]/PREFIX:PORT`).
    pub fn parse(text: &str) -> Result<Rule, RuleError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(RuleError::Empty { text: text.into() });
        }
        let (net, port) = split_port(text, t)?;
        let (addr_s, prefix_s) = match net.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (net.as_str(), None),
        };
        let addr: IpAddr = addr_s.parse().map_err(|_| RuleError::Addr {
            text: text.into(),
            addr: addr_s.into(),
        })?;
        let max = max_prefix(addr);
        let prefix = match prefix_s {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(RuleError::Prefix {
                        text: text.into(),
                        prefix: p.into(),
                        max,
                    })
                }
            },
        };
        let masked = mask(addr, prefix);
        if masked != addr {
            return Err(RuleError::HostBits {
                text: text.into(),
                prefix,
                suggest: format!("{masked}/{prefix}"),
            });
        }
        // ::ffff:a.b.c.d/96+n is the IPv4 network a.b.c.d/n.
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96),
                None => (addr, prefix),
            },
            _ => (addr, prefix),
        };
        Ok(Rule { addr, prefix, port })
    }

    /// Whether `ip` (already canonical) and `port` fall under this rule.
    pub fn matches(&self, ip: IpAddr, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.addr
            }
            _ => false,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = self.prefix == max_prefix(self.addr);
        match (self.addr, self.port, full) {
            (IpAddr::V4(a), None, true) => write!(f, "{a}"),
            (IpAddr::V4(a), None, false) => write!(f, "{a}/{}", self.prefix),
            (IpAddr::V4(a), Some(p), true) => write!(f, "{a}:{p}"),
            (IpAddr::V4(a), Some(p), false) => write!(f, "{a}/{}:{p}", self.prefix),
            (IpAddr::V6(a), None, true) => write!(f, "{a}"),
            (IpAddr::V6(a), None, false) => write!(f, "{a}/{}", self.prefix),
            (IpAddr::V6(a), Some(p), true) => write!(f, "[{a}]:{p}"),
            (IpAddr::V6(a), Some(p), false) => write!(f, "[{a}/{}]:{p}", self.prefix),
        }
    }
}

/// Splits `text` into the network part (`ADDR` or `ADDR/PREFIX`, without
/// brackets) and the optional port.
fn split_port(text: &str, t: &str) -> Result<(String, Option<u16>), RuleError> {
    let parse_port = |p: &str| -> Result<u16, RuleError> {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(RuleError::Port {
                text: text.into(),
                port: p.into(),
            }),
        }
    };
    if let Some(rest) = t.strip_prefix('[') {
        // [V6], [V6/P], [V6]:PORT, [V6/P]:PORT, [V6]/P, [V6]/P:PORT
        let Some((inside, after)) = rest.split_once(']') else {
            return Err(RuleError::Brackets { text: text.into() });
        };
        let (prefix, port) = match after.split_once(':') {
            Some((pre, port)) => (pre, Some(parse_port(port)?)),
            None => (after, None),
        };
        return match prefix {
            "" => Ok((inside.to_string(), port)),
            p if p.starts_with('/') && !inside.contains('/') => Ok((format!("{inside}{p}"), port)),
            _ => Err(RuleError::Brackets { text: text.into() }),
        };
    }
    match t.split_once(':') {
        None => Ok((t.to_string(), None)),
        Some((net, port)) if !port.contains(':') => Ok((net.to_string(), Some(parse_port(port)?))),
        // Bare IPv6: no port possible without brackets.
        Some(_) => Ok((t.to_string(), None)),
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// The address the kernel actually uses: IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`) is IPv4 on a dual-stack socket.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// Every spelling under which `ip` may reach an IPv4 host: the canonical
/// address, plus the IPv4 address embedded in a deprecated
/// IPv4-compatible address (`::a.b.c.d`, routable through a SIT tunnel)
/// or in the NAT64 well-known prefix (`64:ff9b::a.b.c.d`). Deny rules are
/// checked against all of them.
pub fn candidates(ip: IpAddr) -> Vec<IpAddr> {
    let c = canonical(ip);
    let mut out = vec![c];
    if let IpAddr::V6(v6) = c {
        let s = v6.segments();
        let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        let compat = s[..6] == [0; 6] && u32::from(low) > 1;
        let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
        if compat || nat64 {
            out.push(IpAddr::V4(low));
        }
    }
    out
}

/// What to do with one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied by this rule.
    Deny(Rule),
}

/// Validated `exec` policy: allow rules, then deny rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecPolicy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

/// The raw options, as the command line gives them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecPolicyArgs {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub deny_link_local: bool,
}

impl ExecPolicy {
    /// The default deny list: every metadata endpoint (config defaults
    /// `[endpoints] imds` and `task_metadata`), any port.
    pub fn default_deny() -> Vec<Rule> {
        DEFAULT_IMDS
            .iter()
            .chain(DEFAULT_TASK_METADATA.iter())
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .map(Rule::host)
            .collect()
    }

    /// Builds the policy: defaults, then `--deny` additions, then (with
    /// `deny_link_local`) the link-local ranges; `--allow` rules win.
    pub fn from_args(args: &ExecPolicyArgs) -> Result<ExecPolicy, RuleError> {
        let allow = args
            .allow
            .iter()
            .map(|s| Rule::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut deny = ExecPolicy::default_deny();
        for s in &args.deny {
            deny.push(Rule::parse(s)?);
        }
        if args.deny_link_local {
            for s in LINK_LOCAL {
                deny.push(Rule::parse(s)?);
            }
        }
        Ok(ExecPolicy { allow, deny })
    }

    pub fn allow_rules(&self) -> &[Rule] {
        &self.allow
    }

    pub fn deny_rules(&self) -> &[Rule] {
        &self.deny
    }

    /// Decides on a destination as the child passed it (any spelling).
    pub fn decide(&self, dest: SocketAddr) -> Decision {
        let ip = canonical(dest.ip());
        let port = dest.port();
        if self.allow.iter().any(|r| r.matches(ip, port)) {
            return Decision::Allow;
        }
        for c in candidates(dest.ip()) {
            if let Some(r) = self.deny.iter().find(|r| r.matches(c, port)) {
                return Decision::Deny(*r);
            }
        }
        Decision::Allow
    }
}

/// Which variables the child must not inherit: the defaults plus
/// `--scrub-env` names, minus `--keep-env` names. Exact, case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvScrub {
    names: Vec<String>,
}

/// Why an environment variable name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} is not an environment variable name (non-empty, without '=' or NUL)")]
pub struct EnvNameError {
    pub name: String,
}

impl EnvScrub {
    pub fn new(extra: &[String], keep: &[String]) -> Result<EnvScrub, EnvNameError> {
        for n in extra.iter().chain(keep) {
            if n.is_empty() || n.contains('=') || n.contains('\0') {
                return Err(EnvNameError { name: n.clone() });
            }
        }
        let mut names: Vec<String> = DEFAULT_SCRUB_ENV.iter().map(|s| s.to_string()).collect();
        for n in extra {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names.retain(|n| !keep.contains(n));
        Ok(EnvScrub { names })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn scrubs(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
}

#[cfg(test)]
mod tests;
