//! Redaction of task-metadata (TMDS v3/v4) answers for `tmds = "redact"`:
//! a compromised container learns its own container's runtime facts and
//! nothing about its siblings, its task's or cluster's ARNs, or the
//! network (the training-platform case).

use serde_json::Value;

/// Keys removed wherever they appear: identifiers of the account, cluster,
/// task and service; network layout; labels (they carry the task ARN and
/// cluster); log routing.
const REMOVED: &[&str] = &[
    "Cluster",
    "ServiceName",
    "VPCID",
    "Networks",
    "Labels",
    "LogOptions",
    "AvailabilityZone",
    "Family",
    "Revision",
    "EphemeralStorageMetrics",
];

fn removed(key: &str) -> bool {
    REMOVED.contains(&key) || key.ends_with("ARN") || key.ends_with("Arn")
}

/// Redacts a TMDS answer. `own` is the caller's container id: in a task
/// answer, only that container is kept in `Containers`.
pub fn redact(v: &mut Value, own: Option<&str>) {
    match v {
        Value::Object(map) => {
            map.retain(|k, _| !removed(k));
            if let Some(Value::Array(cs)) = map.get_mut("Containers") {
                cs.retain(|c| own.is_some() && c.get("DockerId").and_then(Value::as_str) == own);
            }
            for (_, child) in map.iter_mut() {
                redact(child, own);
            }
        }
        Value::Array(items) => {
            for i in items {
                redact(i, own);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn siblings_arns_and_networks_go() {
        let mut task = json!({
            "Cluster": "arn:aws:ecs:us-west-2:111122223333:cluster/training",
            "TaskARN": "arn:aws:ecs:us-west-2:111122223333:task/training/abc",
            "Family": "challenge", "Revision": "7",
            "DesiredStatus": "RUNNING",
            "Containers": [
                {"DockerId": "own", "Name": "app", "ContainerARN": "arn:x",
                 "Labels": {"com.amazonaws.ecs.task-arn": "arn:y"},
                 "Networks": [{"IPv4Addresses": ["10.0.0.5"]}], "Image": "app:1"},
                {"DockerId": "sibling", "Name": "flag-store", "Image": "secret:1"}
            ],
            "AvailabilityZone": "us-west-2a"
        });
        redact(&mut task, Some("own"));
        let text = task.to_string();
        for gone in [
            "arn:",
            "sibling",
            "flag-store",
            "10.0.0.5",
            "training",
            "us-west-2a",
            "challenge",
        ] {
            assert!(!text.contains(gone), "{gone} survived: {text}");
        }
        assert_eq!(task["Containers"][0]["Image"], "app:1");
        assert_eq!(task["DesiredStatus"], "RUNNING");
    }

    #[test]
    fn unknown_caller_keeps_no_container() {
        let mut task = json!({"Containers": [{"DockerId": "a"}]});
        redact(&mut task, None);
        assert_eq!(task["Containers"], json!([]));
    }
}
