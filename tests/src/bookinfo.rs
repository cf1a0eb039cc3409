//! Istio's bookinfo pods, as the L7 and observability tests use them: `productpage` calls
//! `reviews-<version>` pods, which run `mesh-testapp`'s HTTP server.
use std::time::Duration;

use crate::{Cluster, Pod, PodProcess, PodSpec, namespace_yaml, scenario::ENROLLED, service_yaml};

/// The port the backends' apps listen on (Services map their ports to it).
pub const APP_PORT: u16 = 8080;
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// `productpage` (label app=productpage, service account `bookinfo-productpage`) on `node`
/// in namespace `default`.
pub fn add_productpage(cluster: &mut Cluster, node: usize) -> Pod {
    cluster.add_pod(
        PodSpec::new("productpage", node)
            .label("app", "productpage")
            .service_account("bookinfo-productpage"),
    )
}

/// `reviews-<version>` (labels app=reviews, version, service account `bookinfo-reviews`)
/// on `node` in namespace `default`.
pub fn add_reviews(cluster: &mut Cluster, version: &str, node: usize) -> Pod {
    cluster.add_pod(
        PodSpec::new(&format!("reviews-{version}"), node)
            .label("app", "reviews")
            .label("version", version)
            .service_account("bookinfo-reviews"),
    )
}

/// Namespace `default` enrolled, and Service `reviews` at `cluster_ip` (port 9080, named
/// `http`, to [`APP_PORT`] of the pods labelled app=reviews).
pub fn write_reviews_service(cluster: &Cluster, cluster_ip: &str) {
    cluster.write_config("ns.yaml", &namespace_yaml("default", ENROLLED));
    cluster.write_config(
        "services.yaml",
        &service_yaml(
            "reviews",
            "default",
            cluster_ip,
            &[("http", 9080, APP_PORT)],
            &[("app", "reviews")],
        ),
    );
}

/// `mesh-testapp http-serve` on the pod's [`APP_PORT`], named after the pod; ready when
/// this returns, stopped (by PID) when dropped.
pub fn serve_http(cluster: &Cluster, pod: &Pod) -> PodProcess {
    serve(cluster, pod, "http-serve", APP_PORT, &pod.name)
}

/// `mesh-testapp serve` (the line-echo TCP server) on `port`, answering as `name`.
pub fn serve_tcp(cluster: &Cluster, pod: &Pod, port: u16, name: &str) -> PodProcess {
    serve(cluster, pod, "serve", port, name)
}

fn serve(cluster: &Cluster, pod: &Pod, mode: &str, port: u16, name: &str) -> PodProcess {
    let listen = format!("{}:{port}", pod.ip);
    let mut server = pod.spawn(cluster, &[mode, "--listen", &listen, "--name", name]);
    server.wait_for_output("ready", SERVER_READY_TIMEOUT);
    server
}

/// `mesh-testapp http --url <url> <args>` in `client`: the JSON lines it printed (one per
/// response, or one summary with `--summary`).
pub fn http(cluster: &Cluster, client: &Pod, url: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["http", "--url", url];
    all.extend_from_slice(args);
    let output = client.run(cluster, &all, Duration::from_secs(60));
    assert!(
        output.status.success(),
        "mesh-testapp {all:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}
