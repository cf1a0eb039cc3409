//! What a route does to a request before it leaves the source node.
use http::{HeaderValue, Uri, header, request::Parts};

use crate::routing::{HttpRule, rewrite_uri};

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
