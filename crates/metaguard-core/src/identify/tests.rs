use std::collections::HashMap;
use std::net::SocketAddr;

use super::*;
use crate::ruleset::{bridge_mark, ECS_PAUSE_LABEL, HOST_MARK_TAG};

/// 0 `tasks`: awsvpc tasks; 1 `cni`: namespace files under
/// /run/netns/cni-*; 2 `agent`: the cgroup docker/ecs-agent; 3 `legacy`:
/// the container named legacy-app; 4 `bridge`: docker0's ports.
const CONFIG: &str = r#"
[[workload]]
name = "tasks"
netns = ["ecs-tasks"]
task_metadata = "proxy"

[[workload]]
name = "cni"
netns = ["/run/netns/cni-*"]
imds = "proxy"

[[workload]]
name = "agent"
cgroups = ["docker/ecs-agent"]
imds = "allow"

[[workload]]
name = "legacy"
containers = ["legacy-app"]
imds = "proxy"

[[workload]]
name = "bridge"
bridges = ["docker0"]
imds = "proxy"
"#;

fn config() -> Config {
    Config::parse(CONFIG, "test.toml").expect("valid config")
}

fn container(id: &str, netns: &str, creds: &str) -> ContainerFact {
    ContainerFact {
        id: id.to_string(),
        name: id.to_string(),
        image: String::new(),
        labels: Default::default(),
        host_network: false,
        cgroup: Some(format!("docker/{id}")),
        netns: Some(netns.to_string()),
        env: vec![format!(
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/{creds}"
        )],
        addresses: Vec::new(),
    }
}

fn pause(id: &str, netns: &str) -> ContainerFact {
    let mut k = container(id, netns, "");
    k.env.clear();
    k.labels
        .insert(ECS_PAUSE_LABEL.0.into(), ECS_PAUSE_LABEL.1.into());
    k
}

fn port(ifindex: u32, master: &str, peer: i32) -> Link {
    Link {
        ifindex,
        name: format!("veth{ifindex}"),
        master: Some(master.to_string()),
        peer_netns: Some(peer),
    }
}

/// A host as the directory would have gathered it.
#[derive(Default)]
struct Host {
    ports: HashMap<u32, Vec<Link>>,
    containers: Vec<ContainerFact>,
    netns_ids: HashMap<String, Option<i32>>,
    selected: Vec<(String, Option<i32>)>,
    cgroups: HashMap<u64, Option<ContainerFact>>,
}

impl Host {
    fn port(mut self, l: Link) -> Self {
        self.ports
            .entry(bridge_mark(l.ifindex))
            .or_default()
            .push(l);
        self
    }
    /// A listed container whose namespace file the host calls `nsid`.
    fn container(mut self, k: ContainerFact, nsid: Option<i32>) -> Self {
        if let Some(p) = &k.netns {
            self.netns_ids.insert(p.clone(), nsid);
        }
        self.containers.push(k);
        self
    }
    fn snap(&self) -> Snapshot<'_> {
        Snapshot {
            ports: &self.ports,
            containers: &self.containers,
            netns_ids: &self.netns_ids,
            selected: &self.selected,
            cgroups: &self.cgroups,
        }
    }
    fn identify(&self, mark: u32) -> Caller {
        identify(&config(), &self.snap(), origin(mark, None), None)
    }
}

fn origin(mark: u32, dst: Option<SocketAddr>) -> Origin {
    Origin {
        mark,
        peer: "172.17.0.2:40000".parse().expect("address"),
        dst,
    }
}

#[test]
fn a_bridge_container_is_its_ports_peer_namespace() {
    let h = Host::default()
        .port(port(7, "docker0", 3))
        .port(port(8, "docker0", 4))
        .container(
            container("web", "/var/run/docker/netns/aaa", "web-id"),
            Some(3),
        )
        .container(
            container("db", "/var/run/docker/netns/bbb", "db-id"),
            Some(4),
        );
    let c = h.identify(bridge_mark(7));
    assert_eq!(c.workload, Some(4), "docker0's bridge workload");
    assert_eq!(c.container.as_deref(), Some("web"));
    assert_eq!(c.credentials_ids, ["web-id"]);
    assert_eq!(
        c.origin,
        "port veth7 on docker0, netns /var/run/docker/netns/aaa"
    );
    assert_eq!(
        c.port,
        Some(7),
        "the port's ifindex, which tokens are bound to"
    );
    let c = h.identify(bridge_mark(8));
    assert_eq!(c.container.as_deref(), Some("db"));
    assert_eq!(c.credentials_ids, ["db-id"]);
    assert_eq!(c.port, Some(8));
}

#[test]
fn an_awsvpc_task_is_every_container_in_the_pause_containers_namespace() {
    // The application containers joined the pause container
    // (`container:<id>`); discovery gave them its SandboxKey, or their own
    // /proc/<pid>/ns/net: either names the same namespace.
    let sandbox = "/var/run/docker/netns/task1";
    let h = Host::default()
        .port(port(9, "ecs-br0", 5))
        .container(pause("pause1", sandbox), Some(5))
        .container(container("app1", sandbox, "app1-id"), Some(5))
        .container(container("side1", "/proc/4242/ns/net", "side1-id"), Some(5))
        .container(
            container("other", "/var/run/docker/netns/x", "x-id"),
            Some(6),
        );
    let c = h.identify(bridge_mark(9));
    assert_eq!(c.workload, Some(0), "ecs-tasks");
    assert_eq!(
        c.container.as_deref(),
        Some("app1"),
        "not the pause container"
    );
    assert_eq!(c.credentials_ids, ["app1-id", "side1-id"]);
    // A task whose only container is its pause container is that one,
    // behind the same port.
    let h = Host::default()
        .port(port(9, "ecs-br0", 5))
        .container(pause("pause1", sandbox), Some(5));
    let alone = h.identify(bridge_mark(9));
    assert_eq!(alone.container.as_deref(), Some("pause1"));
    assert_eq!((alone.port, c.port), (Some(9), Some(9)));
}

#[test]
fn netns_selectors_match_by_namespace_identity_with_or_without_docker() {
    // No container listed: the selected file whose namespace holds the
    // port's peer is the caller's.
    let mut h = Host::default().port(port(11, "cni0", 8));
    h.selected = vec![
        ("/run/netns/cni-1".into(), Some(8)),
        ("/run/netns/cni-2".into(), Some(9)),
    ];
    let c = h.identify(bridge_mark(11));
    assert_eq!(c.workload, Some(1));
    assert_eq!(c.container, None);
    assert_eq!(c.origin, "port veth11 on cni0, netns /run/netns/cni-1");
}

#[test]
fn cgroup_and_container_selectors_match_the_group_behind_a_port() {
    let mut agent = container("agent", "/var/run/docker/netns/ag", "agent-id");
    agent.cgroup = Some("docker/ecs-agent/sub".into());
    let h = Host::default()
        .port(port(12, "br-x", 10))
        .container(agent, Some(10));
    assert_eq!(
        h.identify(bridge_mark(12)).workload,
        Some(2),
        "cgroup below"
    );
    let h = Host::default().port(port(13, "br-y", 11)).container(
        container("legacy-app", "/var/run/docker/netns/l", "l"),
        Some(11),
    );
    assert_eq!(h.identify(bridge_mark(13)).workload, Some(3));
    // Nothing matches: a known caller of no workload (refused).
    let h = Host::default()
        .port(port(14, "br-z", 12))
        .container(container("plain", "/var/run/docker/netns/p", "p"), Some(12));
    let c = h.identify(bridge_mark(14));
    assert_eq!(c.workload, None);
    assert_eq!(c.container.as_deref(), Some("plain"));
}

#[test]
fn host_callers_are_their_marks_workload_and_their_sockets_container() {
    let cfg = config();
    let agent = container("ecs-agent", "/x", "agent-id");
    let mut h = Host::default();
    h.cgroups.insert(100, Some(agent.clone()));
    h.cgroups.insert(101, None);
    let dst = Some("169.254.169.254:80".parse().expect("address"));
    let mark = HOST_MARK_TAG | 2;
    let c = identify(&cfg, &h.snap(), origin(mark, dst), Some(100));
    assert_eq!(c.workload, Some(2));
    assert_eq!(c.container.as_deref(), Some("ecs-agent"));
    assert_eq!(c.credentials_ids, ["agent-id"]);
    assert!(c.origin.contains("workload \"agent\""), "{}", c.origin);
    // A host process in no container: the workload, no ids.
    for cg in [Some(101), Some(999), None] {
        let c = identify(&cfg, &h.snap(), origin(mark, dst), cg);
        assert_eq!((c.workload, c.container.clone()), (Some(2), None), "{cg:?}");
        assert!(c.credentials_ids.is_empty());
    }
    // A host mark naming a workload that is not a host one, or none.
    for idx in [4, 40] {
        let c = identify(&cfg, &h.snap(), origin(HOST_MARK_TAG | idx, dst), Some(100));
        assert_eq!(c.workload, None, "index {idx}");
        assert!(c.origin.contains("names no cgroup workload"));
    }
    assert!(host_workload(&cfg, 2) && host_workload(&cfg, 3));
    assert!(!host_workload(&cfg, 0) && !host_workload(&cfg, 9));
}

#[test]
fn unknown_callers_are_unidentified_and_so_refused() {
    let h = Host::default()
        .port(port(7, "docker0", 3))
        .port(Link {
            ifindex: 7,
            name: "again".into(),
            master: Some("docker0".into()),
            peer_netns: Some(3),
        })
        .port(port(20, "docker0", 3));
    // No mark at all.
    let c = h.identify(0);
    assert_eq!(c.workload, None);
    assert!(
        c.origin.starts_with("no metaguard mark (0x00000000)"),
        "{}",
        c.origin
    );
    // A bridge mark no port has.
    let c = h.identify(bridge_mark(99));
    assert_eq!(c.workload, None);
    assert!(
        c.origin.starts_with("no bridge port has mark"),
        "{}",
        c.origin
    );
    // Two ports with one mark: ambiguous, not guessed.
    let c = h.identify(bridge_mark(7));
    assert_eq!(c.workload, None);
    assert!(c.origin.contains("is ambiguous (2 ports)"), "{}", c.origin);
    // A port whose peer is in no other namespace.
    let mut h = Host::default();
    h.ports.insert(
        bridge_mark(21),
        vec![Link {
            ifindex: 21,
            name: "veth21".into(),
            master: Some("br-q".into()),
            peer_netns: None,
        }],
    );
    let c = h.identify(bridge_mark(21));
    assert_eq!((c.workload, c.container), (None, None));
}

#[test]
fn a_reused_pid_or_a_gone_namespace_is_not_the_listed_container() {
    // The listing said "web" is /proc/4242/ns/net; pid 4242 is now another
    // process, in another namespace (7): web is not behind port 7 (peer 3).
    let h = Host::default()
        .port(port(7, "br-p", 3))
        .container(container("web", "/proc/4242/ns/net", "web-id"), Some(7));
    let c = h.identify(bridge_mark(7));
    assert_eq!(c.container, None);
    assert!(c.credentials_ids.is_empty());
    // A namespace file that cannot be read any more (the container
    // stopped since the listing) matches nothing.
    let h = Host::default()
        .port(port(7, "br-p", 3))
        .container(container("gone", "/proc/4243/ns/net", "gone-id"), None);
    let c = h.identify(bridge_mark(7));
    assert_eq!(c.container, None);
    assert!(c.credentials_ids.is_empty());
}

#[test]
fn an_ids_owner_is_placed_as_its_callers_are_found() {
    let cfg = config();
    let sandbox = "/var/run/docker/netns/task1";
    let h = Host::default()
        .container(pause("pause1", sandbox), Some(5))
        .container(container("app1", "/proc/77/ns/net", "app1-id"), Some(5))
        .container(
            container("web", "/var/run/docker/netns/w", "web-id"),
            Some(3),
        );
    let links = [
        port(9, "ecs-br0", 5),
        port(7, "docker0", 3),
        Link {
            ifindex: 1,
            name: "lo".into(),
            master: None,
            peer_netns: None,
        },
    ];
    assert_eq!(listed_owner(&cfg, IdKind::Credentials, "app1-id"), None);
    let app = holder(&h.containers, IdKind::Credentials, "app1-id").expect("app1 holds it");
    assert_eq!(app.id, "app1");
    let o = place(&cfg, &h.snap(), &links, app);
    assert_eq!(
        o,
        Owner {
            workload: Some(0),
            container: Some("app1".into()),
            uncertain: false
        }
    );
    let web = holder(&h.containers, IdKind::Credentials, "web-id").expect("web holds it");
    assert_eq!(place(&cfg, &h.snap(), &links, web).workload, Some(4));
    assert!(holder(&h.containers, IdKind::Credentials, "nobody").is_none());
    assert!(holder(&h.containers, IdKind::TaskMetadata, "app1-id").is_none());
    // A workload's own `credentials_ids` own theirs, for credentials only.
    let listed = Config::parse(
        "[[workload]]\nname = \"a\"\nbridges = [\"b\"]\ncredentials_ids = [\"x\"]\n",
        "t.toml",
    )
    .expect("valid");
    assert_eq!(listed_owner(&listed, IdKind::Credentials, "x"), Some(0));
    assert_eq!(listed_owner(&listed, IdKind::TaskMetadata, "x"), None);
}

#[test]
fn marks_are_told_apart() {
    assert_eq!(Mark::of(0), Mark::None);
    assert_eq!(Mark::of(0x1234), Mark::None);
    assert_eq!(Mark::of(HOST_MARK_TAG | 3), Mark::Host(3));
    let b = bridge_mark(7);
    assert_eq!(Mark::of(b), Mark::Bridge(b));
}

#[test]
fn credentials_ids_come_from_relative_and_full_uris_on_task_metadata_addresses() {
    let mut c = container("c1", "/n", "rel-id");
    c.env.extend([
        "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.2/v2/credentials/full-id".into(),
        "ECS_CONTAINER_METADATA_URI_V4=http://169.254.170.2/v4/tmds-id".into(),
    ]);
    let mut v6 = container("c2", "/n", "");
    v6.env = vec![
        "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://[fd00:ec2::23]:80/v1/credentials?x=1&id=v6-id"
            .into(),
    ];
    let mut elsewhere = container("c3", "/n", "");
    elsewhere.env = vec![
        "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:8080/v2/credentials/loopback-id"
            .into(),
    ];
    let mut eks = container("c4", "/n", "");
    eks.env =
        vec!["AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials".into()];
    let (creds, tmds) = ids(&[&c, &v6, &elsewhere, &eks]);
    assert_eq!(creds, vec!["full-id", "rel-id", "v6-id"]);
    assert_eq!(tmds, vec!["tmds-id"]);
    for bad in [
        "",
        "http://",
        "http://[fd00:ec2::23/v2/credentials/x",
        "ftp://169.254.170.2/v2/credentials/x",
        "http://169.254.170.2",
        "http://169.254.170.2/v2/credentials/",
        "http://169.254.170.2/v1/credentials?id=",
    ] {
        assert_eq!(full_uri_path(bad).and_then(credentials_id), None, "{bad}");
    }
}

#[test]
fn the_agent_upstream_is_its_containers_address_now_and_nothing_once_it_is_gone() {
    let agent = crate::config::AgentContainer {
        container: crate::config::ContainerRef::Name("ecs-agent".into()),
        port: 51679,
    };
    let mut c = container("ecs-agent", "/run/netns/agent", "");
    c.addresses = vec![
        "fd00:17::3".parse().expect("ip"),
        "172.17.0.3".parse().expect("ip"),
    ];
    let squatter = {
        let mut s = container("squatter", "/run/netns/s", "");
        s.addresses = vec!["172.17.0.4".parse().expect("ip")];
        s
    };
    assert_eq!(
        agent_address(&agent, &[squatter.clone(), c.clone()]),
        Ok("172.17.0.3:51679".parse().expect("addr"))
    );
    // Moved: the new address, whoever holds the old one.
    let mut moved = c.clone();
    moved.addresses = vec!["172.17.0.9".parse().expect("ip")];
    let mut on_old = squatter.clone();
    on_old.addresses = vec!["172.17.0.3".parse().expect("ip")];
    assert_eq!(
        agent_address(&agent, &[on_old.clone(), moved]),
        Ok("172.17.0.9:51679".parse().expect("addr"))
    );
    // Gone: nothing, not the old address.
    assert!(agent_address(&agent, &[on_old]).is_err());
    // Two containers named by a label: refused, never a guess.
    let by_label = crate::config::AgentContainer {
        container: crate::config::ContainerRef::Label {
            key: "role".into(),
            value: "agent".into(),
        },
        port: 51679,
    };
    let mut a = c.clone();
    a.labels.insert("role".into(), "agent".into());
    let mut b = squatter;
    b.labels.insert("role".into(), "agent".into());
    assert!(agent_address(&by_label, &[a, b]).is_err());
}
