//! When and how long to wait before resending a call: exponential backoff
//! with jitter, a bounded number of attempts, `UNAVAILABLE` only.

use std::time::Duration;

use tonic::Code;

/// How a client retries calls the transport could not deliver.
///
/// Only `UNAVAILABLE` is retried (the gateway itself never answers it: it
/// means the connection failed), and only for calls that are safe to send
/// twice; see [`Client`](crate::Client) for which those are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never retry).
    pub attempts: u32,
    /// Backoff before the first retry; it doubles for each further one.
    pub initial_backoff: Duration,
    /// The backoff never grows past this.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 3 attempts, 50 ms then 100 ms apart (each minus up to half of jitter).
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// Never retry.
    pub fn none() -> Self {
        RetryPolicy {
            attempts: 1,
            ..Default::default()
        }
    }

    /// Whether a call that failed with `code` on attempt `attempt` (1-based)
    /// is sent again.
    pub(crate) fn retries(&self, code: Code, attempt: u32) -> bool {
        code == Code::Unavailable && attempt < self.attempts
    }

    /// The pause after failed attempt `attempt` (1-based): the exponential
    /// backoff, minus `jitter` (0.0..=1.0) times half of it, so that clients
    /// that failed together do not come back together.
    pub(crate) fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        let full = self
            .initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff);
        full.mul_f64(1.0 - 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// The longest all the pauses of one call can add up to.
    pub fn max_total_backoff(&self) -> Duration {
        (1..self.attempts)
            .map(|attempt| self.backoff(attempt, 0.0))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unavailable_is_retried_and_only_while_attempts_remain() {
        let policy = RetryPolicy::default();
        assert!(policy.retries(Code::Unavailable, 1));
        assert!(policy.retries(Code::Unavailable, 2));
        assert!(!policy.retries(Code::Unavailable, 3));
        for code in [
            Code::DeadlineExceeded,
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::Internal,
            Code::ResourceExhausted,
        ] {
            assert!(!policy.retries(code, 1), "{code:?}");
        }
        assert!(!RetryPolicy::none().retries(Code::Unavailable, 1));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_takes_at_most_half() {
        let policy = RetryPolicy {
            attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
        };
        let without_jitter: Vec<_> = (1..=5).map(|a| policy.backoff(a, 0.0)).collect();
        assert_eq!(
            without_jitter,
            [100, 200, 400, 500, 500].map(Duration::from_millis)
        );
        assert_eq!(policy.backoff(2, 1.0), Duration::from_millis(100));
        assert_eq!(policy.backoff(2, 0.5), Duration::from_millis(150));
        // Out-of-range jitter is clamped, huge attempt numbers do not overflow.
        assert_eq!(policy.backoff(2, 7.0), Duration::from_millis(100));
        assert_eq!(policy.backoff(u32::MAX, 0.0), Duration::from_millis(500));
    }

    #[test]
    fn the_total_backoff_is_bounded() {
        assert_eq!(
            RetryPolicy::default().max_total_backoff(),
            Duration::from_millis(150)
        );
        assert_eq!(RetryPolicy::none().max_total_backoff(), Duration::ZERO);
    }
}
