//! Watching the kernel: `nft monitor` per guarded namespace, and inotify on
//! the directories where namespaces and cgroups appear and on the BPF
//! layer's pin directory.

use std::path::Path;

use anyhow::Context as _;
use metaguard_sys::host::Host;
use metaguard_sys::netns::Netns;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use super::Event;

/// One nft transaction as `nft monitor` printed it.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The namespace: "host" or its path.
    pub key: String,
    pub lines: Vec<String>,
    /// Who committed it, from the generation line, e.g. `iptables[4711]`.
    pub process: String,
    pub pid: Option<u32>,
}

fn names_table(line: &str, family: &str, table: &str) -> bool {
    let toks: Vec<&str> = line.split_whitespace().collect();
    toks.windows(2).any(|w| w[0] == family && w[1] == table)
}

impl Batch {
    /// Whether the transaction changed `family table`.
    pub fn touches(&self, family: &str, table: &str) -> bool {
        self.lines.iter().any(|l| names_table(l, family, table))
    }

    /// Whether the transaction ended with `family table` deleted (a flush
    /// or a delete): then there is nothing to read back before healing.
    pub fn leaves_table_deleted(&self, family: &str, table: &str) -> bool {
        self.lines
            .iter()
            .rev()
            .find(|l| names_table(l, family, table))
            .is_some_and(|l| l.starts_with("delete table "))
    }

    /// A short name for what happened to `family table`, for logs and the
    /// `cause` label of the heal counter.
    pub fn cause(&self, family: &str, table: &str) -> &'static str {
        let ours = |l: &&String| names_table(l, family, table);
        let deleted_ours = self
            .lines
            .iter()
            .filter(ours)
            .any(|l| l.starts_with("delete table "));
        let deleted_others = self
            .lines
            .iter()
            .any(|l| l.starts_with("delete table ") && !names_table(l, family, table));
        match (deleted_ours, deleted_others) {
            (true, true) => "ruleset-flushed",
            (true, false) => "table-deleted",
            _ if self
                .lines
                .iter()
                .filter(ours)
                .any(|l| l.contains(" element ")) =>
            {
                "set-altered"
            }
            _ => "chain-altered",
        }
    }
}

/// A running monitor; ends the `nft monitor` process when dropped.
#[derive(Debug)]
pub struct Handle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The task owns the child with kill_on_drop: aborting it kills nft,
        // whose netlink socket would otherwise keep a deleted namespace
        // alive.
        self.task.abort();
    }
}

/// Starts `nft monitor` in `ns` and forwards each transaction as
/// [`Event::Nft`]; [`Event::MonitorEnded`] when it exits.
pub fn spawn(
    host: &dyn Host,
    ns: Option<&Netns>,
    key: &str,
    tx: mpsc::UnboundedSender<Event>,
) -> anyhow::Result<Handle> {
    let mut cmd: tokio::process::Command = host.nft_monitor(ns)?.into();
    cmd.stdout(std::process::Stdio::piped()).kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start nft monitor for {key}"))?;
    let stdout = child.stdout.take().context("nft monitor has no stdout")?;
    let key = key.to_string();
    let task = tokio::spawn(async move {
        let _child = child; // killed when this task ends or is aborted
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut pending: Vec<String> = Vec::new();
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    if let Some(rest) = line.strip_prefix("# new generation ") {
                        // "N by process PID (NAME)"
                        let process = rest
                            .split_once(" by process ")
                            .map(|(_, p)| match p.split_once(' ') {
                                Some((pid, name)) => format!(
                                    "{}[{pid}]",
                                    name.trim_matches(|c| c == '(' || c == ')')
                                ),
                                None => p.to_string(),
                            })
                            .unwrap_or_else(|| "unknown".into());
                        let pid = process
                            .split_once('[')
                            .and_then(|(_, p)| p.trim_end_matches(']').parse().ok());
                        let batch = Batch {
                            key: key.clone(),
                            lines: std::mem::take(&mut pending),
                            process,
                            pid,
                        };
                        if tx.send(Event::Nft(batch)).is_err() {
                            return;
                        }
                    } else if !line.trim().is_empty() {
                        pending.push(line);
                    }
                }
                Ok(None) | Err(_) => {
                    let _ = tx.send(Event::MonitorEnded { key: key.clone() });
                    return;
                }
            }
        }
    });
    Ok(Handle { task })
}

/// inotify on `dir`: any entry created, deleted or moved sends `make()`.
/// A missing directory is created first (e.g. /run/netns before the first
/// `ip netns add`).
pub fn watch_dir(
    dir: &Path,
    tx: mpsc::UnboundedSender<Event>,
    make: fn() -> Event,
) -> anyhow::Result<()> {
    use inotify::WatchMask;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    watch(
        dir,
        WatchMask::CREATE | WatchMask::DELETE | WatchMask::MOVED_TO | WatchMask::MOVED_FROM,
        tx,
        make,
    )
    .map(drop)
}

/// inotify on `dir` for `mask`: every event sends `make()`. Returns the
/// watch set, so that the caller can watch the directory again once it
/// was removed and re-created (adding a watch that exists is a no-op).
pub fn watch(
    dir: &Path,
    mask: inotify::WatchMask,
    tx: mpsc::UnboundedSender<Event>,
    make: fn() -> Event,
) -> anyhow::Result<inotify::Watches> {
    use futures_util::StreamExt as _;
    let inotify = inotify::Inotify::init().context("inotify")?;
    let mut watches = inotify.watches();
    watches
        .add(dir, mask)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    let mut stream = inotify
        .into_event_stream(vec![0u8; 4096])
        .context("inotify stream")?;
    tokio::spawn(async move {
        while let Some(ev) = stream.next().await {
            if ev.is_err() || tx.send(make()).is_err() {
                return;
            }
        }
    });
    Ok(watches)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(lines: &[&str]) -> Batch {
        Batch {
            key: "host".into(),
            lines: lines.iter().map(|s| s.to_string()).collect(),
            process: "nft[1]".into(),
            pid: Some(1),
        }
    }

    #[test]
    fn causes_are_named() {
        let flush = batch(&[
            "delete chain inet metaguard wl0",
            "delete table inet metaguard",
            "delete table ip filter",
        ]);
        assert!(flush.touches("inet", "metaguard"));
        assert_eq!(flush.cause("inet", "metaguard"), "ruleset-flushed");
        assert_eq!(
            batch(&["delete table inet metaguard"]).cause("inet", "metaguard"),
            "table-deleted"
        );
        assert_eq!(
            batch(&["add element inet metaguard imds4 { 192.0.2.1 }"]).cause("inet", "metaguard"),
            "set-altered"
        );
        assert_eq!(
            batch(&["delete rule inet metaguard wl1 handle 4"]).cause("inet", "metaguard"),
            "chain-altered"
        );
        assert!(flush.leaves_table_deleted("inet", "metaguard"));
        let restored = batch(&["delete table inet metaguard", "add table inet metaguard"]);
        assert!(!restored.leaves_table_deleted("inet", "metaguard"));
        let iptables = batch(&["delete rule ip filter INPUT handle 2"]);
        assert!(!iptables.touches("inet", "metaguard"));
        assert!(!batch(&["add table inet metaguard2"]).touches("inet", "metaguard"));
    }
}
