//! Helpers for the exec tests: the binaries under test, bounded command
//! runs, running as an unprivileged user inside a lab container.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use metaguard_lab::{Lab, LabOptions, Workload};

/// `ensure!(cond, "fmt", args…)`: fail the test with a message.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+).into());
        }
    };
}

/// The metaguard binary under test.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metaguard"))
}

/// The attack helper (`examples/exec_attack.rs`), built by `cargo test`.
pub fn attack() -> Result<PathBuf, Failed> {
    let me = std::env::current_exe()?;
    let p = me
        .parent()
        .and_then(|deps| deps.parent())
        .map(|d| d.join("examples/exec_attack"))
        .ok_or("no target dir")?;
    if !p.exists() {
        return Err(format!(
            "{} missing: build it with `cargo build -p metaguard --example exec_attack` (scripts/test builds it)",
            p.display()
        )
        .into());
    }
    Ok(p)
}

pub fn lab() -> Result<Lab, Failed> {
    Lab::start(LabOptions::new(exe())).map_err(|e| format!("lab: {e}").into())
}

/// The unprivileged user every supervised command runs as.
pub const NOBODY: [&str; 4] = ["--reuid=65534", "--regid=65534", "--clear-groups", "--"];

/// `program args…` as uid 65534 in workload `w`'s namespace and cgroup,
/// optionally under `metaguard exec [exec_opts] --`.
pub fn in_workload(
    lab: &Lab,
    w: Workload,
    exec: Option<&[&str]>,
    program: &str,
    args: &[&str],
) -> Result<Command, Failed> {
    let mut cmd = lab
        .command_in(w, "setpriv")
        .map_err(|e| format!("lab command: {e}"))?;
    cmd.args(NOBODY);
    if let Some(opts) = exec {
        cmd.arg(exe()).arg("exec").args(opts).arg("--");
    }
    cmd.arg(program).args(args);
    Ok(cmd)
}

/// What a bounded run produced.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// The last stdout line, parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, Failed> {
        let line = self.stdout.lines().last().unwrap_or("");
        serde_json::from_str(line).map_err(|e| {
            format!(
                "not JSON ({e}): status {}; stdout {:?}; stderr {:?}",
                self.status, self.stdout, self.stderr
            )
            .into()
        })
    }
}

/// Runs `cmd` for at most `limit`, then kills it (and fails).
pub fn run(mut cmd: Command, limit: Duration) -> Result<Ran, Failed> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut child = cmd.spawn().map_err(|e| format!("{shown}: {e}"))?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut err = child.stderr.take().ok_or("no stderr")?;
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{shown}: still running after {limit:?}; killed").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Ran {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

pub use metaguard_lab::testing::python;

/// The exec tests' own files (`tests/exec/…`).
pub fn test_file(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/exec")
        .join(rel)
        .display()
        .to_string()
}
