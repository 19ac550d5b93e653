//! Container log files: where each attempt's CRI-format log lives
//! (`<log dir>/<ns>_<name>_<uid>/<container>/<attempt>.log`, as the kubelet lays them out), and
//! turning CRI lines (`<time> <stream> <F|P> <text>`) back into the container's output. A
//! container writes whatever bytes it likes, so records are handled as bytes, and a tail is
//! found by reading the file backwards from its end, a block at a time.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;

/// The log file of one attempt of one container of `pod`.
pub fn log_path(log_dir: &Path, pod: &Pod, container: &str, attempt: u32) -> PathBuf {
    pod_dir(log_dir, pod)
        .join(container)
        .join(format!("{attempt}.log"))
}

/// The directory of all of `pod`'s logs (removed with the pod).
pub fn pod_dir(log_dir: &Path, pod: &Pod) -> PathBuf {
    let m = &pod.metadata;
    let dir = format!(
        "{}_{}_{}",
        m.namespace.as_deref().unwrap_or("default"),
        m.name.as_deref().unwrap_or_default(),
        m.uid.as_deref().unwrap_or_default()
    );
    log_dir.join(dir)
}

/// The pod UID a pod log directory's name ends with (`<ns>_<name>_<uid>`; none of the three
/// holds `_`).
pub fn uid_of_dir(name: &str) -> Option<&str> {
    let mut parts = name.rsplitn(3, '_');
    let uid = parts.next()?;
    (parts.count() == 2 && !uid.is_empty()).then_some(uid)
}

/// The container's output from the last `max_lines` CRI records (all when None), with
/// partial records (`P`) joined to the line they continue.
pub fn output(cri_log: &str, max_lines: Option<usize>, timestamps: bool) -> String {
    let lines: Vec<&str> = cri_log.lines().collect();
    let start = max_lines.map_or(0, |n| lines.len().saturating_sub(n));
    let mut out = Vec::new();
    let mut continues = false;
    for line in &lines[start..] {
        continues = render(line.as_bytes(), timestamps, continues, &mut out);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Appends one CRI record's text to `out` (prefixed with its time when `timestamps`, unless it
/// continues a partial record); returns whether the next record continues this line.
pub fn render(record: &[u8], timestamps: bool, continues: bool, out: &mut Vec<u8>) -> bool {
    let mut parts = record.splitn(4, |&b| b == b' ');
    let (time, _, tag, text) = (parts.next(), parts.next(), parts.next(), parts.next());
    if timestamps && !continues {
        out.extend_from_slice(time.unwrap_or_default());
        out.push(b' ');
    }
    out.extend_from_slice(text.unwrap_or_default());
    let partial = tag == Some(b"P".as_slice());
    if !partial {
        out.push(b'\n');
    }
    partial
}

/// Bytes read per step when looking for a tail from the end of a log.
const TAIL_BLOCK: usize = 8 * 1024;

/// Where the last `records` records of a log of `len` bytes begin: read backwards from the end
/// a block at a time, so the cost is that of the tail, never of the whole file.
pub fn tail_start<R: Read + Seek>(file: &mut R, len: u64, records: usize) -> std::io::Result<u64> {
    if records == 0 {
        return Ok(len);
    }
    let mut block = vec![0u8; TAIL_BLOCK];
    let mut end = len;
    let mut seen = 0;
    while end > 0 {
        let start = end.saturating_sub(TAIL_BLOCK as u64);
        let chunk = &mut block[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        for (i, &b) in chunk.iter().enumerate().rev() {
            let at = start + i as u64;
            // A newline ends a record; the one ending the file ends the last record.
            if b == b'\n' && at + 1 != len {
                seen += 1;
                if seen == records {
                    return Ok(at + 1);
                }
            }
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_log_directory_names_its_uid() {
        assert_eq!(uid_of_dir("default_web_0b1c-2d"), Some("0b1c-2d"));
        assert_eq!(uid_of_dir("kube-system_a.b-c_u1"), Some("u1"));
        assert_eq!(uid_of_dir("lost+found"), None);
        assert_eq!(uid_of_dir("a_b"), None);
        assert_eq!(uid_of_dir("a_b_"), None);
    }

    #[test]
    fn partial_records_join_their_line_and_tails_count_records() {
        let log = "t stdout P part\nt stdout F ial\nt stderr F two\nt stdout F three\n";
        assert_eq!(output(log, None, false), "partial\ntwo\nthree\n");
        assert_eq!(output(log, Some(2), false), "two\nthree\n");
        assert_eq!(output(log, Some(3), true), "t ial\nt two\nt three\n");
        assert_eq!(output(log, None, true), "t partial\nt two\nt three\n");
    }

    #[test]
    fn records_are_bytes_and_need_not_be_utf8() {
        let mut out = Vec::new();
        render(b"t stdout F \xff\xfe raw", false, false, &mut out);
        assert_eq!(out, b"\xff\xfe raw\n");
    }

    /// A reader that counts the bytes read through it.
    struct Counting<R> {
        inner: R,
        read: usize,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n;
            Ok(n)
        }
    }

    impl<R: Seek> Seek for Counting<R> {
        fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
            self.inner.seek(pos)
        }
    }

    #[test]
    fn a_tail_is_found_from_the_end_reading_only_about_the_tail() {
        let log: Vec<u8> = (0..100_000)
            .flat_map(|i| format!("t stdout F line {i}\n").into_bytes())
            .collect();
        let len = log.len() as u64;
        let mut file = Counting {
            inner: std::io::Cursor::new(log.clone()),
            read: 0,
        };
        let start = tail_start(&mut file, len, 3).unwrap();
        assert_eq!(
            &log[start as usize..],
            b"t stdout F line 99997\nt stdout F line 99998\nt stdout F line 99999\n"
        );
        assert!(file.read <= TAIL_BLOCK, "read {} of {len} bytes", file.read);
        let mut file = std::io::Cursor::new(log.clone());
        assert_eq!(
            tail_start(&mut file, len, 1_000_000).unwrap(),
            0,
            "all of it"
        );
        assert_eq!(tail_start(&mut file, len, 0).unwrap(), len, "none of it");
        let mut unterminated = std::io::Cursor::new(b"a\nb\nc".to_vec());
        assert_eq!(tail_start(&mut unterminated, 5, 1).unwrap(), 4);
    }

    #[test]
    fn paths_follow_the_kubelet_layout() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("web".into());
        pod.metadata.namespace = Some("ns".into());
        pod.metadata.uid = Some("u1".into());
        let p = log_path(Path::new("/var/log/pods"), &pod, "app", 2);
        assert_eq!(p, PathBuf::from("/var/log/pods/ns_web_u1/app/2.log"));
    }
}
