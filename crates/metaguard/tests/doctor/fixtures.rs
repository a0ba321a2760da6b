//! Snapshot fixtures: exact finding ids, and golden human/JSON output.

use std::process::Command;

use libtest_mimic::{Failed, Trial};

use crate::{ensure, exe, fixtures_dir};

pub fn trials() -> Vec<Trial> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join("expected").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let name = n.clone();
            Trial::test(format!("fixtures::{n}"), move || check(&name))
        })
        .collect()
}

/// The finding ids of a JSON report.
pub fn ids(json: &str) -> Result<Vec<String>, Failed> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| format!("doctor --json output is not JSON: {e}: {json}"))?;
    Ok(v["findings"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

fn doctor(name: &str, json: bool) -> Result<(Option<i32>, String, String), Failed> {
    let mut cmd = Command::new(exe());
    cmd.current_dir(fixtures_dir())
        .args(["doctor", "--from", name])
        .env("NO_COLOR", "1");
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

fn check(name: &str) -> Result<(), Failed> {
    let expected_text = std::fs::read_to_string(fixtures_dir().join(name).join("expected"))?;
    let mut expected: Vec<String> = expected_text
        .split_whitespace()
        .map(str::to_string)
        .collect();
    expected.sort();
    let (code, json, stderr) = doctor(name, true)?;
    let mut got = ids(&json)?;
    got.sort();
    ensure!(
        got == expected,
        "{name}: expected findings {expected:?}, got {got:?}\n{json}"
    );
    let want_code = if expected.is_empty() { 0 } else { 1 };
    ensure!(
        code == Some(want_code),
        "{name}: exit {code:?}, expected {want_code}; stderr {stderr}"
    );
    let (_, human, _) = doctor(name, false)?;
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/doctor/snapshots"),
    );
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| {
        insta::assert_snapshot!(format!("{name}.human"), human);
        insta::assert_snapshot!(format!("{name}.json"), json);
    });
    Ok(())
}
