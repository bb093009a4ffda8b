//! Impersonation (`kubectl --as`, `--as-group`, `--as-uid`): the `Impersonate-*` headers,
//! each checked with RBAC's `impersonate` verb like kube-apiserver does.
//!
//! ```text
//!  authenticated User + Impersonate-User/-Group/-Uid/-Extra-<key>
//!      ──► impersonate on users | serviceaccounts(ns, name) | groups | uids | userextras/<key>
//!      ──► the impersonated User (or 403 naming the first refused attribute)
//! ```

use std::collections::BTreeMap;

use http::HeaderMap;

use crate::authn::{self, User};
use crate::rbac::{self, Attributes};
use crate::store::Store;

/// A refused impersonation.
#[derive(Debug, thiserror::Error)]
pub enum ImpersonationError {
    /// RBAC does not grant `impersonate` on the requested attribute.
    #[error("{message}")]
    Impersonate {
        /// The real server's 403 message.
        message: String,
        /// API group of the checked resource.
        group: String,
        /// Checked resource (`users`, `groups`, `serviceaccounts`, ...).
        resource: String,
        /// Requested value.
        name: String,
    },
    /// Groups, uid or extras without a user.
    #[error("requested {what} without impersonating a user")]
    ImpersonateWithoutUser {
        /// What was requested.
        what: &'static str,
    },
}

fn check(
    store: &Store,
    user: &User,
    group: &str,
    resource: &str,
    namespace: &str,
    name: &str,
) -> Result<(), ImpersonationError> {
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    let attrs = Attributes {
        verb: "impersonate",
        group,
        resource,
        subresource,
        namespace,
        name,
    };
    if rbac::allowed(store, user, &attrs) {
        return Ok(());
    }
    let gr = if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    };
    Err(ImpersonationError::Impersonate {
        message: rbac::forbidden_message(user, &attrs, &gr),
        group: group.into(),
        resource: resource.into(),
        name: name.into(),
    })
}

/// Applies the `Impersonate-*` headers to `user`; `Ok(user)` unchanged when there are none.
pub fn impersonate(
    store: &Store,
    user: User,
    headers: &HeaderMap,
) -> Result<User, ImpersonationError> {
    let text = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect()
    };
    let groups = text("Impersonate-Group");
    let uid = text("Impersonate-Uid").into_iter().next();
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        if let Some(key) = name.as_str().strip_prefix("impersonate-extra-")
            && let Ok(v) = value.to_str()
        {
            extra
                .entry(key.to_string())
                .or_default()
                .push(v.to_string());
        }
    }
    let Some(as_user) = text("Impersonate-User").into_iter().next() else {
        if !groups.is_empty() {
            return Err(ImpersonationError::ImpersonateWithoutUser { what: "groups" });
        }
        if uid.is_some() {
            return Err(ImpersonationError::ImpersonateWithoutUser { what: "a uid" });
        }
        if !extra.is_empty() {
            return Err(ImpersonationError::ImpersonateWithoutUser { what: "extras" });
        }
        return Ok(user);
    };
    let service_account = as_user
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .map(|(ns, name)| (ns.to_string(), name.to_string()));
    match &service_account {
        Some((ns, name)) => check(store, &user, "", "serviceaccounts", ns, name)?,
        None => check(store, &user, "", "users", "", &as_user)?,
    }
    for g in &groups {
        check(store, &user, "", "groups", "", g)?;
    }
    if let Some(uid) = &uid {
        check(store, &user, "authentication.k8s.io", "uids", "", uid)?;
    }
    for (key, values) in &extra {
        for v in values {
            check(
                store,
                &user,
                "authentication.k8s.io",
                &format!("userextras/{key}"),
                "",
                v,
            )?;
        }
    }
    let mut new_groups = match (&service_account, groups.is_empty()) {
        (Some((ns, _)), true) => authn::service_account_groups(ns),
        _ => groups,
    };
    let implicit = if as_user == authn::ANONYMOUS {
        authn::UNAUTHENTICATED
    } else {
        authn::AUTHENTICATED
    };
    if !new_groups.iter().any(|g| g == implicit) {
        new_groups.push(implicit.into());
    }
    Ok(User {
        name: as_user,
        uid: uid.unwrap_or_default(),
        groups: new_groups,
        extra,
        service_account,
    })
}
