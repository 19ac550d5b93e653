//! The authenticated HTTPS port, as the kubelet's :10250: the API server reaches it for
//! `kubectl logs` (`/containerLogs/…`) and for exec, attach and port-forward, and monitoring
//! for `/pods`, `/metrics` and `/healthz`.
//!
//! - TLS with the node's serving certificate: `--tls-cert-file`/`--tls-private-key-file`, or
//!   a self-signed one made once in `<root-dir>/pki` for the node's names and addresses.
//! - Authentication: a client certificate that chains to `--client-ca-file` names the user
//!   (CN) and groups (O). Anonymous requests are refused with 401, as with the kubelet's
//!   configuration-file default (`authentication.anonymous.enabled: false`); without a client
//!   CA nobody can authenticate, and the agent says so when it starts.
//! - Authorization: per request, as the kubelet asks it: verb from the method, resource
//!   `nodes`, the node's name, and the subresource of the path (`log`, `metrics`, `stats`,
//!   `pods`, `healthz`, else `proxy`; a fine-grained subresource falls back to `proxy`).
//!   `AlwaysAllow`, or a `Webhook` (SubjectAccessReview through the API, see `cluster`); the
//!   Webhook default with no API server (standalone) allows nothing.
//! - exec, attach and port-forward upgrade to SPDY or WebSocket (`stream`); `/run` (POST, a
//!   command run without a stream, its output in the response) runs it as the kubelet does.
//!
//! [`routes`] is the whole set of endpoints; the local socket serves the same set to root.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::{node_router, ServerState};

#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// A certificate or key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A certificate, key or CA file holds no usable PEM.
    #[error("{path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    /// The self-signed serving certificate could not be made.
    #[error("generating the serving certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client CA verifier could not be built.
    #[error("client CA {path}: {detail}")]
    ClientCa { path: PathBuf, detail: String },
}

/// Who made a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

/// What a request asks for, in the API's authorization terms.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Attributes {
    pub user: String,
    pub groups: Vec<String>,
    pub verb: String,
    pub node: String,
    pub subresource: String,
}

/// A boxed authorization decision: Ok(true) allowed, Ok(false) denied, Err the reviewer failed.
pub type Decision = Pin<Box<dyn Future<Output = Result<bool, String>> + Send>>;

/// Decides requests (the Webhook mode's SubjectAccessReview lives in `cluster`).
pub type Authorizer = Arc<dyn Fn(Attributes) -> Decision + Send + Sync>;

/// How the secure port decides authenticated requests.
#[derive(Clone)]
pub enum Authorization {
    /// Every authenticated client may do everything (`--authorization-mode=AlwaysAllow`).
    AlwaysAllow,
    /// Each request is asked of the authorizer (the Webhook mode).
    Webhook(Authorizer),
    /// Nothing is allowed: the Webhook mode with no API server to ask (standalone).
    DenyAll,
}

/// Everything the secure port needs.
pub struct SecureConfig {
    pub addr: String,
    pub node_name: String,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    /// Where a self-signed certificate is kept when no files are given.
    pub cert_dir: PathBuf,
    /// DNS names and IPs the self-signed certificate covers.
    pub serving_names: Vec<String>,
    pub client_ca_file: Option<PathBuf>,
    pub authorization: Authorization,
}

#[derive(Clone)]
struct Guard {
    node: String,
    authorization: Authorization,
}

/// A bound secure port, ready to `serve`.
pub struct Bound {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    guard: Guard,
}

impl Bound {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Binds the port and builds the TLS acceptor.
pub async fn bind(config: SecureConfig) -> Result<Bound, BindError> {
    let tls = tls_config(&config)?;
    let listener = TcpListener::bind(&config.addr)
        .await
        .map_err(|source| BindError::Bind {
            addr: config.addr.clone(),
            source,
        })?;
    if config.client_ca_file.is_none() {
        warn!(
            addr = %config.addr,
            "the secure port has no --client-ca-file: no client can authenticate, so every \
             request is refused (401)"
        );
    } else if matches!(config.authorization, Authorization::DenyAll) {
        warn!(
            addr = %config.addr,
            "the secure port has no authorizer (Webhook needs --kubeconfig): every request is \
             refused (403); --authorization-mode=AlwaysAllow allows every client certificate \
             the client CA signed"
        );
    }
    let guard = Guard {
        node: config.node_name.clone(),
        authorization: config.authorization.clone(),
    };
    Ok(Bound {
        listener,
        acceptor: TlsAcceptor::from(Arc::new(tls)),
        guard,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// TLS material is missing or invalid.
    #[error(transparent)]
    Tls(#[from] SecureError),
    /// The address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Serves TLS connections until `shutdown` completes.
pub async fn serve(
    bound: Bound,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let Bound {
        listener,
        acceptor,
        guard,
    } = bound;
    let app = secure_router(state, guard);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accepting on the secure port");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move { connection(tcp, peer, acceptor, app).await });
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
) {
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
    };
    // None: anonymous (no certificate, or no client CA to verify one).
    let identity: Option<Identity> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(identity_of);
    let service = TowerToHyperService::new(app.layer(Extension(identity)));
    let served = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        debug!(%peer, error = %e, "secure connection ended");
    }
}

/// The user (CN) and groups (O) of a verified client certificate.
fn identity_of(cert: &CertificateDer<'_>) -> Option<Identity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject();
    let user = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Some(Identity { user, groups })
}

/// Every endpoint of the node: what the secure port serves once a request is authorized, and
/// what the local socket serves to root.
pub fn routes(state: ServerState) -> Router {
    let streaming = super::stream::routes(
        state.status.clone(),
        state.log_dir.clone(),
        state.streaming.clone(),
    );
    node_router(state).merge(streaming)
}

fn secure_router(state: ServerState, guard: Guard) -> Router {
    routes(state).layer(middleware::from_fn_with_state(guard, authorize))
}

/// The subresources a path is authorized by: the fine-grained one first, then `proxy`.
fn subresources(path: &str) -> Vec<&'static str> {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let specific = match first {
        "stats" => Some("stats"),
        "metrics" => Some("metrics"),
        "logs" => Some("log"),
        "spec" => Some("spec"),
        "pods" => Some("pods"),
        "healthz" => Some("healthz"),
        "configz" => Some("configz"),
        _ => None,
    };
    match specific {
        // These predate the fine-grained ones: the kubelet never falls back to proxy for them.
        Some(s @ ("stats" | "metrics" | "log" | "spec")) => vec![s],
        Some(s) => vec![s, "proxy"],
        None => vec!["proxy"],
    }
}

fn verb(method: &Method) -> &'static str {
    match *method {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "get",
    }
}

async fn authorize(
    State(guard): State<Guard>,
    Extension(identity): Extension<Option<Identity>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    let Some(identity) = identity else {
        debug!(%path, "unauthenticated request on the secure port");
        return (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
    };
    let authorizer: Authorizer = match &guard.authorization {
        Authorization::AlwaysAllow => return next.run(request).await,
        Authorization::Webhook(authorizer) => authorizer.clone(),
        Authorization::DenyAll => Arc::new(|_| Box::pin(async { Ok(false) })),
    };
    let verb = verb(request.method());
    let candidates = subresources(&path);
    for subresource in &candidates {
        let attributes = Attributes {
            user: identity.user.clone(),
            groups: identity.groups.clone(),
            verb: verb.into(),
            node: guard.node.clone(),
            subresource: (*subresource).into(),
        };
        match authorizer(attributes).await {
            Ok(true) => return next.run(request).await,
            Ok(false) => {}
            Err(e) => {
                warn!(user = %identity.user, %path, error = %e, "authorization failed");
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("authorization: {e}"),
                )
                    .into_response();
            }
        }
    }
    let subresource = candidates[0];
    info!(user = %identity.user, %path, "forbidden on the secure port");
    let message = format!(
        "Forbidden (user={}, verb={verb}, resource=nodes, subresource={subresource})",
        identity.user
    );
    (StatusCode::FORBIDDEN, message).into_response()
}

fn tls_config(config: &SecureConfig) -> Result<rustls::ServerConfig, SecureError> {
    let (cert_path, key_path) = match (&config.tls_cert_file, &config.tls_private_key_file) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => self_signed(&config.cert_dir, &config.serving_names)?,
    };
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(&cert_path, e))?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| pem_error(&key_path, e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(ca)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| pem_error(ca, e))?;
            for c in cas {
                roots.add(c)?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| SecureError::ClientCa {
                        path: ca.clone(),
                        detail: e.to_string(),
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut tls = builder.with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> SecureError {
    SecureError::Pem {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// The self-signed serving certificate in `dir`, made on first use (as the kubelet's
/// kubelet.crt in its --cert-dir).
fn self_signed(dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), SecureError> {
    let cert = dir.join("nodelet.crt");
    let key = dir.join("nodelet.key");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SecureError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let generated = rcgen::generate_simple_self_signed(names.to_vec())?;
    std::fs::write(&cert, generated.cert.pem()).map_err(io(&cert))?;
    let pem = generated.signing_key.serialize_pem();
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key)
            .map_err(io(&key))?;
        file.write_all(pem.as_bytes()).map_err(io(&key))?;
    }
    info!(cert = %cert.display(), "made a self-signed serving certificate");
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_the_kubelets_subresources() {
        assert_eq!(subresources("/containerLogs/ns/p/c"), ["proxy"]);
        assert_eq!(subresources("/metrics/probes"), ["metrics"]);
        assert_eq!(subresources("/stats/summary"), ["stats"]);
        assert_eq!(subresources("/logs/"), ["log"]);
        assert_eq!(subresources("/pods"), ["pods", "proxy"]);
        assert_eq!(subresources("/healthz"), ["healthz", "proxy"]);
        assert_eq!(subresources("/exec/ns/p/c"), ["proxy"]);
    }

    /// Writes a CA and client certificates for `users` into `dir`: `ca.crt`, `<user>.crt/.key`.
    fn client_pki(dir: &Path, users: &[&str]) -> PathBuf {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(vec![]).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "test-ca");
        std::fs::write(dir.join("ca.crt"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        for user in users {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec![]).unwrap();
            params.distinguished_name.push(DnType::CommonName, *user);
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.join(format!("{user}.crt")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{user}.key")), key.serialize_pem()).unwrap();
        }
        dir.join("ca.crt")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_authorizer_decides_who_reads_and_anonymous_is_unauthorized() {
        let dir = std::env::temp_dir().join(format!("nodelet-authz-{}", std::process::id()));
        let ca = client_pki(&dir, &["admin", "nobody"]);
        let authorizer: Authorizer =
            Arc::new(|a: Attributes| Box::pin(async move { Ok(a.user == "admin") }));
        let bound = bind(SecureConfig {
            addr: "127.0.0.1:0".into(),
            node_name: "n1".into(),
            tls_cert_file: None,
            tls_private_key_file: None,
            cert_dir: dir.join("pki"),
            serving_names: vec!["127.0.0.1".into()],
            client_ca_file: Some(ca),
            authorization: Authorization::Webhook(authorizer),
        })
        .await
        .unwrap();
        let port = bound.local_addr().unwrap().port();
        let state = ServerState {
            status: crate::status::StatusManager::new(),
            recorder: crate::events::Recorder::new("n1", None),
            metrics: Arc::new(String::new),
            log_dir: dir.clone(),
            streaming: None,
            stats: Arc::new(crate::stats::Stats::new(
                crate::stats::Cgroups::of_host(),
                "n1",
                &dir,
                &dir,
            )),
        };
        let token = tokio_util::sync::CancellationToken::new();
        tokio::spawn(serve(bound, state, token.clone().cancelled_owned()));
        let get = |user: Option<&'static str>| {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                let mut curl = std::process::Command::new("curl");
                curl.args([
                    "-sS",
                    "--max-time",
                    "10",
                    "-w",
                    "\n%{http_code}",
                    "--cacert",
                ])
                .arg(dir.join("pki/nodelet.crt"));
                if let Some(user) = user {
                    curl.arg("--cert").arg(dir.join(format!("{user}.crt")));
                    curl.arg("--key").arg(dir.join(format!("{user}.key")));
                }
                let out = curl
                    .arg(format!("https://127.0.0.1:{port}/events"))
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
        };
        assert!(get(None).await.unwrap().ends_with("\n401"));
        assert_eq!(
            get(Some("nobody")).await.unwrap(),
            "Forbidden (user=nobody, verb=get, resource=nodes, subresource=proxy)\n403"
        );
        let allowed = get(Some("admin")).await.unwrap();
        assert!(allowed.ends_with("\n200"), "{allowed}");
        token.cancel();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn methods_map_to_verbs() {
        assert_eq!(verb(&Method::GET), "get");
        assert_eq!(verb(&Method::HEAD), "get");
        assert_eq!(verb(&Method::POST), "create");
        assert_eq!(verb(&Method::DELETE), "delete");
    }

    #[test]
    fn a_client_certificate_names_user_and_groups() {
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:n1");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:nodes");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let id = identity_of(cert.der()).unwrap();
        assert_eq!(id.user, "system:node:n1");
        assert_eq!(id.groups, ["system:nodes"]);
    }

    #[test]
    fn the_self_signed_certificate_is_made_once_and_its_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("nodelet-pki-{}", std::process::id()));
        let (cert, key) = self_signed(&dir, &["node-a".into(), "127.0.0.1".into()]).unwrap();
        let first = std::fs::read(&cert).unwrap();
        self_signed(&dir, &["node-a".into()]).unwrap();
        assert_eq!(std::fs::read(&cert).unwrap(), first, "kept, not remade");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let config = SecureConfig {
            addr: "127.0.0.1:0".into(),
            node_name: "node-a".into(),
            tls_cert_file: Some(cert),
            tls_private_key_file: Some(key),
            cert_dir: dir.clone(),
            serving_names: vec![],
            client_ca_file: None,
            authorization: Authorization::AlwaysAllow,
        };
        assert!(tls_config(&config).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
