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
    scene.cluster.start_agent(
        0,
        &[
            "--outbound-traffic-policy",
            "REGISTRY_ONLY",
            "--access-log",
            "full",
        ],
    );
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
    // The access log says why, at the source.
    let line = scene
        .cluster
        .access_log(0)
        .into_iter()
        .find(|line| line["upstream"] == undeclared)
        .unwrap_or_else(|| panic!("no access log line for {undeclared}"));
    assert_eq!(line["response_flags"], "NR", "{line}");
    assert_eq!(
        line["policy"], "outboundTrafficPolicy REGISTRY_ONLY",
        "{line}"
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

/// A certificate authority the test made, and an HTTPS server on a host outside the mesh
/// whose certificate it signed.
struct HttpsServer {
    ca_pem: String,
    _thread: std::thread::JoinHandle<()>,
}

impl HttpsServer {
    /// Serves a certificate for `names` on `port` of `netns`; every request gets 200 and a
    /// body saying it came over TLS for the SNI the client sent.
    fn start(netns: &str, ip: &str, port: u16, names: &[&str]) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("a key"))
            .expect("a CA");
        let server_key = KeyPair::generate().expect("a key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let server = CertificateParams::new(names)
            .expect("server params")
            .signed_by(&server_key, &ca)
            .expect("a server certificate");
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(
            vec![server.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .expect("a server config");
        let address = format!("{ip}:{port}");
        let listener = mesh_tests::run_in_netns(netns, || std::net::TcpListener::bind(&address))
            .expect("a listener on the outside host");
        listener.set_nonblocking(true).expect("non-blocking");
        let thread = std::thread::spawn(move || serve_https(listener, config));
        Self {
            ca_pem: ca.pem(),
            _thread: thread,
        }
    }
}

fn serve_https(listener: std::net::TcpListener, config: rustls::ServerConfig) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                let mut request = vec![0; 4096];
                let _ = tls.read(&mut request).await;
                let body = format!("over TLS for {sni}");
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
}

const ORIGINATED_VIP: &str = "240.240.0.2";
/// An address no host has: only a ServiceEntry's endpoint makes a connection to it work.
const UNKNOWN_ADDRESS: &str = "203.0.113.7";

fn origination(outside: &str, ca_file: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure-api, namespace: default}}
spec:
  hosts: [secure.external.example]
  addresses: [{ORIGINATED_VIP}]
  ports:
  - {{number: 80, name: http-port, protocol: HTTP, targetPort: 8443}}
  resolution: STATIC
  endpoints:
  - address: {outside}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: hosted-api, namespace: default}}
spec:
  hosts: [hosted.external.example]
  ports:
  - {{number: 80, name: http-port, protocol: HTTP, targetPort: 8443}}
  resolution: STATIC
  endpoints:
  - address: {outside}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: hosted-api, namespace: default}}
spec:
  host: hosted.external.example
  trafficPolicy:
    tls:
      mode: SIMPLE
      caCertificates: {ca_file}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure-api, namespace: default}}
spec:
  host: secure.external.example
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 80}}
      tls:
        mode: SIMPLE
        caCertificates: {ca_file}
"
    )
}

#[test]
fn a_destination_rule_originates_tls_to_a_service_entry_host_checking_its_ca() {
    if skip() {
        return;
    }
    let scene = Scene::new("egress_tls_origination");
    let api_host = scene
        .cluster
        .pods()
        .iter()
        .find(|p| p.name == "api-host")
        .expect("the outside host")
        .clone();
    let https = HttpsServer::start(
        &api_host.netns,
        &scene.outside,
        8443,
        &["secure.external.example", "hosted.external.example"],
    );
    let ca_file = scene.cluster.work_dir().join("secure-api-ca.pem");
    std::fs::write(&ca_file, &https.ca_pem).expect("writing the CA");
    let ca_file = ca_file.display().to_string();
    apply_config(
        &scene.cluster,
        "origination.yaml",
        &origination(&scene.outside, &ca_file),
        0.0,
    );
    // The app speaks plain HTTP to port 80; the proxy opens TLS to 8443, with the host as
    // SNI, and checks the server against the CA the rule names.
    let url = format!("http://{ORIGINATED_VIP}:80/");
    let response = bookinfo::http(&scene.cluster, &scene.client, &url, &[]).remove(0);
    assert_eq!(response["status"], 200, "{response}");
    assert_eq!(response["body"], "over TLS for secure.external.example");
    assert_eq!(scene.opened_to("secure.external.example"), 1.0);

    // Without addresses, as in Istio's own task: the pod dials whatever its DNS answered
    // (here an address nobody has); the request's Host names the entry.
    let hosted = format!("http://{UNKNOWN_ADDRESS}:80/");
    let response = bookinfo::http(
        &scene.cluster,
        &scene.client,
        &hosted,
        &["--header", "host: hosted.external.example"],
    )
    .remove(0);
    assert_eq!(response["status"], 200, "{response}");
    assert_eq!(response["body"], "over TLS for hosted.external.example");
    assert_eq!(scene.opened_to("hosted.external.example"), 1.0);

    // A CA that did not sign the server: the connection is closed, never sent in plaintext.
    let other_ca = HttpsServer::start(&api_host.netns, &scene.outside, 8444, &["unused"]);
    std::fs::write(&ca_file, &other_ca.ca_pem).expect("writing another CA");
    let refused = scene.answer(&format!("{ORIGINATED_VIP}:80"));
    assert!(refused.is_err(), "TLS to an unverified server: {refused:?}");
    assert_eq!(
        metric(
            &scene.cluster,
            0,
            "nodemesh_proxy_errors_total",
            &[("direction", "outbound"), ("reason", "tls")],
        ),
        1.0
    );
}
