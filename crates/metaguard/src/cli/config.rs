//! Loading the configuration: the default path falls back to the built-in
//! policy when absent; an explicit path must exist.

use std::path::Path;

use anyhow::Context as _;
use metaguard_core::config::{BUILTIN_DEFAULT_TOML, DEFAULT_PATH};
use metaguard_core::Config;

use super::ConfigArg;

/// Reads and validates the configuration named by `arg`.
pub fn load(arg: &ConfigArg) -> anyhow::Result<Config> {
    load_with_text(arg).map(|(config, _)| config)
}

/// Reads and validates the configuration named by `arg`, keeping its text
/// (embedded and hashed by `render`; errors found later point into it):
/// the default path falls back to the built-in policy (and its text) when
/// absent; an explicit path must exist.
pub fn load_with_text(arg: &ConfigArg) -> anyhow::Result<(Config, String)> {
    let (path, explicit) = match &arg.config {
        Some(p) => (p.as_path(), true),
        None => (Path::new(DEFAULT_PATH), false),
    };
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{}: not UTF-8 text (byte {})",
                path.display(),
                e.utf8_error().valid_up_to()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            let mut config = Config::builtin_default();
            on_this_host(&mut config);
            return Ok((config, BUILTIN_DEFAULT_TOML.to_string()));
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read config {}", path.display()));
        }
    };
    // The error already names the file, line and column.
    let mut config = Config::parse(&text, &path.display().to_string())?;
    on_this_host(&mut config);
    Ok((config, text))
}

/// What a config means on this host: the default `container_cgroups` under
/// the cgroup the host's init runs below (see
/// `Layers::rebase_default_container_cgroups`).
fn on_this_host(config: &mut Config) {
    let root = metaguard_sys::cgroup::init_root(Path::new("/proc"));
    config.layers.rebase_default_container_cgroups(&root);
}

/// Fails with a clear message unless running as root.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    if rustix_is_root() {
        Ok(())
    } else {
        anyhow::bail!(
            "`metaguard {what}` changes kernel network state and needs root (CAP_NET_ADMIN); run it with sudo. Nothing was changed."
        )
    }
}

fn rustix_is_root() -> bool {
    metaguard_sys::process::is_root()
}
