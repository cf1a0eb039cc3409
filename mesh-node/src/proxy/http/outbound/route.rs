//! What a matched route does with a request: sends it on to a destination (picked by
//! weight), or answers it at the source (a direct response, a redirect).
use http::{HeaderValue, Request, Response, StatusCode, header};

use super::super::{ProxyBody, local_response};
use crate::{
    inventory::ObjectKey,
    routing::{Destination, HttpAction, HttpRule, pick_at_random},
};

/// The route's decision for one request.
pub(super) enum Action {
    Forward(Destination),
    /// The source proxy answers itself.
    Answer(Response<ProxyBody>),
    /// Every destination has weight 0: Envoy answers 404 (NR).
    NoRoute,
}

/// What `rule` (none: the Service itself) does with `request` to `service`.
pub(super) fn action<B>(
    rule: Option<&HttpRule>,
    service: &ObjectKey,
    request: &Request<B>,
) -> Action {
    let Some(rule) = rule else {
        return Action::Forward(Destination {
            service: service.clone(),
            subset: None,
            port: None,
        });
    };
    match &rule.action {
        HttpAction::Route(destinations) => {
            pick_at_random(destinations).map_or(Action::NoRoute, |d| Action::Forward(d.clone()))
        }
        HttpAction::DirectResponse { status, body } => {
            let mut response = local_response(
                StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
                body.as_deref().unwrap_or(""),
            );
            rule.response_headers.apply(response.headers_mut());
            Action::Answer(response)
        }
        HttpAction::Redirect {
            scheme,
            authority,
            port,
            path,
            status,
        } => Action::Answer(redirect(
            request,
            scheme.as_deref(),
            authority.as_deref(),
            *port,
            path.as_deref(),
            *status,
        )),
    }
}

/// A redirect answer: each part of the location that the rule does not set is the
/// request's own.
fn redirect<B>(
    request: &Request<B>,
    scheme: Option<&str>,
    authority: Option<&str>,
    port: Option<u16>,
    path: Option<&str>,
    status: u16,
) -> Response<ProxyBody> {
    let host = authority
        .map(str::to_string)
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .or_else(|| request.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let host = match port {
        Some(port) => format!("{}:{port}", host.split(':').next().unwrap_or_default()),
        None => host,
    };
    let path = path.map(str::to_string).unwrap_or_else(|| {
        request
            .uri()
            .path_and_query()
            .map_or("/".into(), |pq| pq.to_string())
    });
    let location = format!("{}://{host}{path}", scheme.unwrap_or("http"));
    let mut response = local_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::MOVED_PERMANENTLY),
        "",
    );
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

#[cfg(test)]
mod tests;
