//! Field values every routing resource shares: durations, percentages, status codes,
//! ports, counts and header operations, each checked with the field's path in the error.
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Serializer;

use super::{HeaderOps, RoutingError};

/// The longest duration any field takes: ten years is past every sensible timeout, interval
/// or ejection time, and keeps `now + duration` (and its multiples) far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Istio's protobuf durations ("10s", "0.5s") and Go/Gateway API ones ("100ms", "1h30m"):
/// one or more `<decimal><unit>` parts, units `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`; at most
/// [`MAX_DURATION`].
pub(super) fn duration(field: &str, value: &str) -> Result<Duration, RoutingError> {
    parse_duration(value)
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| RoutingError::BadDuration {
            field: field.to_string(),
            value: value.to_string(),
        })
}

fn parse_duration(text: &str) -> Option<Duration> {
    const NANOS_PER_SECOND: u128 = 1_000_000_000;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "h" => 3600 * NANOS_PER_SECOND,
            "m" => 60 * NANOS_PER_SECOND,
            "s" => NANOS_PER_SECOND,
            "ms" => 1_000_000,
            "us" | "µs" => 1_000,
            "ns" => 1,
            _ => return None,
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
            return None;
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        // Digits beyond nanoseconds of the unit cannot matter; cap them to avoid overflow.
        let fraction = &fraction[..fraction.len().min(18)];
        let fraction_nanos = if fraction.is_empty() {
            0
        } else {
            fraction.parse::<u128>().ok()? * unit_nanos / 10u128.pow(fraction.len() as u32)
        };
        total = total.checked_add(whole.checked_mul(unit_nanos)?.checked_add(fraction_nanos)?)?;
        rest = after;
    }
    let seconds = u64::try_from(total / NANOS_PER_SECOND).ok()?;
    Some(Duration::new(seconds, (total % NANOS_PER_SECOND) as u32))
}

pub(super) fn optional_duration(
    field: &str,
    value: Option<&String>,
) -> Result<Option<Duration>, RoutingError> {
    value.map(|v| duration(field, v)).transpose()
}

/// A percentage in 0..=100 (Istio's `percentage.value`, mirror percentages).
pub(super) fn percentage(field: &str, value: f64) -> Result<f64, RoutingError> {
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(RoutingError::BadPercentage {
            field: field.to_string(),
            value: value.to_string(),
        })
    }
}

pub(super) fn status(field: &str, value: i64) -> Result<u16, RoutingError> {
    u16::try_from(value)
        .ok()
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(|| RoutingError::BadStatus {
            field: field.to_string(),
            value,
        })
}

pub(super) fn port(field: &str, value: i64) -> Result<u16, RoutingError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| RoutingError::BadPort {
            field: field.to_string(),
            value,
        })
}

/// A non-negative count (connection limits, error thresholds).
pub(super) fn count(field: &str, value: i64) -> Result<u32, RoutingError> {
    u32::try_from(value).map_err(|_| RoutingError::Invalid {
        field: field.to_string(),
        reason: format!("{value} is not a count between 0 and {}", u32::MAX),
    })
}

pub(super) fn header_name(field: &str, name: &str) -> Result<HeaderName, RoutingError> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| RoutingError::Invalid {
        field: field.to_string(),
        reason: format!("{name:?} is not a valid HTTP header name"),
    })
}

fn header_value(field: &str, value: &str) -> Result<HeaderValue, RoutingError> {
    HeaderValue::from_str(value).map_err(|_| RoutingError::Invalid {
        field: field.to_string(),
        reason: format!("{value:?} is not a valid HTTP header value"),
    })
}

/// Header operations from `set`/`add` name–value pairs and `remove` names, both spellings
/// (Istio maps, Gateway API lists) reduced to pairs by the caller.
pub(super) fn header_ops<'a>(
    field: &str,
    set: impl IntoIterator<Item = (&'a str, &'a str)>,
    add: impl IntoIterator<Item = (&'a str, &'a str)>,
    remove: impl IntoIterator<Item = &'a str>,
) -> Result<HeaderOps, RoutingError> {
    let pairs = |list: &str, items: Vec<(&str, &str)>| {
        items
            .into_iter()
            .map(|(name, value)| {
                let at = format!("{field}.{list}[{name}]");
                Ok((header_name(&at, name)?, header_value(&at, value)?))
            })
            .collect::<Result<Vec<_>, RoutingError>>()
    };
    Ok(HeaderOps {
        set: pairs("set", set.into_iter().collect())?,
        add: pairs("add", add.into_iter().collect())?,
        remove: remove
            .into_iter()
            .map(|name| header_name(&format!("{field}.remove"), name))
            .collect::<Result<_, _>>()?,
    })
}

// === serialization for the admin API ===

pub(super) fn serialize_duration<S: Serializer>(
    value: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*value))
}

pub(super) fn serialize_optional_duration<S: Serializer>(
    value: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => serialize_duration(value, serializer),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_istio_and_go_forms() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("10s", ms(10_000)),
            ("0.5s", ms(500)),
            (".25s", ms(250)),
            ("100ms", ms(100)),
            ("1h30m", ms(5_400_000)),
            ("1m0.5s", ms(60_500)),
            ("250us", Duration::from_micros(250)),
            ("0s", Duration::ZERO),
            ("0.000000001s", Duration::from_nanos(1)),
        ] {
            assert_eq!(parse_duration(text), Some(want), "{text}");
        }
        for text in ["", "10", "s", "-1s", "1.2.3s", "10 s", "1d", "ten seconds"] {
            assert_eq!(parse_duration(text), None, "{text:?} must not parse");
        }
    }

    #[test]
    fn durations_past_the_bound_are_refused_not_overflowed() {
        assert!(
            duration("timeout", "87600h").is_ok(),
            "ten years is allowed"
        );
        for huge in ["87601h", "10000000000000000000s", "9999999999999999999h"] {
            let error = duration("outlierDetection.baseEjectionTime", huge).unwrap_err();
            assert!(error.to_string().contains(huge), "{error}");
        }
    }

    proptest::proptest! {
        /// Any text: no panic, and never more than the bound.
        #[test]
        fn fuzz_durations(text in "\\PC{0,24}|[0-9.]{1,30}(h|m|s|ms|us|ns){1,3}") {
            if let Ok(parsed) = duration("timeout", &text) {
                proptest::prop_assert!(parsed <= MAX_DURATION);
            }
        }

        /// What Istio writes parses to what it means.
        #[test]
        fn fuzz_durations_round_trip(millis in 0u64..MAX_DURATION.as_millis() as u64) {
            let text = format!("{}.{:03}s", millis / 1000, millis % 1000);
            proptest::prop_assert_eq!(duration("timeout", &text), Ok(Duration::from_millis(millis)));
        }
    }
}
