//! How callers reach the proxy: DNAT to a transparent listener on the
//! endpoint address itself, delivered by a policy route, for the callers
//! of workloads that use it and nobody else. Port 80 stays the host's
//! (F10); a container no workload selects gets exactly what it got
//! without metaguard, with the daemon running or with `apply` alone
//! (when proxied callers are refused at once); the policy routing is
//! verified, healed, and removed without a trace. Each claim is paired
//! with the same probe without metaguard.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use metaguard_lab::host_rules;
use metaguard_lab::probe::{Outcome, ProbeResult};
use metaguard_lab::servers::{Bind, Bound, ServerThread};
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, Workload};

use crate::daemon::Daemon;
use crate::ensure;
use crate::proxy::{agent_hits, audit_lines, get, json_body};
use crate::proxy_reload::imdsv2_instance_id;
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "proxy_datapath::f10_port_80_stays_the_hosts_with_the_proxy_on",
        true,
        f10_port_80_stays_the_hosts_with_the_proxy_on,
    ),
    (
        "proxy_datapath::unselected_bridges_get_what_they_got_without_metaguard",
        true,
        unselected_bridges_get_what_they_got_without_metaguard,
    ),
    (
        "proxy_datapath::verify_reports_the_policy_routing_and_remove_leaves_none",
        true,
        verify_reports_the_policy_routing_and_remove_leaves_none,
    ),
    (
        "proxy_datapath::the_daemon_puts_deleted_policy_routing_back_within_a_second",
        true,
        the_daemon_puts_deleted_policy_routing_back_within_a_second,
    ),
];

/// What the host's own web server answers.
const HOST_SERVER_BODY: &str = "the host's own web server";

/// Both classes proxied for docker0 and ecs-bridge (the task's traffic to
/// 169.254.170.2 enters there), with the audit log in the lab's work dir.
fn proxy_config(lab: &Lab) -> Result<(String, std::path::PathBuf), Failed> {
    let audit = lab.work_dir().join("audit.jsonl");
    let text = format!(
        "[proxy]\naudit_log = \"{}\"\n\n\
         [[workload]]\nname = \"containers\"\nbridges = [\"docker0\", \"ecs-bridge\"]\n\
         imds = \"proxy\"\ntask_metadata = \"proxy\"\n\n\
         # The nft layer's datapath; the BPF layer is the bpf tests'.\n\
         [layers]\nbpf = false\n",
        audit.display()
    );
    let path = lab.write_file("datapath.toml", &text)?;
    Ok((path.display().to_string(), audit))
}

/// A host-network web server (an nginx task in host mode) on
/// `0.0.0.0:80` in the lab host; `Err` when the port cannot be bound.
fn host_web_server(lab: &Lab) -> Result<ServerThread, Failed> {
    let binds = vec![Bind::Tcp(SocketAddr::from(([0, 0, 0, 0], 80)))];
    Ok(ServerThread::start(
        lab.netns(Role::Host),
        "host-web",
        binds,
        |bound| async move {
            for b in bound {
                if let Bound::Tcp(l) = b {
                    let Ok(l) = tokio::net::TcpListener::from_std(l) else {
                        return;
                    };
                    let _ = metaguard_lab::http::serve(l, |_, _, _| async {
                        metaguard_lab::http::text(hyper::StatusCode::OK, HOST_SERVER_BODY)
                    })
                    .await;
                }
            }
        },
    )?)
}

/// A host process asks the host's web server on `addr`:80.
fn host_web_answers(lab: &Lab, addr: &str) -> Result<bool, Failed> {
    let r = get(lab, Workload::HostOther, &format!("http://{addr}:80/"))?;
    Ok(r.ok() && r.body.as_deref() == Some(HOST_SERVER_BODY))
}

fn f10_port_80_stays_the_hosts_with_the_proxy_on() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let callers = [Workload::BridgeC1, Workload::AwsvpcTask];
    // Without metaguard: the host's server starts and serves, and the
    // containers reach the agent through ecs-init's DNAT.
    {
        let _web = host_web_server(&lab)?;
        for addr in ["127.0.0.1", "10.0.0.10"] {
            ensure!(
                host_web_answers(&lab, addr)?,
                "without metaguard: the host's server on {addr}:80 does not answer"
            );
        }
    }
    for w in callers {
        let before = agent_hits(&lab, w.credentials_id());
        let r = get(&lab, w, &Lab::credentials_url(w))?;
        ensure!(
            r.ok() && agent_hits(&lab, w.credentials_id()) == before + 1,
            "without metaguard: {} does not get its credentials from the agent: {r:?}",
            w.label()
        );
    }

    let (config, audit) = proxy_config(&lab)?;
    let daemon = Daemon::start(&lab, &config, &[])?;
    // With the proxy serving, the host's server still binds 0.0.0.0:80.
    let _web = host_web_server(&lab).map_err(|e| {
        format!(
            "with the proxy on, the host's server cannot bind 0.0.0.0:80 (F10): {}",
            e.message().unwrap_or("")
        )
    })?;
    for addr in ["127.0.0.1", "10.0.0.10"] {
        ensure!(
            host_web_answers(&lab, addr)?,
            "with the proxy on: the host's server on {addr}:80 does not answer"
        );
    }
    let ss = lab.run_in(Role::Host, "ss", &["-Hltn"])?;
    ensure!(
        !ss.lines().any(|l| l.contains("169.254.170.2:80 ")),
        "something listens on 169.254.170.2:80:\n{ss}"
    );
    // The containers and the task get their own credentials from the
    // relay (an audit line, then the agent) through 169.254.170.2:80 …
    for w in callers {
        let before = agent_hits(&lab, w.credentials_id());
        let r = get(&lab, w, &Lab::credentials_url(w))?;
        ensure!(
            r.ok()
                && json_body(&r)["AccessKeyId"].is_string()
                && agent_hits(&lab, w.credentials_id()) == before + 1,
            "{}: its credentials through the relay: {r:?}\n{}",
            w.label(),
            daemon.log_text()
        );
    }
    let relayed = audit_lines(&audit)
        .iter()
        .filter(|l| {
            l["service"] == "task_metadata"
                && l["status"] == 200
                && l["path"].as_str().is_some_and(|p| p.starts_with("/v2/"))
        })
        .count();
    ensure!(
        relayed == callers.len(),
        "the relay's audit log has {relayed} credentials lines, not {}: {:?}",
        callers.len(),
        audit_lines(&audit)
    );
    // … and IMDSv2 through the IMDS proxy.
    for w in callers {
        let got = imdsv2_instance_id(&lab, w)?;
        ensure!(
            got == Some(("200".to_string(), lab.instance_id().to_string())),
            "{}: IMDSv2 through the proxy: {got:?}",
            w.label()
        );
    }
    ensure!(
        audit_lines(&audit)
            .iter()
            .any(|l| l["service"] == "imds" && l["path"] == "/latest/api/token"),
        "no IMDS token request in the audit log"
    );
    Ok(())
}

/// A bridge no workload selects (`br-other`, with the ecs-init DNAT an
/// operator might add for it) and a container on it; its namespace.
fn unselected_bridge(lab: &mut Lab) -> Result<String, Failed> {
    let ns = lab.add_netns("other")?;
    let host = lab.netns_name(Role::Host);
    lab.ip_in(
        &host,
        &format!(
            "link add br-other type bridge\naddr add 172.18.0.1/16 dev br-other\nlink set br-other up\n\
             link add vethother type veth peer name eth0 netns {ns}\nlink set vethother master br-other up\n"
        ),
    )?;
    lab.ip_in(
        &ns,
        "link set eth0 up\naddr add 172.18.0.2/16 dev eth0\nroute add default via 172.18.0.1\n",
    )?;
    // The DNAT ecs-init installs for its bridges, and Docker's
    // masquerade for the new network.
    for rule in [
        host_rules::credentials_dnat("br-other"),
        host_rules::masquerade("172.18.0.0/16", "br-other"),
    ] {
        lab.run_in(Role::Host, "iptables", &host_rules::args("-A", &rule))?;
    }
    Ok(ns)
}

/// What a probe got, without what differs between two identical runs.
fn outcome(r: &ProbeResult) -> (Outcome, Option<u16>, serde_json::Value) {
    let body = json_body(r);
    (r.outcome, r.status, body["RoleArn"].clone())
}

fn unselected_bridges_get_what_they_got_without_metaguard() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let other = unselected_bridge(&mut lab)?;
    // c1's credentials id, asked for from the unselected container: the
    // agent serves any id to anyone who reaches it.
    let id = Workload::BridgeC1.credentials_id();
    let url = Lab::credentials_url(Workload::BridgeC1);
    let from_other = |lab: &Lab, url: &str| -> Result<ProbeResult, Failed> {
        let child = lab.spawn_probe_in(&other, &lab.http_get(url))?;
        Ok(lab.finish_probe(child)?)
    };
    let ask = |lab: &Lab| -> Result<(ProbeResult, usize), Failed> {
        let before = agent_hits(lab, id);
        let r = from_other(lab, &url)?;
        Ok((r, agent_hits(lab, id) - before))
    };
    let instance_id = Lab::imds_url_v4("/latest/meta-data/instance-id");
    let (bare, hits) = ask(&lab)?;
    ensure!(
        bare.ok() && hits == 1,
        "without metaguard the unselected container reaches the agent: {bare:?}"
    );
    let imds_bare = from_other(&lab, &instance_id)?;
    ensure!(
        imds_bare.ok(),
        "without metaguard: IMDS from br-other: {imds_bare:?}"
    );

    let (config, audit) = proxy_config(&lab)?;
    // apply alone: nobody listens. The unselected container is untouched;
    // the proxied one is refused at once and the agent sees nothing.
    let out = lab.metaguard(&["apply", "--config", &config])?;
    ensure!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (applied, hits) = ask(&lab)?;
    ensure!(
        outcome(&applied) == outcome(&bare) && hits == 1,
        "apply alone changed what the unselected container gets: {applied:?}, was {bare:?}"
    );
    let c1_before = agent_hits(&lab, id);
    let started = Instant::now();
    let r = get(&lab, Workload::BridgeC1, &url)?;
    ensure!(
        r.outcome == Outcome::Refused && started.elapsed() < Duration::from_secs(1),
        "apply alone: the proxied container should be refused at once: {r:?} after {:?}",
        started.elapsed()
    );
    ensure!(
        agent_hits(&lab, id) == c1_before,
        "apply alone: the proxied container's request reached the agent"
    );

    // The daemon serving: the same, and the relay never sees the
    // unselected container.
    let daemon = Daemon::start(&lab, &config, &[])?;
    let (served, hits) = ask(&lab)?;
    ensure!(
        outcome(&served) == outcome(&bare) && hits == 1,
        "with the daemon, the unselected container gets {served:?}, was {bare:?}\n{}",
        daemon.log_text()
    );
    let imds_now = from_other(&lab, &instance_id)?;
    ensure!(
        outcome(&imds_now) == outcome(&imds_bare) && imds_now.body == imds_bare.body,
        "with the daemon, IMDS from br-other: {imds_now:?}, was {imds_bare:?}"
    );
    let r = get(&lab, Workload::BridgeC1, &url)?;
    ensure!(
        r.ok() && json_body(&r)["AccessKeyId"].is_string(),
        "c1 through the relay: {r:?}"
    );
    let lines = audit_lines(&audit);
    ensure!(
        lines.len() == 1 && !lines.iter().any(|l| l.to_string().contains("172.18.0.2")),
        "the relay should have seen c1's request only: {lines:?}"
    );
    Ok(())
}

/// `ip rule` and `ip route show table all`, both families, in the lab
/// host.
fn routing_state(lab: &Lab) -> Result<String, Failed> {
    let mut out = String::new();
    for args in [
        &["-4", "rule", "show"][..],
        &["-6", "rule", "show"],
        &["-4", "route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
    ] {
        out.push_str(&lab.run_in(Role::Host, "ip", args)?);
    }
    out.push_str(&lab.run_in(Role::Host, "sysctl", &["net.ipv4.tcp_fwmark_accept"])?);
    Ok(out)
}

const RULE_V4: &str = "fwmark 0x40000000/0x40000000 lookup 19783 pref 90";
const ROUTE: &str = "local default dev lo table 19783";

fn verify_reports_the_policy_routing_and_remove_leaves_none() -> Result<(), Failed> {
    let lab = lab()?;
    let (config, _) = proxy_config(&lab)?;
    let verify = || -> Result<(bool, String), Failed> {
        let out = lab.metaguard(&["verify", "--config", &config])?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };
    let before = routing_state(&lab)?;
    // An IPv6 route that was there before metaguard: used, never claimed.
    lab.run_in(
        Role::Host,
        "ip",
        &[
            "-6", "route", "add", "local", "default", "dev", "lo", "table", "19783",
        ],
    )?;
    let ours_not = routing_state(&lab)?;
    let out = lab.metaguard(&["apply", "--config", &config])?;
    ensure!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = lab.run_in(Role::Host, "ip", &["-4", "rule", "show"])?;
    ensure!(
        rules.contains(&format!("from all {}", RULE_V4.replace(" pref 90", ""))),
        "no rule: {rules}"
    );
    let (ok, text) = verify()?;
    ensure!(ok, "verify after apply: {text}");
    // Someone deletes the IPv4 rule: verify says so and exits 1; apply
    // puts it back.
    let mut del = vec!["-4", "rule", "del"];
    del.extend(RULE_V4.split(' '));
    lab.run_in(Role::Host, "ip", &del)?;
    let (ok, text) = verify()?;
    ensure!(
        !ok && text.contains(&format!("IPv4 rule {RULE_V4}")),
        "verify with the rule deleted: {text}"
    );
    let out = lab.metaguard(&["apply", "--config", &config])?;
    ensure!(out.status.success(), "apply again");
    ensure!(verify()?.0, "verify after the second apply");
    // remove takes away what metaguard added and nothing else: the
    // pre-existing route stays; without it the host is as before.
    let out = lab.metaguard(&["remove"])?;
    ensure!(
        out.status.success(),
        "remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = routing_state(&lab)?;
    ensure!(
        after == ours_not,
        "after remove:\n{after}\nbefore apply:\n{ours_not}"
    );
    let mut del = vec!["-6", "route", "del"];
    del.extend(ROUTE.split(' '));
    lab.run_in(Role::Host, "ip", &del)?;
    ensure!(
        routing_state(&lab)? == before,
        "the lab host's routing changed"
    );
    Ok(())
}

fn the_daemon_puts_deleted_policy_routing_back_within_a_second() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let (config, _) = proxy_config(&lab)?;
    let daemon = Daemon::start(&lab, &config, &[])?;
    let w = Workload::BridgeC1;
    let served = |lab: &Lab| -> Result<bool, Failed> {
        let r = get(lab, w, &Lab::credentials_url(w))?;
        Ok(r.ok() && json_body(&r)["AccessKeyId"].is_string())
    };
    ensure!(served(&lab)?, "c1 through the relay");
    for (what, args) in [
        ("rule", ["-4", "rule", "del"]),
        ("route", ["-4", "route", "del"]),
    ] {
        let spec = if what == "rule" { RULE_V4 } else { ROUTE };
        let mut del = args.to_vec();
        del.extend(spec.split(' '));
        let started = Instant::now();
        lab.run_in(Role::Host, "ip", &del)?;
        let show = if what == "rule" {
            vec!["-4", "rule", "show"]
        } else {
            vec!["-4", "route", "show", "table", "19783"]
        };
        let needle = if what == "rule" {
            "lookup 19783"
        } else {
            "local default dev lo"
        };
        let back = loop {
            let now = lab.run_in(Role::Host, "ip", &show).unwrap_or_default();
            if now.contains(needle) {
                break Some(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(1) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = back.ok_or_else(|| {
            format!(
                "the {what} is not back within a second\n{}",
                daemon.log_text()
            )
        })?;
        eprintln!("measured: the policy {what} was back after {took:?}");
        ensure!(
            served(&lab)?,
            "c1 through the relay after the {what} came back"
        );
    }
    let log = daemon.log_text();
    ensure!(
        log.lines()
            .filter(|l| l.contains("\"healed\"") && l.contains("policy-routing-deleted"))
            .count()
            == 2,
        "the daemon's log does not say it healed twice:\n{log}"
    );
    Ok(())
}
