use std::time::Duration;

use super::*;
use crate::routing::HashKey;

fn cluster() -> Arc<Cluster> {
    Clusters::default().get(&ClusterKey::service(
        ObjectKey::new("default", "reviews"),
        None,
        9080,
    ))
}

fn endpoints(n: u8) -> Vec<SocketAddr> {
    (1..=n)
        .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
        .collect()
}

fn detection(consecutive_5xx_errors: u32, max_ejection_percent: u32) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx_errors,
        consecutive_gateway_errors: 0,
        interval: Duration::from_secs(1),
        base_ejection_time: Duration::from_secs(30),
        max_ejection_percent,
    }
}

#[test]
fn round_robin_visits_every_endpoint_in_turn() {
    let (cluster, all) = (cluster(), endpoints(3));
    let picks: Vec<SocketAddr> = (0..6)
        .map(|_| {
            cluster
                .pick(&all, &LoadBalancer::RoundRobin, HashInput::default(), &[])
                .expect("an endpoint")
        })
        .collect();
    assert_eq!(&picks[..3], &all[..]);
    assert_eq!(&picks[3..], &all[..]);
}

#[test]
fn tried_endpoints_are_avoided_while_others_remain() {
    let (cluster, all) = (cluster(), endpoints(2));
    for _ in 0..10 {
        let pick = cluster.pick(&all, &LoadBalancer::Random, HashInput::default(), &all[..1]);
        assert_eq!(pick, Some(all[1]));
    }
    // All tried: any endpoint is better than none.
    assert!(
        cluster
            .pick(&all, &LoadBalancer::Random, HashInput::default(), &all)
            .is_some()
    );
}

#[test]
fn consistent_hash_keeps_a_key_on_one_endpoint_and_moves_few_keys() {
    let (cluster, all) = (cluster(), endpoints(4));
    let lb = LoadBalancer::ConsistentHash(HashKey::SourceIp);
    let pick = |pool: &[SocketAddr], key: &str| {
        cluster
            .pick(pool, &lb, HashInput::of(key), &[])
            .expect("an endpoint")
    };
    let mut moved = 0;
    for key in (0..200).map(|i| format!("user-{i}")) {
        let first = pick(&all, &key);
        assert_eq!(pick(&all, &key), first, "{key} moved without a change");
        // Removing one endpoint moves only the keys that were on it.
        let without_last = &all[..3];
        let after = pick(without_last, &key);
        if after != first {
            assert_eq!(first, all[3]);
            moved += 1;
        }
    }
    assert!(moved > 0 && moved < 100, "{moved} of 200 keys moved");
}

#[test]
fn least_request_prefers_the_idle_endpoint() {
    let (cluster, all) = (cluster(), endpoints(2));
    let pool = ConnectionPool::default();
    let _busy: Vec<ActiveRequest> = (0..5)
        .map(|_| cluster.start_request(all[0], &pool).expect("no limit"))
        .collect();
    for _ in 0..20 {
        let pick = cluster.pick(&all, &LoadBalancer::LeastRequest, HashInput::default(), &[]);
        assert_eq!(pick, Some(all[1]));
    }
}

#[tokio::test(start_paused = true)]
async fn consecutive_errors_eject_an_endpoint_until_the_base_ejection_time_passes() {
    let (cluster, all) = (cluster(), endpoints(2));
    let detection = detection(3, 50);
    let report = |result| cluster.report(all[0], result, Some(&detection), all.len());
    assert!(!report(AttemptResult::Status(503)));
    assert!(!report(AttemptResult::Status(500)));
    // A success in between resets the count.
    assert!(!report(AttemptResult::Status(200)));
    assert!(!report(AttemptResult::Status(503)));
    assert!(!report(AttemptResult::LocalFailure));
    assert!(report(AttemptResult::Status(502)), "third in a row ejects");
    assert_eq!(cluster.ejected(), vec![all[0]]);
    for _ in 0..10 {
        let pick = cluster.pick(&all, &LoadBalancer::RoundRobin, HashInput::default(), &[]);
        assert_eq!(pick, Some(all[1]));
    }
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(cluster.ejected(), vec![all[0]]);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(cluster.ejected().is_empty(), "back after baseEjectionTime");
    // The second ejection lasts twice as long.
    for _ in 0..3 {
        report(AttemptResult::Status(503));
    }
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(cluster.ejected(), vec![all[0]]);
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(cluster.ejected().is_empty());
}

#[tokio::test(start_paused = true)]
async fn max_ejection_percent_caps_ejections_but_allows_one() {
    let (cluster, all) = (cluster(), endpoints(4));
    let detection = detection(1, 10);
    assert!(cluster.report(all[0], AttemptResult::Status(500), Some(&detection), 4));
    assert!(!cluster.report(all[1], AttemptResult::Status(500), Some(&detection), 4));
    assert_eq!(cluster.ejected(), vec![all[0]]);
    // Without outlier detection errors are counted but nothing is ejected.
    let plain = self::cluster();
    for _ in 0..10 {
        assert!(!plain.report(all[0], AttemptResult::Status(500), None, 4));
    }
}

#[test]
fn every_endpoint_ejected_falls_back_to_all() {
    let (cluster, all) = (cluster(), endpoints(1));
    assert!(cluster.report(
        all[0],
        AttemptResult::Status(500),
        Some(&detection(1, 100)),
        1
    ));
    let pick = cluster.pick(&all, &LoadBalancer::RoundRobin, HashInput::default(), &[]);
    assert_eq!(pick, Some(all[0]));
}

#[test]
fn limits_refuse_beyond_their_size_and_free_on_drop() {
    let (cluster, all) = (cluster(), endpoints(1));
    let pool = ConnectionPool {
        max_connections: Some(1),
        http1_max_pending_requests: Some(1),
        http2_max_requests: Some(2),
        max_retries: Some(1),
        ..ConnectionPool::default()
    };
    let first = cluster.start_request(all[0], &pool).expect("first");
    let second = cluster.start_request(all[0], &pool).expect("second");
    assert!(
        cluster.start_request(all[0], &pool).is_none(),
        "over http2MaxRequests"
    );
    drop(first);
    assert!(cluster.start_request(all[0], &pool).is_some());
    drop(second);

    assert!(cluster.try_open_connection(&pool));
    assert!(!cluster.try_open_connection(&pool), "over maxConnections");
    cluster.connection_closed();
    assert!(cluster.try_open_connection(&pool));

    assert!(cluster.try_enter_pending(&pool));
    assert!(!cluster.try_enter_pending(&pool), "pending queue full");
    cluster.leave_pending();
    assert!(cluster.try_enter_pending(&pool));

    let retry = cluster.start_retry(&pool).expect("a retry slot");
    assert!(cluster.start_retry(&pool).is_none(), "over maxRetries");
    drop(retry);
    assert!(cluster.start_retry(&pool).is_some());
}

#[test]
fn ejection_time_grows_with_each_ejection_up_to_its_cap_and_never_overflows() {
    let now = Instant::now();
    let base = Duration::from_secs(30);
    assert_eq!(ejection_end(now, base, 1) - now, base);
    assert_eq!(ejection_end(now, base, 3) - now, Duration::from_secs(90));
    assert_eq!(
        ejection_end(now, base, 1000) - now,
        Duration::from_secs(300),
        "capped at Envoy's max_ejection_time default"
    );
    let huge = Duration::from_secs(u64::MAX);
    assert!(
        ejection_end(now, huge, u32::MAX) > now,
        "saturates, no panic"
    );
}

#[test]
fn prune_keeps_clusters_in_use_and_those_of_services_that_remain() {
    let clusters = Clusters::default();
    let kept = ObjectKey::new("default", "reviews");
    let gone = ObjectKey::new("default", "ratings");
    let service = |key: &ObjectKey| ClusterKey::service(key.clone(), None, 9080);
    let reviews = Arc::as_ptr(&clusters.get(&service(&kept)));
    clusters.get(&service(&gone));
    // Destination-side clusters, one per port a caller picked.
    for port in 1..=100 {
        clusters.get(&ClusterKey::app(ObjectKey::new("default", "web-0"), port));
    }
    let busy = clusters.get(&ClusterKey::app(ObjectKey::new("default", "web-0"), 8080));
    clusters.prune(|key| *key == kept);
    let held = clusters.clusters.lock().len();
    assert_eq!(held, 2, "reviews' cluster and the app cluster in use");
    assert!(
        std::ptr::eq(Arc::as_ptr(&clusters.get(&service(&kept))), reviews),
        "a remaining Service keeps its cluster (and its ejections)"
    );
    drop(busy);
    clusters.prune(|key| *key == kept);
    assert_eq!(clusters.clusters.lock().len(), 1);
}
