//! Helpers of the machine tests: the binary under test, its package, a
//! booted host with metaguard installed, probes and assertions.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use metaguard_lab::machine::{Host, HostOptions, Member, Rootfs, RunningTask};
use metaguard_lab::probe::{ProbeKind, ProbeResult, ProbeSpec};

/// The metaguard binary under test.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metaguard"))
}

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn host_options() -> HostOptions {
    HostOptions::beside(&exe())
}

/// Why the machine tests cannot run here, if they cannot.
pub fn missing() -> Option<String> {
    if !metaguard_sys::process::is_root() {
        return Some("needs root (network namespaces, systemd-nspawn)".into());
    }
    let opts = host_options();
    if let Err(e) = Rootfs::open(&opts.rootfs) {
        return Some(e.to_string());
    }
    if !opts.standin_exe.is_file() {
        return Some(format!(
            "{} is not built (cargo build -p metaguard-lab --bin mglab-standin)",
            opts.standin_exe.display()
        ));
    }
    for (tool, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("cargo-deb", "cargo install cargo-deb"),
    ] {
        if metaguard_lab::cmd::find_tool(tool).is_none() && which_cargo(tool).is_none() {
            return Some(format!("{tool} is not installed ({package})"));
        }
    }
    None
}

fn which_cargo(tool: &str) -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let p = home.join("bin").join(tool);
    p.is_file().then_some(p)
}

/// `ensure!(cond, "fmt", args…)`: fail the test with a message.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        let ok: bool = $cond;
        if !ok {
            return Err(format!($($arg)+).into());
        }
    };
}

/// A host booted once, not yet with metaguard.
pub fn booted() -> Result<Host, Failed> {
    let mut host = Host::new(host_options()).map_err(|e| format!("machine host: {e}"))?;
    host.boot().map_err(|e| format!("boot: {e}"))?;
    Ok(host)
}

/// The package of the binary under test (scripts/package --profile dev
/// --no-build), built once per test run; `version` names the Debian
/// version (a newer build for upgrades).
pub fn deb(version: &str) -> Result<PathBuf, Failed> {
    static BUILT: OnceLock<std::sync::Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, p)) = built.iter().find(|(v, _)| v == version) {
        return Ok(p.clone());
    }
    // scripts/package stages in target/<profile>/package and cargo-deb in
    // target/: another test process packaging at the same time would
    // truncate the binary this one packs (an empty /usr/bin/metaguard runs
    // as an empty shell script: exit 0, no output). One at a time, across
    // processes; the lock goes with the file's descriptor.
    let lock = std::fs::File::create(repo().join("target/machine-deb.lock"))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
    // Under target/, not the system's temporary directory: a test process
    // that ends leaves its packages (nobody removes them at exit), and the
    // next run removes those of processes that have ended.
    let dir = repo().join("target/machine-deb");
    std::fs::create_dir_all(&dir)?;
    for e in std::fs::read_dir(&dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let out = dir.join(format!("{}-{version}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let status = Command::new("bash")
        .arg(repo().join("scripts/package"))
        .args([
            "--profile",
            "dev",
            "--no-build",
            "--deb-version",
            version,
            "--output",
        ])
        .arg(&out)
        .output()?;
    if !status.status.success() {
        return Err(format!(
            "scripts/package: {}\n{}",
            status.status,
            String::from_utf8_lossy(&status.stderr)
        )
        .into());
    }
    let deb = std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| format!("no .deb in {}", out.display()))?;
    built.push((version.to_string(), deb.clone()));
    Ok(deb)
}

/// A booted host with the package installed (`dpkg -i` inside the
/// machine), `config` (TOML) as /etc/metaguard/metaguard.toml (`None`:
/// the package's own, the built-in default), the unit enabled, and
/// rebooted: metaguard as a real boot starts it.
pub fn installed(config: Option<&str>) -> Result<Host, Failed> {
    installed_with(|_| Ok(config.map(str::to_string)))
}

/// [`installed`] with a config made for this host (it may name cgroups
/// below [`Host::cgroup_root`]).
pub fn installed_with(
    config: impl FnOnce(&Host) -> Result<Option<String>, Failed>,
) -> Result<Host, Failed> {
    let mut host = booted()?;
    install(&host, &deb(DEB_VERSION)?)?;
    if let Some(text) = config(&host)? {
        host.disk()
            .write("/etc/metaguard/metaguard.toml", &text, 0o644)?;
    }
    host.machine()?
        .exec_ok(&["systemctl", "enable", "metaguard.service"])?;
    host.reboot().map_err(|e| format!("reboot: {e}"))?;
    Ok(host)
}

/// The version of the package under test; upgrades install a newer one.
pub const DEB_VERSION: &str = "0.1.0-1";

/// `dpkg -i` of `deb` inside the booted machine.
pub fn install(host: &Host, deb: &Path) -> Result<String, Failed> {
    let name = deb
        .file_name()
        .ok_or("deb without a name")?
        .to_string_lossy()
        .to_string();
    std::fs::copy(deb, host.disk().path(&format!("/root/{name}")))?;
    Ok(host
        .machine()?
        .exec_ok(&["dpkg", "-i", &format!("/root/{name}")])?)
}

/// What a bounded probe loop saw.
#[derive(Debug, Default)]
pub struct Looped {
    /// Probes that got an HTTP 200 (must be none for a denied path).
    pub answered: Vec<ProbeResult>,
    /// Outcome → count ("refused", "403", "timeout", …).
    pub outcomes: std::collections::BTreeMap<String, u32>,
    pub probes: u32,
}

impl Looped {
    pub fn summary(&self) -> String {
        format!("{} probes: {:?}", self.probes, self.outcomes)
    }
}

/// Probes `url` from `member` again and again (each its own process, a
/// fresh connection, `timeout_ms` at most) until `stop` is set — at most
/// `max_probes` probes and `max_time` in all (a bounded loop).
pub fn probe_loop(
    host: &Host,
    member: &Member,
    url: &str,
    stop: &AtomicBool,
    max_probes: u32,
    max_time: Duration,
) -> Result<Looped, String> {
    let lab = host.lab().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + max_time;
    let mut seen = Looped::default();
    while !stop.load(Ordering::Relaxed) && seen.probes < max_probes && Instant::now() < deadline {
        let mut spec = lab.http_get(url);
        spec.timeout_ms = 500;
        let r = host.probe(member, &spec).map_err(|e| e.to_string())?;
        seen.probes += 1;
        let key = match r.status {
            Some(code) => code.to_string(),
            None => r.outcome.as_str().to_string(),
        };
        *seen.outcomes.entry(key).or_default() += 1;
        if r.ok() {
            seen.answered.push(r);
        }
    }
    Ok(seen)
}

/// An HTTP probe spec with method and headers.
pub fn http(
    host: &Host,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<ProbeSpec, Failed> {
    let lab = host.lab()?;
    let mut spec = lab.http_get(url);
    spec.kind = ProbeKind::Http {
        url: url.into(),
        method: method.into(),
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect(),
    };
    Ok(spec)
}

/// IMDSv2 from `member`: the token PUT, then a GET of the instance id with
/// it. The GET's result.
pub fn imdsv2_instance_id(host: &Host, member: &Member) -> Result<ProbeResult, Failed> {
    let put = http(
        host,
        "PUT",
        "http://169.254.169.254/latest/api/token",
        &[("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
    )?;
    let token = host.probe(member, &put)?;
    if !token.ok() {
        return Err(format!("IMDSv2 token PUT: {token:?}").into());
    }
    let token = token.body.unwrap_or_default();
    let get = http(
        host,
        "GET",
        "http://169.254.169.254/latest/meta-data/instance-id",
        &[("x-aws-ec2-metadata-token", token.trim())],
    )?;
    Ok(host.probe(member, &get)?)
}

/// The nft tables in the machine's network namespace, seen from outside.
pub fn host_tables(host: &Host) -> Result<String, Failed> {
    Ok(host.lab()?.run_in(
        metaguard_lab::topology::Role::Host,
        "nft",
        &["list", "tables"],
    )?)
}

/// The slice host-network task containers run in ([`TaskSpec::in_slice`]),
/// as a unit of the machine's, enabled so it exists from boot.
pub const HOSTNET_SLICE: &str = "hostnet.slice";

/// The default config, and host-network containers (those in
/// [`HOSTNET_SLICE`]) denied IMDS — which the BPF layer guards. Writes the
/// slice's unit to the host's disk.
pub fn bpf_config(host: &Host) -> Result<String, Failed> {
    host.disk().write(
        &format!("/etc/systemd/system/{HOSTNET_SLICE}"),
        "[Unit]\nDescription=host-network task containers (metaguard lab)\n\n[Install]\nWantedBy=slices.target\n",
        0o644,
    )?;
    host.disk().symlink(
        &format!("/etc/systemd/system/slices.target.wants/{HOSTNET_SLICE}"),
        &format!("/etc/systemd/system/{HOSTNET_SLICE}"),
    )?;
    Ok(format!(
        "{}\n[[workload]]\nname          = \"host-network-containers\"\ncgroups       = [\"{}/{HOSTNET_SLICE}\"]\nimds          = \"deny\"\n",
        metaguard_core::config::BUILTIN_DEFAULT_TOML,
        host.cgroup_root()
    ))
}

/// Fails unless `unit` is active in the host's machine (with its journal).
pub fn expect_active(host: &Host, unit: &str) -> Result<(), Failed> {
    let m = host.machine()?;
    let state = m.unit_state(unit)?;
    ensure!(
        state == "active",
        "{unit} is {state}:\n{}",
        m.journal_text(unit)
    );
    Ok(())
}

/// A task's own credentials, fetched from its first container through
/// 169.254.170.2; fails unless they are served (200, its role).
pub fn expect_own_credentials(host: &Host, task: &RunningTask, what: &str) -> Result<(), Failed> {
    let spec = host.lab()?.http_get(&task.info.credentials_url());
    let r = host.probe(task.first(), &spec)?;
    ensure!(
        r.ok()
            && r.body
                .as_deref()
                .unwrap_or("")
                .contains(&task.info.role_arn),
        "{what}: {}: task credentials: {r:?}",
        task.info.network_mode
    );
    Ok(())
}

/// Fails unless every probe loop ran (at least `min_probes`) and none got
/// through `during`; prints what each saw.
pub fn expect_none_passed(
    tasks: &[&RunningTask],
    seen: &[Looped],
    min_probes: u32,
    during: &str,
) -> Result<(), Failed> {
    for (task, looped) in tasks.iter().zip(seen) {
        let mode = &task.info.network_mode;
        eprintln!("{mode} {during}: {}", looped.summary());
        ensure!(
            looped.probes >= min_probes,
            "{mode} {during}: too few probes to mean anything: {}",
            looped.summary()
        );
        ensure!(
            looped.answered.is_empty(),
            "{mode} {during}: got through: {:?}",
            looped.answered
        );
    }
    Ok(())
}

/// Fails unless the IMDS emulator received nothing at all.
pub fn expect_imds_untouched(host: &Host) -> Result<(), Failed> {
    let log = host.lab()?.imds().log();
    ensure!(log.is_empty(), "IMDS saw {:?}", log.entries());
    Ok(())
}

/// metaguard.service's main pid, as the machine numbers it.
pub fn main_pid(host: &Host) -> Result<String, Failed> {
    let out = host.machine()?.exec_ok(&[
        "systemctl",
        "show",
        "-p",
        "MainPID",
        "--value",
        "metaguard.service",
    ])?;
    Ok(out.trim().to_string())
}

/// What a failure of "`member` reached IMDS" needs to be understood: the
/// member's namespace (its cookie, and whether it is the machine's own),
/// the tables in it, what metaguard finds and verifies now (the BPF
/// namespace map with its cookies), and metaguard.service's journal.
pub fn why_reached(host: &Host, member: &Member) -> String {
    use metaguard_sys::netns::{Netns, NsId, NETNS_RUN_DIR};
    let mut out = String::new();
    let file = Path::new(NETNS_RUN_DIR).join(&member.netns);
    match Netns::open(&file).map(|ns| (ns.id(), ns.cookie())) {
        Ok((id, cookie)) => out.push_str(&format!(
            "member namespace {} ({id:?}): cookie {cookie:?}\n",
            member.netns
        )),
        Err(e) => out.push_str(&format!("member namespace {}: {e}\n", member.netns)),
    }
    if let Ok(m) = host.machine() {
        let host_ns = NsId::of(Path::new(&format!("/proc/{}/ns/net", m.init_pid())));
        out.push_str(&format!("the machine's own namespace: {host_ns:?}\n"));
        for args in [
            &["metaguard", "verify"][..],
            &["metaguard", "apply", "--dry-run"][..],
        ] {
            match m.exec(args) {
                Ok(o) => out.push_str(&format!(
                    "$ {}: {}\n{}{}\n",
                    args.join(" "),
                    o.status,
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )),
                Err(e) => out.push_str(&format!("$ {}: {e}\n", args.join(" "))),
            }
        }
    }
    match host
        .lab()
        .and_then(|lab| lab.run_in_named(&member.netns, "nft", &["list", "tables"]))
    {
        Ok(t) => out.push_str(&format!("tables in the member's namespace:\n{t}\n")),
        Err(e) => out.push_str(&format!("tables in the member's namespace: {e}\n")),
    }
    // The daemon's lines about the event may still be on their way.
    std::thread::sleep(Duration::from_millis(500));
    if let Ok(m) = host.machine() {
        out.push_str(&m.journal_text("metaguard.service"));
    }
    out
}
