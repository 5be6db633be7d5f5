//! What the gateway answered, as explicit states: the generated messages'
//! flags and enums are converted here, once, and nowhere else.

use std::{collections::HashMap, time::Duration};

use crate::proto::{
    DeleteResponse, InvalidateResponse, JobState, SetResponse, invalidate_request::Target,
};

/// Request context a namespace's policy may vary on (route, user id,
/// `surrogate-key` tags, ...): sent as the request's `attributes`.
pub type Attributes = HashMap<String, String>;

/// What a [`Client::get`](crate::Client::get) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T> {
    /// A fresh entry.
    Hit(T),
    /// An entry past its fresh TTL but inside its stale window (only when
    /// stale values were asked for).
    Stale(T),
    /// No usable entry.
    Miss,
    /// The gateway could not reach its store in time: nothing is known about
    /// the entry. Treat as a miss, but do not conclude the key is absent.
    Degraded,
}

impl<T> Lookup<T> {
    /// The value, fresh or stale; `None` on a miss or a degraded answer.
    pub fn into_value(self) -> Option<T> {
        match self {
            Lookup::Hit(value) | Lookup::Stale(value) => Some(value),
            Lookup::Miss | Lookup::Degraded => None,
        }
    }

    /// The value, if fresh or stale.
    pub fn value(&self) -> Option<&T> {
        match self {
            Lookup::Hit(value) | Lookup::Stale(value) => Some(value),
            Lookup::Miss | Lookup::Degraded => None,
        }
    }
}

/// What became of a [`Client::set`](crate::Client::set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Written, fresh for `ttl`.
    Stored {
        /// The fresh TTL the entry was written with.
        ttl: Duration,
    },
    /// The namespace's policy decided not to cache this value.
    NotCached,
    /// The gateway could not reach its store in time: nothing was written.
    Degraded,
}

impl From<&SetResponse> for Write {
    fn from(set: &SetResponse) -> Self {
        match (set.degraded, set.stored) {
            (true, _) => Write::Degraded,
            (false, true) => Write::Stored {
                ttl: Duration::from_millis(set.ttl_ms),
            },
            (false, false) => Write::NotCached,
        }
    }
}

/// What became of a [`Client::delete`](crate::Client::delete).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// An entry existed and was removed.
    Deleted,
    /// There was no entry.
    Absent,
    /// The gateway could not reach its store in time: nothing was removed.
    Degraded,
}

impl From<&DeleteResponse> for Removal {
    fn from(deleted: &DeleteResponse) -> Self {
        match (deleted.degraded, deleted.deleted) {
            (true, _) => Removal::Degraded,
            (false, true) => Removal::Deleted,
            (false, false) => Removal::Absent,
        }
    }
}

/// What an invalidation removes (or, soft, marks stale).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidate {
    /// Exact keys, each mapped by the namespace's policy like a Delete.
    Keys(Vec<String>),
    /// A Redis-style glob over the namespace's keys.
    Pattern(String),
    /// Tags (surrogate keys) policies attached to entries.
    Tags(Vec<String>),
    /// Every entry of the namespace, in O(1).
    Namespace,
}

impl From<Invalidate> for Target {
    fn from(target: Invalidate) -> Self {
        match target {
            Invalidate::Keys(keys) => Target::Keys(crate::proto::KeyList { keys }),
            Invalidate::Pattern(pattern) => Target::Pattern(pattern),
            Invalidate::Tags(tags) => Target::Tags(crate::proto::TagList { tags }),
            Invalidate::Namespace => Target::WholeNamespace(true),
        }
    }
}

/// Where an invalidation job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobProgress {
    /// Still running: follow it with
    /// [`Client::invalidation`](crate::Client::invalidation).
    Running,
    /// Finished; the counts are final.
    Done,
    /// Stopped by an error; the counts say what was done before.
    Failed {
        /// The gateway's reason.
        error: String,
    },
}

/// An invalidation job, as the gateway reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// The job's id on the gateway that accepted it.
    pub job_id: String,
    /// Where it stands.
    pub progress: JobProgress,
    /// Entries removed (or marked stale) so far.
    pub affected: u64,
    /// Candidates examined so far.
    pub examined: u64,
    /// The namespace's generation after a whole-namespace invalidation.
    pub generation: u64,
    /// What did not run, for a job that otherwise finished (empty if all did).
    pub warning: String,
}

impl From<InvalidateResponse> for Invalidation {
    fn from(job: InvalidateResponse) -> Self {
        let (progress, warning) = match JobState::try_from(job.state) {
            Ok(JobState::Running) => (JobProgress::Running, job.error),
            Ok(JobState::Failed) => (JobProgress::Failed { error: job.error }, String::new()),
            // Unspecified or a state newer than this client: report it as done
            // only if the gateway said so.
            Ok(JobState::Done) => (JobProgress::Done, job.error),
            Ok(JobState::Unspecified) | Err(_) => (
                JobProgress::Failed {
                    error: format!("unknown job state {} ({})", job.state, job.error),
                },
                String::new(),
            ),
        };
        Invalidation {
            job_id: job.job_id,
            progress,
            affected: job.affected,
            examined: job.examined,
            generation: job.generation,
            warning,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_delete_answers_become_explicit_states() {
        let degraded = SetResponse {
            degraded: true,
            stored: false,
            ..Default::default()
        };
        assert_eq!(Write::from(&degraded), Write::Degraded);
        let stored = SetResponse {
            stored: true,
            ttl_ms: 1500,
            ..Default::default()
        };
        assert_eq!(
            Write::from(&stored),
            Write::Stored {
                ttl: Duration::from_millis(1500)
            }
        );
        assert_eq!(Write::from(&SetResponse::default()), Write::NotCached);

        let gone = DeleteResponse {
            deleted: true,
            ..Default::default()
        };
        assert_eq!(Removal::from(&gone), Removal::Deleted);
        assert_eq!(Removal::from(&DeleteResponse::default()), Removal::Absent);
        let degraded = DeleteResponse {
            degraded: true,
            deleted: true,
            ..Default::default()
        };
        assert_eq!(Removal::from(&degraded), Removal::Degraded);
    }

    #[test]
    fn job_states_map_and_unknown_ones_are_not_taken_for_done() {
        let done = Invalidation::from(InvalidateResponse {
            job_id: "j-1".into(),
            state: JobState::Done as i32,
            affected: 3,
            ..Default::default()
        });
        assert_eq!((done.progress, done.affected), (JobProgress::Done, 3));
        let failed = Invalidation::from(InvalidateResponse {
            state: JobState::Failed as i32,
            error: "store down".into(),
            ..Default::default()
        });
        assert_eq!(
            failed.progress,
            JobProgress::Failed {
                error: "store down".into()
            }
        );
        let unknown = Invalidation::from(InvalidateResponse {
            state: 42,
            ..Default::default()
        });
        assert!(matches!(unknown.progress, JobProgress::Failed { .. }));
    }

    #[test]
    fn lookups_give_their_value_only_when_there_is_one() {
        assert_eq!(Lookup::Hit(1).into_value(), Some(1));
        assert_eq!(Lookup::Stale(2).value(), Some(&2));
        assert_eq!(Lookup::<u8>::Miss.into_value(), None);
        assert_eq!(Lookup::<u8>::Degraded.into_value(), None);
    }
}
