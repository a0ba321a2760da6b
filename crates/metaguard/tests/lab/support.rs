//! Helpers shared by the lab tests.

use std::path::PathBuf;

use libtest_mimic::Failed;
use metaguard_lab::{Lab, LabOptions};

/// The metaguard binary under test.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metaguard"))
}

pub fn lab() -> Result<Lab, Failed> {
    Lab::start(LabOptions::new(exe())).map_err(|e| format!("lab: {e}").into())
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

/// The Python with botocore: `METAGUARD_PYTHON`, else the workspace venv.
/// `Ok(None)` (with a printed reason) when absent — an error instead when
/// METAGUARD_REQUIRE_PYTHON=1, as under the README's test command.
pub fn python() -> Result<Option<PathBuf>, Failed> {
    let python = std::env::var_os("METAGUARD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")
        });
    let ok = std::process::Command::new(&python)
        .args(["-c", "import botocore"])
        .env_clear()
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Ok(Some(python));
    }
    let reason = format!("no python with botocore at {}", python.display());
    if std::env::var("METAGUARD_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
        return Err(format!("METAGUARD_REQUIRE_PYTHON=1 but {reason}").into());
    }
    eprintln!("skipped: {reason} (./scripts/test creates it)");
    Ok(None)
}
