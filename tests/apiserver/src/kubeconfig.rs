//! Kubeconfig files pointing clients (kubectl, kube-rs) at the test server.

use std::path::Path;

/// Failures of writing a kubeconfig.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    /// The file could not be written.
    #[error("failed to write kubeconfig {path}")]
    WriteFile {
        /// Target path.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Renders a kubeconfig for `server` (e.g. `http://127.0.0.1:8080`) authenticating with
/// `token` as `user`.
pub fn render(server: &str, user: &str, token: &str) -> String {
    format!(
        "# Kubeconfig of the meshlet TEST API server (in-memory, not a real cluster).\n\
         apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: meshlet-test\n  \
           cluster:\n    \
             server: {server}\n\
         users:\n\
         - name: {user}\n  \
           user:\n    \
             token: {token}\n\
         contexts:\n\
         - name: meshlet-test\n  \
           context:\n    \
             cluster: meshlet-test\n    \
             user: {user}\n    \
             namespace: default\n\
         current-context: meshlet-test\n"
    )
}

/// Writes a kubeconfig file (see [`render`]).
pub fn write(path: &Path, server: &str, user: &str, token: &str) -> Result<(), KubeconfigError> {
    std::fs::write(path, render(server, user, token)).map_err(|source| KubeconfigError::WriteFile {
        path: path.display().to_string(),
        source,
    })
}
