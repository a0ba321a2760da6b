//! The fuzz targets' property functions over their seed corpus, in a
//! normal `cargo test`: a cheap guard that the targets (fuzz/, outside the
//! workspace) still build against the public API and that every seed
//! passes. Coverage-guided fuzzing itself is `scripts/fuzz`
//! (docs/fuzzing.md).
//!
//! Seeds are the committed files under `fuzz/seeds/<target>/` plus what
//! the repository's fixtures give: the doctor snapshots of
//! `crates/metaguard/tests/doctor/fixtures/` (whole, and their rulesets and
//! configs one by one), the packaged config and the TOML examples of
//! docs/. With `METAGUARD_FUZZ_SEEDS=DIR` the test also writes every seed
//! to `DIR/<target>/`, which is how `scripts/fuzz` builds its corpus.

#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "fuzz/props.rs"]
mod props;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every file under `dir`, relative path → text, sorted.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if let Ok(text) = fs::read_to_string(&p) {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, text);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The ```toml blocks of a Markdown file.
fn toml_blocks(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in md.lines() {
        match (&mut cur, line.trim_start()) {
            (None, l) if l.starts_with("```toml") => cur = Some(String::new()),
            (Some(_), l) if l.starts_with("```") => out.extend(cur.take()),
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    out
}

/// The seeds of `target`: (name, bytes).
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = tree(&repo().join("fuzz/seeds").join(target))
        .into_iter()
        .map(|(n, t)| (n, t.into_bytes()))
        .collect();
    let fixtures = repo().join("crates/metaguard/tests/doctor/fixtures");
    let mut cases: Vec<PathBuf> = fs::read_dir(&fixtures)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    cases.sort();
    let case_name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let mut from_cases = |keep: &dyn Fn(&str) -> bool| {
        for case in &cases {
            for (rel, text) in tree(case) {
                let base = rel.rsplit('/').next().unwrap_or(&rel);
                if keep(base) {
                    let name = format!("{}--{}", case_name(case), rel.replace('/', "--"));
                    out.push((name, text.into_bytes()));
                }
            }
        }
    };
    match target {
        "config" => {
            from_cases(&|f| f == "metaguard.toml");
            let packaged = fs::read_to_string(repo().join("packaging/metaguard.toml")).unwrap();
            out.push(("packaging--metaguard.toml".into(), packaged.into_bytes()));
            out.push((
                "builtin-default.toml".into(),
                metaguard_core::config::BUILTIN_DEFAULT_TOML
                    .as_bytes()
                    .to_vec(),
            ));
            for (rel, md) in tree(&repo().join("docs")) {
                for (i, b) in toml_blocks(&md).into_iter().enumerate() {
                    out.push((
                        format!("docs--{}--{i}.toml", rel.replace('/', "--")),
                        b.into_bytes(),
                    ));
                }
            }
        }
        "ethtool" => from_cases(&|f| f == "ethtool-stats.txt"),
        "iptables_save" => from_cases(&|f| f.ends_with("save.txt")),
        "nft_json" => from_cases(&|f| f == "nft-ruleset.json"),
        "merge" => {
            // Each fixture's report, as `doctor --from DIR --json` writes it.
            let snaps = repo().join("crates/metaguard/tests/doctor/snapshots");
            for (rel, text) in tree(&snaps) {
                if rel.ends_with(".json.snap") {
                    let body = text.splitn(3, "---\n").nth(2).unwrap_or("").to_string();
                    out.push((rel.replace(".json.snap", ".json"), body.into_bytes()));
                }
            }
        }
        "snapshot" => {
            for case in &cases {
                let packed = props::pack(&tree(case));
                out.push((format!("{}.snap", case_name(case)), packed.into_bytes()));
            }
        }
        _ => {}
    }
    out
}

fn run(target: &str) {
    let (_, f) = props::TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .unwrap_or_else(|| panic!("no property function for target {target}"));
    let seeds = seeds(target);
    assert!(!seeds.is_empty(), "target {target} has no seeds");
    if let Some(dir) = std::env::var_os("METAGUARD_FUZZ_SEEDS") {
        let dir = Path::new(&dir).join(target);
        fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            fs::write(dir.join(name.replace('/', "--")), bytes).unwrap();
        }
    }
    for (name, bytes) in &seeds {
        let r = std::panic::catch_unwind(|| f(bytes));
        assert!(
            r.is_ok(),
            "target {target}: seed {name} fails its properties"
        );
    }
}

#[test]
fn every_target_has_a_test() {
    let names: Vec<&str> = props::TARGETS.iter().map(|(n, _)| *n).collect();
    let targets: Vec<String> = fs::read_dir(repo().join("fuzz/fuzz_targets"))
        .unwrap()
        .flatten()
        .map(|e| e.path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    for t in &targets {
        assert!(
            names.contains(&t.as_str()),
            "fuzz target {t} has no property function"
        );
    }
    assert_eq!(names.len(), targets.len(), "{names:?} vs {targets:?}");
}

#[test]
fn seeds_config() {
    run("config");
}

#[test]
fn seeds_ethtool() {
    run("ethtool");
}

#[test]
fn seeds_iptables_save() {
    run("iptables_save");
}

#[test]
fn seeds_merge() {
    run("merge");
}

#[test]
fn seeds_nft_json() {
    run("nft_json");
}

#[test]
fn seeds_proxy_target() {
    run("proxy_target");
}

#[test]
fn seeds_snapshot() {
    run("snapshot");
}
