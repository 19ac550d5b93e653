//! Probe handlers and the prober against real servers on 127.0.0.1, spawned by each test:
//! plain HTTP (200, 500, same-host and cross-host redirects, a redirect loop, a large body, a
//! server that accepts and never answers), HTTPS with a self-signed certificate, TCP ports
//! open and closed, and gRPC servers with and without the health service. Each case checks
//! the documented outcome and message, and that it arrives within its timeout. The exec case
//! runs through the real runtime in a busybox container (root, containerd and the loopback
//! registry from scripts/setup): `cargo test -p nodelet-tests --test probe`.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, GRPCAction, HTTPGetAction, HTTPHeader, Pod, Probe, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nodelet::events::Recorder;
use nodelet::probe::grpc::proto::health_check_response::ServingStatus;
use nodelet::probe::grpc::proto::health_server::{Health, HealthServer};
use nodelet::probe::grpc::proto::{HealthCheckRequest, HealthCheckResponse};
use nodelet::probe::{
    http_get, run_once, Exec, ExecError, Outcome, ProbeKey, ProbeKind, ProbeResult, ProbeTarget,
    Prober,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const TIMEOUT: Duration = Duration::from_secs(1);
/// How far past its timeout a probe may answer (scheduling on a busy machine).
const SLACK: Duration = Duration::from_secs(3);

/// The request heads an HTTP test server saw.
type Log = Arc<Mutex<Vec<String>>>;

/// Answers one HTTP/1.1 request by its path (see the module docs for the routes).
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, port: u16, log: Log) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    log.lock().unwrap().push(head.clone());
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    let (status, location, body) = match path.as_str() {
        "/ok" => ("200 OK", None, "fine".to_string()),
        "/fail" => ("500 Internal Server Error", None, "broken".to_string()),
        "/redirect-local" => (
            "302 Found",
            Some(format!("http://127.0.0.1:{port}/ok")),
            String::new(),
        ),
        "/redirect-away" => (
            "302 Found",
            Some(format!("http://localhost:{port}/ok")),
            "moved".to_string(),
        ),
        "/loop" => ("302 Found", Some("/loop".to_string()), String::new()),
        "/headers" => ("200 OK", None, head.clone()),
        "/big" => ("200 OK", None, "x".repeat(100_000)),
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        _ => ("404 Not Found", None, String::new()),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(location) = location {
        response.push_str(&format!("Location: {location}\r\n"));
    }
    response.push_str("\r\n");
    response.push_str(&body);
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A plain HTTP server on 127.0.0.1; returns its port and request log.
async fn http_server() -> (u16, Log) {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = Log::default();
    let requests = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, port, requests.clone()));
        }
    });
    (port, log)
}

/// An HTTPS server with a fresh self-signed certificate for "localhost".
async fn https_server() -> (u16, Log) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key.into())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = Log::default();
    let requests = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let requests = requests.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    answer(tls, port, requests).await;
                }
            });
        }
    });
    (port, log)
}

/// A listener that accepts connections and never says a word.
async fn silent_server() -> u16 {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    port
}

/// A port nothing listens on (bound, then released).
async fn closed_port() -> u16 {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    listener.local_addr().unwrap().port()
}

fn container(port: u16) -> Container {
    Container {
        name: "app".into(),
        ports: Some(vec![ContainerPort {
            name: Some("web".into()),
            container_port: i32::from(port),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn get(port: u16, path: &str) -> HTTPGetAction {
    HTTPGetAction {
        path: Some(path.into()),
        port: IntOrString::Int(i32::from(port)),
        ..Default::default()
    }
}

/// Runs `http_get` with the pod IP 127.0.0.1, checking it answers within its timeout.
async fn probe_http(action: HTTPGetAction, port: u16) -> Outcome {
    let start = Instant::now();
    let outcome = http_get(&action, &container(port), Some(LOOPBACK), TIMEOUT)
        .await
        .expect("a valid action");
    assert!(
        start.elapsed() < TIMEOUT + SLACK,
        "took {:?}",
        start.elapsed()
    );
    outcome
}

#[tokio::test]
async fn http_200_is_a_success_with_the_body() {
    let (port, log) = http_server().await;
    assert_eq!(
        probe_http(get(port, "/ok"), port).await,
        Outcome::Success("fine".into())
    );
    let head = log.lock().unwrap()[0].to_lowercase();
    assert!(head.starts_with("get /ok http/1.1\r\n"), "{head}");
    assert!(head.contains("user-agent: kube-probe/1.34\r\n"), "{head}");
    assert!(head.contains("accept: */*\r\n"), "{head}");
    assert!(
        head.contains(&format!("host: 127.0.0.1:{port}\r\n")),
        "{head}"
    );
}

#[tokio::test]
async fn http_500_is_a_failure_with_the_status() {
    let (port, _) = http_server().await;
    assert_eq!(
        probe_http(get(port, "/fail"), port).await,
        Outcome::Failure("HTTP probe failed with statuscode: 500".into())
    );
}

#[tokio::test]
async fn http_named_port_and_headers() {
    let (port, log) = http_server().await;
    let action = HTTPGetAction {
        port: IntOrString::String("web".into()),
        http_headers: Some(vec![
            HTTPHeader {
                name: "X-Probe".into(),
                value: "yes".into(),
            },
            HTTPHeader {
                name: "User-Agent".into(),
                value: "custom/1".into(),
            },
        ]),
        ..get(port, "/headers")
    };
    let outcome = probe_http(action, port).await;
    let Outcome::Success(body) = outcome else {
        panic!("{outcome:?}");
    };
    let body = body.to_lowercase();
    assert!(body.contains("x-probe: yes\r\n"), "{body}");
    assert!(body.contains("user-agent: custom/1\r\n"), "{body}");
    assert!(!body.contains("kube-probe"), "{body}");
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn http_same_host_redirects_are_followed() {
    let (port, log) = http_server().await;
    assert_eq!(
        probe_http(get(port, "/redirect-local"), port).await,
        Outcome::Success("fine".into())
    );
    let paths: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .map(|h| h.split(' ').nth(1).unwrap().to_string())
        .collect();
    assert_eq!(paths, vec!["/redirect-local", "/ok"]);
}

#[tokio::test]
async fn http_cross_host_redirect_is_a_warning_and_not_followed() {
    let (port, log) = http_server().await;
    assert_eq!(
        probe_http(get(port, "/redirect-away"), port).await,
        Outcome::Warning("Probe terminated redirects, Response body: moved".into())
    );
    assert_eq!(log.lock().unwrap().len(), 1, "the other host is not asked");
}

#[tokio::test]
async fn http_redirect_loop_fails_after_ten() {
    let (port, log) = http_server().await;
    let outcome = probe_http(get(port, "/loop"), port).await;
    let Outcome::Failure(message) = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(message.contains("stopped after 10 redirects"), "{message}");
    assert_eq!(log.lock().unwrap().len(), 10);
}

#[tokio::test]
async fn http_body_is_capped() {
    let (port, _) = http_server().await;
    let outcome = probe_http(get(port, "/big"), port).await;
    assert_eq!(outcome.result(), ProbeResult::Success);
    assert_eq!(outcome.output().len(), 10 * 1024);
}

#[tokio::test]
async fn http_server_that_never_answers_times_out() {
    let (port, _) = http_server().await;
    let start = Instant::now();
    let outcome = probe_http(get(port, "/hang"), port).await;
    assert!(start.elapsed() >= TIMEOUT);
    let Outcome::Failure(message) = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(message.contains("timeout"), "{message}");
    assert!(
        message.contains(&format!("127.0.0.1:{port}/hang")),
        "{message}"
    );
    let silent = silent_server().await;
    let outcome = probe_http(get(silent, "/"), silent).await;
    assert!(
        matches!(&outcome, Outcome::Failure(m) if m.contains("timeout")),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn http_connection_refused_is_a_failure() {
    let port = closed_port().await;
    let outcome = probe_http(get(port, "/ok"), port).await;
    let Outcome::Failure(message) = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        message.starts_with(&format!("Get \"http://127.0.0.1:{port}/ok\"")),
        "{message}"
    );
    assert!(message.to_lowercase().contains("refused"), "{message}");
}

#[tokio::test]
async fn https_with_a_self_signed_certificate() {
    let (port, log) = https_server().await;
    let action = HTTPGetAction {
        scheme: Some("HTTPS".into()),
        ..get(port, "/ok")
    };
    assert_eq!(
        probe_http(action.clone(), port).await,
        Outcome::Success("fine".into())
    );
    let failing = HTTPGetAction {
        path: Some("/fail".into()),
        ..action
    };
    assert_eq!(
        probe_http(failing, port).await,
        Outcome::Failure("HTTP probe failed with statuscode: 500".into())
    );
    assert_eq!(log.lock().unwrap().len(), 2);
}

async fn probe_tcp(port: u16) -> Outcome {
    let action = TCPSocketAction {
        port: IntOrString::String("web".into()),
        host: None,
    };
    let start = Instant::now();
    let outcome =
        nodelet::probe::tcp::tcp_socket(&action, &container(port), Some(LOOPBACK), TIMEOUT)
            .await
            .expect("a valid action");
    assert!(start.elapsed() < TIMEOUT + SLACK);
    outcome
}

#[tokio::test]
async fn tcp_open_and_closed_ports() {
    let open = silent_server().await;
    assert_eq!(probe_tcp(open).await, Outcome::Success(String::new()));
    let closed = closed_port().await;
    let outcome = probe_tcp(closed).await;
    let Outcome::Failure(message) = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        message.starts_with(&format!("dial tcp 127.0.0.1:{closed}: ")),
        "{message}"
    );
    assert!(message.to_lowercase().contains("refused"), "{message}");
}

/// A health service answering from a fixed table (unknown services are NOT_FOUND).
struct Table(HashMap<String, ServingStatus>);

#[tonic::async_trait]
impl Health for Table {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        match self.0.get(&request.into_inner().service) {
            Some(status) => Ok(tonic::Response::new(HealthCheckResponse {
                status: *status as i32,
            })),
            None => Err(tonic::Status::not_found("unknown service")),
        }
    }
}

/// A gRPC server on 127.0.0.1, with the health table or (None) without the health service.
async fn grpc_server(table: Option<Table>) -> u16 {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let router =
        tonic::transport::Server::builder().add_optional_service(table.map(HealthServer::new));
    tokio::spawn(router.serve_with_incoming(incoming));
    port
}

async fn probe_grpc(port: u16, service: Option<&str>) -> Outcome {
    let action = GRPCAction {
        port: i32::from(port),
        service: service.map(str::to_string),
    };
    let start = Instant::now();
    let outcome = nodelet::probe::grpc::grpc(&action, &container(port), Some(LOOPBACK), TIMEOUT)
        .await
        .expect("a valid action");
    assert!(
        start.elapsed() < TIMEOUT + SLACK,
        "took {:?}",
        start.elapsed()
    );
    outcome
}

#[tokio::test]
async fn grpc_health_serving_and_not_serving() {
    let table = Table(HashMap::from([
        (String::new(), ServingStatus::Serving),
        ("db".to_string(), ServingStatus::NotServing),
    ]));
    let port = grpc_server(Some(table)).await;
    assert_eq!(
        probe_grpc(port, None).await,
        Outcome::Success("service is serving".into())
    );
    assert_eq!(
        probe_grpc(port, Some("db")).await,
        Outcome::Failure("service unhealthy (responded with \"NOT_SERVING\")".into())
    );
    let outcome = probe_grpc(port, Some("cache")).await;
    assert!(
        matches!(&outcome, Outcome::Failure(m) if m.starts_with("error: health rpc probe failed: NotFound")),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn grpc_without_the_health_service_is_a_clear_failure() {
    let port = grpc_server(None).await;
    let outcome = probe_grpc(port, None).await;
    assert!(
        matches!(&outcome, Outcome::Failure(m) if m.starts_with(
            "error: this server does not implement the grpc health protocol (grpc.health.v1.Health)"
        )),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn grpc_unreachable_and_silent_servers_fail_within_the_timeout() {
    let closed = closed_port().await;
    let outcome = probe_grpc(closed, None).await;
    assert!(
        matches!(&outcome, Outcome::Failure(m) if m.starts_with("error: failed to connect service at")),
        "{outcome:?}"
    );
    let silent = silent_server().await;
    let outcome = probe_grpc(silent, None).await;
    assert!(
        matches!(&outcome, Outcome::Failure(m) if m.starts_with("timeout: ")),
        "{outcome:?}"
    );
}

/// An Exec for probers whose probes here never exec.
struct NoExec;

impl Exec for NoExec {
    fn exec(
        &self,
        _: &str,
        _: &[String],
        _: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<(i32, Vec<u8>), ExecError>> + Send>> {
        Box::pin(async { Err(ExecError::Failed("no exec in this test".to_string())) })
    }
}

fn pod() -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            uid: Some("uid-1".into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn target(probe: Probe, port: u16) -> ProbeTarget {
    ProbeTarget {
        pod: pod().into(),
        container: container(port),
        container_id: "cid-1".into(),
        pod_ip: Some(LOOPBACK),
        probe,
        resumed: None,
    }
}

fn key(kind: ProbeKind) -> ProbeKey {
    ProbeKey {
        pod_uid: "uid-1".into(),
        container: "app".into(),
        kind,
    }
}

#[tokio::test]
async fn prober_reports_http_readiness_and_records_events() {
    let (port, _) = http_server().await;
    let recorder = Recorder::new("node-1", None);
    let prober = Prober::new(Arc::new(NoExec), recorder.clone());
    let (tx, mut rx) = futures::channel::mpsc::unbounded();
    let ready = Probe {
        http_get: Some(get(port, "/redirect-away")),
        ..Default::default()
    };
    prober.start(key(ProbeKind::Readiness), target(ready, port), tx.clone());
    let live = Probe {
        http_get: Some(get(port, "/fail")),
        failure_threshold: Some(1),
        ..Default::default()
    };
    prober.start(key(ProbeKind::Liveness), target(live, port), tx);
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let update = tokio::time::timeout(TIMEOUT + SLACK, rx.recv())
            .await
            .expect("updates within the timeout")
            .unwrap();
        seen.push((update.key.kind, update.result, update.message));
    }
    assert!(seen.contains(&(ProbeKind::Readiness, ProbeResult::Failure, String::new())));
    assert!(seen.contains(&(ProbeKind::Liveness, ProbeResult::Success, String::new())));
    assert!(seen.contains(&(
        ProbeKind::Readiness,
        ProbeResult::Success,
        "Probe terminated redirects, Response body: moved".to_string()
    )));
    assert!(seen.contains(&(
        ProbeKind::Liveness,
        ProbeResult::Failure,
        "HTTP probe failed with statuscode: 500".to_string()
    )));
    let events: Vec<(String, String)> = recorder
        .recent()
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect();
    assert!(events.contains(&(
        "ProbeWarning".into(),
        "Readiness probe warning: Probe terminated redirects, Response body: moved".into()
    )));
    assert!(events.contains(&(
        "Unhealthy".into(),
        "Liveness probe failed: HTTP probe failed with statuscode: 500".into()
    )));
    let metrics = prober.metrics_text();
    assert!(
        metrics.contains(
            "prober_probe_total{probe_type=\"Liveness\",result=\"failed\",container=\"app\",\
         pod=\"web\",namespace=\"default\",pod_uid=\"uid-1\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("nodelet_probe_start_delay_seconds_count 2\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn run_once_dispatches_on_the_handler() {
    let open = silent_server().await;
    let tcp = Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::Int(i32::from(open)),
            host: Some("127.0.0.1".into()),
        }),
        ..Default::default()
    };
    let outcome = run_once(&NoExec, &target(tcp, open), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Success(String::new()));
    let none = run_once(&NoExec, &target(Probe::default(), open), TIMEOUT).await;
    assert!(none.is_err());
    let addr = SocketAddr::from((LOOPBACK, open));
    assert!(
        TcpStream::connect(addr).await.is_ok(),
        "the server still accepts"
    );
}

/// Exec probes through the real runtime: a busybox container in its own containerd namespace.
#[tokio::test]
async fn exec_probes_in_a_busybox_container() {
    use k8s_openapi::api::core::v1::ExecAction;
    use nodelet_tests::runtime_support::TestRuntime;

    let t = TestRuntime::new("probe-exec").await;
    let image = t.pull_busybox().await;
    t.rt.create(&t.container("box", &image, &["sleep", "3600"]))
        .await
        .unwrap();
    t.rt.start("box").await.unwrap();

    let recorder = Recorder::new("node-1", None);
    let prober = Prober::new(Arc::new(t.rt.clone()), recorder.clone());
    let (tx, mut rx) = futures::channel::mpsc::unbounded();
    let exec = |command: &[&str], timeout: i32| Probe {
        exec: Some(ExecAction {
            command: Some(command.iter().map(|s| s.to_string()).collect()),
        }),
        timeout_seconds: Some(timeout),
        failure_threshold: Some(1),
        ..Default::default()
    };
    let in_box = |probe| ProbeTarget {
        container_id: "box".into(),
        ..target(probe, 80)
    };
    let cases = [
        (
            ProbeKind::Readiness,
            "app",
            exec(&["sh", "-c", "test -d /bin"], 5),
        ),
        (
            ProbeKind::Liveness,
            "sick",
            exec(&["sh", "-c", "echo sick; exit 3"], 5),
        ),
        (ProbeKind::Liveness, "missing", exec(&["no-such-binary"], 5)),
        (ProbeKind::Liveness, "slow", exec(&["sleep", "60"], 1)),
    ];
    for (kind, container, probe) in cases {
        let key = ProbeKey {
            container: container.into(),
            ..key(kind)
        };
        prober.start(key, in_box(probe), tx.clone());
    }
    let mut results = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while results.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let update = tokio::time::timeout(left, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {results:?} within 60 s"))
            .unwrap();
        if update.result != update.key.kind.initial_result() {
            results.insert(
                update.key.container.clone(),
                (update.result, update.message),
            );
        }
    }
    assert_eq!(results["app"], (ProbeResult::Success, String::new()));
    assert_eq!(results["sick"], (ProbeResult::Failure, "sick".to_string()));
    let (result, message) = &results["slow"];
    assert_eq!(*result, ProbeResult::Failure);
    assert!(message.contains("timed out"), "{message}");
    let events: Vec<String> = recorder
        .recent()
        .into_iter()
        .filter_map(|e| e.message)
        .collect();
    assert!(
        events.contains(&"Liveness probe failed: sick".to_string()),
        "{events:?}"
    );
    // A command that cannot start is an error, not a failure (upstream discards errored
    // probes): an event says so and the liveness result stays Success.
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("Liveness probe errored") && e.contains("no-such-binary")),
        "{events:?}"
    );
    assert!(!results.contains_key("missing"), "{results:?}");
    drop(prober);
    t.cleanup().await;
}
