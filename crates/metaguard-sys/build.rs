//! Compiles the cgroup BPF programs (`bpf/guard.bpf.c`) with clang into
//! `$OUT_DIR/guard.bpf.o`, which `bpf.rs` embeds. clang and libbpf's
//! headers come from the README's set-up (`scripts/common.sh`: clang,
//! libbpf-dev). Without clang the object is left empty and the BPF layer
//! reports itself unavailable at run time (the nft layer still works).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/guard.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("guard.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let multiarch = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-target", "bpf"])
        .arg(&multiarch)
        .args(["-c", src, "-o"])
        .arg(&obj)
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => {
            println!(
                "cargo:warning=metaguard-sys: could not compile {src} with {clang} ({other:?}); \
                 the BPF layer will be unavailable (install clang and libbpf-dev)"
            );
            std::fs::write(&obj, b"").expect("write empty BPF object");
        }
    }
}
