//! Config sources and the one translation from Kubernetes objects to [`State`].
//!
//! Every source (the file source today, the kube source next) produces [`Object`]s and calls
//! [`translate`], so a YAML file and the API server give the same state for the same objects.
mod translate;

pub mod file;

pub use translate::{Object, ObjectId, TranslateError, translate, validate};
