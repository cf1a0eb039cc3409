use super::*;

fn spec(yaml: &str) -> ServiceEntrySpec {
    serde_yaml::from_str(yaml).expect("a ServiceEntry spec")
}

fn refused(yaml: &str) -> String {
    spec(yaml).validate().expect_err(yaml).to_string()
}

const PORTS: &str = "ports: [{number: 443, name: https, protocol: TLS}]";

#[test]
fn bad_entries_are_refused_with_their_reason() {
    assert!(refused(&format!("hosts: []\n{PORTS}")).contains("at least one host"));
    assert!(refused(&format!("hosts: ['a/b']\n{PORTS}")).contains("not a host name"));
    assert!(
        refused(&format!(
            "hosts: ['*.example.com']\nresolution: DNS\n{PORTS}"
        ))
        .contains("resolution NONE")
    );
    assert!(
        refused(&format!(
            "hosts: [a.example]\naddresses: [300.1.1.1]\n{PORTS}"
        ))
        .contains("not an IP address")
    );
    assert!(
        refused(&format!(
            "hosts: [a.example]\naddresses: [10.0.0.0/8]\n{PORTS}"
        ))
        .contains("range")
    );
    assert!(refused("hosts: [a.example]").contains("at least one port"));
    assert!(refused("hosts: [a.example]\nports: [{number: 70000, name: x}]").contains("70000"));
    assert!(
        refused("hosts: [a.example]\nports: [{number: 1, name: x}, {number: 2, name: x}]")
            .contains("used twice")
    );
    assert!(
        refused(&format!("hosts: [a.example]\nresolution: STATIC\n{PORTS}"))
            .contains("needs endpoints")
    );
    assert!(
        refused(&format!(
            "hosts: [a.example]\nresolution: STATIC\nendpoints: [{{address: a.example}}]\n{PORTS}"
        ))
        .contains("not an IP address")
    );
    assert!(
        refused(&format!(
            "hosts: [a.example]\nendpoints: [{{address: 10.0.0.1}}]\n{PORTS}"
        ))
        .contains("resolution NONE takes no endpoints")
    );
    assert!(
        refused(&format!(
            "hosts: [a.example]\nworkloadSelector: {{labels: {{app: vm}}}}\n{PORTS}"
        ))
        .contains("workloadSelector")
    );
    assert!(
        serde_yaml::from_str::<ServiceEntrySpec>("hosts: [a]\nsurprise: 1")
            .unwrap_err()
            .to_string()
            .contains("unknown field")
    );
}

#[test]
fn an_entry_becomes_one_service_per_host_named_by_its_host() {
    let entry = spec(
        "hosts: [api.example.com, api2.example.com]
addresses: [240.0.0.1, '240.0.0.2/32']
ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
location: MESH_EXTERNAL
resolution: STATIC
endpoints: [{address: 192.0.2.1, ports: {http: 9090}}, {address: 192.0.2.2}]
exportTo: ['.', billing]",
    );
    entry.validate().expect("valid");
    let services = entry.services("shop");
    assert_eq!(services.len(), 2);
    let api = &services[0];
    assert_eq!(api.key, ObjectKey::new("shop", "api.example.com"));
    assert_eq!(api.hostname(), "api.example.com");
    assert_eq!(
        api.cluster_ips,
        [
            "240.0.0.1".parse::<IpAddr>().unwrap(),
            "240.0.0.2".parse().unwrap()
        ]
    );
    assert_eq!(api.ports[0].target_port, TargetPort::Number(8080));
    assert_eq!(api.ports[0].app_protocol.as_deref(), Some("http"));
    let external = api.external.as_ref().expect("external");
    assert_eq!(external.endpoints[0].ports.get("http"), Some(&9090));
    assert!(api.visible_to("shop") && api.visible_to("billing"));
    assert!(!api.visible_to("other"), "exportTo limits who sees it");
    let everywhere = spec(&format!("hosts: [a.example]\n{PORTS}")).services("shop");
    assert!(everywhere[0].visible_to("anyone"));
}

/// Every resource the README and docs/ show, of a kind the mesh reads, is accepted as it
/// is written: the YAML users copy works.
#[test]
fn the_resources_the_docs_show_are_accepted() {
    use serde::Deserialize as _;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut pages = vec![format!("{root}/README.md")];
    for entry in std::fs::read_dir(format!("{root}/docs")).expect("docs/") {
        let path = entry.expect("a docs entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path.display().to_string());
        }
    }
    let mut checked = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).expect("a page");
        for block in text.split("```yaml\n").skip(1) {
            let block = block.split("\n```").next().unwrap_or_default();
            for document in serde_yaml::Deserializer::from_str(block) {
                let Ok(value) = serde_yaml::Value::deserialize(document) else {
                    continue; // placeholders: not a resource to copy as it is
                };
                match crate::config::object_from_yaml(value) {
                    Ok(object) => checked.push(object.id().to_string()),
                    Err(error) if error.ends_with("is not a kind the mesh reads") => {}
                    Err(error) => panic!("{page}: a resource it shows is refused: {error}"),
                }
            }
        }
    }
    for expected in [
        "ServiceEntry default/edition-cnn-com",
        "DestinationRule default/edition-cnn-com",
        "RequestAuthentication foo/jwt-example",
        "AuthorizationPolicy foo/require-jwt",
    ] {
        assert!(
            checked.iter().any(|id| id == expected),
            "{expected} not among {checked:?}"
        );
    }
}
