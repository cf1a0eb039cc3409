//! The chained CNI plugin (`mesh-node cni`, installed as `nodemesh-cni`).
//!
//! Runs once per CNI call, as the container runtime drives it (CNI spec 1.0.0, and the
//! 0.3.x/0.4.0 configs of older main plugins): the command and the pod come from `CNI_*`
//! environment variables, the network config with the main plugin's `prevResult` on stdin.
//! The plugin never touches the pod's network itself; it asks the agent to enroll the pod
//! and passes `prevResult` through unchanged, so the chain's result is the main plugin's.
//!
//! Plugin config keys (in the conflist entry):
//! * `agentSocket`: the agent's unix socket (default [`DEFAULT_AGENT_SOCKET`]);
//! * `agentTimeout`: how long ADD waits for the agent, retrying while it is unreachable or
//!   not ready (humantime, default `10s`);
//! * `onAgentUnavailable`: `fail` (default: the pod does not start until the agent can
//!   capture it; the runtime retries the sandbox) or `allow` (the pod starts uncaptured
//!   until the agent's own reconcile enrolls it).
//!
//! Synchronous on purpose: one short-lived call needs no async runtime.
use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

use super::{AgentRequest, AgentResponse, DEFAULT_AGENT_SOCKET, PodRef};

/// CNI versions whose configs and results this plugin understands. The result is the main
/// plugin's, so its layout is whatever that version says; the plugin only reads `ips`.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The version VERSION answers with.
const OWN_VERSION: &str = "1.0.0";
const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts while the agent is unreachable or not ready.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// An agent answer is one short JSON line; anything longer is not the agent.
const MAX_RESPONSE_BYTES: u64 = 64 * 1024;

/// What to do when the agent cannot be reached within `agentTimeout`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnAgentUnavailable {
    /// Fail the ADD: the pod never runs uncaptured.
    #[default]
    Fail,
    /// Let the pod start; the agent enrolls it later from its config.
    Allow,
}

/// The network config on stdin: the standard keys the plugin needs and its own.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_agent_socket")]
    pub agent_socket: PathBuf,
    #[serde(
        default = "default_agent_timeout",
        deserialize_with = "deserialize_duration"
    )]
    pub agent_timeout: Duration,
    #[serde(default)]
    pub on_agent_unavailable: OnAgentUnavailable,
    /// The previous plugin's result, passed through untouched (kept as JSON so fields this
    /// plugin does not know survive).
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
}

fn default_agent_socket() -> PathBuf {
    PathBuf::from(DEFAULT_AGENT_SOCKET)
}

fn default_agent_timeout() -> Duration {
    DEFAULT_AGENT_TIMEOUT
}

fn deserialize_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("agentTimeout {text:?}: {e}")))
}

/// The part of a CNI result the plugin reads: the pod's addresses.
#[derive(Debug, Default, Deserialize)]
struct PrevResultIps {
    #[serde(default)]
    ips: Vec<IpConfig>,
}

#[derive(Debug, Deserialize)]
struct IpConfig {
    /// CIDR notation: `10.244.1.5/24`.
    address: IpNet,
}

/// A CNI error result (spec: "Error").
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorResult<'a> {
    cni_version: &'a str,
    code: u32,
    msg: String,
    details: String,
}

/// The VERSION result.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct VersionResult {
    cni_version: &'static str,
    supported_versions: &'static [&'static str],
}

/// What the runtime passes in the environment.
#[derive(Clone, Debug, Default)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS`: `K=V;K=V`.
    pub args: Option<String>,
}

impl CniEnv {
    /// Reads the `CNI_*` variables: the one place the plugin looks at its environment.
    pub fn from_env() -> Self {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            command: var("CNI_COMMAND").unwrap_or_default(),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS").map(PathBuf::from),
            args: var("CNI_ARGS"),
        }
    }
}

/// Why a call failed; each maps to a CNI error code.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("CNI_COMMAND {0:?} is not ADD, DEL, CHECK, STATUS or VERSION")]
    UnknownCommand(String),
    #[error("{0} is not set")]
    MissingEnv(&'static str),
    #[error("CNI_ARGS: {0}")]
    BadArgs(String),
    #[error("network config on stdin: {0}")]
    BadConfig(#[from] serde_json::Error),
    #[error("cniVersion {0:?} is not supported (supported: {SUPPORTED_VERSIONS:?})")]
    IncompatibleVersion(String),
    #[error(
        "no prevResult: nodemesh-cni is a chained plugin and must come after the main \
         plugin in the conflist"
    )]
    MissingPrevResult,
    #[error("prevResult: {0}")]
    BadPrevResult(serde_json::Error),
    #[error("the nodemesh agent at {socket} did not take the pod within {timeout:?}: {last}")]
    AgentUnavailable {
        socket: PathBuf,
        timeout: Duration,
        last: String,
    },
    #[error("the nodemesh agent could not enroll pod {pod}: {error}")]
    EnrollFailed { pod: String, error: String },
    #[error("the nodemesh agent is not available: {0}")]
    NotAvailable(String),
    #[error("the nodemesh agent answered {0:?} to {1}")]
    UnexpectedAnswer(AgentResponse, &'static str),
}

impl PluginError {
    /// The CNI spec's well-known codes; 100+ are this plugin's own.
    fn code(&self) -> u32 {
        match self {
            Self::IncompatibleVersion(_) => 1,
            Self::UnknownCommand(_) | Self::MissingEnv(_) | Self::BadArgs(_) => 4,
            Self::BadConfig(_) | Self::BadPrevResult(_) => 6,
            Self::MissingPrevResult => 7,
            Self::AgentUnavailable { .. } => 11,
            // STATUS: "the plugin is not available".
            Self::NotAvailable(_) => 50,
            Self::EnrollFailed { .. } => 100,
            Self::UnexpectedAnswer(..) => 101,
        }
    }
}

/// Runs one CNI call: reads `stdin`, writes the result (or error) JSON to `stdout` and log
/// lines to `stderr`. Returns whether the call succeeded (the process's exit status).
pub fn run(env: &CniEnv, stdin: &[u8], stdout: &mut dyn Write, stderr: &mut dyn Write) -> bool {
    // The error result carries the config's version when it could be read.
    let version = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| OWN_VERSION.to_owned());
    let result = dispatch(env, stdin, stderr);
    let written = match &result {
        Ok(Some(output)) => serde_json::to_writer(&mut *stdout, output),
        Ok(None) => Ok(()),
        Err(error) => serde_json::to_writer(
            &mut *stdout,
            &ErrorResult {
                cni_version: &version,
                code: error.code(),
                msg: error.to_string(),
                details: format!("{error:?}"),
            },
        ),
    };
    if let Err(error) = written
        .map_err(std::io::Error::from)
        .and_then(|()| stdout.flush())
    {
        let _ = writeln!(stderr, "nodemesh-cni: writing the result: {error}");
        return false;
    }
    result.is_ok()
}

/// The call's result JSON, if the command has one.
fn dispatch(
    env: &CniEnv,
    stdin: &[u8],
    stderr: &mut dyn Write,
) -> Result<Option<serde_json::Value>, PluginError> {
    if env.command == "VERSION" {
        let version = VersionResult {
            cni_version: OWN_VERSION,
            supported_versions: SUPPORTED_VERSIONS,
        };
        return Ok(Some(serde_json::to_value(version)?));
    }
    if !["ADD", "DEL", "CHECK", "STATUS"].contains(&env.command.as_str()) {
        return Err(PluginError::UnknownCommand(env.command.clone()));
    }
    let conf: NetConf = serde_json::from_slice(stdin)?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(PluginError::IncompatibleVersion(conf.cni_version));
    }
    match env.command.as_str() {
        "ADD" => add(env, &conf, stderr).map(Some),
        "DEL" => {
            del(env, &conf, stderr);
            Ok(None)
        }
        "STATUS" => status(&conf).map(|()| None),
        // CHECK: the pod's capture is the agent's to keep; nothing for the chain to check.
        _ => Ok(None),
    }
}

fn add(
    env: &CniEnv,
    conf: &NetConf,
    stderr: &mut dyn Write,
) -> Result<serde_json::Value, PluginError> {
    let mut prev_result = conf
        .prev_result
        .clone()
        .ok_or(PluginError::MissingPrevResult)?;
    // Results are printed at the config's version (the runtime asked for that one).
    if let Some(object) = prev_result.as_object_mut() {
        object.insert("cniVersion".into(), conf.cni_version.clone().into());
    }
    let Some(pod) = pod_from_args(env.args.as_deref())? else {
        // Not a Kubernetes pod (a runtime's own sandbox, a test): nothing to enroll.
        return Ok(prev_result);
    };
    let ips = prev_result_ips(&prev_result)?;
    let request = AgentRequest::Add {
        pod: pod.clone(),
        container_id: env
            .container_id
            .clone()
            .ok_or(PluginError::MissingEnv("CNI_CONTAINERID"))?,
        netns: env
            .netns
            .clone()
            .ok_or(PluginError::MissingEnv("CNI_NETNS"))?,
        ips,
    };
    let pod_name = format!("{}/{}", pod.namespace, pod.name);
    match call_agent(conf, &request, true) {
        Ok(AgentResponse::Enrolled | AgentResponse::NotEnrolled { .. }) => Ok(prev_result),
        Ok(AgentResponse::Failed { error }) => Err(PluginError::EnrollFailed {
            pod: pod_name,
            error,
        }),
        Ok(other) => Err(PluginError::UnexpectedAnswer(other, "ADD")),
        Err(error) => match conf.on_agent_unavailable {
            OnAgentUnavailable::Fail => Err(error),
            OnAgentUnavailable::Allow => {
                let _ = writeln!(
                    stderr,
                    "nodemesh-cni: pod {pod_name} starts uncaptured (onAgentUnavailable: \
                     allow): {error}"
                );
                Ok(prev_result)
            }
        },
    }
}

/// Best effort: a failing DEL makes runtimes retry it forever, so it never fails; an agent
/// that misses it un-enrolls the pod when it leaves the config.
fn del(env: &CniEnv, conf: &NetConf, stderr: &mut dyn Write) {
    let pod = match pod_from_args(env.args.as_deref()) {
        Ok(Some(pod)) => pod,
        Ok(None) => return,
        Err(error) => {
            let _ = writeln!(stderr, "nodemesh-cni: DEL ignored: {error}");
            return;
        }
    };
    let request = AgentRequest::Del {
        pod,
        container_id: env.container_id.clone().unwrap_or_default(),
    };
    if let Err(error) = call_agent(conf, &request, false) {
        let _ = writeln!(stderr, "nodemesh-cni: DEL not delivered: {error}");
    }
}

fn status(conf: &NetConf) -> Result<(), PluginError> {
    match call_agent(conf, &AgentRequest::Status, false) {
        Ok(AgentResponse::Ready) => Ok(()),
        Ok(other) => Err(PluginError::NotAvailable(format!("it answered {other:?}"))),
        Err(error) => Err(PluginError::NotAvailable(error.to_string())),
    }
}

/// The pod named by `K8S_POD_NAMESPACE`, `K8S_POD_NAME` (and `K8S_POD_UID`), or `None`
/// when the call is not for a Kubernetes pod.
pub fn pod_from_args(args: Option<&str>) -> Result<Option<PodRef>, PluginError> {
    let (mut namespace, mut name, mut uid) = (None, None, None);
    for pair in args
        .unwrap_or_default()
        .split(';')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| PluginError::BadArgs(format!("{pair:?} is not KEY=VALUE")))?;
        let slot = match key {
            "K8S_POD_NAMESPACE" => &mut namespace,
            "K8S_POD_NAME" => &mut name,
            "K8S_POD_UID" => &mut uid,
            _ => continue,
        };
        *slot = Some(value.to_owned()).filter(|v| !v.is_empty());
    }
    match (namespace, name) {
        (Some(namespace), Some(name)) => Ok(Some(PodRef {
            namespace,
            name,
            uid,
        })),
        (None, None) => Ok(None),
        _ => Err(PluginError::BadArgs(
            "K8S_POD_NAMESPACE and K8S_POD_NAME come together".into(),
        )),
    }
}

fn prev_result_ips(prev_result: &serde_json::Value) -> Result<Vec<IpAddr>, PluginError> {
    let parsed: PrevResultIps =
        serde_json::from_value(prev_result.clone()).map_err(PluginError::BadPrevResult)?;
    Ok(parsed.ips.iter().map(|ip| ip.address.addr()).collect())
}

/// Sends `request` and reads the answer; with `retry`, tries again while the agent is
/// unreachable or not ready, until `agentTimeout` has passed.
fn call_agent(
    conf: &NetConf,
    request: &AgentRequest,
    retry: bool,
) -> Result<AgentResponse, PluginError> {
    let deadline = Instant::now() + conf.agent_timeout;
    loop {
        let last = match exchange(conf, request, deadline) {
            Ok(AgentResponse::NotReady) => "the agent is not ready yet".to_owned(),
            Ok(response) => return Ok(response),
            Err(error) => error.to_string(),
        };
        if !retry || Instant::now() + RETRY_PAUSE >= deadline {
            return Err(PluginError::AgentUnavailable {
                socket: conf.agent_socket.clone(),
                timeout: conf.agent_timeout,
                last,
            });
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

/// One request, one answer, on a fresh connection.
fn exchange(
    conf: &NetConf,
    request: &AgentRequest,
    deadline: Instant,
) -> std::io::Result<AgentResponse> {
    let stream = UnixStream::connect(&conf.agent_socket)?;
    // A zero timeout means "none" to the socket API: keep at least a millisecond.
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(remaining))?;
    stream.set_write_timeout(Some(remaining))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(&stream, MAX_RESPONSE_BYTES)).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        ));
    }
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests;
