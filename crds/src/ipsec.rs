//! The IPsec contract between the operator (key manager) and the node agents.
//!
//! ```text
//!  operator ──writes──► Secret meshlet-system/meshlet-ipsec-key   (names::IPSEC_KEY_SECRET)
//!     │                   "<policy>.<spi>.key"        pre-shared key (≥ 16 bytes)
//!     │                   "<policy>.<spi>.salt"       HKDF salt
//!     │                   "<policy>.<spi>.algorithm"  ESP algorithm name of that generation
//!     └──writes──► IPsecPolicy.status.activeSPI        generation every node sends with
//!  agent ──reads both──► inbound SAs for every published generation of its policy,
//!                        outbound on activeSPI ──► NodeEnrollment.status.ipsec (the acks)
//! ```
//!
//! The generations published in the Secret are exactly those nodes must hold inbound SAs for:
//! `Stable {a}`, `Installing {a, b}`, `Switching {a, b}`, `Retiring {b}`. A node whose view
//! is inconsistent (activeSPI not among the published generations, e.g. one watch is ahead of
//! the other) keeps what it has until the two agree.
//!
//! A node belongs to at most one policy: the oldest (creation time, then name) whose
//! `nodeSelector` matches its labels. [`policy_for_node`] is that rule, shared by both sides.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::ByteString;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use crate::v1alpha1::{IPsecAlgorithm, IPsecPolicy};

/// Lowest key generation (SPI in the API); 0..=255 are reserved by RFC 4303.
pub const FIRST_SPI: u32 = 0x100;
/// Highest key generation: the agent carries it in the low 16 bits of its reqids.
pub const LAST_SPI: u32 = 0xffff;
/// Shortest pre-shared key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// Length of a generated pre-shared key, in bytes (256 bits).
pub const GENERATED_KEY_LEN: usize = 32;
/// Length of a generated salt, in bytes.
pub const GENERATED_SALT_LEN: usize = 16;

/// Data key a user-supplied key Secret (`spec.keySecretRef`) holds its pre-shared key under.
pub const USER_KEY_FIELD: &str = "key";

/// The generation after `spi`, wrapping from [`LAST_SPI`] to [`FIRST_SPI`].
pub fn next_spi(spi: u32) -> u32 {
    if (FIRST_SPI..LAST_SPI).contains(&spi) {
        spi + 1
    } else {
        FIRST_SPI
    }
}

/// One field of a published key generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Field {
    /// The pre-shared key.
    Key,
    /// The HKDF salt.
    Salt,
    /// The ESP algorithm name.
    Algorithm,
}

impl Field {
    /// Suffix of the Secret data key.
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Key => "key",
            Field::Salt => "salt",
            Field::Algorithm => "algorithm",
        }
    }
}

/// Secret data key of `field` of generation `spi` of `policy`.
pub fn entry_name(policy: &str, spi: u32, field: Field) -> String {
    format!("{policy}.{spi}.{}", field.as_str())
}

/// Splits a Secret data key into policy, generation and field; `None` when it is not ours.
pub fn parse_entry(name: &str) -> Option<(&str, u32, Field)> {
    let (rest, field) = name.rsplit_once('.')?;
    let field = match field {
        "key" => Field::Key,
        "salt" => Field::Salt,
        "algorithm" => Field::Algorithm,
        _ => return None,
    };
    let (policy, spi) = rest.rsplit_once('.')?;
    let spi: u32 = spi.parse().ok()?;
    ((FIRST_SPI..=LAST_SPI).contains(&spi) && !policy.is_empty()).then_some((policy, spi, field))
}

/// Key material of one generation. Its `Debug` never shows the key or the salt.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyMaterial {
    /// Pre-shared key.
    pub key: Vec<u8>,
    /// HKDF salt.
    pub salt: Vec<u8>,
    /// ESP algorithm.
    pub algorithm: IPsecAlgorithm,
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .field("salt", &format_args!("<{} bytes>", self.salt.len()))
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

/// Why a published generation cannot be used. Never carries key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishedError {
    /// A field of the generation is missing.
    #[error("key Secret entry {entry} is missing")]
    Missing {
        /// The data key that is absent.
        entry: String,
    },
    /// The key is too short.
    #[error("key Secret entry {entry} holds {len} bytes; at least {MIN_KEY_LEN} are required")]
    ShortKey {
        /// The data key.
        entry: String,
        /// Its length.
        len: usize,
    },
    /// The algorithm name is not one the API accepts.
    #[error("key Secret entry {entry} names an unknown algorithm {name:?}")]
    Algorithm {
        /// The data key.
        entry: String,
        /// The name found.
        name: String,
    },
}

/// The generations of `policy` published in the key Secret's `data`, by SPI.
pub fn published(
    data: &BTreeMap<String, ByteString>,
    policy: &str,
) -> Result<BTreeMap<u32, KeyMaterial>, PublishedError> {
    let mut spis: Vec<u32> = data
        .keys()
        .filter_map(|k| parse_entry(k))
        .filter(|(p, _, _)| *p == policy)
        .map(|(_, spi, _)| spi)
        .collect();
    spis.sort_unstable();
    spis.dedup();
    let get = |spi: u32, field: Field| {
        let entry = entry_name(policy, spi, field);
        match data.get(&entry) {
            Some(v) => Ok((entry, v.0.clone())),
            None => Err(PublishedError::Missing { entry }),
        }
    };
    let mut out = BTreeMap::new();
    for spi in spis {
        let (entry, key) = get(spi, Field::Key)?;
        if key.len() < MIN_KEY_LEN {
            return Err(PublishedError::ShortKey {
                entry,
                len: key.len(),
            });
        }
        let (_, salt) = get(spi, Field::Salt)?;
        let (entry, name) = get(spi, Field::Algorithm)?;
        let name = String::from_utf8_lossy(&name).into_owned();
        let algorithm = parse_algorithm(&name).ok_or(PublishedError::Algorithm { entry, name })?;
        out.insert(
            spi,
            KeyMaterial {
                key,
                salt,
                algorithm,
            },
        );
    }
    Ok(out)
}

/// The Secret `data` entries publishing `generations` of `policy` (what the operator writes).
pub fn publish(
    policy: &str,
    generations: &BTreeMap<u32, KeyMaterial>,
) -> BTreeMap<String, ByteString> {
    let mut data = BTreeMap::new();
    for (spi, m) in generations {
        data.insert(
            entry_name(policy, *spi, Field::Key),
            ByteString(m.key.clone()),
        );
        data.insert(
            entry_name(policy, *spi, Field::Salt),
            ByteString(m.salt.clone()),
        );
        data.insert(
            entry_name(policy, *spi, Field::Algorithm),
            ByteString(algorithm_name(m.algorithm).as_bytes().to_vec()),
        );
    }
    data
}

/// The API name of `algorithm` (as in `spec.algorithm`).
pub fn algorithm_name(algorithm: IPsecAlgorithm) -> &'static str {
    match algorithm {
        IPsecAlgorithm::Rfc4106GcmAes => "rfc4106(gcm(aes))",
        IPsecAlgorithm::CbcAesHmacSha256 => "cbc(aes)+hmac(sha256)",
    }
}

/// Parses an API algorithm name.
pub fn parse_algorithm(name: &str) -> Option<IPsecAlgorithm> {
    [
        IPsecAlgorithm::Rfc4106GcmAes,
        IPsecAlgorithm::CbcAesHmacSha256,
    ]
    .into_iter()
    .find(|a| algorithm_name(*a) == name.trim())
}

/// Whether `policy` selects a node with `labels` (absent or empty selector: every node).
/// An unparsable selector selects nothing.
pub fn selects(policy: &IPsecPolicy, labels: &BTreeMap<String, String>) -> bool {
    match &policy.spec.node_selector {
        None => true,
        Some(sel) => Selector::try_from(sel.clone()).is_ok_and(|s| s.matches(labels)),
    }
}

/// The policy a node with `labels` belongs to: the oldest selecting one (creation time, then
/// name). Policies being deleted do not count.
pub fn policy_for_node<'a>(
    policies: impl IntoIterator<Item = &'a IPsecPolicy>,
    labels: &BTreeMap<String, String>,
) -> Option<&'a IPsecPolicy> {
    policies
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && selects(p, labels))
        .min_by(|a, b| {
            let at = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
            let bt = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
            at.cmp(&bt).then_with(|| a.name_any().cmp(&b.name_any()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn material(algorithm: IPsecAlgorithm) -> KeyMaterial {
        KeyMaterial {
            key: vec![7; 32],
            salt: vec![9; 16],
            algorithm,
        }
    }

    #[test]
    fn published_reads_back_what_publish_wrote_and_ignores_other_policies() {
        let mut gens = BTreeMap::new();
        gens.insert(256, material(IPsecAlgorithm::Rfc4106GcmAes));
        gens.insert(257, material(IPsecAlgorithm::CbcAesHmacSha256));
        let mut data = publish("a.b", &gens);
        data.extend(publish("other", &gens));
        data.insert("unrelated".into(), ByteString(vec![1]));
        assert_eq!(published(&data, "a.b").expect("published"), gens);
        assert!(published(&data, "missing").expect("published").is_empty());
    }

    #[test]
    fn a_short_key_or_missing_field_is_named_without_the_key() {
        let mut gens = BTreeMap::new();
        gens.insert(300, material(IPsecAlgorithm::Rfc4106GcmAes));
        let mut data = publish("p", &gens);
        data.insert("p.300.key".into(), ByteString(vec![1; 8]));
        let err = published(&data, "p").expect_err("refused").to_string();
        assert_eq!(
            err,
            "key Secret entry p.300.key holds 8 bytes; at least 16 are required"
        );
        data.remove("p.300.salt");
        data.insert("p.300.key".into(), ByteString(vec![1; 32]));
        assert_eq!(
            published(&data, "p").expect_err("refused").to_string(),
            "key Secret entry p.300.salt is missing"
        );
    }

    #[test]
    fn entries_outside_the_generation_range_are_not_ours() {
        assert_eq!(parse_entry("p.255.key"), None);
        assert_eq!(parse_entry("p.65536.key"), None);
        assert_eq!(parse_entry("p.256.secret"), None);
        assert_eq!(parse_entry("p.q.256.salt"), Some(("p.q", 256, Field::Salt)));
    }

    #[test]
    fn next_spi_wraps_inside_the_range() {
        assert_eq!(next_spi(FIRST_SPI), FIRST_SPI + 1);
        assert_eq!(next_spi(LAST_SPI), FIRST_SPI);
        assert_eq!(next_spi(0), FIRST_SPI);
    }

    #[test]
    fn the_oldest_selecting_policy_owns_a_node() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
        let labels: BTreeMap<String, String> = [("zone".to_owned(), "a".to_owned())].into();
        let at = |p: IPsecPolicy, secs: i64| {
            let mut p = p;
            p.metadata.creation_timestamp = Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(secs).expect("time"),
            ));
            p
        };
        let mut zone_b = at(IPsecPolicy::test("zone-b"), 1);
        zone_b.spec.node_selector = Some(LabelSelector {
            match_labels: Some([("zone".to_owned(), "b".to_owned())].into()),
            ..LabelSelector::default()
        });
        let young = at(IPsecPolicy::test("all-young"), 20);
        let old = at(IPsecPolicy::test("all-old"), 10);
        let policies = [zone_b, young, old];
        assert_eq!(
            policy_for_node(&policies, &labels).map(|p| p.name_any()),
            Some("all-old".to_owned())
        );
    }
}
