//! Trace context in request headers: W3C Trace Context (`traceparent`, `tracestate`) and
//! Zipkin's B3, as separate `x-b3-*` headers or the single `b3` header.
//!
//! A proxy reads the caller's span from whichever format the request carries (W3C first,
//! then single B3, then multi-header B3) and hands on its own span in the formats the
//! request came with, so an app that only forwards B3 headers keeps working. A request
//! that carried no context starts a trace, announced in W3C and multi-header B3 (what
//! Istio's sample apps forward).
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    Context,
    propagation::TextMapPropagator,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
pub const B3_TRACE_ID: &str = "x-b3-traceid";
pub const B3_SPAN_ID: &str = "x-b3-spanid";
pub const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
pub const B3_SAMPLED: &str = "x-b3-sampled";
/// `1` asks for debug sampling, which implies sampled.
pub const B3_FLAGS: &str = "x-b3-flags";
pub const B3_SINGLE: &str = "b3";

/// The trace header formats a request carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Formats {
    pub w3c: bool,
    pub b3_multi: bool,
    pub b3_single: bool,
}

/// The caller's span, as the request's headers describe it.
#[derive(Clone, Debug, PartialEq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// `None`: the caller left the decision to the next hop (B3 without a sampling flag).
    pub sampled: Option<bool>,
    pub trace_state: TraceState,
}

impl Parent {
    /// The caller's span as the OpenTelemetry SDK takes a remote parent.
    pub fn span_context(&self, sampled: bool) -> SpanContext {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            self.trace_id,
            self.span_id,
            flags,
            true,
            self.trace_state.clone(),
        )
    }
}

/// What a request's headers say about its trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Extracted {
    pub parent: Option<Parent>,
    pub formats: Formats,
}

/// Reads the caller's span from `headers`.
pub fn extract(headers: &HeaderMap) -> Extracted {
    let formats = Formats {
        w3c: headers.contains_key(TRACEPARENT),
        b3_multi: headers.contains_key(B3_TRACE_ID),
        b3_single: headers.contains_key(B3_SINGLE),
    };
    let parent = w3c(headers)
        .or_else(|| b3_single(headers))
        .or_else(|| b3_multi(headers));
    Extracted { parent, formats }
}

/// Writes `span` (a child of `parent`) into `headers` in the formats the request came
/// with; W3C always, and multi-header B3 too when the request started a trace here.
pub fn inject(headers: &mut HeaderMap, span: &SpanContext, parent: Option<SpanId>, came: Formats) {
    if !span.is_valid() {
        return;
    }
    let sampled = if span.is_sampled() { "1" } else { "0" };
    let (trace_id, span_id) = (span.trace_id(), span.span_id());
    let flags = span.trace_flags().to_u8() & TraceFlags::SAMPLED.to_u8();
    set(
        headers,
        TRACEPARENT,
        format!("00-{trace_id}-{span_id}-{flags:02x}"),
    );
    let state = span.trace_state().header();
    if state.is_empty() {
        headers.remove(TRACESTATE);
    } else {
        set(headers, TRACESTATE, state);
    }
    if came.b3_multi || parent.is_none() {
        set(headers, B3_TRACE_ID, trace_id.to_string());
        set(headers, B3_SPAN_ID, span_id.to_string());
        set(headers, B3_SAMPLED, sampled.to_string());
        match parent {
            Some(parent) => set(headers, B3_PARENT_SPAN_ID, parent.to_string()),
            None => {
                headers.remove(B3_PARENT_SPAN_ID);
            }
        }
    }
    if came.b3_single {
        let parent = parent.map(|p| format!("-{p}")).unwrap_or_default();
        set(
            headers,
            B3_SINGLE,
            format!("{trace_id}-{span_id}-{sampled}{parent}"),
        );
    }
}

fn set(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

fn w3c(headers: &HeaderMap) -> Option<Parent> {
    let context = TraceContextPropagator::new()
        .extract_with_context(&Context::new(), &HeaderExtractor(headers));
    let span = context.span();
    let span = span.span_context();
    span.is_valid().then(|| Parent {
        trace_id: span.trace_id(),
        span_id: span.span_id(),
        sampled: Some(span.is_sampled()),
        trace_state: span.trace_state().clone(),
    })
}

/// `{trace}-{span}[-{sampling}[-{parent}]]`; a lone sampling state carries no span.
fn b3_single(headers: &HeaderMap) -> Option<Parent> {
    let value = headers.get(B3_SINGLE)?.to_str().ok()?;
    let mut parts = value.trim().split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = b3_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some("1" | "d") => Some(true),
        Some("0") => Some(false),
        Some(_) => return None,
    };
    Some(b3_parent(trace_id, span_id, sampled))
}

fn b3_multi(headers: &HeaderMap) -> Option<Parent> {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let trace_id = b3_trace_id(header(B3_TRACE_ID)?)?;
    let span_id = b3_span_id(header(B3_SPAN_ID)?)?;
    let sampled = if header(B3_FLAGS) == Some("1") {
        Some(true)
    } else {
        match header(B3_SAMPLED) {
            Some("1" | "true") => Some(true),
            Some("0" | "false") => Some(false),
            _ => None,
        }
    };
    Some(b3_parent(trace_id, span_id, sampled))
}

fn b3_parent(trace_id: TraceId, span_id: SpanId, sampled: Option<bool>) -> Parent {
    Parent {
        trace_id,
        span_id,
        sampled,
        trace_state: TraceState::default(),
    }
}

/// 64-bit (16 hex digits, widened with zeros) or 128-bit (32) trace ids.
fn b3_trace_id(hex: &str) -> Option<TraceId> {
    if !matches!(hex.len(), 16 | 32) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = u128::from_str_radix(hex, 16).ok()?;
    (id != 0).then(|| TraceId::from(id))
}

fn b3_span_id(hex: &str) -> Option<SpanId> {
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = u64::from_str_radix(hex, 16).ok()?;
    (id != 0).then(|| SpanId::from(id))
}
