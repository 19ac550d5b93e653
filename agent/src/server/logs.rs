//! `GET /containerLogs/{namespace}/{pod}/{container}`, as the kubelet serves it for
//! `kubectl logs`: `tailLines`, `previous`, `follow`, `timestamps` and `limitBytes`.
//!
//! The log file is streamed a chunk at a time and never read whole: a tail is found from the
//! end of the file (`pod::logs::tail_start`), records are served as the bytes the container
//! wrote (they need not be UTF-8), and `limitBytes` cuts the output. The body is ended in a
//! later write than its last data: the API server's websocket copy of `pods/log` drops the
//! bytes of a read that also reports the end of the body, so the end must not travel with them.
//! A followed log reads on across rotation: once the log driver has moved the file aside (by
//! `containerLogMaxSize`), what is left of the old file is read to its end and the new file
//! from its start, so no line is lost or repeated.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::ServerState;
use crate::pod::logs::{render, tail_start};
use crate::status::StatusManager;

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct LogQuery {
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
/// Bytes read from the file per step.
const CHUNK: usize = 32 * 1024;
/// A record longer than this without its newline is served as it is (the log driver splits
/// lines far below it), so a file without newlines cannot grow the buffer without bound.
const MAX_RECORD: usize = 1024 * 1024;

/// The output of a container's current (or previous) attempt, as `kubectl logs` shows it;
/// `follow` streams what the attempt writes until it ends.
pub(super) async fn container_logs(
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
    let missing = |e: std::io::Error| not_found(format!("{}: {e}", path.display()));
    let std_file = std::fs::File::open(&path).map_err(missing)?;
    let tail = query.tail_lines;
    let (std_file, offset) = tokio::task::spawn_blocking(move || {
        let mut file = std_file;
        let len = file.metadata()?.len();
        let offset = match tail {
            Some(n) => tail_start(&mut file, len, n)?,
            None => 0,
        };
        Ok::<_, std::io::Error>((file, offset))
    })
    .await
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(missing)?;
    let identity = file_identity(&std_file.metadata().map_err(missing)?);
    let mut file = tokio::fs::File::from_std(std_file);
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(missing)?;
    let follow = (query.follow && !query.previous).then(|| Running {
        status: state.status.clone(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        container,
        attempt,
        path,
        identity,
    });
    let stream = LogStream {
        file,
        next_file: None,
        chunk: vec![0; CHUNK],
        pending: Vec::new(),
        continues: false,
        timestamps: query.timestamps,
        left: query.limit_bytes.unwrap_or(usize::MAX),
        follow,
        done: false,
    };
    let body = futures::stream::unfold(stream, LogStream::next);
    Ok((
        [(header::CONTENT_TYPE, "text/plain")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

pub(super) fn find_pod(status: &StatusManager, namespace: &str, name: &str) -> Option<Pod> {
    status
        .all()
        .into_iter()
        .find(|r| {
            let m = &r.desired.metadata;
            m.namespace.as_deref() == Some(namespace) && m.name.as_deref() == Some(name)
        })
        .map(|r| r.pod())
}

pub(super) fn container_status(pod: &Pod, container: &str) -> Option<ContainerStatus> {
    crate::pod::status::all_container_statuses(pod.status.as_ref()?)
        .find(|c| c.name == container)
        .cloned()
}

/// What a followed log asks of the status: whether its attempt still runs; and of the log's
/// path: whether rotation put a new file there.
struct Running {
    status: StatusManager,
    uid: String,
    container: String,
    attempt: u32,
    path: PathBuf,
    /// Device and inode of the file being read.
    identity: (u64, u64),
}

fn file_identity(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

impl Running {
    fn still(&self) -> bool {
        let Some(record) = self.status.get(&self.uid) else {
            return false;
        };
        let still = crate::pod::status::all_container_statuses(&record.status)
            .find(|c| c.name == self.container)
            .is_some_and(|c| {
                c.restart_count.max(0) as u32 == self.attempt
                    && c.state.as_ref().is_some_and(|s| s.running.is_some())
            });
        still
    }

    /// The file now at the log's path, when it is not the one being read (the old one was
    /// rotated away). Between the move and the new file's creation there is none yet.
    async fn rotated(&mut self) -> Option<tokio::fs::File> {
        if file_identity(&tokio::fs::metadata(&self.path).await.ok()?) == self.identity {
            return None;
        }
        let file = tokio::fs::File::open(&self.path).await.ok()?;
        self.identity = file_identity(&file.metadata().await.ok()?);
        Some(file)
    }
}

/// A log read a chunk at a time from where it starts; when followed, read on until the attempt
/// no longer runs.
struct LogStream {
    file: tokio::fs::File,
    /// The file rotation put at the log's path, read once `file` is read to its end.
    next_file: Option<tokio::fs::File>,
    /// The read buffer, reused by every step.
    chunk: Vec<u8>,
    /// Bytes of a record whose newline has not been read yet.
    pending: Vec<u8>,
    /// Whether the next record continues a partial one.
    continues: bool,
    timestamps: bool,
    /// limitBytes still to send.
    left: usize,
    follow: Option<Running>,
    /// The data is all sent; the next poll ends the body.
    done: bool,
}

impl LogStream {
    async fn next(mut self) -> Option<(std::io::Result<Bytes>, Self)> {
        if self.done {
            return None;
        }
        loop {
            if self.left == 0 {
                return self.finish().await;
            }
            // Whether the attempt ran before this read: what it wrote until then is read now.
            let running = self.follow.as_ref().is_some_and(Running::still);
            let n = match self.file.read(&mut self.chunk).await {
                Ok(n) => n,
                Err(e) => {
                    self.done = true;
                    return Some((Err(e), self));
                }
            };
            let out = match n {
                0 => {
                    if let Some(next) = self.next_file.take() {
                        self.file = next;
                        continue;
                    }
                    // A new file at the path: the old one is read once more first, so what
                    // the driver wrote to it just before the move comes before the new file.
                    if let Some(follow) = self.follow.as_mut() {
                        self.next_file = follow.rotated().await;
                        if self.next_file.is_some() {
                            continue;
                        }
                    }
                    if running {
                        tokio::time::sleep(FOLLOW_POLL).await;
                        continue;
                    }
                    // The end: an unterminated last record is served as it is.
                    let rest = std::mem::take(&mut self.pending);
                    self.done = true;
                    self.rendered(rest.split(|&b| b == b'\n').filter(|r| !r.is_empty()))
                }
                n => {
                    self.pending.extend_from_slice(&self.chunk[..n]);
                    let complete = match self.pending.iter().rposition(|&b| b == b'\n') {
                        Some(end) => self.pending.drain(..=end).collect(),
                        None if self.pending.len() > MAX_RECORD => {
                            std::mem::take(&mut self.pending)
                        }
                        None => Vec::new(),
                    };
                    self.rendered(complete.split(|&b| b == b'\n').filter(|r| !r.is_empty()))
                }
            };
            match (out.is_empty(), self.done) {
                (false, _) => return Some((Ok(Bytes::from(out)), self)),
                (true, true) => return self.finish().await,
                (true, false) => continue,
            }
        }
    }

    /// The records rendered, cut to what limitBytes leaves.
    fn rendered<'a>(&mut self, records: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
        let mut out = Vec::new();
        for record in records {
            self.continues = render(record, self.timestamps, self.continues, &mut out);
        }
        out.truncate(self.left);
        self.left -= out.len();
        out
    }

    /// Ends the body one poll after the last data, so the two never share a write.
    async fn finish(self) -> Option<(std::io::Result<Bytes>, Self)> {
        tokio::task::yield_now().await;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn stream(log: &[u8], limit: usize) -> LogStream {
        let mut file = tempfile::tempfile().expect("temp file");
        std::io::Write::write_all(&mut file, log).expect("write");
        std::io::Seek::rewind(&mut file).expect("rewind");
        LogStream {
            file: tokio::fs::File::from_std(file),
            next_file: None,
            chunk: vec![0; CHUNK],
            pending: Vec::new(),
            continues: false,
            timestamps: false,
            left: limit,
            follow: None,
            done: false,
        }
    }

    async fn body(s: LogStream) -> Vec<Vec<u8>> {
        let chunks: Vec<_> = futures::stream::unfold(s, LogStream::next).collect().await;
        chunks.into_iter().map(|c| c.unwrap().to_vec()).collect()
    }

    #[tokio::test]
    async fn a_big_log_streams_in_chunks_and_bytes_pass_as_they_are() {
        let record =
            |prefix: &str, i: usize| [format!("{prefix}line {i} ").as_bytes(), b"\xff\n"].concat();
        let log: Vec<u8> = (0..20_000).flat_map(|i| record("t stdout F ", i)).collect();
        let chunks = body(stream(&log, usize::MAX)).await;
        assert!(chunks.len() > 5, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.len() <= CHUNK));
        let all = chunks.concat();
        let expected: Vec<u8> = (0..20_000).flat_map(|i| record("", i)).collect();
        assert_eq!(all, expected);
    }

    #[tokio::test]
    async fn limit_bytes_cuts_the_output() {
        let chunks = body(stream(b"t stdout F hello\nt stdout F world\n", 8)).await;
        assert_eq!(chunks.concat(), b"hello\nwo");
    }

    #[tokio::test]
    async fn an_unterminated_last_record_is_served() {
        let chunks = body(stream(b"t stdout F one\nt stdout P tw", usize::MAX)).await;
        assert_eq!(chunks.concat(), b"one\ntw");
    }

    #[tokio::test]
    async fn the_body_ends_a_poll_after_its_last_data() {
        use std::task::Poll;
        let s = futures::stream::unfold(stream(b"t stdout F one\n", usize::MAX), LogStream::next);
        let mut s = std::pin::pin!(s);
        let (mut data, mut pending_after_data) = (Vec::new(), 0);
        loop {
            match futures::poll!(s.next()) {
                Poll::Ready(Some(chunk)) => data.push(chunk.expect("data")),
                Poll::Ready(None) => break,
                Poll::Pending => {
                    pending_after_data += usize::from(!data.is_empty());
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        }
        assert_eq!(data.concat(), b"one\n");
        // The server writes out the data while the body is pending; only then does it end.
        assert!(pending_after_data > 0, "the end came with the last data");
    }
}
