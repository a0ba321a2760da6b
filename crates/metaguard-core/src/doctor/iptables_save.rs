//! A parser of the `iptables-save` / `ip6tables-save` grammar.
//!
//! ```text
//! # comment
//! *TABLE
//! :CHAIN POLICY [packets:bytes]        (POLICY is `-` for user chains)
//! [packets:bytes] -A CHAIN [!] -s ADDR[/MASK] [!] -i IFACE … -m MODULE --opt … -j TARGET --target-opt …
//! COMMIT
//! ```
//!
//! What is understood, and so evaluated exactly: `-s`/`-d` (masks,
//! negation), `-i`/`-o` (`+` wildcards, negation), `-p`, `--dport`/`--sport`
//! (`-m tcp`/`-m udp`), `--dports`/`--sports`/`--ports` (`-m multiport`),
//! `-m addrtype --src-type/--dst-type`, `-m conntrack --ctstate/--ctstatus`,
//! `-m state --state`, `-m comment` (ignored), and the targets ACCEPT, DROP,
//! REJECT, RETURN, DNAT `--to-destination`, REDIRECT `--to-ports`, SNAT,
//! MASQUERADE, user chains (`-j`) and gotos (`-g`).
//!
//! Everything else (`-m set`, `-m owner`, `-m cgroup`, `-m physdev`, `-m
//! mark`, unknown options of known modules, …) is kept as an **opaque**
//! match: it *may* match. The evaluator ([`super::path`]) never lets an
//! opaque match decide a verdict: a rule holding one is assumed not to
//! match, and the flow lists it, so the reader sees what the verdict
//! depends on. Unknown targets are kept by name and do not end evaluation
//! (LOG, MARK, CT, TTL… are non-terminating).
//!
//! Errors name the line (1-based) and say what was expected; the caller
//! adds the file name.
//!
//! The typed result lives in `model` (a submodule) and is re-exported here.

use std::net::IpAddr;

mod model;

pub use model::{Chain, Cidr, Cond, Family, IfacePattern, Match, Ports, Rule, Save, Table, Target};

/// A parse error: the line and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        line,
        message: message.into(),
    })
}

/// Splits a line into words the way iptables-save quotes them: double
/// quotes group, backslash escapes the next character inside them.
fn words(line: &str, lineno: usize) -> Result<Vec<String>, ParseError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(e) => cur.push(e),
                            None => return err(lineno, "unterminated quoted string"),
                        },
                        Some(ch) => cur.push(ch),
                        None => return err(lineno, "unterminated quoted string"),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// Parses a whole save file. `family` decides how addresses are checked.
pub fn parse(text: &str, family: Family) -> Result<Save, ParseError> {
    let mut save = Save::default();
    let mut open: Option<(Table, usize)> = None;
    let mut last_line = 0;
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        last_line = lineno;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            if let Some((t, l)) = &open {
                return err(
                    lineno,
                    format!("table `*{name}` starts before `COMMIT` of table `*{}` (opened on line {l})", t.name),
                );
            }
            if name.is_empty() || name.contains(char::is_whitespace) {
                return err(lineno, format!("bad table name {name:?}"));
            }
            if save.table(name).is_some() {
                return err(lineno, format!("table `*{name}` appears twice"));
            }
            open = Some((
                Table {
                    name: name.to_string(),
                    chains: Vec::new(),
                },
                lineno,
            ));
            continue;
        }
        let Some((table, _)) = open.as_mut() else {
            return err(
                lineno,
                format!(
                    "{:?} outside a table (expected `*filter`, `*nat`, … first)",
                    short(line)
                ),
            );
        };
        if line == "COMMIT" {
            if let Some((t, _)) = open.take() {
                save.tables.push(t);
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix(':') {
            let w: Vec<&str> = rest.split_whitespace().collect();
            let (Some(name), Some(policy)) = (w.first(), w.get(1)) else {
                return err(
                    lineno,
                    format!("chain line {line:?} needs a name and a policy"),
                );
            };
            if table.chain(name).is_some() {
                return err(lineno, format!("chain {name} declared twice"));
            }
            let policy = match *policy {
                "-" => None,
                "ACCEPT" | "DROP" | "QUEUE" | "RETURN" => Some(policy.to_string()),
                p => return err(lineno, format!("chain {name}: unknown policy {p:?}")),
            };
            if let Some(c) = w.get(2) {
                if !(c.starts_with('[') && c.ends_with(']')) {
                    return err(lineno, format!("chain {name}: bad counters {c:?}"));
                }
            }
            table.chains.push(Chain {
                name: (*name).to_string(),
                policy,
                rules: Vec::new(),
            });
            continue;
        }
        let mut w = words(line, lineno)?;
        if w.first()
            .is_some_and(|c| c.starts_with('[') && c.ends_with(']'))
        {
            w.remove(0);
        }
        match w.first().map(String::as_str) {
            Some("-A") | Some("--append") => {}
            Some(other) => {
                return err(
                    lineno,
                    format!(
                        "expected `-A CHAIN …`, `:CHAIN POLICY`, `*TABLE` or `COMMIT`, found {:?}",
                        short(other)
                    ),
                )
            }
            None => continue,
        }
        let Some(chain) = w.get(1).cloned() else {
            return err(lineno, "`-A` without a chain name");
        };
        let args: Vec<String> = w[2..].to_vec();
        let rule = parse_rule(&args, lineno, family)?;
        let text = line.trim_start_matches(|c: char| c != '-').to_string();
        let Some(c) = table.chains.iter_mut().find(|c| c.name == chain) else {
            return err(
                lineno,
                format!("rule for chain {chain}, which table {} does not declare (missing `:{chain} - [0:0]`)", table.name),
            );
        };
        c.rules.push(Rule {
            line: lineno,
            text,
            args,
            matches: rule.0,
            target: rule.1,
        });
    }
    if let Some((t, l)) = open {
        return err(
            last_line.max(1),
            format!(
                "table `*{}` (opened on line {l}) has no `COMMIT`: the file is truncated",
                t.name
            ),
        );
    }
    // Targets must name chains of the same table or be built-in targets.
    for t in &save.tables {
        for c in &t.chains {
            for r in &c.rules {
                if let Target::Jump(j) | Target::Goto(j) = &r.target {
                    if t.chain(j).is_none() {
                        return err(
                            r.line,
                            format!("jump to chain {j}, which table {} does not declare", t.name),
                        );
                    }
                }
            }
        }
    }
    Ok(save)
}

fn short(s: &str) -> String {
    if s.chars().count() > 60 {
        let mut t: String = s.chars().take(57).collect();
        t.push_str("...");
        t
    } else {
        s.to_string()
    }
}

fn upper_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_ascii_uppercase())
        .collect()
}

/// Built-in targets that iptables knows without a user chain.
const BUILTIN_OTHER: &[&str] = &[
    "LOG",
    "NFLOG",
    "ULOG",
    "MARK",
    "CONNMARK",
    "CT",
    "NOTRACK",
    "TTL",
    "HL",
    "TCPMSS",
    "TRACE",
    "CLASSIFY",
    "DSCP",
    "TOS",
    "CHECKSUM",
    "AUDIT",
    "NFQUEUE",
    "QUEUE",
    "SET",
    "CONNSECMARK",
    "SECMARK",
    "TEE",
    "TPROXY",
    "NETMAP",
    "IDLETIMER",
    "LED",
    "RATEEST",
    "SYNPROXY",
    "ECN",
    "HMARK",
];

fn parse_rule(
    args: &[String],
    lineno: usize,
    family: Family,
) -> Result<(Vec<Match>, Target), ParseError> {
    let mut matches = Vec::new();
    let mut target = Target::None;
    let mut module: Option<String> = None;
    let mut i = 0;
    let mut neg = false;
    let value = |i: usize, opt: &str| -> Result<String, ParseError> {
        match args.get(i + 1) {
            Some(v) if v != "!" => Ok(v.clone()),
            _ => err(lineno, format!("option {opt} needs a value")),
        }
    };
    let addr = |v: &str, opt: &str| -> Result<Cidr, ParseError> {
        let c = Cidr::parse(v).ok_or_else(|| ParseError {
            line: lineno,
            message: format!("{opt}: bad address {v:?}"),
        })?;
        let fam_ok = match family {
            Family::Ip => c.addr.is_ipv4(),
            Family::Ip6 => c.addr.is_ipv6(),
        };
        if !fam_ok {
            return err(
                lineno,
                format!("{opt}: address {v:?} is of the other family than this file"),
            );
        }
        Ok(c)
    };
    while i < args.len() {
        let a = args[i].as_str();
        if a == "!" {
            neg = true;
            i += 1;
            continue;
        }
        // Old style: `--opt ! value`.
        let old_neg = args.get(i + 1).is_some_and(|v| v == "!") && a.starts_with('-');
        let vi = if old_neg { i + 1 } else { i };
        let this_neg = neg || old_neg;
        neg = false;
        let mut push = |cond: Cond| {
            matches.push(Match {
                neg: this_neg,
                cond,
            })
        };
        match a {
            "-s" | "--source" | "--src" => {
                push(Cond::Src(addr(&value(vi, a)?, a)?));
                i = vi + 2;
            }
            "-d" | "--destination" | "--dst" => {
                push(Cond::Dst(addr(&value(vi, a)?, a)?));
                i = vi + 2;
            }
            "-i" | "--in-interface" => {
                push(Cond::InIface(IfacePattern(value(vi, a)?)));
                i = vi + 2;
            }
            "-o" | "--out-interface" => {
                push(Cond::OutIface(IfacePattern(value(vi, a)?)));
                i = vi + 2;
            }
            "-p" | "--protocol" => {
                push(Cond::Proto(value(vi, a)?.to_ascii_lowercase()));
                i = vi + 2;
            }
            "-f" | "--fragment" => {
                push(Cond::Opaque("-f".into()));
                i += 1;
            }
            "-m" | "--match" => {
                let m = value(vi, a)?;
                if m == "comment" || m == "tcp" || m == "udp" {
                    // Conditions follow as options, if any.
                }
                module = Some(m);
                i = vi + 2;
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                let t = value(vi, a)?;
                let rest = &args[vi + 2..];
                target = parse_target(&t, a.starts_with("-g") || a == "--goto", rest, lineno)?;
                // Target options are consumed with the target.
                break;
            }
            "-c" | "--set-counters" => {
                i = vi + 3;
            }
            opt if opt.starts_with("--") => {
                let m = module.clone().unwrap_or_default();
                let v = value(vi, opt);
                match (m.as_str(), opt) {
                    ("tcp" | "udp" | "sctp" | "dccp" | "", "--dport" | "--destination-port") => {
                        let v = v?;
                        push(Cond::Dport(Ports::parse(&v).ok_or_else(|| ParseError {
                            line: lineno,
                            message: format!("{opt}: bad port {v:?}"),
                        })?));
                    }
                    ("tcp" | "udp" | "sctp" | "dccp" | "", "--sport" | "--source-port") => {
                        let v = v?;
                        push(Cond::Sport(Ports::parse(&v).ok_or_else(|| ParseError {
                            line: lineno,
                            message: format!("{opt}: bad port {v:?}"),
                        })?));
                    }
                    ("multiport", "--dports" | "--destination-ports" | "--dport") => {
                        let v = v?;
                        push(Cond::Dport(Ports::parse(&v).ok_or_else(|| ParseError {
                            line: lineno,
                            message: format!("{opt}: bad ports {v:?}"),
                        })?));
                    }
                    ("multiport", "--sports" | "--source-ports" | "--sport") => {
                        let v = v?;
                        push(Cond::Sport(Ports::parse(&v).ok_or_else(|| ParseError {
                            line: lineno,
                            message: format!("{opt}: bad ports {v:?}"),
                        })?));
                    }
                    ("multiport", "--ports") => {
                        let v = v?;
                        push(Cond::AnyPort(Ports::parse(&v).ok_or_else(|| {
                            ParseError {
                                line: lineno,
                                message: format!("{opt}: bad ports {v:?}"),
                            }
                        })?));
                    }
                    ("addrtype", "--src-type") => push(Cond::SrcType(upper_list(&v?))),
                    ("addrtype", "--dst-type") => push(Cond::DstType(upper_list(&v?))),
                    ("addrtype", "--limit-iface-in" | "--limit-iface-out") => {
                        // Restricts the lookup to the packet's interface;
                        // flows here use host-wide addresses either way.
                        i = vi + 1;
                        continue;
                    }
                    ("conntrack", "--ctstate") | ("state", "--state") => {
                        push(Cond::CtState(upper_list(&v?)))
                    }
                    ("conntrack", "--ctstatus") => push(Cond::CtStatus(upper_list(&v?))),
                    ("comment", "--comment") => {
                        v?;
                    }
                    (m, opt) => {
                        // Opaque: keep the module and the option with
                        // every value up to the next option.
                        let mut j = vi + 1;
                        let mut shown = format!("-m {m} {opt}");
                        while let Some(w) = args.get(j) {
                            if w == "!" || (w.starts_with('-') && w.parse::<i64>().is_err()) {
                                break;
                            }
                            shown.push(' ');
                            shown.push_str(w);
                            j += 1;
                        }
                        push(Cond::Opaque(shown));
                        i = j;
                        continue;
                    }
                }
                i = vi + 2;
            }
            other => {
                return err(
                    lineno,
                    format!("unexpected word {:?} in rule", short(other)),
                );
            }
        }
    }
    if neg {
        return err(lineno, "`!` at the end of the rule negates nothing");
    }
    // A module used without options (`-m set` whose options we did not
    // understand are already opaque); modules that always restrict:
    if let Some(m) = &module {
        let known = [
            "tcp",
            "udp",
            "comment",
            "multiport",
            "addrtype",
            "conntrack",
            "state",
        ];
        if !known.contains(&m.as_str())
            && !matches
                .iter()
                .any(|x| matches!(&x.cond, Cond::Opaque(o) if o.starts_with(&format!("-m {m} "))))
        {
            matches.push(Match {
                neg: false,
                cond: Cond::Opaque(format!("-m {m}")),
            });
        }
    }
    Ok((matches, target))
}

fn parse_target(t: &str, goto: bool, rest: &[String], lineno: usize) -> Result<Target, ParseError> {
    let opt = |name: &str| -> Option<&String> {
        rest.iter()
            .position(|w| w == name)
            .and_then(|p| rest.get(p + 1))
    };
    if goto {
        return Ok(Target::Goto(t.to_string()));
    }
    Ok(match t {
        "ACCEPT" => Target::Accept,
        "DROP" => Target::Drop,
        "RETURN" => Target::Return,
        "REJECT" => Target::Reject(opt("--reject-with").cloned()),
        "DNAT" => {
            let Some(to) = opt("--to-destination") else {
                return Ok(Target::Dnat {
                    addr: None,
                    port: None,
                });
            };
            let (a, p) = split_addr_port(to).ok_or_else(|| ParseError {
                line: lineno,
                message: format!("DNAT: bad --to-destination {to:?}"),
            })?;
            Target::Dnat { addr: a, port: p }
        }
        "REDIRECT" => {
            let port = match opt("--to-ports") {
                Some(p) => Some(
                    p.split(['-', ':'])
                        .next()
                        .and_then(|x| x.parse().ok())
                        .ok_or_else(|| ParseError {
                            line: lineno,
                            message: format!("REDIRECT: bad --to-ports {p:?}"),
                        })?,
                ),
                None => None,
            };
            Target::Redirect { port }
        }
        "SNAT" | "MASQUERADE" => Target::SourceNat(t.to_string()),
        other if BUILTIN_OTHER.contains(&other) => Target::Other(other.to_string()),
        other => Target::Jump(other.to_string()),
    })
}

/// `1.2.3.4`, `1.2.3.4:80`, `1.2.3.4-1.2.3.9:80-90`, `[fd00::1]:80`, `:80`.
fn split_addr_port(s: &str) -> Option<(Option<IpAddr>, Option<u16>)> {
    let first_port = |p: &str| p.split('-').next().and_then(|x| x.parse::<u16>().ok());
    if let Some(rest) = s.strip_prefix('[') {
        let (a, p) = rest.split_once(']')?;
        let a = a.split('-').next()?.parse().ok()?;
        let port = match p.strip_prefix(':') {
            Some(p) => Some(first_port(p)?),
            None => None,
        };
        return Some((Some(a), port));
    }
    if s.matches(':').count() > 1 {
        return Some((Some(s.split('-').next()?.parse().ok()?), None));
    }
    let (a, p) = match s.split_once(':') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr = if a.is_empty() {
        None
    } else {
        Some(a.split('-').next()?.parse().ok()?)
    };
    let port = match p {
        Some(p) => Some(first_port(p)?),
        None => None,
    };
    Some((addr, port))
}

#[cfg(test)]
mod tests;
