//! Integration tests on a real kernel: each test builds its own lab
//! (namespaces with a unique prefix, so tests run in parallel) and tears it
//! down. Tests that need root are listed as ignored, with the reason
//! printed, when not root — and fail instead when METAGUARD_REQUIRE_ROOT=1
//! (the README's test command sets it), so CI can never pass by skipping.

use libtest_mimic::{Arguments, Failed, Trial};

mod support;

mod bpf;
mod bpf_lifecycle;
mod cli;
mod daemon;
mod discovery;
mod enforce;
mod foundation;
mod proxy;
mod proxy_datapath;
mod proxy_endpoints;
mod proxy_identity;
mod proxy_metrics;
mod proxy_policy;
mod proxy_reload;

type TestFn = fn() -> Result<(), Failed>;

fn main() {
    let args = Arguments::from_args();
    let is_root = metaguard_sys::process::is_root();
    let require_root = std::env::var("METAGUARD_REQUIRE_ROOT").is_ok_and(|v| v == "1");
    if !is_root {
        eprintln!("note: not root: tests that build network namespaces are ignored (run ./scripts/test as root)");
    }
    let mut trials = Vec::new();
    for (name, needs_root, f) in foundation::TESTS
        .iter()
        .chain(enforce::TESTS)
        .chain(daemon::TESTS)
        .chain(discovery::TESTS)
        .chain(cli::TESTS)
        .chain(bpf::TESTS)
        .chain(bpf_lifecycle::TESTS)
        .chain(proxy::TESTS)
        .chain(proxy_identity::TESTS)
        .chain(proxy_reload::TESTS)
        .chain(proxy_endpoints::TESTS)
        .chain(proxy_policy::TESTS)
        .chain(proxy_metrics::TESTS)
        .chain(proxy_datapath::TESTS)
    {
        let f: TestFn = *f;
        let trial = Trial::test(*name, move || {
            if require_root && !metaguard_sys::process::is_root() {
                return Err("METAGUARD_REQUIRE_ROOT=1 but not running as root".into());
            }
            f()
        });
        trials.push(trial.with_ignored_flag(*needs_root && !is_root && !require_root));
    }
    // Ctrl-C during a test run still removes the labs.
    let _ = ctrlc::set_handler(|| {
        metaguard_lab::registry::teardown_live();
        std::process::exit(130);
    });
    libtest_mimic::run(&args, trials).exit();
}
