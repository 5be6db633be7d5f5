//! TLS material, read from PEM files: the rustls configuration of the gRPC
//! listeners (`[tls]`: the server's certificate and key, and the CA that
//! client certificates are verified against) and the certificates of
//! `rediss://` connections to Redis (`redis.tls_*`).
//!
//! [`check`] reads every configured file when the config is validated, so a
//! missing file, a file without the PEM it should hold, or a key that does
//! not belong to its certificate stops the gateway at start with the field's
//! name. [`server_config`] and [`redis_client`] build what tonic and redis-rs
//! need from the same files.
//!
//! rustls is built with the ring crypto provider only (no aws-lc-sys C build);
//! it is installed as the process's default, so the tonic and redis-rs code
//! that asks rustls for "the" provider finds it whatever other crates enable.

use std::path::{Path, PathBuf};

use deadpool_redis::redis::{self, ClientTlsConfig, RedisError, TlsCertificates};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::{ClientAuth, Config, RedisConfig, TlsConfig};

/// A configured TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("`{field}` (`{}`) {reason}", path.display())]
pub struct PemError {
    /// The config field naming the file.
    pub field: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

impl PemError {
    fn new(field: &'static str, path: &Path, reason: impl Into<String>) -> Self {
        Self {
            field,
            path: path.to_owned(),
            reason: reason.into(),
        }
    }

    /// The reason, preceded by the file's path (for an error naming the field).
    pub fn reason_with_path(&self) -> String {
        format!("(`{}`) {}", self.path.display(), self.reason)
    }
}

/// Makes ring the process's rustls crypto provider, unless one already is.
pub fn install_crypto_provider() {
    // Err means a provider is installed already: whichever it is, rustls has one.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|err| PemError::new(field, path, format!("cannot be read: {err}")))
}

fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let pem = read(field, path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| PemError::new(field, path, format!("is not valid PEM: {err}")))?;
    if certificates.is_empty() {
        return Err(PemError::new(
            field,
            path,
            "holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)",
        ));
    }
    Ok(certificates)
}

fn private_key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let pem = read(field, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|err| {
        PemError::new(
            field,
            path,
            format!("holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {err}"),
        )
    })
}

/// Checks that the key at `key_path` belongs to the leaf certificate at `cert_path`.
fn key_pair(
    (cert_field, cert_path): (&'static str, &Path),
    (key_field, key_path): (&'static str, &Path),
) -> Result<(), PemError> {
    let chain = certificates(cert_field, cert_path)?;
    let key = private_key(key_field, key_path)?;
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map(|_| ())
        .map_err(|err| {
            PemError::new(
                key_field,
                key_path,
                format!(
                    "cannot be used with the certificate in `{cert_field}` (`{}`): {err}",
                    cert_path.display()
                ),
            )
        })
}

fn trust_anchors(field: &'static str, path: &Path) -> Result<(), PemError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(field, path)? {
        roots.add(certificate).map_err(|err| {
            PemError::new(
                field,
                path,
                format!("holds an unusable CA certificate: {err}"),
            )
        })?;
    }
    Ok(())
}

/// Reads and checks every TLS file `config` names (`[tls]` and `redis.tls_*`).
pub fn check(config: &Config) -> Result<(), PemError> {
    let tls = &config.tls;
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        key_pair(("tls.cert_file", cert), ("tls.key_file", key))?;
    }
    if let Some(ca) = &tls.client_ca_file {
        trust_anchors("tls.client_ca_file", ca)?;
    }
    let redis = &config.redis;
    if let Some(ca) = &redis.tls_ca_file {
        trust_anchors("redis.tls_ca_file", ca)?;
    }
    if let (Some(cert), Some(key)) = (&redis.tls_client_cert_file, &redis.tls_client_key_file) {
        key_pair(
            ("redis.tls_client_cert_file", cert),
            ("redis.tls_client_key_file", key),
        )?;
    }
    Ok(())
}

/// The gRPC listeners' TLS configuration; `None` when `[tls]` names no
/// certificate (plaintext).
pub fn server_config(tls: &TlsConfig) -> Result<Option<ServerTlsConfig>, PemError> {
    let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) else {
        return Ok(None);
    };
    install_crypto_provider();
    let identity = Identity::from_pem(read("tls.cert_file", cert)?, read("tls.key_file", key)?);
    let mut server = ServerTlsConfig::new()
        .identity(identity)
        .timeout(tls.handshake_timeout);
    if let Some(ca) = &tls.client_ca_file {
        server = server
            .client_ca_root(Certificate::from_pem(read("tls.client_ca_file", ca)?))
            .client_auth_optional(tls.client_auth() == Some(ClientAuth::Optional));
    }
    Ok(Some(server))
}

/// A redis-rs client for `config.url`. A `rediss://` URL is verified against
/// `redis.tls_ca_file` (the system's roots without it) and presents
/// `redis.tls_client_cert_file` when set. Every connection the gateway makes
/// to Redis comes from a client built here.
pub fn redis_client(config: &RedisConfig) -> redis::RedisResult<redis::Client> {
    redis_client_for(config, &config.url)
}

/// [`redis_client`] for another node (a cluster seed) of the same deployment:
/// same certificates, another URL.
pub fn redis_client_for(config: &RedisConfig, url: &str) -> redis::RedisResult<redis::Client> {
    match redis_certificates(config)? {
        Some(certificates) if url.starts_with("rediss://") => {
            redis::Client::build_with_tls(url, certificates)
        }
        _ => redis::Client::open(url),
    }
}

/// The CA and client certificates configured for `rediss://` connections,
/// if any (none: the system's roots, no client certificate).
pub fn redis_certificates(config: &RedisConfig) -> redis::RedisResult<Option<TlsCertificates>> {
    install_crypto_provider();
    let wants_files = config.tls_ca_file.is_some() || config.tls_client_cert_file.is_some();
    if !config.url.starts_with("rediss://") || !wants_files {
        return Ok(None);
    }
    let read = |field, path: &Path| {
        read(field, path).map_err(|err| {
            RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "cannot read a Redis TLS file",
                err.to_string(),
            ))
        })
    };
    let root_cert = config
        .tls_ca_file
        .as_deref()
        .map(|ca| read("redis.tls_ca_file", ca))
        .transpose()?;
    let client_tls = match (&config.tls_client_cert_file, &config.tls_client_key_file) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read("redis.tls_client_cert_file", cert)?,
            client_key: read("redis.tls_client_key_file", key)?,
        }),
        _ => None,
    };
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}
