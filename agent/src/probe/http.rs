//! The httpGet handler, shared with the lifecycle's httpGet hooks: one GET with the kubelet's
//! rules (certificates not verified, `User-Agent: kube-probe/1.34`, `Accept: */*`, no
//! keep-alive, no proxy, redirects followed only within the same host, body read capped at
//! 10 KiB, 200 ≤ status < 400 is a success).

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, HOST, USER_AGENT};
use reqwest::redirect::{Action, Attempt, Policy};

use super::{
    capped_text, error_chain, join_host_port, resolve_port, target_host, Outcome, ProbeError,
    MAX_OUTPUT,
};

/// Upstream stops following after this many redirects.
const MAX_REDIRECTS: usize = 10;

/// Follows a redirect only to the host the request started at (any port or scheme); a
/// redirect elsewhere ends the chain and its 3xx response becomes the answer.
fn same_host_only(attempt: Attempt) -> Action {
    if attempt.previous().len() >= MAX_REDIRECTS {
        return attempt.error(format!("stopped after {MAX_REDIRECTS} redirects"));
    }
    let original = attempt.previous().first().and_then(|u| u.host_str());
    if attempt.url().host_str() == original {
        attempt.follow()
    } else {
        attempt.stop()
    }
}

/// The one client every probe and hook shares (connections are not kept alive).
fn client() -> Result<&'static reqwest::Client, ProbeError> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .tls_danger_accept_invalid_certs(true)
                .redirect(Policy::custom(same_host_only))
                .pool_max_idle_per_host(0)
                .no_proxy()
                .http1_only()
                .build()
                .map_err(|e| error_chain(&e))
        })
        .as_ref()
        .map_err(|detail| ProbeError::Client {
            detail: detail.clone(),
        })
}

/// The URL an httpGet action addresses (host defaults to the pod IP, port may be named).
pub fn url(
    action: &HTTPGetAction,
    container: &Container,
    pod_ip: Option<IpAddr>,
) -> Result<reqwest::Url, ProbeError> {
    let scheme = match action.scheme.as_deref() {
        Some(s) if s.eq_ignore_ascii_case("https") => "https",
        _ => "http",
    };
    let host = target_host(action.host.as_deref(), pod_ip, container)?;
    let port = resolve_port(&action.port, container)?;
    let path = action.path.as_deref().unwrap_or_default();
    let slash = if path.starts_with('/') { "" } else { "/" };
    let text = format!("{scheme}://{}{slash}{path}", join_host_port(&host, port));
    reqwest::Url::parse(&text).map_err(|e| ProbeError::InvalidUrl {
        container: container.name.clone(),
        url: text.clone(),
        detail: e.to_string(),
    })
}

/// The request headers: the action's httpHeaders, then the kubelet's defaults where absent.
fn headers(action: &HTTPGetAction, container: &Container) -> Result<HeaderMap, ProbeError> {
    let mut map = HeaderMap::new();
    for header in action.http_headers.iter().flatten() {
        let invalid = || ProbeError::InvalidHeader {
            container: container.name.clone(),
            name: header.name.clone(),
        };
        let name = HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| invalid())?;
        let value = HeaderValue::from_str(&header.value).map_err(|_| invalid())?;
        if name == HOST {
            map.insert(HOST, value);
        } else {
            map.append(name, value);
        }
    }
    if !map.contains_key(USER_AGENT) {
        map.insert(USER_AGENT, HeaderValue::from_static(super::USER_AGENT));
    }
    if !map.contains_key(ACCEPT) {
        map.insert(ACCEPT, HeaderValue::from_static("*/*"));
    }
    Ok(map)
}

/// One HTTP GET as probes do it. `Err` means the action cannot be carried out as written
/// (bad port, no pod IP, bad header); a request that fails is `Failure`.
pub async fn http_get(
    action: &HTTPGetAction,
    container: &Container,
    pod_ip: Option<IpAddr>,
    timeout: Duration,
) -> Result<Outcome, ProbeError> {
    let outcome = match get(action, container, pod_ip, timeout).await? {
        Err(detail) => Outcome::Failure(detail),
        Ok((status, body)) if (300..400).contains(&status) => {
            Outcome::Warning(format!("Probe terminated redirects, Response body: {body}"))
        }
        Ok((status, body)) if (200..300).contains(&status) => Outcome::Success(body),
        Ok((status, _)) => Outcome::Failure(format!("HTTP probe failed with statuscode: {status}")),
    };
    Ok(outcome)
}

/// One HTTP GET (probes and httpGet hooks): the answer's status and capped body, or why no
/// answer came. `Err` means the action cannot be carried out as written.
pub async fn get(
    action: &HTTPGetAction,
    container: &Container,
    pod_ip: Option<IpAddr>,
    timeout: Duration,
) -> Result<Result<(u16, String), String>, ProbeError> {
    let url = url(action, container, pod_ip)?;
    let headers = headers(action, container)?;
    let request = client()?.get(url.clone()).headers(headers);
    let exchange = async {
        let mut response = request.send().await?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while body.len() < MAX_OUTPUT {
            match response.chunk().await? {
                Some(chunk) => body.extend_from_slice(&chunk),
                None => break,
            }
        }
        Ok::<_, reqwest::Error>((status, capped_text(&body)))
    };
    Ok(match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(format!(
            "Get \"{url}\": no response within {timeout:?} (timeout)"
        )),
        Ok(Err(e)) => Err(format!("Get \"{url}\": {}", error_chain(&e))),
        Ok(Ok(answer)) => Ok(answer),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::HTTPHeader;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn action(path: Option<&str>) -> HTTPGetAction {
        HTTPGetAction {
            path: path.map(str::to_string),
            port: IntOrString::Int(8080),
            ..Default::default()
        }
    }

    #[test]
    fn urls_default_to_the_pod_ip_and_http() {
        let ip = Some("10.233.0.9".parse().unwrap());
        let c = Container::default();
        assert_eq!(
            url(&action(None), &c, ip).unwrap().as_str(),
            "http://10.233.0.9:8080/"
        );
        assert_eq!(
            url(&action(Some("healthz?x=1")), &c, ip).unwrap().as_str(),
            "http://10.233.0.9:8080/healthz?x=1"
        );
        let https = HTTPGetAction {
            scheme: Some("HTTPS".into()),
            host: Some("::1".into()),
            ..action(Some("/h"))
        };
        assert_eq!(
            url(&https, &c, None).unwrap().as_str(),
            "https://[::1]:8080/h"
        );
        assert!(matches!(
            url(&action(None), &c, None),
            Err(ProbeError::NoHost { .. })
        ));
    }

    #[test]
    fn headers_default_and_override() {
        let c = Container::default();
        let map = headers(&action(None), &c).unwrap();
        assert_eq!(map[USER_AGENT], "kube-probe/1.34");
        assert_eq!(map[ACCEPT], "*/*");
        let custom = HTTPGetAction {
            http_headers: Some(vec![
                HTTPHeader {
                    name: "Accept".into(),
                    value: "application/json".into(),
                },
                HTTPHeader {
                    name: "X-A".into(),
                    value: "1".into(),
                },
                HTTPHeader {
                    name: "X-A".into(),
                    value: "2".into(),
                },
                HTTPHeader {
                    name: "Host".into(),
                    value: "example.test".into(),
                },
            ]),
            ..action(None)
        };
        let map = headers(&custom, &c).unwrap();
        assert_eq!(map[ACCEPT], "application/json");
        assert_eq!(map.get_all("x-a").iter().count(), 2);
        assert_eq!(map[HOST], "example.test");
        assert_eq!(map[USER_AGENT], "kube-probe/1.34");
        let bad = HTTPGetAction {
            http_headers: Some(vec![HTTPHeader {
                name: "bad header".into(),
                value: "v".into(),
            }]),
            ..action(None)
        };
        assert!(matches!(
            headers(&bad, &c),
            Err(ProbeError::InvalidHeader { .. })
        ));
    }
}
