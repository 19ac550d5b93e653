//! The prober: liveness, readiness and startup probes (exec, httpGet, tcpSocket, grpc) with the
//! kubelet's semantics, all driven by one scheduler task (a timer heap), never a thread or an
//! idle task per probe. Results go back to the pod worker that asked, on its channel.
//!
//! OWNER: probes helper. Signatures here are the contract the pod worker codes against.
//!
//! Semantics (the upstream kubelet's):
//! - Defaults: initialDelaySeconds 0, periodSeconds 10, timeoutSeconds 1, successThreshold 1
//!   (always 1 for liveness and startup), failureThreshold 3 ([`Settings::of`]).
//! - Initial results: readiness Failure, liveness Success, startup Unknown; a resumed probe
//!   (`ProbeTarget::resumed`, after an agent restart) starts from the given result instead and
//!   runs first after a random delay within one period. The initial delay counts from
//!   [`Prober::start`], which the pod worker calls when the container has started.
//! - A result is reported only when it crossed its threshold (`successThreshold` consecutive
//!   successes, `failureThreshold` consecutive failures). [`ProbeUpdate`]s are sent for the
//!   initial result (when the scheduler takes the `start`) and then only on changes, all by
//!   the scheduler task, which alone owns every probe's result and its results channel.
//! - Startup gating is internal: a liveness or readiness probe whose container spec has a
//!   `startupProbe` is parked (not run) until that container's startup probe, started through
//!   this prober, reports Success, and released at that moment. So the pod worker starts the
//!   startup probe too (with `resumed: Some(Success)` for a container that had already started
//!   before an agent restart); the order of the `start` calls does not matter. A startup probe
//!   stops running once it succeeded; stopping it afterwards (a terminating pod) leaves the
//!   container started, and a new startup probe that has not succeeded gates again.
//! - A liveness or startup Failure puts the probe on hold (the container is going to be
//!   restarted); the next [`Prober::start`] for the new container attempt resumes it.
//! - A handler error (a named port the container lacks, no pod IP…) is not a result: it is
//!   recorded as an `Unhealthy` event ("… probe errored: …") and counted as `unknown`.
//! - Events: `Unhealthy` (Warning) "Liveness probe failed: <output>" on every failed run,
//!   `ProbeWarning` (Warning) "… probe warning: <output>" for an HTTP redirect to another host.
//! - Metrics: [`Prober::metrics_text`] renders `prober_probe_total` and
//!   `nodelet_probe_start_delay_seconds` in the Prometheus text format.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::sync::mpsc;

use crate::events::Recorder;

pub mod exec;
pub mod grpc;
pub mod http;
pub(crate) mod metrics;
mod scheduler;
pub mod tcp;

pub use http::{get, http_get};

/// The `User-Agent` every HTTP and gRPC probe sends.
pub const USER_AGENT: &str = "kube-probe/1.34";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    /// "Liveness", "Readiness" or "Startup", as in events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "Liveness",
            ProbeKind::Readiness => "Readiness",
            ProbeKind::Startup => "Startup",
        }
    }

    /// The result a probe of this kind has before it ever ran.
    pub fn initial_result(self) -> ProbeResult {
        match self {
            ProbeKind::Liveness => ProbeResult::Success,
            ProbeKind::Readiness => ProbeResult::Failure,
            ProbeKind::Startup => ProbeResult::Unknown,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    Success,
    Failure,
    Unknown,
}

/// Identifies one probe of one container attempt.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbeKey {
    pub pod_uid: String,
    pub container: String,
    pub kind: ProbeKind,
}

/// What the prober needs to run one probe.
#[derive(Clone, Debug)]
pub struct ProbeTarget {
    pub pod: std::sync::Arc<Pod>,
    pub container: Container,
    pub container_id: String,
    pub pod_ip: Option<IpAddr>,
    pub probe: Probe,
    /// Resuming after an agent restart: first run after a random delay within one period,
    /// starting from `initial` (e.g. Success for a container that was ready).
    pub resumed: Option<ProbeResult>,
}

/// A probe's result changed (only changes are sent, plus the first result).
#[derive(Clone, Debug)]
pub struct ProbeUpdate {
    pub key: ProbeKey,
    pub container_id: String,
    pub result: ProbeResult,
    /// Failure output or reason, for the Unhealthy event and the kill message.
    pub message: String,
}

/// Runs a command in a container for exec probes and hooks (the runtime implements it; tests
/// use a fake).
pub trait Exec: Send + Sync + 'static {
    /// Returns (exit code, combined output), or why the command did not run to an exit code.
    fn exec(
        &self,
        container_id: &str,
        command: &[String],
        timeout: Duration,
    ) -> BoxFuture<'static, Result<(i32, Vec<u8>), ExecError>>;
}

/// Why an exec gave no exit code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecError {
    /// The command did not finish in time: a failure.
    Failed(String),
    /// The exec could not be carried out (containerd unreachable or restarting, the container
    /// gone, the command could not start): no result, as upstream discards a probe that errored.
    Errored(String),
}

/// What one run of a handler found, with its output (upstream's probe.Result).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The check passed; the output is informational (an HTTP body, "service is serving").
    Success(String),
    /// The check passed with a caveat (a redirect to another host was not followed).
    Warning(String),
    /// The check failed; the output says why.
    Failure(String),
}

impl Outcome {
    /// The probe result this outcome counts as (a warning is a success).
    pub fn result(&self) -> ProbeResult {
        match self {
            Outcome::Success(_) | Outcome::Warning(_) => ProbeResult::Success,
            Outcome::Failure(_) => ProbeResult::Failure,
        }
    }

    pub fn output(&self) -> &str {
        match self {
            Outcome::Success(o) | Outcome::Warning(o) | Outcome::Failure(o) => o,
        }
    }
}

/// A probe that cannot run as specified (its result is discarded, as upstream does).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The probe names no handler (exec, httpGet, tcpSocket or grpc).
    #[error("container {container}: the probe has no handler")]
    NoHandler { container: String },
    /// The exec probe's command is empty.
    #[error("container {container}: the exec probe has an empty command")]
    EmptyCommand { container: String },
    /// A named port is not among the container's ports.
    #[error("container {container}: no port named {port:?}")]
    NamedPort { container: String, port: String },
    /// A port number outside 1..=65535.
    #[error("container {container}: invalid port number {port}")]
    InvalidPort { container: String, port: i64 },
    /// No host was given and the pod has no IP (yet).
    #[error("container {container}: no host given and the pod has no IP")]
    NoHost { container: String },
    /// The URL built from the httpGet action does not parse.
    #[error("container {container}: invalid URL {url:?}: {detail}")]
    InvalidUrl {
        container: String,
        url: String,
        detail: String,
    },
    /// An httpHeaders entry is not a valid HTTP header.
    #[error("container {container}: invalid HTTP header {name:?}")]
    InvalidHeader { container: String, name: String },
    /// The shared HTTP client could not be built (TLS backend initialisation).
    #[error("cannot build the HTTP probe client: {detail}")]
    Client { detail: String },
    /// The handler panicked (a bug); the run counts as an error.
    #[error("container {container}: the probe handler panicked")]
    Panicked { container: String },
    /// The exec could not be carried out (see [`ExecError::Errored`]).
    #[error("container {container}: {detail}")]
    Exec { container: String, detail: String },
}

/// A probe's timing and thresholds with the API defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Settings {
    /// Applies the defaults (and the rule that liveness and startup need one success).
    pub fn of(kind: ProbeKind, probe: &Probe) -> Self {
        fn at_least(value: Option<i32>, min: i32, default: i32) -> u32 {
            value
                .filter(|v| *v >= min)
                .unwrap_or(default)
                .unsigned_abs()
        }
        let secs = |v, min, default| Duration::from_secs(u64::from(at_least(v, min, default)));
        let success_threshold = match kind {
            ProbeKind::Readiness => at_least(probe.success_threshold, 1, 1),
            ProbeKind::Liveness | ProbeKind::Startup => 1,
        };
        Settings {
            initial_delay: secs(probe.initial_delay_seconds, 0, 0),
            period: secs(probe.period_seconds, 1, 10),
            timeout: secs(probe.timeout_seconds, 1, 1),
            success_threshold,
            failure_threshold: at_least(probe.failure_threshold, 1, 3),
        }
    }
}

/// Runs the handler the probe names once (each handler enforces `timeout` itself).
pub async fn run_once(
    exec: &dyn Exec,
    target: &ProbeTarget,
    timeout: Duration,
) -> Result<Outcome, ProbeError> {
    let container = &target.container;
    let probe = &target.probe;
    if let Some(action) = &probe.exec {
        let command = action.command.as_deref().unwrap_or_default();
        if command.is_empty() {
            return Err(ProbeError::EmptyCommand {
                container: container.name.clone(),
            });
        }
        exec::exec_probe(exec, &target.container_id, command, timeout)
            .await
            .map_err(|detail| ProbeError::Exec {
                container: container.name.clone(),
                detail,
            })
    } else if let Some(action) = &probe.http_get {
        http::http_get(action, container, target.pod_ip, timeout).await
    } else if let Some(action) = &probe.tcp_socket {
        tcp::tcp_socket(action, container, target.pod_ip, timeout).await
    } else if let Some(action) = &probe.grpc {
        grpc::grpc(action, container, target.pod_ip, timeout).await
    } else {
        Err(ProbeError::NoHandler {
            container: container.name.clone(),
        })
    }
}

/// Resolves a probe's port: a number, or the name of one of the container's ports.
pub fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, ProbeError> {
    let number = match port {
        IntOrString::Int(n) => i64::from(*n),
        IntOrString::String(name) => match name.parse::<i64>() {
            Ok(n) => n,
            Err(_) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| i64::from(p.container_port))
                .ok_or_else(|| ProbeError::NamedPort {
                    container: container.name.clone(),
                    port: name.clone(),
                })?,
        },
    };
    u16::try_from(number)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ProbeError::InvalidPort {
            container: container.name.clone(),
            port: number,
        })
}

/// The host a handler connects to: the one the action names, else the pod's IP.
fn target_host(
    host: Option<&str>,
    pod_ip: Option<IpAddr>,
    container: &Container,
) -> Result<String, ProbeError> {
    match host.filter(|h| !h.is_empty()) {
        Some(host) => Ok(host.to_string()),
        None => pod_ip
            .map(|ip| ip.to_string())
            .ok_or_else(|| ProbeError::NoHost {
                container: container.name.clone(),
            }),
    }
}

/// `host:port`, with brackets around an IPv6 literal.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An error and its sources, joined by ": " (reqwest's and tonic's Display alone is terse).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// Upstream caps what it reads of a probe's output (HTTP body, exec output) at 10 KiB.
pub const MAX_OUTPUT: usize = 10 * 1024;

/// Lossy UTF-8 of at most [`MAX_OUTPUT`] bytes.
fn capped_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_OUTPUT)]).into_owned()
}

/// Runs every probe of the node from one scheduler task, which alone owns each probe's state,
/// its result and where its updates go. Must be created inside a Tokio runtime; dropping it
/// stops the scheduler and every running probe.
pub struct Prober {
    commands: mpsc::UnboundedSender<scheduler::Command>,
    /// Written by the scheduler only; read to render `/metrics`.
    metrics: Arc<Mutex<metrics::Metrics>>,
}

/// Where a probe's results go: its pod worker's inbox. futures' unbounded channel allocates
/// per message; tokio's allocated a block of 32 updates (3.6 KiB) for every pod worker up front.
pub type Results = futures::channel::mpsc::UnboundedSender<ProbeUpdate>;

impl Prober {
    pub fn new(exec: Arc<dyn Exec>, recorder: Recorder) -> Self {
        let metrics = Arc::new(Mutex::default());
        let (commands, receiver) = mpsc::unbounded_channel();
        tokio::spawn(scheduler::Scheduler::new(exec, recorder, metrics.clone()).run(receiver));
        Self { commands, metrics }
    }

    /// Starts (or replaces) the probe `key`; its results go to `results`, the initial one
    /// first (sent by the scheduler as it takes the start). A replaced probe sends nothing
    /// more, and its `results` is let go.
    pub fn start(&self, key: ProbeKey, target: ProbeTarget, results: Results) {
        let _ = self.commands.send(scheduler::Command::Start {
            key,
            target: Box::new(target),
            results,
        });
    }

    /// Stops one probe.
    pub fn stop(&self, key: &ProbeKey) {
        let _ = self
            .commands
            .send(scheduler::Command::Stop { key: key.clone() });
    }

    /// Stops every probe of a pod.
    pub fn stop_pod(&self, pod_uid: &str) {
        let _ = self.commands.send(scheduler::Command::StopPod {
            pod_uid: pod_uid.to_string(),
        });
    }

    /// The result a probe last reported, as the scheduler holds it (Unknown when not running).
    #[cfg(test)]
    pub(crate) async fn result(&self, key: &ProbeKey) -> ProbeResult {
        let (reply, result) = tokio::sync::oneshot::channel();
        let _ = self.commands.send(scheduler::Command::Result {
            key: key.clone(),
            reply,
        });
        result.await.unwrap_or(ProbeResult::Unknown)
    }

    /// Probe counters and the start-delay histogram in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.metrics.lock().expect("prober metrics lock").render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ContainerPort;

    #[test]
    fn defaults_apply() {
        let s = Settings::of(ProbeKind::Readiness, &Probe::default());
        assert_eq!(s.initial_delay, Duration::ZERO);
        assert_eq!(s.period, Duration::from_secs(10));
        assert_eq!(s.timeout, Duration::from_secs(1));
        assert_eq!(s.success_threshold, 1);
        assert_eq!(s.failure_threshold, 3);
    }

    #[test]
    fn liveness_and_startup_need_one_success() {
        let probe = Probe {
            success_threshold: Some(3),
            period_seconds: Some(0),
            failure_threshold: Some(7),
            initial_delay_seconds: Some(4),
            ..Default::default()
        };
        assert_eq!(
            Settings::of(ProbeKind::Liveness, &probe).success_threshold,
            1
        );
        assert_eq!(
            Settings::of(ProbeKind::Startup, &probe).success_threshold,
            1
        );
        let readiness = Settings::of(ProbeKind::Readiness, &probe);
        assert_eq!(readiness.success_threshold, 3);
        assert_eq!(readiness.failure_threshold, 7);
        assert_eq!(readiness.initial_delay, Duration::from_secs(4));
        assert_eq!(
            readiness.period,
            Duration::from_secs(10),
            "period 0 is invalid"
        );
    }

    #[test]
    fn initial_results() {
        assert_eq!(ProbeKind::Readiness.initial_result(), ProbeResult::Failure);
        assert_eq!(ProbeKind::Liveness.initial_result(), ProbeResult::Success);
        assert_eq!(ProbeKind::Startup.initial_result(), ProbeResult::Unknown);
    }

    #[test]
    fn ports_resolve_by_number_and_name() {
        let container = Container {
            name: "app".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(resolve_port(&IntOrString::Int(80), &container).unwrap(), 80);
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &container).unwrap(),
            8080
        );
        assert_eq!(
            resolve_port(&IntOrString::String("81".into()), &container).unwrap(),
            81
        );
        assert!(matches!(
            resolve_port(&IntOrString::String("grpc".into()), &container),
            Err(ProbeError::NamedPort { .. })
        ));
        assert!(matches!(
            resolve_port(&IntOrString::Int(0), &container),
            Err(ProbeError::InvalidPort { port: 0, .. })
        ));
        assert!(matches!(
            resolve_port(&IntOrString::Int(70000), &container),
            Err(ProbeError::InvalidPort { .. })
        ));
    }

    #[test]
    fn hosts_default_to_the_pod_ip() {
        let container = Container::default();
        let ip: IpAddr = "10.233.0.5".parse().unwrap();
        assert_eq!(
            target_host(None, Some(ip), &container).unwrap(),
            "10.233.0.5"
        );
        assert_eq!(
            target_host(Some(""), Some(ip), &container).unwrap(),
            "10.233.0.5"
        );
        assert_eq!(target_host(Some("h"), Some(ip), &container).unwrap(), "h");
        assert!(target_host(None, None, &container).is_err());
        assert_eq!(join_host_port("::1", 80), "[::1]:80");
        assert_eq!(join_host_port("10.0.0.1", 80), "10.0.0.1:80");
    }
}
