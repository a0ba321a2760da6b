//! Shared by the benchmarks (included with `mod common;`): a description of
//! the machine, and writing one bench's section of BENCHMARKS.md.

// Each bench target compiles its own copy of this module and uses a part.
#![allow(dead_code)]

use std::path::PathBuf;

/// "CPU model, N cores".
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores")
}

/// Replaces the text between `<!-- bench:NAME -->` and
/// `<!-- /bench:NAME -->` in BENCHMARKS.md with `body` (the markers stay),
/// or appends the section when it is not there yet. Other sections and
/// text outside the markers are left as they are.
pub fn write_section(name: &str, body: &str) -> Result<(), String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../BENCHMARKS.md");
    let start = format!("<!-- bench:{name} -->");
    let end = format!("<!-- /bench:{name} -->");
    let section = format!("{start}\n{}\n{end}", body.trim_end());
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        "# Benchmarks\n\nFigures from the project's benchmarks; each section names the command that produced it.\n".into()
    });
    let new = match (text.find(&start), text.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{section}{}", &text[..a], &text[b + end.len()..]),
        _ => format!("{}\n\n{section}\n", text.trim_end()),
    };
    std::fs::write(&path, new).map_err(|e| format!("write {}: {e}", path.display()))
}
