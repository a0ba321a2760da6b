//! `mg-aws-probe`: the real AWS SDK for Rust (`aws-config` 1.x) as a client
//! in lab tests.
//!
//! metaguard's checks must hold for the clients people actually run, not
//! only for our own probe. Python's botocore is one such client; this is
//! the Rust SDK's: the same IMDS client and ECS credentials provider an
//! application built on `aws-config` uses, with the SDK's own retries,
//! timeouts, token handling and error types. Lab tests run it inside a lab
//! namespace (`Lab::command_in`) to see what a real client gets from the
//! IMDS emulator, the ECS agent emulator, metaguard's rules and — once it
//! exists — metaguard's metadata proxy (issue "metadata proxy").
//!
//! ```text
//! mg-aws-probe imds PATH          GET PATH from IMDS (IMDSv2: token PUT, then GET)
//! mg-aws-probe ecs-credentials    load the task's credentials from the ECS agent
//! ```
//!
//! * `imds PATH` uses `aws_config::imds::Client::builder().build()`: the
//!   default endpoint `http://169.254.169.254`, which the SDK's own
//!   environment/profile lookup overrides with
//!   `AWS_EC2_METADATA_SERVICE_ENDPOINT` (or selects the IPv6 endpoint with
//!   `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6`). Prints
//!   `{"ok":true,"value":"…"}`.
//! * `ecs-credentials` uses `aws_config::ecs::EcsCredentialsProvider`, which
//!   reads `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` (fetched from
//!   `http://169.254.170.2<uri>`) or `AWS_CONTAINER_CREDENTIALS_FULL_URI`
//!   (plain HTTP only to loopback, 169.254.170.2, 169.254.170.23 or
//!   fd00:ec2::23 — the SDK refuses any other host before connecting).
//!   Prints `{"ok":true,"access_key_id":"…","expiry":<unix seconds|null>}`;
//!   the secret key and session token are never printed.
//!
//! Failure prints `{"ok":false,"error":"<the error and its sources>"}` and
//! exits 1; bad arguments exit 2, as does running in the root network
//! namespace, which is refused (like the lab's own probe) so that nothing
//! is ever sent from the host's namespace to a metadata address.
//!
//! Bounded: the whole command has 5 s (the SDK's IMDS operation timeout is
//! set to 5 s too; its connect/read timeouts stay at the SDK's 1 s for IMDS
//! and 2 s/5 s for ECS). HTTP is the SDK's own hyper client built without
//! TLS: only plain HTTP to the metadata addresses is spoken, and no proxy
//! variable is honoured.
#![forbid(unsafe_code)]

use std::error::Error;
use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use aws_config::ecs::EcsCredentialsProvider;
use aws_config::provider_config::ProviderConfig;
use aws_config::BehaviorVersion;
use aws_credential_types::provider::ProvideCredentials;

/// The most any command may take.
const LIMIT: Duration = Duration::from_secs(5);

const USAGE: &str = "usage: mg-aws-probe imds PATH\n       mg-aws-probe ecs-credentials";

#[derive(Debug, PartialEq, Eq)]
enum Cmd {
    Imds(String),
    EcsCredentials,
}

fn parse(args: &[OsString]) -> Result<Cmd, String> {
    let args: Vec<&str> = args
        .iter()
        .map(|a| a.to_str().ok_or("arguments must be UTF-8"))
        .collect::<Result<_, _>>()?;
    match args.as_slice() {
        ["imds", path] if path.starts_with('/') => Ok(Cmd::Imds((*path).to_string())),
        ["imds", path] => Err(format!("imds: PATH must start with '/': {path:?}")),
        ["ecs-credentials"] => Ok(Cmd::EcsCredentials),
        [] => Err("no command".into()),
        [cmd, ..] => Err(format!("bad arguments for {cmd:?}")),
    }
}

/// `e` and each of its sources, joined with ": " (a source whose text the
/// message already contains is not repeated).
fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// The SDK's defaults (environment, profile files, sleep and time), plus
/// the SDK's hyper client without TLS: aws-config built without its
/// `default-https-client` feature has no HTTP client of its own.
fn provider_config() -> ProviderConfig {
    ProviderConfig::without_region()
        .with_http_client(aws_smithy_http_client::Builder::new().build_http())
        .with_behavior_version(Some(BehaviorVersion::latest()))
}

/// A JSON string literal.
fn js(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// One JSON line, keys in the documented order (`ok` first).
fn ok_line(fields: &[(&str, String)]) -> String {
    let mut out = String::from("{\"ok\":true");
    for (k, v) in fields {
        out.push_str(&format!(",{}:{v}", js(k)));
    }
    out.push('}');
    out
}

async fn imds(path: String) -> Result<String, String> {
    let client = aws_config::imds::Client::builder()
        .configure(&provider_config())
        .operation_timeout(LIMIT)
        .build();
    let value = client.get(path).await.map_err(|e| chain(&e))?;
    Ok(ok_line(&[("value", js(value.as_ref()))]))
}

async fn ecs_credentials() -> Result<String, String> {
    let provider = EcsCredentialsProvider::builder()
        .configure(&provider_config())
        .build();
    let creds = provider
        .provide_credentials()
        .await
        .map_err(|e| chain(&e))?;
    let expiry = creds
        .expiry()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    Ok(ok_line(&[
        ("access_key_id", js(creds.access_key_id())),
        ("expiry", expiry.map_or("null".into(), |s| s.to_string())),
    ]))
}

fn fail(error: &str, code: u8) -> ExitCode {
    println!("{{\"ok\":false,\"error\":{}}}", js(error));
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let cmd = match parse(&args) {
        Ok(cmd) => cmd,
        Err(e) => {
            eprintln!("mg-aws-probe: {e}\n{USAGE}");
            return fail(&e, 2);
        }
    };
    if let Err(e) = metaguard_sys::netns::ensure_not_in_root() {
        return fail(&format!("refused: {}", chain(&e)), 2);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("tokio runtime: {e}"), 1),
    };
    let result = rt.block_on(async {
        let run = async {
            match cmd {
                Cmd::Imds(path) => imds(path).await,
                Cmd::EcsCredentials => ecs_credentials().await,
            }
        };
        match tokio::time::timeout(LIMIT, run).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "mg-aws-probe: no result within {} s",
                LIMIT.as_secs()
            )),
        }
    });
    match result {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_the_two_commands() {
        assert_eq!(
            parse(&args(&["imds", "/latest/meta-data/instance-id"])),
            Ok(Cmd::Imds("/latest/meta-data/instance-id".into()))
        );
        assert_eq!(parse(&args(&["ecs-credentials"])), Ok(Cmd::EcsCredentials));
    }

    #[test]
    fn refuses_bad_arguments() {
        for bad in [
            &[][..],
            &["imds"],
            &["imds", "latest/meta-data/"],
            &["imds", "/a", "/b"],
            &["ecs-credentials", "x"],
            &["credentials"],
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lines_put_ok_first() {
        assert_eq!(
            ok_line(&[("value", js("i-0\"x")), ("expiry", "null".into())]),
            r#"{"ok":true,"value":"i-0\"x","expiry":null}"#
        );
    }

    #[test]
    fn chain_joins_sources_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl Error for E {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "outer: middle",
            Some(Box::new(E("middle", Some(Box::new(E("inner", None)))))),
        );
        assert_eq!(chain(&e), "outer: middle: inner");
    }
}
