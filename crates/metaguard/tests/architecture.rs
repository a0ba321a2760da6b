//! ARCHITECTURE.md names only what exists.
//!
//! Every backticked repository path (`crates/…`, `docs/…`, `scripts/…`,
//! `packaging/…`) must exist, and every backticked Rust path
//! (`enforce::Engine::apply`, `core::ruleset::plan`, `lab::Lab`) must
//! resolve: its leading segments to a module file of the crate, the rest
//! to items declared (or re-exported) in that module. A stale map is a
//! bug, so a rename that forgets the map fails here.

use std::fs;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The text between backticks, outside fenced code blocks' prose too:
/// diagrams name modules as well, so fences are scanned like prose for
/// Rust paths (a diagram's `a::b` without backticks is checked as a word).
fn backticked(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            out.extend(
                line.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .filter(|w| w.contains("::"))
                    .map(str::to_string),
            );
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let Some(inner) = parts.next() {
            out.push(inner.to_string());
            parts.next();
        }
    }
    out
}

fn is_repo_path(s: &str) -> bool {
    ["crates/", "docs/", "scripts/", "packaging/", ".ci/"]
        .iter()
        .any(|p| s.starts_with(p))
        && !s.contains(' ')
}

fn is_rust_path(s: &str) -> bool {
    let segs: Vec<&str> = s.split("::").collect();
    segs.len() >= 2
        && segs
            .iter()
            .all(|g| !g.is_empty() && g.chars().all(|c| c.is_alphanumeric() || c == '_'))
}

/// The `src` directory a path's first segment names, and whether that
/// segment was the crate itself (else it is a module of the binary).
fn crate_src(first: &str) -> Option<(PathBuf, bool)> {
    let krate = match first {
        "core" | "metaguard_core" => "metaguard-core",
        "sys" | "metaguard_sys" => "metaguard-sys",
        "lab" | "metaguard_lab" => "metaguard-lab",
        "metaguard_proxy" => "metaguard-proxy",
        "metaguard" => "metaguard",
        _ => return Some((repo().join("crates/metaguard/src"), false)),
    };
    Some((repo().join("crates").join(krate).join("src"), true))
}

/// Every `.rs` file of a module: its file, and the files below its directory.
fn module_files(file: Option<PathBuf>, dir: Option<PathBuf>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = file.into_iter().collect();
    let mut stack: Vec<PathBuf> = dir.into_iter().collect();
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    out
}

fn declares(files: &[PathBuf], name: &str) -> bool {
    let kinds = [
        "struct", "enum", "trait", "fn", "type", "const", "static", "mod",
    ];
    files.iter().any(|f| {
        let text = fs::read_to_string(f).unwrap_or_default();
        text.lines().any(|line| {
            let words: Vec<&str> = line
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|w| !w.is_empty())
                .collect();
            let declared = words
                .windows(2)
                .any(|w| kinds.contains(&w[0]) && w[1] == name);
            let reexported = line.trim_start().starts_with("pub use") && words.contains(&name);
            declared || reexported
        })
    })
}

/// Resolves `a::b::C::d`; `Err` says which segment is missing.
fn resolve(path: &str) -> Result<(), String> {
    let segs: Vec<&str> = path.split("::").collect();
    let (src, crate_named) = crate_src(segs[0]).ok_or("unknown crate")?;
    let mut rest = if crate_named { &segs[1..] } else { &segs[..] };
    let mut dir = src.clone();
    let mut file = Some(src.join(if src.ends_with("metaguard/src") {
        "main.rs"
    } else {
        "lib.rs"
    }));
    let mut module_dir = Some(src);
    while let Some((seg, tail)) = rest.split_first() {
        let as_file = dir.join(format!("{seg}.rs"));
        let as_dir = dir.join(seg);
        if !as_file.is_file() && !as_dir.join("mod.rs").is_file() {
            break;
        }
        file = as_file.is_file().then_some(as_file);
        module_dir = as_dir.is_dir().then_some(as_dir.clone());
        if file.is_none() {
            file = Some(as_dir.join("mod.rs"));
        }
        dir = as_dir;
        rest = tail;
    }
    if segs.len() - rest.len() == usize::from(crate_named) && !crate_named {
        return Err(format!("`{}` is not a module of the binary", segs[0]));
    }
    let files = module_files(file, module_dir);
    for item in rest {
        if !declares(&files, item) {
            return Err(format!("no item `{item}` in its module"));
        }
    }
    Ok(())
}

#[test]
fn every_name_in_architecture_md_exists() {
    let text = fs::read_to_string(repo().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut problems = Vec::new();
    let mut checked = 0;
    for name in backticked(&text) {
        let name = name.trim_end_matches("()");
        if is_repo_path(name) {
            checked += 1;
            if !repo().join(name.trim_end_matches('/')).exists() {
                problems.push(format!("{name}: no such file or directory"));
            }
        } else if is_rust_path(name) && !name.starts_with("clippy::") {
            checked += 1;
            if let Err(why) = resolve(name) {
                problems.push(format!("{name}: {why}"));
            }
        }
    }
    assert!(
        checked >= 30,
        "only {checked} names found: is the parser broken?"
    );
    assert!(
        problems.is_empty(),
        "ARCHITECTURE.md names what does not exist:\n{}",
        problems.join("\n")
    );
}

#[test]
fn architecture_md_is_one_page() {
    let text = fs::read_to_string(repo().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let lines = text.lines().count();
    assert!(
        lines <= 150,
        "ARCHITECTURE.md has {lines} lines; keep it ≤ 150 and move detail to docs/design/"
    );
}

#[test]
fn the_checker_catches_stale_names() {
    assert!(resolve("enforce::Engine").is_ok());
    assert!(resolve("enforce::NoSuchEngine").is_err());
    assert!(resolve("nosuchmodule::Thing").is_err());
    assert!(resolve("core::ruleset::plan").is_ok());
    assert!(resolve("core::ruleset::no_such_fn").is_err());
}
