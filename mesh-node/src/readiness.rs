//! Readiness as a set of named guards: the agent is ready once every guard has dropped.
use std::{collections::BTreeSet, sync::Arc};

use parking_lot::Mutex;

#[derive(Clone, Default)]
pub struct Readiness {
    pending: Arc<Mutex<BTreeSet<&'static str>>>,
}

/// Held while a part of the agent is starting; dropping it marks that part ready.
#[must_use = "the part is ready as soon as the guard is dropped"]
pub struct ReadinessGuard {
    name: &'static str,
    pending: Arc<Mutex<BTreeSet<&'static str>>>,
}

impl Readiness {
    pub fn register(&self, name: &'static str) -> ReadinessGuard {
        self.pending.lock().insert(name);
        ReadinessGuard {
            name,
            pending: self.pending.clone(),
        }
    }

    /// The parts still starting, for the readiness endpoint's answer.
    pub fn pending(&self) -> Vec<&'static str> {
        self.pending.lock().iter().copied().collect()
    }
}

impl Drop for ReadinessGuard {
    fn drop(&mut self) {
        self.pending.lock().remove(self.name);
    }
}
