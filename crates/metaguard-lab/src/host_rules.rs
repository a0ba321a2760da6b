//! The iptables rules an ECS container instance's own software installs,
//! shared by the emulated host ([`crate::topology`]) and the machine lab's
//! stand-ins ([`crate::standin`]): each rule as `(table, chain, match and
//! target)`.

/// One rule: table, chain, and what follows the chain.
pub type Rule = (&'static str, &'static str, Vec<&'static str>);

/// What ecs-init installs: the DNAT of the credentials endpoint to the
/// agent on 127.0.0.1:51679 for traffic from the bridges, and the
/// REDIRECT for host-network callers. With it goes
/// `net.ipv4.conf.all.route_localnet=1`, without which the DNATed packets
/// are dropped as martians (F1).
pub fn ecs_init() -> Vec<Rule> {
    let mut rules: Vec<Rule> = ["docker0", "ecs-bridge"]
        .into_iter()
        .map(credentials_dnat)
        .collect();
    let mut redirect = CREDENTIALS.to_vec();
    redirect.extend(["-j", "REDIRECT", "--to-ports", "51679"]);
    rules.push(("nat", "OUTPUT", redirect));
    rules
}

/// The credentials endpoint on TCP port 80.
const CREDENTIALS: [&str; 8] = [
    "-d",
    "169.254.170.2/32",
    "-p",
    "tcp",
    "-m",
    "tcp",
    "--dport",
    "80",
];

/// ecs-init's DNAT of the credentials endpoint to the agent, for traffic
/// entering from `iface`.
pub fn credentials_dnat(iface: &'static str) -> Rule {
    let mut m = vec!["-i", iface];
    m.extend(CREDENTIALS);
    m.extend(["-j", "DNAT", "--to-destination", "127.0.0.1:51679"]);
    ("nat", "PREROUTING", m)
}

/// What dockerd installs for docker0: masquerade of container traffic
/// leaving the host (IPv4; IPv6 is routed, as with Docker's default).
pub fn docker_nat() -> Rule {
    masquerade("172.17.0.0/16", "docker0")
}

/// What dockerd installs for a network on `bridge` with `subnet`:
/// masquerade of its containers' traffic leaving the host.
pub fn masquerade(subnet: &'static str, bridge: &'static str) -> Rule {
    (
        "nat",
        "POSTROUTING",
        vec!["-s", subnet, "!", "-o", bridge, "-j", "MASQUERADE"],
    )
}

/// `iptables -w -t TABLE <op> CHAIN RULE…` as arguments.
pub fn args<'a>(op: &'a str, rule: &'a Rule) -> Vec<&'a str> {
    let (table, chain, rest) = rule;
    let mut v = vec!["-w", "-t", table, op, chain];
    v.extend(rest.iter().copied());
    v
}
