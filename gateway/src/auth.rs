//! Who is calling, and what they may do.
//!
//! Every call carries `authorization: Bearer <token>`. The [`Authenticator`]
//! turns the token into a [`Caller`] before the request body is decoded (a
//! tonic interceptor per listener): a tenant, whose rights are granted per
//! namespace and whose request rate may be limited, or an admin, who may use
//! the admin API and nothing else. Tokens are known only by their SHA-256
//! digests: the ones read from files or the environment are hashed at
//! start-up and the plain text is dropped; a presented token is hashed and
//! compared with every known digest in constant time. Tokens are never
//! logged.
//!
//! Authorization happens where the namespace is known, in the services:
//! [`Caller::authorize`]. A request without a caller (a service mounted
//! without its interceptor) is refused, never let through.

use std::{collections::HashMap, num::NonZeroU32, path::Path, sync::Arc};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataMap, MetadataValue, errors::InvalidMetadataValue},
    service::Interceptor,
};

use crate::config::{AuthConfig, Right, TokenSources};

/// Shortest token accepted from a file or the environment.
pub const MIN_TOKEN_BYTES: usize = 16;

/// Why a call was refused (mapped to a gRPC status in `api::status`).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("missing credentials: send the metadata `authorization: Bearer <token>`")]
    Missing,
    /// `authorization` is not `Bearer <token>`.
    #[error("malformed `authorization` metadata: expected `Bearer <token>`")]
    Malformed,
    /// The token is not one the gateway knows.
    #[error("unknown token")]
    Unknown,
    /// A tenant asked for something its grants do not include.
    #[error("tenant `{tenant}` may not {right} namespace `{namespace}`")]
    Denied {
        /// The tenant.
        tenant: Arc<str>,
        /// What it asked for.
        right: Right,
        /// Where.
        namespace: String,
    },
    /// A tenant's token on the admin API.
    #[error("the admin API takes admin tokens; `{0}` holds a data token")]
    NotAdmin(Arc<str>),
    /// An admin token on the data API.
    #[error("admin `{0}` holds an admin token, which grants no data access; use a tenant token")]
    AdminOnData(Arc<str>),
    /// A tenant over its request rate.
    #[error(
        "tenant `{tenant}` is over its rate limit of {rate} requests/s \
         (auth.tenants.{tenant}.rate_limit); retry later"
    )]
    RateLimited {
        /// The tenant.
        tenant: Arc<str>,
        /// Its limit.
        rate: u32,
    },
}

/// Why the tokens could not be loaded at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// A token source is unusable.
    #[error("invalid config: `{field}` {reason}")]
    Source {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A namespace grant: one name, or every name with a prefix.
#[derive(Debug)]
enum NamespaceGrant {
    Exact(String),
    Prefix(String),
}

impl NamespaceGrant {
    fn parse(pattern: &str) -> Self {
        match pattern.strip_suffix('*') {
            Some(prefix) => NamespaceGrant::Prefix(prefix.to_owned()),
            None => NamespaceGrant::Exact(pattern.to_owned()),
        }
    }

    fn covers(&self, namespace: &str) -> bool {
        match self {
            NamespaceGrant::Exact(name) => name == namespace,
            NamespaceGrant::Prefix(prefix) => namespace.starts_with(prefix.as_str()),
        }
    }
}

#[derive(Debug)]
enum Role {
    /// Authentication is off: everything is allowed.
    Anyone,
    Admin,
    Tenant {
        grants: Vec<(NamespaceGrant, Vec<Right>)>,
        limit: Option<(u32, DefaultDirectRateLimiter)>,
    },
}

/// An authenticated caller.
#[derive(Debug)]
pub struct Caller {
    name: Arc<str>,
    role: Role,
}

impl Caller {
    /// The tenant's or admin's name (`-` with authentication off), for logs.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Whether this caller may exercise `right` on `namespace`.
    pub fn authorize(&self, namespace: &str, right: Right) -> Result<(), AuthError> {
        match &self.role {
            Role::Anyone => Ok(()),
            Role::Admin => Err(AuthError::AdminOnData(self.name.clone())),
            Role::Tenant { grants, .. } => {
                let granted = grants
                    .iter()
                    .any(|(grant, rights)| grant.covers(namespace) && rights.contains(&right));
                if granted {
                    Ok(())
                } else {
                    Err(AuthError::Denied {
                        tenant: self.name.clone(),
                        right,
                        namespace: namespace.to_owned(),
                    })
                }
            }
        }
    }

    /// Whether this caller may use the admin API.
    pub fn authorize_admin(&self) -> Result<(), AuthError> {
        match self.role {
            Role::Anyone | Role::Admin => Ok(()),
            Role::Tenant { .. } => Err(AuthError::NotAdmin(self.name.clone())),
        }
    }

    /// Counts one request against the tenant's rate limit.
    fn admit(&self) -> Result<(), AuthError> {
        if let Role::Tenant {
            limit: Some((rate, limiter)),
            ..
        } = &self.role
            && limiter.check().is_err()
        {
            return Err(AuthError::RateLimited {
                tenant: self.name.clone(),
                rate: *rate,
            });
        }
        Ok(())
    }
}

/// The caller a request was authenticated as (put there by the listener's
/// interceptor); a request without one is refused.
pub fn caller<T>(request: &Request<T>) -> Result<Arc<Caller>, Status> {
    request
        .extensions()
        .get::<Arc<Caller>>()
        .cloned()
        .ok_or_else(|| Status::from(AuthError::Missing))
}

/// The known tokens and who they belong to.
pub struct Authenticator {
    /// `None`: authentication is off.
    credentials: Option<Vec<([u8; 32], Arc<Caller>)>>,
    anyone: Arc<Caller>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests are not secrets, but there is nothing to gain from printing them.
        f.debug_struct("Authenticator")
            .field("enabled", &self.enabled())
            .field(
                "credentials",
                &self.credentials.as_ref().map_or(0, Vec::len),
            )
            .finish()
    }
}

/// SHA-256 of `token`, as 64 lowercase hex digits (`cachegw token hash`).
pub fn token_digest_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_hex_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Reads the digests of `sources` (the plain tokens are hashed and dropped).
/// `env` looks up environment variables (a parameter for the tests).
fn load_digests(
    path: &str,
    sources: &TokenSources,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<[u8; 32]>, AuthSetupError> {
    let invalid = |field: &str, reason: String| AuthSetupError::Source {
        field: format!("{path}.{field}"),
        reason,
    };
    let check = |field: &str, origin: &str, token: &str| {
        if token.len() < MIN_TOKEN_BYTES {
            Err(invalid(
                field,
                format!(
                    "{origin} holds a token of {} bytes; tokens must have at least \
                     {MIN_TOKEN_BYTES} (`cachegw token new` makes one)",
                    token.len()
                ),
            ))
        } else {
            Ok(digest(token))
        }
    };
    let mut digests = Vec::new();
    for hex in &sources.token_sha256 {
        let parsed = parse_hex_digest(&hex.to_ascii_lowercase()).ok_or_else(|| {
            invalid(
                "token_sha256",
                "entries must be SHA-256 digests: 64 hex digits".to_owned(),
            )
        })?;
        digests.push(parsed);
    }
    for file in &sources.token_files {
        let origin = format!("`{}`", file.display());
        let text = read_token_file(file).map_err(|err| {
            invalid(
                "token_files",
                format!("names {origin}, which cannot be read: {err}"),
            )
        })?;
        let before = digests.len();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            digests.push(check("token_files", &origin, line)?);
        }
        if digests.len() == before {
            return Err(invalid(
                "token_files",
                format!("names {origin}, which holds no token"),
            ));
        }
    }
    for name in &sources.token_env {
        let origin = format!("the environment variable `{name}`");
        let token = env(name)
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
            .ok_or_else(|| invalid("token_env", format!("names {origin}, which is not set")))?;
        digests.push(check("token_env", &origin, &token)?);
    }
    Ok(digests)
}

fn read_token_file(file: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(file)
}

impl Authenticator {
    /// Loads every token named by `config` (files and environment variables
    /// are read now). Errors name the field.
    pub fn from_config(config: &AuthConfig) -> Result<Self, AuthSetupError> {
        Self::with_env(config, &|name| std::env::var(name).ok())
    }

    fn with_env(
        config: &AuthConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, AuthSetupError> {
        let anyone = Arc::new(Caller {
            name: Arc::from("-"),
            role: Role::Anyone,
        });
        if !config.enabled {
            return Ok(Self {
                credentials: None,
                anyone,
            });
        }
        let mut credentials = Vec::new();
        let mut owners: HashMap<[u8; 32], String> = HashMap::new();
        let mut add = |path: String, caller: Arc<Caller>, digests: Vec<[u8; 32]>| {
            for digest in digests {
                if let Some(other) = owners.insert(digest, path.clone()) {
                    return Err(AuthSetupError::Source {
                        field: path,
                        reason: format!(
                            "shares a token with `{other}`: every token must name one principal"
                        ),
                    });
                }
                credentials.push((digest, Arc::clone(&caller)));
            }
            Ok(())
        };
        for (name, sources) in &config.admins {
            let path = format!("auth.admins.{name}");
            let digests = load_digests(&path, sources, env)?;
            let caller = Arc::new(Caller {
                name: Arc::from(name.as_str()),
                role: Role::Admin,
            });
            add(path, caller, digests)?;
        }
        for (name, tenant) in &config.tenants {
            let path = format!("auth.tenants.{name}");
            let digests = load_digests(&path, &tenant.tokens, env)?;
            let limit = NonZeroU32::new(tenant.rate_limit).map(|rate| {
                let burst = tenant.burst.and_then(NonZeroU32::new).unwrap_or(rate);
                (
                    tenant.rate_limit,
                    RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
                )
            });
            let grants = tenant
                .namespaces
                .iter()
                .map(|(pattern, rights)| (NamespaceGrant::parse(pattern), rights.clone()))
                .collect();
            let caller = Arc::new(Caller {
                name: Arc::from(name.as_str()),
                role: Role::Tenant { grants, limit },
            });
            add(path, caller, digests)?;
        }
        Ok(Self {
            credentials: Some(credentials),
            anyone,
        })
    }

    /// Whether tokens are required.
    pub fn enabled(&self) -> bool {
        self.credentials.is_some()
    }

    /// Tenants and admins known, for the start-up log.
    pub fn principals(&self) -> usize {
        let Some(credentials) = &self.credentials else {
            return 0;
        };
        let mut names: Vec<*const Caller> = credentials
            .iter()
            .map(|(_, caller)| Arc::as_ptr(caller))
            .collect();
        names.sort();
        names.dedup();
        names.len()
    }

    /// Who `metadata`'s bearer token belongs to.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Arc<Caller>, AuthError> {
        let Some(credentials) = &self.credentials else {
            return Ok(Arc::clone(&self.anyone));
        };
        let header = metadata
            .get("authorization")
            .ok_or(AuthError::Missing)?
            .to_str()
            .map_err(|_| AuthError::Malformed)?;
        let token = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Malformed)?;
        let presented = digest(token);
        // Every digest is compared, each in constant time: neither the time
        // nor the branch taken depends on how much of a digest matched.
        let mut found = None;
        for (known, caller) in credentials {
            if bool::from(known.ct_eq(&presented)) {
                found = Some(caller);
            }
        }
        found.cloned().ok_or(AuthError::Unknown)
    }

    /// The data listener's interceptor: authenticates, applies the tenant's
    /// rate limit, and hands the [`Caller`] to the service.
    pub fn data_interceptor(
        self: &Arc<Self>,
    ) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static
    {
        let auth = Arc::clone(self);
        move |mut request: Request<()>| {
            let caller = auth.authenticate(request.metadata())?;
            caller.admit()?;
            request.extensions_mut().insert(caller);
            Ok(request)
        }
    }

    /// The admin listener's interceptor: admin tokens only.
    pub fn admin_interceptor(
        self: &Arc<Self>,
    ) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static
    {
        let auth = Arc::clone(self);
        move |mut request: Request<()>| {
            let caller = auth.authenticate(request.metadata())?;
            caller.authorize_admin()?;
            request.extensions_mut().insert(caller);
            Ok(request)
        }
    }
}

/// A channel whose every call carries a [`BearerToken`] (the load tools').
pub type AuthedChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>;

/// The client side: adds `authorization: Bearer <token>` to every call (the
/// CLI and the load tools use it).
#[derive(Clone, Debug)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// Sends `token`; `None` sends nothing (a gateway with authentication off).
    pub fn new(token: Option<&str>) -> Result<Self, InvalidMetadataValue> {
        token
            .map(|token| format!("Bearer {token}").parse())
            .transpose()
            .map(Self)
    }
}

impl BearerToken {
    /// The token of [`client_token`].
    pub fn from_file_or_env(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let token = client_token(file)?;
        Self::new(token.as_deref()).map_err(|_| {
            anyhow::anyhow!("the token has characters that cannot be sent as metadata")
        })
    }
}

/// The token a command-line client sends: the contents of `file`
/// (`--token-file`), else `$CACHEGW_TOKEN`, else none.
pub fn client_token(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let token = match file {
        Some(file) => Some(
            std::fs::read_to_string(file)
                .map_err(|err| {
                    anyhow::anyhow!("cannot read --token-file `{}`: {err}", file.display())
                })?
                .trim()
                .to_owned(),
        ),
        None => std::env::var("CACHEGW_TOKEN").ok(),
    };
    Ok(token.filter(|token| !token.is_empty()))
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantConfig;

    const SHOP_TOKEN: &str = "shop-token-0123456789";
    const OPS_TOKEN: &str = "ops-token-0123456789";

    fn config() -> AuthConfig {
        let mut config = AuthConfig::default();
        config.admins.insert(
            "ops".into(),
            TokenSources {
                token_sha256: vec![token_digest_hex(OPS_TOKEN).to_uppercase()],
                ..Default::default()
            },
        );
        config.tenants.insert(
            "shop".into(),
            TenantConfig {
                tokens: TokenSources {
                    token_env: vec!["SHOP_TOKEN".into()],
                    ..Default::default()
                },
                namespaces: [
                    ("shop".to_owned(), vec![Right::Read, Right::Write]),
                    ("shop-*".to_owned(), vec![Right::Invalidate]),
                ]
                .into(),
                rate_limit: 0,
                burst: None,
            },
        );
        config
    }

    fn env(name: &str) -> Option<String> {
        (name == "SHOP_TOKEN").then(|| format!("  {SHOP_TOKEN}\n"))
    }

    fn bearer(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", value.parse().unwrap());
        metadata
    }

    #[test]
    fn tokens_name_their_principal_and_grants_are_exact_or_prefixes() {
        let auth = Authenticator::with_env(&config(), &env).unwrap();
        assert_eq!(auth.principals(), 2);
        let shop = auth
            .authenticate(&bearer(&format!("Bearer {SHOP_TOKEN}")))
            .unwrap();
        assert_eq!(&**shop.name(), "shop");
        shop.authorize("shop", Right::Read).unwrap();
        shop.authorize("shop", Right::Write).unwrap();
        shop.authorize("shop-eu", Right::Invalidate).unwrap();
        for (namespace, right) in [
            ("shop", Right::Invalidate),
            ("shop-eu", Right::Read),
            ("shopx", Right::Read),
            ("sh", Right::Read),
            ("other", Right::Read),
            // A Cyrillic `о`: not the same name.
            ("sh\u{043e}p", Right::Read),
        ] {
            assert!(
                matches!(
                    shop.authorize(namespace, right),
                    Err(AuthError::Denied { .. })
                ),
                "{namespace} {right}"
            );
        }
        assert_eq!(
            shop.authorize_admin(),
            Err(AuthError::NotAdmin(Arc::from("shop")))
        );

        let ops = auth
            .authenticate(&bearer(&format!("bearer {OPS_TOKEN}")))
            .unwrap();
        ops.authorize_admin().unwrap();
        assert!(matches!(
            ops.authorize("shop", Right::Read),
            Err(AuthError::AdminOnData(_))
        ));
    }

    #[test]
    fn bad_credentials_are_told_apart() {
        let auth = Authenticator::with_env(&config(), &env).unwrap();
        assert_eq!(
            auth.authenticate(&MetadataMap::new()).unwrap_err(),
            AuthError::Missing
        );
        for malformed in [SHOP_TOKEN, "Basic abc", "Bearer ", "Bearer"] {
            assert_eq!(
                auth.authenticate(&bearer(malformed)).unwrap_err(),
                AuthError::Malformed,
                "{malformed}"
            );
        }
        assert_eq!(
            auth.authenticate(&bearer("Bearer shop-token-0123456788"))
                .unwrap_err(),
            AuthError::Unknown
        );
    }

    #[test]
    fn sources_that_cannot_be_used_stop_start_up_naming_the_field() {
        let unset = |_: &str| None;
        let err = Authenticator::with_env(&config(), &unset).unwrap_err();
        assert!(
            err.to_string().contains("auth.tenants.shop.token_env")
                && err.to_string().contains("SHOP_TOKEN"),
            "{err}"
        );

        let short = |_: &str| Some("short".to_owned());
        let err = Authenticator::with_env(&config(), &short).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");

        let mut shared = config();
        shared.admins.get_mut("ops").unwrap().token_sha256 = vec![token_digest_hex(SHOP_TOKEN)];
        let err = Authenticator::with_env(&shared, &env).unwrap_err();
        assert!(err.to_string().contains("shares a token"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# rotated 2026-12-01\n\nops-token-from-a-file-1\n").unwrap();
        let mut from_file = config();
        from_file.admins.get_mut("ops").unwrap().token_files = vec![file.clone()];
        let auth = Authenticator::with_env(&from_file, &env).unwrap();
        let ops = auth
            .authenticate(&bearer("Bearer ops-token-from-a-file-1"))
            .unwrap();
        assert_eq!(&**ops.name(), "ops");
        std::fs::write(&file, "# nothing here\n").unwrap();
        let err = Authenticator::with_env(&from_file, &env).unwrap_err();
        assert!(err.to_string().contains("holds no token"), "{err}");
    }

    #[test]
    fn a_tenant_over_its_rate_is_refused_until_the_bucket_refills() {
        let mut limited = config();
        let shop = limited.tenants.get_mut("shop").unwrap();
        shop.rate_limit = 1;
        shop.burst = Some(3);
        let auth = Arc::new(Authenticator::with_env(&limited, &env).unwrap());
        let mut intercept = auth.data_interceptor();
        let request = || {
            let mut request = Request::new(());
            *request.metadata_mut() = bearer(&format!("Bearer {SHOP_TOKEN}"));
            request
        };
        for _ in 0..3 {
            intercept(request()).unwrap();
        }
        let refused = intercept(request()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("rate_limit"),
            "{}",
            refused.message()
        );
    }

    #[test]
    fn with_authentication_off_anyone_may_do_anything_but_only_when_said() {
        let off = AuthConfig {
            enabled: false,
            ..Default::default()
        };
        let auth = Authenticator::from_config(&off).unwrap();
        assert!(!auth.enabled());
        let anyone = auth.authenticate(&MetadataMap::new()).unwrap();
        anyone.authorize("anything", Right::Invalidate).unwrap();
        anyone.authorize_admin().unwrap();
    }
}
