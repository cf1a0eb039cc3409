//! The file config source: a directory of Kubernetes YAML, reloaded when it changes.
//!
//! Each `*.yaml`/`*.yml` file may hold several documents (or a `List`). A resource that
//! cannot be used is rejected alone, with the file and the resource in the error, and the
//! last good version of that resource stays in force; a file that is not valid YAML keeps
//! everything it last gave. The same holds for a resource that refers to what no other
//! resource defines (a VirtualService route to an undefined DestinationRule subset): its
//! last good version stays, or it is left out if it has none.
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    LastGood, Object,
    document::{Document, TypeMeta, classify},
    publish, without_blocking_the_runtime,
};
use crate::{
    inventory::{ObjectId, Rejection},
    metrics::NodeMetrics,
    state::{State, StateTx},
};

/// How often the directory is checked for changes. Polling (not inotify) because config
/// maps and bind mounts replace files through symlink swaps that inotify misses.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Reads the directory and remembers the last good version of everything.
pub struct FileSource {
    dir: PathBuf,
    root_namespace: String,
    /// Objects each file gave the last time it was readable YAML.
    last_good_by_file: HashMap<PathBuf, Vec<Object>>,
    /// The last accepted version of each object, whatever file it came from.
    last_good: LastGood,
    /// The file each object of the last load came from, for the admin API's config dump.
    origins: Arc<BTreeMap<String, Arc<str>>>,
    /// Each file's documents as last parsed, with the modification time and length they
    /// were parsed at: a reload parses only the files that changed.
    parsed: HashMap<PathBuf, Parsed>,
}

struct Parsed {
    stamp: (SystemTime, u64),
    documents: Result<Vec<Document>, String>,
}

/// The result of one load: objects to translate and what was refused.
pub struct Load {
    pub objects: Vec<Object>,
    pub rejections: Vec<Rejection>,
}

type Fingerprint = BTreeMap<PathBuf, (SystemTime, u64)>;

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>, root_namespace: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            root_namespace: root_namespace.into(),
            last_good_by_file: HashMap::new(),
            last_good: LastGood::default(),
            origins: Arc::default(),
            parsed: HashMap::new(),
        }
    }

    /// Loads the directory once, falling back to last good versions where needed.
    pub fn load(&mut self) -> std::io::Result<Load> {
        let mut objects: Vec<Object> = Vec::new();
        let mut origins: HashMap<ObjectId, PathBuf> = HashMap::new();
        let mut rejections = Vec::new();
        let mut files_seen = HashMap::new();
        let mut parsed = HashMap::new();
        for path in self.yaml_files()? {
            let documents = match self.parse(&path) {
                Ok(file) => parsed.entry(path.clone()).insert_entry(file).into_mut(),
                Err(error) => {
                    rejections.push(reject(&path, "(file)", error.to_string()));
                    continue;
                }
            };
            let file_objects = match documents.documents.clone() {
                Ok(documents) => {
                    let mut accepted = Vec::new();
                    for document in documents {
                        match document {
                            Document::Object(object) => accepted.push(object),
                            Document::Invalid {
                                resource,
                                error,
                                fail_closed,
                            } => {
                                rejections.push(reject(&path, &resource.to_string(), error));
                                accepted.extend(
                                    self.last_good.stand_in(&resource, fail_closed.as_ref()),
                                );
                            }
                            Document::Ignored { kind } => {
                                debug!(file = %path.display(), kind, "ignoring unsupported kind");
                            }
                        }
                    }
                    accepted
                }
                Err(error) => {
                    rejections.push(reject(&path, "(whole file)", error));
                    self.last_good_by_file
                        .get(&path)
                        .cloned()
                        .unwrap_or_default()
                }
            };
            let mut from_this_file = Vec::new();
            for object in file_objects {
                let id = object.id();
                if let Some(first) = origins.get(&id) {
                    rejections.push(reject(
                        &path,
                        &id.to_string(),
                        format!("duplicate: already defined in {}", first.display()),
                    ));
                    continue;
                }
                origins.insert(id, path.clone());
                from_this_file.push(object.clone());
                objects.push(object);
            }
            files_seen.insert(path, from_this_file);
        }
        let origin_of = |id: &ObjectId| {
            origins
                .get(id)
                .map_or_else(String::new, |p| p.display().to_string())
        };
        self.last_good
            .enforce_references(&mut objects, origin_of, &mut rejections);
        self.last_good_by_file = files_seen;
        self.parsed = parsed;
        self.last_good.remember(&objects);
        let mut paths: HashMap<&Path, Arc<str>> = HashMap::new();
        let by_object = objects
            .iter()
            .filter_map(|o| {
                let id = o.id();
                let path = origins.get(&id)?;
                let path = paths
                    .entry(path)
                    .or_insert_with(|| path.display().to_string().into());
                Some((id.to_string(), path.clone()))
            })
            .collect();
        self.origins = Arc::new(by_object);
        Ok(Load {
            objects,
            rejections,
        })
    }

    /// The documents of the file at `path`: those parsed last time when it has not
    /// changed since, else read and parsed now.
    fn parse(&mut self, path: &Path) -> std::io::Result<Parsed> {
        let meta = std::fs::metadata(path)?;
        let stamp = (meta.modified()?, meta.len());
        if let Some(previous) = self.parsed.remove(path)
            && previous.stamp == stamp
        {
            return Ok(previous);
        }
        let text = std::fs::read_to_string(path)?;
        Ok(Parsed {
            stamp,
            documents: parse_documents(&text),
        })
    }

    fn yaml_files(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                // Editors and atomic writers leave hidden temporary files around.
                !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
            })
            .filter(|path| path.is_file())
            .collect();
        files.sort();
        Ok(files)
    }

    fn fingerprint(&self) -> std::io::Result<Fingerprint> {
        Ok(self
            .yaml_files()?
            .into_iter()
            .filter_map(|path| {
                let meta = std::fs::metadata(&path).ok()?;
                Some((path, (meta.modified().ok()?, meta.len())))
            })
            .collect())
    }

    /// Loads, translates and publishes the state now; returns the new state.
    pub fn publish(&mut self, tx: &StateTx, metrics: &NodeMetrics) -> std::io::Result<Arc<State>> {
        let started = Instant::now();
        let Load {
            objects,
            rejections,
        } = self.load()?;
        Ok(publish(
            started,
            &objects,
            rejections,
            self.origins.clone(),
            &self.root_namespace,
            tx,
            metrics,
        ))
    }

    /// Reloads whenever the directory changes, until `shutdown`.
    pub async fn watch(mut self, tx: StateTx, metrics: NodeMetrics, shutdown: CancellationToken) {
        let mut last = self.fingerprint().ok();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            let current = match self.fingerprint() {
                Ok(current) => Some(current),
                Err(error) => {
                    warn!(dir = %self.dir.display(), %error, "cannot read config directory");
                    continue;
                }
            };
            if current == last {
                continue;
            }
            last = current;
            if let Err(error) = without_blocking_the_runtime(|| self.publish(&tx, &metrics)) {
                warn!(dir = %self.dir.display(), %error, "config reload failed; keeping the last state");
            }
        }
    }
}

fn reject(path: &Path, resource: &str, error: String) -> Rejection {
    Rejection {
        origin: path.display().to_string(),
        resource: resource.to_string(),
        error,
    }
}

/// Splits a file into documents. Fails only when the file is not YAML at all.
fn parse_documents(text: &str) -> Result<Vec<Document>, String> {
    let mut values = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document).map_err(|e| e.to_string())?;
        values.push(value);
    }
    let mut documents = Vec::new();
    while let Some(value) = values.pop() {
        if value.is_null() {
            continue;
        }
        let meta = match TypeMeta::deserialize(&value) {
            Ok(meta) => meta,
            Err(error) => {
                documents.push(Document::Invalid {
                    resource: ObjectId {
                        kind: "(unknown kind)",
                        namespace: String::new(),
                        name: String::new(),
                    },
                    error: format!("not a Kubernetes object: {error}"),
                    fail_closed: None,
                });
                continue;
            }
        };
        if meta.kind.ends_with("List") {
            values.extend(meta.items.into_iter().rev());
            continue;
        }
        documents.push(classify(meta, &value));
    }
    documents.reverse();
    Ok(documents)
}

#[cfg(test)]
mod tests;
