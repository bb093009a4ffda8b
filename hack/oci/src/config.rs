//! The OCI image configuration: [`ImageConfig`] (what runs, as whom, with which environment)
//! and the config blob around it (platform, layer diff ids), as the image spec's
//! `application/vnd.oci.image.config.v1+json` spells them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The OCI image config's `config` object: what a runtime starts by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// The executable and its first arguments; container `command` replaces it.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub entrypoint: Vec<String>,
    /// Default arguments after the entrypoint; container `args` replaces them.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cmd: Vec<String>,
    /// Environment, `NAME=value` each, as in OCI.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub env: Vec<String>,
    /// User (and group) to run as: `uid`, `uid:gid`, `name` or `name:group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Working directory of the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Image labels (`org.opencontainers.image.version`, OLM bundle annotations, …).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
}

/// OCI writes absent lists and maps as `null` as often as it omits them.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The config blob: platform, [`ImageConfig`] and the uncompressed digests of the layers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ConfigBlob {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    pub architecture: String,
    pub os: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub config: ImageConfig,
    pub rootfs: RootFs,
}

/// `rootfs` of the config blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub diff_ids: Vec<String>,
}

/// The OCI architecture name of the machine this was built for (`amd64`, `arm64`, …).
pub(crate) fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_with_null_lists_reads_as_empty() {
        let c: ImageConfig = serde_json::from_str(
            r#"{"Entrypoint":null,"Cmd":["sh"],"Env":null,"Labels":null,"User":"65532:65532"}"#,
        )
        .expect("parse");
        assert_eq!(
            c,
            ImageConfig {
                cmd: vec!["sh".into()],
                user: Some("65532:65532".into()),
                ..ImageConfig::default()
            }
        );
    }

    #[test]
    fn the_config_is_written_with_the_oci_field_names() {
        let c = ImageConfig {
            entrypoint: vec!["/a".into()],
            working_dir: Some("/w".into()),
            ..ImageConfig::default()
        };
        assert_eq!(
            serde_json::to_string(&c).expect("json"),
            r#"{"Entrypoint":["/a"],"WorkingDir":"/w"}"#
        );
    }
}
