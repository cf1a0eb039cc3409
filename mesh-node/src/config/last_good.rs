//! The last accepted version of every object, so a refused new version falls back to it.
use std::collections::{HashMap, HashSet};

use super::Object;
use crate::{
    inventory::{ObjectId, Rejection},
    routing::check_references,
};

/// What a source accepted last time, by object.
#[derive(Default)]
pub struct LastGood {
    by_id: HashMap<ObjectId, Object>,
}

impl LastGood {
    /// What is enforced in place of a refused object: its fail-closed form when it is a
    /// security resource (a last good version would not survive a restart, and the rule is
    /// the same every time), else its last good version, if it ever had one.
    pub fn stand_in(&self, resource: &ObjectId, fail_closed: Option<&Object>) -> Option<Object> {
        fail_closed.or_else(|| self.by_id.get(resource)).cloned()
    }

    /// Objects that refer to what no other object defines (a route to an undefined subset)
    /// fall back to their last good version, or are dropped if that fails too or there is
    /// none. Each is rejected once, with the reason its new version failed; `origin_of` says
    /// where an object came from, for the rejection.
    pub fn enforce_references(
        &self,
        objects: &mut Vec<Object>,
        origin_of: impl Fn(&ObjectId) -> String,
        rejections: &mut Vec<Rejection>,
    ) {
        let mut fell_back = HashSet::new();
        loop {
            let offenders = check_references(&super::routing_resources(objects));
            if offenders.is_empty() {
                return;
            }
            for (id, error) in offenders {
                let Some(index) = objects.iter().position(|o| o.id() == id) else {
                    continue;
                };
                if fell_back.insert(id.clone()) {
                    rejections.push(Rejection {
                        origin: origin_of(&id),
                        resource: id.to_string(),
                        error,
                    });
                    if let Some(previous) = self.by_id.get(&id) {
                        objects[index] = previous.clone();
                        continue;
                    }
                }
                objects.remove(index);
            }
        }
    }

    /// Remembers `objects` as the accepted versions; anything not among them is forgotten.
    pub fn remember(&mut self, objects: &[Object]) {
        self.by_id = objects.iter().map(|o| (o.id(), o.clone())).collect();
    }
}
