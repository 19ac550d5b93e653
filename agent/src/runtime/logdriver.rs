//! `nodelet log-driver <log path>`: the logging binary containerd's shim starts for every
//! container (the `binary://` stdio URI). The shim hands over the container's stdout on fd 3,
//! its stderr on fd 4 and a ready pipe on fd 5, which is closed once the driver is ready.
//! Each line is appended to the log file in the CRI format
//! `<RFC3339Nano> <stdout|stderr> <F|P> <text>`, lines over 16 KiB split into partial (`P`)
//! chunks. The file is reopened when it is moved or removed (rotation) and after write errors;
//! the driver never stops draining the pipes, so the container never blocks on its output.
//! It runs while the agent is down: plain threads, no async runtime.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest line written whole; longer ones are split into `P` chunks.
pub const MAX_LINE: usize = 16 * 1024;
const STDOUT_FD: i32 = 3;
const STDERR_FD: i32 = 4;
const READY_FD: i32 = 5;
/// How often the log path is checked for rotation.
const RECHECK: Duration = Duration::from_secs(1);

/// Why the log driver could not run.
#[derive(Debug, thiserror::Error)]
pub enum LogDriverError {
    /// The arguments are not `[log-driver] <log path>`.
    #[error("usage: nodelet log-driver <log path>")]
    Usage,
    /// A file descriptor handed over by the shim could not be opened.
    #[error("fd {fd}: {source}")]
    Fd { fd: i32, source: io::Error },
}

/// Runs the log driver until both streams end. `args` are the arguments after the program
/// name (a leading `log-driver` is skipped): the log file path.
pub fn run_log_driver(args: &[String]) -> Result<(), LogDriverError> {
    let args = match args.first().map(String::as_str) {
        Some("log-driver") => &args[1..],
        _ => args,
    };
    let [path] = args else {
        return Err(LogDriverError::Usage);
    };
    // The shim sends SIGTERM after closing its pipe ends; blocking it lets the threads drain
    // what is still buffered and exit on EOF instead of dying mid-line.
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    let _ = set.thread_block();

    let open_fd = |fd: i32| {
        let f = File::open(format!("/proc/self/fd/{fd}"))
            .map_err(|source| LogDriverError::Fd { fd, source })?;
        // The reopened descriptor is ours; the inherited one is closed.
        let _ = nix::unistd::close(fd);
        Ok::<_, LogDriverError>(f)
    };
    let stdout = open_fd(STDOUT_FD)?;
    let stderr = open_fd(STDERR_FD)?;
    let log = Arc::new(Mutex::new(LogFile::new(PathBuf::from(path))));
    log.lock().expect("poisoned").ensure_open();
    // Ready: closing our only copy of the pipe's write end wakes the shim.
    let _ = nix::unistd::close(READY_FD);

    let threads: Vec<_> = [(stdout, "stdout"), (stderr, "stderr")]
        .into_iter()
        .map(|(input, stream)| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                copy_lines(input, stream, MAX_LINE, |line| {
                    log.lock().expect("poisoned").write(line)
                })
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// The current time as RFC 3339 with nanoseconds, in UTC.
fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S.%NZ")
        .to_string()
}

/// Formats one CRI log record.
pub fn format_record(time: &str, stream: &str, partial: bool, text: &[u8]) -> Vec<u8> {
    let tag = if partial { "P" } else { "F" };
    let mut out = Vec::with_capacity(time.len() + stream.len() + text.len() + 5);
    out.extend_from_slice(time.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_bytes());
    out.push(b' ');
    out.extend_from_slice(tag.as_bytes());
    out.push(b' ');
    out.extend_from_slice(text);
    out.push(b'\n');
    out
}

/// Reads `input` to its end and emits one record per line (without `\n` or `\r\n`), lines
/// longer than `max` as `P` chunks of `max` bytes followed by the `F` rest.
pub fn copy_lines(input: impl Read, stream: &str, max: usize, mut emit: impl FnMut(&[u8])) {
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let mut line: Vec<u8> = Vec::with_capacity(max);
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if buf.is_empty() {
            break;
        }
        let room = max - line.len();
        let window = &buf[..buf.len().min(room)];
        match window.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&window[..i]);
                reader.consume(i + 1);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                emit(&format_record(&now(), stream, false, &line));
                line.clear();
            }
            None => {
                let n = window.len();
                line.extend_from_slice(window);
                reader.consume(n);
                if line.len() >= max {
                    emit(&format_record(&now(), stream, true, &line));
                    line.clear();
                }
            }
        }
    }
    if !line.is_empty() {
        emit(&format_record(&now(), stream, false, &line));
    }
}

/// The log file, reopened on rotation or after errors.
struct LogFile {
    path: PathBuf,
    file: Option<File>,
    /// (dev, ino) of the open file.
    id: Option<(u64, u64)>,
    checked: Instant,
}

impl LogFile {
    fn new(path: PathBuf) -> Self {
        LogFile {
            path,
            file: None,
            id: None,
            checked: Instant::now(),
        }
    }

    fn open(path: &Path) -> io::Result<File> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
    }

    fn ensure_open(&mut self) {
        if self.file.is_some() {
            return;
        }
        if let Ok(f) = Self::open(&self.path) {
            self.id = f.metadata().ok().map(|m| (m.dev(), m.ino()));
            self.file = Some(f);
        }
        self.checked = Instant::now();
    }

    /// Drops the open file if the path now names another file (or none).
    fn check_rotation(&mut self) {
        if self.checked.elapsed() < RECHECK {
            return;
        }
        self.checked = Instant::now();
        let current = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if current.is_none() || current != self.id {
            self.file = None;
        }
    }

    fn write(&mut self, record: &[u8]) {
        self.check_rotation();
        for _ in 0..2 {
            self.ensure_open();
            let Some(f) = self.file.as_mut() else {
                return;
            };
            if f.write_all(record).is_ok() {
                return;
            }
            self.file = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(input: &[u8], max: usize) -> Vec<String> {
        let mut out = Vec::new();
        copy_lines(input, "stdout", max, |r| {
            out.push(String::from_utf8(r.to_vec()).unwrap())
        });
        out
    }

    fn tail(record: &str) -> &str {
        // "<time> stdout F text\n" → "F text\n"
        record.splitn(3, ' ').nth(2).unwrap()
    }

    #[test]
    fn lines_become_full_records() {
        let r = records(b"hi\r\nthere\n\nlast", 16);
        let tails: Vec<&str> = r.iter().map(|s| tail(s)).collect();
        assert_eq!(tails, ["F hi\n", "F there\n", "F \n", "F last\n"]);
        assert!(r[0].contains(" stdout F "));
    }

    #[test]
    fn long_lines_are_split_into_partials() {
        let r = records(b"0123456789abcdefXYZ\n0123456789abcdef\n", 8);
        let tails: Vec<&str> = r.iter().map(|s| tail(s)).collect();
        assert_eq!(
            tails,
            [
                "P 01234567\n",
                "P 89abcdef\n",
                "F XYZ\n",
                "P 01234567\n",
                "P 89abcdef\n",
                "F \n"
            ]
        );
    }

    #[test]
    fn timestamps_are_rfc3339_nano_utc() {
        let t = now();
        assert_eq!(t.len(), "2026-12-01T15:00:00.123456789Z".len(), "{t}");
        assert!(t.ends_with('Z'));
        assert!(t.parse::<jiff::Timestamp>().is_ok());
    }

    #[test]
    fn rotation_reopens_the_path() {
        let dir = std::env::temp_dir().join(format!("nodelet-logdriver-{}", std::process::id()));
        let path = dir.join("sub/0.log");
        let mut log = LogFile::new(path.clone());
        log.write(b"one\n");
        std::fs::rename(&path, dir.join("sub/0.log.1")).unwrap();
        log.checked = Instant::now() - RECHECK;
        log.write(b"two\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
        assert_eq!(
            std::fs::read_to_string(dir.join("sub/0.log.1")).unwrap(),
            "one\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn usage_errors() {
        assert!(matches!(run_log_driver(&[]), Err(LogDriverError::Usage)));
        assert!(matches!(
            run_log_driver(&["log-driver".into()]),
            Err(LogDriverError::Usage)
        ));
        assert!(matches!(
            run_log_driver(&["a".into(), "b".into()]),
            Err(LogDriverError::Usage)
        ));
    }
}
