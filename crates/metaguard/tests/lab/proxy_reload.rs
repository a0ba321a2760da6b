//! The running proxy under SIGHUP: each reload changes its listeners,
//! limits, audit sink and upstreams from the next request on, while a
//! bounded probe loop in a bridge container asks all along for a path
//! that every config denies — and never gets it, nor does IMDS ever see
//! it. A reload whose audit log cannot be opened, or whose listener
//! cannot be bound, changes nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use metaguard_lab::agent::AgentEmulator;
use metaguard_lab::probe::ProbeResult;
use metaguard_lab::servers::{Bind, ServerThread};
use metaguard_lab::topology::{addr, Role};
use metaguard_lab::{Lab, Workload};

use crate::daemon::{blocked_now, Daemon, Signal};
use crate::ensure;
use crate::proxy::{agent_hits, audit_lines, get, json_body};
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "proxy_reload::sighup_reconfigures_the_running_proxy_and_a_denied_path_never_passes",
        true,
        sighup_reconfigures_the_running_proxy_and_a_denied_path_never_passes,
    ),
    (
        "proxy_reload::a_reload_that_cannot_open_its_audit_log_or_bind_changes_nothing",
        true,
        a_reload_that_cannot_open_its_audit_log_or_bind_changes_nothing,
    ),
];

/// Denied by `imds = "deny"` and by the proxy's default `imds_policy`.
const DENIED: &str = "/latest/meta-data/iam/security-credentials/";
const INSTANCE_ID: &str = "/latest/meta-data/instance-id";
/// Where the second ECS agent emulator listens (the lab's is on 51679).
const SECOND_AGENT_PORT: u16 = 51680;
const SECOND_ROLE: &str = "arn:aws:iam::111122223333:role/lab-second-agent";
/// Where the proxy's listeners are: the IMDS proxy on the IMDS address,
/// the relay on the task-metadata address (IPv4).
const IMDS_LISTENER: &str = "169.254.169.254";
const RELAY_LISTENER: &str = "169.254.170.2";

/// What the configs of these tests vary; one bridge workload.
#[derive(Debug, Clone)]
struct Cfg {
    imds: &'static str,
    task_metadata: &'static str,
    audit: PathBuf,
    /// `[proxy] rate` and `burst`; `None`: the defaults (40, 60).
    rate_burst: Option<(u32, u32)>,
    agent_port: u16,
    imds_port: u16,
}

impl Cfg {
    fn new(imds: &'static str, audit: PathBuf) -> Cfg {
        Cfg {
            imds,
            task_metadata: "allow",
            audit,
            rate_burst: None,
            agent_port: addr::AGENT_PORT,
            imds_port: 9470,
        }
    }

    fn text(&self) -> String {
        let limits = self
            .rate_burst
            .map(|(rate, burst)| format!("rate = {rate}\nburst = {burst}\n"))
            .unwrap_or_default();
        format!(
            "[agent]\ncredentials = \"127.0.0.1:{agent}\"\n\n\
             [proxy]\naudit_log = \"{audit}\"\nimds_port = {port}\n{limits}\n\
             [[workload]]\nname = \"bridge-containers\"\n\
             bridges = [\"docker0\", \"br-*\", \"ecs-bridge\"]\n\
             imds = \"{imds}\"\ntask_metadata = \"{tmd}\"\n",
            agent = self.agent_port,
            audit = self.audit.display(),
            port = self.imds_port,
            imds = self.imds,
            tmd = self.task_metadata,
        )
    }
}

/// Rewrites the daemon's config file and sends SIGHUP, counting outcomes.
struct Reloads<'a> {
    daemon: &'a Daemon,
    path: PathBuf,
    applied: usize,
    refused: usize,
}

impl<'a> Reloads<'a> {
    fn new(daemon: &'a Daemon, path: PathBuf) -> Reloads<'a> {
        Reloads {
            daemon,
            path,
            applied: 0,
            refused: 0,
        }
    }

    fn send(&self, cfg: &Cfg) -> Result<(), Failed> {
        std::fs::write(&self.path, cfg.text())?;
        self.daemon.signal(Signal::HUP)?;
        Ok(())
    }

    /// Reloads `cfg`; returns once the daemon says it is applied.
    fn apply(&mut self, cfg: &Cfg) -> Result<(), Failed> {
        self.send(cfg)?;
        self.applied += 1;
        self.daemon.wait_log_count(
            "reloaded: new config applied",
            self.applied,
            Duration::from_secs(5),
        )?;
        Ok(())
    }

    /// Reloads `cfg`, which must be refused; returns the refusal's line.
    fn refuse(&mut self, cfg: &Cfg) -> Result<String, Failed> {
        self.send(cfg)?;
        self.refused += 1;
        self.daemon
            .wait_log_count("reload refused", self.refused, Duration::from_secs(5))?;
        let log = self.daemon.log_text();
        Ok(log
            .lines()
            .filter(|l| l.contains("reload refused"))
            .nth(self.refused - 1)
            .unwrap_or_default()
            .to_string())
    }
}

/// What the probe loop saw: counts by outcome ("403", "429", "refused",
/// …) and every answer that served the path.
#[derive(Debug, Default)]
struct Seen {
    by_outcome: BTreeMap<String, usize>,
    served: Vec<ProbeResult>,
}

/// Asks for `url` from c2 until `stop` (at most 400 probes, 2 minutes;
/// each probe has 500 ms), one every ~20 ms after the previous one.
fn probe_loop(lab: &Lab, url: &str, stop: &AtomicBool) -> Seen {
    const MAX_PROBES: usize = 400;
    const MAX_TIME: Duration = Duration::from_secs(120);
    let started = Instant::now();
    let mut seen = Seen::default();
    for _ in 0..MAX_PROBES {
        if stop.load(Ordering::Relaxed) || started.elapsed() > MAX_TIME {
            break;
        }
        let mut spec = lab.http_get(url);
        spec.timeout_ms = 500;
        let key = match lab.probe(Workload::BridgeC2, &spec) {
            Ok(r) => {
                let key = r
                    .status
                    .map_or_else(|| r.outcome.as_str().to_string(), |s| s.to_string());
                if r.ok() {
                    seen.served.push(r);
                }
                key
            }
            Err(e) => format!("probe error: {e}"),
        };
        *seen.by_outcome.entry(key).or_default() += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    seen
}

/// Requests IMDS received for the denied path.
fn denied_arrivals(lab: &Lab) -> Vec<String> {
    lab.imds()
        .log()
        .entries()
        .into_iter()
        .filter(|e| e.target.contains("/iam/"))
        .map(|e| format!("{} {}", e.method, e.target))
        .collect()
}

/// curl as `w`: whether it succeeded, and what it printed.
pub fn curl(lab: &Lab, w: Workload, args: &[&str]) -> Result<(bool, String), Failed> {
    let out = lab
        .command_in(w, "curl")?
        .args(["-s", "-m", "3"])
        .args(args)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// IMDSv2 from `w`: a token PUT, then the instance id with that token.
/// `None` when no token was issued.
pub fn imdsv2_instance_id(lab: &Lab, w: Workload) -> Result<Option<(String, String)>, Failed> {
    let (ok, token) = curl(
        lab,
        w,
        &[
            "-f",
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
            &Lab::imds_url_v4("/latest/api/token"),
        ],
    )?;
    if !ok || token.is_empty() {
        return Ok(None);
    }
    let (_, out) = curl(
        lab,
        w,
        &[
            "-H",
            &format!("X-aws-ec2-metadata-token: {token}"),
            "-w",
            "\n%{http_code}",
            &Lab::imds_url_v4(INSTANCE_ID),
        ],
    )?;
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    Ok(Some((code.to_string(), body.to_string())))
}

/// `n` GETs of the instance id from c1, back to back on one connection;
/// their status codes.
fn burst_codes(lab: &Lab, n: usize) -> Result<Vec<String>, Failed> {
    let urls = vec![Lab::imds_url_v4(INSTANCE_ID); n];
    Ok(crate::support::curl_codes(lab, Workload::BridgeC1, &urls)?
        .iter()
        .map(u16::to_string)
        .collect())
}

/// The host's listening TCP sockets on the endpoint addresses (the
/// proxy's listeners; IPv4 and IPv6).
fn proxy_sockets(lab: &Lab) -> Result<Vec<String>, Failed> {
    Ok(lab
        .run_in(Role::Host, "ss", &["-Hltn"])?
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter(|local| {
            [IMDS_LISTENER, RELAY_LISTENER, "[fd00:ec2::"]
                .iter()
                .any(|a| local.starts_with(a))
        })
        .map(str::to_string)
        .collect())
}

/// Whether the proxy listens on `addr` (as `ss` prints it).
fn listens_on(lab: &Lab, addr: &str) -> Result<bool, Failed> {
    Ok(proxy_sockets(lab)?.iter().any(|l| l == addr))
}

/// c1's own task credentials through 169.254.170.2: the role they are
/// for (which says which agent served them).
fn c1_credentials_role(lab: &Lab) -> Result<String, Failed> {
    let r = get(
        lab,
        Workload::BridgeC1,
        &Lab::credentials_url(Workload::BridgeC1),
    )?;
    let body = json_body(&r);
    ensure!(
        r.ok() && body["AccessKeyId"].is_string(),
        "c1's credentials: {r:?}"
    );
    Ok(body["RoleArn"].as_str().unwrap_or_default().to_string())
}

fn count(codes: &[String], code: &str) -> usize {
    codes.iter().filter(|c| *c == code).count()
}

fn sighup_reconfigures_the_running_proxy_and_a_denied_path_never_passes() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let denied = Lab::imds_url_v4(DENIED);
    // Without metaguard the loop's request is answered: what every config
    // below must prevent.
    let bare = lab.probe(Workload::BridgeC2, &lab.http_get(&denied))?;
    ensure!(
        bare.ok() && !denied_arrivals(&lab).is_empty(),
        "without metaguard c2 should read {DENIED}: {bare:?}"
    );
    lab.imds().log().clear();
    // A second ECS agent, holding c1's credentials id under another role.
    let second = AgentEmulator::new();
    second.add_credentials(Workload::BridgeC1.credentials_id(), SECOND_ROLE);
    lab.serve_agent(
        &second,
        SocketAddr::from(([127, 0, 0, 1], SECOND_AGENT_PORT)),
    )?;

    let audit_a = lab.work_dir().join("audit-a.jsonl");
    let cfg = Cfg::new("deny", audit_a);
    let path = lab.write_file("reload.toml", &cfg.text())?;
    let daemon = Daemon::start(&lab, &path.display().to_string(), &[])?;
    let mut reloads = Reloads::new(&daemon, path);
    let stop = AtomicBool::new(false);
    let (phases, seen) = std::thread::scope(|s| {
        let looper = s.spawn(|| probe_loop(&lab, &denied, &stop));
        let phases = reload_phases(&lab, &daemon, &mut reloads, cfg, &second);
        stop.store(true, Ordering::Relaxed);
        (phases, looper.join())
    });
    let seen = seen.map_err(|_| "the probe loop panicked")?;
    eprintln!("probe loop for {DENIED}: {:?}", seen.by_outcome);
    if let Err(e) = phases {
        return Err(format!(
            "{}\ndaemon log:\n{}",
            e.message().unwrap_or(""),
            daemon.log_text()
        )
        .into());
    }
    ensure!(
        seen.served.is_empty(),
        "{DENIED} was served during the reloads: {:?}",
        seen.served
    );
    ensure!(
        denied_arrivals(&lab).is_empty(),
        "IMDS received {DENIED}: {:?}",
        denied_arrivals(&lab)
    );
    // The loop ran under both kinds of config: rejected by the rules, and
    // refused by the proxy (the throttled one lasts too short to count on).
    let under = |k: &str| seen.by_outcome.get(k).copied().unwrap_or(0);
    ensure!(
        under("refused") > 0 && under("403") > 0,
        "the probe loop did not span the deny and proxy configs: {:?}",
        seen.by_outcome
    );
    Ok(())
}

/// The reloads, in order, each with what it must change.
fn reload_phases(
    lab: &Lab,
    daemon: &Daemon,
    reloads: &mut Reloads<'_>,
    mut cfg: Cfg,
    second: &AgentEmulator,
) -> Result<(), Failed> {
    // (a) deny → proxy: IMDSv2 through the proxy, where deny gave nothing.
    ensure!(
        imdsv2_instance_id(lab, Workload::BridgeC1)?.is_none(),
        "deny: c1 got an IMDSv2 token"
    );
    cfg.imds = "proxy";
    reloads.apply(&cfg)?;
    let got = imdsv2_instance_id(lab, Workload::BridgeC1)?;
    ensure!(
        got == Some(("200".to_string(), lab.instance_id().to_string())),
        "proxy: IMDSv2 instance id through the proxy: {got:?}"
    );
    ensure!(
        listens_on(lab, &format!("{IMDS_LISTENER}:9470"))?,
        "proxy: nothing listens on {IMDS_LISTENER}:9470: {:?}",
        proxy_sockets(lab)?
    );

    // (b) a small bucket throttles; the defaults again do not.
    let before = burst_codes(lab, 10)?;
    ensure!(count(&before, "200") == 10, "default limits: {before:?}");
    cfg.rate_burst = Some((1, 2));
    reloads.apply(&cfg)?;
    let throttled = burst_codes(lab, 10)?;
    ensure!(
        throttled.len() == 10 && count(&throttled, "429") >= 7,
        "rate 1, burst 2: {throttled:?}"
    );
    cfg.rate_burst = None;
    reloads.apply(&cfg)?;
    // The bucket keeps its (empty) state across a reload and refills at
    // 40/s; the probe loop takes up to ~20/s of that.
    std::thread::sleep(Duration::from_millis(1500));
    let after = burst_codes(lab, 10)?;
    ensure!(count(&after, "200") == 10, "defaults again: {after:?}");

    // (c) a new audit log: the next request's line is there, not in the
    // old one.
    let audit_a = cfg.audit.clone();
    let audit_b = lab.work_dir().join("audit-b.jsonl");
    cfg.audit = audit_b.clone();
    reloads.apply(&cfg)?;
    // Requests that began before the reload (the loop's; 500 ms each)
    // finish with the sink they began with.
    std::thread::sleep(Duration::from_millis(600));
    let old_lines = audit_lines(&audit_a).len();
    let r = get(lab, Workload::BridgeC1, &Lab::imds_url_v4(INSTANCE_ID))?;
    ensure!(r.ok(), "instance id after the audit reload: {r:?}");
    let in_b = audit_lines(&audit_b)
        .iter()
        .filter(|l| l["path"] == INSTANCE_ID && l["status"] == 200)
        .count();
    ensure!(in_b == 1, "the request's audit line is not in {audit_b:?}");
    ensure!(
        audit_lines(&audit_a).len() == old_lines,
        "{audit_a:?} still receives lines"
    );

    // (d) `[agent] credentials` moves: the relay forwards to the new agent.
    cfg.task_metadata = "proxy";
    reloads.apply(&cfg)?;
    let id = Workload::BridgeC1.credentials_id();
    let lab_agent = agent_hits(lab, id);
    let role = c1_credentials_role(lab)?;
    ensure!(
        role != SECOND_ROLE && agent_hits(lab, id) == lab_agent + 1,
        "the lab's agent did not serve c1: {role}"
    );
    cfg.agent_port = SECOND_AGENT_PORT;
    reloads.apply(&cfg)?;
    let role = c1_credentials_role(lab)?;
    let second_hits = || {
        second
            .log()
            .entries()
            .iter()
            .filter(|e| e.target.contains(id))
            .count()
    };
    ensure!(
        role == SECOND_ROLE && second_hits() == 1 && agent_hits(lab, id) == lab_agent + 1,
        "after the reload c1's credentials should come from the second agent: {role}"
    );

    // (e) IMDS proxy → deny: its listener is closed (the relay's stays),
    // and c1 is rejected at once.
    cfg.imds = "deny";
    reloads.apply(&cfg)?;
    let sockets = proxy_sockets(lab)?;
    ensure!(
        !sockets.contains(&format!("{IMDS_LISTENER}:9470"))
            && sockets.contains(&format!("{RELAY_LISTENER}:9470")),
        "deny: the IMDS proxy should be closed, the relay open: {sockets:?}"
    );
    ensure!(
        blocked_now(lab, Workload::BridgeC1, &Lab::imds_url_v4(INSTANCE_ID))?,
        "deny: c1 is not rejected"
    );
    ensure!(
        c1_credentials_role(lab)? == SECOND_ROLE,
        "the relay stopped serving"
    );

    // (f) the last proxy action goes: the proxy closes every listener.
    ensure!(
        !proxy_sockets(lab)?.is_empty(),
        "no relay socket before the last reload"
    );
    cfg.task_metadata = "allow";
    reloads.apply(&cfg)?;
    daemon.wait_log("proxy stopped", Duration::from_secs(1))?;
    let left = proxy_sockets(lab)?;
    ensure!(
        left.is_empty(),
        "listening after the proxy stopped: {left:?}"
    );
    Ok(())
}

fn a_reload_that_cannot_open_its_audit_log_or_bind_changes_nothing() -> Result<(), Failed> {
    let lab = lab()?;
    let audit = lab.work_dir().join("audit.jsonl");
    let good = Cfg::new("proxy", audit.clone());
    let path = lab.write_file("reload.toml", &good.text())?;
    let daemon = Daemon::start(&lab, &path.display().to_string(), &[])?;
    let mut reloads = Reloads::new(&daemon, path);
    let rules = || lab.run_in(Role::Host, "nft", &["list", "table", "inet", "metaguard"]);
    let rules_before = rules()?;
    let sockets_before = proxy_sockets(&lab)?;

    // Each bad config would also move the IMDS proxy's port and throttle
    // to 1 request per second.
    let bad = |audit: PathBuf| Cfg {
        rate_burst: Some((1, 1)),
        imds_port: 9471,
        ..Cfg::new("proxy", audit)
    };
    // An audit log that cannot be opened: a directory.
    let line = reloads.refuse(&bad(lab.work_dir().to_path_buf()))?;
    ensure!(
        line.contains(&format!(
            "cannot open the audit log {}",
            lab.work_dir().display()
        )),
        "the refusal does not say why: {line}"
    );
    // A port someone else holds (on every address, without SO_REUSEPORT).
    let _squatter = ServerThread::start(
        lab.netns(Role::Host),
        "squatter",
        vec![Bind::Tcp(SocketAddr::from(([0, 0, 0, 0], 9471)))],
        |bound| async move {
            let _held = bound;
            std::future::pending::<()>().await
        },
    )?;
    let line = reloads.refuse(&bad(lab.work_dir().join("audit-new.jsonl")))?;
    ensure!(
        line.contains(&format!("cannot listen on {IMDS_LISTENER}:9471")),
        "the refusal does not say why: {line}"
    );

    // Nothing changed: rules, listeners, limits, audit sink.
    ensure!(
        rules()? == rules_before,
        "a refused reload changed the rules"
    );
    ensure!(
        proxy_sockets(&lab)? == sockets_before,
        "a refused reload changed the listeners: {:?}, was {sockets_before:?}",
        proxy_sockets(&lab)?
    );
    let lines_before = audit_lines(&audit).len();
    let codes = burst_codes(&lab, 5)?;
    ensure!(
        count(&codes, "200") == 5,
        "the old limits should allow 5 requests at once: {codes:?}"
    );
    ensure!(
        audit_lines(&audit).len() == lines_before + 5,
        "the requests' audit lines are not in the old log"
    );
    let metrics = lab.probe(
        Workload::HostOther,
        &lab.http_get("http://127.0.0.1:9469/metrics"),
    )?;
    ensure!(
        metrics
            .body
            .as_deref()
            .is_some_and(|b| b.contains("metaguard_reloads_total{result=\"refused\"} 2")),
        "metrics: {metrics:?}"
    );
    Ok(())
}
