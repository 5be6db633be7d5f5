//! Concurrent single-key reads gathered into one pipeline (auto-pipelining).
//!
//! A command sent on its own through a redis-rs multiplexed connection pays
//! for its own channel message, reply channel and, above all, its own
//! `write` to the socket: tokio runs the connection's task right after the
//! request that woke it (the LIFO slot), so concurrent Gets went out one
//! write each, and on loopback a write carries the whole TCP path of both
//! ends (docs/BENCHMARKS.md, "Close to the wire").
//!
//! Here the first read of a round *leads* it: it yields once, which tokio
//! turns into "after every task ready now has run and the I/O driver was
//! polled", so the Gets decoded from the same HTTP/2 reads join its queue
//! meanwhile; then it reads them all in one call (for Redis, one pipeline
//! with the same generation checks as an MGet) and hands each its answer; a
//! key asked for more than once in a round is read once. A read that finds a
//! round led already only waits for it.
//!
//! The Redis path gathers its rounds in front of its guard (`store::guard`),
//! so that a round is one call to the breaker and the retry budget, as it is
//! one call to Redis.
//!
//! Cancel-safety: a leader dropped before it took its round (its deadline
//! passed) closes the round, and a leader dropped after it took it drops the
//! answers' senders; either way the waiting reads see their answer channel
//! closed and read on their own, within their own deadlines.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Mutex, PoisonError},
};

use tokio::sync::oneshot;

use super::{Fetched, StorageKey, StoreError};

/// Reads waiting for the round in progress.
#[derive(Default)]
pub(super) struct ReadRounds {
    round: Mutex<Round>,
}

#[derive(Default)]
struct Round {
    /// A leader is gathering this round.
    led: bool,
    waiting: Vec<Waiting>,
}

/// A read that joined a round, and where its answer goes.
struct Waiting {
    key: StorageKey,
    answer: oneshot::Sender<Result<Fetched, StoreError>>,
}

impl ReadRounds {
    /// Reads `key` together with the reads that arrive while this round
    /// gathers, through `read_all` (which answers in `keys` order).
    pub(super) async fn read<Reading>(
        &self,
        key: &StorageKey,
        read_all: impl Fn(Vec<StorageKey>) -> Reading,
    ) -> Result<Fetched, StoreError>
    where
        Reading: Future<Output = Result<Vec<Fetched>, StoreError>>,
    {
        let waiting = {
            let mut round = self.lock();
            if round.led {
                let (answer, waiting) = oneshot::channel();
                round.waiting.push(Waiting {
                    key: key.clone(),
                    answer,
                });
                Some(waiting)
            } else {
                round.led = true;
                None
            }
        };
        if let Some(waiting) = waiting {
            return match waiting.await {
                Ok(answer) => answer,
                // The leader was dropped: read alone.
                Err(_) => Box::pin(read_all(vec![key.clone()]))
                    .await
                    .map(|mut fetched| fetched.pop().unwrap_or_default()),
            };
        }
        let mut leading = Leading {
            rounds: self,
            open: true,
        };
        tokio::task::yield_now().await;
        let joined = leading.close();
        // A hot key is read once per round, however many Gets of it joined:
        // they were all in flight together, so one read answers them all.
        let mut keys = Vec::with_capacity(joined.len() + 1);
        keys.push(key.clone());
        // foldhash, seeded per process: a round's map is as small and short-lived
        // as the round, so SipHash's stronger guard against chosen keys costs
        // each Get more than it protects.
        let mut positions: HashMap<&StorageKey, usize, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(joined.len() + 1, Default::default());
        positions.insert(key, 0);
        let slots: Vec<usize> = joined
            .iter()
            .map(|waiting| {
                *positions.entry(&waiting.key).or_insert_with(|| {
                    keys.push(waiting.key.clone());
                    keys.len() - 1
                })
            })
            .collect();
        // Boxed: only a round's leader reads, so the read's future (a pipeline
        // and its connection, ~1.4 KB) is allocated once per round instead of
        // being part of every Get's future.
        match Box::pin(read_all(keys)).await {
            Ok(fetched) => {
                for (waiting, slot) in joined.into_iter().zip(slots) {
                    let answer = fetched.get(slot).cloned().unwrap_or_default();
                    // A read that stopped waiting (its deadline passed) is gone.
                    let _ = waiting.answer.send(Ok(answer));
                }
                Ok(fetched.into_iter().next().unwrap_or_default())
            }
            Err(err) => {
                for waiting in joined {
                    let _ = waiting.answer.send(Err(err.clone()));
                }
                Err(err)
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Round> {
        self.round.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A leader's hold on its round until it closes it (or is dropped).
struct Leading<'a> {
    rounds: &'a ReadRounds,
    open: bool,
}

impl Leading<'_> {
    /// Ends the gathering: the reads that joined. The next read leads a new round.
    fn close(&mut self) -> Vec<Waiting> {
        self.open = false;
        let mut round = self.rounds.lock();
        round.led = false;
        std::mem::take(&mut round.waiting)
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if self.open {
            // Dropping the senders tells the waiting reads to read alone.
            drop(self.close());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use bytes::Bytes;

    use super::*;

    fn key(name: &str) -> StorageKey {
        StorageKey::new(Arc::from("ns"), Bytes::copy_from_slice(name.as_bytes()))
    }

    fn echo(keys: Vec<StorageKey>) -> Vec<Fetched> {
        keys.iter()
            .map(|key| Fetched {
                value: Some(Bytes::copy_from_slice(key.key())),
                stale_before_ms: 0,
            })
            .collect()
    }

    #[tokio::test]
    async fn concurrent_reads_share_one_call_and_each_gets_its_own_answer() {
        let rounds = Arc::new(ReadRounds::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let reads: Vec<_> = (0..8)
            .map(|i| {
                let (rounds, calls) = (Arc::clone(&rounds), Arc::clone(&calls));
                async move {
                    let read_all = |keys| {
                        calls.fetch_add(1, Ordering::Relaxed);
                        async move { Ok(echo(keys)) }
                    };
                    rounds.read(&key(&format!("k{i}")), read_all).await
                }
            })
            .collect();
        let answers = futures::future::join_all(reads).await;
        for (i, answer) in answers.into_iter().enumerate() {
            let value = answer.unwrap().value.unwrap();
            assert_eq!(value, Bytes::from(format!("k{i}")));
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1, "one round for all eight");
    }

    #[tokio::test]
    async fn a_key_asked_for_twice_in_a_round_is_read_once() {
        let rounds = ReadRounds::default();
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let read_all = |keys: Vec<StorageKey>| {
            asked.lock().unwrap().push(keys.len());
            async move { Ok(echo(keys)) }
        };
        let (hot, cold) = (key("hot"), key("cold"));
        let (a, b, c) = tokio::join!(
            rounds.read(&hot, read_all),
            rounds.read(&cold, read_all),
            rounds.read(&hot, read_all)
        );
        assert_eq!(a.unwrap().value, Some(Bytes::from("hot")));
        assert_eq!(b.unwrap().value, Some(Bytes::from("cold")));
        assert_eq!(c.unwrap().value, Some(Bytes::from("hot")));
        assert_eq!(*asked.lock().unwrap(), [2], "one round of two keys");
    }

    #[tokio::test]
    async fn an_error_reaches_every_read_of_the_round() {
        let rounds = ReadRounds::default();
        let failing = |_| async { Err(StoreError::Command("boom".to_owned())) };
        let (a, b) = (key("a"), key("b"));
        let (a, b) = tokio::join!(rounds.read(&a, failing), rounds.read(&b, failing));
        assert!(matches!(a, Err(StoreError::Command(_))));
        assert!(matches!(b, Err(StoreError::Command(_))));
    }

    #[tokio::test]
    async fn reads_waiting_on_a_dropped_leader_read_alone() {
        let rounds = ReadRounds::default();
        let never = |_| std::future::pending();
        let (leader, follower) = (key("leader"), key("follower"));
        let leader = rounds.read(&leader, never);
        let follower = rounds.read(&follower, |keys| async { Ok(echo(keys)) });
        // The leader gives up (its deadline) while the follower waits on it.
        let (led, followed) = tokio::join!(
            tokio::time::timeout(Duration::from_millis(20), leader),
            tokio::time::timeout(Duration::from_secs(10), follower),
        );
        assert!(led.is_err(), "the leader never answers");
        let value = followed.expect("the follower is not stranded").unwrap();
        assert_eq!(value.value, Some(Bytes::from("follower")));
        // And the next read leads a round of its own.
        let next = rounds
            .read(&key("next"), |keys| async { Ok(echo(keys)) })
            .await
            .unwrap();
        assert_eq!(next.value, Some(Bytes::from("next")));
    }
}
