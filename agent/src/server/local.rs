//! The local socket: `<run dir>/nodelet.sock`, mode 0600, owned by the agent's user (root).
//! It serves every endpoint of the secure port ([`super::secure::routes`]) without TLS or
//! authorization, because only root on the node can open it: that is how an operator reads
//! logs and events on a standalone node with no client CA, and never through a TCP port.
//!
//! `curl --unix-socket /run/nodelet/nodelet.sock http://localhost/containerLogs/NS/POD/CONTAINER`

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use super::ServerState;

/// The socket's file name in the run dir.
pub const SOCKET: &str = "nodelet.sock";

/// Binds `<run_dir>/nodelet.sock` (replacing a stale one left by an agent that died) and makes
/// it private to its owner.
pub fn bind(run_dir: &Path) -> std::io::Result<(UnixListener, PathBuf)> {
    let path = run_dir.join(SOCKET);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok((listener, path))
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, super::secure::routes(state))
        .with_graceful_shutdown(shutdown)
        .await
}
