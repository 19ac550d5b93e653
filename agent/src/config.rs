//! Agent configuration: kubelet-named flags, optionally a `--config` YAML file with the same
//! fields (a subset of KubeletConfiguration's names). A flag given on the command line wins over
//! the file; the file wins over the defaults. Parsing never touches the process environment, so
//! tests build configurations from plain argument lists.

use std::path::{Path, PathBuf};

use clap::{Args, Parser};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The --config file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The --config file is not valid YAML for the known fields, or names a key that is
    /// neither nodelet's nor the kubelet's (the message names the key).
    #[error("parsing config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A flag value is malformed (a label or taint that does not parse).
    #[error("{flag}: {detail}")]
    Invalid { flag: &'static str, detail: String },
}

#[derive(Debug, Parser)]
#[command(
    name = "nodelet",
    version,
    about = "A node agent that does the kubelet's job over containerd"
)]
pub struct Cli {
    #[command(flatten)]
    pub flags: Flags,
}

/// Command-line flags; every one optional so the file and the defaults can fill in.
#[derive(Debug, Default, Args)]
pub struct Flags {
    /// A YAML file with KubeletConfiguration-style fields.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Folder of pod manifests (standalone mode, or static pods beside the API).
    #[arg(long)]
    pub pod_manifest_path: Option<PathBuf>,
    /// Kubeconfig of the node's own identity; absent means standalone mode.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// Default /var/lib/nodelet.
    #[arg(long)]
    pub root_dir: Option<PathBuf>,
    /// Default unix:///run/containerd/containerd.sock.
    #[arg(long)]
    pub container_runtime_endpoint: Option<String>,
    /// containerd namespace for every agent object. Default k8s.nodelet.
    #[arg(long)]
    pub containerd_namespace: Option<String>,
    /// Comma-separated DNS server IPs for ClusterFirst pods.
    #[arg(long, value_delimiter = ',')]
    pub cluster_dns: Option<Vec<String>>,
    #[arg(long)]
    pub cluster_domain: Option<String>,
    #[arg(long)]
    pub max_pods: Option<u32>,
    /// Unsafe sysctls (or `prefix*` patterns) pods may set, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub allowed_unsafe_sysctls: Option<Vec<String>>,
    /// key=value,… labels for the Node.
    #[arg(long, value_delimiter = ',')]
    pub node_labels: Option<Vec<String>>,
    /// key=value:Effect,… taints registered with the Node.
    #[arg(long, value_delimiter = ',')]
    pub register_with_taints: Option<Vec<String>>,
    /// The unauthenticated read-only HTTP port (/healthz, /pods, /metrics), on 127.0.0.1
    /// only; 0 disables it. Default 10255 with flags alone, 0 with --config (as the kubelet).
    #[arg(long)]
    pub read_only_port: Option<u16>,
    /// Address the secure port binds. Default 0.0.0.0 (all addresses), as the kubelet's.
    #[arg(long)]
    pub address: Option<String>,
    /// The authenticated HTTPS port (logs for the API server); 0 disables it. Default 10250.
    #[arg(long)]
    pub port: Option<u16>,
    /// The secure port's certificate (PEM); default a self-signed one in <root-dir>/pki.
    #[arg(long)]
    pub tls_cert_file: Option<PathBuf>,
    #[arg(long)]
    pub tls_private_key_file: Option<PathBuf>,
    /// Client certificates signed by this CA authenticate on the secure port.
    #[arg(long)]
    pub client_ca_file: Option<PathBuf>,
    /// AlwaysAllow or Webhook (SubjectAccessReview through the API). Default Webhook, which
    /// with no --kubeconfig (standalone) allows nothing.
    #[arg(long)]
    pub authorization_mode: Option<String>,
    /// The node IP to report; default the node name when it is an IP (as with the kubelet's
    /// --hostname-override=<IP>), else the first non-loopback IPv4 address.
    #[arg(long)]
    pub node_ip: Option<String>,
    /// Where container logs go. Default /var/log/pods.
    #[arg(long)]
    pub pod_logs_dir: Option<PathBuf>,
    /// Runtime state (pinned namespaces). Default /run/nodelet.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    #[arg(long)]
    pub cni_conf_dir: Option<PathBuf>,
    #[arg(long, value_delimiter = ',')]
    pub cni_bin_dir: Option<Vec<PathBuf>>,
    /// How often the manifest folder is re-read, in seconds. Default 1.
    #[arg(long)]
    pub file_check_frequency: Option<u64>,
    /// A container's log is rotated once it reaches this size (a quantity). Default 10Mi.
    #[arg(long)]
    pub container_log_max_size: Option<String>,
    /// Log files kept per container, the live one included (at least 2). Default 5.
    #[arg(long)]
    pub container_log_max_files: Option<i64>,
    /// Feature gates, `Name=true|false,…`, over the file's `featureGates`; see `features`.
    #[arg(long, value_delimiter = ',')]
    pub feature_gates: Option<Vec<String>>,
    /// Log verbosity: 0 info, 1-3 debug, 4+ trace; or RUST_LOG-style filter via --log-filter.
    #[arg(short = 'v', long = "v")]
    pub verbosity: Option<u8>,
}

/// The same settings as a YAML file, with KubeletConfiguration's field names where they exist.
/// A key that is neither here nor in [`NOT_IMPLEMENTED`] is an error.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct FileConfig {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub static_pod_path: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub hostname_override: Option<String>,
    pub root_dir: Option<PathBuf>,
    pub container_runtime_endpoint: Option<String>,
    pub containerd_namespace: Option<String>,
    #[serde(rename = "clusterDNS")]
    pub cluster_dns: Option<Vec<String>>,
    pub cluster_domain: Option<String>,
    pub max_pods: Option<u32>,
    pub allowed_unsafe_sysctls: Option<Vec<String>>,
    pub node_labels: Option<std::collections::BTreeMap<String, String>>,
    pub register_with_taints: Option<Vec<k8s_openapi::api::core::v1::Taint>>,
    pub read_only_port: Option<u16>,
    pub address: Option<String>,
    pub port: Option<u16>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    pub node_ip: Option<String>,
    pub pod_logs_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub cni_conf_dir: Option<PathBuf>,
    pub cni_bin_dirs: Option<Vec<PathBuf>>,
    /// Seconds, or a duration as the kubelet writes it (`20s`, `1m30s`).
    #[serde(deserialize_with = "seconds")]
    pub file_check_frequency: Option<u64>,
    pub authentication: FileAuthentication,
    pub authorization: FileAuthorization,
    pub serialize_image_pulls: Option<bool>,
    pub max_parallel_image_pulls: Option<i32>,
    pub container_log_max_size: Option<String>,
    pub container_log_max_files: Option<i64>,
    /// Idle streaming connections (exec, attach, port-forward) are closed after this long.
    #[serde(deserialize_with = "seconds")]
    pub streaming_connection_idle_timeout: Option<u64>,
    /// Gate name to on/off, as KubeletConfiguration's `featureGates`.
    pub feature_gates: std::collections::BTreeMap<String, bool>,
}

/// How many image pulls run at once unless the file says otherwise. The kubelet pulls one at a
/// time by default, and without bound with `serializeImagePulls: false`; nodelet pulls in
/// parallel, bounded.
pub const DEFAULT_PARALLEL_IMAGE_PULLS: usize = 5;

/// The kubelet's default `streamingConnectionIdleTimeout`.
pub const STREAMING_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4 * 3600);

/// KubeletConfiguration keys nodelet knows but does not implement: a file may set them (a
/// kubelet's file works), and each one set is a warning naming it.
pub const NOT_IMPLEMENTED: &[&str] = &[
    "enableServer",
    "syncFrequency",
    "httpCheckFrequency",
    "staticPodURL",
    "staticPodURLHeader",
    "tlsCipherSuites",
    "tlsCurvePreferences",
    "tlsMinVersion",
    "rotateCertificates",
    "serverTLSBootstrap",
    "registryPullQPS",
    "registryBurst",
    "imagePullCredentialsVerificationPolicy",
    "preloadedImagesVerificationAllowlist",
    "eventRecordQPS",
    "eventBurst",
    "enableDebuggingHandlers",
    "enableContentionProfiling",
    "healthzPort",
    "healthzBindAddress",
    "oomScoreAdj",
    "nodeStatusUpdateFrequency",
    "nodeStatusReportFrequency",
    "nodeLeaseDurationSeconds",
    "imageMinimumGCAge",
    "imageMaximumGCAge",
    "imageGCHighThresholdPercent",
    "imageGCLowThresholdPercent",
    "volumeStatsAggPeriod",
    "kubeletCgroups",
    "systemCgroups",
    "cgroupRoot",
    "cgroupsPerQOS",
    "cgroupDriver",
    "cpuManagerPolicy",
    "singleProcessOOMKill",
    "cpuManagerPolicyOptions",
    "cpuManagerReconcilePeriod",
    "memoryManagerPolicy",
    "topologyManagerPolicy",
    "topologyManagerScope",
    "topologyManagerPolicyOptions",
    "qosReserved",
    "runtimeRequestTimeout",
    "hairpinMode",
    "podCIDR",
    "podPidsLimit",
    "resolvConf",
    "runOnce",
    "cpuCFSQuota",
    "cpuCFSQuotaPeriod",
    "nodeStatusMaxImages",
    "maxOpenFiles",
    "contentType",
    "kubeAPIQPS",
    "kubeAPIBurst",
    "evictionHard",
    "evictionSoft",
    "evictionSoftGracePeriod",
    "evictionPressureTransitionPeriod",
    "evictionMaxPodGracePeriod",
    "evictionMinimumReclaim",
    "mergeDefaultEvictionSettings",
    "podsPerCore",
    "enableControllerAttachDetach",
    "protectKernelDefaults",
    "makeIPTablesUtilChains",
    "iptablesMasqueradeBit",
    "iptablesDropBit",
    "failSwapOn",
    "memorySwap",
    "containerLogMaxWorkers",
    "containerLogMonitorInterval",
    "configMapAndSecretChangeDetectionStrategy",
    "systemReserved",
    "kubeReserved",
    "reservedSystemCPUs",
    "showHiddenMetricsForVersion",
    "systemReservedCgroup",
    "kubeReservedCgroup",
    "enforceNodeAllocatable",
    "volumePluginDir",
    "providerID",
    "kernelMemcgNotification",
    "logging",
    "enableSystemLogHandler",
    "enableSystemLogQuery",
    "shutdownGracePeriod",
    "shutdownGracePeriodCriticalPods",
    "shutdownGracePeriodByPodPriority",
    "crashLoopBackOff",
    "reservedMemory",
    "enableProfilingHandler",
    "enableDebugFlagsHandler",
    "seccompDefault",
    "memoryThrottlingFactor",
    "memoryReservationPolicy",
    "registerNode",
    "tracing",
    "localStorageCapacityIsolation",
    "imageServiceEndpoint",
    "failCgroupV1",
    "userNamespaces",
];

/// Keys inside `authentication` and `authorization` known but not implemented.
const NOT_IMPLEMENTED_NESTED: &[(&str, &str)] = &[
    ("authentication", "anonymous"),
    ("authentication", "webhook"),
    ("authorization", "webhook"),
];

/// `authentication` of KubeletConfiguration: the client CA (anonymous access is always off).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileAuthentication {
    pub x509: FileX509,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct FileX509 {
    #[serde(rename = "clientCAFile")]
    pub client_ca_file: Option<PathBuf>,
}

/// `authorization` of KubeletConfiguration: `mode` (AlwaysAllow or Webhook).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct FileAuthorization {
    pub mode: Option<String>,
}

/// The effective configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub pod_manifest_path: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub root_dir: PathBuf,
    pub runtime_endpoint: String,
    pub containerd_namespace: String,
    pub cluster_dns: Vec<String>,
    pub cluster_domain: String,
    pub max_pods: u32,
    pub allowed_unsafe_sysctls: Vec<String>,
    pub node_labels: std::collections::BTreeMap<String, String>,
    pub taints: Vec<k8s_openapi::api::core::v1::Taint>,
    /// 0: off. Always on 127.0.0.1.
    pub read_only_port: u16,
    /// Where the secure port binds.
    pub address: String,
    pub port: u16,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
    /// Webhook authorization on the secure port (else AlwaysAllow); with no API, deny all.
    pub authorization_webhook: bool,
    pub node_ip: Option<std::net::IpAddr>,
    pub log_dir: PathBuf,
    pub run_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub file_check_frequency: std::time::Duration,
    pub verbosity: u8,
    /// How many image pulls run at once.
    pub max_parallel_image_pulls: usize,
    /// `streamingConnectionIdleTimeout`, default 4 h as the kubelet's.
    pub streaming_connection_idle_timeout: std::time::Duration,
    /// `containerLogMaxSize` in bytes: a container's log is rotated at this size.
    pub container_log_max_size: u64,
    /// `containerLogMaxFiles`: files kept per container, the live one included.
    pub container_log_max_files: usize,
    /// The feature gates (`--feature-gates` over `featureGates`), defaults as the kubelet's.
    pub feature_gates: crate::features::FeatureGates,
    /// Settings the file gave that nodelet ignores, one line each, for the log.
    pub warnings: Vec<String>,
}

impl Config {
    /// Merges flags over the file (if any) over the defaults. `hostname` is the machine's name,
    /// passed in so tests need no real host.
    pub fn resolve(flags: Flags, hostname: &str) -> Result<Self, ConfigError> {
        let (file, mut warnings) = match &flags.config {
            Some(path) => read_file(path)?,
            None => (FileConfig::default(), Vec::new()),
        };
        let max_parallel_image_pulls = image_pulls(&file)?;
        let (container_log_max_size, container_log_max_files) = log_rotation(
            flags.container_log_max_size.or(file.container_log_max_size),
            flags
                .container_log_max_files
                .or(file.container_log_max_files),
        )?;
        let mut gates = file.feature_gates.clone();
        for item in flags.feature_gates.iter().flatten() {
            let (name, on) =
                crate::features::parse_gate(item).map_err(|detail| ConfigError::Invalid {
                    flag: "--feature-gates",
                    detail,
                })?;
            gates.insert(name, on);
        }
        let (feature_gates, unknown_gates) = crate::features::FeatureGates::resolve(&gates);
        warnings.extend(unknown_gates);
        let node_labels = match flags.node_labels {
            Some(list) => parse_labels(&list)?,
            None => file.node_labels.unwrap_or_default(),
        };
        let taints = match flags.register_with_taints {
            Some(list) => list
                .iter()
                .map(|t| parse_taint(t))
                .collect::<Result<_, _>>()?,
            None => file.register_with_taints.unwrap_or_default(),
        };
        let node_ip = match flags.node_ip.or(file.node_ip) {
            Some(ip) => Some(ip.parse().map_err(|e| ConfigError::Invalid {
                flag: "--node-ip",
                detail: format!("{ip:?}: {e}"),
            })?),
            None => None,
        };
        let kubeconfig = flags.kubeconfig.or(file.kubeconfig);
        let mode = flags.authorization_mode.or(file.authorization.mode.clone());
        let authorization_webhook = match mode.as_deref() {
            None | Some("Webhook") => true,
            Some("AlwaysAllow") => false,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    flag: "--authorization-mode",
                    detail: format!("{other:?}: AlwaysAllow or Webhook"),
                })
            }
        };
        // The kubelet's flags default the read-only port on; its configuration file, off.
        let read_only_default = match flags.config {
            Some(_) => 0,
            None => 10255,
        };
        let node_name = flags
            .hostname_override
            .or(file.hostname_override)
            .unwrap_or_else(|| hostname.to_string())
            .to_lowercase();
        // As the kubelet: a node named by an IP (`--hostname-override=<IP>`) has that IP.
        let node_ip = node_ip.or_else(|| node_name.parse().ok());
        Ok(Config {
            pod_manifest_path: flags.pod_manifest_path.or(file.static_pod_path),
            kubeconfig,
            node_name,
            root_dir: flags
                .root_dir
                .or(file.root_dir)
                .unwrap_or_else(|| "/var/lib/nodelet".into()),
            runtime_endpoint: flags
                .container_runtime_endpoint
                .or(file.container_runtime_endpoint)
                .unwrap_or_else(|| "unix:///run/containerd/containerd.sock".into()),
            containerd_namespace: flags
                .containerd_namespace
                .or(file.containerd_namespace)
                .unwrap_or_else(|| "k8s.nodelet".into()),
            cluster_dns: flags.cluster_dns.or(file.cluster_dns).unwrap_or_default(),
            cluster_domain: flags
                .cluster_domain
                .or(file.cluster_domain)
                .unwrap_or_else(|| "cluster.local".into()),
            max_pods: flags.max_pods.or(file.max_pods).unwrap_or(110),
            allowed_unsafe_sysctls: flags
                .allowed_unsafe_sysctls
                .or(file.allowed_unsafe_sysctls)
                .unwrap_or_default(),
            node_labels,
            taints,
            read_only_port: flags
                .read_only_port
                .or(file.read_only_port)
                .unwrap_or(read_only_default),
            address: flags
                .address
                .or(file.address)
                .unwrap_or_else(|| "0.0.0.0".into()),
            port: flags.port.or(file.port).unwrap_or(10250),
            tls_cert_file: flags.tls_cert_file.or(file.tls_cert_file),
            tls_private_key_file: flags.tls_private_key_file.or(file.tls_private_key_file),
            client_ca_file: flags
                .client_ca_file
                .or(file.authentication.x509.client_ca_file),
            authorization_webhook,
            node_ip,
            log_dir: flags
                .pod_logs_dir
                .or(file.pod_logs_dir)
                .unwrap_or_else(|| "/var/log/pods".into()),
            run_dir: flags
                .run_dir
                .or(file.run_dir)
                .unwrap_or_else(|| "/run/nodelet".into()),
            cni_conf_dir: flags
                .cni_conf_dir
                .or(file.cni_conf_dir)
                .unwrap_or_else(|| "/etc/cni/net.d".into()),
            cni_bin_dirs: flags
                .cni_bin_dir
                .or(file.cni_bin_dirs)
                .unwrap_or_else(|| vec!["/usr/lib/cni".into(), "/opt/cni/bin".into()]),
            file_check_frequency: std::time::Duration::from_secs(
                flags
                    .file_check_frequency
                    .or(file.file_check_frequency)
                    .unwrap_or(1)
                    .max(1),
            ),
            verbosity: flags.verbosity.unwrap_or(0),
            max_parallel_image_pulls,
            streaming_connection_idle_timeout: file
                .streaming_connection_idle_timeout
                .map_or(STREAMING_IDLE_TIMEOUT, std::time::Duration::from_secs),
            container_log_max_size,
            container_log_max_files,
            feature_gates,
            warnings,
        })
    }
}

/// The file's settings, and a warning for each kubelet key it sets that nodelet ignores.
fn read_file(path: &Path) -> Result<(FileConfig, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse = |message: String| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    };
    // Read as the kubelet reads its file (sigs.k8s.io/yaml: YAML 1.1 scalars into JSON types),
    // with the manifest folder's bounds.
    let mut docs = crate::source::yaml::documents(&text, crate::source::yaml::LIMITS)
        .map_err(|e| parse(e.to_string()))?;
    docs.retain(|d| !d.is_null());
    if docs.len() > 1 {
        return Err(parse(format!(
            "{} YAML documents, expected one",
            docs.len()
        )));
    }
    let mut value = docs.pop().unwrap_or(serde_json::Value::Null);
    if value.is_null() {
        value = serde_json::Value::Object(Default::default());
    }
    let mut warnings = Vec::new();
    let mut ignored = |key: String| {
        warnings.push(format!(
            "config file {}: {key} is a kubelet setting nodelet does not implement; it is ignored",
            path.display()
        ))
    };
    if let Some(map) = value.as_object_mut() {
        for key in NOT_IMPLEMENTED {
            if map.remove(*key).is_some() {
                ignored(key.to_string());
            }
        }
        for (section, key) in NOT_IMPLEMENTED_NESTED {
            let inner = map.get_mut(*section).and_then(|v| v.as_object_mut());
            if inner.and_then(|m| m.remove(*key)).is_some() {
                ignored(format!("{section}.{key}"));
            }
        }
    }
    let file = crate::source::yaml::typed(value).map_err(parse)?;
    Ok((file, warnings))
}

/// A number of seconds, or a Go duration (`500ms`, `20s`, `1m30s`, `1h`) rounded up to whole
/// seconds, as KubeletConfiguration's durations are written.
fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Seconds(u64),
        Text(String),
    }
    let text = match Option::<Value>::deserialize(d)? {
        None => return Ok(None),
        Some(Value::Seconds(n)) => return Ok(Some(n)),
        Some(Value::Text(t)) => t,
    };
    let invalid = || serde::de::Error::custom(format!("invalid duration {text:?}"));
    let mut millis: u64 = 0;
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(invalid)?;
        let n: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(invalid()),
        };
        millis = millis.saturating_add(n.saturating_mul(unit));
        rest = &rest[unit_len..];
    }
    Ok(Some(millis.div_ceil(1000)))
}

/// How many image pulls may run at once, from `serializeImagePulls` and
/// `maxParallelImagePulls`, refused as the kubelet refuses them.
fn image_pulls(file: &FileConfig) -> Result<usize, ConfigError> {
    let invalid = |detail: String| ConfigError::Invalid {
        flag: "maxParallelImagePulls",
        detail,
    };
    match (file.serialize_image_pulls, file.max_parallel_image_pulls) {
        (_, Some(n)) if n < 1 => Err(invalid(format!("{n} must be a positive number"))),
        (Some(true), Some(n)) if n > 1 => Err(invalid(format!(
            "{n} must be 1 or unset when serializeImagePulls is true"
        ))),
        (Some(true), _) => Ok(1),
        (_, Some(n)) => Ok(n as usize),
        (_, None) => Ok(DEFAULT_PARALLEL_IMAGE_PULLS),
    }
}

/// `containerLogMaxSize` and `containerLogMaxFiles` (defaults 10Mi and 5), refused as the
/// kubelet refuses them: a size that is not a positive quantity, fewer than 2 files.
fn log_rotation(size: Option<String>, files: Option<i64>) -> Result<(u64, usize), ConfigError> {
    let size = size.unwrap_or_else(|| "10Mi".into());
    let bytes = crate::volume::downward::parse_quantity_milli(&size)
        .map(|milli| milli.div_euclid(1000))
        .filter(|&b| b > 0)
        .ok_or_else(|| ConfigError::Invalid {
            flag: "containerLogMaxSize",
            detail: format!("{size:?} must be a positive quantity, such as 10Mi"),
        })?;
    let files = files.unwrap_or(5);
    if files < 2 {
        return Err(ConfigError::Invalid {
            flag: "containerLogMaxFiles",
            detail: format!("{files} must be greater than 1"),
        });
    }
    let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
    Ok((bytes, usize::try_from(files).unwrap_or(usize::MAX)))
}

fn parse_labels(
    list: &[String],
) -> Result<std::collections::BTreeMap<String, String>, ConfigError> {
    list.iter()
        .filter(|s| !s.is_empty())
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(ConfigError::Invalid {
                flag: "--node-labels",
                detail: format!("{item:?} is not key=value"),
            }),
        })
        .collect()
}

/// Parses `key[=value]:Effect` as the kubelet's --register-with-taints does.
fn parse_taint(item: &str) -> Result<k8s_openapi::api::core::v1::Taint, ConfigError> {
    let invalid = |detail: &str| ConfigError::Invalid {
        flag: "--register-with-taints",
        detail: format!("{item:?}: {detail}"),
    };
    let (kv, effect) = item
        .rsplit_once(':')
        .ok_or_else(|| invalid("missing :Effect"))?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(invalid(
            "effect must be NoSchedule, PreferNoSchedule or NoExecute",
        ));
    }
    let (key, value) = match kv.split_once('=') {
        Some((k, v)) => (k, Some(v.to_string())),
        None => (kv, None),
    };
    if key.is_empty() {
        return Err(invalid("empty key"));
    }
    Ok(k8s_openapi::api::core::v1::Taint {
        key: key.to_string(),
        value,
        effect: effect.to_string(),
        time_added: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut argv = vec!["nodelet"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("parse").flags
    }

    #[test]
    fn defaults_follow_the_kubelet() {
        let c = Config::resolve(flags(&[]), "Node-A").unwrap();
        assert_eq!(c.node_name, "node-a");
        assert_eq!(c.root_dir, PathBuf::from("/var/lib/nodelet"));
        assert_eq!(c.runtime_endpoint, "unix:///run/containerd/containerd.sock");
        assert_eq!(c.read_only_port, 10255, "the kubelet's flag default");
        assert_eq!(c.port, 10250);
        assert_eq!(c.address, "0.0.0.0", "the secure port on all addresses");
        assert!(c.authorization_webhook, "Webhook, standalone too");
        assert!(c.client_ca_file.is_none());
        assert_eq!(c.max_pods, 110);
        assert_eq!(c.cluster_domain, "cluster.local");
        assert!(c.kubeconfig.is_none());
    }

    #[test]
    fn a_node_named_by_an_ip_has_that_ip_unless_node_ip_says_otherwise() {
        let c = Config::resolve(flags(&["--hostname-override", "10.1.2.3"]), "host").unwrap();
        assert_eq!(
            (c.node_name.as_str(), c.node_ip),
            ("10.1.2.3", Some([10, 1, 2, 3].into()))
        );
        let c = Config::resolve(flags(&["--hostname-override", "FD00::7"]), "host").unwrap();
        assert_eq!(c.node_ip, Some("fd00::7".parse().unwrap()));
        let c = Config::resolve(
            flags(&["--hostname-override", "10.1.2.3", "--node-ip", "10.9.9.9"]),
            "host",
        )
        .unwrap();
        assert_eq!(c.node_ip, Some([10, 9, 9, 9].into()));
        // A name that is not an IP leaves the node IP to be found on the host.
        assert_eq!(Config::resolve(flags(&[]), "node-a").unwrap().node_ip, None);
        assert_eq!(
            Config::resolve(flags(&[]), "10.4.4.4").unwrap().node_ip,
            Some([10, 4, 4, 4].into())
        );
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = std::env::temp_dir().join(format!("nodelet-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.yaml");
        std::fs::write(
            &file,
            "staticPodPath: /etc/pods\nmaxPods: 20\nclusterDNS: [10.0.0.10]\n\
             registerWithTaints:\n- key: a\n  effect: NoSchedule\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let c = Config::resolve(flags(&["--config", path, "--max-pods", "7"]), "n").unwrap();
        assert_eq!(c.max_pods, 7);
        assert_eq!(c.pod_manifest_path, Some(PathBuf::from("/etc/pods")));
        assert_eq!(c.cluster_dns, vec!["10.0.0.10".to_string()]);
        assert_eq!(c.taints[0].key, "a");
        assert_eq!(
            c.read_only_port, 0,
            "a configuration file leaves the read-only port off"
        );
        std::fs::write(
            &file,
            "readOnlyPort: 10255\naddress: 10.0.0.1\nauthentication:\n  x509:\n    \
             clientCAFile: /etc/ca.crt\nauthorization:\n  mode: AlwaysAllow\n",
        )
        .unwrap();
        let c = Config::resolve(flags(&["--config", path]), "n").unwrap();
        assert_eq!(c.read_only_port, 10255);
        assert_eq!(c.address, "10.0.0.1");
        assert_eq!(c.client_ca_file, Some(PathBuf::from("/etc/ca.crt")));
        assert!(!c.authorization_webhook);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn from_file(yaml: &str) -> Result<Config, ConfigError> {
        let dir = tempfile_dir();
        let file = dir.join("kubelet.yaml");
        std::fs::write(&file, yaml).unwrap();
        let config = Config::resolve(flags(&["--config", file.to_str().unwrap()]), "n");
        std::fs::remove_dir_all(dir).unwrap();
        config
    }

    fn tempfile_dir() -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nodelet-cfg-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it_and_the_file() {
        let err = from_file("maxPods: 3\nmaxPodz: 4\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("maxPodz") && err.contains("kubelet.yaml"),
            "{err}"
        );
        let err = from_file("authentication:\n  x509:\n    clientCaFile: /ca\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("clientCaFile"), "{err}");
    }

    #[test]
    fn a_kubelet_key_nodelet_ignores_is_a_warning_naming_it() {
        let c = from_file(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
             cgroupDriver: systemd\nauthentication:\n  anonymous:\n    enabled: false\n\
             maxPods: 9\n",
        )
        .unwrap();
        assert_eq!(c.max_pods, 9);
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("cgroupDriver"), "{:?}", c.warnings);
        assert!(c.warnings[0].contains("kubelet.yaml"), "{:?}", c.warnings);
        assert!(c.warnings[1].contains("authentication.anonymous"));
        assert!(from_file("").unwrap().warnings.is_empty());
    }

    #[test]
    fn every_ignored_kubelet_key_is_one_the_file_does_not_read() {
        for key in NOT_IMPLEMENTED {
            let err = serde_json::from_value::<FileConfig>(serde_json::json!({ *key: null }))
                .expect_err(key)
                .to_string();
            assert!(err.contains("unknown field"), "{key}: {err}");
        }
    }

    #[test]
    fn durations_read_as_the_kubelet_writes_them() {
        let secs = |y: &str| from_file(y).map(|c| c.file_check_frequency.as_secs());
        assert_eq!(secs("fileCheckFrequency: 20s\n").unwrap(), 20);
        assert_eq!(secs("fileCheckFrequency: 1m30s\n").unwrap(), 90);
        assert_eq!(secs("fileCheckFrequency: 3\n").unwrap(), 3);
        assert!(secs("fileCheckFrequency: 20x\n").is_err());
        assert!(secs("fileCheckFrequency: s\n").is_err());
    }

    #[test]
    fn the_file_reads_yaml_as_the_kubelet_reads_it() {
        // sigs.k8s.io/yaml: YAML 1.1 scalars (`yes`, octal `020`) into JSON types.
        let c = from_file("serializeImagePulls: yes\nmaxPods: 020\n").unwrap();
        assert_eq!((c.max_parallel_image_pulls, c.max_pods), (1, 16));
        let err = from_file("maxPods: 1\n---\nmaxPods: 2\n").unwrap_err();
        assert!(err.to_string().contains("2 YAML documents"), "{err}");
        let err = from_file("maxPods: [\n").unwrap_err();
        assert!(err.to_string().contains("kubelet.yaml"), "{err}");
        assert_eq!(from_file("maxPods: 3\n---\n").unwrap().max_pods, 3);
    }

    #[test]
    fn container_log_rotation_is_read_defaulted_and_refused_as_the_kubelet() {
        let rotation =
            |y: &str| from_file(y).map(|c| (c.container_log_max_size, c.container_log_max_files));
        assert_eq!(rotation("port: 1\n").unwrap(), (10 << 20, 5));
        let set = "containerLogMaxSize: 4Ki\ncontainerLogMaxFiles: 2\n";
        assert_eq!(rotation(set).unwrap(), (4096, 2));
        for bad in [
            "containerLogMaxSize: ten\n",
            "containerLogMaxSize: \"0\"\n",
            "containerLogMaxFiles: 1\n",
        ] {
            let err = rotation(bad).unwrap_err().to_string();
            assert!(err.contains("containerLogMax"), "{bad}: {err}");
        }
        let given = [
            "--container-log-max-size",
            "1Mi",
            "--container-log-max-files",
            "3",
        ];
        let c = Config::resolve(flags(&given), "host").unwrap();
        assert_eq!(
            (c.container_log_max_size, c.container_log_max_files),
            (1 << 20, 3)
        );
    }

    #[test]
    fn feature_gates_from_the_flag_win_over_the_file_gate_by_gate() {
        use crate::features::EXTEND_WEBSOCKETS_TO_KUBELET as WS;
        let c = Config::resolve(flags(&[]), "n").unwrap();
        assert!(c.feature_gates.enabled(WS), "on by default");
        let dir = tempfile_dir();
        let file = dir.join("kubelet.yaml");
        std::fs::write(
            &file,
            "featureGates:\n  ExtendWebSocketsToKubelet: false\n  SomeKubeletGate: true\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let c = Config::resolve(flags(&["--config", path]), "n").unwrap();
        assert!(!c.feature_gates.enabled(WS));
        assert!(c.warnings.iter().any(|w| w.contains("SomeKubeletGate")));
        let on = format!("--feature-gates={WS}=true,NodeDeclaredFeatures=true");
        let c = Config::resolve(flags(&["--config", path, &on]), "n").unwrap();
        assert!(c.feature_gates.enabled(WS), "the flag wins");
        let bad = Config::resolve(
            flags(&["--feature-gates", "ExtendWebSocketsToKubelet"]),
            "n",
        );
        assert!(matches!(
            bad,
            Err(ConfigError::Invalid {
                flag: "--feature-gates",
                ..
            })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_streaming_idle_timeout_is_read_and_defaults_to_four_hours() {
        let idle = |y: &str| from_file(y).unwrap().streaming_connection_idle_timeout;
        assert_eq!(idle("port: 1\n"), std::time::Duration::from_secs(4 * 3600));
        let five = idle("streamingConnectionIdleTimeout: 5m0s\n");
        assert_eq!(five, std::time::Duration::from_secs(300));
    }

    #[test]
    fn image_pulls_are_bounded_as_configured() {
        assert_eq!(from_file("port: 1\n").unwrap().max_parallel_image_pulls, 5);
        let serial = from_file("serializeImagePulls: true\n").unwrap();
        assert_eq!(serial.max_parallel_image_pulls, 1);
        let three = "serializeImagePulls: false\nmaxParallelImagePulls: 3\n";
        assert_eq!(from_file(three).unwrap().max_parallel_image_pulls, 3);
        assert!(from_file("serializeImagePulls: true\nmaxParallelImagePulls: 2\n").is_err());
        assert!(from_file("maxParallelImagePulls: 0\n").is_err());
        assert_eq!(
            Config::resolve(flags(&[]), "n")
                .unwrap()
                .max_parallel_image_pulls,
            5
        );
    }

    #[test]
    fn labels_and_taints_parse_like_the_kubelet() {
        let c = Config::resolve(
            flags(&[
                "--node-labels",
                "zone=a,role=",
                "--register-with-taints",
                "dedicated=db:NoExecute,gpu:NoSchedule",
            ]),
            "n",
        )
        .unwrap();
        assert_eq!(c.node_labels["zone"], "a");
        assert_eq!(c.node_labels["role"], "");
        assert_eq!(c.taints[0].value.as_deref(), Some("db"));
        assert_eq!(c.taints[1].effect, "NoSchedule");
        assert!(c.taints[1].value.is_none());
    }

    #[test]
    fn malformed_values_are_errors_not_panics() {
        assert!(Config::resolve(flags(&["--node-labels", "novalue"]), "n").is_err());
        assert!(Config::resolve(flags(&["--register-with-taints", "a=b:Bad"]), "n").is_err());
        assert!(Config::resolve(flags(&["--node-ip", "not-an-ip"]), "n").is_err());
        assert!(Config::resolve(flags(&["--authorization-mode", "RBAC"]), "n").is_err());
        let missing = Flags {
            config: Some("/nonexistent/nodelet.yaml".into()),
            ..Default::default()
        };
        assert!(matches!(
            Config::resolve(missing, "n"),
            Err(ConfigError::Read { .. })
        ));
    }
}
