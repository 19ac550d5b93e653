//! Container log files: where each attempt's CRI-format log lives
//! (`<log dir>/<ns>_<name>_<uid>/<container>/<attempt>.log`, as the kubelet lays them out), and
//! turning CRI lines (`<time> <stream> <F|P> <text>`) back into the container's output.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;

/// The log file of one attempt of one container of `pod`.
pub fn log_path(log_dir: &Path, pod: &Pod, container: &str, attempt: u32) -> PathBuf {
    let m = &pod.metadata;
    let dir = format!(
        "{}_{}_{}",
        m.namespace.as_deref().unwrap_or("default"),
        m.name.as_deref().unwrap_or_default(),
        m.uid.as_deref().unwrap_or_default()
    );
    log_dir
        .join(dir)
        .join(container)
        .join(format!("{attempt}.log"))
}

/// The container's output from the last `max_lines` CRI records (all when None), with
/// partial records (`P`) joined to the line they continue.
pub fn output(cri_log: &str, max_lines: Option<usize>, timestamps: bool) -> String {
    let lines: Vec<&str> = cri_log.lines().collect();
    let start = max_lines.map_or(0, |n| lines.len().saturating_sub(n));
    let mut out = String::new();
    let mut continues = false;
    for line in &lines[start..] {
        continues = render(line, timestamps, continues, &mut out);
    }
    out
}

/// Appends one CRI record's text to `out` (prefixed with its time when `timestamps`, unless it
/// continues a partial record); returns whether the next record continues this line.
pub fn render(record: &str, timestamps: bool, continues: bool, out: &mut String) -> bool {
    let mut parts = record.splitn(4, ' ');
    let (time, _, tag, text) = (parts.next(), parts.next(), parts.next(), parts.next());
    if timestamps && !continues {
        out.push_str(time.unwrap_or_default());
        out.push(' ');
    }
    out.push_str(text.unwrap_or_default());
    let partial = tag == Some("P");
    if !partial {
        out.push('\n');
    }
    partial
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_records_join_their_line_and_tails_count_records() {
        let log = "t stdout P part\nt stdout F ial\nt stderr F two\nt stdout F three\n";
        assert_eq!(output(log, None, false), "partial\ntwo\nthree\n");
        assert_eq!(output(log, Some(2), false), "two\nthree\n");
        assert_eq!(output(log, Some(3), true), "t ial\nt two\nt three\n");
        assert_eq!(output(log, None, true), "t partial\nt two\nt three\n");
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
