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
    let request = |key| DecisionRequest {
        op: Operation::Get,
        namespace: "api",
        key,
        attributes: &attributes,
        value_size: 0,
    };
    for key in keys.iter() {
        let miss = memo
            .recall(1, &request(key), || 0)
            .expect_err("an empty memo has nothing");
        let mut decision = DefaultPolicy.decide(&namespace, key);
        decision.decided_by = label;
        let forever = Reuse::For {
            promise: None,
            value_size: None,
        };
        memo.keep(miss, &decision, forever, 0, &stats);
    }

    let cores = thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "memo recall, hot set of {} keys, {} s per run",
        options.keys, options.seconds
    );
    for threads in [1, cores] {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Arc::new(Barrier::new(threads + 1));
        let workers: Vec<_> = (0..threads)
            .map(|worker| {
                let (memo, keys, stop, start) = (
                    Arc::clone(&memo),
                    Arc::clone(&keys),
                    Arc::clone(&stop),
                    Arc::clone(&start),
                );
                thread::spawn(move || {
                    let attributes = Attributes::new();
                    let mut recalls = 0u64;
                    let mut at = worker * 7919;
                    start.wait();
                    let began = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..256 {
                            at = (at + 1) % keys.len();
                            let request = DecisionRequest {
                                op: Operation::Get,
                                namespace: "api",
                                key: &keys[at],
                                attributes: &attributes,
                                value_size: 0,
                            };
                            let decision = memo.recall(1, &request, || 0).expect("a hit");
                            std::hint::black_box(decision);
                        }
                        recalls += 256;
                    }
                    (recalls, began.elapsed())
                })
            })
            .collect();
        start.wait();
        thread::sleep(Duration::from_secs(options.seconds));
        stop.store(true, Ordering::Relaxed);
        let results: Vec<_> = workers
            .into_iter()
            .map(|worker| worker.join().expect("a worker"))
            .collect();
        let recalls: u64 = results.iter().map(|(recalls, _)| recalls).sum();
        let busy: Duration = results.iter().map(|(_, busy)| *busy).sum();
        println!(
            "{threads} thread(s): {:>7.1} ns per recall per thread, {:>6.2} M recalls/s in all",
            busy.as_nanos() as f64 / recalls as f64,
            recalls as f64 / results[0].1.as_secs_f64() / 1e6,
        );
    }
}
