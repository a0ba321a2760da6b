//! The proxy as shipped: the same unit runs `imds = "proxy"` and
//! `task_metadata = "proxy"` — the relay binds port 80 (CAP_NET_BIND_SERVICE),
//! sets net.ipv4.tcp_fwmark_accept (a writable path in a read-only
//! /proc/sys), connects to IMDS and the agent (no IPAddressDeny=), and
//! writes the audit log where docs/config.md says it may
//! (/var/log/metaguard/, the unit's LogsDirectory=).

use libtest_mimic::Failed;
use metaguard_lab::standin::api::TaskSpec;

use crate::ensure;
use crate::support::{expect_active, expect_own_credentials, http, imdsv2_instance_id, installed};

pub const TESTS: &[(&str, crate::TestFn)] = &[(
    "proxy::containers_get_imdsv2_and_their_own_credentials_through_the_shipped_unit",
    containers_get_imdsv2_and_their_own_credentials_through_the_shipped_unit,
)];

/// Tasks first: an awsvpc task's requests to the proxy enter the host from
/// ecs-bridge, so with the bridge workload first (first match wins) they
/// would be the bridge workload's.
pub const PROXY_CONFIG: &str = r#"[proxy]
audit_log = "/var/log/metaguard/audit.log"

[[workload]]
name          = "awsvpc-tasks"
netns         = ["ecs-tasks"]
imds          = "proxy"
task_metadata = "proxy"

[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "br-*", "ecs-bridge"]
imds          = "proxy"
task_metadata = "proxy"
"#;

const SENSITIVE: &str = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";

fn containers_get_imdsv2_and_their_own_credentials_through_the_shipped_unit() -> Result<(), Failed>
{
    let mut host = installed(Some(PROXY_CONFIG))?;
    expect_active(&host, "metaguard.service")?;
    let bridge = host.run_task(&TaskSpec::single("web", "bridge"))?;
    // Its application container runs as an unprivileged user, as most
    // images do: the daemon must not need to open its /proc files.
    let mut spec = TaskSpec::single("api", "awsvpc");
    spec.containers[0].user = Some(1000);
    let awsvpc = host.run_task(&spec)?;
    let instance_id = host.lab()?.instance_id().to_string();
    // The proxy listens on [proxy] imds_port of the endpoint addresses:
    // port 80 stays free for the host's own services (F10).
    let ss = host.machine()?.exec_ok(&["ss", "-Htln"])?;
    ensure!(
        ss.contains("169.254.170.2:9470") && !ss.contains(":80 "),
        "listening in the machine:\n{ss}"
    );
    for (task, other) in [(&bridge, &awsvpc), (&awsvpc, &bridge)] {
        let mode = &task.info.network_mode;
        let c = task.first();
        let r = imdsv2_instance_id(&host, c)?;
        ensure!(
            r.ok() && r.body.as_deref() == Some(instance_id.as_str()),
            "{mode}: IMDSv2 through the proxy: {r:?}\naudit log:\n{}\n{}",
            host.disk()
                .read("/var/log/metaguard/audit.log")
                .unwrap_or_default(),
            host.machine()
                .map(|m| m.journal_text("metaguard.service"))
                .unwrap_or_default()
        );
        let spec = http(&host, "GET", SENSITIVE, &[])?;
        let r = host.probe(c, &spec)?;
        ensure!(
            r.status == Some(403),
            "{mode}: the role's credentials path: {r:?}"
        );
        ensure!(
            host.lab()?
                .imds()
                .log()
                .with_header("x-lab-probe", &spec.id)
                .is_empty(),
            "{mode}: IMDS saw the refused request"
        );
        expect_own_credentials(&host, task, "through the relay")?;
        let spec = http(&host, "GET", &other.info.credentials_url(), &[])?;
        let r = host.probe(c, &spec)?;
        ensure!(
            r.status == Some(403),
            "{mode}: another task's credentials (F13): {r:?}"
        );
        let agent_saw = host
            .agent()?
            .requests()
            .map_err(|e| e.to_string())?
            .iter()
            .any(|q| q["headers"].to_string().contains(&spec.id));
        ensure!(!agent_saw, "{mode}: the agent saw the refused request");
    }
    let audit = host.disk().read("/var/log/metaguard/audit.log")?;
    for w in ["bridge-containers", "awsvpc-tasks"] {
        ensure!(audit.contains(w), "audit log has no line for {w}:\n{audit}");
    }
    ensure!(
        !audit.contains("SecretAccessKey") && !audit.contains(&awsvpc.info.credentials_id),
        "the audit log carries a secret or a whole credentials id:\n{audit}"
    );
    // The control: without metaguard the same request reaches IMDS.
    let m = host.machine()?;
    m.exec_ok(&["systemctl", "stop", "metaguard.service"])?;
    m.exec_ok(&["metaguard", "remove"])?;
    let spec = http(&host, "GET", SENSITIVE, &[])?;
    let r = host.probe(bridge.first(), &spec)?;
    ensure!(r.ok(), "without metaguard: {r:?}");
    Ok(())
}
