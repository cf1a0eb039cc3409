//! Mirroring (a route's `mirror`): a copy of the request goes to another destination and its
//! answer is thrown away.
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, header, request::Parts};
use http_body_util::BodyExt;

use super::{super::metered::Record, Outbound, body::RequestBody, fault::chance};
use crate::{
    routing::{Destination, HttpRule, RetryPolicy},
    state::State,
};

impl Outbound {
    /// Mirrors the request when `rule` says so and the body could be kept for the copy.
    pub(super) fn mirror_if_asked(
        self: &Arc<Self>,
        state: &Arc<State>,
        rule: Option<&HttpRule>,
        parts: &Parts,
        body: &RequestBody,
    ) {
        if let (Some(mirror), RequestBody::Buffered(bytes)) =
            (rule.and_then(|r| r.mirror.as_ref()), body)
            && chance(mirror.percent)
        {
            self.clone().mirror(
                state.clone(),
                mirror.destination.clone(),
                parts,
                bytes.clone(),
            );
        }
    }

    /// Sends a copy to the mirror destination and ignores its answer (Envoy's shadowing:
    /// the copy's authority gets `-shadow` appended).
    fn mirror(
        self: Arc<Self>,
        state: Arc<State>,
        destination: Destination,
        parts: &Parts,
        body: Bytes,
    ) {
        let mut parts = parts.clone();
        let authority = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()));
        if let Some(authority) = authority
            && let Ok(value) = HeaderValue::from_str(&format!("{authority}-shadow"))
        {
            parts.headers.insert(header::HOST, value);
        }
        tokio::spawn(async move {
            let Some(plan) = self.plan(&state, destination) else {
                return;
            };
            let no_retries = RetryPolicy {
                attempts: 0,
                ..RetryPolicy::istio_default()
            };
            let mut record = Record::new(&parts.method, &parts.uri, &parts.headers, None);
            let outcome = self
                .attempts(
                    &state,
                    &plan,
                    &no_retries,
                    &parts,
                    RequestBody::Buffered(body),
                    &mut record,
                )
                .await;
            if let Ok((response, _)) = outcome {
                // Read the answer to the end so the connection returns to the pool.
                let _ = response.into_body().collect().await;
            }
        });
    }
}
