//! Local volumes: emptyDir (on disk or tmpfs), hostPath, and the atomically written
//! configMap, secret, downwardAPI and projected volumes; and fsGroup ownership. Blocking code,
//! run on the blocking pool from a `Ctx` clone.

use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Pod, Volume};

use super::atomic::{self, Payload};
use super::host::{self, ChangePolicy};
use super::projection::{self, KeySource, DEFAULT_MODE};
use super::{downward, failed, invalid, mount, namespace, plugin, Ctx, ReadyVolume, VolumeError};
use std::collections::BTreeMap;

impl Ctx {
    /// emptyDir, hostPath, configMap, secret, downwardAPI and projected volumes.
    pub(super) fn setup_local(
        &self,
        pod: &Pod,
        uid: &str,
        vol: &Volume,
        tokens: &BTreeMap<usize, String>,
    ) -> Result<ReadyVolume, VolumeError> {
        let name = vol.name.as_str();
        let ns = namespace(pod);
        if let Some(hp) = &vol.host_path {
            host::check_host_path(Path::new(&hp.path), hp.type_.as_deref())
                .map_err(|e| invalid(name, e))?;
            return Ok(ReadyVolume {
                host_path: PathBuf::from(&hp.path),
                read_only: false,
                block: false,
            });
        }
        if let Some(ed) = &vol.empty_dir {
            let dir = self.volume_dir(uid, plugin::EMPTY_DIR, name);
            match ed.medium.as_deref().unwrap_or("") {
                "" => self.make_dir(&dir, name, None)?,
                "Memory" => {
                    let size = match &ed.size_limit {
                        Some(q) => Some(
                            downward::parse_quantity_milli(&q.0)
                                .filter(|v| *v > 0)
                                .ok_or_else(|| invalid(name, format!("bad sizeLimit {:?}", q.0)))?,
                        ),
                        None => pod_memory_limit(pod),
                    }
                    .map(|milli| ((milli + 999) / 1000) as u64);
                    self.make_dir(&dir, name, Some(size))?;
                }
                other => {
                    return Err(invalid(
                        name,
                        format!("emptyDir medium {other:?} is not supported"),
                    ))
                }
            }
            fs_group(pod, name, &dir, false)?;
            return Ok(ReadyVolume {
                host_path: dir,
                read_only: false,
                block: false,
            });
        }
        let (plugin_dir, tmpfs, payload) = if let Some(cm) = &vol.config_map {
            let src = KeySource {
                volume: name,
                kind: "configmap",
                name: &cm.name,
                optional: cm.optional.unwrap_or(false),
            };
            let data = self
                .store
                .config_map(ns, &cm.name)
                .map(|c| projection::config_map_data(&c));
            let mut payload = Payload::new();
            projection::add_keys(
                &mut payload,
                &src,
                data,
                cm.items.as_deref(),
                cm.default_mode.unwrap_or(DEFAULT_MODE),
            )?;
            (plugin::CONFIG_MAP, false, payload)
        } else if let Some(sec) = &vol.secret {
            let secret_name = sec.secret_name.clone().unwrap_or_default();
            let src = KeySource {
                volume: name,
                kind: "secret",
                name: &secret_name,
                optional: sec.optional.unwrap_or(false),
            };
            let data = self
                .store
                .secret(ns, &secret_name)
                .map(|c| projection::secret_data(&c));
            let mut payload = Payload::new();
            projection::add_keys(
                &mut payload,
                &src,
                data,
                sec.items.as_deref(),
                sec.default_mode.unwrap_or(DEFAULT_MODE),
            )?;
            (plugin::SECRET, true, payload)
        } else if let Some(d) = &vol.downward_api {
            let mut payload = Payload::new();
            projection::add_downward(
                &mut payload,
                name,
                pod,
                d.items.as_deref().unwrap_or_default(),
                d.default_mode.unwrap_or(DEFAULT_MODE),
                &self.node,
            )?;
            (plugin::DOWNWARD_API, false, payload)
        } else if let Some(p) = &vol.projected {
            let payload =
                projection::projected_payload(name, pod, p, &self.store, &self.node, tokens)?;
            (plugin::PROJECTED, true, payload)
        } else {
            return Err(invalid(name, "unsupported volume type"));
        };
        let dir = self.volume_dir(uid, plugin_dir, name);
        self.make_dir(&dir, name, tmpfs.then_some(None))?;
        let changed = atomic::write(&dir, &payload).map_err(|e| match e {
            atomic::AtomicError::InvalidPath(_) => invalid(name, e.to_string()),
            other => failed(name, other),
        })?;
        if changed {
            fs_group(pod, name, &dir, true)?;
        }
        Ok(ReadyVolume {
            host_path: dir,
            read_only: true,
            block: false,
        })
    }

    /// Creates a volume dir (0777); with `tmpfs` Some, mounts a tmpfs (of that size, mode
    /// 1777) on it unless one is already there. As the kubelet, only permission bits other than
    /// 0777 are changed: the tmpfs's sticky bit and an fsGroup's setgid bit stay.
    fn make_dir(
        &self,
        dir: &Path,
        volume: &str,
        tmpfs: Option<Option<u64>>,
    ) -> Result<(), VolumeError> {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(dir)
            .map_err(|e| failed(volume, format!("mkdir {}: {e}", dir.display())))?;
        if let Some(size) = tmpfs {
            if !mount::is_mounted(dir).map_err(|e| failed(volume, e))? {
                mount::tmpfs(dir, size)
                    .map_err(|e| failed(volume, format!("mounting tmpfs: {e}")))?;
            }
        }
        let mode = fs::metadata(dir)
            .map_err(|e| failed(volume, format!("stat {}: {e}", dir.display())))?
            .permissions()
            .mode();
        if mode & 0o777 == 0o777 {
            return Ok(());
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o777))
            .map_err(|e| failed(volume, format!("chmod {}: {e}", dir.display())))
    }
}

/// Applies the pod's fsGroup to `dir` per fsGroupChangePolicy.
pub(super) fn fs_group(
    pod: &Pod,
    volume: &str,
    dir: &Path,
    read_only: bool,
) -> Result<(), VolumeError> {
    let sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let Some(gid) = sc.and_then(|s| s.fs_group) else {
        return Ok(());
    };
    let policy = ChangePolicy::parse(sc.and_then(|s| s.fs_group_change_policy.as_deref()));
    host::apply_fs_group(dir, gid as u32, policy, read_only)
        .map_err(|e| failed(volume, format!("applying fsGroup {gid}: {e}")))
}

/// The pod's memory limit (sum of app containers' limits, when every one has a limit): the
/// default size of a memory-backed emptyDir, as upstream.
fn pod_memory_limit(pod: &Pod) -> Option<i128> {
    let spec = pod.spec.as_ref()?;
    let mut total = 0;
    for c in &spec.containers {
        let q = c.resources.as_ref()?.limits.as_ref()?.get("memory")?;
        total += downward::parse_quantity_milli(&q.0)?;
    }
    (total > 0).then_some(total)
}
