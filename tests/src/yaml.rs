//! Kubernetes YAML for the agents' file config source.
//!
//! Built as JSON values and printed as YAML: the structure stays checked by the compiler
//! rather than by string templates.

use serde_json::{Map, Value, json};

fn string_map(pairs: &[(&str, &str)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
            .collect::<Map<_, _>>(),
    )
}

pub(crate) fn to_yaml(value: &Value) -> String {
    serde_yaml::to_string(value).expect("a JSON value always prints as YAML")
}

/// A `v1/Namespace` named `name` with `labels`.
pub fn namespace_yaml(name: &str, labels: &[(&str, &str)]) -> String {
    to_yaml(&json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name, "labels": string_map(labels) },
    }))
}

/// A `v1/Service` of type ClusterIP; `ports` are `(name, port, targetPort)`, all TCP.
pub fn service_yaml(
    name: &str,
    namespace: &str,
    cluster_ip: &str,
    ports: &[(&str, u16, u16)],
    selector: &[(&str, &str)],
) -> String {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(port_name, port, target)| {
            json!({ "name": port_name, "port": port, "targetPort": target, "protocol": "TCP" })
        })
        .collect();
    to_yaml(&json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": ports,
            "selector": string_map(selector),
        },
    }))
}

/// What goes into a Pod manifest.
pub(crate) struct PodYaml<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub labels: &'a [(String, String)],
    pub node_name: &'a str,
    pub service_account: &'a str,
    pub host_ip: &'a str,
    pub pod_ips: &'a [String],
}

/// A running, ready `v1/Pod`, as the API server would report it; without `pod_ips`, a
/// pending one whose sandbox is being set up (what the API server says at CNI time).
pub(crate) fn pod_yaml(pod: &PodYaml<'_>) -> String {
    let labels: Vec<(&str, &str)> = pod
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let ips: Vec<Value> = pod.pod_ips.iter().map(|ip| json!({ "ip": ip })).collect();
    let condition = |kind: &str| json!({ "type": kind, "status": "True" });
    let status = if pod.pod_ips.is_empty() {
        json!({
            "phase": "Pending",
            "hostIP": pod.host_ip,
            "hostIPs": [{ "ip": pod.host_ip }],
            "conditions": [condition("PodScheduled")],
        })
    } else {
        json!({
            "phase": "Running",
            "hostIP": pod.host_ip,
            "hostIPs": [{ "ip": pod.host_ip }],
            "podIP": pod.pod_ips.first(),
            "podIPs": ips,
            "conditions": [
                condition("PodScheduled"),
                condition("Initialized"),
                condition("ContainersReady"),
                condition("Ready"),
            ],
        })
    };
    to_yaml(&json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
            "labels": string_map(&labels),
        },
        "spec": {
            "nodeName": pod.node_name,
            "serviceAccountName": pod.service_account,
            "containers": [{ "name": "app", "image": "mesh-testapp" }],
        },
        "status": status,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_yaml_has_the_fields_the_agent_reads() {
        let text = service_yaml(
            "echo",
            "default",
            "10.96.0.10",
            &[("tcp", 80, 8080)],
            &[("app", "echo")],
        );
        let value: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(value["kind"], "Service");
        assert_eq!(value["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(value["spec"]["clusterIPs"][0], "10.96.0.10");
        assert_eq!(value["spec"]["ports"][0]["port"], 80);
        assert_eq!(value["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(value["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(value["spec"]["selector"]["app"], "echo");
    }

    #[test]
    fn namespace_and_pod_yaml() {
        let ns: serde_yaml::Value =
            serde_yaml::from_str(&namespace_yaml("prod", &[("mesh", "on")])).unwrap();
        assert_eq!(ns["metadata"]["labels"]["mesh"], "on");
        let labels = [("app".to_owned(), "web".to_owned())];
        let ips = ["10.244.1.10".to_owned(), "fd00:244:1::10".to_owned()];
        let pod: serde_yaml::Value = serde_yaml::from_str(&pod_yaml(&PodYaml {
            name: "web",
            namespace: "prod",
            uid: "u-1",
            labels: &labels,
            node_name: "node1",
            service_account: "default",
            host_ip: "10.99.0.11",
            pod_ips: &ips,
        }))
        .unwrap();
        assert_eq!(pod["spec"]["nodeName"], "node1");
        assert_eq!(pod["status"]["podIP"], "10.244.1.10");
        assert_eq!(pod["status"]["podIPs"][1]["ip"], "fd00:244:1::10");
        assert_eq!(pod["metadata"]["labels"]["app"], "web");

        let pending: serde_yaml::Value = serde_yaml::from_str(&pod_yaml(&PodYaml {
            name: "web",
            namespace: "prod",
            uid: "u-1",
            labels: &labels,
            node_name: "node1",
            service_account: "default",
            host_ip: "10.99.0.11",
            pod_ips: &[],
        }))
        .unwrap();
        assert_eq!(pending["status"]["phase"], "Pending");
        assert!(pending["status"].get("podIP").is_none());
    }
}
