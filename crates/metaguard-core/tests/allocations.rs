//! What the proxy's decision allocates for the requests it sees most: an
//! allowed IMDS `GET` under the default catalogue (eleven allow and four
//! deny globs), decided for every request, cache hit or miss.
//!
//! The count is a property of the code, not of the machine: each
//! allocation the decision makes is one the proxy pays on every request,
//! in the allocator's CPU time (docs/proxy.md). It was 32 before the
//! decision's strings were built in place (the target re-encoded through a
//! `Vec` and a `join`, one `Vec` per glob tried, a `format!` per rule, the
//! `Host` header lower-cased into a copy); a change that brings one back
//! fails here. Counted with dhat's heap profiler in
//! testing mode, the only test of this binary (one profiler per process).

use metaguard_core::proxy_decision::{decide, Caller, Kind, Request, Step, Verdict};
use metaguard_core::Config;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const POLICY: &str = r#"
[[workload]]
name    = "a"
bridges = ["docker0"]
imds    = "proxy"
"#;

/// The allocations left, and why each is needed: the canonical path's
/// segment list and its three decoded segments (the decision is made on
/// decoded segments), the target as forwarded, the path as logged (the
/// same text, a second owner), and the rule's text.
const ALLOWED: u64 = 7;

#[test]
fn an_allowed_imds_request_is_decided_within_its_allocations() {
    let config = Config::parse(POLICY, "policy.toml").expect("valid config");
    let caller = Caller {
        workload: Some(0),
        origin: "port veth1 on docker0".into(),
        ..Caller::default()
    };
    let req = Request {
        method: "GET",
        target: "/latest/meta-data/instance-id",
        absolute: false,
        host: Some("169.254.169.254"),
        transfer_encoding: false,
        content_lengths: &[],
        forwarded_for: false,
    };
    let decided = || decide(&config, Kind::Imds, &caller, &req, |_| true);
    // What is counted is what is asserted: an allowed, forwarded request.
    match decided() {
        Step::Done(Verdict::Forward(f)) => {
            assert_eq!(f.target, "/latest/meta-data/instance-id");
            assert_eq!(f.rule, "allow /latest/meta-data/instance-id");
        }
        other => panic!("not forwarded: {other:?}"),
    }

    let _profiler = dhat::Profiler::builder().testing().build();
    let n = 1000;
    let before = dhat::HeapStats::get().total_blocks;
    for _ in 0..n {
        drop(std::hint::black_box(decided()));
    }
    let per_request = (dhat::HeapStats::get().total_blocks - before) / n;
    dhat::assert!(
        per_request <= ALLOWED,
        "{per_request} allocations per decision, {ALLOWED} expected"
    );
    eprintln!("{per_request} allocations per allowed IMDS decision");
}
