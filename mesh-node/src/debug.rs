//! `mesh-node debug`: the admin API as tables, like `istioctl ztunnel-config`.
use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use comfy_table::{Table, presets::NOTHING};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::{
    cli::{DebugArgs, DebugWhat, ExplainArgs, OutputFormat},
    explain::{ExplainRequest, Explanation},
};

/// Fetches what was asked and prints it.
pub async fn run(args: DebugArgs) -> anyhow::Result<()> {
    let path = match &args.what {
        DebugWhat::Workloads => "/workloads".to_string(),
        DebugWhat::Services => "/services".to_string(),
        DebugWhat::Policies => "/policies".to_string(),
        DebugWhat::Routes => "/routes".to_string(),
        DebugWhat::Certs => "/certs".to_string(),
        DebugWhat::Connections => "/connections".to_string(),
        DebugWhat::Gateways => "/gateways".to_string(),
        DebugWhat::Explain(explain) => format!("/explain?{}", request(explain).to_query()),
        DebugWhat::Config => "/config_dump".to_string(),
        DebugWhat::Log { level } => format!("/logging?level={level}"),
    };
    // Changing the log level is the one call that changes the agent: POST, as the API wants.
    let method = if matches!(args.what, DebugWhat::Log { .. }) {
        hyper::Method::POST
    } else {
        hyper::Method::GET
    };
    let body = call(args.admin_addr, method, &path).await?;
    if args.output == OutputFormat::Json || matches!(args.what, DebugWhat::Config) {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    println!("{}", render(&args.what, &body));
    Ok(())
}

fn request(args: &ExplainArgs) -> ExplainRequest {
    ExplainRequest {
        source: args.source.clone(),
        destination: args.destination.clone(),
        port: args.port,
        path: args.path.clone(),
        method: args.method.clone(),
        headers: args.headers.clone(),
    }
}

async fn call(addr: SocketAddr, method: hyper::Method, path: &str) -> anyhow::Result<Value> {
    let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| {
        format!("connecting to the agent's admin API at {addr} (is mesh-node running here? see --admin-addr)")
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let value: Value = serde_json::from_slice(&body).context("the admin API answered non-JSON")?;
    if !status.is_success() {
        bail!(
            "{path}: {status}: {}",
            value["error"].as_str().unwrap_or("?")
        );
    }
    Ok(value)
}

/// A RequestAuthentication's issuers, the column that tells its rules apart.
fn issuers(spec: &Value) -> String {
    let issuers: Vec<String> = spec["jwtRules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|rule| text(&rule["issuer"]))
        .collect();
    format!("issuers: {}", issuers.join(","))
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn key(value: &Value) -> String {
    format!("{}/{}", text(&value["namespace"]), text(&value["name"]))
}

/// Renders an admin API answer as a kubectl-like table.
pub fn render(what: &DebugWhat, body: &Value) -> String {
    let mut table = Table::new();
    table.load_style(NOTHING);
    let rows = body.as_array().cloned().unwrap_or_default();
    match what {
        DebugWhat::Workloads => {
            table.set_header([
                "NAMESPACE",
                "NAME",
                "NODE",
                "IPS",
                "SERVICE ACCOUNT",
                "ENROLLED",
            ]);
            for w in &rows {
                table.add_row([
                    text(&w["key"]["namespace"]),
                    text(&w["key"]["name"]),
                    text(&w["node"]),
                    text(&w["ips"]),
                    text(&w["service_account"]),
                    text(&w["enrolled"]),
                ]);
            }
        }
        DebugWhat::Services => {
            table.set_header(["NAMESPACE", "NAME", "CLUSTER IPS", "PORTS", "ENDPOINTS"]);
            for s in &rows {
                let ports: Vec<String> = s["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{}→{}", text(&p["port"]), target_port(&p["target_port"])))
                    .collect();
                let endpoints: Vec<String> = s["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(key)
                    .collect();
                table.add_row([
                    text(&s["key"]["namespace"]),
                    text(&s["key"]["name"]),
                    text(&s["cluster_ips"]),
                    ports.join(","),
                    endpoints.join(","),
                ]);
            }
        }
        DebugWhat::Policies => {
            table.set_header([
                "KIND",
                "NAMESPACE",
                "NAME",
                "SELECTOR",
                "MODE / ACTION",
                "RULES",
            ]);
            let kinds = [
                ("PeerAuthentication", "peer_authentications"),
                ("AuthorizationPolicy", "authorization_policies"),
                ("RequestAuthentication", "request_authentications"),
            ];
            for (kind, field) in kinds {
                for p in body[field].as_array().into_iter().flatten() {
                    let spec = &p["spec"];
                    let mode = match kind {
                        "PeerAuthentication" => text(&spec["mtls"]["mode"]),
                        "AuthorizationPolicy" => text(&spec["action"]),
                        _ if spec["refusesEveryToken"] == true => "refuses every token".into(),
                        _ => issuers(spec),
                    };
                    let rules = spec["rules"]
                        .as_array()
                        .or(spec["jwtRules"].as_array())
                        .map_or(0, Vec::len);
                    table.add_row([
                        kind.to_string(),
                        text(&p["key"]["namespace"]),
                        text(&p["key"]["name"]),
                        spec["selector"]["matchLabels"].to_string(),
                        mode,
                        rules.to_string(),
                    ]);
                }
            }
        }
        DebugWhat::Routes => {
            table.set_header(["NAMESPACE", "SERVICE", "FROM", "RULES / SUBSETS"]);
            for r in &rows {
                table.add_row([
                    text(&r["service"]["namespace"]),
                    text(&r["service"]["name"]),
                    text(&r["origin"]),
                    text(&r["rules"]),
                ]);
            }
        }
        DebugWhat::Certs => {
            table.set_header(["IDENTITY", "STATE", "EXPIRES (UNIX)", "CHAIN"]);
            for c in &rows {
                table.add_row([
                    text(&c["identity"]),
                    text(&c["state"]),
                    text(&c["not_after_unix"]),
                    text(&c["chain_length"]),
                ]);
            }
        }
        DebugWhat::Connections => {
            table.set_header([
                "DIRECTION",
                "POD",
                "CLIENT",
                "ORIGINAL DESTINATION",
                "UPSTREAM",
                "OPENED AT",
            ]);
            for c in &rows {
                table.add_row([
                    text(&c["direction"]),
                    key(&c["pod"]),
                    text(&c["client"]),
                    text(&c["original_destination"]),
                    text(&c["upstream"]),
                    text(&c["opened_at"]),
                ]);
            }
        }
        DebugWhat::Gateways => {
            table.set_header([
                "PORT",
                "SERVER",
                "PROTOCOL",
                "HOSTS",
                "CERTIFICATE",
                "ROUTES",
            ]);
            for l in body["listeners"].as_array().into_iter().flatten() {
                table.add_row([
                    text(&l["port"]),
                    text(&l["server"]),
                    text(&l["protocol"]),
                    text(&l["hosts"]),
                    text(&l["certificate"]),
                    text(&l["routes"]),
                ]);
            }
            let problems: Vec<String> = body["problems"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("\n! {}", text(p)))
                .collect();
            return format!("{table}{}", problems.concat());
        }
        DebugWhat::Explain(_) => {
            return match serde_json::from_value::<Explanation>(body.clone()) {
                Ok(explanation) => explanation.render(),
                // An agent of another version: its answer as it is.
                Err(_) => serde_json::to_string_pretty(body).unwrap_or_default(),
            };
        }
        DebugWhat::Config | DebugWhat::Log { .. } => return body.to_string(),
    }
    table.to_string()
}

fn target_port(value: &Value) -> String {
    value
        .get("Number")
        .or_else(|| value.get("Name"))
        .map_or_else(|| text(value), text)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn workloads_render_as_a_table() {
        let body = json!([{
            "key": {"namespace": "shop", "name": "web-1"},
            "node": "node0", "ips": ["10.0.0.1", "fd00::1"],
            "service_account": "web", "enrolled": true
        }]);
        let out = render(&DebugWhat::Workloads, &body);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].contains("NAMESPACE") && lines[0].contains("ENROLLED"),
            "{out}"
        );
        assert!(
            lines[1].contains("web-1") && lines[1].contains("10.0.0.1,fd00::1"),
            "{out}"
        );
    }

    #[test]
    fn routes_show_which_resource_routes_each_service() {
        let body = json!([{
            "service": {"namespace": "default", "name": "reviews"},
            "origin": "VirtualService default/reviews", "rules": 2
        }]);
        let out = render(&DebugWhat::Routes, &body);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].contains("SERVICE") && lines[0].contains("FROM"),
            "{out}"
        );
        assert!(
            lines[1].contains("reviews") && lines[1].contains("VirtualService default/reviews"),
            "{out}"
        );
    }

    #[test]
    fn gateways_show_each_server_its_certificate_and_what_is_not_served() {
        let body = serde_json::json!({
            "listeners": [{
                "port": 443, "server": "Gateway default/mygateway servers[0]",
                "protocol": "HTTPS", "hosts": ["httpbin.example.com"],
                "certificate": "CN=httpbin.example.com [httpbin.example.com], expires …",
                "routes": ["VirtualService default/httpbin (httpbin.example.com)"],
            }],
            "problems": ["Gateway default/x servers[1]: Secret istio-system/y not found"],
        });
        let out = render(&DebugWhat::Gateways, &body);
        assert!(out.contains("443"), "{out}");
        assert!(out.contains("VirtualService default/httpbin"), "{out}");
        assert!(out.contains("CN=httpbin.example.com"), "{out}");
        assert!(
            out.contains("! Gateway default/x servers[1]: Secret"),
            "{out}"
        );
    }

    #[test]
    fn connections_show_where_each_was_going() {
        let body = json!([{
            "direction": "outbound", "pod": {"namespace": "shop", "name": "web-1"},
            "client": "10.0.0.1:40000", "original_destination": "10.96.0.1:80",
            "upstream": "Service shop/web", "opened_at": "2026-01-01T00:00:00.000Z"
        }]);
        let out = render(&DebugWhat::Connections, &body);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].contains("ORIGINAL DESTINATION"), "{out}");
        assert!(
            lines[1].contains("shop/web-1")
                && lines[1].contains("10.96.0.1:80")
                && lines[1].contains("Service shop/web"),
            "{out}"
        );
    }

    #[test]
    fn services_show_port_mapping_and_endpoints() {
        let body = json!([{
            "key": {"namespace": "shop", "name": "web"},
            "cluster_ips": ["10.96.0.1"],
            "ports": [{"port": 80, "target_port": {"Number": 8080}}, {"port": 81, "target_port": {"Name": "http"}}],
            "endpoints": [{"namespace": "shop", "name": "web-1"}]
        }]);
        let out = render(&DebugWhat::Services, &body);
        assert!(
            out.contains("80→8080,81→http") && out.contains("shop/web-1"),
            "{out}"
        );
    }
}
