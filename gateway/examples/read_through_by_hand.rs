//! Read-through with leases: the client side of cachegw's stampede
//! protection, against a running gateway (`scripts/run`).
//!
//! ```sh
//! cargo run -p gateway --example read_through_by_hand -- http://127.0.0.1:50051
//! ```
//!
//! Each call of [`read_through`] returns the cached value, or computes it
//! with the origin — and of all the callers that miss at the same moment, on
//! every gateway, only one calls the origin; the others wait for its fill.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use gateway::api::proto::v1::{
    GetRequest, LeaseRequest, LeaseState, LeaseWrite, Outcome, ReleaseLeaseRequest, SetRequest,
    cache_client::CacheClient,
};
use tonic::transport::Channel;

/// Origin calls made by this process.
static ORIGIN_CALLS: AtomicU64 = AtomicU64::new(0);

/// The slow, expensive thing the cache protects.
async fn origin(key: &str) -> Result<Vec<u8>, String> {
    ORIGIN_CALLS.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(format!("computed value of {key}").into_bytes())
}

/// Returns the value of `key` in `namespace`: from the cache, from another
/// caller's fill, or from the origin (then cached, unless an invalidation
/// came first).
async fn read_through(
    cache: &mut CacheClient<Channel>,
    namespace: &str,
    key: &str,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let got = cache
        .get(GetRequest {
            namespace: namespace.into(),
            key: key.into(),
            // Take a stale value at once while someone else refreshes.
            allow_stale: true,
            // Wait up to 1 s for another caller's fill rather than stampede.
            lease: Some(LeaseRequest {
                wait_ms: 1_000,
                ttl_ms: 0,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let lease = LeaseState::try_from(got.lease)?;
    let usable = got.outcome == Outcome::Hit as i32 || got.outcome == Outcome::Stale as i32;
    if lease != LeaseState::Granted {
        if usable {
            // HIT, COALESCED (someone else's fill) or STALE_SERVED.
            return Ok(got.value.to_vec());
        }
        // WAIT / TIMED_OUT (the filler is slow or gone) or a degraded answer:
        // the origin is the source of truth. Don't write: the lease holder will.
        return Ok(origin(key).await?);
    }
    // We hold the lease. On a HIT or STALE this is a refresh: the value we
    // have is good to serve meanwhile (in a server, refresh in the background).
    match origin(key).await {
        Ok(value) => {
            let set = cache
                .set(SetRequest {
                    namespace: namespace.into(),
                    key: key.into(),
                    value: value.clone().into(),
                    lease_token: got.lease_token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if set.lease == LeaseWrite::Voided as i32 {
                // Invalidated while we computed: our value may be stale, so it
                // was not cached. It is still what the origin just said.
                eprintln!("{key}: fill voided by an invalidation");
            }
            Ok(value)
        }
        Err(err) => {
            // Give the lease back so the next caller can try at once ...
            cache
                .release_lease(ReleaseLeaseRequest {
                    namespace: namespace.into(),
                    key: key.into(),
                    lease_token: got.lease_token,
                    ..Default::default()
                })
                .await?;
            // ... and serve the stale value if there is one (stale-if-error).
            if got.outcome == Outcome::Stale as i32 {
                return Ok(got.value.to_vec());
            }
            Err(err.into())
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_owned());
    let cache = CacheClient::connect(address).await?;
    // 100 concurrent readers of one cold key (new each run): the origin runs once.
    let key = format!("report:{}", std::process::id());
    let readers: Vec<_> = (0..100)
        .map(|_| {
            let mut cache = cache.clone();
            let key = key.clone();
            tokio::spawn(async move {
                read_through(&mut cache, "quickstart", &key)
                    .await
                    .map_err(|err| err.to_string())
            })
        })
        .collect();
    for reader in readers {
        let value = reader.await??;
        assert_eq!(value, format!("computed value of {key}").into_bytes());
    }
    println!(
        "100 readers served, {} origin call(s); cachegw_leases_total on /metrics says how",
        ORIGIN_CALLS.load(Ordering::Relaxed)
    );
    Ok(())
}
