//! `kubectl attach` (and `kubectl run -it`): a remote-command session bound to a running
//! container's own process instead of a new one.
//!
//! - Output: the log driver owns the container's stdout and stderr, so attach follows the
//!   container's CRI log file from its end at the time of the attach, and turns each record
//!   back into the bytes of its stream (`F` records end a line, `P` records do not). A file
//!   moved away by rotation is followed to its end, then the new file from its start.
//! - Stdin: written to the container's stdin FIFO (see `runtime::attach`), which the shim
//!   connects for containers with `tty: true`. With `stdin: true` but no terminal, containerd
//!   cannot connect stdin beside a logging binary: such an attach is refused with a clear
//!   reason on the error channel rather than silently dropping the input. Stdin sent to a
//!   container without `stdin: true` is dropped, as the kubelet's runtime drops it.
//! - `stdinOnce`: when the first attach that carried stdin ends, the container's stdin is
//!   closed (CloseIO), as upstream.
//! - Resize goes to the container's terminal. The session ends with Success when the
//!   container's process exits (after what it wrote last), or when the client goes away.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::remotecommand::{pump_in, report, Channels, Options, Outcome, Version};
use crate::runtime::Runtime;

/// How often the followed log is read for new records.
const POLL: Duration = Duration::from_millis(50);
/// How long output may still arrive after the process exited.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// A record longer than this without its newline is passed on as it is.
const MAX_RECORD: usize = 1024 * 1024;

/// The container an attach is bound to, from its spec and status.
#[derive(Clone, Debug)]
pub struct Target {
    pub container_id: String,
    /// The log file of the running attempt.
    pub log_path: PathBuf,
    /// The container's `stdin`, `stdinOnce` and `tty`.
    pub stdin: bool,
    pub stdin_once: bool,
    pub tty: bool,
}

/// Which stream a log record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// Turns CRI log bytes (`<time> <stream> <F|P> <text>\n`) back into the container's output,
/// by stream. A record cut between two reads waits for its newline.
#[derive(Default)]
pub struct Records {
    pending: Vec<u8>,
}

impl Records {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<(Output, Vec<u8>)> {
        self.pending.extend_from_slice(bytes);
        let complete: Vec<u8> = match self.pending.iter().rposition(|&b| b == b'\n') {
            Some(end) => self.pending.drain(..=end).collect(),
            None if self.pending.len() > MAX_RECORD => std::mem::take(&mut self.pending),
            None => return Vec::new(),
        };
        let mut out: Vec<(Output, Vec<u8>)> = Vec::new();
        for record in complete.split(|&b| b == b'\n').filter(|r| !r.is_empty()) {
            let mut parts = record.splitn(4, |&b| b == b' ');
            let (_time, stream, tag) = (parts.next(), parts.next(), parts.next());
            let stream = match stream {
                Some(b"stderr") => Output::Stderr,
                _ => Output::Stdout,
            };
            let mut text = parts.next().unwrap_or_default().to_vec();
            if tag != Some(b"P".as_slice()) {
                text.push(b'\n');
            }
            // Consecutive records of one stream travel together.
            match out.last_mut() {
                Some((s, data)) if *s == stream => data.extend(text),
                _ => out.push((stream, text)),
            }
        }
        out
    }
}

/// The log at `path` and its inode, read from its end.
async fn open_at_end(path: &std::path::Path) -> std::io::Result<(tokio::fs::File, u64)> {
    let (file, inode) = open(path).await?;
    let mut file = file;
    file.seek(std::io::SeekFrom::End(0)).await?;
    Ok((file, inode))
}

async fn open(path: &std::path::Path) -> std::io::Result<(tokio::fs::File, u64)> {
    let file = tokio::fs::File::open(path).await?;
    let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata().await?);
    Ok((file, inode))
}

/// Follows the log at `path` (opened as `file`), sending each stream's output to its
/// channel, until `stop` is cancelled; then reads what is left after one more poll.
async fn follow(
    path: PathBuf,
    (mut file, mut inode): (tokio::fs::File, u64),
    stdout: Option<mpsc::Sender<Vec<u8>>>,
    stderr: Option<mpsc::Sender<Vec<u8>>>,
    stop: CancellationToken,
) {
    let mut records = Records::default();
    let mut buf = vec![0u8; 32 * 1024];
    let mut last_round = false;
    loop {
        let n = match file.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "reading a followed log");
                return;
            }
        };
        if n > 0 {
            for (stream, data) in records.push(&buf[..n]) {
                let tx = match stream {
                    Output::Stdout => &stdout,
                    Output::Stderr => &stderr,
                };
                if let Some(tx) = tx {
                    let _ = tx.send(data).await;
                }
            }
            continue;
        }
        if last_round {
            return;
        }
        // At the end: a rotated file is done once read to its end; go on with the new one.
        let moved = tokio::fs::metadata(&path)
            .await
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m) != inode)
            .unwrap_or(false);
        if moved {
            if let Ok((f, i)) = open(&path).await {
                (file, inode) = (f, i);
                continue;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.cancelled() => {
                // What the log driver still had in hand arrives within a poll.
                tokio::time::sleep(POLL).await;
                last_round = true;
            }
        }
    }
}

/// Attaches the channels to the container until its process exits or `gone` completes.
pub async fn run(
    runtime: &Runtime,
    target: &Target,
    options: &Options,
    version: Version,
    channels: Channels,
    gone: impl std::future::Future<Output = ()>,
) {
    let Channels {
        stdin,
        resize,
        stdout,
        stderr,
        error,
    } = channels;
    let id = target.container_id.as_str();
    if stdin.is_some() && target.stdin && !target.tty {
        let reason = "nodelet connects an attach's stdin only to containers with tty: true";
        warn!(container_id = id, "{reason}");
        let outcome = Outcome::Failed(reason.to_string());
        report(&error, version, &[], &outcome).await;
        return;
    }
    // The log is opened before any input is passed on, so no reply is missed.
    let log = match open_at_end(&target.log_path).await {
        Ok(log) => log,
        Err(e) => {
            let path = target.log_path.display();
            let outcome = Outcome::Failed(format!("reading the container's log {path}: {e}"));
            report(&error, version, &[], &outcome).await;
            return;
        }
    };
    let stop = CancellationToken::new();
    let output = tokio::spawn(follow(
        target.log_path.clone(),
        log,
        stdout,
        stderr.filter(|_| !options.stdio.tty),
        stop.clone(),
    ));
    let mut inputs = tokio::task::JoinSet::new();
    let carries_stdin = stdin.is_some() && target.stdin;
    if let (Some(rx), true) = (stdin, target.stdin) {
        let runtime = runtime.clone();
        let target = target.clone();
        inputs.spawn(async move {
            let fifo = runtime.attach_stdin(&target.container_id);
            match pipe::OpenOptions::new().read_write(true).open_sender(&fifo) {
                Ok(tx) => pump_in(rx, tx).await,
                Err(e) => warn!(container_id = target.container_id, error = %e, "opening a container's stdin"),
            }
            if target.stdin_once {
                close_stdin(&runtime, &target.container_id).await;
            }
        });
    }
    if let (Some(mut rx), true) = (resize, target.tty) {
        let runtime = runtime.clone();
        let id = id.to_string();
        inputs.spawn(async move {
            while let Some(size) = rx.recv().await {
                if let Err(e) = runtime.resize_container(&id, size.width, size.height).await {
                    debug!(error = %e, "resizing a container's terminal");
                }
            }
        });
    }
    tokio::pin!(gone);
    tokio::select! {
        waited = runtime.wait_container(id) => {
            debug!(container_id = id, ?waited, "the attached container exited");
            stop.cancel();
            let _ = tokio::time::timeout(OUTPUT_GRACE, output).await;
            inputs.abort_all();
            report(&error, version, &[], &Outcome::Exited(0)).await;
        }
        _ = &mut gone => {
            info!(container_id = id, "the attach client went away");
            output.abort();
            inputs.abort_all();
            if carries_stdin && target.stdin_once {
                close_stdin(runtime, id).await;
            }
        }
    }
}

async fn close_stdin(runtime: &Runtime, id: &str) {
    if let Err(e) = runtime.close_container_stdin(id).await {
        debug!(container_id = id, error = %e, "closing a container's stdin (stdinOnce)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_become_each_streams_bytes_with_partials_joined() {
        let mut r = Records::default();
        assert_eq!(
            r.push(b"2026-01-01T00:00:00Z stdout P / # \n2026-01-01T00:00:00Z stdout F ec"),
            [(Output::Stdout, b"/ # ".to_vec())]
        );
        assert_eq!(
            r.push(b"ho hi\r\n2026-01-01T00:00:00Z stdout F hi\r\n2026-01-01T00:00:01Z stderr F oops\n"),
            [
                (Output::Stdout, b"echo hi\r\nhi\r\n".to_vec()),
                (Output::Stderr, b"oops\n".to_vec())
            ]
        );
        assert_eq!(
            r.push(b"2026-01-01T00:00:02Z stdout F \n"),
            [(Output::Stdout, b"\n".to_vec())],
            "an empty line is a newline"
        );
        assert_eq!(r.push(b""), []);
    }
}
