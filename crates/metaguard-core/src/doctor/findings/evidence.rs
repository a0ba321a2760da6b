//! What checks share: [`Evidence`], the one way a check writes down the
//! rules and settings behind a finding, and the queries over flows that
//! several checks ask (who is concerned, what stopped or rewrote them).

use std::net::IpAddr;

use super::super::path::{Backend, Expect, Flow, RuleRef, TargetKind};

/// The evidence of one finding: the rules and settings that cause it, in
/// the order the check meets them, each line once.
#[derive(Debug, Default)]
pub(super) struct Evidence(Vec<String>);

impl Evidence {
    /// Evidence that starts as one line per object in `lines` (host
    /// containers, published ports, …), kept as listed.
    pub(super) fn listing(lines: impl IntoIterator<Item = String>) -> Evidence {
        Evidence(lines.into_iter().collect())
    }

    /// Adds a line, unless it is there already.
    pub(super) fn line(&mut self, line: impl Into<String>) {
        let line = line.into();
        if !self.0.contains(&line) {
            self.0.push(line);
        }
    }

    /// Adds the rule (or kernel decision) `r`, after `prefix`.
    pub(super) fn rule(&mut self, prefix: &str, r: &RuleRef) {
        self.line(format!("{prefix}{}", r.describe()));
    }

    /// Adds, for each flow, the rule or kernel decision that decides it,
    /// after `prefix`.
    pub(super) fn deciders<'f>(&mut self, prefix: &str, flows: impl IntoIterator<Item = &'f Flow>) {
        for d in flows.into_iter().filter_map(|f| f.decided_by.as_ref()) {
            self.rule(prefix, d);
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The lines, for [`super::Finding::evidence`].
    pub(super) fn into_lines(self) -> Vec<String> {
        self.0
    }
}

/// The names of the flows a finding concerns.
pub(super) fn names(fs: &[&Flow]) -> Vec<String> {
    fs.iter().map(|f| f.name()).collect()
}

/// Keeps the first of equal elements, in order.
pub(super) fn dedup<T: PartialEq>(v: &mut Vec<T>) {
    let mut out: Vec<T> = Vec::new();
    for x in v.drain(..) {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    *v = out;
}

/// The kernel dropped the flow as a martian (F1).
pub(super) fn is_martian(f: &Flow) -> bool {
    f.decided_by
        .as_ref()
        .is_some_and(|d| d.backend == Backend::Kernel && d.rule.starts_with("martian"))
}

/// A credentials flow the configuration does not block.
pub(super) fn creds_should_reach(f: &Flow) -> bool {
    f.target == TargetKind::TaskCredentials && f.expect != Some(Expect::Block)
}

/// The port on loopback the flow was delivered to, if it was.
pub(super) fn delivered_loopback(f: &Flow) -> Option<u16> {
    let d = f.delivered_to.as_deref()?;
    let (a, p) = d.rsplit_once(':')?;
    let ip: IpAddr = a.trim_matches(['[', ']']).parse().ok()?;
    if ip.is_loopback() {
        p.parse().ok()
    } else {
        None
    }
}

/// An IMDS flow that reaches with no NAT on the way (no proxy in front).
pub(super) fn imds_flow_unguarded(f: &Flow) -> bool {
    f.verdict.reaches()
        && f.steps
            .iter()
            .all(|s| !s.action.starts_with("dnat") && !s.action.starts_with("redirect"))
}
