//! Container lifecycle hooks (postStart, preStop): exec in the container through the runtime,
//! httpGet against the pod (or the handler's host), and sleep. Called by the pod worker; a hook
//! never outlives the timeout it is given.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, LifecycleHandler};

use crate::probe::{self, Outcome};
use crate::runtime::Runtime;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The exec handler failed to run or exited non-zero.
    #[error("container {container}: exec hook: {detail}")]
    Exec { container: String, detail: String },
    /// The httpGet handler failed or answered with an error status.
    #[error("container {container}: http hook: {detail}")]
    Http { container: String, detail: String },
    /// The handler did not finish within its time.
    #[error("container {container}: hook timed out after {timeout:?}")]
    Timeout {
        container: String,
        timeout: Duration,
    },
    /// No supported action in the handler (tcpSocket is not a hook action).
    #[error("container {container}: unsupported lifecycle handler")]
    Unsupported { container: String },
}

/// The container a hook runs for.
pub struct HookTarget<'a> {
    pub runtime: &'a Runtime,
    pub container: &'a Container,
    pub container_id: &'a str,
    pub pod_ip: Option<IpAddr>,
}

/// Runs `handler` for `target`, for at most `timeout`.
pub async fn run(
    target: &HookTarget<'_>,
    handler: &LifecycleHandler,
    timeout: Duration,
) -> Result<(), HookError> {
    let container = target.container.name.clone();
    let work = async {
        if let Some(exec) = &handler.exec {
            let command = exec.command.clone().unwrap_or_default();
            let out = target
                .runtime
                .exec(target.container_id, &command, timeout)
                .await
                .map_err(|e| HookError::Exec {
                    container: container.clone(),
                    detail: e.to_string(),
                })?;
            if out.exit_code != 0 {
                let mut output = out.stdout;
                output.extend_from_slice(&out.stderr);
                return Err(HookError::Exec {
                    container: container.clone(),
                    detail: format!(
                        "exit code {}: {}",
                        out.exit_code,
                        String::from_utf8_lossy(&output).trim()
                    ),
                });
            }
            Ok(())
        } else if let Some(http) = &handler.http_get {
            http_get(target, http, timeout).await
        } else if let Some(sleep) = &handler.sleep {
            tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64)).await;
            Ok(())
        } else {
            Err(HookError::Unsupported {
                container: container.clone(),
            })
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(HookError::Timeout { container, timeout }),
    }
}

/// httpGet with the prober's semantics (pod IP by default, named ports, success 200–399).
async fn http_get(
    target: &HookTarget<'_>,
    action: &HTTPGetAction,
    timeout: Duration,
) -> Result<(), HookError> {
    let fail = |detail: String| HookError::Http {
        container: target.container.name.clone(),
        detail,
    };
    match probe::http_get(action, target.container, target.pod_ip, timeout).await {
        Ok(Outcome::Success(_) | Outcome::Warning(_)) => Ok(()),
        Ok(Outcome::Failure(detail)) => Err(fail(detail)),
        Err(e) => Err(fail(e.to_string())),
    }
}
