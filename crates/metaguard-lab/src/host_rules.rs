//! The iptables rules an ECS container instance's own software installs,
//! shared by the emulated host ([`crate::topology`]) and the machine lab's
//! stand-ins ([`crate::standin`]): each rule as `(table, chain, match and
//! target)`.

/// What ecs-init installs: the DNAT of the credentials endpoint to the
/// agent on 127.0.0.1:51679 for traffic from the bridges, and the
/// REDIRECT for host-network callers. With it goes
/// `net.ipv4.conf.all.route_localnet=1`, without which the DNATed packets
/// are dropped as martians (F1).
pub const ECS_INIT: [(&str, &str, &[&str]); 3] = [
    ("nat", "PREROUTING", &DNAT_DOCKER0),
    ("nat", "PREROUTING", &DNAT_ECS_BRIDGE),
    ("nat", "OUTPUT", &REDIRECT),
];

const DNAT_DOCKER0: [&str; 14] = [
    "-i",
    "docker0",
    "-d",
    "169.254.170.2/32",
    "-p",
    "tcp",
    "-m",
    "tcp",
    "--dport",
    "80",
    "-j",
    "DNAT",
    "--to-destination",
    "127.0.0.1:51679",
];
const DNAT_ECS_BRIDGE: [&str; 14] = [
    "-i",
    "ecs-bridge",
    "-d",
    "169.254.170.2/32",
    "-p",
    "tcp",
    "-m",
    "tcp",
    "--dport",
    "80",
    "-j",
    "DNAT",
    "--to-destination",
    "127.0.0.1:51679",
];
const REDIRECT: [&str; 12] = [
    "-d",
    "169.254.170.2/32",
    "-p",
    "tcp",
    "-m",
    "tcp",
    "--dport",
    "80",
    "-j",
    "REDIRECT",
    "--to-ports",
    "51679",
];

/// What dockerd installs for docker0: masquerade of container traffic
/// leaving the host (IPv4; IPv6 is routed, as with Docker's default).
pub const DOCKER_NAT: (&str, &str, &[&str]) = (
    "nat",
    "POSTROUTING",
    &[
        "-s",
        "172.17.0.0/16",
        "!",
        "-o",
        "docker0",
        "-j",
        "MASQUERADE",
    ],
);

/// `iptables -w -t TABLE <op> CHAIN RULE…` as arguments.
pub fn args<'a>(op: &'a str, rule: &(&'a str, &'a str, &'a [&'a str])) -> Vec<&'a str> {
    let (table, chain, rest) = *rule;
    let mut v = vec!["-w", "-t", table, op, chain];
    v.extend_from_slice(rest);
    v
}
