//! Building a container's runtime config from its spec, purely: ids and spec hash, pull
//! policy and registry credentials, argv (command/args over the image's entrypoint/cmd with
//! `$(VAR)` expansion), environment, user, security context, sysctls, stop signal, bind mounts
//! and the log tail behind FallbackToLogsOnError. The worker does the I/O around it.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use sha2::{Digest, Sha256};

use super::env;
use crate::runtime::{ImageInfo, Mount, PullPolicy, RegistryAuth, Security, User};
use crate::store::ObjectStore;

/// The log tail used for FallbackToLogsOnError.
const LOG_TAIL_LINES: usize = 80;
const LOG_TAIL_BYTES: usize = 2048;

/// The containerd id of one attempt (stable, so a re-created attempt reuses it).
pub fn container_id(uid: &str, name: &str, attempt: u32) -> String {
    let digest = Sha256::digest(format!("{uid}/{name}/{attempt}"));
    hex::encode(&digest[..16])
}

/// A short hash of what can change in a running pod's container spec, its image (the
/// SPEC_HASH label); the rest of a pod's spec is immutable.
pub fn spec_hash(c: &Container) -> String {
    let image = c.image.as_deref().unwrap_or_default();
    hex::encode(&Sha256::digest(image.as_bytes())[..8])
}

/// The pull policy: the spec's, else Always for `:latest` or untagged images.
pub fn pull_policy(c: &Container) -> PullPolicy {
    match c.image_pull_policy.as_deref() {
        Some("Always") => PullPolicy::Always,
        Some("Never") => PullPolicy::Never,
        Some("IfNotPresent") => PullPolicy::IfNotPresent,
        _ => {
            let image = c.image.as_deref().unwrap_or_default();
            let last = image.rsplit('/').next().unwrap_or_default();
            match (image.contains('@'), last.rsplit_once(':')) {
                (true, _) => PullPolicy::IfNotPresent,
                (false, None | Some((_, "latest"))) => PullPolicy::Always,
                (false, Some(_)) => PullPolicy::IfNotPresent,
            }
        }
    }
}

/// The process argv: the k8s command/args over the image's entrypoint/cmd, `$(VAR)` expanded.
pub fn argv(c: &Container, image: &ImageInfo, env_vars: &[(String, String)]) -> Vec<String> {
    let expand =
        |v: &Vec<String>| -> Vec<String> { v.iter().map(|s| env::expand(s, env_vars)).collect() };
    let command = c.command.as_ref().map(expand).unwrap_or_default();
    let args = c.args.as_ref().map(expand).unwrap_or_default();
    let cfg = &image.config;
    if !command.is_empty() {
        [command, args].concat()
    } else if !args.is_empty() {
        [cfg.entrypoint.clone(), args].concat()
    } else {
        [cfg.entrypoint.clone(), cfg.cmd.clone()].concat()
    }
}

/// The image's env overridden by the container's, as KEY=VALUE.
pub fn merge_env(image_env: &[String], env_vars: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<(String, String)> = image_env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.clone(), String::new()),
        })
        .collect();
    for (k, v) in env_vars {
        match out.iter_mut().find(|(ek, _)| ek == k) {
            Some(slot) => slot.1 = v.clone(),
            None => out.push((k.clone(), v.clone())),
        }
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// A signal name ("SIGTERM", "TERM") or number.
pub fn parse_signal(name: &str) -> Option<i32> {
    if let Ok(n) = name.parse::<i32>() {
        return Some(n);
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

/// The content of a CRI log file's last lines.
pub fn log_tail(cri_log: &str) -> String {
    let out = super::logs::output(cri_log, Some(LOG_TAIL_LINES), false);
    let cut = out.len().saturating_sub(LOG_TAIL_BYTES);
    let cut = (cut..=out.len())
        .find(|i| out.is_char_boundary(*i))
        .unwrap_or(0);
    out[cut..].to_string()
}

pub fn bind(destination: &str, source: &std::path::Path, read_only: bool) -> Mount {
    let mode = if read_only { "ro" } else { "rw" };
    Mount {
        destination: destination.to_string(),
        source: source.display().to_string(),
        kind: "bind".into(),
        options: vec!["rbind".into(), "rprivate".into(), mode.into()],
    }
}

/// The registry an image reference names (docker.io when the first part is not a host).
pub fn registry_host(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// Credentials for the image's registry from the pod's imagePullSecrets (dockerconfigjson).
pub fn registry_auth(pod: &Pod, store: &ObjectStore, image: &str) -> Option<RegistryAuth> {
    let host = registry_host(image);
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let secrets = pod.spec.as_ref()?.image_pull_secrets.iter().flatten();
    secrets
        .filter_map(|r| store.secret(ns, &r.name))
        .find_map(|secret| {
            let values = crate::volume::secret_values(&secret);
            let config: serde_json::Value =
                serde_json::from_slice(values.get(".dockerconfigjson")?).ok()?;
            let entry = config.get("auths")?.as_object()?.iter().find(|(k, _)| {
                k.trim_start_matches("https://")
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    == host
            })?;
            let field = |f: &str| entry.1.get(f).and_then(|v| v.as_str()).map(str::to_string);
            Some(RegistryAuth {
                username: field("username")?,
                password: field("password")?,
            })
        })
}

pub fn user(pod: &Pod, c: &Container) -> User {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = c.security_context.as_ref();
    let to_u32 = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok());
    let mut groups: Vec<u32> = pod_sc
        .and_then(|p| p.supplemental_groups.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|g| u32::try_from(g).ok())
        .collect();
    if let Some(fs_group) = to_u32(pod_sc.and_then(|p| p.fs_group)) {
        groups.push(fs_group);
    }
    User {
        uid: to_u32(
            sc.and_then(|s| s.run_as_user)
                .or(pod_sc.and_then(|p| p.run_as_user)),
        ),
        gid: to_u32(
            sc.and_then(|s| s.run_as_group)
                .or(pod_sc.and_then(|p| p.run_as_group)),
        ),
        supplemental_groups: groups,
    }
}

pub fn security(c: &Container) -> Security {
    let sc = c.security_context.clone().unwrap_or_default();
    let caps = sc.capabilities.unwrap_or_default();
    Security {
        privileged: sc.privileged.unwrap_or(false),
        read_only_rootfs: sc.read_only_root_filesystem.unwrap_or(false),
        no_new_privileges: sc.allow_privilege_escalation == Some(false),
        add_capabilities: caps.add.unwrap_or_default(),
        drop_capabilities: caps.drop.unwrap_or_default(),
    }
}

pub fn sysctls(pod: &Pod) -> HashMap<String, String> {
    let sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    sc.and_then(|s| s.sysctls.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|s| (s.name, s.value))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ImageConfig;

    fn image(entrypoint: &[&str], cmd: &[&str]) -> ImageInfo {
        ImageInfo {
            config: ImageConfig {
                entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn strings(v: &[&str]) -> Option<Vec<String>> {
        Some(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn argv_resolution_table() {
        let img = image(&["/entry"], &["default"]);
        let env = vec![("WHO".to_string(), "world".to_string())];
        let cases = [
            (None, None, vec!["/entry", "default"]),
            (
                None,
                strings(&["a", "$(WHO)"]),
                vec!["/entry", "a", "world"],
            ),
            (strings(&["/bin/sh"]), None, vec!["/bin/sh"]),
            (
                strings(&["/bin/sh"]),
                strings(&["-c", "echo $$(WHO)"]),
                vec!["/bin/sh", "-c", "echo $(WHO)"],
            ),
        ];
        for (command, args, want) in cases {
            let c = Container {
                command: command.clone(),
                args: args.clone(),
                ..Default::default()
            };
            assert_eq!(argv(&c, &img, &env), want, "{command:?} {args:?}");
        }
    }

    #[test]
    fn env_merge_overrides_image_values_in_place() {
        let image_env = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        let env = vec![
            ("A".to_string(), "2".to_string()),
            ("B".to_string(), "3".to_string()),
        ];
        assert_eq!(merge_env(&image_env, &env), vec!["PATH=/bin", "A=2", "B=3"]);
    }

    #[test]
    fn pull_policy_defaults() {
        let c = |image: &str| Container {
            image: Some(image.into()),
            ..Default::default()
        };
        assert_eq!(pull_policy(&c("busybox")), PullPolicy::Always);
        assert_eq!(pull_policy(&c("busybox:latest")), PullPolicy::Always);
        assert_eq!(pull_policy(&c("127.0.0.1:5000/b")), PullPolicy::Always);
        assert_eq!(
            pull_policy(&c("127.0.0.1:5000/b:1.0")),
            PullPolicy::IfNotPresent
        );
        assert_eq!(pull_policy(&c("b@sha256:00")), PullPolicy::IfNotPresent);
        let never = Container {
            image_pull_policy: Some("Never".into()),
            ..c("busybox")
        };
        assert_eq!(pull_policy(&never), PullPolicy::Never);
    }

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(parse_signal("USR1"), Some(libc::SIGUSR1));
        assert_eq!(parse_signal("sigquit"), Some(libc::SIGQUIT));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("NOPE"), None);
    }

    #[test]
    fn cri_log_tail() {
        let log = "2024-01-01T00:00:00Z stderr P part\n2024-01-01T00:00:00Z stderr F ial\n2024-01-01T00:00:01Z stdout F last line\n";
        assert_eq!(log_tail(log), "partial\nlast line\n");
    }

    #[test]
    fn registry_hosts() {
        assert_eq!(
            registry_host("127.0.0.1:5000/nodelet/busybox:latest"),
            "127.0.0.1:5000"
        );
        assert_eq!(registry_host("localhost/x"), "localhost");
        assert_eq!(registry_host("library/busybox"), "docker.io");
        assert_eq!(registry_host("busybox"), "docker.io");
    }

    #[test]
    fn pull_secret_credentials_for_the_image_registry() {
        use k8s_openapi::api::core::v1::{LocalObjectReference, PodSpec, Secret};
        use k8s_openapi::ByteString;
        let store = ObjectStore::new();
        let json = r#"{"auths":{"http://127.0.0.1:5000/":{"username":"u","password":"p"}}}"#;
        store.update(|o| {
            o.secrets.insert(
                ("default".into(), "creds".into()),
                Secret {
                    data: Some([(".dockerconfigjson".to_string(), ByteString(json.into()))].into()),
                    ..Default::default()
                },
            );
        });
        let pod = Pod {
            spec: Some(PodSpec {
                image_pull_secrets: Some(vec![LocalObjectReference {
                    name: "creds".into(),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let auth = registry_auth(&pod, &store, "127.0.0.1:5000/a:1").unwrap();
        assert_eq!((auth.username.as_str(), auth.password.as_str()), ("u", "p"));
        assert!(registry_auth(&pod, &store, "other.example/a:1").is_none());
    }

    #[test]
    fn spec_hash_follows_the_image_only() {
        let c = |image: &str, args: &[&str]| Container {
            image: Some(image.into()),
            args: strings(args),
            ..Default::default()
        };
        assert_eq!(spec_hash(&c("a:1", &[])), spec_hash(&c("a:1", &["x"])));
        assert_ne!(spec_hash(&c("a:1", &[])), spec_hash(&c("a:2", &[])));
    }

    #[test]
    fn container_ids_are_stable_and_distinct() {
        assert_eq!(container_id("u", "c", 1), container_id("u", "c", 1));
        assert_ne!(container_id("u", "c", 1), container_id("u", "c", 2));
        assert_eq!(container_id("u", "c", 1).len(), 32);
    }
}
