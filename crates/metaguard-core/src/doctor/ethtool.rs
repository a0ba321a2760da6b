//! `ethtool -S` output of the host's ENA interfaces (`ethtool-stats.txt`),
//! for the link-local packet allowance (F21).
//!
//! The collector writes one section per interface, each started by a
//! header line it adds, then `ethtool -S IFACE` as printed:
//!
//! ```text
//! # ethtool -S eth0 (driver ena)
//! NIC statistics:
//!      tx_timeout: 0
//!      linklocal_allowance_exceeded: 3
//! ```

use std::collections::BTreeMap;

/// One interface's statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// The driver named in the header (`ena`), if any.
    pub driver: Option<String>,
    /// Counter name → value.
    pub counters: BTreeMap<String, u64>,
}

/// A line that could not be understood (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct EthtoolError {
    pub line: usize,
    pub message: String,
}

/// The header line the collector writes before `ethtool -S IFACE`.
pub fn header(iface: &str, driver: &str) -> String {
    format!("# ethtool -S {iface} (driver {driver})")
}

/// Parses `ethtool-stats.txt`: interface → statistics.
pub fn parse(text: &str) -> Result<BTreeMap<String, Stats>, EthtoolError> {
    let mut out: BTreeMap<String, Stats> = BTreeMap::new();
    let mut current: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let err = |message: String| EthtoolError {
            line: i + 1,
            message,
        };
        if line.is_empty() || line.ends_with("statistics:") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ethtool -S ") {
            let mut words = rest.split_whitespace();
            let Some(iface) = words.next() else {
                return Err(err("`# ethtool -S` without an interface".into()));
            };
            let driver = rest
                .split_once("(driver ")
                .and_then(|(_, d)| d.strip_suffix(')'))
                .map(|d| d.trim().to_string())
                .filter(|d| !d.is_empty());
            out.insert(
                iface.to_string(),
                Stats {
                    driver,
                    counters: BTreeMap::new(),
                },
            );
            current = Some(iface.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let Some(iface) = &current else {
            return Err(err(format!(
                "a statistic before any `# ethtool -S IFACE` header: {:?}",
                short(line)
            )));
        };
        let Some((name, value)) = line.rsplit_once(':') else {
            return Err(err(format!(
                "expected `name: value`, found {:?}",
                short(line)
            )));
        };
        let value: u64 = value.trim().parse().map_err(|_| {
            err(format!(
                "the value of {:?} is not a counter: {:?}",
                short(name.trim()),
                short(value.trim())
            ))
        })?;
        if let Some(s) = out.get_mut(iface) {
            s.counters.insert(name.trim().to_string(), value);
        }
    }
    Ok(out)
}

/// At most 60 characters of `s`, for messages.
fn short(s: &str) -> String {
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sections_and_counters() {
        let text = format!(
            "{}\nNIC statistics:\n     tx_timeout: 0\n     linklocal_allowance_exceeded: 42\n{}\nNIC statistics:\n     queue_0_tx_cnt: 7\n",
            header("eth0", "ena"),
            header("eth1", "ena")
        );
        let s = parse(&text).expect("parses");
        assert_eq!(s["eth0"].driver.as_deref(), Some("ena"));
        assert_eq!(s["eth0"].counters["linklocal_allowance_exceeded"], 42);
        assert_eq!(s["eth1"].counters["queue_0_tx_cnt"], 7);
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("# ethtool -S eth0 (driver ena)\n  x: y\n").expect_err("bad value");
        assert_eq!(e.line, 2);
        let e = parse("  x: 1\n").expect_err("no header");
        assert_eq!(e.line, 1);
        let e = parse("# ethtool -S eth0\n  what\n").expect_err("no colon");
        assert_eq!(e.line, 2);
    }
}
