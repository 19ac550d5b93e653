//! A small but real CSI node plugin for tests: each volume is a sparse backing file under the
//! plugin's state dir, attached to a loop device and formatted ext4 on first stage.
//!
//! - NodeStageVolume: losetup the backing file (created at the `size` volume attribute, 64 MiB
//!   by default), mkfs.ext4 when blank, mount it at the staging path.
//! - NodePublishVolume: bind mount staging → target, remounted read-only when asked.
//! - Raw block volumes (access type Block): NodeStageVolume only attaches the loop device (no
//!   filesystem, nothing mounted); NodePublishVolume creates the target file and bind-mounts
//!   the device node onto it.
//! - NodeUnpublishVolume / NodeUnstageVolume: unmount (and losetup -d on unstage).
//! - Inline ephemeral volumes (volume context `csi.storage.k8s.io/ephemeral=true`) are staged
//!   privately on publish and deleted on unpublish.
//!
//! It registers through the kubelet plugin registration API: a `Registration` service on
//! `<registry>/<driver>-reg.sock` answering GetInfo with its CSI endpoint.
//!
//! With `--call-log FILE` every Node stage/publish call that succeeded is appended to FILE
//! once it is done, one line `<RPC> <volume id> <path>`, so tests can check what was called
//! (idempotent repeats included) and in which order.
//!
//! The volume attributes `requireStageSecret: KEY` and `requirePublishSecret: KEY` make
//! NodeStageVolume or NodePublishVolume refuse a call whose secrets lack KEY; NodeStageVolume
//! mounts with the capability's mount_flags.
//!
//! The volume attribute `stageGate: PATH` makes NodeStageVolume wait until PATH exists (it
//! creates `PATH.waiting` when it starts waiting), so tests can hold a stage in flight.
//!
//! NodeGetInfo answers `--node-id` (default `node-1`), `--max-volumes` (default 0: no limit)
//! and one accessible topology segment per `--topology KEY=VALUE`.
//!
//! Usage: csi-loop-plugin --driver NAME --state-dir DIR --registry DIR [--node-id ID]
//! [--call-log FILE] [--max-volumes N] [--topology KEY=VALUE]...

use std::path::{Path, PathBuf};
use std::process::Command;

use nodelet::volume::csi::proto::identity_server::{Identity, IdentityServer};
use nodelet::volume::csi::proto::node_server::{Node, NodeServer};
use nodelet::volume::csi::proto::node_service_capability::rpc::Type as CapType;
use nodelet::volume::csi::proto::node_service_capability::{Rpc, Type as Cap};
use nodelet::volume::csi::proto::volume_capability::AccessType;
use nodelet::volume::csi::proto::*;
use nodelet::volume::csi::registration::registration_server::{Registration, RegistrationServer};
use nodelet::volume::csi::registration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};
use tonic::codegen::tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

#[derive(Clone)]
struct Plugin {
    driver: String,
    node_id: String,
    state_dir: PathBuf,
    endpoint: PathBuf,
    call_log: Option<PathBuf>,
    max_volumes: i64,
    topology: std::collections::HashMap<String, String>,
}

fn run(cmd: &mut Command) -> Result<String, Status> {
    let out = cmd
        .output()
        .map_err(|e| Status::internal(format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(Status::internal(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The source of the mount at exactly `path`, if mounted.
fn mounted_source(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let point = left.split(' ').nth(4)?;
        (Path::new(point) == path).then(|| right.split(' ').nth(1).unwrap_or("").to_string())
    })
}

/// With the volume attribute `attribute` naming a key, refuses a call whose secrets lack it.
fn require_secret(
    context: &std::collections::HashMap<String, String>,
    attribute: &str,
    secrets: &std::collections::HashMap<String, String>,
) -> Result<(), Status> {
    match context.get(attribute) {
        Some(key) if !secrets.contains_key(key) => Err(Status::unauthenticated(format!(
            "secret key {key:?} is required ({attribute})"
        ))),
        _ => Ok(()),
    }
}

/// The access type of a request's volume capability (required).
fn access_type(capability: Option<&VolumeCapability>) -> Result<&AccessType, Status> {
    capability
        .and_then(|c| c.access_type.as_ref())
        .ok_or_else(|| Status::invalid_argument("volume_capability.access_type is required"))
}

fn require(value: &str, what: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{what} is required")))
    } else {
        Ok(())
    }
}

impl Plugin {
    /// Appends `<rpc> <volume id> <path>` to the call log, when there is one.
    fn log_call(&self, rpc: &str, volume_id: &str, path: &str) -> Result<(), Status> {
        let Some(log) = &self.call_log else {
            return Ok(());
        };
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| writeln!(f, "{rpc} {volume_id} {path}"))
            .map_err(|e| Status::internal(format!("call log {}: {e}", log.display())))
    }

    fn backing_file(&self, volume_id: &str) -> Result<PathBuf, Status> {
        if !volume_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || volume_id.starts_with('.')
        {
            return Err(Status::invalid_argument(format!(
                "bad volume id {volume_id:?}"
            )));
        }
        Ok(self
            .state_dir
            .join("volumes")
            .join(format!("{volume_id}.img")))
    }

    /// Attaches (creating it first when new) the volume's backing file, formats it when blank
    /// and mounts it at `staging` with `mount_flags`. Idempotent.
    fn stage(
        &self,
        volume_id: &str,
        staging: &Path,
        (fs_type, mount_flags): (&str, &[String]),
        context: &std::collections::HashMap<String, String>,
    ) -> Result<(), Status> {
        if mounted_source(staging).is_some() {
            return Ok(());
        }
        let dev = self.attach_volume(volume_id, context)?;
        let existing = Command::new("blkid")
            .args(["-p", "-s", "TYPE", "-o", "value", &dev])
            .output()
            .map_err(|e| Status::internal(e.to_string()))?;
        if String::from_utf8_lossy(&existing.stdout).trim().is_empty() {
            run(Command::new("mkfs.ext4").args(["-F", "-q", &dev]))?;
        }
        std::fs::create_dir_all(staging).map_err(|e| Status::internal(e.to_string()))?;
        let mut mount = Command::new("mount");
        mount.args(["-t", fs_type]);
        if !mount_flags.is_empty() {
            mount.arg("-o").arg(mount_flags.join(","));
        }
        run(mount.arg(&dev).arg(staging))?;
        Ok(())
    }

    /// The loop device of a volume, creating its backing file (at the `size` volume attribute,
    /// 64 MiB by default) and attaching it when needed. Idempotent.
    fn attach_volume(
        &self,
        volume_id: &str,
        context: &std::collections::HashMap<String, String>,
    ) -> Result<String, Status> {
        let file = self.backing_file(volume_id)?;
        if !file.exists() {
            let size: u64 = context
                .get("size")
                .map(|s| s.parse().map_err(|_| Status::invalid_argument("bad size")))
                .transpose()?
                .unwrap_or(64 << 20);
            std::fs::create_dir_all(file.parent().unwrap_or(Path::new("/")))
                .and_then(|()| std::fs::File::create(&file))
                .and_then(|f| f.set_len(size))
                .map_err(|e| Status::internal(format!("creating {}: {e}", file.display())))?;
        }
        self.attach(&file)
    }

    /// The loop device a staged block volume is attached to.
    fn attached_device(&self, volume_id: &str) -> Result<String, Status> {
        let file = self.backing_file(volume_id)?;
        let existing = run(Command::new("losetup").arg("-j").arg(&file))?;
        existing
            .lines()
            .next()
            .and_then(|l| l.split(':').next())
            .filter(|d| !d.is_empty())
            .map(str::to_string)
            .ok_or_else(|| Status::failed_precondition("volume is not staged"))
    }

    /// Unmounts `staging` and detaches the volume's loop devices. Idempotent.
    fn unstage(&self, volume_id: &str, staging: &Path) -> Result<(), Status> {
        while mounted_source(staging).is_some() {
            run(Command::new("umount").arg(staging))?;
        }
        let file = self.backing_file(volume_id)?;
        let attached = run(Command::new("losetup").arg("-j").arg(&file))?;
        for dev in attached.lines().filter_map(|l| l.split(':').next()) {
            if !dev.is_empty() {
                run(Command::new("losetup").args(["-d", dev]))?;
            }
        }
        // A device still open (udev probing it after the unmount) is only marked for autoclear
        // by `losetup -d`; unstaging is done when it is gone, else the CO is told to retry.
        for _ in 0..100 {
            if run(Command::new("losetup").arg("-j").arg(&file))?
                .trim()
                .is_empty()
            {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err(Status::unavailable(format!(
            "{} is still attached to a loop device",
            file.display()
        )))
    }

    /// Where an inline ephemeral volume is staged privately (the CO stages nothing for it).
    fn inline_staging(&self, volume_id: &str) -> Result<PathBuf, Status> {
        self.backing_file(volume_id)?;
        Ok(self.state_dir.join("inline").join(volume_id))
    }

    /// The loop device attached to `file`, attaching one when there is none.
    fn attach(&self, file: &Path) -> Result<String, Status> {
        let existing = run(Command::new("losetup").arg("-j").arg(file))?;
        if let Some(dev) = existing.lines().next().and_then(|l| l.split(':').next()) {
            if !dev.is_empty() {
                return Ok(dev.to_string());
            }
        }
        run(Command::new("losetup").args(["-f", "--show"]).arg(file))
    }
}

#[tonic::async_trait]
impl Identity for Plugin {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.driver.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

impl Plugin {
    fn stage_volume(&self, req: &NodeStageVolumeRequest) -> Result<(), Status> {
        require(&req.volume_id, "volume_id")?;
        require(&req.staging_target_path, "staging_target_path")?;
        require_secret(&req.volume_context, "requireStageSecret", &req.secrets)?;
        let mount = match access_type(req.volume_capability.as_ref())? {
            AccessType::Mount(m) if m.fs_type.is_empty() || m.fs_type == "ext4" => {
                ("ext4", m.mount_flags.as_slice())
            }
            AccessType::Mount(m) => {
                return Err(Status::invalid_argument(format!(
                    "fsType {:?} is not supported",
                    m.fs_type
                )))
            }
            // A raw block volume: staged by attaching its loop device; nothing is mounted.
            AccessType::Block(_) => {
                std::fs::create_dir_all(&req.staging_target_path)
                    .map_err(|e| Status::internal(e.to_string()))?;
                return self
                    .attach_volume(&req.volume_id, &req.volume_context)
                    .map(drop);
            }
        };
        self.stage(
            &req.volume_id,
            Path::new(&req.staging_target_path),
            mount,
            &req.volume_context,
        )
    }

    fn publish_volume(&self, req: &NodePublishVolumeRequest) -> Result<(), Status> {
        require(&req.volume_id, "volume_id")?;
        require(&req.target_path, "target_path")?;
        require_secret(&req.volume_context, "requirePublishSecret", &req.secrets)?;
        if let AccessType::Block(_) = access_type(req.volume_capability.as_ref())? {
            return self.publish_block(req);
        }
        let ephemeral = req
            .volume_context
            .get("csi.storage.k8s.io/ephemeral")
            .is_some_and(|v| v == "true");
        let staging = if ephemeral {
            // Inline ephemeral volume: no NodeStage from the CO, so stage privately.
            let staging = self.inline_staging(&req.volume_id)?;
            self.stage(&req.volume_id, &staging, ("ext4", &[]), &req.volume_context)?;
            staging
        } else if req.staging_target_path.is_empty() {
            return Err(Status::failed_precondition(
                "staging_target_path is required (STAGE_UNSTAGE_VOLUME)",
            ));
        } else {
            PathBuf::from(&req.staging_target_path)
        };
        if mounted_source(&staging).is_none() {
            return Err(Status::failed_precondition("volume is not staged"));
        }
        let target = PathBuf::from(&req.target_path);
        if mounted_source(&target).is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(&target).map_err(|e| Status::internal(e.to_string()))?;
        run(Command::new("mount")
            .arg("--bind")
            .arg(&staging)
            .arg(&target))?;
        if req.readonly {
            run(Command::new("mount")
                .args(["-o", "remount,bind,ro"])
                .arg(&target))?;
        }
        Ok(())
    }

    /// A raw block volume is published by bind-mounting its loop device node onto the target
    /// file, which the SP creates (the CO creates only its parent dir).
    fn publish_block(&self, req: &NodePublishVolumeRequest) -> Result<(), Status> {
        require(&req.staging_target_path, "staging_target_path")?;
        let dev = self.attached_device(&req.volume_id)?;
        let target = PathBuf::from(&req.target_path);
        if mounted_source(&target).is_some() {
            return Ok(());
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&target)
            .map_err(|e| Status::internal(format!("creating {}: {e}", target.display())))?;
        run(Command::new("mount").arg("--bind").arg(&dev).arg(&target))?;
        Ok(())
    }

    fn unpublish_volume(&self, req: &NodeUnpublishVolumeRequest) -> Result<(), Status> {
        require(&req.volume_id, "volume_id")?;
        require(&req.target_path, "target_path")?;
        let target = PathBuf::from(&req.target_path);
        while mounted_source(&target).is_some() {
            run(Command::new("umount").arg(&target))?;
        }
        // The SP deletes what it created at the target path (a dir, or a block volume's file).
        if target.is_dir() {
            let _ = std::fs::remove_dir(&target);
        } else {
            let _ = std::fs::remove_file(&target);
        }
        // An inline ephemeral volume ends with its pod: unstage it and delete its data.
        let inline = self.inline_staging(&req.volume_id)?;
        if inline.exists() {
            self.unstage(&req.volume_id, &inline)?;
            let _ = std::fs::remove_dir(&inline);
            let _ = std::fs::remove_file(self.backing_file(&req.volume_id)?);
        }
        Ok(())
    }

    fn unstage_volume(&self, req: &NodeUnstageVolumeRequest) -> Result<(), Status> {
        require(&req.volume_id, "volume_id")?;
        require(&req.staging_target_path, "staging_target_path")?;
        self.unstage(&req.volume_id, Path::new(&req.staging_target_path))
    }
}

/// The stage/publish RPCs: each carried out, then logged once it succeeded.
#[tonic::async_trait]
impl Node for Plugin {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        if let Some(gate) = req.volume_context.get("stageGate") {
            std::fs::write(format!("{gate}.waiting"), "")
                .map_err(|e| Status::internal(e.to_string()))?;
            while !Path::new(gate).exists() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        self.stage_volume(&req)?;
        self.log_call("NodeStageVolume", &req.volume_id, &req.staging_target_path)?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        self.unstage_volume(&req)?;
        self.log_call(
            "NodeUnstageVolume",
            &req.volume_id,
            &req.staging_target_path,
        )?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        self.publish_volume(&req)?;
        self.log_call("NodePublishVolume", &req.volume_id, &req.target_path)?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        self.unpublish_volume(&req)?;
        self.log_call("NodeUnpublishVolume", &req.volume_id, &req.target_path)?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        _: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented("GET_VOLUME_STATS is not offered"))
    }

    async fn node_expand_volume(
        &self,
        _: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented("EXPAND_VOLUME is not offered"))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![NodeServiceCapability {
                r#type: Some(Cap::Rpc(Rpc {
                    r#type: CapType::StageUnstageVolume as i32,
                })),
            }],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: (!self.topology.is_empty()).then(|| Topology {
                segments: self.topology.clone(),
            }),
        }))
    }
}

#[tonic::async_trait]
impl Registration for Plugin {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        Ok(Response::new(PluginInfo {
            r#type: "CSIPlugin".into(),
            name: self.driver.clone(),
            endpoint: self.endpoint.display().to_string(),
            supported_versions: vec!["1.0.0".into()],
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            eprintln!("csi-loop-plugin: registered as {}", self.driver);
        } else {
            eprintln!("csi-loop-plugin: registration refused: {}", status.error);
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

fn listen(path: &Path) -> std::io::Result<UnixListenerStream> {
    let _ = std::fs::remove_file(path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    Ok(UnixListenerStream::new(tokio::net::UnixListener::bind(
        path,
    )?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut driver, mut state_dir, mut registry, mut node_id) = (None, None, None, None);
    let mut call_log = None;
    let (mut max_volumes, mut topology) = (0, std::collections::HashMap::new());
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--driver" => driver = Some(value),
            "--state-dir" => state_dir = Some(PathBuf::from(value)),
            "--registry" => registry = Some(PathBuf::from(value)),
            "--node-id" => node_id = Some(value),
            "--call-log" => call_log = Some(PathBuf::from(value)),
            "--max-volumes" => max_volumes = value.parse()?,
            "--topology" => {
                let (key, value) = value
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--topology takes KEY=VALUE"))?;
                topology.insert(key.to_string(), value.to_string());
            }
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    let driver = driver.ok_or_else(|| anyhow::anyhow!("--driver is required"))?;
    let state_dir = state_dir.ok_or_else(|| anyhow::anyhow!("--state-dir is required"))?;
    let registry = registry.ok_or_else(|| anyhow::anyhow!("--registry is required"))?;
    let plugin = Plugin {
        node_id: node_id.unwrap_or_else(|| "node-1".into()),
        endpoint: state_dir.join("csi.sock"),
        driver: driver.clone(),
        state_dir,
        call_log,
        max_volumes,
        topology,
    };
    let csi = listen(&plugin.endpoint)?;
    let reg = listen(&registry.join(format!("{driver}-reg.sock")))?;
    let csi_server = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(plugin.clone()))
        .add_service(NodeServer::new(plugin.clone()))
        .serve_with_incoming(csi);
    let reg_server = tonic::transport::Server::builder()
        .add_service(RegistrationServer::new(plugin))
        .serve_with_incoming(reg);
    tokio::select! {
        r = csi_server => r?,
        r = reg_server => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
