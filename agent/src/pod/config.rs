//! Building a container's runtime config from its spec, purely: ids and spec hash, pull
//! policy and registry credentials, argv (command/args over the image's entrypoint/cmd with
//! `$(VAR)` expansion), environment, user, security context, sysctls, stop signal, bind mounts
//! and the log tail behind FallbackToLogsOnError. The worker does the I/O around it.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use sha2::{Digest, Sha256};

use super::env;
use crate::runtime::{registry, ImageInfo, Mount, PullPolicy, RegistryAuth, Security, User};
use crate::store::ObjectStore;

/// The log tail used for FallbackToLogsOnError.
const LOG_TAIL_LINES: usize = 80;
const LOG_TAIL_BYTES: usize = 2048;
/// The most of a termination-message file read (its end).
const MESSAGE_MAX: usize = 4096;

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

/// The kubelet's FallbackToLogsOnError message: the output of the log file's last 80 records,
/// at most its last 2048 bytes. Read from the end of the file: a window that grows until it
/// holds enough whole records, never more than 80 records of the longest size.
pub fn log_tail(path: &std::path::Path) -> String {
    // A record's header: RFC 3339 nano time, stream, tag (under 64 bytes).
    const HEADER: usize = 64;
    let most = LOG_TAIL_LINES * (crate::runtime::logdriver::MAX_LINE + HEADER);
    let mut window = LOG_TAIL_BYTES + LOG_TAIL_LINES * HEADER;
    loop {
        let (bytes, whole) = read_tail_bytes(path, window);
        let text = String::from_utf8_lossy(&bytes);
        // The window's first record is cut unless the window holds the whole file.
        let records = match whole {
            true => &text[..],
            false => text.split_once('\n').map_or("", |(_, rest)| rest),
        };
        let kept = records.lines().count();
        let out = super::logs::output(records, Some(LOG_TAIL_LINES), false);
        if whole || kept >= LOG_TAIL_LINES || out.len() >= LOG_TAIL_BYTES || window >= most {
            return last_bytes(&out, LOG_TAIL_BYTES).to_string();
        }
        window = (window * 2).min(most);
    }
}

/// The end of `text`, at most `max` bytes, starting on a character boundary.
fn last_bytes(text: &str, max: usize) -> &str {
    let cut = text.len().saturating_sub(max);
    let cut = (cut..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    &text[cut..]
}

/// The last `max` bytes of a file (empty when it cannot be read), and whether that is all of
/// it. Only those bytes are read.
pub fn read_tail_bytes(path: &std::path::Path, max: usize) -> (Vec<u8>, bool) {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return (Vec::new(), true);
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(max as u64);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return (Vec::new(), true);
    }
    let mut bytes = Vec::with_capacity(max.min(len as usize));
    let _ = file.take(max as u64).read_to_end(&mut bytes);
    (bytes, start == 0)
}

/// The termination-message file as the kubelet reads it: its last 4096 bytes.
pub fn termination_file(path: &std::path::Path) -> String {
    let (bytes, _) = read_tail_bytes(path, MESSAGE_MAX);
    String::from_utf8_lossy(&bytes).into_owned()
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

/// Credentials for the image from the pod's imagePullSecrets (`.dockerconfigjson`, or the
/// legacy `.dockercfg`): the first secret whose keyring matches, as the kubelet tries them.
pub fn registry_auth(pod: &Pod, store: &ObjectStore, image: &str) -> Option<RegistryAuth> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let secrets = pod.spec.as_ref()?.image_pull_secrets.iter().flatten();
    secrets
        .filter_map(|r| store.secret(ns, &r.name))
        .find_map(|secret| {
            let values = crate::volume::secret_values(&secret);
            let raw = values
                .get(".dockerconfigjson")
                .or_else(|| values.get(".dockercfg"))?;
            keyring_lookup(&serde_json::from_slice(raw).ok()?, image)
        })
}

/// The kubelet's docker keyring (`pkg/credentialprovider`), written here because no crate
/// keys and matches registries its way: each `auths` key (or the legacy top-level map) is
/// made schemeless, `/v1/` or `/v2/` dropped, and the image's repository (its normalised
/// name without tag or digest, as the kubelet looks it up) matches a key with the same port,
/// as many host name parts, each matching the key's as a glob, and the key's path as a prefix;
/// the longest keys are tried first, then Docker Hub's `index.docker.io` for images that pull
/// from Docker Hub. An entry's `auth` (base64 `user:password`) wins over its username and
/// password. An image name that does not parse gets none (its pull fails as InvalidImageName).
pub fn keyring_lookup(config: &serde_json::Value, image: &str) -> Option<RegistryAuth> {
    let reference = registry::parse(image).ok()?;
    let repository = registry::name(&reference);
    let auths = config.get("auths").unwrap_or(config).as_object()?;
    let mut keyring: Vec<(String, RegistryAuth)> = auths
        .iter()
        .filter_map(|(loc, entry)| Some((keyring_key(loc), keyring_entry(entry)?)))
        .collect();
    keyring.sort_by(|a, b| b.0.cmp(&a.0));
    let found = keyring
        .iter()
        .find(|(key, _)| keyring_match(key, &repository));
    let found = found.or_else(|| {
        (reference.registry() == "docker.io")
            .then(|| keyring.iter().find(|(key, _)| key == "index.docker.io"))
            .flatten()
    });
    found.map(|(_, auth)| auth.clone())
}

fn keyring_entry(entry: &serde_json::Value) -> Option<RegistryAuth> {
    let field = |f: &str| entry.get(f).and_then(|v| v.as_str()).unwrap_or_default();
    let auth = field("auth");
    if auth.is_empty() {
        return Some(RegistryAuth {
            username: field("username").to_string(),
            password: field("password").to_string(),
        });
    }
    // ByteString reads base64 as the API does.
    let decoded: k8s_openapi::ByteString =
        serde_json::from_value(serde_json::Value::String(auth.to_string())).ok()?;
    let text = String::from_utf8(decoded.0).ok()?;
    let (username, password) = text.split_once(':')?;
    Some(RegistryAuth {
        username: username.to_string(),
        password: password.trim_matches('\0').to_string(),
    })
}

/// Splits a schemeless location into (host, path), path with its leading '/'.
fn host_and_path(location: &str) -> (&str, &str) {
    let rest = location
        .strip_prefix("https://")
        .or_else(|| location.strip_prefix("http://"))
        .unwrap_or(location);
    rest.find('/').map_or((rest, ""), |i| rest.split_at(i))
}

fn keyring_key(location: &str) -> String {
    let (host, path) = host_and_path(location);
    let path = match path.get(..4) {
        Some("/v1/" | "/v2/") => &path[3..],
        _ => path,
    };
    match path {
        "" | "/" => host.to_string(),
        _ => format!("{host}{path}"),
    }
}

fn keyring_match(key: &str, image: &str) -> bool {
    let ((key_host, key_path), (host, path)) = (host_and_path(key), host_and_path(image));
    let split = |h: &str| -> (Vec<String>, String) {
        let (name, port) = h.split_once(':').unwrap_or((h, ""));
        (
            name.split('.').map(str::to_string).collect(),
            port.to_string(),
        )
    };
    let ((key_parts, key_port), (parts, port)) = (split(key_host), split(host));
    key_port == port
        && key_parts.len() == parts.len()
        && path.starts_with(key_path)
        && key_parts
            .iter()
            .zip(&parts)
            .all(|(k, p)| glob_match(k.as_bytes(), p.as_bytes()))
}

/// `*` and `?` globbing of one host name part.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob_match(rest, &text[i..])),
        Some((b'?', rest)) => !text.is_empty() && glob_match(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && glob_match(rest, &text[1..]),
    }
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

/// The kubelet's `runAsNonRoot` check, made before a container is created: with runAsNonRoot
/// in effect (the container's, else the pod's), an effective runAsUser of 0, or else an image
/// user that is uid 0 (an empty USER is root) or a name that cannot be checked, is refused
/// with the kubelet's message (a CreateContainerConfigError). The image user is read as
/// containerd's CRI reads it: the part before ':', numeric or a name.
pub fn verify_run_as_non_root(
    pod: &Pod,
    c: &Container,
    image_user: Option<&str>,
) -> Result<(), String> {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = c.security_context.as_ref();
    let non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(pod_sc.and_then(|p| p.run_as_non_root));
    if non_root != Some(true) {
        return Ok(());
    }
    let who = format!(
        "(pod: {}, container: {})",
        crate::volume::downward::go_quote(&super::format_pod(pod)),
        c.name
    );
    let run_as_user = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|p| p.run_as_user));
    if let Some(uid) = run_as_user {
        return match uid {
            0 => Err(format!(
                "container's runAsUser breaks non-root policy {who}"
            )),
            _ => Ok(()),
        };
    }
    let user = image_user.unwrap_or_default();
    let user = user.split(':').next().unwrap_or_default();
    match user.parse::<i64>() {
        Err(_) if !user.is_empty() => Err(format!(
            "container has runAsNonRoot and image has non-numeric user ({user}), cannot verify \
             user is non-root {who}"
        )),
        Ok(0) | Err(_) => Err(format!(
            "container has runAsNonRoot and image will run as root {who}"
        )),
        Ok(uid) if !(0..=i64::from(i32::MAX)).contains(&uid) => Err(format!(
            "container has runAsNonRoot and image has an invalid user id ({uid}). (Must be \
             1-({max})): must be between 0 and {max}, inclusive {who}",
            max = i32::MAX
        )),
        Ok(_) => Ok(()),
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
    fn run_as_non_root_is_verified_as_the_kubelet_does() {
        use k8s_openapi::api::core::v1::{PodSecurityContext, PodSpec, SecurityContext};
        let mut pod = Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("web".into()),
                namespace: Some("ns".into()),
                uid: Some("u-1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                security_context: Some(PodSecurityContext {
                    run_as_non_root: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut c = Container {
            name: "main".into(),
            ..Default::default()
        };
        let root = "container has runAsNonRoot and image will run as root \
                    (pod: \"web_ns(u-1)\", container: main)";
        assert_eq!(verify_run_as_non_root(&pod, &c, None).unwrap_err(), root);
        assert_eq!(
            verify_run_as_non_root(&pod, &c, Some("")).unwrap_err(),
            root
        );
        assert_eq!(
            verify_run_as_non_root(&pod, &c, Some("0:0")).unwrap_err(),
            root
        );
        assert_eq!(
            verify_run_as_non_root(&pod, &c, Some("root")).unwrap_err(),
            "container has runAsNonRoot and image has non-numeric user (root), cannot verify \
             user is non-root (pod: \"web_ns(u-1)\", container: main)"
        );
        assert!(verify_run_as_non_root(&pod, &c, Some("1000:1000")).is_ok());
        // The container's runAsUser, else the pod's, wins over the image.
        let pod_sc = pod
            .spec
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap();
        pod_sc.run_as_user = Some(1000);
        assert!(verify_run_as_non_root(&pod, &c, Some("root")).is_ok());
        c.security_context = Some(SecurityContext {
            run_as_user: Some(0),
            ..Default::default()
        });
        assert_eq!(
            verify_run_as_non_root(&pod, &c, Some("1000")).unwrap_err(),
            "container's runAsUser breaks non-root policy (pod: \"web_ns(u-1)\", container: main)"
        );
        // The container may turn the check off.
        c.security_context.as_mut().unwrap().run_as_non_root = Some(false);
        assert!(verify_run_as_non_root(&pod, &c, None).is_ok());
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

    /// A scratch directory removed when dropped.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str, content: &[u8]) -> (Scratch, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("nodelet-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        (Scratch(dir), path)
    }

    #[test]
    fn cri_log_tail() {
        let log = "2024-01-01T00:00:00Z stderr P part\n2024-01-01T00:00:00Z stderr F ial\n2024-01-01T00:00:01Z stdout F last line\n";
        let (_dir, path) = scratch("0.log", log.as_bytes());
        assert_eq!(log_tail(&path), "partial\nlast line\n");
        let (_dir, path) = scratch("1.log", b"2024-01-01T00:00:00Z stdout P DONE\n");
        assert_eq!(log_tail(&path), "DONE");
        assert_eq!(log_tail(&_dir.path().join("missing")), "");
    }

    #[test]
    fn log_tail_keeps_the_last_80_records_and_2048_bytes() {
        let record = |i: usize| format!("2024-01-01T00:00:00.000000000Z stdout F line {i}\n");
        let log: String = (0..200_000).map(record).collect();
        let (_dir, path) = scratch("0.log", log.as_bytes());
        let want: String = (199_920..200_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(log_tail(&path), want);
        let long = |c: char| {
            format!(
                "2024-01-01T00:00:00Z stdout F {}\n",
                c.to_string().repeat(3000)
            )
        };
        let log = format!("{}{}", long('a'), long('b'));
        let (_dir, path) = scratch("1.log", log.as_bytes());
        let tail = log_tail(&path);
        assert_eq!(tail.len(), 2048);
        assert_eq!(tail, format!("{}\n", "b".repeat(2047)));
    }

    #[test]
    fn termination_file_is_read_from_its_end_up_to_4096_bytes() {
        let mut text = "x".repeat(10_000);
        text.push_str("END");
        let (_dir, path) = scratch("termination-0", text.as_bytes());
        let read = termination_file(&path);
        assert_eq!(read.len(), 4096);
        assert!(read.ends_with("xEND"));
        let (_dir, path) = scratch("termination-1", b"short");
        assert_eq!(termination_file(&path), "short");
    }

    #[test]
    fn pull_secret_credentials_for_the_image_registry() {
        use k8s_openapi::api::core::v1::{LocalObjectReference, PodSpec, Secret};
        use k8s_openapi::ByteString;
        let store = ObjectStore::new();
        let json = r#"{"auths":{"http://127.0.0.1:5000/":{"username":"u","password":"p"}}}"#;
        store.set_secret(
            "default",
            "creds",
            Some(Secret {
                data: Some([(".dockerconfigjson".to_string(), ByteString(json.into()))].into()),
                ..Default::default()
            }),
        );
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
    fn pull_secrets_match_as_the_kubelet_keyring() {
        let auths = r#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"aHViOmh1YnB3"},
            "127.0.0.1:5000":{"username":"local","password":"p"},
            "registry.example.com":{"username":"all","password":"p"},
            "registry.example.com/team":{"username":"team","password":"p","auth":""},
            "*.glob.example":{"username":"glob","password":"p"}
        }}"#;
        let config: serde_json::Value = serde_json::from_str(auths).unwrap();
        let user = |image: &str| keyring_lookup(&config, image).map(|a| a.username);
        let hub = keyring_lookup(&config, "busybox").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("hub", "hubpw")
        );
        for image in [
            "library/busybox",
            "docker.io/library/busybox:1",
            "index.docker.io/a/b",
        ] {
            assert_eq!(user(image).as_deref(), Some("hub"), "{image}");
        }
        assert_eq!(user("127.0.0.1:5000/a:1").as_deref(), Some("local"));
        assert_eq!(user("127.0.0.1:5001/a:1"), None, "another port");
        assert_eq!(
            user("registry.example.com/team/app").as_deref(),
            Some("team")
        );
        assert_eq!(
            user("registry.example.com/other/app").as_deref(),
            Some("all")
        );
        assert_eq!(user("a.glob.example/x").as_deref(), Some("glob"));
        assert_eq!(user("a.b.glob.example/x"), None, "a glob is one name part");
        assert_eq!(user("quay.io/x/y"), None);
        // The image's repository is looked up, as the kubelet does: tag and digest aside.
        let pinned = format!("registry.example.com/team/app:1@sha256:{}", "a".repeat(64));
        assert_eq!(user(&pinned).as_deref(), Some("team"));
        assert_eq!(
            user("registry.example.com/Team/app"),
            None,
            "no such image name"
        );
        // The legacy .dockercfg form is the map of auths itself.
        let legacy: serde_json::Value =
            serde_json::from_str(r#"{"quay.io":{"auth":"cTpw"}}"#).unwrap();
        assert_eq!(
            keyring_lookup(&legacy, "quay.io/x/y").unwrap().password,
            "p"
        );
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
