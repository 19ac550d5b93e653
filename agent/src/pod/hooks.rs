//! Container lifecycle hooks (postStart, preStop): exec in the container through the runtime,
//! httpGet against the pod (or the handler's host), and sleep. Called by the pod worker; a hook
//! never outlives the timeout it is given (preStop: the grace period). postStart has none, as
//! the kubelet's: it runs until it ends or its container is killed.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, LifecycleHandler};

use super::ContainerRuntime;
use crate::probe;

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
    pub runtime: &'a dyn ContainerRuntime,
    pub container: &'a Container,
    pub container_id: &'a str,
    pub pod_ip: Option<IpAddr>,
}

/// What "no timeout" is to the calls that need one (a century).
const UNBOUNDED: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Runs `handler` for `target`, for at most `timeout` (None: until it ends).
pub async fn run(
    target: &HookTarget<'_>,
    handler: &LifecycleHandler,
    limit: Option<Duration>,
) -> Result<(), HookError> {
    let container = target.container.name.clone();
    let timeout = limit.unwrap_or(UNBOUNDED);
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
            http_get(target.container, http, target.pod_ip, timeout).await
        } else if let Some(sleep) = &handler.sleep {
            tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64)).await;
            Ok(())
        } else {
            Err(HookError::Unsupported {
                container: container.clone(),
            })
        }
    };
    let Some(timeout) = limit else {
        return work.await;
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(HookError::Timeout { container, timeout }),
    }
}

/// httpGet as the kubelet's hook runner does it (pod IP by default, named ports): any answer,
/// whatever its status, is success; the hook fails only when no answer comes.
async fn http_get(
    container: &Container,
    action: &HTTPGetAction,
    pod_ip: Option<IpAddr>,
    timeout: Duration,
) -> Result<(), HookError> {
    let fail = |detail: String| HookError::Http {
        container: container.name.clone(),
        detail,
    };
    match probe::get(action, container, pod_ip, timeout).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(detail)) => Err(fail(detail)),
        Err(e) => Err(fail(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn action(port: u16) -> HTTPGetAction {
        HTTPGetAction {
            path: Some("/hook".into()),
            port: IntOrString::Int(port.into()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_http_hook_answered_with_any_status_succeeds() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "request ended early");
                request.extend_from_slice(&buf[..n]);
            }
            let answer =
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            conn.write_all(answer).await.unwrap();
        });
        let container = Container::default();
        let ip = Some("127.0.0.1".parse().unwrap());
        let result = http_get(&container, &action(port), ip, Duration::from_secs(30)).await;
        assert!(result.is_ok(), "{result:?}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_http_hook_that_cannot_be_sent_fails() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let container = Container::default();
        let ip = Some("127.0.0.1".parse().unwrap());
        let result = http_get(&container, &action(port), ip, Duration::from_secs(30)).await;
        assert!(matches!(result, Err(HookError::Http { .. })), "{result:?}");
    }
}
