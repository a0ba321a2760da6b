//! `metaguard exec`: run a command unable to reach the metadata endpoints,
//! without privileges (F12: Fargate, where nothing outside the container
//! can be changed).
//!
//! Two stages: [`ExecArgs`] (raw clap options) → [`Validated`] (a built
//! `ExecPolicy`, the scrub list, an open log). Nothing is started before
//! validation; bad rules exit 2. This path stays single-threaded until the
//! child is running (no runtime is ever built here): the supervisor forks
//! the child itself. The kernel work is `metaguard_sys::seccomp`; the
//! decisions are `metaguard_core::exec_policy`.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use metaguard_core::exec_policy::{Decision, EnvScrub, ExecPolicy, ExecPolicyArgs};
use metaguard_sys::seccomp::{self, Attempt, ExecSpec, Policy, Refusal, Verdict};

// The field docs are `--help` text: `[ADDR]:PORT` is syntax, not a link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Allow this destination although a deny rule matches it
    /// (ADDR[/PREFIX][:PORT]; IPv6 with a port in brackets: [ADDR]:PORT).
    #[arg(long, value_name = "ADDR[:PORT]")]
    allow: Vec<String>,
    /// Deny this destination too, besides every metadata endpoint
    /// (ADDR[/PREFIX][:PORT]).
    #[arg(long, value_name = "ADDR[/PREFIX][:PORT]")]
    deny: Vec<String>,
    /// Deny the whole link-local ranges, 169.254.0.0/16 and fe80::/10.
    #[arg(long)]
    deny_link_local: bool,
    /// Remove this variable from the command's environment too (besides
    /// the ECS/EKS credential and metadata variables).
    #[arg(long, value_name = "NAME")]
    scrub_env: Vec<String>,
    /// Keep this variable although it is scrubbed by default.
    #[arg(long, value_name = "NAME")]
    keep_env: Vec<String>,
    /// Append the JSON log of denied attempts to FILE instead of stderr.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

/// The validated form of [`ExecArgs`].
#[derive(Debug)]
struct Validated {
    policy: ExecPolicy,
    scrub: EnvScrub,
    log: LogSink,
    program: OsString,
    args: Vec<OsString>,
}

fn validate(args: ExecArgs) -> anyhow::Result<Validated> {
    let policy = ExecPolicy::from_args(&ExecPolicyArgs {
        allow: args.allow,
        deny: args.deny,
        deny_link_local: args.deny_link_local,
    })
    .context("bad --allow/--deny rule")?;
    let scrub = EnvScrub::new(&args.scrub_env, &args.keep_env)
        .context("bad --scrub-env/--keep-env name")?;
    let log = match args.log {
        None => LogSink::Stderr,
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open the log file {}", path.display()))?;
            LogSink::File(Mutex::new(f))
        }
    };
    let mut cmd = args.cmd.into_iter();
    let program = cmd
        .next()
        .context("no command given: metaguard exec [OPTIONS] -- CMD [ARG]...")?;
    Ok(Validated {
        policy,
        scrub,
        log,
        program,
        args: cmd.collect(),
    })
}

/// Runs the command; its exit status becomes ours.
pub fn run(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let v = validate(args)?;
    seccomp::check_support()?;
    // The child's environment, without the scrubbed variables.
    let env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !k.to_str().is_some_and(|k| v.scrub.scrubs(k)))
        .collect();
    // And our own: erased where /proc/<pid>/environ reads it, and the
    // process made non-dumpable so a same-uid child cannot read its memory.
    seccomp::env::scrub_in_place(&|name| {
        std::str::from_utf8(name).is_ok_and(|n| v.scrub.scrubs(n))
    });
    seccomp::env::set_non_dumpable().context("prctl(PR_SET_DUMPABLE, 0)")?;
    let spec = ExecSpec {
        program: v.program,
        args: v.args,
        env,
    };
    let judge = Arc::new(Judge {
        policy: v.policy,
        log: v.log,
    });
    match seccomp::run(&spec, judge) {
        Ok(exit) => Ok(ExitCode::from(exit.code())),
        Err(e) => {
            let code = e.exit_code();
            eprintln!("metaguard: exec: {e}");
            Ok(ExitCode::from(code))
        }
    }
}

#[derive(Debug)]
enum LogSink {
    Stderr,
    File(Mutex<std::fs::File>),
}

impl LogSink {
    fn line(&self, line: &str) {
        // A log that cannot be written must not stop enforcement.
        match self {
            LogSink::Stderr => {
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
            LogSink::File(f) => {
                if let Ok(mut f) = f.lock() {
                    let _ = f.write_all(line.as_bytes());
                }
            }
        }
    }
}

/// The policy the supervisor asks, and the JSON log of what it refused.
#[derive(Debug)]
struct Judge {
    policy: ExecPolicy,
    log: LogSink,
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl Policy for Judge {
    fn decide(&self, a: &Attempt) -> Verdict {
        match self.policy.decide(a.dest) {
            Decision::Allow => Verdict::Allow,
            Decision::Deny(_) => Verdict::Deny,
        }
    }

    fn denied(&self, a: &Attempt) {
        let rule = match self.policy.decide(a.dest) {
            Decision::Deny(r) => r.to_string(),
            Decision::Allow => String::new(),
        };
        let line = serde_json::json!({
            "ts_ms": now_ms() as u64,
            "event": "denied",
            "syscall": a.syscall.name(),
            "tid": a.tid,
            "addr": a.dest.ip().to_string(),
            "port": a.dest.port(),
            "rule": rule,
        });
        self.log.line(&format!("metaguard-exec: {line}\n"));
    }

    fn refused(&self, r: &Refusal) {
        let line = serde_json::json!({
            "ts_ms": now_ms() as u64,
            "event": "refused",
            "syscall": r.syscall.name(),
            "tid": r.tid,
            "reason": r.reason,
            "errno": r.errno,
        });
        self.log.line(&format!("metaguard-exec: {line}\n"));
    }
}
