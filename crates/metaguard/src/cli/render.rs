//! `metaguard render KIND [--config PATH] [--cluster NAME]`: print a
//! deployment file (boothook | user-data | systemd | ecs-config) rendered
//! from the config. Touches nothing; needs no privileges.
//!
//! The text itself comes from `metaguard_core::render`; this module reads
//! the config (its text is embedded in the boothook and hashed) and writes
//! the result to standard output.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use metaguard_core::config::{BUILTIN_DEFAULT_TOML, DEFAULT_PATH};
use metaguard_core::render::{self, Kind, Options, Source};
use metaguard_core::Config;

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
    let (config, text) = load_with_text(args.config)?;
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

/// Reads and validates the config like `config::load`, keeping its text:
/// the default path falls back to the built-in policy (and its text) when
/// absent; an explicit path must exist.
fn load_with_text(arg: &ConfigArg) -> anyhow::Result<(Config, String)> {
    let (path, explicit) = match &arg.config {
        Some(p) => (p.as_path(), true),
        None => (Path::new(DEFAULT_PATH), false),
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok((Config::builtin_default(), BUILTIN_DEFAULT_TOML.to_string()));
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read config {}", path.display()));
        }
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    // The error already names the file, line and column.
    let config = Config::parse(&text, &path.display().to_string())?;
    Ok((config, text))
}
