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
//! for that: `no_std` without libc (outside its tests), with rustix's raw Linux system calls
//! (`linux_raw`, no default features) as its only dependency, and no allocator at all:
//! arguments are borrowed from `argv`, poll sets, paths and record headers live on the
//! stack, rotation lists its directory once per file it removes instead of collecting names,
//! and the timestamp is formatted here (civil-from-days arithmetic on `CLOCK_REALTIME`).
//! The binary (`src/main.rs`: its own `_start`, built by `agent/build.rs` statically, not
//! position-independent, without unwinding, with `layout.ld`) has nothing to set up before
//! it runs: no dynamic loader, no relocated pages, no TLS, tunables, heap or stdio. One
//! thread polls both pipes; each stream owns one buffer of one maximal line, a zeroed static
//! (.bss) that `read` fills in place (its pages are touched only as far as output arrives),
//! and each record goes out with one `writev`, never copied. A driver started by the shim
//! holds about 17 KiB of its own (private dirty: the two buffers' first pages, one shared
//! with the few statics, and a stack of 8 to 12 KiB) and shares its 32 KiB of text with the
//! others: at 100 busybox pods, 16.1 KiB private dirty and 16.1 KiB PSS per driver, 1.6 MiB
//! in all (on glibc 42 and 50 KiB, 4.9 MiB; see `agent/build.rs` for the history).
//!
//! The same code builds with std for its tests and for the agent, which runs it as the
//! driver itself when the small binary cannot be installed (`nodelet log-driver …`).

#![cfg_attr(not(test), no_std)]

use core::cell::UnsafeCell;
use core::ffi::CStr;
use core::fmt::{self, Write as _};
use core::ops::DerefMut;
use core::sync::atomic::{AtomicBool, Ordering};
use core::time::Duration;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, Mode, OFlags, CWD};
use rustix::io::{Errno, IoSlice};

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
/// Longest file name (Linux's `NAME_MAX`) plus room for a rotation suffix.
const NAME_MAX: usize = 255 + 32;

/// Why the log driver could not run.
#[derive(Debug)]
pub enum LogDriverError {
    /// The arguments are not `log-driver <path>` plus optional `max-size`/`max-files` pairs
    /// (the message names them, see [`main_with_args`]).
    Usage,
    /// A file descriptor the shim should have handed over is not open.
    Fd {
        /// The descriptor number (3 stdout, 4 stderr).
        fd: i32,
        /// Why it could not be used.
        source: Errno,
    },
}

impl fmt::Display for LogDriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogDriverError::Usage => write!(
                f,
                "usage: nodelet-log-driver log-driver <log path> [max-size <bytes>] \
                 [max-files <n>]"
            ),
            LogDriverError::Fd { fd, source } => write!(f, "fd {fd}: {source}"),
        }
    }
}

/// What the arguments ask for (borrowed from them: the driver allocates nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options<'a> {
    /// The log file.
    pub path: &'a CStr,
    /// Rotate once the file would grow past this many bytes.
    pub max_size: Option<u64>,
    /// Files kept by rotation, the live one included (at least 2).
    pub max_files: usize,
}

/// Parses the arguments after the program name: key/value pairs in any order (the shim
/// iterates a map).
pub fn parse_args<'a>(args: &[&'a CStr]) -> Result<Options<'a>, LogDriverError> {
    let (mut path, mut max_size, mut max_files) = (None, None, 5usize);
    let mut pairs = args.chunks_exact(2);
    let number = |value: &CStr| value.to_str().ok().and_then(|v| v.parse().ok());
    for pair in &mut pairs {
        let value = pair[1];
        match pair[0].to_bytes() {
            k if k == PATH_KEY.as_bytes() => path = Some(value),
            k if k == MAX_SIZE_KEY.as_bytes() => {
                max_size = Some(number(value).ok_or(LogDriverError::Usage)?)
            }
            k if k == MAX_FILES_KEY.as_bytes() => {
                max_files = number(value)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or(LogDriverError::Usage)?
            }
            _ => return Err(LogDriverError::Usage),
        }
    }
    match (path, pairs.remainder()) {
        (Some(path), []) => Ok(Options {
            path,
            max_size: max_size.filter(|&s| s > 0),
            max_files: max_files.max(2),
        }),
        _ => Err(LogDriverError::Usage),
    }
}

/// The program: parses `args` (after the program name), runs, and reports an error on
/// stderr (the shim passes it on to containerd's log). Returns the exit status.
pub fn main_with_args(args: &[&CStr]) -> u8 {
    match parse_args(args).and_then(run) {
        Ok(()) => 0,
        Err(e) => {
            let mut out = Stderr;
            let _ = match e {
                LogDriverError::Usage => writeln!(out, "nodelet-log-driver: {e} (got {args:?})"),
                _ => writeln!(out, "nodelet-log-driver: {e}"),
            };
            1
        }
    }
}

/// Standard error, unbuffered: each `write_str` is one `write`.
pub struct Stderr;

impl fmt::Write for Stderr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // SAFETY: fd 2 is only borrowed for the call; an fd 2 that is not open makes the
        // write fail, which is ignored.
        let fd = unsafe { BorrowedFd::borrow_raw(2) };
        let mut rest = s.as_bytes();
        while !rest.is_empty() {
            match rustix::io::write(fd, rest) {
                Ok(0) | Err(_) => return Err(fmt::Error),
                Ok(n) => rest = &rest[n..],
            }
        }
        Ok(())
    }
}

/// Runs the log driver on the shim's descriptors until both streams end. The caller ignores
/// SIGTERM and SIGINT first: the shim sends SIGTERM after closing its pipe ends, and ignoring
/// it lets the driver drain what is still buffered and exit on EOF instead of dying mid-line
/// (this crate has no portable way to: the binary's start-up does it, see `main.rs`).
pub fn run(options: Options<'_>) -> Result<(), LogDriverError> {
    let take = |fd: i32| sys::take_fd(fd).map_err(|source| LogDriverError::Fd { fd, source });
    let stdout = take(STDOUT_FD)?;
    let stderr = take(STDERR_FD)?;
    let mut log = LogFile::new(options);
    log.ensure_open();
    // Ready: closing our only copy of the pipe's write end wakes the shim.
    drop(sys::take_fd(READY_FD));
    let Some([out_buf, err_buf]) = take_buffers() else {
        unreachable!("the driver runs once per process");
    };
    copy_streams(
        [
            Stream::new(stdout, "stdout", out_buf),
            Stream::new(stderr, "stderr", err_buf),
        ],
        |header, text| log.write(header, text),
    );
    Ok(())
}

/// What the driver reads from: a pipe, or a fake in tests.
trait Input {
    /// Reads into `buf`, as `read(2)`.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Errno>;
    /// True when a read would return at once (bytes or end of input).
    fn pending(&self) -> bool;
    /// The descriptor to poll; `None` for inputs that never block.
    fn fd(&self) -> Option<BorrowedFd<'_>>;
}

impl Input for OwnedFd {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Errno> {
        rustix::io::read(&*self, buf)
    }

    fn pending(&self) -> bool {
        // An error reads as pending: the next read reports it.
        sys::poll_in([Some(self.as_fd())], Some(Duration::ZERO)).map_or(true, |[r]| r)
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

/// A line buffer: the driver's are zeroed statics, whose pages stay untouched (and cost
/// nothing) until output reaches them.
type LineBuf = [u8; MAX_LINE];

/// The driver's two line buffers, handed out once (zeroed: they lie in .bss). The flag comes
/// first, so that it shares a page with the first buffer's start instead of taking one of
/// its own after the second's end.
#[repr(C)]
struct Buffers {
    taken: AtomicBool,
    lines: UnsafeCell<[LineBuf; 2]>,
}

// SAFETY: the buffers are only reached through `take_buffers`, which hands them out once.
unsafe impl Sync for Buffers {}

static BUFFERS: Buffers = Buffers {
    taken: AtomicBool::new(false),
    lines: UnsafeCell::new([[0; MAX_LINE]; 2]),
};

/// The two line buffers, the first time only.
fn take_buffers() -> Option<[&'static mut LineBuf; 2]> {
    if BUFFERS.taken.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: `taken` was false, so no other reference to the buffers exists, and none will
    // be made again.
    let [a, b] = unsafe { &mut *BUFFERS.lines.get() };
    Some([a, b])
}

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
            Err(Errno::INTR) => return,
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
        let pollable = streams.iter().all(|s| !s.open || s.input.fd().is_some());
        let ready = if pollable {
            // Ended streams are left out of the poll set.
            let fds = streams
                .each_ref()
                .map(|s| if s.open { s.input.fd() } else { None });
            match sys::poll_in(fds, None) {
                Ok(r) => r,
                Err(Errno::INTR) => continue,
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
fn header(stream: &str, partial: bool) -> Buf<HEADER> {
    let mut h = Buf::new();
    let tag = if partial { "P" } else { "F" };
    let _ = write!(h, "{} {stream} {tag} ", Rfc3339Nano(sys::realtime()));
    h
}

/// Bytes on the stack, written with `write!`; what does not fit is cut off (and reported
/// as an error).
struct Buf<const N: usize>([u8; N], usize);

impl<const N: usize> Buf<N> {
    fn new() -> Self {
        Buf([0; N], 0)
    }

    fn push(&mut self, b: &[u8]) -> fmt::Result {
        let n = b.len().min(N - self.1);
        self.0[self.1..self.1 + n].copy_from_slice(&b[..n]);
        self.1 += n;
        if n < b.len() {
            return Err(fmt::Error);
        }
        Ok(())
    }

    /// The bytes written and a NUL, as a C string (`None` if they hold a NUL or fill the
    /// buffer).
    fn c_str(&mut self) -> Option<&CStr> {
        let len = self.1;
        self.push(b"\0").ok()?;
        self.1 = len;
        CStr::from_bytes_with_nul(&self.0[..=len]).ok()
    }
}

impl<const N: usize> fmt::Write for Buf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes())
    }
}

impl<const N: usize> core::ops::Deref for Buf<N> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0[..self.1]
    }
}

/// A time since the Unix epoch as `YYYY-MM-DDThh:mm:ss.nnnnnnnnnZ` (UTC).
pub struct Rfc3339Nano(pub Duration);

impl fmt::Display for Rfc3339Nano {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, mo, d, h, mi, s) = civil(self.0.as_secs());
        write!(
            f,
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:09}Z",
            self.0.subsec_nanos()
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
fn write_all_vectored(f: BorrowedFd<'_>, parts: &[&[u8]]) -> Result<(), Errno> {
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
        match rustix::io::writev(f, &slices[..k]) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The log file: reopened when moved or removed and after errors, rotated by size.
struct LogFile<'a> {
    options: Options<'a>,
    file: Option<OwnedFd>,
    /// (dev, ino) of the open file.
    id: Option<(u64, u64)>,
    /// Bytes in the open file.
    size: u64,
    /// When the path was last checked (monotonic clock).
    checked: Duration,
}

impl<'a> LogFile<'a> {
    fn new(options: Options<'a>) -> Self {
        LogFile {
            options,
            file: None,
            id: None,
            size: 0,
            checked: sys::monotonic(),
        }
    }

    /// Opens the file for appending, creating it and its directories.
    fn open(path: &CStr) -> Result<OwnedFd, Errno> {
        let open = || {
            rustix::fs::open(
                path,
                OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o640),
            )
        };
        match open() {
            Err(Errno::NOENT) => {
                sys::open_dir(split_path(path.to_bytes()).0, true)?;
                open()
            }
            opened => opened,
        }
    }

    fn ensure_open(&mut self) {
        if self.file.is_some() {
            return;
        }
        if let Ok(f) = Self::open(self.options.path) {
            let stat = rustix::fs::fstat(&f).ok();
            self.id = stat.as_ref().map(file_id);
            self.size = stat.map_or(0, |s| s.st_size as u64);
            self.file = Some(f);
        }
        self.checked = sys::monotonic();
    }

    /// Drops the open file if the path now names another file (or none).
    fn check_moved(&mut self) {
        let now = sys::monotonic();
        if now.saturating_sub(self.checked) < RECHECK {
            return;
        }
        self.checked = now;
        let current = rustix::fs::stat(self.options.path)
            .ok()
            .as_ref()
            .map(file_id);
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
            let Some(f) = self.file.as_ref() else {
                return;
            };
            if write_all_vectored(f.as_fd(), &[header, text, b"\n"]).is_ok() {
                self.size += len;
                return;
            }
            self.file = None;
        }
    }

    /// Moves the live file aside as `<path>.<YYYYMMDD-hhmmss>` and removes the oldest rotated
    /// files beyond `max_files - 1`.
    #[inline(never)]
    fn rotate(&mut self) {
        self.file = None;
        let path = self.options.path.to_bytes();
        let (y, mo, d, h, mi, s) = civil(sys::realtime().as_secs());
        let key = [y * 10_000 + mo * 100 + d, h * 10_000 + mi * 100 + s];
        let (dir_path, name) = split_path(path);
        let Ok(dir) = sys::open_dir(dir_path, false) else {
            return;
        };
        let mut prefix = Buf::<NAME_MAX>::new();
        if prefix.push(name).and_then(|()| prefix.push(b".")).is_err() {
            return;
        }
        // Several rotations in one second get `-1`, `-2`, … after the newest such file, so
        // names keep sorting oldest first even after the oldest are removed.
        let (mut count, mut same_second) = (0usize, None::<u64>);
        for_each_rotated(&dir, &prefix, |k, _| {
            count += 1;
            if k.parts()[..2] == key {
                let n = k.parts().get(2).copied().unwrap_or(0);
                same_second = Some(same_second.map_or(n, |m| m.max(n)));
            }
        });
        let mut target = Buf::<NAME_MAX>::new();
        let named = match same_second {
            None => write!(target, "{:08}-{:06}", key[0], key[1]),
            Some(n) => write!(target, "{:08}-{:06}-{}", key[0], key[1], n + 1),
        };
        let mut target_name = Buf::<NAME_MAX>::new();
        if named.is_err()
            || target_name
                .push(&prefix)
                .and_then(|()| target_name.push(&target))
                .is_err()
        {
            return;
        }
        let Some(target_c) = target_name.c_str() else {
            return;
        };
        if rustix::fs::renameat(CWD, self.options.path, &dir, target_c).is_err() {
            return;
        }
        // The oldest first, each found by one pass over the directory (rotation keeps few).
        let keep = self.options.max_files.saturating_sub(1);
        let mut after: Option<(Key, Buf<NAME_MAX>)> = None;
        for _ in 0..(count + 1).saturating_sub(keep) {
            let mut oldest: Option<(Key, Buf<NAME_MAX>)> = None;
            for_each_rotated(&dir, &prefix, |k, file| {
                let newer = |than: &Option<(Key, Buf<NAME_MAX>)>| {
                    than.as_ref()
                        .is_none_or(|(tk, tn)| (k.parts(), file) > (tk.parts(), &tn[..]))
                };
                let older_than_oldest = oldest
                    .as_ref()
                    .is_none_or(|(ok, on)| (k.parts(), file) < (ok.parts(), &on[..]));
                if file != &target_name[..] && newer(&after) && older_than_oldest {
                    let mut n = Buf::new();
                    let _ = n.push(file);
                    oldest = Some((k, n));
                }
            });
            let Some((k, mut n)) = oldest else {
                break;
            };
            if let Some(c) = n.c_str() {
                let _ = rustix::fs::unlinkat(&dir, c, AtFlags::empty());
            }
            after = Some((k, n));
        }
    }
}

/// A file's (device, inode).
#[allow(clippy::unnecessary_cast)] // their types vary by architecture
fn file_id(stat: &rustix::fs::Stat) -> (u64, u64) {
    (stat.st_dev as u64, stat.st_ino as u64)
}

/// A path's directory (`.` for none) and file name.
fn split_path(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(0) => (b"/", &path[1..]),
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b".", path),
    }
}

/// The numbers of a rotated file's name (`<name>.<YYYYMMDD-hhmmss>[-n]`), compared in order.
#[derive(Clone, Copy)]
struct Key([u64; 4], usize);

impl Key {
    fn parts(&self) -> &[u64] {
        &self.0[..self.1]
    }

    /// The numbers of `suffix`, each part between `-` a number, two to four of them (the
    /// driver names its files with two or three).
    fn parse(suffix: &[u8]) -> Option<Key> {
        let mut key = Key([0; 4], 0);
        for part in suffix.split(|&b| b == b'-') {
            let n = core::str::from_utf8(part).ok()?.parse().ok()?;
            *key.0.get_mut(key.1)? = n;
            key.1 += 1;
        }
        (key.1 >= 2).then_some(key)
    }
}

/// Calls `f` with the key and name of each rotated file (`<prefix><numbers>`) in `dir`.
fn for_each_rotated(dir: &OwnedFd, prefix: &[u8], mut f: impl FnMut(Key, &[u8])) {
    if rustix::fs::seek(dir, rustix::fs::SeekFrom::Start(0)).is_err() {
        return;
    }
    let mut buf = [core::mem::MaybeUninit::<u8>::uninit(); 2048];
    let mut entries = rustix::fs::RawDir::new(dir, &mut buf);
    while let Some(Ok(entry)) = entries.next() {
        let file = entry.file_name().to_bytes();
        if let Some(key) = file.strip_prefix(prefix).and_then(Key::parse) {
            f(key, file);
        }
    }
}

/// The calls the driver makes beyond plain reads and writes: every `unsafe` of the driver's
/// I/O is here.
mod sys {
    use super::{Buf, NAME_MAX};
    use core::time::Duration;
    use rustix::event::{PollFd, PollFlags};
    use rustix::fd::{BorrowedFd, FromRawFd, OwnedFd};
    use rustix::fs::{Mode, OFlags};
    use rustix::io::Errno;
    use rustix::time::{clock_gettime, ClockId, Timespec};

    /// Polls `fds` for input (`None` is skipped); for each, whether a read would return at
    /// once. `None` waits without end.
    pub fn poll_in<const N: usize>(
        fds: [Option<BorrowedFd<'_>>; N],
        timeout: Option<Duration>,
    ) -> Result<[bool; N], Errno> {
        let Some(any) = fds.iter().flatten().next().copied() else {
            return Ok([false; N]);
        };
        // poll skips no entry that rustix can name, so a skipped one polls another
        // descriptor of the set for nothing, and its result is left out.
        let mut set = fds.map(|fd| {
            fd.map_or(PollFd::from_borrowed_fd(any, PollFlags::empty()), |fd| {
                PollFd::from_borrowed_fd(fd, PollFlags::IN)
            })
        });
        let timeout = timeout.map(|t| Timespec {
            tv_sec: t.as_secs() as _,
            tv_nsec: t.subsec_nanos() as _,
        });
        rustix::event::poll(&mut set, timeout.as_ref())?;
        let mut ready = [false; N];
        for ((r, p), fd) in ready.iter_mut().zip(&set).zip(&fds) {
            *r = fd.is_some() && !p.revents().is_empty();
        }
        Ok(ready)
    }

    /// Takes ownership of an inherited descriptor, after checking that it is open.
    pub fn take_fd(fd: i32) -> Result<OwnedFd, Errno> {
        // SAFETY: the descriptor is only borrowed for the call, which reads its flags.
        rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) })?;
        // SAFETY: `fd` is open (F_GETFD succeeded), it was inherited from the shim and
        // nothing else in this process uses or closes it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The time since the Unix epoch (zero before it).
    pub fn realtime() -> Duration {
        duration(clock_gettime(ClockId::Realtime))
    }

    /// The monotonic clock.
    pub fn monotonic() -> Duration {
        duration(clock_gettime(ClockId::Monotonic))
    }

    fn duration(t: Timespec) -> Duration {
        match (u64::try_from(t.tv_sec), u32::try_from(t.tv_nsec)) {
            (Ok(s), Ok(n)) => Duration::new(s, n),
            _ => Duration::ZERO,
        }
    }

    /// Opens the directory `path` (for listing, and as the base of names), one component
    /// at a time (so no whole path is copied: a component is at most `NAME_MAX`), creating
    /// the missing ones as `mkdir -p` would when `create` is set.
    #[inline(never)]
    pub fn open_dir(path: &[u8], create: bool) -> Result<OwnedFd, Errno> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let root = if path.starts_with(b"/") { c"/" } else { c"." };
        let mut dir = rustix::fs::open(root, flags, Mode::empty())?;
        for part in path.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
            let mut name = Buf::<NAME_MAX>::new();
            name.push(part).map_err(|_| Errno::NAMETOOLONG)?;
            let name = name.c_str().ok_or(Errno::INVAL)?;
            if create {
                match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o777)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e),
                }
            }
            dir = rustix::fs::openat(&dir, name, flags, Mode::empty())?;
        }
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::io::Write;
    use std::path::{Path, PathBuf};

    /// Input arriving in separate writes, each followed by a pause with nothing to read.
    struct Chunks(std::collections::VecDeque<Vec<u8>>);

    impl Chunks {
        fn of(chunks: &[&[u8]]) -> Self {
            Chunks(chunks.iter().map(|c| c.to_vec()).collect())
        }
    }

    impl Input for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, Errno> {
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

        fn pending(&self) -> bool {
            // Bytes left of the write being read; the next write comes after a pause.
            self.0.front().is_some_and(|c| !c.is_empty())
        }

        fn fd(&self) -> Option<BorrowedFd<'_>> {
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
            let input = owned(std::os::fd::OwnedFd::from(reader));
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
        let file = |r: std::io::PipeReader| owned(std::os::fd::OwnedFd::from(r));
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
        let t = |secs: u64, nanos: u32| Rfc3339Nano(Duration::new(secs, nanos)).to_string();
        assert_eq!(t(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(t(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(
            t(1_796_619_600, 123_456_789),
            "2026-12-07T05:00:00.123456789Z"
        );
        assert_eq!(t(4_107_542_399, 0), "2100-02-28T23:59:59.000000000Z");
        assert_eq!(t(4_107_542_400, 0), "2100-03-01T00:00:00.000000000Z");
    }

    /// The rotated files of `path`, oldest first.
    fn rotated_files(path: &Path) -> Vec<PathBuf> {
        let prefix = format!("{}.", path.file_name().unwrap().to_str().unwrap());
        let mut found: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let key = Key::parse(name.strip_prefix(&prefix)?.as_bytes())?;
                Some((key.parts().to_vec(), e.path()))
            })
            .collect();
        found.sort();
        found.into_iter().map(|(_, p)| p).collect()
    }

    fn owned(fd: std::os::fd::OwnedFd) -> OwnedFd {
        use std::os::fd::IntoRawFd;
        // SAFETY: the descriptor is open and given over whole.
        unsafe { rustix::fd::FromRawFd::from_raw_fd(fd.into_raw_fd()) }
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
        let path_c = CString::new(path.to_str().unwrap()).unwrap();
        let mut log = LogFile::new(parse_args(&[c"log-driver", &path_c]).unwrap());
        log.write(b"", b"one");
        std::fs::rename(&path, dir.join("sub/0.log.1")).unwrap();
        log.checked = sys::monotonic() - RECHECK;
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
        let path_c = CString::new(path.to_str().unwrap()).unwrap();
        let args = [
            c"max-files",
            c"3",
            c"log-driver",
            &path_c,
            c"max-size",
            c"20",
        ];
        let mut log = LogFile::new(parse_args(&args).unwrap());
        for i in 0..10 {
            log.write(b"", format!("line {i:02} ....").as_bytes());
        }
        let rotated = rotated_files(&path);
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
        let parse = |a: &'static [&'static CStr]| parse_args(a);
        assert_eq!(
            parse(&[c"max-size", c"10", c"log-driver", c"/l/0.log"]).unwrap(),
            Options {
                path: c"/l/0.log",
                max_size: Some(10),
                max_files: 5
            }
        );
        assert_eq!(parse(&[c"log-driver", c"/l"]).unwrap().max_size, None);
        for bad in [
            &[][..],
            &[c"log-driver"],
            &[c"/l/0.log"],
            &[c"log-driver", c"/l", c"max-size"],
            &[c"log-driver", c"/l", c"max-size", c"ten"],
            &[c"log-driver", c"/l", c"colour", c"red"],
        ] {
            assert!(matches!(parse(bad), Err(LogDriverError::Usage)), "{bad:?}");
        }
    }
}
