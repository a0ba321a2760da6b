//! `metaguard doctor` tests.
//!
//! * `fixtures::*` — every snapshot under `fixtures/` gives exactly the
//!   finding ids in its `expected` file; insta pins the human and JSON
//!   output (no root needed).
//! * `bad_input::*` — truncated or garbage snapshot files exit 2 naming the
//!   file and line.
//! * `merge::*` — `--merge` of several reports: the fleet table, bad inputs.
//! * `live::*` — on a lab (root): break the lab host in one failure mode's
//!   way, doctor finds exactly it, `--fix` repairs it, the lab's probes
//!   confirm, doctor is clean again. Root tests fail instead of being
//!   ignored when METAGUARD_REQUIRE_ROOT=1.

use libtest_mimic::{Arguments, Trial};
use metaguard_lab::testing::{self, TestFn};

mod bad_input;
mod fixtures;
mod live;
mod merge;

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
    if testing::root_missing().is_some() {
        eprintln!("note: not root: live doctor tests (network namespaces) are ignored (run ./scripts/test as root)");
    }
    let mut trials = fixtures::trials();
    for (name, needs_root, f) in bad_input::TESTS
        .iter()
        .chain(merge::TESTS)
        .chain(live::TESTS)
    {
        let missing = if *needs_root {
            testing::root_missing()
        } else {
            None
        };
        trials.push(testing::trial(name, missing, *f));
    }
    // Regenerates the lab-made fixtures; run on purpose only:
    // `cargo test -p metaguard --test doctor -- --ignored live::generate_fixtures`.
    trials.push(
        Trial::test("live::generate_fixtures", live::generate_fixtures).with_ignored_flag(true),
    );
    testing::run(&args, trials)
}
