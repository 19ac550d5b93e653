//! The read-only HTTP endpoint, as the kubelet's read-only port: `GET /pods` (a v1 PodList with
//! live status), `GET /healthz`, `GET /events` (a v1 EventList of recent events) and
//! `GET /metrics` (Prometheus text). It only reads the status manager and the recorder.

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
use crate::status::StatusManager;

/// Produces the Prometheus text for /metrics.
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
pub struct ServerState {
    pub status: StatusManager,
    pub recorder: Recorder,
    pub metrics: MetricsFn,
}

pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/pods", get(pods))
        .route("/healthz", get(|| async { "ok" }))
        .route("/events", get(events))
        .route("/metrics", get(metrics))
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
