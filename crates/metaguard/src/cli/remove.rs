//! `metaguard remove`: delete every object metaguard created, nothing else.

use std::path::Path;
use std::process::ExitCode;

use super::config;
use crate::enforce::Engine;

pub fn run(state_dir: &Path, docker: &Path, bpf_pin_dir: &Path) -> anyhow::Result<ExitCode> {
    config::require_root("remove")?;
    let engine = Engine::new(state_dir, docker)?.with_bpf_pin_dir(bpf_pin_dir);
    let removed = engine.remove()?;
    if removed.is_empty() {
        println!("nothing to remove: no metaguard table found");
    } else {
        println!("removed metaguard's table from: {}", removed.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
