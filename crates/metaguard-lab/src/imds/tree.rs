//! The metadata tree the emulator serves: routing a path to a value or a
//! listing, the version tree, the credentials, IAM info and identity
//! document, laid out byte for byte as IMDS does.

use serde_json::{json, Value};

use crate::http::{self};

use super::{ImdsEmulator, Node, RoleCredentials, Routed, VERSIONS};

impl ImdsEmulator {
    pub(super) fn route(&self, path: &str) -> Routed {
        if path == "/" {
            return Routed::Body(VERSIONS.join("\n"));
        }
        let Some(rest) = path.strip_prefix('/') else {
            return Routed::NotFound;
        };
        let (version, below) = match rest.split_once('/') {
            Some((v, below)) => (v, Some(below)),
            None => (rest, None),
        };
        if !VERSIONS.contains(&version) {
            return Routed::NotFound;
        }
        let Some(below) = below else {
            return Routed::Redirect(format!("{path}/"));
        };
        if below.is_empty() {
            // The version root lists its categories without trailing slashes.
            return Routed::Body("dynamic\nmeta-data".to_string());
        }
        let (below, trailing_slash) = match below.strip_suffix('/') {
            Some(b) => (b, true),
            None => (below, false),
        };
        let mut node = self.version_tree();
        for segment in below.split('/') {
            let Node::Dir(children) = node else {
                return Routed::NotFound;
            };
            match children.into_iter().find(|(name, _)| name == segment) {
                Some((_, child)) => node = child,
                None => return Routed::NotFound,
            }
        }
        match node {
            Node::Dir(children) if trailing_slash => Routed::Body(listing(&children)),
            Node::Dir(_) => Routed::Redirect(format!("{path}/")),
            // A leaf answers with or without a trailing slash.
            Node::Leaf(value) => Routed::Body(value),
        }
    }

    /// Everything under `/<version>/`.
    pub(super) fn version_tree(&self) -> Node {
        let s = &self.inner.settings;
        let hostname = local_hostname(&s.local_ipv4, &s.region);
        let mut meta = vec![
            leaf("ami-id", &s.ami_id),
            leaf("ami-launch-index", "0"),
            leaf("hostname", &hostname),
        ];
        if let Some(c) = &self.current_credentials() {
            meta.push((
                "iam".to_string(),
                Node::Dir(vec![
                    leaf("info", &self.iam_info(&c.role)),
                    (
                        "security-credentials".to_string(),
                        Node::Dir(vec![leaf(&c.role, &aws_json(&self.credentials_fields(c)))]),
                    ),
                ]),
            ));
        }
        meta.extend([
            leaf("instance-id", &s.instance_id),
            leaf("instance-life-cycle", "on-demand"),
            leaf("instance-type", &s.instance_type),
            leaf("local-hostname", &hostname),
            leaf("local-ipv4", &s.local_ipv4),
            leaf("mac", &s.mac),
            (
                "placement".to_string(),
                Node::Dir(vec![
                    leaf("availability-zone", &s.availability_zone),
                    leaf("region", &s.region),
                ]),
            ),
        ]);
        let dynamic = Node::Dir(vec![(
            "instance-identity".to_string(),
            Node::Dir(vec![leaf("document", &self.identity_document())]),
        )]);
        Node::Dir(vec![
            ("dynamic".to_string(), dynamic),
            ("meta-data".to_string(), Node::Dir(meta)),
        ])
    }

    pub(super) fn credentials_fields(&self, c: &RoleCredentials) -> Vec<(String, Value)> {
        fields(&[
            ("Code", json!("Success")),
            ("LastUpdated", json!(http::rfc3339(self.inner.started))),
            ("Type", json!("AWS-HMAC")),
            ("AccessKeyId", json!(c.access_key_id)),
            ("SecretAccessKey", json!(c.secret_access_key)),
            ("Token", json!(c.token)),
            ("Expiration", json!(c.expiration)),
        ])
    }

    pub(super) fn iam_info(&self, role: &str) -> String {
        let s = &self.inner.settings;
        let id = http::fake_chars(
            &format!("{}/{role}/profile", s.instance_id),
            http::KEY_ID_ALPHABET,
            17,
        );
        aws_json(&fields(&[
            ("Code", json!("Success")),
            ("LastUpdated", json!(http::rfc3339(self.inner.started))),
            (
                "InstanceProfileArn",
                json!(format!(
                    "arn:aws:iam::{}:instance-profile/{role}",
                    s.account_id
                )),
            ),
            ("InstanceProfileId", json!(format!("AIPA{id}"))),
        ]))
    }

    pub(super) fn identity_document(&self) -> String {
        let s = &self.inner.settings;
        aws_json(&fields(&[
            ("accountId", json!(s.account_id)),
            ("architecture", json!("x86_64")),
            ("availabilityZone", json!(s.availability_zone)),
            ("billingProducts", Value::Null),
            ("devpayProductCodes", Value::Null),
            ("marketplaceProductCodes", Value::Null),
            ("imageId", json!(s.ami_id)),
            ("instanceId", json!(s.instance_id)),
            ("instanceType", json!(s.instance_type)),
            ("kernelId", Value::Null),
            ("pendingTime", json!(http::rfc3339(self.inner.started))),
            ("privateIp", json!(s.local_ipv4)),
            ("ramdiskId", Value::Null),
            ("region", json!(s.region)),
            ("version", json!("2017-09-30")),
        ]))
    }
}

pub(super) fn fields(pairs: &[(&str, Value)]) -> Vec<(String, Value)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), v.clone()))
        .collect()
}

pub(super) fn leaf(name: &str, value: &str) -> (String, Node) {
    (name.to_string(), Node::Leaf(value.to_string()))
}

/// A directory listing: one entry a line, directories with a trailing `/`,
/// no final newline.
pub(super) fn listing(children: &[(String, Node)]) -> String {
    children
        .iter()
        .map(|(name, node)| match node {
            Node::Dir(_) => format!("{name}/"),
            Node::Leaf(_) => name.clone(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A flat JSON object laid out the way IMDS does: `"Key" : value`, two
/// spaces of indent, no final newline.
pub(super) fn aws_json(fields: &[(String, Value)]) -> String {
    let body = fields
        .iter()
        .map(|(k, v)| format!("  {} : {v}", Value::String(k.clone())))
        .collect::<Vec<_>>()
        .join(",\n");
    format!("{{\n{body}\n}}")
}

/// `ip-10-0-0-10.ec2.internal` in us-east-1, `ip-….<region>.compute.internal`
/// elsewhere.
pub(super) fn local_hostname(ipv4: &str, region: &str) -> String {
    let host = format!("ip-{}", ipv4.replace('.', "-"));
    if region == "us-east-1" {
        format!("{host}.ec2.internal")
    } else {
        format!("{host}.{region}.compute.internal")
    }
}
