//! The policy registry: every loaded module version (by content hash), and
//! the table of namespace bindings that requests read.
//!
//! Requests read the binding table through an `ArcSwap`: no lock on the hot
//! path, and a request holds the `Arc<Binding>` it loaded, so it finishes on
//! the version it started with while the next request sees a new one. Changes
//! (config at start-up, the admin API) build a new table and swap it in whole.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex, OnceLock, Weak},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tracing::{info, warn};

use super::{
    Binding, BindingError, LoadError, PolicyEngine, PolicyModule,
    engine::{self, PreinitError},
    module_name,
};
use crate::{
    api::proto::policy as pb,
    config::{Config, FallbackMode, PolicyBindingConfig, PolicyEngineConfig},
};

/// The binding-table key of the default-namespace template's binding (not a
/// valid namespace name, so it cannot collide with one).
const TEMPLATE_KEY: &str = "";

/// One loaded module version.
#[derive(Debug, Clone)]
pub struct PolicyVersion {
    /// The compiled module.
    pub module: Arc<PolicyModule>,
    /// When it was loaded, ms since the Unix epoch.
    pub loaded_at_ms: u64,
    /// Where it came from (`config`, `admin`, ...).
    pub source: &'static str,
    /// Why it fails validation (`None`: it passed and may be bound). Only the
    /// config file loads a module that fails: the file binds it anyway, so its
    /// requests use the fallback, but PutPolicy and BindPolicy refuse it.
    pub invalid: Option<String>,
}

/// A namespace's binding as reported by [`PolicyRegistry::bindings`].
#[derive(Debug, Clone)]
pub struct BindingInfo {
    /// The namespace (`""` for the default-namespace template).
    pub namespace: String,
    /// The active binding.
    pub binding: Arc<Binding>,
    /// Versions it could be rolled back to, most recent first.
    pub previous: Vec<String>,
}

/// Why an upload or a binding change was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The module failed validation; nothing changed.
    #[error("policy rejected: {0}")]
    Rejected(String),
    /// The module is over `policy.max_module_bytes`; nothing changed.
    #[error("policy rejected: {0}")]
    TooLarge(String),
    /// No such version.
    #[error("no policy version `{0}` (upload it with PutPolicy first)")]
    UnknownVersion(String),
    /// Nothing to roll back to.
    #[error("namespace `{0}` has no previous binding to roll back to")]
    NoPrevious(String),
    /// A candidate needs an active binding to compare with or share traffic with.
    #[error("namespace `{0}` has no active policy binding: bind one before a canary or shadow")]
    NoActive(String),
}

/// Which binding decides a request, and who watches.
pub struct Route {
    /// The binding whose decision applies.
    pub binding: Arc<Binding>,
    /// A shadow candidate, evaluated on a sample and never applied.
    pub shadow: Option<Arc<Shadow>>,
}

/// A namespace's bindings as one batch sees them: resolved once, routed per
/// key by [`Routes::for_key`].
#[derive(Debug)]
pub struct Routes {
    active: Arc<Binding>,
    candidates: Option<Arc<Candidates>>,
}

impl Routes {
    /// The binding that decides `key` and the shadow watching, borrowed: what
    /// [`PolicyRegistry::route`] answers for the same key, without a clone.
    pub fn for_key(&self, key: &str) -> (&Arc<Binding>, Option<&Arc<Shadow>>) {
        pick(&self.active, self.candidates.as_deref(), key)
    }
}

/// The active binding, or a canary for its share of the keys; the shadow.
fn pick<'a>(
    active: &'a Arc<Binding>,
    candidates: Option<&'a Candidates>,
    key: &str,
) -> (&'a Arc<Binding>, Option<&'a Arc<Shadow>>) {
    let Some(candidates) = candidates else {
        return (active, None);
    };
    let binding = match &candidates.canary {
        Some(canary) if stable_bucket(key) < canary.basis_points => &canary.binding,
        _ => active,
    };
    (binding, candidates.shadow.as_ref())
}

/// The kinds of candidate binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateKind {
    /// Takes a share of the keys.
    Canary,
    /// Runs beside the active binding; its decisions are only compared.
    Shadow,
}

/// A namespace's candidates.
#[derive(Debug, Clone, Default)]
pub struct Candidates {
    /// The canary, if any.
    pub canary: Option<Arc<Canary>>,
    /// The shadow, if any.
    pub shadow: Option<Arc<Shadow>>,
}

/// A binding taking `basis_points` / 10 000 of a namespace's keys.
#[derive(Debug)]
pub struct Canary {
    /// The candidate.
    pub binding: Arc<Binding>,
    /// Its share, in hundredths of a percent.
    pub basis_points: u32,
}

/// How many recent differences a shadow keeps.
const SHADOW_EXAMPLES: usize = 20;

/// A shadow candidate and what it has seen.
#[derive(Debug)]
pub struct Shadow {
    /// The candidate.
    pub binding: Arc<Binding>,
    /// The sampled share of requests, in hundredths of a percent.
    pub basis_points: u32,
    sampled: std::sync::atomic::AtomicU64,
    differing: std::sync::atomic::AtomicU64,
    examples: Mutex<std::collections::VecDeque<ShadowDifference>>,
}

/// One request on which a shadow decided differently.
#[derive(Debug, Clone)]
pub struct ShadowDifference {
    /// The client's key.
    pub key: String,
    /// The fields that differ (`key`, `fresh_ttl`, `tags`, ... or `fault`).
    pub fields: Vec<&'static str>,
    /// The active decision, briefly.
    pub active: String,
    /// The candidate's decision (or fault), briefly.
    pub candidate: String,
}

impl Shadow {
    fn new(binding: Arc<Binding>, basis_points: u32) -> Self {
        Self {
            binding,
            basis_points,
            sampled: Default::default(),
            differing: Default::default(),
            examples: Mutex::new(Default::default()),
        }
    }

    /// Whether this request is in the sample.
    pub fn samples(&self) -> bool {
        rand::random_range(0..10_000) < self.basis_points
    }

    /// Records one sampled comparison.
    pub fn record(&self, difference: Option<ShadowDifference>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.sampled.fetch_add(1, Relaxed);
        if let Some(difference) = difference {
            self.differing.fetch_add(1, Relaxed);
            let mut examples = lock(&self.examples);
            if examples.len() == SHADOW_EXAMPLES {
                examples.pop_front();
            }
            examples.push_back(difference);
        }
    }

    /// Requests compared, requests that differed, and the latest differences.
    pub fn report(&self) -> (u64, u64, Vec<ShadowDifference>) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.sampled.load(Relaxed),
            self.differing.load(Relaxed),
            lock(&self.examples).iter().cloned().collect(),
        )
    }
}

/// A key's bucket in 0..10 000: FNV-1a, the same on every gateway and every
/// build, so one key always sees the same version.
pub fn stable_bucket(key: &str) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % 10_000) as u32
}

/// Loaded versions and namespace bindings.
pub struct PolicyRegistry {
    limits: PolicyEngineConfig,
    max_key_bytes: usize,
    engine: OnceLock<Arc<PolicyEngine>>,
    versions: Mutex<BTreeMap<String, PolicyVersion>>,
    bindings: ArcSwap<HashMap<String, Arc<Binding>>>,
    candidates: ArcSwap<HashMap<String, Arc<Candidates>>>,
    history: Mutex<HashMap<String, Vec<Arc<Binding>>>>,
    /// Pre-initialised images by module version and config, while a binding
    /// holds them: a binding to a version and config that another binding
    /// (active, candidate, or kept for rollback) already has shares its image.
    images: Mutex<HashMap<(String, Bytes), Weak<PolicyModule>>>,
    rollbacks: Mutex<HashMap<String, RollbackEvent>>,
    publisher: OnceLock<super::sync::ChangeSender>,
    metrics: OnceLock<super::PolicyMetrics>,
}

/// An automatic rollback, as ListPolicies reports it.
#[derive(Debug, Clone)]
pub struct RollbackEvent {
    /// The version rolled back from (`name@version`).
    pub from: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// Why.
    pub reason: String,
}

impl PolicyRegistry {
    /// An empty registry (no module loaded, no namespace bound).
    pub fn new(config: &Config) -> Self {
        Self {
            limits: config.policy.clone(),
            max_key_bytes: config.limits.max_key_bytes,
            engine: OnceLock::new(),
            versions: Mutex::new(BTreeMap::new()),
            bindings: ArcSwap::from_pointee(HashMap::new()),
            candidates: ArcSwap::from_pointee(HashMap::new()),
            history: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
            rollbacks: Mutex::new(HashMap::new()),
            publisher: OnceLock::new(),
            metrics: OnceLock::new(),
        }
    }

    /// A registry with the bindings `config` declares.
    pub fn from_config(config: &Config) -> Result<Self, BindingError> {
        let registry = Self::new(config);
        let declared = config
            .namespaces
            .iter()
            .map(|(name, ns)| (name.as_str(), format!("namespaces.{name}.policy"), ns));
        let template = config.default_namespace.enabled.then(|| {
            (
                TEMPLATE_KEY,
                "default_namespace.policy".to_owned(),
                &config.default_namespace.settings,
            )
        });
        for (namespace, field, settings) in declared.chain(template) {
            if let Some(binding) = &settings.policy {
                registry.bind_from_config(namespace, &field, binding)?;
            }
        }
        Ok(registry)
    }

    fn engine(&self) -> Result<&Arc<PolicyEngine>, LoadError> {
        if let Some(engine) = self.engine.get() {
            return Ok(engine);
        }
        let engine = Arc::new(PolicyEngine::new(&self.limits)?);
        Ok(self.engine.get_or_init(|| engine))
    }

    /// Which binding decides `key` in `namespace` (the active one, or a canary
    /// for its share of keys), and the shadow candidate watching, if any.
    pub fn route(&self, namespace: &str, template: bool, key: &str) -> Option<Route> {
        let table = self.bindings.load();
        let (resolved, active) = Self::resolve(&table, namespace, template)?;
        let candidates = self.candidates.load();
        let (binding, shadow) = pick(active, candidates.get(resolved).map(|c| &**c), key);
        Some(Route {
            binding: Arc::clone(binding),
            shadow: shadow.cloned(),
        })
    }

    /// Everything bound to `namespace` now, for the items of one batch to
    /// route by key without looking the namespace up again
    /// ([`Routes::for_key`]).
    pub fn routes(&self, namespace: &str, template: bool) -> Option<Routes> {
        let table = self.bindings.load();
        let (resolved, active) = Self::resolve(&table, namespace, template)?;
        Some(Routes {
            active: Arc::clone(active),
            candidates: self.candidates.load().get(resolved).cloned(),
        })
    }

    /// The binding table's name for `namespace` (itself, or the template's)
    /// and its active binding.
    fn resolve<'t>(
        table: &'t HashMap<String, Arc<Binding>>,
        namespace: &str,
        template: bool,
    ) -> Option<(&'t str, &'t Arc<Binding>)> {
        match table.get_key_value(namespace) {
            Some((resolved, active)) => Some((resolved.as_str(), active)),
            None if template => Some((TEMPLATE_KEY, table.get(TEMPLATE_KEY)?)),
            None => None,
        }
    }

    /// Installs (or, with `basis_points == 0`, removes) a canary or shadow
    /// candidate for `namespace`, after the same checks as [`Self::bind`].
    pub fn bind_candidate(
        &self,
        namespace: &str,
        version: &str,
        config: Bytes,
        fallback: FallbackMode,
        kind: CandidateKind,
        basis_points: u32,
    ) -> Result<(), RegistryError> {
        self.bind_candidate_synced(namespace, version, config, fallback, kind, basis_points)?;
        self.publish(super::sync::Change::Binding(namespace.to_owned()));
        Ok(())
    }

    /// Like [`Self::bind_candidate`], for a candidate that came from the fleet
    /// (not published again).
    pub fn bind_candidate_synced(
        &self,
        namespace: &str,
        version: &str,
        config: Bytes,
        fallback: FallbackMode,
        kind: CandidateKind,
        basis_points: u32,
    ) -> Result<(), RegistryError> {
        if !self.bindings.load().contains_key(namespace) {
            return Err(RegistryError::NoActive(namespace.to_owned()));
        }
        let binding = if basis_points == 0 {
            None
        } else {
            let module = self.valid_version(version)?;
            self.check_binding(&module, &config)?;
            Some(Arc::new(
                self.new_binding(namespace, module, config, fallback),
            ))
        };
        self.candidates.rcu(|table| {
            let mut table = HashMap::clone(table);
            let mut entry = table
                .get(namespace)
                .map(|existing| Candidates::clone(existing))
                .unwrap_or_default();
            match kind {
                CandidateKind::Canary => {
                    entry.canary = binding.clone().map(|binding| {
                        Arc::new(Canary {
                            binding,
                            basis_points,
                        })
                    });
                }
                CandidateKind::Shadow => {
                    entry.shadow = binding
                        .clone()
                        .map(|binding| Arc::new(Shadow::new(binding, basis_points)));
                }
            }
            if entry.canary.is_none() && entry.shadow.is_none() {
                table.remove(namespace);
            } else {
                table.insert(namespace.to_owned(), Arc::new(entry));
            }
            table
        });
        info!(
            namespace,
            ?kind,
            version,
            basis_points,
            "policy candidate updated"
        );
        Ok(())
    }

    /// Counts rejected uploads into `metrics` from now on.
    pub fn count_into(&self, metrics: super::PolicyMetrics) {
        let _ = self.metrics.set(metrics);
    }

    /// Sends local changes (uploads, bindings) to the fleet from now on.
    pub fn publish_to(&self, publisher: super::sync::ChangeSender) {
        let _ = self.publisher.set(publisher);
    }

    fn publish(&self, change: super::sync::Change) {
        if let Some(publisher) = self.publisher.get() {
            let _ = publisher.send(change);
        }
    }

    /// The active binding of `namespace` (`""`: the template's).
    pub fn active(&self, namespace: &str) -> Option<Arc<Binding>> {
        self.bindings.load().get(namespace).cloned()
    }

    /// Whether `namespace` is bound to exactly this version, config and fallback.
    pub fn is_active(
        &self,
        namespace: &str,
        version: &str,
        config: &Bytes,
        fallback: FallbackMode,
    ) -> bool {
        self.active(namespace).is_some_and(|active| {
            active.module().version() == version
                && active.config() == config
                && active.fallback() == fallback
        })
    }

    /// Like [`Self::bind`], for a binding that came from the fleet (not
    /// published again).
    pub fn bind_synced(
        &self,
        namespace: &str,
        version: &str,
        config: Bytes,
        fallback: FallbackMode,
    ) -> Result<Option<String>, RegistryError> {
        self.bind_inner(namespace, version, config, fallback, false)
    }

    /// The canary and shadow candidates of `namespace`.
    pub fn candidates(&self, namespace: &str) -> Option<Arc<Candidates>> {
        self.candidates.load().get(namespace).cloned()
    }

    /// Every version loaded, by version.
    pub fn versions(&self) -> Vec<PolicyVersion> {
        lock(&self.versions).values().cloned().collect()
    }

    /// Every binding, by namespace.
    pub fn bindings(&self) -> Vec<BindingInfo> {
        let table = self.bindings.load();
        let history = lock(&self.history);
        let mut infos: Vec<BindingInfo> = table
            .iter()
            .map(|(namespace, binding)| BindingInfo {
                namespace: namespace.clone(),
                binding: Arc::clone(binding),
                previous: history
                    .get(namespace)
                    .map(|previous| {
                        previous
                            .iter()
                            .rev()
                            .map(|b| b.module().version().to_owned())
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect();
        infos.sort_by(|a, b| a.namespace.cmp(&b.namespace));
        infos
    }

    /// A loaded version, valid or not (EvalPolicy may probe either).
    pub fn version(&self, version: &str) -> Result<Arc<PolicyModule>, RegistryError> {
        lock(&self.versions)
            .get(version)
            .map(|entry| Arc::clone(&entry.module))
            .ok_or_else(|| RegistryError::UnknownVersion(version.to_owned()))
    }

    /// A loaded version that passed validation, the only kind a binding
    /// change may install.
    fn valid_version(&self, version: &str) -> Result<Arc<PolicyModule>, RegistryError> {
        let versions = lock(&self.versions);
        let entry = versions
            .get(version)
            .ok_or_else(|| RegistryError::UnknownVersion(version.to_owned()))?;
        match &entry.invalid {
            None => Ok(Arc::clone(&entry.module)),
            Some(reason) => Err(known_invalid(reason)),
        }
    }

    fn insert_version(
        &self,
        module: PolicyModule,
        source: &'static str,
        invalid: Option<String>,
    ) -> Arc<PolicyModule> {
        let mut versions = lock(&self.versions);
        if let Some(existing) = versions.get(module.version()) {
            return Arc::clone(&existing.module);
        }
        let module = Arc::new(module);
        versions.insert(
            module.version().to_owned(),
            PolicyVersion {
                module: Arc::clone(&module),
                loaded_at_ms: unix_millis(),
                source,
                invalid,
            },
        );
        module
    }

    /// Compiles and validates an uploaded module: it must compile, import
    /// nothing but `cachegw.log`, implement the ABI, and decide a probe Get,
    /// Set and Delete validly under the normal limits. A rejected upload
    /// changes nothing.
    pub fn put(
        &self,
        name: &str,
        bytes: &[u8],
        source: &'static str,
    ) -> Result<Arc<PolicyModule>, RegistryError> {
        self.validate_and_insert(name, bytes, source)
            .inspect_err(|_| {
                if let Some(metrics) = self.metrics.get() {
                    metrics.upload_rejected(source);
                }
            })
    }

    fn validate_and_insert(
        &self,
        name: &str,
        bytes: &[u8],
        source: &'static str,
    ) -> Result<Arc<PolicyModule>, RegistryError> {
        if bytes.is_empty() {
            return Err(RegistryError::Rejected(
                "the module is empty (0 bytes)".into(),
            ));
        }
        // Known bytes were validated when first loaded; the verdict stands.
        match self.valid_version(&engine::content_version(bytes)) {
            Err(RegistryError::UnknownVersion(_)) => {}
            known => return known,
        }
        let started = Instant::now();
        let module = self.validate(name, bytes)?;
        let module = self.insert_version(module, source, None);
        // Share what was uploaded here; what came from the fleet is there already.
        if source != "redis" && source != "config" {
            self.publish(super::sync::Change::Module {
                version: module.version().to_owned(),
                name: module.name().to_owned(),
                bytes: Bytes::copy_from_slice(bytes),
            });
        }
        info!(policy = %module.label(), source, validate_ms = started.elapsed().as_millis() as u64, "policy version accepted");
        Ok(module)
    }

    /// What [`Self::put`] checks, without accepting the module: it compiles,
    /// imports nothing but `cachegw.log`, implements the ABI and passes the
    /// dry run. The fuzz targets call this (`put` would keep every module
    /// that passes).
    pub fn validate(&self, name: &str, bytes: &[u8]) -> Result<PolicyModule, RegistryError> {
        if bytes.is_empty() {
            return Err(RegistryError::Rejected(
                "the module is empty (0 bytes)".into(),
            ));
        }
        let engine = self
            .engine()
            .map_err(|err| RegistryError::Rejected(err.to_string()))?;
        let module = engine.load(name, bytes).map_err(|err| match err {
            engine::LoadError::TooLarge { .. } => RegistryError::TooLarge(err.to_string()),
            err => RegistryError::Rejected(err.to_string()),
        })?;
        self.verdict(&module).map_err(RegistryError::Rejected)?;
        Ok(module)
    }

    /// Whether a compiled module may serve: it implements the ABI and passes
    /// the dry run. `Err` says why not.
    fn verdict(&self, module: &PolicyModule) -> Result<(), String> {
        if let Err(fault) = module.abi() {
            return Err(format!("{} {fault}", module.label()));
        }
        self.dry_run(module, &Bytes::new())
            .map_err(|reason| format!("{} {reason}", module.label()))
    }

    /// Accepts `bytes` as a version of `name` (see [`Self::put`]) and moves
    /// every namespace bound to a module of that name to it, keeping each
    /// binding's config and fallback. Returns the namespaces moved.
    pub fn put_and_rebind(
        &self,
        name: &str,
        bytes: &[u8],
        source: &'static str,
    ) -> Result<Vec<String>, RegistryError> {
        let module = self.put(name, bytes, source)?;
        let stale: Vec<(String, Arc<Binding>)> = self
            .bindings
            .load()
            .iter()
            .filter(|(_, binding)| {
                binding.module().name() == name && binding.module().version() != module.version()
            })
            .map(|(namespace, binding)| (namespace.clone(), Arc::clone(binding)))
            .collect();
        let mut moved = Vec::new();
        for (namespace, binding) in stale {
            match self.bind(
                &namespace,
                module.version(),
                binding.config().clone(),
                binding.fallback(),
            ) {
                Ok(_) => moved.push(namespace),
                Err(err) => warn!(namespace, policy = %module.label(), "not re-bound: {err}"),
            }
        }
        Ok(moved)
    }

    /// Runs a probe Get, Set and Delete; every one must give a valid decision.
    fn dry_run(&self, module: &PolicyModule, config: &Bytes) -> Result<(), String> {
        let limits = super::DecisionLimits {
            max_key_bytes: self.max_key_bytes,
            max_ttl: self.limits.max_ttl,
            max_items: self.limits.max_decision_items,
        };
        let namespace = crate::cache::NamespaceSettings::new("dry-run", &Default::default());
        for (op, name) in [
            (pb::Operation::Get, "get"),
            (pb::Operation::Set, "set"),
            (pb::Operation::Delete, "delete"),
        ] {
            let input = pb::PolicyInput {
                op: op as i32,
                namespace: "cachegw-dry-run".into(),
                key: "cachegw-dry-run:probe".into(),
                attributes: HashMap::new(),
                value_size: if op == pb::Operation::Set { 128 } else { 0 },
                now_unix_ms: unix_millis(),
                config: config.clone(),
            };
            module
                .decide_blocking(&input)
                .and_then(|wire| {
                    super::Decision::from_wire(wire, &namespace, &limits, module.decided_by())
                })
                .map_err(|fault| format!("failed its dry run: the {name} probe {fault}"))?;
        }
        Ok(())
    }

    /// Binds `version` to `namespace` with `config`, after checking the config
    /// with the policy's init and a dry run. Returns the version it replaced.
    pub fn bind(
        &self,
        namespace: &str,
        version: &str,
        config: Bytes,
        fallback: FallbackMode,
    ) -> Result<Option<String>, RegistryError> {
        self.bind_inner(namespace, version, config, fallback, true)
    }

    fn bind_inner(
        &self,
        namespace: &str,
        version: &str,
        config: Bytes,
        fallback: FallbackMode,
        publish: bool,
    ) -> Result<Option<String>, RegistryError> {
        let module = self.valid_version(version)?;
        self.check_binding(&module, &config)?;
        let binding = self.new_binding(namespace, module, config, fallback);
        let previous = self.swap(namespace, Some(Arc::new(binding)));
        // Candidates were measured against the binding just replaced.
        self.candidates.rcu(|table| {
            let mut table = HashMap::clone(table);
            table.remove(namespace);
            table
        });
        if publish {
            self.publish(super::sync::Change::Binding(namespace.to_owned()));
        }
        Ok(previous.map(|binding| binding.module().version().to_owned()))
    }

    /// A binding of `module` with `config`. With `policy.preinit`, its calls
    /// start from an image of the module pre-initialised with `config`, which
    /// must pass the same dry run as the module (or the image another binding
    /// of them has); a module that cannot be pre-initialised serves as it is,
    /// with a warning.
    fn new_binding(
        &self,
        namespace: &str,
        module: Arc<PolicyModule>,
        config: Bytes,
        fallback: FallbackMode,
    ) -> Binding {
        let binding = Binding::new(namespace, module, config, fallback);
        if !self.limits.preinit {
            return binding;
        }
        let (module, config) = (binding.module(), binding.config());
        let key = (module.version().to_owned(), config.clone());
        if let Some(image) = lock(&self.images).get(&key).and_then(Weak::upgrade) {
            return binding.with_image(image);
        }
        let image = match module.preinitialized(config) {
            Ok(image) => image,
            // Nothing to pre-initialise, or a module every call of which faults.
            Err(PreinitError::NoInit | PreinitError::Abi(_)) => return binding,
            Err(err) => {
                warn!(namespace, policy = %module.label(), "binding not pre-initialised, its calls start from the module: {err}");
                return binding;
            }
        };
        if let Err(reason) = self.dry_run(&image, config) {
            warn!(namespace, policy = %module.label(), "binding not pre-initialised, its calls start from the module: its pre-initialised image {reason}");
            return binding;
        }
        if let Some(preinit) = image.preinit() {
            info!(
                namespace,
                policy = %module.label(),
                image_bytes = preinit.image_bytes,
                preinit_ms = preinit.took.as_millis() as u64,
                "binding pre-initialised"
            );
        }
        let image = Arc::new(image);
        let mut images = lock(&self.images);
        images.retain(|_, held| held.strong_count() > 0);
        images.insert(key, Arc::downgrade(&image));
        drop(images);
        binding.with_image(image)
    }

    /// The policy's init must accept `config`, and a dry run with it pass.
    fn check_binding(&self, module: &PolicyModule, config: &Bytes) -> Result<(), RegistryError> {
        match module.init(config) {
            Ok(None) => {}
            Ok(Some(reason)) => {
                return Err(RegistryError::Rejected(format!(
                    "{} rejects this config: {reason}",
                    module.label()
                )));
            }
            Err(fault) => {
                return Err(RegistryError::Rejected(format!(
                    "{} init {fault}",
                    module.label()
                )));
            }
        }
        self.dry_run(module, config)
            .map_err(|reason| RegistryError::Rejected(format!("{} {reason}", module.label())))
    }

    /// Rolls `faulty`'s namespace back to its previous binding, if `faulty` is
    /// still the active one and there is a previous one. The event is logged
    /// and shown by ListPolicies. True when it rolled back.
    pub fn roll_back_faulty(&self, faulty: &Arc<Binding>, reason: &str) -> bool {
        let namespace = faulty.namespace();
        let still_active = self
            .bindings
            .load()
            .get(namespace)
            .is_some_and(|active| Arc::ptr_eq(active, faulty));
        if !still_active {
            return false;
        }
        match self.rollback(namespace) {
            Ok(version) => {
                warn!(namespace, from = %faulty.module().label(), to = %version, reason, "policy rolled back automatically");
                lock(&self.rollbacks).insert(
                    namespace.to_owned(),
                    RollbackEvent {
                        from: faulty.module().label().to_string(),
                        at_ms: unix_millis(),
                        reason: reason.to_owned(),
                    },
                );
                true
            }
            Err(err) => {
                warn!(namespace, policy = %faulty.module().label(), reason, "policy keeps faulting and cannot be rolled back: {err}");
                false
            }
        }
    }

    /// The last automatic rollback of `namespace`, if any.
    pub fn last_rollback(&self, namespace: &str) -> Option<RollbackEvent> {
        lock(&self.rollbacks).get(namespace).cloned()
    }

    /// Rolls `namespace` back to the binding before its current one.
    pub fn rollback(&self, namespace: &str) -> Result<String, RegistryError> {
        let previous = lock(&self.history)
            .get_mut(namespace)
            .and_then(Vec::pop)
            .ok_or_else(|| RegistryError::NoPrevious(namespace.to_owned()))?;
        let version = previous.module().version().to_owned();
        self.replace(namespace, Some(previous));
        warn!(namespace, to = %version, "policy binding rolled back");
        self.publish(super::sync::Change::Binding(namespace.to_owned()));
        Ok(version)
    }

    /// Installs `binding` (or removes the namespace's binding), remembering the
    /// one it replaces for rollback. Returns that one.
    fn swap(&self, namespace: &str, binding: Option<Arc<Binding>>) -> Option<Arc<Binding>> {
        if let (Some(binding), Some(metrics)) = (&binding, self.metrics.get()) {
            metrics.bound(binding.module.label());
        }
        let previous = self.replace(namespace, binding);
        if let Some(previous) = &previous {
            lock(&self.history)
                .entry(namespace.to_owned())
                .or_default()
                .push(Arc::clone(previous));
        }
        previous
    }

    fn replace(&self, namespace: &str, binding: Option<Arc<Binding>>) -> Option<Arc<Binding>> {
        let mut previous = None;
        self.bindings.rcu(|table| {
            let mut table = HashMap::clone(table);
            previous = match &binding {
                Some(binding) => table.insert(namespace.to_owned(), Arc::clone(binding)),
                None => table.remove(namespace),
            };
            table
        });
        if let Some(binding) = &binding {
            info!(namespace, policy = %binding.module().label(), "policy binding active");
        }
        previous
    }

    /// Loads the module file a config binding names and binds it. Config
    /// mistakes stop start-up; a module that fails the ABI checks or the dry
    /// run is bound anyway and faults on every call (visible, counted, never
    /// failing a request), and its version is recorded as invalid.
    fn bind_from_config(
        &self,
        namespace: &str,
        field: &str,
        config: &PolicyBindingConfig,
    ) -> Result<(), BindingError> {
        let module = self.load_file(field, &config.module)?;
        let config_bytes = engine::config_bytes(config.config.as_ref());
        let mut healthy = true;
        match module.init(&config_bytes) {
            Ok(None) => {}
            Ok(Some(reason)) => {
                return Err(BindingError::ConfigRejected {
                    field: format!("{field}.config"),
                    policy: module.label().to_string(),
                    reason,
                });
            }
            Err(fault) => {
                healthy = false;
                warn!(policy = %module.label(), binding = field, "policy init {fault}; requests will use the fallback")
            }
        }
        if let Some(reason) = self.invalid_reason(module.version()) {
            healthy = false;
            warn!(policy = %module.label(), binding = field, "policy fails validation: {reason}; requests will use the fallback");
        }
        // A binding whose calls fault is not worth an image (nor a second warning).
        let binding = if healthy {
            self.new_binding(namespace, module, config_bytes, config.fallback)
        } else {
            Binding::new(namespace, module, config_bytes, config.fallback)
        };
        let binding = binding.with_memo(config.memo);
        self.replace(namespace, Some(Arc::new(binding)));
        Ok(())
    }

    fn load_file(&self, field: &str, path: &Path) -> Result<Arc<PolicyModule>, BindingError> {
        let bytes = std::fs::read(path).map_err(|source| BindingError::Read {
            field: format!("{field}.module"),
            path: path.to_owned(),
            source,
        })?;
        let version = engine::content_version(&bytes);
        if let Ok(module) = self.version(&version) {
            return Ok(module);
        }
        let load_error = |source| BindingError::Load {
            field: format!("{field}.module"),
            path: path.to_owned(),
            source,
        };
        let engine = self.engine().map_err(BindingError::Engine)?;
        let module = engine
            .load(&module_name(path), &bytes)
            .map_err(load_error)?;
        // The same checks as an upload: the verdict is what PutPolicy answers
        // for these bytes and what ListPolicies shows.
        let invalid = self.verdict(&module).err();
        Ok(self.insert_version(module, "config", invalid))
    }

    fn invalid_reason(&self, version: &str) -> Option<String> {
        lock(&self.versions)
            .get(version)
            .and_then(|entry| entry.invalid.clone())
    }
}

/// The refusal of a version the config file loaded although it fails
/// validation: the same reason an upload of its bytes gets.
fn known_invalid(reason: &str) -> RegistryError {
    RegistryError::Rejected(format!(
        "{reason} (a known-invalid version: the config file loads it, and it may not be uploaded or bound)"
    ))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated
    // (every update is a single insert/remove), so a poisoned lock is usable.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}
