//! The node's secure port as a real cluster reaches it: the API server dials the node's address,
//! not loopback.

use super::*;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use std::net::Ipv4Addr;

/// A network namespace of the test's with a veth pair into it: `host_if` (this namespace's end,
/// `host_ip`) and the namespace's end (`peer_ip`), a /30 of 10.234.0.0/16, which nothing else
/// on the machine uses, picked from the test's PID. Dropping it deletes both.
struct VethNetns {
    name: String,
    host_if: String,
    host_ip: Ipv4Addr,
    peer_ip: Ipv4Addr,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl VethNetns {
    fn create() -> VethNetns {
        let pid = std::process::id();
        let base = (pid % 64) as u8 * 4;
        let subnet = |host: u8| Ipv4Addr::new(10, 234, (pid / 64 % 256) as u8, base + host);
        let net = VethNetns {
            name: format!("nodelet-veth-{pid}"),
            host_if: format!("nlv{pid}h"),
            host_ip: subnet(1),
            peer_ip: subnet(2),
        };
        let taken = Command::new("ip")
            .args(["-o", "addr", "show", "to", &format!("{}/30", subnet(0))])
            .output()
            .expect("ip addr");
        assert!(
            taken.stdout.is_empty(),
            "{}/30 is in use on this machine: {}",
            subnet(0),
            String::from_utf8_lossy(&taken.stdout)
        );
        let (ns, host_if, peer_if) = (&net.name, &net.host_if, &format!("nlv{pid}n"));
        let host_cidr = format!("{}/30", net.host_ip);
        let peer_cidr = format!("{}/30", net.peer_ip);
        ip(&["netns", "add", ns]);
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", ns,
        ]);
        ip(&["addr", "add", &host_cidr, "dev", host_if]);
        ip(&["link", "set", host_if, "up"]);
        ip(&["-n", ns, "addr", "add", &peer_cidr, "dev", peer_if]);
        ip(&["-n", ns, "link", "set", peer_if, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        net
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Bytes this namespace's end of the pair has received (sent from the namespace).
    fn host_rx_bytes(&self) -> u64 {
        let file = format!("/sys/class/net/{}/statistics/rx_bytes", self.host_if);
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for VethNetns {
    fn drop(&mut self) {
        // The pair goes with the namespace; deleting this end first also frees the address
        // while a socket still holds the namespace.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A child process of the test's, killed and reaped when dropped (also when the test fails).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client certificate and key for `system:node:<node>` (group `system:nodes`), issued as a
/// kubelet's client certificate is: a CertificateSigningRequest for the signer
/// `kubernetes.io/kube-apiserver-client-kubelet`, approved by the admin and signed by the
/// controller-manager. The request is deleted at the end with the returned guard.
async fn node_credential(
    c: &Cluster,
    node: &str,
) -> (String, String, DeleteAtEnd<CertificateSigningRequest>) {
    use base64::Engine;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{node}"));
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    let request = params.serialize_request(&key).unwrap().pem().unwrap();
    let name = format!("nodelet-veth-{node}-{}", std::process::id());
    let guard = DeleteAtEnd::new(&name);
    let csr: CertificateSigningRequest = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(request),
            "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
            "usages": ["digital signature", "client auth"],
            "expirationSeconds": 3600,
        },
    }))
    .unwrap();
    let csrs: Api<CertificateSigningRequest> = Api::all(c.admin.clone());
    csrs.create(&PostParams::default(), &csr)
        .await
        .expect("create the CertificateSigningRequest");
    let approval = serde_json::json!({"status": {"conditions": [{
        "type": "Approved", "status": "True", "reason": "NodeletClusterTest",
        "message": "a node identity for a cluster test",
    }]}});
    csrs.patch_approval(
        &name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(approval),
    )
    .await
    .expect("approve the CertificateSigningRequest");
    let d = Deadline::new("the controller-manager to sign the node's certificate", 60);
    let cert = loop {
        let signed = csrs.get(&name).await.expect("get the request");
        if let Some(cert) = signed.status.and_then(|s| s.certificate) {
            break String::from_utf8(cert.0).expect("a PEM certificate");
        }
        d.tick().await;
    };
    (cert, key.serialize_pem(), guard)
}

/// `kubectl logs` (the upstream client, through the API server) reaches an agent whose secure
/// port is on a non-loopback address, as on a real cluster.
///
/// The agent runs in a network namespace the test makes, joined to this one by a veth pair;
/// the API server (on 127.0.0.1 here) dials the node's `Hostname` address
/// (`--kubelet-preferred-address-types=Hostname`), so the node is named by its address on the
/// veth (`--hostname-override=<IP>`). That is what the kubelet does with an IP as its hostname:
/// it reports it verbatim as the `Hostname` address and, without `--node-ip`, as `InternalIP`
/// (nodelet does the same). A name mapped in /etc/hosts would work too, but the file is the
/// machine's, shared with every other test and process, and the API server's resolver caches
/// it; an IP names the node without touching anything outside the test. The node's identity
/// (`system:node:<IP>`) is a client certificate issued through a CertificateSigningRequest,
/// as the kubelet's is. The agent reaches the API server through a relay on this end of the
/// veth, verifying the server's certificate for the name `kubernetes` (`tls-server-name`; the
/// certificate does not name the relay's address), and the registry through a relay on the
/// namespace's loopback. The request goes over the veth: the agent's peer on the secure port
/// is this end's address, and this end received at least the log's size while serving it;
/// anonymous clients get 401 on that address from either side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn kubectl_logs_reach_an_agent_across_a_veth_pair() {
    let Some(c) = cluster("kubectl_logs_reach_an_agent_across_a_veth_pair").await else {
        return;
    };
    let net = VethNetns::create();
    let node = net.peer_ip.to_string();
    let _node_gone = DeleteAtEnd::<Node>::new(&node);
    let (cert, key, _csr_gone) = node_credential(&c, &node).await;
    let registry: std::net::SocketAddr = IMAGE.split('/').next().unwrap().parse().unwrap();
    let _registry = Proxy::in_netns(
        Some(net.path()),
        Endpoint::Tcp(registry),
        Endpoint::Tcp(registry),
    );
    let (_relay, kubeconfig, _kubeconfig_dir) =
        api_proxy_on(&c.node_kubeconfig, (net.host_ip, 0).into(), |doc| {
            use base64::Engine;
            let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
            doc["clusters"][0]["cluster"]["tls-server-name"] = "kubernetes".into();
            doc["users"][0]["user"]["client-certificate-data"] = b64(&cert).into();
            doc["users"][0]["user"]["client-key-data"] = b64(&key).into();
        });
    let mut agent = Agent::unstarted(&node, &kubeconfig, CONTAINERD_NS, &[]);
    agent.netns = Some(net.path());
    agent.restart();
    let ns = TestNamespace::create(&c, "veth").await;
    let here = Cluster {
        admin: c.admin.clone(),
        node: node.clone(),
        node_kubeconfig: kubeconfig.clone(),
    };
    wait_node_ready(&here).await;
    let status = Api::<Node>::all(c.admin.clone())
        .get(&node)
        .await
        .unwrap()
        .status
        .unwrap();
    let addresses: Vec<(String, String)> = status
        .addresses
        .unwrap_or_default()
        .into_iter()
        .map(|a| (a.type_, a.address))
        .collect();
    assert_eq!(
        addresses,
        [
            ("InternalIP".to_string(), node.clone()),
            ("Hostname".to_string(), node.clone())
        ],
        "the kubelet's addresses for a node named by its IP"
    );

    // About 1.8 MB of output, then the container sleeps.
    let pad = "x".repeat(80);
    let lines = 20_000;
    let pods = ns.pods();
    let mut p = pod("talker", &node, 2);
    let container = &mut p.spec.as_mut().unwrap().containers[0];
    container.command = Some(vec![
        "sh".into(),
        "-c".into(),
        format!(
            "i=0; while [ $i -lt {lines} ]; do echo \"line $i {pad}\"; i=$((i+1)); done; \
             echo done; exec sleep 3600"
        ),
    ]);
    let expected: String = (0..lines)
        .map(|i| format!("line {i} {pad}\n"))
        .chain(["done\n".to_string()])
        .collect();
    create_until_ready(&pods, &p).await;

    let kubectl_logs = |extra: &[&str]| {
        let mut command = Command::new("kubectl");
        command.args(["logs", "-n", &ns.name, "talker"]).args(extra);
        command
    };
    let d = Deadline::new("the whole output through kubectl logs", 120);
    let (logs, received) = loop {
        let before = net.host_rx_bytes();
        let out = kubectl_logs(&[]).output().expect("kubectl logs");
        let after = net.host_rx_bytes();
        let logs = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "kubectl logs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if logs.ends_with("done\n") {
            break (logs, after - before);
        }
        d.tick().await;
    };
    assert!(
        logs == expected,
        "kubectl logs returned {} bytes, not the {} the container wrote",
        logs.len(),
        expected.len()
    );
    assert!(
        received >= expected.len() as u64,
        "the log went over the veth: {received} bytes received on it while {} were served",
        expected.len()
    );

    // A followed log keeps its connection open: the agent's peer is this end of the pair.
    let mut follow = Reaped(
        kubectl_logs(&["-f", "--tail=1"])
            .stdout(Stdio::null())
            .spawn()
            .expect("kubectl logs -f"),
    );
    let netns = net.path();
    let nsenter = format!("--net={}", netns.display());
    let d = Deadline::new("the API server's connection to the secure port", 60);
    let peer = loop {
        let out = Command::new("nsenter")
            .args([
                &nsenter,
                "ss",
                "-Htn",
                "state",
                "established",
                "sport",
                "=",
                ":10250",
            ])
            .output()
            .expect("ss");
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(line) = table.lines().next() {
            break line.to_string();
        }
        assert!(
            follow.0.try_wait().unwrap().is_none(),
            "kubectl logs -f ended"
        );
        d.tick().await;
    };
    drop(follow);
    eprintln!(
        "kubectl logs: {} bytes served, {received} received on the veth; the secure port's \
         connection: {peer}",
        logs.len()
    );
    let fields: Vec<&str> = peer.split_whitespace().collect();
    assert_eq!(
        fields.get(2),
        Some(&format!("{node}:10250").as_str()),
        "{peer}"
    );
    assert!(
        fields
            .get(3)
            .is_some_and(|p| p.starts_with(&format!("{}:", net.host_ip))),
        "the API server came over the veth: {peer}"
    );

    // Anonymous clients are refused on that address, from this side and from the namespace's.
    let url = format!("https://{node}:10250/containerLogs/{}/talker/app", ns.name);
    assert_eq!(
        https_status(Command::new("curl"), &url),
        "401",
        "from outside"
    );
    let mut inside = Command::new("nsenter");
    inside.args([&nsenter, "curl"]);
    assert_eq!(
        https_status(inside, &url),
        "401",
        "from inside the namespace"
    );
}
