//! Agent tier: exec and port-forward on the secure port of a standalone nodelet, driven by
//! clients written here as the API server drives a kubelet: a SPDY/3.1 client (frames from
//! the agent's own codec, the upgrade and the stream protocol by hand) and a WebSocket client
//! (tokio-tungstenite). The agent trusts a client CA the test makes; the client presents a
//! certificate it signed. Every test counts that no exec process is left in the container.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use nodelet::server::stream::session::read_frame;
use nodelet::server::stream::spdy::{Codec, Frame, FLAG_FIN};
use nodelet_tests::agent_support::{container_id, Agent, BUSYBOX, HTTPD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const MINUTE: Duration = Duration::from_secs(60);

/// An agent whose secure port trusts a CA made here, and a TLS client config with a
/// certificate signed by it (user `streaming-admin`).
fn agent_with_client_ca(name: &str) -> (Agent, Arc<rustls::ClientConfig>) {
    agent_with_client_ca_and_config(name, None)
}

/// As `agent_with_client_ca`, with a config file holding `config` when given.
fn agent_with_client_ca_and_config(
    name: &str,
    config: Option<&str>,
) -> (Agent, Arc<rustls::ClientConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut agent = Agent::unstarted(name);
    if let Some(config) = config {
        let file = agent.dir.path().join("config.yaml");
        std::fs::write(&file, config).unwrap();
        agent.port_args.push("--config".into());
        agent.port_args.push(file.display().to_string());
    }
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "nodelet-streaming-test-ca");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let ca_file = agent.dir.path().join("client-ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "streaming-admin");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();

    let at = agent
        .port_args
        .iter()
        .position(|a| a == "--client-ca-file")
        .unwrap();
    agent.port_args[at + 1] = ca_file.display().to_string();
    agent.spawn();
    let cert_file = agent.root_dir().join("pki/nodelet.crt");
    agent.wait_until("the secure port has its certificate", MINUTE, |_| {
        cert_file.exists()
    });
    let server_cert = std::fs::read(&cert_file).unwrap();
    let pinned = rustls::pki_types::CertificateDer::from_pem_slice(&server_cert).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            cert: pinned.into_owned(),
            provider,
        }))
        .with_client_auth_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .unwrap();
    (agent, Arc::new(config))
}

use rustls::pki_types::pem::PemObject;

/// Accepts exactly the agent's own serving certificate.
#[derive(Debug)]
struct Pinned {
    cert: rustls::pki_types::CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match end_entity.as_ref() == self.cert.as_ref() {
            true => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            false => Err(rustls::Error::General("not the agent's certificate".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

async fn tls(config: &Arc<rustls::ClientConfig>, port: u16) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .unwrap()
}

/// A SPDY client on an upgraded connection.
struct Spdy {
    io: TlsStream<TcpStream>,
    codec: Codec,
}

impl Spdy {
    /// POSTs the upgrade for `path` offering `protocols`: the status line and headers of the
    /// answer, and the client when it was 101.
    async fn upgrade(
        config: &Arc<rustls::ClientConfig>,
        port: u16,
        path: &str,
        protocols: &[&str],
    ) -> (String, Option<Spdy>) {
        let mut io = tls(config, port).await;
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        );
        for p in protocols {
            request.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
        }
        request.push_str("Content-Length: 0\r\n\r\n");
        io.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            if io.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let upgraded = head.starts_with("HTTP/1.1 101");
        (
            head,
            upgraded.then(|| Spdy {
                io,
                codec: Codec::new(),
            }),
        )
    }

    async fn send(&mut self, frame: Frame) {
        let bytes = self.codec.encode(&frame).unwrap();
        self.io.write_all(&bytes).await.unwrap();
        self.io.flush().await.unwrap();
    }

    async fn open(&mut self, id: u32, headers: &[(&str, &str)]) {
        self.send(Frame::syn_stream(id, headers, 0)).await;
    }

    async fn data(&mut self, id: u32, data: &[u8], fin: bool) {
        let flags = if fin { FLAG_FIN } else { 0 };
        let data = data.to_vec();
        self.send(Frame::Data {
            stream_id: id,
            flags,
            data,
        })
        .await;
    }

    async fn recv(&mut self) -> Option<Frame> {
        read_frame(&mut self.io, &mut self.codec).await.unwrap()
    }

    /// Reads until GOAWAY or the end of the connection: the data of each stream, and which
    /// streams the agent half-closed.
    async fn read_to_end(&mut self) -> (HashMap<u32, Vec<u8>>, Vec<u32>) {
        let mut data: HashMap<u32, Vec<u8>> = HashMap::new();
        let mut finished = Vec::new();
        while let Some(frame) = self.recv().await {
            match frame {
                Frame::Data {
                    stream_id,
                    flags,
                    data: bytes,
                } => {
                    data.entry(stream_id).or_default().extend(bytes);
                    if flags & FLAG_FIN != 0 {
                        finished.push(stream_id);
                    }
                }
                Frame::GoAway { .. } => break,
                _ => {}
            }
        }
        (data, finished)
    }
}

fn pod_with(name: &str, image: &str, command: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n{command}"
    )
}

/// The processes of the container's task (its init process plus any exec).
fn processes(agent: &Agent, container: &str) -> usize {
    let out = nodelet_tests::agent_support::ctr(&agent.namespace(), &["tasks", "ps", container]);
    out.lines().skip(1).filter(|l| !l.trim().is_empty()).count()
}

/// Waits until the container runs only its own process and the agent's exec FIFO dirs are
/// gone (the exec's removal ends with them).
fn assert_no_exec_left(agent: &Agent, container: &str) {
    let exec_dirs = || -> Vec<_> {
        std::fs::read_dir(agent.root_dir().join("exec"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + MINUTE;
    while processes(agent, container) != 1 || !exec_dirs().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "exec processes or FIFO dirs are left: {:?}\n{}\n{}",
            exec_dirs(),
            nodelet_tests::agent_support::ctr(&agent.namespace(), &["tasks", "ps", container]),
            agent.agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn status(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

const SLEEP: &str = "    command: [sleep, '3600']\n";

/// An agent running pod `box` (busybox sleeping): the agent, the client TLS config and the
/// containerd id of container `main`.
fn agent_with_a_busybox(name: &str) -> (Agent, Arc<rustls::ClientConfig>, String) {
    let (agent, config) = agent_with_client_ca(name);
    agent.write_manifest("box.yaml", &pod_with("box", BUSYBOX, SLEEP));
    let pod = agent.wait_phase("box", "Running", MINUTE);
    let container = container_id(&pod, "main").unwrap();
    (agent, config, container)
}

#[test]
fn exec_over_spdy_carries_stdin_stdout_stderr_tty_and_the_exit_code() {
    let (agent, config, container) = agent_with_a_busybox("spdyexec");
    let port = agent.secure_port;
    let rt = runtime();

    // v4: stdin reaches the process and its EOF too; stdout, stderr and the exit code come back.
    let path = "/exec/default/box/main?command=sh&command=-c&command=cat%3B+echo+err+%3E%262%3B+exit+3&stdin=1&stdout=1&stderr=1";
    let (head, spdy) = rt.block_on(Spdy::upgrade(&config, port, path, &["v4.channel.k8s.io"]));
    assert!(
        head.to_ascii_lowercase()
            .contains("x-stream-protocol-version: v4.channel.k8s.io"),
        "{head}"
    );
    let (data, finished) = rt.block_on(async {
        let mut spdy = spdy.expect("upgraded");
        spdy.open(1, &[("streamType", "error")]).await;
        spdy.open(3, &[("streamType", "stdin")]).await;
        spdy.open(5, &[("streamType", "stdout")]).await;
        spdy.open(7, &[("streamType", "stderr")]).await;
        spdy.data(3, b"hello\n", false).await;
        spdy.data(3, b"world\n", true).await;
        spdy.read_to_end().await
    });
    assert_eq!(String::from_utf8_lossy(&data[&5]), "hello\nworld\n");
    assert_eq!(String::from_utf8_lossy(&data[&7]), "err\n");
    let failed = status(&data[&1]);
    assert_eq!(failed["status"], "Failure");
    assert_eq!(failed["reason"], "NonZeroExitCode");
    assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(failed["details"]["causes"][0]["message"], "3");
    for id in [1, 5, 7] {
        assert!(
            finished.contains(&id),
            "stream {id} half-closed: {finished:?}"
        );
    }

    // Success is a Success status under v5; v2 writes nothing for it.
    for (protocol, expected) in [
        ("v5.channel.k8s.io", Some("Success")),
        ("v2.channel.k8s.io", None),
    ] {
        let path = "/exec/default/box/main?command=true&stdout=1";
        let (_, spdy) = rt.block_on(Spdy::upgrade(&config, port, path, &[protocol]));
        let (data, _) = rt.block_on(async {
            let mut spdy = spdy.expect("upgraded");
            spdy.open(1, &[("streamType", "error")]).await;
            spdy.open(3, &[("streamType", "stdout")]).await;
            spdy.read_to_end().await
        });
        match expected {
            Some(s) => assert_eq!(status(&data[&1])["status"], s, "{protocol}: {data:?}"),
            None => assert!(
                data.get(&1).is_none_or(|d| d.is_empty()),
                "{protocol}: {data:?}"
            ),
        }
    }

    // A TTY: the process's stdout is a terminal, sized by the resize stream (the process
    // waits, bounded, for the size to arrive rather than the test sleeping).
    let path = "/exec/default/box/main?command=sh&command=-c&command=tty%3B+i%3D0%3B+while+%5B+%22%24%28stty+size%29%22+%21%3D+%2245+123%22+%5D+%26%26+%5B+%24i+-lt+300+%5D%3B+do+sleep+0.1%3B+i%3D%24%28%28i%2B1%29%29%3B+done%3B+stty+size&stdout=1&tty=1";
    let (_, spdy) = rt.block_on(Spdy::upgrade(&config, port, path, &["v4.channel.k8s.io"]));
    let (data, _) = rt.block_on(async {
        let mut spdy = spdy.expect("upgraded");
        spdy.open(1, &[("streamType", "error")]).await;
        spdy.open(3, &[("streamType", "stdout")]).await;
        spdy.open(5, &[("streamType", "resize")]).await;
        spdy.data(5, br#"{"Width":123,"Height":45}"#, false).await;
        spdy.read_to_end().await
    });
    let out = String::from_utf8_lossy(&data[&3]).into_owned();
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("45 123"), "{out}");
    assert_eq!(status(&data[&1])["status"], "Success");

    // A protocol the agent does not speak is refused with the ones it does.
    let (head, spdy) = rt.block_on(Spdy::upgrade(&config, port, path, &["v9.channel.k8s.io"]));
    assert!(spdy.is_none() && head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-accepted-stream-protocol-versions: v5.channel.k8s.io"),
        "{head}"
    );
    assert_no_exec_left(&agent, &container);
}

/// A v4 exec of `sleep 1000` in pod `box` with stdin and stdout streams open.
async fn sleeping_exec(config: &Arc<rustls::ClientConfig>, port: u16) -> Spdy {
    let path = "/exec/default/box/main?command=sleep&command=1000&stdin=1&stdout=1";
    let (_, spdy) = Spdy::upgrade(config, port, path, &["v4.channel.k8s.io"]).await;
    let mut spdy = spdy.expect("upgraded");
    spdy.open(1, &[("streamType", "error")]).await;
    spdy.open(3, &[("streamType", "stdin")]).await;
    spdy.open(5, &[("streamType", "stdout")]).await;
    spdy
}

#[test]
fn an_exec_is_killed_and_removed_when_its_client_goes_away() {
    let (agent, config, container) = agent_with_a_busybox("spdygone");
    let rt = runtime();
    let sessions: Vec<Spdy> = (0..3)
        .map(|_| rt.block_on(sleeping_exec(&config, agent.secure_port)))
        .collect();
    agent.wait_until("three concurrent execs run", MINUTE, |a| {
        processes(a, &container) == 4
    });
    drop(sessions);
    assert_no_exec_left(&agent, &container);
}

#[test]
fn exec_over_websocket_carries_stdin_with_its_close_stdout_stderr_and_the_exit_code() {
    let (agent, config, container) = agent_with_a_busybox("wsexec");
    let rt = runtime();
    let path = "/exec/default/box/main?command=sh&command=-c&command=cat%3B+echo+err+%3E%262%3B+exit+3&stdin=1&stdout=1&stderr=1";
    for protocol in ["v5.channel.k8s.io", "v5.base64.channel.k8s.io"] {
        let base64 = protocol.contains("base64");
        let channels = rt.block_on(async {
            let io = tls(&config, agent.secure_port).await;
            let url = format!("wss://127.0.0.1:{}{path}", agent.secure_port);
            let mut request = url.into_client_request().unwrap();
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                format!("{protocol}, v4.channel.k8s.io").parse().unwrap(),
            );
            let (mut ws, response) = tokio_tungstenite::client_async(request, io).await.unwrap();
            assert_eq!(response.headers()["sec-websocket-protocol"], protocol);
            let message = |channel: u8, data: &[u8]| {
                use base64::Engine;
                match base64 {
                    false => Message::Binary([&[channel][..], data].concat().into()),
                    true => Message::Text(
                        format!(
                            "{channel}{}",
                            base64::engine::general_purpose::STANDARD.encode(data)
                        )
                        .into(),
                    ),
                }
            };
            ws.send(message(0, b"over websocket\n")).await.unwrap();
            // v5: close stdin (channel 255 naming channel 0), always raw bytes.
            ws.send(Message::Binary(vec![255, 0].into())).await.unwrap();
            let mut channels: HashMap<u8, Vec<u8>> = HashMap::new();
            while let Some(Ok(m)) = ws.next().await {
                let (channel, data) = match m {
                    Message::Binary(b) if !b.is_empty() => (b[0], b[1..].to_vec()),
                    Message::Text(t) if !t.is_empty() => {
                        use base64::Engine;
                        let data = base64::engine::general_purpose::STANDARD
                            .decode(&t.as_str()[1..])
                            .unwrap();
                        (t.as_str().as_bytes()[0] - b'0', data)
                    }
                    Message::Close(frame) => {
                        // client-go fails every stream on any other close (kubectl exec too).
                        let code = frame.map(|f| u16::from(f.code));
                        assert_eq!(code, Some(1000), "a normal closure: {protocol}");
                        break;
                    }
                    _ => continue,
                };
                channels.entry(channel).or_default().extend(data);
            }
            channels
        });
        assert_eq!(
            String::from_utf8_lossy(&channels[&1]),
            "over websocket\n",
            "{protocol}"
        );
        assert_eq!(
            String::from_utf8_lossy(&channels[&2]),
            "err\n",
            "{protocol}"
        );
        let failed = status(&channels[&3]);
        assert_eq!(failed["details"]["causes"][0]["message"], "3", "{protocol}");
    }
    assert_no_exec_left(&agent, &container);
}

/// One frame of a port-forward's stream pair: the data stream's bytes go to `got`; true once
/// the pair is done (the data stream's FIN, or the error stream's without any data).
fn forwarded(frame: Frame, (error, data): (u32, u32), got: &mut Vec<u8>) -> bool {
    match frame {
        Frame::Data {
            stream_id,
            flags,
            data: bytes,
        } if stream_id == data => {
            got.extend(bytes);
            flags & FLAG_FIN != 0
        }
        Frame::Data {
            stream_id, flags, ..
        } if stream_id == error => flags & FLAG_FIN != 0 && got.is_empty(),
        _ => false,
    }
}

/// One plain HTTP/1.1 request on the secure port; the response head and body.
async fn plain(
    config: &Arc<rustls::ClientConfig>,
    port: u16,
    method: &str,
    path: &str,
) -> (String, String) {
    let mut io = tls(config, port).await;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    io.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    // A close_notify-less end of the TLS stream is fine: the response is complete by then.
    let _ = io.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.to_string(), body.to_string())
}

/// `/run`, the kubelet's command without a stream: a POST runs `cmd` (split on spaces) to its
/// end and answers its output; a non-zero exit is a 500 naming it; only POST is routed.
#[test]
fn run_answers_a_commands_output_and_a_failed_one_is_an_error() {
    let (agent, config, container) = agent_with_a_busybox("run");
    let port = agent.secure_port;
    runtime().block_on(async {
        let path = "/run/default/box/main?cmd=echo+hello++world";
        let (head, body) = plain(&config, port, "POST", path).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
        assert_eq!(body, "hello  world\n");
        let (head, body) = plain(&config, port, "POST", "/run/default/box/main?cmd=false").await;
        assert!(head.starts_with("HTTP/1.1 500"), "{head}\n{body}");
        assert!(body.contains("exited with 1"), "{body}");
        let (head, _) = plain(&config, port, "GET", path).await;
        assert!(head.starts_with("HTTP/1.1 405"), "{head}");
        let (head, _) = plain(&config, port, "POST", "/run/default/nobox/main?cmd=true").await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    });
    assert_no_exec_left(&agent, &container);
}

#[test]
fn port_forward_over_spdy_reaches_the_pods_localhost_and_reports_a_closed_port() {
    let (agent, config) = agent_with_client_ca("portfwd");
    let web = pod_with("web", HTTPD, "    ports: [{containerPort: 8080}]\n");
    agent.write_manifest("web.yaml", &web);
    agent.wait_phase("web", "Running", MINUTE);
    let rt = runtime();
    let (head, spdy) = rt.block_on(Spdy::upgrade(
        &config,
        agent.secure_port,
        "/portForward/default/web",
        &["portforward.k8s.io"],
    ));
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (response, refused) = rt.block_on(async {
        let mut spdy = spdy.expect("upgraded");
        let mut response = Vec::new();
        // The server may take a moment to listen after Running: retry a few requests.
        for attempt in 0..20u32 {
            let (error, data) = (1 + 4 * attempt, 3 + 4 * attempt);
            let request = attempt.to_string();
            let port = [("port", "8080"), ("requestID", request.as_str())];
            spdy.open(error, &[&[("streamType", "error")][..], &port[..]].concat())
                .await;
            spdy.open(data, &[&[("streamType", "data")][..], &port[..]].concat())
                .await;
            spdy.data(data, b"GET / HTTP/1.0\r\n\r\n", true).await;
            let (mut got, mut done) = (Vec::new(), false);
            while !done {
                let frame = spdy.recv().await.expect("a frame");
                done = forwarded(frame, (error, data), &mut got);
            }
            if !got.is_empty() {
                response = got;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // A port nothing listens on: the reason arrives on the error stream.
        let port = [("port", "9"), ("requestID", "closed")];
        spdy.open(201, &[&[("streamType", "error")][..], &port[..]].concat())
            .await;
        spdy.open(203, &[&[("streamType", "data")][..], &port[..]].concat())
            .await;
        let mut refused = Vec::new();
        loop {
            match spdy.recv().await.expect("a frame") {
                Frame::Data {
                    stream_id: 201,
                    flags,
                    data,
                } => {
                    refused.extend(data);
                    if flags & FLAG_FIN != 0 {
                        break;
                    }
                }
                _ => continue,
            }
        }
        (response, refused)
    });
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1."), "{response}");
    let refused = String::from_utf8_lossy(&refused);
    assert!(
        refused.starts_with("error forwarding port 9 to pod web"),
        "{refused}"
    );
}

/// Reads the session's frames until `stream`'s data contains `wanted` (what it got), or the
/// session ends (None).
async fn read_until(spdy: &mut Spdy, stream: u32, wanted: &str) -> Option<String> {
    let mut got = Vec::new();
    while let Some(frame) = spdy.recv().await {
        if let Frame::Data {
            stream_id, data, ..
        } = frame
        {
            if stream_id == stream {
                got.extend(data);
                if String::from_utf8_lossy(&got).contains(wanted) {
                    return Some(String::from_utf8_lossy(&got).into_owned());
                }
            }
        }
    }
    None
}

const SHELL_ON_A_TTY: &str =
    "    command: [sh]\n    stdin: true\n    stdinOnce: true\n    tty: true\n";

#[test]
fn attach_over_spdy_types_into_a_tty_resizes_it_and_stdin_once_ends_it() {
    let (agent, config) = agent_with_client_ca("attachtty");
    let manifest = pod_with("tty", BUSYBOX, SHELL_ON_A_TTY)
        .replace("  containers:", "  restartPolicy: Never\n  containers:");
    agent.write_manifest("tty.yaml", &manifest);
    agent.wait_phase("tty", "Running", MINUTE);
    let rt = runtime();
    let path = "/attach/default/tty/main?stdin=1&stdout=1&tty=1";
    let (head, spdy) = rt.block_on(Spdy::upgrade(
        &config,
        agent.secure_port,
        path,
        &["v4.channel.k8s.io"],
    ));
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let out = rt.block_on(async {
        let mut spdy = spdy.expect("upgraded");
        spdy.open(1, &[("streamType", "error")]).await;
        spdy.open(3, &[("streamType", "stdin")]).await;
        spdy.open(5, &[("streamType", "stdout")]).await;
        spdy.open(7, &[("streamType", "resize")]).await;
        spdy.data(7, br#"{"Width":101,"Height":33}"#, false).await;
        // The shell waits, bounded, for the size to arrive; the mark is computed so that the
        // terminal's echo of the typed line does not match it.
        let line = "i=0; while [ \"$(stty size)\" != '33 101' ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; stty size; echo mark$((6*7))\n";
        spdy.data(3, line.as_bytes(), false).await;
        read_until(&mut spdy, 5, "mark42").await
        // The client goes away here.
    });
    let out = out.unwrap_or_else(|| panic!("no output from the attach\n{}", agent.agent_log()));
    assert!(out.contains("33 101"), "{out}");
    // The output still reaches the log.
    let log = agent
        .container_logs("default", "tty", "main", "")
        .unwrap_or_default();
    assert!(log.contains("mark42"), "{log}");
    // stdinOnce: the first attach's end closed the container's stdin, so its shell ended.
    agent.wait_until("the shell ends after the first attach", MINUTE, |a| {
        matches!(
            nodelet_tests::agent_support::phase_of(a.pod("tty").as_ref()),
            Some("Succeeded" | "Failed")
        )
    });
}

#[test]
fn attach_over_websocket_keeps_stdin_open_between_attaches_and_ends_with_the_container() {
    let (agent, config) = agent_with_client_ca("attachws");
    let manifest = pod_with(
        "tty",
        BUSYBOX,
        &SHELL_ON_A_TTY.replace("    stdinOnce: true\n", ""),
    )
    .replace("  containers:", "  restartPolicy: Never\n  containers:");
    agent.write_manifest("tty.yaml", &manifest);
    agent.wait_phase("tty", "Running", MINUTE);
    let rt = runtime();
    let path = "/attach/default/tty/main?stdin=1&stdout=1&tty=1";
    let attach = |typed: &'static str, until: &'static str| {
        rt.block_on(async {
            let (mut ws, _) =
                websocket(&config, agent.secure_port, path, "v5.channel.k8s.io").await;
            ws.send(Message::Binary([b"\x00", typed.as_bytes()].concat().into()))
                .await
                .unwrap();
            binary_channels(&mut ws, |channels| {
                let out = String::from_utf8_lossy(channels.get(&1).map_or(&[][..], |v| v));
                !until.is_empty() && out.contains(until)
            })
            .await
        })
    };
    let first = attach("echo one$((1+1))\n", "one2");
    assert!(
        String::from_utf8_lossy(&first[&1]).contains("one2"),
        "{first:?}"
    );
    // Without stdinOnce the shell still reads after the first attach went; its exit ends
    // the second attach with a Success status.
    let second = attach("echo two$((1+1)); exit 3\n", "");
    assert!(
        String::from_utf8_lossy(&second[&1]).contains("two2"),
        "{second:?}"
    );
    assert_eq!(status(&second[&3])["status"], "Success", "{second:?}");
    agent.wait_phase("tty", "Failed", MINUTE);
}

#[test]
fn attach_follows_stdout_and_stderr_and_refuses_stdin_without_a_tty() {
    let (agent, config) = agent_with_client_ca("attachout");
    let command = "    command: [sh, -c, 'while true; do echo out; echo err >&2; sleep 0.2; done']\n    stdin: true\n";
    agent.write_manifest("talk.yaml", &pod_with("talk", BUSYBOX, command));
    agent.wait_phase("talk", "Running", MINUTE);
    let rt = runtime();
    let path = "/attach/default/talk/main?stdout=1&stderr=1";
    let (_, spdy) = rt.block_on(Spdy::upgrade(
        &config,
        agent.secure_port,
        path,
        &["v4.channel.k8s.io"],
    ));
    let (out, err) = rt.block_on(async {
        let mut spdy = spdy.expect("upgraded");
        spdy.open(1, &[("streamType", "error")]).await;
        spdy.open(3, &[("streamType", "stdout")]).await;
        spdy.open(5, &[("streamType", "stderr")]).await;
        let out = read_until(&mut spdy, 3, "out\nout\n").await;
        let err = read_until(&mut spdy, 5, "err\n").await;
        (out, err)
    });
    assert!(out.is_some() && err.is_some(), "{out:?} {err:?}");
    assert!(
        !out.unwrap().contains("err"),
        "stderr stays on its own stream"
    );

    // Stdin without a terminal cannot be connected beside the log driver: a clear refusal.
    let path = "/attach/default/talk/main?stdin=1&stdout=1";
    let (_, spdy) = rt.block_on(Spdy::upgrade(
        &config,
        agent.secure_port,
        path,
        &["v4.channel.k8s.io"],
    ));
    let (data, _) = rt.block_on(async {
        let mut spdy = spdy.expect("upgraded");
        spdy.open(1, &[("streamType", "error")]).await;
        spdy.open(3, &[("streamType", "stdin")]).await;
        spdy.open(5, &[("streamType", "stdout")]).await;
        spdy.read_to_end().await
    });
    let refused = status(&data[&1]);
    assert_eq!(refused["status"], "Failure");
    assert!(
        refused["message"].as_str().unwrap().contains("tty: true"),
        "{refused}"
    );
}

/// A WebSocket to `path` on the agent offering `protocol` (none when empty).
async fn websocket(
    config: &Arc<rustls::ClientConfig>,
    port: u16,
    path: &str,
    protocol: &str,
) -> (
    tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>,
    Option<String>,
) {
    let io = tls(config, port).await;
    let mut request = format!("wss://127.0.0.1:{port}{path}")
        .into_client_request()
        .unwrap();
    if !protocol.is_empty() {
        let value = protocol.parse().unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", value);
    }
    let (ws, response) = tokio_tungstenite::client_async(request, io).await.unwrap();
    let chosen = response
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_string());
    (ws, chosen)
}

/// The data of each channel of a binary WebSocket until it closes or `enough` says so.
async fn binary_channels(
    ws: &mut tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>,
    enough: impl Fn(&HashMap<u8, Vec<u8>>) -> bool,
) -> HashMap<u8, Vec<u8>> {
    let mut channels: HashMap<u8, Vec<u8>> = HashMap::new();
    while let Some(Ok(m)) = ws.next().await {
        match m {
            Message::Binary(b) if !b.is_empty() => {
                channels.entry(b[0]).or_default().extend(&b[1..])
            }
            Message::Close(_) => break,
            _ => continue,
        }
        if enough(&channels) {
            break;
        }
    }
    channels
}

#[test]
fn port_forward_over_websocket_channels_carries_the_port_header_data_and_errors() {
    let (agent, config) = agent_with_client_ca("wsportfwd");
    let web = pod_with("web", HTTPD, "    ports: [{containerPort: 8080}]\n");
    agent.write_manifest("web.yaml", &web);
    agent.wait_phase("web", "Running", MINUTE);
    let rt = runtime();
    let path = "/portForward/default/web?port=8080,9";
    // The server may take a moment to listen after Running: retry a few sessions.
    let mut last = HashMap::new();
    for _ in 0..20 {
        let channels = rt.block_on(async {
            let (mut ws, chosen) =
                websocket(&config, agent.secure_port, path, "v4.channel.k8s.io").await;
            assert_eq!(chosen.as_deref(), Some("v4.channel.k8s.io"));
            let mut request = vec![0u8];
            request.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
            ws.send(Message::Binary(request.into())).await.unwrap();
            // Both connections end (the server's HTTP/1.0 reply, the refusal): so does the
            // WebSocket.
            binary_channels(&mut ws, |_| false).await
        });
        let answered = channels.get(&0).is_some_and(|d| d.len() > 2);
        last = channels;
        if answered {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every channel opens with its port, little-endian.
    for (channel, port) in [(0u8, 8080u16), (1, 8080), (2, 9), (3, 9)] {
        let data = last.get(&channel).cloned().unwrap_or_default();
        assert!(
            data.starts_with(&port.to_le_bytes()),
            "channel {channel}: {last:?}"
        );
    }
    let response = String::from_utf8_lossy(&last[&0][2..]).into_owned();
    assert!(response.starts_with("HTTP/1."), "{response}");
    let refused = String::from_utf8_lossy(&last[&3][2..]).into_owned();
    assert!(
        refused.starts_with("error forwarding port 9 to pod web"),
        "{refused}"
    );
}

#[test]
fn port_forward_tunnelled_as_spdy_in_websocket_reaches_the_pod() {
    let (agent, config) = agent_with_client_ca("wstunnel");
    let web = pod_with("web", HTTPD, "    ports: [{containerPort: 8080}]\n");
    agent.write_manifest("web.yaml", &web);
    agent.wait_phase("web", "Running", MINUTE);
    let rt = runtime();
    let response = rt.block_on(async {
        let protocol = "SPDY/3.1+portforward.k8s.io";
        let (mut ws, chosen) = websocket(
            &config,
            agent.secure_port,
            "/portForward/default/web",
            protocol,
        )
        .await;
        assert_eq!(chosen.as_deref(), Some(protocol));
        let mut codec = Codec::new();
        let mut inbound = Vec::new();
        let mut decoder = Codec::new();
        for attempt in 0..20u32 {
            let (error, data) = (1 + 4 * attempt, 3 + 4 * attempt);
            let request = attempt.to_string();
            let port = [("port", "8080"), ("requestID", request.as_str())];
            let frames = [
                Frame::syn_stream(
                    error,
                    &[&[("streamType", "error")][..], &port[..]].concat(),
                    0,
                ),
                Frame::syn_stream(
                    data,
                    &[&[("streamType", "data")][..], &port[..]].concat(),
                    0,
                ),
                Frame::Data {
                    stream_id: data,
                    flags: FLAG_FIN,
                    data: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
                },
            ];
            for f in frames {
                let bytes = codec.encode(&f).unwrap();
                ws.send(Message::Binary(bytes.into())).await.unwrap();
            }
            let (mut got, mut done) = (Vec::new(), false);
            while !done {
                // Frames may be split over messages or share one: decode from a buffer.
                let frame = loop {
                    let mut cursor = std::io::Cursor::new(inbound.clone());
                    if let Ok(Some(f)) = read_frame(&mut cursor, &mut decoder).await {
                        inbound.drain(..cursor.position() as usize);
                        break f;
                    }
                    match ws.next().await {
                        Some(Ok(Message::Binary(b))) => inbound.extend_from_slice(&b),
                        Some(Ok(_)) => {}
                        other => panic!("the tunnel ended: {other:?}"),
                    }
                };
                done = forwarded(frame, (error, data), &mut got);
            }
            if !got.is_empty() {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Vec::new()
    });
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1."), "{response}");
}

#[test]
fn idle_streaming_connections_are_closed_after_the_configured_timeout() {
    let (agent, config) =
        agent_with_client_ca_and_config("idle", Some("streamingConnectionIdleTimeout: 2s\n"));
    agent.write_manifest("box.yaml", &pod_with("box", BUSYBOX, SLEEP));
    let pod = agent.wait_phase("box", "Running", MINUTE);
    let container = container_id(&pod, "main").unwrap();
    let rt = runtime();
    // An exec that would run for long, and a client that sends nothing: the agent ends the
    // connection, and the exec with it.
    rt.block_on(async {
        let mut spdy = sleeping_exec(&config, agent.secure_port).await;
        tokio::time::timeout(MINUTE, spdy.read_to_end())
            .await
            .expect("the idle connection is closed");
    });
    assert_no_exec_left(&agent, &container);
    // A WebSocket too.
    rt.block_on(async {
        let (mut ws, _) = websocket(
            &config,
            agent.secure_port,
            "/exec/default/box/main?command=sleep&command=1000&stdout=1",
            "v5.channel.k8s.io",
        )
        .await;
        let closed = tokio::time::timeout(MINUTE, async {
            while let Some(Ok(m)) = ws.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        });
        closed.await.expect("the idle WebSocket is closed");
    });
    assert_no_exec_left(&agent, &container);
}

/// The agent's open fds, its threads outside tokio's pool and its alive async tasks.
fn fds_threads_and_tasks(agent: &Agent) -> (usize, usize, usize) {
    let pid = agent.pid().expect("the agent runs");
    nodelet_tests::agent_support::fds_threads_and_tasks(pid, &agent.metrics())
}

/// What the agent's fds point to and its threads' names, for a failure's message.
fn fds_and_threads_listed(agent: &Agent) -> String {
    let pid = agent.pid().expect("the agent runs");
    let entries = |what: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{what}"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect::<Vec<_>>()
    };
    let fds = entries("fd")
        .into_iter()
        .filter_map(|p| std::fs::read_link(p).ok())
        .map(|l| l.display().to_string());
    let threads = entries("task")
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(p.join("comm")).ok())
        .map(|c| format!("thread {}", c.trim()));
    fds.chain(threads).collect::<Vec<_>>().join("\n")
}

/// One port-forward of `GET /` to port 8080 of pod `web` over SPDY: the response, or, when
/// `abort`, a request cut off mid-stream by the client going away.
async fn forward_get(config: &Arc<rustls::ClientConfig>, port: u16, abort: bool) -> Vec<u8> {
    let path = "/portForward/default/web";
    let (_, spdy) = Spdy::upgrade(config, port, path, &["portforward.k8s.io"]).await;
    let mut spdy = spdy.expect("upgraded");
    let ports = [("port", "8080"), ("requestID", "0")];
    spdy.open(1, &[&[("streamType", "error")][..], &ports[..]].concat())
        .await;
    spdy.open(3, &[&[("streamType", "data")][..], &ports[..]].concat())
        .await;
    if abort {
        spdy.data(3, b"GET / HTT", false).await;
        return Vec::new();
    }
    spdy.data(3, b"GET / HTTP/1.0\r\n\r\n", true).await;
    let mut got = Vec::new();
    while let Some(frame) = spdy.recv().await {
        if forwarded(frame, (1, 3), &mut got) {
            break;
        }
    }
    got
}

#[test]
fn a_hundred_sessions_leave_no_fd_thread_or_exec_behind() {
    let (agent, config, container) = agent_with_a_busybox("leaks");
    let web = pod_with("web", HTTPD, "    ports: [{containerPort: 8080}]\n");
    agent.write_manifest("web.yaml", &web);
    agent.wait_phase("web", "Running", MINUTE);
    let rt = runtime();
    let port = agent.secure_port;
    let exec_echo = move |config: Arc<rustls::ClientConfig>| async move {
        let path = "/exec/default/box/main?command=echo&command=hi&stdout=1";
        let (_, spdy) = Spdy::upgrade(&config, port, path, &["v4.channel.k8s.io"]).await;
        let mut spdy = spdy.expect("upgraded");
        spdy.open(1, &[("streamType", "error")]).await;
        spdy.open(3, &[("streamType", "stdout")]).await;
        spdy.read_to_end().await.0.remove(&3).unwrap_or_default()
    };
    // Warm up (the server listens, lazily made connections exist), then take the baseline.
    rt.block_on(async {
        assert_eq!(exec_echo(config.clone()).await, b"hi\n");
        for _ in 0..40 {
            if forward_get(&config, port, false)
                .await
                .starts_with(b"HTTP/1.")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("the web server never answered");
    });
    assert_no_exec_left(&agent, &container);
    let before = fds_threads_and_tasks(&agent);

    // 100 sessions, ten at a time: execs run to their end or are abandoned mid-stream,
    // port-forwards carry a request or are cut off in the middle of one.
    rt.block_on(async {
        for batch in 0..10 {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..10 {
                let config = config.clone();
                set.spawn(async move {
                    match (batch * 10 + i) % 5 {
                        0 | 1 => assert_eq!(exec_echo(config).await, b"hi\n"),
                        2 => drop(sleeping_exec(&config, port).await),
                        3 => assert!(forward_get(&config, port, false)
                            .await
                            .starts_with(b"HTTP/1.")),
                        _ => drop(forward_get(&config, port, true).await),
                    }
                });
            }
            while let Some(done) = set.join_next().await {
                done.unwrap();
            }
        }
    });
    assert_no_exec_left(&agent, &container);
    // The last sessions' connections may still be closing: wait, bounded.
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        let now = fds_threads_and_tasks(&agent);
        if now.0 <= before.0 && now.1 <= before.1 && now.2 <= before.2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "(fds, threads, tasks) were {before:?} before the sessions and are {now:?} after\n{}",
            fds_and_threads_listed(&agent)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A pod of an init container (writing what PID 1 is to its termination message), a sidecar
/// and two app containers, each sleeping a number of seconds that names it.
fn pod_sharing_processes(name: &str, share: bool) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  shareProcessNamespace: {share}\n  initContainers:\n  - name: init\n    image: {BUSYBOX}\n    command: [sh, -c, 'tr \"\\0\" \" \" </proc/1/cmdline >/dev/termination-log']\n  - name: sidecar\n    image: {BUSYBOX}\n    restartPolicy: Always\n    command: [sleep, '5555']\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sleep, '3333']\n  - name: other\n    image: {BUSYBOX}\n    command: [sleep, '4444']\n"
    )
}

/// `ps` in a container through the agent's `/run`.
fn ps(config: &Arc<rustls::ClientConfig>, port: u16, pod: &str, container: &str) -> String {
    let path = format!("/run/default/{pod}/{container}?cmd=ps");
    let (head, body) = runtime().block_on(plain(config, port, "POST", &path));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    body
}

/// The command of PID 1 in busybox `ps` output (`PID USER [TIME] COMMAND`).
fn pid1(ps: &str) -> String {
    let mut header = ps.lines().next().unwrap_or_default().split_whitespace();
    let command = header.position(|h| h == "COMMAND").unwrap_or(usize::MAX);
    let line = ps
        .lines()
        .find(|l| l.split_whitespace().next() == Some("1"));
    let fields: Vec<&str> = line.unwrap_or_default().split_whitespace().collect();
    fields.get(command..).unwrap_or_default().join(" ")
}

/// The init container's termination message (what it read as PID 1's command line).
fn init_saw(agent: &Agent, pod: &str) -> String {
    let pod = agent.pod(pod).unwrap();
    let statuses = pod.status.and_then(|s| s.init_container_statuses);
    let init = statuses.into_iter().flatten().find(|s| s.name == "init");
    let terminated = init.and_then(|s| s.state).and_then(|s| s.terminated);
    terminated.and_then(|t| t.message).unwrap_or_default()
}

/// `readlink /proc/<pid>/ns/pid` of a container's task, as the host sees it.
fn pid_namespace_of(agent: &Agent, pod: &str, container: &str) -> String {
    let id = container_id(&agent.pod(pod).unwrap(), container).unwrap();
    let pid = agent.task_pid(&id).unwrap();
    let link = std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    link.display().to_string()
}

/// Host processes in the PID namespace `ns` (`pid:[inode]`).
fn processes_in(ns: &str) -> Vec<u32> {
    let entries = std::fs::read_dir("/proc").unwrap().flatten();
    let pids = entries.filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    pids.filter(|p| {
        std::fs::read_link(format!("/proc/{p}/ns/pid")).is_ok_and(|l| l.display().to_string() == ns)
    })
    .collect()
}

/// shareProcessNamespace as the kubelet has it: every container of the pod (init, sidecar and
/// app) runs in one PID namespace whose PID 1 is the pod's `/pause`, so `ps` in one container
/// shows the others' processes; a container restarted after an agent restart joins it again;
/// the namespace and its PID 1 end with the pod. Without it, each container is PID 1 of its
/// own namespace and sees nothing of the others.
#[test]
fn containers_of_a_pod_sharing_its_process_namespace_see_each_others_processes() {
    let (mut agent, config) = agent_with_client_ca("pidns");
    let port = agent.secure_port;
    agent.write_manifest("shared.yaml", &pod_sharing_processes("shared", true));
    agent.write_manifest("apart.yaml", &pod_sharing_processes("apart", false));
    agent.wait_phase("shared", "Running", MINUTE);
    agent.wait_phase("apart", "Running", MINUTE);

    let shared = ps(&config, port, "shared", "main");
    assert!(pid1(&shared).starts_with("/pause"), "{shared}");
    for other in ["sleep 4444", "sleep 5555"] {
        assert!(shared.contains(other), "main sees {other}:\n{shared}");
    }
    let from_other = ps(&config, port, "shared", "other");
    assert!(from_other.contains("sleep 3333"), "{from_other}");
    assert!(
        init_saw(&agent, "shared").starts_with("/pause"),
        "{}",
        init_saw(&agent, "shared")
    );

    let apart = ps(&config, port, "apart", "main");
    assert_eq!(pid1(&apart), "sleep 3333", "{apart}");
    for other in ["sleep 4444", "sleep 5555", "/pause"] {
        assert!(
            !apart.contains(other),
            "main must not see {other}:\n{apart}"
        );
    }
    let init = init_saw(&agent, "apart");
    assert!(!init.is_empty() && !init.contains("/pause"), "{init}");

    // The namespace outlives the agent; a container the restarted agent starts again joins it.
    let ns = pid_namespace_of(&agent, "shared", "main");
    assert_eq!(pid_namespace_of(&agent, "shared", "other"), ns);
    agent.kill9();
    agent.spawn();
    // main kills other's process by the PID it sees (the restarted agent serves once it has
    // read the pod again).
    let pid = shared.lines().find(|l| l.ends_with("sleep 4444"));
    let pid = pid.and_then(|l| l.split_whitespace().next()).unwrap();
    let path = format!("/run/default/shared/main?cmd=kill+{pid}");
    agent.wait_until("the restarted agent runs kill in main", MINUTE, |_| {
        let (head, _) = runtime().block_on(plain(&config, port, "POST", &path));
        head.starts_with("HTTP/1.1 200")
    });
    agent.wait_until("other restarted", MINUTE, |a| {
        let pod = a.pod("shared").unwrap();
        let statuses = pod
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default();
        statuses.iter().any(|s| {
            s.name == "other"
                && s.restart_count >= 1
                && s.state.as_ref().is_some_and(|st| st.running.is_some())
        })
    });
    assert_eq!(pid_namespace_of(&agent, "shared", "other"), ns);
    let again = ps(&config, port, "shared", "main");
    assert!(again.contains("sleep 4444"), "{again}");

    // Deleting the pod ends every process of its namespace, /pause included.
    assert!(!processes_in(&ns).is_empty());
    agent.remove_manifest("shared.yaml");
    agent.wait_until("the pod is gone", MINUTE, |a| a.pod("shared").is_none());
    agent.wait_until("no process is left in its PID namespace", MINUTE, |_| {
        processes_in(&ns).is_empty()
    });
    agent.remove_manifest("apart.yaml");
    agent.wait_until("the other pod is gone", MINUTE, |a| {
        a.pod("apart").is_none()
    });
}
