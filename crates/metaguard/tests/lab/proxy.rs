//! The metadata proxy in the lab (`imds`/`task_metadata = "proxy"`): task
//! credentials work on a CIS-hardened host without route_localnet (F1,
//! F2), a workload gets only its own credentials id (F13) whatever source
//! address it uses (F15), IMDS paths follow the path policy, and real SDK
//! clients (botocore, the Rust aws-config crate) work through the proxy.
//! Every "works" is paired with the same request failing without
//! metaguard, and every "refused" with the upstream's log showing that
//! nothing arrived.

use std::time::Duration;

use libtest_mimic::Failed;
use metaguard_lab::probe::{Outcome, ProbeResult};
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, Workload};
use serde_json::Value;

use crate::daemon::Daemon;
use crate::ensure;
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "proxy::f1_f2_credentials_relay_works_on_a_cis_host_without_route_localnet",
        true,
        f1_f2_credentials_relay_works_on_a_cis_host_without_route_localnet,
    ),
    (
        "proxy::f13_f15_a_workload_gets_only_its_own_credentials_whatever_its_address",
        true,
        f13_f15_a_workload_gets_only_its_own_credentials_whatever_its_address,
    ),
    (
        "proxy::f13_each_host_network_container_gets_only_its_own_credentials",
        true,
        f13_each_host_network_container_gets_only_its_own_credentials,
    ),
    (
        "proxy::tmds_redact_shows_a_container_only_itself",
        true,
        tmds_redact_shows_a_container_only_itself,
    ),
    (
        "proxy::imds_path_policy_and_imdsv2_fidelity",
        true,
        imds_path_policy_and_imdsv2_fidelity,
    ),
    (
        "proxy::real_sdk_clients_through_the_proxy",
        true,
        real_sdk_clients_through_the_proxy,
    ),
    (
        "proxy::sigterm_mid_traffic_loses_no_audit_line",
        true,
        sigterm_mid_traffic_loses_no_audit_line,
    ),
    (
        "proxy::forwarded_requests_end_with_a_reset_and_leave_no_time_wait",
        true,
        forwarded_requests_end_with_a_reset_and_leave_no_time_wait,
    ),
];

/// Proxies both classes for every container bridge (which also carries
/// the awsvpc task's traffic to 169.254.170.2), with the audit log in the
/// lab's work dir.
fn proxy_policy(lab: &Lab) -> Result<(String, std::path::PathBuf), Failed> {
    let audit = lab.work_dir().join("audit.jsonl");
    let text = format!(
        r#"
[proxy]
audit_log = "{}"

[[workload]]
name          = "containers"
bridges       = ["docker0", "ecs-bridge"]
imds          = "proxy"
task_metadata = "proxy"

[[workload]]
name          = "tasks"
netns         = ["ecs-tasks"]
imds          = "proxy"
task_metadata = "proxy"
"#,
        audit.display()
    );
    let path = lab.write_file("proxy.toml", &text)?;
    Ok((path.display().to_string(), audit))
}

/// The lab host hardened: route_localnet off everywhere and the CIS rule
/// `INPUT -d 127.0.0.0/8 ! -i lo -j DROP`.
fn harden(lab: &Lab) -> Result<(), Failed> {
    for key in [
        "net.ipv4.conf.all.route_localnet=0",
        "net.ipv4.conf.docker0.route_localnet=0",
        "net.ipv4.conf.ecs-bridge.route_localnet=0",
    ] {
        lab.run_in(Role::Host, "sysctl", &["-qw", key])?;
    }
    crate::support::cis_loopback_drop(lab)
}

pub fn get(lab: &Lab, w: Workload, url: &str) -> Result<ProbeResult, Failed> {
    Ok(lab.probe(w, &lab.http_get(url))?)
}

pub fn json_body(r: &ProbeResult) -> Value {
    r.body
        .as_deref()
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null)
}

pub fn agent_hits(lab: &Lab, id: &str) -> usize {
    lab.agent()
        .log()
        .entries()
        .iter()
        .filter(|e| e.target.contains(id))
        .count()
}

/// `thief` asking for `victim`'s task credentials is refused (403, the
/// F13 rule) and the agent never sees the request.
fn refused_f13(
    lab: &Lab,
    daemon: &Daemon,
    thief: Workload,
    victim: Workload,
) -> Result<(), Failed> {
    let before = agent_hits(lab, victim.credentials_id());
    let r = get(lab, thief, &Lab::credentials_url(victim))?;
    let body = json_body(&r);
    ensure!(
        r.status == Some(403) && body["rule"].as_str().is_some_and(|s| s.contains("F13")),
        "{} asking for {}'s credentials: {r:?}\n{}",
        thief.label(),
        victim.label(),
        daemon.log_text()
    );
    ensure!(
        agent_hits(lab, victim.credentials_id()) == before,
        "{} asking for {}'s credentials: the refused request reached the agent",
        thief.label(),
        victim.label()
    );
    Ok(())
}

/// The audit log's text, once the daemon has written what it buffered:
/// lines reach the file at most `AUDIT_FLUSH_EVERY` after their answer.
pub fn audit_text(path: &std::path::Path) -> String {
    std::thread::sleep(metaguard_proxy::AUDIT_FLUSH_EVERY * 5);
    std::fs::read_to_string(path).unwrap_or_default()
}

pub fn audit_lines(path: &std::path::Path) -> Vec<Value> {
    audit_text(path)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn f1_f2_credentials_relay_works_on_a_cis_host_without_route_localnet() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    harden(&lab)?;
    let workloads = [Workload::BridgeC1, Workload::AwsvpcTask];
    // Without metaguard: ecs-init's DNAT to 127.0.0.1 is dropped (martian
    // without route_localnet, and the CIS rule): a silent timeout.
    for w in workloads {
        let r = get(&lab, w, &Lab::credentials_url(w))?;
        ensure!(
            r.outcome == Outcome::Timeout,
            "{}: expected the F1/F2 timeout without metaguard, got {r:?}",
            w.label()
        );
        ensure!(
            agent_hits(&lab, w.credentials_id()) == 0,
            "the agent saw a request"
        );
    }
    let (policy, audit) = proxy_policy(&lab)?;
    let daemon = Daemon::start(&lab, &policy, &[])?;
    for w in workloads {
        let r = get(&lab, w, &Lab::credentials_url(w))?;
        let body = json_body(&r);
        ensure!(
            r.ok() && body["AccessKeyId"].is_string() && body["Token"].is_string(),
            "{}: credentials through metaguard's relay: {r:?}\n{}",
            w.label(),
            daemon.log_text()
        );
        ensure!(
            agent_hits(&lab, w.credentials_id()) == 1,
            "the agent saw no request"
        );
    }
    // The relay did not need ecs-init's rules: the host still has
    // route_localnet=0 and the CIS drop.
    let sysctl = lab.run_in(
        Role::Host,
        "sysctl",
        &["-n", "net.ipv4.conf.all.route_localnet"],
    )?;
    ensure!(sysctl.trim() == "0", "route_localnet changed: {sysctl}");
    let lines = audit_lines(&audit);
    ensure!(
        lines
            .iter()
            .filter(|l| l["decision"] == "allow" && l["status"] == 200)
            .count()
            >= 2,
        "audit log: {lines:?}"
    );
    let text = audit_text(&audit);
    for w in workloads {
        ensure!(
            !text.contains(w.credentials_id()),
            "the audit log holds a whole credentials id"
        );
        let secret = lab
            .agent()
            .credentials(w.credentials_id())
            .map(|c| c.secret_access_key.clone());
        if let Some(s) = secret {
            ensure!(!text.contains(&s), "the audit log holds a secret");
        }
    }
    Ok(())
}

/// Two containers on the host network (the lab's `hostnet1` and the agent,
/// both host processes in cgroups below `docker/`) in one proxied
/// workload: each is told apart by the cgroup that created its socket, so
/// each gets its own task credentials and neither gets the other's —
/// where before (and without metaguard) either got both.
fn f13_each_host_network_container_gets_only_its_own_credentials() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let pair = [Workload::HostNetwork, Workload::Agent];
    // Without metaguard: ecs-init's REDIRECT hands any host process any
    // task's credentials (F13).
    for (thief, victim) in [(pair[0], pair[1]), (pair[1], pair[0])] {
        let r = get(&lab, thief, &Lab::credentials_url(victim))?;
        ensure!(
            r.ok(),
            "F13 not reproduced without metaguard ({} asking for {}'s): {r:?}",
            thief.label(),
            victim.label()
        );
    }
    let audit = lab.work_dir().join("audit.jsonl");
    let text = format!(
        "[proxy]\naudit_log = \"{}\"\n\n[[workload]]\nname = \"host-network\"\n\
         cgroups = [\"{}/docker\"]\nimds = \"deny\"\ntask_metadata = \"proxy\"\n",
        audit.display(),
        lab.cgroup_root()
    );
    let policy = lab.write_file("host-proxy.toml", &text)?;
    let daemon = Daemon::start(&lab, &policy.display().to_string(), &[])?;
    for w in pair {
        let before = agent_hits(&lab, w.credentials_id());
        let r = get(&lab, w, &Lab::credentials_url(w))?;
        let body = json_body(&r);
        ensure!(
            r.ok() && body["AccessKeyId"].is_string(),
            "{}: its own credentials through the relay: {r:?}\n{}",
            w.label(),
            daemon.log_text()
        );
        ensure!(
            agent_hits(&lab, w.credentials_id()) == before + 1,
            "{}: the agent did not serve it",
            w.label()
        );
    }
    for (thief, victim) in [(pair[0], pair[1]), (pair[1], pair[0])] {
        refused_f13(&lab, &daemon, thief, victim)?;
    }
    // The audit log names each caller's container.
    let lines = audit_lines(&audit);
    for name in ["ecs-lab-batch-1-worker-h1", "ecs-agent"] {
        ensure!(
            lines.iter().any(|l| l["status"] == 200
                && l["origin"]
                    .as_str()
                    .is_some_and(|o| o.contains(&format!("container {name}")))),
            "no audit line with container {name}: {lines:?}"
        );
    }
    Ok(())
}

/// Task metadata with `tmds = "redact"` (the training-platform case): c1
/// and c2 are one task, and without metaguard c1's own endpoint shows c2,
/// every ARN, the cluster and both addresses. Through the proxy c1 gets
/// its task document with only itself in it and none of those; c2's
/// endpoint and the stats are refused before the agent sees them; `allow`
/// serves the document whole.
fn tmds_redact_shows_a_container_only_itself() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let c1_id =
        metaguard_lab::docker::FakeContainer::id_for(&format!("{}-ecs-lab-web-1-app-c1", lab.id()));
    let sibling_traces = [
        "sidecar",
        "arn:aws",
        "cluster/lab",
        "172.17.0.3",
        "172.17.0.2",
    ];
    let task_url = Lab::tmds_url(Workload::BridgeC1, "/task");
    let bare = get(&lab, Workload::BridgeC1, &task_url)?;
    let text = bare.body.clone().unwrap_or_default();
    ensure!(
        bare.ok() && sibling_traces.iter().all(|t| text.contains(t)),
        "without metaguard c1's task document should show everything: {bare:?}"
    );
    let tmds_hits = || {
        lab.agent()
            .log()
            .entries()
            .iter()
            .filter(|e| e.target.starts_with("/v4/"))
            .count()
    };
    for (mode, whole) in [("redact", false), ("allow", true)] {
        let text = format!(
            "[[workload]]\nname = \"containers\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n\
             task_metadata = \"proxy\"\ntmds = \"{mode}\"\n"
        );
        let policy = lab.write_file(&format!("tmds-{mode}.toml"), &text)?;
        let daemon = Daemon::start(&lab, &policy.display().to_string(), &[])?;
        let r = get(&lab, Workload::BridgeC1, &task_url)?;
        let body = json_body(&r);
        let text = r.body.clone().unwrap_or_default();
        ensure!(
            r.ok() && body["DesiredStatus"] == "RUNNING",
            "{mode}: c1's own task document: {r:?}\n{}",
            daemon.log_text()
        );
        if whole {
            ensure!(
                sibling_traces.iter().all(|t| text.contains(t)),
                "allow: the document should be whole: {text}"
            );
        } else {
            let containers = body["Containers"].as_array().cloned().unwrap_or_default();
            ensure!(
                containers.len() == 1 && containers[0]["DockerId"] == c1_id.as_str(),
                "redact: only c1 itself should remain: {text}"
            );
            for t in sibling_traces {
                ensure!(!text.contains(t), "redact: {t:?} survived: {text}");
            }
        }
        for (url, why) in [
            (Lab::tmds_url(Workload::BridgeC2, "/task"), "not owned"),
            (Lab::tmds_url(Workload::BridgeC2, ""), "not owned"),
        ]
        .into_iter()
        .chain((!whole).then(|| {
            (
                Lab::tmds_url(Workload::BridgeC1, "/task/stats"),
                "statistics",
            )
        })) {
            let before = tmds_hits();
            let r = get(&lab, Workload::BridgeC1, &url)?;
            ensure!(
                r.status == Some(403)
                    && json_body(&r)["rule"]
                        .as_str()
                        .is_some_and(|s| s.contains(why)),
                "{mode}: c1 asking for {url}: {r:?}"
            );
            ensure!(
                tmds_hits() == before,
                "{mode}: a refused {url} reached the agent"
            );
        }
        drop(daemon);
    }
    Ok(())
}

fn f13_f15_a_workload_gets_only_its_own_credentials_whatever_its_address() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    // Without metaguard any container gets any task's credentials (F13).
    let stolen = get(
        &lab,
        Workload::BridgeC2,
        &Lab::credentials_url(Workload::AwsvpcTask),
    )?;
    ensure!(
        stolen.ok(),
        "F13 not reproduced without metaguard: {stolen:?}"
    );
    let (policy, audit) = proxy_policy(&lab)?;
    let daemon = Daemon::start(&lab, &policy, &[])?;
    for (thief, victim) in [
        (Workload::BridgeC2, Workload::AwsvpcTask),
        (Workload::BridgeC1, Workload::BridgeC2),
        (Workload::AwsvpcTask, Workload::BridgeC1),
    ] {
        refused_f13(&lab, &daemon, thief, victim)?;
    }
    let lines = audit_lines(&audit);
    ensure!(
        lines.iter().any(|l| l["decision"] == "deny"
            && l["status"] == 403
            && l["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/v2/credentials/task"))),
        "no audit line for the refused request: {lines:?}"
    );
    // F15, IP reuse: c1 goes away and c2 takes its address (the host's
    // neighbour entry is forgotten, so c2 now answers for 172.17.0.2).
    // Identity is the bridge port, not the address: c2 is still c2.
    let c1_hits = agent_hits(&lab, Workload::BridgeC1.credentials_id());
    lab.run_in(Role::C1, "ip", &["link", "set", "eth0", "down"])?;
    lab.run_in(Role::Host, "ip", &["neigh", "flush", "dev", "docker0"])?;
    lab.run_in(
        Role::C2,
        "ip",
        &["addr", "add", "172.17.0.2/16", "dev", "eth0"],
    )?;
    let url = Lab::credentials_url(Workload::BridgeC1);
    let mut curl = lab.command_in(Workload::BridgeC2, "curl")?;
    curl.args([
        "-s",
        "-m",
        "3",
        "-w",
        "\n%{http_code}",
        "--interface",
        "172.17.0.2",
        &url,
    ]);
    let out = curl.output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        text.trim_end().ends_with("403") && text.contains("F13"),
        "c2 with c1's address asking for c1's credentials: {text:?} (curl {})",
        out.status
    );
    ensure!(
        agent_hits(&lab, Workload::BridgeC1.credentials_id()) == c1_hits,
        "the refused request reached the agent"
    );
    let lines = audit_lines(&audit);
    ensure!(
        lines.iter().any(|l| l["status"] == 403
            && l["origin"]
                .as_str()
                .is_some_and(|o| o.contains("mglab") && o.contains("-c2"))),
        "the audit log does not name c2's namespace as the caller: {lines:?}"
    );
    Ok(())
}

fn imds_path_policy_and_imdsv2_fidelity() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let (policy, audit) = proxy_policy(&lab)?;
    let _daemon = Daemon::start(&lab, &policy, &[])?;
    let base = "http://169.254.169.254";
    let id = get(
        &lab,
        Workload::BridgeC1,
        &format!("{base}/latest/meta-data/instance-id"),
    )?;
    ensure!(
        id.ok() && id.body.as_deref() == Some(lab.instance_id()),
        "instance-id through the proxy: {id:?}"
    );
    lab.imds().log().clear();
    for (path, rule) in [
        (
            "/latest/meta-data/iam/security-credentials/",
            "deny /latest/meta-data/iam/**",
        ),
        (
            "/latest/meta-data/iam/../iam/info",
            "deny /latest/meta-data/iam/**",
        ),
        (
            "/latest//meta-data/./iam/info",
            "deny /latest/meta-data/iam/**",
        ),
        ("/latest/user-data", "deny /latest/user-data"),
        ("/latest/meta-data/public-keys/", "default deny"),
    ] {
        let r = get(&lab, Workload::BridgeC1, &format!("{base}{path}"))?;
        let body = json_body(&r);
        ensure!(
            r.status == Some(403) && body["rule"].as_str().is_some_and(|s| s.starts_with(rule)),
            "{path}: {r:?}"
        );
    }
    for path in [
        "/latest/meta-data/%2e%2e/x",
        "/latest/meta-data/a%2Fb",
        "/../latest",
    ] {
        let r = get(&lab, Workload::BridgeC1, &format!("{base}{path}"))?;
        ensure!(r.status == Some(400), "{path}: {r:?}");
    }
    ensure!(
        lab.imds().log().is_empty(),
        "a refused request reached IMDS: {:?}",
        lab.imds().log().entries()
    );
    // IMDSv2 token PUT: answered by the proxy itself, as IMDS answers it
    // (the TTL header echoed), with a token that works only for the
    // container it was issued to; no caller's PUT or token reaches IMDS,
    // which sees the proxy's own token (issue 23).
    let out = lab.run_in(
        Role::C1,
        "curl",
        &[
            "-s",
            "-m",
            "3",
            "-D",
            "-",
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 120",
            &format!("{base}/latest/api/token"),
        ],
    )?;
    ensure!(
        out.starts_with("HTTP/1.1 200")
            && out
                .to_ascii_lowercase()
                .contains("x-aws-ec2-metadata-token-ttl-seconds: 120"),
        "token PUT: {out}"
    );
    let token = out
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_string())
        .unwrap_or_default();
    let with_token = |role: Role| instance_id_with_token(&lab, role, &token);
    let own = with_token(Role::C1)?;
    ensure!(
        own == format!("{} 200", lab.instance_id()),
        "c1 with its own token: {own}"
    );
    let stolen = with_token(Role::C2)?;
    ensure!(
        stolen.ends_with(" 401"),
        "c2 with c1's token must get IMDS's 401: {stolen}"
    );
    let seen = lab.imds().log().entries();
    ensure!(
        seen.iter().all(|e| e.header("x-forwarded-for").is_none()
            && e.header("x-aws-ec2-metadata-token-ttl-seconds") != Some("120")
            && e.header("x-aws-ec2-metadata-token") != Some(token.as_str())),
        "what IMDS received: {seen:?}"
    );
    let xff = lab.run_in(
        Role::C1,
        "curl",
        &[
            "-s",
            "-m",
            "3",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 120",
            "-H",
            "X-Forwarded-For: 1.2.3.4",
            &format!("{base}/latest/api/token"),
        ],
    )?;
    ensure!(xff.trim() == "403", "token PUT with XFF: {xff}");
    // Status codes are IMDS's own: a bad token is 401 in v2-required mode.
    lab.imds()
        .set_token_mode(metaguard_lab::imds::TokenMode::Required);
    let v1 = get(
        &lab,
        Workload::BridgeC1,
        &format!("{base}/latest/meta-data/instance-id"),
    )?;
    ensure!(
        v1.status == Some(401),
        "IMDSv1 against a v2-only instance: {v1:?}"
    );
    let lines = audit_lines(&audit);
    ensure!(
        lines
            .iter()
            .any(|l| l["rule"].as_str().is_some_and(|r| r.contains("iam")) && l["status"] == 403),
        "audit: {lines:?}"
    );
    Ok(())
}

/// The proxy's connections to IMDS end with a reset once the answer is
/// read (`upstream::send`, `SO_LINGER` zero): one reset from the lab host
/// per forwarded request, no TIME_WAIT socket towards IMDS, and none of
/// those connections' conntrack entries in TIME_WAIT — which a FIN
/// exchange leaves for two minutes on every forwarded request, also when
/// the proxy closes second. With `SO_LINGER` zero taken out the test
/// fails: 0 resets for 40 forwarded requests. And IMDS receives 3
/// segments per forwarded request, not 5: the proxy's upstream sockets
/// hold the handshake's last ACK for the request and send no ACK of an
/// answer they reset (`upstream::socket`, `TCP_QUICKACK` off; with the
/// option taken out: 200 segments for 40 forwarded requests).
fn forwarded_requests_end_with_a_reset_and_leave_no_time_wait() -> Result<(), Failed> {
    const N: u64 = 40;
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let (policy, _) = proxy_policy(&lab)?;
    let _daemon = Daemon::start(&lab, &policy, &[])?;
    let url = "http://169.254.169.254/latest/meta-data/instance-id";
    // Once, so that the proxy's own first steps are behind us.
    let first = get(&lab, Workload::BridgeC1, url)?;
    ensure!(first.ok(), "through the proxy: {first:?}");
    lab.imds().log().clear();
    let before = lab.nstat(Role::Host, "TcpOutRsts")?;
    let segments_before = lab.nstat(Role::Vpc, "TcpInSegs")?;
    // IMDSv1: never answered from memory, each one forwarded.
    for _ in 0..N {
        let r = get(&lab, Workload::BridgeC1, url)?;
        ensure!(
            r.ok() && r.body.as_deref() == Some(lab.instance_id()),
            "through the proxy: {r:?}"
        );
    }
    let forwarded = lab.imds().log().entries().len() as u64;
    ensure!(forwarded == N, "{forwarded} of {N} requests reached IMDS");
    let resets = lab.nstat(Role::Host, "TcpOutRsts")? - before;
    ensure!(
        resets >= N,
        "{resets} resets from the lab host for {N} forwarded requests"
    );
    // What IMDS receives per forwarded request: the SYN, the request
    // (carrying the handshake's last ACK) and the reset; no ACK of its
    // answer (upstream::socket). A plain client sends 5: the handshake's
    // ACK and one for the answer besides.
    let segments = lab.nstat(Role::Vpc, "TcpInSegs")? - segments_before;
    ensure!(
        segments < 4 * N,
        "IMDS received {segments} segments for {N} forwarded requests (3 each expected)"
    );
    let host = metaguard_lab::topology::addr::HOST_V4.to_string();
    let waiting = lab.run_in(
        Role::Host,
        "ss",
        &["-Htan", "state", "time-wait", "dst", "169.254.169.254"],
    )?;
    ensure!(
        waiting.trim().is_empty(),
        "TIME_WAIT towards IMDS on the host:\n{waiting}"
    );
    // The proxy's own connections: from the host's address, to IMDS's.
    let entries = lab.run_in(
        Role::Host,
        "conntrack",
        &["-L", "-p", "tcp", "-s", &host, "-d", "169.254.169.254"],
    )?;
    let states: Vec<&str> = entries
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    ensure!(
        states.len() as u64 >= N && !states.contains(&"TIME_WAIT"),
        "conntrack entries of the proxy's connections to IMDS: {states:?}\n{entries}"
    );
    eprintln!(
        "measured: {N} forwarded requests, {resets} resets, {segments} segments to IMDS, \
         conntrack states {:?}",
        states.iter().fold(
            std::collections::BTreeMap::<&str, usize>::new(),
            |mut m, s| {
                *m.entry(s).or_default() += 1;
                m
            }
        )
    );
    Ok(())
}

/// `curl -s -m 3` in lab namespace `role` with `args`, the status
/// appended: "<body> <status>".
pub fn curl_with_status(lab: &Lab, role: Role, args: &[&str]) -> Result<String, Failed> {
    let mut all = vec!["-s", "-m", "3", "-w", " %{http_code}"];
    all.extend_from_slice(args);
    Ok(lab.run_in(role, "curl", &all)?)
}

/// `curl` in lab namespace `role` for the instance id through
/// 169.254.169.254, with IMDSv2 token `token`: "<body> <status>".
pub fn instance_id_with_token(lab: &Lab, role: Role, token: &str) -> Result<String, Failed> {
    curl_with_status(
        lab,
        role,
        &[
            "-H",
            &format!("X-aws-ec2-metadata-token: {token}"),
            "http://169.254.169.254/latest/meta-data/instance-id",
        ],
    )
}

/// Runs an SDK client in workload `w` with only its own task's
/// `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` in the environment and reads
/// the JSON object it prints last.
fn client_json(
    lab: &Lab,
    w: Workload,
    program: &std::path::Path,
    args: &[&str],
    what: &str,
) -> Result<Value, Failed> {
    let uri = format!("/v2/credentials/{}", w.credentials_id());
    crate::support::sdk_json(
        lab,
        w,
        program,
        args,
        &[("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", &uri)],
        what,
    )
}

fn real_sdk_clients_through_the_proxy() -> Result<(), Failed> {
    let Some(python) = crate::support::python()? else {
        return Ok(());
    };
    let mut lab = lab()?;
    lab.start_docker_api()?;
    harden(&lab)?;
    lab.imds()
        .set_token_mode(metaguard_lab::imds::TokenMode::Required);
    let botocore = r#"
import json
from botocore.utils import InstanceMetadataFetcher
from botocore.credentials import ContainerProvider
f = InstanceMetadataFetcher(timeout=2, num_attempts=1, env={})
token = f._fetch_metadata_token()
try:
    iid = f._get_request("latest/meta-data/instance-id", None, token).text if token else None
except Exception as e:
    iid = "error: %r" % e
try:
    c = ContainerProvider().load()
    key = c.get_frozen_credentials().access_key if c else None
except Exception as e:
    key = "error: %s" % e
print(json.dumps({"token": bool(token), "instance_id": iid, "access_key": key}))
"#;
    let run = |lab: &Lab, w: Workload| client_json(lab, w, &python, &["-c", botocore], "botocore");
    let probe = crate::support::aws_probe()?;
    let rust =
        |lab: &Lab, w: Workload, args: &[&str]| client_json(lab, w, &probe, args, "mg-aws-probe");
    // Without metaguard, on this hardened host with a hop limit of 1 the
    // instance would also break IMDSv2; here: credentials time out (F2).
    let before = run(&lab, Workload::BridgeC1)?;
    ensure!(
        before["access_key"].is_null()
            || before["access_key"]
                .as_str()
                .is_some_and(|k| k.starts_with("error")),
        "botocore got credentials on a hardened host without metaguard: {before}"
    );
    let (policy, audit) = proxy_policy(&lab)?;
    let daemon = Daemon::start(&lab, &policy, &[])?;
    std::thread::sleep(Duration::from_millis(50));
    for w in [Workload::BridgeC1, Workload::AwsvpcTask] {
        let want_key = lab
            .agent()
            .credentials(w.credentials_id())
            .map(|c| c.access_key_id.clone())
            .ok_or("agent emulator has no credentials")?;
        let b = run(&lab, w)?;
        ensure!(
            b["token"] == true
                && b["instance_id"] == lab.instance_id()
                && b["access_key"] == want_key.as_str(),
            "botocore as {}: {b}\n{}\naudit: {}\nimds log: {:?}",
            w.label(),
            daemon.log_text(),
            audit_text(&audit),
            lab.imds().log().entries()
        );
        let imds = rust(&lab, w, &["imds", "/latest/meta-data/instance-id"])?;
        ensure!(
            imds["ok"] == true && imds["value"] == lab.instance_id(),
            "aws-config IMDS as {}: {imds}",
            w.label()
        );
        let ecs = rust(&lab, w, &["ecs-credentials"])?;
        ensure!(
            ecs["ok"] == true && ecs["access_key_id"] == want_key.as_str(),
            "aws-config ECS provider as {}: {ecs}",
            w.label()
        );
        // The SDK cannot be talked into the instance role.
        let role = rust(
            &lab,
            w,
            &["imds", "/latest/meta-data/iam/security-credentials/"],
        )?;
        ensure!(
            role["ok"] == false,
            "aws-config read the instance role through the proxy: {role}"
        );
    }
    Ok(())
}

/// The audit log is buffered (written by its own thread, at most
/// `AUDIT_FLUSH_EVERY` after each answer), and SIGTERM loses none of it:
/// c1 asks IMDS through the proxy in a loop while the daemon is stopped;
/// every answer c1 got has its line in the audit log. Answers after the
/// daemon is gone would be a fail-open: the loop goes on a while to show
/// there are none.
fn sigterm_mid_traffic_loses_no_audit_line() -> Result<(), Failed> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let mut lab = lab()?;
    lab.start_docker_api()?;
    let (policy, audit) = proxy_policy(&lab)?;
    let mut daemon = Daemon::start(&lab, &policy, &[])?;
    let url = Lab::imds_url_v4("/latest/meta-data/instance-id");
    let first = get(&lab, Workload::BridgeC1, &url)?;
    ensure!(
        first.ok(),
        "through the proxy: {first:?}\n{}",
        daemon.log_text()
    );
    let lab = Arc::new(lab);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (lab, stop, url) = (lab.clone(), stop.clone(), url.clone());
        std::thread::spawn(move || -> (u64, u64) {
            let (mut sent, mut answered) = (0, 0);
            while !stop.load(Ordering::Relaxed) && sent < 3000 {
                sent += 1;
                if get(&lab, Workload::BridgeC1, &url).is_ok_and(|r| r.ok()) {
                    answered += 1;
                }
            }
            (sent, answered)
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    daemon.signal(metaguard_lab::daemon::Signal::TERM)?;
    let code = daemon.wait_exit(Duration::from_secs(10))?;
    ensure!(code == Some(0), "the daemon exited {code:?} on SIGTERM");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (sent, answered) = load.join().map_err(|_| "the load thread panicked")?;
    let audited = audit_lines(&audit)
        .iter()
        .filter(|l| l["status"] == 200 && l["path"] == "/latest/meta-data/instance-id")
        .count() as u64;
    ensure!(
        answered >= 10 && audited == answered + 1 && answered < sent,
        "sent {sent}, answered {answered} (and one before), audited {audited}\n{}",
        daemon.log_text()
    );
    eprintln!("measured: sent {sent}, answered {answered}, audit lines {audited}");
    Ok(())
}
