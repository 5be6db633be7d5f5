//! Request -> domain: the bytes of a gRPC message body, decoded as every
//! request type of `cachegw.v1.Cache` the way the service's codec decodes them
//! (`api::codec::RequestCodec` wraps prost's decoder and only renames its
//! error), converted with the service's `TryFrom`s, and every command that
//! converts run through a real `Cache` over the in-process store, which checks
//! the limits that depend on configuration (key and value sizes, tags, lease
//! tokens, patterns, batch sizes). Nothing may panic; what converts must
//! satisfy what the cache layer relies on.

#![no_main]

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use gateway::{
    Config,
    api::proto::v1 as pb,
    cache::{
        Cache, CacheMetrics, DeleteCommand, GetCommand, InvalidateCommand, Namespaces,
        ReleaseCommand, RequestError, SetCommand, Target, validate_namespace_name,
    },
    policy::{PolicyMetrics, PolicyRegistry},
    store::{MemoryStore, glob},
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    let commands = Commands {
        get: convert::<pb::GetRequest, GetCommand>(&body),
        set: convert::<pb::SetRequest, SetCommand>(&body),
        delete: convert::<pb::DeleteRequest, DeleteCommand>(&body),
        release: convert::<pb::ReleaseLeaseRequest, ReleaseCommand>(&body),
        invalidate: convert::<pb::InvalidateRequest, InvalidateCommand>(&body),
        get_many: pb::MGetRequest::decode(body.clone())
            .ok()
            .map(|request| request.items.into_iter().map(TryInto::try_into).collect()),
        set_many: pb::MSetRequest::decode(body.clone())
            .ok()
            .map(|request| request.items.into_iter().map(TryInto::try_into).collect()),
    };
    if let Some(Ok(get)) = &commands.get {
        checked(&get.namespace, &get.key);
    }
    if let Some(Ok(set)) = &commands.set {
        checked(&set.namespace, &set.key);
    }
    if let Some(Ok(delete)) = &commands.delete {
        checked(&delete.namespace, &delete.key);
    }
    if let Some(Ok(release)) = &commands.release {
        checked(&release.namespace, &release.key);
    }
    if let Some(Ok(invalidate)) = &commands.invalidate {
        assert!(validate_namespace_name(&invalidate.namespace).is_ok());
        if let (Target::Pattern(pattern), Some(Ok(get))) = (&invalidate.target, &commands.get) {
            glob::matches(pattern.as_bytes(), get.key.as_bytes());
        }
    }
    run(commands);
});

/// The conversions' results; `None` where the bytes are not that message.
struct Commands {
    get: Option<Result<GetCommand, RequestError>>,
    set: Option<Result<SetCommand, RequestError>>,
    delete: Option<Result<DeleteCommand, RequestError>>,
    release: Option<Result<ReleaseCommand, RequestError>>,
    invalidate: Option<Result<InvalidateCommand, RequestError>>,
    get_many: Option<Vec<Result<GetCommand, RequestError>>>,
    set_many: Option<Vec<Result<SetCommand, RequestError>>>,
}

fn convert<Wire, Command>(body: &Bytes) -> Option<Result<Command, RequestError>>
where
    Wire: Message + Default + TryInto<Command, Error = RequestError>,
{
    Wire::decode(body.clone()).ok().map(TryInto::try_into)
}

/// What the cache layer and the store's key layout take for granted.
fn checked(namespace: &str, key: &str) {
    assert!(validate_namespace_name(namespace).is_ok(), "{namespace:?}");
    assert!(!namespace.contains(':'));
    assert!(!key.is_empty());
    // `glob::escape` promises a pattern that matches the key itself.
    assert!(
        glob::matches(glob::escape(key).as_bytes(), key.as_bytes()),
        "{key:?}"
    );
}

/// Runs every converted command, Set first so the reads find something, in a
/// fresh cache (each input is reproducible alone) on a paused clock (lease
/// waits and job timeouts cost no wall time).
fn run(commands: Commands) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async {
        let cache = cache();
        let deadline = Some(Duration::from_secs(5));
        if let Some(Ok(set)) = commands.set {
            let _ = cache.set(set, deadline).await;
        }
        if let Some(set_many) = commands.set_many {
            let _ = cache.set_many(set_many, deadline).await;
        }
        if let Some(Ok(get)) = commands.get {
            let _ = cache.get(get, deadline).await;
        }
        if let Some(get_many) = commands.get_many {
            let _ = cache.get_many(get_many, deadline).await;
        }
        if let Some(Ok(release)) = commands.release {
            let _ = cache.release_lease(release, deadline).await;
        }
        if let Some(Ok(invalidate)) = commands.invalidate {
            let _ = cache.invalidate(invalidate, deadline).await;
        }
        if let Some(Ok(delete)) = commands.delete {
            let _ = cache.delete(delete, deadline).await;
        }
    });
}

/// A cache as `cachegw serve --store memory` builds it with the default
/// config: undeclared namespaces admitted, no policy bound.
fn cache() -> Cache {
    let mut config = Config::default();
    config.default_namespace.enabled = true;
    config.memory.max_bytes = 1 << 20;
    let mut registry = prometheus_client::registry::Registry::default();
    let policies = Arc::new(PolicyRegistry::new(&config));
    Cache::new(
        &config,
        Namespaces::from_config(&config),
        policies,
        Arc::new(MemoryStore::new(
            config.memory.max_bytes,
            config.limits.max_lease_ttl,
        )),
        CacheMetrics::register(&mut registry),
        PolicyMetrics::register(&mut registry),
    )
}
