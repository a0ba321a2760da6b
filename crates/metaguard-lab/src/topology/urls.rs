//! The URLs of the lab's metadata endpoints, as workloads ask for them.

use super::{addr, Lab, Workload};

impl Lab {
    /// URL of IMDS over IPv4 / IPv6 for `path` (starting with `/`).
    pub fn imds_url_v4(path: &str) -> String {
        format!("http://{}{path}", addr::IMDS_V4)
    }

    pub fn imds_url_v6(path: &str) -> String {
        format!("http://[{}]{path}", addr::IMDS_V6)
    }

    /// `http://169.254.170.2/v4/<w's endpoint id><suffix>` (suffix: "",
    /// "/task", "/stats", …).
    pub fn tmds_url(w: Workload, suffix: &str) -> String {
        format!(
            "http://{}/v4/{}{suffix}",
            addr::TASK_METADATA_V4,
            w.tmds_endpoint_id()
        )
    }

    /// URL of the task credentials of `w` via 169.254.170.2.
    pub fn credentials_url(w: Workload) -> String {
        format!(
            "http://{}/v2/credentials/{}",
            addr::TASK_METADATA_V4,
            w.credentials_id()
        )
    }
}
