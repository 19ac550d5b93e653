//! Container mounts: the OCI mounts and devices for a container's volumeMounts and
//! volumeDevices, subPath and subPathExpr bound safely beneath their volume.

use k8s_openapi::api::core::v1::{Container, Pod};

use super::{failed, invalid, pod_uid, subpath, PodVolumes, VolumeError, VolumeManager};
use crate::runtime::{Device, Mount};

impl VolumeManager {
    /// The OCI mounts and devices for one container's volumeMounts/volumeDevices, with subPath
    /// and subPathExpr resolved safely beneath each volume.
    pub fn container_mounts(
        &self,
        pod: &Pod,
        container: &Container,
        volumes: &PodVolumes,
    ) -> Result<(Vec<Mount>, Vec<Device>), VolumeError> {
        let uid = pod_uid(pod)?;
        let privileged = container
            .security_context
            .as_ref()
            .and_then(|s| s.privileged)
            .unwrap_or(false);
        let mut env: Option<Vec<(String, String)>> = None;
        let mut mounts = Vec::new();
        for (index, vm) in container.volume_mounts.iter().flatten().enumerate() {
            let vol = volumes.volumes.get(&vm.name).ok_or_else(|| {
                invalid(&vm.name, "volumeMount names a volume that is not set up")
            })?;
            if vol.block {
                return Err(invalid(
                    &vm.name,
                    "a block volume must be used in volumeDevices",
                ));
            }
            let sub = match (vm.sub_path.as_deref(), vm.sub_path_expr.as_deref()) {
                (Some(s), _) if !s.is_empty() => Some(s.to_string()),
                (_, Some(expr)) if !expr.is_empty() => {
                    if env.is_none() {
                        env = Some(
                            crate::pod::env::container_env(
                                pod,
                                container,
                                &self.ctx.store,
                                &self.ctx.node,
                            )
                            .map_err(|e| invalid(&vm.name, format!("subPathExpr: {e}")))?,
                        );
                    }
                    Some(crate::pod::env::expand(
                        expr,
                        env.as_deref().unwrap_or_default(),
                    ))
                }
                _ => None,
            };
            let source = match sub {
                Some(sub) => {
                    subpath::validate(&sub).map_err(|e| invalid(&vm.name, e.to_string()))?;
                    let target = self
                        .ctx
                        .pod_dir(&uid)
                        .join("volume-subpaths")
                        .join(&vm.name)
                        .join(&container.name)
                        .join(index.to_string());
                    subpath::bind_beneath(&vol.host_path, &sub, &target).map_err(|e| match e {
                        subpath::SubPathError::Escapes(_) => invalid(&vm.name, e.to_string()),
                        other => failed(&vm.name, other),
                    })?;
                    target
                }
                None => vol.host_path.clone(),
            };
            let mut options = vec!["rbind".to_string()];
            options.push(
                propagation(vm.mount_propagation.as_deref(), privileged, &vm.name)?.to_string(),
            );
            if vm.read_only.unwrap_or(false) || vol.read_only {
                options.push("ro".into());
            }
            mounts.push(Mount {
                destination: vm.mount_path.clone(),
                source: source.display().to_string(),
                kind: "bind".into(),
                options,
            });
        }
        let mut devices = Vec::new();
        for vd in container.volume_devices.iter().flatten() {
            let vol = volumes.volumes.get(&vd.name).ok_or_else(|| {
                invalid(&vd.name, "volumeDevice names a volume that is not set up")
            })?;
            if !vol.block {
                return Err(invalid(
                    &vd.name,
                    "volumeDevices needs a volume with volumeMode Block",
                ));
            }
            devices.push(Device {
                host_path: vol.host_path.clone(),
                container_path: vd.device_path.clone(),
            });
        }
        Ok((mounts, devices))
    }
}

/// OCI propagation option for a volumeMount's mountPropagation.
fn propagation(
    mode: Option<&str>,
    privileged: bool,
    volume: &str,
) -> Result<&'static str, VolumeError> {
    match mode.unwrap_or("None") {
        "None" => Ok("rprivate"),
        "HostToContainer" => Ok("rslave"),
        "Bidirectional" if privileged => Ok("rshared"),
        "Bidirectional" => Err(invalid(
            volume,
            "Bidirectional mount propagation needs a privileged container",
        )),
        other => Err(invalid(
            volume,
            format!("invalid mountPropagation {other:?}"),
        )),
    }
}
