//! What `kubectl attach` needs of a running container's own process: its stdin FIFO, its
//! terminal's size, closing its stdin (`stdinOnce`) and waiting for it to exit.
//!
//! Output is not here: the container's stdout and stderr belong to the log driver, and attach
//! follows the log file it writes. Stdin: containerd's shim connects a task's stdin FIFO only
//! for a terminal when the output goes to a logging binary (its binary IO has no stdin), so
//! every container with `tty: true` is created with a FIFO at `stdin_fifo(id)` that the shim
//! copies into the terminal; the shim holds it open, so an attach that goes away is no EOF.

use std::path::{Path, PathBuf};

use containerd_client::services::v1::{CloseIoRequest, ResizePtyRequest, WaitRequest};

use super::{grpc, Result, Runtime};

/// The directory of the containers' stdin FIFOs under the agent's root dir.
const DIR: &str = "attach";

/// The stdin FIFO of container `id` under `root_dir`.
pub fn stdin_fifo(root_dir: &Path, id: &str) -> PathBuf {
    root_dir.join(DIR).join(format!("{id}.stdin"))
}

impl Runtime {
    /// The stdin FIFO of a container created with a terminal.
    pub fn attach_stdin(&self, id: &str) -> PathBuf {
        stdin_fifo(&self.inner.config.root_dir, id)
    }

    /// Makes the stdin FIFO of container `id` (again, if one was left behind).
    pub(super) async fn make_stdin_fifo(&self, id: &str) -> std::io::Result<PathBuf> {
        let path = self.attach_stdin(id);
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let _ = tokio::fs::remove_file(&path).await;
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        Ok(path)
    }

    /// Removes the stdin FIFO of container `id`, if it has one.
    pub(super) async fn remove_stdin_fifo(&self, id: &str) {
        let _ = tokio::fs::remove_file(self.attach_stdin(id)).await;
    }

    /// Sets the size of the terminal of container `id`'s own process.
    pub async fn resize_container(&self, id: &str, width: u16, height: u16) -> Result<()> {
        self.tasks()
            .resize_pty(ResizePtyRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                width: width as u32,
                height: height as u32,
            })
            .await
            .map_err(grpc("tasks.ResizePty"))?;
        Ok(())
    }

    /// Closes the stdin of container `id`'s own process (the shim's hold on the FIFO): once
    /// no attach writes to it either, the process reads EOF (on a terminal: a hangup).
    pub async fn close_container_stdin(&self, id: &str) -> Result<()> {
        self.tasks()
            .close_io(CloseIoRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                stdin: true,
            })
            .await
            .map_err(grpc("tasks.CloseIO"))?;
        Ok(())
    }

    /// Completes with the exit code once container `id`'s own process exited.
    pub async fn wait_container(&self, id: &str) -> Result<i32> {
        let waited = self
            .tasks()
            .wait(WaitRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            })
            .await
            .map_err(grpc("tasks.Wait"))?;
        Ok(waited.into_inner().exit_status as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_container_has_its_own_fifo_under_the_root_dir() {
        assert_eq!(
            stdin_fifo(Path::new("/var/lib/nodelet"), "abc-main-0"),
            Path::new("/var/lib/nodelet/attach/abc-main-0.stdin")
        );
    }
}
