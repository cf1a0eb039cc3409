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

/// An RFC 1123 label, which Service and namespace names are.
fn is_dns_label(label: &str) -> bool {
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
