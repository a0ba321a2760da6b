//! The command line contract: exit codes and messages for bad input.

use std::process::Command;

use libtest_mimic::Failed;

use crate::ensure;
use crate::support::exe;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "cli::bad_config_exits_2_with_line_and_column",
        false,
        bad_config_exits_2_with_line_and_column,
    ),
    (
        "cli::missing_explicit_config_exits_2",
        false,
        missing_explicit_config_exits_2,
    ),
    (
        "cli::not_root_gets_a_clear_message",
        true,
        not_root_gets_a_clear_message,
    ),
    (
        "cli::unknown_render_kind_exits_2",
        false,
        unknown_render_kind_exits_2,
    ),
    ("cli::usage_errors_exit_2", false, usage_errors_exit_2),
];

/// A directory of the test's own under the system's temporary directory,
/// removed with what it holds when the test ends, failed or not (each run
/// used to leave one behind).
struct TmpDir(std::path::PathBuf);

impl TmpDir {
    fn new() -> Result<TmpDir, Failed> {
        let dir = std::env::temp_dir().join(format!("metaguard-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TmpDir(dir))
    }

    fn write(&self, name: &str, text: &str) -> Result<std::path::PathBuf, Failed> {
        let p = self.0.join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bad_config_exits_2_with_line_and_column() -> Result<(), Failed> {
    let tmp = TmpDir::new()?;
    let p = tmp.write(
        "bad.toml",
        "[[workload]]\nname = \"a\"\nbridges = [\"docker0\"]\nimds = \"block\"\n",
    )?;
    for cmd in [
        &["apply", "--dry-run"][..],
        &["apply"],
        &["verify"],
        &["render", "systemd"],
    ] {
        let out = Command::new(exe())
            .args(cmd)
            .arg("--config")
            .arg(&p)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "{cmd:?}: exit {:?}",
            out.status.code()
        );
        ensure!(
            stderr.contains(&format!(
                "{}:4:8: imds: unknown action \"block\"",
                p.display()
            )),
            "{cmd:?}: {stderr}"
        );
        ensure!(
            stderr.contains("help: use one of"),
            "{cmd:?}: no hint: {stderr}"
        );
    }
    let p = tmp.write("garbage.toml", "\u{0}\u{1}not toml at all [[[")?;
    let out = Command::new(exe())
        .args(["apply", "--dry-run", "--config"])
        .arg(&p)
        .output()?;
    ensure!(
        out.status.code() == Some(2),
        "garbage: exit {:?}",
        out.status.code()
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains(":1:"),
        "garbage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn missing_explicit_config_exits_2() -> Result<(), Failed> {
    let out = Command::new(exe())
        .args(["verify", "--config", "/nonexistent/metaguard.toml"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2), "exit {:?}", out.status.code());
    ensure!(
        stderr.contains("cannot read config /nonexistent/metaguard.toml"),
        "{stderr}"
    );
    Ok(())
}

/// Drops to `nobody` (setpriv, util-linux) to run as a normal user.
fn not_root_gets_a_clear_message() -> Result<(), Failed> {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(exe())
        .arg("demo")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2),
        "demo as nobody: exit {:?}: {stderr}",
        out.status.code()
    );
    ensure!(stderr.contains("needs root"), "demo as nobody: {stderr}");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(exe())
        .args(["remove"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2),
        "remove as nobody: exit {:?}",
        out.status.code()
    );
    ensure!(
        stderr.contains("needs root") && stderr.contains("Nothing was changed"),
        "remove as nobody: {stderr}"
    );
    Ok(())
}

fn unknown_render_kind_exits_2() -> Result<(), Failed> {
    let out = Command::new(exe())
        .args(["render", "helm-chart"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2), "exit {:?}", out.status.code());
    ensure!(stderr.contains("unknown KIND \"helm-chart\""), "{stderr}");
    Ok(())
}

fn usage_errors_exit_2() -> Result<(), Failed> {
    for args in [&["frobnicate"][..], &["apply", "--no-such-flag"], &["exec"]] {
        let out = Command::new(exe()).args(args).output()?;
        ensure!(
            out.status.code() == Some(2),
            "{args:?}: exit {:?}",
            out.status.code()
        );
    }
    Ok(())
}
