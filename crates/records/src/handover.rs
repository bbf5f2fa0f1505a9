//! Bodies of committed writes, held in memory for the in-process consumer
//! of the audit log (the detection pipeline).
//!
//! Detection enriches each write event with facts from the versions it
//! wrote (a new Patient's demographics as keyed tokens, an Encounter's
//! site). Reading those versions back means a data-key read and unwrap, a
//! decryption and a parse per resource: after a bulk load of patients each
//! under its own data key, that was most of detection's work, on the same
//! CPUs as the requests. The write path already holds every version it
//! committed, opened; when a consumer asked for them
//! ([`crate::Records::hand_over_writes`]) it leaves the ones of the types
//! asked for here, and the consumer takes each once
//! ([`crate::Records::take_written`]).
//!
//! Bounded: beyond the capacity the oldest are dropped, and the consumer
//! reads those from the store, as it does every version written by another
//! node or before it asked. Clear bodies stay only until taken or dropped,
//! and a patient's are dropped when the patient is shredded.
use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;

use crate::service::Opened;

/// `(type, id, version)` of one version.
pub(crate) type VersionKey = (String, String, i64);

#[derive(Default)]
pub(crate) struct WrittenBodies {
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    /// 0: nobody asked; nothing is kept.
    capacity: usize,
    /// The resource types the consumer wants.
    types: Vec<String>,
    bodies: HashMap<VersionKey, Opened>,
    /// Keys in the order they were kept (some may have been taken since).
    order: VecDeque<VersionKey>,
}

impl WrittenBodies {
    /// Keep up to `capacity` bodies of `types` from now on (0 stops and
    /// forgets what is held).
    pub(crate) fn configure(&self, capacity: usize, types: &[&str]) {
        let mut h = self.held.lock();
        h.capacity = capacity;
        h.types = types.iter().map(|t| t.to_string()).collect();
        if capacity == 0 {
            h.bodies.clear();
            h.order.clear();
        }
    }

    /// The resource types a consumer wants bodies of; `None` when nobody asked.
    pub(crate) fn wanted_types(&self) -> Option<Vec<String>> {
        let h = self.held.lock();
        (h.capacity > 0).then(|| h.types.clone())
    }

    /// Keep committed versions (those of the wanted types), dropping the
    /// oldest beyond the capacity.
    pub(crate) fn keep(&self, versions: impl IntoIterator<Item = Opened>) {
        let mut h = self.held.lock();
        if h.capacity == 0 {
            return;
        }
        for o in versions {
            if !h.types.contains(&o.rtype) {
                continue;
            }
            let key = (o.rtype.clone(), o.id.clone(), o.version);
            if h.bodies.insert(key.clone(), o).is_none() {
                h.order.push_back(key);
            }
        }
        while h.bodies.len() > h.capacity {
            let Some(oldest) = h.order.pop_front() else {
                break;
            };
            h.bodies.remove(&oldest);
        }
        // Keys of taken bodies are left in `order`; trim them from the front
        // so that it does not grow without bound while the consumer keeps up.
        while h.order.front().is_some_and(|k| !h.bodies.contains_key(k)) {
            h.order.pop_front();
        }
        if h.order.len() > 4 * h.capacity.max(1) {
            let Held { bodies, order, .. } = &mut *h;
            order.retain(|k| bodies.contains_key(k));
        }
    }

    /// Take the held body of each version asked for (`None` where there is
    /// none), each once.
    pub(crate) fn take(&self, wanted: &[VersionKey]) -> Vec<Option<Opened>> {
        let mut h = self.held.lock();
        if h.bodies.is_empty() {
            return vec![None; wanted.len()];
        }
        wanted.iter().map(|k| h.bodies.remove(k)).collect()
    }

    /// Drop every body sealed under the data key `key_name` (a shredded patient).
    pub(crate) fn forget_key(&self, key_name: &str) {
        let mut h = self.held.lock();
        h.bodies.retain(|_, o| o.key_name != key_name);
    }

    /// How many bodies are held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.held.lock().bodies.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(rtype: &str, id: &str, version: i64) -> Opened {
        Opened::for_test(rtype, id, version, serde_json::json!({ "id": id }))
    }

    #[test]
    fn keeps_only_what_was_asked_for_and_gives_each_once() {
        let w = WrittenBodies::default();
        w.keep([opened("Patient", "a", 1)]);
        assert_eq!(w.len(), 0, "nothing is kept before a consumer asks");
        w.configure(10, &["Patient", "Encounter"]);
        w.keep([
            opened("Patient", "a", 1),
            opened("Observation", "o", 1),
            opened("Encounter", "e", 2),
        ]);
        assert_eq!(w.len(), 2, "only the types asked for");
        let wanted = vec![
            ("Encounter".to_string(), "e".to_string(), 2),
            ("Patient".to_string(), "a".to_string(), 2),
            ("Patient".to_string(), "a".to_string(), 1),
        ];
        let got = w.take(&wanted);
        assert_eq!(got[0].as_ref().map(|o| o.version), Some(2));
        assert!(got[1].is_none(), "another version is not this one");
        assert_eq!(got[2].as_ref().map(|o| o.id.as_str()), Some("a"));
        assert!(w.take(&wanted).iter().all(Option::is_none), "each once");
    }

    #[test]
    fn drops_the_oldest_beyond_capacity_and_stops_when_asked() {
        let w = WrittenBodies::default();
        w.configure(3, &["Patient"]);
        w.keep((1..=5).map(|i| opened("Patient", &format!("p{i}"), 1)));
        assert_eq!(w.len(), 3);
        let got = w.take(&[
            ("Patient".into(), "p1".into(), 1),
            ("Patient".into(), "p5".into(), 1),
        ]);
        assert!(got[0].is_none(), "the oldest was dropped");
        assert!(got[1].is_some());
        // Taken keys do not pile up in the order queue.
        for round in 0..100 {
            let id = format!("q{round}");
            w.keep([opened("Patient", &id, 1)]);
            w.take(&[("Patient".into(), id, 1)]);
        }
        assert!(w.held.lock().order.len() <= 12);
        w.configure(0, &[]);
        assert_eq!(w.len(), 0);
        w.keep([opened("Patient", "z", 1)]);
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn a_shredded_patients_bodies_are_dropped() {
        let w = WrittenBodies::default();
        w.configure(10, &["Patient"]);
        let mut a = opened("Patient", "a", 1);
        a.key_name = "patient/a".into();
        let mut b = opened("Patient", "b", 1);
        b.key_name = "patient/b".into();
        w.keep([a, b]);
        w.forget_key("patient/a");
        let got = w.take(&[
            ("Patient".into(), "a".into(), 1),
            ("Patient".into(), "b".into(), 1),
        ]);
        assert!(got[0].is_none());
        assert!(got[1].is_some());
    }
}
