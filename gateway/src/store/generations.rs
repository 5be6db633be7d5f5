//! What a store knows of each namespace's generation and soft-flush time.

use std::{collections::HashMap, sync::Arc, sync::RwLock};

/// A namespace's flush state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NamespaceState {
    /// Folded into every entry key; bumped by a (hard) namespace flush.
    pub generation: u64,
    /// Entries created at or before this time (ms since the Unix epoch) were
    /// soft-purged at it; set by a soft namespace flush.
    pub stale_before_ms: u64,
    /// The namespace's tag sequence as last read (Redis only): a lease
    /// records it, and a tag purge after it voids the lease's write.
    pub tag_sequence: u64,
}

/// Namespace states, for namespaces that were ever flushed (every other
/// namespace is in the default state), so the table is bounded by the number
/// of flushed namespaces, not by the number of namespaces seen.
#[derive(Debug, Default)]
pub struct Generations {
    known: RwLock<HashMap<Arc<str>, NamespaceState>>,
}

impl Generations {
    /// The state of `namespace` as last known.
    pub fn get(&self, namespace: &str) -> NamespaceState {
        self.known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(namespace)
            .copied()
            .unwrap_or_default()
    }

    /// Records a state read from the authority (Redis). Redis is believed
    /// even when it went back (its data was lost or flushed): a slow reply
    /// that briefly rolls the table back costs the next request one retry,
    /// while ignoring a real reset would hide the namespace for good.
    pub fn learn(&self, namespace: &str, state: NamespaceState) {
        if self.get(namespace) != state {
            self.update(namespace, |known| *known = state);
        }
    }

    /// Changes the state of `namespace` and returns the new one (the memory
    /// store is its own authority).
    pub fn update(
        &self,
        namespace: &str,
        change: impl FnOnce(&mut NamespaceState),
    ) -> NamespaceState {
        let mut known = self
            .known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = known.entry(Arc::from(namespace)).or_default();
        change(state);
        *state
    }
}
