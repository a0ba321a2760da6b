//! The binary's command line, without a lab: bad arguments, and the refusal
//! to run in the root network namespace. Nothing here can reach a metadata
//! address: every endpoint the SDK is given is 127.0.0.1:1, so even a
//! broken refusal would only meet a closed loopback port.
//!
//! Having an integration test also makes `cargo test --workspace` build
//! `target/<profile>/mg-aws-probe`, which metaguard-lab's emulator tests run.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn run(args: &[&str], env: &[(&str, &str)]) -> (Output, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_mg-aws-probe"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run mg-aws-probe");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("bad JSON {stdout:?}: {e}"));
    (out, json)
}

#[test]
fn bad_arguments_exit_2_with_a_json_error() {
    for args in [
        &[][..],
        &["imds"],
        &["imds", "latest/meta-data/"],
        &["ecs-credentials", "extra"],
        &["nonsense"],
    ] {
        let (out, json) = run(args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(json["ok"], false, "{args:?}");
        assert!(json["error"].is_string(), "{json}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("usage:"),
            "{args:?}"
        );
    }
}

#[test]
fn refuses_the_root_network_namespace() {
    let in_root = metaguard_sys::netns::current_thread_id()
        .is_ok_and(|id| metaguard_sys::netns::is_root(id).unwrap_or(false));
    let closed = "http://127.0.0.1:1";
    let full_uri = format!("{closed}/v2/credentials/x");
    for (args, env) in [
        (
            &["imds", "/latest/meta-data/instance-id"][..],
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", closed),
        ),
        (
            &["ecs-credentials"][..],
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", full_uri.as_str()),
        ),
    ] {
        let t0 = Instant::now();
        let (out, json) = run(args, &[env]);
        assert_eq!(json["ok"], false, "{args:?}: {json}");
        assert!(t0.elapsed() < Duration::from_secs(6), "{args:?}");
        if in_root {
            assert_eq!(out.status.code(), Some(2), "{args:?}: {json}");
            let err = json["error"].as_str().unwrap_or("");
            assert!(
                err.starts_with("refused:") && err.contains("root network namespace"),
                "{err}"
            );
        } else {
            // Not in the root namespace (e.g. a container): the closed
            // loopback port answers instead.
            eprintln!("note: not in the root network namespace: {json}");
            assert_eq!(out.status.code(), Some(1), "{args:?}: {json}");
        }
    }
}
