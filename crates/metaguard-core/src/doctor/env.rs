//! Environment variables the doctor looks at: the credential variables the
//! ECS agent injects into containers (F12), and the proxy settings that
//! send SDK traffic for the link-local endpoints to a proxy server (F18).
//!
//! Also the one place that decides what of an environment a snapshot
//! keeps: names only, except the proxy settings, whose values are kept
//! with any `user:password@` removed ([`snapshot_env`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::iptables_save::Cidr;

/// Variables through which the ECS agent (or Fargate) tells a container
/// where its credentials and task metadata are.
pub const CREDENTIAL_VARS: &[&str] = &[
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "ECS_CONTAINER_METADATA_URI",
    "ECS_CONTAINER_METADATA_URI_V4",
];

/// Proxy settings that send an SDK's HTTP requests to a proxy server
/// (either case; curl, Go and botocore read both).
const PROXY_VARS: &[&str] = &["http_proxy", "https_proxy", "all_proxy"];

/// Whether `name` is a proxy setting (`HTTP_PROXY`, `no_proxy`, …).
pub fn is_proxy_var(name: &str) -> bool {
    let l = name.to_ascii_lowercase();
    PROXY_VARS.contains(&l.as_str()) || l == "no_proxy"
}

/// `value` with any `user:password@` of a URL removed.
pub fn redact(value: &str) -> String {
    let (scheme, rest) = match value.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), value),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None => value.to_string(),
    }
}

/// What a snapshot keeps of `/etc/ecs/ecs.config`: every line, but the
/// value of a setting that may hold a secret (`ECS_ENGINE_AUTH_DATA`, or
/// any key naming an auth, secret, password, token or private key) is
/// replaced by `***`, and proxy settings lose their `user:password@`.
/// Doctor reads only `ECS_AWSVPC_BLOCK_IMDS`-like switches and the proxy
/// settings from it.
pub fn snapshot_ecs_config(text: &str) -> String {
    const SECRET: [&str; 6] = [
        "AUTH",
        "SECRET",
        "PASSWORD",
        "TOKEN",
        "PRIVATE",
        "CREDENTIAL",
    ];
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let kept = match line.split_once('=') {
            Some((k, v)) if !k.trim_start().starts_with('#') => {
                let key = k.trim().to_ascii_uppercase();
                if is_proxy_var(&key) {
                    format!("{k}={}", redact(v))
                } else if SECRET.iter().any(|s| key.contains(s)) && !v.trim().is_empty() {
                    format!("{k}=***")
                } else {
                    line.to_string()
                }
            }
            _ => line.to_string(),
        };
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// What a snapshot keeps of an environment (`KEY=VALUE` strings): every
/// name, with the value of proxy settings only (redacted).
pub fn snapshot_env<'a>(
    vars: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for kv in vars {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k.is_empty() {
            continue;
        }
        let keep = is_proxy_var(k).then(|| redact(v));
        out.insert(k.to_string(), keep);
    }
    out
}

/// Whether a `NO_PROXY` list exempts `ip`: an entry that is the address,
/// a CIDR holding it, or `*`.
pub fn no_proxy_covers(no_proxy: &str, ip: IpAddr) -> bool {
    no_proxy.split(',').map(str::trim).any(|e| {
        e == "*"
            || e.trim_matches(['[', ']']).parse::<IpAddr>().ok() == Some(ip)
            || (e.contains('/') && Cidr::parse(e).is_some_and(|c| c.contains(ip)))
    })
}

/// A proxy setting that catches requests for some of `endpoints`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyGap {
    /// The proxy settings in force (`HTTP_PROXY=http://…`).
    pub proxies: Vec<String>,
    /// The `NO_PROXY` value, if any.
    pub no_proxy: Option<String>,
    /// The endpoints it does not exempt.
    pub missing: Vec<IpAddr>,
}

/// The proxy gap of an environment (`get` looks a variable up), if any.
pub fn proxy_gap<'a>(
    get: impl Fn(&str) -> Option<&'a str>,
    endpoints: &[IpAddr],
) -> Option<ProxyGap> {
    let lookup = |n: &str| get(n).or_else(|| get(&n.to_ascii_uppercase()));
    let proxies: Vec<String> = PROXY_VARS
        .iter()
        .flat_map(|n| {
            [n.to_ascii_uppercase(), n.to_string()]
                .into_iter()
                .filter_map(|k| {
                    get(&k)
                        .filter(|v| !v.is_empty())
                        .map(|v| format!("{k}={v}"))
                })
        })
        .collect();
    if proxies.is_empty() {
        return None;
    }
    let no_proxy = lookup("no_proxy").map(str::to_string);
    let missing: Vec<IpAddr> = endpoints
        .iter()
        .copied()
        .filter(|ip| !no_proxy.as_deref().is_some_and(|n| no_proxy_covers(n, *ip)))
        .collect();
    (!missing.is_empty()).then_some(ProxyGap {
        proxies,
        no_proxy,
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecs_config_keeps_switches_and_hides_secrets() {
        let text = "# comment\nECS_CLUSTER=prod\nECS_AWSVPC_BLOCK_IMDS=true\nECS_ENGINE_AUTH_TYPE=dockercfg\nECS_ENGINE_AUTH_DATA={\"https://index.docker.io/v1/\":{\"auth\":\"c2VjcmV0\"}}\nHTTP_PROXY=http://u:p@proxy:3128\nNO_PROXY=169.254.169.254,169.254.170.2\n";
        let got = snapshot_ecs_config(text);
        assert_eq!(
            got,
            "# comment\nECS_CLUSTER=prod\nECS_AWSVPC_BLOCK_IMDS=true\nECS_ENGINE_AUTH_TYPE=***\nECS_ENGINE_AUTH_DATA=***\nHTTP_PROXY=http://***@proxy:3128\nNO_PROXY=169.254.169.254,169.254.170.2\n"
        );
        assert!(!got.contains("c2VjcmV0") && !got.contains("u:p@"));
    }

    #[test]
    fn redact_removes_userinfo_only() {
        assert_eq!(redact("http://u:p@proxy:3128/x"), "http://***@proxy:3128/x");
        assert_eq!(redact("proxy:3128"), "proxy:3128");
        assert_eq!(redact("http://proxy:3128/a@b"), "http://proxy:3128/a@b");
    }

    #[test]
    fn snapshot_env_keeps_names_and_proxy_values() {
        let env = snapshot_env([
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/secret",
            "https_proxy=http://a:b@p:1",
            "PATH=/bin",
        ]);
        assert_eq!(env["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"], None);
        assert_eq!(env["https_proxy"].as_deref(), Some("http://***@p:1"));
        assert_eq!(env["PATH"], None);
    }

    #[test]
    fn proxy_without_no_proxy_for_the_endpoints_is_a_gap() {
        let ips: Vec<IpAddr> = vec![
            IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 169, 254)),
            IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 170, 2)),
        ];
        let env: BTreeMap<&str, &str> = [
            ("HTTPS_PROXY", "http://p:3128"),
            ("NO_PROXY", "169.254.169.254,.internal"),
        ]
        .into();
        let g = proxy_gap(|k| env.get(k).copied(), &ips);
        assert_eq!(g.map(|g| g.missing), Some(vec![ips[1]]));
        let env: BTreeMap<&str, &str> = [
            ("http_proxy", "http://p:3128"),
            ("no_proxy", "169.254.0.0/16"),
        ]
        .into();
        assert_eq!(proxy_gap(|k| env.get(k).copied(), &ips), None);
        let env: BTreeMap<&str, &str> = [("NO_PROXY", "x")].into();
        assert_eq!(proxy_gap(|k| env.get(k).copied(), &ips), None);
    }
}
