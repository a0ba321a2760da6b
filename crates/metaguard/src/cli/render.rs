//! `metaguard render KIND [--config PATH] [--cluster NAME]`: print a
//! deployment file (boothook | user-data | systemd | systemd-dropin | ecs-config) rendered
//! from the config. Touches nothing; needs no privileges.
//!
//! The text itself comes from `metaguard_core::render`; this module reads
//! the config (its text is embedded in the boothook and hashed) and writes
//! the result to standard output.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use metaguard_core::render::{self, Kind, Options, Source};

use super::ConfigArg;

/// The `render` arguments, as parsed.
#[derive(Debug)]
pub struct Args<'a> {
    pub kind: &'a str,
    pub config: &'a ConfigArg,
    pub cluster: Option<String>,
    pub binary: String,
    pub installed_config: String,
}

pub fn run(args: Args<'_>) -> anyhow::Result<ExitCode> {
    // Validate everything before printing anything.
    let kind: Kind = args.kind.parse()?;
    let (config, text) = super::config::load_with_text(args.config)?;
    let mut opts = Options::new(env!("CARGO_PKG_VERSION"));
    opts.cluster = args.cluster;
    opts.binary = args.binary;
    opts.config_path = args.installed_config;
    let out = render::render(
        kind,
        &Source {
            config: &config,
            text: &text,
        },
        &opts,
    )
    .with_context(|| format!("cannot render {kind} from {}", config.origin))?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}
