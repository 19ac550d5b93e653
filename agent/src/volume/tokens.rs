//! Service account tokens for projected `serviceAccountToken` sources: the cache in front of the
//! token issuer (cluster mode's TokenRequest), kept as the kubelet's token manager keeps it.
//!
//! A token is requested once per (namespace, service account, audience, expiration, bound pod)
//! and reused until it is due for a refresh: past 80 % of its life, or 24 h after it was issued,
//! whichever comes first (the kubelet's rule, without its random jitter of up to 10 s). A refresh
//! that fails while the cached token is still valid keeps the cached one, so an API outage never
//! empties or stales a volume before its token really expires; an expired token is an error.
//!
//! State: the `VolumeManager` owns the cache. Pod workers read it through setup and refresh; the
//! manager's refresh task asks which pods hold a token that is due and rewrites their volumes.
//! No lock is held across a request to the issuer (a concurrency bound around the request, in
//! the issuer, fits without touching this module).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Pod, Volume};

use super::{failed, invalid, VolumeError, VolumeManager, TOKEN_CHECK_PERIOD};

/// A service account token request for a projected serviceAccountToken source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    pub service_account: String,
    pub audience: Option<String>,
    pub expiration_seconds: i64,
}

/// A token as the issuer answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedToken {
    pub token: String,
    /// When it was issued (the kubelet takes the expiry less the granted expirationSeconds).
    pub issued: SystemTime,
    pub expires: SystemTime,
}

impl IssuedToken {
    /// When the token is due for a refresh: 80 % into its life, at most 24 h after issue.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self.expires.duration_since(self.issued).unwrap_or_default();
        self.issued + (life * 4 / 5).min(MAX_TTL)
    }
}

/// The longest the kubelet uses a token before asking for a new one.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Issues service account tokens (the cluster mode's TokenRequest). Standalone mode has none,
/// and a serviceAccountToken projection is then refused as Invalid.
pub trait TokenSource: Send + Sync {
    fn token<'a>(
        &'a self,
        pod: &'a Pod,
        request: TokenRequest,
    ) -> BoxFuture<'a, Result<IssuedToken, String>>;
}

/// What a cached token was requested for (the kubelet's cache key).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    pod_uid: String,
    pod_name: String,
    namespace: String,
    service_account: String,
    audience: Option<String>,
    expiration_seconds: i64,
}

impl Key {
    fn new(pod: &Pod, request: &TokenRequest) -> Self {
        Self {
            pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
            pod_name: pod.metadata.name.clone().unwrap_or_default(),
            namespace: super::namespace(pod).to_string(),
            service_account: request.service_account.clone(),
            audience: request.audience.clone(),
            expiration_seconds: request.expiration_seconds,
        }
    }
}

/// The token cache (see the module doc).
pub struct TokenCache {
    /// The issuer, fixed at construction (none standalone).
    source: Option<Arc<dyn TokenSource>>,
    tokens: Mutex<BTreeMap<Key, IssuedToken>>,
}

impl TokenCache {
    pub fn new(source: Option<Arc<dyn TokenSource>>) -> Self {
        Self {
            source,
            tokens: Mutex::default(),
        }
    }

    pub fn has_source(&self) -> bool {
        self.source.is_some()
    }

    /// The token for `request` bound to `pod`: the cached one unless it is due at `now`.
    pub async fn get(
        &self,
        pod: &Pod,
        request: TokenRequest,
        now: SystemTime,
    ) -> Result<String, String> {
        let key = Key::new(pod, &request);
        let cached = self.tokens.lock().expect("tokens lock").get(&key).cloned();
        if let Some(c) = cached.as_ref().filter(|c| now < c.refresh_at()) {
            return Ok(c.token.clone());
        }
        let source = self.source.as_ref().ok_or("no token issuer")?;
        match source.token(pod, request).await {
            Ok(issued) => {
                let token = issued.token.clone();
                self.tokens.lock().expect("tokens lock").insert(key, issued);
                Ok(token)
            }
            Err(e) => match cached {
                Some(c) if now < c.expires => {
                    tracing::warn!(pod = %key.pod_uid, service_account = %key.service_account,
                        error = %e, "refreshing a service account token failed; the cached one \
                        is still valid and stays in use");
                    Ok(c.token)
                }
                Some(_) => Err(format!("{e} (the cached token has expired)")),
                None => Err(e),
            },
        }
    }

    /// Whether a token of pod `uid` is due for a refresh at `now`.
    pub fn due(&self, uid: &str, now: SystemTime) -> bool {
        self.tokens
            .lock()
            .expect("tokens lock")
            .iter()
            .any(|(k, t)| k.pod_uid == uid && now >= t.refresh_at())
    }

    /// Drops the tokens of pod `uid` (its volumes are gone).
    pub fn forget(&self, uid: &str) {
        self.tokens
            .lock()
            .expect("tokens lock")
            .retain(|k, _| k.pod_uid != uid);
    }
}

// The manager's side: tokens for a projected volume, and the refresh task.
impl VolumeManager {
    /// Starts the task that refreshes projected tokens before they expire (with a token
    /// issuer only; it ends with the manager).
    pub(super) fn refresh_tokens_periodically(manager: std::sync::Weak<Self>) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TOKEN_CHECK_PERIOD).await;
                let Some(manager) = manager.upgrade() else {
                    return;
                };
                manager.refresh_tokens(SystemTime::now()).await;
            }
        });
    }

    /// Rewrites the projected volumes of every pod holding a token that is due for a refresh
    /// at `now` (see `tokens`). A pod whose volume work is under way is left to it. A failed
    /// rewrite leaves the files as they were and is retried on the next pass.
    pub async fn refresh_tokens(&self, now: SystemTime) {
        let pods: Vec<(String, Arc<Pod>)> = self
            .token_pods
            .lock()
            .expect("token pods lock")
            .iter()
            .filter(|(uid, _)| self.tokens.due(uid, now))
            .map(|(uid, pod)| (uid.clone(), pod.clone()))
            .collect();
        for (uid, pod) in pods {
            let Some(_pod) = self.pod_locks.try_lock(&uid) else {
                continue;
            };
            if !self
                .token_pods
                .lock()
                .expect("token pods lock")
                .contains_key(&uid)
            {
                continue;
            }
            if let Err(e) = self.reproject(&pod, &uid, now, has_token_source).await {
                tracing::warn!(pod = %uid, error = %e, "refreshing service account tokens");
            }
        }
    }

    pub(super) async fn fetch_tokens(
        &self,
        pod: &Pod,
        vol: &Volume,
        now: SystemTime,
    ) -> Result<BTreeMap<usize, String>, VolumeError> {
        let mut tokens = BTreeMap::new();
        let Some(projected) = &vol.projected else {
            return Ok(tokens);
        };
        for (i, s) in projected.sources.iter().flatten().enumerate() {
            let Some(t) = &s.service_account_token else {
                continue;
            };
            if !self.tokens.has_source() {
                return Err(invalid(
                    &vol.name,
                    "serviceAccountToken projection needs a token issuer, and standalone mode \
                     has none (no TokenRequest API)",
                ));
            }
            let request = TokenRequest {
                service_account: pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into()),
                audience: t.audience.clone(),
                expiration_seconds: t.expiration_seconds.unwrap_or(3600),
            };
            let token = self
                .tokens
                .get(pod, request, now)
                .await
                .map_err(|e| failed(&vol.name, format!("serviceAccountToken: {e}")))?;
            tokens.insert(i, token);
        }
        Ok(tokens)
    }

    /// Remembers the pod for the token refresh task when it projects service account tokens.
    pub(super) fn note_token_pod(&self, uid: &str, pod: &Arc<Pod>) {
        let uses_tokens = pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .any(has_token_source);
        let mut pods = self.token_pods.lock().expect("token pods lock");
        if uses_tokens {
            pods.insert(uid.to_string(), pod.clone());
        } else {
            pods.remove(uid);
        }
    }
}

/// Whether the volume projects a service account token.
fn has_token_source(vol: &Volume) -> bool {
    vol.projected
        .iter()
        .flat_map(|p| p.sources.iter().flatten())
        .any(|s| s.service_account_token.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const HOUR: Duration = Duration::from_secs(3600);

    /// Issues `token-N` (N counting requests) valid for the requested seconds from `at`, or
    /// fails while `down` is set.
    struct Fake {
        calls: AtomicUsize,
        down: AtomicBool,
        at: Mutex<SystemTime>,
    }

    impl Fake {
        fn new(at: SystemTime) -> Arc<Self> {
            Arc::new(Self {
                calls: AtomicUsize::new(0),
                down: AtomicBool::new(false),
                at: Mutex::new(at),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl TokenSource for Fake {
        fn token<'a>(
            &'a self,
            _pod: &'a Pod,
            request: TokenRequest,
        ) -> BoxFuture<'a, Result<IssuedToken, String>> {
            Box::pin(async move {
                if self.down.load(Ordering::SeqCst) {
                    return Err("connection refused".into());
                }
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                let issued = *self.at.lock().unwrap();
                Ok(IssuedToken {
                    token: format!("token-{n}"),
                    issued,
                    expires: issued + Duration::from_secs(request.expiration_seconds as u64),
                })
            })
        }
    }

    fn pod(uid: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("pod-{uid}")),
                namespace: Some("ns".into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn request(audience: Option<&str>, seconds: i64) -> TokenRequest {
        TokenRequest {
            service_account: "default".into(),
            audience: audience.map(Into::into),
            expiration_seconds: seconds,
        }
    }

    /// A start time, a fake issuing at it, and a cache in front of the fake.
    fn start() -> (SystemTime, Arc<Fake>, TokenCache) {
        let t0 = SystemTime::UNIX_EPOCH + HOUR * 1000;
        let fake = Fake::new(t0);
        let cache = TokenCache::new(Some(fake.clone()));
        (t0, fake, cache)
    }

    #[tokio::test]
    async fn a_token_is_requested_once_per_pod_account_audience_and_expiry() {
        let (t0, fake, cache) = start();
        let (a, b) = (pod("a"), pod("b"));
        let get = |p, r| cache.get(p, r, t0);
        assert_eq!(get(&a, request(None, 3600)).await.unwrap(), "token-1");
        assert_eq!(get(&a, request(None, 3600)).await.unwrap(), "token-1");
        assert_eq!(fake.calls(), 1, "the second use is served from the cache");
        assert_eq!(
            get(&a, request(Some("vault"), 3600)).await.unwrap(),
            "token-2"
        );
        assert_eq!(get(&a, request(None, 7200)).await.unwrap(), "token-3");
        assert_eq!(get(&b, request(None, 3600)).await.unwrap(), "token-4");
        assert_eq!(fake.calls(), 4);
        cache.forget("a");
        assert_eq!(get(&a, request(None, 3600)).await.unwrap(), "token-5");
        assert_eq!(get(&b, request(None, 3600)).await.unwrap(), "token-4");
    }

    #[tokio::test]
    async fn a_token_is_refreshed_past_eighty_percent_of_its_life_or_after_a_day() {
        let (t0, fake, cache) = start();
        let p = pod("a");
        assert_eq!(
            cache.get(&p, request(None, 3600), t0).await.unwrap(),
            "token-1"
        );
        let before = t0 + Duration::from_secs(2879);
        assert!(!cache.due("a", before));
        assert_eq!(
            cache.get(&p, request(None, 3600), before).await.unwrap(),
            "token-1"
        );
        let past = t0 + Duration::from_secs(2880);
        assert!(cache.due("a", past));
        assert!(!cache.due("b", past));
        *fake.at.lock().unwrap() = past;
        assert_eq!(
            cache.get(&p, request(None, 3600), past).await.unwrap(),
            "token-2"
        );
        assert!(!cache.due("a", past));

        // A two-day token is refreshed after one day, not after 80 % of two.
        let long = 48 * 3600;
        let b = pod("b");
        assert_eq!(
            cache.get(&b, request(None, long), past).await.unwrap(),
            "token-3"
        );
        assert!(!cache.due("b", past + HOUR * 23));
        assert!(cache.due("b", past + HOUR * 24));
    }

    #[tokio::test]
    async fn an_outage_keeps_the_valid_token_and_an_expired_one_is_an_error() {
        let (t0, fake, cache) = start();
        let p = pod("a");
        assert_eq!(
            cache.get(&p, request(None, 3600), t0).await.unwrap(),
            "token-1"
        );
        fake.down.store(true, Ordering::SeqCst);
        let due = t0 + Duration::from_secs(3000);
        assert_eq!(
            cache.get(&p, request(None, 3600), due).await.unwrap(),
            "token-1"
        );
        assert!(cache.due("a", due), "still due: the next pass tries again");
        let expired = t0 + HOUR;
        let err = cache
            .get(&p, request(None, 3600), expired)
            .await
            .unwrap_err();
        assert!(
            err.contains("connection refused") && err.contains("expired"),
            "{err}"
        );
        fake.down.store(false, Ordering::SeqCst);
        assert_eq!(
            cache.get(&p, request(None, 3600), expired).await.unwrap(),
            "token-2"
        );
        // Without a cached token, the issuer's error is the answer.
        fake.down.store(true, Ordering::SeqCst);
        let err = cache
            .get(&pod("b"), request(None, 3600), t0)
            .await
            .unwrap_err();
        assert_eq!(err, "connection refused");
    }
}
