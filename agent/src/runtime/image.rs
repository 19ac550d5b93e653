//! Image pulls done by the agent (containerd 1.6 has no transfer service): resolve the
//! reference at the registry, write manifest, config and layers into the content store, unpack
//! each layer (snapshots Prepare → diff Apply → snapshots Commit, named by chain ID) and record
//! the image. Everything runs under one lease so GC cannot collect half-written content, and the
//! GC labels ctr and CRI set (`containerd.io/gc.ref.content.*`, the snapshot reference on the
//! config, `containerd.io/uncompressed` on layers) keep the image alive after the lease ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    AddResourceRequest, ApplyRequest, CreateImageRequest, GetImageRequest, Image,
    Info as ContentInfo, InfoRequest, ReadContentRequest, Resource as LeaseResource,
    UpdateImageRequest, UpdateRequest as ContentUpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::reference::{validate_digest, Reference};
use super::registry::{Registry, RegistryError};
use super::{
    grpc, leased, ImageConfig, ImageInfo, PullPolicy, RegistryAuth, Result, Runtime, RuntimeError,
    SNAPSHOTTER,
};

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
const LABEL_CONFIG: &str = "containerd.io/gc.ref.content.config";
const MAX_MANIFEST: usize = 4 << 20;
const WRITE_CHUNK: usize = 1 << 20;

/// In-flight pulls by normalised reference, how many pulls were started, and the bound on how
/// many run at once (a pull waits for a permit before it talks to the registry).
pub(super) struct PullGroup {
    inflight: Mutex<HashMap<String, SharedPull>>,
    started: AtomicU64,
    limit: Mutex<Arc<tokio::sync::Semaphore>>,
    running: AtomicUsize,
    peak: AtomicUsize,
}

impl Default for PullGroup {
    fn default() -> Self {
        PullGroup {
            inflight: Mutex::default(),
            started: AtomicU64::default(),
            limit: Mutex::new(Arc::new(tokio::sync::Semaphore::new(
                crate::config::DEFAULT_PARALLEL_IMAGE_PULLS,
            ))),
            running: AtomicUsize::default(),
            peak: AtomicUsize::default(),
        }
    }
}

type SharedPull = Shared<BoxFuture<'static, Result<ImageInfo, Arc<RuntimeError>>>>;

/// A descriptor as found in manifests and indexes.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Desc {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

/// An image manifest or an index, told apart by media type or by its fields.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    config: Option<Desc>,
    #[serde(default)]
    layers: Vec<Desc>,
    #[serde(default)]
    manifests: Option<Vec<Desc>>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigDoc {
    #[serde(default)]
    config: Option<ConfigBody>,
    #[serde(default)]
    rootfs: RootFs,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConfigBody {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    stop_signal: Option<String>,
}

/// The parsed config with its layers' diff IDs.
#[derive(Debug)]
struct ParsedConfig {
    config: ImageConfig,
    diff_ids: Vec<String>,
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Chain IDs per the OCI image spec: chain[0] = diff[0], chain[i] = H(chain[i-1] + " " + diff[i]).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256_digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// The architecture name the OCI spec uses for this host.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn is_index(media_type: &str, doc: &ManifestDoc) -> bool {
    media_type == MEDIA_OCI_INDEX
        || media_type == MEDIA_DOCKER_LIST
        || (media_type.is_empty() && doc.manifests.is_some())
}

fn parse_manifest(body: &[u8]) -> std::result::Result<ManifestDoc, String> {
    serde_json::from_slice(body).map_err(|e| format!("bad manifest: {e}"))
}

/// Picks the manifest for linux and the host architecture from an index.
fn pick_platform(manifests: &[Desc]) -> Option<&Desc> {
    let arch = host_arch();
    manifests.iter().find(|m| {
        m.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == arch)
    })
}

fn parse_config(body: &[u8]) -> std::result::Result<ParsedConfig, String> {
    let doc: ConfigDoc =
        serde_json::from_slice(body).map_err(|e| format!("bad image config: {e}"))?;
    let body = doc.config.unwrap_or_default();
    let non_empty = |s: Option<String>| s.filter(|v| !v.is_empty());
    for d in &doc.rootfs.diff_ids {
        validate_digest(d)?;
    }
    let chain = chain_ids(&doc.rootfs.diff_ids);
    Ok(ParsedConfig {
        config: ImageConfig {
            env: body.env.unwrap_or_default(),
            entrypoint: body.entrypoint.unwrap_or_default(),
            cmd: body.cmd.unwrap_or_default(),
            working_dir: non_empty(body.working_dir),
            user: non_empty(body.user),
            stop_signal: non_empty(body.stop_signal),
            chain_id: chain.last().cloned().unwrap_or_default(),
        },
        diff_ids: doc.rootfs.diff_ids,
    })
}

fn registry_error(image: &str, e: RegistryError) -> RuntimeError {
    match e {
        RegistryError::NotFound { .. } => RuntimeError::ImageNotFound {
            image: image.to_string(),
            detail: e.to_string(),
        },
        other => RuntimeError::Pull {
            image: image.to_string(),
            detail: other.to_string(),
        },
    }
}

fn pull_error(image: &str, detail: impl Into<String>) -> RuntimeError {
    RuntimeError::Pull {
        image: image.to_string(),
        detail: detail.into(),
    }
}

/// A copy of a shared pull error for one waiter (io and transport errors become text).
fn clone_error(e: &RuntimeError) -> RuntimeError {
    match e {
        RuntimeError::Grpc { op, status } => RuntimeError::Grpc {
            op,
            status: status.clone(),
        },
        RuntimeError::ImageNotFound { image, detail } => RuntimeError::ImageNotFound {
            image: image.clone(),
            detail: detail.clone(),
        },
        RuntimeError::NeverPull { image } => RuntimeError::NeverPull {
            image: image.clone(),
        },
        RuntimeError::InvalidReference { image, detail } => RuntimeError::InvalidReference {
            image: image.clone(),
            detail: detail.clone(),
        },
        RuntimeError::NotFound { id } => RuntimeError::NotFound { id: id.clone() },
        RuntimeError::Spec { id, detail } => RuntimeError::Spec {
            id: id.clone(),
            detail: detail.clone(),
        },
        RuntimeError::ExecTimeout { id, timeout } => RuntimeError::ExecTimeout {
            id: id.clone(),
            timeout: *timeout,
        },
        RuntimeError::Io(err) => RuntimeError::Io(std::io::Error::new(err.kind(), err.to_string())),
        other => RuntimeError::Pull {
            image: String::new(),
            detail: other.to_string(),
        },
    }
}

impl Runtime {
    /// Makes the image present and unpacked per `policy`; concurrent calls for the same image
    /// share one pull.
    pub async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        auth: Option<&RegistryAuth>,
    ) -> Result<ImageInfo> {
        let reference =
            Reference::parse(image).map_err(|detail| RuntimeError::InvalidReference {
                image: image.to_string(),
                detail,
            })?;
        if policy != PullPolicy::Always {
            if let Some(info) = self.local_image(&reference).await? {
                return Ok(info);
            }
            if policy == PullPolicy::Never {
                return Err(RuntimeError::NeverPull {
                    image: reference.to_string(),
                });
            }
        }
        let pull = self.join_pull(reference, auth.cloned());
        pull.await.map_err(|e| clone_error(&e))
    }

    /// How many registry pulls this runtime started (shared pulls count once).
    pub fn pulls_started(&self) -> u64 {
        self.inner.pulls.started.load(Ordering::Relaxed)
    }

    /// At most `max` registry pulls run at once from now on (at least 1).
    pub fn limit_pulls(&self, max: usize) {
        let semaphore = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
        *self.inner.pulls.limit.lock().expect("poisoned") = semaphore;
    }

    /// The most registry pulls that ran at once so far.
    pub fn pulls_peak(&self) -> usize {
        self.inner.pulls.peak.load(Ordering::Relaxed)
    }

    /// Joins the in-flight pull of `reference` or starts one in its own task (so that a
    /// cancelled caller does not cancel the others).
    fn join_pull(&self, reference: Reference, auth: Option<RegistryAuth>) -> SharedPull {
        let key = reference.to_string();
        let mut inflight = self.inner.pulls.inflight.lock().expect("poisoned");
        if let Some(existing) = inflight.get(&key) {
            return existing.clone();
        }
        self.inner.pulls.started.fetch_add(1, Ordering::Relaxed);
        let rt = self.clone();
        let task_key = key.clone();
        let handle = tokio::spawn(async move {
            let limit = rt.inner.pulls.limit.lock().expect("poisoned").clone();
            // The semaphore is never closed, so a permit always comes.
            let permit = limit.acquire_owned().await;
            let pulls = &rt.inner.pulls;
            let running = pulls.running.fetch_add(1, Ordering::Relaxed) + 1;
            pulls.peak.fetch_max(running, Ordering::Relaxed);
            let res = rt.pull(&reference, auth.as_ref()).await.map_err(Arc::new);
            pulls.running.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
            rt.inner
                .pulls
                .inflight
                .lock()
                .expect("poisoned")
                .remove(&task_key);
            res
        });
        let image = key.clone();
        let shared = async move {
            match handle.await {
                Ok(r) => r,
                Err(e) => Err(Arc::new(pull_error(
                    &image,
                    format!("pull task failed: {e}"),
                ))),
            }
        }
        .boxed()
        .shared();
        inflight.insert(key, shared.clone());
        shared
    }

    /// The image if its record, manifest, config and top snapshot are all present.
    async fn local_image(&self, reference: &Reference) -> Result<Option<ImageInfo>> {
        let name = reference.to_string();
        let image = match self
            .images()
            .get(GetImageRequest { name: name.clone() })
            .await
        {
            Ok(r) => r.into_inner().image,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(grpc("images.Get")(s)),
        };
        let Some(target) = image.and_then(|i| i.target) else {
            return Ok(None);
        };
        let Some(top) = self.read_blob_opt(&target.digest).await? else {
            return Ok(None);
        };
        let doc = parse_manifest(&top).map_err(|d| pull_error(&name, d))?;
        let manifest = if is_index(&target.media_type, &doc) {
            let Some(m) = pick_platform(doc.manifests.as_deref().unwrap_or_default()) else {
                return Ok(None);
            };
            let Some(body) = self.read_blob_opt(&m.digest).await? else {
                return Ok(None);
            };
            parse_manifest(&body).map_err(|d| pull_error(&name, d))?
        } else {
            doc
        };
        let Some(config_desc) = manifest.config else {
            return Ok(None);
        };
        let Some(config_body) = self.read_blob_opt(&config_desc.digest).await? else {
            return Ok(None);
        };
        let parsed = parse_config(&config_body).map_err(|d| pull_error(&name, d))?;
        if !self.snapshot_exists(&parsed.config.chain_id).await? {
            return Ok(None);
        }
        Ok(Some(ImageInfo {
            reference: name,
            repo_digest: format!("{}@{}", reference.name(), target.digest),
            image_id: config_desc.digest,
            config: parsed.config,
        }))
    }

    /// One pull, under one lease.
    async fn pull(&self, reference: &Reference, auth: Option<&RegistryAuth>) -> Result<ImageInfo> {
        let image = reference.to_string();
        tracing::info!(image, "pulling image");
        let lease = self.create_lease("pull").await?;
        let res = self.pull_leased(reference, auth, &lease).await;
        self.delete_lease(&lease).await;
        match &res {
            Ok(info) => tracing::info!(image, image_id = info.image_id, "pulled image"),
            Err(e) => tracing::warn!(image, error = %e, "pull failed"),
        }
        res
    }

    async fn pull_leased(
        &self,
        reference: &Reference,
        auth: Option<&RegistryAuth>,
        lease: &str,
    ) -> Result<ImageInfo> {
        let image = reference.to_string();
        let registry = Registry::new(self.inner.http.clone(), reference, auth.cloned());
        let (media_type, top_body) = registry
            .manifest(reference.object())
            .await
            .map_err(|e| registry_error(&image, e))?;
        if top_body.len() > MAX_MANIFEST {
            return Err(pull_error(&image, "manifest too large"));
        }
        let top_digest = sha256_digest(&top_body);
        if let Some(d) = &reference.digest {
            if *d != top_digest {
                return Err(pull_error(
                    &image,
                    format!("manifest digest {top_digest} does not match {d}"),
                ));
            }
        }
        let top_doc = parse_manifest(&top_body).map_err(|d| pull_error(&image, d))?;
        let top_media = if !top_doc.media_type.is_empty() {
            top_doc.media_type.clone()
        } else if !media_type.is_empty() {
            media_type
        } else if top_doc.manifests.is_some() {
            MEDIA_OCI_INDEX.to_string()
        } else {
            MEDIA_OCI_MANIFEST.to_string()
        };

        let (manifest_desc, manifest_body, index) = if is_index(&top_media, &top_doc) {
            let chosen = pick_platform(top_doc.manifests.as_deref().unwrap_or_default())
                .cloned()
                .ok_or_else(|| RuntimeError::ImageNotFound {
                    image: image.clone(),
                    detail: format!("no manifest for linux/{}", host_arch()),
                })?;
            let (_, body) = registry
                .manifest(&chosen.digest)
                .await
                .map_err(|e| registry_error(&image, e))?;
            if sha256_digest(&body) != chosen.digest {
                return Err(pull_error(&image, "platform manifest digest mismatch"));
            }
            (chosen, body, Some(top_body))
        } else {
            let desc = Desc {
                media_type: top_media.clone(),
                digest: top_digest.clone(),
                size: top_body.len() as i64,
                platform: None,
            };
            (desc, top_body, None)
        };
        let manifest = parse_manifest(&manifest_body).map_err(|d| pull_error(&image, d))?;
        let config_desc = manifest
            .config
            .clone()
            .ok_or_else(|| pull_error(&image, "manifest has no config"))?;
        let config_body = match self.read_blob_opt(&config_desc.digest).await? {
            Some(b) => b,
            None => {
                let resp = registry
                    .blob(&config_desc.digest)
                    .await
                    .map_err(|e| registry_error(&image, e))?;
                resp.bytes()
                    .await
                    .map_err(|e| pull_error(&image, format!("config blob: {e}")))?
                    .to_vec()
            }
        };
        if sha256_digest(&config_body) != config_desc.digest {
            return Err(pull_error(&image, "config digest mismatch"));
        }
        let parsed = parse_config(&config_body).map_err(|d| pull_error(&image, d))?;
        if parsed.diff_ids.len() != manifest.layers.len() {
            return Err(pull_error(
                &image,
                "config diff_ids and manifest layers differ in number",
            ));
        }
        let chain = chain_ids(&parsed.diff_ids);

        // Content, bottom-up so that every label points at something already written.
        for (layer, diff_id) in manifest.layers.iter().zip(&parsed.diff_ids) {
            let labels = HashMap::from([(LABEL_UNCOMPRESSED.to_string(), diff_id.clone())]);
            for attempt in 0..2 {
                if !self.leased_content_exists(lease, &layer.digest).await? {
                    let resp = registry
                        .blob(&layer.digest)
                        .await
                        .map_err(|e| registry_error(&image, e))?;
                    let stream = resp
                        .bytes_stream()
                        .map(|r| r.map(|b| b.to_vec()).map_err(|e| e.to_string()));
                    self.write_blob(&image, lease, layer, stream, labels.clone())
                        .await?;
                }
                match self.set_labels(&layer.digest, labels.clone()).await {
                    Err(e) if e.is_not_found() && attempt == 0 => {
                        tracing::warn!(
                            image,
                            digest = layer.digest,
                            "layer vanished after writing; retrying"
                        );
                    }
                    other => {
                        other?;
                        break;
                    }
                }
            }
        }
        let snapshot_label = format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}");
        let config_labels = HashMap::from([(snapshot_label, parsed.config.chain_id.clone())]);
        self.put_small_blob(&image, lease, &config_desc, config_body, config_labels)
            .await?;
        let mut manifest_labels =
            HashMap::from([(LABEL_CONFIG.to_string(), config_desc.digest.clone())]);
        for (i, l) in manifest.layers.iter().enumerate() {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        self.put_small_blob(
            &image,
            lease,
            &manifest_desc,
            manifest_body,
            manifest_labels,
        )
        .await?;
        let target = match index {
            Some(body) => {
                let desc = Desc {
                    media_type: top_media.clone(),
                    digest: top_digest.clone(),
                    size: body.len() as i64,
                    platform: None,
                };
                let labels = HashMap::from([(
                    "containerd.io/gc.ref.content.m.0".to_string(),
                    manifest_desc.digest.clone(),
                )]);
                self.put_small_blob(&image, lease, &desc, body, labels)
                    .await?;
                desc
            }
            None => manifest_desc.clone(),
        };

        // Unpack.
        for (i, layer) in manifest.layers.iter().enumerate() {
            let parent = if i == 0 { "" } else { chain[i - 1].as_str() };
            self.unpack_layer(&image, lease, layer, &parsed.diff_ids[i], &chain[i], parent)
                .await?;
        }

        self.record_image(&image, &target).await?;
        Ok(ImageInfo {
            reference: image,
            repo_digest: format!("{}@{}", reference.name(), top_digest),
            image_id: config_desc.digest,
            config: parsed.config,
        })
    }

    /// Creates or updates the image record pointing at `target`.
    async fn record_image(&self, image: &str, target: &Desc) -> Result<()> {
        let record = Image {
            name: image.to_string(),
            labels: HashMap::new(),
            target: Some(descriptor(target)),
            created_at: None,
            updated_at: None,
        };
        let created = self
            .images()
            .create(CreateImageRequest {
                image: Some(record.clone()),
                source_date_epoch: None,
            })
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                self.images()
                    .update(UpdateImageRequest {
                        image: Some(record),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["target".into()],
                        }),
                        source_date_epoch: None,
                    })
                    .await
                    .map_err(grpc("images.Update"))?;
                Ok(())
            }
            Err(s) => Err(grpc("images.Create")(s)),
        }
    }

    /// Unpacks one layer unless its chain snapshot already exists.
    async fn unpack_layer(
        &self,
        image: &str,
        lease: &str,
        layer: &Desc,
        diff_id: &str,
        chain_id: &str,
        parent: &str,
    ) -> Result<()> {
        // Leased first, checked second: a snapshot left by an image deleted meanwhile must
        // not be collected while this pull builds on it.
        self.lease_resource(lease, chain_id, &format!("snapshots/{SNAPSHOTTER}"))
            .await?;
        if self.snapshot_exists(chain_id).await? {
            return Ok(());
        }
        let key = format!(
            "extract-{}-{:08x} {chain_id}",
            std::process::id(),
            rand::random::<u32>()
        );
        let mounts = self
            .snapshots()
            .prepare(leased(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.clone(),
                    parent: parent.to_string(),
                    labels: HashMap::new(),
                },
                lease,
            ))
            .await
            .map_err(grpc("snapshots.Prepare"))?
            .into_inner()
            .mounts;
        let res = async {
            let applied = self
                .diff()
                .apply(leased(
                    ApplyRequest {
                        diff: Some(descriptor(layer)),
                        mounts,
                        payloads: HashMap::new(),
                        sync_fs: false,
                    },
                    lease,
                ))
                .await
                .map_err(grpc("diff.Apply"))?
                .into_inner()
                .applied
                .unwrap_or_default();
            if applied.digest != diff_id {
                return Err(pull_error(
                    image,
                    format!(
                        "layer {} unpacked to {} instead of {diff_id}",
                        layer.digest, applied.digest
                    ),
                ));
            }
            let committed = self
                .snapshots()
                .commit(leased(
                    CommitSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        name: chain_id.to_string(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                    lease,
                ))
                .await;
            match committed {
                Ok(_) => Ok(()),
                // Another pull committed the same chain meanwhile.
                Err(s) if s.code() == tonic::Code::AlreadyExists => Err(RuntimeError::Grpc {
                    op: "snapshots.Commit",
                    status: s,
                }),
                Err(s) => Err(grpc("snapshots.Commit")(s)),
            }
        }
        .await;
        match res {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = self
                    .snapshots()
                    .remove(RemoveSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key,
                    })
                    .await;
                match e {
                    RuntimeError::Grpc { status, .. }
                        if status.code() == tonic::Code::AlreadyExists =>
                    {
                        Ok(())
                    }
                    e => Err(e),
                }
            }
        }
    }

    pub(super) async fn snapshot_exists(&self, key: &str) -> Result<bool> {
        if key.is_empty() {
            return Ok(false);
        }
        match self
            .snapshots()
            .stat(StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.to_string(),
            })
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(grpc("snapshots.Stat")(s)),
        }
    }

    /// Adds an existing object to the lease, so that GC keeps it for the rest of the pull
    /// (objects only written under the lease are in it already).
    async fn lease_resource(&self, lease: &str, id: &str, kind: &str) -> Result<()> {
        self.leases()
            .add_resource(AddResourceRequest {
                id: lease.to_string(),
                resource: Some(LeaseResource {
                    id: id.to_string(),
                    r#type: kind.to_string(),
                }),
            })
            .await
            .map_err(grpc("leases.AddResource"))?;
        Ok(())
    }

    /// Whether the blob is present, after adding it to the lease: a blob of an image deleted
    /// meanwhile would otherwise be collected under the pull's feet.
    async fn leased_content_exists(&self, lease: &str, digest: &str) -> Result<bool> {
        self.lease_resource(lease, digest, "content").await?;
        self.content_exists(digest).await
    }

    async fn content_exists(&self, digest: &str) -> Result<bool> {
        match self
            .content()
            .info(InfoRequest {
                digest: digest.to_string(),
            })
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(grpc("content.Info")(s)),
        }
    }

    /// Reads a whole (small) blob; None when absent.
    async fn read_blob_opt(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let stream = self
            .content()
            .read(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(grpc("content.Read")(s)),
        };
        let mut out = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    out.extend_from_slice(&chunk.data);
                    if out.len() > MAX_MANIFEST {
                        return Err(pull_error(digest, "blob too large to read whole"));
                    }
                }
                Ok(None) => break,
                Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
                Err(s) => return Err(grpc("content.Read")(s)),
            }
        }
        Ok(Some(out))
    }

    /// Sets labels on a blob (merging: only the given keys are touched).
    async fn set_labels(&self, digest: &str, labels: HashMap<String, String>) -> Result<()> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.content()
            .update(ContentUpdateRequest {
                info: Some(ContentInfo {
                    digest: digest.to_string(),
                    size: 0,
                    created_at: None,
                    updated_at: None,
                    labels,
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            })
            .await
            .map_err(grpc("content.Update"))?;
        Ok(())
    }

    /// Writes an in-memory blob unless present, then makes sure its labels are set.
    async fn put_small_blob(
        &self,
        image: &str,
        lease: &str,
        desc: &Desc,
        body: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        for attempt in 0..2 {
            if !self.leased_content_exists(lease, &desc.digest).await? {
                let stream = futures::stream::iter([Ok::<_, String>(body.clone())]);
                self.write_blob(image, lease, desc, stream, labels.clone())
                    .await?;
            }
            match self.set_labels(&desc.digest, labels.clone()).await {
                // Gone between write and update: write it again.
                Err(e) if e.is_not_found() && attempt == 0 => {
                    tracing::warn!(
                        image,
                        digest = desc.digest,
                        "blob vanished after writing; retrying"
                    );
                }
                other => return other,
            }
        }
        Ok(())
    }

    /// Streams a blob into the content store under `lease` and commits it with `labels`;
    /// an already existing blob counts as written.
    async fn write_blob(
        &self,
        image: &str,
        lease: &str,
        desc: &Desc,
        data: impl futures::Stream<Item = std::result::Result<Vec<u8>, String>> + Send + 'static,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let write_ref = format!("nodelet-{}-{:016x}", desc.digest, rand::random::<u64>());
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let (total, expected) = (desc.size, desc.digest.clone());
        let requests = chunked(data, WRITE_CHUNK, failure.clone());
        // The commit must carry the final offset: offset 0 would truncate what was written.
        let written = Arc::new(AtomicI64::new(0));
        let (r, e, w) = (write_ref.clone(), expected.clone(), written.clone());
        let writes = requests.map(move |chunk| {
            let len = chunk.len() as i64;
            WriteContentRequest {
                action: WriteAction::Write as i32,
                r#ref: r.clone(),
                total,
                expected: e.clone(),
                offset: w.fetch_add(len, Ordering::SeqCst),
                data: chunk,
                labels: HashMap::new(),
            }
        });
        let failure_at_end = failure.clone();
        let commit = futures::stream::once(async move {
            WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref: write_ref,
                total,
                expected,
                offset: written.load(Ordering::SeqCst),
                data: Vec::new(),
                labels,
            }
        })
        // No commit after a broken download.
        .filter(move |_| {
            futures::future::ready(failure_at_end.lock().expect("poisoned").is_none())
        });
        let outgoing = writes.chain(commit);
        let res = self.content().write(leased(outgoing, lease)).await;
        let mut responses = match res {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
            Err(s) => return Err(grpc("content.Write")(s)),
        };
        let mut committed = false;
        loop {
            match responses.message().await {
                Ok(Some(resp)) => {
                    if resp.action == WriteAction::Commit as i32 {
                        committed = true;
                    }
                }
                Ok(None) => break,
                Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
                Err(s) => {
                    if let Some(f) = failure.lock().expect("poisoned").take() {
                        return Err(pull_error(image, format!("blob {}: {f}", desc.digest)));
                    }
                    return Err(grpc("content.Write")(s));
                }
            }
        }
        if let Some(f) = failure.lock().expect("poisoned").take() {
            return Err(pull_error(image, format!("blob {}: {f}", desc.digest)));
        }
        if !committed {
            return Err(pull_error(
                image,
                format!(
                    "blob {}: containerd did not confirm the commit",
                    desc.digest
                ),
            ));
        }
        Ok(())
    }
}

/// Regroups a byte stream into chunks of about `size` bytes; a stream error ends the stream
/// and is recorded in `failure`.
fn chunked(
    data: impl futures::Stream<Item = std::result::Result<Vec<u8>, String>> + Send + 'static,
    size: usize,
    failure: Arc<Mutex<Option<String>>>,
) -> impl futures::Stream<Item = Vec<u8>> + Send + 'static {
    futures::stream::unfold(
        (Box::pin(data), Vec::new(), false),
        move |(mut data, mut buf, done)| {
            let failure = failure.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    match data.next().await {
                        Some(Ok(bytes)) => {
                            buf.extend_from_slice(&bytes);
                            if buf.len() >= size {
                                return Some((std::mem::take(&mut buf), (data, buf, false)));
                            }
                        }
                        Some(Err(e)) => {
                            *failure.lock().expect("poisoned") = Some(e);
                            return None;
                        }
                        None => {
                            if buf.is_empty() {
                                return None;
                            }
                            return Some((std::mem::take(&mut buf), (data, buf, true)));
                        }
                    }
                }
            }
        },
    )
}

fn descriptor(d: &Desc) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: HashMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_spec() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], sha256_digest(b"sha256:aaaa sha256:bbbb"));
        assert!(chain_ids(&[]).is_empty());
        let three = chain_ids(&[a.clone(), b.clone(), a.clone()]);
        assert_eq!(three[2], sha256_digest(format!("{} {a}", c[1]).as_bytes()));
    }

    #[test]
    fn config_parsing_takes_docker_and_oci_fields() {
        let d = format!("sha256:{}", "1".repeat(64));
        let body = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":null,
            "Entrypoint":["/bin/sh"],"WorkingDir":"","User":"nobody","StopSignal":"SIGQUIT"}},
            "rootfs":{{"type":"layers","diff_ids":["{d}"]}}}}"#
        );
        let p = parse_config(body.as_bytes()).unwrap();
        assert_eq!(p.config.env, vec!["PATH=/bin"]);
        assert!(p.config.cmd.is_empty());
        assert_eq!(p.config.entrypoint, vec!["/bin/sh"]);
        assert_eq!(p.config.working_dir, None);
        assert_eq!(p.config.user.as_deref(), Some("nobody"));
        assert_eq!(p.config.stop_signal.as_deref(), Some("SIGQUIT"));
        assert_eq!(p.config.chain_id, d);
        assert!(parse_config(br#"{"rootfs":{"diff_ids":["md5:x"]}}"#).is_err());
    }

    #[test]
    fn index_platform_selection() {
        let body = br#"{"schemaVersion":2,"manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:a","size":1,
             "platform":{"architecture":"arm64","os":"linux"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:b","size":1,
             "platform":{"architecture":"amd64","os":"linux"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:c","size":1,
             "platform":{"architecture":"amd64","os":"windows"}}]}"#;
        let doc = parse_manifest(body).unwrap();
        assert!(is_index("", &doc));
        assert!(is_index(MEDIA_DOCKER_LIST, &doc));
        let chosen = pick_platform(doc.manifests.as_deref().unwrap()).unwrap();
        let want = match host_arch() {
            "amd64" => "sha256:b",
            "arm64" => "sha256:a",
            _ => return,
        };
        assert_eq!(chosen.digest, want);
        let m =
            parse_manifest(br#"{"config":{"digest":"sha256:x","size":2},"layers":[]}"#).unwrap();
        assert!(!is_index("", &m));
        assert!(!is_index(MEDIA_OCI_MANIFEST, &m));
    }

    #[tokio::test]
    async fn chunking_regroups_and_records_errors() {
        let failure = Arc::default();
        let input = futures::stream::iter(vec![Ok(vec![1u8; 3]), Ok(vec![2u8; 3]), Ok(vec![3u8])]);
        let out: Vec<Vec<u8>> = chunked(input, 4, Arc::clone(&failure)).collect().await;
        assert_eq!(out, vec![vec![1, 1, 1, 2, 2, 2], vec![3]]);
        assert!(failure.lock().unwrap().is_none());
        let input = futures::stream::iter(vec![Ok(vec![1u8; 2]), Err("broken".to_string())]);
        let out: Vec<Vec<u8>> = chunked(input, 4, Arc::clone(&failure)).collect().await;
        assert!(out.is_empty());
        assert_eq!(failure.lock().unwrap().as_deref(), Some("broken"));
    }
}
