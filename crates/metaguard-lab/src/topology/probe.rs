//! Running probes and tools inside the lab's namespaces and cgroups.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;

use metaguard_sys::netns::Netns;

use crate::cmd;
use crate::probe::{ProbeKind, ProbeResult, ProbeSpec};
use crate::LabError;

use super::{Lab, Role, Workload};

impl Lab {
    /// Runs `ip -batch` inside a lab namespace given by name (for
    /// namespaces added with [`Lab::add_netns`]).
    pub fn ip_in(&self, netns_name: &str, script: &str) -> Result<(), LabError> {
        let ns = self.lab_netns_by_name(netns_name)?;
        cmd::ip_batch(&ns, script)
    }

    /// Runs a system tool inside a lab namespace given by name (e.g. `nft`
    /// in a machine's container bound with [`Lab::bind_netns`]).
    pub fn run_in_named(
        &self,
        netns_name: &str,
        program: &str,
        args: &[&str],
    ) -> Result<String, LabError> {
        let ns = self.lab_netns_by_name(netns_name)?;
        cmd::run(Some(&ns), program, args, None)
    }

    pub(super) fn lab_netns_by_name(&self, netns_name: &str) -> Result<Netns, LabError> {
        if !self.record.netns.iter().any(|n| n == netns_name) {
            return Err(LabError::ProbeOutput(format!(
                "{netns_name} is not a namespace of lab {}",
                self.record.id
            )));
        }
        Ok(Netns::open_not_root(
            Path::new(metaguard_sys::netns::NETNS_RUN_DIR).join(netns_name),
        )?)
    }

    /// Starts a probe in the background inside lab namespace `netns_name`
    /// (no cgroup); wait for it with [`Lab::finish_probe`].
    pub fn spawn_probe_in(
        &self,
        netns_name: &str,
        spec: &ProbeSpec,
    ) -> Result<std::process::Child, LabError> {
        self.spawn_probe_as(netns_name, None, spec)
    }

    /// Waits for a probe started with [`Lab::spawn_probe_in`].
    pub fn finish_probe(&self, child: std::process::Child) -> Result<ProbeResult, LabError> {
        let out = child.wait_with_output().map_err(|source| LabError::Spawn {
            command: "lab-probe".into(),
            source,
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or("")).map_err(|e| {
            LabError::ProbeOutput(format!(
                "{e}; stdout {stdout:?}; stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            ))
        })
    }

    /// A fresh probe id, unique in this lab.
    pub fn probe_id(&self, what: &str) -> String {
        let n = self.probe_seq.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}-{what}", self.record.id)
    }

    /// An HTTP GET probe spec with a fresh id.
    pub fn http_get(&self, url: &str) -> ProbeSpec {
        ProbeSpec {
            id: self.probe_id("http"),
            kind: ProbeKind::Http {
                url: url.to_string(),
                method: "GET".into(),
                headers: Vec::new(),
            },
            timeout_ms: self.opts.probe_timeout_ms,
        }
    }

    /// Runs `spec` from `w`: in its namespace (through `ip netns exec`, so
    /// the namespace's /etc/hosts applies) and in its cgroup.
    pub fn probe(&self, w: Workload, spec: &ProbeSpec) -> Result<ProbeResult, LabError> {
        let json = serde_json::to_string(spec).map_err(|e| LabError::ProbeOutput(e.to_string()))?;
        let mut cmd = self.command_in(w, &self.opts.probe_exe)?;
        cmd.arg("lab-probe").arg(json);
        let shown = format!(
            "{} lab-probe (as {})",
            self.opts.probe_exe.display(),
            w.label()
        );
        let out = cmd.output().map_err(|source| LabError::Spawn {
            command: shown.clone(),
            source,
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or("");
        serde_json::from_str(line).map_err(|e| {
            LabError::ProbeOutput(format!(
                "{shown}: {e}; status {}; stdout {stdout:?}; stderr {:?}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        })
    }

    /// A command that will run as workload `w` (its namespace and cgroup),
    /// for real clients such as python/botocore or curl. Never the root
    /// namespace: lab namespaces are opened with `open_not_root`.
    pub fn command_in(
        &self,
        w: Workload,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command, LabError> {
        let ns = self.netns_name(w.role());
        // Double-check the namespace is not the root one before using it.
        self.ns_by_name(w.role())?;
        let procs = self.cgroup.procs_writer(&self.cgroup_of(w))?;
        let ip = cmd::find_tool("ip").unwrap_or_else(|| "ip".into());
        let mut cmd = Command::new(ip);
        cmd.args(["netns", "exec", &ns])
            .arg(program)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy");
        metaguard_sys::cgroup::enter_before_exec(&mut cmd, procs);
        Ok(cmd)
    }

    /// Runs `spec` as a host-network process in `cgroup` (a path relative
    /// to the cgroup2 root, which must lie inside this lab's subtree and
    /// exist), e.g. a cgroup created after the daemon started.
    pub fn probe_in_cgroup(&self, cgroup: &str, spec: &ProbeSpec) -> Result<ProbeResult, LabError> {
        self.probe_as(&self.netns_name(Role::Host), cgroup, spec)
    }

    /// Runs `spec` in lab namespace `netns_name` and in `cgroup` (relative
    /// to the cgroup2 root; inside this lab's subtree): as a process of a
    /// container that something else made (a machine's Docker).
    pub fn probe_as(
        &self,
        netns_name: &str,
        cgroup: &str,
        spec: &ProbeSpec,
    ) -> Result<ProbeResult, LabError> {
        let child = self.spawn_probe_as(netns_name, Some(cgroup), spec)?;
        self.finish_probe(child)
    }

    /// [`Lab::probe_as`] in the background; wait with [`Lab::finish_probe`].
    pub fn spawn_probe_as(
        &self,
        netns_name: &str,
        cgroup: Option<&str>,
        spec: &ProbeSpec,
    ) -> Result<std::process::Child, LabError> {
        self.lab_netns_by_name(netns_name)?;
        let json = serde_json::to_string(spec).map_err(|e| LabError::ProbeOutput(e.to_string()))?;
        let ip = cmd::find_tool("ip").unwrap_or_else(|| "ip".into());
        let mut cmd = Command::new(ip);
        cmd.args(["netns", "exec", netns_name])
            .arg(&self.opts.probe_exe)
            .arg("lab-probe")
            .arg(json)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cgroup) = cgroup {
            let inside = std::iter::once(self.cgroup_root())
                .chain(self.adopted_cgroups.iter().cloned())
                .any(|root| cgroup.starts_with(&format!("{root}/")));
            if !inside {
                return Err(LabError::ProbeOutput(format!(
                    "{cgroup} is not inside lab {}",
                    self.record.id
                )));
            }
            let procs = self.cgroup.procs_writer(cgroup)?;
            metaguard_sys::cgroup::enter_before_exec(&mut cmd, procs);
        }
        cmd.spawn().map_err(|source| LabError::Spawn {
            command: format!("lab-probe in {netns_name}"),
            source,
        })
    }

    /// The F17 attack, from bridge container `role` (which has NET_ADMIN in
    /// its own namespace): route 127.0.0.0/8 through the bridge gateway
    /// ahead of the local table, and allow sending to loopback addresses
    /// off `lo`. With the host's route_localnet=1 (ecs-init sets it), the
    /// container then reaches the host's 127.0.0.1 services directly.
    pub fn route_loopback_via_gateway(&self, role: Role) -> Result<(), LabError> {
        let gw = match role {
            Role::C1 | Role::C2 => "172.17.0.1",
            _ => {
                return Err(LabError::ProbeOutput(format!(
                    "{role:?} is not a bridge container"
                )))
            }
        };
        // The local table is consulted first (pref 0); move it after ours.
        cmd::ip_batch(
            self.netns(role),
            &format!(
                "route add 127.0.0.0/8 via {gw} dev eth0 table 100\n\
                 rule add to 127.0.0.0/8 lookup 100 pref 100\n\
                 rule add lookup local pref 1000\n\
                 rule del pref 0\n"
            ),
        )?;
        self.sysctl(
            role,
            &[
                "net.ipv4.conf.all.route_localnet=1",
                "net.ipv4.conf.eth0.route_localnet=1",
            ],
        )
    }

    /// Runs a system tool inside a lab namespace (e.g. `nft`, `iptables`).
    pub fn run_in(&self, role: Role, program: &str, args: &[&str]) -> Result<String, LabError> {
        cmd::run(Some(self.netns(role)), program, args, None)
    }

    /// The kernel's network counter `counter` (`TcpOutRsts`,
    /// `TcpExtTCPSynRetrans`, …) in lab namespace `role`, since the
    /// namespace was created (`nstat -asz`).
    pub fn nstat(&self, role: Role, counter: &str) -> Result<u64, LabError> {
        self.nstat_named(&self.netns_name(role), counter)
    }

    /// [`Lab::nstat`] in the lab namespace named `netns_name`.
    pub fn nstat_named(&self, netns_name: &str, counter: &str) -> Result<u64, LabError> {
        let out = self.run_in_named(netns_name, "nstat", &["-asz", counter])?;
        out.lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(counter))
                    .then(|| f.next().and_then(|n| n.parse().ok()))
                    .flatten()
            })
            .ok_or_else(|| {
                LabError::ProbeOutput(format!("no {counter} in nstat's output: {out:?}"))
            })
    }

    /// Deletes every nft table named `metaguard` (any family) in `roles`'
    /// namespaces: metaguard's whole nft layer there, as a flush by
    /// someone else would (F4). Docker's and ecs-init's rules stay.
    pub fn delete_metaguard_tables(&self, roles: &[Role]) -> Result<(), LabError> {
        for &role in roles {
            let tables = self.run_in(role, "nft", &["list", "tables"])?;
            for line in tables.lines() {
                if let ["table", family, "metaguard"] =
                    line.split_whitespace().collect::<Vec<_>>().as_slice()
                {
                    self.run_in(role, "nft", &["delete", "table", family, "metaguard"])?;
                }
            }
        }
        Ok(())
    }
}
