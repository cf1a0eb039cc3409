//! Host names in routing resources → the Kubernetes Service they name.
use crate::inventory::ObjectKey;

/// The cluster DNS suffix Istio assumes (`Service::hostname` uses it too).
const CLUSTER_SUFFIX: &str = ".svc.cluster.local";

/// `reviews` (in `namespace`), `reviews.ns`, `reviews.ns.svc` and
/// `reviews.ns.svc.cluster.local` name the Service `ns/reviews`; anything else (wildcards,
/// external names, other cluster domains) names none.
pub fn resolve_host(host: &str, namespace: &str) -> Option<ObjectKey> {
    let host = host.trim_end_matches('.');
    let short = host
        .strip_suffix(CLUSTER_SUFFIX)
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(host);
    let mut labels = short.split('.');
    let key = match (labels.next(), labels.next(), labels.next()) {
        (Some(name), None, None) if short == host => ObjectKey::new(namespace, name),
        (Some(name), Some(ns), None) => ObjectKey::new(ns, name),
        _ => return None,
    };
    (is_dns_label(&key.name) && is_dns_label(&key.namespace)).then_some(key)
}

/// A request's host as matched against host patterns: without its port or a trailing dot,
/// lower case.
pub fn request_host_name(host: &str) -> String {
    let without_port = match host.strip_prefix('[') {
        // An IPv6 literal: `[::1]:8080`.
        Some(rest) => rest.split_once(']').map_or(rest, |(ip, _)| ip),
        None => host
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(name, _)| name),
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

/// How specifically `pattern` (`api.example.com`, `*.example.com` or `*`) matches `name` (as
/// [`request_host_name`] gives it): `None` when it does not, exact names above every
/// wildcard, longer wildcard suffixes above shorter ones, `*` lowest.
pub fn host_match_specificity(pattern: &str, name: &str) -> Option<usize> {
    let pattern = pattern.trim_end_matches('.');
    match pattern.strip_prefix('*') {
        None => pattern.eq_ignore_ascii_case(name).then_some(usize::MAX),
        Some("") => Some(0),
        Some(suffix) => (name.len() > suffix.len()
            && name
                .get(name.len() - suffix.len()..)
                .is_some_and(|end| end.eq_ignore_ascii_case(suffix)))
        .then_some(suffix.len()),
    }
}

/// Whether `host` is a name a gateway can serve or route: a DNS name, `*.suffix` or `*`.
pub fn is_host_pattern(host: &str) -> bool {
    host == "*"
        || (!host.is_empty()
            && host
                .strip_prefix("*.")
                .unwrap_or(host)
                .split('.')
                .all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                }))
}

/// An RFC 1123 label, which Service and namespace names are.
pub fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_match_exact_names_before_wildcards() {
        assert_eq!(request_host_name("API.example.com:8443"), "api.example.com");
        assert_eq!(request_host_name("[::1]:80"), "::1");
        assert_eq!(request_host_name("example.com."), "example.com");
        let name = "api.example.com";
        assert_eq!(
            host_match_specificity("api.example.com", name),
            Some(usize::MAX)
        );
        assert_eq!(host_match_specificity("*.example.com", name), Some(12));
        assert_eq!(host_match_specificity("*.com", name), Some(4));
        assert_eq!(host_match_specificity("*", name), Some(0));
        assert_eq!(host_match_specificity("*.example.com", "example.com"), None);
        assert_eq!(host_match_specificity("www.example.com", name), None);
    }

    #[test]
    fn service_names_in_every_form_resolve_and_others_do_not() {
        let reviews = Some(ObjectKey::new("shop", "reviews"));
        for host in [
            "reviews",
            "reviews.shop",
            "reviews.shop.svc",
            "reviews.shop.svc.cluster.local",
            "reviews.shop.svc.cluster.local.",
        ] {
            assert_eq!(resolve_host(host, "shop"), reviews, "{host} in shop");
        }
        assert_eq!(
            resolve_host("reviews.shop", "other"),
            reviews,
            "an explicit namespace wins over the resource's"
        );
        for host in [
            "*",
            "*.shop.svc.cluster.local",
            "www.example.com",
            "reviews.shop.svc.other.domain",
            "reviews.svc",
            "Reviews",
            "",
            "reviews..svc",
        ] {
            assert_eq!(
                resolve_host(host, "shop"),
                None,
                "{host:?} must not resolve"
            );
        }
    }
}
