//! `metaguard daemon [--config PATH] [--remove-on-exit] [--metrics ADDR]
//! [--json] [--check]`.
//!
//! `--check` is the unit's `ExecStartPre=`: what the daemon needs before
//! its first change — the config, privileges, nft, the plan, the audit
//! log's path and the observe log's (opened as the daemon opens it, so the unit's sandbox
//! decides), the metrics address — checked without changing anything, so
//! a config the unit cannot run is refused with the file, line and what to
//! change before the kernel is touched.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use metaguard_core::config::Key;
use metaguard_core::Config;

use super::{config, ConfigArg};
use crate::daemon;
use crate::enforce::{Containers, Engine};

/// The global paths the daemon uses.
#[derive(Debug)]
pub struct Paths<'a> {
    pub state_dir: &'a Path,
    pub docker_socket: &'a Path,
    pub bpf_pin_dir: &'a Path,
    pub observe_dir: &'a Path,
    /// `--observe-max-bytes`.
    pub observe_max_bytes: u64,
}

fn metrics_addr(metrics: &str) -> anyhow::Result<SocketAddr> {
    metrics
        .parse()
        .with_context(|| format!("--metrics {metrics:?} is not an IP:PORT address"))
}

pub fn run(
    arg: &ConfigArg,
    remove_on_exit: bool,
    metrics: &str,
    json: bool,
    paths: &Paths<'_>,
) -> anyhow::Result<ExitCode> {
    init_logging(json);
    let metrics_addr = metrics_addr(metrics)?;
    // Validate the config and privileges before anything starts.
    config::load(arg)?;
    config::require_root("daemon")?;
    let opts = daemon::Options {
        config_path: arg.config.clone(),
        state_dir: paths.state_dir.to_path_buf(),
        docker_socket: paths.docker_socket.to_path_buf(),
        bpf_pin_dir: paths.bpf_pin_dir.to_path_buf(),
        remove_on_exit,
        metrics_addr,
        observe_dir: paths.observe_dir.to_path_buf(),
        observe_caps: metaguard_proxy::observe::Caps::total(paths.observe_max_bytes),
    };
    daemon::run(opts, |path: Option<&Path>| {
        config::load(&ConfigArg {
            config: path.map(PathBuf::from),
        })
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `daemon --check`.
pub fn check(arg: &ConfigArg, metrics: &str, paths: &Paths<'_>) -> anyhow::Result<ExitCode> {
    let (config, text) = config::load_with_text(arg)?;
    let addr = metrics_addr(metrics)?;
    if !addr.ip().is_loopback() {
        anyhow::bail!(
            "--metrics {addr}: the metrics endpoint must listen on a loopback address (127.0.0.0/8 or ::1) so that no container can reach it"
        );
    }
    config::require_root("daemon")?;
    let engine =
        Engine::new(paths.state_dir, paths.docker_socket)?.with_bpf_pin_dir(paths.bpf_pin_dir);
    check_audit_log(&config, &text)?;
    if config.observes() {
        // Opened as the daemon opens it (creating the directory), so the
        // unit's sandbox decides.
        metaguard_proxy::ObserveLog::open(
            paths.observe_dir,
            metaguard_proxy::observe::Caps::total(paths.observe_max_bytes),
        )
        .context("the config observes, but the observe log cannot be opened (--observe-dir; under metaguard.service it is /var/lib/metaguard/observe, the unit's StateDirectory=)")?;
    }
    // What the daemon plans first (without the Docker API, as it does).
    // Whether the kernel takes it is the daemon's first transaction, which
    // changes nothing when it fails: not loaded twice at every boot.
    let plan = engine.plan_present(&config, Containers::Unknown)?;
    let mut warnings = plan.warnings.clone();
    if let Some(why) = engine.bpf_not_active(&config) {
        warnings.push(format!(
            "BPF layer not active ({why}); the nft layer guards alone"
        ));
    }
    // Under systemd, with the journal's warning priority.
    let prefix = if stderr_is_journal() { "<4>" } else { "" };
    for w in &warnings {
        eprintln!("{prefix}metaguard: warning: {w}");
    }
    println!(
        "metaguard: {} can run the daemon here: config, privileges, nft, plan and paths checked",
        config.origin
    );
    Ok(ExitCode::SUCCESS)
}

/// Opens the audit log as the daemon will (created if missing, for
/// appending); an error points at `[proxy] audit_log`.
fn check_audit_log(config: &Config, text: &str) -> anyhow::Result<()> {
    let Some(path) = config.proxy.audit_log.as_deref() else {
        return Ok(());
    };
    if let Err(e) = metaguard_proxy::AuditSink::open(Some(path)) {
        let hint = if e.raw_os_error() == Some(libc_erofs()) {
            "metaguard.service's sandbox (ProtectSystem=strict) lets the daemon write only under /var/log/metaguard/ and /run/metaguard/: use e.g. \"/var/log/metaguard/audit.log\", or allow the directory in a drop-in (ReadWritePaths=)"
        } else {
            "use a path the daemon can create and append to, e.g. \"/var/log/metaguard/audit.log\""
        };
        return Err(Config::error_at(
            text,
            &config.origin.to_string(),
            Key::ProxyAuditLog,
            format!("proxy.audit_log: cannot open {path} for appending: {e}"),
            hint,
        )
        .into());
    }
    Ok(())
}

/// EROFS: a read-only file system (the unit's sandbox).
fn libc_erofs() -> i32 {
    rustix::io::Errno::ROFS.raw_os_error()
}

/// Text lines on stderr. Under systemd (stderr is the journal stream that
/// `$JOURNAL_STREAM` names) each line starts with its syslog priority
/// (`<3>`…`<7>`, which journald turns into the entry's priority) and has
/// no timestamp or colour of its own; on a terminal, colour unless
/// `NO_COLOR`; elsewhere plain text. `--json`: JSON lines.
fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("METAGUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else if stderr_is_journal() {
        builder
            .with_ansi(false)
            .event_format(journal::Format)
            .init();
    } else {
        let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        builder.with_target(false).with_ansi(colour).init();
    }
}

/// Whether stderr is the stream `$JOURNAL_STREAM` (`DEVICE:INODE`) names.
fn stderr_is_journal() -> bool {
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        let (d, i) = v.split_once(':')?;
        Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
    }) else {
        return false;
    };
    rustix::fs::fstat(std::io::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

mod journal {
    //! One journal line per event: `<PRIORITY>message field=value …`.

    use std::fmt;

    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
    use tracing_subscriber::registry::LookupSpan;

    pub struct Format;

    impl<S, N> FormatEvent<S, N> for Format
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            event: &Event<'_>,
        ) -> fmt::Result {
            // sd-daemon(3): <3> err, <4> warning, <6> info, <7> debug.
            let priority = match *event.metadata().level() {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                Level::DEBUG | Level::TRACE => 7,
            };
            write!(writer, "<{priority}>")?;
            ctx.field_format().format_fields(writer.by_ref(), event)?;
            writeln!(writer)
        }
    }
}
