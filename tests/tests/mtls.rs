//! End to end: workload identities and mutual TLS (HBONE) between node proxies.
use std::{
    fs,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_node::{
    identity::{
        CertificateAuthority, CertificateManager, Identity, ManagerConfig, WorkloadCert, tls,
    },
    proxy::hbone::{self, HboneError},
};
use mesh_tests::{
    Cluster, Pod, PodProcess, PodSpec, namespace_yaml,
    scenario::{
        CONVERGE_TIMEOUT, connect, metric, replies, skip, wait_enrolled, wait_for_metric,
        wait_until,
    },
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const ENROLLED: &[(&str, &str)] = &[("nodemesh.io/enabled", "true")];
const READY: Duration = Duration::from_secs(10);

/// Namespace `shop` (enrolled): `web` on node1 serving 8080, clients `sleep` and `curl`
/// (service accounts of the same names) on node0. Namespace `plain` (not enrolled):
/// `plain-web` on node1 and `plain-client` on node0. Agents not started.
struct Scene {
    cluster: Cluster,
    web: Pod,
    sleep: Pod,
    curl: Pod,
    plain_web: Pod,
    plain_client: Pod,
    _servers: Vec<PodProcess>,
}

fn serve(cluster: &Cluster, pod: &Pod) -> PodProcess {
    let listen = format!("{}:8080", pod.ip);
    let mut server = pod.spawn(
        cluster,
        &["serve", "--listen", &listen, "--name", &pod.name],
    );
    server.wait_for_output("ready", READY);
    server
}

fn scene(test: &str) -> Scene {
    let mut cluster = Cluster::new(test, 2);
    let web = cluster.add_pod(PodSpec::new("web", 1).namespace("shop").label("app", "web"));
    let sleep = cluster.add_pod(
        PodSpec::new("sleep", 0)
            .namespace("shop")
            .service_account("sleep"),
    );
    let curl = cluster.add_pod(
        PodSpec::new("curl", 0)
            .namespace("shop")
            .service_account("curl"),
    );
    let plain_web = cluster.add_pod(PodSpec::new("plain-web", 1).namespace("plain"));
    let plain_client = cluster.add_pod(PodSpec::new("plain-client", 0).namespace("plain"));
    cluster.write_config("ns-shop.yaml", &namespace_yaml("shop", ENROLLED));
    cluster.write_config("ns-plain.yaml", &namespace_yaml("plain", &[]));
    let servers = vec![serve(&cluster, &web), serve(&cluster, &plain_web)];
    Scene {
        cluster,
        web,
        sleep,
        curl,
        plain_web,
        plain_client,
        _servers: servers,
    }
}

impl Scene {
    fn start(&mut self) {
        self.cluster.start_agents();
        wait_enrolled(&self.cluster, 0, 2);
        wait_enrolled(&self.cluster, 1, 1);
    }

    fn web_addr(&self) -> String {
        format!("{}:8080", self.web.ip)
    }
}

/// `tcpdump` on every interface of the fabric netns (the bridge ports: `br0` itself sees
/// only what is addressed to it), writing a pcap file until stopped.
struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(cluster: &Cluster) -> Option<Self> {
        if Command::new("tcpdump").arg("--version").output().is_err() {
            eprintln!("skipping: tcpdump is not installed (cargo xtask setup installs it)");
            return None;
        }
        let file = cluster.work_dir().join("fabric.pcap");
        let log = cluster.logs_dir().join("tcpdump.log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                cluster.fabric_netns(),
                "tcpdump",
                "-i",
                "any",
                "-U",
                "--immediate-mode",
                "-n",
            ])
            .arg("-w")
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("tcpdump log"))
            .spawn()
            .expect("starting tcpdump");
        wait_until(READY, "tcpdump to listen", || {
            fs::read_to_string(&log)
                .ok()
                .filter(|l| l.contains("listening on"))
                .map(|_| ())
        });
        Some(Self { child, file })
    }

    /// Stops the capture once `last` (the last bytes sent that it must see) is in its
    /// file, or after [`READY`], and returns the captured bytes. tcpdump drops what its
    /// kernel ring still holds when it is stopped, so stopping right after the traffic
    /// sometimes lost the last packets.
    fn stop_after(mut self, last: &str) -> Vec<u8> {
        let deadline = std::time::Instant::now() + READY;
        while std::time::Instant::now() < deadline
            && !fs::read(&self.file).is_ok_and(|pcap| contains(&pcap, last))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        // SIGINT, so tcpdump flushes its file.
        // SAFETY: kill has no memory-safety preconditions; this is our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        fs::read(&self.file).expect("pcap file")
    }
}

/// Waits until node1's proxy has reported a mutual-TLS connection.
fn wait_for_mutual_tls(cluster: &Cluster) {
    let mtls = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
    ];
    wait_for_metric(cluster, 1, "istio_tcp_connections_opened_total", &mtls, 1.0);
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

fn send(cluster: &Cluster, client: &Pod, to: &str, message: &str) -> std::process::Output {
    client.run(
        cluster,
        &[
            "connect",
            "--to",
            to,
            "--message",
            message,
            "--timeout-ms",
            "5000",
        ],
        Duration::from_secs(20),
    )
}

#[test]
fn the_fabric_carries_no_plaintext_between_enrolled_pods() {
    if skip() {
        return;
    }
    let mut scene = scene("mtls_wire");
    scene.start();
    let Some(capture) = Capture::start(&scene.cluster) else {
        return;
    };
    let secret = "MARKER-ENROLLED-7f3a9c";
    let visible = "MARKER-PLAIN-51be02";
    let enrolled = send(&scene.cluster, &scene.sleep, &scene.web_addr(), secret);
    let plain_to = format!("{}:8080", scene.plain_web.ip);
    let plain = send(&scene.cluster, &scene.plain_client, &plain_to, visible);
    let pcap = capture.stop_after(visible);
    assert_eq!(
        replies(&enrolled)[0]["echo"],
        secret,
        "the enrolled pair talked"
    );
    assert_eq!(replies(&plain)[0]["echo"], visible, "the plain pair talked");
    assert!(
        contains(&pcap, visible),
        "the capture works: plaintext pods are visible"
    );
    assert!(
        !contains(&pcap, secret),
        "enrolled pods' bytes must not cross in the clear"
    );
    wait_for_mutual_tls(&scene.cluster);

    // An enrolled client calling a pod outside the mesh speaks plaintext, and says so.
    let outside = replies(&connect(&scene.cluster, &scene.sleep, &plain_to, 1));
    assert_eq!(outside[0]["server"], "plain-web");
    let plaintext = [
        ("reporter", "source"),
        ("destination_workload", "plain-web"),
        ("connection_security_policy", "none"),
    ];
    wait_for_metric(
        &scene.cluster,
        0,
        "istio_tcp_connections_opened_total",
        &plaintext,
        1.0,
    );
}

#[test]
fn the_server_knows_the_client_identity_and_allow_by_principal_applies() {
    if skip() {
        return;
    }
    let mut scene = scene("mtls_authz");
    scene.cluster.write_config(
        "policy.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-sleep, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {principals: [cluster.local/ns/shop/sa/sleep]}
",
    );
    scene.start();
    let reply = replies(&connect(&scene.cluster, &scene.sleep, &scene.web_addr(), 1));
    assert_eq!(reply[0]["server"], "web");
    let refused = connect(&scene.cluster, &scene.curl, &scene.web_addr(), 1);
    assert!(!refused.status.success(), "curl's principal is not allowed");

    let from_sleep = [
        ("reporter", "destination"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/shop/sa/sleep",
        ),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/shop/sa/default",
        ),
        ("connection_security_policy", "mutual_tls"),
    ];
    wait_for_metric(
        &scene.cluster,
        1,
        "istio_tcp_connections_opened_total",
        &from_sleep,
        1.0,
    );
    let denied = [("direction", "hbone"), ("reason", "authorization_denied")];
    wait_for_metric(
        &scene.cluster,
        1,
        "nodemesh_proxy_errors_total",
        &denied,
        1.0,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    let sleep_cert = [("identity", "spiffe://cluster.local/ns/shop/sa/sleep")];
    let expiry = "nodemesh_certificate_expiration_timestamp_seconds";
    wait_until(CONVERGE_TIMEOUT, "the certificate expiry gauge", || {
        (metric(&scene.cluster, 0, expiry, &sleep_cert) > now).then_some(())
    });

    // A DENY by the caller's (verified) namespace wins over the ALLOW by principal.
    let loads = metric(&scene.cluster, 1, "nodemesh_config_loads_total", &[]);
    scene.cluster.write_config(
        "deny.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-shop, namespace: nodemesh-system}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: [shop]}
",
    );
    wait_until(CONVERGE_TIMEOUT, "node1 to load the DENY policy", || {
        (metric(&scene.cluster, 1, "nodemesh_config_loads_total", &[]) > loads).then_some(())
    });
    let denied_now = connect(&scene.cluster, &scene.sleep, &scene.web_addr(), 1);
    assert!(
        !denied_now.status.success(),
        "DENY by namespace wins over ALLOW"
    );
}

#[test]
fn agents_of_another_root_or_trust_domain_are_refused() {
    if skip() {
        return;
    }
    let mut scene = scene("mtls_trust");
    let other_ca = scene.cluster.work_dir().join("other-ca");
    let other_ca = other_ca.to_str().expect("UTF-8 path");
    scene.cluster.start_agent(0, &[]);
    scene.cluster.start_agent(1, &["--ca-dir", other_ca]);
    // The client's node too: a connection made before its pod is enrolled leaves
    // uncaptured, in plaintext, and would pass for the mesh's doing.
    wait_enrolled(&scene.cluster, 0, 2);
    wait_enrolled(&scene.cluster, 1, 1);
    let untrusted = connect(&scene.cluster, &scene.sleep, &scene.web_addr(), 1);
    assert!(
        !untrusted.status.success(),
        "a peer of another root is refused"
    );
    let tls_errors = |cluster: &Cluster| {
        metric(
            cluster,
            0,
            "nodemesh_proxy_errors_total",
            &[("reason", "tls")],
        )
    };
    assert!(
        tls_errors(&scene.cluster) >= 1.0,
        "counted as a TLS failure"
    );

    // Same root, another trust domain: the identities do not match what node0 expects.
    scene.cluster.stop_agent(1);
    let same_ca = scene.cluster.work_dir().join("ca");
    let same_ca = same_ca.to_str().expect("UTF-8 path");
    scene
        .cluster
        .start_agent(1, &["--ca-dir", same_ca, "--trust-domain", "other.local"]);
    wait_enrolled(&scene.cluster, 1, 1);
    let before = tls_errors(&scene.cluster);
    let foreign = connect(&scene.cluster, &scene.sleep, &scene.web_addr(), 1);
    assert!(
        !foreign.status.success(),
        "a peer of another trust domain is refused"
    );
    assert!(tls_errors(&scene.cluster) > before);
}

#[test]
fn short_lived_certificates_renew_while_connections_keep_working() {
    if skip() {
        return;
    }
    let mut scene = scene("mtls_renew");
    for node in 0..2 {
        scene.cluster.start_agent(node, &["--cert-ttl", "3s"]);
    }
    wait_enrolled(&scene.cluster, 0, 2);
    wait_enrolled(&scene.cluster, 1, 1);
    // One connection held open across several renewals (10 lines over ~7 s).
    let web = scene.web_addr();
    let mut long = scene.sleep.spawn(
        &scene.cluster,
        &[
            "connect",
            "--to",
            &web,
            "--lines",
            "10",
            "--interval-ms",
            "700",
        ],
    );
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    // New connections after the first certificate expired.
    let fresh = replies(&connect(&scene.cluster, &scene.sleep, &web, 2));
    assert_eq!(fresh.len(), 2);
    let status = wait_until(
        Duration::from_secs(20),
        "the long connection to end",
        || long.try_wait(),
    );
    assert!(status.success(), "the long connection survived: {status}");
    assert_eq!(long.stdout().lines().count(), 10, "every line answered");
    assert!(
        started.elapsed() > Duration::from_secs(6),
        "it outlived a 3 s certificate"
    );
    let log = fs::read_to_string(scene.cluster.agent_log(0)).expect("agent log");
    let issued = log
        .lines()
        .filter(|l| l.contains("certificate issued") && l.contains("sa/sleep"))
        .count();
    assert!(issued >= 3, "renewed at half life: {issued} issuances");
}

/// An HBONE tunnel to `web`'s 15008 presenting `cert`, as another node proxy would open.
async fn tunnel_to(
    web: std::net::Ipv4Addr,
    cert: &WorkloadCert,
    bundle: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<h2::client::SendRequest<bytes::Bytes>, String> {
    let server = Identity::new("cluster.local", "shop", "default").expect("identity");
    let config = tls::client_config(cert, bundle, server).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(SocketAddr::from((web, 15008)))
        .await
        .map_err(|e| format!("TCP: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::IpAddress(web.into()), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    hbone::client_handshake(tls)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))
}

/// Runs `body` on a thread in node0's netns (outside the mesh, like another node's proxy)
/// with the cluster's CA and web's address.
fn with_cluster_ca<T, F>(
    scene: &Scene,
    body: impl FnOnce(CertificateAuthority, std::net::Ipv4Addr) -> F + Send,
) -> T
where
    T: Send,
    F: std::future::Future<Output = T>,
{
    let ca_dir = scene.cluster.work_dir().join("ca");
    let web_ip = scene.web.ip;
    scene.cluster.run_in_node(0, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let ca =
                    CertificateAuthority::load_or_create(&ca_dir, "cluster.local").expect("CA");
                body(ca, web_ip).await
            })
    })
}

#[test]
fn an_expired_client_certificate_is_refused() {
    if skip() {
        return;
    }
    let mut scene = scene("mtls_expired");
    scene.start();
    let outcome = with_cluster_ca(&scene, |ca, web_ip| async move {
        let me = Identity::new("cluster.local", "shop", "sleep").expect("identity");
        let key = rcgen::KeyPair::generate().expect("key");
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .expect("CSR");
        let csr = rustls::pki_types::CertificateSigningRequestDer::from(csr.der().to_vec());
        let issued = ca.sign(&csr, &me, Duration::from_secs(1)).expect("signed");
        let cert = WorkloadCert {
            identity: me,
            chain: issued.chain_der,
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            not_after: issued.not_after,
        };
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // TLS 1.3 reports a refused client certificate after the handshake: the
        // tunnel must fail at the latest when a stream is opened on it.
        match tunnel_to(web_ip, &cert, &ca.trust_bundle()).await {
            Err(error) => Err(error),
            Ok(sender) => hbone::connect(sender, SocketAddr::from((web_ip, 8080)))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    });
    assert!(
        outcome.is_err(),
        "an expired client certificate must be refused"
    );
    let tls_refused = [("direction", "hbone"), ("reason", "tls")];
    wait_for_metric(
        &scene.cluster,
        1,
        "nodemesh_proxy_errors_total",
        &tls_refused,
        1.0,
    );
}

#[test]
fn a_direct_hbone_connect_to_anything_but_the_pod_is_refused() {
    if skip() {
        return;
    }
    let mut scene = scene("mtls_relay");
    scene.start();
    let outcome = with_cluster_ca(&scene, |ca, web_ip| async move {
        let bundle = ca.trust_bundle();
        let manager = CertificateManager::new(Arc::new(ca), ManagerConfig::default());
        let me = Identity::new("cluster.local", "shop", "sleep").expect("identity");
        let cert = manager.fetch(&me).await.expect("certificate");
        let sender = tunnel_to(web_ip, &cert, &bundle)
            .await
            .expect("mTLS and HTTP/2 with the pod's identity");
        let elsewhere = SocketAddr::from(([10, 244, 1, 99], 8080));
        let refused = hbone::connect(sender.clone(), elsewhere).await.err();
        // The pod's own proxy ports: delivering there would land on the proxy again.
        let mut looped = Vec::new();
        for port in [15006, 15008, 15001] {
            let own = SocketAddr::from((web_ip, port));
            looped.push(hbone::connect(sender.clone(), own).await.err());
        }
        let mut stream = hbone::connect(sender, SocketAddr::from((web_ip, 8080)))
            .await
            .expect("CONNECT to the pod itself");
        stream.write_all(b"direct\n").await.expect("write");
        let mut reply = String::new();
        BufReader::new(&mut stream)
            .read_line(&mut reply)
            .await
            .expect("read");
        (refused, looped, reply)
    });
    let (refused, looped, reply) = outcome;
    let forbidden = |e: &Option<HboneError>| matches!(e, Some(HboneError::Refused(status)) if status.as_u16() == 403);
    assert!(forbidden(&refused), "no open relay: {refused:?}");
    assert!(
        looped.iter().all(forbidden),
        "CONNECT to the proxy's own ports is refused: {looped:?}"
    );
    assert!(
        reply.contains("\"echo\":\"direct\""),
        "the pod itself is reachable: {reply}"
    );
    let not_local = [("direction", "hbone"), ("reason", "not_local")];
    wait_for_metric(
        &scene.cluster,
        1,
        "nodemesh_proxy_errors_total",
        &not_local,
        1.0,
    );
    let own = [("direction", "hbone"), ("reason", "own_listener")];
    wait_for_metric(&scene.cluster, 1, "nodemesh_proxy_errors_total", &own, 3.0);
}

/// `mesh-node ca` in node0's netns, killed on drop.
struct CaProcess(Child);

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agents_get_their_certificates_from_the_ca_service() {
    if skip() {
        return;
    }
    let mut scene = scene("mtls_ca_service");
    let cluster = &mut scene.cluster;
    let work = cluster.work_dir().to_path_buf();
    let ca_dir = work.join("ca-service");
    let tokens = work.join("node-tokens");
    fs::write(&tokens, "node0 secret-of-node0\nnode1 secret-of-node1\n").expect("tokens");
    let log = cluster.logs_dir().join("ca.log");
    let ca_addr = format!("{}:15012", cluster.node_ip(0));
    let ca = CaProcess(
        Command::new("ip")
            .args(["netns", "exec", cluster.node_netns(0)])
            .arg(mesh_tests::bin_path("mesh-node"))
            .args(["ca", "--listen", &ca_addr, "--ca-dir"])
            .arg(&ca_dir)
            .arg("--config-dir")
            .arg(cluster.config_dir())
            .arg("--node-tokens")
            .arg(&tokens)
            .stdout(fs::File::create(&log).expect("CA log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("starting mesh-node ca"),
    );
    wait_until(READY, "the CA service to run", || {
        fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("mesh-node ca running"))
            .map(|_| ())
    });
    let root = ca_dir.join("root-cert.pem");
    let ca_url = format!("https://{ca_addr}");
    for node in 0..2 {
        let token_file = work.join(format!("token-node{node}"));
        fs::write(&token_file, format!("secret-of-node{node}\n")).expect("token");
        let (root, token_file) = (
            root.to_str().expect("UTF-8"),
            token_file.to_str().expect("UTF-8"),
        );
        cluster.start_agent(
            node,
            &[
                "--ca-addr",
                &ca_url,
                "--ca-root-file",
                root,
                "--ca-token-file",
                token_file,
            ],
        );
    }
    wait_enrolled(&scene.cluster, 0, 2);
    wait_enrolled(&scene.cluster, 1, 1);
    let reply = replies(&connect(&scene.cluster, &scene.sleep, &scene.web_addr(), 1));
    assert_eq!(reply[0]["server"], "web");
    wait_for_mutual_tls(&scene.cluster);
    let ca_log = fs::read_to_string(&log).expect("CA log");
    assert!(
        ca_log.contains("certificate issued") && ca_log.contains("node1"),
        "the CA signed for node1's pod"
    );
    drop(ca);
}

#[test]
fn tunnels_are_pooled_and_the_pool_limit_forces_new_handshakes() {
    if skip() {
        return;
    }
    let mut scene = scene("mtls_pool");
    scene.start();
    let opened = |cluster: &Cluster| metric(cluster, 0, "nodemesh_hbone_tunnels_opened_total", &[]);
    replies(&connect(&scene.cluster, &scene.sleep, &scene.web_addr(), 5));
    assert_eq!(
        opened(&scene.cluster),
        1.0,
        "5 connections share one tunnel"
    );
    wait_for_metric(&scene.cluster, 0, "nodemesh_hbone_pooled_tunnels", &[], 1.0);

    // The far end restarts: the pooled tunnel dies and is replaced on the next connection.
    scene.cluster.stop_agent(1);
    scene.cluster.start_agent(1, &[]);
    wait_enrolled(&scene.cluster, 1, 1);
    replies(&connect(&scene.cluster, &scene.sleep, &scene.web_addr(), 1));
    assert_eq!(opened(&scene.cluster), 2.0, "a dead tunnel is replaced");

    scene.cluster.stop_agent(0);
    scene
        .cluster
        .start_agent(0, &["--hbone-streams-per-tunnel", "1"]);
    wait_enrolled(&scene.cluster, 0, 2);
    replies(&connect(&scene.cluster, &scene.sleep, &scene.web_addr(), 3));
    assert_eq!(
        opened(&scene.cluster),
        3.0,
        "one fresh handshake per connection (a new agent)"
    );
}

#[test]
fn a_burst_of_new_connections_waits_for_one_tunnel_dial() {
    if skip() {
        return;
    }
    let mut scene = scene("mtls_burst");
    scene.start();
    // Dozens of connections opened within 5 ms, before the first handshake is done: without
    // single-flight dials each would dial (and pool) a tunnel of its own.
    let output = scene.sleep.run(
        &scene.cluster,
        &[
            "load",
            "--to",
            &scene.web_addr(),
            "--rate",
            "10000",
            "--duration-ms",
            "5",
        ],
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("a load summary: {stdout}"));
    assert!(summary["sent"].as_u64() > Some(10), "a burst: {summary}");
    assert_eq!(
        summary["ok"], summary["sent"],
        "every connection answered: {summary}"
    );
    assert_eq!(
        metric(
            &scene.cluster,
            0,
            "nodemesh_hbone_tunnels_opened_total",
            &[]
        ),
        1.0,
        "the burst shares one dial: {summary}"
    );
}

/// The identities node `i`'s agent holds certificates for.
fn held_identities(cluster: &Cluster, i: usize) -> Vec<String> {
    let (status, body) = cluster.http_get(i, 15000, "/certs");
    assert_eq!(status, 200, "{body}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).expect("JSON");
    rows.iter()
        .filter_map(|row| row["identity"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn departed_pods_leave_no_certificates_or_tunnels_behind() {
    if skip() {
        return;
    }
    let mut scene = scene("mtls_churn");
    let clients: Vec<Pod> = (1..=4)
        .map(|n| {
            let name = format!("client-{n}");
            scene.cluster.add_pod(
                PodSpec::new(&name, 0)
                    .namespace("shop")
                    .service_account(&name),
            )
        })
        .collect();
    scene.cluster.start_agents();
    wait_enrolled(&scene.cluster, 0, 6);
    for client in &clients {
        replies(&connect(&scene.cluster, client, &scene.web_addr(), 1));
    }
    let tunnels = "nodemesh_hbone_pooled_tunnels";
    wait_for_metric(&scene.cluster, 0, tunnels, &[], 4.0);
    let held = held_identities(&scene.cluster, 0);
    assert!(
        held.iter().filter(|id| id.contains("/sa/client-")).count() == 4,
        "one certificate per client identity: {held:?}"
    );

    for client in &clients {
        scene.cluster.remove_pod(&client.name);
    }
    wait_enrolled(&scene.cluster, 0, 2);
    wait_for_metric(&scene.cluster, 0, tunnels, &[], 0.0);
    wait_until(
        CONVERGE_TIMEOUT,
        "the departed identities' certificates to go",
        || {
            let held = held_identities(&scene.cluster, 0);
            (!held.iter().any(|id| id.contains("/sa/client-"))).then_some(())
        },
    );
    // The pods that stay keep working, over new tunnels as needed.
    replies(&connect(&scene.cluster, &scene.sleep, &scene.web_addr(), 1));
}

#[test]
fn silent_connections_to_the_hbone_port_are_closed_within_the_handshake_timeout() {
    if skip() {
        return;
    }
    let mut scene = scene("mtls_silent");
    scene.start();
    let hbone = SocketAddr::from((scene.web.ip, 15008));
    let pid = scene.cluster.agent_pid(1).expect("node1's agent");
    let fds = || {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd table")
            .count()
    };
    let before = fds();
    let still_open = scene.cluster.run_in_node(0, move || {
        use std::io::Read;
        // Connections that never say a word: no ClientHello, nothing.
        let silent: Vec<std::net::TcpStream> = (0..400)
            .map(|_| std::net::TcpStream::connect(hbone).expect("TCP to 15008"))
            .collect();
        std::thread::sleep(Duration::from_secs(12));
        silent
            .into_iter()
            .filter(|mut stream| {
                stream
                    .set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                // Closed by the proxy: end of stream or a reset. Open: the read times out.
                let read = stream.read(&mut [0; 1]);
                let open = |kind| {
                    matches!(
                        kind,
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                };
                matches!(read, Err(e) if open(e.kind()))
            })
            .count()
    });
    assert_eq!(
        still_open, 0,
        "silent connections the proxy still holds after 12 s"
    );
    let after = fds();
    assert!(
        after <= before + 8,
        "the agent's fds must come back: {before} before, {after} after"
    );
}
