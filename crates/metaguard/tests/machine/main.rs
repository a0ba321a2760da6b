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

use libtest_mimic::{Arguments, Failed, Trial};

mod support;

mod boot;
mod bpf;
mod failclosed;
mod lifecycle;
mod package;
mod proxy;

type TestFn = fn() -> Result<(), Failed>;

fn main() {
    let args = Arguments::from_args();
    let require = std::env::var("METAGUARD_REQUIRE_ROOT").is_ok_and(|v| v == "1");
    let missing = support::missing();
    if let Some(why) = &missing {
        if !require {
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
        let f: TestFn = *f;
        let why = missing.clone();
        let trial = Trial::test(*name, move || {
            if let (true, Some(why)) = (require, &why) {
                return Err(format!("METAGUARD_REQUIRE_ROOT=1 but {why}").into());
            }
            f()
        });
        trials.push(trial.with_ignored_flag(missing.is_some() && !require));
    }
    // Ctrl-C during a test run still removes the labs, machines and disks.
    let _ = ctrlc::set_handler(|| {
        metaguard_lab::registry::teardown_live();
        std::process::exit(130);
    });
    libtest_mimic::run(&args, trials).exit();
}
