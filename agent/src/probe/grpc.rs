//! The grpc handler: `grpc.health.v1.Health/Check` on the pod IP and port, with the optional
//! service name; SERVING is a success, any other status, an error or a server without the
//! health service (UNIMPLEMENTED) a failure. The whole exchange shares one timeout.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, GRPCAction};
use tokio::time::Instant;
use tonic::transport::Endpoint;
use tonic::Code;

use super::{error_chain, join_host_port, Outcome, ProbeError};

/// The generated `grpc.health.v1` messages, client and server (tests serve it).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("grpc.health.v1");
}

use proto::health_check_response::ServingStatus;
use proto::health_client::HealthClient;
use proto::HealthCheckRequest;

/// Checks the health service at the pod IP and `action.port`.
pub async fn grpc(
    action: &GRPCAction,
    container: &Container,
    pod_ip: Option<IpAddr>,
    timeout: Duration,
) -> Result<Outcome, ProbeError> {
    let port = u16::try_from(action.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ProbeError::InvalidPort {
            container: container.name.clone(),
            port: i64::from(action.port),
        })?;
    let ip = pod_ip.ok_or_else(|| ProbeError::NoHost {
        container: container.name.clone(),
    })?;
    let address = join_host_port(&ip.to_string(), port);
    let uri = format!("http://{address}");
    let endpoint = Endpoint::from_shared(uri.clone())
        .and_then(|e| e.user_agent(super::USER_AGENT))
        .map_err(|e| ProbeError::InvalidUrl {
            container: container.name.clone(),
            url: uri,
            detail: error_chain(&e),
        })?
        .connect_timeout(timeout);
    let deadline = Instant::now() + timeout;
    let channel = match tokio::time::timeout_at(deadline, endpoint.connect()).await {
        Err(_) => {
            return Ok(Outcome::Failure(format!(
                "timeout: failed to connect service {address:?} within {timeout:?}"
            )))
        }
        Ok(Err(e)) => {
            return Ok(Outcome::Failure(format!(
                "error: failed to connect service at {address:?}: {}",
                error_chain(&e)
            )))
        }
        Ok(Ok(channel)) => channel,
    };
    let request = HealthCheckRequest {
        service: action.service.clone().unwrap_or_default(),
    };
    let check = async move { HealthClient::new(channel).check(request).await };
    let outcome = match tokio::time::timeout_at(deadline, check).await {
        Err(_) => Outcome::Failure(format!(
            "timeout: health rpc did not complete within {timeout:?}"
        )),
        Ok(Err(status)) if status.code() == Code::Unimplemented => {
            let mut message = "error: this server does not implement the grpc health protocol \
                               (grpc.health.v1.Health)"
                .to_string();
            if !status.message().is_empty() {
                message = format!("{message}: {}", status.message());
            }
            Outcome::Failure(message)
        }
        Ok(Err(status)) => Outcome::Failure(format!(
            "error: health rpc probe failed: {:?}: {}",
            status.code(),
            status.message()
        )),
        Ok(Ok(response)) => match response.into_inner().status() {
            ServingStatus::Serving => Outcome::Success("service is serving".into()),
            other => Outcome::Failure(format!(
                "service unhealthy (responded with {:?})",
                other.as_str_name()
            )),
        },
    };
    Ok(outcome)
}
