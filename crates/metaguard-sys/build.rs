//! Compiles the cgroup BPF programs (`bpf/guard.bpf.c`) with clang into
//! `$OUT_DIR/guard.bpf.o`, which `bpf.rs` embeds — when the cargo feature
//! `bpf` is on (the default). clang and the headers come from the README's
//! set-up (`scripts/common.sh`: clang, libbpf-dev, linux-libc-dev).
//!
//! With the feature on, a build that cannot produce the object fails, and
//! says what is missing and how to get it — or how to build without the
//! layer (`--no-default-features`; the binary then says `bpf layer: not
//! built`). It never ships an empty object silently.
//!
//! Reruns when the source, a header it read (clang's dependency list), the
//! clang binary, `CLANG`, `PATH` or the include path variables change, so a
//! later build picks up tools installed since, without `cargo clean`.

use std::path::{Path, PathBuf};
use std::process::Command;

const SRC: &str = "bpf/guard.bpf.c";
/// Debian packages that provide what the build needs.
const PACKAGES: &str = "clang libbpf-dev linux-libc-dev";

fn main() {
    println!("cargo:rerun-if-changed={SRC}");
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["CLANG", "PATH", "CPATH", "C_INCLUDE_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_BPF").is_none() {
        return; // bpf.rs embeds nothing
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("guard.bpf.o");
    let deps = out.join("guard.bpf.d");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // The multiarch directory of the target (asm/types.h differs by arch).
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH")
        .unwrap_or_else(|_| std::env::consts::ARCH.to_string());
    let multiarch = PathBuf::from(format!("/usr/include/{arch}-linux-gnu"));

    let mut missing = Vec::new();
    match find_program(&clang) {
        Some(path) => println!("cargo:rerun-if-changed={}", path.display()),
        None if Path::new(&clang).components().count() > 1 => {
            missing.push(format!("clang: CLANG={clang} does not exist"))
        }
        None => missing.push(format!(
            "clang: `{clang}` is not on PATH (set CLANG=/path/to/clang to use another)"
        )),
    }
    let system = include_dirs();
    for (header, dirs, package) in [
        ("bpf/bpf_helpers.h", system.clone(), "libbpf-dev"),
        ("linux/bpf.h", system.clone(), "linux-libc-dev"),
        ("asm/types.h", vec![multiarch.clone()], "linux-libc-dev"),
    ] {
        if !dirs.iter().any(|d| d.join(header).is_file()) {
            let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            missing.push(format!(
                "{header} (from {package}) is in none of {}",
                searched.join(", ")
            ));
        }
    }
    if !missing.is_empty() {
        fail(&format!(
            "cannot build the BPF layer:\n{}",
            missing
                .iter()
                .map(|m| format!("  - {m}"))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }

    let result = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-target", "bpf"])
        .arg(format!("-I{}", multiarch.display()))
        .arg("-MD")
        .arg("-MF")
        .arg(&deps)
        .args(["-c", SRC, "-o"])
        .arg(&obj)
        .output();
    match result {
        Ok(o) if o.status.success() => {}
        Ok(o) => fail(&format!(
            "{clang} could not compile {SRC} ({}):\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => fail(&format!("cannot run {clang}: {e}")),
    }
    // Every header clang read: installing or upgrading one rebuilds.
    match std::fs::read_to_string(&deps) {
        Ok(text) => {
            for header in dependencies(&text).filter(|p| p.ends_with(".h")) {
                println!("cargo:rerun-if-changed={header}");
            }
        }
        Err(e) => fail(&format!("{}: {e}", deps.display())),
    }
}

/// Exits the build with `what` and the ways forward.
fn fail(what: &str) -> ! {
    eprintln!(
        "error: metaguard-sys: {what}\n\n\
         The BPF layer (cargo feature `bpf`, on by default) needs clang and the \
         libbpf and kernel UAPI headers.\n\
         On Debian or Ubuntu: apt-get install {PACKAGES}\n\
         (or set CLANG to a clang that targets bpf).\n\
         To build without the BPF layer (the nft rules still guard; \
         `metaguard --version` then says `bpf layer: not built`):\n    \
         cargo build --no-default-features"
    );
    std::process::exit(1);
}

/// `program` as run: a path, or the first match on PATH.
fn find_program(program: &str) -> Option<PathBuf> {
    let p = Path::new(program);
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|c| c.is_file())
}

/// Where clang looks for `<…>` headers besides `-I`: the include path
/// variables, then the system directories.
fn include_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["CPATH", "C_INCLUDE_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            dirs.extend(std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()));
        }
    }
    dirs.push("/usr/local/include".into());
    dirs.push("/usr/include".into());
    dirs
}

/// The files of a make rule (`clang -MD`): `target: dep dep \` lines.
fn dependencies(rule: &str) -> impl Iterator<Item = &str> {
    rule.split_once(':')
        .map_or("", |(_, deps)| deps)
        .split_whitespace()
        .filter(|t| *t != "\\")
}
