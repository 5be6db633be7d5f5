//! A typed Rust client for cachegw, the gRPC cache
//! gateway: one reused connection, deadlines, retries on `UNAVAILABLE` with
//! backoff, serde-typed values, and [`Client::get_or_fill`], read-through
//! with leases — of all the callers that miss a key at once, one runs the
//! fill and the others wait for its value, and a fill that races an
//! invalidation is never written back.
//!
//! Values are stored as their JSON (`serde_json`), with content type
//! `application/json` ([`CONTENT_TYPE`]): any `Serialize` value can be
//! written, and read back as any `Deserialize` type its JSON fits.
//!
//! ```no_run
//! use cachegw_client::{Client, Lookup};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! struct Profile {
//!     name: String,
//!     visits: u64,
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = Client::builder("http://127.0.0.1:50051")
//!     .token("my-tenant-token")
//!     .connect()
//!     .await?;
//!
//! // Read-through: on a miss, exactly one caller loads the profile.
//! let profile: Profile = cache
//!     .get_or_fill("users", "profile:42", || async {
//!         // The slow origin (a database, a service...).
//!         Ok::<_, std::io::Error>(Profile { name: "Ada".into(), visits: 1 })
//!     })
//!     .await?;
//!
//! // Plain calls.
//! cache.set("users", "profile:7", &Profile { name: "Grace".into(), visits: 3 }).await?;
//! if let Lookup::Hit(profile) = cache.get::<Profile>("users", "profile:7").await? {
//!     println!("{profile:?}");
//! }
//! cache.invalidate_keys("users", ["profile:42"]).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`Client`] and [`ClientBuilder`] (`client`): the connection, the token,
//!   deadlines, retries ([`RetryPolicy`], `retry`) and the plain calls.
//! - `fill`: [`Client::get_or_fill`] and its [`FillOptions`], [`Served`] and
//!   [`Fill`] states.
//! - `answers`: what the gateway answered as explicit states ([`Lookup`],
//!   [`Write`], [`Removal`], [`Invalidation`]).
//! - [`Error`] (`error`): the one error type.
//! - [`proto`]: the generated `cachegw.v1` messages and client, for the calls
//!   this crate does not wrap (`MGet`, `MSet`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod answers;
mod client;
mod error;
mod fill;
mod retry;

pub use answers::{Attributes, Invalidate, Invalidation, JobProgress, Lookup, Removal, Write};
pub use client::{CONTENT_TYPE, Client, ClientBuilder, GetOptions};
pub use error::{Error, Result};
pub use fill::{Fill, FillOptions, Filled, Served};
pub use retry::RetryPolicy;
/// gRPC status codes, as [`Error::code`] reports them.
pub use tonic::Code;
/// TLS settings for [`ClientBuilder::tls`], and the CA certificates and
/// client identity (for mutual TLS) they take.
pub use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// Generated protobuf messages and the raw tonic client of `cachegw.v1`
/// (from `proto/cachegw/v1/cache.proto`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("cachegw.v1");
}
