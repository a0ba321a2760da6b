//! What users install, under a real init: the `.deb` that scripts/package
//! builds, installed with `dpkg -i` into a Debian machine booted by
//! systemd-nspawn (systemd as PID 1) inside a lab, beside stand-in
//! `docker.service` and `ecs.service` units, and driven only through
//! systemctl, the rendered files and the lab's probes (see
//! `metaguard_lab::machine`).
//!
//! Root-only, like the lab tests: listed as ignored with the reason when
//! not root or when the machine's root file system is not built, and
//! failing instead under METAGUARD_REQUIRE_ROOT=1 (./scripts/test, which
//! builds it).

use libtest_mimic::Arguments;
use metaguard_lab::testing::{self, TestFn};

mod support;

mod boot;
mod bpf;
mod failclosed;
mod lifecycle;
mod package;
mod proxy;

fn main() {
    let args = Arguments::from_args();
    let missing = support::missing();
    if let Some(why) = &missing {
        if !testing::required() {
            eprintln!("note: machine tests ignored: {why}");
        }
    }
    let mut trials = Vec::new();
    for (name, f) in boot::TESTS
        .iter()
        .chain(proxy::TESTS)
        .chain(failclosed::TESTS)
        .chain(lifecycle::TESTS)
        .chain(bpf::TESTS)
        .chain(package::TESTS)
    {
        trials.push(testing::trial(name, missing.clone(), *f));
    }
    // Ctrl-C during a test run still removes the labs, machines and disks
    // (testing::run).
    testing::run(&args, trials)
}
