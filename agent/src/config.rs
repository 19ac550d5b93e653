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
    /// The --config file is not valid YAML for the known fields.
    #[error("parsing config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
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
    /// key=value,… labels for the Node.
    #[arg(long, value_delimiter = ',')]
    pub node_labels: Option<Vec<String>>,
    /// key=value:Effect,… taints registered with the Node.
    #[arg(long, value_delimiter = ',')]
    pub register_with_taints: Option<Vec<String>>,
    /// Read-only HTTP port on 127.0.0.1; 0 disables it. Default 10255.
    #[arg(long)]
    pub read_only_port: Option<u16>,
    /// Address the read-only and secure ports bind. Default 127.0.0.1.
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
    /// AlwaysAllow or Webhook (SubjectAccessReview; needs --kubeconfig). Default Webhook with
    /// a kubeconfig, else AlwaysAllow.
    #[arg(long)]
    pub authorization_mode: Option<String>,
    /// The node IP to report; default the first non-loopback IPv4 address.
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
    /// Log verbosity: 0 info, 1-3 debug, 4+ trace; or RUST_LOG-style filter via --log-filter.
    #[arg(short = 'v', long = "v")]
    pub verbosity: Option<u8>,
}

/// The same settings as a YAML file, with KubeletConfiguration's field names where they exist.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FileConfig {
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
    pub file_check_frequency: Option<u64>,
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
    pub node_labels: std::collections::BTreeMap<String, String>,
    pub taints: Vec<k8s_openapi::api::core::v1::Taint>,
    pub read_only_port: u16,
    pub address: String,
    pub port: u16,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
    /// Webhook authorization on the secure port (else AlwaysAllow).
    pub authorization_webhook: bool,
    pub node_ip: Option<std::net::IpAddr>,
    pub log_dir: PathBuf,
    pub run_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub file_check_frequency: std::time::Duration,
    pub verbosity: u8,
}

impl Config {
    /// Merges flags over the file (if any) over the defaults. `hostname` is the machine's name,
    /// passed in so tests need no real host.
    pub fn resolve(flags: Flags, hostname: &str) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
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
        let authorization_webhook = match flags.authorization_mode.as_deref() {
            None => kubeconfig.is_some(),
            Some("AlwaysAllow") => false,
            Some("Webhook") if kubeconfig.is_some() => true,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    flag: "--authorization-mode",
                    detail: format!(
                        "{other:?}: AlwaysAllow, or Webhook (which needs --kubeconfig)"
                    ),
                })
            }
        };
        let node_name = flags
            .hostname_override
            .or(file.hostname_override)
            .unwrap_or_else(|| hostname.to_string())
            .to_lowercase();
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
            node_labels,
            taints,
            read_only_port: flags
                .read_only_port
                .or(file.read_only_port)
                .unwrap_or(10255),
            address: flags
                .address
                .or(file.address)
                .unwrap_or_else(|| "127.0.0.1".into()),
            port: flags.port.or(file.port).unwrap_or(10250),
            tls_cert_file: flags.tls_cert_file.or(file.tls_cert_file),
            tls_private_key_file: flags.tls_private_key_file.or(file.tls_private_key_file),
            client_ca_file: flags.client_ca_file,
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
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
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
        assert_eq!(c.read_only_port, 10255);
        assert_eq!(c.port, 10250);
        assert!(!c.authorization_webhook, "standalone: AlwaysAllow");
        let with_api = Config::resolve(flags(&["--kubeconfig", "/k"]), "n").unwrap();
        assert!(with_api.authorization_webhook, "with the API: Webhook");
        assert_eq!(c.max_pods, 110);
        assert_eq!(c.cluster_domain, "cluster.local");
        assert!(c.kubeconfig.is_none());
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
        std::fs::remove_dir_all(dir).unwrap();
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
        assert!(Config::resolve(flags(&["--authorization-mode", "Webhook"]), "n").is_err());
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
