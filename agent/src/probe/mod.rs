//! The prober: liveness, readiness and startup probes (exec, httpGet, tcpSocket, grpc) with the
//! kubelet's semantics, all driven by one scheduler (a timer wheel/heap on one task), never a
//! thread or busy task per probe. Results go back to the pod worker that asked, on its channel.
//!
//! OWNER: probes helper. Signatures here are the contract the pod worker codes against.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use tokio::sync::mpsc;

use crate::events::Recorder;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
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
    pub pod: Pod,
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
    /// Returns (exit code, combined output); an Err is an exec failure or a timeout.
    fn exec(
        &self,
        container_id: &str,
        command: &[String],
        timeout: Duration,
    ) -> BoxFuture<'static, Result<(i32, Vec<u8>), String>>;
}

pub struct Prober {
    _todo: (),
}

impl Prober {
    pub fn new(_exec: Arc<dyn Exec>, _recorder: Recorder) -> Self {
        todo!()
    }

    /// Starts (or replaces) the probe `key`; results go to `results`.
    pub fn start(
        &self,
        _key: ProbeKey,
        _target: ProbeTarget,
        _results: mpsc::UnboundedSender<ProbeUpdate>,
    ) {
        todo!()
    }

    /// Stops one probe.
    pub fn stop(&self, _key: &ProbeKey) {
        todo!()
    }

    /// Stops every probe of a pod.
    pub fn stop_pod(&self, _pod_uid: &str) {
        todo!()
    }

    /// The current result of a probe (Unknown when not running).
    pub fn result(&self, _key: &ProbeKey) -> ProbeResult {
        todo!()
    }
}
