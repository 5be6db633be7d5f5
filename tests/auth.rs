//! Tenants and tokens, end to end: a real gateway with authentication on,
//! tenants `team-a` and `team-b` with their own namespaces, and an admin.
//! Tenant A's token must not reach anything of B's, whatever the request
//! names; the admin API takes admin tokens only; a tenant over its rate is
//! refused with nothing written.

mod support;

use std::collections::HashMap;

use gateway::{
    api::proto::v1::{
        DeleteRequest, GetRequest, InvalidateRequest, ListPoliciesRequest, MGetRequest,
        MSetRequest, Outcome, ReleaseLeaseRequest, SetRequest, StatsRequest, TagList,
        cache_client::CacheClient, invalidate_request::Target,
        policy_admin_client::PolicyAdminClient,
    },
    auth::token_digest_hex,
    config::{Config, FallbackMode, Right, StoreKind, TenantConfig, TokenSources},
};
use support::{RedisServer, TestGateway, bind, test_config};
use tonic::{
    Code, Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

const A_TOKEN: &str = "team-a-token-0123456789abcdef";
const B_TOKEN: &str = "team-b-token-0123456789abcdef";
const READER_TOKEN: &str = "auditor-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "ops-admin-token-0123456789abcdef";

/// B's namespace, and namespaces that look like it.
const B: &str = "team-b";
const LOOK_ALIKES: &[&str] = &[
    "team-b",
    "TEAM-B",
    "team-b ",
    "team-b\u{200b}", // a zero-width space
    "t\u{0435}am-b",  // a Cyrillic `е`
    "team\u{2011}b",  // a non-breaking hyphen
    "team-*",
    "*",
    "",
];
/// Names inside A's `team-a*` grant that try to climb out with separators:
/// not namespace names at all.
const CLIMBING: &[&str] = &["team-a:team-b", "team-a/../team-b", "team-a\u{0}team-b"];

#[derive(Clone)]
struct Bearer(Option<&'static str>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = self.0 {
            let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

type Client = CacheClient<InterceptedService<Channel, Bearer>>;
type Admin = PolicyAdminClient<InterceptedService<Channel, Bearer>>;

fn tenant(token: &str, grants: &[(&str, &[Right])], rate_limit: u32) -> TenantConfig {
    TenantConfig {
        tokens: TokenSources {
            token_sha256: vec![token_digest_hex(token)],
            ..Default::default()
        },
        namespaces: grants
            .iter()
            .map(|(namespace, rights)| ((*namespace).to_owned(), rights.to_vec()))
            .collect(),
        rate_limit,
        burst: None,
    }
}

const ALL: &[Right] = &[Right::Read, Right::Write, Right::Invalidate];

fn secured(config: &mut Config) {
    config.auth.enabled = true;
    // A's grant is a prefix: `team-a*` must still not reach `team-b`.
    config
        .auth
        .tenants
        .insert("team-a".into(), tenant(A_TOKEN, &[("team-a*", ALL)], 0));
    config
        .auth
        .tenants
        .insert("team-b".into(), tenant(B_TOKEN, &[(B, ALL)], 0));
    config.auth.tenants.insert(
        "auditor".into(),
        tenant(READER_TOKEN, &[(B, &[Right::Read])], 0),
    );
    config.auth.admins.insert(
        "ops".into(),
        TokenSources {
            token_sha256: vec![token_digest_hex(ADMIN_TOKEN)],
            ..Default::default()
        },
    );
    // Both namespaces tag their entries from the `surrogate-key` attribute.
    for namespace in ["team-a", B] {
        bind(
            config,
            namespace,
            "surrogate-keys",
            Some(serde_json::json!({"ttl": "10m", "stale": "1m"})),
            FallbackMode::FailClosed,
        );
    }
}

struct Secured {
    redis: RedisServer,
    gateway: TestGateway,
}

impl Secured {
    async fn start(configure: impl FnOnce(&mut Config)) -> Self {
        let redis = RedisServer::start().await;
        let mut config = test_config(StoreKind::Redis, Some(redis.url()));
        secured(&mut config);
        configure(&mut config);
        let gateway = TestGateway::start(config).await;
        Secured { redis, gateway }
    }

    async fn client(&self, token: Option<&'static str>) -> Client {
        CacheClient::with_interceptor(self.gateway.channel().await, Bearer(token))
    }

    async fn admin(&self, token: Option<&'static str>) -> Admin {
        let channel = Endpoint::from_shared(format!("http://{}", self.gateway.admin_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        PolicyAdminClient::with_interceptor(channel, Bearer(token))
    }

    /// Every raw Redis key of `namespace` (entries, tag indexes, leases,
    /// generation), by SCAN.
    async fn raw_keys(&self, namespace: &str) -> Vec<String> {
        let mut connection = self.redis.connection().await;
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .unwrap();
            keys.extend(
                batch
                    .into_iter()
                    // `cg:{ns:gen:key}`, `cgt:{ns:gen:tag}`, `cgm:ns`, ...
                    .filter(|key| {
                        key.split(':').nth(1).map(|ns| ns.trim_start_matches('{'))
                            == Some(namespace)
                    }),
            );
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys
    }
}

fn attrs(tags: &str) -> HashMap<String, String> {
    [("surrogate-key".to_owned(), tags.to_owned())].into()
}

fn set(namespace: &str, key: &str, value: &str, tags: &str) -> SetRequest {
    SetRequest {
        namespace: namespace.into(),
        key: key.into(),
        value: value.as_bytes().to_vec().into(),
        attributes: attrs(tags),
        ..Default::default()
    }
}

fn get(namespace: &str, key: &str) -> GetRequest {
    GetRequest {
        namespace: namespace.into(),
        key: key.into(),
        ..Default::default()
    }
}

fn invalidate(namespace: &str, target: Target) -> InvalidateRequest {
    InvalidateRequest {
        namespace: namespace.into(),
        target: Some(target),
        ..Default::default()
    }
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, what: &str) -> Status {
    let status = result.expect_err(what);
    assert_eq!(status.code(), code, "{what}: {status:?}");
    status
}

/// B's entries: `k0..k9`, all tagged `shared` (a tag A uses too).
const B_KEYS: usize = 10;

async fn write_b(b: &mut Client) {
    for i in 0..B_KEYS {
        let stored = b
            .set(set(B, &format!("k{i}"), "b's", "shared"))
            .await
            .unwrap()
            .into_inner();
        assert!(stored.stored, "{stored:?}");
    }
}

async fn assert_b_intact(world: &Secured, b: &mut Client, before: &[String]) {
    assert_eq!(
        world.raw_keys(B).await,
        before,
        "B's keys in Redis are exactly as before"
    );
    for i in 0..B_KEYS {
        let got = b.get(get(B, &format!("k{i}"))).await.unwrap().into_inner();
        assert_eq!(
            (got.outcome, &got.value[..]),
            (Outcome::Hit as i32, &b"b's"[..]),
            "team-b/k{i}"
        );
    }
}

#[tokio::test]
async fn missing_unknown_and_misplaced_tokens_are_told_apart() {
    let world = Secured::start(|_| {}).await;
    let request = || set("team-a", "k", "v", "");

    let none = world.client(None).await.set(request()).await;
    let status = assert_code(none, Code::Unauthenticated, "no token");
    assert!(status.message().contains("Bearer"), "{status:?}");
    let unknown = world
        .client(Some("team-a-token-0123456789abcdeX"))
        .await
        .set(request())
        .await;
    assert_code(unknown, Code::Unauthenticated, "an unknown token");

    let mut raw = CacheClient::new(world.gateway.channel().await);
    let mut basic = Request::new(request());
    basic
        .metadata_mut()
        .insert("authorization", "Basic dGVhbS1hOng=".parse().unwrap());
    assert_code(raw.set(basic).await, Code::Unauthenticated, "Basic auth");

    let admin_on_data = world.client(Some(ADMIN_TOKEN)).await.set(request()).await;
    assert_code(
        admin_on_data,
        Code::PermissionDenied,
        "an admin token on data",
    );

    // The admin API: admin tokens only.
    for (token, code) in [
        (None, Code::Unauthenticated),
        (Some(A_TOKEN), Code::PermissionDenied),
        (Some(B_TOKEN), Code::PermissionDenied),
    ] {
        let mut admin = world.admin(token).await;
        let listed = admin.list_policies(ListPoliciesRequest {}).await;
        assert_code(listed, code, &format!("ListPolicies with {token:?}"));
        let stats = admin.stats(StatsRequest {}).await;
        assert_code(stats, code, &format!("Stats with {token:?}"));
    }
    let mut admin = world.admin(Some(ADMIN_TOKEN)).await;
    let listed = admin.list_policies(ListPoliciesRequest {}).await.unwrap();
    assert!(!listed.into_inner().versions.is_empty());
    admin.stats(StatsRequest {}).await.unwrap();

    // Nothing of all that was written.
    assert!(
        world
            .raw_keys("team-a")
            .await
            .iter()
            .all(|key| !key.starts_with("cg:"))
    );
    // A tenant with the rights does get through.
    let mut a = world.client(Some(A_TOKEN)).await;
    assert!(a.set(request()).await.unwrap().into_inner().stored);
}

#[tokio::test]
async fn tenant_a_cannot_reach_tenant_b_by_any_name() {
    let world = Secured::start(|_| {}).await;
    let mut a = world.client(Some(A_TOKEN)).await;
    let mut b = world.client(Some(B_TOKEN)).await;
    write_b(&mut b).await;
    // A's own entries with the same keys and the same tag.
    for i in 0..B_KEYS {
        a.set(set("team-a", &format!("k{i}"), "a's", "shared"))
            .await
            .unwrap();
    }
    let before = world.raw_keys(B).await;
    assert!(before.len() > B_KEYS, "entries and a tag index: {before:?}");

    // Every operation, naming B's namespace or one that looks like it.
    for namespace in LOOK_ALIKES {
        let what = |op: &str| format!("{op} on {namespace:?} with A's token");
        let code = Code::PermissionDenied;
        assert_code(a.get(get(namespace, "k0")).await, code, &what("Get"));
        assert_code(
            a.set(set(namespace, "k0", "a's", "")).await,
            code,
            &what("Set"),
        );
        let delete = DeleteRequest {
            namespace: (*namespace).into(),
            key: "k0".into(),
            attributes: Default::default(),
        };
        assert_code(a.delete(delete).await, code, &what("Delete"));
        for target in [
            Target::Keys(gateway::api::proto::v1::KeyList {
                keys: vec!["k0".into()],
            }),
            Target::Pattern("*".into()),
            Target::Tags(TagList {
                tags: vec!["shared".into()],
            }),
            Target::WholeNamespace(true),
        ] {
            let label = format!("Invalidate {target:?}");
            let result = a.invalidate(invalidate(namespace, target)).await;
            assert_code(result, code, &what(&label));
        }
        let release = ReleaseLeaseRequest {
            namespace: (*namespace).into(),
            key: "k0".into(),
            lease_token: "whatever".into(),
            ..Default::default()
        };
        assert_code(a.release_lease(release).await, code, &what("ReleaseLease"));
        // A batch with one foreign item is refused whole.
        let mget = MGetRequest {
            items: vec![get("team-a", "k0"), get(namespace, "k0")],
        };
        assert_code(a.m_get(mget).await, code, &what("MGet"));
        let mset = MSetRequest {
            items: vec![
                set("team-a", "new", "a's", ""),
                set(namespace, "k0", "a's", ""),
            ],
        };
        assert_code(a.m_set(mset).await, code, &what("MSet"));
    }
    for namespace in CLIMBING {
        let what = |op: &str| format!("{op} on {namespace:?} with A's token");
        let code = Code::InvalidArgument;
        assert_code(a.get(get(namespace, "k0")).await, code, &what("Get"));
        assert_code(
            a.set(set(namespace, "k0", "a's", "")).await,
            code,
            &what("Set"),
        );
        let result = a
            .invalidate(invalidate(namespace, Target::Pattern("*".into())))
            .await;
        assert_code(result, code, &what("Invalidate"));
    }
    let new = a.get(get("team-a", "new")).await.unwrap().into_inner();
    assert_eq!(
        new.outcome,
        Outcome::Miss as i32,
        "the refused MSet wrote nothing"
    );

    // In its own namespace, A's patterns, keys and tags that name B's
    // namespace, its separators or glob characters stay in team-a.
    for pattern in [
        "*",
        "[a-z]*",
        "\\*",
        "team-b:*",
        "*team-b*",
        "cg:team-b:*",
        "cg:{team-b:0:*",
        "}*",
        "../team-b/*",
        "team-b\u{200b}*",
    ] {
        a.invalidate(invalidate("team-a", Target::Pattern(pattern.into())))
            .await
            .unwrap_or_else(|status| panic!("pattern {pattern:?}: {status:?}"));
    }
    for key in [
        "team-b:k0",
        "cg:team-b:0:k1",
        "cg:{team-b:0:k1}",
        "}",
        "../team-b/k2",
        "t\u{0435}am-b:k3",
    ] {
        a.set(set("team-a", key, "a's", "shared")).await.unwrap();
        a.invalidate(invalidate(
            "team-a",
            Target::Keys(gateway::api::proto::v1::KeyList {
                keys: vec![key.into()],
            }),
        ))
        .await
        .unwrap();
    }
    a.invalidate(invalidate(
        "team-a",
        Target::Tags(TagList {
            tags: vec!["shared".into(), "cg:team-b:shared".into()],
        }),
    ))
    .await
    .unwrap();
    a.invalidate(invalidate("team-a", Target::WholeNamespace(true)))
        .await
        .unwrap();

    assert_b_intact(&world, &mut b, &before).await;

    // B's own token can do it all (the refusals above were about A).
    let purged = b
        .invalidate(invalidate(
            B,
            Target::Tags(TagList {
                tags: vec!["shared".into()],
            }),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged.affected, B_KEYS as u64, "{purged:?}");
}

#[tokio::test]
async fn rights_are_per_namespace_and_per_kind_of_operation() {
    let world = Secured::start(|_| {}).await;
    let mut b = world.client(Some(B_TOKEN)).await;
    write_b(&mut b).await;
    let before = world.raw_keys(B).await;
    let mut auditor = world.client(Some(READER_TOKEN)).await;

    let got = auditor.get(get(B, "k0")).await.unwrap().into_inner();
    assert_eq!(got.outcome, Outcome::Hit as i32);
    let write = auditor.set(set(B, "k0", "auditor's", "")).await;
    let status = assert_code(write, Code::PermissionDenied, "a reader's Set");
    assert!(
        status.message().contains("auditor") && status.message().contains("write"),
        "{status:?}"
    );
    let delete = DeleteRequest {
        namespace: B.into(),
        key: "k0".into(),
        attributes: Default::default(),
    };
    assert_code(
        auditor.delete(delete).await,
        Code::PermissionDenied,
        "a reader's Delete",
    );
    let purge = auditor
        .invalidate(invalidate(B, Target::WholeNamespace(true)))
        .await;
    assert_code(purge, Code::PermissionDenied, "a reader's Invalidate");

    // A job is followed only by whoever may invalidate its namespace.
    let job = b
        .invalidate(InvalidateRequest {
            wait_ms: 0,
            ..invalidate(B, Target::Pattern("nothing-matches-*".into()))
        })
        .await
        .unwrap()
        .into_inner();
    let follow = gateway::api::proto::v1::GetInvalidationRequest {
        job_id: job.job_id.clone(),
        wait_ms: 0,
    };
    let status = assert_code(
        world
            .client(Some(A_TOKEN))
            .await
            .get_invalidation(follow.clone())
            .await,
        Code::PermissionDenied,
        "A following B's job",
    );
    assert!(status.message().contains("team-b"), "{status:?}");
    b.get_invalidation(follow).await.unwrap();

    assert_b_intact(&world, &mut b, &before).await;
}

#[tokio::test]
async fn a_tenant_over_its_rate_is_refused_with_nothing_written() {
    const RATE: u32 = 5;
    let world = Secured::start(|config| {
        config.auth.tenants.get_mut("team-a").unwrap().rate_limit = RATE;
        // The auditor may read team-a, to look without spending A's budget.
        config
            .auth
            .tenants
            .get_mut("auditor")
            .unwrap()
            .namespaces
            .insert("team-a".into(), vec![Right::Read]);
    })
    .await;
    let mut a = world.client(Some(A_TOKEN)).await;
    // The burst is one second's worth; far more than that, back to back,
    // cannot all fit in the bucket.
    let mut refused = Vec::new();
    for i in 0..(RATE * 4) {
        match a.set(set("team-a", &format!("r{i}"), "a's", "")).await {
            Ok(answer) => assert!(answer.into_inner().stored),
            Err(status) => refused.push((i, status)),
        }
    }
    assert!(!refused.is_empty(), "20 Sets in a row at 5/s: some refused");
    for (_, status) in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("team-a") && status.message().contains("rate_limit"),
            "{status:?}"
        );
    }
    let mut auditor = world.client(Some(READER_TOKEN)).await;
    for (i, _) in &refused {
        let got = auditor
            .get(get("team-a", &format!("r{i}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            got.outcome,
            Outcome::Miss as i32,
            "refused Set r{i} wrote nothing"
        );
    }
    // Other tenants are not affected by A's limit.
    let mut b = world.client(Some(B_TOKEN)).await;
    for i in 0..(RATE * 4) {
        b.set(set(B, &format!("r{i}"), "b's", "")).await.unwrap();
    }
}
