//! `cargo xtask olm-validate DIR`: checks an OLM bundle the way OLM would use it.
//!
//! ```text
//!  DIR ─► layout (registry+v1: manifests/ + metadata/, or flat: CSV and CRDs in DIR)
//!      ─► documents by kind ─┬─► CSV against OLM's CSV schema (reference/olm, strict)
//!                            ├─► install modes and install strategy
//!                            ├─► owned CRDs  ⇔  CRD files in the bundle
//!                            ├─► alm-examples against their CRD's schema
//!                            └─► metadata/annotations.yaml required keys (registry+v1)
//!                                        ▼
//!                            Report { problems, notes }
//! ```
//!
//! Every problem names the file, the object and what is wrong, so a broken bundle says what
//! to fix. An `Err` means the check itself could not run (for example the schema is missing).

use std::collections::BTreeMap;
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

/// OLM's CSV CRD (operator-framework/api, Apache-2.0; see `reference/olm/SOURCE.md`), built
/// into the binary so the checker needs nothing beside it.
const CSV_SCHEMA: &str =
    include_str!("../reference/olm/operators.coreos.com_clusterserviceversions.yaml");

/// Outcome of a bundle check.
#[derive(Debug, Default)]
pub struct Report {
    /// What makes the bundle invalid; empty for a valid bundle.
    pub problems: Vec<String>,
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
    let crds: BTreeMap<String, &Doc> = docs
        .iter()
        .filter(|d| d.value["kind"] == "CustomResourceDefinition")
        .filter_map(|d| {
            d.value["metadata"]["name"]
                .as_str()
                .map(|n| (n.to_owned(), d))
        })
        .collect();
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
    check_install(&mut report, &csv_file, csv);
    check_owned_crds(&mut report, &csv_file, csv, &crds);
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
    for field in ["minKubeVersion", "version"] {
        if let Some(v) = spec[field].as_str()
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

/// `MAJOR.MINOR.PATCH` with an optional `-pre-release` and `+build` suffix.
fn is_semver(v: &str) -> bool {
    let core = v.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

fn check_owned_crds(
    report: &mut Report,
    csv_file: &str,
    csv: &Value,
    crds: &BTreeMap<String, &Doc>,
) {
    let owned = csv["spec"]["customresourcedefinitions"]["owned"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let mut owned_names = Vec::new();
    for (i, o) in owned.iter().enumerate() {
        let name = o["name"].as_str().unwrap_or("");
        owned_names.push(name);
        let Some(crd) = crds.get(name) else {
            report.problems.push(format!(
                "{csv_file}: owned CRD {name:?} (spec.customresourcedefinitions.owned[{i}]) has no \
                 CRD file in the bundle"
            ));
            continue;
        };
        let crd_file = file_name(&crd.file);
        let crd_kind = &crd.value["spec"]["names"]["kind"];
        if o["kind"] != *crd_kind {
            report.problems.push(format!(
                "{csv_file}: owned CRD {name} has kind {}, but {crd_file} defines kind {crd_kind}",
                o["kind"]
            ));
        }
        let version = o["version"].as_str().unwrap_or("");
        let served = crd_versions(&crd.value);
        if !served.iter().any(|v| v == version) {
            report.problems.push(format!(
                "{csv_file}: owned CRD {name} version {version:?} is not served by {crd_file} \
                 (served: {})",
                served.join(", ")
            ));
        }
    }
    for (name, crd) in crds {
        let required = csv["spec"]["customresourcedefinitions"]["required"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x["name"] == name.as_str()));
        if !owned_names.contains(&name.as_str()) && !required {
            report.problems.push(format!(
                "{}: CRD {name} is in the bundle but not listed in the CSV's owned CRDs",
                file_name(&crd.file)
            ));
        }
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
        report
            .notes
            .push(format!("{csv_file}: no alm-examples annotation"));
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
    let owned: Vec<&str> = csv["spec"]["customresourcedefinitions"]["owned"]
        .as_array()
        .map(|o| o.iter().filter_map(|x| x["name"].as_str()).collect())
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
        if !owned.contains(&crd_name) {
            report
                .problems
                .push(format!("{label}: CRD {crd_name} is not an owned CRD"));
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
