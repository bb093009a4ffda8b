//! Errors of the test server as the Kubernetes API reports them.
//!
//! Every failure a client can cause becomes an [`ApiError`]; [`ApiError::to_status`] renders it
//! as a `metav1.Status` body with the HTTP code, `reason` and `details` the real kube-apiserver
//! uses, so clients (kubectl, kube-rs) react to it exactly as they would in a real cluster.

use serde_json::{Value, json};

/// One field-level cause inside an `Invalid` or `Conflict` status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// `StatusCause.reason`, e.g. `FieldValueInvalid` or `FieldManagerConflict`.
    pub reason: String,
    /// Human readable text.
    pub message: String,
    /// Dotted field path, e.g. `spec.upgrade.maxUnavailable`.
    pub field: String,
}

/// Which object a status is about (`Status.details`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject {
    /// Object name, empty for collections.
    pub name: String,
    /// API group.
    pub group: String,
    /// Resource (plural) or kind, as the real server reports it for this reason.
    pub kind: String,
}

/// A request the server refuses, rendered as a `Status` object.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request body or parameters cannot be understood.
    #[error("{message}")]
    BadRequest {
        /// Message shown to the user.
        message: String,
    },
    /// 401: no or an unknown bearer token.
    #[error("Unauthorized")]
    Unauthorized,
    /// 403: RBAC (or namespace termination) forbids the request.
    #[error("{message}")]
    Forbidden {
        /// Message in the real server's shape.
        message: String,
        /// Object the request was about.
        subject: Subject,
    },
    /// 404: the object or resource does not exist.
    #[error("{message}")]
    NotFound {
        /// Message in the real server's shape.
        message: String,
        /// Object the request was about.
        subject: Subject,
    },
    /// 405: verb not supported on this path.
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    /// 409: the object already exists.
    #[error("{message}")]
    AlreadyExists {
        /// Message in the real server's shape.
        message: String,
        /// Object the request was about.
        subject: Subject,
    },
    /// 409: stale resourceVersion or field-manager conflict.
    #[error("{message}")]
    Conflict {
        /// Message in the real server's shape.
        message: String,
        /// Object the request was about.
        subject: Subject,
        /// Field-manager conflicts, if any.
        causes: Vec<Cause>,
    },
    /// 410: a resourceVersion or continue token older than the retained history.
    #[error("{message}")]
    Gone {
        /// Message in the real server's shape.
        message: String,
    },
    /// 415: a patch type the resource does not support.
    #[error("{message}")]
    UnsupportedMediaType {
        /// Message in the real server's shape.
        message: String,
    },
    /// 422: the object fails validation.
    #[error("{message}")]
    Invalid {
        /// Message in the real server's shape.
        message: String,
        /// Object the request was about.
        subject: Subject,
        /// One cause per invalid field.
        causes: Vec<Cause>,
    },
    /// 500: a bug in the test server; never expected.
    #[error("{message}")]
    Internal {
        /// What went wrong.
        message: String,
    },
}

impl ApiError {
    /// Shorthand for a 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
        }
    }

    /// The HTTP status code of this error.
    pub fn code(&self) -> u16 {
        match self {
            Self::BadRequest { .. } => 400,
            Self::Unauthorized => 401,
            Self::Forbidden { .. } => 403,
            Self::NotFound { .. } => 404,
            Self::MethodNotAllowed => 405,
            Self::AlreadyExists { .. } | Self::Conflict { .. } => 409,
            Self::Gone { .. } => 410,
            Self::UnsupportedMediaType { .. } => 415,
            Self::Invalid { .. } => 422,
            Self::Internal { .. } => 500,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "BadRequest",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden { .. } => "Forbidden",
            Self::NotFound { .. } => "NotFound",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::AlreadyExists { .. } => "AlreadyExists",
            Self::Conflict { .. } => "Conflict",
            Self::Gone { .. } => "Expired",
            Self::UnsupportedMediaType { .. } => "UnsupportedMediaType",
            Self::Invalid { .. } => "Invalid",
            Self::Internal { .. } => "InternalError",
        }
    }

    /// Renders the error as a `metav1.Status` JSON object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        let (subject, causes) = match self {
            Self::Forbidden { subject, .. }
            | Self::NotFound { subject, .. }
            | Self::AlreadyExists { subject, .. } => (Some(subject), None),
            Self::Conflict {
                subject, causes, ..
            }
            | Self::Invalid {
                subject, causes, ..
            } => (Some(subject), Some(causes)),
            _ => (None, None),
        };
        if let Some(subject) = subject {
            let mut details = serde_json::Map::new();
            if !subject.name.is_empty() {
                details.insert("name".into(), json!(subject.name));
            }
            details.insert("group".into(), json!(subject.group));
            details.insert("kind".into(), json!(subject.kind));
            if let Some(causes) = causes.filter(|c| !c.is_empty()) {
                details.insert(
                    "causes".into(),
                    causes
                        .iter()
                        .map(
                            |c| json!({"reason": c.reason, "message": c.message, "field": c.field}),
                        )
                        .collect(),
                );
            }
            status["details"] = Value::Object(details);
        }
        status
    }
}

/// A `Status` with `status: Success`, as returned by some deletes.
pub fn success(subject: &Subject) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": subject.name, "group": subject.group, "kind": subject.kind},
    })
}
