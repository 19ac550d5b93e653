//! The logging binary containerd's shim starts for every container (the `binary://` stdio
//! URI): `nodelet-log-driver log-driver <log path> [max-size <bytes>] [max-files <n>]` (the
//! shim passes each query key and its value as two arguments, in no fixed order). The shim
//! hands over the container's stdout on fd 3, its stderr on fd 4 and a ready pipe on fd 5,
//! which is closed once the driver is ready.
//!
//! Each line is appended to the log file in the CRI format
//! `<RFC3339Nano> <stdout|stderr> <F|P> <text>`, lines over 16 KiB split into partial (`P`)
//! chunks. A line still unterminated when the pipe has nothing more to read is written at once
//! as a partial (`P`) record, its rest follows in later records (containerd's CRI writes the
//! unterminated last line the same way): the shim keeps the pipe open until the task is
//! deleted, so waiting for the newline or EOF would hide a last `echo -n` from the logs and
//! from FallbackToLogsOnError. The file is reopened when it is moved or removed (rotation by
//! someone else) and after write errors; with `max-size` the driver rotates it itself as the
//! kubelet's container log manager does (`<path>.<YYYYMMDD-hhmmss>`, at most `max-files`
//! files counting the live one; rotated files are not compressed). The driver never stops
//! draining the pipes, so the container never blocks on its output, and it runs on while the
//! agent is down or restarting.
//!
//! One of these runs per container, so its memory is what counts, and this crate is written
//! for that: std only, no dependencies (every dependency's data is paid again per process),
//! which is why the timestamp is formatted here and `poll`, `signal` and `fcntl` are
//! declared by hand in [`sys`]. The agent's build links `src/main.rs` statically, not
//! position-independent, without unwinding, with the data start-up writes gathered onto few
//! pages (`agent/build.rs`, `layout.ld`): no dynamic loader, no relocated pages. One thread
//! polls both pipes (no second stack, no second malloc arena); each stream owns one buffer of
//! one maximal line, a zeroed static that `read` fills in place (its pages are touched only
//! as far as output arrives), and each record goes out with one `writev`, never copied. The
//! driver allocates nothing on its way (arguments borrowed, poll sets on the stack; only
//! rotation and errors do), so the heap holds only what glibc's start-up put there. A driver
//! started by the shim holds about 42 KiB of its own (private dirty: 24 KiB of data,
//! the heap's 8 KiB, a stack of 8 to 12 KiB) and shares its 0.9 MiB of text with the
//! others.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::ops::DerefMut;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest line written whole; longer ones are split into `P` chunks.
pub const MAX_LINE: usize = 16 * 1024;
/// The query key (and so the first argument) that names the log file.
pub const PATH_KEY: &str = "log-driver";
/// The query key for the size at which the driver rotates the file.
pub const MAX_SIZE_KEY: &str = "max-size";
/// The query key for how many files (the live one included) rotation keeps.
pub const MAX_FILES_KEY: &str = "max-files";
const STDOUT_FD: i32 = 3;
const STDERR_FD: i32 = 4;
const READY_FD: i32 = 5;
/// How often the log path is checked for rotation by someone else.
const RECHECK: Duration = Duration::from_secs(1);
/// Room for `<time> <stream> <tag> `.
const HEADER: usize = 48;

/// Why the log driver could not run.
#[derive(Debug)]
pub enum LogDriverError {
    /// The arguments are not `log-driver <path>` plus optional `max-size`/`max-files` pairs.
    Usage(String),
    /// A file descriptor the shim should have handed over is not open.
    Fd {
        /// The descriptor number (3 stdout, 4 stderr).
        fd: i32,
        /// Why it could not be used.
        source: io::Error,
    },
}

impl fmt::Display for LogDriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogDriverError::Usage(got) => write!(
                f,
                "usage: nodelet-log-driver log-driver <log path> [max-size <bytes>] \
                 [max-files <n>] (got {got})"
            ),
            LogDriverError::Fd { fd, source } => write!(f, "fd {fd}: {source}"),
        }
    }
}

impl std::error::Error for LogDriverError {}

/// What the arguments ask for (borrowed from them: the driver allocates nothing on its way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options<'a> {
    /// The log file.
    pub path: &'a Path,
    /// Rotate once the file would grow past this many bytes.
    pub max_size: Option<u64>,
    /// Files kept by rotation, the live one included (at least 2).
    pub max_files: usize,
}

/// Parses the arguments after the program name: key/value pairs in any order (the shim
/// iterates a map).
pub fn parse_args<S: AsRef<str> + fmt::Debug>(args: &[S]) -> Result<Options<'_>, LogDriverError> {
    let usage = || LogDriverError::Usage(format!("{args:?}"));
    let (mut path, mut max_size, mut max_files) = (None, None, 5usize);
    let mut pairs = args.chunks_exact(2);
    for pair in &mut pairs {
        let value = pair[1].as_ref();
        match pair[0].as_ref() {
            PATH_KEY => path = Some(Path::new(value)),
            MAX_SIZE_KEY => max_size = Some(value.parse::<u64>().map_err(|_| usage())?),
            MAX_FILES_KEY => max_files = value.parse().map_err(|_| usage())?,
            _ => return Err(usage()),
        }
    }
    match (path, pairs.remainder()) {
        (Some(path), []) => Ok(Options {
            path,
            max_size: max_size.filter(|&s| s > 0),
            max_files: max_files.max(2),
        }),
        _ => Err(usage()),
    }
}

/// The program: parses `args` (after the program name), runs, and reports an error on
/// stderr (the shim passes it on to containerd's log).
pub fn main_with_args<S: AsRef<str> + fmt::Debug>(args: &[S]) -> std::process::ExitCode {
    match parse_args(args).and_then(run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodelet-log-driver: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the log driver on the shim's descriptors until both streams end.
pub fn run(options: Options<'_>) -> Result<(), LogDriverError> {
    // The shim sends SIGTERM after closing its pipe ends; ignoring it lets the driver drain
    // what is still buffered and exit on EOF instead of dying mid-line.
    sys::ignore_term_and_int();
    let take = |fd: i32| sys::take_fd(fd).map_err(|source| LogDriverError::Fd { fd, source });
    let stdout = take(STDOUT_FD)?;
    let stderr = take(STDERR_FD)?;
    let mut log = LogFile::new(options);
    log.ensure_open();
    // Ready: closing our only copy of the pipe's write end wakes the shim.
    drop(sys::take_fd(READY_FD));
    let buffer = |i: usize| BUFFERS[i].lock().unwrap_or_else(PoisonError::into_inner);
    copy_streams(
        [
            Stream::new(stdout, "stdout", buffer(0)),
            Stream::new(stderr, "stderr", buffer(1)),
        ],
        |header, text| log.write(header, text),
    );
    Ok(())
}

/// What the driver reads from: a pipe, or a fake in tests.
trait Input: Read {
    /// True when a read would return at once (bytes or end of input).
    fn pending(&self) -> bool;
    /// The descriptor to poll; `None` for inputs that never block.
    fn fd(&self) -> Option<i32>;
}

impl Input for File {
    fn pending(&self) -> bool {
        // An error reads as pending: the next read reports it.
        sys::poll_in([self.as_raw_fd()], 0).map_or(true, |[r]| r)
    }

    fn fd(&self) -> Option<i32> {
        Some(self.as_raw_fd())
    }
}

/// A line buffer: the driver's are zeroed statics, whose pages stay untouched (and cost
/// nothing) until output reaches them.
type LineBuf = [u8; MAX_LINE];

/// The driver's two line buffers.
static BUFFERS: [Mutex<LineBuf>; 2] = [const { Mutex::new([0; MAX_LINE]) }; 2];

/// One input stream and the line it has not finished yet.
struct Stream<R, B> {
    input: R,
    name: &'static str,
    /// `buf[..held]` is the unfinished line, filled in place by reads.
    buf: B,
    held: usize,
    open: bool,
}

impl<R: Input, B: DerefMut<Target = LineBuf>> Stream<R, B> {
    /// A stream named `stdout` or `stderr` in its records.
    fn new(input: R, name: &'static str, buf: B) -> Self {
        Stream {
            input,
            name,
            buf,
            held: 0,
            open: true,
        }
    }

    /// Reads once and emits every record that read completed: whole lines as `F`, a full
    /// buffer as a `P` chunk, and what is left of a line as `P` when nothing more is waiting
    /// (or the input ended). `emit` gets the header (`<time> <stream> <tag> `) and the text.
    fn read_once(&mut self, emit: &mut impl FnMut(&[u8], &[u8])) {
        let held = self.held;
        let want = MAX_LINE - held;
        let n = match self.input.read(&mut self.buf[held..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(_) => 0,
        };
        if n == 0 {
            self.open = false;
            self.flush_partial(emit);
            return;
        }
        let end = held + n;
        let (mut start, mut scan) = (0, held);
        while let Some(i) = self.buf[scan..end].iter().position(|&b| b == b'\n') {
            let mut line = &self.buf[start..scan + i];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            emit(&header(self.name, false), line);
            start = scan + i + 1;
            scan = start;
        }
        self.buf.copy_within(start..end, 0);
        self.held = end - start;
        if self.held > 0 && (self.held == MAX_LINE || n < want || !self.input.pending()) {
            self.flush_partial(emit);
        }
    }

    fn flush_partial(&mut self, emit: &mut impl FnMut(&[u8], &[u8])) {
        if self.held > 0 {
            emit(&header(self.name, true), &self.buf[..self.held]);
            self.held = 0;
        }
    }
}

/// Copies the streams until each has ended, one thread polling them all, so no pipe is left
/// full while another is busy.
fn copy_streams<R: Input, B: DerefMut<Target = LineBuf>, const N: usize>(
    mut streams: [Stream<R, B>; N],
    mut emit: impl FnMut(&[u8], &[u8]),
) {
    while streams.iter().any(|s| s.open) {
        // Ended streams are polled as -1, which poll skips.
        let fds = streams
            .each_ref()
            .map(|s| if s.open { s.input.fd() } else { Some(-1) });
        let ready = if fds.iter().all(Option::is_some) {
            match sys::poll_in(fds.map(|fd| fd.unwrap_or(-1)), -1) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Should poll itself fail, each stream is read (blocking) rather than polled
                // again in a busy loop.
                Err(_) => [true; N],
            }
        } else {
            [true; N]
        };
        for (stream, ready) in streams.iter_mut().zip(ready) {
            if stream.open && ready {
                stream.read_once(&mut emit);
            }
        }
    }
}

/// `<RFC3339Nano UTC> <stream> <F|P> `.
fn header(stream: &str, partial: bool) -> HeaderBuf {
    let mut h = HeaderBuf([0; HEADER], 0);
    let tag = if partial { "P" } else { "F" };
    let _ = write!(h, "{} {stream} {tag} ", Rfc3339Nano(SystemTime::now()));
    h
}

/// A record header on the stack.
struct HeaderBuf([u8; HEADER], usize);

impl Write for HeaderBuf {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = b.len().min(HEADER - self.1);
        self.0[self.1..self.1 + n].copy_from_slice(&b[..n]);
        self.1 += n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl std::ops::Deref for HeaderBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0[..self.1]
    }
}

/// A time as `YYYY-MM-DDThh:mm:ss.nnnnnnnnnZ` (UTC).
pub struct Rfc3339Nano(pub SystemTime);

impl fmt::Display for Rfc3339Nano {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (y, mo, d, h, mi, s) = civil(since.as_secs());
        write!(
            f,
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:09}Z",
            since.subsec_nanos()
        )
    }
}

/// Seconds since the epoch as (year, month, day, hour, minute, second) in UTC, by the
/// days-to-civil algorithm of the proleptic Gregorian calendar.
fn civil(secs: u64) -> (u64, u64, u64, u64, u64, u64) {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Writes all of `parts` with `writev`, continuing after short writes.
fn write_all_vectored(f: &mut File, parts: &[&[u8]]) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0;
    while done < total {
        let mut skip = done;
        let mut slices = [IoSlice::new(&[]); 3];
        let mut k = 0;
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            slices[k] = IoSlice::new(&p[skip..]);
            k += 1;
            skip = 0;
        }
        match f.write_vectored(&slices[..k]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The log file: reopened when moved or removed and after errors, rotated by size.
struct LogFile<'a> {
    options: Options<'a>,
    file: Option<File>,
    /// (dev, ino) of the open file.
    id: Option<(u64, u64)>,
    /// Bytes in the open file.
    size: u64,
    checked: Instant,
}

impl<'a> LogFile<'a> {
    fn new(options: Options<'a>) -> Self {
        LogFile {
            options,
            file: None,
            id: None,
            size: 0,
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
        if let Ok(f) = Self::open(self.options.path) {
            let meta = f.metadata().ok();
            self.id = meta.as_ref().map(|m| (m.dev(), m.ino()));
            self.size = meta.map_or(0, |m| m.len());
            self.file = Some(f);
        }
        self.checked = Instant::now();
    }

    /// Drops the open file if the path now names another file (or none).
    fn check_moved(&mut self) {
        if self.checked.elapsed() < RECHECK {
            return;
        }
        self.checked = Instant::now();
        let current = std::fs::metadata(self.options.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if current.is_none() || current != self.id {
            self.file = None;
        }
    }

    fn write(&mut self, header: &[u8], text: &[u8]) {
        self.check_moved();
        let len = (header.len() + text.len() + 1) as u64;
        if let Some(max) = self.options.max_size {
            if self.file.is_some() && self.size > 0 && self.size.saturating_add(len) > max {
                self.rotate();
            }
        }
        for _ in 0..2 {
            self.ensure_open();
            let Some(f) = self.file.as_mut() else {
                return;
            };
            if write_all_vectored(f, &[header, text, b"\n"]).is_ok() {
                self.size += len;
                return;
            }
            self.file = None;
        }
    }

    /// Moves the live file aside as `<path>.<YYYYMMDD-hhmmss>` and removes the oldest rotated
    /// files beyond `max_files - 1`.
    fn rotate(&mut self) {
        self.file = None;
        let path = self.options.path;
        let (y, mo, d, h, mi, s) = civil(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        );
        let key = [y * 10_000 + mo * 100 + d, h * 10_000 + mi * 100 + s];
        let mut rotated = rotated_files(path);
        // Several rotations in one second get `-1`, `-2`, … after the newest such file, so
        // names keep sorting oldest first even after the oldest are removed.
        let same_second = rotated.iter().filter(|(k, _)| k[..2] == key);
        let name = match same_second
            .map(|(k, _)| k.get(2).copied().unwrap_or(0))
            .max()
        {
            None => format!("{}.{:08}-{:06}", path.display(), key[0], key[1]),
            Some(n) => format!("{}.{:08}-{:06}-{}", path.display(), key[0], key[1], n + 1),
        };
        let target = PathBuf::from(name);
        if std::fs::rename(path, &target).is_err() {
            return;
        }
        rotated.push((Vec::new(), target));
        let keep = self.options.max_files.saturating_sub(1);
        for (_, old) in rotated.iter().take(rotated.len().saturating_sub(keep)) {
            let _ = std::fs::remove_file(old);
        }
    }
}

/// The rotated files of `path` (`<name>.<YYYYMMDD-hhmmss>[-n]`) with their name's numbers,
/// oldest first.
fn rotated_files(path: &Path) -> Vec<(Vec<u64>, PathBuf)> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut found: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let key = file
                .strip_prefix(&prefix)?
                .split('-')
                .map(|p| p.parse::<u64>().ok())
                .collect::<Option<Vec<_>>>()?;
            (key.len() >= 2).then(|| (key, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The few calls std does not offer, declared by hand (see the module doc for why not the
/// `libc` crate): every `unsafe` of the driver is here.
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::FromRawFd;
    use std::os::raw::{c_int, c_short, c_ulong};

    #[repr(C)]
    struct PollFd {
        fd: c_int,
        events: c_short,
        revents: c_short,
    }

    const POLLIN: c_short = 0x1;
    const SIGINT: c_int = 2;
    const SIGTERM: c_int = 15;
    const SIG_IGN: usize = 1;

    const F_GETFD: c_int = 1;

    extern "C" {
        fn poll(fds: *mut PollFd, nfds: c_ulong, timeout: c_int) -> c_int;
        fn signal(signum: c_int, handler: usize) -> usize;
        fn fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
    }

    /// Polls `fds` for input (a negative one is skipped); for each, whether a read would
    /// return at once.
    pub fn poll_in<const N: usize>(fds: [c_int; N], timeout_ms: c_int) -> io::Result<[bool; N]> {
        let mut p = fds.map(|fd| PollFd {
            fd,
            events: POLLIN,
            revents: 0,
        });
        // SAFETY: `p` is a valid array of `N` pollfd structs for the whole call.
        let n = unsafe { poll(p.as_mut_ptr(), N as c_ulong, timeout_ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(p.map(|f| f.revents != 0))
    }

    /// Ignores SIGTERM and SIGINT for the rest of the process's life.
    pub fn ignore_term_and_int() {
        for sig in [SIGTERM, SIGINT] {
            // SAFETY: SIG_IGN installs no handler code; nothing else in the process
            // depends on these dispositions.
            unsafe { signal(sig, SIG_IGN) };
        }
    }

    /// Takes ownership of an inherited descriptor, after checking that it is open.
    pub fn take_fd(fd: c_int) -> io::Result<File> {
        // SAFETY: F_GETFD reads the descriptor's flags and changes nothing.
        if unsafe { fcntl(fd, F_GETFD) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is open (F_GETFD succeeded), it was inherited from the shim and
        // nothing else in this process uses or closes it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input arriving in separate writes, each followed by a pause with nothing to read.
    struct Chunks(std::collections::VecDeque<Vec<u8>>);

    impl Chunks {
        fn of(chunks: &[&[u8]]) -> Self {
            Chunks(chunks.iter().map(|c| c.to_vec()).collect())
        }
    }

    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(chunk) = self.0.front_mut() else {
                return Ok(0);
            };
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                self.0.pop_front();
            }
            Ok(n)
        }
    }

    impl Input for Chunks {
        fn pending(&self) -> bool {
            // Bytes left of the write being read; the next write comes after a pause.
            self.0.front().is_some_and(|c| !c.is_empty())
        }

        fn fd(&self) -> Option<i32> {
            None
        }
    }

    fn buf() -> Box<LineBuf> {
        Box::new([0; MAX_LINE])
    }

    fn records_of(input: Chunks) -> Vec<String> {
        let mut out = Vec::new();
        copy_streams(
            [
                Stream::new(input, "stdout", buf()),
                Stream::new(Chunks::of(&[]), "stderr", buf()),
            ],
            |h, t| out.push(String::from_utf8([h, t, b"\n"].concat()).unwrap()),
        );
        out
    }

    fn records(input: &[u8]) -> Vec<String> {
        records_of(Chunks::of(&[input]))
    }

    fn tail(record: &str) -> &str {
        // "<time> stdout F text\n" → "F text\n"
        record.splitn(3, ' ').nth(2).unwrap()
    }

    #[test]
    fn lines_become_full_records() {
        let r = records(b"hi\r\nthere\n\nlast");
        let tails: Vec<&str> = r.iter().map(|s| tail(s)).collect();
        // An unterminated last line is a partial record, as containerd's CRI writes it.
        assert_eq!(tails, ["F hi\n", "F there\n", "F \n", "P last\n"]);
        assert!(r[0].contains(" stdout F "));
    }

    #[test]
    fn long_lines_are_split_into_partials() {
        let mut input = vec![b'a'; MAX_LINE];
        input.extend_from_slice(b"XYZ\n");
        input.extend(std::iter::repeat_n(b'b', MAX_LINE));
        input.push(b'\n');
        let r = records(&input);
        let tails: Vec<String> = r
            .iter()
            .map(|s| tail(s).chars().take(6).collect())
            .collect();
        assert_eq!(tails, ["P aaaa", "F XYZ\n", "P bbbb", "F \n"]);
        assert_eq!(tail(&r[0]).len(), 2 + MAX_LINE + 1);
    }

    #[test]
    fn a_line_left_unterminated_is_written_as_partial_once_the_pipe_is_drained() {
        let r = records_of(Chunks::of(&[b"DO", b"NE\nnext", b" more\n"]));
        let tails: Vec<&str> = r.iter().map(|s| tail(s)).collect();
        assert_eq!(tails, ["P DO\n", "F NE\n", "P next\n", "F  more\n"]);
    }

    #[test]
    fn a_real_pipe_held_open_gets_its_partial_line_written() {
        let (reader, writer) = std::io::pipe().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let copier = std::thread::spawn(move || {
            let input = File::from(std::os::fd::OwnedFd::from(reader));
            let mut s = Stream::new(input, "stdout", buf());
            while s.open {
                s.read_once(&mut |h, t| {
                    tx.send(String::from_utf8([h, t, b"\n"].concat()).unwrap())
                        .unwrap()
                });
            }
        });
        let mut writer = writer;
        writer.write_all(b"DONE").unwrap();
        // The writer stays open: the record must come without EOF.
        let record = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("partial record");
        assert_eq!(tail(&record), "P DONE\n");
        drop(writer);
        copier.join().unwrap();
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn both_pipes_are_drained_by_one_thread_while_one_stays_silent() {
        let (out_r, mut out_w) = std::io::pipe().unwrap();
        let (err_r, err_w) = std::io::pipe().unwrap();
        let file = |r: std::io::PipeReader| File::from(std::os::fd::OwnedFd::from(r));
        let streams = [
            Stream::new(file(out_r), "stdout", buf()),
            Stream::new(file(err_r), "stderr", buf()),
        ];
        let copier = std::thread::spawn(move || {
            let mut n = 0usize;
            copy_streams(streams, |h, t| {
                assert!(h.ends_with(b" stdout F "));
                assert_eq!(t, b"0123456789");
                n += 1;
            });
            n
        });
        // Far more than a pipe holds: the writer only finishes if the driver keeps reading
        // stdout while stderr has nothing.
        for _ in 0..100_000 {
            out_w.write_all(b"0123456789\n").unwrap();
        }
        drop(out_w);
        drop(err_w);
        assert_eq!(copier.join().unwrap(), 100_000);
    }

    #[test]
    fn timestamps_are_rfc3339_nano_utc() {
        let t = |secs: u64, nanos: u32| {
            Rfc3339Nano(UNIX_EPOCH + Duration::new(secs, nanos)).to_string()
        };
        assert_eq!(t(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(t(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(
            t(1_796_619_600, 123_456_789),
            "2026-12-07T05:00:00.123456789Z"
        );
        assert_eq!(t(4_107_542_399, 0), "2100-02-28T23:59:59.000000000Z");
        assert_eq!(t(4_107_542_400, 0), "2100-03-01T00:00:00.000000000Z");
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("nodelet-logdriver-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_moved_file_is_reopened_at_its_path() {
        let dir = scratch("moved");
        let path = dir.join("sub/0.log");
        let args = ["log-driver", path.to_str().unwrap()];
        let mut log = LogFile::new(parse_args(&args).unwrap());
        log.write(b"", b"one");
        std::fs::rename(&path, dir.join("sub/0.log.1")).unwrap();
        log.checked = Instant::now() - RECHECK;
        log.write(b"", b"two");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
        assert_eq!(
            std::fs::read_to_string(dir.join("sub/0.log.1")).unwrap(),
            "one\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_by_size_keeps_max_files_and_every_line() {
        let dir = scratch("rotate");
        let path = dir.join("0.log");
        let args: Vec<String> = [
            "max-files",
            "3",
            "log-driver",
            path.to_str().unwrap(),
            "max-size",
            "20",
        ]
        .map(String::from)
        .into();
        let mut log = LogFile::new(parse_args(&args).unwrap());
        for i in 0..10 {
            log.write(b"", format!("line {i:02} ....").as_bytes());
        }
        let rotated: Vec<PathBuf> = rotated_files(&path).into_iter().map(|(_, p)| p).collect();
        assert_eq!(rotated.len(), 2, "{rotated:?}");
        let mut kept: Vec<String> = rotated
            .iter()
            .chain([&path])
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        // Each 13-byte record fills a file of at most 20 bytes on its own.
        assert_eq!(kept.pop().unwrap(), "line 09 ....\n");
        assert_eq!(kept, ["line 07 ....\n", "line 08 ....\n"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn arguments_come_in_pairs_in_any_order() {
        let parse = |a: &'static [&'static str]| parse_args(a);
        assert_eq!(
            parse(&["max-size", "10", "log-driver", "/l/0.log"]).unwrap(),
            Options {
                path: Path::new("/l/0.log"),
                max_size: Some(10),
                max_files: 5
            }
        );
        assert_eq!(parse(&["log-driver", "/l"]).unwrap().max_size, None);
        for bad in [
            &[][..],
            &["log-driver"],
            &["/l/0.log"],
            &["log-driver", "/l", "max-size"],
            &["log-driver", "/l", "max-size", "ten"],
            &["log-driver", "/l", "colour", "red"],
        ] {
            assert!(
                matches!(parse(bad), Err(LogDriverError::Usage(_))),
                "{bad:?}"
            );
        }
    }
}
