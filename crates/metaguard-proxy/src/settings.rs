//! What a reload changes in the running proxy, as one value: the config
//! (workloads, policies, limits' parameters), where requests are forwarded
//! (IMDS, the ECS agent), the per-workload limits and the audit sink.
//!
//! The proxy holds the settings in force as an `Arc` behind a read-write
//! lock; every connection and every request reads it once and keeps its
//! copy to the end, so a reload takes effect from the next connection or
//! request — never halfway through one — and requests never wait for each
//! other on it (only a reload writes).

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::header::HeaderValue;
use metaguard_core::Config;

use crate::audit::AuditSink;
use crate::limits::Limits;
use crate::observe::ObserveLog;

/// Where the proxy forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstreams {
    /// IMDS (the first IPv4 `[endpoints] imds` address, port 80).
    pub imds: SocketAddr,
    /// The ECS agent's credentials endpoint (`[agent] credentials`).
    pub agent: SocketAddr,
}

impl Upstreams {
    /// The upstreams `config` names.
    pub fn from_config(config: &Config) -> Result<Upstreams, SettingsError> {
        let imds = config
            .endpoints
            .imds
            .iter()
            .find(|a| a.is_ipv4())
            .or(config.endpoints.imds.first())
            .map(|a| SocketAddr::new(*a, 80))
            .ok_or(SettingsError::NoImdsEndpoint)?;
        Ok(Upstreams {
            imds,
            agent: config.agent_credentials,
        })
    }
}

/// Why settings could not be made from a config.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("no [endpoints] imds address to forward IMDS requests to")]
    NoImdsEndpoint,
    #[error("cannot open the audit log {path}")]
    AuditLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One generation of the proxy's settings.
#[derive(Debug)]
pub struct Settings {
    pub(crate) config: Arc<Config>,
    pub(crate) upstreams: Upstreams,
    /// The `Host` header each upstream is sent: [imds, agent].
    pub(crate) upstream_hosts: [HeaderValue; 2],
    pub(crate) limits: Limits,
    pub(crate) audit: AuditSink,
    /// Where observed requests are recorded (none: nothing is).
    pub(crate) observe: Option<Arc<ObserveLog>>,
}

impl Settings {
    /// Settings for `config`: its upstreams and limits, and its audit log
    /// opened — again, when it is the same file as before, so a rotated
    /// log is followed after a reload.
    pub fn new(config: Arc<Config>) -> Result<Settings, SettingsError> {
        let upstreams = Upstreams::from_config(&config)?;
        let path = config.proxy.audit_log.as_deref();
        let audit = AuditSink::open(path).map_err(|source| SettingsError::AuditLog {
            path: path.unwrap_or_default().to_string(),
            source,
        })?;
        let p = &config.proxy;
        Ok(Settings {
            limits: Limits::new(p.rate, p.burst, p.max_connections),
            upstream_hosts: [upstreams.imds, upstreams.agent].map(crate::handler::host_header),
            upstreams,
            audit,
            observe: None,
            config,
        })
    }

    /// These settings, recording observed workloads' requests in `log`
    /// (one log for every generation: it rotates by its own size).
    pub fn with_observe(mut self, log: Option<Arc<ObserveLog>>) -> Settings {
        self.observe = log;
        self
    }

    /// Takes over the limits' state of the settings they replace, each
    /// workload by its name (indices change when workloads are added,
    /// removed or reordered).
    pub(crate) fn follow(&self, old: &Settings) {
        let index = |k: Option<usize>| match k {
            None => Some(None),
            Some(i) => {
                let name = &old.config.workloads.get(i)?.name;
                let now = self.config.workloads.iter().position(|w| &w.name == name)?;
                Some(Some(now))
            }
        };
        self.limits.adopt(&old.limits, index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_come_from_the_endpoints_and_agent_tables() {
        let c = Config::parse(
            "[endpoints]\nimds = [\"fd00:ec2::254\", \"169.254.169.254\"]\n\n\
             [agent]\ncredentials = \"127.0.0.1:51680\"\n",
            "test.toml",
        )
        .expect("valid config");
        let u = Upstreams::from_config(&c).expect("upstreams");
        assert_eq!(u.imds, "169.254.169.254:80".parse().expect("address"));
        assert_eq!(u.agent, "127.0.0.1:51680".parse().expect("address"));
    }

    #[test]
    fn an_unopenable_audit_log_is_an_error_naming_it() {
        let dir = std::env::temp_dir();
        // A directory cannot be opened for appending.
        let text = format!("[proxy]\naudit_log = \"{}\"\n", dir.display());
        let c = Config::parse(&text, "test.toml").expect("valid config");
        let e = Settings::new(Arc::new(c)).expect_err("a directory as audit log");
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
    }
}
