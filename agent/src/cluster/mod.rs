//! Cluster mode: the node joined to a Kubernetes control plane, virtual-kubelet style, under its
//! own identity (`system:node:<name>`, group `system:nodes`, Node authorizer and NodeRestriction).
//!
//! OWNER: cluster helper. This is the only module that imports `kube`.
//!
//! [`ClusterClient::start`] spawns one task per concern, all children
//! of the caller's cancellation token; each task owns its own state and talks to the others only
//! through channels:
//! - `node`: registers the Node (create, or update the labels of the existing one), then computes
//!   NodeStatus every 10 s (Ready follows the container runtime's health check) and patches it
//!   on change or every 5 minutes.
//! - `lease`: renews the Lease in `kube-node-lease` every 10 s, backing off on errors.
//! - `pods`: list+watch of the pods bound to this node; publishes the full desired set (and a
//!   `synced` flag after the first complete list). Any watch error rebuilds the watcher, so a
//!   reconnect always relists before it reports anything else.
//! - `objects`: the ConfigMaps, Secrets, PVCs and PVs those pods reference, read with per-object
//!   watches or GETs (the Node authorizer allows nothing wider) into the [`ObjectStore`].
//! - `status_sink`: pod status from the [`StatusManager`] to `pods/status`, then the final
//!   DELETE (grace 0, UID precondition) of finished pods the API is deleting.
//! - `events`: the [`Recorder`]'s events to core v1 Events.
//! - `mirror`: a mirror pod in the API for every static pod (the manifest folder's pods, which
//!   cluster mode names `<name>-<node>` as the kubelet does); the sink writes their status.
//!
//! [`ApiTokens`] serves projected service account tokens through the TokenRequest API;
//! [`ClusterAgent::start_csi_node`] keeps the node's CSINode in step with the registered CSI drivers.
//!
//! Stopping the agent (cancelling the token) stops these tasks and nothing else: pods keep running.
//!
//! Wiring (agent.rs): build a [`ClusterConfig`] with [`ClusterConfig::from_config`] and set its
//! `node_ip` to the IP the pods report as hostIP; [`ClusterClient::connect`] first, so that the
//! recorder is made with its `event_sink`, the volume manager with its `tokens` and the secure
//! port with its `authorizer`; then call [`ClusterClient::start`] with the shared store, status
//! manager and recorder and the runtime's version and health check; wait for `synced` before
//! the first full sync of the pod
//! manager (an empty set before the first list would kill re-adopted pods), then merge every
//! new `desired` set with the manifest folder's pods into each full sync. A pod absent from
//! `desired` is gone from the API (force delete, or the final DELETE done).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::events::Recorder;
use crate::pod::Desired;
use crate::source::manifest::FilePods;
use crate::status::StatusManager;
use crate::store::ObjectStore;

mod authz;
mod csinode;
mod events;
#[cfg(test)]
mod fake_api;
mod lease;
mod mirror;
mod node;
mod objects;
mod pods;
mod status_sink;
mod tokens;

pub use tokens::ApiTokens;

/// Asks the container runtime whether it answers: `Err` carries what went wrong.
pub type RuntimeCheck = std::sync::Arc<
    dyn Fn() -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync,
>;

/// The container runtime as the Node reports it.
#[derive(Clone)]
pub struct RuntimeInfo {
    /// `containerd://<version>` (a bare version gets the prefix).
    pub version: String,
    /// Run every NodeStatus interval; the node is not Ready while the runtime has not answered
    /// for [`RUNTIME_DOWN_AFTER`], as the kubelet's "container runtime is down".
    pub check: RuntimeCheck,
}

pub use node::RUNTIME_DOWN_AFTER;

/// What cluster mode needs from the agent's configuration.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Kubeconfig of the node's own identity.
    pub kubeconfig: PathBuf,
    pub node_name: String,
    /// Reported as the InternalIP address; the Hostname address is always the node name.
    pub node_ip: Option<IpAddr>,
    /// Extra labels (`--node-labels`) beside kubernetes.io/hostname, os and arch.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Taints set when the Node is created (`--register-with-taints`); NodeRestriction forbids
    /// a node to change its taints later, so an existing Node keeps its own.
    pub taints: Vec<Taint>,
    pub max_pods: u32,
    /// The agent's root dir: its filesystem is the node's ephemeral storage (nodefs).
    pub root_dir: PathBuf,
    /// The port of the node's server, reported as daemonEndpoints.kubeletEndpoint.
    pub kubelet_port: u16,
    /// Reported as status.declaredFeatures (from the feature gates).
    pub declared_features: Vec<String>,
}

impl ClusterConfig {
    /// The cluster settings of an agent configuration; `None` in standalone mode (no kubeconfig).
    pub fn from_config(config: &crate::config::Config) -> Option<Self> {
        Some(Self {
            kubeconfig: config.kubeconfig.clone()?,
            node_name: config.node_name.clone(),
            node_ip: config.node_ip,
            labels: config.node_labels.clone(),
            taints: config.taints.clone(),
            max_pods: config.max_pods,
            root_dir: config.root_dir.clone(),
            kubelet_port: config.port,
            declared_features: config.feature_gates.declared_features(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The kubeconfig could not be read, parsed or turned into a client configuration.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    /// No client could be built from the kubeconfig (bad TLS material or server URL).
    #[error("client from kubeconfig {path}: {source}")]
    Client { path: PathBuf, source: kube::Error },
    /// An API request failed; `object` names what it was about (`pods/ns/name`, `nodes/name`).
    #[error("{verb} {object}: {source}")]
    Api {
        verb: &'static str,
        object: String,
        source: kube::Error,
    },
}

impl ClusterError {
    fn api(verb: &'static str, object: impl Into<String>, source: kube::Error) -> Self {
        ClusterError::Api {
            verb,
            object: object.into(),
            source,
        }
    }

    /// The HTTP status code of a failed API request, if the server answered one.
    pub fn code(&self) -> Option<u16> {
        match self {
            ClusterError::Api {
                source: kube::Error::Api(status),
                ..
            } => Some(status.code),
            _ => None,
        }
    }

    /// Whether the object the request was about no longer exists (404).
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }

    /// Whether a precondition or resourceVersion did not hold (409): retrying the same request
    /// cannot succeed, the caller must re-read.
    pub fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }
}

/// The API client of cluster mode, made before the agent's parts that write through it: the
/// recorder gets [`ClusterClient::event_sink`], the volume manager [`ClusterClient::tokens`]
/// and the secure port [`ClusterClient::authorizer`] at construction; then
/// [`ClusterClient::start`] spawns the cluster-mode tasks.
pub struct ClusterClient {
    config: ClusterConfig,
    client: kube::Client,
    events_tx: tokio::sync::mpsc::UnboundedSender<k8s_openapi::api::core::v1::Event>,
    events_rx: tokio::sync::mpsc::UnboundedReceiver<k8s_openapi::api::core::v1::Event>,
}

impl ClusterClient {
    /// Builds the client from `config.kubeconfig` (no request is made yet). Fails only when the
    /// kubeconfig is unusable; an unreachable API server is retried later, with back-off.
    pub async fn connect(config: ClusterConfig) -> Result<Self, ClusterError> {
        let client = client(&config.kubeconfig).await?;
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Self {
            config,
            client,
            events_tx,
            events_rx,
        })
    }

    /// Where the [`Recorder`] sends its events: `events::run` writes them as core v1 Events
    /// once [`ClusterClient::start`] has run.
    pub fn event_sink(
        &self,
    ) -> tokio::sync::mpsc::UnboundedSender<k8s_openapi::api::core::v1::Event> {
        self.events_tx.clone()
    }

    /// Service account tokens through the TokenRequest API, for projected volumes (the
    /// volume manager's token source).
    pub fn tokens(&self) -> std::sync::Arc<ApiTokens> {
        std::sync::Arc::new(ApiTokens::new(self.client.clone()))
    }

    /// The secure port's Webhook authorizer (SubjectAccessReview with the node's identity).
    pub fn authorizer(&self) -> crate::server::secure::Authorizer {
        authz::webhook(self.client.clone())
    }
}

/// The running cluster mode: the desired pods from the API and the task that drives it all.
pub struct ClusterAgent {
    /// The full desired set of API pods, replaced on every change. Pods that vanished from the
    /// API (force delete, final delete done) are simply absent.
    pub desired: watch::Receiver<Vec<Desired>>,
    /// Turns true after the first complete list of this node's pods (and stays true: a later
    /// relist replaces `desired` only once it is complete).
    pub synced: watch::Receiver<bool>,
    /// The manifest folder's pods as cluster mode runs them: named `<name>-<node>`, each
    /// mirrored in the API. `None` until the folder was read once, as its input.
    pub static_pods: watch::Receiver<FilePods>,
    /// Ends when the token given to [`ClusterClient::start`] is cancelled.
    pub task: JoinHandle<()>,
    client: kube::Client,
    node_name: String,
}

impl ClusterClient {
    /// Spawns every cluster-mode task.
    ///
    /// `runtime` is the container runtime's version (reported as `containerd://<version>`)
    /// and its health check (the Ready condition follows it). `recorder` records the node's
    /// events (its sink is [`ClusterClient::event_sink`]). `manifests` is the manifest
    /// folder's pods (`None` until first read). Cancelling `shutdown` stops the tasks, never
    /// the pods.
    pub fn start(
        self,
        mut manifests: watch::Receiver<FilePods>,
        store: ObjectStore,
        status: StatusManager,
        recorder: Recorder,
        runtime: RuntimeInfo,
        shutdown: CancellationToken,
    ) -> ClusterAgent {
        let Self {
            config,
            client,
            events_tx,
            events_rx,
        } = self;
        // The recorders made with the sink hold the other senders.
        drop(events_tx);
        let (desired_tx, desired) = watch::channel(Vec::new());
        let (synced_tx, synced) = watch::channel(false);
        let (api_pods_tx, api_pods) = watch::channel(pods::ApiPods::default());

        let mut tasks = tokio::task::JoinSet::new();
        let (statics_tx, static_pods) = watch::channel(None);
        {
            let node = config.node_name.clone();
            let token = shutdown.child_token();
            tasks.spawn(async move {
                let mut defaults = mirror::StaticDefaults::default();
                loop {
                    // The defaults change every pod: these are the folder's pods, copied.
                    let pods = manifests.borrow_and_update().as_ref().map(|pods| {
                        let mut pods: Vec<Pod> = pods.iter().map(|p| Pod::clone(p)).collect();
                        defaults.apply(&mut pods, &node, jiff::Timestamp::now());
                        pods.into_iter().map(Arc::new).collect::<Vec<_>>()
                    });
                    statics_tx.send_replace(pods);
                    tokio::select! {
                        _ = token.cancelled() => return,
                        r = manifests.changed() => if r.is_err() { return },
                    }
                }
            });
        }
        let node_uid = {
            let (tx, rx) = watch::channel(None);
            let host = node::Host {
                config: config.clone(),
                runtime_version: runtime.version,
                runtime_check: runtime.check,
            };
            tasks.spawn(node::run(
                client.clone(),
                host,
                recorder.clone(),
                tx,
                shutdown.child_token(),
            ));
            rx
        };
        tasks.spawn(lease::run(
            client.clone(),
            config.node_name.clone(),
            node_uid.clone(),
            shutdown.child_token(),
        ));
        tasks.spawn(mirror::run(
            client.clone(),
            config.node_name.clone(),
            mirror::Inputs {
                statics: static_pods.clone(),
                api_pods: api_pods.clone(),
                synced: synced.clone(),
                node_uid,
                status: status.clone(),
            },
            shutdown.child_token(),
        ));
        tasks.spawn(pods::run(
            client.clone(),
            config.node_name.clone(),
            pods::Outputs {
                desired: desired_tx,
                synced: synced_tx,
                api_pods: api_pods_tx,
            },
            shutdown.child_token(),
        ));
        tasks.spawn(objects::follow_services(
            client.clone(),
            store.clone(),
            shutdown.child_token(),
        ));
        tasks.spawn(objects::run(
            client.clone(),
            store,
            api_pods.clone(),
            shutdown.child_token(),
        ));
        tasks.spawn(status_sink::run(
            client.clone(),
            status,
            api_pods,
            shutdown.child_token(),
        ));
        tasks.spawn(events::run(
            client.clone(),
            events_rx,
            shutdown.child_token(),
        ));
        let task = tokio::spawn(async move {
            while let Some(done) = tasks.join_next().await {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a cluster-mode task panicked");
                }
            }
        });
        ClusterAgent {
            desired,
            synced,
            static_pods,
            task,
            client,
            node_name: config.node_name.clone(),
        }
    }
}

impl ClusterAgent {
    /// Spawns the task that keeps the node's CSINode (`csinode`) in step with the CSI drivers
    /// registered on this node (`VolumeManager::plugins().subscribe()`), until `shutdown` is
    /// cancelled.
    pub fn start_csi_node(
        &self,
        drivers: watch::Receiver<crate::volume::csi::Registered>,
        shutdown: CancellationToken,
    ) {
        tokio::spawn(csinode::run(
            self.client.clone(),
            self.node_name.clone(),
            drivers,
            shutdown,
        ));
    }
}

async fn client(path: &std::path::Path) -> Result<kube::Client, ClusterError> {
    let kubeconfig = |source| ClusterError::Kubeconfig {
        path: path.to_path_buf(),
        source,
    };
    let file = Kubeconfig::read_from(path).map_err(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(kubeconfig)?;
    kube::Client::try_from(config).map_err(|source| ClusterError::Client {
        path: path.to_path_buf(),
        source,
    })
}

/// Sleeps `delay`, or returns false at once when `token` is cancelled.
/// Makes the Node (of `node_uid`) the owner of an object the node keeps (its Lease, its
/// CSINode), replacing an owner reference to an earlier Node of that name.
fn owned_by_node(meta: &mut ObjectMeta, node: &str, node_uid: &str) {
    let owners = meta.owner_references.get_or_insert_with(Vec::new);
    if !owners.iter().any(|o| o.kind == "Node" && o.uid == node_uid) {
        owners.retain(|o| o.kind != "Node");
        owners.push(OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: node.to_string(),
            uid: node_uid.to_string(),
            ..Default::default()
        });
    }
}

async fn sleep_or_cancel(delay: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        _ = token.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sleep_or_cancel_stops_early_on_cancel() {
        let token = CancellationToken::new();
        assert!(sleep_or_cancel(Duration::from_secs(5), &token).await);
        token.cancel();
        assert!(!sleep_or_cancel(Duration::from_secs(3600), &token).await);
    }

    #[test]
    fn standalone_config_has_no_cluster_mode() {
        let flags = |args: &[&str]| {
            use clap::Parser;
            let mut argv = vec!["nodelet"];
            argv.extend_from_slice(args);
            crate::config::Cli::try_parse_from(argv).unwrap().flags
        };
        let standalone = crate::config::Config::resolve(flags(&[]), "n").unwrap();
        assert!(ClusterConfig::from_config(&standalone).is_none());
        let joined = crate::config::Config::resolve(
            flags(&[
                "--kubeconfig",
                "/k",
                "--max-pods",
                "9",
                "--node-labels",
                "a=b",
            ]),
            "Node-1",
        )
        .unwrap();
        let c = ClusterConfig::from_config(&joined).unwrap();
        assert_eq!(c.node_name, "node-1");
        assert_eq!(c.max_pods, 9);
        assert_eq!(c.labels["a"], "b");
        assert_eq!(c.kubeconfig, PathBuf::from("/k"));
    }
}
