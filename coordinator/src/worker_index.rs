//! The order `/bootstrap` lists workers in, kept up to date as workers
//! change, so that a request costs the handful of workers it returns, not a
//! pass over the whole table (about 90 ms at 100,000 workers, under the
//! table's lock, before this: `cargo bench -p troop-coordinator --bench
//! internet`).
//!
//! The index holds, for all workers and for each model, the workers in
//! bootstrap order: verified ones first, then the longest registered. A
//! request walks that order and checks each worker against the live table
//! (alive, not left, not suspended, still serving the model, an address the
//! caller can reach), so a worker that leaves or is suspended drops out at
//! once; the walk takes the gone ones it passes out of the index. Whatever
//! changes a worker's place (a registration, a proof given or taken, new
//! models, a worker back from silence or from a leave) puts it again
//! ([`WorkerIndex::put`], or [`WorkerIndex::ensure`] where most calls change
//! nothing). Each change costs O(log n) under the index's own lock; nothing
//! is ever rebuilt whole.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::ledger::WorkerRow;

/// A worker's place: unverified after verified, then by registration.
type Key = (bool, u64, Arc<str>);

#[derive(Default)]
pub struct WorkerIndex {
    inner: Mutex<Inner>,
}

#[derive(Default)]
pub struct Inner {
    /// Each indexed worker's place and the models it is listed under.
    placed: HashMap<Arc<str>, (Key, Vec<String>)>,
    all: BTreeSet<Key>,
    by_model: HashMap<String, BTreeSet<Key>>,
}

impl WorkerIndex {
    /// An index of `table`.
    pub fn of<'a>(table: impl IntoIterator<Item = &'a WorkerRow>) -> Self {
        let idx = Self::default();
        {
            let mut inner = idx.lock();
            for w in table {
                inner.put(w);
            }
        }
        idx
    }

    /// (Re)places `w` after a change to its registration, proof, models or
    /// liveness.
    pub fn put(&self, w: &WorkerRow) {
        self.lock().put(w);
    }

    /// Puts `w` unless it is placed already where it belongs (a hash
    /// lookup): what every path that brings a row into the table or beats
    /// for a worker calls, so that a worker the walk took out as gone comes
    /// back whatever the clocks said.
    pub fn ensure(&self, w: &WorkerRow) {
        let mut inner = self.lock();
        let placed = inner.placed.get(w.peer_id.as_str()).is_some_and(|(k, m)| {
            k.0 == w.verified_gflops.is_none() && k.1 == w.registered_at && *m == w.models
        });
        if !placed {
            inner.put(w);
        }
    }

    /// The index, to walk. (A holder that panicked left it whole: every
    /// change is one `put` or `remove`.)
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl Inner {
    fn put(&mut self, w: &WorkerRow) {
        self.remove(&w.peer_id);
        let peer: Arc<str> = Arc::from(w.peer_id.as_str());
        let key: Key = (w.verified_gflops.is_none(), w.registered_at, peer.clone());
        self.all.insert(key.clone());
        for m in &w.models {
            self.by_model
                .entry(m.clone())
                .or_default()
                .insert(key.clone());
        }
        self.placed.insert(peer, (key, w.models.clone()));
    }

    /// Takes a worker out (the walk does, for the gone ones it passes).
    pub fn remove(&mut self, peer: &str) {
        let Some((key, models)) = self.placed.remove(peer) else {
            return;
        };
        self.all.remove(&key);
        for m in models {
            if let Some(set) = self.by_model.get_mut(&m) {
                set.remove(&key);
                if set.is_empty() {
                    self.by_model.remove(&m);
                }
            }
        }
    }

    /// Peer ids in bootstrap order, for `model` (everyone for `None`).
    pub fn walk(&self, model: Option<&str>) -> impl Iterator<Item = &str> {
        let set = match model {
            None => Some(&self.all),
            Some(m) => self.by_model.get(m),
        };
        set.into_iter().flatten().map(|(_, _, p)| &**p)
    }

    pub fn len(&self) -> usize {
        self.placed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.placed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, models: &[&str], registered_at: u64, verified: bool) -> WorkerRow {
        WorkerRow {
            peer_id: id.into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            registered_at,
            last_seen: 1_000,
            verified_gflops: verified.then_some(10.0),
            ..WorkerRow::default()
        }
    }

    fn walked(idx: &WorkerIndex, model: Option<&str>) -> Vec<String> {
        let inner = idx.lock();
        inner.walk(model).map(String::from).collect()
    }

    #[test]
    fn the_order_is_verified_then_oldest_and_follows_changes() {
        let rows = [
            row("a", &["m"], 30, false),
            row("b", &["m", "n"], 10, false),
            row("c", &["n"], 20, true),
        ];
        let idx = WorkerIndex::of(&rows);
        assert_eq!(walked(&idx, None), ["c", "b", "a"]);
        assert_eq!(walked(&idx, Some("m")), ["b", "a"]);
        assert_eq!(walked(&idx, Some("n")), ["c", "b"]);
        assert!(walked(&idx, Some("x")).is_empty());

        // a proves its hardware and now serves n only: first, under n.
        idx.put(&row("a", &["n"], 30, true));
        assert_eq!(walked(&idx, None), ["c", "a", "b"]);
        assert_eq!(walked(&idx, Some("m")), ["b"]);
        assert_eq!(walked(&idx, Some("n")), ["c", "a", "b"]);
        // Taken out, and the model nobody serves any more is forgotten.
        idx.lock().remove("b");
        assert!(walked(&idx, Some("m")).is_empty());
        assert!(!idx.lock().by_model.contains_key("m"));
        assert_eq!(idx.lock().len(), 2);
        // `ensure` puts back what was taken out, and leaves the placed alone.
        idx.ensure(&row("b", &["m"], 10, false));
        assert_eq!(walked(&idx, Some("m")), ["b"]);
        idx.ensure(&row("b", &["m"], 10, false));
        assert_eq!(walked(&idx, None), ["c", "a", "b"]);
    }
}
