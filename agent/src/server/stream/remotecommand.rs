//! The remote-command protocols (`channel.k8s.io` … `v5.channel.k8s.io`) independent of the
//! transport: the exec options of the request, protocol negotiation, how the outcome is
//! reported on the error channel per version, and the session that binds a set of channels
//! (stdin, stdout, stderr, error, resize) to a containerd exec. The SPDY and WebSocket glue
//! turn their streams or messages into these channels.
//!
//! Versions, as the kubelet serves them: v1 (`channel.k8s.io`) and v2 write a failure's
//! message as text on the error stream; v3 adds the resize stream (JSON `{"Width","Height"}`
//! objects); v4 reports every outcome as a JSON `metav1.Status`, a non-zero exit as reason
//! `NonZeroExitCode` with an `ExitCode` cause; v5 adds closing stdin (over WebSocket; over
//! SPDY the stdin stream's FIN already does it).

use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::runtime::{ExecStdio, Runtime};

pub const V1: &str = "channel.k8s.io";
pub const V2: &str = "v2.channel.k8s.io";
pub const V3: &str = "v3.channel.k8s.io";
pub const V4: &str = "v4.channel.k8s.io";
pub const V5: &str = "v5.channel.k8s.io";
/// What the SPDY path accepts, preferred first.
pub const SPDY_PROTOCOLS: &[&str] = &[V5, V4, V3, V2, V1];

/// How long output may still arrive after the process exited (a background child can hold
/// the pipe open forever).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// The protocol version, ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V1 = 1,
    V2,
    V3,
    V4,
    V5,
}

impl Version {
    /// The version a negotiated protocol name means ("" is a client that negotiated nothing:
    /// v1, as the kubelet falls back).
    pub fn of(protocol: &str) -> Option<Version> {
        let name = protocol.strip_prefix("base64.").unwrap_or(protocol);
        let name = match name.split_once(".base64.") {
            Some((v, rest)) => format!("{v}.{rest}"),
            None => name.to_string(),
        };
        Some(match name.as_str() {
            "" | V1 => Version::V1,
            V2 => Version::V2,
            V3 => Version::V3,
            V4 => Version::V4,
            V5 => Version::V5,
            _ => return None,
        })
    }

    /// Whether the client sends a resize stream.
    pub fn has_resize(self) -> bool {
        self >= Version::V3
    }
}

/// The first of the client's protocols the server accepts, in the client's order. The
/// header may repeat and each value may list several, comma-separated.
pub fn negotiate<'a, 's>(
    client: impl IntoIterator<Item = &'a str>,
    server: &[&'s str],
) -> Option<&'s str> {
    client
        .into_iter()
        .flat_map(|v| v.split(','))
        .find_map(|p| server.iter().copied().find(|s| *s == p.trim()))
}

/// What the request asks to run and connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub command: Vec<String>,
    pub stdio: ExecStdio,
}

/// The exec options of a query string (`command` repeated, `stdin`, `stdout`, `stderr`,
/// `tty` as "1" or "true").
pub fn options(query: &str) -> Result<Options, String> {
    let options = attach_options(query)?;
    if options.command.is_empty() {
        return Err("you must specify a command".into());
    }
    Ok(options)
}

/// The options of an attach: as exec's, without a command.
pub fn attach_options(query: &str) -> Result<Options, String> {
    let mut command = Vec::new();
    let mut stdio = ExecStdio::default();
    for (key, value) in form_urlencoded(query) {
        let on = value == "1" || value.eq_ignore_ascii_case("true");
        match key.as_str() {
            "command" => command.push(value),
            "stdin" | "input" => stdio.stdin = on,
            "stdout" | "output" => stdio.stdout = on,
            "stderr" | "error" => stdio.stderr = on,
            "tty" => stdio.tty = on,
            _ => {}
        }
    }
    // A terminal has one output stream, as the kubelet bypasses stderr with tty.
    if stdio.tty {
        stdio.stderr = false;
    }
    if !stdio.stdin && !stdio.stdout && !stdio.stderr {
        return Err("you must specify at least 1 of stdin, stdout, stderr".into());
    }
    Ok(Options { command, stdio })
}

/// Decoded `key=value` pairs of a query string.
pub fn form_urlencoded(query: &str) -> Vec<(String, String)> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let escaped = match bytes.get(i..i + 3) {
                Some([b'%', h, l]) => hex(*h).zip(hex(*l)).map(|(h, l)| h << 4 | l),
                _ => None,
            };
            match (escaped, bytes[i]) {
                (Some(b), _) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                (None, b'+') => out.push(b' '),
                (None, b) => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

/// How an exec ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    /// The exec could not be run.
    Failed(String),
}

/// What goes on the error stream for `outcome` under `version`; None: nothing (v1–v3
/// success).
pub fn error_message(version: Version, command: &[String], outcome: &Outcome) -> Option<Vec<u8>> {
    let status = match outcome {
        Outcome::Exited(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Outcome::Exited(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "command terminated with non-zero exit code: command '{}' exited with {code}",
                command.join(" ")
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Outcome::Failed(detail) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("Internal error occurred: error executing command in container: {detail}"),
            "reason": "InternalError",
            "details": {"causes": [{"message": format!("error executing command in container: {detail}")}]},
            "code": 500,
        }),
    };
    if version >= Version::V4 {
        return serde_json::to_vec(&status).ok();
    }
    match outcome {
        Outcome::Exited(0) => None,
        _ => status["message"].as_str().map(|m| m.as_bytes().to_vec()),
    }
}

/// Sends what `outcome` puts on the error channel under `version`, if anything.
pub async fn report(
    error: &mpsc::Sender<Vec<u8>>,
    version: Version,
    command: &[String],
    outcome: &Outcome,
) {
    if let Some(m) = error_message(version, command, outcome) {
        let _ = error.send(m).await;
    }
}

/// A terminal size from the resize stream.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct TermSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// Splits the resize stream's bytes into sizes; a partial object waits for more.
#[derive(Default)]
pub struct ResizeDecoder {
    pending: Vec<u8>,
}

impl ResizeDecoder {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<TermSize> {
        self.pending.extend_from_slice(bytes);
        let mut sizes = Vec::new();
        let mut consumed = 0;
        let mut iter = serde_json::Deserializer::from_slice(&self.pending).into_iter::<TermSize>();
        loop {
            match iter.next() {
                Some(Ok(size)) => {
                    sizes.push(size);
                    consumed = iter.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(_)) => {
                    // Garbage: drop it all, as nothing after it can be framed.
                    consumed = self.pending.len();
                    break;
                }
                None => {
                    consumed = self.pending.len();
                    break;
                }
            }
        }
        self.pending.drain(..consumed);
        sizes
    }
}

/// The channels of one session, in terms of chunks of bytes. A closed receiver is EOF; a
/// dropped sender closes that channel toward the client.
pub struct Channels {
    pub stdin: Option<mpsc::Receiver<Vec<u8>>>,
    pub resize: Option<mpsc::Receiver<TermSize>>,
    pub stdout: Option<mpsc::Sender<Vec<u8>>>,
    pub stderr: Option<mpsc::Sender<Vec<u8>>>,
    pub error: mpsc::Sender<Vec<u8>>,
}

/// What a session's channels are bound to.
#[derive(Clone, Debug)]
pub enum Action {
    /// A new process: `options.command` in the container.
    Exec { container_id: String },
    /// The container's own process.
    Attach(super::attach::Target),
}

/// Runs the session's action with the channels bound to it.
pub async fn serve(
    runtime: &Runtime,
    action: &Action,
    options: &Options,
    version: Version,
    channels: Channels,
    gone: impl std::future::Future<Output = ()>,
) {
    match action {
        Action::Exec { container_id } => {
            run(runtime, container_id, options, version, channels, gone).await
        }
        Action::Attach(target) => {
            super::attach::run(runtime, target, options, version, channels, gone).await
        }
    }
}

/// Runs `options.command` in the container with the channels bound to its stdio, and
/// reports the outcome on the error channel. If `gone` completes first (the client went
/// away) the process is killed. Either way the exec is deleted in containerd.
pub async fn run(
    runtime: &Runtime,
    container_id: &str,
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
    let started = runtime
        .exec_interactive(container_id, &options.command, options.stdio)
        .await;
    let exec = match started {
        Ok(exec) => exec,
        Err(e) => {
            info!(container_id, error = %e, "exec failed to start");
            let outcome = Outcome::Failed(e.to_string());
            report(&error, version, &options.command, &outcome).await;
            return;
        }
    };
    let control = exec.control.clone();
    debug!(container_id, exec_id = control.exec_id(), "exec started");
    let mut outputs = tokio::task::JoinSet::new();
    for (rx, tx) in [(exec.stdout, stdout), (exec.stderr, stderr)] {
        if let Some(rx) = rx {
            outputs.spawn(pump_out(rx, tx));
        }
    }
    let mut inputs = tokio::task::JoinSet::new();
    if let (Some(tx), Some(rx)) = (exec.stdin, stdin) {
        let control = control.clone();
        inputs.spawn(async move {
            pump_in(rx, tx).await;
            if let Err(e) = control.close_stdin().await {
                debug!(error = %e, "closing an exec's stdin");
            }
        });
    }
    if let Some(mut rx) = resize {
        let control = control.clone();
        inputs.spawn(async move {
            while let Some(size) = rx.recv().await {
                if let Err(e) = control.resize(size.width, size.height).await {
                    debug!(error = %e, "resizing an exec's terminal");
                }
            }
        });
    }
    tokio::pin!(gone);
    let outcome = tokio::select! {
        waited = control.wait() => match waited {
            Ok(code) => Outcome::Exited(code),
            Err(e) => Outcome::Failed(e.to_string()),
        },
        _ = &mut gone => {
            info!(container_id, exec_id = control.exec_id(), "the client went away: killing the exec");
            inputs.abort_all();
            outputs.abort_all();
            control.remove().await;
            return;
        }
    };
    // What the process wrote before it exited is sent before the outcome.
    let drained = tokio::time::timeout(OUTPUT_GRACE, async {
        while outputs.join_next().await.is_some() {}
    });
    let _ = drained.await;
    outputs.abort_all();
    inputs.abort_all();
    control.remove().await;
    debug!(container_id, ?outcome, "exec ended");
    report(&error, version, &options.command, &outcome).await;
}

/// Copies an output FIFO to its channel; without one (the client did not ask for it) the
/// output is read and dropped.
async fn pump_out(mut rx: pipe::Receiver, tx: Option<mpsc::Sender<Vec<u8>>>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Some(tx) = &tx {
                    // A client that closed the channel still lets the process write on.
                    let _ = tx.send(buf[..n].to_vec()).await;
                }
            }
        }
    }
}

pub(super) async fn pump_in(mut rx: mpsc::Receiver<Vec<u8>>, mut tx: pipe::Sender) {
    while let Some(chunk) = rx.recv().await {
        if tx.write_all(&chunk).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_negotiated_in_the_clients_order() {
        assert_eq!(negotiate([V4, V5], SPDY_PROTOCOLS), Some(V4));
        assert_eq!(
            negotiate(["v9.x, v3.channel.k8s.io"], SPDY_PROTOCOLS),
            Some(V3)
        );
        assert_eq!(negotiate(["portforward.k8s.io"], SPDY_PROTOCOLS), None);
        assert_eq!(Version::of(V1), Some(Version::V1));
        assert_eq!(Version::of(""), Some(Version::V1));
        assert_eq!(Version::of("v5.base64.channel.k8s.io"), Some(Version::V5));
        assert_eq!(Version::of("base64.channel.k8s.io"), Some(Version::V1));
        assert_eq!(Version::of("v6.channel.k8s.io"), None);
        assert!(!Version::V2.has_resize() && Version::V3.has_resize());
    }

    #[test]
    fn options_come_from_the_query_as_the_kubelet_reads_them() {
        let o =
            options("command=sh&command=-c&command=echo%20hi%3B+exit+3&stdin=1&stdout=1&stderr=1")
                .unwrap();
        assert_eq!(o.command, ["sh", "-c", "echo hi; exit 3"]);
        assert_eq!(
            o.stdio,
            ExecStdio {
                stdin: true,
                stdout: true,
                stderr: true,
                tty: false
            }
        );
        let o = options("command=sh&stdin=true&stdout=true&stderr=true&tty=true").unwrap();
        assert!(o.stdio.tty && !o.stdio.stderr, "tty bypasses stderr");
        assert_eq!(
            options("command=true").unwrap_err(),
            "you must specify at least 1 of stdin, stdout, stderr"
        );
        assert_eq!(
            options("stdout=1").unwrap_err(),
            "you must specify a command"
        );
        assert_eq!(
            attach_options("stdout=1").unwrap().command,
            Vec::<String>::new()
        );
        assert_eq!(
            form_urlencoded("a=%zz&b=%4"),
            [("a".into(), "%zz".into()), ("b".into(), "%4".into())]
        );
    }

    #[test]
    fn v4_reports_exit_codes_as_a_status_with_an_exit_code_cause() {
        let cmd = ["sh".to_string(), "-c".into(), "exit 3".into()];
        let status = |v, o| {
            serde_json::from_slice::<serde_json::Value>(&error_message(v, &cmd, &o).unwrap())
                .unwrap()
        };
        let failed = status(Version::V4, Outcome::Exited(3));
        assert_eq!(failed["status"], "Failure");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        let ok = status(Version::V5, Outcome::Exited(0));
        assert_eq!(ok, serde_json::json!({"metadata": {}, "status": "Success"}));
        let internal = status(Version::V4, Outcome::Failed("no such container".into()));
        assert_eq!(internal["reason"], "InternalError");
        assert_eq!(internal["code"], 500);
    }

    #[test]
    fn older_versions_write_only_a_failures_text() {
        let cmd = ["false".to_string()];
        assert_eq!(error_message(Version::V3, &cmd, &Outcome::Exited(0)), None);
        let text = error_message(Version::V2, &cmd, &Outcome::Exited(1)).unwrap();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "command terminated with non-zero exit code: command 'false' exited with 1"
        );
    }

    #[test]
    fn resize_messages_are_framed_across_chunks() {
        let mut d = ResizeDecoder::default();
        assert_eq!(d.push(br#"{"Width":80,"Hei"#), []);
        assert_eq!(
            d.push(b"ght\":24}\n{\"Width\":100,\"Height\":40}"),
            [
                TermSize {
                    width: 80,
                    height: 24
                },
                TermSize {
                    width: 100,
                    height: 40
                }
            ]
        );
        assert_eq!(d.push(b"garbage"), []);
        assert_eq!(
            d.push(br#"{"Width":1,"Height":2}"#),
            [TermSize {
                width: 1,
                height: 2
            }]
        );
    }
}
