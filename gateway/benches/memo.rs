//! What a memo hit costs, on one core and on every core at once.
//!
//! A memo hit is a read, but a read can still write: a lock word, a
//! reference count, a hit flag. Each such write takes the cache line from the
//! other cores, and that cost does not show in instruction counts or on one
//! thread. This bench recalls decisions for a hot set from 1 thread and then
//! from as many threads as the machine has cores, and prints nanoseconds per
//! recall for each: where the two differ, the cores are fighting over shared
//! lines.
//!
//! ```sh
//! cargo bench --locked -p gateway --bench memo                  # hot set of 1 000 keys, 3 s each
//! cargo bench --locked -p gateway --bench memo -- --keys 100000 --seconds 5
//! ```

use std::{
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use gateway::{
    cache::{Attributes, NamespaceSettings},
    policy::{
        DecisionRequest, DefaultPolicy, Label, Operation,
        memo::{DecisionMemo, MemoStats, Reuse},
    },
};

/// The gateway's allocator (src/main.rs), so that a hit's copies cost here what they cost there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Options {
    keys: usize,
    seconds: u64,
}

fn options() -> Options {
    let mut options = Options {
        keys: 1_000,
        seconds: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> u64 {
            args.next()
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("{name} takes a number"))
        };
        match arg.as_str() {
            "--keys" => options.keys = value("--keys") as usize,
            "--seconds" => options.seconds = value("--seconds"),
            // `cargo bench` passes --bench; anything else is a filter this bench does not take.
            _ => {}
        }
    }
    options
}

fn main() {
    let options = options();
    let memo = Arc::new(DecisionMemo::new(256 << 20));
    // A version label as the gateway makes them: name@ and 12 hex digits of its hash.
    let label = Label::intern("ttl-by-route@9f633f8fa51d");
    let stats = memo.series(&Arc::from(label.as_str()), "api", MemoStats::default);
    let attributes = Attributes::new();
    let namespace = NamespaceSettings::new("api", &Default::default());
    let keys: Arc<[String]> = (0..options.keys)
        .map(|i| format!("/users/{i}/profile"))
        .collect();
    for key in keys.iter() {
        let miss = memo
            .recall(1, &get(key, &attributes), || 0)
            .expect_err("an empty memo has nothing");
        let mut decision = DefaultPolicy.decide(&namespace, key);
        decision.decided_by = label;
        memo.keep(miss, &decision, FOREVER, 0, &stats);
    }

    let cores = thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "memo hits: recall from a hot set of {} keys, {} s per run",
        options.keys, options.seconds
    );
    for threads in [1, cores] {
        let (recalls, busy) = run(threads, options.seconds, |worker| {
            let attributes = Attributes::new();
            let mut at = worker * 7919;
            let (memo, keys) = (Arc::clone(&memo), Arc::clone(&keys));
            move || {
                at = (at + 1) % keys.len();
                let request = get(&keys[at], &attributes);
                std::hint::black_box(memo.recall(1, &request, || 0).expect("a hit"));
            }
        });
        report(threads, "recall", recalls, busy);
    }

    // Misses that keep their decision in a full memo: what the memo costs a
    // Zipf-like load, where every kept decision pushes an older one out.
    let full = Arc::new(DecisionMemo::new(4 << 20));
    let stats = full.series(&Arc::from(label.as_str()), "api", MemoStats::default);
    let decision = {
        let mut decision = DefaultPolicy.decide(&namespace, "/users/0/profile");
        decision.decided_by = label;
        decision
    };
    for n in 0..100_000 {
        let key = format!("/fill/{n}");
        if let Err(miss) = full.recall(1, &get(&key, &attributes), || 0) {
            full.keep(miss, &decision, FOREVER, 0, &stats);
        }
    }
    println!(
        "memo keeps: new inputs, each looked up and kept twice, into a full 4 MiB memo, {} s per run",
        options.seconds
    );
    for threads in [1, cores] {
        let (keeps, busy) = run(threads, options.seconds, |worker| {
            let attributes = Attributes::new();
            let mut key = String::new();
            let mut n = 0u64;
            let (full, stats, decision) = (Arc::clone(&full), stats.clone(), decision.clone());
            move || {
                use std::fmt::Write;
                n += 1;
                key.clear();
                write!(key, "/users/{worker}-{n}/profile").expect("a String takes it");
                let request = get(&key, &attributes);
                // Twice: a full memo keeps a decision at its input's second miss
                // (or its first, for the doorkeeper's few false positives).
                for _ in 0..2 {
                    if let Err(miss) = full.recall(1, &request, || 0) {
                        full.keep(miss, &decision, FOREVER, 0, &stats);
                    }
                }
            }
        });
        report(threads, "new input", keeps, busy);
    }
}

/// A Get of `key` in the namespace `api`.
fn get<'a>(key: &'a str, attributes: &'a Attributes) -> DecisionRequest<'a> {
    DecisionRequest {
        op: Operation::Get,
        namespace: "api",
        key,
        attributes,
        value_size: 0,
    }
}

const FOREVER: Reuse = Reuse::For {
    promise: None,
    value_size: None,
};

/// Runs `threads` workers for `seconds`, each calling the operation its
/// `make` returns as often as it can; the operations done and the time the
/// workers were busy, in all.
fn run<M, O>(threads: usize, seconds: u64, make: M) -> (u64, Duration)
where
    M: Fn(usize) -> O,
    O: FnMut() + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|worker| {
            let mut op = make(worker);
            let (stop, start) = (Arc::clone(&stop), Arc::clone(&start));
            thread::spawn(move || {
                let mut done = 0u64;
                start.wait();
                let began = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..256 {
                        op();
                    }
                    done += 256;
                }
                (done, began.elapsed())
            })
        })
        .collect();
    start.wait();
    thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    workers
        .into_iter()
        .map(|worker| worker.join().expect("a worker"))
        .fold((0, Duration::ZERO), |(done, busy), (more, took)| {
            (done + more, busy + took)
        })
}

fn report(threads: usize, what: &str, done: u64, busy: Duration) {
    let per_thread = busy / threads as u32;
    println!(
        "{threads} thread(s): {:>7.1} ns per {what} per thread, {:>6.2} M/s in all",
        busy.as_nanos() as f64 / done as f64,
        done as f64 / per_thread.as_secs_f64() / 1e6,
    );
}
