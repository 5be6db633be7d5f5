//! Read-through with leases through `cachegw-client`, against a running
//! gateway (`scripts/run`): the same as `gateway/examples/read_through_by_hand.rs`,
//! without the protocol by hand.
//!
//! ```sh
//! cargo run -p cachegw-client --example read_through -- http://127.0.0.1:50051
//! CACHEGW_TOKEN=... cargo run -p cachegw-client --example read_through   # auth on
//! ```

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use cachegw_client::Client;
use serde::{Deserialize, Serialize};

/// What the origin computes: any serde type is cached as its JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Report {
    key: String,
    rows: Vec<u64>,
}

/// Origin calls made by this process.
static ORIGIN_CALLS: AtomicU64 = AtomicU64::new(0);

/// The slow, expensive thing the cache protects.
async fn origin(key: &str) -> Result<Report, std::io::Error> {
    ORIGIN_CALLS.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(Report {
        key: key.to_owned(),
        rows: vec![1, 2, 3],
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_owned());
    let mut builder = Client::builder(endpoint).timeout(Duration::from_secs(2));
    if let Ok(token) = std::env::var("CACHEGW_TOKEN") {
        builder = builder.token(token);
    }
    let cache = builder.connect().await?;

    // 100 concurrent readers of one cold key (new each run): the origin runs once.
    let key = format!("report:{}", std::process::id());
    let readers: Vec<_> = (0..100)
        .map(|_| {
            let cache = cache.clone();
            let key = key.clone();
            tokio::spawn(
                async move { cache.get_or_fill("quickstart", &key, || origin(&key)).await },
            )
        })
        .collect();
    for reader in readers {
        let report: Report = reader.await??;
        assert_eq!(report.key, key);
    }
    println!(
        "100 readers served, {} origin call(s)",
        ORIGIN_CALLS.load(Ordering::Relaxed)
    );
    Ok(())
}
