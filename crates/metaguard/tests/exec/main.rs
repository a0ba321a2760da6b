//! `metaguard exec` on a real kernel (F12): the supervised command runs as
//! an unprivileged user (uid 65534, via `setpriv`) inside a lab container's
//! network namespace, where the lab serves fake metadata endpoints. Every
//! attack is also run without `exec` first, so a "blocked" result means
//! something; the emulators' logs prove arrival or non-arrival.
//!
//! Tests that need root (namespaces, `setpriv`) are ignored with the
//! reason printed when not root — and fail when METAGUARD_REQUIRE_ROOT=1.

use libtest_mimic::{Arguments, Failed, Trial};

mod cases;
mod support;

type TestFn = fn() -> Result<(), Failed>;

fn main() {
    let args = Arguments::from_args();
    let is_root = metaguard_sys::process::is_root();
    let require_root = std::env::var("METAGUARD_REQUIRE_ROOT").is_ok_and(|v| v == "1");
    if !is_root {
        eprintln!(
            "note: not root: exec tests that build network namespaces are ignored (run ./scripts/test as root)"
        );
    }
    let mut trials = Vec::new();
    for (name, needs_root, f) in cases::TESTS {
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
    let _ = ctrlc::set_handler(|| {
        metaguard_lab::registry::teardown_live();
        std::process::exit(130);
    });
    libtest_mimic::run(&args, trials).exit();
}
