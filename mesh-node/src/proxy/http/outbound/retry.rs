//! Attempts, retries and timeouts (a route's `retries` and `timeout`, Envoy's rules): which
//! endpoint each attempt goes to, the per-try timeout, the jittered back-off between
//! attempts, and which failures `retryOn` retries.
use std::{future::Future, net::SocketAddr, time::Duration};

use http::{HeaderValue, Request, Response, request::Parts};
use hyper::body::Incoming;
use tracing::debug;

use super::{
    super::{
        ProxyBody,
        cluster::AttemptResult,
        metered::Record,
        upstream::{Connector, SendError},
    },
    Outbound, Plan, absolute_uri,
    body::RequestBody,
    replies::{CONNECT_FAILURE, Local, NO_HEALTHY_UPSTREAM, OVERFLOW, RESET, TIMEOUT},
};
use crate::{
    inventory::ObjectKey,
    routing::{RetryOn, RetryPolicy},
    state::State,
};

/// Envoy's retry back-off: 25 ms base, doubling, with jitter, at most ten times the base.
const RETRY_BACKOFF_BASE: Duration = Duration::from_millis(25);
const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// How one attempt on an endpoint ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ended {
    Status(u16),
    ConnectFailure,
    Reset,
    /// `perTryTimeout` elapsed.
    Timeout,
}

impl Ended {
    pub(super) fn outlier_result(self) -> AttemptResult {
        match self {
            Ended::Status(status) => AttemptResult::Status(status),
            _ => AttemptResult::LocalFailure,
        }
    }

    /// The proxy's own answer when the last attempt ended without a response.
    pub(super) fn local(self) -> Local {
        match self {
            Ended::ConnectFailure => CONNECT_FAILURE,
            Ended::Reset => RESET,
            Ended::Timeout | Ended::Status(_) => TIMEOUT,
        }
    }
}

/// Whether `retryOn` retries an attempt that ended so. As in Envoy, `5xx` and
/// `gateway-error` include the failures that never produced a status.
pub(super) fn retriable(ended: Ended, on: &RetryOn) -> bool {
    let no_status = on.five_xx || on.gateway_error;
    match ended {
        Ended::Status(status) => on.retries_status(status),
        Ended::ConnectFailure => on.connect_failure || no_status,
        Ended::Reset => on.reset || no_status,
        Ended::Timeout => on.reset || no_status,
    }
}

/// The upper bound of the jittered pause before retry number `retry` (1-based).
pub(super) fn backoff_ceiling(retry: u32) -> Duration {
    RETRY_BACKOFF_BASE
        .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)))
        .min(RETRY_BACKOFF_MAX)
}

/// Runs `attempts` within the route's `timeout`, if it has one: past it, the client gets
/// Envoy's 504.
pub(super) async fn within_timeout<T>(
    limit: Option<Duration>,
    attempts: impl Future<Output = Result<T, Local>>,
) -> Result<T, Local> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, attempts)
            .await
            .unwrap_or(Err(TIMEOUT)),
        None => attempts.await,
    }
}

impl Outbound {
    /// Tries the request up to the retry policy's limit; returns the response to give the
    /// client and the endpoint that gave it, or how the proxy ends the request itself.
    pub(super) async fn attempts(
        &self,
        state: &State,
        plan: &Plan<'_>,
        retries: &RetryPolicy,
        parts: &Parts,
        mut body: RequestBody,
        record: &mut Record,
    ) -> Result<(Response<Incoming>, ObjectKey), Local> {
        let max_attempts = body.max_attempts(retries);
        let addresses: Vec<SocketAddr> = plan.candidates.iter().map(|(_, a)| *a).collect();
        let hash = self.hash_input(&plan.policy.load_balancer, parts);
        let mut tried = Vec::new();
        let mut _retry_slot = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            if attempt > 1 {
                let slot = plan.cluster.start_retry(&plan.policy.connection_pool);
                _retry_slot = Some(slot.ok_or(OVERFLOW)?);
                let ceiling = backoff_ceiling(attempt - 1);
                let jitter = rand::random_range(0..=ceiling.as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            let Some(endpoint) =
                plan.cluster
                    .pick(&addresses, &plan.policy.load_balancer, hash, &tried)
            else {
                return Err(NO_HEALTHY_UPSTREAM);
            };
            tried.push(endpoint);
            record.upstream = Some(endpoint);
            let request = Request::from_parts(parts.clone(), body.for_attempt());
            let sent = self.attempt(state, plan, retries, request, endpoint, attempt);
            let (ended, response) = sent.await?;
            let detection = plan.policy.outlier_detection.as_ref();
            if plan
                .cluster
                .report(endpoint, ended.outlier_result(), detection, addresses.len())
            {
                self.proxy
                    .metrics
                    .node
                    .outlier_ejected(&plan.destination.service.to_string());
            }
            let retry = retriable(ended, &retries.retry_on);
            if attempt >= max_attempts || !retry {
                if attempt > 1 && retry {
                    record.flags.push("URX");
                }
                return match response {
                    Some(response) => Ok((response, plan.endpoint_key(endpoint))),
                    None => Err(ended.local()),
                };
            }
        }
    }

    /// Sends `request` to `endpoint` once, within the per-try timeout: how the attempt
    /// ended and the response if one came. A full connection pool or no identity for the
    /// upstream ends the whole request.
    async fn attempt(
        &self,
        state: &State,
        plan: &Plan<'_>,
        retries: &RetryPolicy,
        mut request: Request<ProxyBody>,
        endpoint: SocketAddr,
        attempt: u32,
    ) -> Result<(Ended, Option<Response<Incoming>>), Local> {
        let limits = &plan.policy.connection_pool;
        let overflow = || {
            self.proxy
                .metrics
                .node
                .upstream_overflow(&plan.destination.service.to_string());
            OVERFLOW
        };
        let Some(_active) = plan.cluster.start_request(endpoint, limits) else {
            return Err(overflow());
        };
        request
            .headers_mut()
            .insert("x-envoy-attempt-count", HeaderValue::from(attempt));
        if request.version() == http::Version::HTTP_2 {
            absolute_uri(&mut request);
        }
        let via = self.via(state, endpoint).map_err(|error| {
            debug!(%error, %endpoint, "no identity for the upstream");
            CONNECT_FAILURE
        })?;
        let connector = Connector {
            pod: &self.pod,
            proxy: &self.proxy,
            endpoint,
            via,
        };
        let send = self
            .proxy
            .upstreams
            .send(&plan.cluster, limits, &connector, request);
        let sent = match retries.per_try_timeout {
            Some(limit) => tokio::time::timeout(limit, send).await.ok(),
            None => Some(send.await),
        };
        Ok(match sent {
            Some(Ok(response)) => (Ended::Status(response.status().as_u16()), Some(response)),
            Some(Err(SendError::Overflow)) => return Err(overflow()),
            Some(Err(SendError::Connect(error))) => {
                debug!(%error, %endpoint, "upstream connect failed");
                (Ended::ConnectFailure, None)
            }
            Some(Err(SendError::Reset(error))) => {
                debug!(%error, %endpoint, "upstream reset");
                (Ended::Reset, None)
            }
            None => (Ended::Timeout, None),
        })
    }
}

#[cfg(test)]
mod tests;
