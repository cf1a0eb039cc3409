use super::*;
use crate::state::ObjectKey;

const NAMESPACE: &str = "
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    nodemesh.io/enabled: \"true\"
";

fn pod(name: &str, ip: &str) -> String {
    format!(
        "
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: shop
  labels: {{app: web}}
spec:
  nodeName: node0
  containers: [{{name: app, image: web}}]
status:
  phase: Running
  podIP: {ip}
"
    )
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

fn load(source: &mut FileSource) -> (State, Vec<Rejection>) {
    let Load {
        objects,
        rejections,
    } = source.load().unwrap();
    (
        translate(
            &objects,
            rejections.clone(),
            crate::policy::DEFAULT_ROOT_NAMESPACE,
        ),
        rejections,
    )
}

#[test]
fn multi_document_files_and_lists_load() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ns.yaml", NAMESPACE);
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}\n",
        serde_json::to_string(
            &serde_yaml::from_str::<serde_json::Value>(&pod("b", "10.0.0.2")).unwrap()
        )
        .unwrap()
    );
    write(
        dir.path(),
        "pods.yaml",
        &format!("{}---\n{}", pod("a", "10.0.0.1"), list),
    );
    let (state, rejections) = load(&mut FileSource::new(dir.path(), "nodemesh-system"));
    assert!(
        rejections.is_empty(),
        "unexpected rejections: {rejections:?}"
    );
    assert_eq!(state.workloads.len(), 2, "both pods, one from a List");
    assert!(
        state.workloads.values().all(|w| w.enrolled),
        "namespace label enrolls"
    );
}

#[test]
fn a_bad_resource_is_rejected_alone_and_its_last_good_version_stays() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ns.yaml", NAMESPACE);
    write(
        dir.path(),
        "pods.yaml",
        &format!("{}---\n{}", pod("a", "10.0.0.1"), pod("b", "10.0.0.2")),
    );
    let mut source = FileSource::new(dir.path(), "nodemesh-system");
    let (state, _) = load(&mut source);
    assert_eq!(state.workloads.len(), 2);

    // Pod b gets an invalid IP; pod a changes its IP. a's change applies, b keeps 10.0.0.2.
    write(
        dir.path(),
        "pods.yaml",
        &format!("{}---\n{}", pod("a", "10.0.0.9"), pod("b", "not-an-ip")),
    );
    let (state, rejections) = load(&mut source);
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    let rejection = &rejections[0];
    assert!(
        rejection.origin.ends_with("pods.yaml"),
        "names the file: {rejection:?}"
    );
    assert_eq!(rejection.resource, "Pod shop/b", "names the resource");
    assert!(
        rejection.error.contains("not-an-ip"),
        "says why: {rejection:?}"
    );
    let ip = |name: &str| state.workloads[&ObjectKey::new("shop", name)].ips[0].to_string();
    assert_eq!(ip("a"), "10.0.0.9", "the good change applies");
    assert_eq!(
        ip("b"),
        "10.0.0.2",
        "the last good version of the bad one stays"
    );
}

#[test]
fn a_file_that_is_not_yaml_keeps_what_it_last_gave() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ns.yaml", NAMESPACE);
    write(dir.path(), "pods.yaml", &pod("a", "10.0.0.1"));
    let mut source = FileSource::new(dir.path(), "nodemesh-system");
    load(&mut source);
    write(
        dir.path(),
        "pods.yaml",
        "kind: Pod\n  metadata: [unclosed\n",
    );
    write(dir.path(), "more.yaml", &pod("c", "10.0.0.3"));
    let (state, rejections) = load(&mut source);
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(rejections[0].resource, "(whole file)");
    assert!(
        state.workloads.contains_key(&ObjectKey::new("shop", "a")),
        "kept"
    );
    assert!(
        state.workloads.contains_key(&ObjectKey::new("shop", "c")),
        "other files apply"
    );
}

#[test]
fn duplicates_and_missing_fields_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &pod("a", "10.0.0.1"));
    write(dir.path(), "b.yaml", &pod("a", "10.0.0.2"));
    // A field of the wrong type makes the whole object unusable.
    write(
        dir.path(),
        "c.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: shop}\nspec: {nodeName: [n]}\n",
    );
    let (state, rejections) = load(&mut FileSource::new(dir.path(), "nodemesh-system"));
    let resources: Vec<&str> = rejections.iter().map(|r| r.resource.as_str()).collect();
    assert_eq!(resources, ["Pod shop/a", "Pod shop/c"], "{rejections:?}");
    assert!(
        rejections[0].error.contains("a.yaml"),
        "points at the first definition"
    );
    assert_eq!(
        state.workloads[&ObjectKey::new("shop", "a")].ips[0].to_string(),
        "10.0.0.1",
        "first definition wins"
    );
}

#[test]
fn unknown_kinds_are_ignored_not_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n",
    );
    let (_, rejections) = load(&mut FileSource::new(dir.path(), "nodemesh-system"));
    assert!(rejections.is_empty(), "{rejections:?}");
}

#[test]
fn the_shipped_examples_load_without_rejections() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let (state, rejections) = load(&mut FileSource::new(&dir, "nodemesh-system"));
    assert!(rejections.is_empty(), "{rejections:?}");
    let reviews = &state.services[&ObjectKey::new("shop", "reviews")];
    assert_eq!(reviews.endpoints.len(), 2, "both replicas back the Service");
    let enrolled: Vec<&str> = state
        .workloads
        .values()
        .filter(|w| w.enrolled)
        .map(|w| w.key.name.as_str())
        .collect();
    assert_eq!(enrolled, ["productpage", "reviews-v1", "reviews-v2"]);
}

#[test]
fn istio_security_policies_load_and_a_bad_one_is_rejected_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "security.yaml",
        "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: nodemesh-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {principals: [cluster.local/ns/sleep/sa/sleep]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-block, namespace: shop}
spec:
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.0/40]}
",
    );
    let (state, rejections) = load(&mut FileSource::new(dir.path(), "nodemesh-system"));
    assert_eq!(state.policies.peer_authentications.len(), 1);
    let names: Vec<&str> = state
        .policies
        .authorization_policies
        .iter()
        .map(|p| p.key.name.as_str())
        .collect();
    assert_eq!(names, ["allow-sleep"], "the bad policy is left out");
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(rejections[0].resource, "AuthorizationPolicy shop/bad-block");
    assert!(
        rejections[0].error.contains("10.0.0.0/40"),
        "{rejections:?}"
    );
}
