//! Leases: stampede protection for the read path.
//!
//! A Get may ask for a lease. When the entry is missing or stale, exactly one
//! caller across every gateway sharing the store is granted it (the store's
//! atomic "set if absent"); the others get the stale value at once, or wait
//! for the holder's fill — coalesced on each gateway onto one poller per key
//! — or are told to wait. The holder fills with a Set carrying the token,
//! which the store accepts only while the lease is still current: a Delete or
//! Invalidate in between voids it (fencing). On a fresh hit near expiry, one
//! lease-asking reader is granted an early refresh with the XFetch
//! probability (Vattani et al., "Optimal Probabilistic Cache Stampede
//! Prevention", VLDB 2015): `now - fill_time * beta * ln(rand) >= expiry`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{
    Cache, GetResult, Outcome, Plan, RequestError, envelope, reserve_answer_time, unix_millis,
};
use crate::{
    policy::{DecisionRequest, Operation},
    store::{Fetched, LeaseCondition, LeaseGrant, StorageKey, Store},
};

/// What a Get asks of the lease protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseAsk {
    /// How long to wait for another caller's fill (zero: do not wait).
    pub wait: Duration,
    /// The lease's lifetime (`None`: the namespace's `lease_ttl`).
    pub ttl: Option<Duration>,
}

/// What became of a Get's lease request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// No lease was asked for.
    NotRequested,
    /// The caller holds the lease (the token is in the result).
    Granted,
    /// Another caller holds it and this one did not wait.
    Wait,
    /// Another caller holds it; the stale value is served meanwhile.
    StaleServed,
    /// The caller waited and got the value another caller filled.
    Coalesced,
    /// The caller waited and no fill came in time.
    TimedOut,
    /// The entry is fresh: no lease needed.
    NotNeeded,
}

impl LeaseState {
    fn label(self) -> &'static str {
        match self {
            LeaseState::NotRequested => "not_requested",
            LeaseState::Granted => "granted",
            LeaseState::Wait => "wait",
            LeaseState::StaleServed => "stale_served",
            LeaseState::Coalesced => "coalesced",
            LeaseState::TimedOut => "timed_out",
            LeaseState::NotNeeded => "not_needed",
        }
    }
}

/// What became of a Set's lease token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseWrite {
    /// The Set carried no token.
    None,
    /// The lease was current: stored, lease consumed.
    Accepted,
    /// The lease was voided, expired or replaced: nothing written.
    Voided,
}

/// A validated ReleaseLease.
#[derive(Debug, Clone)]
pub struct ReleaseCommand {
    /// Namespace name (syntax already checked).
    pub namespace: String,
    /// Non-empty key.
    pub key: String,
    /// Request context.
    pub attributes: super::Attributes,
    /// The lease token.
    pub token: String,
}

/// What a lease request got, as the cache layer sees it.
enum Grant {
    Granted(String),
    Held,
    /// No fill needed any more: the entry that makes it so, read.
    Filled(GetResult),
}

/// Longest lease token accepted.
const MAX_TOKEN_BYTES: usize = 64;

/// A new token: the grant time (ms since the epoch, for the fill time the
/// Set records) and 64 random bits.
fn new_token() -> String {
    format!("{}.{:016x}", unix_millis(), rand::random::<u64>())
}

/// The grant time in a token this gateway (or another) issued.
pub(super) fn check_token(token: &str) -> Result<u64, RequestError> {
    let malformed = || {
        RequestError::invalid(
            "lease_token",
            "is not a lease token (pass the `lease_token` of a GRANTED Get unchanged)",
        )
    };
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(malformed());
    }
    let (granted_at, nonce) = token.split_once('.').ok_or_else(malformed)?;
    if nonce.len() != 16 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(malformed());
    }
    granted_at.parse().map_err(|_| malformed())
}

/// The fill time a Set with `token` records: from the grant to now.
pub(super) fn fill_ms(granted_at_ms: u64) -> u32 {
    u32::try_from(unix_millis().saturating_sub(granted_at_ms)).unwrap_or(u32::MAX)
}

/// How often a waiting gateway looks for the fill another gateway writes.
const FILL_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Callers on this gateway waiting for a fill, one poller per key: a
/// thousand waiters cost the store one read per poll interval, not a
/// thousand.
#[derive(Default)]
pub(super) struct Fills {
    polls: Mutex<HashMap<StorageKey, Arc<watch::Sender<Option<Fetched>>>>>,
}

impl Fills {
    fn table(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<StorageKey, Arc<watch::Sender<Option<Fetched>>>>> {
        self.polls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits on `key`'s fill, starting its poller if nobody waits yet.
    fn subscribe(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        key: &StorageKey,
        give_up_after: Duration,
    ) -> watch::Receiver<Option<Fetched>> {
        let mut table = self.table();
        if let Some(poll) = table.get(key) {
            return poll.subscribe();
        }
        let (sender, receiver) = watch::channel(None);
        let sender = Arc::new(sender);
        table.insert(key.clone(), Arc::clone(&sender));
        drop(table);
        let fills = Arc::clone(self);
        let store = Arc::clone(store);
        let key = key.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut ticker = tokio::time::interval(FILL_POLL_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while sender.receiver_count() > 0
                && sender.borrow().is_none()
                && started.elapsed() < give_up_after
            {
                ticker.tick().await;
                if let Ok(fetched) = store.get(&key).await
                    && is_fresh(&fetched)
                {
                    sender.send_replace(Some(fetched));
                }
            }
            let mut table = fills.table();
            if table
                .get(&key)
                .is_some_and(|poll| Arc::ptr_eq(poll, &sender))
            {
                table.remove(&key);
            }
        });
        receiver
    }

    /// Hands a fill written through this gateway to its waiters at once.
    fn deliver(&self, key: &StorageKey, value: bytes::Bytes) {
        if let Some(poll) = self.table().get(key) {
            poll.send_replace(Some(Fetched {
                value: Some(value),
                stale_before_ms: 0,
            }));
        }
    }
}

/// Whether a read found a fresh entry (a fill, for a waiter).
fn is_fresh(fetched: &Fetched) -> bool {
    let Some(bytes) = &fetched.value else {
        return false;
    };
    envelope::times(bytes).is_some_and(|times| {
        times.created_at_ms > fetched.stale_before_ms && times.fresh_until_ms > unix_millis()
    })
}

/// What a Get's read found, beyond the answer: what the lease protocol
/// needs to decide (and to ask the store atomically whether it still holds).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Freshness {
    /// When the version read was created (0: nothing read).
    pub created_at_ms: u64,
    /// Until when it is fresh.
    pub fresh_until_ms: u64,
    /// How long its fill took (0: unknown).
    pub fill_ms: u32,
    /// The namespace's soft-flush time as the read saw it.
    pub stale_before_ms: u64,
}

impl Cache {
    /// Checks a lease request against the limits.
    pub(super) fn check_lease_ask(&self, ask: LeaseAsk) -> Result<LeaseAsk, RequestError> {
        if let Some(ttl) = ask.ttl
            && ttl > self.max_lease_ttl
        {
            return Err(RequestError::invalid(
                "lease.ttl_ms",
                format!(
                    "{} ms exceeds limits.max_lease_ttl ({:?})",
                    ttl.as_millis(),
                    self.max_lease_ttl
                ),
            ));
        }
        if ask.wait > self.max_lease_wait {
            return Err(RequestError::invalid(
                "lease.wait_ms",
                format!(
                    "{} ms exceeds limits.max_lease_wait ({:?})",
                    ask.wait.as_millis(),
                    self.max_lease_wait
                ),
            ));
        }
        Ok(ask)
    }

    /// Runs the lease protocol over what a Get found.
    pub(super) async fn lease(
        &self,
        found: GetResult,
        freshness: Freshness,
        plan: &Plan,
        ask: LeaseAsk,
        allow_stale: bool,
        deadline: Option<Duration>,
    ) -> GetResult {
        let ttl = ask.ttl.unwrap_or(plan.lease_ttl);
        let result = match found.outcome {
            Outcome::Hit => {
                let wanted = LeaseCondition::Refreshing {
                    created_at_ms: freshness.created_at_ms,
                };
                if !self.early_refresh_due(freshness, plan) {
                    with_state(found, LeaseState::NotNeeded)
                } else {
                    match self.try_acquire(plan, ttl, wanted).await {
                        Ok(Grant::Granted(token)) => {
                            self.metrics.lease(&plan.metric, "early_refresh");
                            granted(found, token)
                        }
                        // Refreshed meanwhile: the newer version, if it reads as a hit.
                        Ok(Grant::Filled(newer)) if newer.outcome == Outcome::Hit => {
                            with_state(newer, LeaseState::NotNeeded)
                        }
                        _ => with_state(found, LeaseState::NotNeeded),
                    }
                }
            }
            Outcome::Miss | Outcome::Stale => {
                let wanted = LeaseCondition::Unfilled {
                    stale_before_ms: freshness.stale_before_ms,
                };
                match self.try_acquire(plan, ttl, wanted).await {
                    Err(()) => {
                        // No lease can be had: answer degraded, go to the origin.
                        let mut found = without_stale(found, allow_stale);
                        found.degraded = true;
                        found
                    }
                    Ok(Grant::Granted(token)) => granted(without_stale(found, allow_stale), token),
                    // Filled between the read and the request: a plain hit.
                    Ok(Grant::Filled(filled)) if filled.outcome == Outcome::Hit => {
                        with_state(filled, LeaseState::NotNeeded)
                    }
                    Ok(_) if found.outcome == Outcome::Stale && allow_stale => {
                        with_state(found, LeaseState::StaleServed)
                    }
                    Ok(_) if ask.wait.is_zero() => {
                        with_state(without_stale(found, false), LeaseState::Wait)
                    }
                    Ok(_) => {
                        let wait = deadline.map_or(ask.wait, |deadline| {
                            ask.wait.min(reserve_answer_time(deadline))
                        });
                        match self.wait_for_fill(plan, wait).await {
                            Some(filled) => with_state(filled, LeaseState::Coalesced),
                            None => with_state(without_stale(found, false), LeaseState::TimedOut),
                        }
                    }
                }
            }
        };
        self.metrics.lease(&plan.metric, result.lease.label());
        result
    }

    /// Asks the store for the lease on `plan.key`, if `wanted` still holds:
    /// `Err` when the store failed (counted and logged).
    async fn try_acquire(
        &self,
        plan: &Plan,
        ttl: Duration,
        wanted: LeaseCondition,
    ) -> Result<Grant, ()> {
        let token = new_token();
        match self
            .bounded(
                None,
                self.store.acquire_lease(&plan.key, &token, ttl, wanted),
            )
            .await
        {
            Ok(LeaseGrant::Granted) => Ok(Grant::Granted(token)),
            Ok(LeaseGrant::Held) => Ok(Grant::Held),
            Ok(LeaseGrant::Filled(bytes)) => {
                let fetched = Fetched {
                    value: Some(bytes),
                    stale_before_ms: match wanted {
                        LeaseCondition::Unfilled { stale_before_ms } => stale_before_ms,
                        LeaseCondition::Refreshing { .. } => 0,
                    },
                };
                Ok(Grant::Filled(self.read_entry(fetched, plan).0))
            }
            Err(err) => {
                self.degraded("lease", &plan.metric, &err, ());
                Err(())
            }
        }
    }

    /// XFetch: whether this read should refresh early.
    fn early_refresh_due(&self, freshness: Freshness, plan: &Plan) -> bool {
        let beta = if plan.decision.early_refresh_beta > 0.0 {
            plan.decision.early_refresh_beta
        } else {
            plan.early_refresh_beta
        };
        if beta <= 0.0 || freshness.fill_ms == 0 || freshness.created_at_ms == 0 {
            return false;
        }
        // 1 - random is in (0, 1]: its logarithm is finite and <= 0.
        let random: f64 = 1.0 - rand::random::<f64>();
        let gap = -f64::from(freshness.fill_ms) * beta * random.ln();
        unix_millis() as f64 + gap >= freshness.fresh_until_ms as f64
    }

    /// Waits up to `wait` for another caller's fill of `plan.key`.
    async fn wait_for_fill(&self, plan: &Plan, wait: Duration) -> Option<GetResult> {
        let _waiting = self.metrics.lease_waiting();
        let mut receiver = self
            .fills
            .subscribe(&self.store, &plan.key, self.max_lease_wait);
        let filled = tokio::time::timeout(wait, receiver.wait_for(Option::is_some))
            .await
            .ok()?
            .ok()?
            .clone()?;
        let (result, _) = self.read_entry(filled, plan);
        (result.outcome == Outcome::Hit).then_some(result)
    }

    /// Hands an accepted leased write to the callers of this gateway waiting
    /// for it.
    pub(super) fn deliver_fill(&self, key: &StorageKey, value: bytes::Bytes) {
        self.fills.deliver(key, value);
    }

    /// Gives a lease back.
    pub async fn release_lease(
        &self,
        command: ReleaseCommand,
        deadline: Option<Duration>,
    ) -> Result<bool, RequestError> {
        check_token(&command.token)?;
        let plan = self
            .plan(
                DecisionRequest {
                    op: Operation::Get,
                    namespace: &command.namespace,
                    key: &command.key,
                    attributes: &command.attributes,
                    value_size: 0,
                },
                None,
                Instant::now(),
            )
            .await?;
        match self
            .bounded(
                deadline,
                self.store.release_lease(&plan.key, &command.token),
            )
            .await
        {
            Ok(released) => {
                self.metrics.lease(
                    &plan.metric,
                    if released {
                        "released"
                    } else {
                        "release_stale"
                    },
                );
                Ok(released)
            }
            Err(err) => Ok(self.degraded("release", &plan.metric, &err, false)),
        }
    }
}

fn with_state(mut result: GetResult, lease: LeaseState) -> GetResult {
    result.lease = lease;
    result
}

fn granted(mut result: GetResult, token: String) -> GetResult {
    result.lease_token = token;
    with_state(result, LeaseState::Granted)
}

/// A stale result the caller did not allow becomes a miss.
pub(super) fn without_stale(mut result: GetResult, allow_stale: bool) -> GetResult {
    if result.outcome == Outcome::Stale && !allow_stale {
        result.outcome = Outcome::Miss;
        result.value = bytes::Bytes::new();
        result.content_type.clear();
    }
    result
}
