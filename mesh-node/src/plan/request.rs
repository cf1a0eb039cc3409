//! Which route a request takes at the source node, and what the route does to it before it
//! leaves.

use http::{HeaderMap, HeaderValue, Method, Request, Uri, header, request::Parts};

use crate::{
    inventory::{Labels, ObjectKey, Workload},
    routing::{HttpRule, RequestInfo, RouteMatch, rewrite_uri},
    state::State,
};

/// What routing reads of a request: its head.
#[derive(Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

impl<'a> RequestHead<'a> {
    pub fn of<B>(request: &'a Request<B>) -> Self {
        Self {
            method: request.method(),
            uri: request.uri(),
            headers: request.headers(),
        }
    }

    pub fn of_parts(parts: &'a Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
        }
    }
}

/// The VirtualService or HTTPRoute rule that `request` from `source` to `service`'s `port`
/// takes (a source unknown to the state matches no `sourceLabels`).
pub fn select_route<'s>(
    state: &'s State,
    service: &ObjectKey,
    port: u16,
    source: Option<&Workload>,
    request: RequestHead<'_>,
) -> RouteMatch<'s> {
    let no_labels = Labels::new();
    state.routes.match_http(
        service,
        &RequestInfo {
            method: request.method,
            uri: request.uri,
            headers: request.headers,
            port,
            source_labels: source.map_or(&no_labels, |w| &w.labels),
        },
    )
}

/// The request as the source proxy sends it on: the rule's rewrite (`matched_prefix` is the
/// part of the path the rule's prefix match covered) and its request header changes.
pub fn rewrite_request(parts: &mut Parts, rule: &HttpRule, matched_prefix: Option<&str>) {
    if let Some(rewrite) = &rule.rewrite {
        if let Some(uri) = &rewrite.uri {
            let path_and_query = rewrite_uri(uri, matched_prefix, &parts.uri);
            let mut uri_parts = parts.uri.clone().into_parts();
            if let Ok(pq) = path_and_query.parse() {
                uri_parts.path_and_query = Some(pq);
                if let Ok(uri) = Uri::from_parts(uri_parts) {
                    parts.uri = uri;
                }
            }
        }
        if let Some(authority) = &rewrite.authority
            && let Ok(value) = HeaderValue::from_str(authority)
        {
            parts.headers.insert(header::HOST, value);
            let mut uri_parts = parts.uri.clone().into_parts();
            if uri_parts.authority.is_some()
                && let Ok(authority) = authority.parse()
            {
                uri_parts.authority = Some(authority);
                if let Ok(uri) = Uri::from_parts(uri_parts) {
                    parts.uri = uri;
                }
            }
        }
    }
    rule.request_headers.apply(&mut parts.headers);
}
