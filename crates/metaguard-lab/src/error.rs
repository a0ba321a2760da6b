//! Errors of the lab, each naming the object it failed on.

use std::io;
use std::path::PathBuf;

use metaguard_sys::cgroup::CgroupError;
use metaguard_sys::netns::NetnsError;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root (network namespaces, bridges, cgroups); run it with sudo")]
    NotRoot,
    #[error("`{tool}` is not installed; the README's set-up command installs it (apt-get install {package})")]
    MissingTool { tool: String, package: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("lab server {name} could not start: {source}")]
    Server { name: String, source: io::Error },
    #[error("probe output could not be read: {0}")]
    ProbeOutput(String),
    #[error("metaguard daemon: {0}")]
    Daemon(String),
    #[error("machine: {0}")]
    Machine(String),
}
