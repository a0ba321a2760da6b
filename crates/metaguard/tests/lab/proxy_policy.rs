//! Custom `[workload.imds_policy]` through the real proxy: two workloads
//! with different policies get different answers for the same path, and
//! the instance role's credentials (`meta-data/iam`) reach only the
//! workload whose policy names them — never one whose broad wildcard
//! merely covers them. Every refusal is paired with the same request
//! answered (without metaguard, or for the other workload) and with the
//! IMDS emulator's log showing that the refused one never arrived.

use std::path::Path;

use libtest_mimic::Failed;
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, Workload};

use crate::daemon::Daemon;
use crate::ensure;
use crate::proxy::json_body;
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[(
    "proxy_policy::imds_policies_answer_per_workload_and_iam_only_where_named",
    true,
    imds_policies_answer_per_workload_and_iam_only_where_named,
)];

/// What one request got, and whether it reached IMDS.
struct Seen {
    status: Option<u16>,
    rule: String,
    body: String,
    arrived: bool,
}

/// One GET of `path` from `w`. Whether it arrived is read from what IMDS
/// logged meanwhile (the proxy does not forward the probe's own header).
fn ask(lab: &Lab, w: Workload, path: &str) -> Result<Seen, Failed> {
    let before = lab.imds().log().len();
    let r = lab.probe(w, &lab.http_get(&Lab::imds_url_v4(path)))?;
    let arrived = lab
        .imds()
        .log()
        .entries()
        .split_off(before)
        .iter()
        .any(|e| e.target == path);
    Ok(Seen {
        status: r.status,
        rule: json_body(&r)["rule"].as_str().unwrap_or("").to_string(),
        body: r.body.unwrap_or_default(),
        arrived,
    })
}

fn imds_policies_answer_per_workload_and_iam_only_where_named() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let role = lab
        .imds()
        .settings()
        .role
        .clone()
        .ok_or("the lab's instance has a role")?;
    let listing = "/latest/meta-data/iam/security-credentials/";
    let document = format!("{listing}{role}");
    let versioned = format!("/2021-03-23/meta-data/iam/security-credentials/{role}");
    let hostname = "/latest/meta-data/hostname";
    let id = "/latest/meta-data/instance-id";
    // Without metaguard both containers read everything.
    for w in [Workload::BridgeC1, Workload::BridgeC2] {
        for path in [listing, &document, &versioned, hostname, id] {
            let s = ask(&lab, w, path)?;
            ensure!(
                s.status == Some(200) && s.arrived,
                "without metaguard {} reading {path}: {:?} {}",
                w.label(),
                s.status,
                s.body
            );
        }
    }
    // c1 ("named-role") names the role's category; c2 ("broad") allows
    // all of meta-data by wildcard and does not mention iam.
    let c1 = Path::new("/run/netns").join(lab.netns_name(Role::C1));
    let text = format!(
        r#"
[[workload]]
name = "named-role"
netns = ["{}"]
imds = "proxy"

[workload.imds_policy]
allow = ["/latest/meta-data/instance-id", "/latest/meta-data/iam/**"]

[[workload]]
name = "broad"
bridges = ["docker0"]
imds = "proxy"

[workload.imds_policy]
allow = ["/latest/meta-data/**", "/*/meta-data/*"]
"#,
        c1.display()
    );
    let config = lab.write_file("policies.toml", &text)?;
    let daemon = Daemon::start(&lab, &config.display().to_string(), &[])?;
    // (path, c1's status, c1's rule, c2's status, c2's rule)
    let expected: [(&str, u16, &str, u16, &str); 5] = [
        (listing, 200, "", 403, "sensitive /*/meta-data/iam/**"),
        (&document, 200, "", 403, "sensitive /*/meta-data/iam/**"),
        // The named glob names /latest only; other versions stay shut.
        (
            &versioned,
            403,
            "sensitive /*/meta-data/iam/**",
            403,
            "sensitive /*/meta-data/iam/**",
        ),
        (hostname, 403, "default deny", 200, ""),
        (id, 200, "", 200, ""),
    ];
    for (path, s1, r1, s2, r2) in expected {
        for (w, status, rule) in [(Workload::BridgeC1, s1, r1), (Workload::BridgeC2, s2, r2)] {
            let s = ask(&lab, w, path)?;
            ensure!(
                s.status == Some(status)
                    && s.rule.starts_with(rule)
                    && s.arrived == (status == 200),
                "{} reading {path}: {:?} (arrived at IMDS: {}) {}, expected {status} {rule:?}\n{}",
                w.label(),
                s.status,
                s.arrived,
                s.body,
                daemon.log_text()
            );
        }
    }
    let doc = ask(&lab, Workload::BridgeC1, &document)?;
    let creds: serde_json::Value = serde_json::from_str(&doc.body)?;
    ensure!(
        creds["AccessKeyId"].is_string(),
        "named-role did not get the role's credentials: {}",
        doc.body
    );
    Ok(())
}
