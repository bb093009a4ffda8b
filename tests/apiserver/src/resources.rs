//! The table of resources the test server serves.
//!
//! Built-in kinds come from a static table (group, version, resource, kind, scope, short
//! names); custom resources are added when a `CustomResourceDefinition` is stored and removed
//! when it is deleted. Every handler resolves a URL to a [`ResourceType`] through the
//! [`Registry`], which also hands out a generation number used as the OpenAPI hash.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use meshlet_crds::validation::SchemaValidator;
use serde_json::Value;

/// Failures of reading a CRD into resource types.
#[derive(Debug, thiserror::Error)]
pub enum ResourcesError {
    /// The CRD JSON does not decode into a `CustomResourceDefinition`.
    #[error("decode CustomResourceDefinition: {0}")]
    DecodeCrd(String),
    /// The CRD's schema is not structural or a CEL rule does not compile.
    #[error("spec.versions[{version}].schema.openAPIV3Schema: {message}")]
    CompileSchema {
        /// Version whose schema failed.
        version: String,
        /// What the validator said.
        message: String,
    },
}

/// A printer column of a custom resource (`additionalPrinterColumns`).
#[derive(Debug, Clone)]
pub struct PrinterColumn {
    /// Column header.
    pub name: String,
    /// OpenAPI type of the column.
    pub type_: String,
    /// Simple JSONPath (`.spec.x`) of the value.
    pub json_path: String,
    /// Priority; 0 shows by default.
    pub priority: i64,
}

/// One servable resource (one group/version/resource).
#[derive(Clone)]
pub struct ResourceType {
    /// API group, empty for core.
    pub group: String,
    /// API version.
    pub version: String,
    /// Plural resource name used in URLs.
    pub resource: String,
    /// Singular name.
    pub singular: String,
    /// Kind.
    pub kind: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Short names for kubectl.
    pub short_names: Vec<String>,
    /// Categories for kubectl (`kubectl get meshlet`).
    pub categories: Vec<String>,
    /// Whether `status` is a separate subresource.
    pub has_status: bool,
    /// Schema validator of a custom resource; `None` for built-ins.
    pub validator: Option<Arc<SchemaValidator>>,
    /// The OpenAPI v3 schema of a custom resource (for `kubectl explain`).
    pub schema: Option<Value>,
    /// Name of the CRD that defines this resource.
    pub crd_name: Option<String>,
    /// Printer columns of a custom resource.
    pub printer_columns: Vec<PrinterColumn>,
    /// A create-only review (access or token review): answered, never stored.
    pub review: bool,
}

impl std::fmt::Debug for ResourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.group_resource())
    }
}

impl ResourceType {
    fn builtin(
        group: &str,
        version: &str,
        resource: &str,
        kind: &str,
        namespaced: bool,
        short_names: &[&str],
        has_status: bool,
    ) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            resource: resource.into(),
            singular: kind.to_ascii_lowercase(),
            kind: kind.into(),
            namespaced,
            short_names: short_names.iter().map(|s| s.to_string()).collect(),
            categories: Vec::new(),
            has_status,
            validator: None,
            schema: None,
            crd_name: None,
            printer_columns: Vec::new(),
            review: false,
        }
    }

    /// `apiVersion` of objects of this resource.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `resource.group` (or just `resource` for core), as used in messages and storage keys.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    /// `Kind.group` as used in validation messages.
    pub fn group_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// Whether this is a custom resource.
    pub fn is_custom(&self) -> bool {
        self.crd_name.is_some()
    }
}

/// The built-in resources Meshlet's components and kubectl use.
pub fn builtins() -> Vec<ResourceType> {
    let mut all = builtin_types();
    for t in &mut all {
        t.printer_columns = builtin_columns(&t.resource);
    }
    for (group, resource, kind, namespaced) in crate::reviews::REVIEWS {
        let mut t = ResourceType::builtin(group, "v1", resource, kind, *namespaced, &[], false);
        t.review = true;
        all.push(t);
    }
    all
}

/// `kubectl get` columns of the built-in workload kinds (server-side printing), close to
/// kube-apiserver's; readiness shows as the Ready condition's status.
fn builtin_columns(resource: &str) -> Vec<PrinterColumn> {
    let ready = r#".status.conditions[?(@.type=="Ready")].status"#;
    let cols: &[(&str, &str, &str, i64)] = match resource {
        "nodes" => &[
            ("Ready", "string", ready, 0),
            ("Version", "string", ".status.nodeInfo.kubeletVersion", 0),
            ("Internal-IP", "string", ".status.addresses[0].address", 1),
        ],
        "pods" => &[
            ("Ready", "string", ready, 0),
            ("Status", "string", crate::handlers::POD_STATUS_COLUMN, 0),
            (
                "Restarts",
                "integer",
                ".status.containerStatuses[0].restartCount",
                0,
            ),
            ("IP", "string", ".status.podIP", 1),
            ("Node", "string", ".spec.nodeName", 1),
        ],
        "daemonsets" => &[
            ("Desired", "integer", ".status.desiredNumberScheduled", 0),
            ("Current", "integer", ".status.currentNumberScheduled", 0),
            ("Ready", "integer", ".status.numberReady", 0),
            ("Up-to-date", "integer", ".status.updatedNumberScheduled", 0),
            ("Available", "integer", ".status.numberAvailable", 0),
        ],
        "deployments" => &[
            ("Ready", "integer", ".status.readyReplicas", 0),
            ("Up-to-date", "integer", ".status.updatedReplicas", 0),
            ("Available", "integer", ".status.availableReplicas", 0),
        ],
        _ => &[],
    };
    cols.iter()
        .map(|(name, type_, path, priority)| PrinterColumn {
            name: (*name).into(),
            type_: (*type_).into(),
            json_path: (*path).into(),
            priority: *priority,
        })
        .collect()
}

fn builtin_types() -> Vec<ResourceType> {
    let b = ResourceType::builtin;
    vec![
        b("", "v1", "namespaces", "Namespace", false, &["ns"], true),
        b("", "v1", "nodes", "Node", false, &["no"], true),
        b("", "v1", "pods", "Pod", true, &["po"], true),
        b("", "v1", "services", "Service", true, &["svc"], true),
        b("", "v1", "configmaps", "ConfigMap", true, &["cm"], false),
        b("", "v1", "secrets", "Secret", true, &[], false),
        b(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            false,
        ),
        b("", "v1", "events", "Event", true, &["ev"], false),
        b(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "EndpointSlice",
            true,
            &[],
            false,
        ),
        b("apps", "v1", "daemonsets", "DaemonSet", true, &["ds"], true),
        b(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            true,
            &["deploy"],
            true,
        ),
        b(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            &[],
            false,
        ),
        b(
            "events.k8s.io",
            "v1",
            "events",
            "Event",
            true,
            &["ev"],
            false,
        ),
        b(
            "rbac.authorization.k8s.io",
            "v1",
            "roles",
            "Role",
            true,
            &[],
            false,
        ),
        b(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
            &[],
            false,
        ),
        b(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
            &[],
            false,
        ),
        b(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            &[],
            false,
        ),
        b(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            true,
        ),
    ]
}

/// Reads a CRD into one [`ResourceType`] per served version, compiling each schema.
pub fn from_crd(crd_json: &Value) -> Result<Vec<ResourceType>, ResourcesError> {
    let crd: CustomResourceDefinition = serde_json::from_value(crd_json.clone())
        .map_err(|e| ResourcesError::DecodeCrd(e.to_string()))?;
    let spec = &crd.spec;
    let mut out = Vec::new();
    for version in spec.versions.iter().filter(|v| v.served) {
        let validator = SchemaValidator::for_crd(&crd, &version.name).map_err(|e| {
            ResourcesError::CompileSchema {
                version: version.name.clone(),
                message: e.to_string(),
            }
        })?;
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok());
        out.push(ResourceType {
            group: spec.group.clone(),
            version: version.name.clone(),
            resource: spec.names.plural.clone(),
            singular: spec
                .names
                .singular
                .clone()
                .unwrap_or_else(|| spec.names.kind.to_ascii_lowercase()),
            kind: spec.names.kind.clone(),
            namespaced: spec.scope == "Namespaced",
            short_names: spec.names.short_names.clone().unwrap_or_default(),
            categories: spec.names.categories.clone().unwrap_or_default(),
            has_status: version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some()),
            validator: Some(Arc::new(validator)),
            schema,
            crd_name: crd.metadata.name.clone(),
            printer_columns: version
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| PrinterColumn {
                    name: c.name.clone(),
                    type_: c.type_.clone(),
                    json_path: c.json_path.clone(),
                    priority: i64::from(c.priority.unwrap_or(0)),
                })
                .collect(),
            review: false,
        });
    }
    Ok(out)
}

#[derive(Default)]
struct RegistryInner {
    /// (group, version, resource) → type.
    types: BTreeMap<(String, String, String), Arc<ResourceType>>,
    generation: u64,
}

/// All resource types currently served.
#[derive(Default)]
pub struct Registry {
    inner: RwLock<RegistryInner>,
}

impl Registry {
    /// A registry holding the built-in resources.
    pub fn with_builtins() -> Self {
        let reg = Self::default();
        for t in builtins() {
            reg.insert(t);
        }
        reg
    }

    fn insert(&self, t: ResourceType) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.types.insert(
            (t.group.clone(), t.version.clone(), t.resource.clone()),
            Arc::new(t),
        );
        inner.generation += 1;
    }

    /// Serves the given custom resource types, replacing those of the same CRD.
    pub fn register_crd(&self, crd_name: &str, types: Vec<ResourceType>) {
        self.unregister_crd(crd_name);
        for t in types {
            self.insert(t);
        }
    }

    /// Stops serving every version of the CRD `crd_name`.
    pub fn unregister_crd(&self, crd_name: &str) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner
            .types
            .retain(|_, t| t.crd_name.as_deref() != Some(crd_name));
        inner.generation += 1;
    }

    /// Looks a resource up by group, version and plural name.
    pub fn get(&self, group: &str, version: &str, resource: &str) -> Option<Arc<ResourceType>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .types
            .get(&(group.to_string(), version.to_string(), resource.to_string()))
            .cloned()
    }

    /// Looks a resource up by group and kind (any version).
    pub fn by_kind(&self, group: &str, kind: &str) -> Option<Arc<ResourceType>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .types
            .values()
            .find(|t| t.group == group && t.kind == kind)
            .cloned()
    }

    /// Every served resource, sorted by group, version, resource.
    pub fn all(&self) -> Vec<Arc<ResourceType>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.types.values().cloned().collect()
    }

    /// Changes whenever the set of resources changes.
    pub fn generation(&self) -> u64 {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .generation
    }
}
