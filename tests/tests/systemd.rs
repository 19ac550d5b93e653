//! The systemd unit: `systemd-analyze verify` on a copy of systemd/nodelet.service with its
//! example drop-in, ExecStart pointed at a binary that exists here. Any warning that names the
//! unit or its drop-in fails the test, and so does a unit missing a setting the agent relies on.

use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALLED_BINARY: &str = "/usr/local/bin/nodelet";

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// Copies the unit and drop-in into a temp dir with ExecStart pointing at `binary`, appends
/// `extra` to the drop-in, and returns (exit ok, complaints naming the unit).
fn verify(binary: &Path, extra: &str) -> (bool, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let src = systemd_dir();
    let fix = |text: String| text.replace(INSTALLED_BINARY, &binary.display().to_string());
    let unit = fix(std::fs::read_to_string(src.join("nodelet.service")).unwrap());
    std::fs::write(dir.path().join("nodelet.service"), unit).unwrap();
    let dropins = dir.path().join("nodelet.service.d");
    std::fs::create_dir(&dropins).unwrap();
    let example = src.join("nodelet.service.d/10-example.conf");
    let dropin = fix(std::fs::read_to_string(example).unwrap()) + extra;
    std::fs::write(dropins.join("10-example.conf"), dropin).unwrap();

    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("nodelet.service"))
        .output()
        .expect("run systemd-analyze (package systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir_text = dir.path().display().to_string();
    let complaints = text
        .lines()
        .filter(|l| l.contains("nodelet.service") || l.contains(&dir_text))
        .map(str::to_string)
        .collect();
    (out.status.success(), complaints)
}

#[test]
fn unit_and_example_dropin_verify_without_warnings() {
    let binary = std::env::current_exe().unwrap();
    let (ok, complaints) = verify(&binary, "");
    assert!(ok, "systemd-analyze verify failed: {complaints:?}");
    assert!(complaints.is_empty(), "warnings: {complaints:?}");
}

#[test]
fn verify_catches_a_bad_setting() {
    // The check above can fail: an unknown key in the drop-in is reported.
    let binary = std::env::current_exe().unwrap();
    let (_, complaints) = verify(&binary, "NoSuchSetting=1\n");
    assert!(
        complaints.iter().any(|l| l.contains("NoSuchSetting")),
        "{complaints:?}"
    );
    // And a missing ExecStart binary fails verification.
    let (ok, _) = verify(Path::new("/nonexistent/nodelet"), "");
    assert!(!ok);
}

#[test]
fn unit_has_the_settings_the_agent_relies_on() {
    let unit = std::fs::read_to_string(systemd_dir().join("nodelet.service")).unwrap();
    let settings: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    for wanted in [
        "Type=notify",
        "WatchdogSec=30s",
        "ExecStart=/usr/local/bin/nodelet --config /etc/nodelet/config.yaml",
        "Restart=always",
        "KillMode=process",
        "Delegate=yes",
        "After=containerd.service network-online.target",
        "Wants=containerd.service network-online.target",
        "OOMScoreAdjust=-999",
        "TasksMax=infinity",
        "LimitNOFILE=1048576",
    ] {
        assert!(settings.contains(&wanted), "missing {wanted}");
    }
    // Pins under /run/nodelet must stay visible to containerd and survive a restart.
    for forbidden in [
        "PrivateTmp",
        "PrivateMounts",
        "ProtectSystem",
        "RuntimeDirectory",
    ] {
        assert!(
            !settings.iter().any(|s| s.starts_with(forbidden)),
            "{forbidden} set"
        );
    }
}
