//! `cargo xtask deploy-check`: every manifest against the real Kubernetes schemas, with
//! PyPI's `kubernetes-validate` (the API server's OpenAPI schemas as JSON Schema), installed
//! into a virtualenv under `target/` the first time.
//!
//! Custom resources (`PodMonitor`, `VirtualService`, …) have no schema there: the validator
//! says so and skips them, and the CRDs that define them are validated as
//! `CustomResourceDefinition` objects. Strict mode rejects fields the schema does not know,
//! so a misspelt field fails as a wrong type does.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use anyhow::{Context as _, bail};
use serde::Deserialize as _;

use super::{deploy_dir, workspace_dir};

/// The Kubernetes version the manifests target: the one the workspace's k8s-openapi is
/// built for (feature `v1_33`).
const KUBERNETES_VERSION: &str = "1.33";
/// Pinned so a new release's schemas cannot fail a build that changed nothing.
const VALIDATOR_PACKAGE: &str = "kubernetes-validate==1.37.0";
const VALIDATOR_VERSION: &str = "1.37.0";

/// The `kubernetes-validate` program in its virtualenv.
#[derive(Clone, Debug)]
pub struct Validator {
    program: PathBuf,
}

impl Validator {
    /// The validator, installed into `target/deploy-check/venv` once per process (tests
    /// share it); the error says why it could not be installed.
    pub fn shared() -> Result<&'static Validator, String> {
        static VALIDATOR: OnceLock<Result<Validator, String>> = OnceLock::new();
        VALIDATOR
            .get_or_init(|| Validator::install(&work_dir()).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn install(work_dir: &Path) -> anyhow::Result<Validator> {
        let venv = work_dir.join("venv");
        let validator = Validator {
            program: venv.join("bin/kubernetes-validate"),
        };
        if validator.installed_version().as_deref() == Some(VALIDATOR_VERSION) {
            return Ok(validator);
        }
        if !venv.join("bin/pip").exists() {
            eprintln!(
                "deploy-check: creating a Python virtualenv in {}",
                venv.display()
            );
            crate::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
                .context("python3 -m venv (Debian: apt-get install python3-venv)")?;
        }
        eprintln!("deploy-check: installing {VALIDATOR_PACKAGE} from PyPI");
        crate::run(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", VALIDATOR_PACKAGE])
                .stdout(Stdio::null()),
        )
        .context("installing kubernetes-validate")?;
        Ok(validator)
    }

    fn installed_version(&self) -> Option<String> {
        let output = Command::new(&self.program)
            .arg("--version")
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout);
        Some(text.split_whitespace().last()?.to_string())
    }

    /// Validates every object of every file (strict: unknown fields fail too). The error
    /// lists each object that failed and why; objects without a schema (custom resources)
    /// are reported and skipped.
    pub fn validate(&self, files: &[PathBuf]) -> anyhow::Result<()> {
        let output = Command::new(&self.program)
            .args([
                "--kubernetes-version",
                KUBERNETES_VERSION,
                "--strict",
                "--quiet",
            ])
            .args(files)
            .output()
            .with_context(|| format!("starting {}", self.program.display()))?;
        let report = String::from_utf8_lossy(&output.stdout);
        for line in report.lines().filter(|l| l.starts_with("WARN")) {
            eprintln!("deploy-check: skipped, no schema: {line}");
        }
        if !output.status.success() {
            let failures: Vec<&str> = report.lines().filter(|l| !l.starts_with("WARN")).collect();
            bail!(
                "{} object(s) failed validation against Kubernetes {KUBERNETES_VERSION}:\n{}\n{}",
                failures.len(),
                failures.join("\n"),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

/// `target/deploy-check/` (the workspace's target dir, or `CARGO_TARGET_DIR`).
fn work_dir() -> PathBuf {
    let workspace = workspace_dir();
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(|dir| workspace.join(dir))
        .unwrap_or_else(|| workspace.join("target"));
    target.join("deploy-check")
}

/// `cargo xtask deploy-check`.
pub fn check() -> anyhow::Result<()> {
    let validator = Validator::shared().map_err(|reason| {
        anyhow::anyhow!(
            "deploy-check needs kubernetes-validate, which could not be installed: {reason}"
        )
    })?;
    let deploy = deploy_dir();
    let work_dir = work_dir();
    let mut files = yaml_files(&deploy.join("manifests"))?;
    files.extend(
        yaml_files(&deploy.join("crds"))?
            .into_iter()
            .filter(|f| !f.ends_with("kustomization.yaml")),
    );
    for example in yaml_files(&deploy.join("examples"))? {
        if holds_only_kubernetes_objects(&example)? {
            files.push(example);
        } else {
            eprintln!(
                "deploy-check: skipping {}: not Kubernetes objects",
                example.display()
            );
        }
    }
    // What `kubectl apply -k` sends: proves the kustomizations name existing files.
    for (name, dir) in [
        ("kustomize", deploy.clone()),
        ("kustomize-crds", deploy.join("crds")),
    ] {
        let rendered = work_dir.join(format!("{name}.yaml"));
        match render_with("kubectl", &["kustomize"], &dir, &rendered) {
            Ok(()) => files.push(rendered),
            Err(Skip::Missing) => {
                eprintln!("deploy-check: skipping `kubectl kustomize`: kubectl is not installed")
            }
            Err(Skip::Failed(error)) => return Err(error),
        }
    }
    // The chart rendered with every template on (the PodMonitor is off by default).
    let rendered = work_dir.join("helm-template.yaml");
    match render_with(
        "helm",
        &[
            "template",
            "nodemesh",
            "--namespace",
            "nodemesh-system",
            "--set",
            "podMonitor.enabled=true",
        ],
        &deploy.join("helm/nodemesh"),
        &rendered,
    ) {
        Ok(()) => files.push(rendered),
        Err(Skip::Missing) => eprintln!(
            "deploy-check: skipping the Helm chart: helm is not installed (its templates are \
             generated from the same objects as deploy/manifests, which are checked)"
        ),
        Err(Skip::Failed(error)) => return Err(error),
    }
    validator.validate(&files)?;
    eprintln!(
        "deploy-check: {} files valid against Kubernetes {KUBERNETES_VERSION}",
        files.len()
    );
    Ok(())
}

enum Skip {
    /// The tool is not installed.
    Missing,
    Failed(anyhow::Error),
}

/// `<tool> <args> <dir>` into `output`.
fn render_with(tool: &str, args: &[&str], dir: &Path, output: &Path) -> Result<(), Skip> {
    let installed = Command::new(tool)
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !installed {
        return Err(Skip::Missing);
    }
    let result = Command::new(tool)
        .args(args)
        .arg(dir)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {tool}"))
        .and_then(|out| {
            if !out.status.success() {
                bail!(
                    "`{tool} {}` on {} failed: {}",
                    args.join(" "),
                    dir.display(),
                    out.status
                );
            }
            fs::create_dir_all(output.parent().expect("work dir"))?;
            fs::write(output, out.stdout).with_context(|| format!("writing {}", output.display()))
        });
    result.map_err(Skip::Failed)
}

fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|f| f.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    files.sort();
    Ok(files)
}

/// Whether every document of the file has an `apiVersion` and a `kind`.
fn holds_only_kubernetes_objects(file: &Path) -> anyhow::Result<bool> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(document)
            .with_context(|| format!("{} is not YAML", file.display()))?;
        if value.is_null() {
            continue;
        }
        if value.get("apiVersion").is_none() || value.get("kind").is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The validator, or `None` after printing why this machine cannot have it.
    fn validator(test: &str) -> Option<&'static Validator> {
        match Validator::shared() {
            Ok(validator) => Some(validator),
            Err(reason) => {
                eprintln!("skipping {test}: kubernetes-validate is not available: {reason}");
                None
            }
        }
    }

    #[test]
    fn the_install_passes_deploy_check() {
        if validator("the_install_passes_deploy_check").is_none() {
            return;
        }
        if let Err(error) = check() {
            panic!("deploy-check should pass on deploy/: {error:#}");
        }
    }

    #[test]
    fn a_manifest_with_a_wrong_field_type_fails() {
        let Some(validator) = validator("a_manifest_with_a_wrong_field_type_fails") else {
            return;
        };
        let dir = work_dir().join("broken-manifest-test");
        fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.yaml");
        let broken = dir.join("broken.yaml");
        let service = |port: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: ca}}\nspec:\n  ports: \
                 [{{port: {port}}}]\n"
            )
        };
        fs::write(&good, service("15012")).unwrap();
        fs::write(&broken, service("fifteen-thousand")).unwrap();

        validator
            .validate(std::slice::from_ref(&good))
            .expect("a Service with a numeric port is valid");
        let error = validator
            .validate(&[good, broken])
            .expect_err("a Service whose port is a word must fail validation");
        let message = format!("{error:#}");
        assert!(
            message.contains("broken.yaml") && message.contains("spec.ports.0.port"),
            "the failure should name the file and the field: {message}"
        );
    }

    #[test]
    fn an_unknown_field_fails_in_strict_mode() {
        let Some(validator) = validator("an_unknown_field_fails_in_strict_mode") else {
            return;
        };
        let dir = work_dir().join("unknown-field-test");
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pod.yaml");
        fs::write(
            &file,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  hostPid: true\n  \
             containers: [{name: c, image: i}]\n",
        )
        .unwrap();
        validator
            .validate(&[file])
            .expect_err("`hostPid` (for `hostPID`) must fail strict validation");
    }

    #[test]
    fn examples_without_kind_are_not_kubernetes_objects() {
        let dir = work_dir().join("kind-test");
        fs::create_dir_all(&dir).unwrap();
        let object = dir.join("object.yaml");
        let other = dir.join("other.yaml");
        fs::write(
            &object,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n",
        )
        .unwrap();
        fs::write(&other, "apiVersion: v1\nkind: Namespace\n---\nnodes: 2\n").unwrap();
        assert!(holds_only_kubernetes_objects(&object).unwrap());
        assert!(!holds_only_kubernetes_objects(&other).unwrap());
    }
}
