//! The CA's root in Kubernetes: kept in a Secret, its trust bundle published in a ConfigMap.
//!
//! The signing CA is the user's own Secret `cacerts` (Istio's layout, so an Istio user's
//! plugged-in root or intermediate carries over) when it exists, else `nodemesh-ca-root`,
//! which the first CA replica creates with a fresh self-signed root. Both are loaded by the
//! same loader as a `--ca-dir` directory: the Secret's keys are staged as files in a private
//! temporary directory, so one code path parses and checks every root.
//!
//! Agents need the roots before they can talk to the CA: the CA writes them into ConfigMap
//! `nodemesh-ca-root-cert`, which the agent DaemonSet mounts as `--ca-root-file`.
use std::{collections::BTreeMap, fs::OpenOptions, io::Write, os::unix::fs::OpenOptionsExt};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{Api, api::PostParams, core::ObjectMeta};
use tracing::info;

use crate::identity::{
    CaError, CertificateAuthority,
    ca::{LAYOUT, ROOT_CERT_FILE},
};

/// The user's own CA, Istio's name and layout.
pub const USER_CA_SECRET: &str = "cacerts";
/// The root Nodemesh creates when the user brings none.
pub const GENERATED_ROOT_SECRET: &str = "nodemesh-ca-root";
/// The trust bundle agents mount, key [`ROOT_CERT_FILE`].
pub const TRUST_BUNDLE_CONFIG_MAP: &str = "nodemesh-ca-root-cert";
/// Read-modify-write attempts on the ConfigMap when other replicas write it at the same time.
const PUBLISH_ATTEMPTS: usize = 3;

/// Why the CA could not get its root from the cluster, or publish its trust bundle.
#[derive(Debug, thiserror::Error)]
pub enum ClusterRootError {
    #[error("Secret {namespace}/{secret} has no key {key:?}; a CA Secret needs all of {LAYOUT:?}")]
    MissingKey {
        namespace: String,
        secret: &'static str,
        key: &'static str,
    },
    /// A key is there but what it holds is not a usable CA; the source names the key's file.
    #[error("Secret {namespace}/{secret}: {source}")]
    BadCa {
        namespace: String,
        secret: &'static str,
        #[source]
        source: Box<CaError>,
    },
    #[error("{action}: {source}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("staging the CA's keys in a private temporary directory: {0}")]
    Staging(#[source] std::io::Error),
    #[error("generating a root CA: {0}")]
    Generate(#[source] Box<CaError>),
    #[error(
        "ConfigMap {namespace}/{TRUST_BUNDLE_CONFIG_MAP} kept changing under us; gave up after {PUBLISH_ATTEMPTS} attempts"
    )]
    PublishContended { namespace: String },
}

/// Which Secret the CA signs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootSource {
    /// The user's `cacerts`.
    UserCa,
    /// `nodemesh-ca-root`, found in place.
    Generated,
    /// `nodemesh-ca-root`, created by this replica.
    CreatedNow,
    /// `nodemesh-ca-root`, created by another replica while this one was creating it too.
    CreatedByAnotherReplica,
}

/// What publishing the trust bundle did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    Created,
    Replaced,
    Unchanged,
}

/// The CA of the cluster, from Secret `cacerts` or `nodemesh-ca-root` in `namespace` (the
/// CA's own), creating the latter when neither exists. A malformed `cacerts` is an error,
/// never a reason to sign with some other root.
pub async fn load_ca(
    client: kube::Client,
    namespace: &str,
    trust_domain: &str,
) -> Result<(CertificateAuthority, RootSource), ClusterRootError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let read = |name: &'static str| {
        let secrets = secrets.clone();
        async move {
            secrets
                .get_opt(name)
                .await
                .map_err(api_error(format!("reading Secret {namespace}/{name}")))
        }
    };
    if let Some(secret) = read(USER_CA_SECRET).await? {
        let ca = load_secret(&secret, namespace, USER_CA_SECRET, trust_domain)?;
        return Ok((ca, RootSource::UserCa));
    }
    if let Some(secret) = read(GENERATED_ROOT_SECRET).await? {
        let ca = load_secret(&secret, namespace, GENERATED_ROOT_SECRET, trust_domain)?;
        return Ok((ca, RootSource::Generated));
    }

    let generated = generate_root_secret(namespace, trust_domain)?;
    match secrets.create(&PostParams::default(), &generated).await {
        Ok(_) => {
            let ca = load_secret(&generated, namespace, GENERATED_ROOT_SECRET, trust_domain)?;
            info!(
                namespace,
                secret = GENERATED_ROOT_SECRET,
                "created a new root CA"
            );
            Ok((ca, RootSource::CreatedNow))
        }
        // Another replica created it between our read and our create: use theirs, so every
        // replica signs with one root.
        Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
            let theirs =
                read(GENERATED_ROOT_SECRET)
                    .await?
                    .ok_or_else(|| ClusterRootError::Api {
                        action: format!(
                            "Secret {namespace}/{GENERATED_ROOT_SECRET} existed when we created \
                             it but was gone when read back"
                        ),
                        source: kube::Error::Api(status),
                    })?;
            let ca = load_secret(&theirs, namespace, GENERATED_ROOT_SECRET, trust_domain)?;
            Ok((ca, RootSource::CreatedByAnotherReplica))
        }
        Err(source) => Err(ClusterRootError::Api {
            action: format!("creating Secret {namespace}/{GENERATED_ROOT_SECRET}"),
            source,
        }),
    }
}

/// Writes the CA's trust bundle into ConfigMap `nodemesh-ca-root-cert` (key
/// `root-cert.pem`): created when absent, replaced when it says something else.
pub async fn publish_trust_bundle(
    client: kube::Client,
    namespace: &str,
    ca: &CertificateAuthority,
) -> Result<Published, ClusterRootError> {
    let config_maps: Api<ConfigMap> = Api::namespaced(client, namespace);
    let bundle = pem::encode_many_config(
        &ca.trust_bundle()
            .iter()
            .map(|root| pem::Pem::new("CERTIFICATE", root.as_ref()))
            .collect::<Vec<_>>(),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    );
    let data = BTreeMap::from([(ROOT_CERT_FILE.to_owned(), bundle)]);
    let action = |verb: &str| format!("{verb} ConfigMap {namespace}/{TRUST_BUNDLE_CONFIG_MAP}");
    for _ in 0..PUBLISH_ATTEMPTS {
        let current = config_maps
            .get_opt(TRUST_BUNDLE_CONFIG_MAP)
            .await
            .map_err(api_error(action("reading")))?;
        let (written, outcome) = match current {
            Some(current) if current.data.as_ref() == Some(&data) => {
                return Ok(Published::Unchanged);
            }
            Some(current) => {
                let mut desired = trust_bundle_config_map(namespace, data.clone());
                // Replace only what we read: a concurrent writer makes this a 409, re-read.
                desired.metadata.resource_version = current.metadata.resource_version;
                let replaced = config_maps
                    .replace(TRUST_BUNDLE_CONFIG_MAP, &PostParams::default(), &desired)
                    .await;
                (replaced, Published::Replaced)
            }
            None => {
                let desired = trust_bundle_config_map(namespace, data.clone());
                let created = config_maps.create(&PostParams::default(), &desired).await;
                (created, Published::Created)
            }
        };
        match written {
            Ok(_) => {
                info!(
                    namespace,
                    config_map = TRUST_BUNDLE_CONFIG_MAP,
                    ?outcome,
                    "trust bundle published"
                );
                return Ok(outcome);
            }
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
            }
            Err(source) => {
                return Err(ClusterRootError::Api {
                    action: action("writing"),
                    source,
                });
            }
        }
    }
    Err(ClusterRootError::PublishContended {
        namespace: namespace.to_owned(),
    })
}

fn api_error(action: String) -> impl FnOnce(kube::Error) -> ClusterRootError {
    move |source| ClusterRootError::Api { action, source }
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/part-of".to_owned(),
            "nodemesh".to_owned(),
        ),
        ("app.kubernetes.io/component".to_owned(), "ca".to_owned()),
    ])
}

fn trust_bundle_config_map(namespace: &str, data: BTreeMap<String, String>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(TRUST_BUNDLE_CONFIG_MAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// Loads a CA Secret through the directory loader: every key written 0600 into a fresh
/// 0700 temporary directory that is removed (keys and all) as soon as the CA is loaded.
fn load_secret(
    secret: &Secret,
    namespace: &str,
    name: &'static str,
    trust_domain: &str,
) -> Result<CertificateAuthority, ClusterRootError> {
    let data = secret.data.clone().unwrap_or_default();
    // Checked before anything is written, so the error names the key rather than a file.
    let mut files = Vec::with_capacity(LAYOUT.len());
    for key in LAYOUT {
        let value = data.get(key).ok_or_else(|| ClusterRootError::MissingKey {
            namespace: namespace.to_owned(),
            secret: name,
            key,
        })?;
        files.push((key, &value.0));
    }
    // tempfile creates directories 0700; the CA's root filesystem is read-only in the
    // manifests, so TMPDIR (an emptyDir) is where this lands.
    let staging = tempfile::Builder::new()
        .prefix("nodemesh-ca-")
        .tempdir()
        .map_err(ClusterRootError::Staging)?;
    for (key, value) in files {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(staging.path().join(key))
            .and_then(|mut file| file.write_all(value))
            .map_err(ClusterRootError::Staging)?;
    }
    CertificateAuthority::load(staging.path(), trust_domain).map_err(|source| {
        ClusterRootError::BadCa {
            namespace: namespace.to_owned(),
            secret: name,
            source: Box::new(source),
        }
    })
}

/// A new self-signed root as Secret `nodemesh-ca-root`: made by the same code as a root in
/// an empty `--ca-dir`, then read back from that (temporary) directory.
fn generate_root_secret(namespace: &str, trust_domain: &str) -> Result<Secret, ClusterRootError> {
    let staging = tempfile::Builder::new()
        .prefix("nodemesh-ca-new-")
        .tempdir()
        .map_err(ClusterRootError::Staging)?;
    CertificateAuthority::load_or_create(staging.path(), trust_domain)
        .map_err(|e| ClusterRootError::Generate(Box::new(e)))?;
    let mut data = BTreeMap::new();
    for key in LAYOUT {
        let bytes = std::fs::read(staging.path().join(key)).map_err(ClusterRootError::Staging)?;
        data.insert(key.to_owned(), ByteString(bytes));
    }
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(GENERATED_ROOT_SECRET.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    })
}

#[cfg(test)]
mod tests;
