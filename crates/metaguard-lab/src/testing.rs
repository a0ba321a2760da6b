//! Scaffolding the test binaries share (crates/metaguard/tests/{lab,exec,
//! doctor,deploy,machine}): how a test that cannot run here is gated, the
//! Python the SDK tests run, and the run itself. Tests, never the product:
//! behind the `harness` feature.
//!
//! A test that cannot run here (not root, a tool missing) is listed as
//! ignored with the reason printed — and fails instead under
//! `METAGUARD_REQUIRE_ROOT=1` (the README's test command sets it), so CI
//! can never pass by skipping.

use std::path::PathBuf;

use libtest_mimic::{Arguments, Failed, Trial};

/// A test of the integration binaries.
pub type TestFn = fn() -> Result<(), Failed>;

/// Whether `METAGUARD_REQUIRE_ROOT=1`: tests that cannot run here fail.
pub fn required() -> bool {
    std::env::var("METAGUARD_REQUIRE_ROOT").is_ok_and(|v| v == "1")
}

/// Why a test that needs root cannot run here; `None` as root.
pub fn root_missing() -> Option<String> {
    (!metaguard_sys::process::is_root()).then(|| "not running as root".to_string())
}

/// `f` as a trial named `name`. With `missing` (why it cannot run here) it
/// is ignored — or, under `METAGUARD_REQUIRE_ROOT=1`, fails saying why.
pub fn trial(name: &str, missing: Option<String>, f: TestFn) -> Trial {
    let require = required();
    let ignored = missing.is_some() && !require;
    Trial::test(name, move || {
        if let (true, Some(why)) = (require, &missing) {
            return Err(format!("METAGUARD_REQUIRE_ROOT=1 but {why}").into());
        }
        f()
    })
    .with_ignored_flag(ignored)
}

/// Runs `trials` with the command line's arguments and exits. Ctrl-C
/// during the run still removes the labs (and machines and disks).
pub fn run(args: &Arguments, trials: Vec<Trial>) -> ! {
    let _ = ctrlc::set_handler(|| {
        crate::registry::teardown_live();
        std::process::exit(130);
    });
    libtest_mimic::run(args, trials).exit()
}

/// The Python with botocore: `METAGUARD_PYTHON`, else the workspace venv
/// (`.venv`). `Ok(None)` (with a printed reason) when absent — an error
/// instead when `METAGUARD_REQUIRE_PYTHON=1`, as under the README's test
/// command.
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
