//! Running a command in a container (exec probes, hooks): a process spec derived from the
//! container's own spec, stdout/stderr through FIFOs the agent creates under its root dir,
//! a bounded wait, and DeleteProcess whatever happened. Also the `probe::Exec` impl.

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::{
    DeleteProcessRequest, ExecProcessRequest, KillRequest, StartRequest, WaitRequest,
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

/// The exec's process spec: the container's process with other args and no terminal.
pub fn exec_process(container_spec: &[u8], args: &[String]) -> Result<Vec<u8>, String> {
    let spec: serde_json::Value =
        serde_json::from_slice(container_spec).map_err(|e| format!("container spec: {e}"))?;
    let mut process = spec
        .get("process")
        .cloned()
        .ok_or("container spec has no process")?;
    let obj = process.as_object_mut().ok_or("process is not an object")?;
    obj.insert("args".into(), serde_json::json!(args));
    obj.insert("terminal".into(), serde_json::Value::Bool(false));
    obj.remove("consoleSize");
    serde_json::to_vec(&process).map_err(|e| e.to_string())
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
    /// Runs `args` in the container; past `timeout` the process is killed and ExecTimeout returned.
    pub async fn exec(&self, id: &str, args: &[String], timeout: Duration) -> Result<ExecOutput> {
        let container = self.container(id).await?;
        let spec = container.spec.map(|a| a.value).unwrap_or_default();
        let process = exec_process(&spec, args).map_err(|detail| RuntimeError::Spec {
            id: id.to_string(),
            detail,
        })?;

        let exec_id = format!("exec-{:016x}", rand::random::<u64>());
        let dir = self.inner.config.root_dir.join("exec").join(&exec_id);
        tokio::fs::create_dir_all(&dir).await?;
        let dir = FifoDir(dir);
        let (out_path, err_path) = (dir.0.join("stdout"), dir.0.join("stderr"));
        make_fifo(&out_path)?;
        make_fifo(&err_path)?;
        // Opened now (non-blocking), read only once Start returned: by then the shim holds the
        // write ends, so EOF means the process's output is complete.
        let out_rx = pipe::OpenOptions::new().open_receiver(&out_path)?;
        let err_rx = pipe::OpenOptions::new().open_receiver(&err_path)?;

        self.tasks()
            .exec(ExecProcessRequest {
                container_id: id.to_string(),
                stdin: String::new(),
                stdout: out_path.to_string_lossy().into_owned(),
                stderr: err_path.to_string_lossy().into_owned(),
                terminal: false,
                spec: Some(prost_types::Any {
                    type_url: PROCESS_TYPE_URL.into(),
                    value: process,
                }),
                exec_id: exec_id.clone(),
            })
            .await
            .map_err(|s| self.not_found_or(id, "tasks.Exec", s))?;
        let res = self.run_exec(id, &exec_id, out_rx, err_rx, timeout).await;
        let mut tasks = self.tasks();
        let delete = tasks.delete_process(DeleteProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.clone(),
        });
        match tokio::time::timeout(GRACE, delete).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => {}
            Ok(Err(s)) => {
                tracing::warn!(container_id = id, exec_id, status = %s, "DeleteProcess failed")
            }
            Err(_) => tracing::warn!(container_id = id, exec_id, "DeleteProcess timed out"),
        }
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
        let p = exec_process(spec, &["cat".into(), "/etc/hostname".into()]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["args"], serde_json::json!(["cat", "/etc/hostname"]));
        assert_eq!(v["terminal"], false);
        assert!(v.get("consoleSize").is_none());
        assert_eq!(v["user"]["uid"], 1000);
        assert_eq!(v["cwd"], "/app");
        assert_eq!(v["env"], serde_json::json!(["A=1"]));
        assert!(exec_process(b"{}", &[]).is_err());
    }
}
