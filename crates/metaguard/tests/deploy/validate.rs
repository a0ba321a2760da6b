//! The rendered files, checked by the programs that consume them.

use std::path::Path;
use std::process::Command;

use libtest_mimic::Failed;

use crate::ensure;
use crate::support::{
    as_cloud_init_runs_it, cloud_init_root, exe, output, render, repo, run_ok, Scratch, Tool,
    PYTHON,
};
use crate::Needs;

pub const TESTS: &[(&str, Needs, crate::TestFn)] = &[
    (
        "validate::shell_scripts_pass_shellcheck",
        Needs::Tool(Tool::Shellcheck),
        shell_scripts_pass_shellcheck,
    ),
    (
        "validate::unit_passes_systemd_analyze_verify",
        Needs::Tool(Tool::SystemdAnalyze),
        unit_passes_systemd_analyze_verify,
    ),
    (
        "validate::user_data_parts_parse_with_python_email",
        Needs::Tool(Tool::Python),
        user_data_parts_parse_with_python_email,
    ),
    (
        "validate::user_data_passes_cloud_init",
        Needs::Tool(Tool::CloudInit),
        user_data_passes_cloud_init,
    ),
];

const CLUSTER: &str = "prod-east_1";

/// The body of the MIME part whose Content-Type starts with `ctype`
/// (simple split; the Python test checks the MIME structure properly).
fn mime_part(user_data: &str, ctype: &str) -> Result<String, Failed> {
    let boundary = user_data
        .lines()
        .next()
        .and_then(|l| l.split("boundary=\"").nth(1))
        .and_then(|b| b.strip_suffix('"'))
        .ok_or("no boundary")?;
    let delim = format!("\n--{boundary}");
    for part in user_data.split(&delim).skip(1) {
        let (headers, body) = part.split_once("\n\n").ok_or("part without body")?;
        if headers.contains(&format!("Content-Type: {ctype}")) {
            return Ok(body.to_string());
        }
    }
    Err(format!("no {ctype} part").into())
}

fn shell_scripts_pass_shellcheck() -> Result<(), Failed> {
    let dir = Scratch::new("shellcheck")?;
    let user_data = render(&["user-data", "--cluster", CLUSTER])?;
    let mut files = vec![
        (
            "boothook.sh",
            as_cloud_init_runs_it(&render(&["boothook"])?)?,
        ),
        (
            "ecs-config.sh",
            mime_part(&user_data, "text/x-shellscript")?,
        ),
        (
            "boothook-from-user-data.sh",
            as_cloud_init_runs_it(&mime_part(&user_data, "text/cloud-boothook")?)?,
        ),
    ];
    // The generated bash completion is a shell script too.
    let comp = dir.join("completions");
    run_ok(
        Command::new(exe())
            .args(["__generate", "completions"])
            .arg(&comp),
    )?;
    files.push((
        "metaguard.bash",
        std::fs::read_to_string(comp.join("metaguard.bash"))?,
    ));
    let mut paths = Vec::new();
    for (name, text) in &files {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        paths.push(p);
    }
    // The packaging script, the package's maintainer scripts and the
    // machine lab's rootfs builder.
    paths.push(repo().join("scripts/package"));
    paths.push(repo().join("scripts/init-rootfs"));
    for script in ["postinst", "prerm", "postrm"] {
        paths.push(repo().join("packaging/debian").join(script));
    }
    for p in &paths {
        // bash completions are sourced, not executed: give the dialect.
        let mut cmd = Command::new("shellcheck");
        if p.ends_with("metaguard.bash") {
            cmd.args(["--shell=bash", "--exclude=SC2207,SC2199"]);
        }
        let out = output(cmd.arg(p))?;
        ensure!(
            out.status.success(),
            "shellcheck {}:\n{}",
            p.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

fn unit_passes_systemd_analyze_verify() -> Result<(), Failed> {
    let dir = Scratch::new("systemd")?;
    // The unit must name an existing executable; the man pages named in
    // Documentation= must resolve (MANPATH points at the generated ones).
    let exe = exe();
    let unit = render(&["systemd", "--binary", &exe.display().to_string()])?;
    let path = dir.join("metaguard.service");
    std::fs::write(&path, &unit)?;
    let man8 = dir.join("man/man8");
    run_ok(Command::new(&exe).args(["__generate", "man"]).arg(&man8))?;
    let out = output(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .env("MANPATH", dir.join("man"))
            .env("SYSTEMD_LOG_LEVEL", "notice"),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && !stderr.contains("metaguard.service"),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    // The sandbox, as systemd scores it (no running systemd needed).
    let out = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let score = text
        .lines()
        .find_map(|l| l.split("metaguard.service: ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok());
    match score {
        Some(s) => {
            eprintln!("systemd-analyze security --offline: exposure {s}");
            let ok = s <= 3.5;
            ensure!(ok, "exposure {s} is worse than 3.5:\n{text}");
        }
        // Older systemd-analyze without --offline: verify above is the check.
        None => eprintln!(
            "note: systemd-analyze security --offline gave no score: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
    Ok(())
}

const EMAIL_CHECK: &str = r##"
import email, email.policy, sys
data = open(sys.argv[1], "rb").read()
boothook = open(sys.argv[2], "rb").read()
msg = email.message_from_bytes(data, policy=email.policy.default)
assert msg.get_content_type() == "multipart/mixed", msg.get_content_type()
assert msg["MIME-Version"] == "1.0"
assert not msg.defects, msg.defects
parts = list(msg.iter_parts())
types = [p.get_content_type() for p in parts]
assert types == ["text/cloud-boothook", "text/x-shellscript"], types
for p in parts:
    assert not p.defects, (p.get_content_type(), p.defects)
    assert p.get_filename(), "part without a file name"
hook = parts[0].get_payload(decode=True)
assert hook == boothook, "boothook part differs from `render boothook`"
script = parts[1].get_content()
assert script.startswith("#!/bin/bash\n"), script[:40]
assert "\nECS_CLUSTER=" + sys.argv[3] + "\n" in script
print("ok", len(data), "bytes,", len(parts), "parts")
"##;

fn user_data_parts_parse_with_python_email() -> Result<(), Failed> {
    let dir = Scratch::new("email")?;
    let ud = dir.join("user-data");
    std::fs::write(&ud, render(&["user-data", "--cluster", CLUSTER])?)?;
    let hook = dir.join("boothook");
    std::fs::write(&hook, render(&["boothook"])?)?;
    // Also a config with non-ASCII text (8bit utf-8 parts).
    let cfg = dir.join("utf8.toml");
    std::fs::write(
        &cfg,
        "# politique « par défaut » — ünïcödé\n[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n",
    )?;
    let c = cfg.display().to_string();
    let ud8 = dir.join("user-data-utf8");
    std::fs::write(
        &ud8,
        render(&["user-data", "--cluster", CLUSTER, "--config", &c])?,
    )?;
    let hook8 = dir.join("boothook-utf8");
    std::fs::write(&hook8, render(&["boothook", "--config", &c])?)?;
    for (u, h) in [(&ud, &hook), (&ud8, &hook8)] {
        let out = run_ok(
            Command::new(PYTHON)
                .args(["-I", "-c", EMAIL_CHECK])
                .arg(u)
                .arg(h)
                .arg(CLUSTER),
        )?;
        ensure!(out.starts_with("ok "), "{out}");
    }
    Ok(())
}

/// cloud-init's own code: its user-data processor (what runs at boot)
/// splits the message; every part must go to one of cloud-init's part
/// handlers; the boothook handler must write exactly the script the lab
/// test runs; every cloud-config part (and the merged cloud-config) must
/// pass cloud-init's schema validation.
const CLOUD_INIT_CHECK: &str = r##"
import os, sys, tempfile, yaml
from cloudinit import handlers, helpers, user_data
from cloudinit.config import schema
from cloudinit.handlers.boot_hook import BootHookPartHandler
from cloudinit.handlers.shell_script import ShellScriptPartHandler
from cloudinit.handlers.cloud_config import CloudConfigPartHandler

data = open(sys.argv[1], "rb").read()
expected_hook = open(sys.argv[2], "rb").read().decode()
work = sys.argv[3]
paths = helpers.Paths({"cloud_dir": os.path.join(work, "cloud"), "run_dir": os.path.join(work, "run")})
msg = user_data.UserDataProcessor(paths).process(data)
parts = [p for p in msg.walk() if not p.is_multipart()]
handled = {}
for cls in (BootHookPartHandler, ShellScriptPartHandler):
    for t in cls.list_types(cls):
        handled[t] = cls
handled["text/cloud-config"] = CloudConfigPartHandler
types = [p.get_content_type() for p in parts]
assert types == ["text/cloud-boothook", "text/x-shellscript"], types
cloud_configs = []
for p in parts:
    t = p.get_content_type()
    assert t in handled, "no cloud-init handler for " + t
    payload = p.get_payload(decode=True).decode()
    # cloud-init recognises the part from its first line, too.
    assert handlers.type_from_starts_with(payload) == t, (t, payload[:30])
    if t == "text/cloud-boothook":
        h = BootHookPartHandler.__new__(BootHookPartHandler)
        h.boothook_dir = work
        written = h._write_part(payload, "part-001")
        got = open(written).read()
        assert got == expected_hook, "cloud-init writes a different boothook"
        assert os.stat(written).st_mode & 0o777 == 0o700
    if t == "text/cloud-config":
        cloud_configs.append(payload)
merged = {}
for c in cloud_configs:
    merged.update(yaml.safe_load(c) or {})
schema.validate_cloudconfig_schema(merged, schema.get_schema(), strict=True)
print("ok", types, len(cloud_configs), "cloud-config parts")
"##;

fn user_data_passes_cloud_init() -> Result<(), Failed> {
    let dir = Scratch::new("cloud-init")?;
    let root = cloud_init_root();
    let pythonpath = root.join("usr/lib/python3/dist-packages");
    let cloud_init = root.join("usr/bin/cloud-init");
    let ud = dir.join("user-data");
    std::fs::write(&ud, render(&["user-data", "--cluster", CLUSTER])?)?;
    let hook = dir.join("boothook.sh");
    std::fs::write(&hook, as_cloud_init_runs_it(&render(&["boothook"])?)?)?;
    let work = dir.join("work");
    std::fs::create_dir_all(&work)?;
    let out = run_ok(
        Command::new(PYTHON)
            .args(["-c", CLOUD_INIT_CHECK])
            .arg(&ud)
            .arg(&hook)
            .arg(&work)
            .env("PYTHONPATH", &pythonpath),
    )?;
    ensure!(out.starts_with("ok "), "{out}");

    // The parts are of the types `cloud-init devel make-mime` knows.
    let types = run_ok(
        Command::new(PYTHON)
            .arg(&cloud_init)
            .args(["devel", "make-mime", "--list-types"])
            .env("PYTHONPATH", &pythonpath),
    )?;
    for t in ["cloud-boothook", "x-shellscript"] {
        ensure!(
            types.lines().any(|l| l.trim() == t),
            "make-mime does not list {t}: {types}"
        );
    }

    // `cloud-init schema` (22.4) validates #cloud-config documents only:
    // check that it runs here and rejects a bad one, so a cloud-config part
    // added later is validated for real; ours are all checked above.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "#cloud-config\nbootcmd: \"not a list\"\n")?;
    let good = dir.join("good.yaml");
    std::fs::write(&good, "#cloud-config\nbootcmd: [\"true\"]\n")?;
    let schema = |p: &Path| {
        output(
            Command::new(PYTHON)
                .arg(&cloud_init)
                .args(["schema", "--config-file"])
                .arg(p)
                .env("PYTHONPATH", &pythonpath),
        )
    };
    ensure!(
        schema(&good)?.status.success(),
        "cloud-init schema rejects a valid file"
    );
    ensure!(
        !schema(&bad)?.status.success(),
        "cloud-init schema accepts an invalid file"
    );
    Ok(())
}
