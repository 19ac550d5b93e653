//! Agent tier: what the node's ports serve and to whom (the read-only port only the kubelet's
//! read-only set, logs and events behind the secure port's authentication and authorization or
//! on the root-only local socket), the addresses they bind by default, and how logs are served.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use nodelet_tests::agent_support::{Agent, ClientPki, BUSYBOX};

const MINUTE: Duration = Duration::from_secs(60);

fn ticker(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done']\n"
    )
}

/// The HTTP status of a GET on the read-only port.
fn read_only_status(agent: &Agent, path: &str) -> u16 {
    let url = format!("http://127.0.0.1:{}{path}", agent.port);
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg(&url)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}

#[test]
fn the_read_only_port_serves_only_the_kubelets_read_only_set() {
    let agent = Agent::start("ports-ro");
    agent.write_manifest("ticker.yaml", &ticker("ticker"));
    agent.wait_phase("ticker", "Running", MINUTE);
    agent.wait_until("ticks in the log", MINUTE, |a| {
        a.container_logs("default", "ticker", "main", "")
            .is_some_and(|l| l.contains("tick 1\n"))
    });
    for path in [
        "/containerLogs/default/ticker/main",
        "/events",
        "/exec/default/ticker/main?command=ls",
        "/attach/default/ticker/main",
        "/portForward/default/ticker",
        "/run/default/ticker/main",
        "/configz",
        "/debug/pprof/",
        "/logs/",
    ] {
        assert_eq!(
            read_only_status(&agent, path),
            404,
            "{path} on the read-only port"
        );
    }
    for path in [
        "/healthz",
        "/pods",
        "/metrics",
        "/metrics/resource",
        "/stats/summary",
    ] {
        assert_eq!(
            read_only_status(&agent, path),
            200,
            "{path} on the read-only port"
        );
    }

    // Root on the node reads logs and events on the local socket, which only root may open.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let socket = std::fs::metadata(agent.local_socket()).expect("the local socket");
    assert_eq!(socket.permissions().mode() & 0o777, 0o600);
    assert_eq!(socket.uid(), 0);
    assert!(!agent.events().is_empty(), "events on the local socket");
}

#[test]
fn the_secure_port_needs_a_client_certificate_and_serves_an_allowed_one() {
    let agent = Agent::start("ports-secure");
    agent.write_manifest("ticker.yaml", &ticker("ticker"));
    agent.wait_phase("ticker", "Running", MINUTE);
    let (_, code, body) = agent.https_as("/containerLogs/default/ticker/main", 10, None);
    assert_eq!(code, 401, "no client certificate: {body}");
    let (_, code, _) = agent.https_as("/healthz", 10, None);
    assert_eq!(code, 401, "anonymous is refused everywhere");
    agent.wait_until("ticks through the secure port", MINUTE, |a| {
        let (_, code, body) = a.https("/containerLogs/default/ticker/main", 10);
        code == 200 && body.contains("tick 1\n")
    });
}

#[test]
fn standalone_without_an_authorizer_the_secure_port_refuses_every_request() {
    // A client CA but no authorizer (no API server, no --authorization-mode): nobody is
    // allowed, and the agent says so when it starts.
    let mut agent = Agent::unstarted("ports-noauthz");
    let ca = agent.port_args[7].clone();
    agent.port_args.truncate(8);
    assert!(ca.ends_with("ca.crt"), "{:?}", agent.port_args);
    agent.spawn();
    let (_, code, _) = agent.https_as("/containerLogs/default/x/y", 10, None);
    assert_eq!(code, 401);
    let (_, code, body) = agent.https("/containerLogs/default/x/y", 10);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("user=test-admin") && body.contains("subresource=proxy"),
        "{body}"
    );
    let log = agent.agent_log();
    assert!(log.contains("every request is refused"), "{log}");
    drop(agent);

    // Neither a client CA nor an authorizer: every request is refused, a certificate or not.
    let mut agent = Agent::unstarted("ports-nothing");
    agent.port_args.truncate(6);
    agent.spawn();
    let (_, code, _) = agent.https_as("/healthz", 10, None);
    assert_eq!(code, 401);
    let (_, code, _) = agent.https("/healthz", 10);
    assert_eq!(code, 401, "a certificate no CA vouches for names nobody");
    let log = agent.agent_log();
    assert!(log.contains("no --client-ca-file"), "{log}");
}

#[test]
fn a_certificate_from_another_ca_is_not_a_client() {
    // The authorizer is the agent's own AlwaysAllow here; what tells users apart on a real node is
    // the API server's SubjectAccessReview (the cluster tier). A certificate from another CA is
    // not a client at all.
    let agent = Agent::start("ports-strangers");
    let other = ClientPki::make(&agent.dir.path().join("other-pki"), "stranger");
    let (cert, key) = other.issue("stranger", "stranger", None);
    let (rc, code, _) = agent.https_as("/healthz", 10, Some((&cert, &key)));
    assert!(
        code != 200,
        "a stranger's certificate is refused (curl {rc}, HTTP {code})"
    );
    let (_, code, body) = agent.https("/healthz", 10);
    assert_eq!((code, body.as_str()), (200, "ok"));
}

/// The TCP addresses process `pid` listens on (from /proc/net/tcp{,6} and its fds).
fn listening(pid: u32) -> BTreeSet<SocketAddr> {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                continue;
            }
            let (ip, port) = f[1].split_once(':').unwrap();
            let port = u16::from_str_radix(port, 16).unwrap();
            let words: Vec<[u8; 4]> = (0..ip.len() / 8)
                .map(|i| {
                    u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16)
                        .unwrap()
                        .to_le_bytes()
                })
                .collect();
            let ip: std::net::IpAddr = match words.len() {
                1 => std::net::Ipv4Addr::from(words[0]).into(),
                _ => std::net::Ipv6Addr::from(
                    <[u8; 16]>::try_from(words.concat()).expect("16 bytes"),
                )
                .into(),
            };
            out.insert(SocketAddr::new(ip, port));
        }
    }
    out
}

#[test]
fn the_secure_port_listens_on_all_addresses_and_the_read_only_port_only_on_loopback() {
    // Flags alone (the kubelet's flag defaults): the read-only port is on, on loopback only.
    let mut agent = Agent::unstarted("ports-flags");
    let (ro, secure) = (agent.port, agent.secure_port);
    agent.port_args.truncate(4);
    agent.spawn();
    let expected: BTreeSet<SocketAddr> = [
        format!("0.0.0.0:{secure}").parse().unwrap(),
        format!("127.0.0.1:{ro}").parse().unwrap(),
    ]
    .into();
    assert_eq!(listening(agent.pid().unwrap()), expected);
    let log = agent.agent_log();
    assert!(log.contains("no --client-ca-file"), "{log}");
    drop(agent);

    // A configuration file (the kubelet's file defaults): no read-only port at all.
    let mut agent = Agent::unstarted("ports-file");
    let secure = agent.secure_port;
    let file = agent.dir.path().join("config.yaml");
    std::fs::write(
        &file,
        format!("apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nport: {secure}\n"),
    )
    .unwrap();
    agent.port_args = vec!["--config".into(), file.to_string_lossy().into_owned()];
    agent.spawn();
    let expected: BTreeSet<SocketAddr> = [format!("0.0.0.0:{secure}").parse().unwrap()].into();
    assert_eq!(listening(agent.pid().unwrap()), expected);
}

/// A raw GET on the local socket: (headers, the body's chunks as sent).
fn local_chunks(agent: &Agent, path: &str) -> (String, Vec<Vec<u8>>) {
    let headers = agent.dir.path().join("headers.txt");
    let out = Command::new("curl")
        .args(["-sS", "--raw", "--max-time", "30", "-D"])
        .arg(&headers)
        .arg("--unix-socket")
        .arg(agent.local_socket())
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("curl");
    assert!(out.status.success(), "{out:?}");
    let headers = std::fs::read_to_string(&headers).unwrap();
    if !headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (headers, vec![out.stdout]);
    }
    let mut raw = out.stdout.as_slice();
    let mut chunks = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size");
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap(), 16).unwrap();
        raw = &raw[eol + 2..];
        if size == 0 {
            break;
        }
        chunks.push(raw[..size].to_vec());
        raw = &raw[size + 2..];
    }
    (headers, chunks)
}

#[test]
fn logs_stream_in_chunks_as_bytes_and_tail_and_limit_without_reading_it_all() {
    let agent = Agent::start("ports-logs");
    agent.write_manifest(
        "bytes.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bytes\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'printf \"\\377\\376 raw\\n\"; seq 1 50000; sleep 3600']\n"
        ),
    );
    agent.wait_phase("bytes", "Running", MINUTE);
    agent.wait_until("the whole output in the log", MINUTE, |a| {
        a.container_logs("default", "bytes", "main", "tailLines=1")
            .is_some_and(|l| l == "50000\n")
    });
    let path = "/containerLogs/default/bytes/main";
    let mut expected = b"\xff\xfe raw\n".to_vec();
    expected.extend((1..=50000).flat_map(|i| format!("{i}\n").into_bytes()));

    // Not UTF-8: served as the bytes the container wrote, in more than one chunk.
    let (headers, chunks) = local_chunks(&agent, path);
    assert!(chunks.len() > 1, "{} chunk(s); {headers}", chunks.len());
    assert_eq!(chunks.concat(), expected);

    let (_, tail) = local_chunks(&agent, &format!("{path}?tailLines=3"));
    assert_eq!(tail.concat(), b"49998\n49999\n50000\n");
    let (_, limited) = local_chunks(&agent, &format!("{path}?limitBytes=9"));
    assert_eq!(limited.concat(), b"\xff\xfe raw\n1\n");
    let (_, both) = local_chunks(&agent, &format!("{path}?tailLines=2&limitBytes=8"));
    assert_eq!(both.concat(), b"49999\n50");
}

/// A pod that holds 40 MiB in its shared memory and one that spins.
const HOG: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: hog\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: mem\n    image: BUSYBOX\n    command: [sh, -c, 'dd if=/dev/zero of=/dev/shm/fill bs=1M count=40 && touch /tmp/filled && sleep 3600']\n  - name: cpu\n    image: BUSYBOX\n    command: [sh, -c, 'while :; do :; done']\n";

/// Parses Prometheus text with a parser nodelet did not write; every sample keyed by its name
/// and its `container` label.
fn samples(text: &str) -> Vec<prometheus_parse::Sample> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines)
        .expect("Prometheus text")
        .samples
}

fn sample<'a>(
    samples: &'a [prometheus_parse::Sample],
    name: &str,
    container: Option<&str>,
) -> Option<&'a prometheus_parse::Sample> {
    samples
        .iter()
        .find(|s| s.metric == name && s.labels.get("container") == container)
}

fn value(s: &prometheus_parse::Sample) -> f64 {
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => panic!("a plain value: {s:?}"),
    }
}

/// What metrics-server reads for `kubectl top` (its decoder: `container_cpu_usage_seconds_total`,
/// `container_memory_working_set_bytes`, `node_*`, with `container`, `pod`, `namespace` labels
/// and sample times; a container with a zero CPU or memory is dropped) and the summary API.
#[test]
fn resource_usage_is_served_as_the_kubelets_summary_and_resource_metrics() {
    let agent = Agent::start("ports-stats");
    agent.write_manifest("hog.yaml", &HOG.replace("BUSYBOX", BUSYBOX));
    let pod = agent.wait_phase("hog", "Running", MINUTE);
    let namespace = pod.metadata.namespace.clone().unwrap();
    let cpu_seconds = |a: &Agent| {
        let text = a.local_get("/metrics/resource").unwrap_or_default();
        sample(
            &samples(&text),
            "container_cpu_usage_seconds_total",
            Some("cpu"),
        )
        .map(value)
    };
    agent.wait_until(
        "the spinning container used half a CPU second",
        MINUTE,
        |a| cpu_seconds(a).is_some_and(|s| s > 0.5),
    );
    agent.wait_until("40 MiB held in the mem container", MINUTE, |a| {
        let text = a.local_get("/metrics/resource").unwrap_or_default();
        sample(
            &samples(&text),
            "container_memory_working_set_bytes",
            Some("mem"),
        )
        .is_some_and(|s| value(s) >= (40 << 20) as f64)
    });

    let text = agent
        .local_get("/metrics/resource")
        .expect("/metrics/resource");
    let all = samples(&text);
    let now = jiff::Timestamp::now();
    for container in ["mem", "cpu"] {
        for name in [
            "container_cpu_usage_seconds_total",
            "container_memory_working_set_bytes",
        ] {
            let s =
                sample(&all, name, Some(container)).unwrap_or_else(|| panic!("{name} {container}"));
            assert!(value(s) > 0.0, "{name} {container}: {s:?}");
            assert_eq!(s.labels.get("pod"), Some("hog"));
            assert_eq!(s.labels.get("namespace"), Some(namespace.as_str()));
            let age = now.as_millisecond() - s.timestamp.timestamp_millis();
            assert!(
                (0..60_000).contains(&age),
                "{name}: a sample time of now, {age} ms ago"
            );
        }
        // The start time is the container status's startedAt.
        let started = pod
            .status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.name == container)
            .and_then(|c| c.state.as_ref()?.running.as_ref()?.started_at.clone())
            .expect("startedAt");
        let s = sample(&all, "container_start_time_seconds", Some(container)).expect("start time");
        assert_eq!(value(s).floor() as i64, started.0.as_second());
    }
    for name in [
        "node_cpu_usage_seconds_total",
        "node_memory_working_set_bytes",
    ] {
        assert!(
            sample(&all, name, None).is_some_and(|s| value(s) > 0.0),
            "{name}"
        );
    }
    let pod_memory = sample(&all, "pod_memory_working_set_bytes", None).expect("pod memory");
    assert!(value(pod_memory) >= (40 << 20) as f64);
    assert_eq!(
        sample(&all, "resource_scrape_error", None).map(value),
        Some(0.0)
    );

    // The summary API: the same containers, and a CPU rate once two reads are a second apart.
    let summary = |a: &Agent| -> serde_json::Value {
        serde_json::from_str(&a.local_get("/stats/summary").unwrap_or_default()).unwrap_or_default()
    };
    summary(&agent);
    std::thread::sleep(Duration::from_millis(1500));
    let json = summary(&agent);
    assert!(json["node"]["nodeName"].is_string(), "{json}");
    assert!(json["node"]["memory"]["availableBytes"].as_u64() > Some(0));
    assert!(json["node"]["fs"]["capacityBytes"].as_u64() > Some(0));
    let hog = json["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["podRef"]["name"] == "hog")
        .expect("hog in the summary");
    assert_eq!(hog["podRef"]["uid"].as_str(), pod.metadata.uid.as_deref());
    let spinning = hog["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "cpu")
        .unwrap();
    assert!(
        spinning["cpu"]["usageNanoCores"].as_u64() > Some(50_000_000),
        "a spinning container's rate: {spinning}"
    );
    let mem = hog["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "mem")
        .unwrap();
    assert!(
        mem["memory"]["workingSetBytes"].as_u64() >= Some(40 << 20),
        "{mem}"
    );

    // The kubelet's own gauges under its names.
    let metrics = samples(&agent.metrics());
    let running = metrics.iter().find(|s| {
        s.metric == "kubelet_running_containers"
            && s.labels.get("container_state") == Some("running")
    });
    assert_eq!(running.map(value), Some(2.0));
    assert_eq!(
        metrics
            .iter()
            .find(|s| s.metric == "kubelet_running_pods")
            .map(value),
        Some(1.0)
    );
    assert!(metrics
        .iter()
        .any(|s| s.metric == "kubelet_node_name" && value(s) == 1.0));

    // Gone pods leave the summary.
    agent.remove_manifest("hog.yaml");
    agent.wait_until("the hog pod gone from the summary", MINUTE, |a| {
        summary(a)["pods"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["podRef"]["name"] != "hog"))
    });
}
