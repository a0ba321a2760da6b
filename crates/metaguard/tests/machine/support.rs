//! Helpers of the machine tests: the binary under test, its package, a
//! booted host with metaguard installed, probes and assertions.

use std::path::PathBuf;

use libtest_mimic::Failed;
use metaguard_lab::machine::{Host, HostOptions, Rootfs};

/// The metaguard binary under test.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metaguard"))
}

pub fn host_options() -> HostOptions {
    HostOptions::beside(&exe())
}

/// Why the machine tests cannot run here, if they cannot.
pub fn missing() -> Option<String> {
    if !metaguard_sys::process::is_root() {
        return Some("needs root (network namespaces, systemd-nspawn)".into());
    }
    let opts = host_options();
    if let Err(e) = Rootfs::open(&opts.rootfs) {
        return Some(e.to_string());
    }
    if !opts.standin_exe.is_file() {
        return Some(format!(
            "{} is not built (cargo build -p metaguard-lab --bin mglab-standin)",
            opts.standin_exe.display()
        ));
    }
    for (tool, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("cargo-deb", "cargo install cargo-deb"),
    ] {
        if metaguard_lab::cmd::find_tool(tool).is_none() && which_cargo(tool).is_none() {
            return Some(format!("{tool} is not installed ({package})"));
        }
    }
    None
}

fn which_cargo(tool: &str) -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let p = home.join("bin").join(tool);
    p.is_file().then_some(p)
}

/// `ensure!(cond, "fmt", args…)`: fail the test with a message.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+).into());
        }
    };
}

/// A host booted once, not yet with metaguard.
pub fn booted() -> Result<Host, Failed> {
    let mut host = Host::new(host_options()).map_err(|e| format!("machine host: {e}"))?;
    host.boot().map_err(|e| format!("boot: {e}"))?;
    Ok(host)
}
