//! The node's HTTP endpoints. Three listeners serve them, each a different audience:
//!
//! - the read-only port ([`serve`], `--read-only-port`, on 127.0.0.1 only): exactly the kubelet's
//!   unauthenticated set, `GET /healthz`, `GET /pods` (a v1 PodList with live status),
//!   `GET /metrics` (Prometheus text, the kubelet's names beside nodelet's own),
//!   `GET /metrics/resource` and `GET /stats/summary` (resource usage, [`crate::stats`]);
//!   nothing that shows a container's output or events;
//! - the secure port ([`secure`]): everything, behind authentication and authorization;
//! - the local socket ([`local`], `<run dir>/nodelet.sock`, mode 0600): everything, to root on
//!   the node, which needs no network port to read logs.
//!
//! [`node_router`] is what the secure port and the local socket share: the read-only set plus
//! `GET /events` (a v1 EventList of recent events) and `GET /containerLogs/…` ([`logs`]).
//! Handlers only read the status manager, the recorder and the log files.

pub mod local;
pub mod logs;
pub mod secure;
pub mod stream;

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta;
use k8s_openapi::List;
use tokio::net::TcpListener;

use crate::events::Recorder;
use crate::pod::api::Phase;
use crate::stats::{Stats, Summary};
use crate::status::StatusManager;

/// Produces the Prometheus text for /metrics.
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
pub struct ServerState {
    pub status: StatusManager,
    pub recorder: Recorder,
    pub metrics: MetricsFn,
    /// Where container logs are (/var/log/pods).
    pub log_dir: std::path::PathBuf,
    /// exec and port-forward on the secure port; None answers 501.
    pub streaming: Option<stream::Streaming>,
    /// Resource usage for /stats/summary and /metrics/resource.
    pub stats: Arc<Stats>,
}

/// The kubelet's read-only set: what anyone who reaches the read-only port may read.
pub fn read_only_router(state: ServerState) -> Router {
    Router::new()
        .route("/pods", get(pods))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/metrics/resource", get(resource_metrics))
        .route("/stats/summary", get(summary))
        .with_state(state)
}

/// The read-only set plus what only an authorized client (or root on the node) may read.
pub fn node_router(state: ServerState) -> Router {
    let privileged = Router::new()
        .route("/events", get(events))
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(logs::container_logs),
        )
        .with_state(state.clone());
    read_only_router(state).merge(privileged)
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, read_only_router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn pods(State(state): State<ServerState>) -> Json<List<Pod>> {
    let items = state.status.all().into_iter().map(|r| r.pod()).collect();
    Json(List {
        items,
        metadata: ListMeta::default(),
    })
}

async fn events(State(state): State<ServerState>) -> Json<List<Event>> {
    Json(List {
        items: state.recorder.recent(),
        metadata: ListMeta::default(),
    })
}

/// The summary of what the status manager reports, read off the async threads (cgroup files).
async fn read_summary(state: ServerState) -> Summary {
    let pods = state.status.all();
    let stats = state.stats.clone();
    tokio::task::spawn_blocking(move || stats.summary(&pods))
        .await
        .expect("reading resource usage does not panic")
}

async fn summary(State(state): State<ServerState>) -> Json<Summary> {
    Json(read_summary(state).await)
}

async fn resource_metrics(State(state): State<ServerState>) -> impl IntoResponse {
    let text = crate::stats::resource_metrics(&read_summary(state).await);
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text)
}

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

async fn metrics(State(state): State<ServerState>) -> impl IntoResponse {
    let mut text = String::new();
    let pods = state.status.all();
    text.push_str(&kubelet_metrics(state.stats.node_name(), &pods));
    text.push_str(
        "# HELP nodelet_pods Pods known to the agent, by phase.\n# TYPE nodelet_pods gauge\n",
    );
    let mut by_phase = std::collections::BTreeMap::<&str, usize>::new();
    for r in &pods {
        let phase = Phase::of(Some(&r.status)).unwrap_or(Phase::Pending);
        *by_phase.entry(phase.as_str()).or_default() += 1;
    }
    for (phase, n) in by_phase {
        text.push_str(&format!("nodelet_pods{{phase=\"{phase}\"}} {n}\n"));
    }
    text.push_str(&(state.metrics)());
    // What leak checks count: every task alive in the agent (streaming sessions included).
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    text.push_str(&format!(
        "# HELP nodelet_runtime_tasks Tasks alive in the agent's async runtime.\n# TYPE nodelet_runtime_tasks gauge\nnodelet_runtime_tasks {tasks}\n"
    ));
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text)
}

/// The kubelet's own gauges under its names: `kubelet_node_name`, `kubelet_running_pods` (pods
/// with a sandbox: a container of theirs was created) and `kubelet_running_containers` by state.
fn kubelet_metrics(node_name: &str, pods: &[crate::status::Reported]) -> String {
    let mut running_pods = 0;
    let mut by_state =
        std::collections::BTreeMap::from([("created", 0), ("exited", 0), ("running", 0)]);
    for r in pods.iter().filter(|r| !r.finished) {
        let status = &r.status;
        let created: Vec<_> = crate::pod::status::all_container_statuses(status)
            .filter(|c| c.container_id.is_some())
            .collect();
        if !created.is_empty() {
            running_pods += 1;
        }
        for c in created {
            let state = c.state.as_ref();
            let key = if state.is_some_and(|s| s.running.is_some()) {
                "running"
            } else if state.is_some_and(|s| s.terminated.is_some()) {
                "exited"
            } else {
                "created"
            };
            *by_state.entry(key).or_default() += 1;
        }
    }
    let mut text = format!(
        "# HELP kubelet_node_name [ALPHA] The node's name. The count is always 1.\n# TYPE kubelet_node_name gauge\nkubelet_node_name{{node=\"{node_name}\"}} 1\n\
         # HELP kubelet_running_pods [ALPHA] Number of pods that have a running pod sandbox\n# TYPE kubelet_running_pods gauge\nkubelet_running_pods {running_pods}\n\
         # HELP kubelet_running_containers [ALPHA] Number of containers currently running\n# TYPE kubelet_running_containers gauge\n"
    );
    for (state, n) in by_state {
        text.push_str(&format!(
            "kubelet_running_containers{{container_state=\"{state}\"}} {n}\n"
        ));
    }
    text
}
