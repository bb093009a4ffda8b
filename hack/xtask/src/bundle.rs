//! `cargo xtask olm-validate DIR`: checks an OLM bundle the way OLM would use it.
//!
//! ```text
//!  DIR ─► layout (registry+v1: manifests/ + metadata/, or flat: CSV and CRDs in DIR)
//!      ─► documents by kind ─┬─► CSV against OLM's CSV schema (reference/olm, strict)
//!                            ├─► CSV name, case-sensitive annotations, minKubeVersion
//!                            ├─► install modes (only AllNamespaces with conversion webhooks)
//!                            │   and install strategy
//!                            ├─► ServiceAccounts the bundle ships ⇔ ones the CSV creates
//!                            ├─► owned CRDs (group/version/kind) ⇔ CRD files, no duplicates
//!                            ├─► alm-examples against their CRD's schema
//!                            └─► metadata/annotations.yaml required keys (registry+v1)
//!                                        ▼
//!                            Report { problems, warnings, notes, summary }
//! ```
//!
//! Problems and warnings follow the classification of OLM's own bundle validators
//! (operator-framework/api `pkg/validation`): what OLM reports as an error is a problem, what
//! it reports as a warning is a warning. Every message names the file and the field, so a
//! broken bundle says what to fix. An `Err` means the check itself could not run (for example
//! the schema is missing).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use meshlet_crds::validation::{FieldError, SchemaValidator};
use serde_json::Value;

use crate::yaml;

/// Install mode types OLM knows.
pub const INSTALL_MODE_TYPES: [&str; 4] = [
    "OwnNamespace",
    "SingleNamespace",
    "MultiNamespace",
    "AllNamespaces",
];

/// Keys `metadata/annotations.yaml` of a registry+v1 bundle must carry.
pub const REQUIRED_ANNOTATIONS: [&str; 5] = [
    "operators.operatorframework.io.bundle.mediatype.v1",
    "operators.operatorframework.io.bundle.manifests.v1",
    "operators.operatorframework.io.bundle.metadata.v1",
    "operators.operatorframework.io.bundle.package.v1",
    "operators.operatorframework.io.bundle.channels.v1",
];

/// Annotations OLM reads case-sensitively (operator-framework/api
/// `CaseSensitiveAnnotationKeySet`); any other spelling is ignored by OLM.
pub const CASE_SENSITIVE_ANNOTATIONS: [&str; 5] = [
    "olm.operatorGroup",
    "olm.operatorNamespace",
    "olm.targetNamespaces",
    "olm.providedAPIs",
    "olm.skipRange",
];

/// Longest CSV `metadata.name`: OLM uses the name as a label value.
pub const MAX_CSV_NAME_LEN: usize = 63;

/// OLM's CSV CRD (operator-framework/api, Apache-2.0; see `reference/olm/SOURCE.md`), built
/// into the binary so the checker needs nothing beside it.
const CSV_SCHEMA: &str =
    include_str!("../reference/olm/operators.coreos.com_clusterserviceversions.yaml");

/// Outcome of a bundle check.
#[derive(Debug, Default)]
pub struct Report {
    /// What makes the bundle invalid (OLM reports these as errors); empty for a valid bundle.
    pub problems: Vec<String>,
    /// What OLM accepts but reports as a warning, and what the bundle likely got wrong without
    /// being invalid. A bundle with warnings only is valid.
    pub warnings: Vec<String>,
    /// Checks that could not apply (for example a CRD without a schema).
    pub notes: Vec<String>,
    /// One line describing what was checked.
    pub summary: String,
}

struct Doc {
    file: PathBuf,
    value: Value,
}

fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))?
    {
        let path = entry?.path();
        if path.is_file()
            && path
                .extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Served version names of a CRD given as JSON (v1 `versions` or v1beta1 `version`).
fn crd_versions(crd: &Value) -> Vec<String> {
    let mut out: Vec<String> = crd["spec"]["versions"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .filter(|v| v["served"].as_bool().unwrap_or(true))
                .filter_map(|v| v["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if let Some(v) = crd["spec"]["version"].as_str()
        && !out.iter().any(|o| o == v)
    {
        out.push(v.to_owned());
    }
    out
}

/// OLM's CSV CRD, parsed.
pub fn load_csv_crd() -> anyhow::Result<Value> {
    yaml::parse(CSV_SCHEMA).context("failed to parse OLM's CSV schema built into xtask")
}

/// Checks the bundle in `dir` against OLM's CSV schema.
pub fn check_bundle(dir: &Path) -> anyhow::Result<Report> {
    let csv_crd = load_csv_crd()?;
    check_bundle_with(dir, &csv_crd)
}

/// Checks the bundle in `dir` against an already loaded CSV CRD.
pub fn check_bundle_with(dir: &Path, csv_crd: &Value) -> anyhow::Result<Report> {
    let mut report = Report::default();
    if !dir.is_dir() {
        report
            .problems
            .push(format!("{} is not a directory", dir.display()));
        return Ok(report);
    }
    let registry_v1 = dir.join("manifests").is_dir() || dir.join("metadata").is_dir();
    let manifests_dir = if registry_v1 {
        dir.join("manifests")
    } else {
        dir.to_path_buf()
    };
    if !manifests_dir.is_dir() {
        report.problems.push(format!(
            "{} has metadata/ but no manifests/ directory",
            dir.display()
        ));
        return Ok(report);
    }

    // Every document of every manifest file.
    let mut docs = Vec::new();
    for file in yaml_files(&manifests_dir)? {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("failed to read {}", file.display()))?;
        match yaml::parse_all(&text) {
            Ok(values) => docs.extend(values.into_iter().map(|value| Doc {
                file: file.clone(),
                value,
            })),
            Err(e) => report
                .problems
                .push(format!("{}: not valid YAML: {e}", file_name(&file))),
        }
    }
    let csvs: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.value["kind"] == "ClusterServiceVersion")
        .collect();
    let crd_docs: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.value["kind"] == "CustomResourceDefinition")
        .collect();
    check_duplicate_crds(&mut report, &crd_docs);
    // By name; a duplicate (reported above) does not replace the first file.
    let mut crds: BTreeMap<String, &Doc> = BTreeMap::new();
    for d in &crd_docs {
        if let Some(n) = d.value["metadata"]["name"].as_str() {
            crds.entry(n.to_owned()).or_insert(d);
        }
    }
    let csv = match csvs.as_slice() {
        [one] => *one,
        [] => {
            report.problems.push(format!(
                "{}: no ClusterServiceVersion in the bundle",
                manifests_dir.display()
            ));
            return Ok(report);
        }
        many => {
            let files: Vec<String> = many.iter().map(|d| file_name(&d.file)).collect();
            report.problems.push(format!(
                "more than one ClusterServiceVersion in the bundle: {}",
                files.join(", ")
            ));
            return Ok(report);
        }
    };
    let csv_file = file_name(&csv.file);
    let csv = &csv.value;

    check_csv_schema(&mut report, &csv_file, csv, csv_crd)?;
    check_csv_metadata(&mut report, &csv_file, csv);
    check_install(&mut report, &csv_file, csv);
    check_conversion_install_modes(&mut report, &csv_file, csv, &crd_docs);
    check_service_accounts(&mut report, &csv_file, csv, &docs);
    check_owned_crds(&mut report, &csv_file, csv, &crd_docs);
    let examples = check_alm_examples(&mut report, &csv_file, csv, &crds)?;
    if registry_v1 {
        check_annotations(&mut report, dir);
        check_dockerfile(&mut report, dir);
    }
    report.summary = format!(
        "{} layout, CSV {}, {} CRD file(s), {} owned CRD(s), {} alm-example(s)",
        if registry_v1 { "registry+v1" } else { "flat" },
        csv["metadata"]["name"].as_str().unwrap_or("?"),
        crds.len(),
        csv["spec"]["customresourcedefinitions"]["owned"]
            .as_array()
            .map_or(0, Vec::len),
        examples,
    );
    Ok(report)
}

fn check_csv_schema(
    report: &mut Report,
    csv_file: &str,
    csv: &Value,
    csv_crd: &Value,
) -> anyhow::Result<()> {
    if csv["apiVersion"] != "operators.coreos.com/v1alpha1" {
        report.problems.push(format!(
            "{csv_file}: apiVersion is {}, expected operators.coreos.com/v1alpha1",
            csv["apiVersion"]
        ));
        return Ok(());
    }
    let openapi = crate::schema::openapi_for_crd(csv_crd, "v1alpha1")
        .context("OLM's CSV CRD has no schema for v1alpha1")?;
    let validator = SchemaValidator::from_schema(
        "clusterserviceversions.operators.coreos.com",
        crate::schema::with_object_root(openapi),
    )
    .map_err(|e| anyhow::anyhow!("failed to compile OLM's CSV schema: {e}"))?;
    let mut decoded = csv.clone();
    let mut filled = Vec::new();
    crate::schema::fill_required_scalars(openapi, &mut decoded, "", &mut filled);
    for path in filled {
        report.notes.push(format!(
            "{csv_file}: required field {path} is missing; OLM reads it as empty"
        ));
    }
    let (problems, notes) = split_field_errors(validator.validate(&decoded, None));
    report.problems.extend(
        problems
            .iter()
            .map(|p| format!("{csv_file}: does not match OLM's CSV schema at {p}")),
    );
    report
        .notes
        .extend(notes.iter().map(|n| format!("{csv_file}: {n}")));
    Ok(())
}

/// Splits an engine verdict into problems and notes: a rule the engine cannot evaluate
/// client-side (an internal error) is a note, not a verdict on the object.
fn split_field_errors(result: Result<(), Vec<FieldError>>) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    for e in result.err().unwrap_or_default() {
        if e.message.starts_with("Internal error") {
            notes.push(format!("could not be checked client-side: {e}"));
        } else {
            problems.push(format!("{e} ({})", e.reason));
        }
    }
    (problems, notes)
}

fn check_install(report: &mut Report, csv_file: &str, csv: &Value) {
    let spec = &csv["spec"];
    match spec["installModes"].as_array() {
        None => report
            .problems
            .push(format!("{csv_file}: spec.installModes is missing")),
        Some(modes) => {
            let mut seen = Vec::new();
            for (i, mode) in modes.iter().enumerate() {
                let ty = mode["type"].as_str().unwrap_or("");
                if !INSTALL_MODE_TYPES.contains(&ty) {
                    report.problems.push(format!(
                        "{csv_file}: spec.installModes[{i}].type {ty:?} is not an install mode \
                         (allowed: {})",
                        INSTALL_MODE_TYPES.join(", ")
                    ));
                } else if seen.contains(&ty) {
                    report
                        .problems
                        .push(format!("{csv_file}: install mode {ty} is listed twice"));
                }
                seen.push(ty);
            }
            if !modes.iter().any(|m| m["supported"] == true) {
                report
                    .problems
                    .push(format!("{csv_file}: no install mode is supported"));
            }
        }
    }
    match spec["minKubeVersion"].as_str().map(str::trim) {
        None | Some("") => report.warnings.push(format!(
            "{csv_file}: spec.minKubeVersion is not set; OLM installs the operator on any \
             Kubernetes version"
        )),
        Some(_) => {}
    }
    for field in ["minKubeVersion", "version"] {
        if let Some(v) = spec[field].as_str()
            && !(field == "minKubeVersion" && v.trim().is_empty())
            && !is_semver(v)
        {
            report.problems.push(format!(
                "{csv_file}: spec.{field} {v:?} is not a semantic version (MAJOR.MINOR.PATCH)"
            ));
        }
    }
    let install = &spec["install"];
    if install["strategy"] != "deployment" {
        report.problems.push(format!(
            "{csv_file}: spec.install.strategy is {}, expected \"deployment\"",
            install["strategy"]
        ));
    }
    let deployments = install["spec"]["deployments"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if deployments.is_empty() {
        report.problems.push(format!(
            "{csv_file}: spec.install.spec.deployments is empty"
        ));
    }
    for d in deployments {
        let name = d["name"].as_str().unwrap_or("?");
        let containers = d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .map_or(0, Vec::len);
        if containers == 0 {
            report.problems.push(format!(
                "{csv_file}: install deployment {name} has no containers"
            ));
        }
    }
}

/// A semantic version as OLM parses it (`blang/semver` `Parse`): `MAJOR.MINOR.PATCH`
/// without leading zeros or a `v`, then an optional `-pre.release` whose numeric identifiers
/// have no leading zeros, then an optional `+build.metadata`.
pub fn is_semver(v: &str) -> bool {
    let ident_ok =
        |id: &str| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    let numeric_ok = |n: &str| {
        !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) && (n == "0" || !n.starts_with('0'))
    };
    let (rest, build) = match v.split_once('+') {
        Some((rest, build)) => (rest, Some(build)),
        None => (v, None),
    };
    if let Some(build) = build
        && !build.split('.').all(ident_ok)
    {
        return false;
    }
    let (core, pre) = match rest.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (rest, None),
    };
    if let Some(pre) = pre
        && !pre
            .split('.')
            .all(|id| ident_ok(id) && (!id.chars().all(|c| c.is_ascii_digit()) || numeric_ok(id)))
    {
        return false;
    }
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| numeric_ok(p))
}

/// An RFC 1123 subdomain, as Kubernetes requires of object names.
fn is_dns1123_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `metadata.name` and `spec.replaces` must be valid object names and label values, and
/// annotations OLM reads case-sensitively must be spelled as OLM spells them.
fn check_csv_metadata(report: &mut Report, csv_file: &str, csv: &Value) {
    for (field, value) in [
        ("metadata.name", &csv["metadata"]["name"]),
        ("spec.replaces", &csv["spec"]["replaces"]),
    ] {
        let Some(name) = value.as_str() else {
            continue;
        };
        if name.len() > MAX_CSV_NAME_LEN {
            report.problems.push(format!(
                "{csv_file}: {field} {name:?} is {} characters long; OLM uses it as a label \
                 value, which must be no more than {MAX_CSV_NAME_LEN} characters",
                name.len()
            ));
        }
        if !is_dns1123_subdomain(name) {
            report.problems.push(format!(
                "{csv_file}: {field} {name:?} is not a valid name (lowercase letters, digits, \
                 '-' and '.', starting and ending with a letter or digit)"
            ));
        }
    }
    let Some(annotations) = csv["metadata"]["annotations"].as_object() else {
        return;
    };
    for key in annotations.keys() {
        if let Some(right) = CASE_SENSITIVE_ANNOTATIONS
            .iter()
            .find(|a| a.eq_ignore_ascii_case(key) && *a != key)
        {
            report.problems.push(format!(
                "{csv_file}: metadata.annotations.{key} uses the wrong case; OLM reads only \
                 {right}"
            ));
        }
    }
}

/// OLM converts between CRD versions through one webhook for the whole cluster, so a CSV
/// with a conversion webhook must support only the AllNamespaces install mode.
fn check_conversion_install_modes(report: &mut Report, csv_file: &str, csv: &Value, crds: &[&Doc]) {
    let mut reasons = Vec::new();
    for crd in crds {
        if crd.value["spec"]["conversion"]["strategy"] == "Webhook" {
            reasons.push(format!(
                "{} sets spec.conversion.strategy: Webhook",
                file_name(&crd.file)
            ));
        }
    }
    let webhooks = csv["spec"]["webhookdefinitions"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    for (i, w) in webhooks.iter().enumerate() {
        let conversion_crds = w["conversionCRDs"]
            .as_array()
            .is_some_and(|c| !c.is_empty());
        if w["type"] == "ConversionWebhook" || conversion_crds {
            reasons.push(format!(
                "spec.webhookdefinitions[{i}] is a conversion webhook"
            ));
        }
    }
    if reasons.is_empty() {
        return;
    }
    let modes = csv["spec"]["installModes"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let mut wrong = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        let ty = mode["type"].as_str().unwrap_or("");
        let supported = mode["supported"] == true;
        if ty == "AllNamespaces" && !supported {
            wrong.push(format!(
                "spec.installModes[{i}] AllNamespaces is unsupported"
            ));
        } else if ty != "AllNamespaces" && supported {
            wrong.push(format!("spec.installModes[{i}] {ty} is supported"));
        }
    }
    if !wrong.is_empty() {
        report.problems.push(format!(
            "{csv_file}: spec.installModes must support only AllNamespaces when the bundle has \
             a conversion webhook ({}), but {}",
            reasons.join("; "),
            wrong.join(", ")
        ));
    }
}

/// OLM creates the ServiceAccounts the install strategy names; one the bundle also ships
/// would clash with it.
fn check_service_accounts(report: &mut Report, csv_file: &str, csv: &Value, docs: &[Doc]) {
    let strategy = &csv["spec"]["install"]["spec"];
    let mut created: BTreeMap<String, String> = BTreeMap::new();
    let mut add = |name: &Value, field: String| {
        if let Some(name) = name.as_str().filter(|n| !n.is_empty()) {
            created.entry(name.to_owned()).or_insert(field);
        }
    };
    for (i, d) in strategy["deployments"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .enumerate()
    {
        add(
            &d["spec"]["template"]["spec"]["serviceAccountName"],
            format!("spec.install.spec.deployments[{i}].spec.template.spec.serviceAccountName"),
        );
    }
    for list in ["permissions", "clusterPermissions"] {
        for (i, p) in strategy[list]
            .as_array()
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .enumerate()
        {
            add(
                &p["serviceAccountName"],
                format!("spec.install.spec.{list}[{i}].serviceAccountName"),
            );
        }
    }
    for doc in docs {
        if doc.value["kind"] != "ServiceAccount" || doc.value["apiVersion"] != "v1" {
            continue;
        }
        let name = doc.value["metadata"]["name"].as_str().unwrap_or("");
        if let Some(field) = created.get(name) {
            report.problems.push(format!(
                "{}: bundle ships ServiceAccount {name}, which the CSV's install strategy \
                 creates ({csv_file}: {field}); remove the manifest or rename one of them",
                file_name(&doc.file)
            ));
        }
    }
}

/// Group, served-or-not version names and kind of a CRD, as OLM keys bundle CRDs: every entry
/// of v1 `spec.versions`, or v1beta1 `spec.version` when it has no `versions`.
fn crd_keys(crd: &Value) -> Vec<(String, String, String)> {
    let group = crd["spec"]["group"].as_str().unwrap_or("").to_owned();
    let kind = crd["spec"]["names"]["kind"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let mut versions: Vec<String> = crd["spec"]["versions"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .filter_map(|v| v["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if versions.is_empty()
        && let Some(v) = crd["spec"]["version"].as_str()
    {
        versions.push(v.to_owned());
    }
    versions
        .into_iter()
        .map(|v| (group.clone(), v, kind.clone()))
        .collect()
}

fn gvk_text((group, version, kind): &(String, String, String)) -> String {
    format!("{group}/{version}, Kind={kind}")
}

/// Two CRD documents with the same name, or defining the same group/version/kind (OLM's key,
/// which also catches a v1 and a v1beta1 copy of one CRD), are an error.
fn check_duplicate_crds(report: &mut Report, crds: &[&Doc]) {
    let mut by_name: BTreeMap<&str, &Doc> = BTreeMap::new();
    let mut by_gvk: BTreeMap<(String, String, String), &Doc> = BTreeMap::new();
    for crd in crds {
        let file = file_name(&crd.file);
        let name = crd.value["metadata"]["name"].as_str().unwrap_or("");
        if let Some(first) = by_name.get(name) {
            report.problems.push(format!(
                "{file}: duplicate CRD {name} (metadata.name), already defined in {}",
                file_name(&first.file)
            ));
            continue;
        }
        by_name.insert(name, crd);
        for key in crd_keys(&crd.value) {
            if let Some(first) = by_gvk.get(&key) {
                report.problems.push(format!(
                    "{file}: duplicate CRD {:?} (spec.group, spec.versions, spec.names.kind), \
                     already defined in {}",
                    gvk_text(&key),
                    file_name(&first.file)
                ));
            } else {
                by_gvk.insert(key, crd);
            }
        }
    }
}

/// Owned CRDs are matched to CRD files by group (from the owned `name`, `<plural>.<group>`),
/// version and kind, as OLM does; every CRD file must be owned by group and kind.
fn check_owned_crds(report: &mut Report, csv_file: &str, csv: &Value, crds: &[&Doc]) {
    let owned = csv["spec"]["customresourcedefinitions"]["owned"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let mut owned_group_kinds = BTreeSet::new();
    for (i, o) in owned.iter().enumerate() {
        let field = format!("spec.customresourcedefinitions.owned[{i}]");
        let name = o["name"].as_str().unwrap_or("");
        let version = o["version"].as_str().unwrap_or("");
        let kind = o["kind"].as_str().unwrap_or("");
        let Some((_plural, group)) = name.split_once('.') else {
            report.problems.push(format!(
                "{csv_file}: {field}.name {name:?} is not <plural>.<group>"
            ));
            continue;
        };
        let key = (group.to_owned(), version.to_owned(), kind.to_owned());
        owned_group_kinds.insert((group.to_owned(), kind.to_owned()));
        let Some(crd) = crds.iter().find(|c| crd_keys(&c.value).contains(&key)) else {
            let hint = crds
                .iter()
                .find(|c| c.value["metadata"]["name"] == name)
                .map(|c| {
                    let keys: Vec<String> = crd_keys(&c.value).iter().map(gvk_text).collect();
                    format!(" ({} defines {})", file_name(&c.file), keys.join("; "))
                })
                .unwrap_or_default();
            report.problems.push(format!(
                "{csv_file}: owned CRD {name} ({field}: group {group}, version {version}, kind \
                 {kind}) has no CRD file in the bundle defining {:?}{hint}",
                gvk_text(&key)
            ));
            continue;
        };
        let crd_file = file_name(&crd.file);
        if crd.value["metadata"]["name"] != name {
            report.warnings.push(format!(
                "{csv_file}: {field}.name is {name}, but {crd_file}, which defines {:?}, is \
                 named {}",
                gvk_text(&key),
                crd.value["metadata"]["name"]
            ));
        }
        if !crd_versions(&crd.value).iter().any(|v| v == version) {
            report.warnings.push(format!(
                "{csv_file}: owned CRD {name} version {version:?} ({field}.version) is not \
                 served by {crd_file} (served: {})",
                crd_versions(&crd.value).join(", ")
            ));
        }
    }
    for crd in crds {
        let group = crd.value["spec"]["group"].as_str().unwrap_or("").to_owned();
        let kind = crd.value["spec"]["names"]["kind"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        if owned_group_kinds.contains(&(group.clone(), kind.clone())) {
            continue;
        }
        let name = crd.value["metadata"]["name"].as_str().unwrap_or("");
        let required = csv["spec"]["customresourcedefinitions"]["required"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x["name"] == name));
        report.problems.push(format!(
            "{}: CRD {name} ({group}, Kind={kind}) is in the bundle but not listed in the \
             CSV's owned CRDs{}",
            file_name(&crd.file),
            if required {
                " (it is listed as required; a bundle ships only CRDs it owns)"
            } else {
                ""
            }
        ));
    }
}

/// Checks `alm-examples`; returns how many examples there are.
fn check_alm_examples(
    report: &mut Report,
    csv_file: &str,
    csv: &Value,
    crds: &BTreeMap<String, &Doc>,
) -> anyhow::Result<usize> {
    let Some(raw) = csv["metadata"]["annotations"].get("alm-examples") else {
        report.warnings.push(format!(
            "{csv_file}: metadata.annotations has no alm-examples; the console shows no \
             example for the owned CRDs"
        ));
        return Ok(0);
    };
    let Some(raw) = raw.as_str() else {
        report
            .problems
            .push(format!("{csv_file}: alm-examples is not a string"));
        return Ok(0);
    };
    let examples: Vec<Value> = match serde_json::from_str(raw) {
        Ok(Value::Array(a)) => a,
        Ok(_) => {
            report
                .problems
                .push(format!("{csv_file}: alm-examples is not a JSON array"));
            return Ok(0);
        }
        Err(e) => {
            report
                .problems
                .push(format!("{csv_file}: alm-examples is not valid JSON: {e}"));
            return Ok(0);
        }
    };
    // Group (from `<plural>.<group>`), version and kind of every owned CRD, as OLM keys the
    // APIs a CSV provides.
    let owned: Vec<(&str, &str, &str)> = csv["spec"]["customresourcedefinitions"]["owned"]
        .as_array()
        .map(|o| {
            o.iter()
                .map(|x| {
                    let group = x["name"]
                        .as_str()
                        .and_then(|n| n.split_once('.'))
                        .map_or("", |(_, g)| g);
                    (
                        group,
                        x["version"].as_str().unwrap_or(""),
                        x["kind"].as_str().unwrap_or(""),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    for (i, example) in examples.iter().enumerate() {
        let kind = example["kind"].as_str().unwrap_or("");
        let name = example["metadata"]["name"].as_str().unwrap_or("");
        let label = format!("{csv_file}: alm-examples[{i}] ({kind} {name:?})");
        let api_version = example["apiVersion"].as_str().unwrap_or("");
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        if name.is_empty() && example["metadata"]["generateName"].is_null() {
            report
                .problems
                .push(format!("{label}: metadata.name is missing"));
        }
        let crd = crds.values().find(|c| {
            c.value["spec"]["group"] == group && c.value["spec"]["names"]["kind"] == kind
        });
        let Some(crd) = crd else {
            report.problems.push(format!(
                "{label}: no CRD in the bundle defines kind {kind:?} in group {group:?}"
            ));
            continue;
        };
        let crd_name = crd.value["metadata"]["name"].as_str().unwrap_or("");
        if !owned.contains(&(group, version, kind)) {
            report.problems.push(format!(
                "{label}: {group}/{version}, Kind={kind} (CRD {crd_name}) is not an owned CRD's \
                 group/version/kind"
            ));
        }
        if !crd_versions(&crd.value).iter().any(|v| v == version) {
            report.problems.push(format!(
                "{label}: version {version:?} is not served by CRD {crd_name}"
            ));
            continue;
        }
        let (problems, notes) = admit_example(&crd.value, version, example);
        report
            .problems
            .extend(problems.iter().map(|p| format!("{label}: {p}")));
        report
            .notes
            .extend(notes.iter().map(|n| format!("{label}: {n}")));
    }
    // OLM warns about every owned group/version/kind without an example.
    for (i, o) in csv["spec"]["customresourcedefinitions"]["owned"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .enumerate()
    {
        let group = o["name"]
            .as_str()
            .and_then(|n| n.split_once('.'))
            .map_or("", |(_, g)| g);
        let api_version = format!("{group}/{}", o["version"].as_str().unwrap_or(""));
        if !examples
            .iter()
            .any(|e| e["apiVersion"] == api_version.as_str() && e["kind"] == o["kind"])
        {
            report.warnings.push(format!(
                "{csv_file}: owned CRD {} (spec.customresourcedefinitions.owned[{i}]) has no \
                 alm-examples entry of apiVersion {api_version}, kind {}",
                o["name"].as_str().unwrap_or(""),
                o["kind"].as_str().unwrap_or("")
            ));
        }
    }
    Ok(examples.len())
}

/// Checks `example` the way `kubectl apply` (strict field validation) and the API server
/// would on create: schema defaults are applied, then the schema, unknown fields and CEL
/// rules are checked, with Meshlet's CRD validation engine. Returns `(problems, notes)`.
fn admit_example(crd: &Value, version: &str, example: &Value) -> (Vec<String>, Vec<String>) {
    let name = crd["metadata"]["name"].as_str().unwrap_or("");
    let Some(schema) = crate::schema::openapi_for_crd(crd, version) else {
        let note =
            format!("CRD {name} has no schema for {version}; checked group, kind and version only");
        return (Vec::new(), vec![note]);
    };
    // The API server accepts `apiVersion`, `kind` and `metadata` at the root of every object
    // whether or not the schema lists them; list them so the engine does too.
    let validator = match SchemaValidator::from_schema(
        name,
        crate::schema::with_object_root(schema),
    ) {
        Ok(v) => v,
        // apiextensions v1beta1 allowed schemas that are not structural; v1 does not.
        Err(e) if crd["apiVersion"] != "apiextensions.k8s.io/v1" => {
            let note = format!(
                "CRD {name}'s schema cannot be checked ({e}); checked group, kind and version only"
            );
            return (Vec::new(), vec![note]);
        }
        Err(e) => {
            return (
                vec![format!("CRD {name}'s schema does not compile: {e}")],
                Vec::new(),
            );
        }
    };
    let mut defaulted = example.clone();
    validator.apply_defaults(&mut defaulted);
    let (problems, notes) = split_field_errors(validator.validate(&defaulted, None));
    let problems = problems
        .into_iter()
        .map(|p| format!("would be refused by the API server: {p}"))
        .collect();
    (problems, notes)
}

fn check_annotations(report: &mut Report, dir: &Path) {
    let path = dir.join("metadata/annotations.yaml");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            report
                .problems
                .push(format!("metadata/annotations.yaml cannot be read: {e}"));
            return;
        }
    };
    let doc: Value = match yaml::parse(&text) {
        Ok(v) => v,
        Err(e) => {
            report
                .problems
                .push(format!("metadata/annotations.yaml is not valid YAML: {e}"));
            return;
        }
    };
    let annotations = &doc["annotations"];
    for key in REQUIRED_ANNOTATIONS {
        match annotations[key].as_str() {
            Some(v) if !v.trim().is_empty() => {}
            _ => report.problems.push(format!(
                "metadata/annotations.yaml: required key annotations.{key} is missing or empty"
            )),
        }
    }
    let expect = |key: &str, want: &str, report: &mut Report| {
        if let Some(v) = annotations[key].as_str()
            && v.trim_end_matches('/') != want.trim_end_matches('/')
        {
            report.problems.push(format!(
                "metadata/annotations.yaml: annotations.{key} is {v:?}, expected {want:?}"
            ));
        }
    };
    expect(REQUIRED_ANNOTATIONS[0], "registry+v1", report);
    expect(REQUIRED_ANNOTATIONS[1], "manifests/", report);
    expect(REQUIRED_ANNOTATIONS[2], "metadata/", report);
    let channels: Vec<&str> = annotations[REQUIRED_ANNOTATIONS[4]]
        .as_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .collect();
    if let Some(default) =
        annotations["operators.operatorframework.io.bundle.channel.default.v1"].as_str()
        && !channels.contains(&default)
    {
        report.problems.push(format!(
            "metadata/annotations.yaml: default channel {default:?} is not one of the \
             channels {channels:?}"
        ));
    }
}

/// When the bundle has a `bundle.Dockerfile`, its `LABEL`s must repeat the annotations, since
/// the image labels are what a catalog reads.
fn check_dockerfile(report: &mut Report, dir: &Path) {
    let Ok(text) = std::fs::read_to_string(dir.join("bundle.Dockerfile")) else {
        return;
    };
    let Ok(doc) = std::fs::read_to_string(dir.join("metadata/annotations.yaml"))
        .map_err(anyhow::Error::from)
        .and_then(|t| yaml::parse::<Value>(&t))
    else {
        return;
    };
    let labels: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("LABEL "))
        .filter_map(|l| l.trim().split_once('='))
        .collect();
    let Some(annotations) = doc["annotations"].as_object() else {
        return;
    };
    for (key, value) in annotations {
        let value = value.as_str().unwrap_or("");
        match labels.get(key.as_str()) {
            Some(label) if *label == value => {}
            Some(label) => report.problems.push(format!(
                "bundle.Dockerfile: LABEL {key}={label} differs from annotations.yaml ({value})"
            )),
            None => report.problems.push(format!(
                "bundle.Dockerfile: LABEL {key} is missing (annotations.yaml has it)"
            )),
        }
    }
}
