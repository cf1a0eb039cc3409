//! End to end: traffic leaving the mesh. ServiceEntry names destinations outside the
//! cluster's Services (metrics say which), and `--outbound-traffic-policy REGISTRY_ONLY`
//! refuses every destination the mesh does not know.
use mesh_tests::{
    Cluster, Pod, PodProcess, PodSpec, bookinfo, namespace_yaml,
    scenario::{ENROLLED, apply_config, connect, metric, replies, skip, wait_enrolled},
};

/// A ServiceEntry's virtual address: routable nowhere, only the mesh knows where it goes.
const PINNED_VIP: &str = "240.240.0.1";

struct Scene {
    cluster: Cluster,
    client: Pod,
    /// The server's address: a host outside the cluster, as far as the mesh knows.
    outside: String,
    _servers: Vec<PodProcess>,
}

impl Scene {
    /// `sleep` (enrolled) on node0; on node1 a host the mesh does not know, answering on
    /// port 9443 as `declared` and on 9444 as `undeclared`.
    fn new(test: &str) -> Self {
        let mut cluster = Cluster::new(test, 2);
        let client = cluster.add_pod(PodSpec::new("sleep", 0).label("app", "sleep"));
        cluster.write_config("ns.yaml", &namespace_yaml("default", ENROLLED));
        let host = cluster.add_pod(PodSpec::new("api-host", 1).namespace("outside"));
        // Not in the config: to the mesh this address is outside the cluster.
        cluster.remove_config(&host.manifest_file_name());
        let servers = vec![
            bookinfo::serve_tcp(&cluster, &host, 9443, "declared"),
            bookinfo::serve_tcp(&cluster, &host, 9444, "undeclared"),
        ];
        cluster.start_agents();
        wait_enrolled(&cluster, 0, 1);
        Self {
            outside: host.ip.to_string(),
            cluster,
            client,
            _servers: servers,
        }
    }

    /// The server that answered one connection to `to`, or why none did.
    fn answer(&self, to: &str) -> Result<String, String> {
        let output = connect(&self.cluster, &self.client, to, 1);
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        Ok(replies(&output)[0]["server"]
            .as_str()
            .expect("a server name")
            .to_owned())
    }

    fn opened_to(&self, service: &str) -> f64 {
        metric(
            &self.cluster,
            0,
            "istio_tcp_connections_opened_total",
            &[("reporter", "source"), ("destination_service", service)],
        )
    }
}

fn entries(outside: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: default}}
spec:
  hosts: [api.external.example]
  addresses: [{outside}]
  ports:
  - {{number: 9443, name: tcp-api, protocol: TCP}}
  location: MESH_EXTERNAL
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pinned, namespace: default}}
spec:
  hosts: [pinned.external.example]
  addresses: [{PINNED_VIP}]
  ports:
  - {{number: 80, name: tcp-pinned, protocol: TCP, targetPort: 9443}}
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints:
  - address: {outside}
"
    )
}

#[test]
fn service_entries_name_external_hosts_and_registry_only_refuses_the_rest() {
    if skip() {
        return;
    }
    let mut scene = Scene::new("egress_registry_only");
    let (declared, undeclared) = (
        format!("{}:9443", scene.outside),
        format!("{}:9444", scene.outside),
    );
    apply_config(
        &scene.cluster,
        "entries.yaml",
        &entries(&scene.outside),
        0.0,
    );

    // ALLOW_ANY (the default): both ports answer; the declared one is named in metrics.
    assert_eq!(scene.answer(&declared).as_deref(), Ok("declared"));
    assert_eq!(scene.opened_to("api.external.example"), 1.0);
    assert_eq!(scene.answer(&undeclared).as_deref(), Ok("undeclared"));
    // STATIC: the entry's address, unroutable without the mesh, reaches its endpoint.
    let pinned = format!("{PINNED_VIP}:80");
    assert_eq!(scene.answer(&pinned).as_deref(), Ok("declared"));
    assert_eq!(scene.opened_to("pinned.external.example"), 1.0);

    // REGISTRY_ONLY: what no ServiceEntry names is refused at the source; the rest stays.
    scene.cluster.stop_agent(0);
    scene
        .cluster
        .start_agent(0, &["--outbound-traffic-policy", "REGISTRY_ONLY"]);
    wait_enrolled(&scene.cluster, 0, 1);
    let refused = scene.answer(&undeclared);
    assert!(
        refused.is_err(),
        "an unknown destination answered: {refused:?}"
    );
    assert_eq!(
        metric(
            &scene.cluster,
            0,
            "nodemesh_proxy_errors_total",
            &[("direction", "outbound"), ("reason", "not_registered")],
        ),
        1.0
    );
    assert_eq!(scene.answer(&declared).as_deref(), Ok("declared"));
    assert_eq!(scene.answer(&pinned).as_deref(), Ok("declared"));
    // `debug explain` tells the same, from the agent that decides.
    let explained = scene
        .cluster
        .debug(0, &["explain", "sleep", &scene.outside, "--port", "9444"]);
    assert!(
        explained.contains("DENIED by outboundTrafficPolicy REGISTRY_ONLY"),
        "{explained}"
    );
    let explained = scene
        .cluster
        .debug(0, &["explain", "sleep", "pinned.external.example"]);
    assert!(
        explained.contains("ServiceEntry host default/pinned.external.example")
            && explained.contains("ALLOWED"),
        "{explained}"
    );

    // A bad entry is refused alone, with its reason; the others stay in force.
    apply_config(
        &scene.cluster,
        "bad.yaml",
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bad, namespace: default}
spec:
  hosts: [bad.external.example]
  addresses: [not-an-address]
  ports: [{number: 9444, name: tcp}]
",
        1.0,
    );
    let config = scene.cluster.debug(0, &["config"]);
    assert!(
        config.contains("ServiceEntry default/bad") && config.contains("not an IP address"),
        "{config}"
    );
    assert!(scene.answer(&undeclared).is_err());
    assert_eq!(scene.answer(&declared).as_deref(), Ok("declared"));
}
