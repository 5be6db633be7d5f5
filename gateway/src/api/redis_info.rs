//! Redis's memory facts for the Stats RPC: read with `INFO memory`, `INFO
//! stats` and `INFO keyspace` over a short-lived connection, parsed, and
//! checked for settings that hurt a cache. On a Redis Cluster they are read
//! from every primary and totalled, and each warning names its primaries.

use std::{collections::HashMap, time::Duration};

use deadpool_redis::redis::{
    self, AsyncConnectionConfig, Value,
    cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo},
};

use crate::config::RedisConfig;

/// What `INFO` says about Redis's memory and keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RedisFacts {
    /// Bytes allocated (`used_memory`).
    pub used_memory: u64,
    /// The same, as Redis prints it (`used_memory_human`).
    pub used_memory_human: String,
    /// The memory limit in bytes; 0 is none.
    pub maxmemory: u64,
    /// What Redis does when full (`maxmemory_policy`).
    pub maxmemory_policy: String,
    /// Keys evicted since Redis started or its stats were reset.
    pub evicted_keys: u64,
    /// Keys in every database.
    pub keys: u64,
    /// Of those, the keys with a TTL.
    pub keys_with_ttl: u64,
    /// The Redis servers these facts total: 1, or a cluster's primaries.
    pub nodes: u32,
}

/// What [`read`] found: the facts and what is wrong with them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Read {
    /// The facts (a cluster's totals).
    pub facts: RedisFacts,
    /// See [`RedisFacts::warnings`]; on a cluster each names its primaries.
    pub warnings: Vec<String>,
}

/// Why the facts could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    /// Redis could not be reached, or refused a command.
    #[error("cannot read Redis INFO: {0}")]
    Redis(#[from] redis::RedisError),
    /// Connecting and reading took longer than the configured timeouts.
    #[error("cannot read Redis INFO: no answer within {0:?}")]
    Timeout(Duration),
    /// A reply lacked a field or held one that is not a number.
    #[error("unexpected Redis INFO reply: {0}")]
    Malformed(String),
}

/// Reads the facts from the Redis at `config.url` (from every primary, for a
/// cluster), on connections of their own (closed afterwards), within the
/// configured connect and response timeouts.
pub async fn read(config: &RedisConfig) -> Result<Read, FactsError> {
    // The per-step timeouts bound each step; this bounds the whole (a
    // connect plus one pipelined round trip; on a cluster, the slot map
    // too), whatever the client does.
    let limit = config.connect_timeout + config.response_timeout;
    let limit = if config.is_cluster() {
        limit * 2
    } else {
        limit
    };
    let facts = if config.is_cluster() {
        tokio::time::timeout(limit, read_cluster(config)).await
    } else {
        tokio::time::timeout(limit, read_standalone(config)).await
    };
    facts.map_err(|_| FactsError::Timeout(limit))?
}

async fn read_standalone(config: &RedisConfig) -> Result<Read, FactsError> {
    let client = crate::tls::redis_client(config)?;
    let timeouts = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.response_timeout));
    let mut connection = client
        .get_multiplexed_async_connection_with_config(&timeouts)
        .await?;
    let (memory, stats, keyspace) = redis::pipe()
        .cmd("INFO")
        .arg("memory")
        .cmd("INFO")
        .arg("stats")
        .cmd("INFO")
        .arg("keyspace")
        .query_async::<(String, String, String)>(&mut connection)
        .await?;
    let facts = RedisFacts::from_info(&memory, &stats, &keyspace)?;
    Ok(Read {
        warnings: facts.warnings(),
        facts,
    })
}

/// Every primary's facts (each section sent to all primaries at once by the
/// cluster connection), totalled.
async fn read_cluster(config: &RedisConfig) -> Result<Read, FactsError> {
    let mut connection = crate::store::cluster_client(config)?
        .get_async_connection()
        .await?;
    let mut sections: Vec<HashMap<String, String>> = Vec::with_capacity(3);
    for section in ["memory", "stats", "keyspace"] {
        let reply = connection
            .route_command(
                redis::cmd("INFO").arg(section).clone(),
                RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
            )
            .await?;
        sections.push(per_node(reply)?);
    }
    let [memory, stats, keyspace] = <[_; 3]>::try_from(sections).expect("three sections");
    let mut nodes = Vec::with_capacity(memory.len());
    for (node, memory) in &memory {
        let section = |replies: &HashMap<String, String>, name: &str| {
            replies.get(node).cloned().ok_or_else(|| {
                FactsError::Malformed(format!("primary {node} did not answer INFO {name}"))
            })
        };
        let facts = RedisFacts::from_info(
            memory,
            &section(&stats, "stats")?,
            &section(&keyspace, "keyspace")?,
        )?;
        nodes.push((node.clone(), facts));
    }
    Ok(RedisFacts::total(nodes))
}

/// A reply sent to several cluster nodes: each node's address and text. A
/// node that refused the command makes the whole read fail, naming it.
fn per_node(reply: Value) -> Result<HashMap<String, String>, FactsError> {
    let Value::Map(pairs) = reply else {
        return Err(FactsError::Malformed(format!(
            "expected one INFO reply per primary, got {reply:?}"
        )));
    };
    pairs
        .into_iter()
        .map(|(node, reply)| {
            let node: String = redis::from_redis_value(node)
                .map_err(|err| FactsError::Malformed(format!("a node address: {err}")))?;
            let text = match reply {
                Value::ServerError(err) => {
                    return Err(FactsError::Malformed(format!("primary {node}: {err:?}")));
                }
                reply => redis::from_redis_value::<String>(reply).map_err(|err| {
                    FactsError::Malformed(format!("primary {node}'s INFO reply: {err}"))
                })?,
            };
            Ok((node, text))
        })
        .collect()
}

impl RedisFacts {
    /// Builds the facts from the replies of `INFO memory`, `INFO stats` and
    /// `INFO keyspace`.
    pub fn from_info(memory: &str, stats: &str, keyspace: &str) -> Result<Self, FactsError> {
        let memory = parse_info(memory);
        let stats = parse_info(stats);
        let (keys, keys_with_ttl) = keyspace_totals(&parse_info(keyspace))?;
        Ok(Self {
            used_memory: number(&memory, "used_memory")?,
            used_memory_human: text(&memory, "used_memory_human")?.to_owned(),
            maxmemory: number(&memory, "maxmemory")?,
            maxmemory_policy: text(&memory, "maxmemory_policy")?.to_owned(),
            evicted_keys: number(&stats, "evicted_keys")?,
            keys,
            keys_with_ttl,
            nodes: 1,
        })
    }

    /// A cluster's facts from its primaries' (address, facts): the sums,
    /// `maxmemory` 0 if any primary has no limit, the distinct policies; and
    /// each primary's warnings, the same text once with every primary it
    /// concerns.
    pub fn total(mut nodes: Vec<(String, RedisFacts)>) -> Read {
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        let sum = |field: fn(&RedisFacts) -> u64| nodes.iter().map(|(_, f)| field(f)).sum::<u64>();
        let used_memory = sum(|f| f.used_memory);
        let unbounded = nodes.iter().any(|(_, f)| f.maxmemory == 0);
        let mut policies: Vec<&str> = nodes
            .iter()
            .map(|(_, f)| f.maxmemory_policy.as_str())
            .collect();
        policies.sort_unstable();
        policies.dedup();
        let facts = RedisFacts {
            used_memory,
            used_memory_human: human(used_memory),
            maxmemory: if unbounded { 0 } else { sum(|f| f.maxmemory) },
            maxmemory_policy: policies.join(","),
            evicted_keys: sum(|f| f.evicted_keys),
            keys: sum(|f| f.keys),
            keys_with_ttl: sum(|f| f.keys_with_ttl),
            nodes: u32::try_from(nodes.len()).unwrap_or(u32::MAX),
        };
        let mut concerned: Vec<(String, Vec<&str>)> = Vec::new();
        for (node, node_facts) in &nodes {
            for warning in node_facts.warnings() {
                match concerned.iter_mut().find(|(known, _)| *known == warning) {
                    Some((_, primaries)) => primaries.push(node),
                    None => concerned.push((warning, vec![node.as_str()])),
                }
            }
        }
        let warnings = concerned
            .into_iter()
            .map(|(warning, primaries)| {
                if primaries.len() == nodes.len() && nodes.len() > 1 {
                    format!("on every primary ({}): {warning}", primaries.join(", "))
                } else if primaries.len() > 1 {
                    format!("on primaries {}: {warning}", primaries.join(", "))
                } else {
                    format!("on primary {}: {warning}", primaries[0])
                }
            })
            .collect();
        Read { facts, warnings }
    }

    /// What is wrong with these settings for a cache, one sentence each
    /// saying what and what to do. Evictions are not a warning: a full cache
    /// evicts.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.maxmemory == 0 {
            warnings.push(
                "maxmemory is not set (0): Redis will grow until the machine runs out of memory; \
                 set maxmemory (e.g. CONFIG SET maxmemory 2gb) and an eviction policy such as \
                 allkeys-lru."
                    .to_owned(),
            );
        }
        let policy = self.maxmemory_policy.as_str();
        if policy == "noeviction" {
            warnings.push(
                "maxmemory-policy is noeviction: once full, Redis refuses writes (Sets answer \
                 RESOURCE_EXHAUSTED); use allkeys-lru or allkeys-lfu for a cache."
                    .to_owned(),
            );
        } else if policy.starts_with("volatile-") && self.keys > self.keys_with_ttl {
            let without_ttl = self.keys - self.keys_with_ttl;
            warnings.push(format!(
                "maxmemory-policy is {policy} but {without_ttl} of {} keys carry no TTL: those \
                 keys are never evicted, so Redis can fill up with them; give them a TTL or use \
                 allkeys-lru or allkeys-lfu.",
                self.keys
            ));
        }
        warnings
    }
}

/// The `field:value` lines of an INFO reply; section headers (`# Memory`)
/// and blank lines are skipped, line ends may be `\r\n`.
pub fn parse_info(reply: &str) -> HashMap<&str, &str> {
    reply
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once(':'))
        .collect()
}

/// Total keys and keys with a TTL over every `dbN:keys=…,expires=…` line.
fn keyspace_totals(keyspace: &HashMap<&str, &str>) -> Result<(u64, u64), FactsError> {
    let mut totals = (0, 0);
    for (db, value) in keyspace.iter().filter(|(name, _)| name.starts_with("db")) {
        let fields: HashMap<&str, &str> = value
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .collect();
        let count = |name: &str| -> Result<u64, FactsError> {
            let raw = fields.get(name).ok_or_else(|| {
                FactsError::Malformed(format!("keyspace line `{db}` has no `{name}=`"))
            })?;
            raw.parse().map_err(|_| {
                FactsError::Malformed(format!("keyspace `{db}` {name}={raw} is not a count"))
            })
        };
        totals.0 += count("keys")?;
        totals.1 += count("expires")?;
    }
    Ok(totals)
}

/// `bytes` the way Redis prints memory (`used_memory_human`: `1.05M`).
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2}{}", UNITS[unit])
}

fn text<'a>(fields: &HashMap<&str, &'a str>, name: &str) -> Result<&'a str, FactsError> {
    fields
        .get(name)
        .copied()
        .ok_or_else(|| FactsError::Malformed(format!("INFO has no `{name}` field")))
}

fn number(fields: &HashMap<&str, &str>, name: &str) -> Result<u64, FactsError> {
    let raw = text(fields, name)?;
    raw.parse()
        .map_err(|_| FactsError::Malformed(format!("INFO `{name}:{raw}` is not a number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMORY: &str = "# Memory\r\nused_memory:1104064\r\nused_memory_human:1.05M\r\n\
        used_memory_rss:13545472\r\nmaxmemory:67108864\r\nmaxmemory_human:64.00M\r\n\
        maxmemory_policy:allkeys-lru\r\nallocator_frag_ratio:1.10\r\n";
    const STATS: &str = "# Stats\r\ntotal_connections_received:3\r\nevicted_keys:17\r\n\
        expired_keys:2\r\n";
    const KEYSPACE: &str = "# Keyspace\r\ndb0:keys=10,expires=4,avg_ttl=299000,subexpiry=0\r\n\
        db3:keys=5,expires=5,avg_ttl=10\r\n";

    fn facts(policy: &str, maxmemory: u64, keys: u64, expires: u64) -> RedisFacts {
        RedisFacts {
            maxmemory,
            maxmemory_policy: policy.to_owned(),
            keys,
            keys_with_ttl: expires,
            ..Default::default()
        }
    }

    #[test]
    fn parses_info_lines_skipping_headers_and_blank_lines() {
        let fields = parse_info("# Memory\r\n\r\nused_memory:42\r\nrdb_last:a:b\r\nnocolon\r\n");
        assert_eq!(fields.get("used_memory"), Some(&"42"));
        assert_eq!(
            fields.get("rdb_last"),
            Some(&"a:b"),
            "split at the first colon"
        );
        assert_eq!(fields.len(), 2);
    }

    #[test]
    fn reads_the_facts_from_the_three_replies() {
        let facts = RedisFacts::from_info(MEMORY, STATS, KEYSPACE).unwrap();
        assert_eq!(
            facts,
            RedisFacts {
                used_memory: 1_104_064,
                used_memory_human: "1.05M".into(),
                maxmemory: 64 << 20,
                maxmemory_policy: "allkeys-lru".into(),
                evicted_keys: 17,
                keys: 15,
                keys_with_ttl: 9,
                nodes: 1,
            }
        );
    }

    #[test]
    fn a_cluster_totals_its_primaries_and_says_which_a_warning_concerns() {
        let node = |used: u64, maxmemory: u64, policy: &str, keys: u64| RedisFacts {
            used_memory: used,
            maxmemory,
            maxmemory_policy: policy.to_owned(),
            evicted_keys: 1,
            keys,
            keys_with_ttl: keys,
            ..Default::default()
        };
        let read = RedisFacts::total(vec![
            ("10.0.0.2:6379".into(), node(1 << 20, 0, "allkeys-lru", 5)),
            (
                "10.0.0.1:6379".into(),
                node(2 << 20, 64 << 20, "noeviction", 7),
            ),
            ("10.0.0.3:6379".into(), node(3 << 20, 0, "allkeys-lru", 9)),
        ]);
        let facts = &read.facts;
        assert_eq!(facts.nodes, 3);
        assert_eq!(facts.used_memory, 6 << 20);
        assert_eq!(facts.used_memory_human, "6.00M");
        assert_eq!(facts.maxmemory, 0, "one primary without a limit: no limit");
        assert_eq!(facts.maxmemory_policy, "allkeys-lru,noeviction");
        assert_eq!(
            (facts.keys, facts.keys_with_ttl, facts.evicted_keys),
            (21, 21, 3)
        );
        assert_eq!(read.warnings.len(), 2, "{:?}", read.warnings);
        assert!(
            read.warnings[0]
                .starts_with("on primary 10.0.0.1:6379: maxmemory-policy is noeviction"),
            "{:?}",
            read.warnings
        );
        assert!(
            read.warnings[1]
                .starts_with("on primaries 10.0.0.2:6379, 10.0.0.3:6379: maxmemory is not set"),
            "{:?}",
            read.warnings
        );

        let bounded = RedisFacts::total(vec![
            ("a:1".into(), node(1, 1 << 30, "allkeys-lru", 1)),
            ("b:1".into(), node(1, 1 << 30, "allkeys-lru", 1)),
        ]);
        assert_eq!(bounded.facts.maxmemory, 2 << 30, "limits add up");
        assert_eq!(bounded.facts.maxmemory_policy, "allkeys-lru");
        assert!(bounded.warnings.is_empty(), "{:?}", bounded.warnings);
        let unbounded = RedisFacts::total(vec![
            ("a:1".into(), node(1, 0, "allkeys-lru", 1)),
            ("b:1".into(), node(1, 0, "allkeys-lru", 1)),
        ]);
        assert_eq!(
            unbounded.warnings.len(),
            1,
            "one warning for all: {:?}",
            unbounded.warnings
        );
        assert!(unbounded.warnings[0].starts_with("on every primary (a:1, b:1): maxmemory"));
    }

    #[test]
    fn memory_reads_as_redis_prints_it() {
        assert_eq!(human(512), "512B");
        assert_eq!(human(1_104_064), "1.05M");
        assert_eq!(human(3 << 30), "3.00G");
    }

    #[test]
    fn an_empty_keyspace_has_no_keys() {
        let facts = RedisFacts::from_info(MEMORY, STATS, "# Keyspace\r\n").unwrap();
        assert_eq!((facts.keys, facts.keys_with_ttl), (0, 0));
    }

    #[test]
    fn a_missing_or_garbled_field_is_reported_by_name() {
        let err = RedisFacts::from_info("used_memory:1\r\n", STATS, KEYSPACE).unwrap_err();
        assert!(err.to_string().contains("used_memory_human"), "{err}");
        let garbled = MEMORY.replace("maxmemory:67108864", "maxmemory:lots");
        let err = RedisFacts::from_info(&garbled, STATS, KEYSPACE).unwrap_err();
        assert!(err.to_string().contains("maxmemory:lots"), "{err}");
        let err = RedisFacts::from_info(MEMORY, STATS, "db0:keys=x,expires=1").unwrap_err();
        assert!(err.to_string().contains("keys=x"), "{err}");
    }

    #[test]
    fn warns_about_unbounded_memory_and_noeviction() {
        let warnings = facts("noeviction", 0, 0, 0).warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("maxmemory is not set"));
        assert!(warnings[1].contains("noeviction"));
        assert!(warnings[1].contains("RESOURCE_EXHAUSTED"));
    }

    #[test]
    fn warns_when_a_volatile_policy_cannot_evict_keys_without_ttl() {
        let warnings = facts("volatile-lru", 1 << 30, 10, 4).warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("6 of 10 keys carry no TTL"),
            "{warnings:?}"
        );
        assert!(facts("volatile-ttl", 1 << 30, 10, 10).warnings().is_empty());
    }

    #[test]
    fn a_bounded_allkeys_policy_is_fine() {
        for policy in ["allkeys-lru", "allkeys-lfu", "allkeys-random"] {
            let mut fine = facts(policy, 64 << 20, 10, 0);
            fine.evicted_keys = 1000;
            assert!(fine.warnings().is_empty(), "{policy}");
        }
    }
}
