//! Every metadata endpoint, in both families, through the proxy with real
//! SDK clients (botocore and the Rust SDK's aws-config): task credentials
//! on 169.254.170.2, 169.254.170.23 and fd00:ec2::23 (EKS Pod Identity's
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI` hosts, with
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN`), IMDSv2 on 169.254.169.254 and
//! fd00:ec2::254; a denied workload refused at once on each of them with
//! nothing reaching the emulators; and F9, the hop limit of 1 that drops
//! IMDSv2 tokens on their way to bridge containers, mended by the proxy.
//!
//! Controls: without metaguard the same clients get the same answers
//! wherever the lab has a plain path — 169.254.170.2 (ecs-init's DNAT to
//! the agent), 169.254.169.254 and fd00:ec2::254 (routed to the VPC's
//! IMDS). 169.254.170.23 and fd00:ec2::23 have none: on EKS the Pod
//! Identity Agent (a host-network DaemonSet) serves them, and the lab is
//! an ECS host with no such agent, so there nothing answers until
//! metaguard's relay listens there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use libtest_mimic::Failed;
use metaguard_lab::imds::{ImdsSettings, TokenMode};
use metaguard_lab::probe::Outcome;
use metaguard_lab::topology::{addr, Role};
use metaguard_lab::{Lab, Workload};
use serde_json::Value;

use crate::daemon::Daemon;
use crate::ensure;
use crate::proxy::audit_lines;
use crate::support::{self, lab, sdk_json, BOTOCORE_CLIENT};

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "proxy_endpoints::sdks_get_their_own_credentials_on_every_task_metadata_endpoint_in_both_families",
        true,
        sdks_get_their_own_credentials_on_every_task_metadata_endpoint_in_both_families,
    ),
    (
        "proxy_endpoints::sdks_get_imdsv2_over_ipv4_and_ipv6_through_the_proxy",
        true,
        sdks_get_imdsv2_over_ipv4_and_ipv6_through_the_proxy,
    ),
    (
        "proxy_endpoints::a_denied_workload_is_refused_at_once_on_every_endpoint",
        true,
        a_denied_workload_is_refused_at_once_on_every_endpoint,
    ),
    (
        "proxy_endpoints::f9_hop_limit_1_drops_imdsv2_tokens_for_bridge_containers_and_the_proxy_mends_it",
        true,
        f9_hop_limit_1_drops_imdsv2_tokens_for_bridge_containers_and_the_proxy_mends_it,
    ),
];

/// What an EKS pod's `AWS_CONTAINER_AUTHORIZATION_TOKEN` carries (its
/// service account token); the relay passes it on and never logs it.
const AUTH_TOKEN: &str = "lab-service-account-token-6f1d0c";

/// c2 denied both classes in its own namespace (first in file order);
/// every other docker0 container (c1) proxied for both.
fn policy(lab: &Lab) -> Result<(String, PathBuf), Failed> {
    let audit = lab.work_dir().join("audit.jsonl");
    let c2 = Path::new("/run/netns").join(lab.netns_name(Role::C2));
    let text = format!(
        r#"
[proxy]
audit_log = "{}"

[[workload]]
name          = "denied"
netns         = ["{}"]
imds          = "deny"
task_metadata = "deny"

[[workload]]
name          = "containers"
bridges       = ["docker0"]
imds          = "proxy"
task_metadata = "proxy"
"#,
        audit.display(),
        c2.display()
    );
    let path = lab.write_file("endpoints.toml", &text)?;
    Ok((path.display().to_string(), audit))
}

/// The task-metadata endpoints of the default config, as URL hosts.
fn task_metadata_hosts() -> [String; 3] {
    [
        addr::TASK_METADATA_V4.to_string(),
        addr::POD_IDENTITY_V4.to_string(),
        format!("[{}]", addr::POD_IDENTITY_V6),
    ]
}

fn credentials_url(host: &str, w: Workload) -> String {
    format!("http://{host}/v2/credentials/{}", w.credentials_id())
}

/// IMDS as the SDKs are pointed at it: the default (IPv4), the IPv6
/// endpoint mode, and the endpoint variable naming the IPv6 address.
fn imds_variants() -> [(&'static str, Vec<(&'static str, String)>); 3] {
    [
        ("IPv4 (default)", Vec::new()),
        (
            "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6",
            vec![("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6".into())],
        ),
        (
            "AWS_EC2_METADATA_SERVICE_ENDPOINT=http://[fd00:ec2::254]",
            vec![(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                format!("http://[{}]", addr::IMDS_V6),
            )],
        ),
    ]
}

fn pairs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// botocore's container provider and the Rust SDK's ECS provider, as `w`,
/// with `AWS_CONTAINER_CREDENTIALS_FULL_URI=url` and the authorization
/// token: (botocore's JSON, mg-aws-probe's JSON).
fn full_uri_clients(
    lab: &Lab,
    python: &Path,
    w: Workload,
    url: &str,
) -> Result<(Value, Value), Failed> {
    let env = [
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", url),
        ("AWS_CONTAINER_AUTHORIZATION_TOKEN", AUTH_TOKEN),
    ];
    let b = sdk_json(
        lab,
        w,
        python,
        &["-c", BOTOCORE_CLIENT, "credentials"],
        &env,
        "botocore",
    )?;
    let r = sdk_json(
        lab,
        w,
        &support::aws_probe()?,
        &["ecs-credentials"],
        &env,
        "mg-aws-probe",
    )?;
    Ok((b, r))
}

fn access_key(lab: &Lab, w: Workload) -> Result<String, Failed> {
    Ok(lab
        .agent()
        .credentials(w.credentials_id())
        .map(|c| c.access_key_id)
        .ok_or("the agent emulator has no credentials for it")?)
}

fn sdks_get_their_own_credentials_on_every_task_metadata_endpoint_in_both_families(
) -> Result<(), Failed> {
    let Some(python) = support::python()? else {
        return Ok(());
    };
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let w = Workload::BridgeC1;
    let key = access_key(&lab, w)?;
    // Without metaguard: 169.254.170.2 works (ecs-init's DNAT); nothing
    // serves the Pod Identity addresses on an ECS host.
    for host in task_metadata_hosts() {
        let url = credentials_url(&host, w);
        let (b, r) = full_uri_clients(&lab, &python, w, &url)?;
        let served = host == addr::TASK_METADATA_V4.to_string();
        ensure!(
            (b["access_key"] == key.as_str()) == served && (r["ok"] == true) == served,
            "without metaguard, {url} should {}work: botocore {b}, aws-config {r}",
            if served { "" } else { "not " }
        );
    }
    let plain = lab.agent().log().len();
    ensure!(
        plain == 2
            && lab
                .agent()
                .log()
                .entries()
                .iter()
                .all(|e| e.header("authorization") == Some(AUTH_TOKEN)),
        "the agent should have seen the two 169.254.170.2 requests with the token: {:?}",
        lab.agent().log().entries()
    );
    let (config, audit) = policy(&lab)?;
    let daemon = Daemon::start(&lab, &config, &[])?;
    for (i, host) in task_metadata_hosts().into_iter().enumerate() {
        let url = credentials_url(&host, w);
        let before = lab.agent().log().len();
        let (b, r) = full_uri_clients(&lab, &python, w, &url)?;
        ensure!(
            b["access_key"] == key.as_str()
                && r["ok"] == true
                && r["access_key_id"] == key.as_str(),
            "through the relay on {url}: botocore {b}, aws-config {r}\n{}",
            daemon.log_text()
        );
        // The first SDK's request was relayed with its token untouched;
        // every later one, with the same id and token on any endpoint,
        // is answered from memory (docs/proxy.md, "Cache").
        let relayed = lab.agent().log().entries().split_off(before);
        ensure!(
            relayed.len() == usize::from(i == 0)
                && relayed.iter().all(|e| {
                    e.header("authorization") == Some(AUTH_TOKEN)
                        && e.target == format!("/v2/credentials/{}", w.credentials_id())
                        && e.peer.ip().is_loopback()
                }),
            "what the agent got for {url}: {relayed:?}"
        );
    }
    let lines = audit_lines(&audit);
    let served = lines
        .iter()
        .filter(|l| {
            l["service"] == "task_metadata"
                && l["workload"] == "containers"
                && l["decision"] == "allow"
                && l["status"] == 200
        })
        .count();
    ensure!(
        served == 6,
        "audit: {served} relayed requests of 6: {lines:?}"
    );
    let text = crate::proxy::audit_text(&audit);
    ensure!(
        !text.contains(AUTH_TOKEN) && !text.contains(w.credentials_id()),
        "the audit log holds the authorization token or a whole credentials id"
    );
    Ok(())
}

fn sdks_get_imdsv2_over_ipv4_and_ipv6_through_the_proxy() -> Result<(), Failed> {
    let Some(python) = support::python()? else {
        return Ok(());
    };
    let mut lab = lab()?;
    lab.start_docker_api()?;
    // v2 only: a token is the only way in, so a success is IMDSv2.
    lab.imds().set_token_mode(TokenMode::Required);
    let probe = support::aws_probe()?;
    let w = Workload::BridgeC1;
    let clients = |lab: &Lab, env: &[(&'static str, String)]| -> Result<(Value, Value), Failed> {
        let env = pairs(env);
        let b = sdk_json(
            lab,
            w,
            &python,
            &["-c", BOTOCORE_CLIENT, "imds"],
            &env,
            "botocore",
        )?;
        let r = sdk_json(
            lab,
            w,
            &probe,
            &["imds", "/latest/meta-data/instance-id"],
            &env,
            "mg-aws-probe",
        )?;
        Ok((b, r))
    };
    let id = lab.instance_id().to_string();
    let v6_peer = "fd00:17::2".parse::<std::net::IpAddr>()?;
    // Without metaguard: the lab routes both families from c1 to IMDS
    // (IPv4 masqueraded by Docker's rule, IPv6 as c1's own address).
    for (what, env) in imds_variants() {
        lab.imds().log().clear();
        let (b, r) = clients(&lab, &env)?;
        ensure!(
            b["token"] == true && b["instance_id"] == id.as_str() && r["value"] == id.as_str(),
            "without metaguard, {what}: botocore {b}, aws-config {r}"
        );
        let v6 = what != "IPv4 (default)";
        ensure!(
            b["imds_base"]
                .as_str()
                .is_some_and(|u| u.contains("[fd00:ec2::254]") == v6),
            "{what}: botocore used {}",
            b["imds_base"]
        );
        let entries = lab.imds().log().entries();
        ensure!(
            entries.iter().all(|e| (e.peer.ip() == v6_peer) == v6),
            "{what}: IMDS saw {entries:?}"
        );
    }
    let (config, audit) = policy(&lab)?;
    let daemon = Daemon::start(&lab, &config, &[])?;
    for (what, env) in imds_variants() {
        lab.imds().log().clear();
        let lines_before = audit_lines(&audit).len();
        let (b, r) = clients(&lab, &env)?;
        ensure!(
            b["token"] == true && b["instance_id"] == id.as_str() && r["value"] == id.as_str(),
            "through the proxy, {what}: botocore {b}, aws-config {r}\n{}",
            daemon.log_text()
        );
        // Everything IMDS saw came from the proxy on the host, none from
        // c1: the tokens are the proxy's (a caller's PUT never reaches
        // IMDS; the proxy asks for its own six-hour token once), and the
        // instance id is asked for once, then answered from memory.
        let entries = lab.imds().log().entries();
        ensure!(
            entries.len() <= 2
                && entries
                    .iter()
                    .all(|e| e.peer.ip() == std::net::IpAddr::V4(addr::HOST_V4))
                && entries
                    .iter()
                    .filter(|e| e.method == "PUT")
                    .all(|e| e.header("x-aws-ec2-metadata-token-ttl-seconds") == Some("21600"))
                && entries.iter().filter(|e| e.method == "GET").count() <= 1,
            "{what}: IMDS saw {entries:?}"
        );
        let lines = audit_lines(&audit).split_off(lines_before);
        ensure!(
            lines.len() == 4
                && lines.iter().all(|l| l["service"] == "imds"
                    && l["workload"] == "containers"
                    && l["decision"] == "allow"
                    && l["status"] == 200),
            "{what}: audit {lines:?}"
        );
    }
    Ok(())
}

fn a_denied_workload_is_refused_at_once_on_every_endpoint() -> Result<(), Failed> {
    let Some(python) = support::python()? else {
        return Ok(());
    };
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let (config, _audit) = policy(&lab)?;
    let daemon = Daemon::start(&lab, &config, &[])?;
    let denied = Workload::BridgeC2;
    let control = Workload::BridgeC1;
    let imds_urls = [
        Lab::imds_url_v4("/latest/meta-data/instance-id"),
        Lab::imds_url_v6("/latest/meta-data/instance-id"),
    ];
    let logs = |lab: &Lab| (lab.imds().log().len(), lab.agent().log().len());
    let quiet = logs(&lab);
    // Our own probe: refused (reset, ICMP or EPERM), in milliseconds.
    let every = |w: Workload| {
        imds_urls
            .iter()
            .cloned()
            .chain(task_metadata_hosts().iter().map(|h| credentials_url(h, w)))
            .collect::<Vec<_>>()
    };
    let mut times = Vec::new();
    for url in every(denied) {
        let mut spec = lab.http_get(&url);
        spec.timeout_ms = 2000;
        let r = lab.probe(denied, &spec)?;
        ensure!(
            matches!(
                r.outcome,
                Outcome::Refused | Outcome::Unreachable | Outcome::Denied
            ) && r.elapsed() < Duration::from_millis(250),
            "c2 (denied) asking for {url}: {r:?}\n{}",
            daemon.log_text()
        );
        times.push(format!("{url}: {} {:?}", r.outcome.as_str(), r.elapsed()));
    }
    // The SDKs fail too: the IMDS client gets no token, the credentials
    // providers no credentials.
    for (what, env) in imds_variants() {
        let b = sdk_json(
            &lab,
            denied,
            &python,
            &["-c", BOTOCORE_CLIENT, "imds"],
            &pairs(&env),
            "botocore",
        )?;
        ensure!(
            b["token"] == false && b["instance_id"].is_null(),
            "c2 (denied), IMDS {what}: botocore {b}"
        );
    }
    for host in task_metadata_hosts() {
        let url = credentials_url(&host, denied);
        let (b, r) = full_uri_clients(&lab, &python, denied, &url)?;
        ensure!(
            b["access_key"].is_null() && r["ok"] == false,
            "c2 (denied) on {url}: botocore {b}, aws-config {r}"
        );
        times.push(format!(
            "{url}: botocore {} ms (3 attempts, 1 s apart)",
            b["credentials_ms"]
        ));
    }
    ensure!(
        logs(&lab) == quiet,
        "a denied request reached an emulator: IMDS {:?}, agent {:?}",
        lab.imds().log().entries(),
        lab.agent().log().entries()
    );
    eprintln!("denied workload: {}", times.join("; "));
    // Control: the proxied container next to it, same endpoints, its own id.
    for url in every(control) {
        let r = lab.probe(control, &lab.http_get(&url))?;
        ensure!(r.ok(), "c1 (proxied) asking for {url}: {r:?}");
    }
    // IMDSv1 requests always reach IMDS; the three credentials requests
    // (one id, three endpoints, one agent) reach the agent once and are
    // then answered from memory (docs/proxy.md, "Cache").
    ensure!(
        logs(&lab) == (quiet.0 + 2, quiet.1 + 1),
        "the control requests should have reached IMDS twice and the agent once: IMDS {:?}, agent {:?}",
        lab.imds().log().entries(),
        lab.agent().log().entries()
    );
    Ok(())
}

fn f9_hop_limit_1_drops_imdsv2_tokens_for_bridge_containers_and_the_proxy_mends_it(
) -> Result<(), Failed> {
    let Some(python) = support::python()? else {
        return Ok(());
    };
    let mut lab = support::lab_with(ImdsSettings {
        tokens: TokenMode::Required,
        put_response_hop_limit: 1,
        ..ImdsSettings::default()
    })?;
    lab.start_docker_api()?;
    let id = lab.instance_id().to_string();
    let families = [
        ("IPv4", Vec::new()),
        (
            "IPv6",
            vec![("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6".to_string())],
        ),
    ];
    let botocore = |lab: &Lab, w: Workload, env: &[(&'static str, String)]| {
        sdk_json(
            lab,
            w,
            &python,
            &["-c", BOTOCORE_CLIENT, "imds"],
            &pairs(env),
            "botocore",
        )
    };
    let works = |b: &Value| b["token"] == true && b["instance_id"] == id.as_str();
    for (family, env) in &families {
        // A bridge container is one router (the host) behind the VPC: the
        // PUT arrives and IMDS issues a token, but its answer leaves with
        // hop limit 1 and dies at the host's forwarding; the client times
        // out, and a v2-only instance refuses it without a token.
        lab.imds().log().clear();
        let b = botocore(&lab, Workload::BridgeC1, env)?;
        let issued = lab
            .imds()
            .log()
            .entries()
            .iter()
            .filter(|e| e.method == "PUT" && e.status == 200)
            .count();
        ensure!(
            b["token"] == false && b["instance_id"].is_null() && issued == 1,
            "{family}, hop limit 1, bridge container without metaguard: botocore {b}, \
             tokens IMDS issued: {issued}"
        );
        // The awsvpc task's ENI is on the VPC itself: no hop, the token arrives.
        let t = botocore(&lab, Workload::AwsvpcTask, env)?;
        ensure!(
            works(&t),
            "{family}, hop limit 1, awsvpc task: botocore {t}"
        );
        // Control: the same container with hop limit 2 gets its token.
        lab.imds().set_put_response_hop_limit(2);
        let b2 = botocore(&lab, Workload::BridgeC1, env)?;
        lab.imds().set_put_response_hop_limit(1);
        ensure!(
            works(&b2),
            "{family}, hop limit 2, bridge container without metaguard: botocore {b2}"
        );
    }
    let text = "[[workload]]\nname = \"containers\"\nbridges = [\"docker0\"]\nimds = \"proxy\"\n";
    let config = lab.write_file("f9.toml", text)?;
    let daemon = Daemon::start(&lab, &config.display().to_string(), &[])?;
    for (family, env) in &families {
        let b = botocore(&lab, Workload::BridgeC1, env)?;
        ensure!(
            works(&b) && lab.imds().put_response_hop_limit() == 1,
            "{family}, hop limit 1, bridge container through the proxy: botocore {b}\n{}",
            daemon.log_text()
        );
    }
    Ok(())
}
