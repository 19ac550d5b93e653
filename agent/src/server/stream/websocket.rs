//! Remote command over WebSocket, as the kubelet serves it to an API server that passes the
//! client's WebSocket through (`v5.channel.k8s.io`, `v4.channel.k8s.io`, the pre-v4
//! `channel.k8s.io`, which a client asking for no protocol gets too, and the `base64.` forms
//! of each). Every message starts with
//! its channel: 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize; v5 adds 255, "close the
//! channel named in the next byte" (the client closes stdin with it). Binary protocols carry
//! the channel as a byte; base64 ones send text, the channel as an ASCII digit and the data
//! base64-encoded. The WebSocket handshake and framing are axum's (tokio-tungstenite).
//!
//! Port-forward over WebSocket, both ways the kubelet serves it: the channel protocol
//! (`v4.channel.k8s.io`, its base64 form, or no subprotocol) forwards the ports of the `port`
//! query parameter, port i on data channel 2i and error channel 2i+1, each channel opened by
//! the port as two little-endian bytes; and `SPDY/3.1+portforward.k8s.io`, where the
//! WebSocket's binary messages carry a SPDY session's bytes (the API server's tunnel of
//! kubectl's port-forward), served by the SPDY port-forward.

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::idle::{Activity, IdleIo};
use super::portforward;
use super::remotecommand::{self, Action, Channels, Options, ResizeDecoder, Version};
use crate::runtime::Runtime;

pub const V4_BINARY: &str = "v4.channel.k8s.io";
pub const V5_BINARY: &str = "v5.channel.k8s.io";
pub const V4_BASE64: &str = "v4.base64.channel.k8s.io";
pub const V5_BASE64: &str = "v5.base64.channel.k8s.io";
/// Before v4: failures only, as text, on the error channel (upstream's Pods websocket spec).
pub const V1_BINARY: &str = "channel.k8s.io";
pub const V1_BASE64: &str = "base64.channel.k8s.io";
/// What the WebSocket path accepts.
pub const PROTOCOLS: &[&str] = &[
    V5_BINARY, V4_BINARY, V5_BASE64, V4_BASE64, V1_BINARY, V1_BASE64,
];

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
/// v5: the next byte names a channel the client closed.
const CLOSE: u8 = 255;

/// How one protocol frames a channel's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    pub base64: bool,
    pub version: Version,
}

impl Framing {
    pub fn of(protocol: &str) -> Option<Framing> {
        Some(Framing {
            base64: protocol.contains("base64."),
            version: Version::of(protocol)?,
        })
    }

    /// The message carrying `data` on `channel`.
    pub fn encode(self, channel: u8, data: &[u8]) -> Message {
        if self.base64 {
            let mut text = String::from(char::from(b'0' + channel));
            text.push_str(&base64::engine::general_purpose::STANDARD.encode(data));
            Message::Text(text.into())
        } else {
            let mut bytes = Vec::with_capacity(data.len() + 1);
            bytes.push(channel);
            bytes.extend_from_slice(data);
            Message::Binary(Bytes::from(bytes))
        }
    }

    /// The channel and data of a client message; None for messages without a channel.
    pub fn decode(self, message: &Message) -> Option<(u8, Vec<u8>)> {
        match message {
            Message::Binary(b) if !self.base64 => {
                let (&channel, data) = b.split_first()?;
                Some((channel, data.to_vec()))
            }
            Message::Text(t) if self.base64 => {
                let t = t.as_str();
                let channel = t.as_bytes().first()?.checked_sub(b'0')?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(&t[1..])
                    .ok()?;
                Some((channel, data))
            }
            // A v5 close names the channel in raw bytes in either framing.
            Message::Binary(b) if b.first() == Some(&CLOSE) => Some((CLOSE, b[1..].to_vec())),
            _ => None,
        }
    }
}

/// The request's upgrade and the subprotocols it offers, in the client's order (the upgrade
/// extractor keeps them as a set); the rejection's response if it is no WebSocket upgrade.
async fn upgrade_of(request: Request) -> Result<(WebSocketUpgrade, Vec<String>), Response> {
    let (mut parts, _body) = request.into_parts();
    let requested: Vec<String> = parts
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &())
        .await
        .map_err(IntoResponse::into_response)?;
    Ok((upgrade, requested))
}

/// Upgrades to a WebSocket and runs the exec or attach over it.
pub async fn remote_command(
    request: Request,
    runtime: Runtime,
    action: Action,
    options: Options,
    idle: Duration,
) -> Response {
    let (mut upgrade, requested) = match upgrade_of(request).await {
        Ok(u) => u,
        Err(response) => return response,
    };
    // A client that asks for no protocol gets the pre-v4 binary one, as from the kubelet.
    let negotiated = match requested.is_empty() {
        true => Some(""),
        false => remotecommand::negotiate(requested.iter().map(String::as_str), PROTOCOLS),
    };
    let Some(protocol) = negotiated else {
        let message = format!(
            "requested protocol(s) are not supported: {requested:?}; supports {PROTOCOLS:?}"
        );
        return (StatusCode::BAD_REQUEST, message).into_response();
    };
    let framing = Framing::of(protocol).expect("a known protocol");
    if !protocol.is_empty() {
        upgrade.set_selected_protocol(HeaderValue::from_static(protocol));
    }
    let activity = Activity::new(idle);
    upgrade.on_upgrade(move |socket| serve(socket, framing, runtime, action, options, activity))
}

async fn serve(
    socket: WebSocket,
    framing: Framing,
    runtime: Runtime,
    action: Action,
    options: Options,
    activity: Activity,
) {
    let (sink, mut source) = socket.split();
    let (out_tx, writer) = channel_writer(sink, framing, activity.clone());

    // The kubelet's "connection established": an empty message on the lowest writable channel.
    let first = match options.stdio {
        s if s.stdout => STDOUT,
        s if s.stderr => STDERR,
        _ => ERROR,
    };
    let _ = out_tx.send((first, Vec::new())).await;

    let output = |channel: u8| {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
        let out = out_tx.clone();
        let task = tokio::spawn(async move {
            while let Some(data) = rx.recv().await {
                if out.send((channel, data)).await.is_err() {
                    return;
                }
            }
        });
        (tx, task)
    };
    let mut forwarders = Vec::new();
    let mut wanted = |on: bool, channel: u8| {
        on.then(|| {
            let (tx, task) = output(channel);
            forwarders.push(task);
            tx
        })
    };
    let stdout = wanted(options.stdio.stdout, STDOUT);
    let stderr = wanted(options.stdio.stderr, STDERR);
    let error = wanted(true, ERROR).expect("the error channel");
    drop(out_tx);

    let (stdin_tx, stdin_rx) = mpsc::channel(16);
    let (resize_tx, resize_rx) = mpsc::channel(4);
    let gone = CancellationToken::new();
    let watchdog = idle_watchdog(activity.clone(), gone.clone());
    let reader = {
        let gone = gone.clone();
        tokio::spawn(async move {
            let mut stdin = Some(stdin_tx);
            let mut decoder = ResizeDecoder::default();
            while let Some(Ok(message)) = source.next().await {
                activity.touch();
                if matches!(message, Message::Close(_)) {
                    break;
                }
                match framing.decode(&message) {
                    Some((STDIN, data)) => {
                        if let Some(tx) = &stdin {
                            let _ = tx.send(data).await;
                        }
                    }
                    Some((RESIZE, data)) => {
                        for size in decoder.push(&data) {
                            let _ = resize_tx.send(size).await;
                        }
                    }
                    Some((CLOSE, data)) if framing.version >= Version::V5 => {
                        if data.first() == Some(&STDIN) {
                            stdin = None;
                        }
                    }
                    other => debug!(?other, "ignored WebSocket message"),
                }
            }
            gone.cancel();
        })
    };
    let channels = Channels {
        stdin: options.stdio.stdin.then_some(stdin_rx),
        resize: options.stdio.tty.then_some(resize_rx),
        stdout,
        stderr,
        error,
    };
    let version = framing.version;
    let cancelled = gone.clone();
    remotecommand::serve(&runtime, &action, &options, version, channels, async move {
        cancelled.cancelled().await
    })
    .await;
    for f in forwarders {
        let _ = f.await;
    }
    let _ = writer.await;
    reader.abort();
    watchdog.abort();
}

/// A task writing `(channel, data)` to the WebSocket until every sender is gone, then closing
/// it; each message sent touches `activity`.
fn channel_writer(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    framing: Framing,
    activity: Activity,
) -> (mpsc::Sender<(u8, Vec<u8>)>, tokio::task::JoinHandle<()>) {
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(16);
    let writer = tokio::spawn(async move {
        while let Some((channel, data)) = out_rx.recv().await {
            if sink.send(framing.encode(channel, &data)).await.is_err() {
                return;
            }
            activity.touch();
        }
        close_normally(&mut sink).await;
    });
    (out_tx, writer)
}

/// Ends the WebSocket as upstream's server does, with a close frame of status 1000 (normal
/// closure): client-go's remote command client takes any other close, one without a status
/// too, as a failure of every stream, the exec's own status included.
async fn close_normally(sink: &mut futures::stream::SplitSink<WebSocket, Message>) {
    let frame = axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::NORMAL,
        reason: Default::default(),
    };
    let _ = sink.send(Message::Close(Some(frame))).await;
    let _ = sink.close().await;
}

/// Cancels `gone` once the connection is idle.
fn idle_watchdog(activity: Activity, gone: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        activity.idle().await;
        info!("closing an idle streaming connection (streamingConnectionIdleTimeout)");
        gone.cancel();
    })
}

/// The SPDY-in-WebSocket port-forward subprotocol.
pub const TUNNELED_PORT_FORWARD: &str = "SPDY/3.1+portforward.k8s.io";
/// What port-forward over WebSocket accepts (no subprotocol at all is v4 binary too).
pub const PORT_FORWARD_PROTOCOLS: &[&str] = &[TUNNELED_PORT_FORWARD, V4_BINARY, V4_BASE64];

/// The ports of a WebSocket port-forward's query (`port`, repeated or comma-separated), as
/// the kubelet reads them; needless for the SPDY tunnel, where each stream names its port.
pub fn forwarded_ports(query: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for (key, value) in remotecommand::form_urlencoded(query) {
        if key != "port" {
            continue;
        }
        if value.is_empty() {
            return Err("query parameter \"port\" cannot be empty".into());
        }
        for p in value.split(',') {
            match p.parse::<u16>() {
                Ok(0) => return Err(format!("port \"{value}\" must be > 0")),
                Ok(port) => ports.push(port),
                Err(e) => return Err(format!("unable to parse \"{value}\" as a port: {e}")),
            }
        }
    }
    Ok(ports)
}

/// Upgrades to a WebSocket and forwards `ports` of the pod over it.
pub async fn port_forward(
    request: Request,
    target: portforward::Target,
    ports: Vec<u16>,
    idle: Duration,
) -> Response {
    let (mut upgrade, requested) = match upgrade_of(request).await {
        Ok(u) => u,
        Err(response) => return response,
    };
    let chosen =
        remotecommand::negotiate(requested.iter().map(String::as_str), PORT_FORWARD_PROTOCOLS);
    let protocol = match (chosen, requested.is_empty()) {
        (Some(p), _) => {
            upgrade.set_selected_protocol(HeaderValue::from_static(p));
            p
        }
        (None, true) => V4_BINARY,
        (None, false) => {
            let message = format!(
                "requested protocol(s) are not supported: {requested:?}; supports {PORT_FORWARD_PROTOCOLS:?}"
            );
            return (StatusCode::BAD_REQUEST, message).into_response();
        }
    };
    if protocol != TUNNELED_PORT_FORWARD && ports.is_empty() {
        let message = "query parameter \"port\" is required";
        return (StatusCode::BAD_REQUEST, message).into_response();
    }
    let activity = Activity::new(idle);
    upgrade.on_upgrade(move |socket| async move {
        match Framing::of(protocol) {
            Some(framing) => forward_ports(socket, framing, target, ports, activity).await,
            None => tunnel(socket, target, activity).await,
        }
    })
}

/// The channel protocol: one connection per port for the WebSocket's life.
async fn forward_ports(
    socket: WebSocket,
    framing: Framing,
    target: portforward::Target,
    ports: Vec<u16>,
    activity: Activity,
) {
    let (sink, mut source) = socket.split();
    let (out_tx, writer) = channel_writer(sink, framing, activity.clone());
    let mut inbound = Vec::new();
    let mut forwards = tokio::task::JoinSet::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let (data, error) = ((2 * i) as u8, (2 * i + 1) as u8);
        let header = port.to_le_bytes().to_vec();
        let _ = out_tx.send((data, header.clone())).await;
        let _ = out_tx.send((error, header)).await;
        let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
        inbound.push(tx);
        forwards.spawn(forward_port(
            target.clone(),
            port,
            (data, error),
            rx,
            out_tx.clone(),
        ));
    }
    drop(out_tx);
    let gone = CancellationToken::new();
    let watchdog = idle_watchdog(activity.clone(), gone.clone());
    let reader = async {
        while let Some(Ok(message)) = source.next().await {
            activity.touch();
            if matches!(message, Message::Close(_)) {
                break;
            }
            match framing.decode(&message) {
                Some((channel, data)) if channel % 2 == 0 => {
                    if let Some(tx) = inbound.get((channel / 2) as usize) {
                        let _ = tx.send(data).await;
                    }
                }
                other => debug!(?other, "ignored port-forward message"),
            }
        }
    };
    // Until the client goes (or idles), or every forwarded connection ended.
    tokio::select! {
        _ = reader => {}
        _ = gone.cancelled() => {}
        _ = async { while forwards.join_next().await.is_some() {} } => {}
    }
    forwards.abort_all();
    while forwards.join_next().await.is_some() {}
    watchdog.abort();
    let _ = writer.await;
}

/// One port's connection: client data from `inbound` into it, its data out on `channels.0`,
/// a failure to connect as text on `channels.1`.
async fn forward_port(
    target: portforward::Target,
    port: u16,
    (data, error): (u8, u8),
    inbound: mpsc::Receiver<Vec<u8>>,
    out: mpsc::Sender<(u8, Vec<u8>)>,
) {
    let tcp = match portforward::dial(&target, &port.to_string()).await {
        Ok(tcp) => tcp,
        Err(message) => {
            debug!(%message, "port-forward over WebSocket");
            let _ = out.send((error, message.into_bytes())).await;
            return;
        }
    };
    portforward::splice(tcp, inbound, move |chunk| {
        let out = out.clone();
        async move { out.send((data, chunk)).await.is_ok() }
    })
    .await;
}

/// `SPDY/3.1+portforward.k8s.io`: the WebSocket's binary messages are a SPDY connection's
/// bytes, served as the SPDY port-forward.
async fn tunnel(socket: WebSocket, target: portforward::Target, activity: Activity) {
    let (mut sink, mut source) = socket.split();
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut from_client, mut to_client) = tokio::io::split(theirs);
    let inbound = tokio::spawn(async move {
        while let Some(Ok(message)) = source.next().await {
            let bytes = match message {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                _ => continue,
            };
            if to_client.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to_client.shutdown().await;
    });
    let outbound = tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let message = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                    if sink.send(message).await.is_err() {
                        break;
                    }
                }
            }
        }
        close_normally(&mut sink).await;
    });
    let (session, streams) = super::session::Session::serve(IdleIo::new(ours, activity.clone()));
    super::serve_until_idle(session, streams, activity, |session, streams| {
        portforward::serve(session, streams, target)
    })
    .await;
    inbound.abort();
    let _ = outbound.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_base64_framings_carry_the_channel_first() {
        let binary = Framing::of(V5_BINARY).unwrap();
        assert_eq!(
            binary,
            Framing {
                base64: false,
                version: Version::V5
            }
        );
        let Message::Binary(b) = binary.encode(STDOUT, b"hi") else {
            panic!()
        };
        assert_eq!(&b[..], b"\x01hi");
        assert_eq!(
            binary.decode(&Message::Binary(Bytes::from_static(b"\x00input"))),
            Some((STDIN, b"input".to_vec()))
        );
        assert_eq!(
            binary.decode(&Message::Binary(Bytes::from_static(b"\xff\x00"))),
            Some((CLOSE, vec![STDIN]))
        );
        assert_eq!(binary.decode(&Message::Binary(Bytes::new())), None);

        let b64 = Framing::of(V4_BASE64).unwrap();
        assert_eq!(
            b64,
            Framing {
                base64: true,
                version: Version::V4
            }
        );
        let Message::Text(t) = b64.encode(ERROR, b"{}") else {
            panic!()
        };
        assert_eq!(t.as_str(), "3e30=");
        assert_eq!(
            b64.decode(&Message::Text("0aGk=".into())),
            Some((STDIN, b"hi".to_vec()))
        );
        assert_eq!(b64.decode(&Message::Text("0!!".into())), None);
        assert_eq!(b64.decode(&Message::Text("".into())), None);
        assert_eq!(Framing::of("channel.k8s.io.v9"), None);
    }

    #[test]
    fn pre_v4_protocols_are_accepted_as_v1() {
        let negotiate = |asked: &[&str]| remotecommand::negotiate(asked.iter().copied(), PROTOCOLS);
        assert_eq!(negotiate(&["channel.k8s.io"]), Some(V1_BINARY));
        assert_eq!(negotiate(&["base64.channel.k8s.io"]), Some(V1_BASE64));
        let v1 = |base64| Framing {
            base64,
            version: Version::V1,
        };
        assert_eq!(Framing::of(V1_BINARY), Some(v1(false)));
        assert_eq!(Framing::of(V1_BASE64), Some(v1(true)));
        assert_eq!(Framing::of(""), Some(v1(false)));
    }
}
