//! The command line, exactly as `../shared/spec/interface.md` specifies it.
//!
//! Two stages: clap parses raw arguments ([`Cli`]); each subcommand module
//! turns them into validated objects (a parsed [`metaguard_core::Config`],
//! a checked privilege level) before doing anything.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod apply;
mod config;
mod daemon;
mod demo;
mod doctor;
mod exec;
mod gate;
mod generate;
mod lab_probe;
mod reload;
mod remove;
mod render;
mod report;
mod verify;

/// Exit code for drift or problems found.
pub const EXIT_PROBLEMS: u8 = 1;
/// Exit code for usage, config or permission errors.
pub const EXIT_ERROR: u8 = 2;

/// `metaguard --version`: the version, then whether this binary carries
/// the BPF layer (the cargo feature `bpf`), e.g. `metaguard 0.1.0 (bpf
/// layer: built)`.
fn version() -> String {
    format!(
        "{} (bpf layer: {})",
        env!("CARGO_PKG_VERSION"),
        if metaguard_sys::bpf::BUILT {
            "built"
        } else {
            "not built"
        }
    )
}

#[derive(Debug, Parser)]
#[command(
    name = "metaguard",
    version = version(),
    about = "Keeps containers away from the cloud instance metadata service without breaking what needs it.",
    propagate_version = true
)]
pub struct Cli {
    /// Directory of metaguard's run-time state (which namespaces it wrote to).
    #[arg(long, global = true, hide = true, value_name = "DIR", default_value = crate::enforce::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The Docker Engine API socket (for `containers` and `ecs-tasks` selectors).
    #[arg(long, global = true, value_name = "PATH", default_value = crate::discovery::docker::DEFAULT_SOCKET)]
    docker_socket: PathBuf,
    /// Where the BPF layer pins its maps and links (on a bpf filesystem).
    #[arg(long, global = true, hide = true, value_name = "DIR", default_value = metaguard_sys::bpf::DEFAULT_PIN_DIR)]
    bpf_pin_dir: PathBuf,
    /// The only cgroup subtree (relative to the cgroup2 root) where the BPF
    /// layer may attach programs; the lab passes its own.
    #[arg(long, global = true, hide = true, value_name = "CGROUP")]
    bpf_attach_within: Option<String>,
    /// Where observe mode records requests (`daemon` writes, `report` reads).
    #[arg(long, global = true, value_name = "DIR", default_value = metaguard_proxy::observe::DEFAULT_DIR)]
    observe_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Configuration file; when the default path does not exist, the
    /// built-in default policy applies.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install or replace this host's rules, atomically.
    Apply {
        #[command(flatten)]
        config: ConfigArg,
        /// Print exactly what would be loaded (the nft script); touch nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Exit 0 when the kernel matches the config; 1 and a diff when not.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete every object metaguard created (tables, addresses, routes), nothing else.
    Remove,
    /// Apply, then keep it true: heal, follow workloads, serve proxy and metrics.
    Daemon {
        #[command(flatten)]
        config: ConfigArg,
        /// Remove metaguard's rules when stopped with SIGTERM (default: they stay, fail-closed).
        #[arg(long)]
        remove_on_exit: bool,
        /// Where to serve /metrics and /healthz (loopback only).
        #[arg(long, value_name = "ADDR", default_value = crate::daemon::DEFAULT_METRICS_ADDR)]
        metrics: String,
        /// Log JSON lines instead of text.
        #[arg(long)]
        json: bool,
        /// Check that the daemon can run here with this config — the config,
        /// privileges, nft, the audit log's path, the BPF layer — and exit;
        /// change nothing (the unit's ExecStartPre).
        #[arg(long)]
        check: bool,
        /// How many bytes of observe records to keep (in 8 rotated files).
        #[arg(long, hide = true, value_name = "BYTES", default_value_t = metaguard_proxy::observe::Caps::DEFAULT_TOTAL)]
        observe_max_bytes: u64,
    },
    /// Have the running daemon apply its config again (SIGHUP) and wait for the outcome.
    Reload {
        #[command(flatten)]
        config: ConfigArg,
        /// Seconds to wait for the daemon's answer.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// Exit 0 when containers may start: metaguard's daemon is ready, or its unit is not enabled.
    Gate {
        /// While metaguard.service is starting or restarting, wait this many seconds for its
        /// daemon to be ready before holding the unit back.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        wait: u64,
    },
    /// Diagnose this host for the known failure modes (F1–F23, docs/doctor.md).
    Doctor {
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
        /// Apply the minimal fix for each finding.
        #[arg(long)]
        fix: bool,
        /// With --fix: show the fix commands, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Confirm verdicts with real connections from a short-lived namespace.
        #[arg(long)]
        probe: bool,
        /// Analyse a snapshot directory instead of this host.
        #[arg(long, value_name = "DIR")]
        from: Option<PathBuf>,
        /// Write this host's snapshot to DIR and exit.
        #[arg(long, value_name = "DIR", conflicts_with = "from")]
        collect: Option<PathBuf>,
        /// Merge several hosts' `doctor --json` outputs into one host × finding table.
        #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with_all = ["from", "collect", "fix", "probe"])]
        merge: Vec<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print deployment files: boothook | user-data | systemd | systemd-dropin | ecs-config.
    Render {
        /// What to render: boothook, user-data, systemd, systemd-dropin or ecs-config.
        #[arg(value_name = "KIND")]
        kind: String,
        #[command(flatten)]
        config: ConfigArg,
        /// ECS cluster name (required by user-data; also written by ecs-config).
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        /// The installed metaguard binary that the unit and the boothook run.
        #[arg(long, value_name = "PATH", default_value = metaguard_core::render::DEFAULT_BINARY)]
        binary: String,
        /// Where the boothook installs the config and the unit reads it.
        #[arg(long, value_name = "PATH", default_value = metaguard_core::config::DEFAULT_PATH)]
        installed_config: String,
    },
    /// What observe mode recorded, and what --config would break if enforced.
    Report {
        #[command(flatten)]
        config: ConfigArg,
        /// Only records of the last DURATION (e.g. 30m, 24h, 7d, 1h30m).
        #[arg(long, value_name = "DURATION", value_parser = report::parse_since)]
        since: Option<(String, u64)>,
        /// Print the report as JSON (schema: docs/observe.md).
        #[arg(long)]
        json: bool,
        /// Print a config that allows exactly what was observed and denies the rest.
        #[arg(long, conflicts_with = "json")]
        suggest: bool,
    },
    /// Run CMD unable to reach metadata endpoints (no root needed).
    Exec {
        #[command(flatten)]
        args: exec::ExecArgs,
    },
    /// Build an emulated ECS host in network namespaces; show before/after.
    Demo {
        /// Print the reachability matrices as JSON.
        #[arg(long)]
        json: bool,
        /// Colour: auto (on a terminal), always, never.
        #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
        color: String,
        /// Run the ECS agent as a container on docker0 instead of on the
        /// host network (docs/deploy.md, "The ECS agent on a bridge"), with
        /// the daemon relaying task credentials to it.
        #[arg(long)]
        agent_on_bridge: bool,
    },
    /// Internal: run one lab probe (JSON spec) and print its JSON result.
    #[command(name = "lab-probe", hide = true)]
    LabProbe { spec: String },
    /// Internal: write the man pages or shell completions into DIR (packaging).
    #[command(name = "__generate", hide = true)]
    Generate {
        #[arg(value_enum)]
        what: generate::Asset,
        dir: PathBuf,
    },
}

/// Parses the command line, runs the command, maps the outcome to an exit
/// code. Errors print their whole chain (`{:#}`); a closed stdout is not
/// an error.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::enforce::bpf::set_fence(cli.bpf_attach_within.clone());
    let result = match cli.command {
        Command::Apply { config, dry_run } => apply::run(
            &config,
            dry_run,
            &cli.state_dir,
            &cli.docker_socket,
            &cli.bpf_pin_dir,
        ),
        Command::Verify { config, json } => verify::run(
            &config,
            json,
            &cli.state_dir,
            &cli.docker_socket,
            &cli.bpf_pin_dir,
        ),
        Command::Remove => remove::run(&cli.state_dir, &cli.docker_socket, &cli.bpf_pin_dir),
        Command::Daemon {
            config,
            remove_on_exit,
            metrics,
            json,
            check,
            observe_max_bytes,
        } => {
            let paths = daemon::Paths {
                state_dir: &cli.state_dir,
                docker_socket: &cli.docker_socket,
                bpf_pin_dir: &cli.bpf_pin_dir,
                observe_dir: &cli.observe_dir,
                observe_max_bytes,
            };
            if check {
                daemon::check(&config, &metrics, &paths)
            } else {
                daemon::run(&config, remove_on_exit, &metrics, json, &paths)
            }
        }
        Command::Reload { config, timeout } => reload::run(
            &config,
            std::time::Duration::from_secs(timeout),
            &cli.state_dir,
        ),
        Command::Gate { wait } => gate::run(&cli.state_dir, std::time::Duration::from_secs(wait)),
        Command::Doctor {
            json,
            fix,
            dry_run,
            probe,
            from,
            collect,
            merge,
            config,
        } => doctor::run(&doctor::Args {
            json,
            fix,
            dry_run,
            probe,
            from: from.as_deref(),
            collect: collect.as_deref(),
            merge: &merge,
            config: &config,
            bpf_pin_dir: &cli.bpf_pin_dir,
            docker_socket: &cli.docker_socket,
        }),
        Command::Render {
            kind,
            config,
            cluster,
            binary,
            installed_config,
        } => render::run(render::Args {
            kind: &kind,
            config: &config,
            cluster,
            binary,
            installed_config,
        }),
        Command::Report {
            config,
            since,
            json,
            suggest,
        } => report::run(&report::Args {
            config: &config,
            since,
            json,
            suggest,
            observe_dir: &cli.observe_dir,
        }),
        Command::Exec { args } => exec::run(args),
        Command::Demo {
            json,
            color,
            agent_on_bridge,
        } => demo::run(json, &color, agent_on_bridge),
        Command::LabProbe { spec } => lab_probe::run(&spec),
        Command::Generate { what, dir } => generate::run(what, &dir),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            let _ = std::io::stdout().flush();
            eprintln!("metaguard: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn version_says_whether_the_bpf_layer_is_built() {
        let v = Cli::command().render_version();
        let want = if metaguard_sys::bpf::BUILT {
            "(bpf layer: built)"
        } else {
            "(bpf layer: not built)"
        };
        assert_eq!(
            v.trim_end(),
            format!("metaguard {} {want}", env!("CARGO_PKG_VERSION"))
        );
        // Subcommands print the same version.
        let mut cmd = Cli::command();
        cmd.build();
        let apply = cmd.find_subcommand("apply").expect("apply");
        assert_eq!(apply.get_version(), cmd.get_version());
    }
}
