//! Integration tests on a real kernel: each test builds its own lab
//! (namespaces with a unique prefix, so tests run in parallel) and tears it
//! down. Tests that need root are listed as ignored, with the reason
//! printed, when not root — and fail instead when METAGUARD_REQUIRE_ROOT=1
//! (the README's test command sets it), so CI can never pass by skipping.

use libtest_mimic::Arguments;
use metaguard_lab::testing::{self, TestFn};

mod support;

mod agent_bridge;
mod bpf;
mod bpf_default;
mod bpf_lifecycle;
mod cli;
mod daemon;
mod discovery;
mod enforce;
mod foundation;
mod observe;
mod proxy;
mod proxy_cache;
mod proxy_datapath;
mod proxy_endpoints;
mod proxy_identity;
mod proxy_metrics;
mod proxy_policy;
mod proxy_reload;

fn main() {
    let args = Arguments::from_args();
    if testing::root_missing().is_some() {
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
        .chain(bpf_default::TESTS)
        .chain(bpf_lifecycle::TESTS)
        .chain(proxy::TESTS)
        .chain(proxy_identity::TESTS)
        .chain(proxy_reload::TESTS)
        .chain(proxy_endpoints::TESTS)
        .chain(proxy_policy::TESTS)
        .chain(proxy_metrics::TESTS)
        .chain(proxy_cache::TESTS)
        .chain(proxy_datapath::TESTS)
        .chain(observe::TESTS)
        .chain(agent_bridge::TESTS)
    {
        let missing = if *needs_root {
            testing::root_missing()
        } else {
            None
        };
        trials.push(testing::trial(name, missing, *f));
    }
    testing::run(&args, trials)
}
