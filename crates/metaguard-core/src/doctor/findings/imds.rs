//! IMDS as `--probe` saw it over HTTP (`probes.json`), and the instance's
//! metadata options: a proxy in the path that breaks IMDSv2 (F16), a
//! hop limit of 1 measured from a bridge (F19), IMDSv1 left enabled (F20).

use super::super::path::{Flow, Source, TargetKind};
use super::super::snapshot::{HttpProbe, ImdsProbe, Snapshot};
use super::evidence::Evidence;
use super::{Finding, Fix, Severity};

fn answered(p: &Option<HttpProbe>, status: u16) -> bool {
    p.as_ref()
        .is_some_and(|h| h.outcome == "answered" && h.status == Some(status))
}

/// `PUT /latest/api/token answered 403 (…)`.
fn said(what: &str, h: &HttpProbe) -> String {
    match (h.status, &h.body) {
        (Some(s), Some(b)) if !b.is_empty() => format!("{what} answered {s} ({})", b.trim()),
        (Some(s), _) => format!("{what} answered {s}"),
        (None, _) => format!("{what}: {}", h.outcome),
    }
}

/// The NAT steps of the bridge IMDS v4 flow (a proxy in the path).
fn nat_steps(flows: &[Flow], ev: &mut Evidence) {
    for f in flows
        .iter()
        .filter(|f| f.source == Source::BridgeContainer && f.target == TargetKind::ImdsV4)
    {
        for s in f
            .steps
            .iter()
            .filter(|s| s.action.starts_with("dnat") || s.action.starts_with("redirect"))
        {
            ev.rule(&format!("{}: {} by ", f.name(), s.action), &s.rule);
        }
    }
}

pub(super) fn f16(snap: &Snapshot, flows: &[Flow]) -> Option<Finding> {
    let probes = snap.probes.as_ref()?;
    let mut evidence = Evidence::default();
    for p in &probes.imds {
        let Some(h) = &p.token_put else { continue };
        if h.outcome != "answered" {
            continue;
        }
        let what = format!("from {}: PUT /latest/api/token", p.from);
        match h.status {
            Some(403) => evidence.line(format!(
                "{} — IMDS refuses token requests that carry X-Forwarded-For",
                said(&what, h)
            )),
            Some(400) => evidence.line(format!(
                "{} — the X-aws-ec2-metadata-token-ttl-seconds request header did not arrive",
                said(&what, h)
            )),
            Some(200) if !h.ttl_header => evidence.line(format!(
                "{what} answered 200 without the X-aws-ec2-metadata-token-ttl-seconds header: it was dropped on the way back"
            )),
            _ => {}
        }
    }
    if evidence.is_empty() {
        return None;
    }
    nat_steps(flows, &mut evidence);
    Some(Finding {
        id: "F16",
        severity: Severity::Error,
        title: "a proxy in the path breaks IMDSv2 (adds X-Forwarded-For or drops the TTL header)".into(),
        flows: Vec::new(),
        evidence: evidence.into_lines(),
        explanation: "IMDS refuses a token PUT that carries X-Forwarded-For (403), and needs the X-aws-ec2-metadata-token-ttl-seconds header on the request (400 without it); SDKs read the same header on the answer. A proxy between the workload and IMDS that adds the one or drops the other breaks IMDSv2: SDKs fall back to IMDSv1 or fail.".into(),
        fix: Fix::new("make the proxy pass the TTL header both ways and never add X-Forwarded-For, or replace it", Vec::new(), "metaguard's proxy mode (`imds = \"proxy\"`) never adds X-Forwarded-For, forwards the TTL header and keeps status codes")
            .manual("reconfigure or remove the proxy the evidence points at (e.g. nginx: `proxy_set_header X-Forwarded-For \"\";`)"),
    })
}

/// A bridge's probe where the token PUT got nothing back while a plain
/// request did: the token answer died on the way (hop limit 1).
fn hop_limited(p: &ImdsProbe) -> bool {
    p.from.starts_with("bridge ")
        && p.token_put.as_ref().is_some_and(|h| h.outcome == "timeout")
        && (p.connect.as_deref() == Some("answered")
            || p.tokenless_get
                .as_ref()
                .is_some_and(|h| h.outcome == "answered"))
}

pub(super) fn f19(snap: &Snapshot) -> Option<Finding> {
    let probes = snap.probes.as_ref()?;
    let host_ok = probes
        .imds
        .iter()
        .any(|p| p.from == "host" && answered(&p.token_put, 200));
    let hit: Vec<&ImdsProbe> = probes.imds.iter().filter(|p| hop_limited(p)).collect();
    if !host_ok || hit.is_empty() {
        return None;
    }
    let mut evidence =
        Evidence::listing(["from host: PUT /latest/api/token answered 200".to_string()]);
    for p in &hit {
        evidence.line(format!(
            "from {}: PUT /latest/api/token got no answer within the timeout, while a plain connection to IMDS {}",
            p.from,
            if p.connect.as_deref() == Some("answered") {
                "connects"
            } else {
                "is answered"
            }
        ));
    }
    if let Some(h) = snap.imds_options.as_ref().and_then(|o| o.hop_limit) {
        evidence.line(format!("MetadataOptions HttpPutResponseHopLimit={h}"));
    }
    Some(Finding {
        id: "F19",
        severity: Severity::Warning,
        title: "measured: IMDS's token answer does not survive the hop to bridge containers (hop limit 1)".into(),
        flows: Vec::new(),
        evidence: evidence.into_lines(),
        explanation: "IMDS sends its answer to the token PUT with IP TTL = HttpPutResponseHopLimit. From the host's namespace that answer arrives; a bridge container sits one routed hop further, where a TTL of 1 expires, so its IMDSv2 SDK waits, then falls back to IMDSv1 or fails. A hop limit of 1 is a guard only for IMDSv2 and only if IMDSv1 is off; containers that should use IMDS need 2 (Amazon Linux 2023's default), or metaguard's proxy, which answers from the host.".into(),
        fix: Fix::new("raise the hop limit to 2 where bridge containers should use IMDS, or answer from the host", Vec::new(), "metaguard's proxy answers from the host, where hop count no longer matters")
            .manual("aws ec2 modify-instance-metadata-options --instance-id <id> --http-put-response-hop-limit 2"),
    })
}

pub(super) fn f20(snap: &Snapshot) -> Option<Finding> {
    let mut evidence = Evidence::default();
    if let Some(t) = snap.imds_options.as_ref().and_then(|o| o.tokens.as_deref()) {
        if t == "optional" {
            evidence.line("MetadataOptions HttpTokens=optional");
        }
    }
    for p in snap.probes.iter().flat_map(|p| &p.imds) {
        if answered(&p.tokenless_get, 200) {
            evidence.line(format!(
                "from {}: GET /latest/meta-data/ without a token answered 200",
                p.from
            ));
        }
    }
    if evidence.is_empty() {
        return None;
    }
    Some(Finding {
        id: "F20",
        severity: Severity::Warning,
        title: "IMDSv1 is enabled: metadata and role credentials answer without a token".into(),
        flows: Vec::new(),
        evidence: evidence.into_lines(),
        explanation: "With HttpTokens=optional, a plain GET — the kind an SSRF bug or a misdirected proxy makes — reads the instance role's credentials. IMDSv2's PUT-then-GET and its hop limit are not in the way.".into(),
        fix: Fix::new("require IMDSv2 tokens", Vec::new(), "launch templates with MetadataOptions HttpTokens=required (and the account default: `aws ec2 modify-instance-metadata-defaults --http-tokens required`)")
            .manual("aws ec2 modify-instance-metadata-options --instance-id <id> --http-tokens required (check first that every SDK on the host supports IMDSv2)"),
    })
}
