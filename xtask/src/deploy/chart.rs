//! The Helm chart's templates: the plain manifests with each value from `values.yaml` put
//! back as the Helm expression that reads it. A substitution that finds nothing is an error,
//! so a knob cannot silently stop reaching the chart.
use anyhow::bail;
use serde_json::{Value, json};

use super::{
    Values,
    objects::{Manifest, NAMESPACE},
    render,
};

const RAW: &str = "__HELM_RAW__";
const BLOCK: &str = "__HELM_BLOCK__";
const END: &str = "__HELM_END__";

/// Where a default value stands in the manifests, and the Helm expression that replaces it.
struct Substitution {
    /// Only in this manifest file (`None`: any).
    file: Option<&'static str>,
    /// Only as the value of this field (`None`: any field or list item).
    key: Option<&'static str>,
    value: Value,
    helm: Helm,
}

enum Helm {
    /// Text in place of the scalar, e.g. `{{ .Values.logLevel | quote }}`.
    Scalar(&'static str),
    /// A YAML block rendered from a value, e.g. `toYaml .Values.agent.resources`.
    Block(&'static str),
}

fn substitutions(values: &Values) -> anyhow::Result<Vec<Substitution>> {
    let metrics_port = values.agent.metrics_port;
    let any = |key: Option<&'static str>, value: Value, helm| Substitution {
        file: None,
        key,
        value,
        helm,
    };
    Ok(vec![
        any(
            None,
            json!(NAMESPACE),
            Helm::Scalar("{{ .Release.Namespace }}"),
        ),
        any(
            Some("image"),
            json!(values.image.reference()),
            Helm::Scalar(r#""{{ .Values.image.repository }}:{{ .Values.image.tag }}""#),
        ),
        any(
            Some("imagePullPolicy"),
            json!(values.image.pull_policy),
            Helm::Scalar("{{ .Values.image.pullPolicy }}"),
        ),
        any(
            Some("value"),
            json!(values.log_level),
            Helm::Scalar("{{ .Values.logLevel | quote }}"),
        ),
        any(
            None,
            json!(format!("0.0.0.0:{metrics_port}")),
            Helm::Scalar("0.0.0.0:{{ .Values.agent.metricsPort }}"),
        ),
        any(
            Some("containerPort"),
            json!(metrics_port),
            Helm::Scalar("{{ .Values.agent.metricsPort }}"),
        ),
        any(
            Some("prometheus.io/port"),
            json!(metrics_port.to_string()),
            Helm::Scalar("{{ .Values.agent.metricsPort | quote }}"),
        ),
        any(
            None,
            json!(values.ca.address),
            Helm::Scalar("{{ .Values.ca.address | quote }}"),
        ),
        any(
            Some("replicas"),
            json!(values.ca.replicas),
            Helm::Scalar("{{ .Values.ca.replicas }}"),
        ),
        any(
            Some("path"),
            json!(values.agent.cni.bin_dir),
            Helm::Scalar("{{ .Values.agent.cni.binDir }}"),
        ),
        any(
            Some("path"),
            json!(values.agent.cni.conf_dir),
            Helm::Scalar("{{ .Values.agent.cni.confDir }}"),
        ),
        any(
            Some("tolerations"),
            serde_json::to_value(&values.agent.tolerations)?,
            Helm::Block("toYaml .Values.agent.tolerations"),
        ),
        Substitution {
            file: Some("daemonset.yaml"),
            ..any(
                Some("resources"),
                serde_json::to_value(&values.agent.resources)?,
                Helm::Block("toYaml .Values.agent.resources"),
            )
        },
        Substitution {
            file: Some("ca.yaml"),
            ..any(
                Some("resources"),
                serde_json::to_value(&values.ca.resources)?,
                Helm::Block("toYaml .Values.ca.resources"),
            )
        },
    ])
}

/// `templates/<file>` of the chart, by file name. The namespace is Helm's to create
/// (`--create-namespace`), so its manifest has no template.
pub fn templates(
    values: &Values,
    manifests: &[Manifest],
    pod_monitor: &Manifest,
) -> anyhow::Result<Vec<(String, String)>> {
    let substitutions = substitutions(values)?;
    let mut used = vec![0_usize; substitutions.len()];
    let mut templates = Vec::new();
    for manifest in manifests
        .iter()
        .filter(|m| m.file != "namespace.yaml")
        .chain([pod_monitor])
    {
        let objects: Vec<Value> = manifest
            .objects
            .iter()
            .map(|object| {
                let mut object = object.clone();
                substitute(&mut object, None, manifest.file, &substitutions, &mut used);
                object
            })
            .collect();
        let mut template = expand_markers(&render(manifest, &objects)?);
        if std::ptr::eq(manifest, pod_monitor) {
            template = wrap_in_condition(&template, ".Values.podMonitor.enabled");
        }
        templates.push((manifest.file.to_string(), template));
    }
    if let Some(unused) = used.iter().position(|&count| count == 0) {
        let substitution = &substitutions[unused];
        bail!(
            "the chart's substitution of {} found no such value in the manifests: the \
             generator and values.yaml disagree",
            substitution.value
        );
    }
    Ok(templates)
}

/// Replaces, depth first, every value a substitution names with its marker.
fn substitute(
    value: &mut Value,
    key: Option<&str>,
    file: &str,
    substitutions: &[Substitution],
    used: &mut [usize],
) {
    let found = substitutions.iter().position(|s| {
        s.file.is_none_or(|f| f == file)
            && s.key.is_none_or(|k| Some(k) == key)
            && s.value == *value
    });
    if let Some(index) = found {
        used[index] += 1;
        *value = match substitutions[index].helm {
            Helm::Scalar(text) => json!(format!("{RAW}{text}{END}")),
            Helm::Block(expression) => json!(format!("{BLOCK}{expression}{END}")),
        };
        return;
    }
    match value {
        Value::Object(fields) => {
            for (name, field) in fields.iter_mut() {
                substitute(field, Some(name), file, substitutions, used);
            }
        }
        Value::Array(items) => {
            for item in items {
                substitute(item, None, file, substitutions, used);
            }
        }
        _ => {}
    }
}

/// Turns the markers serde_yaml wrote (quoted or not) into Helm template text.
fn expand_markers(yaml: &str) -> String {
    let mut out = String::with_capacity(yaml.len());
    for line in yaml.lines() {
        if let Some(start) = line.find(BLOCK) {
            // `<indent>[- ]key: __HELM_BLOCK__expr__HELM_END__`: the block goes under `key:`,
            // indented two past the key.
            let head = line[..start].trim_end_matches(['\'', '"', ' ']);
            let expression = between(&line[start + BLOCK.len()..]);
            let key_column = head.len() - head.trim_start_matches([' ', '-']).len();
            out.push_str(&format!(
                "{head}\n{{{{- {expression} | nindent {} }}}}\n",
                key_column + 2
            ));
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find(RAW) {
            let before = rest[..start].trim_end_matches(['\'', '"']);
            let after = &rest[start + RAW.len()..];
            out.push_str(before);
            out.push_str(between(after));
            let end = after.find(END).expect("every marker is closed") + END.len();
            rest = after[end..].trim_start_matches(['\'', '"']);
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}

/// The text before the closing marker.
fn between(text: &str) -> &str {
    &text[..text.find(END).expect("every marker is closed")]
}

fn wrap_in_condition(template: &str, condition: &str) -> String {
    let (header, body): (Vec<&str>, Vec<&str>) = {
        let split = template
            .lines()
            .position(|l| !l.starts_with('#'))
            .unwrap_or(0);
        let lines: Vec<&str> = template.lines().collect();
        (lines[..split].to_vec(), lines[split..].to_vec())
    };
    format!(
        "{}\n{{{{ if {condition} -}}}}\n{}\n{{{{- end }}}}\n",
        header.join("\n"),
        body.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::{super::objects, *};

    #[test]
    fn markers_become_helm_text_quoted_or_not() {
        let yaml = format!(
            "image: '{RAW}\"{{{{ .Values.image }}}}\"{END}'\n- --addr\n- 0.0.0.0:{RAW}{{{{ \
             .Values.port }}}}{END}\n  - resources: {BLOCK}toYaml .Values.r{END}\n"
        );
        assert_eq!(
            expand_markers(&yaml),
            "image: \"{{ .Values.image }}\"\n- --addr\n- 0.0.0.0:{{ .Values.port }}\n  - \
             resources:\n{{- toYaml .Values.r | nindent 6 }}\n"
        );
    }

    /// Renders the few Helm forms the generator writes, with `values.yaml`'s defaults and
    /// every condition true: enough to compare the chart with the plain manifests where
    /// `helm` itself is not installed.
    fn render_defaults(template: &str, values: &serde_yaml::Value) -> String {
        let lookup = |path: &str| {
            path.trim_start_matches(".Values.")
                .split('.')
                .fold(values, |value, key| &value[key])
                .clone()
        };
        let scalar = |value: serde_yaml::Value| match value {
            serde_yaml::Value::String(text) => text,
            other => serde_yaml::to_string(&other)
                .unwrap()
                .trim_end()
                .to_string(),
        };
        let mut out = String::new();
        let mut rest = template;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find("}}").expect("closed action") + start;
            let mut action = &rest[start + 2..end];
            rest = &rest[end + 2..];
            if let Some(trimmed) = action.strip_prefix('-') {
                out.truncate(out.trim_end().len());
                action = trimmed;
            }
            if let Some(trimmed) = action.strip_suffix('-') {
                rest = rest.trim_start();
                action = trimmed;
            }
            let words: Vec<&str> = action.split_whitespace().collect();
            match words.as_slice() {
                ["if", _] | ["end"] => {}
                [".Release.Namespace"] => out.push_str(objects::NAMESPACE),
                [path] => out.push_str(&scalar(lookup(path))),
                [path, "|", "quote"] => out.push_str(&format!("{:?}", scalar(lookup(path)))),
                ["toYaml", path, "|", "nindent", indent] => {
                    let indent = " ".repeat(indent.parse().unwrap());
                    for line in serde_yaml::to_string(&lookup(path)).unwrap().lines() {
                        out.push_str(&format!("\n{indent}{line}"));
                    }
                }
                _ => panic!("the generator wrote a Helm action this test does not know: {action}"),
            }
        }
        out.push_str(rest);
        out
    }

    fn documents(text: &str) -> Vec<serde_yaml::Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|document| serde::Deserialize::deserialize(document).unwrap())
            .collect()
    }

    #[test]
    fn the_chart_with_its_defaults_is_the_plain_install() {
        let deploy_dir = super::super::deploy_dir();
        let values_text =
            std::fs::read_to_string(deploy_dir.join("helm/nodemesh/values.yaml")).unwrap();
        let values: serde_yaml::Value = serde_yaml::from_str(&values_text).unwrap();
        let files = super::super::generated_files(&deploy_dir).unwrap();
        let mut compared = 0;
        for (path, template) in &files {
            let Ok(file) = path.strip_prefix("helm/nodemesh/templates") else {
                continue;
            };
            let plain = &files[&std::path::Path::new("manifests").join(file)];
            assert_eq!(
                documents(&render_defaults(template, &values)),
                documents(plain),
                "the chart's {} rendered with values.yaml should be manifests/{}",
                file.display(),
                file.display()
            );
            compared += 1;
        }
        // rbac, ca, daemonset, podmonitor: every file but the namespace's (Helm's to create).
        assert_eq!(
            compared, 4,
            "every template but the namespace's is compared"
        );
    }

    #[test]
    fn a_knob_that_reaches_nothing_is_an_error() {
        let mut values = super::super::Values::load(&super::super::deploy_dir()).unwrap();
        let manifests = super::super::objects::manifests(&values);
        let pod_monitor = super::super::objects::pod_monitor_manifest();
        // The manifests were built with the old port: the chart's knob would reach nothing.
        values.agent.metrics_port += 100;
        let error = templates(&values, &manifests, &pod_monitor)
            .expect_err("a metrics port the manifests do not have reaches nothing");
        assert!(error.to_string().contains("15120"), "{error}");
    }
}
