use std::net::IpAddr;

use super::*;

const ROOT: &str = DEFAULT_ROOT_NAMESPACE;

fn workload(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Workload {
    Workload::for_test("node0", namespace, name, labels)
}

fn policies(peer: &[(&str, &str, &str)], authz: &[(&str, &str, &str)]) -> Policies {
    Policies {
        root_namespace: ROOT.into(),
        peer_authentications: peer
            .iter()
            .map(|(ns, name, spec)| Policy {
                key: ObjectKey::new(*ns, *name),
                spec: serde_yaml::from_str(spec).unwrap(),
            })
            .collect(),
        authorization_policies: authz
            .iter()
            .map(|(ns, name, spec)| {
                let spec: AuthorizationPolicySpec = serde_yaml::from_str(spec).unwrap();
                spec.validate().unwrap();
                Policy {
                    key: ObjectKey::new(*ns, *name),
                    spec,
                }
            })
            .collect(),
    }
}

fn from(principal: Option<&'static str>, ip: &str, port: u16) -> ConnectionAttributes<'static> {
    ConnectionAttributes {
        source_ip: ip.parse::<IpAddr>().unwrap(),
        source_principal: principal,
        source_namespace: principal.and_then(|p| p.split('/').nth(2)),
        destination_ip: "10.0.0.1".parse().unwrap(),
        destination_port: port,
    }
}

const SLEEP: Option<&str> = Some("cluster.local/ns/sleep/sa/sleep");
const OTHER: Option<&str> = Some("cluster.local/ns/other/sa/curl");

// === PeerAuthentication ===

#[test]
fn permissive_by_default_and_the_most_specific_policy_wins() {
    let web = workload("shop", "web", &[("app", "web")]);
    let db = workload("shop", "db", &[("app", "db")]);
    let none = policies(&[], &[]);
    assert_eq!(none.mtls_mode(&web, 80), MtlsMode::Permissive);

    let p = policies(
        &[
            (ROOT, "mesh", "mtls: {mode: STRICT}"),
            ("shop", "ns", "mtls: {mode: PERMISSIVE}"),
            (
                "shop",
                "web",
                "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}\nportLevelMtls: {8080: {mode: DISABLE}}",
            ),
        ],
        &[],
    );
    assert_eq!(p.mtls_mode(&web, 80), MtlsMode::Strict, "workload policy");
    assert_eq!(p.mtls_mode(&web, 8080), MtlsMode::Disable, "port level");
    assert_eq!(
        p.mtls_mode(&db, 80),
        MtlsMode::Permissive,
        "namespace policy"
    );
    let elsewhere = workload("blog", "x", &[]);
    assert_eq!(
        p.mtls_mode(&elsewhere, 80),
        MtlsMode::Strict,
        "mesh-wide policy"
    );
}

#[test]
fn unset_inherits_from_the_parent() {
    let web = workload("shop", "web", &[("app", "web")]);
    let p = policies(
        &[
            (ROOT, "mesh", "mtls: {mode: STRICT}"),
            (
                "shop",
                "web",
                "selector: {matchLabels: {app: web}}\nmtls: {mode: UNSET}",
            ),
        ],
        &[],
    );
    assert_eq!(p.mtls_mode(&web, 80), MtlsMode::Strict);
}

// === AuthorizationPolicy ===

#[test]
fn no_policy_allows_and_an_allow_policy_that_matches_nothing_denies() {
    let web = workload("shop", "web", &[("app", "web")]);
    assert!(
        policies(&[], &[])
            .authorize(&web, &from(SLEEP, "10.1.0.1", 80))
            .is_allowed()
    );
    let deny_all = policies(&[], &[("shop", "allow-nothing", "action: ALLOW")]);
    assert_eq!(
        deny_all.authorize(&web, &from(SLEEP, "10.1.0.1", 80)),
        Verdict::Deny {
            policy: None,
            reason: "no ALLOW policy matched"
        }
    );
}

#[test]
fn allow_by_principal_lets_one_client_in_and_keeps_another_out() {
    let web = workload("shop", "web", &[("app", "web")]);
    let p = policies(
        &[],
        &[(
            "shop",
            "allow-sleep",
            "selector: {matchLabels: {app: web}}\nrules:\n- from:\n  - source: {principals: [cluster.local/ns/sleep/sa/sleep]}",
        )],
    );
    assert!(p.authorize(&web, &from(SLEEP, "10.1.0.1", 80)).is_allowed());
    assert!(!p.authorize(&web, &from(OTHER, "10.1.0.2", 80)).is_allowed());
    assert!(
        !p.authorize(&web, &from(None, "10.1.0.3", 80)).is_allowed(),
        "plaintext has no principal"
    );
    let unrelated = workload("shop", "db", &[("app", "db")]);
    assert!(
        p.authorize(&unrelated, &from(OTHER, "10.1.0.2", 80))
            .is_allowed(),
        "selector scopes it"
    );
}

#[test]
fn deny_by_namespace_wins_over_allow() {
    let web = workload("shop", "web", &[]);
    let p = policies(
        &[],
        &[
            ("shop", "allow-all", "rules: [{}]"),
            (
                ROOT,
                "deny-other",
                "action: DENY\nrules:\n- from:\n  - source: {namespaces: [other]}",
            ),
        ],
    );
    assert!(p.authorize(&web, &from(SLEEP, "10.1.0.1", 80)).is_allowed());
    assert_eq!(
        p.authorize(&web, &from(OTHER, "10.1.0.2", 80)),
        Verdict::Deny {
            policy: Some(ObjectKey::new(ROOT, "deny-other")),
            reason: "denied by a DENY policy"
        }
    );
}

#[test]
fn ip_blocks_ports_wildcards_and_conditions() {
    let web = workload("shop", "web", &[]);
    let p = policies(
        &[],
        &[(
            "shop",
            "allow",
            "rules:\n- from:\n  - source: {ipBlocks: [10.1.0.0/16], notIpBlocks: [10.1.9.9]}\n  to:\n  - operation: {ports: [\"8080\"]}\n- from:\n  - source: {principals: [\"*/sa/sleep\"]}\n  when:\n  - {key: destination.port, values: [\"9090\"]}",
        )],
    );
    assert!(
        p.authorize(&web, &from(None, "10.1.2.3", 8080))
            .is_allowed(),
        "block and port"
    );
    assert!(
        !p.authorize(&web, &from(None, "10.1.9.9", 8080))
            .is_allowed(),
        "notIpBlocks"
    );
    assert!(
        !p.authorize(&web, &from(None, "10.2.0.1", 8080))
            .is_allowed(),
        "outside the block"
    );
    assert!(
        !p.authorize(&web, &from(None, "10.1.2.3", 80)).is_allowed(),
        "other port"
    );
    assert!(
        p.authorize(&web, &from(SLEEP, "10.9.9.9", 9090))
            .is_allowed(),
        "suffix wildcard + when"
    );
    assert!(
        !p.authorize(&web, &from(SLEEP, "10.9.9.9", 9091))
            .is_allowed(),
        "when fails"
    );
}

#[test]
fn request_attributes_fail_closed_at_l4() {
    let web = workload("shop", "web", &[]);
    let allow_get = policies(
        &[],
        &[(
            "shop",
            "allow-get",
            "rules:\n- to:\n  - operation: {methods: [GET]}",
        )],
    );
    assert!(
        !allow_get
            .authorize(&web, &from(SLEEP, "10.1.0.1", 80))
            .is_allowed(),
        "an ALLOW rule on methods cannot allow a bare connection"
    );
    let deny_post = policies(
        &[],
        &[(
            "shop",
            "deny-post",
            "action: DENY\nrules:\n- from:\n  - source: {namespaces: [other]}\n  to:\n  - operation: {methods: [POST]}",
        )],
    );
    assert!(
        !deny_post
            .authorize(&web, &from(OTHER, "10.1.0.1", 80))
            .is_allowed(),
        "L4 part decides"
    );
    assert!(
        deny_post
            .authorize(&web, &from(SLEEP, "10.1.0.1", 80))
            .is_allowed()
    );
}

#[test]
fn invalid_policies_are_refused_with_the_reason() {
    let invalid = [
        ("action: CUSTOM", "CUSTOM"),
        (
            "rules:\n- from:\n  - source: {ipBlocks: [10.0.0.0/33]}",
            "10.0.0.0/33",
        ),
        ("rules:\n- to:\n  - operation: {ports: [http]}", "\"http\""),
        (
            "rules:\n- when:\n  - {key: source.colour, values: [red]}",
            "source.colour",
        ),
        ("targetRefs: [{kind: Service, name: web}]", "targetRef"),
    ];
    for (spec, expected) in invalid {
        let spec: AuthorizationPolicySpec = serde_yaml::from_str(spec).unwrap();
        let error = spec.validate().unwrap_err().to_string();
        assert!(
            error.contains(expected),
            "{error:?} should mention {expected:?}"
        );
    }
}
