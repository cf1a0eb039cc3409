//! Reading the agents' Prometheus text exposition.

/// One sample line of the Prometheus text format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name as written (`_total`, `_bucket` … suffixes included).
    pub name: String,
    /// Labels in the order written, values unescaped.
    pub labels: Vec<(String, String)>,
    /// The value; `NaN`, `+Inf` and `-Inf` are accepted.
    pub value: f64,
}

/// Parses every sample line of `text`; comments, blank and malformed lines are skipped.
pub fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// The sum of the samples named exactly `name` whose labels include every pair of
/// `labels` (other labels may be present), or `None` when no sample matches.
///
/// Summing makes `metric_value(text, "x_total", &[("direction", "inbound")])` total a
/// counter over the labels the caller does not care about.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse_samples(text)
        .into_iter()
        .filter(|sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|sample| sample.value)
        .reduce(|a, b| a + b)
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    // What follows is `value [timestamp]`.
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` (the opening brace already consumed), returning the labels
/// and the text after the closing brace. Values may hold `,`, `}` and escapes.
fn parse_labels(text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim();
        if key.is_empty() {
            return None;
        }
        rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let close = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        rest = rest[close + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP nodemesh_connections_total Connections proxied.
# TYPE nodemesh_connections_total counter
nodemesh_connections_total{direction="outbound",service="echo.default",result="ok"} 3
nodemesh_connections_total{direction="outbound",service="web.default",result="ok"} 4 1700000000000
nodemesh_connections_total{direction="inbound",service="echo.default",result="refused"} 1.5e1
nodemesh_connections_total_created{direction="inbound"} 99
nodemesh_up 1
weird{path="/a,b}c\"d\\e\nf" , empty=""} 7
trailing_comma{a="1",} 2
odd{le="+Inf"} +Inf
not_a_number{x="y"} NaN
broken{a="1" 5
bad_value 12abc
"#;

    #[test]
    fn sums_matching_samples() {
        assert_eq!(
            metric_value(TEXT, "nodemesh_connections_total", &[]),
            Some(22.0)
        );
        assert_eq!(
            metric_value(
                TEXT,
                "nodemesh_connections_total",
                &[("direction", "outbound")]
            ),
            Some(7.0)
        );
        assert_eq!(
            metric_value(
                TEXT,
                "nodemesh_connections_total",
                &[("service", "echo.default"), ("direction", "inbound")]
            ),
            Some(15.0)
        );
    }

    #[test]
    fn absent_metric_or_labels_give_none() {
        assert_eq!(metric_value(TEXT, "nodemesh_connections", &[]), None);
        assert_eq!(metric_value(TEXT, "nodemesh_up", &[("a", "b")]), None);
        assert_eq!(
            metric_value(
                TEXT,
                "nodemesh_connections_total",
                &[("direction", "sideways")]
            ),
            None
        );
    }

    #[test]
    fn unlabelled_and_exact_names() {
        assert_eq!(metric_value(TEXT, "nodemesh_up", &[]), Some(1.0));
        // A name that is a prefix of another metric does not match it.
        assert_eq!(
            metric_value(TEXT, "nodemesh_connections_total_created", &[]),
            Some(99.0)
        );
    }

    #[test]
    fn label_values_with_special_characters() {
        assert_eq!(
            metric_value(TEXT, "weird", &[("path", "/a,b}c\"d\\e\nf"), ("empty", "")]),
            Some(7.0)
        );
        assert_eq!(
            metric_value(TEXT, "trailing_comma", &[("a", "1")]),
            Some(2.0)
        );
    }

    #[test]
    fn special_values_and_malformed_lines() {
        assert_eq!(
            metric_value(TEXT, "odd", &[("le", "+Inf")]),
            Some(f64::INFINITY)
        );
        assert!(metric_value(TEXT, "not_a_number", &[]).unwrap().is_nan());
        assert_eq!(metric_value(TEXT, "broken", &[]), None);
        assert_eq!(metric_value(TEXT, "bad_value", &[]), None);
        assert_eq!(parse_samples(TEXT).len(), 9);
    }

    #[test]
    fn parses_labels_in_order() {
        let samples = parse_samples("m{b=\"2\",a=\"1\"} 3 42\n");
        assert_eq!(
            samples,
            vec![Sample {
                name: "m".into(),
                labels: vec![("b".into(), "2".into()), ("a".into(), "1".into())],
                value: 3.0,
            }]
        );
    }
}
