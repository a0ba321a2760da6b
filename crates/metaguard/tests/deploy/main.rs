//! Deployment files and the package, checked by the tools that consume
//! them: shellcheck, `systemd-analyze verify`, Python's `email` module,
//! cloud-init's own user-data processing and schema check, `dpkg --root`,
//! `man -l`, lintian — and the boothook run in a lab twice, as cloud-init
//! would on two boots.
//!
//! A test whose tool is missing is listed as ignored with the reason and
//! the way to install it; under METAGUARD_REQUIRE_ROOT=1 (./scripts/test,
//! which installs every tool) it fails instead, like the root-only tests.

use libtest_mimic::Arguments;
use metaguard_lab::testing::{self, TestFn};

mod support;

mod boot;
mod package;
mod render;
mod validate;

/// What a test needs besides itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Nothing,
    Root,
    Tool(support::Tool),
}

fn main() {
    let args = Arguments::from_args();
    let is_root = metaguard_sys::process::is_root();
    if !is_root {
        eprintln!("note: not root: tests that build network namespaces are ignored (run ./scripts/test as root)");
    }
    let mut trials = Vec::new();
    let tests = render::TESTS
        .iter()
        .chain(validate::TESTS.iter())
        .chain(package::TESTS.iter())
        .chain(boot::TESTS.iter());
    for (name, needs, f) in tests {
        let missing: Option<String> = match needs {
            Needs::Nothing => None,
            Needs::Root => (!is_root).then(|| "needs root".to_string()),
            Needs::Tool(t) => t.missing(),
        };
        if let Some(why) = &missing {
            if !testing::required() {
                eprintln!("note: {name} ignored: {why}");
            }
        }
        trials.push(testing::trial(name, missing, *f));
    }
    testing::run(&args, trials)
}
