//! Port-forward over SPDY (`portforward.k8s.io`), as the kubelet serves it: for every
//! forwarded connection the client opens two streams with the same `requestID` header, an
//! `error` stream and a `data` stream naming the `port`. The data stream is joined to a TCP
//! connection to localhost:port made inside the pod's network namespace (the host's for a
//! hostNetwork pod); a failure is written as text on the error stream. Both streams are
//! half-closed when the connection ends; each pair is served by its own task.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::debug;

use super::session::{Session, Stream, StreamReader};
use super::spdy;

pub const PROTOCOL: &str = "portforward.k8s.io";
/// How long a connection attempt inside the pod may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to connect for one pod.
#[derive(Clone, Debug)]
pub struct Target {
    pub pod: String,
    pub uid: String,
    /// The pinned network namespace; None: the host's.
    pub netns: Option<PathBuf>,
}

impl Target {
    pub fn of(pod: &Pod, sandbox_dir: &Path) -> Target {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let host = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        Target {
            pod: pod.metadata.name.clone().unwrap_or_default(),
            netns: (!host).then(|| sandbox_dir.join(&uid).join("net")),
            uid,
        }
    }
}

/// One forwarded connection's streams, as they arrive.
#[derive(Default)]
struct Pair {
    error: Option<Stream>,
    data: Option<Stream>,
}

/// Serves the session's stream pairs until the client goes away.
pub async fn serve(session: Session, mut streams: mpsc::Receiver<Stream>, target: Target) {
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(stream) = streams.recv().await {
        let kind = spdy::header(&stream.headers, "streamtype")
            .unwrap_or("")
            .to_string();
        // Old clients pair by stream id: the data stream follows its error stream.
        let key = match spdy::header(&stream.headers, "requestid") {
            Some(id) => id.to_string(),
            None if kind == "data" => stream.id.saturating_sub(2).to_string(),
            None => stream.id.to_string(),
        };
        let pair = pairs.entry(key.clone()).or_default();
        match kind.as_str() {
            "error" => pair.error = Some(stream),
            "data" => pair.data = Some(stream),
            other => {
                debug!(stream_type = other, "unexpected port-forward stream");
                stream.writer.reset(spdy::rst::REFUSED_STREAM).await;
                continue;
            }
        }
        let complete = pair.error.is_some() && pair.data.is_some();
        if let Some(Pair {
            error: Some(error),
            data: Some(data),
        }) = complete.then(|| pairs.remove(&key)).flatten()
        {
            tasks.spawn(forward(error, data, target.clone()));
        }
        while tasks.try_join_next().is_some() {}
    }
    tasks.abort_all();
    session.close().await;
}

async fn forward(error: Stream, data: Stream, target: Target) {
    let port = spdy::header(&data.headers, "port")
        .or_else(|| spdy::header(&error.headers, "port"))
        .unwrap_or("")
        .to_string();
    let tcp = match dial(&target, &port).await {
        Ok(tcp) => tcp,
        Err(message) => {
            debug!(%message, "port-forward");
            let _ = error.writer.write(message.as_bytes()).await;
            error.writer.close().await;
            data.writer.close().await;
            return;
        }
    };
    let Stream {
        reader: inbound,
        writer: outbound,
        ..
    } = data;
    let out = outbound.clone();
    splice(tcp, inbound, move |chunk| {
        let out = out.clone();
        async move { out.write(&chunk).await.is_ok() }
    })
    .await;
    outbound.close().await;
    error.writer.close().await;
}

/// The client's side of a forwarded connection: chunks until it half-closes or goes.
pub trait Inbound: Send + 'static {
    fn next(&mut self) -> impl std::future::Future<Output = Option<Vec<u8>>> + Send;
}

impl Inbound for StreamReader {
    async fn next(&mut self) -> Option<Vec<u8>> {
        self.recv().await
    }
}

impl Inbound for mpsc::Receiver<Vec<u8>> {
    async fn next(&mut self) -> Option<Vec<u8>> {
        self.recv().await
    }
}

/// Joins `tcp` to a client both ways: `inbound` into it (its write side shut down when the
/// client half-closes), its bytes out through `send` (false: the client cannot take more)
/// until the pod closes its side; then what the client still sends has nowhere to go.
pub async fn splice<F, Fut>(tcp: TcpStream, mut inbound: impl Inbound, mut send: F)
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let into_pod = tokio::spawn(async move {
        while let Some(chunk) = inbound.next().await {
            if tcp_write.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = tcp_write.shutdown().await;
    });
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match tcp_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if !send(buf[..n].to_vec()).await {
                    break;
                }
            }
        }
    }
    into_pod.abort();
}

/// A connection to `port` (as the client wrote it) on the pod's localhost, or the text the
/// kubelet writes on the error stream.
pub async fn dial(target: &Target, port: &str) -> Result<TcpStream, String> {
    match port.parse::<u16>() {
        Ok(p) if p > 0 => connect(target.netns.clone(), p).await.map_err(|e| {
            let ns = target
                .netns
                .as_ref()
                .map_or("host".to_string(), |p| p.display().to_string());
            format!(
                "error forwarding port {p} to pod {}, uid {}: failed to connect to localhost:{p} inside namespace {ns}: {e}",
                target.pod, target.uid
            )
        }),
        _ => Err(format!("unable to parse '{port}' as a port")),
    }
}

/// A TCP connection to localhost:`port` made inside `netns` (the host's when None): IPv4
/// first, then IPv6, as dialing "localhost" does.
pub async fn connect(netns: Option<PathBuf>, port: u16) -> std::io::Result<TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    // setns changes only the calling thread: a thread of its own, ended right after.
    std::thread::Builder::new()
        .name("netns-connect".into())
        .spawn(move || {
            let _ = tx.send(connect_blocking(netns.as_deref(), port));
        })?;
    let stream = rx
        .await
        .map_err(|_| std::io::Error::other("the connecting thread died"))??;
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}

fn connect_blocking(netns: Option<&Path>, port: u16) -> std::io::Result<std::net::TcpStream> {
    if let Some(path) = netns {
        let ns = std::fs::File::open(path)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
    }
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    std::net::TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT).or_else(|e4| {
        std::net::TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT)
            .map_err(|e6| std::io::Error::new(e4.kind(), format!("IPv4: {e4}, IPv6: {e6}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_on_the_hosts_localhost_without_a_netns() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        connect(None, port).await.unwrap();
        accepted.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_missing_netns_is_an_error() {
        let err = connect(Some("/nonexistent/net".into()), 80)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn host_network_pods_use_the_hosts_namespace() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "uid": "u1"}, "spec": {"containers": []}
        }))
        .unwrap();
        let t = Target::of(&pod, Path::new("/run/sb"));
        assert_eq!(t.netns, Some(PathBuf::from("/run/sb/u1/net")));
        pod.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(Target::of(&pod, Path::new("/run/sb")).netns, None);
    }
}
