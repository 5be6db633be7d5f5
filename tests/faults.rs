//! Fault injection: a real `redis-server` is killed, hung, slowed down, has
//! its clients' connections killed, or runs out of memory, while a load of
//! concurrent clients runs through a real gateway. Each scenario measures and
//! asserts what a client sees: only degraded answers (never another error)
//! while Redis is unhealthy, no answer later than the client's deadline,
//! recovery soon after Redis is healthy again, and no acknowledged write lost.
//! The figures are printed (`--nocapture`) and recorded in
//! docs/RELIABILITY.md.

mod support;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use gateway::{
    api::proto::v1::{GetRequest, Outcome, SetRequest, cache_client::CacheClient},
    config::StoreKind,
};
use redis::aio::MultiplexedConnection;
use support::{RedisServer, TestGateway, test_config, wait_until};
use tokio::task::JoinHandle;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const NS: &str = "faults";
/// Every load request carries this deadline (`grpc-timeout`).
const DEADLINE: Duration = Duration::from_millis(200);
/// How late past its deadline an answer may be on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(50);
/// Concurrent clients of the load, each with its own connection and keys.
const WORKERS: usize = 8;
/// Keys per client (8 x 40 = 320 keys in all).
const KEYS_PER_WORKER: usize = 40;
/// Recovered: every request started in a window this long is answered normally.
const RECOVERY_WINDOW: Duration = Duration::from_millis(200);
/// ... and the window holds at least this many requests.
const RECOVERY_WINDOW_MIN_REQUESTS: usize = 10;
/// Recovery must come within this long of Redis being healthy again.
const RECOVERY_BOUND: Duration = Duration::from_secs(2);
/// Normal answers the load must get before a fault is injected: enough for
/// most of each worker's keys to hold an acknowledged pre-fault write (300 left
/// 159 of the 160 needed once on a slow machine).
const WARM_UP_ANSWERS: usize = 1_000;
/// Requests the load keeps making after the recovery window, before it stops.
const STEADY_TAIL_REQUESTS: usize = 800;

/// The scenarios measure time on 2 shared cores: they take turns even when
/// the harness runs tests in parallel (`cargo test` without
/// `--test-threads=1`, as scripts/test does).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn key_name(worker: usize, key: usize) -> String {
    format!("w{worker}-k{key}")
}

fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

fn set_request(key: &str, value: &[u8]) -> SetRequest {
    SetRequest {
        namespace: NS.into(),
        key: key.into(),
        value: value.to_vec().into(),
        ..Default::default()
    }
}

fn get_request(key: &str) -> GetRequest {
    GetRequest {
        namespace: NS.into(),
        key: key.into(),
        ..Default::default()
    }
}

/// A connection to the test Redis for injecting faults: it waits for slow
/// answers (`DEBUG SLEEP`) instead of giving up after redis-rs's default 500 ms.
async fn admin_connection(redis: &RedisServer) -> MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect to the test redis")
}

// ---------------------------------------------------------------------------
// The load: concurrent clients doing Set-then-Get on their own keys.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// Answered from Redis.
    Normal,
    /// Answered OK with `degraded: true`.
    Degraded,
    /// A gRPC error of any kind.
    Failed,
}

#[derive(Clone, Copy, Debug)]
struct Event {
    began: Instant,
    took: Duration,
    answer: Answer,
}

impl Event {
    fn ended(&self) -> Instant {
        self.began + self.took
    }
}

/// What every client of the load saw, shared with the scenario.
#[derive(Default)]
struct Journal {
    events: Mutex<Vec<Event>>,
    /// gRPC errors: `op key after Nms: code message`.
    failures: Mutex<Vec<String>>,
    /// Answers of the wrong shape (a degraded Set that says stored, a
    /// degraded Get that is not a MISS) and reads that missed a write the
    /// same client had just had acknowledged.
    anomalies: Mutex<Vec<String>>,
}

/// One Set of the load, in the order its client issued them.
struct Write {
    key: usize,
    value: String,
    /// Answered `stored: true` and not degraded.
    acked: bool,
    /// The data epoch when the Set was sent (see [`Load::epoch`]).
    epoch: u64,
}

/// What the scenario tells the load's clients.
#[derive(Default)]
struct Control {
    stop: AtomicBool,
    /// Set when the fault begins: from then on the clients write a second
    /// set of keys, so that the keys written before the fault keep their
    /// last pre-fault value to the end and the read-back checks it survived.
    faulted: AtomicBool,
    /// Bumped by a scenario that wipes Redis's data: odd while the data may
    /// be lost (from just before the kill), even once it is stable again.
    /// Writes acknowledged in an earlier epoch are not expected to survive.
    epoch: AtomicU64,
}

struct Load {
    journal: Arc<Journal>,
    control: Arc<Control>,
    workers: Vec<JoinHandle<Vec<Write>>>,
}

impl Load {
    async fn start(gateway: &TestGateway) -> Self {
        let journal = Arc::new(Journal::default());
        let control = Arc::new(Control::default());
        let mut workers = Vec::new();
        for id in 0..WORKERS {
            let client = gateway.client().await;
            workers.push(tokio::spawn(worker(
                id,
                client,
                journal.clone(),
                control.clone(),
            )));
        }
        Load {
            journal,
            control,
            workers,
        }
    }

    /// Every request answered so far, by start time.
    fn events(&self) -> Vec<Event> {
        let mut events = self.journal.events.lock().unwrap().clone();
        events.sort_by_key(|event| event.began);
        events
    }

    /// Requests started at or after `since` that got `answer`.
    fn count(&self, since: Instant, answer: Answer) -> usize {
        self.journal
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|event| event.began >= since && event.answer == answer)
            .count()
    }

    /// The fault begins now (see [`Control::faulted`]); returns the moment.
    fn fault_begins(&self) -> Instant {
        self.control.faulted.store(true, Ordering::SeqCst);
        Instant::now()
    }

    fn bump_epoch(&self) {
        self.control.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Stops the clients; every Set each one made, in order.
    async fn stop(self) -> (Arc<Journal>, Vec<Vec<Write>>) {
        self.control.stop.store(true, Ordering::Relaxed);
        let mut writes = Vec::new();
        for worker in self.workers {
            writes.push(worker.await.expect("a load client panicked"));
        }
        (self.journal, writes)
    }
}

/// One client: `Set k` then `Get k`, over its own keys in turn (a key comes
/// back every 80 requests; a second set of keys once the fault began), each
/// request with a [`DEADLINE`]. Values are unique per write
/// (`w{id}-{request number}`).
async fn worker(
    id: usize,
    mut client: CacheClient<Channel>,
    journal: Arc<Journal>,
    control: Arc<Control>,
) -> Vec<Write> {
    let mut writes = Vec::new();
    // The value of the Set just acknowledged, with its epoch, for the Get of
    // the same key that follows it.
    let mut just_acked: Option<(u64, String)> = None;
    let mut key_index = 0;
    let mut n: u64 = 0;
    while !control.stop.load(Ordering::Relaxed) {
        if n.is_multiple_of(2) {
            let base = if control.faulted.load(Ordering::SeqCst) {
                KEYS_PER_WORKER
            } else {
                0
            };
            key_index = base + (n / 2) as usize % KEYS_PER_WORKER;
        }
        let key = key_name(id, key_index);
        let epoch_at_start = control.epoch.load(Ordering::SeqCst);
        let began = Instant::now();
        let answer = if n.is_multiple_of(2) {
            let value = format!("w{id}-{n}");
            let result = client
                .set(with_deadline(set_request(&key, value.as_bytes()), DEADLINE))
                .await;
            let took = began.elapsed();
            let (answer, acked) = match result {
                Ok(response) => {
                    let response = response.into_inner();
                    match (response.degraded, response.stored) {
                        (false, true) => (Answer::Normal, true),
                        (true, false) => (Answer::Degraded, false),
                        (degraded, _) => {
                            journal
                                .anomalies
                                .lock()
                                .unwrap()
                                .push(format!("set {key}: {response:?}"));
                            let answer = if degraded {
                                Answer::Degraded
                            } else {
                                Answer::Normal
                            };
                            (answer, false)
                        }
                    }
                }
                Err(status) => {
                    journal.failures.lock().unwrap().push(format!(
                        "set {key} after {}ms: {:?} {}",
                        took.as_millis(),
                        status.code(),
                        status.message()
                    ));
                    (Answer::Failed, false)
                }
            };
            just_acked = acked.then(|| (epoch_at_start, value.clone()));
            writes.push(Write {
                key: key_index,
                value,
                acked,
                epoch: epoch_at_start,
            });
            answer
        } else {
            let result = client.get(with_deadline(get_request(&key), DEADLINE)).await;
            let took = began.elapsed();
            let epoch_now = control.epoch.load(Ordering::SeqCst);
            // Only within one stable epoch: a kill between the two loses it.
            let expected = just_acked
                .take()
                .filter(|(acked_in, _)| *acked_in == epoch_now && acked_in % 2 == 0);
            match result {
                Ok(response) => {
                    let response = response.into_inner();
                    if response.degraded {
                        if response.outcome != Outcome::Miss as i32 {
                            journal
                                .anomalies
                                .lock()
                                .unwrap()
                                .push(format!("degraded get {key}: {response:?}"));
                        }
                        Answer::Degraded
                    } else {
                        if let Some((_, value)) = expected
                            && (response.outcome != Outcome::Hit as i32
                                || response.value[..] != *value.as_bytes())
                        {
                            journal.anomalies.lock().unwrap().push(format!(
                                "get {key} right after the acknowledged set of {value:?}: \
                                 outcome {} value {:?}",
                                response.outcome,
                                String::from_utf8_lossy(&response.value)
                            ));
                        }
                        Answer::Normal
                    }
                }
                Err(status) => {
                    journal.failures.lock().unwrap().push(format!(
                        "get {key} after {}ms: {:?} {}",
                        took.as_millis(),
                        status.code(),
                        status.message()
                    ));
                    Answer::Failed
                }
            }
        };
        journal.events.lock().unwrap().push(Event {
            began,
            took: began.elapsed(),
            answer,
        });
        n += 1;
    }
    writes
}

// ---------------------------------------------------------------------------
// Measuring.
// ---------------------------------------------------------------------------

/// Recovered for good: the first moment at or after `healthy_at` after
/// which every request is answered normally, for at least a
/// [`RECOVERY_WINDOW`] holding [`RECOVERY_WINDOW_MIN_REQUESTS`] requests and
/// for the rest of the run. None while the log does not show that yet.
/// `events` are by start time.
fn recovery_point(events: &[Event], healthy_at: Instant) -> Option<Instant> {
    let last_began = events.last()?.began;
    let first = events.partition_point(|event| event.began < healthy_at);
    let after_last_bad = events[first..]
        .iter()
        .rposition(|event| event.answer != Answer::Normal)
        .map_or(first, |at| first + at + 1);
    for (i, event) in events.iter().enumerate().skip(after_last_bad) {
        let until = event.began + RECOVERY_WINDOW;
        if until > last_began {
            return None; // that window is not over yet
        }
        let in_window = events[i..]
            .iter()
            .take_while(|later| later.began <= until)
            .count();
        if in_window >= RECOVERY_WINDOW_MIN_REQUESTS {
            return Some(event.began);
        }
    }
    None
}

/// Recovered from a fault that ended at `healthy_at`, and
/// [`STEADY_TAIL_REQUESTS`] answered normally since the recovery window.
fn recovered_and_steady(events: &[Event], healthy_at: Instant) -> bool {
    recovery_point(events, healthy_at).is_some_and(|recovered_at| {
        let tail_from = recovered_at + RECOVERY_WINDOW;
        events
            .iter()
            .filter(|event| event.began >= tail_from)
            .count()
            >= STEADY_TAIL_REQUESTS
    })
}

/// The figures of one scenario.
struct Figures {
    scenario: &'static str,
    requests: usize,
    degraded: usize,
    failures: Vec<String>,
    anomalies: Vec<String>,
    degraded_during_fault: usize,
    max_during_fault: Duration,
    max_overall: Duration,
    fault_length: Duration,
    recovery: Option<Duration>,
    /// Answers not normal although Redis was healthy again (requests
    /// started after `healthy_at`): the price of the recovery time.
    degraded_after_healthy: usize,
    acked_sets: usize,
    keys_checked: usize,
    keys_checked_pre_fault: usize,
    /// Redis kept its data through the fault (all but the kill).
    data_survives: bool,
    superseded: usize,
    lost: Vec<String>,
    /// The circuit breaker's and retries' counters, from the gateway's metrics.
    breaker: String,
}

impl Figures {
    fn print(&self) {
        println!(
            "FAULTS scenario={} requests={} degraded={} other_errors={} \
             degraded_during_fault={} max_ms_during_fault={} max_ms_overall={} fault_ms={} \
             recovery_ms={} degraded_after_healthy={} acked_sets={} acked_keys_checked={} of_them_written_before_fault={} \
             superseded_by_unacked_later_write={} lost={} anomalies={} {}",
            self.scenario,
            self.requests,
            self.degraded,
            self.failures.len(),
            self.degraded_during_fault,
            self.max_during_fault.as_millis(),
            self.max_overall.as_millis(),
            self.fault_length.as_millis(),
            self.recovery.map_or("none".to_owned(), |recovery| recovery
                .as_millis()
                .to_string()),
            self.degraded_after_healthy,
            self.acked_sets,
            self.keys_checked,
            self.keys_checked_pre_fault,
            self.superseded,
            self.lost.len(),
            self.anomalies.len(),
            self.breaker,
        );
    }

    /// The criteria every scenario under load must meet.
    fn assert_criteria(&self) {
        let scenario = self.scenario;
        assert!(
            self.failures.is_empty(),
            "{scenario}: {} requests failed instead of answering (degraded if need be), e.g. {:?}",
            self.failures.len(),
            &self.failures[..self.failures.len().min(5)]
        );
        assert!(
            self.anomalies.is_empty(),
            "{scenario}: {} wrong answers, e.g. {:?}",
            self.anomalies.len(),
            &self.anomalies[..self.anomalies.len().min(5)]
        );
        assert!(
            self.max_overall <= DEADLINE + SLACK,
            "{scenario}: an answer took {:?} for a {DEADLINE:?} deadline",
            self.max_overall
        );
        assert!(
            self.recovery
                .is_some_and(|recovery| recovery < RECOVERY_BOUND),
            "{scenario}: recovery took {:?} ({})",
            self.recovery,
            self.breaker
        );
        assert!(
            self.lost.is_empty(),
            "{scenario}: {} acknowledged writes lost, e.g. {:?}",
            self.lost.len(),
            &self.lost[..self.lost.len().min(5)]
        );
        // Most keys of each set have an acknowledged write to check (the
        // keys written before the fault only where the data survives it).
        let enough = WORKERS * KEYS_PER_WORKER / 2;
        let post_fault = self.keys_checked - self.keys_checked_pre_fault;
        assert!(
            post_fault >= enough && (!self.data_survives || self.keys_checked_pre_fault >= enough),
            "{scenario}: too few keys with an acknowledged write to check: {} written after \
             the fault began, {} before",
            post_fault,
            self.keys_checked_pre_fault
        );
    }
}

// ---------------------------------------------------------------------------
// A scenario's world.
// ---------------------------------------------------------------------------

struct FaultWorld {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    redis: RedisServer,
    gateway: TestGateway,
    load: Load,
}

impl FaultWorld {
    /// A Redis (with `redis_args`), a gateway over it, and the load running,
    /// warmed up.
    async fn start(redis_args: &[&str]) -> Self {
        let turn = ONE_AT_A_TIME.lock().await;
        let redis = RedisServer::start_with(redis_args).await;
        let gateway = TestGateway::start(test_config(StoreKind::Redis, Some(redis.url()))).await;
        let load = Load::start(&gateway).await;
        let started = Instant::now();
        wait_until(
            "the load to get normal answers before the fault",
            Duration::from_secs(30),
            || {
                let normal = load.count(started, Answer::Normal);
                async move { normal >= WARM_UP_ANSWERS }
            },
        )
        .await;
        FaultWorld {
            _turn: turn,
            redis,
            gateway,
            load,
        }
    }

    /// After a fault from `fault_start` until Redis was healthy again at
    /// `healthy_at`: waits for the recovery and a steady tail, stops the load,
    /// checks the gateway is alive, reads back the acknowledged writes
    /// (those sent in epoch `min_epoch` or later) and returns the figures
    /// (printed).
    async fn finish(
        self,
        scenario: &'static str,
        fault_start: Instant,
        healthy_at: Instant,
        min_epoch: u64,
    ) -> Figures {
        let FaultWorld {
            _turn,
            redis,
            gateway,
            load,
        } = self;
        // Recovery is measured, and asserted against RECOVERY_BOUND later;
        // here it may take longer, so that a slow recovery shows its figure.
        wait_until(
            "normal answers only, for good, after the fault",
            Duration::from_secs(20),
            || {
                let steady = recovered_and_steady(&load.events(), healthy_at);
                async move { steady }
            },
        )
        .await;
        let (journal, writes) = load.stop().await;
        let mut events = journal.events.lock().unwrap().clone();
        events.sort_by_key(|event| event.began);
        // From the whole log: a late relapse moves the recovery point (to
        // none if it lasted until the load stopped).
        let recovery = recovery_point(&events, healthy_at).map(|at| at - healthy_at);

        assert_gateway_alive(&gateway).await;
        let readback = read_back(&gateway, &writes, min_epoch).await;

        let during_fault = |event: &&Event| event.began < healthy_at && event.ended() > fault_start;
        let figures = Figures {
            scenario,
            requests: events.len(),
            degraded: events
                .iter()
                .filter(|event| event.answer == Answer::Degraded)
                .count(),
            failures: journal.failures.lock().unwrap().clone(),
            anomalies: journal.anomalies.lock().unwrap().clone(),
            degraded_during_fault: events
                .iter()
                .filter(during_fault)
                .filter(|event| event.answer == Answer::Degraded)
                .count(),
            max_during_fault: events
                .iter()
                .filter(during_fault)
                .map(|event| event.took)
                .max()
                .unwrap_or_default(),
            max_overall: events
                .iter()
                .map(|event| event.took)
                .max()
                .unwrap_or_default(),
            fault_length: healthy_at - fault_start,
            recovery,
            degraded_after_healthy: events
                .iter()
                .filter(|event| event.began >= healthy_at && event.answer != Answer::Normal)
                .count(),
            acked_sets: writes
                .iter()
                .flatten()
                .filter(|write| write.acked && write.epoch >= min_epoch)
                .count(),
            keys_checked: readback.checked,
            keys_checked_pre_fault: readback.checked_pre_fault,
            data_survives: min_epoch == 0,
            superseded: readback.superseded,
            lost: readback.lost,
            breaker: breaker_figures(&gateway.metrics.encode()),
        };
        figures.print();
        drop(redis);
        figures
    }
}

/// Sum of the samples of `family` (the full sample name) whose labels
/// include `label` (`to="open"`; empty: all).
fn samples(metrics: &str, family: &str, label: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| {
            line.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && line.contains(label)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The breaker's openings, half-openings and rejections, and the retries.
fn breaker_figures(metrics: &str) -> String {
    format!(
        "breaker_opened={} breaker_half_opened={} breaker_rejected={} retried={}",
        samples(metrics, "cachegw_breaker_transitions_total", r#"to="open""#),
        samples(
            metrics,
            "cachegw_breaker_transitions_total",
            r#"to="half_open""#
        ),
        samples(metrics, "cachegw_breaker_rejected_total", ""),
        samples(
            metrics,
            "cachegw_store_retries_total",
            r#"outcome="retried""#
        ),
    )
}

async fn assert_gateway_alive(gateway: &TestGateway) {
    let health = HealthClient::new(gateway.channel().await);
    wait_until(
        "the gateway to report SERVING",
        Duration::from_secs(5),
        || {
            let mut health = health.clone();
            async move {
                health
                    .check(HealthCheckRequest {
                        service: "cachegw.v1.Cache".into(),
                    })
                    .await
                    .is_ok_and(|r| r.get_ref().status == ServingStatus::Serving as i32)
            }
        },
    )
    .await;
    let mut client = gateway.client().await;
    let stored = client
        .set(with_deadline(
            set_request("alive", b"yes"),
            Duration::from_secs(2),
        ))
        .await
        .expect("the gateway answers a Set after the fault")
        .into_inner();
    assert!(stored.stored && !stored.degraded, "{stored:?}");
    let read = client
        .get(with_deadline(get_request("alive"), Duration::from_secs(2)))
        .await
        .expect("the gateway answers a Get after the fault")
        .into_inner();
    assert_eq!(
        (read.outcome, &read.value[..], read.degraded),
        (Outcome::Hit as i32, &b"yes"[..], false)
    );
}

struct Readback {
    /// Keys whose last acknowledged write was checked.
    checked: usize,
    /// Of those, keys last written before the fault began.
    checked_pre_fault: usize,
    /// Of those, keys holding the value of a later Set whose outcome the
    /// client never learnt (answered degraded): applied after all.
    superseded: usize,
    /// Keys holding neither their last acknowledged value nor a later one.
    lost: Vec<String>,
}

/// Reads every key back through the gateway: it must hold its last
/// acknowledged value, or the value of a Set made after that one whose
/// outcome was unknown (a degraded Set may still have reached Redis).
async fn read_back(gateway: &TestGateway, writes: &[Vec<Write>], min_epoch: u64) -> Readback {
    let mut client = gateway.client().await;
    let mut readback = Readback {
        checked: 0,
        checked_pre_fault: 0,
        superseded: 0,
        lost: Vec::new(),
    };
    for (worker, writes) in writes.iter().enumerate() {
        let mut by_key: BTreeMap<usize, Vec<&Write>> = BTreeMap::new();
        for write in writes {
            by_key.entry(write.key).or_default().push(write);
        }
        for (key_index, history) in by_key {
            let Some(last_ack) = history
                .iter()
                .rposition(|write| write.acked && write.epoch >= min_epoch)
            else {
                continue;
            };
            let key = key_name(worker, key_index);
            let read = client
                .get(with_deadline(get_request(&key), Duration::from_secs(2)))
                .await
                .expect("read back")
                .into_inner();
            assert!(!read.degraded, "read back {key}: {read:?}");
            readback.checked += 1;
            if key_index < KEYS_PER_WORKER {
                readback.checked_pre_fault += 1;
            }
            let expected = &history[last_ack].value;
            let found = (read.outcome == Outcome::Hit as i32)
                .then(|| String::from_utf8_lossy(&read.value).into_owned());
            match found {
                Some(found) if found == *expected => {}
                Some(found)
                    if history[last_ack + 1..]
                        .iter()
                        .any(|later| !later.acked && later.value == found) =>
                {
                    readback.superseded += 1;
                }
                found => readback
                    .lost
                    .push(format!("{key}: expected {expected:?}, found {found:?}")),
            }
        }
    }
    readback
}

// ---------------------------------------------------------------------------
// The scenarios.
// ---------------------------------------------------------------------------

/// Redis SIGKILLed under load, down ~1 s, restarted empty on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_then_restarted() {
    let mut world = FaultWorld::start(&[]).await;
    // Odd epoch: acknowledged writes from here on may die with the server.
    world.load.bump_epoch();
    let fault_start = world.load.fault_begins();
    world.redis.kill();
    wait_until(
        "degraded answers after the kill",
        Duration::from_secs(5),
        || {
            let degraded = world.load.count(fault_start, Answer::Degraded);
            async move { degraded >= WORKERS }
        },
    )
    .await;
    // Hold the outage (the fault itself, not synchronisation).
    tokio::time::sleep_until((fault_start + Duration::from_secs(1)).into()).await;
    world.redis.restart().await;
    let healthy_at = Instant::now();
    // Even again: writes sent from now on must survive.
    world.load.bump_epoch();

    let figures = world
        .finish("kill-9+restart", fault_start, healthy_at, 2)
        .await;
    assert!(figures.degraded_during_fault > 0);
    figures.assert_criteria();
}

/// Redis SIGSTOPped for 1.5 s (its sockets accept, nothing answers), then
/// SIGCONTed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hung_by_sigstop_then_continued() {
    let world = FaultWorld::start(&[]).await;
    let fault_start = world.load.fault_begins();
    world.redis.pause();
    // Hold the hang (the fault itself, not synchronisation).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    world.redis.resume();
    let healthy_at = Instant::now();

    let figures = world
        .finish("sigstop-1.5s", fault_start, healthy_at, 0)
        .await;
    assert!(figures.degraded_during_fault > 0);
    figures.assert_criteria();
}

/// `DEBUG SLEEP 1.5`: Redis busy for 1.5 s (answers queue, then all come).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slowed_by_debug_sleep() {
    let world = FaultWorld::start(&["--enable-debug-command", "yes"]).await;
    let mut admin = admin_connection(&world.redis).await;
    let fault_start = world.load.fault_begins();
    // On its own task: the reply comes when the server wakes up.
    let sleeper = tokio::spawn(async move {
        let reply: String = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("1.5")
            .query_async(&mut admin)
            .await
            .expect("DEBUG SLEEP");
        (reply, Instant::now())
    });
    let (reply, healthy_at) = sleeper.await.unwrap();
    assert_eq!(reply, "OK");
    assert!(
        healthy_at - fault_start >= Duration::from_millis(1500),
        "DEBUG SLEEP returned after {:?}",
        healthy_at - fault_start
    );

    let figures = world
        .finish("debug-sleep-1.5s", fault_start, healthy_at, 0)
        .await;
    assert!(figures.degraded_during_fault > 0);
    figures.assert_criteria();
}

/// The gateway's connections killed (`CLIENT KILL TYPE normal SKIPME yes`)
/// three times while the load runs, each once the gateway has recovered from
/// the previous kill. Redis itself stays healthy throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_connections_killed_repeatedly() {
    const KILLS: usize = 3;
    let world = FaultWorld::start(&[]).await;
    let mut admin = admin_connection(&world.redis).await;
    let fault_start = world.load.fault_begins();
    let mut killed = Vec::new();
    let mut recoveries = Vec::new();
    let mut last_kill = fault_start;
    for round in 0..KILLS {
        let reply = support::kill_client_connections(&mut admin).await;
        last_kill = Instant::now();
        killed.push(reply);
        if round + 1 < KILLS {
            let killed_at = last_kill;
            wait_until(
                "recovery from a kill before the next one",
                Duration::from_secs(20),
                || {
                    let steady = recovered_and_steady(&world.load.events(), killed_at);
                    async move { steady }
                },
            )
            .await;
            let recovered_at = recovery_point(&world.load.events(), killed_at).unwrap();
            recoveries.push(recovered_at - killed_at);
        }
    }
    let healthy_at = last_kill;

    let figures = world
        .finish("client-kill-x3", fault_start, healthy_at, 0)
        .await;
    recoveries.extend(figures.recovery);
    println!(
        "FAULTS scenario=client-kill-x3 connections_killed_per_round={killed:?} \
         recovery_ms_per_round={:?}",
        recoveries
            .iter()
            .map(|recovery| recovery.as_millis())
            .collect::<Vec<_>>()
    );
    assert!(
        killed.iter().all(|&n| n > 0),
        "every CLIENT KILL finds gateway connections: {killed:?}"
    );
    assert!(
        recoveries.iter().all(|&recovery| recovery < RECOVERY_BOUND),
        "recovery after each kill under {RECOVERY_BOUND:?}: {recoveries:?}"
    );
    figures.assert_criteria();
}

/// A xorshift stream: incompressible bytes, so a value takes its full size
/// in Redis.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// `cachegw_store_errors_total{store="redis",kind="out_of_memory"}`.
fn out_of_memory_errors(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("cachegw_store_errors_total{")
                && line.contains(r#"store="redis""#)
                && line.contains(r#"kind="out_of_memory""#)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The `cachegw_store_errors_total` samples, for failure messages.
fn store_error_lines(metrics: &str) -> String {
    metrics
        .lines()
        .filter(|line| line.starts_with("cachegw_store_errors_total"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Redis at `maxmemory` with `noeviction`: the Set it refuses fails with
/// RESOURCE_EXHAUSTED (saying "maxmemory"), counted as an out_of_memory
/// store error; entries already stored keep being served; writes work again
/// once memory is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_refuses_sets_and_keeps_serving_gets() {
    const VALUE_BYTES: usize = 64 * 1024;
    const MORE_REFUSALS: usize = 10;
    let _turn = ONE_AT_A_TIME.lock().await;
    let redis =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]).await;
    let gateway = TestGateway::start(test_config(StoreKind::Redis, Some(redis.url()))).await;
    let mut client = gateway.client().await;
    let deadline = Duration::from_secs(2);

    // Fill Redis until a Set is refused.
    let mut stored: Vec<(String, Vec<u8>)> = Vec::new();
    let mut refusal = None;
    for i in 0..200u64 {
        let key = format!("big-{i}");
        let value = noise(i, VALUE_BYTES);
        match client
            .set(with_deadline(set_request(&key, &value), deadline))
            .await
        {
            Ok(response) => {
                let response = response.into_inner();
                assert!(
                    !response.degraded,
                    "Set #{i} near maxmemory answered degraded instead of RESOURCE_EXHAUSTED \
                     (stored {}, {} stored before it); store errors:\n{}",
                    response.stored,
                    stored.len(),
                    store_error_lines(&gateway.metrics.encode())
                );
                assert!(response.stored, "{response:?}");
                stored.push((key, value));
            }
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("a Set is refused before 200 x 64 KiB reach a 2 MB Redis");
    assert!(!stored.is_empty(), "some Sets fit before maxmemory");
    let check_refusal = |status: &tonic::Status| {
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "a Set refused by maxmemory: {status:?}"
        );
        assert!(
            status.message().to_lowercase().contains("maxmemory"),
            "the refusal says why: {:?}",
            status.message()
        );
    };
    check_refusal(&refusal);

    // More refusals: each answered the same way, none trips anything that
    // would stop the reads.
    let began = Instant::now();
    for i in 0..MORE_REFUSALS as u64 {
        let key = format!("refused-{i}");
        let status = client
            .set(with_deadline(
                set_request(&key, &noise(1000 + i, VALUE_BYTES)),
                deadline,
            ))
            .await
            .expect_err("Redis is still full");
        check_refusal(&status);
    }
    let avg_refusal = began.elapsed() / MORE_REFUSALS as u32;
    let refused = 1 + MORE_REFUSALS as u64;
    let metrics = gateway.metrics.encode();
    assert_eq!(
        out_of_memory_errors(&metrics),
        refused,
        "every refused Set counted as kind=\"out_of_memory\":\n{}",
        store_error_lines(&metrics)
    );

    // Everything stored before is still served, from Redis.
    for (key, value) in &stored {
        let read = client
            .get(with_deadline(get_request(key), deadline))
            .await
            .expect("a Get while Redis is full")
            .into_inner();
        assert!(
            !read.degraded && read.outcome == Outcome::Hit as i32 && read.value[..] == value[..],
            "{key} while Redis is full: degraded {}, outcome {}, {} bytes",
            read.degraded,
            read.outcome,
            read.value.len()
        );
    }
    assert_gateway_alive_without_writes(&gateway).await;

    // Memory freed: writes are accepted again.
    let mut admin = admin_connection(&redis).await;
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut admin)
        .await
        .expect("FLUSHALL");
    let freed_at = Instant::now();
    let probe = noise(7, VALUE_BYTES);
    wait_until(
        "Sets accepted once memory is freed",
        Duration::from_secs(5),
        || {
            let mut client = client.clone();
            let probe = probe.clone();
            async move {
                client
                    .set(with_deadline(set_request("after-flush", &probe), deadline))
                    .await
                    .is_ok_and(|r| r.get_ref().stored && !r.get_ref().degraded)
            }
        },
    )
    .await;
    println!(
        "FAULTS scenario=maxmemory-noeviction stored_before_refusal={} ({} KiB values) \
         refused={} oom_metric={} gets_served={} avg_refusal_ms={} writes_again_after_free_ms={} {}",
        stored.len(),
        VALUE_BYTES / 1024,
        refused,
        out_of_memory_errors(&metrics),
        stored.len(),
        avg_refusal.as_millis(),
        freed_at.elapsed().as_millis(),
        breaker_figures(&gateway.metrics.encode())
    );
}

/// The gateway is up (health SERVING and a Get answered) without writing.
async fn assert_gateway_alive_without_writes(gateway: &TestGateway) {
    let mut health = HealthClient::new(gateway.channel().await);
    let status = health
        .check(HealthCheckRequest {
            service: "cachegw.v1.Cache".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let mut client = gateway.client().await;
    let read = client
        .get(with_deadline(get_request("absent"), Duration::from_secs(2)))
        .await
        .expect("a Get")
        .into_inner();
    assert!(
        !read.degraded && read.outcome == Outcome::Miss as i32,
        "{read:?}"
    );
}
