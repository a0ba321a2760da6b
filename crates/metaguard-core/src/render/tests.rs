use super::*;
use crate::config::{Config, BUILTIN_DEFAULT_TOML};

const VERSION: &str = "0.0.0-test";

fn opts() -> Options {
    Options::new(VERSION)
}

fn with_cluster(name: &str) -> Options {
    Options {
        cluster: Some(name.to_string()),
        ..opts()
    }
}

fn default_src(config: &Config) -> Source<'_> {
    Source {
        config,
        text: BUILTIN_DEFAULT_TOML,
    }
}

const CONTRACT: &str = r#"# The interface contract's example policy.
[[workload]]
name          = "ecs-agent"
cgroups       = ["docker/ecs-agent"]
imds          = "allow"

[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "br-*", "ecs-bridge"]
imds          = "deny"
task_metadata = "allow"

[[workload]]
name          = "awsvpc-tasks"
netns         = ["ecs-tasks"]
imds          = "deny"

[[workload]]
name          = "host-network-containers"
cgroups       = ["docker"]
imds          = "deny"
task_metadata = "deny"
"#;

fn cfg(text: &str) -> Config {
    Config::parse(text, "/etc/metaguard/metaguard.toml").expect("valid config")
}

fn render_text(kind: Kind, text: &str, opts: &Options) -> Result<String, RenderError> {
    let config = cfg(text);
    render(
        kind,
        &Source {
            config: &config,
            text,
        },
        opts,
    )
}

#[test]
fn systemd_golden() {
    let c = Config::builtin_default();
    let out = render(Kind::Systemd, &default_src(&c), &opts()).expect("render");
    insta::assert_snapshot!("systemd_default", out);
}

#[test]
fn systemd_dropin_golden() {
    let c = Config::builtin_default();
    let out = render(Kind::SystemdDropin, &default_src(&c), &opts()).expect("render");
    insta::assert_snapshot!("systemd_dropin_default", out);
}

#[test]
fn boothook_golden() {
    let c = Config::builtin_default();
    let out = render(Kind::Boothook, &default_src(&c), &opts()).expect("render");
    insta::assert_snapshot!("boothook_default", out);
}

#[test]
fn user_data_golden() {
    let c = Config::builtin_default();
    let out = render(Kind::UserData, &default_src(&c), &with_cluster("prod-east")).expect("render");
    insta::assert_snapshot!("user_data_default", out);
}

#[test]
fn ecs_config_golden() {
    let c = Config::builtin_default();
    let out = render(Kind::EcsConfig, &default_src(&c), &opts()).expect("render");
    insta::assert_snapshot!("ecs_config_default", out);
    let out = render_text(Kind::EcsConfig, CONTRACT, &with_cluster("prod-east")).expect("render");
    insta::assert_snapshot!("ecs_config_contract", out);
}

#[test]
fn ecs_config_follows_the_policy() {
    let allow_all = r#"
[[workload]]
name = "bridges"
bridges = ["docker*"]
imds = "allow"
task_metadata = "deny"

[[workload]]
name = "tasks"
netns = ["ecs-tasks"]
imds = "allow"
"#;
    let out = render_text(Kind::EcsConfig, allow_all, &opts()).expect("render");
    assert!(out.contains("\nECS_AWSVPC_BLOCK_IMDS=false\n"), "{out}");
    assert!(out.contains("\nECS_ENABLE_TASK_IAM_ROLE=false\n"), "{out}");
    assert!(
        out.contains("\nECS_ENABLE_TASK_IAM_ROLE_NETWORK_HOST=false\n"),
        "{out}"
    );
    assert!(!out.contains("ECS_CLUSTER"), "{out}");

    let none = "[[workload]]\nname = \"x\"\ncgroups = [\"system.slice\"]\nimds = \"deny\"\n";
    let out = render_text(Kind::EcsConfig, none, &opts()).expect("render");
    assert!(!out.contains("ECS_AWSVPC_BLOCK_IMDS="), "{out}");
    assert!(out.contains("\nECS_ENABLE_TASK_IAM_ROLE=true\n"), "{out}");
    assert!(
        out.contains("\nECS_ENABLE_TASK_IAM_ROLE_NETWORK_HOST=true\n"),
        "{out}"
    );
}

#[test]
fn every_setting_line_has_a_comment_above_it() {
    for text in [BUILTIN_DEFAULT_TOML, CONTRACT] {
        let out = render_text(Kind::EcsConfig, text, &with_cluster("c")).expect("render");
        let lines: Vec<&str> = out.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            assert!(
                l.starts_with('#') || l.contains('='),
                "neither comment nor setting: {l:?}"
            );
            if !l.starts_with('#') {
                assert!(i > 0 && lines[i - 1].starts_with('#'), "{l} has no comment");
                let key = l.split('=').next().unwrap_or_default();
                assert!(ecs_config::KEYS.contains(&key), "unknown key {key}");
            }
        }
    }
}

#[test]
fn every_kind_states_version_and_hash() {
    let hash = config_hash(CONTRACT);
    for kind in Kind::ALL {
        let out = render_text(kind, CONTRACT, &with_cluster("c")).expect("render");
        assert!(
            out.contains(&format!("metaguard {VERSION}")),
            "{kind}: {out}"
        );
        assert!(out.contains(&hash), "{kind}: no {hash}");
        assert!(
            out.contains("/etc/metaguard/metaguard.toml"),
            "{kind}: no origin"
        );
    }
}

#[test]
fn hash_is_sha256_of_the_installed_file() {
    // sha256("abc\n"), as `printf 'abc\n' | sha256sum` prints it.
    let want = "sha256:edeaaff3f1774ad2888673770c6d64097e391bc362d7d6fb34982ddf0efd18cb";
    assert_eq!(config_hash("abc\n"), want);
    // The boothook installs a final newline when the text lacks one.
    assert_eq!(config_hash("abc"), want);
}

#[test]
fn rendering_is_deterministic_and_depends_on_the_config() {
    for kind in Kind::ALL {
        let a = render_text(kind, CONTRACT, &with_cluster("c")).expect("render");
        let b = render_text(kind, CONTRACT, &with_cluster("c")).expect("render");
        assert_eq!(a, b, "{kind}");
        let other = format!("{CONTRACT}# edited\n");
        let c = render_text(kind, &other, &with_cluster("c")).expect("render");
        assert_ne!(a, c, "{kind}: the hash must change with the text");
    }
}

#[test]
fn boothook_embeds_the_config_verbatim_and_the_rule_builders_ruleset() {
    let out = render_text(Kind::Boothook, CONTRACT, &opts()).expect("render");
    assert!(out.starts_with("#cloud-boothook\n#!/bin/sh\n"), "{out}");
    assert!(out.contains(CONTRACT), "config not embedded verbatim");
    let plan = crate::ruleset::plan(&cfg(CONTRACT), &HostFacts::default()).expect("plan");
    assert!(out.contains(&plan.host), "host ruleset not embedded");
}

#[test]
fn user_data_parts_are_the_boothook_and_a_script() {
    let o = with_cluster("prod_1");
    let out = render_text(Kind::UserData, CONTRACT, &o).expect("render");
    let hook = render_text(Kind::Boothook, CONTRACT, &o).expect("render");
    assert!(out.starts_with("Content-Type: multipart/mixed; boundary=\""));
    assert!(
        out.contains(&format!("\n\n{hook}\n--")),
        "boothook part differs"
    );
    assert!(out.contains("Content-Type: text/x-shellscript"));
    assert!(out.contains("\nECS_CLUSTER=prod_1\n"));
    assert!(out.ends_with("==--\n"));
}

#[test]
fn non_ascii_config_is_sent_as_utf8() {
    let text = "# politique « par défaut »\n[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n";
    let out = render_text(Kind::UserData, text, &with_cluster("c")).expect("render");
    assert!(out.contains("Content-Type: text/cloud-boothook; charset=\"utf-8\"\nMIME-Version: 1.0\nContent-Transfer-Encoding: 8bit"));
    assert!(out.contains("Content-Type: text/x-shellscript; charset=\"us-ascii\""));
}

#[test]
fn unknown_kind_is_refused() {
    let e = "helm-chart".parse::<Kind>().expect_err("unknown");
    assert_eq!(
        e.to_string(),
        "unknown KIND \"helm-chart\": use one of boothook, user-data, systemd, systemd-dropin, ecs-config"
    );
    for k in Kind::ALL {
        assert_eq!(k.as_str().parse::<Kind>(), Ok(k));
    }
}

#[test]
fn user_data_needs_a_valid_cluster() {
    let e = render_text(Kind::UserData, CONTRACT, &opts()).expect_err("no cluster");
    assert_eq!(
        e,
        RenderError::ClusterRequired {
            kind: Kind::UserData
        }
    );
    assert!(e.to_string().contains("--cluster NAME"));
    for bad in ["", "a b", "x;reboot", "c\nECS_X=1", &"a".repeat(256)] {
        let e = render_text(Kind::UserData, CONTRACT, &with_cluster(bad)).expect_err(bad);
        assert!(
            matches!(e, RenderError::InvalidCluster { .. }),
            "{bad:?}: {e}"
        );
    }
}

#[test]
fn policies_apply_refuses_cannot_be_rendered() {
    // The proxy needs an IPv4 task-metadata address to listen on.
    let text = "[endpoints]\ntask_metadata = [\"fd00:ec2::23\"]\n[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"proxy\"\n";
    for kind in Kind::ALL {
        let e = render_text(kind, text, &with_cluster("c")).expect_err("no v4 address");
        assert!(matches!(e, RenderError::Plan(_)), "{kind}: {e}");
        assert!(e.to_string().contains("IPv4"), "{e}");
    }
}

#[test]
fn oversized_user_data_is_refused() {
    let text = format!("{}{}", "# padding padding padding\n".repeat(700), CONTRACT);
    for kind in [Kind::UserData, Kind::Boothook] {
        let e = render_text(kind, &text, &with_cluster("c")).expect_err("too large");
        assert!(matches!(e, RenderError::TooLarge { .. }), "{kind}: {e}");
        assert!(e.to_string().contains("16384"), "{e}");
    }
    // The unit and ecs.config do not carry the config.
    render_text(Kind::Systemd, &text, &opts()).expect("systemd");
}

#[test]
fn overlong_lines_are_refused_in_user_data() {
    let text = format!("# {}\n{CONTRACT}", "x".repeat(1200));
    let e = render_text(Kind::UserData, &text, &with_cluster("c")).expect_err("long");
    assert!(matches!(e, RenderError::LineTooLong { .. }), "{e}");
}

#[test]
fn a_config_cannot_close_its_own_heredoc() {
    let c = cfg(CONTRACT);
    let probe = render(
        Kind::Boothook,
        &Source {
            config: &c,
            text: CONTRACT,
        },
        &opts(),
    )
    .expect("render");
    let marker = probe
        .lines()
        .find(|l| l.starts_with("METAGUARD_CONFIG_"))
        .expect("marker")
        .to_string();
    // A text holding the marker of its own hash is practically impossible
    // to construct; check the guard with a Stamp built by hand.
    let stamp = Stamp {
        version: VERSION.into(),
        origin: "x".into(),
        hash: config_hash(CONTRACT),
    };
    let evil = format!("{CONTRACT}{marker}\n");
    let e = boothook::render(
        &stamp,
        &Source {
            config: &c,
            text: &evil,
        },
        &opts(),
    )
    .expect_err("collision");
    assert!(matches!(e, RenderError::MarkerCollision { .. }), "{e}");
}

#[test]
fn paths_must_be_plain_and_absolute() {
    for bad in [
        "metaguard",
        "/usr/bin/meta guard",
        "/x/$(reboot)",
        "/a/../b",
        "/usr/bin/",
    ] {
        let o = Options {
            binary: bad.to_string(),
            ..opts()
        };
        let e = render_text(Kind::Systemd, CONTRACT, &o).expect_err(bad);
        assert!(matches!(e, RenderError::InvalidPath { .. }), "{bad}: {e}");
    }
    let o = Options {
        binary: "/opt/metaguard-1.0/bin/metaguard".into(),
        config_path: "/tmp/x/metaguard.toml".into(),
        ..opts()
    };
    let out = render_text(Kind::Systemd, CONTRACT, &o).expect("render");
    assert!(out.contains(
        "ExecStart=/opt/metaguard-1.0/bin/metaguard daemon --config /tmp/x/metaguard.toml"
    ));
}

const AGENT_ON_BRIDGE: &str = r#"[agent]
credentials = "container:ecs-agent:51679"

[[workload]]
name          = "ecs-agent"
containers    = ["ecs-agent"]
imds          = "allow"

[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "br-*", "ecs-bridge"]
imds          = "deny"
task_metadata = "proxy"

[[workload]]
name          = "awsvpc-tasks"
netns         = ["ecs-tasks"]
imds          = "deny"
task_metadata = "proxy"
"#;

#[test]
fn ecs_config_gives_the_agent_on_a_bridge_recipe() {
    let out =
        render_text(Kind::EcsConfig, AGENT_ON_BRIDGE, &with_cluster("prod-east")).expect("render");
    insta::assert_snapshot!("ecs_config_agent_on_bridge", out);
    assert!(out.contains("docker run --name ecs-agent"), "{out}");
    assert!(
        !out.contains("--net host") || out.contains("No --net host"),
        "{out}"
    );
    assert!(!out.contains("WARNING"), "{out}");
    // Without the agent's allow ahead of docker0, or without a relay: said.
    let bad = AGENT_ON_BRIDGE
        .replace("imds          = \"allow\"", "imds          = \"deny\"")
        .replace("task_metadata = \"proxy\"", "task_metadata = \"allow\"");
    let out = render_text(Kind::EcsConfig, &bad, &opts()).expect("render");
    assert_eq!(out.matches("WARNING").count(), 2, "{out}");
    // The recipe only where the agent runs in a container.
    let out = render_text(Kind::EcsConfig, CONTRACT, &opts()).expect("render");
    assert!(!out.contains("docker run"), "{out}");
}
