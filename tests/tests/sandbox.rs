//! Sandbox tests against the real host: namespaces pinned with util-linux `unshare`, the CNI
//! plugins from /usr/lib/cni driven by the project's conflist (scripts/cni, copied into a temp
//! conf dir), traffic from the host to the pod IP on the nodelet0 bridge (10.233.0.0/16).
//! Must run as root. Each test uses its own pod UID and tears its sandbox down, also when it
//! fails (a drop guard).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{HostAlias, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use nodelet::sandbox::{SandboxConfig, SandboxError, SandboxManager};

const RUN_DIR: &str = "/run/nodelet-tests/sandboxes";
const IPAM_DIR: &str = "/var/lib/nodelet/cni/networks/nodelet";
const CLUSTER_DNS: &str = "10.96.0.10";

fn require_root() {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "sandbox tests must run as root (they mount, create namespaces and run CNI)"
    );
}

fn conflist_template() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cni/10-nodelet.conflist")
}

/// A conf dir holding `text` as its only conflist.
fn conf_dir(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("10-nodelet.conflist"), text).unwrap();
    dir
}

fn template_conf_dir() -> tempfile::TempDir {
    conf_dir(&std::fs::read_to_string(conflist_template()).unwrap())
}

fn manager(conf: &Path, root: &Path) -> Arc<SandboxManager> {
    Arc::new(SandboxManager::new(SandboxConfig {
        run_dir: PathBuf::from(RUN_DIR),
        root_dir: root.to_path_buf(),
        cni_conf_dir: conf.to_path_buf(),
        cni_bin_dirs: vec![
            PathBuf::from("/nonexistent/cni"),
            PathBuf::from("/usr/lib/cni"),
        ],
        cluster_dns: vec![CLUSTER_DNS.into()],
        cluster_domain: "cluster.local".into(),
    }))
}

fn unique_uid(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("sbx-{tag}-{}-{nanos}", std::process::id())
}

fn pod(uid: &str, name: &str, namespace: &str, spec: PodSpec) -> Pod {
    Pod {
        metadata: ObjectMeta {
            uid: Some(uid.into()),
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        spec: Some(spec),
        ..Default::default()
    }
}

/// Tears the sandbox down when a test ends, even by a failed assertion.
struct Guard {
    mgr: Arc<SandboxManager>,
    uid: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mgr = self.mgr.clone();
        let uid = self.uid.clone();
        let res = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(mgr.teardown(&uid))
        })
        .join();
        if let Ok(Err(e)) = res {
            eprintln!("clean-up of {}: {e}", self.uid);
        }
    }
}

fn nsenter(args: &[&str]) -> String {
    let out = Command::new("nsenter").args(args).output().unwrap();
    assert!(out.status.success(), "nsenter {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_nsfs_mount(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let target = path.display().to_string();
    mountinfo.lines().any(|l| {
        let mut halves = l.split(" - ");
        let left = halves.next().unwrap_or_default();
        let fstype = halves.next().unwrap_or_default();
        left.split(' ').nth(4) == Some(target.as_str()) && fstype.starts_with("nsfs ")
    })
}

fn run_dir_is_shared_mount() -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo.lines().any(|l| {
        let left = l.split(" - ").next().unwrap_or_default();
        let fields: Vec<&str> = left.split(' ').collect();
        fields.get(4) == Some(&RUN_DIR) && fields[6..].iter().any(|f| f.starts_with("shared:"))
    })
}

/// Files in the host-local store that hold `uid` (its IP reservations).
fn ipam_reservations(uid: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(IPAM_DIR) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains(uid)))
        .collect()
}

/// GET / from a server in the pod, retried while it starts (bounded).
fn http_get(addr: SocketAddr) -> String {
    let mut last = String::new();
    for _ in 0..50 {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
                let mut body = String::new();
                s.read_to_string(&mut body).unwrap();
                return body;
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no connection to {addr}: {last}");
}

#[tokio::test]
async fn ensure_pins_namespaces_and_the_host_reaches_the_pod_ip() {
    require_root();
    let conf = template_conf_dir();
    let root = tempfile::tempdir().unwrap();
    let mgr = manager(conf.path(), root.path());
    let uid = unique_uid("reach");
    let _guard = Guard {
        mgr: mgr.clone(),
        uid: uid.clone(),
    };

    let sb = mgr
        .ensure(&pod(&uid, "reach-pod", "default", PodSpec::default()))
        .await
        .unwrap();
    let ip = sb.ip.expect("a pod IP");
    let IpAddr::V4(v4) = ip else {
        panic!("not IPv4: {ip}")
    };
    assert_eq!(v4.octets()[..2], [10, 233], "{ip}");
    assert_eq!(sb.hostname, "reach-pod");

    let run = Path::new(RUN_DIR).join(&uid);
    assert_eq!(
        sb.namespaces.net.as_deref(),
        Some(run.join("net").as_path())
    );
    assert_eq!(
        sb.namespaces.ipc.as_deref(),
        Some(run.join("ipc").as_path())
    );
    assert_eq!(
        sb.namespaces.uts.as_deref(),
        Some(run.join("uts").as_path())
    );
    for pin in ["net", "ipc", "uts"] {
        assert!(is_nsfs_mount(&run.join(pin)), "{pin} not pinned");
    }
    assert!(
        run_dir_is_shared_mount(),
        "{RUN_DIR} is not a shared mount point"
    );

    let net = format!("--net={}", run.join("net").display());
    let addrs = nsenter(&[&net, "ip", "-o", "addr", "show"]);
    assert!(
        addrs.contains(&format!("eth0    inet {ip}/16")),
        "eth0 lacks {ip}: {addrs}"
    );
    assert!(addrs.contains("lo    inet 127.0.0.1/8"), "lo down: {addrs}");
    let uts = format!("--uts={}", run.join("uts").display());
    assert_eq!(nsenter(&[&uts, "hostname"]).trim(), "reach-pod");
    // The pod's netns is not the host's.
    let host_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    let pod_net = nsenter(&[&net, "readlink", "/proc/self/ns/net"]);
    assert_ne!(pod_net.trim(), host_net.display().to_string());

    // A server inside the pod's netns, reached from the host over the bridge.
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("index.html"), "hello from the pod\n").unwrap();
    let mut httpd = Command::new("nsenter")
        .args([&net, "busybox", "httpd", "-f", "-p", "8080", "-h"])
        .arg(www.path())
        .spawn()
        .unwrap();
    let reply = http_get(SocketAddr::new(ip, 8080));
    httpd.kill().unwrap();
    httpd.wait().unwrap();
    assert!(reply.contains("hello from the pod"), "{reply}");

    mgr.teardown(&uid).await.unwrap();
    assert!(!run.exists());
}

#[tokio::test]
async fn ensure_is_idempotent_survives_a_restart_and_teardown_releases_the_ip() {
    require_root();
    let conf = template_conf_dir();
    let root = tempfile::tempdir().unwrap();
    let mgr = manager(conf.path(), root.path());
    let uid = unique_uid("restart");
    let _guard = Guard {
        mgr: mgr.clone(),
        uid: uid.clone(),
    };
    let p = pod(&uid, "restart-pod", "default", PodSpec::default());

    let first = mgr.ensure(&p).await.unwrap();
    let ip = first.ip.unwrap();
    let reservation = Path::new(IPAM_DIR).join(ip.to_string());
    assert!(reservation.exists(), "no host-local file for {ip}");
    assert_eq!(mgr.ensure(&p).await.unwrap(), first);
    assert!(mgr.list().contains(&uid));

    // A new manager, as after an agent restart: the same sandbox, no second ADD.
    let restarted = manager(conf.path(), root.path());
    assert_eq!(restarted.ensure(&p).await.unwrap(), first);
    assert_eq!(ipam_reservations(&uid), vec![reservation.clone()]);
    restarted.check(&uid).await.unwrap();
    // A pod file lost meanwhile is written again with the same content.
    let hosts = std::fs::read_to_string(&first.hosts_file).unwrap();
    std::fs::remove_file(&first.hosts_file).unwrap();
    restarted.ensure(&p).await.unwrap();
    assert_eq!(std::fs::read_to_string(&first.hosts_file).unwrap(), hosts);

    restarted.teardown(&uid).await.unwrap();
    assert!(!reservation.exists(), "{ip} still reserved");
    assert!(ipam_reservations(&uid).is_empty());
    assert!(!Path::new(RUN_DIR).join(&uid).exists());
    assert!(!first.hosts_file.exists());
    assert!(!first.resolv_file.exists());
    assert!(!first.hostname_file.exists());
    assert!(!mgr.list().contains(&uid));
    // Idempotent.
    restarted.teardown(&uid).await.unwrap();
    mgr.teardown(&uid).await.unwrap();
    assert!(matches!(
        mgr.check(&uid).await,
        Err(SandboxError::NotFound { .. })
    ));
}

#[tokio::test]
async fn teardown_tolerates_a_vanished_netns() {
    require_root();
    let conf = template_conf_dir();
    let root = tempfile::tempdir().unwrap();
    let mgr = manager(conf.path(), root.path());
    let uid = unique_uid("vanished");
    let _guard = Guard {
        mgr: mgr.clone(),
        uid: uid.clone(),
    };
    let sb = mgr
        .ensure(&pod(&uid, "vanished", "default", PodSpec::default()))
        .await
        .unwrap();
    let net = sb.namespaces.net.clone().unwrap();
    let status = Command::new("umount").arg(&net).status().unwrap();
    assert!(status.success());
    assert!(!is_nsfs_mount(&net));

    mgr.teardown(&uid).await.unwrap();
    assert!(ipam_reservations(&uid).is_empty(), "IP not released");
    assert!(!Path::new(RUN_DIR).join(&uid).exists());
}

/// What a reboot does to a sandbox: the pinned namespaces and the run dir (tmpfs) are gone;
/// the root dir, with host-local's reservations and the CNI cache, stays.
fn reboot(uid: &str) {
    let dir = Path::new(RUN_DIR).join(uid);
    for pin in ["net", "ipc", "uts"] {
        let _ = Command::new("umount").arg(dir.join(pin)).status();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn ip_reservations_are_released_after_a_reboot() {
    require_root();
    let conf = template_conf_dir();
    let root = tempfile::tempdir().unwrap();
    let mgr = manager(conf.path(), root.path());
    let uid = unique_uid("reboot");
    let _guard = Guard {
        mgr: mgr.clone(),
        uid: uid.clone(),
    };
    let p = pod(&uid, "reboot", "default", PodSpec::default());
    mgr.ensure(&p).await.unwrap();
    assert_eq!(ipam_reservations(&uid).len(), 1);

    // The pod is still wanted after the reboot: a new sandbox, and still one reservation.
    reboot(&uid);
    let again = manager(conf.path(), root.path());
    let sb = again
        .ensure(&p)
        .await
        .expect("a sandbox again after the reboot");
    assert!(sb.ip.is_some());
    assert_eq!(ipam_reservations(&uid).len(), 1, "the old IP was released");

    // The pod went while the node was down: teardown releases what only the cache knew.
    reboot(&uid);
    manager(conf.path(), root.path())
        .teardown(&uid)
        .await
        .unwrap();
    assert!(ipam_reservations(&uid).is_empty(), "IP still reserved");
    assert!(!root
        .path()
        .join("pods")
        .join(&uid)
        .join("cni.json")
        .exists());
}

#[tokio::test]
async fn statefulset_pod_gets_hostname_subdomain_hosts_and_cluster_dns() {
    require_root();
    let conf = template_conf_dir();
    let root = tempfile::tempdir().unwrap();
    let mgr = manager(conf.path(), root.path());
    let uid = unique_uid("sts");
    let _guard = Guard {
        mgr: mgr.clone(),
        uid: uid.clone(),
    };
    let spec = PodSpec {
        hostname: Some("web-0".into()),
        subdomain: Some("web".into()),
        host_aliases: Some(vec![HostAlias {
            ip: "10.233.255.254".into(),
            hostnames: Some(vec!["db.local".into()]),
        }]),
        ..Default::default()
    };
    let sb = mgr.ensure(&pod(&uid, "web-0", "prod", spec)).await.unwrap();
    let ip = sb.ip.unwrap();
    assert_eq!(
        sb.hosts_file,
        root.path().join("pods").join(&uid).join("etc-hosts")
    );

    let hosts = std::fs::read_to_string(&sb.hosts_file).unwrap();
    assert!(hosts.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"));
    assert!(hosts.contains("::1\tlocalhost ip6-localhost ip6-loopback\n"));
    assert!(
        hosts.contains(&format!(
            "\n{ip}\tweb-0.web.prod.svc.cluster.local\tweb-0\n"
        )),
        "{hosts}"
    );
    assert!(hosts.ends_with("# Entries added by HostAliases.\n10.233.255.254\tdb.local\n"));

    let resolv = std::fs::read_to_string(&sb.resolv_file).unwrap();
    let lines: Vec<&str> = resolv.lines().collect();
    assert!(
        lines[0].starts_with("search prod.svc.cluster.local svc.cluster.local cluster.local"),
        "{resolv}"
    );
    assert_eq!(
        lines[1..],
        [&format!("nameserver {CLUSTER_DNS}"), "options ndots:5"]
    );

    assert_eq!(
        std::fs::read_to_string(&sb.hostname_file).unwrap(),
        "web-0\n"
    );
    let uts = format!("--uts={}", sb.namespaces.uts.as_ref().unwrap().display());
    assert_eq!(nsenter(&[&uts, "hostname"]).trim(), "web-0");
}

#[tokio::test]
async fn host_network_pod_has_no_netns_and_the_node_hostname() {
    require_root();
    let conf = template_conf_dir();
    let root = tempfile::tempdir().unwrap();
    let mgr = manager(conf.path(), root.path());
    let uid = unique_uid("hostnet");
    let _guard = Guard {
        mgr: mgr.clone(),
        uid: uid.clone(),
    };
    let spec = PodSpec {
        host_network: Some(true),
        ..Default::default()
    };
    let sb = mgr
        .ensure(&pod(&uid, "hostnet", "default", spec))
        .await
        .unwrap();
    assert_eq!(sb.ip, None);
    assert_eq!(sb.namespaces.net, None);
    assert_eq!(sb.namespaces.uts, None);
    let ipc = sb.namespaces.ipc.clone().expect("own IPC namespace");
    assert!(is_nsfs_mount(&ipc));
    let node = Command::new("hostname").output().unwrap();
    assert_eq!(sb.hostname, String::from_utf8_lossy(&node.stdout).trim());
    let hosts = std::fs::read_to_string(&sb.hosts_file).unwrap();
    assert!(hosts.starts_with("# Kubernetes-managed hosts file (host network).\n"));
    // ClusterFirst on the host network falls back to the node's resolver.
    let resolv = std::fs::read_to_string(&sb.resolv_file).unwrap();
    assert!(!resolv.contains(CLUSTER_DNS), "{resolv}");
    assert!(ipam_reservations(&uid).is_empty());

    mgr.teardown(&uid).await.unwrap();
    assert!(!ipc.exists());
}

#[tokio::test]
async fn a_missing_plugin_is_a_cni_error_and_leaves_nothing_behind() {
    require_root();
    let template = std::fs::read_to_string(conflist_template()).unwrap();
    let mut list: serde_json::Value = serde_json::from_str(&template).unwrap();
    list["plugins"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "nodelet-missing-plugin"}));
    let conf = conf_dir(&list.to_string());
    let root = tempfile::tempdir().unwrap();
    let mgr = manager(conf.path(), root.path());
    let uid = unique_uid("broken");
    let _guard = Guard {
        mgr: mgr.clone(),
        uid: uid.clone(),
    };

    let err = mgr
        .ensure(&pod(&uid, "broken", "default", PodSpec::default()))
        .await
        .unwrap_err();
    match &err {
        SandboxError::Cni {
            uid: u,
            plugin,
            command,
            detail,
        } => {
            assert_eq!(u, &uid);
            assert_eq!(plugin, "nodelet-missing-plugin");
            assert_eq!(*command, "ADD");
            assert!(detail.contains("not found"), "{detail}");
        }
        other => panic!("not a CNI error: {other}"),
    }
    // The bridge plugin's ADD was undone: no IP kept, no pins, no run dir.
    assert!(ipam_reservations(&uid).is_empty(), "IP leaked");
    assert!(!Path::new(RUN_DIR).join(&uid).exists());
    assert!(!mgr.list().contains(&uid));
    mgr.teardown(&uid).await.unwrap();
}

#[tokio::test]
async fn a_plugin_error_carries_the_plugins_message() {
    require_root();
    // host-local refuses a range that is not a subnet; its CNI error object names the cause.
    let text = r#"{"cniVersion":"1.0.0","name":"nodelet-bad","plugins":[
        {"type":"bridge","bridge":"nodelet0","isGateway":true,
         "ipam":{"type":"host-local","ranges":[[{"subnet":"not-a-subnet"}]]}}]}"#;
    let conf = conf_dir(text);
    let root = tempfile::tempdir().unwrap();
    let mgr = manager(conf.path(), root.path());
    let uid = unique_uid("plugin-error");
    let _guard = Guard {
        mgr: mgr.clone(),
        uid: uid.clone(),
    };
    let err = mgr
        .ensure(&pod(&uid, "plugin-error", "default", PodSpec::default()))
        .await
        .unwrap_err();
    match &err {
        SandboxError::Cni { plugin, detail, .. } => {
            assert_eq!(plugin, "bridge");
            assert!(detail.contains("not-a-subnet"), "{detail}");
        }
        other => panic!("not a CNI error: {other}"),
    }
    assert!(!Path::new(RUN_DIR).join(&uid).exists());
}

#[tokio::test]
async fn teardown_unmounts_pins_in_mount_namespaces_made_later() {
    require_root();
    let conf = template_conf_dir();
    let root = tempfile::tempdir().unwrap();
    let mgr = manager(conf.path(), root.path());
    let uid = unique_uid("propagate");
    let _guard = Guard {
        mgr: mgr.clone(),
        uid: uid.clone(),
    };
    let sb = mgr
        .ensure(&pod(&uid, "propagate", "default", PodSpec::default()))
        .await
        .unwrap();
    let net = sb.namespaces.net.clone().unwrap();

    // A mount namespace made after the pin (as runc or a sandboxed service makes one), a
    // slave of the host's: it holds a copy of the pin.
    let mut other = Command::new("unshare")
        .args(["--mount", "--propagation", "slave", "sleep", "60"])
        .spawn()
        .unwrap();
    let other_mounts = format!("/proc/{}/mountinfo", other.id());
    let pin_text = net.display().to_string();
    let mut seen = false;
    for _ in 0..50 {
        let text = std::fs::read_to_string(&other_mounts).unwrap_or_default();
        // The child runs unshare first; its mountinfo differs from ours once it has.
        if std::fs::read_link(format!("/proc/{}/ns/mnt", other.id())).ok()
            != std::fs::read_link("/proc/self/ns/mnt").ok()
        {
            seen = text.contains(&pin_text);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen, "the new mount namespace has no copy of {pin_text}");

    mgr.teardown(&uid).await.unwrap();
    let text = std::fs::read_to_string(&other_mounts).unwrap();
    other.kill().unwrap();
    other.wait().unwrap();
    assert!(
        !text.contains(&pin_text),
        "the copy of the pin outlived the teardown"
    );
}
