//! The read-only HTTP endpoint, as the kubelet's read-only port: `GET /pods` (a v1 PodList with
//! live status), `GET /healthz`, `GET /events` (a v1 EventList of recent events),
//! `GET /metrics` (Prometheus text) and, as the kubelet serves it for `kubectl logs`,
//! `GET /containerLogs/{namespace}/{pod}/{container}` with `tailLines`, `previous`, `follow`,
//! `timestamps` and `limitBytes`.
//! It only reads the status manager, the recorder and the log files.

pub mod secure;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Event, Pod};
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
    #[serde(default)]
    follow: bool,
    #[serde(default)]
    timestamps: bool,
    limit_bytes: Option<usize>,
}

/// How often a followed log is re-read.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// The output of a container's current (or previous) attempt, as `kubectl logs` shows it;
/// `follow` streams what the attempt writes until it ends.
async fn container_logs(
    State(state): State<ServerState>,
    Path((namespace, pod_name, container)): Path<(String, String, String)>,
    Query(query): Query<LogQuery>,
) -> Result<Response, (StatusCode, String)> {
    let not_found = |what: String| (StatusCode::NOT_FOUND, what);
    let pod = find_pod(&state.status, &namespace, &pod_name)
        .ok_or_else(|| not_found(format!("pod {namespace}/{pod_name} not found")))?;
    let restarts = container_status(&pod, &container)
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
    let follow = query.follow && !query.previous;
    // A followed log is read on from its last complete record.
    let complete = match follow {
        true => &text[..text.rfind('\n').map_or(0, |i| i + 1)],
        false => text.as_str(),
    };
    let mut out = crate::pod::logs::output(complete, query.tail_lines, query.timestamps);
    let limit = query.limit_bytes.unwrap_or(usize::MAX);
    if out.len() >= limit || !follow {
        out.truncate(floor_char_boundary(&out, limit));
        return Ok(out.into_response());
    }
    let follow = Follow {
        status: state.status.clone(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        container,
        attempt,
        path,
        offset: complete.len() as u64,
        pending: String::new(),
        continues: complete.lines().last().is_some_and(is_partial),
        timestamps: query.timestamps,
        left: limit - out.len(),
    };
    let first = futures::stream::once(async move { Ok::<_, std::io::Error>(out) });
    let rest = futures::stream::unfold(follow, Follow::next);
    Ok(axum::body::Body::from_stream(first.chain(rest)).into_response())
}

fn is_partial(record: &str) -> bool {
    record.split(' ').nth(2) == Some("P")
}

fn floor_char_boundary(s: &str, at: usize) -> usize {
    (0..=at.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

fn find_pod(status: &StatusManager, namespace: &str, name: &str) -> Option<Pod> {
    status.all().into_iter().map(|r| r.pod).find(|p| {
        p.metadata.namespace.as_deref() == Some(namespace)
            && p.metadata.name.as_deref() == Some(name)
    })
}

fn container_status(pod: &Pod, container: &str) -> Option<ContainerStatus> {
    let status = pod.status.as_ref()?;
    let mut all = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten());
    all.find(|c| c.name == container).cloned()
}

/// A followed log: the file read on from `offset` until the attempt no longer runs.
struct Follow {
    status: StatusManager,
    uid: String,
    container: String,
    attempt: u32,
    path: std::path::PathBuf,
    offset: u64,
    /// Bytes of an incomplete last line.
    pending: String,
    continues: bool,
    timestamps: bool,
    /// limitBytes still to send.
    left: usize,
}

impl Follow {
    async fn next(mut self) -> Option<(std::io::Result<String>, Self)> {
        loop {
            if self.left == 0 {
                return None;
            }
            // Whether the attempt ran when this read began: what it wrote before is all read.
            let running = self.running();
            match self.read().await {
                Ok(chunk) if !chunk.is_empty() => return Some((Ok(chunk), self)),
                Ok(_) if !running => return None,
                Ok(_) => tokio::time::sleep(FOLLOW_POLL).await,
                Err(e) => return Some((Err(e), Self { left: 0, ..self })),
            }
        }
    }

    fn running(&self) -> bool {
        let Some(record) = self.status.get(&self.uid) else {
            return false;
        };
        container_status(&record.pod, &self.container).is_some_and(|c| {
            c.restart_count.max(0) as u32 == self.attempt
                && c.state.as_ref().is_some_and(|s| s.running.is_some())
        })
    }

    /// The complete records written since the last read, rendered.
    async fn read(&mut self) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut file = tokio::fs::File::open(&self.path).await?;
        file.seek(std::io::SeekFrom::Start(self.offset)).await?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).await?;
        self.offset += bytes.len() as u64;
        self.pending.push_str(&String::from_utf8_lossy(&bytes));
        let Some(end) = self.pending.rfind('\n') else {
            return Ok(String::new());
        };
        let complete: String = self.pending.drain(..=end).collect();
        let mut out = String::new();
        for record in complete.lines() {
            self.continues =
                crate::pod::logs::render(record, self.timestamps, self.continues, &mut out);
        }
        out.truncate(floor_char_boundary(&out, self.left));
        self.left -= out.len();
        Ok(out)
    }
}
