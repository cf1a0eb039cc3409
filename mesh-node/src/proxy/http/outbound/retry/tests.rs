use http::StatusCode;

use super::*;

fn retry_on(text: &str) -> RetryOn {
    RetryOn::parse("retryOn", text).expect("valid retryOn")
}

#[test]
fn five_xx_retries_every_failure_without_a_status_and_5xx_statuses() {
    let on = retry_on("5xx");
    for ended in [Ended::ConnectFailure, Ended::Reset, Ended::Timeout] {
        assert!(retriable(ended, &on), "{ended:?}");
    }
    assert!(retriable(Ended::Status(503), &on));
    assert!(retriable(Ended::Status(500), &on));
    assert!(!retriable(Ended::Status(404), &on));
    assert!(!retriable(Ended::Status(200), &on));
}

#[test]
fn narrow_conditions_retry_only_what_they_name() {
    let connect = retry_on("connect-failure");
    assert!(retriable(Ended::ConnectFailure, &connect));
    assert!(!retriable(Ended::Reset, &connect));
    assert!(!retriable(Ended::Timeout, &connect));
    assert!(!retriable(Ended::Status(503), &connect));

    let reset = retry_on("reset");
    assert!(retriable(Ended::Reset, &reset));
    assert!(
        retriable(Ended::Timeout, &reset),
        "Envoy treats a per-try timeout as a reset"
    );
    assert!(!retriable(Ended::ConnectFailure, &reset));

    let codes = retry_on("retriable-status-codes,418");
    assert!(retriable(Ended::Status(418), &codes));
    assert!(!retriable(Ended::Status(503), &codes));

    let gateway = retry_on("gateway-error");
    assert!(retriable(Ended::Status(502), &gateway));
    assert!(!retriable(Ended::Status(500), &gateway));
}

#[test]
fn failures_without_a_response_end_in_envoys_local_answers() {
    assert_eq!(Ended::ConnectFailure.local().flags, "UF");
    assert_eq!(Ended::Reset.local().flags, "UC");
    assert_eq!(Ended::Timeout.local().status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        Ended::Status(500).outlier_result(),
        AttemptResult::Status(500)
    );
    assert_eq!(Ended::Timeout.outlier_result(), AttemptResult::LocalFailure);
}

#[test]
fn backoff_doubles_from_25ms_up_to_250ms() {
    let ceilings: Vec<u128> = (1..=6).map(|n| backoff_ceiling(n).as_millis()).collect();
    assert_eq!(ceilings, vec![25, 50, 100, 200, 250, 250]);
    assert_eq!(backoff_ceiling(u32::MAX), RETRY_BACKOFF_MAX);
}

#[tokio::test(start_paused = true)]
async fn the_route_timeout_ends_attempts_that_outlast_it_with_envoys_504() {
    let slow = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok::<_, Local>("answered")
    };
    let ended = within_timeout(Some(Duration::from_secs(1)), slow).await;
    let Err(local) = ended else {
        panic!("the timeout should end it");
    };
    assert_eq!(
        (local.status, local.flags),
        (StatusCode::GATEWAY_TIMEOUT, "UT")
    );

    let quick = async { Ok::<_, Local>("answered") };
    assert_eq!(
        within_timeout(Some(Duration::from_secs(1)), quick)
            .await
            .ok(),
        Some("answered")
    );
    let unbounded = async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<_, Local>("answered late")
    };
    assert_eq!(
        within_timeout(None, unbounded).await.ok(),
        Some("answered late"),
        "no timeout: no limit"
    );
}
