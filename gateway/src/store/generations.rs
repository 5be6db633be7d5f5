//! What a store knows of each namespace's generation and soft-flush time.

use std::{collections::HashMap, sync::Arc, sync::RwLock};

/// A namespace's flush state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NamespaceState {
    /// Folded into every entry key; bumped by a (hard) namespace flush.
    pub generation: u64,
    /// Entries created at or before this time (ms since the Unix epoch) are
    /// stale; set by a soft namespace flush.
    pub stale_before_ms: u64,
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

    /// Records a state read from the authority (Redis). States only move
    /// forward, so a slow reply cannot roll a newer one back.
    pub fn learn(&self, namespace: &str, state: NamespaceState) {
        let current = self.get(namespace);
        if state.generation > current.generation || state.stale_before_ms > current.stale_before_ms
        {
            self.update(namespace, |known| {
                known.generation = known.generation.max(state.generation);
                known.stale_before_ms = known.stale_before_ms.max(state.stale_before_ms);
            });
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
