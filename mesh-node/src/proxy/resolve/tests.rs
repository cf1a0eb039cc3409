use std::collections::BTreeMap;

use super::*;
use crate::{
    config::{Object, object_from_yaml, translate},
    egress::OutboundTrafficPolicy,
};

fn state(yaml: &str) -> State {
    let objects: Vec<Object> = serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            object_from_yaml(value).unwrap_or_else(|error| panic!("{error}"))
        })
        .collect();
    translate(&objects, Vec::new(), "nodemesh-system")
}

use serde::Deserialize;

const CLUSTER: &str = "
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  nodeName: n0
  containers: [{name: app, image: web, ports: [{name: http, containerPort: 8081}]}]
status: {phase: Running, podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: app, image: web, ports: [{name: http, containerPort: 8082}]}]
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: other, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: app, image: web}]}
status: {phase: Running, podIP: 10.0.0.3}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.1
  clusterIPs: [10.96.0.1, 'fd00:96::1']
  selector: {app: web}
  ports:
  - {name: tcp, port: 80, targetPort: 8080}
  - {name: named, port: 81, targetPort: http}
";

#[test]
fn service_round_robins_over_its_ready_endpoints_in_its_namespace() {
    let state = state(CLUSTER);
    let resolver = Resolver::default();
    let mut seen = BTreeMap::new();
    for _ in 0..10 {
        let upstream = resolver
            .resolve(&state, "shop", "10.96.0.1:80".parse().unwrap())
            .unwrap();
        *seen.entry(upstream.addr().to_string()).or_insert(0) += 1;
    }
    assert_eq!(
        seen,
        BTreeMap::from([
            ("10.0.0.1:8080".to_string(), 5),
            ("10.0.0.2:8080".to_string(), 5)
        ]),
        "even split, targetPort mapped, pod of another namespace excluded"
    );
}

#[test]
fn named_target_ports_resolve_per_pod() {
    let state = state(CLUSTER);
    let resolver = Resolver::default();
    let mut addrs: Vec<String> = (0..2)
        .map(|_| {
            resolver
                .resolve(&state, "shop", "10.96.0.1:81".parse().unwrap())
                .unwrap()
                .addr()
                .to_string()
        })
        .collect();
    addrs.sort();
    assert_eq!(addrs, ["10.0.0.1:8081", "10.0.0.2:8082"]);
}

#[test]
fn ipv6_cluster_ip_picks_endpoints_with_ipv6() {
    let state = state(CLUSTER);
    let upstream = Resolver::default()
        .resolve(&state, "shop", "[fd00:96::1]:80".parse().unwrap())
        .unwrap();
    assert_eq!(
        upstream.addr().to_string(),
        "[fd00::1]:8080",
        "only web-1 has v6"
    );
}

#[test]
fn unknown_port_and_unknown_address() {
    let state = state(CLUSTER);
    let resolver = Resolver::default();
    let error = resolver
        .resolve(&state, "shop", "10.96.0.1:9999".parse().unwrap())
        .unwrap_err();
    assert_eq!(error.reason(), "no_endpoint");
    let pod = resolver
        .resolve(&state, "shop", "10.0.0.3:7".parse().unwrap())
        .unwrap();
    assert!(matches!(pod, Upstream::Workload { .. }), "{pod:?}");
    let outside = resolver
        .resolve(&state, "shop", "192.0.2.1:443".parse().unwrap())
        .unwrap();
    assert_eq!(
        outside,
        Upstream::Passthrough("192.0.2.1:443".parse().unwrap())
    );
}

#[test]
fn a_virtual_service_tcp_route_sends_l4_connections_where_it_says() {
    let state = state(&format!(
        "{CLUSTER}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web]
  tcp:
  - match: [{{port: 80}}]
    route:
    - destination: {{host: web, port: {{number: 81}}}}
      weight: 100
"
    ));
    let resolver = Resolver::default();
    let mut addrs: Vec<String> = (0..2)
        .map(|_| {
            resolver
                .resolve(&state, "shop", "10.96.0.1:80".parse().unwrap())
                .unwrap()
                .addr()
                .to_string()
        })
        .collect();
    addrs.sort();
    assert_eq!(
        addrs,
        ["10.0.0.1:8081", "10.0.0.2:8082"],
        "port 80 routed to the Service's port 81 and its named target port"
    );
}

const ENTRIES: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [240.0.0.1]
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pinned, namespace: shop}
spec:
  hosts: [pinned.example.com]
  addresses: [240.0.0.2]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.10}, {address: 192.0.2.11, ports: {http: 9090}}]
  exportTo: ['.']
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: named, namespace: shop}
spec:
  hosts: [localhost]
  addresses: [240.0.0.3]
  ports: [{number: 80, name: http}]
  resolution: DNS
";

#[test]
fn service_entries_send_connections_where_they_say() {
    let state = state(&format!("{CLUSTER}---{ENTRIES}"));
    let resolver = Resolver::default();
    let resolve = |ns: &str, dst: &str| resolver.resolve(&state, ns, dst.parse().unwrap());
    let key = |host: &str| ObjectKey::new("shop", host);
    // NONE: where the app asked, attributed to the entry.
    assert_eq!(
        resolve("shop", "240.0.0.1:443").unwrap(),
        Upstream::External {
            service: key("api.example.com"),
            addr: "240.0.0.1:443".parse().unwrap()
        }
    );
    // STATIC: the endpoints in turn, each with its own port for the entry's port.
    let mut addrs: Vec<String> = (0..2)
        .map(|_| resolve("shop", "240.0.0.2:80").unwrap().addr().to_string())
        .collect();
    addrs.sort();
    assert_eq!(addrs, ["192.0.2.10:8080", "192.0.2.11:9090"]);
    // exportTo '.': pods of another namespace do not see it.
    assert_eq!(
        resolve("other", "240.0.0.2:80").unwrap(),
        Upstream::Passthrough("240.0.0.2:80".parse().unwrap())
    );
    assert_eq!(
        resolve("shop", "240.0.0.1:80").unwrap(),
        Upstream::Passthrough("240.0.0.1:80".parse().unwrap()),
        "a port the entry does not list"
    );
}

#[tokio::test]
async fn a_dns_entry_is_looked_up_when_the_connection_opens() {
    let state = state(&format!("{CLUSTER}---{ENTRIES}"));
    let upstream = Resolver::default()
        .resolve(&state, "shop", "240.0.0.3:80".parse().unwrap())
        .unwrap();
    assert!(matches!(upstream, Upstream::Lookup { ref host, .. } if host == "localhost"));
    let looked_up = upstream.looked_up().await.expect("localhost resolves");
    assert_eq!(
        looked_up,
        Upstream::External {
            service: ObjectKey::new("shop", "localhost"),
            addr: "127.0.0.1:80".parse().unwrap()
        }
    );
}

#[test]
fn registry_only_refuses_what_the_mesh_does_not_know() {
    let state = state(&format!("{CLUSTER}---{ENTRIES}"));
    let resolver = Resolver::new(OutboundTrafficPolicy::RegistryOnly);
    let resolve = |ns: &str, dst: &str| resolver.resolve(&state, ns, dst.parse().unwrap());
    let refused = resolve("shop", "192.0.2.1:443").unwrap_err();
    assert_eq!(refused.reason(), "not_registered");
    assert_eq!(refused.response_flags(), "NR");
    assert!(
        resolve("other", "240.0.0.2:80").is_err(),
        "an entry it cannot see"
    );
    assert!(resolve("shop", "240.0.0.1:443").is_ok(), "a ServiceEntry");
    assert!(resolve("shop", "10.96.0.1:80").is_ok(), "a Service");
    assert!(resolve("shop", "10.0.0.3:7").is_ok(), "a pod");
}

#[test]
fn entries_without_addresses_are_found_by_host_and_port() {
    let state = state(
        "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: exact, namespace: shop}
spec:
  hosts: [api.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wildcard, namespace: shop}
spec:
  hosts: ['*.example.com', '*.eu.example.com']
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: billing}
spec:
  hosts: [pay.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  exportTo: ['.']
",
    );
    let found = |host: &str, port: u16, ns: &str| {
        state
            .host_on_port(host, port, ns)
            .map(|s| s.key.name.clone())
    };
    assert_eq!(
        found("api.example.com", 80, "shop").as_deref(),
        Some("api.example.com")
    );
    assert_eq!(
        found("API.example.com:80", 80, "shop").as_deref(),
        Some("api.example.com"),
        "case and port do not matter"
    );
    assert_eq!(
        found("www.example.com", 80, "shop").as_deref(),
        Some("*.example.com")
    );
    assert_eq!(
        found("a.eu.example.com", 80, "shop").as_deref(),
        Some("*.eu.example.com"),
        "the longest wildcard"
    );
    assert_eq!(found("example.com", 80, "shop"), None);
    assert_eq!(found("api.example.com", 443, "shop"), None, "another port");
    assert_eq!(
        found("pay.example.com", 80, "shop").as_deref(),
        Some("*.example.com")
    );
    assert_eq!(
        found("pay.example.com", 80, "billing").as_deref(),
        Some("pay.example.com")
    );
    assert_eq!(
        state.hosts_on_port(80, "shop").count(),
        3,
        "billing's is not exported"
    );
    assert_eq!(state.hosts_on_port(80, "billing").count(), 4);
    assert_eq!(state.hosts_on_port(443, "shop").count(), 0);
}
