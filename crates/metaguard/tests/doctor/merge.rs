//! `doctor --merge FILE…`: the fleet table from several hosts' `--json`
//! reports (the fixtures' reports stand in for hosts), and bad inputs.

use std::path::PathBuf;
use std::process::Command;

use libtest_mimic::Failed;

use crate::{ensure, exe, fixtures_dir};

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "merge::fleet_table_of_three_hosts",
        false,
        fleet_table_of_three_hosts,
    ),
    (
        "merge::bad_input_names_file_line_and_column",
        false,
        bad_input_names_file_line_and_column,
    ),
    (
        "merge::bad_ethtool_stats_name_file_and_line",
        false,
        bad_ethtool_stats_name_file_and_line,
    ),
];

fn tmp(tag: &str) -> Result<PathBuf, Failed> {
    let d = std::env::temp_dir().join(format!("metaguard-merge-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// `doctor --from FIXTURE --json`, written to `dir/host.json`.
fn report(dir: &std::path::Path, fixture: &str, host: &str) -> Result<PathBuf, Failed> {
    let out = Command::new(exe())
        .current_dir(fixtures_dir())
        .args(["doctor", "--from", fixture, "--json"])
        .output()?;
    let p = dir.join(format!("{host}.json"));
    std::fs::write(&p, &out.stdout)?;
    Ok(p)
}

fn merge(files: &[PathBuf], json: bool) -> Result<(Option<i32>, String, String), Failed> {
    let mut cmd = Command::new(exe());
    cmd.current_dir(files[0].parent().unwrap_or(std::path::Path::new(".")))
        .args(["doctor", "--merge"]);
    for f in files {
        cmd.arg(f.file_name().unwrap_or_default());
    }
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn fleet_table_of_three_hosts() -> Result<(), Failed> {
    let dir = tmp("fleet")?;
    let files = vec![
        report(
            &dir,
            "f14-drop-instead-of-reject-nft",
            "i-0a1b2c3d4e5f60001",
        )?,
        report(
            &dir,
            "f18-proxy-without-no-proxy-nft",
            "i-0a1b2c3d4e5f60002",
        )?,
        report(&dir, "clean", "i-0a1b2c3d4e5f60003")?,
    ];
    let (code, human, stderr) = merge(&files, false)?;
    ensure!(code == Some(1), "exit {code:?}: {stderr}");
    let (code, json, stderr) = merge(&files, true)?;
    ensure!(code == Some(1), "exit {code:?}: {stderr}");
    let _ = std::fs::remove_dir_all(&dir);
    let v: serde_json::Value = serde_json::from_str(&json)?;
    ensure!(
        v["schema"] == "metaguard.doctor-merge/v1",
        "schema: {}",
        v["schema"]
    );
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/doctor/snapshots"),
    );
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| {
        insta::assert_snapshot!("merge.human", human);
        insta::assert_snapshot!("merge.json", json);
    });
    Ok(())
}

fn bad_input_names_file_line_and_column() -> Result<(), Failed> {
    let dir = tmp("bad")?;
    let good = report(&dir, "clean", "good")?;
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        "{\n  \"schema\": \"metaguard.doctor/v1\",\n  \"findings\": [\n    {\"id\": \"F1\"}\n  ]\n}\n",
    )?;
    let other = dir.join("other.json");
    std::fs::write(&other, "{\n  \"schema\": \"metaguard.report/v1\"\n}\n")?;
    let (code, _, stderr) = merge(&[good.clone(), bad], false)?;
    ensure!(code == Some(2), "exit {code:?}: {stderr}");
    ensure!(stderr.contains("bad.json:4:"), "{stderr}");
    let (code, _, stderr) = merge(&[good, other], false)?;
    ensure!(code == Some(2), "exit {code:?}: {stderr}");
    ensure!(stderr.contains("other.json:2:3: schema"), "{stderr}");
    ensure!(!stderr.contains("panicked"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn bad_ethtool_stats_name_file_and_line() -> Result<(), Failed> {
    let dir = tmp("ethtool")?;
    let src = fixtures_dir().join("clean");
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name()))?;
        }
    }
    std::fs::write(
        dir.join("ethtool-stats.txt"),
        "# ethtool -S ens5 (driver ena)\nNIC statistics:\n     linklocal_allowance_exceeded: lots\n",
    )?;
    let out = Command::new(exe())
        .args(["doctor", "--from"])
        .arg(&dir)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        out.status.code() == Some(2),
        "exit {:?}: {stderr}",
        out.status.code()
    );
    ensure!(stderr.contains("ethtool-stats.txt:3:"), "{stderr}");
    Ok(())
}
