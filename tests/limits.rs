//! Every configurable limit, crossed: the documented status, a message that
//! names the setting, and nothing written. The limits tested next to their
//! feature are listed here so the table is complete:
//!
//! | limit | status | test |
//! |---|---|---|
//! | `limits.max_key_bytes` | INVALID_ARGUMENT | data_path `bad_input_is_rejected_precisely_and_writes_nothing` |
//! | `namespaces.*.max_value_bytes` | RESOURCE_EXHAUSTED | data_path, same test |
//! | `limits.max_batch_items` | RESOURCE_EXHAUSTED | data_path `oversized_batches_are_refused_whole` |
//! | `invalidation.max_targets` | RESOURCE_EXHAUSTED | invalidation `bad_invalidations_are_refused_precisely` |
//! | `auth.tenants.*.rate_limit` | RESOURCE_EXHAUSTED | auth `a_tenant_over_its_rate_is_refused_with_nothing_written` |
//! | `server.max_request_bytes` | OUT_OF_RANGE | here |
//! | `invalidation.max_running_jobs` | RESOURCE_EXHAUSTED | here |
//! | `policy.max_module_bytes` | RESOURCE_EXHAUSTED | here |
//! | `limits.max_lease_ttl`, `limits.max_lease_wait` | INVALID_ARGUMENT | leases `bad_lease_requests_are_refused_precisely` |
//! | `policy.memory_limit_bytes`, `policy.deadline` | fallback, counted | policies `hostile_*` |

mod support;

use std::time::Duration;

use gateway::{
    api::proto::v1::{
        InvalidateRequest, ListPoliciesRequest, MSetRequest, Outcome, PutPolicyRequest, SetRequest,
        invalidate_request::Target,
    },
    config::StoreKind,
};
use support::{Backend, RedisServer, TestGateway, World, policy_module, test_config};
use tonic::Code;

const NS: &str = "limits";

fn set(key: &str, value: Vec<u8>) -> SetRequest {
    SetRequest {
        namespace: NS.into(),
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_request_over_max_request_bytes_is_refused_before_decoding() {
    let mut world = World::start_with(Backend::Memory, |config| {
        config.server.max_request_bytes = 64 * 1024;
        config.default_namespace.settings.max_value_bytes = 32 * 1024;
    })
    .await;
    // A batch of values each within max_value_bytes, together over the
    // request limit.
    let items = (0..4)
        .map(|i| set(&format!("k{i}"), vec![7; 30 * 1024]))
        .collect();
    let status = world
        .client
        .m_set(MSetRequest { items })
        .await
        .expect_err("a 120 KiB request over a 64 KiB limit");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("65536"), "{status:?}");
    for i in 0..4 {
        assert_eq!(
            world.get(NS, &format!("k{i}")).await.outcome,
            Outcome::Miss as i32,
            "nothing of the refused request was written"
        );
    }
    // Under the limit, the same call works.
    let items = (0..1)
        .map(|i| set(&format!("k{i}"), vec![7; 30 * 1024]))
        .collect();
    world.client.m_set(MSetRequest { items }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_jobs_beyond_max_running_jobs_are_refused() {
    let redis = RedisServer::start().await;
    let mut config = test_config(StoreKind::Redis, Some(redis.url()));
    config.invalidation.max_running_jobs = 1;
    // The running job waits on a paused Redis: give its commands time.
    config.redis.response_timeout = Duration::from_secs(10);
    let gateway = TestGateway::start(config).await;
    let mut client = gateway.client().await;
    for key in ["a:1", "b:1"] {
        client.set(set(key, b"v".to_vec())).await.unwrap();
    }
    // Redis holds back writes (the first job's UNLINK) for two seconds: that
    // job is certainly still running when the second is asked for.
    let mut connection = redis.connection().await;
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .arg("WRITE")
        .exec_async(&mut connection)
        .await
        .unwrap();
    let pattern = |glob: &str| InvalidateRequest {
        namespace: NS.into(),
        target: Some(Target::Pattern(glob.into())),
        wait_ms: 1,
        ..Default::default()
    };
    let first = client
        .invalidate(pattern("a:*"))
        .await
        .unwrap()
        .into_inner();
    let status = client
        .invalidate(pattern("b:*"))
        .await
        .expect_err("a second job while one runs, with max_running_jobs = 1");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("invalidation.max_running_jobs"),
        "{status:?}"
    );
    // The refused job did nothing; the first one finishes.
    let done = client
        .get_invalidation(gateway::api::proto::v1::GetInvalidationRequest {
            job_id: first.job_id,
            wait_ms: 10_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.affected, 1, "{done:?}");
    let b = client
        .get(gateway::api::proto::v1::GetRequest {
            namespace: NS.into(),
            key: "b:1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        b.outcome,
        Outcome::Hit as i32,
        "the refused job removed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_over_max_module_bytes_is_refused_and_not_kept() {
    let module = std::fs::read(policy_module("ttl-by-route")).unwrap();
    let limit = module.len() - 1;
    let world = World::start_with(Backend::Memory, |config| {
        config.policy.max_module_bytes = limit;
    })
    .await;
    let mut admin = world.gateway.admin().await;
    let status = admin
        .put_policy(PutPolicyRequest {
            name: "ttl-by-route".into(),
            module: module.clone().into(),
        })
        .await
        .expect_err("a module one byte over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("policy.max_module_bytes")
            && status.message().contains(&module.len().to_string()),
        "{status:?}"
    );
    let listed = admin
        .list_policies(ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.versions.is_empty() && listed.bindings.is_empty(),
        "nothing kept: {listed:?}"
    );
}
