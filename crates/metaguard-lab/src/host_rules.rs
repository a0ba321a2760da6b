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
    let mut rules: Vec<Rule> = ["docker0", "ecs-bridge"]
        .into_iter()
        .map(|iface| {
            let mut m = vec!["-i", iface];
            m.extend(CREDENTIALS);
            m.extend(["-j", "DNAT", "--to-destination", "127.0.0.1:51679"]);
            ("nat", "PREROUTING", m)
        })
        .collect();
    let mut redirect = CREDENTIALS.to_vec();
    redirect.extend(["-j", "REDIRECT", "--to-ports", "51679"]);
    rules.push(("nat", "OUTPUT", redirect));
    rules
}

/// What dockerd installs for docker0: masquerade of container traffic
/// leaving the host (IPv4; IPv6 is routed, as with Docker's default).
pub fn docker_nat() -> Rule {
    (
        "nat",
        "POSTROUTING",
        vec![
            "-s",
            "172.17.0.0/16",
            "!",
            "-o",
            "docker0",
            "-j",
            "MASQUERADE",
        ],
    )
}

/// `iptables -w -t TABLE <op> CHAIN RULE…` as arguments.
pub fn args<'a>(op: &'a str, rule: &'a Rule) -> Vec<&'a str> {
    let (table, chain, rest) = rule;
    let mut v = vec!["-w", "-t", table, op, chain];
    v.extend(rest.iter().copied());
    v
}
