//! # cachegw
//!
//! A gRPC cache gateway: services call it instead of talking to Redis
//! themselves, and the gateway pools connections, encodes values in a typed
//! envelope, applies per-namespace TTLs and limits, and degrades gracefully
//! when the store is unavailable.
//!
//! ## Layout
//!
//! Data flows one way, from the edge to the store:
//!
//! - [`api`]: tonic services, protobuf <-> domain conversion and the one
//!   mapping from domain errors to gRPC statuses.
//! - [`cache`]: the read and write paths: namespaces, limits, the value
//!   envelope, freshness, time budgets and degraded answers; invalidation
//!   jobs.
//! - [`policy`]: caching decisions (storage key, TTL) per request.
//! - [`store`]: the storage trait and its Redis and in-process implementations:
//!   key layout, namespace generations, tag indexes.
//! - [`auth`]: who is calling (API tokens, tenants, admins) and what they
//!   may do per namespace; per-tenant rate limits.
//! - [`config`]: the configuration struct, merged from file, environment and
//!   flags in one place.
//! - [`stats`]: the last minute's requests per namespace, for the Stats RPC.
//! - [`telemetry`]: logs (text or JSON) and optional OpenTelemetry export.
//! - [`tls`]: TLS for the gRPC listeners and for `rediss://`, from PEM files.
//! - [`server`]: assembling the above into a running gateway with health,
//!   reflection and graceful shutdown.
//! - [`bench`]: the load tool behind `cachegw bench`.
//! - [`bench_invalidation`]: `cachegw bench-invalidation`, invalidation wall
//!   time and its effect on concurrent reads.
//! - [`bench_stampede`]: `cachegw bench-stampede`, origin calls per expiry of
//!   a hot key with and without leases.
//! - [`admin_cli`]: `cachegw policy push|list|bind|rollback --remote`, over the
//!   `PolicyAdmin` API.
//! - [`data_cli`]: `cachegw get|set|del|invalidate --remote`, over the data API.
//! - [`policy_author`]: `cachegw policy new|build`, a policy crate of one's
//!   own from nothing to a checked module.
//! - [`cli_output`]: what the subcommands print, ending quietly when the
//!   reader of a pipe has gone.

// No `unsafe` but the system calls of policy::engine's instance recycling
// (a PAGEMAP_SCAN ioctl, a userfaultfd and its ioctls), where it is allowed
// by name.
#![deny(unsafe_code)]

pub mod admin_cli;
pub mod api;
pub mod auth;
pub mod bench;
pub mod bench_invalidation;
pub mod bench_stampede;
pub mod cache;
pub mod cli_output;
pub mod config;
pub mod data_cli;
pub mod policy;
pub mod policy_author;
pub mod server;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use config::Config;
pub use server::{Gateway, GatewayError, MetricsHandle};
