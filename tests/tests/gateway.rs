//! End to end: the ingress gateway. `mesh-node gateway` runs in its own pod (namespace
//! `istio-system`, not enrolled) on node1; a client in a network namespace the mesh does not
//! know calls it with `curl` over HTTPS, with SNI, HTTP/1.1 and HTTP/2; Istio's "Secure
//! Gateways" YAML routes by host and path to mesh Services on node0, over HBONE as the
//! gateway's identity.
use std::{
    fs::File,
    net::SocketAddr,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use mesh_tests::{
    Cluster, Pod, PodProcess, PodSpec, bin_path, bookinfo, http_get_in_netns, metric_value,
    namespace_yaml,
    scenario::{ENROLLED, connect, metric, replies, skip, wait_until},
    service_yaml,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};

const GATEWAY_SA: &str = "istio-ingressgateway-service-account";
const GATEWAY_PRINCIPAL: &str =
    "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account";
const GATEWAY_ADMIN: &str = "127.0.0.1:15000";
const GATEWAY_METRICS: &str = "127.0.0.1:15020";
const CONVERGE: Duration = Duration::from_secs(20);

/// Istio's "Secure Gateways" task, multiple hosts: one Gateway, two HTTPS servers on 443
/// with a certificate each, and a VirtualService per host (unchanged but for the
/// httpbin match, which the task also writes this way).
const SECURE_GATEWAYS: &str = r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway # use istio default ingress gateway
  servers:
  - port:
      number: 443
      name: https-httpbin
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: httpbin-credential
    hosts:
    - httpbin.example.com
  - port:
      number: 443
      name: https-helloworld
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: helloworld-credential
    hosts:
    - helloworld.example.com
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - "httpbin.example.com"
  gateways:
  - mygateway
  http:
  - match:
    - uri:
        prefix: /status
    - uri:
        prefix: /delay
    route:
    - destination:
        port:
          number: 8000
        host: httpbin
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: helloworld
spec:
  hosts:
  - helloworld.example.com
  gateways:
  - mygateway
  http:
  - match:
    - uri:
        exact: /hello
    route:
    - destination:
        host: helloworld
        port:
          number: 5000
"#;

/// Plain HTTP on port 80 answered with a redirect to HTTPS (Istio's `httpsRedirect`).
const REDIRECT_GATEWAY: &str = r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: redirect
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - "*"
    tls:
      httpsRedirect: true
"#;

/// A certificate authority the test made.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "gateway test CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a key"))
            .expect("a CA");
        Self { issuer }
    }

    /// A `kubernetes.io/tls` Secret in `istio-system` for `host`, signed by this CA.
    fn secret(&self, name: &str, host: &str) -> String {
        self.secret_trusting(name, host, None)
    }

    /// [`TestCa::secret`], with `ca.crt` (the CA a MUTUAL server checks clients against)
    /// when `client_ca` is given.
    fn secret_trusting(&self, name: &str, host: &str, client_ca: Option<&TestCa>) -> String {
        let (certificate, key) = self.issue(host);
        let indent = |pem: &str| pem.trim_end().replace('\n', "\n    ");
        let mut yaml = format!(
            "apiVersion: v1
kind: Secret
metadata: {{name: {name}, namespace: istio-system}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
    {}
  tls.key: |
    {}
",
            indent(&certificate),
            indent(&key)
        );
        if let Some(client_ca) = client_ca {
            yaml.push_str(&format!(
                "  ca.crt: |\n    {}\n",
                indent(&client_ca.issuer.pem())
            ));
        }
        yaml
    }

    /// A certificate for `name` and its key, PEM.
    fn issue(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().expect("a key");
        // Its own subject: OpenSSL (curl) takes a leaf named like its issuer for
        // self-signed.
        let mut params = CertificateParams::new(vec![name.to_string()]).expect("params");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let certificate = params.signed_by(&key, &self.issuer).expect("a certificate");
        (certificate.pem(), key.serialize_pem())
    }

    /// Its certificate as a file curl can trust.
    fn write_pem(&self, cluster: &Cluster, name: &str) -> String {
        let path = cluster.work_dir().join(name);
        std::fs::write(&path, self.issuer.pem()).expect("writing the CA file");
        path.to_str().expect("UTF-8 path").to_owned()
    }
}

/// A process the test started in a pod (`mesh-node gateway`, a backend); killed (by PID)
/// when dropped.
struct Process {
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Scene {
    cluster: Cluster,
    client: Pod,
    gateway: Pod,
    /// Serves HTTPS with its own certificate (for PASSTHROUGH); started by the test that
    /// needs it.
    nginx: Pod,
    gateway_process: Process,
    _servers: Vec<PodProcess>,
}

impl Scene {
    fn new(test: &str, ca: &TestCa) -> Self {
        let mut cluster = Cluster::new(test, 2);
        let httpbin = cluster.add_pod(
            PodSpec::new("httpbin", 0)
                .label("app", "httpbin")
                .service_account("httpbin"),
        );
        let helloworld = cluster.add_pod(
            PodSpec::new("helloworld", 0)
                .label("app", "helloworld")
                .service_account("helloworld"),
        );
        let nginx = cluster.add_pod(
            PodSpec::new("my-nginx", 0)
                .label("app", "my-nginx")
                .service_account("my-nginx"),
        );
        let tcp_echo = cluster.add_pod(
            PodSpec::new("tcp-echo", 0)
                .label("app", "tcp-echo")
                .service_account("tcp-echo"),
        );
        let gateway = cluster.add_pod(
            PodSpec::new("istio-ingressgateway", 1)
                .namespace("istio-system")
                .label("istio", "ingressgateway")
                .service_account(GATEWAY_SA),
        );
        // A host on the internet, as far as the mesh knows: not in its config.
        let client = cluster.add_pod(PodSpec::new("client", 0).namespace("outside"));
        cluster.remove_config(&client.manifest_file_name());
        cluster.write_config(
            "ns.yaml",
            &format!(
                "{}---\n{}",
                namespace_yaml("default", ENROLLED),
                namespace_yaml("istio-system", &[])
            ),
        );
        // Each Service selects the pods `app: <its name>` in `default`.
        let service = |name: &str, ip: &str, port: (&str, u16, u16)| {
            service_yaml(name, "default", ip, &[port], &[("app", name)])
        };
        let services = [
            service("httpbin", "10.96.0.20", ("http", 8000, bookinfo::APP_PORT)),
            service(
                "helloworld",
                "10.96.0.21",
                ("http", 5000, bookinfo::APP_PORT),
            ),
            service("my-nginx", "10.96.0.22", ("https", 443, NGINX_PORT)),
            service("tcp-echo", "10.96.0.23", ("tcp", 9000, 9000)),
        ];
        cluster.write_config("services.yaml", &services.join("---\n"));
        cluster.write_config(
            "secrets.yaml",
            &format!(
                "{}---\n{}",
                ca.secret("httpbin-credential", "httpbin.example.com"),
                ca.secret("helloworld-credential", "helloworld.example.com")
            ),
        );
        cluster.write_config("gateway.yaml", SECURE_GATEWAYS);
        cluster.write_config("redirect.yaml", REDIRECT_GATEWAY);
        let servers = vec![
            bookinfo::serve_http(&cluster, &httpbin),
            bookinfo::serve_http(&cluster, &helloworld),
            bookinfo::serve_tcp(&cluster, &tcp_echo, 9000, "tcp-echo"),
        ];
        cluster.start_agents();
        let gateway_process = start_gateway(&cluster, &gateway);
        Self {
            cluster,
            client,
            gateway,
            nginx,
            gateway_process,
            _servers: servers,
        }
    }

    /// `curl` from the client outside the cluster to `url`, its host resolved to the
    /// gateway: the output (body, then a line `<status> <HTTP version>`).
    fn curl(&self, url: &str, args: &[&str]) -> Output {
        let host = url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("a URL with a host");
        let (name, port) = host.split_once(':').unwrap_or((
            host,
            if url.starts_with("https") {
                "443"
            } else {
                "80"
            },
        ));
        let resolve = format!("{name}:{port}:{}", self.gateway.ip);
        self.client
            .command(&self.cluster, "curl")
            .args(["-sS", "--max-time", "10", "--resolve", &resolve])
            .args(["-w", "\n%{http_code} %{http_version}"])
            .args(args)
            .arg(url)
            .stdin(Stdio::null())
            .output()
            .expect("running curl")
    }

    /// The status, HTTP version and JSON reply of a request that must have been answered.
    fn get(&self, url: &str, args: &[&str]) -> (u16, String, serde_json::Value) {
        let output = self.curl(url, args);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "curl {url} {args:?}: {}{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
        let (body, last) = stdout.rsplit_once('\n').expect("the -w line");
        let (status, version) = last.split_once(' ').expect("status and version");
        let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
        (status.parse().expect("a status"), version.to_owned(), json)
    }

    /// Sends the gateway SIGTERM, as the kubelet does when a rollout replaces its pod.
    fn terminate_gateway(&self) {
        let pid = libc::pid_t::try_from(self.gateway_process.child.id()).expect("a pid");
        // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM to the gateway");
    }

    /// The status of the gateway's readiness check (0: no answer).
    fn gateway_readiness(&self) -> u16 {
        let addr: SocketAddr = "127.0.0.1:15021".parse().expect("an address");
        http_get_in_netns(&self.gateway.netns, addr, "/healthz/ready")
            .map_or(0, |(status, _)| status)
    }

    fn gateway_admin(&self, path: &str) -> String {
        let addr: SocketAddr = GATEWAY_ADMIN.parse().expect("an address");
        http_get_in_netns(&self.gateway.netns, addr, path)
            .map(|(_, body)| body)
            .unwrap_or_else(|e| format!("admin unreachable: {e}"))
    }

    fn gateway_metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let addr: SocketAddr = GATEWAY_METRICS.parse().expect("an address");
        let text = http_get_in_netns(&self.gateway.netns, addr, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        metric_value(&text, name, labels).unwrap_or(0.0)
    }
}

/// `mesh-node debug gateways` against the gateway's admin API, run in its pod.
fn debug_gateways(scene: &Scene) -> String {
    debug(scene, &["gateways"])
}

/// `mesh-node debug <args>` against the gateway's admin API, run in its pod.
fn debug(scene: &Scene, args: &[&str]) -> String {
    let output = scene
        .gateway
        .command(&scene.cluster, bin_path("mesh-node"))
        .args(["debug", "--admin-addr", GATEWAY_ADMIN])
        .args(args)
        .output()
        .expect("mesh-node debug gateways");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn start_gateway(cluster: &Cluster, pod: &Pod) -> Process {
    let log_path = cluster.logs_dir().join("gateway.log");
    let log = File::create(&log_path).expect("the gateway's log");
    let config_dir = cluster.config_dir();
    let ca_dir = cluster.work_dir().join("ca");
    let node = cluster.node_name(pod.node);
    let mut command: Command = pod.command(cluster, bin_path("mesh-node"));
    command
        .args([
            "gateway",
            "--pod-name",
            &pod.name,
            "--pod-namespace",
            &pod.namespace,
        ])
        .args(["--node-name", &node])
        .args(["--config-dir", config_dir.to_str().expect("UTF-8 path")])
        .args(["--ca-dir", ca_dir.to_str().expect("UTF-8 path")])
        .args([
            "--metrics-addr",
            GATEWAY_METRICS,
            "--admin-addr",
            GATEWAY_ADMIN,
        ])
        .args(["--health-addr", "127.0.0.1:15021", "--access-log", "full"])
        .env("RUST_LOG", "info,mesh_node=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log);
    let child = command.spawn().expect("starting mesh-node gateway");
    let process = Process { child };
    let health: SocketAddr = "127.0.0.1:15021".parse().expect("an address");
    wait_until(CONVERGE, "the gateway to be ready", || {
        let ready = http_get_in_netns(&pod.netns, health, "/healthz/ready")
            .is_ok_and(|(status, _)| status == 200);
        ready.then_some(())
    });
    process
}

#[test]
fn a_gateway_routes_https_by_host_and_path_into_the_mesh_as_its_own_identity() {
    if skip() {
        return;
    }
    let ca = TestCa::new();
    let scene = Scene::new("gateway_https", &ca);
    let ca_file = ca.write_pem(&scene.cluster, "gateway-ca.pem");
    wait_until(CONVERGE, "the gateway to serve httpbin.example.com", || {
        let args = ["--cacert", ca_file.as_str()];
        let served = scene.curl("https://httpbin.example.com/status/200", &args);
        served.status.success().then_some(())
    });

    // Two hosts, two certificates, chosen by SNI (curl checks each is its host's);
    // HTTP/1.1 and HTTP/2 (ALPN).
    let (status, version, reply) = scene.get(
        "https://httpbin.example.com/status/200",
        &["--cacert", &ca_file, "--http1.1"],
    );
    assert_eq!((status, version.as_str()), (200, "1.1"), "{reply}");
    assert_eq!(reply["served_by"], "httpbin", "{reply}");
    assert_eq!(reply["path"], "/status/200", "{reply}");
    // The client's address, as the gateway saw it, and the scheme it used.
    let client_ip = scene.client.ip.to_string();
    assert_eq!(reply["headers"]["x-forwarded-for"], client_ip, "{reply}");
    assert_eq!(reply["headers"]["x-forwarded-proto"], "https", "{reply}");
    assert_eq!(
        reply["headers"]["x-envoy-external-address"], client_ip,
        "{reply}"
    );
    let (status, version, reply) = scene.get(
        "https://helloworld.example.com/hello",
        &["--cacert", &ca_file, "--http2"],
    );
    assert_eq!((status, version.as_str()), (200, "2"), "{reply}");
    assert_eq!(reply["served_by"], "helloworld", "{reply}");
    // A path no rule of the host's VirtualService matches: 404 at the gateway.
    let (status, _, _) = scene.get(
        "https://helloworld.example.com/other",
        &["--cacert", &ca_file],
    );
    assert_eq!(status, 404);
    // A host no server serves gets no handshake at all.
    let unknown = scene.curl("https://other.example.com/", &["--cacert", &ca_file]);
    assert!(!unknown.status.success(), "an unknown SNI was served");

    // Plain HTTP on port 80 is sent to HTTPS.
    let redirect = scene.curl("http://httpbin.example.com/status/200", &["-D", "-"]);
    let head = String::from_utf8_lossy(&redirect.stdout);
    assert!(
        head.contains("301") && head.contains("location: https://httpbin.example.com/status/200"),
        "{head}"
    );

    // Into the mesh over HBONE, as the gateway's own identity: the destination's proxy
    // saw mutual TLS from it, and the gateway reports itself as the source workload.
    wait_until(CONVERGE, "the destination's request metrics", || {
        (metric(
            &scene.cluster,
            0,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("destination_workload", "httpbin"),
                ("source_principal", GATEWAY_PRINCIPAL),
                ("source_workload", "istio-ingressgateway"),
                ("connection_security_policy", "mutual_tls"),
                ("response_code", "200"),
            ],
        ) >= 2.0)
            .then_some(())
    });
    assert!(
        scene.gateway_metric(
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", "istio-ingressgateway"),
                ("destination_service_name", "helloworld"),
                ("response_code", "200"),
            ],
        ) >= 1.0
    );
    let listeners = debug_gateways(&scene);
    assert!(
        listeners.contains("Gateway default/mygateway servers[1]")
            && listeners.contains("helloworld.example.com")
            && listeners.contains("VirtualService default/helloworld"),
        "{listeners}"
    );
    // `debug explain` at the gateway: a client's request, its server, route and endpoints.
    let explain = |path: &str| {
        let host = "httpbin.example.com";
        let args = [
            "explain",
            "203.0.113.7",
            host,
            "--port",
            "443",
            "--path",
            path,
        ];
        debug(&scene, &args)
    };
    let explained = explain("/status/200");
    for shown in [
        "SNI httpbin.example.com picks Gateway default/mygateway servers[0]",
        "VirtualService default/httpbin",
        "default/httpbin",
        "ALLOWED",
    ] {
        assert!(explained.contains(shown), "{shown}: {explained}");
    }
    let unrouted = explain("/nothing");
    assert!(unrouted.contains("404 (NR)"), "{unrouted}");

    // End-user authentication at the gateway: Istio's "JWT at the ingress gateway" shape, a
    // RequestAuthentication and a DENY of requests without a principal, both selecting the
    // gateway pod, are enforced there.
    let issuer = TokenIssuer::new();
    scene
        .cluster
        .write_config("jwt.yaml", &gateway_jwt_policies(&issuer.jwks()));
    let url = "https://httpbin.example.com/status/200";
    let no_token = ["--cacert", ca_file.as_str()];
    wait_until(CONVERGE, "the gateway to require a JWT", || {
        let (status, _, _) = scene.get(url, &no_token);
        (status == 403).then_some(())
    });
    let bearer = format!("authorization: Bearer {}", issuer.token());
    let (status, _, reply) = scene.get(url, &["--cacert", &ca_file, "-H", &bearer]);
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["headers"].get("authorization").is_none(),
        "the token went on: {reply}"
    );
    let forged = format!("authorization: Bearer {}", TokenIssuer::new().token());
    let output = scene.curl(url, &["--cacert", &ca_file, "-H", &forged]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("Jwt verification fails") && stdout.ends_with("401 2"),
        "{stdout}"
    );
    for code in ["401", "403"] {
        let refused = scene.gateway_metric(
            "istio_requests_total",
            &[
                ("source_workload", "istio-ingressgateway"),
                ("response_code", code),
            ],
        );
        assert!(refused >= 1.0, "no {code} counted at the gateway");
    }
}

/// Signs tokens with a P-256 key of its own, for a RequestAuthentication with inline keys.
struct TokenIssuer {
    key: KeyPair,
}

impl TokenIssuer {
    const ISSUER: &str = "testing@secure.istio.io";

    fn new() -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a P-256 key");
        Self { key }
    }

    fn jwks(&self) -> String {
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
        let point = self.key.public_key_raw();
        serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "gateway-test",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
        .to_string()
    }

    fn token(&self) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let claims = serde_json::json!({
            "iss": Self::ISSUER, "sub": "user-1", "exp": now + 600, "iat": now,
        });
        let header = jsonwebtoken::Header {
            kid: Some("gateway-test".into()),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256)
        };
        let key = jsonwebtoken::EncodingKey::from_ec_der(&self.key.serialize_der());
        jsonwebtoken::encode(&header, &claims, &key).expect("a signed token")
    }
}

/// A RequestAuthentication with `jwks` inline and a DENY of requests without a principal,
/// both selecting the gateway.
fn gateway_jwt_policies(jwks: &str) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt-example
  namespace: istio-system
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  jwtRules:
  - issuer: "{issuer}"
    jwks: '{jwks}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: frontend-ingress
  namespace: istio-system
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  action: DENY
  rules:
  - from:
    - source:
        notRequestPrincipals: ["*"]
"#,
        issuer = TokenIssuer::ISSUER
    )
}

/// A second server on 8443 that asks clients for a certificate (MUTUAL), and one whose
/// Secret does not exist.
const MUTUAL_AND_MISSING: &str = r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mutual
spec:
  selector:
    istio: ingressgateway
  servers:
  - port: {number: 8443, name: https-mutual, protocol: HTTPS}
    tls: {mode: MUTUAL, credentialName: httpbin-mutual}
    hosts: [httpbin.example.com]
  - port: {number: 9443, name: https-missing, protocol: HTTPS}
    tls: {mode: SIMPLE, credentialName: missing-credential}
    hosts: [missing.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin-mutual
spec:
  hosts: [httpbin.example.com, missing.example.com]
  gateways: [mutual]
  http:
  - route:
    - destination: {host: httpbin, port: {number: 8000}}
"#;

#[test]
fn gateway_certificates_rotate_without_dropping_connections_and_bad_servers_fail_alone() {
    if skip() {
        return;
    }
    let ca = TestCa::new();
    let scene = Scene::new("gateway_rotation", &ca);
    let ca_file = ca.write_pem(&scene.cluster, "gateway-ca.pem");
    let url = "https://httpbin.example.com/status/200";
    wait_until(CONVERGE, "the gateway to serve httpbin.example.com", || {
        let served = scene.curl(url, &["--cacert", ca_file.as_str()]);
        served.status.success().then_some(())
    });

    // MUTUAL: only a client with a certificate the Secret's ca.crt signed gets through.
    let client_ca = TestCa::new();
    let (client_certificate, client_key) = client_ca.issue("client.example.com");
    let work = scene.cluster.work_dir();
    let (certificate_file, key_file) = (work.join("client.pem"), work.join("client-key.pem"));
    std::fs::write(&certificate_file, client_certificate).expect("client certificate");
    std::fs::write(&key_file, client_key).expect("client key");
    scene.cluster.write_config(
        "mutual.yaml",
        &format!(
            "{}---\n{MUTUAL_AND_MISSING}",
            ca.secret_trusting("httpbin-mutual", "httpbin.example.com", Some(&client_ca))
        ),
    );
    let mutual_url = "https://httpbin.example.com:8443/headers";
    let with_certificate = [
        "--cacert",
        ca_file.as_str(),
        "--cert",
        certificate_file.to_str().expect("UTF-8"),
        "--key",
        key_file.to_str().expect("UTF-8"),
    ];
    wait_until(CONVERGE, "the MUTUAL server", || {
        scene
            .curl(mutual_url, &with_certificate)
            .status
            .success()
            .then_some(())
    });
    let (status, _, reply) = scene.get(mutual_url, &with_certificate);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["served_by"], "httpbin", "{reply}");
    let refused = scene.curl(mutual_url, &["--cacert", &ca_file]);
    assert!(
        !refused.status.success() || String::from_utf8_lossy(&refused.stdout).ends_with("000 0"),
        "a client without a certificate was served: {}",
        String::from_utf8_lossy(&refused.stdout)
    );

    // A server whose Secret is missing serves no handshake; the others carry on, and the
    // gateway says why.
    let missing = scene.curl("https://missing.example.com:9443/", &["--cacert", &ca_file]);
    assert!(
        !missing.status.success(),
        "a server without its Secret answered"
    );
    let listeners = scene.gateway_admin("/gateways");
    assert!(
        listeners.contains("NOT SERVED: Secret istio-system/missing-credential not found"),
        "{listeners}"
    );
    assert_eq!(scene.get(url, &["--cacert", &ca_file]).0, 200);

    // A Gateway the gateway cannot serve as written is refused alone, with its reason.
    scene.cluster.write_config(
        "passthrough.yaml",
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: passthrough}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 7443, name: tls, protocol: TLS}
    tls: {mode: AUTO_PASSTHROUGH}
    hosts: [db.example.com]
",
    );
    wait_until(CONVERGE, "the refusal", || {
        let config = scene.gateway_admin("/config_dump");
        (config.contains("Gateway default/passthrough") && config.contains("not supported"))
            .then_some(())
    });
    assert_eq!(scene.get(url, &["--cacert", &ca_file]).0, 200);

    // Rotation: a new certificate from another CA replaces the old one while a client keeps
    // one connection open, sending a request every 200 ms. Every request succeeds on that
    // one connection; new connections get the new certificate.
    let rotated = TestCa::new();
    let rotated_file = rotated.write_pem(&scene.cluster, "rotated-ca.pem");
    let urls = vec![url; 15];
    let mut args = vec!["--cacert", ca_file.as_str(), "--rate", "5/s"];
    args.extend(["-w", "\nRESULT %{http_code} %{num_connects}\n"]);
    let mut command = scene.client.command(&scene.cluster, "curl");
    command
        .args(["-sS", "--max-time", "20", "--resolve"])
        .arg(format!("httpbin.example.com:443:{}", scene.gateway.ip))
        .args(&args)
        .args(&urls)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let long_lived = command.spawn().expect("curl");
    std::thread::sleep(Duration::from_millis(800));
    scene.cluster.write_config(
        "secrets.yaml",
        &format!(
            "{}---\n{}",
            rotated.secret("httpbin-credential", "httpbin.example.com"),
            ca.secret("helloworld-credential", "helloworld.example.com")
        ),
    );
    wait_until(CONVERGE, "the rotated certificate", || {
        let served = scene.curl(url, &["--cacert", rotated_file.as_str()]);
        served.status.success().then_some(())
    });
    let old = scene.curl(url, &["--cacert", &ca_file]);
    assert!(!old.status.success(), "the old certificate is still served");
    let output = long_lived.wait_with_output().expect("curl");
    let lines = String::from_utf8_lossy(&output.stdout).into_owned();
    let results: Vec<&str> = lines
        .lines()
        .filter_map(|line| line.strip_prefix("RESULT "))
        .collect();
    assert_eq!(
        results.len(),
        15,
        "{lines}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(results.iter().all(|r| r.starts_with("200 ")), "{lines}");
    let connects: u32 = results
        .iter()
        .map(|r| {
            r.split(' ')
                .nth(1)
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(99)
        })
        .sum();
    assert_eq!(
        connects, 1,
        "the connection was not kept across the rotation: {lines}"
    );
    // The helloworld host kept its certificate.
    assert_eq!(
        scene
            .get(
                "https://helloworld.example.com/hello",
                &["--cacert", &ca_file]
            )
            .0,
        200
    );
}

/// The port my-nginx serves HTTPS on, with its own certificate.
const NGINX_PORT: u16 = 8443;

/// Istio's "Ingress Gateway without TLS Termination" (PASSTHROUGH on 443, beside the
/// terminated servers of [`SECURE_GATEWAYS`]) and "TCP traffic shifting" gateway tasks
/// (unchanged but for one tcp-echo version), and a TLS server the gateway terminates in
/// front of the same TCP service.
const PASSTHROUGH_AND_TCP: &str = r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway-passthrough
spec:
  selector:
    istio: ingressgateway # use istio default ingress gateway
  servers:
  - port:
      number: 443
      name: https
      protocol: HTTPS
    tls:
      mode: PASSTHROUGH
    hosts:
    - nginx.example.com
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: nginx
spec:
  hosts:
  - nginx.example.com
  gateways:
  - mygateway-passthrough
  tls:
  - match:
    - port: 443
      sniHosts:
      - nginx.example.com
    route:
    - destination:
        host: my-nginx
        port:
          number: 443
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: tcp-echo-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 31400
      name: tcp
      protocol: TCP
    hosts:
    - "*"
  - port:
      number: 31443
      name: tls-db
      protocol: TLS
    tls:
      mode: SIMPLE
      credentialName: db-credential
    hosts:
    - db.example.com
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: tcp-echo
spec:
  hosts:
  - "*"
  gateways:
  - tcp-echo-gateway
  tcp:
  - match:
    - port: 31400
    - port: 31443
    route:
    - destination:
        host: tcp-echo.default.svc.cluster.local
        port:
          number: 9000
"#;

/// The same at a Gateway API Gateway: a TLS listener passing through to my-nginx by
/// TLSRoute, and a TCP listener to tcp-echo by TCPRoute.
const TLS_AND_TCP_ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: edge
  namespace: istio-system
spec:
  gatewayClassName: nodemesh
  listeners:
  - name: tls
    hostname: "*.example.com"
    port: 9443
    protocol: TLS
    tls:
      mode: Passthrough
    allowedRoutes:
      namespaces:
        from: All
  - name: tcp
    port: 31500
    protocol: TCP
    allowedRoutes:
      namespaces:
        from: All
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata:
  name: nginx
  namespace: default
spec:
  parentRefs:
  - name: edge
    namespace: istio-system
    sectionName: tls
  hostnames:
  - nginx.example.com
  rules:
  - backendRefs:
    - name: my-nginx
      port: 443
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp-echo
  namespace: default
spec:
  parentRefs:
  - name: edge
    namespace: istio-system
    sectionName: tcp
  rules:
  - backendRefs:
    - name: tcp-echo
      port: 9000
"#;

/// An HTTPS server with the certificate and key files it is given, on [`NGINX_PORT`]:
/// `GET` answers 200 "served by my-nginx".
const TLS_SERVER_PY: &str = r#"
import http.server, ssl, sys
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"served by my-nginx\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("0.0.0.0", int(sys.argv[3])), Hello)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// Sends "hello" over TLS (trusting the CA file, with the SNI given) and prints the reply
/// line.
const TLS_LINE_CLIENT_PY: &str = r#"
import socket, ssl, sys
context = ssl.create_default_context(cafile=sys.argv[1])
with socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5) as raw:
    with context.wrap_socket(raw, server_hostname=sys.argv[4]) as tls:
        tls.sendall(b"hello\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = tls.recv(4096)
            if not chunk:
                break
            reply += chunk
        print(reply.decode().strip())
"#;

#[test]
fn a_gateway_passes_tls_through_by_sni_and_routes_tcp_into_the_mesh() {
    if skip() {
        return;
    }
    let ca = TestCa::new();
    let scene = Scene::new("gateway_passthrough", &ca);
    let gateway_ca = ca.write_pem(&scene.cluster, "gateway-ca.pem");
    // my-nginx's own certificate, from a CA the gateway never sees.
    let backend_ca = TestCa::new();
    let backend_ca_file = backend_ca.write_pem(&scene.cluster, "backend-ca.pem");
    let (certificate, key) = backend_ca.issue("nginx.example.com");
    let work = scene.cluster.work_dir();
    let (certificate_file, key_file) = (work.join("nginx.pem"), work.join("nginx-key.pem"));
    std::fs::write(&certificate_file, certificate).expect("nginx certificate");
    std::fs::write(&key_file, key).expect("nginx key");
    let nginx = scene
        .nginx
        .command(&scene.cluster, "python3")
        .args(["-c", TLS_SERVER_PY])
        .arg(&certificate_file)
        .arg(&key_file)
        .arg(NGINX_PORT.to_string())
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 for the HTTPS backend");
    let _nginx = Process { child: nginx };
    scene.cluster.write_config(
        "passthrough.yaml",
        &format!(
            "{}---\n{PASSTHROUGH_AND_TCP}---\n{TLS_AND_TCP_ROUTES}",
            ca.secret("db-credential", "db.example.com")
        ),
    );

    // PASSTHROUGH: the client's TLS reaches my-nginx untouched. curl checks my-nginx's own
    // certificate, which the gateway has no key for; the terminated servers of the same
    // port still serve theirs.
    let nginx_url = "https://nginx.example.com/";
    let trust_backend = ["--cacert", backend_ca_file.as_str()];
    wait_until(CONVERGE, "nginx.example.com through the gateway", || {
        scene
            .curl(nginx_url, &trust_backend)
            .status
            .success()
            .then_some(())
    });
    let output = scene.curl(nginx_url, &trust_backend);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("served by my-nginx") && stdout.ends_with("\n200 1"),
        "{stdout}"
    );
    let (status, _, reply) = scene.get(
        "https://httpbin.example.com/status/200",
        &["--cacert", &gateway_ca],
    );
    assert_eq!(
        (status, &reply["served_by"]),
        (200, &"httpbin".into()),
        "{reply}"
    );
    // A name no server of the port serves gets no handshake.
    assert!(
        !scene
            .curl("https://other.example.com/", &["-k"])
            .status
            .success()
    );

    // TCP: the line-echo server answers through the gateway.
    let gateway_tcp = format!("{}:31400", scene.gateway.ip);
    let reply = wait_until(CONVERGE, "tcp-echo through the gateway", || {
        let output = connect(&scene.cluster, &scene.client, &gateway_tcp, 1);
        output.status.success().then(|| replies(&output).remove(0))
    });
    assert_eq!(reply["server"], "tcp-echo", "{reply}");
    assert_eq!(reply["echo"], "hello", "{reply}");

    // The Gateway API's TLSRoute and TCPRoute do the same at a Gateway's listeners.
    let output = scene.curl("https://nginx.example.com:9443/", &trust_backend);
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("served by my-nginx"),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !scene
            .curl("https://www.example.com:9443/", &["-k"])
            .status
            .success(),
        "a name no TLSRoute takes was passed through"
    );
    let output = connect(
        &scene.cluster,
        &scene.client,
        &format!("{}:31500", scene.gateway.ip),
        1,
    );
    assert_eq!(replies(&output)[0]["server"], "tcp-echo");
    // TLS the gateway terminates with db-credential, routed as TCP.
    let tls_line = || {
        scene
            .client
            .command(&scene.cluster, "python3")
            .args(["-c", TLS_LINE_CLIENT_PY, &gateway_ca])
            .arg(scene.gateway.ip.to_string())
            .args(["31443", "db.example.com"])
            .stdin(Stdio::null())
            .output()
            .expect("python3 for the TLS client")
    };
    let output = tls_line();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let reply: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|_| panic!("{stdout}{}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(reply["server"], "tcp-echo", "{reply}");

    // Each reached its backend over HBONE as the gateway's identity, and the gateway counts
    // itself as the source.
    for workload in ["my-nginx", "tcp-echo"] {
        let opened = metric(
            &scene.cluster,
            0,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", GATEWAY_PRINCIPAL),
                ("destination_workload", workload),
                ("connection_security_policy", "mutual_tls"),
            ],
        );
        assert!(
            opened >= 1.0,
            "{workload}: no mTLS connection from the gateway"
        );
    }
    let from_gateway = scene.gateway_metric(
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("source_workload", "istio-ingressgateway"),
            ("destination_workload", "tcp-echo"),
        ],
    );
    assert!(from_gateway >= 2.0, "the gateway counted {from_gateway}");
    let listeners = debug_gateways(&scene);
    for shown in [
        "HTTPS (PASSTHROUGH)",
        "TCP",
        "TLS (SIMPLE)",
        "VirtualService default/nginx",
        "VirtualService default/tcp-echo",
    ] {
        assert!(listeners.contains(shown), "{shown}: {listeners}");
    }

    // The gateway's AuthorizationPolicies apply to connections too: a DENY of port 31400
    // refuses it and leaves 31443 open.
    scene.cluster.write_config(
        "deny-tcp.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-tcp, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules:
  - to: [{operation: {ports: ['31400']}}]
",
    );
    wait_until(CONVERGE, "the DENY at the gateway", || {
        let output = connect(&scene.cluster, &scene.client, &gateway_tcp, 1);
        (!output.status.success()).then_some(())
    });
    let output = tls_line();
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("tcp-echo"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A Gateway API Gateway shared by namespaces (in the gateway's own namespace, of its
/// class), and an HTTPRoute of `default` that attaches to both its listeners.
const GATEWAY_API: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: web
  namespace: istio-system
spec:
  gatewayClassName: nodemesh
  listeners:
  - name: http
    port: 8080
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: All
  - name: https
    hostname: api.example.com
    port: 443
    protocol: HTTPS
    tls:
      mode: Terminate
      certificateRefs:
      - kind: Secret
        name: api-credential
    allowedRoutes:
      namespaces:
        from: Selector
        selector:
          matchLabels:
            shared-gateway-access: "true"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: api
  namespace: default
spec:
  parentRefs:
  - name: web
    namespace: istio-system
  hostnames:
  - api.example.com
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: /status
    backendRefs:
    - name: httpbin
      port: 8000
  - matches:
    - path:
        type: Exact
        value: /hello
    backendRefs:
    - name: helloworld
      port: 5000
"#;

#[test]
fn an_httproute_attaches_to_the_gateway_api_listeners_its_namespace_is_allowed_on() {
    if skip() {
        return;
    }
    let ca = TestCa::new();
    let scene = Scene::new("gateway_api", &ca);
    let ca_file = ca.write_pem(&scene.cluster, "gateway-ca.pem");
    scene.cluster.write_config(
        "gateway-api.yaml",
        &format!(
            "{}---\n{GATEWAY_API}",
            ca.secret("api-credential", "api.example.com")
        ),
    );

    // Every namespace may attach to the plain listener: the route's rules route by path,
    // in the Gateway API's precedence, and an unmatched path gets 404.
    let plain = "http://api.example.com:8080";
    wait_until(CONVERGE, "the plain listener", || {
        let output = scene.curl(&format!("{plain}/status/200"), &[]);
        String::from_utf8_lossy(&output.stdout)
            .ends_with("\n200 1.1")
            .then_some(())
    });
    let (_, _, reply) = scene.get(&format!("{plain}/status/200"), &[]);
    assert_eq!(reply["served_by"], "httpbin", "{reply}");
    let (status, _, reply) = scene.get(&format!("{plain}/hello"), &[]);
    assert_eq!((status, &reply["served_by"]), (200, &"helloworld".into()));
    assert_eq!(scene.get(&format!("{plain}/hello/more"), &[]).0, 404);
    // Another host on the plain listener matches no hostname of the route.
    assert_eq!(scene.get("http://www.example.com:8080/hello", &[]).0, 404);

    // The HTTPS listener admits only namespaces labelled shared-gateway-access: `default`
    // is not, so the route is not attached there, and its requests get no route.
    let secure = "https://api.example.com/status/200";
    let trust = ["--cacert", ca_file.as_str()];
    assert_eq!(scene.get(secure, &trust).0, 404);
    let listeners = debug_gateways(&scene);
    assert!(
        listeners.contains("gateway.networking.k8s.io/Gateway istio-system/web listener https")
            && listeners.contains("HTTPRoute default/api (api.example.com)"),
        "{listeners}"
    );
    let mut labels = ENROLLED.to_vec();
    labels.push(("shared-gateway-access", "true"));
    scene.cluster.write_config(
        "ns.yaml",
        &format!(
            "{}---\n{}",
            namespace_yaml("default", &labels),
            namespace_yaml("istio-system", &[])
        ),
    );
    let reply = wait_until(CONVERGE, "the HTTPRoute on the HTTPS listener", || {
        let (status, version, reply) = scene.get(secure, &["--http2", "--cacert", &ca_file]);
        (status == 200).then_some((version, reply))
    });
    assert_eq!(reply.0, "2", "HTTP/2 over ALPN");
    assert_eq!(reply.1["served_by"], "httpbin", "{}", reply.1);
    // The Istio servers of the same port keep their own hosts and certificates.
    assert_eq!(
        scene
            .get("https://httpbin.example.com/status/200", &trust)
            .0,
        200
    );

    // A rollout: on SIGTERM the gateway reports unready at once, and still serves new
    // connections for its drain delay (5 s), then stops listening.
    scene.terminate_gateway();
    wait_until(
        Duration::from_secs(2),
        "the gateway to report unready",
        || (scene.gateway_readiness() == 503).then_some(()),
    );
    let (status, _, reply) = scene.get(secure, &trust);
    assert_eq!(
        (status, &reply["served_by"]),
        (200, &"httpbin".into()),
        "a new connection during the drain delay"
    );
    wait_until(CONVERGE, "the gateway to stop listening", || {
        (!scene.curl(secure, &trust).status.success()).then_some(())
    });
}
