//! Deployment files, rendered from a validated [`Config`]: the systemd
//! unit and the drop-in that holds container units back until it is
//! ready, the cloud-init boothook, EC2 user data (MIME multipart) and the
//! ECS agent's `ecs.config` lines.
//!
//! Pure text generation: the caller reads the config file and hands in its
//! text (embedded in the boothook and hashed), the metaguard version and
//! the options. Same inputs → byte-identical output (golden files pin it).
//!
//! Every rendered file names the metaguard version and the config's
//! SHA-256 (`sha2`, RustCrypto): the hash of the config text as the
//! boothook installs it, so `sha256sum /etc/metaguard/metaguard.toml` on a
//! host shows whether it runs the config a file was rendered from.
//!
//! A config that `metaguard apply` would refuse cannot be rendered either:
//! a boot-time file must never carry a policy that fails at boot.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::config::{Config, DEFAULT_PATH};
use crate::ruleset::{self, HostFacts, PlanError};

mod boothook;
mod ecs_config;
pub mod systemd;
mod user_data;

/// Where the Debian package (and the docs) install the binary.
pub const DEFAULT_BINARY: &str = "/usr/bin/metaguard";
/// EC2's limit on user data, in bytes, before base64 encoding.
pub const USER_DATA_LIMIT: usize = 16 * 1024;
/// The file the ECS agent (ecs-init) reads its settings from.
pub const ECS_CONFIG_PATH: &str = "/etc/ecs/ecs.config";
/// Lines longer than this cannot be carried in a MIME part (RFC 5322).
const MIME_LINE_MAX: usize = 998;

/// What to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Boothook,
    UserData,
    Systemd,
    /// The drop-in for docker.service, containerd.service and ecs.service.
    SystemdDropin,
    EcsConfig,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Boothook,
        Kind::UserData,
        Kind::Systemd,
        Kind::SystemdDropin,
        Kind::EcsConfig,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Boothook => "boothook",
            Kind::UserData => "user-data",
            Kind::Systemd => "systemd",
            Kind::SystemdDropin => "systemd-dropin",
            Kind::EcsConfig => "ecs-config",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = RenderError;

    fn from_str(s: &str) -> Result<Kind, RenderError> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| RenderError::UnknownKind(s.to_string()))
    }
}

/// The config to render from: the validated form and the text it was
/// parsed from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub config: &'a Config,
    /// The config file's text (for the built-in default:
    /// [`crate::config::BUILTIN_DEFAULT_TOML`]).
    pub text: &'a str,
}

/// How to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// metaguard's version (`env!("CARGO_PKG_VERSION")` of the binary).
    pub version: String,
    /// ECS cluster name, for `user-data` (required there) and `ecs-config`.
    pub cluster: Option<String>,
    /// The installed binary that the unit and the boothook run.
    pub binary: String,
    /// Where the boothook installs the config, and what the unit passes to
    /// `--config`.
    pub config_path: String,
}

impl Options {
    pub fn new(version: impl Into<String>) -> Options {
        Options {
            version: version.into(),
            cluster: None,
            binary: DEFAULT_BINARY.to_string(),
            config_path: DEFAULT_PATH.to_string(),
        }
    }
}

/// Why something cannot be rendered. Every message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error(
        "unknown KIND {0:?}: use one of boothook, user-data, systemd, systemd-dropin, ecs-config"
    )]
    UnknownKind(String),
    #[error("{kind} needs the ECS cluster name: pass --cluster NAME")]
    ClusterRequired { kind: Kind },
    #[error("cluster name {name:?} is not a valid ECS cluster name: {why}")]
    InvalidCluster { name: String, why: &'static str },
    #[error("{what} {path:?} is not usable in a rendered file: {why}")]
    InvalidPath {
        what: &'static str,
        path: String,
        why: &'static str,
    },
    #[error("this config cannot be deployed: {0}")]
    Plan(#[from] PlanError),
    #[error("{kind} would be {size} bytes; EC2 accepts at most {limit} bytes of user data — shorten the config (comments count too)")]
    TooLarge {
        kind: Kind,
        size: usize,
        limit: usize,
    },
    #[error("line {line} of the rendered {kind} is {len} bytes long, but MIME lines are limited to 998 bytes — split the long config line it comes from")]
    LineTooLong { kind: Kind, line: usize, len: usize },
    #[error("the config text holds a line {marker:?}, which {kind} uses to delimit it — remove that line")]
    MarkerCollision { kind: Kind, marker: String },
}

/// The text as the boothook installs it: with a final newline.
fn installed_text(text: &str) -> String {
    if text.is_empty() || text.ends_with('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    }
}

/// `sha256:<hex>` of the config as installed (a final newline added when
/// the text lacks one). For a file that ends in a newline this equals
/// `sha256sum FILE`.
pub fn config_hash(text: &str) -> String {
    let digest = Sha256::digest(installed_text(text).as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Facts every rendered file states, ready to print as comment lines.
struct Stamp {
    version: String,
    origin: String,
    hash: String,
}

impl Stamp {
    fn new(src: &Source<'_>, opts: &Options) -> Stamp {
        Stamp {
            version: opts.version.clone(),
            origin: src.config.origin.to_string(),
            hash: config_hash(src.text),
        }
    }

    /// Short hex prefix of the hash, for delimiters.
    fn short(&self) -> &str {
        let hex = self.hash.trim_start_matches("sha256:");
        &hex[..12.min(hex.len())]
    }

    /// The two comment lines, with `prefix` (e.g. `"# "`).
    fn lines(&self, prefix: &str, kind: Kind) -> String {
        format!(
            "{prefix}Rendered by metaguard {} (`metaguard render {kind}`); do not edit, re-render.\n\
             {prefix}Config: {} {}\n",
            self.version, self.origin, self.hash
        )
    }
}

/// Renders `kind`. Pure.
pub fn render(kind: Kind, src: &Source<'_>, opts: &Options) -> Result<String, RenderError> {
    // Refuse what apply refuses: a rendered file must not fail at boot.
    ruleset::plan(src.config, &HostFacts::default())?;
    check_path("binary", &opts.binary)?;
    check_path("config path", &opts.config_path)?;
    if let Some(c) = &opts.cluster {
        check_cluster(c)?;
    }
    let stamp = Stamp::new(src, opts);
    match kind {
        Kind::Systemd => Ok(systemd::render(&stamp, opts)),
        Kind::SystemdDropin => Ok(systemd::render_dropin(&stamp, opts)),
        Kind::EcsConfig => Ok(ecs_config::render(&stamp, src.config, opts)),
        Kind::Boothook => {
            let out = boothook::render(&stamp, src, opts)?;
            check_size(kind, &out)?;
            Ok(out)
        }
        Kind::UserData => {
            if opts.cluster.is_none() {
                return Err(RenderError::ClusterRequired { kind });
            }
            let out = user_data::render(&stamp, src, opts)?;
            check_size(kind, &out)?;
            Ok(out)
        }
    }
}

fn check_size(kind: Kind, out: &str) -> Result<(), RenderError> {
    if out.len() > USER_DATA_LIMIT {
        return Err(RenderError::TooLarge {
            kind,
            size: out.len(),
            limit: USER_DATA_LIMIT,
        });
    }
    Ok(())
}

/// Paths go into shell scripts and unit files unquoted-safe: absolute,
/// plain characters only.
fn check_path(what: &'static str, path: &str) -> Result<(), RenderError> {
    let why = if !path.starts_with('/') {
        Some("it must be absolute")
    } else if !path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-' | b'+'))
    {
        Some("only letters, digits and / . _ - + are allowed")
    } else if path.split('/').any(|s| s == "..") {
        Some("it must not contain '..'")
    } else if path.ends_with('/') {
        Some("it must name a file")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(RenderError::InvalidPath {
            what,
            path: path.to_string(),
            why,
        }),
    }
}

/// ECS: "Up to 255 letters (uppercase and lowercase), numbers, underscores,
/// and hyphens are allowed."
fn check_cluster(name: &str) -> Result<(), RenderError> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 255 {
        Some("at most 255 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Some("only letters, digits, '_' and '-' are allowed")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(RenderError::InvalidCluster {
            name: name.to_string(),
            why,
        }),
    }
}

#[cfg(test)]
mod tests;
