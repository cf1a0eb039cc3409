//! The answers the source proxy gives itself when a request cannot be served, as Envoy
//! words them, with their response flags.
use http::StatusCode;

/// How the proxy ended a request, in Envoy's response flags.
pub(super) struct Local {
    pub status: StatusCode,
    pub body: &'static str,
    pub flags: &'static str,
}

pub(super) const NO_ROUTE: Local = Local {
    status: StatusCode::NOT_FOUND,
    body: "route not found",
    flags: "NR",
};
pub(super) const NO_HEALTHY_UPSTREAM: Local = Local {
    status: StatusCode::SERVICE_UNAVAILABLE,
    body: "no healthy upstream",
    flags: "UH",
};
pub(super) const OVERFLOW: Local = Local {
    status: StatusCode::SERVICE_UNAVAILABLE,
    body: "upstream connect error or disconnect/reset before headers. reset reason: overflow",
    flags: "UO",
};
pub(super) const CONNECT_FAILURE: Local = Local {
    status: StatusCode::SERVICE_UNAVAILABLE,
    body: "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
    flags: "UF",
};
pub(super) const RESET: Local = Local {
    status: StatusCode::SERVICE_UNAVAILABLE,
    body: "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
    flags: "UC",
};
pub(super) const TIMEOUT: Local = Local {
    status: StatusCode::GATEWAY_TIMEOUT,
    body: "upstream request timeout",
    flags: "UT",
};
