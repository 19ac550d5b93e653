//! Streaming into pods on the secure port, as the kubelet serves it to the API server:
//! `/exec/{namespace}/{pod}[/{uid}]/{container}` and `/attach/…` (same path) over SPDY/3.1
//! (`v1`–`v5.channel.k8s.io`) or WebSocket (`v4`/`v5.channel.k8s.io` and their `base64.`
//! forms), and `/portForward/{namespace}/{pod}[/{uid}]` over SPDY (`portforward.k8s.io`) or
//! WebSocket (see `websocket`). Which one the API server uses follows the node's declared
//! features (`ExtendWebSocketsToKubelet`, see `crate::features`): it passes kubectl's
//! WebSocket through to a node declaring it and speaks SPDY to any other.
//!
//! Layout: `spdy` (the frame codec), `session` (a SPDY server session), `remotecommand`
//! (options, versions and the exec session bound to channels), `attach` (the session bound
//! to a running container's own process and log), `websocket` (the channel
//! protocol over WebSocket messages), `portforward` (port-forward streams to TCP inside the
//! pod's network namespace). This module owns only routing: it finds the pod and container
//! in the status manager, performs the upgrade and hands the connection to the protocol.
//! Each upgraded connection is served by its own tasks; nothing here keeps state between
//! connections.

pub mod attach;
pub mod idle;
pub mod portforward;
pub mod remotecommand;
pub mod session;
pub mod spdy;
pub mod websocket;

use std::path::PathBuf;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use self::remotecommand::{Action, Channels, Options, ResizeDecoder, Version};
use self::session::{Session, Stream, StreamWriter};
use crate::runtime::Runtime;
use crate::status::StatusManager;

/// The SPDY upgrade token.
const SPDY: &str = "SPDY/3.1";
/// The header a client lists its stream protocols in, and the server names its choice.
const PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";
/// The header a refusal lists the server's protocols in.
const ACCEPTED_HEADER: &str = "X-Accepted-Stream-Protocol-Versions";
/// How long the client has to open the streams a session needs (the kubelet's
/// streamCreationTimeout default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// What streaming needs beyond the server's state.
#[derive(Clone)]
pub struct Streaming {
    pub runtime: Runtime,
    /// The sandbox manager's run dir: `<dir>/<uid>/net` pins a pod's network namespace.
    pub sandbox_dir: PathBuf,
    /// `streamingConnectionIdleTimeout`: a connection idle this long is closed.
    pub idle_timeout: Duration,
}

#[derive(Clone)]
struct Ctx {
    status: StatusManager,
    /// Where container logs are: attach follows them.
    log_dir: PathBuf,
    streaming: Option<Streaming>,
}

/// The streaming routes (and `/run`); without a runtime they answer 501.
pub fn routes(status: StatusManager, log_dir: PathBuf, streaming: Option<Streaming>) -> Router {
    Router::new()
        .route("/exec/{*rest}", any(exec))
        .route("/attach/{*rest}", any(attach))
        .route("/portForward/{*rest}", any(port_forward))
        .route("/run/{*rest}", axum::routing::post(run))
        .with_state(Ctx {
            status,
            log_dir,
            streaming,
        })
}

/// A request refused before any upgrade.
#[derive(Debug)]
struct Refusal {
    code: StatusCode,
    message: String,
    /// Protocols to list in `X-Accepted-Stream-Protocol-Versions`.
    accepted: &'static [&'static str],
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (self.code, self.message).into_response();
        for p in self.accepted {
            response
                .headers_mut()
                .append(ACCEPTED_HEADER, HeaderValue::from_static(p));
        }
        response
    }
}

fn error(code: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
        accepted: &[],
    }
}

/// The pod named by `namespace`/`name` (and `uid`, when the path gives one).
fn pod(
    status: &StatusManager,
    namespace: &str,
    name: &str,
    uid: Option<&str>,
) -> Result<Pod, Refusal> {
    let pod = super::logs::find_pod(status, namespace, name)
        .filter(|p| uid.is_none() || p.metadata.uid.as_deref() == uid)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "pod does not exist"))?;
    Ok(pod)
}

/// The containerd id of a running container of the pod.
fn running_container(pod: &Pod, container: &str) -> Result<String, Refusal> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let status = super::logs::container_status(pod, container).ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            format!("container {container} is not valid for pod {name}"),
        )
    })?;
    let running = status.state.as_ref().is_some_and(|s| s.running.is_some());
    match (status.container_id, running) {
        (Some(id), true) => Ok(id.trim_start_matches("containerd://").to_string()),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            format!("container {container} is not running in pod {name}"),
        )),
    }
}

fn segments(path: &str) -> Vec<&str> {
    path.trim_start_matches('/').split('/').skip(1).collect()
}

/// The `{namespace}/{pod}[/{uid}]/{container}` a command path names.
fn command_target(path: &str) -> Result<(&str, &str, Option<&str>, &str), Refusal> {
    match segments(path)[..] {
        [ns, pod, container] => Ok((ns, pod, None, container)),
        [ns, pod, uid, container] => Ok((ns, pod, Some(uid), container)),
        _ => Err(error(
            StatusCode::NOT_FOUND,
            format!("no target container in {path}"),
        )),
    }
}

fn no_runtime() -> Refusal {
    error(
        StatusCode::NOT_IMPLEMENTED,
        "no container runtime to exec in",
    )
}

fn is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// How the request streams, for the log: `websocket` or `spdy`.
fn transport(headers: &HeaderMap) -> &'static str {
    match is_websocket(headers) {
        true => "websocket",
        false => "spdy",
    }
}

/// Checks a SPDY upgrade request and negotiates its protocol: (protocol, the 101 response),
/// or the refusal to send instead.
fn spdy_handshake(
    headers: &HeaderMap,
    server: &'static [&'static str],
) -> Result<(String, Response), Refusal> {
    let connection = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(SPDY));
    if !connection || !upgrade {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: missing upgrade headers in request",
        ));
    }
    let client: Vec<&str> = headers
        .get_all(PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let protocol = if client.is_empty() {
        // Clients older than negotiation: the kubelet serves them v1.
        String::new()
    } else {
        match remotecommand::negotiate(client.iter().copied(), server) {
            Some(p) => p.to_string(),
            None => {
                return Err(Refusal {
                    accepted: server,
                    ..error(
                        StatusCode::FORBIDDEN,
                        format!(
                            "unable to upgrade: unable to negotiate protocol: client supports {client:?}, server accepts {server:?}"
                        ),
                    )
                });
            }
        }
    };
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static(SPDY));
    if let Ok(v) = HeaderValue::from_str(&protocol) {
        if !protocol.is_empty() {
            h.insert(PROTOCOL_HEADER, v);
        }
    }
    Ok((protocol, response))
}

/// Upgrades `request` to a SPDY session served by `serve` once the 101 has been sent; the
/// connection is dropped once idle for `idle`.
fn upgrade_to_spdy<F, Fut>(
    mut request: Request,
    response: Response,
    idle: Duration,
    serve: F,
) -> Response
where
    F: FnOnce(Session, mpsc::Receiver<Stream>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let activity = idle::Activity::new(idle);
                let io = idle::IdleIo::new(TokioIo::new(upgraded), activity.clone());
                let (session, streams) = Session::serve(io);
                serve_until_idle(session, streams, activity, serve).await;
            }
            Err(e) => debug!(error = %e, "the SPDY upgrade failed"),
        }
    });
    response
}

/// Serves a SPDY session, aborting its connection once `activity` is idle.
async fn serve_until_idle<F, Fut>(
    session: Session,
    streams: mpsc::Receiver<Stream>,
    activity: idle::Activity,
    serve: F,
) where
    F: FnOnce(Session, mpsc::Receiver<Stream>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let watched = session.clone();
    let watchdog = tokio::spawn(async move {
        activity.idle().await;
        info!("closing an idle streaming connection (streamingConnectionIdleTimeout)");
        watched.abort();
    });
    serve(session, streams).await;
    watchdog.abort();
}

async fn exec(State(ctx): State<Ctx>, request: Request) -> Response {
    remote_command_upgrade(ctx, request, false)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn attach(State(ctx): State<Ctx>, request: Request) -> Response {
    remote_command_upgrade(ctx, request, true)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The attach target of a running container of the pod.
fn attach_target(
    pod: &Pod,
    name: &str,
    container_id: String,
    log_dir: &std::path::Path,
) -> Result<attach::Target, Refusal> {
    let spec = pod.spec.as_ref().and_then(|s| {
        let all = s
            .containers
            .iter()
            .chain(s.init_containers.iter().flatten());
        all.map(|c| (c.name.as_str(), c.stdin, c.stdin_once, c.tty))
            .chain(
                s.ephemeral_containers
                    .iter()
                    .flatten()
                    .map(|c| (c.name.as_str(), c.stdin, c.stdin_once, c.tty)),
            )
            .find(|c| c.0 == name)
    });
    let Some((_, stdin, stdin_once, tty)) = spec else {
        let message = format!("container {name} is not valid for pod");
        return Err(error(StatusCode::NOT_FOUND, message));
    };
    let attempt =
        super::logs::container_status(pod, name).map_or(0, |c| c.restart_count.max(0) as u32);
    Ok(attach::Target {
        container_id,
        log_path: crate::pod::logs::log_path(log_dir, pod, name, attempt),
        stdin: stdin.unwrap_or(false),
        stdin_once: stdin_once.unwrap_or(false),
        tty: tty.unwrap_or(false),
    })
}

/// An exec or attach request: the upgrade, then the session over SPDY or WebSocket.
async fn remote_command_upgrade(
    ctx: Ctx,
    request: Request,
    attaching: bool,
) -> Result<Response, Refusal> {
    let streaming = ctx.streaming.clone().ok_or_else(no_runtime)?;
    let path = request.uri().path().to_string();
    let (namespace, name, uid, container) = command_target(&path)?;
    let query = request.uri().query().unwrap_or("");
    let options = match attaching {
        true => remotecommand::attach_options(query),
        false => remotecommand::options(query),
    }
    .map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    let pod = pod(&ctx.status, namespace, name, uid)?;
    let container_id = running_container(&pod, container)?;
    let transport = transport(request.headers());
    let action = match attaching {
        true => {
            info!(pod = name, ns = namespace, container, transport, "attach");
            let target = attach_target(&pod, container, container_id, &ctx.log_dir)?;
            Action::Attach(target)
        }
        false => {
            let command = &options.command;
            info!(
                pod = name,
                ns = namespace,
                container,
                transport,
                ?command,
                "exec"
            );
            Action::Exec { container_id }
        }
    };
    if is_websocket(request.headers()) {
        let (runtime, idle) = (streaming.runtime, streaming.idle_timeout);
        return Ok(websocket::remote_command(request, runtime, action, options, idle).await);
    }
    let (protocol, response) = spdy_handshake(request.headers(), remotecommand::SPDY_PROTOCOLS)?;
    let version = Version::of(&protocol).unwrap_or(Version::V1);
    let idle = streaming.idle_timeout;
    Ok(upgrade_to_spdy(
        request,
        response,
        idle,
        move |session, streams| async move {
            remote_command_over_spdy(
                session,
                streams,
                streaming.runtime,
                action,
                options,
                version,
            )
            .await
        },
    ))
}

/// `POST /run/{namespace}/{pod}[/{uid}]/{container}?cmd=…`, the kubelet's command run without a
/// stream: `cmd` split on spaces (its legacy parameter), run to its end, stdout then stderr
/// answered; a non-zero exit is a 500 naming it, as the kubelet's ExecSync error. The
/// kubelet sets no timeout; the streaming idle timeout bounds it here.
async fn run(State(ctx): State<Ctx>, request: Request) -> Response {
    run_command(ctx, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn run_command(ctx: Ctx, request: Request) -> Result<Response, Refusal> {
    let streaming = ctx.streaming.clone().ok_or_else(no_runtime)?;
    let path = request.uri().path().to_string();
    let (namespace, name, uid, container) = command_target(&path)?;
    let command: Vec<String> = remotecommand::form_urlencoded(request.uri().query().unwrap_or(""))
        .into_iter()
        .find(|(k, _)| k == "cmd")
        .map(|(_, v)| v.split(' ').map(str::to_string).collect())
        .unwrap_or_default();
    let pod = pod(&ctx.status, namespace, name, uid)?;
    let container_id = running_container(&pod, container)?;
    info!(pod = name, ns = namespace, container, ?command, "run");
    let output = streaming
        .runtime
        .exec(&container_id, &command, streaming.idle_timeout)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut body = output.stdout;
    body.extend(output.stderr);
    if output.exit_code != 0 {
        let message = format!(
            "command {command:?} exited with {}: {}",
            output.exit_code,
            String::from_utf8_lossy(&body)
        );
        return Err(error(StatusCode::INTERNAL_SERVER_ERROR, message));
    }
    Ok((StatusCode::OK, body).into_response())
}

/// The streams of one exec session, by `streamType`.
#[derive(Default)]
struct ExecStreamSet {
    error: Option<Stream>,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

impl ExecStreamSet {
    fn complete(&self, options: &Options, version: Version) -> bool {
        let s = options.stdio;
        self.error.is_some()
            && (!s.stdin || self.stdin.is_some())
            && (!s.stdout || self.stdout.is_some())
            && (!s.stderr || self.stderr.is_some())
            && (!(s.tty && version.has_resize()) || self.resize.is_some())
    }
}

async fn remote_command_over_spdy(
    session: Session,
    mut incoming: mpsc::Receiver<Stream>,
    runtime: Runtime,
    action: Action,
    options: Options,
    version: Version,
) {
    let mut streams = ExecStreamSet::default();
    let collected = tokio::time::timeout(STREAM_CREATION_TIMEOUT, async {
        while !streams.complete(&options, version) {
            let Some(stream) = incoming.recv().await else {
                return false;
            };
            let kind = spdy::header(&stream.headers, "streamtype")
                .unwrap_or("")
                .to_string();
            let slot = match kind.as_str() {
                "error" => &mut streams.error,
                "stdin" => &mut streams.stdin,
                "stdout" => &mut streams.stdout,
                "stderr" => &mut streams.stderr,
                "resize" => &mut streams.resize,
                other => {
                    debug!(stream_type = other, "unexpected exec stream");
                    stream.writer.reset(spdy::rst::REFUSED_STREAM).await;
                    continue;
                }
            };
            *slot = Some(stream);
        }
        true
    })
    .await;
    if collected != Ok(true) {
        warn!(
            ?action,
            "the client did not open the session's streams in time"
        );
        session.close().await;
        return;
    }
    let mut senders = Vec::new();
    let mut output = |stream: Option<Stream>| {
        stream.map(|s| {
            let (tx, rx) = mpsc::channel(16);
            senders.push(tokio::spawn(forward_to(s.writer, rx)));
            tx
        })
    };
    let stdout = output(streams.stdout);
    let stderr = output(streams.stderr);
    let error = output(streams.error).expect("the error stream is there");
    let stdin = streams.stdin.map(|mut s| {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(chunk) = s.reader.recv().await {
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        rx
    });
    let resize = streams.resize.map(|mut s| {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut decoder = ResizeDecoder::default();
            while let Some(chunk) = s.reader.recv().await {
                for size in decoder.push(&chunk) {
                    if tx.send(size).await.is_err() {
                        return;
                    }
                }
            }
        });
        rx
    });
    let channels = Channels {
        stdin,
        resize,
        stdout,
        stderr,
        error,
    };
    let gone = session.clone();
    remotecommand::serve(&runtime, &action, &options, version, channels, async move {
        gone.gone().await
    })
    .await;
    for sender in senders {
        let _ = sender.await;
    }
    session.close().await;
}

/// Writes what arrives on `rx` to the stream, and half-closes it when `rx` ends.
async fn forward_to(writer: StreamWriter, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(chunk) = rx.recv().await {
        if writer.write(&chunk).await.is_err() {
            return;
        }
    }
    writer.close().await;
}

async fn port_forward(State(ctx): State<Ctx>, request: Request) -> Response {
    port_forward_upgrade(ctx, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn port_forward_upgrade(ctx: Ctx, request: Request) -> Result<Response, Refusal> {
    let no_runtime = || {
        error(
            StatusCode::NOT_IMPLEMENTED,
            "no container runtime to forward to",
        )
    };
    let streaming = ctx.streaming.clone().ok_or_else(no_runtime)?;
    let path = request.uri().path().to_string();
    let (namespace, name, uid) = match segments(&path)[..] {
        [ns, pod] => (ns, pod, None),
        [ns, pod, uid] => (ns, pod, Some(uid)),
        _ => {
            let message = format!("no port-forward target in {path}");
            return Err(error(StatusCode::NOT_FOUND, message));
        }
    };
    let pod = pod(&ctx.status, namespace, name, uid)?;
    let target = portforward::Target::of(&pod, &streaming.sandbox_dir);
    let idle = streaming.idle_timeout;
    let transport = transport(request.headers());
    if is_websocket(request.headers()) {
        let ports = websocket::forwarded_ports(request.uri().query().unwrap_or(""))
            .map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
        info!(
            pod = name,
            ns = namespace,
            transport,
            ?ports,
            "port-forward"
        );
        return Ok(websocket::port_forward(request, target, ports, idle).await);
    }
    let (_, response) = spdy_handshake(request.headers(), &[portforward::PROTOCOL])?;
    info!(pod = name, ns = namespace, transport, "port-forward");
    Ok(upgrade_to_spdy(
        request,
        response,
        idle,
        move |session, streams| async move { portforward::serve(session, streams, target).await },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_spdy_handshake_negotiates_as_the_kubelet() {
        let ok = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "SPDY/3.1"),
            (PROTOCOL_HEADER, "v4.channel.k8s.io"),
            (PROTOCOL_HEADER, "v3.channel.k8s.io"),
        ]);
        let (protocol, response) = spdy_handshake(&ok, remotecommand::SPDY_PROTOCOLS).unwrap();
        assert_eq!(protocol, "v4.channel.k8s.io");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(response.headers()[PROTOCOL_HEADER], "v4.channel.k8s.io");
        assert_eq!(response.headers()[header::UPGRADE], "SPDY/3.1");

        let none = headers(&[
            ("connection", "keep-alive, upgrade"),
            ("upgrade", "spdy/3.1"),
        ]);
        let (protocol, response) = spdy_handshake(&none, remotecommand::SPDY_PROTOCOLS).unwrap();
        assert_eq!(protocol, "", "no negotiation: v1");
        assert!(response.headers().get(PROTOCOL_HEADER).is_none());

        let wrong = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "SPDY/3.1"),
            (PROTOCOL_HEADER, "v9.channel.k8s.io"),
        ]);
        let refusal = spdy_handshake(&wrong, remotecommand::SPDY_PROTOCOLS)
            .unwrap_err()
            .into_response();
        assert_eq!(refusal.status(), StatusCode::FORBIDDEN);
        let accepted: Vec<_> = refusal.headers().get_all(ACCEPTED_HEADER).iter().collect();
        assert_eq!(accepted.len(), 5);

        let plain = headers(&[("upgrade", "SPDY/3.1")]);
        let refusal = spdy_handshake(&plain, remotecommand::SPDY_PROTOCOLS).unwrap_err();
        assert_eq!(refusal.code, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn paths_name_namespace_pod_uid_and_container() {
        assert_eq!(segments("/exec/ns/p/c"), ["ns", "p", "c"]);
        assert_eq!(segments("/exec/ns/p/uid/c"), ["ns", "p", "uid", "c"]);
        assert_eq!(segments("/portForward/ns/p"), ["ns", "p"]);
    }
}
