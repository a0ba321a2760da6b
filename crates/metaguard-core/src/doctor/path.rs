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
//!
//! # Code map
//!
//! * `model` — the public flow model ([`Flow`], [`RuleRef`], [`Verdict`],
//!   …) and the evaluator's working types (packet, trace, three-valued
//!   truth);
//! * `walk` — the evaluator skeleton both rule languages share: base
//!   chains by priority at a hook, and the walk of a chain over a
//!   `RuleDialect`;
//! * `ipt` — the iptables dialect (iptables-save rules, legacy and nft);
//! * `nft` — the nftables dialect (nft JSON rules);
//! * `route` — the kernel's part: locality, route lookup, martians,
//!   forwarding, and the order of hooks;
//! * `flows` — the sources, the config's intent, and every flow;
//! * `localnet` — the direct-to-127.0.0.1 flows from container bridges
//!   that the route_localnet reach-around (F17) opens.

mod flows;
mod ipt;
mod localnet;
mod model;
mod nft;
mod route;
#[cfg(test)]
mod test_support;
mod walk;

pub use flows::{container_bridges, evaluate, has_awsvpc};
pub use localnet::loopback_flows;
pub use model::{
    Backend, Endpoints, Expect, Flow, Hook, RuleRef, Source, Step, TargetKind, Verdict,
};
pub use walk::nft_tables;
