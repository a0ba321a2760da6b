//! `metaguard render` from the outside: exit codes, messages, stamps.

use std::process::Command;

use libtest_mimic::Failed;
use metaguard_core::config::Origin;
use metaguard_core::Config;

use crate::ensure;
use crate::support::{exe, output, render, repo, run_ok, Scratch};
use crate::Needs;

pub const TESTS: &[(&str, Needs, crate::TestFn)] = &[
    (
        "render::bad_input_exits_2_with_a_clear_message",
        Needs::Nothing,
        bad_input_exits_2_with_a_clear_message,
    ),
    (
        "render::packaged_config_is_the_builtin_default",
        Needs::Nothing,
        packaged_config_is_the_builtin_default,
    ),
    (
        "render::every_kind_states_version_and_sha256sum_of_the_config",
        Needs::Nothing,
        every_kind_states_version_and_sha256sum_of_the_config,
    ),
];

fn bad_input_exits_2_with_a_clear_message() -> Result<(), Failed> {
    let dir = Scratch::new("bad")?;
    let proxy = dir.join("proxy.toml");
    std::fs::write(
        &proxy,
        "[endpoints]\ntask_metadata = [\"fd00:ec2::23\"]\n[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"proxy\"\n",
    )?;
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[workload]]\nname = \"a\"\nbridges = [\"docker0\"]\nimds = \"block\"\n",
    )?;
    let proxy = proxy.display().to_string();
    let bad = bad.display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &["helm-chart"],
            "unknown KIND \"helm-chart\": use one of boothook, user-data, systemd, systemd-dropin, ecs-config",
        ),
        (
            &["user-data"],
            "user-data needs the ECS cluster name: pass --cluster NAME",
        ),
        (
            &["user-data", "--cluster", "my cluster"],
            "not a valid ECS cluster name",
        ),
        (
            &["boothook", "--config", &proxy],
            "needs an IPv4 task_metadata endpoint",
        ),
        (&["systemd", "--config", &proxy], "cannot render systemd"),
        (&["systemd", "--binary", "metaguard"], "it must be absolute"),
        (
            &["ecs-config", "--config", &bad],
            ":4:8: imds: unknown action \"block\"",
        ),
        (
            &["boothook", "--config", "/nonexistent/m.toml"],
            "cannot read config /nonexistent/m.toml",
        ),
    ];
    for (args, want) in cases {
        let out = output(Command::new(exe()).arg("render").args(*args))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "render {args:?}: exit {:?}: {stderr}",
            out.status.code()
        );
        ensure!(stderr.contains(want), "render {args:?}: {stderr}");
        ensure!(
            out.stdout.is_empty(),
            "render {args:?} printed something: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

fn packaged_config_is_the_builtin_default() -> Result<(), Failed> {
    let path = repo().join("packaging/metaguard.toml");
    let text = std::fs::read_to_string(&path)?;
    let mut packaged =
        Config::parse(&text, "packaging/metaguard.toml").map_err(|e| format!("{e}"))?;
    packaged.origin = Origin::BuiltinDefault;
    ensure!(
        packaged == Config::builtin_default(),
        "packaging/metaguard.toml differs from the built-in default:\n{packaged:#?}"
    );
    Ok(())
}

fn every_kind_states_version_and_sha256sum_of_the_config() -> Result<(), Failed> {
    let path = repo().join("packaging/metaguard.toml");
    let sum = run_ok(Command::new("sha256sum").arg(&path))?;
    let hex = sum.split_whitespace().next().unwrap_or_default();
    let p = path.display().to_string();
    for kind in ["boothook", "user-data", "systemd", "ecs-config"] {
        let out = render(&[kind, "--config", &p, "--cluster", "c1"])?;
        ensure!(
            out.contains(&format!("metaguard {}", env!("CARGO_PKG_VERSION"))),
            "{kind}: no version"
        );
        ensure!(
            out.contains(&format!("sha256:{hex}")),
            "{kind}: no sha256:{hex}"
        );
    }
    Ok(())
}
