//! The secure port's Webhook authorization: each request is a SubjectAccessReview in the
//! API, made with the node's own credential (the `system:node` role may create them), with
//! decisions cached as the kubelet caches them (allowed 5 minutes, denied 30 seconds).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use crate::server::secure::{Attributes, Authorizer};

const ALLOWED_TTL: Duration = Duration::from_secs(300);
const DENIED_TTL: Duration = Duration::from_secs(30);

type Cache = Arc<Mutex<HashMap<Attributes, (bool, Instant)>>>;

/// An authorizer that asks the API.
pub fn webhook(client: kube::Client) -> Authorizer {
    let cache: Cache = Arc::default();
    Arc::new(move |attributes: Attributes| {
        let client = client.clone();
        let cache = cache.clone();
        Box::pin(async move {
            let cached = cache.lock().expect("authz cache").get(&attributes).copied();
            if let Some((allowed, _)) = cached.filter(|(_, until)| *until > Instant::now()) {
                return Ok(allowed);
            }
            let review = Api::<SubjectAccessReview>::all(client)
                .create(&PostParams::default(), &review(&attributes))
                .await
                .map_err(|e| format!("SubjectAccessReview: {e}"))?;
            let allowed = review.status.is_some_and(|s| s.allowed);
            let ttl = if allowed { ALLOWED_TTL } else { DENIED_TTL };
            let mut cache = cache.lock().expect("authz cache");
            cache.retain(|_, (_, until)| *until > Instant::now());
            cache.insert(attributes, (allowed, Instant::now() + ttl));
            Ok(allowed)
        })
    })
}

fn review(a: &Attributes) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(a.user.clone()),
            groups: Some(a.groups.clone()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(a.verb.clone()),
                resource: Some("nodes".into()),
                subresource: Some(a.subresource.clone()),
                name: Some(a.node.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_review_names_the_node_and_the_subresource() {
        let r = review(&Attributes {
            user: "kube-apiserver-kubelet-client".into(),
            groups: vec!["system:masters".into()],
            verb: "get".into(),
            node: "n1".into(),
            subresource: "proxy".into(),
        });
        let ra = r.spec.resource_attributes.unwrap();
        assert_eq!(ra.resource.as_deref(), Some("nodes"));
        assert_eq!(ra.subresource.as_deref(), Some("proxy"));
        assert_eq!(ra.name.as_deref(), Some("n1"));
        assert_eq!(r.spec.groups.unwrap(), ["system:masters"]);
    }
}
