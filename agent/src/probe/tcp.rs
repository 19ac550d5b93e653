//! The tcpSocket handler: a connection opened within the timeout is a success (and is closed
//! at once); a refusal or a timeout is a failure.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, TCPSocketAction};
use tokio::net::TcpStream;

use super::{join_host_port, resolve_port, target_host, Outcome, ProbeError};

/// Connects to the action's host (default: the pod IP) and port.
pub async fn tcp_socket(
    action: &TCPSocketAction,
    container: &Container,
    pod_ip: Option<IpAddr>,
    timeout: Duration,
) -> Result<Outcome, ProbeError> {
    let host = target_host(action.host.as_deref(), pod_ip, container)?;
    let port = resolve_port(&action.port, container)?;
    let address = join_host_port(&host, port);
    let outcome = match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), port)))
        .await
    {
        Ok(Ok(stream)) => {
            drop(stream);
            Outcome::Success(String::new())
        }
        Ok(Err(e)) => Outcome::Failure(format!("dial tcp {address}: {e}")),
        Err(_) => Outcome::Failure(format!("dial tcp {address}: i/o timeout after {timeout:?}")),
    };
    Ok(outcome)
}
