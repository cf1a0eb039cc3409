use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixListener,
    path::Path,
    thread,
};

use serde_json::{Value, json};

use super::*;

const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1";

fn prev_result() -> Value {
    json!({
        "cniVersion": "0.3.1",
        "interfaces": [{ "name": "eth0", "sandbox": "/var/run/netns/cni-1" }],
        "ips": [
            { "address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0 },
            { "address": "fd00::5/64", "interface": 0 }
        ],
        "dns": {}
    })
}

fn config(socket: &Path, extra: Value) -> Vec<u8> {
    let mut config = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "nodemesh-cni",
        "agentSocket": socket,
        "agentTimeout": "300ms",
        "prevResult": prev_result(),
    });
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    serde_json::to_vec(&config).unwrap()
}

fn env(command: &str, args: Option<&str>) -> CniEnv {
    CniEnv {
        command: command.into(),
        container_id: Some("abc".into()),
        netns: Some("/var/run/netns/cni-1".into()),
        args: args.map(str::to_owned),
    }
}

struct Call {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn call(env: &CniEnv, stdin: &[u8]) -> Call {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let ok = run(env, stdin, &mut stdout, &mut stderr);
    Call {
        ok,
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

/// An agent stand-in answering one request with `response`; returns the request.
fn fake_agent(socket: &Path, response: AgentResponse) -> thread::JoinHandle<AgentRequest> {
    let listener = UnixListener::bind(socket).unwrap();
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        let mut answer = serde_json::to_vec(&response).unwrap();
        answer.push(b'\n');
        (&stream).write_all(&answer).unwrap();
        serde_json::from_str(&line).unwrap()
    })
}

fn result_json(call: &Call) -> Value {
    serde_json::from_str(&call.stdout).unwrap_or_else(|e| panic!("{:?}: {e}", call.stdout))
}

#[test]
fn pod_args_name_the_pod_or_nothing() {
    assert_eq!(
        pod_from_args(Some(POD_ARGS)).unwrap(),
        Some(PodRef {
            namespace: "shop".into(),
            name: "web-1".into(),
            uid: Some("u-1".into()),
        })
    );
    assert_eq!(pod_from_args(Some("IgnoreUnknown=1")).unwrap(), None);
    assert_eq!(pod_from_args(None).unwrap(), None);
    assert!(pod_from_args(Some("K8S_POD_NAME=x")).is_err());
    assert!(pod_from_args(Some("garbage")).is_err());
}

#[test]
fn add_hands_the_pod_to_the_agent_and_passes_the_result_through() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let agent = fake_agent(&socket, AgentResponse::Enrolled);
    let add = call(&env("ADD", Some(POD_ARGS)), &config(&socket, json!({})));
    assert!(add.ok, "{}", add.stdout);
    let mut expected = prev_result();
    expected["cniVersion"] = "1.0.0".into();
    assert_eq!(
        result_json(&add),
        expected,
        "prevResult, at the config's version"
    );
    assert_eq!(
        agent.join().unwrap(),
        AgentRequest::Add {
            pod: pod_from_args(Some(POD_ARGS)).unwrap().unwrap(),
            container_id: "abc".into(),
            netns: "/var/run/netns/cni-1".into(),
            ips: vec!["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        }
    );
}

#[test]
fn an_agent_that_fails_to_enroll_fails_the_add() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let _agent = fake_agent(
        &socket,
        AgentResponse::Failed {
            error: "netns gone".into(),
        },
    );
    let add = call(&env("ADD", Some(POD_ARGS)), &config(&socket, json!({})));
    assert!(!add.ok);
    let error = result_json(&add);
    assert_eq!(error["code"], 100);
    assert!(
        error["msg"].as_str().unwrap().contains("shop/web-1"),
        "{error}"
    );
}

#[test]
fn an_unreachable_agent_fails_or_allows_by_policy() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let add = call(&env("ADD", Some(POD_ARGS)), &config(&socket, json!({})));
    assert!(!add.ok, "fail is the default");
    let error = result_json(&add);
    assert_eq!(error["code"], 11, "try again later");
    assert_eq!(error["cniVersion"], "1.0.0");
    assert!(
        error["msg"].as_str().unwrap().contains("absent.sock"),
        "{error}"
    );

    let allow = config(&socket, json!({ "onAgentUnavailable": "allow" }));
    let add = call(&env("ADD", Some(POD_ARGS)), &allow);
    assert!(add.ok);
    assert_eq!(result_json(&add)["ips"], prev_result()["ips"]);
    assert!(add.stderr.contains("uncaptured"), "{}", add.stderr);
}

#[test]
fn non_kubernetes_calls_and_del_never_fail() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let add = call(&env("ADD", None), &config(&socket, json!({})));
    assert!(add.ok, "no pod, nothing to enroll: {}", add.stdout);
    assert_eq!(result_json(&add)["ips"], prev_result()["ips"]);

    let del = call(&env("DEL", Some(POD_ARGS)), &config(&socket, json!({})));
    assert!(del.ok);
    assert!(del.stdout.is_empty());
    assert!(del.stderr.contains("not delivered"), "{}", del.stderr);
}

#[test]
fn status_asks_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let agent = fake_agent(&socket, AgentResponse::Ready);
    let status = call(&env("STATUS", None), &config(&socket, json!({})));
    assert!(status.ok, "{}", status.stdout);
    assert_eq!(agent.join().unwrap(), AgentRequest::Status);

    let _agent = fake_agent(&dir.path().join("busy.sock"), AgentResponse::NotReady);
    let status = call(
        &env("STATUS", None),
        &config(&dir.path().join("busy.sock"), json!({})),
    );
    assert!(!status.ok);
    assert_eq!(result_json(&status)["code"], 50, "plugin not available");
}

#[test]
fn version_and_bad_input_answer_with_cni_json() {
    let version = call(&env("VERSION", None), b"");
    assert!(version.ok);
    assert_eq!(
        result_json(&version),
        json!({ "cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"] })
    );

    let socket = Path::new("/nonexistent/cni.sock");
    for (command, stdin, code) in [
        ("ADD", b"{ not json".to_vec(), 6),
        ("ADD", config(socket, json!({ "cniVersion": "2.0.0" })), 1),
        ("ADD", config(socket, json!({ "agentTimeout": "soon" })), 6),
        ("ADD", config(socket, json!({ "prevResult": null })), 7),
        ("FROB", config(socket, json!({})), 4),
    ] {
        let result = call(&env(command, Some(POD_ARGS)), &stdin);
        assert!(!result.ok, "{command} {}", String::from_utf8_lossy(&stdin));
        assert_eq!(result_json(&result)["code"], code, "{}", result.stdout);
    }
}

proptest::proptest! {
    /// Any `CNI_ARGS`: no panic; a pod is named only with both its namespace and name.
    #[test]
    fn fuzz_cni_args(args in "\\PC{0,80}|(K8S_POD_(NAMESPACE|NAME|UID)=[a-z0-9-]{0,8};?){0,4}") {
        if let Ok(Some(pod)) = pod_from_args(Some(&args)) {
            proptest::prop_assert!(!pod.namespace.is_empty() && !pod.name.is_empty(), "{pod:?}");
        }
    }

    /// Any network config on stdin, for every command that does not reach the agent: a
    /// result or a CNI error on stdout, never a panic; an error is always valid JSON.
    #[test]
    fn fuzz_cni_network_config(
        stdin in "\\PC{0,120}|\\{\"cniVersion\":\"(1.0.0|0.3.1|9)\",\"prevResult\":\\{\"ips\":\\[\\{\"address\":\"[0-9a-f.:/]{0,20}\"\\}\\]\\}\\}",
        command in proptest::sample::select(vec!["ADD", "CHECK", "VERSION", "BOGUS", ""]),
    ) {
        // Without K8S_POD_* arguments an ADD is not for a pod: the agent is not called.
        let env = CniEnv { command: command.to_string(), ..CniEnv::default() };
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let ok = run(&env, stdin.as_bytes(), &mut stdout, &mut stderr);
        if !ok {
            let error: serde_json::Value = serde_json::from_slice(&stdout).expect("an error result");
            proptest::prop_assert!(error["code"].as_u64().is_some(), "{error}");
        }
    }

    /// Any `prevResult`: its addresses or a clear error, never a panic.
    #[test]
    fn fuzz_prev_result(address in "\\PC{0,30}|[0-9a-f.:/]{0,30}") {
        let _ = prev_result_ips(&json!({ "ips": [{ "address": address }] }));
    }
}
