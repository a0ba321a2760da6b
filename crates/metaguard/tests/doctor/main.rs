//! `metaguard doctor` tests.
//!
//! * `fixtures::*` — every snapshot under `fixtures/` gives exactly the
//!   finding ids in its `expected` file; insta pins the human and JSON
//!   output (no root needed).
//! * `bad_input::*` — truncated or garbage snapshot files exit 2 naming the
//!   file and line.
//! * `live::*` — on a lab (root): break the lab host in one failure mode's
//!   way, doctor finds exactly it, `--fix` repairs it, the lab's probes
//!   confirm, doctor is clean again. Root tests fail instead of being
//!   ignored when METAGUARD_REQUIRE_ROOT=1.

use libtest_mimic::{Arguments, Failed, Trial};

mod bad_input;
mod fixtures;
mod live;

type TestFn = fn() -> Result<(), Failed>;

/// The metaguard binary under test.
pub fn exe() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_metaguard"))
}

/// The fixtures directory.
pub fn fixtures_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/doctor/fixtures")
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

fn main() {
    let args = Arguments::from_args();
    let is_root = metaguard_sys::process::is_root();
    let require_root = std::env::var("METAGUARD_REQUIRE_ROOT").is_ok_and(|v| v == "1");
    if !is_root {
        eprintln!("note: not root: live doctor tests (network namespaces) are ignored (run ./scripts/test as root)");
    }
    let mut trials = fixtures::trials();
    for (name, needs_root, f) in bad_input::TESTS.iter().chain(live::TESTS) {
        let f: TestFn = *f;
        let needs_root = *needs_root;
        let trial = Trial::test(*name, move || {
            if needs_root && require_root && !metaguard_sys::process::is_root() {
                return Err("METAGUARD_REQUIRE_ROOT=1 but not running as root".into());
            }
            f()
        });
        trials.push(trial.with_ignored_flag(needs_root && !is_root && !require_root));
    }
    // Regenerates the lab-made fixtures; run on purpose only:
    // `cargo test -p metaguard --test doctor -- --ignored live::generate_fixtures`.
    trials.push(
        Trial::test("live::generate_fixtures", live::generate_fixtures).with_ignored_flag(true),
    );
    let _ = ctrlc::set_handler(|| {
        metaguard_lab::registry::teardown_live();
        std::process::exit(130);
    });
    libtest_mimic::run(&args, trials).exit();
}
