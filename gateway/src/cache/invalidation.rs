//! Invalidation: the Invalidate RPC's commands and the jobs that run them,
//! and the purge runner shared with the invalidations policies attach to
//! writes.
//!
//! Every Invalidate runs as a job on its own task: the call waits for it up to
//! a bound and otherwise answers RUNNING with the job's id, which
//! GetInvalidation follows. A job keeps running if its caller goes away.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{info, warn};

use super::{
    Attributes, Cache, Change, InvalidationReport, MAX_TAG_BYTES, RequestError,
    reserve_answer_time, scoped_key, unix_millis,
};
use crate::{
    config::InvalidationConfig,
    policy::{DecisionBatch, DecisionRequest, Invalidation, Operation},
    store::{Progress, PurgeMode, StorageKey, Store},
};

/// What an Invalidate removes or marks stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Exact keys, mapped by the namespace's policy like a Delete.
    Keys(Vec<String>),
    /// A glob over the namespace's stored keys.
    Pattern(String),
    /// Entries carrying any of these tags.
    Tags(Vec<String>),
    /// Every entry of the namespace.
    WholeNamespace,
}

impl Target {
    fn label(&self) -> &'static str {
        match self {
            Target::Keys(_) => "keys",
            Target::Pattern(_) => "pattern",
            Target::Tags(_) => "tags",
            Target::WholeNamespace => "namespace",
        }
    }
}

/// A validated Invalidate.
#[derive(Debug, Clone)]
pub struct InvalidateCommand {
    /// Namespace name (syntax already checked).
    pub namespace: String,
    /// What to invalidate.
    pub target: Target,
    /// Mark stale instead of removing.
    pub soft: bool,
    /// Request context (for the policy, with `Target::Keys`).
    pub attributes: Attributes,
    /// How long to wait for the job (`None`: the configured default).
    pub wait: Option<Duration>,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Still running.
    Running,
    /// Finished.
    Done,
    /// Stopped by an error.
    Failed,
}

/// A job's progress or outcome, as reported to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSnapshot {
    /// The job's id on this gateway.
    pub id: String,
    /// Running, done or failed.
    pub state: JobState,
    /// Entries removed or marked stale so far.
    pub affected: u64,
    /// Candidates examined so far.
    pub examined: u64,
    /// What went wrong (empty when nothing did).
    pub error: String,
    /// The namespace's generation after a whole-namespace invalidation.
    pub generation: u64,
    /// How long the job has run (or ran).
    pub elapsed: Duration,
    /// Who mapped the keys (for `Target::Keys`).
    pub policy: String,
}

/// One invalidation job.
struct Job {
    id: String,
    /// The namespace invalidated: following the job takes the right to
    /// invalidate it.
    namespace: String,
    started: Instant,
    policy: String,
    progress: Progress,
    generation: AtomicU64,
    /// `None` while running; the error text (possibly empty) once finished.
    finished: watch::Sender<Option<Finished>>,
}

#[derive(Debug, Clone)]
struct Finished {
    at: Instant,
    error: String,
}

impl Job {
    fn snapshot(&self) -> JobSnapshot {
        let finished = self.finished.borrow().clone();
        let (state, error, elapsed) = match finished {
            None => (JobState::Running, String::new(), self.started.elapsed()),
            Some(Finished { at, error }) => (
                if error.is_empty() {
                    JobState::Done
                } else {
                    JobState::Failed
                },
                error,
                at - self.started,
            ),
        };
        JobSnapshot {
            id: self.id.clone(),
            state,
            affected: self.progress.affected(),
            examined: self.progress.examined(),
            error,
            generation: self.generation.load(Ordering::Relaxed),
            elapsed,
            policy: self.policy.clone(),
        }
    }

    fn finished_at(&self) -> Option<Instant> {
        self.finished.borrow().as_ref().map(|finished| finished.at)
    }
}

/// The jobs of this gateway: running ones, and finished ones for a while.
pub struct InvalidationJobs {
    /// Distinguishes this process's job ids from another gateway's.
    prefix: String,
    next: AtomicU64,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    running: Arc<Semaphore>,
    config: InvalidationConfig,
}

/// Finished jobs kept at most, whatever `keep_finished` says.
const MAX_KEPT_JOBS: usize = 10_000;

impl InvalidationJobs {
    /// Jobs run under `config`'s limits.
    pub fn new(config: &InvalidationConfig) -> Self {
        Self {
            prefix: format!("{:08x}", rand::random::<u32>()),
            next: AtomicU64::new(1),
            jobs: Mutex::new(HashMap::new()),
            running: Arc::new(Semaphore::new(config.max_running_jobs)),
            config: config.clone(),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts `work` as a job, unless too many are running.
    fn start<W, F>(
        &self,
        namespace: &str,
        policy: String,
        work: W,
    ) -> Result<Arc<Job>, RequestError>
    where
        W: FnOnce(Arc<Job>) -> F,
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let permit: OwnedSemaphorePermit =
            Arc::clone(&self.running).try_acquire_owned().map_err(|_| {
                RequestError::TooLarge {
                    field: "invalidation",
                    reason: format!(
                        "{} invalidation jobs are already running (invalidation.max_running_jobs); retry later",
                        self.config.max_running_jobs
                    ),
                }
            })?;
        let job = Arc::new(Job {
            id: format!(
                "{}-{}",
                self.prefix,
                self.next.fetch_add(1, Ordering::Relaxed)
            ),
            namespace: namespace.to_owned(),
            started: Instant::now(),
            policy,
            progress: Progress::default(),
            generation: AtomicU64::new(0),
            finished: watch::channel(None).0,
        });
        self.prune();
        self.table().insert(job.id.clone(), Arc::clone(&job));
        let running = work(Arc::clone(&job));
        let timeout = self.config.job_timeout;
        let handle = Arc::clone(&job);
        tokio::spawn(async move {
            let _permit = permit;
            let error = match tokio::time::timeout(timeout, running).await {
                Ok(Ok(())) => String::new(),
                Ok(Err(error)) => error,
                Err(_) => format!("stopped after {timeout:?} (invalidation.job_timeout)"),
            };
            handle.finished.send_replace(Some(Finished {
                at: Instant::now(),
                error,
            }));
        });
        Ok(job)
    }

    /// Waits up to `wait` for `job` to finish, then reports where it is.
    async fn wait(&self, job: &Job, wait: Duration) -> JobSnapshot {
        if !wait.is_zero() {
            let mut finished = job.finished.subscribe();
            // Either way, the snapshot below tells the caller where it is.
            let _ = tokio::time::timeout(wait, finished.wait_for(Option::is_some)).await;
        }
        job.snapshot()
    }

    fn find(&self, id: &str) -> Option<Arc<Job>> {
        self.prune();
        self.table().get(id).cloned()
    }

    /// Forgets finished jobs older than `keep_finished` (and the oldest
    /// finished ones beyond [`MAX_KEPT_JOBS`]).
    fn prune(&self) {
        let keep = self.config.keep_finished;
        let mut table = self.table();
        table.retain(|_, job| job.finished_at().is_none_or(|at| at.elapsed() < keep));
        if table.len() > MAX_KEPT_JOBS {
            let mut finished: Vec<(Instant, String)> = table
                .values()
                .filter_map(|job| Some((job.finished_at()?, job.id.clone())))
                .collect();
            finished.sort();
            let excess = table.len() - MAX_KEPT_JOBS;
            for (_, id) in finished.into_iter().take(excess) {
                table.remove(&id);
            }
        }
    }
}

impl Cache {
    /// Starts an invalidation job and waits for it within the call's budget.
    pub async fn invalidate(
        &self,
        command: InvalidateCommand,
        deadline: Option<Duration>,
    ) -> Result<JobSnapshot, RequestError> {
        let started = Instant::now();
        let settings = self
            .namespaces
            .resolve(&command.namespace)
            .inspect_err(|_| self.metrics.rejected("invalidate"))?;
        let metric = settings.label();
        let work = self
            .invalidation_work(&command)
            .await
            .inspect_err(|_| self.metrics.rejected("invalidate"))?;
        let soft = command.soft;
        let namespace = command.namespace.clone();
        let target = command.target.label();
        let store = Arc::clone(&self.store);
        let metrics = self.metrics.clone();
        let job_metric = Arc::clone(&metric);
        let near = self.near.clone();
        let job = self.jobs.start(
            &command.namespace,
            work.policy.clone(),
            move |job| async move {
                let _running = metrics.job_started();
                let change = Change::of_invalidation(&namespace, &work.invalidation, work.flush);
                // Announced when the job starts, so near-caches stop serving
                // what it is about to purge, and again when it ends, for
                // entries read back from the store while it ran. The second
                // comes before the job reports done.
                if let (Some(near), Some(change)) = (&near, &change) {
                    near.changed(change.clone()).await;
                }
                let result = run_job(&*store, &namespace, &work, soft, &job).await;
                if let (Some(near), Some(change)) = (&near, change) {
                    near.changed(change).await;
                }
                metrics.invalidated(job.progress.affected());
                metrics.job_finished(&job_metric, target, result.is_err());
                match &result {
                    Ok(()) => info!(
                        job = %job.id, namespace, target, soft,
                        affected = job.progress.affected(),
                        elapsed_ms = job.started.elapsed().as_millis() as u64,
                        "invalidation finished"
                    ),
                    Err(error) => {
                        warn!(job = %job.id, namespace, target, soft, error, "invalidation failed");
                    }
                }
                result
            },
        )?;
        let wait = self.bounded_wait(command.wait, deadline);
        let snapshot = self.jobs.wait(&job, wait).await;
        self.metrics.request(
            "invalidate",
            &metric,
            match snapshot.state {
                JobState::Running => "running",
                JobState::Done => "done",
                JobState::Failed => "failed",
            },
            started.elapsed(),
        );
        Ok(snapshot)
    }

    /// The namespace job `id` invalidates, if this gateway knows the job.
    pub fn invalidation_namespace(&self, id: &str) -> Option<String> {
        self.jobs.find(id).map(|job| job.namespace.clone())
    }

    /// Reports on a job, waiting up to `wait` (bounded by the deadline) for it
    /// to finish.
    pub async fn invalidation_status(
        &self,
        id: &str,
        wait: Duration,
        deadline: Option<Duration>,
    ) -> Result<JobSnapshot, RequestError> {
        let job = self.jobs.find(id).ok_or_else(|| {
            RequestError::NotFound {
                field: "job_id",
                reason: format!(
                    "no invalidation job `{id}` on this gateway (jobs are followed on the gateway that accepted them, and kept for invalidation.keep_finished = {:?} after they finish)",
                    self.jobs.config.keep_finished
                ),
            }
        })?;
        let wait = deadline.map_or(wait, |deadline| wait.min(reserve_answer_time(deadline)));
        Ok(self.jobs.wait(&job, wait).await)
    }

    fn bounded_wait(&self, asked: Option<Duration>, deadline: Option<Duration>) -> Duration {
        let wait = asked.unwrap_or(self.jobs.config.wait);
        deadline.map_or(wait, |deadline| wait.min(reserve_answer_time(deadline)))
    }

    /// Checks the command against the limits and works out what to purge.
    async fn invalidation_work(&self, command: &InvalidateCommand) -> Result<Work, RequestError> {
        let max_targets = self.jobs.config.max_targets;
        let check_count = |field: &'static str, count: usize| {
            if count == 0 {
                return Err(RequestError::invalid(field, "must not be empty"));
            }
            if count > max_targets {
                return Err(RequestError::TooLarge {
                    field,
                    reason: format!(
                        "{count} entries exceed the limit of {max_targets} (invalidation.max_targets)"
                    ),
                });
            }
            Ok(())
        };
        let mut work = Work::default();
        match &command.target {
            Target::Keys(keys) => {
                check_count("keys", keys.len())?;
                // One policy instance for all the keys of the request.
                let mut batch = DecisionBatch::default();
                for key in keys {
                    let plan = self
                        .plan(
                            DecisionRequest {
                                op: Operation::Delete,
                                namespace: &command.namespace,
                                key,
                                attributes: &command.attributes,
                                value_size: 0,
                            },
                            Some(&mut batch),
                            Instant::now(),
                        )
                        .await?;
                    if work.policy.is_empty() {
                        work.policy = plan.decision.decided_by.to_string();
                    }
                    if plan.decision.bypass {
                        continue;
                    }
                    work.invalidation.keys.push(plan.decision.key.into_string());
                    if let Some(decided) = plan.decision.invalidate {
                        let Invalidation {
                            keys,
                            patterns,
                            tags,
                        } = *decided;
                        work.invalidation.keys.extend(keys);
                        work.invalidation.patterns.extend(patterns);
                        work.invalidation.tags.extend(tags);
                    }
                }
            }
            Target::Pattern(pattern) => {
                if pattern.is_empty() {
                    return Err(RequestError::invalid("pattern", "must not be empty"));
                }
                if pattern.len() > self.max_key_bytes {
                    return Err(RequestError::invalid(
                        "pattern",
                        format!(
                            "{} bytes exceed the limit of {} bytes (limits.max_key_bytes)",
                            pattern.len(),
                            self.max_key_bytes
                        ),
                    ));
                }
                work.invalidation.patterns.push(pattern.clone());
            }
            Target::Tags(tags) => {
                check_count("tags", tags.len())?;
                if let Some(bad) = tags
                    .iter()
                    .find(|tag| tag.is_empty() || tag.len() > MAX_TAG_BYTES)
                {
                    return Err(RequestError::invalid(
                        "tags",
                        format!(
                            "holds a tag of {} bytes (tags are 1 to {MAX_TAG_BYTES} bytes)",
                            bad.len(),
                        ),
                    ));
                }
                work.invalidation.tags.extend(tags.iter().cloned());
            }
            Target::WholeNamespace => work.flush = true,
        }
        Ok(work)
    }

    /// Runs the invalidations a write decision attached, after the write,
    /// within `policy.invalidation_timeout`.
    pub(super) async fn write_side_effects(
        &self,
        namespace: &str,
        invalidation: &Invalidation,
    ) -> InvalidationReport {
        if invalidation.is_empty() {
            return InvalidationReport::default();
        }
        let progress = Progress::default();
        let errors = match tokio::time::timeout(
            self.invalidation_timeout,
            purge(
                &*self.store,
                namespace,
                invalidation,
                PurgeMode::Delete,
                &progress,
            ),
        )
        .await
        {
            Ok(errors) => errors,
            Err(_) => vec![format!(
                "timed out after {:?} (policy.invalidation_timeout)",
                self.invalidation_timeout
            )],
        };
        // Announced even when some purges failed: what did run changed entries.
        self.announce(Change::of_invalidation(namespace, invalidation, false))
            .await;
        let removed = progress.affected();
        self.metrics.invalidated(removed);
        if !errors.is_empty() {
            warn!(namespace, errors = ?errors, "invalidations incomplete");
        }
        InvalidationReport {
            removed,
            error: errors.join("; "),
        }
    }
}

/// What an invalidation job will do.
#[derive(Debug, Default)]
struct Work {
    invalidation: Invalidation,
    flush: bool,
    policy: String,
}

/// What one job does: a namespace flush, or purges, as of now.
async fn run_job(
    store: &dyn Store,
    namespace: &str,
    work: &Work,
    soft: bool,
    job: &Job,
) -> Result<(), String> {
    let mode = if soft {
        PurgeMode::MarkStale {
            now_ms: unix_millis(),
        }
    } else {
        PurgeMode::Delete
    };
    if work.flush {
        let generation = store
            .flush_namespace(namespace, mode)
            .await
            .map_err(|err| err.to_string())?;
        job.generation.store(generation, Ordering::Relaxed);
        return Ok(());
    }
    let errors = purge(store, namespace, &work.invalidation, mode, &job.progress).await;
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Runs `invalidation` against `store`, all scoped to `namespace`, counting
/// into `progress`; returns what failed (empty when everything ran).
async fn purge(
    store: &dyn Store,
    namespace: &str,
    invalidation: &Invalidation,
    mode: PurgeMode,
    progress: &Progress,
) -> Vec<String> {
    let mut errors = Vec::new();
    if !invalidation.keys.is_empty() {
        let keys: Vec<StorageKey> = invalidation
            .keys
            .iter()
            .map(|key| scoped_key(namespace, key))
            .collect();
        match store.purge_keys(&keys, mode).await {
            Ok(affected) => progress.add(keys.len() as u64, affected),
            Err(err) => errors.push(format!("keys: {err}")),
        }
    }
    for pattern in &invalidation.patterns {
        if let Err(err) = store
            .purge_matching(namespace, pattern, mode, progress)
            .await
        {
            errors.push(format!("pattern {pattern:?}: {err}"));
        }
    }
    for tag in &invalidation.tags {
        if let Err(err) = store.purge_tag(namespace, tag, mode, progress).await {
            errors.push(format!("tag {tag:?}: {err}"));
        }
    }
    errors
}
