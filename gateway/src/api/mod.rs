//! The gRPC edge: generated protobuf code, conversion between protobuf and
//! the cache's domain types, the one mapping from domain errors to `Status`,
//! and the tonic service implementations.

mod admin_service;
mod cache_service;
pub mod codec;
mod convert;
mod redis_info;
mod status;

use std::time::Duration;

pub use self::admin_service::AdminApi;
pub use self::cache_service::CacheApi;

/// Generated protobuf and gRPC code. Nothing outside `api` (and the policy
/// ABI glue) should need these types.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    /// The client-facing API, `cachegw.v1`.
    pub mod v1 {
        tonic::include_proto!("cachegw.v1");
    }
    /// The host <-> policy contract, `cachegw.policy.v1`.
    pub mod policy {
        /// The package itself (the nesting generated cross-package paths expect).
        pub mod v1 {
            tonic::include_proto!("cachegw.policy.v1");
        }
        pub use v1::*;
    }
    /// Encoded descriptors of every cachegw proto, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("cachegw_descriptor");
}

/// The client's remaining time, from the `grpc-timeout` request header.
pub(crate) fn client_deadline<T>(request: &tonic::Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(value)
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (H M S m u n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts_per_the_spec() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789m", "12x", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
