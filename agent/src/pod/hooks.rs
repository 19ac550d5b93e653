//! Container lifecycle hooks (postStart, preStop): exec in the container through the runtime,
//! httpGet against the pod (or the handler's host), and sleep. Called by the pod worker; a hook
//! never outlives the timeout it is given.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, LifecycleHandler};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::runtime::Runtime;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The exec handler failed to run or exited non-zero.
    #[error("container {container}: exec hook: {detail}")]
    Exec { container: String, detail: String },
    /// The httpGet handler failed or answered with an error status.
    #[error("container {container}: http hook {url}: {detail}")]
    Http {
        container: String,
        url: String,
        detail: String,
    },
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

/// The port a handler names: a number, or a named port of the container.
pub fn resolve_port(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => match name.parse::<u16>() {
            Ok(p) => Some(p),
            Err(_) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        },
    }
}

/// The URL an httpGet handler requests.
pub fn http_url(
    container: &Container,
    action: &HTTPGetAction,
    pod_ip: Option<IpAddr>,
) -> Option<String> {
    let host = match (&action.host, pod_ip) {
        (Some(h), _) if !h.is_empty() => h.clone(),
        (_, Some(IpAddr::V6(ip))) => format!("[{ip}]"),
        (_, Some(ip)) => ip.to_string(),
        (_, None) => "127.0.0.1".to_string(),
    };
    let port = resolve_port(container, &action.port)?;
    let scheme = action
        .scheme
        .as_deref()
        .unwrap_or("HTTP")
        .to_ascii_lowercase();
    let path = action.path.as_deref().unwrap_or("/");
    let slash = if path.starts_with('/') { "" } else { "/" };
    Some(format!("{scheme}://{host}:{port}{slash}{path}"))
}

async fn http_get(
    target: &HookTarget<'_>,
    action: &HTTPGetAction,
    timeout: Duration,
) -> Result<(), HookError> {
    let container = target.container.name.clone();
    let url = http_url(target.container, action, target.pod_ip).ok_or_else(|| HookError::Http {
        container: container.clone(),
        url: String::new(),
        detail: format!("cannot resolve port {:?}", action.port),
    })?;
    let fail = |detail: String| HookError::Http {
        container: container.clone(),
        url: url.clone(),
        detail,
    };
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .danger_accept_invalid_certs(true)
        .no_proxy()
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut request = client.get(&url);
    for h in action.http_headers.iter().flatten() {
        request = request.header(h.name.as_str(), h.value.as_str());
    }
    let response = request.send().await.map_err(|e| fail(e.to_string()))?;
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        return Err(fail(format!("status {status}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ContainerPort;

    fn container() -> Container {
        Container {
            name: "web".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn ports_by_number_and_name() {
        let c = container();
        assert_eq!(resolve_port(&c, &IntOrString::Int(80)), Some(80));
        assert_eq!(
            resolve_port(&c, &IntOrString::String("http".into())),
            Some(8080)
        );
        assert_eq!(
            resolve_port(&c, &IntOrString::String("81".into())),
            Some(81)
        );
        assert_eq!(resolve_port(&c, &IntOrString::String("nope".into())), None);
        assert_eq!(resolve_port(&c, &IntOrString::Int(70000)), None);
    }

    #[test]
    fn url_defaults_to_pod_ip_and_http() {
        let c = container();
        let action = HTTPGetAction {
            port: IntOrString::String("http".into()),
            path: Some("stop".into()),
            ..Default::default()
        };
        let url = http_url(&c, &action, Some("10.233.0.9".parse().unwrap()));
        assert_eq!(url.as_deref(), Some("http://10.233.0.9:8080/stop"));
        let https = HTTPGetAction {
            host: Some("127.0.0.1".into()),
            scheme: Some("HTTPS".into()),
            port: IntOrString::Int(443),
            ..Default::default()
        };
        assert_eq!(
            http_url(&c, &https, None).as_deref(),
            Some("https://127.0.0.1:443/")
        );
    }
}
