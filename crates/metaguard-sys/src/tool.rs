//! Running external programs: one search path, one error type.
//!
//! Every program metaguard starts (`nft`, `conntrack`, `systemctl`, the
//! tools doctor records the output of, and the lab's `ip`/`iptables`) is
//! found by [`find`] and run by [`run`], so a missing tool always says
//! which package to install, and a failing one always names its command
//! line, where it ran, its exit status and its standard error.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use crate::netns::Netns;

/// Where tools are looked for, in order, before `PATH`: root's sbin
/// directories first, which a service's `PATH` may lack.
pub const SEARCH_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// The Debian package that ships each tool metaguard runs.
const PACKAGES: &[(&str, &str)] = &[
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
    ("ethtool", "ethtool"),
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("iptables-save", "iptables"),
    ("ip6tables-save", "iptables"),
    ("iptables-legacy-save", "iptables"),
    ("ip6tables-legacy-save", "iptables"),
    ("iptables-nft-save", "iptables"),
    ("ip6tables-nft-save", "iptables"),
    ("sysctl", "procps"),
    ("systemctl", "systemd"),
    ("systemd-run", "systemd"),
    ("systemd-nspawn", "systemd-container"),
    ("nsenter", "util-linux"),
    ("umount", "mount"),
    ("wrk", "wrk"),
];

/// The package to install for `program` (its own name when unknown).
pub fn package_of(program: &str) -> &str {
    PACKAGES
        .iter()
        .find(|(p, _)| *p == program)
        .map_or(program, |(_, pkg)| pkg)
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// Looked for in [`SEARCH_DIRS`] and `PATH`.
    #[error("`{program}` is not installed (apt-get install {package})")]
    NotFound { program: String, package: String },
    #[error("cannot run `{command}` in {netns}: {source}")]
    Spawn {
        command: String,
        netns: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed in {netns} ({status}): {stderr}")]
    Failed {
        command: String,
        netns: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
}

impl ToolError {
    /// The tool's standard error, when it ran and failed.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            ToolError::Failed { stderr, .. } => Some(stderr),
            _ => None,
        }
    }
}

/// Finds `program`: a path is taken as it is (when it is a file); a bare
/// name is looked for in [`SEARCH_DIRS`], then in `PATH`.
pub fn find(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    SEARCH_DIRS
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// [`find`], or the error that names the package to install.
pub fn require(program: &str) -> Result<PathBuf, ToolError> {
    find(program).ok_or_else(|| ToolError::NotFound {
        program: program.to_string(),
        package: package_of(program).to_string(),
    })
}

/// A command for `program` (found by [`require`]) with `args`, the C
/// locale (tools' messages are parsed), stdin null and the outputs piped.
pub fn command<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Command, ToolError> {
    let mut cmd = Command::new(require(program)?);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C");
    Ok(cmd)
}

/// What a program printed and how it ended.
#[derive(Debug, Clone)]
pub struct Output {
    pub pid: u32,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    command: String,
    netns: String,
}

impl Output {
    /// Itself when the program exited 0, else [`ToolError::Failed`].
    pub fn success(self) -> Result<Output, ToolError> {
        if self.status.success() {
            Ok(self)
        } else {
            Err(self.into_error())
        }
    }

    /// The [`ToolError::Failed`] describing this run.
    pub fn into_error(self) -> ToolError {
        ToolError::Failed {
            command: self.command,
            netns: self.netns,
            status: self.status,
            stderr: self.stderr.trim().to_string(),
        }
    }
}

/// The command line of `cmd`, for messages: `program arg…` with the
/// program's file name only.
pub fn describe(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let name = program.file_name().unwrap_or(program.as_os_str());
    std::iter::once(name)
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where a command runs, for messages.
pub fn where_(ns: Option<&Netns>) -> String {
    ns.map_or_else(
        || "the host network namespace".to_string(),
        |n| n.path().display().to_string(),
    )
}

/// Runs `cmd` (inside `ns` when given, entered in the child before
/// `exec`), writing `stdin` to it when given, and waits. A program that
/// ran returns its [`Output`] whatever its exit status (see
/// [`Output::success`]).
pub fn run(mut cmd: Command, ns: Option<&Netns>, stdin: Option<&str>) -> Result<Output, ToolError> {
    let command = describe(&cmd);
    let netns = where_(ns);
    if let Some(ns) = ns {
        ns.command(&mut cmd)?;
    }
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let spawn_err = |source| ToolError::Spawn {
        command: command.clone(),
        netns: netns.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let pid = child.id();
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A program that exits without reading (an early error) closes the
        // pipe: its exit status and stderr say why, not EPIPE.
        if let Err(e) = pipe.write_all(text.as_bytes()) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                let _ = child.kill();
                let _ = child.wait();
                return Err(spawn_err(e));
            }
        }
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    Ok(Output {
        pid,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        command,
        netns,
    })
}

/// `program args…` on the host, required to succeed; its stdout.
pub fn output<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String, ToolError> {
    Ok(run(command(program, args)?, None, None)?.success()?.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_names_its_package() {
        let e = require("conntrack-no-such-tool").expect_err("missing");
        assert!(e.to_string().contains("not installed"), "{e}");
        let e = ToolError::NotFound {
            program: "conntrack".into(),
            package: package_of("conntrack").into(),
        };
        assert_eq!(
            e.to_string(),
            "`conntrack` is not installed (apt-get install conntrack)"
        );
    }

    #[test]
    fn a_failing_tool_names_command_status_and_stderr() {
        let cmd = command("sh", &["-c", "echo nope >&2; exit 3"]).expect("sh");
        let e = run(cmd, None, None)
            .expect("ran")
            .success()
            .expect_err("exit 3");
        let msg = e.to_string();
        assert!(msg.contains("`sh -c echo nope >&2; exit 3`"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("nope"), "{msg}");
        assert!(msg.contains("the host network namespace"), "{msg}");
    }

    #[test]
    fn stdin_is_fed_and_stdout_returned() {
        let out = run(
            command("cat", &[] as &[&str]).expect("cat"),
            None,
            Some("hello"),
        )
        .expect("ran")
        .success()
        .expect("ok");
        assert_eq!(out.stdout, "hello");
        assert!(out.pid > 0);
    }
}
