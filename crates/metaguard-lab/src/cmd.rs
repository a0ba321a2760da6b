//! Running the system tools (`ip`, `iptables`, `sysctl`, `nft`) — inside a
//! lab namespace whenever they touch network state.

use std::io::Write;
use std::process::{Command, Stdio};

use metaguard_sys::netns::Netns;

use crate::LabError;

/// The tools the lab needs, with the Debian package that ships each.
pub const REQUIRED_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("sysctl", "procps"),
];

/// Where `tool` is: the product's one search path
/// ([`metaguard_sys::tool::find`]: root's sbin directories, then `PATH`).
pub fn find_tool(tool: &str) -> Option<std::path::PathBuf> {
    metaguard_sys::tool::find(tool)
}

/// Fails with the package to install when a required tool is missing.
pub fn check_tools() -> Result<(), LabError> {
    for (tool, package) in REQUIRED_TOOLS {
        if find_tool(tool).is_none() {
            return Err(LabError::MissingTool {
                tool: (*tool).into(),
                package: (*package).into(),
            });
        }
    }
    Ok(())
}

/// Runs `program args…` (inside `ns` when given), feeding `stdin`, and
/// returns its standard output. A non-zero exit is an error that carries
/// the command line and its standard error.
pub fn run(
    ns: Option<&Netns>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, LabError> {
    let shown = match ns {
        Some(ns) => format!("[{}] {program} {}", ns.path().display(), args.join(" ")),
        None => format!("{program} {}", args.join(" ")),
    };
    let exe = find_tool(program).unwrap_or_else(|| program.into());
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C");
    if let Some(ns) = ns {
        ns.command(&mut cmd)?;
    }
    let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
        command: shown.clone(),
        source,
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|source| LabError::Spawn {
                command: shown.clone(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| LabError::Spawn {
        command: shown.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -batch -` inside `ns`: many changes for one process start.
pub fn ip_batch(ns: &Netns, script: &str) -> Result<(), LabError> {
    run(Some(ns), "ip", &["-batch", "-"], Some(script)).map(drop)
}
