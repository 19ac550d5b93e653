//! The agent: builds every component once, in one fixed order, runs the pod sources, the pod
//! manager and the read-only server, and on shutdown stops the agent but never the pods.
//!
//! Start order: directories → the node lock (`lock`: no second agent on the same root, run
//! dir or containerd namespace) → runtime (retried until containerd answers) → the API client
//! (cluster mode) → recorder, status, prober, sandboxes, volumes, each made with what it needs
//! of the client (no setter afterwards) → manifest folder, cluster-mode tasks → pod manager
//! (with admission; recovers containers
//! from containerd) → merge of the sources →
//! first full sync (orphans are cleaned up only then) → server → READY=1. CSI node plugins are
//! discovered from `<root>/plugins_registry` all along.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cluster::{ClusterClient, ClusterConfig};
use crate::config::Config;
use crate::events::{EventType, Recorder};
use crate::pod::manager::PodManager;
use crate::pod::{Desired, NodeFacts, NodeHost, PodContext};
use crate::probe::Prober;
use crate::runtime::{Runtime, RuntimeConfig};
use crate::sandbox::{SandboxConfig, SandboxManager};
use crate::server::secure::{self, SecureConfig};
use crate::server::{self, ServerState};
use crate::source::manifest::{FilePods, ManifestSource};
use crate::source::merge::{Plan, SourceMerge};
use crate::stats::{Cgroups, Stats};
use crate::status::StatusManager;
use crate::store::ObjectStore;
use crate::volume::downward::NodeAllocatable;
use crate::volume::{TokenSource, VolumeConfig, VolumeManager};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A directory the agent needs could not be created.
    #[error("creating {path}: {source}")]
    Dir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The read-only port could not be bound.
    #[error("binding the read-only port {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    /// Shutdown was asked for before containerd ever answered.
    #[error("stopped before containerd answered")]
    NoRuntime,
    /// Cluster mode could not start (an unusable kubeconfig).
    #[error("{0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The secure port could not start (TLS material or the address).
    #[error("the secure port: {0}")]
    Secure(#[from] secure::BindError),
    /// Another agent holds the root dir, the run dir or the containerd namespace.
    #[error("{0}")]
    Lock(#[from] crate::lock::LockError),
}

/// How long shutdown waits for workers to stop (they never stop containers).
const DRAIN: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let root = CancellationToken::new();
    {
        let root = root.clone();
        tokio::spawn(async move {
            shutdown.await;
            root.cancel();
        });
    }
    for dir in [&config.root_dir, &config.log_dir, &config.run_dir] {
        std::fs::create_dir_all(dir).map_err(|source| AgentError::Dir {
            path: dir.clone(),
            source,
        })?;
    }

    // Before anything reads or changes node state: one agent per root, run dir and namespace.
    let _lock = crate::lock::NodeLock::acquire(
        &crate::lock::Claim {
            root_dir: &config.root_dir,
            run_dir: &config.run_dir,
            runtime_endpoint: &config.runtime_endpoint,
            namespace: &config.containerd_namespace,
        },
        std::path::Path::new(crate::lock::NAMESPACE_LOCK_DIR),
    )?;
    let runtime = connect_runtime(&config, &root).await?;
    let store = ObjectStore::new();
    let host_ip = config.node_ip.or_else(node_ip);
    // The API client first: the recorder, the volume manager and the secure port are made
    // with what they write or ask through it.
    let cluster = match ClusterConfig::from_config(&config) {
        Some(mut cluster) => {
            cluster.node_ip = host_ip;
            info!(kubeconfig = %cluster.kubeconfig.display(), "joining the cluster");
            Some(ClusterClient::connect(cluster).await?)
        }
        None => None,
    };
    let recorder = Recorder::new(
        &config.node_name,
        cluster.as_ref().map(ClusterClient::event_sink),
    );
    let status = StatusManager::new();
    let prober = Arc::new(Prober::new(Arc::new(runtime.clone()), recorder.clone()));
    let sandboxes = Arc::new(SandboxManager::new(SandboxConfig {
        run_dir: config.run_dir.join("sandboxes"),
        root_dir: config.root_dir.clone(),
        cni_conf_dir: config.cni_conf_dir.clone(),
        cni_bin_dirs: config.cni_bin_dirs.clone(),
        cluster_dns: config.cluster_dns.clone(),
        cluster_domain: config.cluster_domain.clone(),
    }));
    // The node's allocatable, read once: admission, downward API volumes and env use it.
    let allocatable = NodeAllocatable::from_host(&config.root_dir);
    let tokens = cluster.as_ref().map(|c| c.tokens() as Arc<dyn TokenSource>);
    let volumes = VolumeManager::new(
        VolumeConfig {
            root_dir: config.root_dir.clone(),
            plugins_registry: config.root_dir.join("plugins_registry"),
            allocatable,
        },
        store.clone(),
        tokens,
    );
    {
        let volumes = volumes.clone();
        let token = root.clone();
        tokio::spawn(async move { volumes.plugins().watch(token).await });
    }
    // The Webhook mode asks the API; with no API server it allows nothing.
    let authorization = match (config.authorization_webhook, &cluster) {
        (true, Some(cluster)) => secure::Authorization::Webhook(cluster.authorizer()),
        (true, None) => secure::Authorization::DenyAll,
        (false, _) => secure::Authorization::AlwaysAllow,
    };
    let (manifest_tx, mut manifest_rx) = watch::channel::<FilePods>(None);
    if let Some(dir) = config.pod_manifest_path.clone() {
        info!(dir = %dir.display(), "reading pods from the manifest folder");
        tokio::spawn(watch_manifests(
            ManifestSource::new(dir, &config.node_name),
            config.file_check_frequency,
            store.clone(),
            recorder.clone(),
            manifest_tx,
            root.clone(),
        ));
    } else {
        manifest_tx.send_replace(Some(Vec::new()));
    }
    let api = match cluster {
        Some(cluster) => {
            let check_runtime = runtime.clone();
            let runtime_info = crate::cluster::RuntimeInfo {
                version: runtime.version().await.unwrap_or_default(),
                check: Arc::new(move || {
                    let runtime = check_runtime.clone();
                    Box::pin(
                        async move { runtime.version().await.map(drop).map_err(|e| e.to_string()) },
                    )
                }),
            };
            let agent = cluster.start(
                manifest_rx.clone(),
                store.clone(),
                status.clone(),
                recorder.clone(),
                runtime_info,
                root.child_token(),
            );
            agent.start_csi_node(volumes.plugins().subscribe(), root.child_token());
            // Static pods run as cluster mode names them (mirrored in the API).
            manifest_rx = agent.static_pods;
            Some(ApiPods {
                desired: agent.desired,
                synced: agent.synced,
            })
        }
        None => None,
    };
    let streaming = server::stream::Streaming {
        runtime: runtime.clone(),
        sandbox_dir: config.run_dir.join("sandboxes"),
        idle_timeout: config.streaming_connection_idle_timeout,
    };
    let ctx = Arc::new(PodContext {
        node: NodeFacts {
            name: config.node_name.clone(),
            ip: host_ip,
            root_dir: config.root_dir.clone(),
            log_dir: config.log_dir.clone(),
            allocatable,
        },
        runtime: Arc::new(runtime),
        host: Arc::new(NodeHost::new(sandboxes, volumes)),
        prober: prober.clone(),
        status: status.clone(),
        recorder: recorder.clone(),
        store: store.clone(),
    });
    let admission = crate::admission::NodeAdmission {
        max_pods: config.max_pods as usize,
        allocatable,
        labels: crate::admission::node_labels(&config.node_name, &config.node_labels),
        allowed_unsafe_sysctls: config.allowed_unsafe_sysctls.clone(),
    };
    let manager = PodManager::new(ctx, Some(admission), &root);
    if let Err(e) = manager.recover().await {
        warn!(error = %e, "could not list containers; pods will be recreated as needed");
    }

    tokio::spawn(sync_pods(manager.clone(), manifest_rx, api, root.clone()));
    tokio::spawn(crate::memory::give_back_when_settled(
        status.subscribe(),
        root.clone(),
    ));

    let state = ServerState {
        status: status.clone(),
        recorder: recorder.clone(),
        metrics: Arc::new(move || prober.metrics_text()),
        log_dir: config.log_dir.clone(),
        streaming: Some(streaming),
        stats: Arc::new(Stats::new(
            Cgroups::of_host(),
            &config.node_name,
            &config.root_dir,
            &config.log_dir,
        )),
    };
    let mut server_tasks = Vec::new();
    if config.read_only_port != 0 {
        // Unauthenticated: on loopback only, whatever --address says.
        let addr = format!("127.0.0.1:{}", config.read_only_port);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| AgentError::Bind {
                addr: addr.clone(),
                source,
            })?;
        info!(%addr, "serving the read-only endpoint");
        let token = root.clone();
        let state = state.clone();
        server_tasks.push(tokio::spawn(async move {
            let served = server::serve(listener, state, async move { token.cancelled().await });
            if let Err(e) = served.await {
                warn!(error = %e, "the read-only endpoint stopped");
            }
        }));
    }
    if config.port != 0 {
        let mut serving_names = vec![config.node_name.clone(), "localhost".into()];
        serving_names.extend(host_ip.map(|ip| ip.to_string()));
        serving_names.push("127.0.0.1".into());
        let addr = format!("{}:{}", config.address, config.port);
        let bound = secure::bind(SecureConfig {
            addr: addr.clone(),
            node_name: config.node_name.clone(),
            tls_cert_file: config.tls_cert_file.clone(),
            tls_private_key_file: config.tls_private_key_file.clone(),
            cert_dir: config.root_dir.join("pki"),
            serving_names,
            client_ca_file: config.client_ca_file.clone(),
            authorization,
        })
        .await?;
        info!(%addr, webhook = config.authorization_webhook, "serving the secure port");
        let token = root.clone();
        let state = state.clone();
        server_tasks.push(tokio::spawn(secure::serve(bound, state, async move {
            token.cancelled().await
        })));
    }

    // Last, so that an agent answering on its socket has bound its ports too.
    let (local, socket) =
        server::local::bind(&config.run_dir).map_err(|source| AgentError::Bind {
            addr: config
                .run_dir
                .join(server::local::SOCKET)
                .display()
                .to_string(),
            source,
        })?;
    info!(socket = %socket.display(), "serving logs and events to root on the local socket");
    {
        let token = root.clone();
        let state = state.clone();
        server_tasks.push(tokio::spawn(async move {
            let served = server::local::serve(local, state, async move { token.cancelled().await });
            if let Err(e) = served.await {
                warn!(error = %e, "the local socket stopped");
            }
        }));
    }

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(period) = sd_notify::watchdog_enabled() {
        let token = root.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => { let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]); }
                }
            }
        });
    }
    info!(node = %config.node_name, "nodelet is running");

    root.cancelled().await;
    info!("shutting down; pods keep running");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    if tokio::time::timeout(DRAIN, manager.shutdown())
        .await
        .is_err()
    {
        warn!(after = ?DRAIN, "pod workers did not stop in time; exiting anyway");
    }
    for task in server_tasks {
        let _ = task.await;
    }
    Ok(())
}

/// Connects to containerd, retrying with back-off (up to 30 s between tries) until it answers.
async fn connect_runtime(config: &Config, root: &CancellationToken) -> Result<Runtime, AgentError> {
    let runtime_config = RuntimeConfig {
        endpoint: config.runtime_endpoint.clone(),
        namespace: config.containerd_namespace.clone(),
        root_dir: config.root_dir.clone(),
        log_driver: crate::runtime::logdriver::binary_for(&config.root_dir),
        log_rotation: Some(crate::runtime::LogRotation {
            max_size: config.container_log_max_size,
            max_files: config.container_log_max_files,
        }),
        max_parallel_image_pulls: config.max_parallel_image_pulls,
    };
    let mut retry = crate::retry::Retry::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let delay = retry.fail();
        match Runtime::connect(runtime_config.clone()).await {
            Ok(runtime) => return Ok(runtime),
            Err(e) => warn!(error = %e, retry_in = ?delay, "containerd is not answering"),
        }
        tokio::select! {
            _ = root.cancelled() => return Err(AgentError::NoRuntime),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Re-reads the manifest folder on every change (inotify) and every `period`, publishing objects to the store and pods to
/// the channel. Bad files are reported as Warning events on the node, refused duplicates on the
/// pod. A scan runs on the blocking pool: every file's cost is bounded (`source::yaml`), and
/// none of it holds up the async tasks.
async fn watch_manifests(
    mut source: ManifestSource,
    period: Duration,
    store: ObjectStore,
    recorder: Recorder,
    pods: watch::Sender<FilePods>,
    token: CancellationToken,
) {
    let node = node_ref(&recorder);
    let changed = Arc::new(tokio::sync::Notify::new());
    crate::source::manifest::watch_dir(source.dir().to_path_buf(), changed.clone());
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
            _ = changed.notified() => {}
        }
        let scanned = tokio::task::spawn_blocking(move || {
            let result = source.scan();
            (source, result)
        })
        .await;
        let (snapshot, errors);
        match scanned {
            Ok((back, result)) => {
                source = back;
                (snapshot, errors) = result;
            }
            Err(e) => {
                // Nothing in a scan panics on input; if it ever did, the folder source is gone.
                tracing::error!(error = %e, "the manifest folder scan failed; no more updates from it");
                return;
            }
        }
        for e in errors {
            let object = e
                .pod()
                .map(|p| crate::events::pod_ref(p, None))
                .unwrap_or_else(|| node.clone());
            recorder.record(object, EventType::Warning, e.reason(), &e.to_string());
        }
        store.replace(snapshot.objects);
        pods.send_if_modified(|current| {
            if current.as_ref() == Some(&snapshot.pods) {
                false
            } else {
                *current = Some(snapshot.pods);
                true
            }
        });
    }
}

fn node_ref(recorder: &Recorder) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        kind: Some("Node".into()),
        name: Some(recorder.node().to_string()),
        ..Default::default()
    }
}

/// The API's pods in cluster mode: the full desired set, and whether the first list is done.
struct ApiPods {
    desired: watch::Receiver<Vec<Desired>>,
    synced: watch::Receiver<bool>,
}

/// Hands the pod manager the merge of the sources (`source::merge`) whenever one changes:
/// the whole desired set once the API has listed (standalone: at once), the file pods one by
/// one before that. A removed pod's worker finishing ends the merge's asking to stop it.
async fn sync_pods(
    manager: PodManager,
    mut manifests: watch::Receiver<FilePods>,
    mut api: Option<ApiPods>,
    token: CancellationToken,
) {
    let mut finished = manager.subscribe_finished();
    let mut merge = SourceMerge::new(manager.recovered_static_pods().await);
    loop {
        let api_set = match api.as_mut() {
            None => Some(Vec::new()),
            Some(a) => {
                let synced = *a.synced.borrow_and_update();
                synced.then(|| a.desired.borrow_and_update().clone())
            }
        };
        // Nothing is synced before the files have been read once.
        let plan = manifests
            .borrow_and_update()
            .as_ref()
            .map(|files| merge.merge(files, api_set));
        match plan {
            Some(Plan::All(desired)) => manager.sync_all(desired).await,
            Some(Plan::Each(desired)) => desired.into_iter().for_each(|d| manager.update(d)),
            None => {}
        }
        let api_changed = async {
            match api.as_mut() {
                Some(a) => tokio::select! {
                    r = a.desired.changed() => r.is_ok(),
                    r = a.synced.changed() => r.is_ok(),
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = token.cancelled() => return,
            changed = manifests.changed() => if changed.is_err() { return },
            open = api_changed => if !open { return },
            done = finished.recv() => {
                if let Ok(uid) = done {
                    merge.finished(&uid);
                }
            }
        }
    }
}

/// The first non-loopback IPv4 address of this host, for hostIP.
fn node_ip() -> Option<IpAddr> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for ifa in addrs {
        if ifa.interface_name.starts_with("nodelet") {
            continue;
        }
        let Some(addr) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        let ip = IpAddr::V4(addr.ip());
        if !ip.is_loopback() {
            return Some(ip);
        }
    }
    None
}
