//! Helpers shared by the lab tests.

use std::path::PathBuf;

use libtest_mimic::Failed;
use metaguard_lab::{Lab, LabOptions};

/// The metaguard binary under test.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metaguard"))
}

pub fn lab() -> Result<Lab, Failed> {
    lab_with(metaguard_lab::imds::ImdsSettings::default())
}

/// A lab whose IMDS emulator describes the instance `imds` describes (its
/// token mode, its `HttpPutResponseHopLimit`).
pub fn lab_with(imds: metaguard_lab::imds::ImdsSettings) -> Result<Lab, Failed> {
    let mut opts = LabOptions::new(exe());
    opts.imds = imds;
    Lab::start(opts).map_err(|e| format!("lab: {e}").into())
}

/// The CIS rule on the lab host: `iptables -I INPUT -d 127.0.0.0/8 ! -i lo
/// -j DROP`, which drops ecs-init's DNAT of 169.254.170.2 to 127.0.0.1
/// (F2).
pub fn cis_loopback_drop(lab: &Lab) -> Result<(), Failed> {
    lab.run_in(
        metaguard_lab::topology::Role::Host,
        "iptables",
        &[
            "-w",
            "-I",
            "INPUT",
            "-d",
            "127.0.0.0/8",
            "!",
            "-i",
            "lo",
            "-j",
            "DROP",
        ],
    )?;
    Ok(())
}

/// `ensure!(cond, "fmt", args…)`: fail the test with a message.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        let ok = $cond;
        if !ok {
            return Err(format!($($arg)+).into());
        }
    };
}

/// The root namespace's network state, as text: links, addresses, routes
/// (both families, all tables), rules and the nft ruleset. Read-only.
pub fn root_netns_state() -> Result<String, Failed> {
    let mut out = String::new();
    for args in [
        &["-d", "link", "show"][..],
        &["addr", "show"],
        &["-4", "route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
        &["-4", "rule", "show"],
        &["-6", "rule", "show"],
    ] {
        out.push_str(&format!("## ip {}\n", args.join(" ")));
        let text = metaguard_lab::cmd::run(None, "ip", args, None).map_err(|e| e.to_string())?;
        // Address lifetimes of DHCP/SLAAC addresses count down by
        // themselves; everything else must be byte-identical.
        for line in text.lines().filter(|l| !l.contains("valid_lft")) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("## nft list ruleset\n");
    out.push_str(
        &metaguard_lab::cmd::run(None, "nft", &["list", "ruleset"], None)
            .map_err(|e| e.to_string())?,
    );
    Ok(out)
}

/// Lab namespaces that exist now for lab `id`.
pub fn netns_of(id: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("mglab-{id}-")))
                .collect()
        })
        .unwrap_or_default()
}

pub use metaguard_lab::testing::python;

/// The Rust SDK's test client (`mg-aws-probe`, crates/metaguard-awsprobe),
/// built next to the metaguard binary.
pub fn aws_probe() -> Result<PathBuf, Failed> {
    exe()
        .parent()
        .map(|d| d.join("mg-aws-probe"))
        .filter(|p| p.is_file())
        .ok_or_else(|| "mg-aws-probe is not built (cargo build -p metaguard-awsprobe)".into())
}

/// botocore as an application in a container uses it, driven by the
/// environment alone: `imds` builds the IMDS client the credential chain
/// builds from the session's configuration (so
/// `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE` and `_ENDPOINT` apply; the
/// session's 1 s timeout and single attempt), fetches a token and reads
/// the instance id with it; `credentials` loads the container credentials
/// provider (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` or `_FULL_URI`, with
/// `AWS_CONTAINER_AUTHORIZATION_TOKEN`). Prints one JSON line: `imds_base`,
/// `token` (bool), `instance_id`, `imds_ms`; `access_key`,
/// `credentials_ms` (and `*_error` on failure). Never prints a secret.
pub const BOTOCORE_CLIENT: &str = r#"
import json, sys, time
import botocore.session
from botocore.credentials import ContainerProvider
from botocore.utils import InstanceMetadataFetcher, resolve_imds_endpoint_mode
out = {}
session = botocore.session.get_session()
if "imds" in sys.argv[1:]:
    config = {
        "ec2_metadata_service_endpoint": session.get_config_variable("ec2_metadata_service_endpoint"),
        "ec2_metadata_service_endpoint_mode": resolve_imds_endpoint_mode(session),
        "ec2_metadata_v1_disabled": session.get_config_variable("ec2_metadata_v1_disabled"),
    }
    f = InstanceMetadataFetcher(
        timeout=session.get_config_variable("metadata_service_timeout"),
        num_attempts=session.get_config_variable("metadata_service_num_attempts"),
        user_agent=session.user_agent(),
        config=config,
    )
    out["imds_base"] = f.get_base_url()
    start = time.monotonic()
    token = f._fetch_metadata_token()
    out["token"] = bool(token)
    try:
        out["instance_id"] = f._get_request("latest/meta-data/instance-id", None, token).text
    except Exception as e:
        out["instance_id"] = None
        out["imds_error"] = repr(e)
    out["imds_ms"] = round((time.monotonic() - start) * 1000)
if "credentials" in sys.argv[1:]:
    start = time.monotonic()
    try:
        c = ContainerProvider().load()
        out["access_key"] = c.get_frozen_credentials().access_key if c else None
    except Exception as e:
        out["access_key"] = None
        out["credentials_error"] = str(e)
    out["credentials_ms"] = round((time.monotonic() - start) * 1000)
print(json.dumps(out))
"#;

/// Runs an SDK client (`program args`) as workload `w` with exactly the
/// environment `env` — plus profile files pointed at /dev/null, so no
/// file on this machine configures it — and reads the JSON object it
/// prints last.
pub fn sdk_json(
    lab: &Lab,
    w: metaguard_lab::Workload,
    program: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    what: &str,
) -> Result<serde_json::Value, Failed> {
    let mut cmd = lab.command_in(w, program)?;
    cmd.args(args)
        .env_clear()
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .envs(env.iter().copied());
    let out = cmd.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).map_err(|e| {
        format!(
            "{what} as {}: {e}: {stdout} {}",
            w.label(),
            String::from_utf8_lossy(&out.stderr)
        )
        .into()
    })
}

/// promtool from Debian's prometheus package, extracted by scripts/test
/// (`ensure_promtool`) into the workspace's .tools/.
fn promtool() -> Option<PathBuf> {
    let local =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools/promtool/usr/bin/promtool");
    [local, PathBuf::from("/usr/bin/promtool")]
        .into_iter()
        .find(|p| p.is_file())
}

/// `promtool check metrics` on a scrape: an error when it complains, or
/// when it is missing under METAGUARD_REQUIRE_ROOT=1 (skipped with a note
/// otherwise).
pub fn promtool_check(body: &str) -> Result<(), Failed> {
    let Some(tool) = promtool() else {
        if std::env::var("METAGUARD_REQUIRE_ROOT").is_ok_and(|v| v == "1") {
            return Err("promtool not found (scripts/test extracts it into .tools/)".into());
        }
        eprintln!(
            "skipped promtool check: promtool not found (scripts/test extracts it into .tools/)"
        );
        return Ok(());
    };
    let mut child = std::process::Command::new(tool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write as _;
    child
        .stdin
        .take()
        .ok_or("promtool's stdin")?
        .write_all(body.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!(
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// `curl` as workload `w`, one request per URL back to back (one
/// connection per host, kept alive), 3 s at most: each answer's status
/// code, 0 where none came.
pub fn curl_codes(
    lab: &Lab,
    w: metaguard_lab::Workload,
    urls: &[String],
) -> Result<Vec<u16>, Failed> {
    let out = lab
        .command_in(w, "curl")?
        .args(["-s", "-m", "3", "-w", "\ncode=%{http_code}\n"])
        .args(urls)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("code="))
        .map(|c| c.parse().unwrap_or(0))
        .collect())
}

/// Whether `w`'s GET of `url` (an IMDS address) is answered, with a probe
/// timeout of `timeout_ms` (the lab's default when `None`). The client's
/// view must agree with the emulator's log (an answer arrived there, or
/// nothing did), and a refusal must be fast (refused or unreachable, never
/// a timeout). `what` names the case in failures.
pub fn imds_answers(
    lab: &Lab,
    w: metaguard_lab::Workload,
    url: &str,
    timeout_ms: Option<u64>,
    what: &str,
) -> Result<bool, Failed> {
    let mut spec = lab.http_get(url);
    if let Some(t) = timeout_ms {
        spec.timeout_ms = t;
    }
    let r = lab.probe(w, &spec)?;
    let arrived = imds_logged(lab, &spec);
    ensure!(
        r.ok() == arrived,
        "{what}: client and server disagree: {r:?}"
    );
    if !r.ok() {
        ensure!(
            matches!(
                r.outcome,
                metaguard_lab::probe::Outcome::Refused | metaguard_lab::probe::Outcome::Unreachable
            ),
            "{what}: not rejected fast: {r:?}"
        );
    }
    Ok(r.ok())
}

/// Whether the IMDS emulator logged probe `spec` (by its `x-lab-probe`
/// header).
pub fn imds_logged(lab: &Lab, spec: &metaguard_lab::probe::ProbeSpec) -> bool {
    !lab.imds()
        .log()
        .with_header("x-lab-probe", &spec.id)
        .is_empty()
}
