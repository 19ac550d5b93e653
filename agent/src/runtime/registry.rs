//! A small OCI distribution client: manifests and blobs over HTTP(S), with the bearer-token
//! flow (`WWW-Authenticate: Bearer realm=…,service=…,scope=…`) and basic auth from
//! [`RegistryAuth`]. One [`Registry`] serves one repository during one pull.

use std::collections::HashMap;
use std::sync::Mutex;

use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};

use super::reference::Reference;
use super::RegistryAuth;

/// Media types the agent accepts for manifests and indexes.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Why a registry request failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry says the repository, tag or blob does not exist.
    #[error("{url}: not found ({detail})")]
    NotFound { url: String, detail: String },
    /// The registry refused our credentials (or wants some we do not have).
    #[error("{url}: unauthorized ({status})")]
    Unauthorized { url: String, status: StatusCode },
    /// Any other non-success HTTP status.
    #[error("{url}: HTTP {status}: {detail}")]
    Status {
        url: String,
        status: StatusCode,
        detail: String,
    },
    /// The registry could not be reached or the transfer broke.
    #[error("{url}: {source}")]
    Transport { url: String, source: reqwest::Error },
    /// The token endpoint answered with something unusable.
    #[error("token from {realm}: {detail}")]
    Token { realm: String, detail: String },
}

/// A challenge from `WWW-Authenticate`.
#[derive(Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer(HashMap<String, String>),
}

/// Parses `Bearer realm="…",service="…"` or `Basic realm="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            match after.find(',') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            }
        };
        params.insert(key, value.trim().to_string());
        s = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer(params))
}

/// The authorisation header to send, once learned.
#[derive(Clone, Debug)]
enum Authorization {
    None,
    Basic,
    Bearer(String),
}

/// A client for one repository of one registry.
pub struct Registry {
    http: reqwest::Client,
    base: String,
    repository: String,
    auth: Option<RegistryAuth>,
    authorization: Mutex<Authorization>,
}

impl Registry {
    pub fn new(http: reqwest::Client, reference: &Reference, auth: Option<RegistryAuth>) -> Self {
        Registry {
            http,
            base: reference.base_url(),
            repository: reference.repository.clone(),
            auth,
            authorization: Mutex::new(Authorization::None),
        }
    }

    /// Fetches a manifest or index by tag or digest: (media type, body).
    pub async fn manifest(&self, object: &str) -> Result<(String, Vec<u8>), RegistryError> {
        let url = format!("{}/v2/{}/manifests/{object}", self.base, self.repository);
        let resp = self.get(&url, Some(MANIFEST_ACCEPT)).await?;
        let media_type = content_type(resp.headers());
        let body = resp
            .bytes()
            .await
            .map_err(|source| RegistryError::Transport {
                url: url.clone(),
                source,
            })?;
        Ok((media_type, body.to_vec()))
    }

    /// Starts fetching a blob; the caller streams the body.
    pub async fn blob(&self, digest: &str) -> Result<Response, RegistryError> {
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.repository);
        self.get(&url, None).await
    }

    async fn get(&self, url: &str, accept: Option<&str>) -> Result<Response, RegistryError> {
        let mut retried = false;
        loop {
            let authorization = self.authorization.lock().expect("poisoned").clone();
            let mut req = self.http.get(url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            req = match (&authorization, &self.auth) {
                (Authorization::Bearer(token), _) => req.bearer_auth(token),
                (Authorization::Basic, Some(auth)) => {
                    req.basic_auth(&auth.username, Some(&auth.password))
                }
                _ => req,
            };
            let resp = req
                .send()
                .await
                .map_err(|source| RegistryError::Transport {
                    url: url.to_string(),
                    source,
                })?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            if status == StatusCode::UNAUTHORIZED && !retried {
                retried = true;
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge);
                let next = match challenge {
                    Some(Challenge::Basic) if self.auth.is_some() => Authorization::Basic,
                    Some(Challenge::Bearer(params)) => {
                        Authorization::Bearer(self.token(&params).await?)
                    }
                    _ => {
                        return Err(RegistryError::Unauthorized {
                            url: url.to_string(),
                            status,
                        })
                    }
                };
                *self.authorization.lock().expect("poisoned") = next;
                continue;
            }
            let detail = resp.text().await.unwrap_or_default();
            let detail: String = detail.chars().take(512).collect();
            return Err(match status {
                StatusCode::NOT_FOUND => RegistryError::NotFound {
                    url: url.to_string(),
                    detail,
                },
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::Unauthorized {
                    url: url.to_string(),
                    status,
                },
                _ => RegistryError::Status {
                    url: url.to_string(),
                    status,
                    detail,
                },
            });
        }
    }

    /// Runs the token flow for a bearer challenge.
    async fn token(&self, params: &HashMap<String, String>) -> Result<String, RegistryError> {
        let realm = params.get("realm").cloned().unwrap_or_default();
        if realm.is_empty() {
            return Err(RegistryError::Token {
                realm,
                detail: "challenge has no realm".into(),
            });
        }
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        let mut query: Vec<(&str, String)> = vec![("scope", scope)];
        if let Some(service) = params.get("service") {
            query.push(("service", service.clone()));
        }
        let url =
            reqwest::Url::parse_with_params(&realm, &query).map_err(|e| RegistryError::Token {
                realm: realm.clone(),
                detail: e.to_string(),
            })?;
        let mut req = self.http.get(url);
        if let Some(auth) = &self.auth {
            req = req.basic_auth(&auth.username, Some(&auth.password));
        }
        let resp = req
            .send()
            .await
            .map_err(|source| RegistryError::Transport {
                url: realm.clone(),
                source,
            })?;
        if !resp.status().is_success() {
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(RegistryError::Unauthorized { url: realm, status });
            }
            return Err(RegistryError::Token {
                realm,
                detail: format!("HTTP {status}"),
            });
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            token: String,
            #[serde(default)]
            access_token: String,
        }
        let body: TokenResponse = resp.json().await.map_err(|e| RegistryError::Token {
            realm: realm.clone(),
            detail: e.to_string(),
        })?;
        let token = if body.token.is_empty() {
            body.access_token
        } else {
            body.token
        };
        if token.is_empty() {
            return Err(RegistryError::Token {
                realm,
                detail: "no token in response".into(),
            });
        }
        Ok(token)
    }
}

/// The media type without parameters.
fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
        .unwrap_or_default()
}

/// A header value for tests.
#[cfg(test)]
fn header_value(h: &str) -> reqwest::header::HeaderValue {
    reqwest::header::HeaderValue::from_str(h).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_parameters() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        let Challenge::Bearer(p) = c else {
            panic!("not bearer")
        };
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:library/busybox:pull");
    }

    #[test]
    fn basic_and_unknown_challenges() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        let Some(Challenge::Bearer(p)) = parse_challenge("bearer realm=http://x/t , service=s")
        else {
            panic!("not bearer")
        };
        assert_eq!(p["realm"], "http://x/t");
        assert_eq!(p["service"], "s");
    }

    #[test]
    fn content_type_drops_parameters() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            header_value("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
        );
        assert_eq!(
            content_type(&h),
            "application/vnd.oci.image.manifest.v1+json"
        );
    }
}
