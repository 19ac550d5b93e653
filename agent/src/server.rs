//! The read-only HTTP endpoint, as the kubelet's read-only port: `GET /pods` (a v1 PodList with
//! live status), `GET /healthz`, `GET /events` (a v1 EventList of recent events),
//! `GET /metrics` (Prometheus text) and, as the kubelet serves it for `kubectl logs`,
//! `GET /containerLogs/{namespace}/{pod}/{container}?tailLines=N&previous=true`.
//! It only reads the status manager, the recorder and the log files.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta;
use k8s_openapi::List;
use tokio::net::TcpListener;

use crate::events::Recorder;
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
}

pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/pods", get(pods))
        .route("/healthz", get(|| async { "ok" }))
        .route("/events", get(events))
        .route("/metrics", get(metrics))
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .with_state(state)
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn pods(State(state): State<ServerState>) -> Json<List<Pod>> {
    let items = state.status.all().into_iter().map(|r| r.pod).collect();
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

async fn metrics(State(state): State<ServerState>) -> impl IntoResponse {
    let mut text = String::new();
    let pods = state.status.all();
    text.push_str(
        "# HELP nodelet_pods Pods known to the agent, by phase.\n# TYPE nodelet_pods gauge\n",
    );
    let mut by_phase = std::collections::BTreeMap::<String, usize>::new();
    for r in &pods {
        let phase = r
            .pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Pending".into());
        *by_phase.entry(phase).or_default() += 1;
    }
    for (phase, n) in by_phase {
        text.push_str(&format!("nodelet_pods{{phase=\"{phase}\"}} {n}\n"));
    }
    text.push_str(&(state.metrics)());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    tail_lines: Option<usize>,
    #[serde(default)]
    previous: bool,
}

/// The output of a container's current (or previous) attempt, as `kubectl logs` shows it.
async fn container_logs(
    State(state): State<ServerState>,
    Path((namespace, pod_name, container)): Path<(String, String, String)>,
    Query(query): Query<LogQuery>,
) -> Result<String, (StatusCode, String)> {
    let not_found = |what: String| (StatusCode::NOT_FOUND, what);
    let pod = state
        .status
        .all()
        .into_iter()
        .map(|r| r.pod)
        .find(|p| {
            p.metadata.namespace.as_deref() == Some(namespace.as_str())
                && p.metadata.name.as_deref() == Some(pod_name.as_str())
        })
        .ok_or_else(|| not_found(format!("pod {namespace}/{pod_name} not found")))?;
    let status = pod.status.as_ref();
    let restarts = status
        .into_iter()
        .flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
        })
        .find(|c| c.name == container)
        .map(|c| c.restart_count.max(0) as u32)
        .ok_or_else(|| not_found(format!("container {container} not found in pod {pod_name}")))?;
    let attempt = match query.previous {
        false => restarts,
        true => restarts.checked_sub(1).ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                format!("previous terminated container {container} in pod {pod_name} not found"),
            )
        })?,
    };
    let path = crate::pod::logs::log_path(&state.log_dir, &pod, &container, attempt);
    let text = tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| not_found(format!("{}: {e}", path.display())))?;
    Ok(crate::pod::logs::output(&text, query.tail_lines))
}
