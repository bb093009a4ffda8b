//! HTTP request handling: routing, authentication, authorization and the verbs.
//!
//! ```text
//!  request ──► authenticate (bearer token, else system:anonymous; impersonation)
//!          ──► non-resource path? (/version, /healthz, discovery, OpenAPI) ──► RBAC on the path
//!          ──► route (path → ResourceType, namespace, name, subresource) ──► RBAC
//!          ──► review (access/token reviews: answered, never stored)
//!            | get | list | watch | create | update | patch | apply | delete
//!                      └─► admit: metadata, status split, CRD schema (prune, default,
//!                          validate, CEL), generation, managedFields ──► Store
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use http::{HeaderMap, Method, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::Server;
use crate::apply::{self, ApplyError, Writer};
use crate::authn::User;
use crate::discovery;
use crate::impersonation::{self, ImpersonationError};
use crate::patch::{self, PatchError};
use crate::proto::{self, ProtoError};
use crate::rbac::{self, Attributes};
use crate::resources::{self, ResourceType};
use crate::reviews::{ReviewError, Reviewer};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{ApiError, Cause, Subject};
use crate::store::{Event, EventType, Precondition, StoreError, rv_of};

type Query = HashMap<String, String>;

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> Query {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn json_response(code: u16, body: &Value, content_type: &str) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(bytes))
        .unwrap_or_default()
}

fn ok(body: &Value) -> Response {
    json_response(200, body, "application/json")
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code(), &e.to_status(), "application/json")
}

fn with_warnings(mut r: Response, warnings: &[String]) -> Response {
    for w in warnings {
        if let Ok(v) = http::HeaderValue::from_str(&format!("299 - \"{}\"", w.replace('"', "\\\"")))
        {
            r.headers_mut().append("Warning", v);
        }
    }
    r
}

/// Current time in RFC 3339 (seconds precision, UTC).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil-from-days (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if ct.contains("protobuf") || ct.contains("cbor") {
        return Err(ApiError::UnsupportedMediaType {
            message: format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got \"{ct}\")"
            ),
        });
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(json_err) if ct.contains("yaml") => {
            let text = std::str::from_utf8(body).map_err(|e| {
                ApiError::bad_request(format!("the request body is not UTF-8: {e}"))
            })?;
            serde_saphyr::from_str::<Value>(text).map_err(|e| {
                ApiError::bad_request(format!(
                    "the request body is neither valid JSON ({json_err}) nor valid YAML: {e}"
                ))
            })
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "couldn't decode the request body: json parse error: {e}"
        ))),
    }
}

/// A request routed to a resource.
struct Target {
    rt: Arc<ResourceType>,
    namespace: String,
    name: String,
    sub: String,
    watch_path: bool,
}

impl Target {
    fn clone_shallow(&self) -> Self {
        Self {
            rt: self.rt.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            sub: self.sub.clone(),
            watch_path: self.watch_path,
        }
    }

    fn gr(&self) -> String {
        self.rt.group_resource()
    }

    fn subject(&self) -> Subject {
        Subject {
            name: self.name.clone(),
            group: self.rt.group.clone(),
            kind: self.rt.resource.clone(),
        }
    }

    fn not_found(&self) -> ApiError {
        ApiError::NotFound {
            message: format!("{} \"{}\" not found", self.gr(), self.name),
            subject: self.subject(),
        }
    }
}

fn not_found_path() -> ApiError {
    ApiError::NotFound {
        message: "the server could not find the requested resource".into(),
        subject: Subject::default(),
    }
}

fn route(srv: &Server, segs: &[&str]) -> Result<Target, ApiError> {
    let (group, version, mut rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found_path()),
    };
    let mut watch_path = false;
    if rest.first() == Some(&"watch") {
        watch_path = true;
        rest = &rest[1..];
    }
    let mut namespace = "";
    if rest.len() >= 3
        && rest[0] == "namespaces"
        && !(rest.len() == 3 && matches!(rest[2], "status" | "finalize"))
    {
        namespace = rest[1];
        rest = &rest[2..];
    }
    let (resource, name, sub) = match rest {
        [r] => (*r, "", ""),
        [r, n] => (*r, *n, ""),
        [r, n, s] => (*r, *n, *s),
        _ => return Err(not_found_path()),
    };
    let rt = srv
        .registry
        .get(group, version, resource)
        .ok_or_else(not_found_path)?;
    if (!rt.namespaced && !namespace.is_empty())
        || (rt.namespaced && namespace.is_empty() && !name.is_empty())
    {
        return Err(not_found_path());
    }
    if !(sub.is_empty() || (sub == "status" && rt.has_status)) {
        return Err(not_found_path());
    }
    Ok(Target {
        rt,
        namespace: namespace.to_string(),
        name: name.to_string(),
        sub: sub.to_string(),
        watch_path,
    })
}

/// Entry point for every request.
pub async fn handle(State(srv): State<Arc<Server>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let query = parse_query(parts.uri.query());
    let path = parts.uri.path().to_string();
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let result = async {
        let user = authenticate(&srv, &parts.headers)?;
        let accept = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if let Some(response) = non_resource(&srv, &user, &parts.method, &path, &segs, &accept) {
            return response;
        }
        let target = route(&srv, &segs)?;
        let body = axum::body::to_bytes(body, 64 << 20)
            .await
            .map_err(|e| ApiError::bad_request(format!("failed to read the request body: {e}")))?;
        let is_watch = target.watch_path
            || matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        let verb = match (&parts.method, target.name.is_empty()) {
            (&Method::GET, _) if is_watch => "watch",
            (&Method::GET, true) => "list",
            (&Method::GET, false) => "get",
            (&Method::POST, true) => "create",
            (&Method::PUT, false) => "update",
            (&Method::PATCH, false) => "patch",
            (&Method::DELETE, false) => "delete",
            (&Method::DELETE, true) => "deletecollection",
            _ => return Err(ApiError::MethodNotAllowed),
        };
        if target.rt.review && verb != "create" {
            return Err(ApiError::MethodNotAllowed);
        }
        // Like the real server, a list or watch narrowed to one name by a field selector is
        // authorized for that name (so `resourceNames` rules apply).
        let selected_name = if matches!(verb, "list" | "watch") && target.name.is_empty() {
            query
                .get("fieldSelector")
                .and_then(|f| FieldSelector::parse(f).ok())
                .and_then(|f| f.required_name().map(str::to_string))
        } else {
            None
        };
        match selected_name {
            Some(name) => {
                let narrowed = Target {
                    name,
                    ..target.clone_shallow()
                };
                authorize(&srv, &user, &narrowed, verb)?;
            }
            None => authorize(&srv, &user, &target, verb)?,
        }
        let ctx = Ctx {
            srv: &srv,
            user: &user,
            query: &query,
            headers: &parts.headers,
            accept: &accept,
        };
        if target.rt.review {
            return review(&ctx, &target, &body);
        }
        match verb {
            "watch" => watch(&ctx, &target),
            "list" => list(&ctx, &target),
            "get" => get(&ctx, &target),
            "create" => create(&ctx, &target, &body),
            "update" => update(&ctx, &target, &body),
            "patch" => patch_request(&ctx, &target, &body),
            "delete" => delete(&ctx, &target, &body),
            _ => delete_collection(&ctx, &target),
        }
    }
    .await;
    match result {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(code = e.code(), error = %e, %path, "request refused");
            error_response(&e)
        }
    }
}

/// Serves the paths that are not API resources: health, version, discovery and OpenAPI,
/// each authorized as a non-resource URL (the default policy opens `/version` and health to
/// everyone and discovery to authenticated users). `None` for resource paths.
fn non_resource(
    srv: &Server,
    user: &User,
    method: &Method,
    path: &str,
    segs: &[&str],
    accept: &str,
) -> Option<Result<Response, ApiError>> {
    let is_resource = matches!(segs, ["api", _, _, ..] | ["apis", _, _, _, ..]);
    if is_resource {
        return None;
    }
    let verb = method.as_str().to_ascii_lowercase();
    let request = rbac::Request::NonResource { verb: &verb, path };
    if !rbac::decide(&srv.store, user, &request).allowed {
        return Some(Err(ApiError::Forbidden {
            message: rbac::forbidden_path_message(user, &verb, path),
            subject: Subject::default(),
        }));
    }
    if method != Method::GET {
        return Some(Err(ApiError::MethodNotAllowed));
    }
    let aggregated = accept.contains("as=APIGroupDiscoveryList") && accept.contains("v=v2");
    Some(match segs {
        ["healthz"] | ["readyz"] | ["livez"] => Ok(Response::new(Body::from("ok"))),
        ["version"] => Ok(ok(
            &json!({"major": "1", "minor": "37", "gitVersion": "v1.37.1-meshlet-test",
            "platform": "linux/amd64", "goVersion": "n/a (meshlet test server)"}),
        )),
        ["api"] if aggregated => Ok(json_response(
            200,
            &discovery::aggregated(&srv.registry, true),
            discovery::AGGREGATED_V2,
        )),
        ["apis"] if aggregated => Ok(json_response(
            200,
            &discovery::aggregated(&srv.registry, false),
            discovery::AGGREGATED_V2,
        )),
        ["api"] => Ok(ok(&discovery::api_versions())),
        ["apis"] => Ok(ok(&discovery::api_group_list(&srv.registry))),
        ["api", v] => discovery::api_resource_list(&srv.registry, "", v)
            .map(|d| ok(&d))
            .map_err(|_| not_found_path()),
        ["apis", g] => discovery::api_group(&srv.registry, g)
            .map(|d| ok(&d))
            .map_err(|_| not_found_path()),
        ["apis", g, v] => discovery::api_resource_list(&srv.registry, g, v)
            .map(|d| ok(&d))
            .map_err(|_| not_found_path()),
        ["openapi", "v2"] if accept.contains("protobuf") => Ok(Response::builder()
            .header(header::CONTENT_TYPE, discovery::OPENAPI_V2_PROTOBUF)
            .body(Body::empty())
            .unwrap_or_default()),
        ["openapi", "v2"] => Ok(ok(&discovery::openapi_v2())),
        ["openapi", "v3"] => Ok(ok(&discovery::openapi_root(&srv.registry))),
        ["openapi", "v3", rest @ ..] => {
            discovery::openapi_group_version(&srv.registry, &rest.join("/"))
                .map(|d| ok(&d))
                .map_err(|_| not_found_path())
        }
        _ => Err(not_found_path()),
    })
}

/// Who the request is: its bearer token's user (401 for an unknown token), else
/// `system:anonymous`; then any `Impersonate-*` headers, checked with RBAC.
fn authenticate(srv: &Server, headers: &HeaderMap) -> Result<User, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty());
    let user = match token {
        Some(token) => srv
            .identities
            .authenticate(token, &srv.store)
            .map_err(|_| ApiError::Unauthorized)?,
        None => User::anonymous(),
    };
    impersonation::impersonate(&srv.store, user, headers).map_err(|e| match e {
        ImpersonationError::Impersonate {
            message,
            group,
            resource,
            name,
        } => ApiError::Forbidden {
            message,
            subject: Subject {
                name,
                group,
                kind: resource,
            },
        },
        other => ApiError::bad_request(other.to_string()),
    })
}

/// Answers an access or token review (201, never stored).
fn review(ctx: &Ctx<'_>, t: &Target, body: &[u8]) -> Result<Response, ApiError> {
    let ct = ctx
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let doc = if ct.contains("protobuf") {
        proto::decode_review(body).map_err(|e| match e {
            ProtoError::DecodeKind { .. } => ApiError::UnsupportedMediaType {
                message: e.to_string(),
            },
            other => ApiError::bad_request(other.to_string()),
        })?
    } else {
        parse_body(ctx.headers, body)?
    };
    if let Some(kind) = doc.get("kind").and_then(Value::as_str)
        && !kind.is_empty()
        && kind != t.rt.kind
    {
        return Err(ApiError::bad_request(format!(
            "the body is a {kind}, but this endpoint creates {}",
            t.rt.kind
        )));
    }
    let reviewer = Reviewer {
        store: &ctx.srv.store,
        identities: &ctx.srv.identities,
        requester: ctx.user,
    };
    let mut out = reviewer
        .answer(&t.rt.kind, &t.namespace, doc)
        .map_err(|e| match e {
            ReviewError::ValidateReview { field, message, .. } => invalid(
                t,
                "",
                vec![Cause {
                    reason: if message == "Required value" {
                        "FieldValueRequired".into()
                    } else {
                        "FieldValueInvalid".into()
                    },
                    message,
                    field,
                }],
            ),
            other => ApiError::bad_request(other.to_string()),
        })?;
    out["apiVersion"] = json!(t.rt.api_version());
    out["kind"] = json!(t.rt.kind);
    Ok(json_response(201, &out, "application/json"))
}

fn authorize(srv: &Server, user: &User, t: &Target, verb: &str) -> Result<(), ApiError> {
    let attrs = Attributes {
        verb,
        group: &t.rt.group,
        resource: &t.rt.resource,
        subresource: &t.sub,
        namespace: &t.namespace,
        name: &t.name,
    };
    if rbac::allowed(&srv.store, user, &attrs) {
        return Ok(());
    }
    Err(ApiError::Forbidden {
        message: rbac::forbidden_message(user, &attrs, &t.gr()),
        subject: t.subject(),
    })
}

struct Ctx<'a> {
    srv: &'a Server,
    user: &'a User,
    query: &'a Query,
    headers: &'a HeaderMap,
    accept: &'a str,
}

impl Ctx<'_> {
    fn manager(&self, default: &str) -> String {
        if let Some(m) = self.query.get("fieldManager").filter(|m| !m.is_empty()) {
            return m.clone();
        }
        self.headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .filter(|s| !s.is_empty())
            .unwrap_or(default)
            .to_string()
    }

    fn dry_run(&self) -> bool {
        self.query.get("dryRun").is_some_and(|v| v == "All")
    }
}

fn output(rt: &ResourceType, obj: &Value) -> Value {
    let mut o = obj.clone();
    o["apiVersion"] = json!(rt.api_version());
    o["kind"] = json!(rt.kind);
    o
}

fn get(ctx: &Ctx<'_>, t: &Target) -> Result<Response, ApiError> {
    let obj = ctx
        .srv
        .store
        .get(&t.gr(), &t.namespace, &t.name)
        .ok_or_else(|| t.not_found())?;
    if wants_table(ctx.accept) {
        return Ok(ok(&table(&t.rt, &[obj], ctx.srv.store.current_rv(), None)));
    }
    Ok(ok(&output(&t.rt, &obj)))
}

fn wants_table(accept: &str) -> bool {
    accept.contains("as=Table")
}

fn selectors(q: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let ls = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let fs = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok((ls, fs))
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    String::from_utf8(bytes?).ok()
}

fn list(ctx: &Ctx<'_>, t: &Target) -> Result<Response, ApiError> {
    let (ls, fs) = selectors(ctx.query)?;
    let ns = (!t.namespace.is_empty()).then_some(t.namespace.as_str());
    let (items, rv) = ctx.srv.store.list(&t.gr(), ns);
    let mut start_after: Option<(String, String)> = None;
    let mut list_rv = rv;
    if let Some(token) = ctx.query.get("continue").filter(|c| !c.is_empty()) {
        let decoded = unhex(token)
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
        let token_rv = decoded["rv"].as_u64().unwrap_or(0);
        if ctx.srv.store.is_compacted(token_rv) {
            return Err(ApiError::Gone {
                message: "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
            });
        }
        list_rv = token_rv;
        start_after = Some((
            decoded["ns"].as_str().unwrap_or_default().to_string(),
            decoded["name"].as_str().unwrap_or_default().to_string(),
        ));
    }
    let limit: usize = ctx
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let key = |o: &Value| {
        (
            o.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            o.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        )
    };
    let mut matching = items
        .into_iter()
        .filter(|o| start_after.as_ref().is_none_or(|s| key(o) > *s))
        .filter(|o| ls.matches(o) && fs.matches(o));
    let page: Vec<_> = matching.by_ref().take(limit).collect();
    let remaining = matching.count();
    let continue_token = (remaining > 0).then(|| {
        let (ns, name) = page.last().map(|o| key(o)).unwrap_or_default();
        hex(&json!({"rv": list_rv, "ns": ns, "name": name}).to_string())
    });
    if wants_table(ctx.accept) {
        return Ok(ok(&table(&t.rt, &page, list_rv, continue_token)));
    }
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if let Some(c) = continue_token {
        meta["continue"] = json!(c);
        meta["remainingItemCount"] = json!(remaining);
    }
    let items: Vec<Value> = page.iter().map(|o| output(&t.rt, o)).collect();
    Ok(ok(&json!({
        "kind": format!("{}List", t.rt.kind),
        "apiVersion": t.rt.api_version(),
        "metadata": meta,
        "items": items,
    })))
}

/// The pods' `Status` column: computed as kubectl's and kube-apiserver's pod printer does
/// (a waiting or terminated container's reason, `Init:…`, `Terminating`), not a JSONPath.
pub const POD_STATUS_COLUMN: &str = "<pod status>";

/// The reason `kubectl get pods` shows for a pod.
fn pod_status(pod: &Value) -> Value {
    let status = &pod["status"];
    let mut reason = status["reason"]
        .as_str()
        .or_else(|| status["phase"].as_str())
        .unwrap_or("Pending")
        .to_string();
    let code_reason = |t: &Value, prefix: &str| -> String {
        match t["reason"].as_str().filter(|r| !r.is_empty()) {
            Some(r) => format!("{prefix}{r}"),
            None => match t["signal"].as_i64().filter(|s| *s != 0) {
                Some(sig) => format!("{prefix}Signal:{sig}"),
                None => format!("{prefix}ExitCode:{}", t["exitCode"].as_i64().unwrap_or(0)),
            },
        }
    };
    let inits = status["initContainerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut initializing = false;
    for (i, c) in inits.iter().enumerate() {
        let state = &c["state"];
        if state["terminated"]["exitCode"].as_i64() == Some(0) {
            continue;
        }
        initializing = true;
        reason = if state["terminated"].is_object() {
            code_reason(&state["terminated"], "Init:")
        } else if let Some(w) = state["waiting"]["reason"]
            .as_str()
            .filter(|r| !r.is_empty() && *r != "PodInitializing")
        {
            format!("Init:{w}")
        } else {
            format!("Init:{i}/{}", inits.len())
        };
        break;
    }
    if !initializing {
        let mut running = false;
        for c in status["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .rev()
        {
            let state = &c["state"];
            if let Some(w) = state["waiting"]["reason"]
                .as_str()
                .filter(|r| !r.is_empty())
            {
                reason = w.to_string();
            } else if state["terminated"].is_object() {
                reason = code_reason(&state["terminated"], "");
            } else if state["running"].is_object() && c["ready"].as_bool() == Some(true) {
                running = true;
            }
        }
        if reason == "Completed" && running {
            reason = "Running".into();
        }
    }
    if pod["metadata"]["deletionTimestamp"].is_string() {
        reason = "Terminating".into();
    }
    Value::String(reason)
}

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `[n]` and
/// `[?(@.field=="value")]` (first match).
fn simple_json_path(obj: &Value, path: &str) -> Option<Value> {
    let mut cur = obj.clone();
    let mut rest = path.trim();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            if end > 0 {
                cur = cur.get(&r[..end])?.clone();
            }
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = &r[..end];
            rest = &r[end + 1..];
            if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (field, want) = filter.split_once("==")?;
                let want = want.trim().trim_matches(|c| c == '"' || c == '\'');
                cur = cur
                    .as_array()?
                    .iter()
                    .find(|i| i.get(field.trim()).and_then(Value::as_str) == Some(want))?
                    .clone();
            } else {
                cur = cur.get(inner.parse::<usize>().ok()?)?.clone();
            }
        } else {
            return None;
        }
    }
    Some(cur)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp (`2026-01-02T03:04:05Z`).
fn parse_rfc3339(ts: &str) -> Option<i64> {
    let n = |r: std::ops::Range<usize>| ts.get(r).and_then(|s| s.parse::<i64>().ok());
    let days = days_from_civil(n(0..4)?, n(5..7)?, n(8..10)?);
    Some(days * 86400 + n(11..13)? * 3600 + n(14..16)? * 60 + n(17..19)?)
}

/// kubectl-style age (`42s`, `5m`, `3h`, `2d`) of a timestamp.
fn age(ts: &Value) -> Value {
    let Some(then) = ts.as_str().and_then(parse_rfc3339) else {
        return json!("<unknown>");
    };
    let now = parse_rfc3339(&now_rfc3339()).unwrap_or(then);
    let d = (now - then).max(0);
    json!(match d {
        0..120 => format!("{d}s"),
        120..7200 => format!("{}m", d / 60),
        7200..172_800 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    })
}

fn table(rt: &ResourceType, items: &[Arc<Value>], rv: u64, cont: Option<String>) -> Value {
    let mut columns = vec![json!({"name": "Name", "type": "string", "format": "name",
        "description": "Name of the object", "priority": 0})];
    for c in &rt.printer_columns {
        let type_ = if c.type_ == "date" {
            "string"
        } else {
            c.type_.as_str()
        };
        columns.push(json!({"name": c.name, "type": type_, "format": "", "description": "", "priority": c.priority}));
    }
    let has_age = rt.printer_columns.iter().any(|c| c.name == "Age");
    if !has_age {
        columns.push(json!({"name": "Age", "type": "string", "format": "", "description": "", "priority": 0}));
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o.pointer("/metadata/name").cloned().unwrap_or(Value::Null)];
            for c in &rt.printer_columns {
                let v = if c.json_path == POD_STATUS_COLUMN {
                    pod_status(o)
                } else {
                    simple_json_path(o, &c.json_path).unwrap_or(Value::Null)
                };
                cells.push(if c.type_ == "date" { age(&v) } else { v });
            }
            if !has_age {
                cells.push(age(o
                    .pointer("/metadata/creationTimestamp")
                    .unwrap_or(&Value::Null)));
            }
            let meta = o.get("metadata").cloned().unwrap_or(Value::Null);
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1", "metadata": meta}})
        })
        .collect();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
           "columnDefinitions": columns, "rows": rows})
}

fn watch_line(kind: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

struct WatchFilter {
    gr: String,
    namespace: String,
    ls: LabelSelector,
    fs: FieldSelector,
    rt: Arc<ResourceType>,
    table: bool,
}

impl WatchFilter {
    fn matches(&self, o: &Value) -> bool {
        self.ls.matches(o) && self.fs.matches(o)
    }

    fn render(&self, o: &Value) -> Value {
        if self.table {
            table(&self.rt, &[Arc::new(o.clone())], rv_of(o), None)
        } else {
            output(&self.rt, o)
        }
    }

    /// The line to send for a store event, if the watcher sees it.
    fn line(&self, ev: &Event) -> Option<Bytes> {
        if ev.gr != self.gr || (!self.namespace.is_empty() && ev.namespace != self.namespace) {
            return None;
        }
        let now = self.matches(&ev.object);
        let before = ev.prev.as_ref().is_some_and(|p| self.matches(p));
        let kind = match ev.kind {
            EventType::Added if now => "ADDED",
            EventType::Deleted if before || now => "DELETED",
            EventType::Modified if now && before => "MODIFIED",
            EventType::Modified if now => "ADDED",
            EventType::Modified if before => "DELETED",
            _ => return None,
        };
        Some(watch_line(kind, &self.render(&ev.object)))
    }
}

fn watch(ctx: &Ctx<'_>, t: &Target) -> Result<Response, ApiError> {
    let (ls, fs) = selectors(ctx.query)?;
    let filter = WatchFilter {
        gr: t.gr(),
        namespace: t.namespace.clone(),
        ls,
        fs: if t.name.is_empty() {
            fs
        } else {
            FieldSelector::parse(&format!("metadata.name={}", t.name))
                .map_err(|e| ApiError::bad_request(e.to_string()))?
        },
        rt: t.rt.clone(),
        table: wants_table(ctx.accept),
    };
    let requested = ctx
        .query
        .get("resourceVersion")
        .cloned()
        .unwrap_or_default();
    let bookmarks = ctx
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let send_initial = ctx
        .query
        .get("sendInitialEvents")
        .is_some_and(|v| v == "true");
    let timeout = ctx
        .query
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let mut initial = Vec::new();
    let from = if requested.is_empty() || requested == "0" || send_initial {
        let ns = (!t.namespace.is_empty()).then_some(t.namespace.as_str());
        let (items, rv) = ctx.srv.store.list(&t.gr(), ns);
        for o in items.iter().filter(|o| filter.matches(o)) {
            initial.push(watch_line("ADDED", &filter.render(o)));
        }
        if send_initial && bookmarks {
            initial.push(watch_line(
                "BOOKMARK",
                &json!({"kind": t.rt.kind, "apiVersion": t.rt.api_version(),
                    "metadata": {"resourceVersion": rv.to_string(),
                        "annotations": {"k8s.io/initial-events-end": "true"}}}),
            ));
        }
        rv
    } else {
        requested
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version: {requested}")))?
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    match ctx.srv.store.watch_from(from) {
        Err(StoreError::WatchFromCompacted { requested, oldest }) => {
            // The real server answers 200 and sends one ERROR event with a 410 Status.
            ctx.srv.expired_watches.fetch_add(1, Ordering::Relaxed);
            let status = ApiError::Gone {
                message: format!("too old resource version: {requested} ({oldest})"),
            }
            .to_status();
            let line = watch_line("ERROR", &status);
            tokio::spawn(async move {
                let _ = tx.send(Ok(line)).await;
            });
        }
        Err(e) => {
            return Err(ApiError::Internal {
                message: e.to_string(),
            });
        }
        Ok((backlog, mut live)) => {
            let bookmark_every = ctx.srv.opts.bookmark_interval;
            let bookmark_template = json!({"kind": t.rt.kind, "apiVersion": t.rt.api_version()});
            let store_rv = {
                let srv = ctx.srv.shared();
                move || srv.store.current_rv()
            };
            let mut epoch = ctx.srv.watch_epoch.subscribe();
            tokio::spawn(async move {
                for line in initial {
                    if tx.send(Ok(line)).await.is_err() {
                        return;
                    }
                }
                let mut last = from;
                for ev in backlog {
                    last = ev.rv;
                    if let Some(line) = filter.line(&ev)
                        && tx.send(Ok(line)).await.is_err()
                    {
                        return;
                    }
                }
                let deadline = tokio::time::sleep(timeout);
                tokio::pin!(deadline);
                let mut ticker = tokio::time::interval(bookmark_every);
                ticker.tick().await;
                loop {
                    tokio::select! {
                        _ = &mut deadline => return,
                        _ = tx.closed() => return,
                        _ = epoch.changed() => return,
                        _ = ticker.tick(), if bookmarks => {
                            let mut b = bookmark_template.clone();
                            let rv = store_rv().max(last);
                            b["metadata"] = json!({"resourceVersion": rv.to_string()});
                            if tx.send(Ok(watch_line("BOOKMARK", &b))).await.is_err() {
                                return;
                            }
                        }
                        ev = live.recv() => match ev {
                            Ok(ev) => {
                                if ev.rv <= last {
                                    continue;
                                }
                                last = ev.rv;
                                if let Some(line) = filter.line(&ev)
                                    && tx.send(Ok(line)).await.is_err()
                                {
                                    return;
                                }
                            }
                            // A watcher that fell behind is closed; it resumes from its
                            // last version like with the real server.
                            Err(broadcast::error::RecvError::Lagged(_)) => return,
                            Err(broadcast::error::RecvError::Closed) => return,
                        }
                    }
                }
            });
        }
    }
    let ct = if filter_is_table(ctx.accept) {
        "application/json;as=Table;v=v1;g=meta.k8s.io"
    } else {
        "application/json"
    };
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, ct)
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .map_err(|e| ApiError::Internal {
            message: e.to_string(),
        })
}

fn filter_is_table(accept: &str) -> bool {
    wants_table(accept)
}

fn random_suffix(srv: &Server) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = srv.next_random();
    (0..5)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
            x /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

fn new_uid(srv: &Server) -> String {
    let a = srv.next_random();
    let b = srv.next_random();
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) as u16,
        a as u16 & 0xfff,
        (b >> 48) as u16 & 0xfff,
        b & 0xffff_ffff_ffff
    )
}

fn spec_part(o: &Value) -> Value {
    let mut c = o.clone();
    if let Value::Object(m) = &mut c {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    c
}

fn comparable(o: &Value) -> Value {
    let mut c = o.clone();
    if let Some(Value::Object(m)) = c.get_mut("metadata") {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    c
}

/// Paths present in `before` but pruned from `after`.
fn pruned_paths(before: &Value, after: &Value, prefix: &str, out: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for (k, bv) in b {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match a.get(k) {
                    None => out.push(p),
                    Some(av) => pruned_paths(bv, av, &p, out),
                }
            }
        }
        (Value::Array(b), Value::Array(a)) if a.len() == b.len() => {
            for (i, (bv, av)) in b.iter().zip(a).enumerate() {
                pruned_paths(bv, av, &format!("{prefix}[{i}]"), out);
            }
        }
        _ => {}
    }
}

enum Op {
    Create,
    Update,
}

/// What a write does after admission.
struct Admitted {
    obj: Value,
    warnings: Vec<String>,
}

/// Metadata, status split, schema validation, generation and special kinds.
fn admit(
    ctx: &Ctx<'_>,
    t: &Target,
    old: Option<&Value>,
    mut new: Value,
    op: Op,
) -> Result<Admitted, ApiError> {
    let rt = &t.rt;
    if !new.is_object() {
        return Err(ApiError::bad_request("the object must be a JSON object"));
    }
    if let Some(kind) = new.get("kind").and_then(Value::as_str)
        && kind != rt.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind of the object ({kind}) does not match the resource {} (expected kind {})",
            t.gr(),
            rt.kind
        )));
    }
    if let Some(av) = new.get("apiVersion").and_then(Value::as_str)
        && av != rt.api_version()
    {
        return Err(ApiError::bad_request(format!(
            "the apiVersion of the object ({av}) does not match the request ({})",
            rt.api_version()
        )));
    }
    new["apiVersion"] = json!(rt.api_version());
    new["kind"] = json!(rt.kind);
    if !new.get("metadata").is_some_and(Value::is_object) {
        new["metadata"] = json!({});
    }
    let body_ns = new
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if rt.namespaced {
        if !body_ns.is_empty() && body_ns != t.namespace {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        new["metadata"]["namespace"] = json!(t.namespace);
    } else if let Value::Object(m) = &mut new["metadata"] {
        m.remove("namespace");
    }
    let body_name = new
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut warnings = Vec::new();
    match (&op, old) {
        (Op::Update, Some(old)) => {
            if !body_name.is_empty() && body_name != t.name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({})",
                    t.name
                )));
            }
            new["metadata"]["name"] = json!(t.name);
            for k in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match old.pointer(&format!("/metadata/{k}")) {
                    Some(v) => new["metadata"][k] = v.clone(),
                    None => {
                        if let Value::Object(m) = &mut new["metadata"] {
                            m.remove(k);
                        }
                    }
                }
            }
            if rt.has_status {
                if t.sub == "status" {
                    let status = new.get("status").cloned();
                    let mut merged = old.clone();
                    match status {
                        Some(s) => merged["status"] = s,
                        None => {
                            if let Value::Object(m) = &mut merged {
                                m.remove("status");
                            }
                        }
                    }
                    merged["metadata"]["managedFields"] = new
                        .pointer("/metadata/managedFields")
                        .cloned()
                        .unwrap_or(Value::Null);
                    if merged["metadata"]["managedFields"].is_null()
                        && let Value::Object(m) = &mut merged["metadata"]
                    {
                        m.remove("managedFields");
                    }
                    new = merged;
                } else {
                    match old.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Value::Object(m) = &mut new {
                                m.remove("status");
                            }
                        }
                    }
                }
            }
        }
        _ => {
            if body_name.is_empty() {
                let prefix = new
                    .pointer("/metadata/generateName")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if prefix.is_empty() {
                    return Err(invalid(
                        t,
                        "",
                        vec![Cause {
                            reason: "FieldValueRequired".into(),
                            message: "Required value: name or generateName is required".into(),
                            field: "metadata.name".into(),
                        }],
                    ));
                }
                new["metadata"]["name"] = json!(format!("{prefix}{}", random_suffix(ctx.srv)));
            }
            new["metadata"]["uid"] = json!(new_uid(ctx.srv));
            new["metadata"]["creationTimestamp"] = json!(now_rfc3339());
            new["metadata"]["generation"] = json!(1);
            if let Value::Object(m) = &mut new["metadata"] {
                m.remove("deletionTimestamp");
                m.remove("resourceVersion");
            }
            if rt.has_status
                && rt.kind != "Namespace"
                && rt.kind != "Node"
                && rt.kind != "Pod"
                && let Value::Object(m) = &mut new
            {
                m.remove("status");
            }
        }
    }
    let name = new
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if let Some(validator) = &rt.validator {
        let before = new.clone();
        let old_for_rules = old.cloned();
        validator
            .admit(&mut new, old_for_rules.as_ref())
            .map_err(|errs| {
                invalid(
                    t,
                    &name,
                    errs.into_iter()
                        .map(|e| Cause {
                            reason: e.reason,
                            message: e.message,
                            field: e.field,
                        })
                        .collect(),
                )
            })?;
        let mut pruned = Vec::new();
        pruned_paths(&before, &new, "", &mut pruned);
        pruned.retain(|p| !p.starts_with("metadata"));
        if !pruned.is_empty() {
            match ctx.query.get("fieldValidation").map(String::as_str) {
                Some("Strict") => {
                    let list: Vec<String> = pruned
                        .iter()
                        .map(|p| format!("unknown field \"{p}\""))
                        .collect();
                    return Err(ApiError::bad_request(format!(
                        "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                        rt.kind,
                        rt.api_version(),
                        rt.kind,
                        list.join(", ")
                    )));
                }
                Some("Ignore") => {}
                _ => warnings.extend(pruned.iter().map(|p| format!("unknown field \"{p}\""))),
            }
        }
    }
    match rt.kind.as_str() {
        "CustomResourceDefinition" if rt.group == "apiextensions.k8s.io" => {
            let types = resources::from_crd(&new).map_err(|e| {
                let (field, message) = match e {
                    resources::ResourcesError::CompileSchema { version, message } => (
                        format!("spec.versions[{version}].schema.openAPIV3Schema"),
                        message,
                    ),
                    other => ("spec".to_string(), other.to_string()),
                };
                invalid(
                    t,
                    &name,
                    vec![Cause {
                        reason: "FieldValueInvalid".into(),
                        message,
                        field,
                    }],
                )
            })?;
            if let Some(first) = types.first() {
                let expected = format!("{}.{}", first.resource, first.group);
                if name != expected {
                    return Err(invalid(
                        t,
                        &name,
                        vec![Cause {
                            reason: "FieldValueInvalid".into(),
                            message: format!(
                                "Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
                            ),
                            field: "metadata.name".into(),
                        }],
                    ));
                }
            }
            let now = now_rfc3339();
            let storage: Vec<Value> = new
                .pointer("/spec/versions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|v| v.get("storage") == Some(&json!(true)))
                .filter_map(|v| v.get("name").cloned())
                .collect();
            new["status"] = json!({
                "acceptedNames": new.pointer("/spec/names").cloned().unwrap_or(json!({})),
                "storedVersions": storage,
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                     "message": "no conflicts found", "lastTransitionTime": now},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                     "message": "the initial names have been accepted", "lastTransitionTime": now},
                ],
            });
        }
        "Secret" if rt.group.is_empty() => {
            // Like the real server: stringData is write-only and merged into data.
            if let Some(Value::Object(sd)) =
                new.as_object_mut().and_then(|m| m.remove("stringData"))
            {
                for (k, v) in sd {
                    let text = v.as_str().unwrap_or_default();
                    new["data"][k] = json!(base64(text.as_bytes()));
                }
            }
        }
        "Namespace" if rt.group.is_empty() => {
            new["spec"]["finalizers"] = json!(["kubernetes"]);
            if new.pointer("/metadata/deletionTimestamp").is_none() {
                new["status"] = json!({"phase": "Active"});
            }
            let mut labels = new
                .pointer("/metadata/labels")
                .cloned()
                .unwrap_or(json!({}));
            labels["kubernetes.io/metadata.name"] = json!(name);
            new["metadata"]["labels"] = labels;
        }
        _ => {}
    }
    if let Some(old) = old
        && spec_part(old) != spec_part(&new)
    {
        let g = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        new["metadata"]["generation"] = json!(g + 1);
    }
    Ok(Admitted { obj: new, warnings })
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn invalid(t: &Target, name: &str, causes: Vec<Cause>) -> ApiError {
    let detail = match causes.as_slice() {
        [one] => format!("{}: {}", one.field, one.message),
        many => format!(
            "[{}]",
            many.iter()
                .map(|c| format!("{}: {}", c.field, c.message))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    ApiError::Invalid {
        message: format!("{} \"{name}\" is invalid: {detail}", t.rt.group_kind()),
        subject: Subject {
            name: name.to_string(),
            group: t.rt.group.clone(),
            kind: t.rt.kind.clone(),
        },
        causes,
    }
}

fn writer<'a>(t: &'a Target, manager: &'a str, time: &'a str, api_version: &'a str) -> Writer<'a> {
    Writer {
        manager,
        subresource: &t.sub,
        api_version,
        time,
        has_status: t.rt.has_status,
    }
}

fn map_store_error(t: &Target, name: &str, e: StoreError) -> ApiError {
    let subject = Subject {
        name: name.to_string(),
        group: t.rt.group.clone(),
        kind: t.rt.resource.clone(),
    };
    match e {
        StoreError::CreateExisting => ApiError::AlreadyExists {
            message: format!("{} \"{name}\" already exists", t.gr()),
            subject,
        },
        StoreError::FindObject => ApiError::NotFound {
            message: format!("{} \"{name}\" not found", t.gr()),
            subject,
        },
        StoreError::MatchResourceVersion => ApiError::Conflict {
            message: format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                t.gr()
            ),
            subject,
            causes: Vec::new(),
        },
        other => ApiError::Internal {
            message: other.to_string(),
        },
    }
}

fn check_namespace(ctx: &Ctx<'_>, t: &Target) -> Result<(), ApiError> {
    if !t.rt.namespaced {
        return Ok(());
    }
    let ns = ctx
        .srv
        .store
        .get("namespaces", "", &t.namespace)
        .ok_or_else(|| ApiError::NotFound {
            message: format!("namespaces \"{}\" not found", t.namespace),
            subject: Subject {
                name: t.namespace.clone(),
                group: String::new(),
                kind: "namespaces".into(),
            },
        })?;
    if ns.pointer("/metadata/deletionTimestamp").is_some() {
        return Err(ApiError::Forbidden {
            message: format!(
                "unable to create new content in namespace {} because it is being terminated",
                t.namespace
            ),
            subject: Subject {
                name: String::new(),
                group: t.rt.group.clone(),
                kind: t.rt.resource.clone(),
            },
        });
    }
    Ok(())
}

/// Stores an admitted object: create, update, no-op, or final removal when the last
/// finalizer of a deleting object is gone.
fn commit(
    ctx: &Ctx<'_>,
    t: &Target,
    old: Option<&Value>,
    obj: Value,
    code_on_create: u16,
) -> Result<(u16, Value), ApiError> {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let gr = t.gr();
    if ctx.dry_run() {
        return Ok((if old.is_some() { 200 } else { code_on_create }, obj));
    }
    match old {
        None => {
            let stored = ctx
                .srv
                .store
                .put(&gr, obj, Precondition::Absent)
                .map_err(|e| map_store_error(t, &name, e))?;
            ctx.srv.after_write(&t.rt, None, &stored);
            Ok((code_on_create, (*stored).clone()))
        }
        Some(old) => {
            if comparable(old) == comparable(&obj) {
                return Ok((200, old.clone()));
            }
            let finalizers_empty = obj
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
            let deleting = obj.pointer("/metadata/deletionTimestamp").is_some();
            let pre = Precondition::Version(rv_of(old));
            if deleting && finalizers_empty && t.rt.kind != "Namespace" {
                // Like the real registry: the update that empties the finalizers of a
                // deleting object is not stored; the object is deleted instead.
                let removed = ctx
                    .srv
                    .store
                    .remove_as(&gr, &t.namespace, &name, pre, Some(obj))
                    .map_err(|e| map_store_error(t, &name, e))?;
                ctx.srv.after_delete(&t.rt, &removed);
                return Ok((200, (*removed).clone()));
            }
            let stored = ctx
                .srv
                .store
                .put(&gr, obj, pre)
                .map_err(|e| map_store_error(t, &name, e))?;
            ctx.srv.after_write(&t.rt, Some(old), &stored);
            Ok((200, (*stored).clone()))
        }
    }
}

fn create(ctx: &Ctx<'_>, t: &Target, body: &[u8]) -> Result<Response, ApiError> {
    let new = parse_body(ctx.headers, body)?;
    check_namespace(ctx, t)?;
    let mut admitted = admit(ctx, t, None, new, Op::Create)?;
    let manager = ctx.manager("unknown");
    let time = now_rfc3339();
    let av = t.rt.api_version();
    apply::record_update(None, &mut admitted.obj, &writer(t, &manager, &time, &av));
    let (code, obj) = commit(ctx, t, None, admitted.obj, 201)?;
    Ok(with_warnings(
        json_response(code, &output(&t.rt, &obj), "application/json"),
        &admitted.warnings,
    ))
}

fn update(ctx: &Ctx<'_>, t: &Target, body: &[u8]) -> Result<Response, ApiError> {
    let new = parse_body(ctx.headers, body)?;
    let old = ctx
        .srv
        .store
        .get(&t.gr(), &t.namespace, &t.name)
        .ok_or_else(|| t.not_found())?;
    let sent_rv = new
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_string);
    match sent_rv {
        Some(rv) if rv.parse::<u64>().ok() != Some(rv_of(&old)) => {
            return Err(map_store_error(
                t,
                &t.name,
                StoreError::MatchResourceVersion,
            ));
        }
        None if t.rt.is_custom() => {
            return Err(invalid(
                t,
                &t.name,
                vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message: "Invalid value: 0x0: must be specified for an update".into(),
                    field: "metadata.resourceVersion".into(),
                }],
            ));
        }
        _ => {}
    }
    let mut admitted = admit(ctx, t, Some(&old), new, Op::Update)?;
    let manager = ctx.manager("unknown");
    let time = now_rfc3339();
    let av = t.rt.api_version();
    apply::record_update(
        Some(&old),
        &mut admitted.obj,
        &writer(t, &manager, &time, &av),
    );
    let (code, obj) = commit(ctx, t, Some(&old), admitted.obj, 201)?;
    Ok(with_warnings(
        json_response(code, &output(&t.rt, &obj), "application/json"),
        &admitted.warnings,
    ))
}

fn patch_request(ctx: &Ctx<'_>, t: &Target, body: &[u8]) -> Result<Response, ApiError> {
    let ct = ctx
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let patch_doc = parse_body(ctx.headers, body)?;
    let force = ctx.query.get("force").is_some_and(|v| v == "true");
    let is_apply = ct == "application/apply-patch+yaml" || ct == "application/apply-patch+cbor";
    if is_apply && ctx.query.get("fieldManager").is_none_or(String::is_empty) {
        return Err(ApiError::bad_request(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    }
    if !is_apply && force {
        return Err(ApiError::bad_request(
            "PatchOptions.meta.k8s.io \"\" is invalid: force: Forbidden: may not be specified for non-apply patch",
        ));
    }
    // Patches are retried on concurrent writes, like the real server does.
    for _ in 0..16 {
        let old = ctx.srv.store.get(&t.gr(), &t.namespace, &t.name);
        let manager = ctx.manager("unknown");
        let time = now_rfc3339();
        let av = t.rt.api_version();
        let w = writer(t, &manager, &time, &av);
        let (new, op) = match (&old, ct.as_str()) {
            (_, "application/apply-patch+yaml" | "application/apply-patch+cbor") => {
                if old.is_none() {
                    check_namespace(ctx, t)?;
                    authorize(ctx.srv, ctx.user, t, "create")?;
                }
                let mut applied = patch_doc.clone();
                if applied.is_object() && !applied.get("metadata").is_some_and(Value::is_object) {
                    applied["metadata"] = json!({});
                }
                if applied.is_object() && applied.pointer("/metadata/name").is_none() {
                    applied["metadata"]["name"] = json!(t.name);
                }
                let merged =
                    apply::apply(old.as_deref(), &applied, &w, force).map_err(|e| match e {
                        ApplyError::ResolveConflicts(conflicts) => ApiError::Conflict {
                            message: e_to_string(&conflicts),
                            subject: t.subject(),
                            causes: conflicts
                                .iter()
                                .map(|c| Cause {
                                    reason: "FieldManagerConflict".into(),
                                    message: format!("conflict with \"{}\"{}", c.manager, c.using),
                                    field: c.field.clone(),
                                })
                                .collect(),
                        },
                        other => ApiError::bad_request(other.to_string()),
                    })?;
                (
                    merged,
                    if old.is_some() {
                        Op::Update
                    } else {
                        Op::Create
                    },
                )
            }
            (None, _) => return Err(t.not_found()),
            (Some(old), "application/merge-patch+json") => {
                let mut doc = (**old).clone();
                patch::merge_patch(&mut doc, &patch_doc);
                (doc, Op::Update)
            }
            (Some(old), "application/json-patch+json") => {
                let mut doc = (**old).clone();
                patch::json_patch(&mut doc, &patch_doc)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                (doc, Op::Update)
            }
            (Some(old), "application/strategic-merge-patch+json") => {
                if t.rt.is_custom() {
                    return Err(ApiError::UnsupportedMediaType {
                        message: "strategic merge patch is not supported for custom resources; use a merge or JSON patch".into(),
                    });
                }
                let mut doc = (**old).clone();
                patch::strategic_merge(&mut doc, &patch_doc)
                    .map_err(|e: PatchError| ApiError::bad_request(e.to_string()))?;
                (doc, Op::Update)
            }
            (Some(_), other) => {
                return Err(ApiError::UnsupportedMediaType {
                    message: format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got \"{other}\")"
                    ),
                });
            }
        };
        if let (Some(old), false) = (&old, is_apply)
            && let Some(rv) = patch_doc
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
            && rv.parse::<u64>().ok() != Some(rv_of(old))
        {
            return Err(map_store_error(
                t,
                &t.name,
                StoreError::MatchResourceVersion,
            ));
        }
        let mut admitted = admit(ctx, t, old.as_deref(), new, op)?;
        if !is_apply {
            apply::record_update(old.as_deref(), &mut admitted.obj, &w);
        }
        match commit(ctx, t, old.as_deref(), admitted.obj, 201) {
            Err(ApiError::Conflict { .. }) | Err(ApiError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e),
            Ok((code, obj)) => {
                return Ok(with_warnings(
                    json_response(code, &output(&t.rt, &obj), "application/json"),
                    &admitted.warnings,
                ));
            }
        }
    }
    Err(map_store_error(
        t,
        &t.name,
        StoreError::MatchResourceVersion,
    ))
}

fn e_to_string(conflicts: &[apply::Conflict]) -> String {
    ApplyError::ResolveConflicts(conflicts.to_vec()).to_string()
}

fn delete(ctx: &Ctx<'_>, t: &Target, body: &[u8]) -> Result<Response, ApiError> {
    let opts = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_body(ctx.headers, body)?
    };
    let old = ctx
        .srv
        .store
        .get(&t.gr(), &t.namespace, &t.name)
        .ok_or_else(|| t.not_found())?;
    if let Some(rv) = opts
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str)
        && rv.parse::<u64>().ok() != Some(rv_of(&old))
    {
        return Err(map_store_error(
            t,
            &t.name,
            StoreError::MatchResourceVersion,
        ));
    }
    if let Some(uid) = opts.pointer("/preconditions/uid").and_then(Value::as_str)
        && old.pointer("/metadata/uid").and_then(Value::as_str) != Some(uid)
    {
        return Err(ApiError::Conflict {
            message: format!(
                "Operation cannot be fulfilled on {} \"{}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                t.gr(),
                t.name,
                old.pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            ),
            subject: t.subject(),
            causes: Vec::new(),
        });
    }
    if ctx.dry_run() {
        return Ok(ok(&output(&t.rt, &old)));
    }
    let obj = ctx
        .srv
        .delete_object(&t.rt, &t.namespace, &t.name)
        .map_err(|e| map_store_error(t, &t.name, e))?;
    Ok(ok(&output(&t.rt, &obj)))
}

fn delete_collection(ctx: &Ctx<'_>, t: &Target) -> Result<Response, ApiError> {
    let (ls, fs) = selectors(ctx.query)?;
    let ns = (!t.namespace.is_empty()).then_some(t.namespace.as_str());
    let (items, rv) = ctx.srv.store.list(&t.gr(), ns);
    let mut deleted = Vec::new();
    for o in items.iter().filter(|o| ls.matches(o) && fs.matches(o)) {
        let name = o
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let ons = o
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Ok(d) = ctx.srv.delete_object(&t.rt, ons, name) {
            deleted.push(output(&t.rt, &d));
        }
    }
    Ok(ok(
        &json!({"kind": format!("{}List", t.rt.kind), "apiVersion": t.rt.api_version(),
        "metadata": {"resourceVersion": rv.to_string()}, "items": deleted}),
    ))
}

/// Used by the server to mint names and uids.
pub(crate) fn next_seed(state: &std::sync::atomic::AtomicU64) -> u64 {
    let mut x = state.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod pod_status_tests {
    use super::pod_status;
    use serde_json::json;

    #[test]
    fn the_pod_status_column_shows_what_kubectl_shows_on_a_real_cluster() {
        let waiting = |r: &str| {
            json!({"status": {"phase": "Pending",
            "containerStatuses": [{"state": {"waiting": {"reason": r}}}]}})
        };
        assert_eq!(pod_status(&waiting("ErrImagePull")), "ErrImagePull");
        assert_eq!(pod_status(&waiting("CrashLoopBackOff")), "CrashLoopBackOff");
        let running = json!({"status": {"phase": "Running",
            "containerStatuses": [{"ready": true, "state": {"running": {}}}]}});
        assert_eq!(pod_status(&running), "Running");
        let init_failed = json!({"status": {"phase": "Pending",
            "initContainerStatuses": [{"state": {"terminated": {"exitCode": 3, "reason": "Error"}}}],
            "containerStatuses": [{"state": {"waiting": {"reason": "PodInitializing"}}}]}});
        assert_eq!(pod_status(&init_failed), "Init:Error");
        let init_running = json!({"status": {"phase": "Pending",
            "initContainerStatuses": [{"state": {"terminated": {"exitCode": 0}}},
                                      {"state": {"running": {}}}]}});
        assert_eq!(pod_status(&init_running), "Init:1/2");
        let deleting = json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Running"}});
        assert_eq!(pod_status(&deleting), "Terminating");
    }
}
