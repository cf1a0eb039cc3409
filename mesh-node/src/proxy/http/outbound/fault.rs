//! Fault injection (a VirtualService's `fault`): a delay, an abort, each for a share of
//! requests.
use http::{Response, StatusCode};

use super::super::{ProxyBody, local_response, metered::Record};
use crate::routing::Fault;

/// Rolls a percentage (0–100) the way Envoy's runtime fractions do.
pub(super) fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && rand::random_range(0.0..100.0) < percent)
}

/// Applies `fault` to a request: sleeps when the delay's roll says so, and answers in the
/// request's place when the abort's does (the request then goes no further).
pub(super) async fn inject(fault: &Fault, record: &mut Record) -> Option<Response<ProxyBody>> {
    if let Some(delay) = fault.delay.as_ref().filter(|d| chance(d.percent)) {
        tokio::time::sleep(delay.fixed).await;
        record.flags.push("DI");
    }
    let abort = fault.abort.as_ref().filter(|a| chance(a.percent))?;
    let status = StatusCode::from_u16(abort.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    record.flags.push("FI");
    Some(local_response(status, "fault filter abort"))
}

#[cfg(test)]
mod tests;
