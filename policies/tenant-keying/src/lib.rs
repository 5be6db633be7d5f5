//! `tenant-keying`: one entry per resource however the client spells its key, one variant per
//! value of the attributes the response depends on, nothing stored on `no-store`.
//!
//! - The storage key is [`normalize_key`] of the client's key (trimmed, lower-cased, URL query
//!   parameters sorted, fragment dropped), followed by `|{name}={value}` for each attribute named
//!   in `vary`, in config order. Values are trimmed and lower-cased, with spaces after commas
//!   removed; `%`, `|` and `=` in them are percent-escaped; an absent attribute is an empty value.
//!   So `/Products?b=2&a=1` and `/products?a=1&b=2` with `accept-language: en-US` both become
//!   `/products?a=1&b=2|accept-language=en-us`.
//! - With `vary` set, written entries are tagged `variants:{normalised key}` (a Get, which writes
//!   nothing, gets no tag: the gateway would drop it) and a Delete also
//!   invalidates that tag, removing every variant of the resource.
//! - A Get or Set whose `cache-control` attribute has the `no-store` directive bypasses the cache.
//!
//! Config: `{"vary": ["accept-language"]}` (optional; attribute names, matched ignoring case).

#![forbid(unsafe_code)]

use cachegw_policy::{
    Decision, Operation, Policy, PolicyError, Request, config, normalize_key, tag,
};
use serde::Deserialize;

/// The policy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantKeying {
    /// Attributes whose values select a variant of the entry.
    #[serde(default)]
    vary: Vec<String>,
}

impl Policy for TenantKeying {
    fn from_config(config: &[u8]) -> Result<Self, PolicyError> {
        let mut policy: Self = config::from_json(config)?;
        for name in &mut policy.vary {
            *name = name.trim().to_ascii_lowercase();
            if name.is_empty() {
                return Err(PolicyError::new("`vary` names must not be empty"));
            }
        }
        let mut seen = policy.vary.clone();
        seen.sort();
        if let Some(pair) = seen.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(PolicyError::new(format!(
                "`vary` names {:?} twice",
                pair[0]
            )));
        }
        Ok(policy)
    }

    fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
        if matches!(req.op(), Operation::Get | Operation::Set) && has_no_store(req) {
            return Ok(Decision::bypass());
        }
        let base = normalize_key(req.key());
        let mut storage_key = base.clone();
        for name in &self.vary {
            storage_key.push('|');
            storage_key.push_str(name);
            storage_key.push('=');
            storage_key.push_str(&variant_value(req.attr(name).unwrap_or("")));
        }
        let decision = Decision::cache(storage_key);
        // A Get writes nothing, so the gateway drops a Get decision's tags (docs/POLICY_ABI.md):
        // none to build.
        if self.vary.is_empty() || matches!(req.op(), Operation::Get) {
            return Ok(decision);
        }
        let variants = tag(["variants", &base]);
        Ok(match req.op() {
            Operation::Delete => decision.invalidate_tag(variants),
            _ => decision.tag(variants),
        })
    }
}

fn has_no_store(req: &Request) -> bool {
    req.attr("cache-control").is_some_and(|directives| {
        directives.split(',').any(|directive| {
            let name = directive
                .split_once('=')
                .map_or(directive, |(name, _)| name);
            name.trim().eq_ignore_ascii_case("no-store")
        })
    })
}

fn variant_value(raw: &str) -> String {
    let mut value = String::with_capacity(raw.len());
    for (i, part) in raw.trim().split(',').enumerate() {
        if i > 0 {
            value.push(',');
        }
        for c in part.trim().chars().flat_map(char::to_lowercase) {
            match c {
                '%' => value.push_str("%25"),
                '|' => value.push_str("%7C"),
                '=' => value.push_str("%3D"),
                c => value.push(c),
            }
        }
    }
    value
}

cachegw_policy::export_policy!(TenantKeying);

#[cfg(test)]
mod tests {
    use super::*;
    use cachegw_policy::testing;

    const VARY_LANGUAGE: &str = r#"{"vary":["accept-language"]}"#;

    fn key_for(req: testing::RequestBuilder) -> String {
        req.decide::<TenantKeying>()
            .unwrap()
            .storage_key()
            .to_owned()
    }

    #[test]
    fn spellings_of_one_url_share_an_entry() {
        let a = key_for(testing::request(
            Operation::Get,
            "shop",
            "/Products?b=2&a=1",
        ));
        let b = key_for(testing::request(
            Operation::Get,
            "shop",
            " /products?a=1&b=2#reviews",
        ));
        assert_eq!(a, "/products?a=1&b=2");
        assert_eq!(a, b);
    }

    #[test]
    fn varies_on_configured_attributes() {
        let get = |language: &str| {
            key_for(
                testing::request(Operation::Get, "shop", "/products?b=2&a=1")
                    .config(VARY_LANGUAGE)
                    .attr("Accept-Language", language),
            )
        };
        assert_eq!(get("en-US"), "/products?a=1&b=2|accept-language=en-us");
        assert_eq!(get(" en-us "), get("EN-US"));
        assert_ne!(get("en-US"), get("de-DE"));
        assert_eq!(
            get("en-US, en;q=0.9"),
            "/products?a=1&b=2|accept-language=en-us,en;q%3D0.9"
        );
        let absent = key_for(testing::request(Operation::Get, "shop", "/p").config(VARY_LANGUAGE));
        assert_eq!(absent, "/p|accept-language=");
    }

    #[test]
    fn several_vary_attributes_follow_config_order() {
        let key = key_for(
            testing::request(Operation::Get, "shop", "/p")
                .config(r#"{"vary":["X-Currency","accept-language"]}"#)
                .attr("accept-language", "fr")
                .attr("x-currency", "EUR|x=1"),
        );
        assert_eq!(key, "/p|x-currency=eur%7Cx%3D1|accept-language=fr");
    }

    #[test]
    fn no_store_bypasses_reads_and_writes() {
        for op in [Operation::Get, Operation::Set] {
            for header in ["no-store", "private, No-Store", "no-store=\"x\""] {
                let decision = testing::request(op, "shop", "/p")
                    .attr("cache-control", header)
                    .decide::<TenantKeying>()
                    .unwrap();
                assert!(decision.is_bypass(), "{op:?} {header}");
            }
        }
        for header in ["no-cache", "max-age=60", "no-storage"] {
            let decision = testing::request(Operation::Get, "shop", "/p")
                .attr("cache-control", header)
                .decide::<TenantKeying>()
                .unwrap();
            assert!(!decision.is_bypass(), "{header}");
        }
        let delete = testing::request(Operation::Delete, "shop", "/p")
            .attr("cache-control", "no-store")
            .decide::<TenantKeying>()
            .unwrap();
        assert!(!delete.is_bypass(), "a Delete still deletes");
    }

    #[test]
    fn variants_are_tagged_and_a_delete_removes_them_all() {
        let set = testing::request(Operation::Set, "shop", "/P?b=1&a=2")
            .config(VARY_LANGUAGE)
            .attr("accept-language", "de");
        let set = set.decide::<TenantKeying>().unwrap();
        assert_eq!(set.tags(), ["variants:/p?a=2&b=1"]);
        let delete =
            testing::request(Operation::Delete, "shop", "/p?a=2&b=1").config(VARY_LANGUAGE);
        let delete = delete.decide::<TenantKeying>().unwrap();
        assert_eq!(delete.invalidated_tags(), ["variants:/p?a=2&b=1"]);
        // A Get writes nothing: the gateway would drop a tag, so none is built.
        let get = testing::request(Operation::Get, "shop", "/p?a=2&b=1").config(VARY_LANGUAGE);
        let get = get.decide::<TenantKeying>().unwrap();
        assert_eq!(get.storage_key(), "/p?a=2&b=1|accept-language=");
        assert!(get.tags().is_empty());
        let plain = testing::request(Operation::Set, "shop", "/p")
            .decide::<TenantKeying>()
            .unwrap();
        assert!(plain.tags().is_empty());
    }

    #[test]
    fn rejects_bad_configs() {
        assert!(
            testing::init::<TenantKeying>(br#"{"vary":[""]}"#)
                .unwrap_err()
                .contains("must not be empty")
        );
        assert!(
            testing::init::<TenantKeying>(br#"{"vary":["a","A"]}"#)
                .unwrap_err()
                .contains("twice")
        );
        assert!(
            testing::init::<TenantKeying>(br#"{"varry":[]}"#)
                .unwrap_err()
                .contains("unknown field")
        );
        assert_eq!(
            testing::init::<TenantKeying>(VARY_LANGUAGE.as_bytes()),
            Ok(())
        );
    }

    #[test]
    fn round_trips_through_the_wasm_glue() {
        let wire = testing::request(Operation::Get, "shop", "/p")
            .attr("cache-control", "no-store")
            .round_trip::<TenantKeying>()
            .decision();
        assert!(wire.bypass);
        assert_eq!(wire.storage_key, "/p");
    }

    #[test]
    fn decisions_read_neither_the_clock_nor_the_value_size() {
        // So the gateway reuses every decision for identical requests while the binding lasts.
        for op in [Operation::Get, Operation::Set, Operation::Delete] {
            for key in ["/Products?b=2&a=1", "/cart"] {
                let reuse = testing::request(op, "pages", key)
                    .attr("field", "email")
                    .attr("accept-language", "de")
                    .value_size(2_048)
                    .config_json(r#"{"vary":["accept-language"]}"#)
                    .round_trip::<TenantKeying>()
                    .reuse();
                assert!(
                    !reuse.read_clock && !reuse.read_value_size,
                    "{op:?} {key}: {reuse:?}"
                );
                assert_eq!(reuse.reusable_for_ms, 0);
            }
        }
    }
}
