//! Commands for a standalone Redis or a Redis Cluster, written once.
//!
//! A [`Batch`] is a list of commands split into *groups*: every command of a
//! group touches one hash slot (one entry and its lease, one tag's index and
//! marks, one namespace's state), because a cluster refuses anything else.
//! Groups are split into *phases* where order matters across slots (write an
//! entry, then index it, then check the marks).
//!
//! - On a standalone Redis the whole batch is one pipeline on one connection,
//!   so it costs one round trip and Redis runs it in order, phases included.
//! - On a cluster, every group of a phase is its own pipeline, sent
//!   concurrently on the cluster connection (which routes each by its slot,
//!   follows MOVED/ASK and refreshes its slot map); phases run one after the
//!   other. Nothing spans two slots, so nothing needs the slots to be together.

use std::sync::Arc;

use deadpool_redis::redis::{
    self, Cmd, Pipeline, RedisError, RedisFuture, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo},
};

/// A connection to either kind of Redis.
#[derive(Clone)]
pub enum Handle {
    /// One multiplexed connection to a standalone Redis.
    Standalone(MultiplexedConnection),
    /// A cluster connection (connections to every node, multiplexed).
    Cluster(ClusterConnection),
}

impl ConnectionLike for Handle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Handle::Standalone(connection) => connection.req_packed_command(cmd),
            Handle::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Handle::Standalone(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Handle::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Handle::Standalone(connection) => connection.get_db(),
            Handle::Cluster(connection) => connection.get_db(),
        }
    }
}

/// One command of a batch.
struct Entry {
    cmd: Cmd,
    /// Its reply is dropped (not returned).
    ignored: bool,
    group: usize,
    phase: usize,
}

/// Commands grouped by slot and ordered by phase; see the module docs.
#[derive(Default)]
pub struct Batch {
    entries: Vec<Entry>,
    group: usize,
    phase: usize,
    /// The scripts the batch calls (by EVALSHA), each once.
    scripts: Vec<&'static Lua>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a new group: the commands added next share one slot.
    pub fn group(&mut self) -> &mut Self {
        if self
            .entries
            .last()
            .is_some_and(|last| last.group == self.group)
        {
            self.group += 1;
        }
        self
    }

    /// Starts a new phase: its groups run only once every earlier group has
    /// answered (on a cluster; a standalone pipeline is in order anyway).
    pub fn then(&mut self) -> &mut Self {
        self.group();
        if self
            .entries
            .last()
            .is_some_and(|last| last.phase == self.phase)
        {
            self.phase += 1;
        }
        self
    }

    /// Adds a command whose reply is returned.
    pub fn add(&mut self, cmd: Cmd) -> &mut Self {
        self.push(cmd, false)
    }

    /// Adds a command whose reply is dropped.
    pub fn add_ignored(&mut self, cmd: Cmd) -> &mut Self {
        self.push(cmd, true)
    }

    /// Adds a call of `script` (EVALSHA, loaded where missing) on `keys`, which
    /// share one slot; returns the command so arguments can follow. Its reply
    /// is returned.
    pub fn eval(&mut self, script: &'static Lua, keys: &[&[u8]]) -> &mut Cmd {
        self.push_eval(script, keys, false)
    }

    /// [`Batch::eval`], with the reply dropped.
    pub fn eval_ignored(&mut self, script: &'static Lua, keys: &[&[u8]]) -> &mut Cmd {
        self.push_eval(script, keys, true)
    }

    fn push_eval(&mut self, script: &'static Lua, keys: &[&[u8]], ignored: bool) -> &mut Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        if !self
            .scripts
            .iter()
            .any(|known| known.get_hash() == script.get_hash())
        {
            self.scripts.push(script);
        }
        self.push(cmd, ignored);
        &mut self.entries.last_mut().expect("just pushed").cmd
    }

    /// Runs the batch on `handle`; see [`Batch::into_pipeline`] and
    /// [`Batch::run_on_cluster`].
    pub async fn run(self, handle: &mut Handle) -> Result<Vec<Value>, RedisError> {
        if self.entries.is_empty() {
            return Ok(Vec::new());
        }
        match handle {
            Handle::Standalone(connection) => self.into_pipeline().query_async(connection).await,
            Handle::Cluster(connection) => self.run_on_cluster(connection).await,
        }
    }

    fn push(&mut self, cmd: Cmd, ignored: bool) -> &mut Self {
        self.entries.push(Entry {
            cmd,
            ignored,
            group: self.group,
            phase: self.phase,
        });
        self
    }

    /// The whole batch as one pipeline, for a standalone Redis: the scripts
    /// are loaded first (a restarted Redis has lost its script cache).
    pub fn into_pipeline(self) -> Pipeline {
        let mut pipeline = redis::pipe();
        for script in &self.scripts {
            pipeline.add_command(load_cmd(script)).ignore();
        }
        for entry in self.entries {
            pipeline.add_command(entry.cmd);
            if entry.ignored {
                pipeline.ignore();
            }
        }
        pipeline
    }

    /// Runs the batch on a cluster: phase by phase, the groups of a phase
    /// concurrently. Returns the replies of the commands not ignored, in the
    /// order they were added.
    pub async fn run_on_cluster(
        self,
        connection: &ClusterConnection,
    ) -> Result<Vec<Value>, RedisError> {
        let scripts = Arc::new(self.scripts);
        let mut replies = Vec::with_capacity(self.entries.len());
        let mut entries = self.entries.into_iter().peekable();
        while let Some(first) = entries.next() {
            let phase = first.phase;
            let mut groups: Vec<Pipeline> = Vec::new();
            let mut current_group = usize::MAX;
            let mut pending = Some(first);
            while let Some(entry) = pending
                .take()
                .or_else(|| entries.next_if(|next| next.phase == phase))
            {
                if entry.group != current_group {
                    current_group = entry.group;
                    groups.push(redis::pipe());
                }
                let pipeline = groups.last_mut().expect("a group was just pushed");
                pipeline.add_command(entry.cmd);
                if entry.ignored {
                    pipeline.ignore();
                }
            }
            let answers = futures::future::try_join_all(groups.into_iter().map(|pipeline| {
                let mut connection = connection.clone();
                let scripts = Arc::clone(&scripts);
                async move {
                    match pipeline.query_async::<Vec<Value>>(&mut connection).await {
                        Err(err) if is_no_script(&err) && !scripts.is_empty() => {
                            // A node that restarted or was just promoted has an
                            // empty script cache; the failed EVALSHA ran nothing.
                            load_everywhere(&mut connection, &scripts).await?;
                            pipeline.query_async::<Vec<Value>>(&mut connection).await
                        }
                        answer => answer,
                    }
                }
            }))
            .await?;
            replies.extend(answers.into_iter().flatten());
        }
        Ok(replies)
    }
}

/// A Lua script, called by its SHA-1 and loaded where it is missing.
pub struct Lua {
    source: &'static str,
    hash: String,
}

impl Lua {
    /// The script with this source.
    pub fn new(source: &'static str) -> Self {
        let hash = redis::Script::new(source).get_hash().to_owned();
        Self { source, hash }
    }

    fn get_hash(&self) -> &str {
        &self.hash
    }
}

fn load_cmd(script: &Lua) -> Cmd {
    let mut cmd = redis::cmd("SCRIPT");
    cmd.arg("LOAD").arg(script.source);
    cmd
}

/// Loads `scripts` on every primary of the cluster.
async fn load_everywhere(
    connection: &mut ClusterConnection,
    scripts: &[&'static Lua],
) -> Result<(), RedisError> {
    for script in scripts {
        connection
            .route_command(
                load_cmd(script),
                RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::AllSucceeded),
                )),
            )
            .await?;
    }
    Ok(())
}

/// `-NOSCRIPT`, alone or inside a pipeline's errors.
fn is_no_script(err: &RedisError) -> bool {
    err.code() == Some("NOSCRIPT")
        || err
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, error)| error.code() == "NOSCRIPT"))
}
