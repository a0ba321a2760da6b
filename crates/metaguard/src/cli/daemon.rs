//! `metaguard daemon [--config PATH] [--remove-on-exit] [--metrics ADDR] [--json]`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use super::{config, ConfigArg};
use crate::daemon;

pub fn run(
    arg: &ConfigArg,
    remove_on_exit: bool,
    metrics: &str,
    json: bool,
    state_dir: &Path,
    docker: &Path,
    bpf_pin_dir: &Path,
) -> anyhow::Result<ExitCode> {
    init_logging(json);
    let metrics_addr: SocketAddr = metrics
        .parse()
        .with_context(|| format!("--metrics {metrics:?} is not an IP:PORT address"))?;
    // Validate the config and privileges before anything starts.
    config::load(arg)?;
    config::require_root("daemon")?;
    let opts = daemon::Options {
        config_path: arg.config.clone(),
        state_dir: state_dir.to_path_buf(),
        docker_socket: docker.to_path_buf(),
        bpf_pin_dir: bpf_pin_dir.to_path_buf(),
        remove_on_exit,
        metrics_addr,
    };
    daemon::run(opts, |path: Option<&Path>| {
        config::load(&ConfigArg {
            config: path.map(PathBuf::from),
        })
    })?;
    Ok(ExitCode::SUCCESS)
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("METAGUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.with_target(false).init();
    }
}
