//! Running a command in a container: a process spec derived from the container's own spec,
//! stdio through FIFOs the agent creates under its root dir, and DeleteProcess whatever
//! happened. `exec` runs one to its end with a bounded wait (probes, hooks; also the
//! `probe::Exec` impl); `exec_interactive` hands out the stdio pipes of a running exec with
//! stdin, a TTY and resize for streaming sessions (`kubectl exec`), whose owner ends it
//! with `ExecControl::remove`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::{
    CloseIoRequest, DeleteProcessRequest, ExecProcessRequest, KillRequest, ResizePtyRequest,
    StartRequest, WaitRequest,
};
use futures::future::BoxFuture;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use super::{grpc, ExecOutput, Result, Runtime, RuntimeError};

/// Type URL containerd registers for an OCI process spec.
const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// At most this much of each stream is kept.
const MAX_OUTPUT: usize = 1 << 20;
/// How long to wait for output to drain, a killed process to exit, or DeleteProcess.
const GRACE: Duration = Duration::from_secs(10);

/// The exec's process spec: the container's process with other args, on a terminal or not.
pub fn exec_process(
    container_spec: &[u8],
    args: &[String],
    terminal: bool,
) -> Result<Vec<u8>, String> {
    let spec: serde_json::Value =
        serde_json::from_slice(container_spec).map_err(|e| format!("container spec: {e}"))?;
    let mut process = spec
        .get("process")
        .cloned()
        .ok_or("container spec has no process")?;
    let obj = process.as_object_mut().ok_or("process is not an object")?;
    obj.insert("args".into(), serde_json::json!(args));
    obj.insert("terminal".into(), serde_json::Value::Bool(terminal));
    obj.remove("consoleSize");
    serde_json::to_vec(&process).map_err(|e| e.to_string())
}

/// The Exec request for `process`, its stdio at the FIFO paths [stdin, stdout, stderr]
/// ("" for none).
fn exec_request(
    id: &str,
    exec_id: &str,
    [stdin, stdout, stderr]: [String; 3],
    terminal: bool,
    process: Vec<u8>,
) -> ExecProcessRequest {
    ExecProcessRequest {
        container_id: id.to_string(),
        stdin,
        stdout,
        stderr,
        terminal,
        spec: Some(prost_types::Any {
            type_url: PROCESS_TYPE_URL.into(),
            value: process,
        }),
        exec_id: exec_id.to_string(),
    }
}

/// Reads a FIFO to its end, keeping at most MAX_OUTPUT bytes.
async fn drain(mut rx: pipe::Receiver) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    out
}

/// Removes the FIFO directory when dropped.
struct FifoDir(PathBuf);

impl Drop for FifoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn make_fifo(path: &Path) -> std::io::Result<()> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(std::io::Error::from)
}

impl Runtime {
    /// The process of an exec of `args` in container `id`, a fresh exec id, and the exec's FIFO
    /// directory (made).
    async fn prepare_exec(
        &self,
        id: &str,
        args: &[String],
        tty: bool,
    ) -> Result<(Vec<u8>, String, PathBuf)> {
        let container = self.container(id).await?;
        let spec = container.spec.map(|a| a.value).unwrap_or_default();
        let process = exec_process(&spec, args, tty).map_err(|detail| RuntimeError::Spec {
            id: id.to_string(),
            detail,
        })?;
        let exec_id = format!("exec-{:016x}", rand::random::<u64>());
        let dir = self.inner.config.root_dir.join("exec").join(&exec_id);
        tokio::fs::create_dir_all(&dir).await?;
        Ok((process, exec_id, dir))
    }

    /// Runs `args` in the container; past `timeout` the process is killed and ExecTimeout returned.
    pub async fn exec(&self, id: &str, args: &[String], timeout: Duration) -> Result<ExecOutput> {
        let (process, exec_id, dir) = self.prepare_exec(id, args, false).await?;
        let dir = FifoDir(dir);
        let (out_path, err_path) = (dir.0.join("stdout"), dir.0.join("stderr"));
        make_fifo(&out_path)?;
        make_fifo(&err_path)?;
        // Opened now (non-blocking), read only once Start returned: by then the shim holds the
        // write ends, so EOF means the process's output is complete.
        let out_rx = pipe::OpenOptions::new().open_receiver(&out_path)?;
        let err_rx = pipe::OpenOptions::new().open_receiver(&err_path)?;

        self.tasks()
            .exec(exec_request(
                id,
                &exec_id,
                [
                    String::new(),
                    out_path.to_string_lossy().into_owned(),
                    err_path.to_string_lossy().into_owned(),
                ],
                false,
                process,
            ))
            .await
            .map_err(|s| self.not_found_or(id, "tasks.Exec", s))?;
        let res = self.run_exec(id, &exec_id, out_rx, err_rx, timeout).await;
        self.delete_process(id, &exec_id).await;
        drop(dir);
        res
    }

    async fn run_exec(
        &self,
        id: &str,
        exec_id: &str,
        out_rx: pipe::Receiver,
        err_rx: pipe::Receiver,
        timeout: Duration,
    ) -> Result<ExecOutput> {
        self.tasks()
            .start(StartRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            })
            .await
            .map_err(|s| self.not_found_or(id, "tasks.Start", s))?;
        let stdout = tokio::spawn(drain(out_rx));
        let stderr = tokio::spawn(drain(err_rx));
        let wait = || {
            let mut tasks = self.tasks();
            let req = WaitRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            };
            async move { tasks.wait(req).await }
        };
        let waited = tokio::time::timeout(timeout, wait()).await;
        let exit_code = match waited {
            Ok(r) => r.map_err(grpc("tasks.Wait"))?.into_inner().exit_status as i32,
            Err(_) => {
                let _ = self
                    .tasks()
                    .kill(KillRequest {
                        container_id: id.to_string(),
                        exec_id: exec_id.to_string(),
                        signal: libc::SIGKILL as u32,
                        all: false,
                    })
                    .await;
                let _ = tokio::time::timeout(GRACE, wait()).await;
                stdout.abort();
                stderr.abort();
                return Err(RuntimeError::ExecTimeout {
                    id: id.to_string(),
                    timeout,
                });
            }
        };
        let collect = |h: tokio::task::JoinHandle<Vec<u8>>| async move {
            let abort = h.abort_handle();
            match tokio::time::timeout(GRACE, h).await {
                Ok(Ok(v)) => v,
                _ => {
                    abort.abort();
                    Vec::new()
                }
            }
        };
        let (stdout, stderr) = tokio::join!(collect(stdout), collect(stderr));
        Ok(ExecOutput {
            exit_code,
            stdout,
            stderr,
        })
    }
}

/// Which stdio an interactive exec connects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecStdio {
    pub stdin: bool,
    pub stdout: bool,
    /// Ignored with `tty`: a terminal has one output.
    pub stderr: bool,
    pub tty: bool,
}

/// A started interactive exec: the agent's ends of its stdio FIFOs, and its control.
/// stdout is always there, stderr whenever there is no terminal: read them even if unwanted,
/// or the process blocks once a pipe is full.
pub struct ExecStreams {
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    pub control: ExecControl,
}

/// Resize, stdin EOF, wait, kill and removal of one interactive exec.
#[derive(Clone)]
pub struct ExecControl {
    runtime: Runtime,
    container_id: String,
    exec_id: String,
    dir: PathBuf,
}

impl ExecControl {
    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }

    /// Sets the terminal's size.
    pub async fn resize(&self, width: u16, height: u16) -> Result<()> {
        self.runtime
            .tasks()
            .resize_pty(ResizePtyRequest {
                container_id: self.container_id.clone(),
                exec_id: self.exec_id.clone(),
                width: width as u32,
                height: height as u32,
            })
            .await
            .map_err(grpc("tasks.ResizePty"))?;
        Ok(())
    }

    /// Delivers EOF on the process's stdin (the shim holds the FIFO open until told).
    pub async fn close_stdin(&self) -> Result<()> {
        self.runtime
            .tasks()
            .close_io(CloseIoRequest {
                container_id: self.container_id.clone(),
                exec_id: self.exec_id.clone(),
                stdin: true,
            })
            .await
            .map_err(grpc("tasks.CloseIO"))?;
        Ok(())
    }

    /// The exit code, once the process exited.
    pub async fn wait(&self) -> Result<i32> {
        let waited = self
            .runtime
            .tasks()
            .wait(WaitRequest {
                container_id: self.container_id.clone(),
                exec_id: self.exec_id.clone(),
            })
            .await
            .map_err(grpc("tasks.Wait"))?;
        Ok(waited.into_inner().exit_status as i32)
    }

    /// SIGKILL to the exec's process (not the container's).
    pub async fn kill(&self) {
        let killed = self
            .runtime
            .tasks()
            .kill(KillRequest {
                container_id: self.container_id.clone(),
                exec_id: self.exec_id.clone(),
                signal: libc::SIGKILL as u32,
                all: false,
            })
            .await;
        if let Err(s) = killed {
            tracing::debug!(container_id = self.container_id, exec_id = self.exec_id, status = %s, "killing an exec");
        }
    }

    /// Kills the process if it still runs, waits for it, deletes it in containerd and removes
    /// its FIFOs: nothing of the exec is left.
    pub async fn remove(&self) {
        self.kill().await;
        let _ = tokio::time::timeout(GRACE, self.wait()).await;
        self.runtime
            .delete_process(&self.container_id, &self.exec_id)
            .await;
        let _ = tokio::fs::remove_dir_all(&self.dir).await;
    }
}

impl Runtime {
    /// Starts `args` in the container with the stdio asked for, and returns at once.
    /// The caller must end it with `ExecControl::remove`.
    pub async fn exec_interactive(
        &self,
        id: &str,
        args: &[String],
        stdio: ExecStdio,
    ) -> Result<ExecStreams> {
        let (process, exec_id, dir) = self.prepare_exec(id, args, stdio.tty).await?;
        let control = ExecControl {
            runtime: self.clone(),
            container_id: id.to_string(),
            exec_id: exec_id.clone(),
            dir: dir.clone(),
        };
        let fifo = |name: &str, wanted: bool| -> std::io::Result<Option<PathBuf>> {
            if !wanted {
                return Ok(None);
            }
            let path = dir.join(name);
            make_fifo(&path)?;
            Ok(Some(path))
        };
        let opened = (|| {
            let stdin_path = fifo("stdin", stdio.stdin)?;
            // The shim opens every output path it is given and fails on an empty one, so
            // outputs nobody asked for get a FIFO too (the caller drains them).
            let stdout_path = fifo("stdout", true)?;
            let stderr_path = fifo("stderr", !stdio.tty)?;
            // Read-write, so opening does not wait for the shim to open the other end.
            let stdin = stdin_path
                .as_ref()
                .map(|p| pipe::OpenOptions::new().read_write(true).open_sender(p))
                .transpose()?;
            let receiver = |p: &Option<PathBuf>| {
                p.as_ref()
                    .map(|p| pipe::OpenOptions::new().open_receiver(p))
                    .transpose()
            };
            let stdout = receiver(&stdout_path)?;
            let stderr = receiver(&stderr_path)?;
            let path = |p: &Option<PathBuf>| {
                p.as_ref()
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default()
            };
            let paths = [path(&stdin_path), path(&stdout_path), path(&stderr_path)];
            std::io::Result::Ok((stdin, stdout, stderr, paths))
        })();
        let (stdin, stdout, stderr, [stdin_path, stdout_path, stderr_path]) = match opened {
            Ok(o) => o,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(e.into());
            }
        };
        let started = async {
            self.tasks()
                .exec(exec_request(
                    id,
                    &exec_id,
                    [stdin_path, stdout_path, stderr_path],
                    stdio.tty,
                    process,
                ))
                .await
                .map_err(|s| self.not_found_or(id, "tasks.Exec", s))?;
            self.tasks()
                .start(StartRequest {
                    container_id: id.to_string(),
                    exec_id: exec_id.clone(),
                })
                .await
                .map_err(|s| self.not_found_or(id, "tasks.Start", s))
        };
        if let Err(e) = started.await {
            control.remove().await;
            return Err(e);
        }
        Ok(ExecStreams {
            stdin,
            stdout,
            stderr,
            control,
        })
    }

    /// DeleteProcess, bounded; a process already gone is fine.
    async fn delete_process(&self, id: &str, exec_id: &str) {
        let mut tasks = self.tasks();
        let delete = tasks.delete_process(DeleteProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        });
        match tokio::time::timeout(GRACE, delete).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => {}
            Ok(Err(s)) => {
                tracing::warn!(container_id = id, exec_id, status = %s, "DeleteProcess failed")
            }
            Err(_) => tracing::warn!(container_id = id, exec_id, "DeleteProcess timed out"),
        }
    }
}

impl crate::probe::Exec for Runtime {
    fn exec(
        &self,
        container_id: &str,
        command: &[String],
        timeout: Duration,
    ) -> BoxFuture<'static, std::result::Result<(i32, Vec<u8>), crate::probe::ExecError>> {
        let rt = self.clone();
        let id = container_id.to_string();
        let command = command.to_vec();
        Box::pin(async move {
            let out = Runtime::exec(&rt, &id, &command, timeout)
                .await
                .map_err(|e| match e {
                    RuntimeError::ExecTimeout { .. } => {
                        crate::probe::ExecError::Failed(e.to_string())
                    }
                    e => crate::probe::ExecError::Errored(e.to_string()),
                })?;
            let mut combined = out.stdout;
            combined.extend_from_slice(&out.stderr);
            Ok((out.exit_code, combined))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_spec_is_derived_from_the_container() {
        let spec = br#"{"ociVersion":"1.0.2","process":{"terminal":true,"consoleSize":{"height":1,"width":2},
            "user":{"uid":1000,"gid":1000},"args":["sleep","1"],"env":["A=1"],"cwd":"/app"}}"#;
        let p = exec_process(spec, &["cat".into(), "/etc/hostname".into()], false).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["args"], serde_json::json!(["cat", "/etc/hostname"]));
        assert_eq!(v["terminal"], false);
        assert!(v.get("consoleSize").is_none());
        assert_eq!(v["user"]["uid"], 1000);
        assert_eq!(v["cwd"], "/app");
        assert_eq!(v["env"], serde_json::json!(["A=1"]));
        assert!(exec_process(b"{}", &[], false).is_err());
        let p = exec_process(spec, &["sh".into()], true).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(
            v["terminal"], true,
            "an interactive TTY exec gets a terminal"
        );
    }
}
