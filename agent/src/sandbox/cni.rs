//! A small libcni: loads a network configuration list, runs its plugin chain (ADD in order
//! with `prevResult` chained, DEL in reverse order, CHECK in order) and reads pod IPs from the
//! result (CNI 0.3.x/0.4.0/1.0.0 `ips`, and the 0.1/0.2 `ip4`/`ip6` form).
//!
//! State: none here. The caller caches what `add` returned together with the [`NetworkList`]
//! and the [`Invocation`] so that DEL and CHECK after an agent restart use the same config.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

/// How long one plugin invocation may take before it is killed.
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(120);

/// A CNI operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
}

impl Command {
    /// The value of CNI_COMMAND.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
        }
    }
}

/// Errors of loading a network config or running a plugin.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The conf dir holds no `*.conflist`, `*.conf` or `*.json` file, or cannot be read.
    #[error("no network config in {dir}: {detail}")]
    NoConfig { dir: PathBuf, detail: String },
    /// A network config file is not a valid configuration (list).
    #[error("bad network config {file}: {detail}")]
    BadConfig { file: PathBuf, detail: String },
    /// The plugin's binary is in none of the bin dirs.
    #[error("plugin binary {plugin} not found in {dirs}")]
    NotFound { plugin: String, dirs: String },
    /// The plugin could not be started, or did not finish in time.
    #[error("plugin {plugin}: {detail}")]
    Exec { plugin: String, detail: String },
    /// The plugin failed and said why (the CNI error object, or its stderr).
    #[error(
        "plugin {plugin} failed (code {code}): {msg}{}",
        details_suffix(details)
    )]
    Plugin {
        plugin: String,
        code: u64,
        msg: String,
        details: String,
    },
    /// The plugin succeeded but its output is not a CNI result.
    #[error("plugin {plugin}: bad result: {detail}")]
    BadResult { plugin: String, detail: String },
    /// The configuration's version does not support the command (CHECK before 0.4.0).
    #[error("network {network} with cniVersion {version} does not support {command}")]
    Unsupported {
        network: String,
        version: String,
        command: &'static str,
    },
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(" ({details})")
    }
}

impl CniError {
    /// The plugin (its `type`) the error is about, or the network config's name.
    pub fn plugin(&self) -> String {
        match self {
            CniError::NoConfig { dir, .. } => dir.display().to_string(),
            CniError::BadConfig { file, .. } => file.display().to_string(),
            CniError::NotFound { plugin, .. }
            | CniError::Exec { plugin, .. }
            | CniError::Plugin { plugin, .. }
            | CniError::BadResult { plugin, .. } => plugin.clone(),
            CniError::Unsupported { network, .. } => network.clone(),
        }
    }
}

/// A network configuration list (a `.conf` file is loaded as a list of one plugin).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkList {
    pub name: String,
    pub cni_version: String,
    /// Each plugin's own config object, as in the file (with its `type`).
    pub plugins: Vec<Map<String, Value>>,
    /// The file it was loaded from.
    pub source: PathBuf,
}

impl NetworkList {
    /// Parses a `.conflist` (`single = false`) or a single-plugin `.conf`/`.json`.
    pub fn parse(text: &str, source: &Path, single: bool) -> Result<Self, CniError> {
        let bad = |detail: String| CniError::BadConfig {
            file: source.to_path_buf(),
            detail,
        };
        let value: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(bad("not a JSON object".into()));
        };
        let string = |key: &str| obj.get(key).and_then(Value::as_str).map(str::to_string);
        let name = string("name").filter(|n| !n.is_empty());
        let name = name.ok_or_else(|| bad("missing \"name\"".into()))?;
        let cni_version = string("cniVersion").unwrap_or_else(|| "0.1.0".into());
        let plugins = if single {
            vec![obj.clone()]
        } else {
            let list = obj.get("plugins").and_then(Value::as_array);
            let list = list.ok_or_else(|| bad("missing \"plugins\" list".into()))?;
            list.iter()
                .map(|p| p.as_object().cloned())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("a plugin is not a JSON object".into()))?
        };
        if plugins.is_empty() {
            return Err(bad("no plugins".into()));
        }
        if plugins.iter().any(|p| {
            p.get("type")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        }) {
            return Err(bad("a plugin has no \"type\"".into()));
        }
        Ok(NetworkList {
            name,
            cni_version,
            plugins,
            source: source.to_path_buf(),
        })
    }

    /// Loads the first config file (by name) with a `.conflist`, `.conf` or `.json` extension.
    pub fn load_dir(dir: &Path) -> Result<Self, CniError> {
        let no_config = |detail: String| CniError::NoConfig {
            dir: dir.to_path_buf(),
            detail,
        };
        let entries = std::fs::read_dir(dir).map_err(|e| no_config(e.to_string()))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect();
        files.sort();
        let file = files
            .into_iter()
            .next()
            .ok_or_else(|| no_config("no *.conflist, *.conf or *.json file".into()))?;
        let text = std::fs::read_to_string(&file).map_err(|e| CniError::BadConfig {
            file: file.clone(),
            detail: e.to_string(),
        })?;
        let single = file.extension().and_then(|e| e.to_str()) != Some("conflist");
        Self::parse(&text, &file, single)
    }

    /// Whether this version passes prevResult to DEL and supports CHECK (0.4.0 and later).
    pub fn supports_check(&self) -> bool {
        version_tuple(&self.cni_version) >= (0, 4, 0)
    }

    /// The stdin of one plugin: its config with name, cniVersion, prevResult and the
    /// runtimeConfig entries for the capabilities it declares injected.
    pub fn plugin_config(
        &self,
        index: usize,
        prev_result: Option<&Value>,
        runtime_config: &Map<String, Value>,
    ) -> Value {
        let mut conf = self.plugins[index].clone();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        if let Some(prev) = prev_result {
            conf.insert("prevResult".into(), prev.clone());
        }
        let mut rt = Map::new();
        if let Some(Value::Object(caps)) = conf.get("capabilities") {
            for (cap, enabled) in caps {
                if enabled.as_bool() == Some(true) {
                    if let Some(v) = runtime_config.get(cap) {
                        rt.insert(cap.clone(), v.clone());
                    }
                }
            }
        }
        if !rt.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rt));
        }
        Value::Object(conf)
    }

    fn plugin_type(&self, index: usize) -> String {
        self.plugins[index]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }
}

fn version_tuple(v: &str) -> (u32, u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// What identifies one attachment: the same values must be given to ADD, CHECK and DEL.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Invocation {
    pub container_id: String,
    /// Path of the network namespace; empty for a DEL whose netns is gone.
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS pairs (`IgnoreUnknown=1` is always sent first).
    pub args: Vec<(String, String)>,
    /// Values for capabilities (e.g. `portMappings`), injected as runtimeConfig.
    pub runtime_config: Map<String, Value>,
}

impl Invocation {
    fn cni_args(&self) -> String {
        std::iter::once("IgnoreUnknown=1".to_string())
            .chain(self.args.iter().map(|(k, v)| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// Runs a plugin chain with the configured bin dirs.
#[derive(Clone, Debug)]
pub struct Cni {
    pub bin_dirs: Vec<PathBuf>,
}

impl Cni {
    /// ADD: every plugin in order, each getting the previous one's result; returns the last.
    pub async fn add(&self, net: &NetworkList, inv: &Invocation) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for i in 0..net.plugins.len() {
            let stdin = net.plugin_config(i, prev.as_ref(), &inv.runtime_config);
            let out = self.exec(net, i, Command::Add, inv, &stdin).await?;
            let result: Value = serde_json::from_slice(&out).map_err(|e| CniError::BadResult {
                plugin: net.plugin_type(i),
                detail: e.to_string(),
            })?;
            if !result.is_object() {
                return Err(CniError::BadResult {
                    plugin: net.plugin_type(i),
                    detail: "not a JSON object".into(),
                });
            }
            prev = Some(result);
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// DEL: every plugin in reverse order; from 0.4.0 on each gets the cached ADD result.
    /// Stops at the first failure unless `best_effort`, which tries all and returns the first
    /// error.
    pub async fn del(
        &self,
        net: &NetworkList,
        inv: &Invocation,
        cached: Option<&Value>,
        best_effort: bool,
    ) -> Result<(), CniError> {
        let prev = cached.filter(|_| net.supports_check());
        let mut first_err = None;
        for i in (0..net.plugins.len()).rev() {
            let stdin = net.plugin_config(i, prev, &inv.runtime_config);
            if let Err(e) = self.exec(net, i, Command::Del, inv, &stdin).await {
                if !best_effort {
                    return Err(e);
                }
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// CHECK: every plugin in order with the cached ADD result (0.4.0 and later).
    pub async fn check(
        &self,
        net: &NetworkList,
        inv: &Invocation,
        cached: &Value,
    ) -> Result<(), CniError> {
        if !net.supports_check() {
            return Err(CniError::Unsupported {
                network: net.name.clone(),
                version: net.cni_version.clone(),
                command: Command::Check.as_str(),
            });
        }
        for i in 0..net.plugins.len() {
            let stdin = net.plugin_config(i, Some(cached), &inv.runtime_config);
            self.exec(net, i, Command::Check, inv, &stdin).await?;
        }
        Ok(())
    }

    fn find(&self, plugin: &str) -> Result<PathBuf, CniError> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::NotFound {
                plugin: plugin.to_string(),
                dirs: self.cni_path(),
            })
    }

    fn cni_path(&self) -> String {
        self.bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    async fn exec(
        &self,
        net: &NetworkList,
        index: usize,
        command: Command,
        inv: &Invocation,
        stdin: &Value,
    ) -> Result<Vec<u8>, CniError> {
        let plugin = net.plugin_type(index);
        let binary = self.find(&plugin)?;
        let exec_err = |detail: String| CniError::Exec {
            plugin: plugin.clone(),
            detail,
        };
        let mut child = tokio::process::Command::new(&binary)
            .env("CNI_COMMAND", command.as_str())
            .env("CNI_CONTAINERID", &inv.container_id)
            .env("CNI_NETNS", &inv.netns)
            .env("CNI_IFNAME", &inv.ifname)
            .env("CNI_ARGS", inv.cni_args())
            .env("CNI_PATH", self.cni_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| exec_err(format!("start {}: {e}", binary.display())))?;
        let input = serde_json::to_vec(stdin).map_err(|e| exec_err(e.to_string()))?;
        if let Some(mut pipe) = child.stdin.take() {
            // A plugin that exits without reading its config closes the pipe; its own
            // output then says why, so a broken pipe is not the error to report.
            match pipe.write_all(&input).await {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(exec_err(format!("write config: {e}")));
                }
                _ => {}
            }
        }
        let output = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| exec_err(format!("no answer within {PLUGIN_TIMEOUT:?}")))?
            .map_err(|e| exec_err(e.to_string()))?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        Err(plugin_error(
            &plugin,
            &output.stdout,
            &output.stderr,
            output.status,
        ))
    }
}

/// The CNI error object a failing plugin prints on stdout.
#[derive(Deserialize)]
struct ErrorObject {
    #[serde(default)]
    code: u64,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// Turns a failed plugin's output into an error: the CNI error object if it printed one,
/// else its stderr (or stdout) text.
fn plugin_error(
    plugin: &str,
    stdout: &[u8],
    stderr: &[u8],
    status: std::process::ExitStatus,
) -> CniError {
    if let Ok(err) = serde_json::from_slice::<ErrorObject>(stdout) {
        if !err.msg.is_empty() || err.code != 0 {
            return CniError::Plugin {
                plugin: plugin.to_string(),
                code: err.code,
                msg: err.msg,
                details: err.details,
            };
        }
    }
    let text = [stderr, stdout]
        .iter()
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| status.to_string());
    CniError::Plugin {
        plugin: plugin.to_string(),
        code: 0,
        msg: text,
        details: String::new(),
    }
}

/// The IPs of a result, in its order. With `ifname` given and interfaces listed, only IPs of
/// that interface inside the sandbox (or with no interface index) are returned.
pub fn result_ips(result: &Value, ifname: Option<&str>) -> Vec<IpAddr> {
    let interfaces = result.get("interfaces").and_then(Value::as_array);
    let wanted = |ip: &Value| -> bool {
        let (Some(ifname), Some(ifaces)) = (ifname, interfaces) else {
            return true;
        };
        let Some(idx) = ip.get("interface").and_then(Value::as_u64) else {
            return true;
        };
        ifaces.get(idx as usize).is_some_and(|iface| {
            iface.get("name").and_then(Value::as_str) == Some(ifname)
                && iface
                    .get("sandbox")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
        })
    };
    let mut out = Vec::new();
    if let Some(ips) = result.get("ips").and_then(Value::as_array) {
        out.extend(
            ips.iter()
                .filter(|ip| wanted(ip))
                .filter_map(|ip| ip.get("address").and_then(Value::as_str))
                .filter_map(parse_cidr_ip),
        );
    }
    for key in ["ip4", "ip6"] {
        if let Some(addr) = result
            .get(key)
            .and_then(|v| v.get("ip"))
            .and_then(Value::as_str)
        {
            out.extend(parse_cidr_ip(addr));
        }
    }
    out
}

/// `10.233.0.5/16` → 10.233.0.5.
fn parse_cidr_ip(cidr: &str) -> Option<IpAddr> {
    cidr.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIST: &str = r#"{
        "cniVersion": "1.0.0", "name": "nodelet",
        "plugins": [
            {"type": "bridge", "bridge": "nodelet0"},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]}"#;

    fn list() -> NetworkList {
        NetworkList::parse(LIST, Path::new("/x/10.conflist"), false).unwrap()
    }

    #[test]
    fn parses_conflist_and_single_conf() {
        let l = list();
        assert_eq!(l.name, "nodelet");
        assert_eq!(l.cni_version, "1.0.0");
        assert_eq!(l.plugins.len(), 2);
        assert!(l.supports_check());

        let single = NetworkList::parse(
            r#"{"cniVersion":"0.3.1","name":"n","type":"bridge"}"#,
            Path::new("/x/a.conf"),
            true,
        )
        .unwrap();
        assert_eq!(single.plugins.len(), 1);
        assert!(!single.supports_check());
    }

    #[test]
    fn rejects_bad_configs() {
        for text in [
            "not json",
            "[]",
            r#"{"name":"n","plugins":[]}"#,
            r#"{"name":"n","plugins":[{"bridge":"x"}]}"#,
            r#"{"plugins":[{"type":"bridge"}]}"#,
            r#"{"name":"n"}"#,
        ] {
            let err = NetworkList::parse(text, Path::new("/x/b.conflist"), false).unwrap_err();
            assert!(matches!(err, CniError::BadConfig { .. }), "{text}: {err}");
        }
    }

    #[test]
    fn plugin_config_injects_name_version_prev_and_capabilities() {
        let l = list();
        let mut rt = Map::new();
        rt.insert("portMappings".into(), json!([{"hostPort": 80}]));
        rt.insert("bandwidth".into(), json!({}));
        let first = l.plugin_config(0, None, &rt);
        assert_eq!(
            first,
            json!({"type":"bridge","bridge":"nodelet0","name":"nodelet","cniVersion":"1.0.0"})
        );
        let prev = json!({"cniVersion":"1.0.0","ips":[]});
        let second = l.plugin_config(1, Some(&prev), &rt);
        assert_eq!(second["prevResult"], prev);
        assert_eq!(
            second["runtimeConfig"],
            json!({"portMappings":[{"hostPort":80}]})
        );
        // No runtimeConfig when nothing matches.
        let second = l.plugin_config(1, None, &Map::new());
        assert!(second.get("runtimeConfig").is_none());
    }

    #[test]
    fn result_ips_of_each_format() {
        let v1 = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "nodelet0", "mac": "aa"},
                {"name": "veth1", "mac": "bb"},
                {"name": "eth0", "mac": "cc", "sandbox": "/run/x/net"}
            ],
            "ips": [
                {"address": "10.233.0.1/16", "interface": 0},
                {"address": "10.233.0.9/16", "gateway": "10.233.0.1", "interface": 2},
                {"address": "fd00::9/64", "interface": 2}
            ]
        });
        let ips = result_ips(&v1, Some("eth0"));
        assert_eq!(
            ips,
            vec![
                "10.233.0.9".parse::<IpAddr>().unwrap(),
                "fd00::9".parse().unwrap()
            ]
        );
        assert_eq!(result_ips(&v1, None).len(), 3);

        let old = json!({"ip4": {"ip": "10.1.0.5/24"}});
        assert_eq!(
            result_ips(&old, Some("eth0")),
            vec!["10.1.0.5".parse::<IpAddr>().unwrap()]
        );
        assert!(result_ips(&json!({}), None).is_empty());
    }

    #[test]
    fn plugin_errors_use_the_cni_error_object() {
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::ExitStatus::from_raw(256);
        let err = plugin_error(
            "bridge",
            br#"{"cniVersion":"1.0.0","code":7,"msg":"failed to set up","details":"eth0 exists"}"#,
            b"",
            status,
        );
        assert_eq!(
            err.to_string(),
            "plugin bridge failed (code 7): failed to set up (eth0 exists)"
        );
        let err = plugin_error("x", b"", b"boom\n", status);
        assert_eq!(err.to_string(), "plugin x failed (code 0): boom");
        assert_eq!(err.plugin(), "x");
    }

    #[test]
    fn cni_args_start_with_ignore_unknown() {
        let inv = Invocation {
            container_id: "u".into(),
            netns: String::new(),
            ifname: "eth0".into(),
            args: vec![("K8S_POD_NAME".into(), "p".into())],
            runtime_config: Map::new(),
        };
        assert_eq!(inv.cni_args(), "IgnoreUnknown=1;K8S_POD_NAME=p");
    }

    #[tokio::test]
    async fn missing_plugin_binary_is_not_found() {
        let cni = Cni {
            bin_dirs: vec![PathBuf::from("/nonexistent-cni-bin")],
        };
        let inv = Invocation {
            container_id: "u".into(),
            netns: "/nonexistent".into(),
            ifname: "eth0".into(),
            args: vec![],
            runtime_config: Map::new(),
        };
        let err = cni.add(&list(), &inv).await.unwrap_err();
        assert!(matches!(&err, CniError::NotFound { plugin, .. } if plugin == "bridge"));
    }

    #[test]
    fn load_dir_takes_first_file_by_name() {
        let dir = std::env::temp_dir().join(format!("nodelet-cni-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(
            NetworkList::load_dir(&dir),
            Err(CniError::NoConfig { .. })
        ));
        std::fs::write(dir.join("20-b.conflist"), LIST.replace("nodelet", "b")).unwrap();
        std::fs::write(dir.join("10-a.conf"), r#"{"name":"a","type":"bridge"}"#).unwrap();
        std::fs::write(dir.join("05-ignored.txt"), "x").unwrap();
        let l = NetworkList::load_dir(&dir).unwrap();
        assert_eq!(l.name, "a");
        assert_eq!(l.cni_version, "0.1.0");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
