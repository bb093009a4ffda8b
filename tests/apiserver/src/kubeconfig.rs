//! Kubeconfig files pointing clients (kubectl, kube-rs) at the test server: its HTTPS URL,
//! its CA (`certificate-authority-data`) and a bearer token, nothing else.

use std::path::Path;

use base64::Engine;

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

/// What a kubeconfig says.
#[derive(Debug, Clone, Copy)]
pub struct Kubeconfig<'a> {
    /// Server URL, e.g. `https://127.0.0.1:6443`.
    pub server: &'a str,
    /// PEM of the CA to trust for `server`.
    pub ca_pem: &'a str,
    /// Name of the user entry.
    pub user: &'a str,
    /// Bearer token.
    pub token: &'a str,
    /// Namespace of the context.
    pub namespace: &'a str,
}

/// Renders a kubeconfig.
pub fn render(k: &Kubeconfig<'_>) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(k.ca_pem);
    format!(
        "# Kubeconfig of the meshlet TEST API server (in-memory, not a real cluster).\n\
         apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: meshlet-test\n  \
           cluster:\n    \
             server: {server}\n    \
             certificate-authority-data: {ca}\n\
         users:\n\
         - name: {user}\n  \
           user:\n    \
             token: {token}\n\
         contexts:\n\
         - name: meshlet-test\n  \
           context:\n    \
             cluster: meshlet-test\n    \
             user: {user}\n    \
             namespace: {namespace}\n\
         current-context: meshlet-test\n",
        server = k.server,
        user = k.user,
        token = k.token,
        namespace = k.namespace,
    )
}

/// Writes a kubeconfig file (see [`render`]).
pub fn write(path: &Path, k: &Kubeconfig<'_>) -> Result<(), KubeconfigError> {
    std::fs::write(path, render(k)).map_err(|source| KubeconfigError::WriteFile {
        path: path.display().to_string(),
        source,
    })
}
