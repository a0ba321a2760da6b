//! `metaguard exec` on a real kernel (F12): the supervised command runs as
//! an unprivileged user (uid 65534, via `setpriv`) inside a lab container's
//! network namespace, where the lab serves fake metadata endpoints. Every
//! attack is also run without `exec` first, so a "blocked" result means
//! something; the emulators' logs prove arrival or non-arrival.
//!
//! Tests that need root (namespaces, `setpriv`) are ignored with the
//! reason printed when not root — and fail when METAGUARD_REQUIRE_ROOT=1.

use libtest_mimic::Arguments;
use metaguard_lab::testing::{self, TestFn};

mod cases;
mod support;

fn main() {
    let args = Arguments::from_args();
    if testing::root_missing().is_some() {
        eprintln!(
            "note: not root: exec tests that build network namespaces are ignored (run ./scripts/test as root)"
        );
    }
    let mut trials = Vec::new();
    for (name, needs_root, f) in cases::TESTS {
        let missing = if *needs_root {
            testing::root_missing()
        } else {
            None
        };
        trials.push(testing::trial(name, missing, *f));
    }
    testing::run(&args, trials)
}
