//! Helpers: the binary under test, scratch directories, running tools.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use libtest_mimic::Failed;

/// The metaguard binary under test.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metaguard"))
}

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where scripts/common.sh extracts cloud-init (without installing it).
pub fn cloud_init_root() -> PathBuf {
    repo().join("target/tools/cloud-init")
}

/// `ensure!(cond, "fmt", args…)`: fail the test with a message.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+).into());
        }
    };
}

/// An external tool a test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Shellcheck,
    SystemdAnalyze,
    Python,
    CloudInit,
    Package,
}

impl Tool {
    /// Why the tool cannot be used, or `None` when it can.
    pub fn missing(self) -> Option<String> {
        let need = |ok: bool, what: &str| (!ok).then(|| what.to_string());
        match self {
            Tool::Shellcheck => need(
                which("shellcheck").is_some(),
                "shellcheck is not installed (apt-get install shellcheck)",
            ),
            Tool::SystemdAnalyze => need(
                which("systemd-analyze").is_some(),
                "systemd-analyze is not installed (apt-get install systemd; it verifies units without systemd as PID 1)",
            ),
            Tool::Python => need(
                Path::new(PYTHON).is_file(),
                "/usr/bin/python3 is not installed (apt-get install python3)",
            ),
            Tool::CloudInit => {
                if !Path::new(PYTHON).is_file() {
                    return Some("/usr/bin/python3 is not installed".into());
                }
                need(
                    cloud_init_root().join("usr/bin/cloud-init").is_file(),
                    "cloud-init is not extracted in target/tools/cloud-init (./scripts/test does it: apt-get download cloud-init + dpkg -x, plus its python3-* dependencies)",
                )
            }
            Tool::Package => {
                for (tool, how) in [
                    ("cargo-deb", "cargo install --locked cargo-deb"),
                    ("lintian", "apt-get install lintian"),
                    ("dpkg", "a Debian system"),
                    ("man", "apt-get install man-db"),
                ] {
                    if which(tool).is_none() {
                        return Some(format!("{tool} is not installed ({how})"));
                    }
                }
                None
            }
        }
    }
}

pub const PYTHON: &str = "/usr/bin/python3";

/// A tool on PATH, or in the sbin directories, or in ~/.cargo/bin.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin"));
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(Into::into))
        .chain(cargo_bin)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A scratch directory, removed on drop.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(what: &str) -> Result<Scratch, Failed> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "metaguard-deploy-{}-{n}-{what}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Scratch(p))
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command and returns its output (any exit status).
pub fn output(cmd: &mut Command) -> Result<Output, Failed> {
    cmd.output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}").into())
}

/// Runs a command that must succeed; returns its standard output.
pub fn run_ok(cmd: &mut Command) -> Result<String, Failed> {
    let out = output(cmd)?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `metaguard render ARGS…`, which must succeed.
pub fn render(args: &[&str]) -> Result<String, Failed> {
    run_ok(Command::new(exe()).arg("render").args(args))
}

/// What cloud-init's boothook handler executes: the part without its
/// `#cloud-boothook` line, leading white space stripped
/// (cloudinit/handlers/boot_hook.py, `_write_part`).
pub fn as_cloud_init_runs_it(boothook: &str) -> Result<String, Failed> {
    let body = boothook
        .strip_prefix("#cloud-boothook")
        .ok_or("boothook does not start with #cloud-boothook")?;
    Ok(body.trim_start().to_string())
}
