use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};

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
        request_authentications: Vec::new(),
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
        remote_ip: ip.parse::<IpAddr>().unwrap(),
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
        (
            "rules:\n- when:\n  - {key: request.headers, values: [x]}",
            "request.headers[x-user]",
        ),
        (
            "rules:\n- when:\n  - {key: \"request.headers[]\", values: [x]}",
            "must name its entry",
        ),
        (
            "rules:\n- when:\n  - {key: \"request.headers[bad name]\", values: [x]}",
            "\"bad name\" is not a valid HTTP header name",
        ),
        (
            "rules:\n- when:\n  - {key: request.auth.claims, values: [x]}",
            "request.auth.claims",
        ),
        (
            "rules:\n- when:\n  - {key: \"destination.labels[app]\", values: [web]}",
            "destination.labels[app]",
        ),
        (
            "rules:\n- when:\n  - {key: source.ip, notValues: [10.0.0.300]}",
            "when source.ip: \"10.0.0.300\"",
        ),
        (
            "rules:\n- when:\n  - {key: destination.port, values: [http]}",
            "when destination.port",
        ),
        (
            "rules:\n- to:\n  - operation: {paths: [\"/api/{*}/users\"]}",
            "path template",
        ),
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

#[test]
fn istio_when_keys_are_accepted() {
    for key in [
        "request.headers[User-Agent]",
        "request.auth.principal",
        "request.auth.claims[groups]",
        "request.auth.claims[nested][key]",
        "connection.sni",
        "experimental.envoy.filters.network.mysql_proxy[db.table]",
        "source.namespace",
    ] {
        let spec = AuthorizationPolicySpec {
            rules: vec![Rule {
                when: vec![Condition {
                    key: key.into(),
                    values: vec!["x".into()],
                    not_values: Vec::new(),
                }],
                ..Rule::default()
            }],
            ..AuthorizationPolicySpec::default()
        };
        assert_eq!(spec.validate(), Ok(()), "{key} is a key Istio accepts");
    }
}

// === AuthorizationPolicy at L7 ===

/// One HTTP request for the L7 tests, to `web` by its Service name unless told otherwise.
struct Request {
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: HeaderMap,
    auth: Option<jwt::RequestAuth>,
}

fn request(method: &'static str, path: &'static str) -> Request {
    Request {
        method,
        path,
        host: "web.shop.svc.cluster.local",
        headers: HeaderMap::new(),
        auth: None,
    }
}

impl Request {
    fn host(self, host: &'static str) -> Self {
        Self { host, ..self }
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.append(name, HeaderValue::from_static(value));
        self
    }

    /// As validated from a token of `principal` (`<iss>/<sub>`) with `claims`.
    fn token(self, principal: &str, claims: serde_json::Value) -> Self {
        let auth = jwt::RequestAuth {
            principal: principal.into(),
            audiences: vec!["shop".into(), "web".into()],
            presenter: Some("frontend".into()),
            claims,
        };
        Self {
            auth: Some(auth),
            ..self
        }
    }

    fn attributes(&self) -> RequestAttributes<'_> {
        RequestAttributes {
            method: self.method,
            path: self.path,
            host: self.host,
            headers: &self.headers,
            auth: self.auth.as_ref(),
        }
    }
}

fn allows(p: &Policies, connection: &ConnectionAttributes, request: Request) -> bool {
    let web = workload("shop", "web", &[("app", "web")]);
    p.authorize_request(&web, connection, &request.attributes())
        .is_allowed()
}

#[test]
fn allow_on_methods_and_paths_lets_get_public_in_and_keeps_post_admin_out() {
    let p = policies(
        &[],
        &[(
            "shop",
            "public-reads",
            "rules:\n- to:\n  - operation: {methods: [GET, HEAD], paths: [/public, \"/static/*\"]}",
        )],
    );
    let sleep = from(SLEEP, "10.1.0.1", 80);
    let web = workload("shop", "web", &[]);
    assert_eq!(
        p.authorize_request(&web, &sleep, &request("GET", "/public").attributes()),
        Verdict::Allow {
            policy: Some(ObjectKey::new("shop", "public-reads"))
        }
    );
    assert_eq!(
        p.authorize_request(&web, &sleep, &request("POST", "/admin").attributes()),
        Verdict::Deny {
            policy: None,
            reason: "no ALLOW policy matched"
        }
    );
    assert!(
        allows(&p, &sleep, request("HEAD", "/static/app.js")),
        "prefix"
    );
    assert!(!allows(&p, &sleep, request("POST", "/public")), "method");
    assert!(!allows(&p, &sleep, request("GET", "/admin")), "path");
    assert!(
        !allows(&p, &sleep, request("get", "/public")),
        "methods are case-sensitive"
    );
    assert!(
        !allows(&p, &sleep, request("GET", "/PUBLIC")),
        "paths are case-sensitive"
    );
    assert!(
        !allows(&p, &sleep, request("GET", "/public/")),
        "paths are exact"
    );
    assert!(
        allows(&p, &sleep, request("GET", "/static/../admin")),
        "the raw path is compared, not normalized: it starts with /static/"
    );
    assert!(
        !p.authorize(&web, &sleep).is_allowed(),
        "still fail closed for a bare connection"
    );
}

#[test]
fn deny_on_a_header() {
    let p = policies(
        &[],
        &[
            ("shop", "allow-all", "rules: [{}]"),
            (
                "shop",
                "deny-debug",
                "action: DENY\nrules:\n- when:\n  - {key: \"request.headers[X-Debug]\", values: [\"on\", \"yes*\"]}",
            ),
        ],
    );
    let sleep = from(SLEEP, "10.1.0.1", 80);
    let web = workload("shop", "web", &[]);
    assert_eq!(
        p.authorize_request(
            &web,
            &sleep,
            &request("GET", "/").header("x-debug", "on").attributes()
        ),
        Verdict::Deny {
            policy: Some(ObjectKey::new("shop", "deny-debug")),
            reason: "denied by a DENY policy"
        },
        "header names are case-insensitive"
    );
    assert!(
        !allows(
            &p,
            &sleep,
            request("GET", "/").header("X-DEBUG", "yes-please")
        ),
        "prefix"
    );
    assert!(allows(
        &p,
        &sleep,
        request("GET", "/").header("x-debug", "off")
    ));
    assert!(
        allows(&p, &sleep, request("GET", "/").header("x-debug", "ON")),
        "values are case-sensitive"
    );
    assert!(
        allows(&p, &sleep, request("GET", "/")),
        "a missing header matches no value"
    );
    assert!(
        !p.authorize(&web, &sleep).is_allowed(),
        "at L4 the DENY rule's L4 part (none) alone decides"
    );

    let deny_unknown_clients = policies(
        &[],
        &[(
            "shop",
            "deny-unknown",
            "action: DENY\nrules:\n- when:\n  - {key: \"request.headers[x-client]\", notValues: [trusted, \"*-ci\"]}",
        )],
    );
    let p = &deny_unknown_clients;
    assert!(
        !allows(p, &sleep, request("GET", "/")),
        "a missing header is not a trusted one"
    );
    assert!(allows(
        p,
        &sleep,
        request("GET", "/").header("x-client", "trusted")
    ));
    assert!(allows(
        p,
        &sleep,
        request("GET", "/").header("x-client", "nightly-ci")
    ));
    assert!(
        !allows(
            p,
            &sleep,
            request("GET", "/")
                .header("x-client", "trusted")
                .header("x-client", "evil")
        ),
        "repeated headers are matched joined, as Envoy does: \"trusted,evil\""
    );

    let deny_present = policies(
        &[],
        &[(
            "shop",
            "deny-present",
            "action: DENY\nrules:\n- when:\n  - {key: \"request.headers[x-internal]\", values: [\"*\"]}",
        )],
    );
    assert!(
        !allows(
            &deny_present,
            &sleep,
            request("GET", "/").header("x-internal", "")
        ),
        "* means present, even empty"
    );
    assert!(allows(&deny_present, &sleep, request("GET", "/")));
}

#[test]
fn hosts_match_case_insensitively_with_or_without_a_port() {
    let p = policies(
        &[],
        &[(
            "shop",
            "by-host",
            "rules:\n- to:\n  - operation:\n      hosts: [web.shop.svc.cluster.local, \"*.example.com\", \"api.example.org:8443\", \"[fd00::1]\"]\n      notHosts: [\"admin.example.com\"]",
        )],
    );
    let sleep = from(SLEEP, "10.1.0.1", 80);
    let host = |host: &'static str| allows(&p, &sleep, request("GET", "/").host(host));
    assert!(host("web.shop.svc.cluster.local"));
    assert!(host("Web.Shop.svc.cluster.local"), "case-insensitive");
    assert!(
        host("web.shop.svc.cluster.local:8080"),
        "pattern without a port"
    );
    assert!(host("a.EXAMPLE.com:80"), "suffix, with a port");
    assert!(!host("example.com"), "*.example.com needs a subdomain");
    assert!(!host("admin.example.com"), "notHosts");
    assert!(!host("admin.example.com:443"), "notHosts, with a port");
    assert!(host("api.example.org:8443"), "pattern with its port");
    assert!(!host("api.example.org"), "a pattern with a port needs it");
    assert!(!host("api.example.org:9443"), "another port");
    assert!(host("[fd00::1]:8080"), "IPv6 literal with a port");
    assert!(!host("other.local"));
}

#[test]
fn l4_parts_still_apply_at_l7() {
    let p = policies(
        &[],
        &[
            (
                "shop",
                "allow-sleep-gets",
                "rules:\n- from:\n  - source: {principals: [cluster.local/ns/sleep/sa/sleep]}\n  to:\n  - operation: {ports: [\"8080\"], methods: [GET]}\n  when:\n  - {key: source.ip, values: [10.1.0.0/16]}",
            ),
            (
                ROOT,
                "deny-other",
                "action: DENY\nrules:\n- from:\n  - source: {namespaces: [other]}",
            ),
        ],
    );
    let get = || request("GET", "/");
    assert!(allows(&p, &from(SLEEP, "10.1.0.1", 8080), get()));
    assert!(
        !allows(&p, &from(OTHER, "10.1.0.1", 8080), get()),
        "principal"
    );
    assert!(
        !allows(&p, &from(None, "10.1.0.1", 8080), get()),
        "plaintext"
    );
    assert!(!allows(&p, &from(SLEEP, "10.1.0.1", 80), get()), "port");
    assert!(
        !allows(&p, &from(SLEEP, "10.2.0.1", 8080), get()),
        "when source.ip"
    );
    let web = workload("shop", "web", &[]);
    assert_eq!(
        p.authorize_request(&web, &from(OTHER, "10.1.0.1", 8080), &get().attributes()),
        Verdict::Deny {
            policy: Some(ObjectKey::new(ROOT, "deny-other")),
            reason: "denied by a DENY policy"
        }
    );
    let none = policies(&[], &[]);
    assert!(allows(
        &none,
        &from(None, "10.9.9.9", 1),
        request("DELETE", "/")
    ));
}

#[test]
fn jwt_attributes_match_validated_tokens_only_and_the_sni_fails_closed() {
    let sleep = from(SLEEP, "10.1.0.1", 80);
    // A token the proxy did not validate is only a header: no principal.
    let unvalidated = || request("GET", "/").header("authorization", "Bearer x.y.z");
    let alice = || {
        request("GET", "/").token(
            "https://issuer.example/alice",
            serde_json::json!({"iss": "https://issuer.example", "groups": ["admins", "devs"],
                "tier": {"level": "gold"}}),
        )
    };
    let one = |spec: &str| policies(&[], &[("shop", "p", spec)]);

    let allow_jwt = one("rules:\n- from:\n  - source: {requestPrincipals: [\"*\"]}");
    assert!(!allows(&allow_jwt, &sleep, unvalidated()), "no principal");
    assert!(allows(&allow_jwt, &sleep, alice()));
    let allow_issuer =
        one("rules:\n- from:\n  - source: {requestPrincipals: [\"https://issuer.example/*\"]}");
    assert!(allows(&allow_issuer, &sleep, alice()));
    let allow_bob =
        one("rules:\n- from:\n  - source: {requestPrincipals: [\"https://issuer.example/bob\"]}");
    assert!(!allows(&allow_bob, &sleep, alice()));

    let allow_claim =
        one("rules:\n- when:\n  - {key: \"request.auth.claims[groups]\", values: [admins]}");
    assert!(!allows(&allow_claim, &sleep, unvalidated()));
    assert!(allows(&allow_claim, &sleep, alice()), "one of a list claim");
    let allow_nested =
        one("rules:\n- when:\n  - {key: \"request.auth.claims[tier][level]\", values: [gold]}");
    assert!(allows(&allow_nested, &sleep, alice()));
    let deny_devs = one(
        "action: DENY\nrules:\n- when:\n  - {key: \"request.auth.claims[groups]\", values: [devs]}",
    );
    assert!(!allows(&deny_devs, &sleep, alice()));
    assert!(allows(&deny_devs, &sleep, unvalidated()));
    let allow_audience = one("rules:\n- when:\n  - {key: request.auth.audiences, values: [web]}");
    assert!(allows(&allow_audience, &sleep, alice()));
    let allow_presenter =
        one("rules:\n- when:\n  - {key: request.auth.presenter, notValues: [frontend]}");
    assert!(!allows(&allow_presenter, &sleep, alice()));

    let deny_principal =
        one("action: DENY\nrules:\n- when:\n  - {key: request.auth.principal, values: [\"*\"]}");
    assert!(allows(&deny_principal, &sleep, unvalidated()));
    assert!(!allows(&deny_principal, &sleep, alice()));
    let deny_without_jwt =
        one("action: DENY\nrules:\n- from:\n  - source: {notRequestPrincipals: [\"*\"]}");
    assert!(
        !allows(&deny_without_jwt, &sleep, unvalidated()),
        "a request without a validated JWT is denied"
    );
    assert!(allows(&deny_without_jwt, &sleep, alice()));
    // At L4 nothing is known of tokens: an ALLOW needing one cannot allow a connection.
    assert!(
        !allow_jwt
            .authorize(&workload("shop", "web", &[]), &sleep)
            .is_allowed()
    );

    let allow_sni = one("rules:\n- when:\n  - {key: connection.sni, values: [web.example.com]}");
    assert!(
        !allows(&allow_sni, &sleep, unvalidated()),
        "unseen: no match in ALLOW"
    );
    let deny_sni =
        one("action: DENY\nrules:\n- when:\n  - {key: connection.sni, values: [web.example.com]}");
    assert!(
        !allows(&deny_sni, &sleep, unvalidated()),
        "unseen: a match in DENY"
    );
}

#[test]
fn needs_request_attributes_only_for_policies_that_read_requests() {
    let web = workload("shop", "web", &[("app", "web")]);
    let needs = |authz: &[(&str, &str, &str)]| policies(&[], authz).needs_request_attributes(&web);
    assert!(!needs(&[]));
    assert!(!needs(&[(
        "shop",
        "l4",
        "rules:\n- from:\n  - source: {namespaces: [sleep]}\n  to:\n  - operation: {ports: [\"80\"]}\n  when:\n  - {key: source.ip, values: [10.0.0.0/8]}"
    )]));
    assert!(needs(&[(
        "shop",
        "paths",
        "action: DENY\nrules:\n- to:\n  - operation: {notPaths: [/healthz]}"
    )]));
    assert!(
        needs(&[(
            ROOT,
            "header",
            "rules:\n- when:\n  - {key: \"request.headers[x-a]\", values: [b]}"
        )]),
        "mesh-wide"
    );
    assert!(needs(&[(
        "shop",
        "jwt",
        "rules:\n- from:\n  - source: {requestPrincipals: [\"*\"]}"
    )]));
    assert!(
        !needs(&[(
            "shop",
            "sni",
            "rules:\n- when:\n  - {key: connection.sni, values: [a]}"
        )]),
        "a request does not show the SNI either"
    );
    assert!(
        !needs(&[(
            "shop",
            "db-only",
            "selector: {matchLabels: {app: db}}\nrules:\n- to:\n  - operation: {methods: [GET]}"
        )]),
        "a policy for another workload"
    );
    assert!(
        !needs(&[(
            "blog",
            "elsewhere",
            "rules:\n- to:\n  - operation: {methods: [GET]}"
        )]),
        "a policy in another namespace"
    );
}

#[test]
fn remote_ip_blocks_match_the_trusted_client_and_ip_blocks_the_peer() {
    let policies = policies(
        &[],
        &[(
            "gateway",
            "deny-client",
            "action: DENY
rules:
- from:
  - source:
      remoteIpBlocks: [203.0.113.0/24]",
        )],
    );
    let gateway = workload("gateway", "gw", &[]);
    let mut behind_a_load_balancer = from(None, "10.0.0.9", 443);
    behind_a_load_balancer.remote_ip = "203.0.113.7".parse().unwrap();
    assert!(matches!(
        policies.authorize(&gateway, &behind_a_load_balancer),
        Verdict::Deny { .. }
    ));
    // The load balancer's own address is not the client the policy names.
    let direct = from(None, "10.0.0.9", 443);
    assert!(matches!(
        policies.authorize(&gateway, &direct),
        Verdict::Allow { .. }
    ));
}
