//! Client side of the admin API, used by `meshletctl` and the tests.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::AdminError;
use super::pb::admin_client::AdminClient;

/// Connect to the agent's admin socket.
pub async fn connect(socket: &Path) -> Result<AdminClient<Channel>, AdminError> {
    let path: PathBuf = socket.to_path_buf();
    let connect_err = |detail: String| AdminError::Connect {
        path: path.clone(),
        detail,
    };
    // The URI is required by the HTTP/2 layer but never resolved: the connector dials the socket.
    let endpoint =
        Endpoint::try_from("http://agent.local").map_err(|e| connect_err(e.to_string()))?;
    let target = path.clone();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(target).await?)) }
        }))
        .await
        .map_err(|e| {
            let mut detail = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                detail = format!("{detail}: {s}");
                src = s.source();
            }
            connect_err(detail)
        })?;
    Ok(AdminClient::new(channel))
}
