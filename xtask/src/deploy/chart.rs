//! The Helm chart's templates: the plain manifests with each value from `values.yaml` put
//! back as the Helm expression that reads it. A substitution that finds nothing is an error,
//! so a knob cannot silently stop reaching the chart.
//!
//! A substituted scalar is first a marker that carries both texts,
//! `__HELM_RAW__<helm>__HELM_DEFAULT__<default>__HELM_END__`, so the manifest's comments
//! still find their lines (`plain_line`) before the markers become Helm text
//! (`expand_markers`).
use anyhow::bail;
use serde_json::{Value, json};

use super::{
    Values,
    objects::{self, Manifest, NAMESPACE},
    render,
};

const RAW: &str = "__HELM_RAW__";
const BLOCK: &str = "__HELM_BLOCK__";
const IF: &str = "__HELM_IF__";
/// Between a scalar marker's Helm text and the default value it stands for.
const DEFAULT: &str = "__HELM_DEFAULT__";
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
    /// The value stays; its line (a list item, written unquoted) is kept only when the
    /// condition holds, e.g. `.Values.holder.enabled`.
    LineIf(&'static str),
}

fn substitutions(values: &Values) -> anyhow::Result<Vec<Substitution>> {
    let metrics_port = values.agent.metrics_port;
    let drain_timeout = values.agent.drain_timeout_seconds;
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
            Some("replacement"),
            json!(format!("${{1}}:{metrics_port}")),
            Helm::Scalar("${1}:{{ .Values.agent.metricsPort }}"),
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
        Substitution {
            file: Some("ca.yaml"),
            ..any(
                Some("replicas"),
                json!(values.ca.replicas),
                Helm::Scalar("{{ .Values.ca.replicas }}"),
            )
        },
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
            file: Some("daemonset.yaml"),
            ..any(
                None,
                json!(format!("--drain-timeout={drain_timeout}s")),
                Helm::Scalar("--drain-timeout={{ .Values.agent.drainTimeoutSeconds }}s"),
            )
        },
        Substitution {
            file: Some("daemonset.yaml"),
            ..any(
                None,
                json!(format!(
                    "--outbound-traffic-policy={}",
                    values.agent.outbound_traffic_policy
                )),
                Helm::Scalar("--outbound-traffic-policy={{ .Values.agent.outboundTrafficPolicy }}"),
            )
        },
        Substitution {
            file: Some("daemonset.yaml"),
            ..any(
                Some("terminationGracePeriodSeconds"),
                json!(drain_timeout + objects::DRAIN_MARGIN_SECONDS),
                // objects::DRAIN_MARGIN_SECONDS: the defaults test fails if they differ.
                Helm::Scalar("{{ add .Values.agent.drainTimeoutSeconds 5 }}"),
            )
        },
        Substitution {
            // Without a holder the agent runs on its own: a restart refuses new connections
            // until the next agent listens, rather than dialling a socket nobody serves.
            file: Some("daemonset.yaml"),
            ..any(
                None,
                json!("--holder-socket=/var/run/nodemesh/holder.sock"),
                Helm::LineIf(".Values.holder.enabled"),
            )
        },
        Substitution {
            file: Some("holder.yaml"),
            ..any(
                Some("resources"),
                serde_json::to_value(&values.holder.resources)?,
                Helm::Block("toYaml .Values.holder.resources"),
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
        Substitution {
            file: Some("gateway.yaml"),
            ..any(
                Some("resources"),
                serde_json::to_value(&values.gateway.resources)?,
                Helm::Block("toYaml .Values.gateway.resources"),
            )
        },
        Substitution {
            file: Some("gateway.yaml"),
            ..any(
                None,
                json!(format!(
                    "--num-trusted-proxies={}",
                    values.gateway.num_trusted_proxies
                )),
                Helm::Scalar("--num-trusted-proxies={{ .Values.gateway.numTrustedProxies }}"),
            )
        },
        Substitution {
            file: Some("gateway.yaml"),
            ..any(
                None,
                json!(format!("--gateway-class={}", values.gateway.class_name)),
                Helm::Scalar("--gateway-class={{ .Values.gateway.className }}"),
            )
        },
        Substitution {
            file: Some("gateway.yaml"),
            ..any(
                Some("replicas"),
                json!(values.gateway.replicas),
                Helm::Scalar("{{ .Values.gateway.replicas }}"),
            )
        },
        Substitution {
            file: Some("gateway.yaml"),
            ..any(
                Some("ports"),
                serde_json::to_value(&values.gateway.ports)?,
                Helm::Block("toYaml .Values.gateway.ports"),
            )
        },
        Substitution {
            file: Some("gateway.yaml"),
            ..any(
                Some("type"),
                json!(values.gateway.service_type),
                Helm::Scalar("{{ .Values.gateway.serviceType | quote }}"),
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
    gateway: &Manifest,
) -> anyhow::Result<Vec<(String, String)>> {
    let substitutions = substitutions(values)?;
    let mut used = vec![0_usize; substitutions.len()];
    let mut templates = Vec::new();
    for manifest in manifests
        .iter()
        .filter(|m| m.file != "namespace.yaml")
        .chain([pod_monitor, gateway])
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
        if manifest.file == "holder.yaml" {
            template = wrap_in_condition(&template, ".Values.holder.enabled");
        }
        if std::ptr::eq(manifest, gateway) {
            template = wrap_in_condition(&template, ".Values.gateway.enabled");
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
        let default = match &*value {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        *value = match substitutions[index].helm {
            Helm::Scalar(text) => json!(format!("{RAW}{text}{DEFAULT}{default}{END}")),
            Helm::Block(expression) => json!(format!("{BLOCK}{expression}{END}")),
            Helm::LineIf(condition) => json!(format!("{IF}{condition}{DEFAULT}{default}{END}")),
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

/// `line`, trimmed, with each scalar marker read as the default it stands for: the line of
/// the plain manifest, which is how comments name it.
pub(super) fn plain_line(line: &str) -> String {
    replace_scalar_markers(line, |_, _, default| default.to_string())
        .trim()
        .to_string()
}

/// `line` with each scalar marker (`RAW` or `IF`), and the quotes serde_yaml may have put
/// around it, replaced by `pick(kind, helm, default)`.
fn replace_scalar_markers(line: &str, mut pick: impl FnMut(&str, &str, &str) -> String) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some((start, kind)) = [RAW, IF]
        .into_iter()
        .filter_map(|kind| rest.find(kind).map(|start| (start, kind)))
        .min()
    {
        out.push_str(rest[..start].trim_end_matches(['\'', '"']));
        let after = &rest[start + kind.len()..];
        let (helm, default) = between(after)
            .split_once(DEFAULT)
            .expect("a scalar marker carries its default");
        out.push_str(&pick(kind, helm, default));
        let end = after.find(END).expect("every marker is closed") + END.len();
        rest = after[end..].trim_start_matches(['\'', '"']);
    }
    out.push_str(rest);
    out
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
        let mut condition = None;
        let expanded = replace_scalar_markers(line, |kind, helm, default| {
            if kind == IF {
                condition = Some(helm.to_string());
                default.to_string()
            } else {
                helm.to_string()
            }
        });
        match condition {
            // `{{-` eats the newline before it, so the line is there or not, nothing else.
            Some(condition) => out.push_str(&format!(
                "{{{{- if {condition} }}}}\n{expanded}\n{{{{- end }}}}\n"
            )),
            None => {
                out.push_str(&expanded);
                out.push('\n');
            }
        }
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
            "image: '{RAW}\"{{{{ .Values.image }}}}\"{DEFAULT}i:1{END}'\n- --addr\n- \
             0.0.0.0:{RAW}{{{{ .Values.port }}}}{DEFAULT}80{END}\n  - resources: \
             {BLOCK}toYaml .Values.r{END}\n  - {IF}.Values.on{DEFAULT}--flag{END}  # why\n"
        );
        assert_eq!(
            expand_markers(&yaml),
            "image: \"{{ .Values.image }}\"\n- --addr\n- 0.0.0.0:{{ .Values.port }}\n  - \
             resources:\n{{- toYaml .Values.r | nindent 6 }}\n{{- if .Values.on }}\n  - \
             --flag  # why\n{{- end }}\n"
        );
    }

    #[test]
    fn a_comment_finds_its_line_by_the_default_value() {
        let line = format!("  - 0.0.0.0:{RAW}{{{{ .Values.port }}}}{DEFAULT}80{END}");
        assert_eq!(plain_line(&line), "- 0.0.0.0:80");
        assert_eq!(plain_line("  a: 1 "), "a: 1");
        let text = format!("{line}\nb: 2\n");
        assert_eq!(
            super::super::comment_line(&text, "0.0.0.0:80", "why").unwrap(),
            format!("{line}  # why\nb: 2\n")
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
                ["add", path, number] => out.push_str(
                    &(lookup(path).as_i64().unwrap() + number.parse::<i64>().unwrap()).to_string(),
                ),
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
        // rbac, ca, daemonset, holder, podmonitor, gateway: every file but the namespace's
        // (Helm's to create).
        assert_eq!(
            compared, 6,
            "every template but the namespace's is compared"
        );
    }

    #[test]
    fn without_the_holder_the_agent_gets_no_holder_socket() {
        let files = super::super::generated_files(&super::super::deploy_dir()).unwrap();
        let agent = &files[std::path::Path::new("helm/nodemesh/templates/daemonset.yaml")];
        let holder = &files[std::path::Path::new("helm/nodemesh/templates/holder.yaml")];
        assert!(
            agent.contains("{{- if .Values.holder.enabled }}\n        - --holder-socket="),
            "the agent's --holder-socket should be conditional on holder.enabled:\n{agent}"
        );
        assert!(
            holder.contains("{{ if .Values.holder.enabled -}}"),
            "the holder's DaemonSet should be conditional on holder.enabled:\n{holder}"
        );
    }

    #[test]
    fn a_knob_that_reaches_nothing_is_an_error() {
        let mut values = super::super::Values::load(&super::super::deploy_dir()).unwrap();
        let manifests = super::super::objects::manifests(&values);
        let pod_monitor = super::super::objects::pod_monitor_manifest(&values);
        let gateway = super::super::objects::gateway_manifest(&values);
        // The manifests were built with the old port: the chart's knob would reach nothing.
        values.agent.metrics_port += 100;
        let error = templates(&values, &manifests, &pod_monitor, &gateway)
            .expect_err("a metrics port the manifests do not have reaches nothing");
        assert!(error.to_string().contains("15120"), "{error}");
    }
}
