//! Bad snapshots: exit 2, the file and the line named, never a panic.

use std::process::Command;

use libtest_mimic::Failed;

use crate::{ensure, exe, fixtures_dir};

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "bad_input::truncated_iptables_save_names_file_and_line",
        false,
        truncated_iptables_save,
    ),
    (
        "bad_input::garbage_iptables_save_names_file_and_line",
        false,
        garbage_iptables_save,
    ),
    (
        "bad_input::truncated_nft_json_names_file_and_line",
        false,
        truncated_nft_json,
    ),
    (
        "bad_input::bad_sysctl_line_names_file_and_line",
        false,
        bad_sysctl,
    ),
    (
        "bad_input::missing_snapshot_dir_exits_2",
        false,
        missing_dir,
    ),
    (
        "bad_input::fix_with_from_is_a_usage_error",
        false,
        fix_with_from,
    ),
];

/// Copies the clean fixture to a temp dir and lets `edit` spoil one file.
fn spoiled(
    tag: &str,
    file: &str,
    edit: impl FnOnce(String) -> String,
) -> Result<std::path::PathBuf, Failed> {
    let src = fixtures_dir().join("clean");
    let dst = std::env::temp_dir().join(format!("metaguard-doctor-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst)?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name()))?;
        }
    }
    let text = std::fs::read_to_string(dst.join(file)).unwrap_or_default();
    std::fs::write(dst.join(file), edit(text))?;
    Ok(dst)
}

fn run_expect_2(dir: &std::path::Path, needle: &str) -> Result<(), Failed> {
    let out = Command::new(exe())
        .args(["doctor", "--from"])
        .arg(dir)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(dir);
    ensure!(
        out.status.code() == Some(2),
        "exit {:?}, expected 2; stderr {stderr}",
        out.status.code()
    );
    ensure!(
        stderr.contains(needle),
        "stderr does not name {needle:?}: {stderr}"
    );
    ensure!(!stderr.contains("panicked"), "panic: {stderr}");
    Ok(())
}

fn truncated_iptables_save() -> Result<(), Failed> {
    let dir = spoiled("trunc", "iptables-nft-save.txt", |t| {
        let lines: Vec<&str> = t.lines().collect();
        // Cut inside the last table, before its COMMIT.
        lines[..lines.len().saturating_sub(3)].join("\n")
    })?;
    run_expect_2(&dir, "iptables-nft-save.txt:")?;
    Ok(())
}

fn garbage_iptables_save() -> Result<(), Failed> {
    let dir = spoiled("garbage", "iptables-nft-save.txt", |t| {
        t.replacen("-A ", "-Q ", 1)
    })?;
    run_expect_2(&dir, "iptables-nft-save.txt:")
}

fn truncated_nft_json() -> Result<(), Failed> {
    let dir = spoiled("nft", "nft-ruleset.json", |t| t[..t.len() / 2].to_string())?;
    run_expect_2(&dir, "nft-ruleset.json:1:")
}

fn bad_sysctl() -> Result<(), Failed> {
    let dir = spoiled("sysctl", "sysctl.txt", |t| {
        format!("{t}this is not a sysctl\n")
    })?;
    run_expect_2(&dir, "sysctl.txt:")
}

fn missing_dir() -> Result<(), Failed> {
    let out = Command::new(exe())
        .args(["doctor", "--from", "/nonexistent/metaguard-snapshot"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2),
        "exit {:?}: {stderr}",
        out.status.code()
    );
    ensure!(
        stderr.contains("/nonexistent/metaguard-snapshot"),
        "{stderr}"
    );
    Ok(())
}

fn fix_with_from() -> Result<(), Failed> {
    let out = Command::new(exe())
        .args(["doctor", "--fix", "--from"])
        .arg(fixtures_dir().join("clean"))
        .output()?;
    ensure!(out.status.code() == Some(2), "exit {:?}", out.status.code());
    Ok(())
}
