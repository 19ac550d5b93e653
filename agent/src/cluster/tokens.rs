//! Service account tokens for projected `serviceAccountToken` volume sources, through the
//! TokenRequest API (`serviceaccounts/<name>/token`) with the node's identity. The Node
//! authorizer allows it only for a service account a pod bound to this node uses, and the
//! token is bound to that pod (it stops working when the pod is deleted).

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest as ApiTokenRequest, TokenRequestSpec,
};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::PostParams;
use kube::Api;

use crate::volume::{IssuedToken, TokenRequest, TokenSource};

/// The cluster mode's [`TokenSource`] (`ClusterClient::tokens`), given to `VolumeManager::new`.
pub struct ApiTokens {
    client: kube::Client,
}

impl ApiTokens {
    pub(super) fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

/// The TokenRequest body for `request`, bound to `pod`.
pub(super) fn body(pod: &Pod, request: &TokenRequest) -> ApiTokenRequest {
    ApiTokenRequest {
        spec: TokenRequestSpec {
            // Empty means the API server's own audiences.
            audiences: request.audience.iter().cloned().collect(),
            expiration_seconds: Some(request.expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    }
}

/// The token in the API server's answer, issued (as the kubelet reckons it) its granted
/// expirationSeconds (`asked` when the answer does not say) before it expires.
pub(super) fn issued(answer: &ApiTokenRequest, asked: i64) -> Option<IssuedToken> {
    let status = answer.status.as_ref().filter(|s| !s.token.is_empty())?;
    let expires = std::time::SystemTime::from(status.expiration_timestamp.0);
    let seconds = answer.spec.expiration_seconds.unwrap_or(asked).max(0) as u64;
    Some(IssuedToken {
        token: status.token.clone(),
        issued: expires
            .checked_sub(std::time::Duration::from_secs(seconds))
            .unwrap_or(expires),
        expires,
    })
}

impl TokenSource for ApiTokens {
    fn token<'a>(
        &'a self,
        pod: &'a Pod,
        request: TokenRequest,
    ) -> BoxFuture<'a, Result<IssuedToken, String>> {
        Box::pin(async move {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
            let answer: ApiTokenRequest = api
                .create_subresource(
                    "token",
                    &request.service_account,
                    &PostParams::default(),
                    &body(pod, &request),
                )
                .await
                .map_err(|e| {
                    format!(
                        "token request for serviceaccount {ns}/{}: {e}",
                        request.service_account
                    )
                })?;
            issued(&answer, request.expiration_seconds).ok_or_else(|| {
                format!(
                    "token request for serviceaccount {ns}/{}: no token in the answer",
                    request.service_account
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn the_token_is_bound_to_the_pod() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut request = TokenRequest {
            service_account: "default".into(),
            audience: None,
            expiration_seconds: 3607,
        };
        let b = body(&pod, &request);
        assert!(b.spec.audiences.is_empty());
        assert_eq!(b.spec.expiration_seconds, Some(3607));
        let bound = b.spec.bound_object_ref.unwrap();
        assert_eq!(bound.kind.as_deref(), Some("Pod"));
        assert_eq!(bound.uid.as_deref(), Some("u1"));
        request.audience = Some("vault".into());
        assert_eq!(body(&pod, &request).spec.audiences, ["vault"]);
    }

    #[test]
    fn the_token_was_issued_its_granted_seconds_before_it_expires() {
        use k8s_openapi::api::authentication::v1::TokenRequestStatus;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let expires: jiff::Timestamp = "2026-01-01T01:00:00Z".parse().unwrap();
        let mut answer = ApiTokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            status: Some(TokenRequestStatus {
                token: "abc".into(),
                expiration_timestamp: Time(expires),
            }),
            ..Default::default()
        };
        let t = issued(&answer, 600).unwrap();
        assert_eq!(t.token, "abc");
        assert_eq!(t.expires, std::time::SystemTime::from(expires));
        assert_eq!(
            t.issued,
            std::time::SystemTime::from("2026-01-01T00:00:00Z".parse::<jiff::Timestamp>().unwrap())
        );
        answer.status.as_mut().unwrap().token.clear();
        assert_eq!(issued(&answer, 600), None);
    }
}
