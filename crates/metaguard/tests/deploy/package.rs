//! The Debian package: built from the binary under test (scripts/package
//! --profile dev --no-build), unpacked into a scratch root with
//! `dpkg-deb -x`, its man pages rendered with `man -l`, checked by
//! lintian. Installing it (maintainer scripts, systemd) is tests/machine.

use std::path::Path;
use std::process::Command;

use libtest_mimic::Failed;

use crate::ensure;
use crate::support::{exe, output, repo, run_ok, Scratch, Tool};
use crate::Needs;

pub const TESTS: &[(&str, Needs, crate::TestFn)] = &[(
    "package::deb_installs_man_pages_render_and_lintian_finds_no_errors",
    Needs::Tool(Tool::Package),
    deb_installs_man_pages_render_and_lintian_finds_no_errors,
)];

const SUBCOMMANDS: [&str; 10] = [
    "apply", "verify", "remove", "daemon", "reload", "gate", "doctor", "render", "exec", "demo",
];

fn deb_installs_man_pages_render_and_lintian_finds_no_errors() -> Result<(), Failed> {
    let dir = Scratch::new("deb")?;
    let out = dir.join("out");
    let started = std::time::Instant::now();
    let printed = run_ok(
        Command::new("bash")
            .arg(repo().join("scripts/package"))
            .args(["--profile", "dev", "--no-build", "--output"])
            .arg(&out),
    )?;
    let deb = std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| format!("no .deb in {}: {printed}", out.display()))?;
    eprintln!(
        "built {} ({} bytes, debug binary) in {:.1} s",
        deb.display(),
        std::fs::metadata(&deb)?.len(),
        started.elapsed().as_secs_f64()
    );

    // Its files, unpacked into a scratch root (installing it for real, with
    // its maintainer scripts, is the machine tests' part: tests/machine).
    let root = dir.join("root");
    run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let listed = run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    let mut want: Vec<String> = vec![
        "/usr/bin/metaguard".into(),
        "/etc/metaguard/metaguard.toml".into(),
        "/lib/systemd/system/metaguard.service".into(),
        "/lib/systemd/system/docker.service.d/metaguard.conf".into(),
        "/lib/systemd/system/containerd.service.d/metaguard.conf".into(),
        "/lib/systemd/system/ecs.service.d/metaguard.conf".into(),
        "/usr/share/man/man8/metaguard.8.gz".into(),
        "/usr/share/bash-completion/completions/metaguard".into(),
        "/usr/share/zsh/vendor-completions/_metaguard".into(),
        "/usr/share/fish/vendor_completions.d/metaguard.fish".into(),
        "/usr/share/doc/metaguard/copyright".into(),
        "/usr/share/doc/metaguard/changelog.Debian.gz".into(),
    ];
    want.extend(SUBCOMMANDS.map(|s| format!("/usr/share/man/man8/metaguard-{s}.8.gz")));
    for f in &want {
        ensure!(
            listed.lines().any(|l| l.ends_with(&format!(".{f}"))),
            "{f} not in the package:\n{listed}"
        );
        ensure!(root.join(&f[1..]).is_file(), "{f} missing in the root");
    }
    let conffiles = run_ok(
        Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg("conffiles"),
    )?;
    ensure!(
        conffiles.trim() == "/etc/metaguard/metaguard.toml",
        "conffiles: {conffiles}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let text = run_ok(Command::new("dpkg-deb").arg("-I").arg(&deb).arg(script))?;
        ensure!(
            text == std::fs::read_to_string(repo().join("packaging/debian").join(script))?,
            "the package's {script} is not packaging/debian/{script}"
        );
    }
    ensure!(
        std::fs::read(root.join("etc/metaguard/metaguard.toml"))?
            == std::fs::read(repo().join("packaging/metaguard.toml"))?,
        "the conffile is not packaging/metaguard.toml"
    );
    let unit = run_ok(
        Command::new(exe())
            .args(["render", "systemd", "--config"])
            .arg(repo().join("packaging/metaguard.toml")),
    )?;
    let installed_unit =
        std::fs::read_to_string(root.join("lib/systemd/system/metaguard.service"))?;
    ensure!(
        installed_unit.lines().skip(3).eq(unit.lines().skip(3)),
        "installed unit differs from `render systemd`"
    );
    let dropin = run_ok(
        Command::new(exe())
            .args(["render", "systemd-dropin", "--config"])
            .arg(repo().join("packaging/metaguard.toml")),
    )?;
    let installed_dropin =
        std::fs::read_to_string(root.join("lib/systemd/system/docker.service.d/metaguard.conf"))?;
    ensure!(
        installed_dropin.lines().skip(3).eq(dropin.lines().skip(3)),
        "installed drop-in differs from `render systemd-dropin`"
    );
    // The installed binary runs from the scratch root.
    let v = run_ok(Command::new(root.join("usr/bin/metaguard")).arg("--version"))?;
    ensure!(v.contains(env!("CARGO_PKG_VERSION")), "{v}");

    // Every man page renders, without warnings.
    for page in std::iter::once("metaguard".to_string())
        .chain(SUBCOMMANDS.map(|s| format!("metaguard-{s}")))
    {
        let p = root.join(format!("usr/share/man/man8/{page}.8.gz"));
        let out = output(
            Command::new("man")
                .arg("-l")
                .arg(&p)
                .env("MANWIDTH", "80")
                .env_remove("MAN_KEEP_FORMATTING")
                .env("PAGER", "cat"),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && stderr.trim().is_empty(),
            "man -l {page}: {}: {stderr}",
            out.status
        );
        ensure!(
            text.contains("NAME") && text.contains("SYNOPSIS"),
            "man {page}:\n{text}"
        );
    }

    lintian(&deb)
}

fn lintian(deb: &Path) -> Result<(), Failed> {
    let out = output(
        Command::new("lintian")
            .args(["--tag-display-limit", "0", "--fail-on", "error"])
            .arg(deb),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines() {
        eprintln!("lintian: {l}");
    }
    ensure!(
        out.status.success() && !text.lines().any(|l| l.starts_with("E: ")),
        "lintian: {}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
