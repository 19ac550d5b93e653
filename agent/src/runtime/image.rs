//! Image pulls done by the agent: the reference resolved at the registry (`registry`, on
//! `oci-client`), the platform's manifest chosen from an index, and what was fetched handed to
//! `content` to be written into containerd's content store and snapshotter under one lease,
//! so GC cannot collect half-written content. Concurrent pulls of one image share one pull,
//! and at most a configured number run at once. Manifests are fetched raw
//! (`pull_manifest_raw`, not oci-client's parsed pull, which keeps no bytes) because
//! containerd stores the exact bytes the registry served; the platform is chosen with
//! oci-client's resolver for the host's OS and architecture.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use containerd_client::services::v1::GetImageRequest;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use oci_client::manifest::{
    ImageIndexEntry, OciDescriptor, OciImageManifest, OciManifest, IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_spec::image::{Arch, ImageConfiguration, Os};
use sha2::{Digest as _, Sha256};

use super::content::MAX_MANIFEST;
use super::registry::{self, Reference};
use super::{
    grpc, ImageConfig, ImageInfo, PullPolicy, RegistryAuth, Result, Runtime, RuntimeError,
    SNAPSHOTTER,
};

/// The manifest media types a pull accepts: indexes and image manifests, OCI's and Docker's.
const MANIFEST_TYPES: &[&str] = &[
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
];
const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
const LABEL_CONFIG: &str = "containerd.io/gc.ref.content.config";

/// In-flight pulls by normalised reference, how many pulls were started, and the bound on how
/// many run at once (a pull waits for a permit before it talks to the registry).
pub(super) struct PullGroup {
    inflight: Mutex<HashMap<String, SharedPull>>,
    started: AtomicU64,
    limit: Arc<tokio::sync::Semaphore>,
    running: AtomicUsize,
    peak: AtomicUsize,
}

impl PullGroup {
    /// At most `max` registry pulls at once (at least 1).
    pub(super) fn new(max: usize) -> Self {
        PullGroup {
            inflight: Mutex::default(),
            started: AtomicU64::default(),
            limit: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
            running: AtomicUsize::default(),
            peak: AtomicUsize::default(),
        }
    }
}

type SharedPull = Shared<BoxFuture<'static, Result<ImageInfo, Arc<RuntimeError>>>>;

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

/// The index entry for linux on the host's architecture (as containerd's default platform).
fn pick_platform(manifests: &[ImageIndexEntry]) -> Option<&ImageIndexEntry> {
    let digest = oci_client::client::current_platform_resolver(manifests)?;
    manifests.iter().find(|m| m.digest == digest)
}

fn parse_manifest<T: serde::de::DeserializeOwned>(body: &[u8]) -> std::result::Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("bad manifest: {e}"))
}

fn is_sha256(digest: &str) -> bool {
    digest
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
}

fn parse_config(body: &[u8]) -> std::result::Result<ParsedConfig, String> {
    let doc: ImageConfiguration =
        serde_json::from_slice(body).map_err(|e| format!("bad image config: {e}"))?;
    let diff_ids = doc.rootfs().diff_ids().clone();
    if let Some(bad) = diff_ids.iter().find(|d| !is_sha256(d)) {
        return Err(format!("invalid digest {bad:?}"));
    }
    let body = doc.config().clone().unwrap_or_default();
    let non_empty = |s: &Option<String>| s.clone().filter(|v| !v.is_empty());
    let chain = chain_ids(&diff_ids);
    Ok(ParsedConfig {
        config: ImageConfig {
            env: body.env().clone().unwrap_or_default(),
            entrypoint: body.entrypoint().clone().unwrap_or_default(),
            cmd: body.cmd().clone().unwrap_or_default(),
            working_dir: non_empty(body.working_dir()),
            user: non_empty(body.user()),
            stop_signal: non_empty(body.stop_signal()),
            chain_id: chain.last().cloned().unwrap_or_default(),
        },
        diff_ids,
    })
}

pub(super) fn pull_error(image: &str, detail: impl Into<String>) -> RuntimeError {
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
        let reference = registry::parse(image)?;
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
            let limit = rt.inner.pulls.limit.clone();
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
        let bad = |d| pull_error(&name, d);
        let manifest = match parse_manifest(&top).map_err(bad)? {
            OciManifest::ImageIndex(index) => {
                let Some(m) = pick_platform(&index.manifests) else {
                    return Ok(None);
                };
                let Some(body) = self.read_blob_opt(&m.digest).await? else {
                    return Ok(None);
                };
                parse_manifest::<OciImageManifest>(&body).map_err(bad)?
            }
            OciManifest::Image(m) => m,
        };
        let Some(config_body) = self.read_blob_opt(&manifest.config.digest).await? else {
            return Ok(None);
        };
        let parsed = parse_config(&config_body).map_err(bad)?;
        if !self.snapshot_exists(&parsed.config.chain_id).await? {
            return Ok(None);
        }
        Ok(Some(ImageInfo {
            reference: name,
            repo_digest: format!("{}@{}", registry::name(reference), target.digest),
            image_id: manifest.config.digest,
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
        let client = registry::client(reference);
        let credentials = registry::credentials(auth);
        let fetch = |e| registry::error(&image, e);
        let bad = |d: String| pull_error(&image, d);
        // oci-client checks the body against the reference's digest.
        let (top_body, _) = client
            .pull_manifest_raw(reference, &credentials, MANIFEST_TYPES)
            .await
            .map_err(fetch)?;
        if top_body.len() > MAX_MANIFEST {
            return Err(pull_error(&image, "manifest too large"));
        }
        let top_body = top_body.to_vec();
        let top_digest = sha256_digest(&top_body);
        let top = parse_manifest(&top_body).map_err(bad)?;
        let (manifest_desc, manifest_body, index) = match top {
            OciManifest::ImageIndex(list) => {
                let chosen =
                    pick_platform(&list.manifests).ok_or_else(|| RuntimeError::ImageNotFound {
                        image: image.clone(),
                        detail: format!("no manifest for {}/{}", Os::default(), Arch::default()),
                    })?;
                let platform = reference.clone_with_digest(chosen.digest.clone());
                let (body, _) = client
                    .pull_manifest_raw(&platform, &credentials, MANIFEST_TYPES)
                    .await
                    .map_err(fetch)?;
                let desc = OciDescriptor {
                    media_type: chosen.media_type.clone(),
                    digest: chosen.digest.clone(),
                    size: chosen.size,
                    ..Default::default()
                };
                let media_type = list.media_type.clone();
                let index = (
                    media_type.unwrap_or(OCI_IMAGE_INDEX_MEDIA_TYPE.into()),
                    top_body,
                );
                (desc, body.to_vec(), Some(index))
            }
            OciManifest::Image(m) => {
                let desc = OciDescriptor {
                    media_type: m.media_type.unwrap_or(OCI_IMAGE_MEDIA_TYPE.into()),
                    digest: top_digest.clone(),
                    size: top_body.len() as i64,
                    ..Default::default()
                };
                (desc, top_body, None)
            }
        };
        let manifest: OciImageManifest = parse_manifest(&manifest_body).map_err(bad)?;
        let config_desc = manifest.config.clone();
        let config_body = match self.read_blob_opt(&config_desc.digest).await? {
            Some(b) => b,
            None => {
                let mut body = Vec::new();
                client
                    .pull_blob(reference, &config_desc, &mut body)
                    .await
                    .map_err(fetch)?;
                body
            }
        };
        if sha256_digest(&config_body) != config_desc.digest {
            return Err(pull_error(&image, "config digest mismatch"));
        }
        let parsed = parse_config(&config_body).map_err(bad)?;
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
            let open = || async {
                let blob = client.pull_blob_stream(reference, layer).await;
                let blob = blob.map_err(fetch)?;
                Ok(blob.map(|r| r.map(|b| b.to_vec()).map_err(|e| e.to_string())))
            };
            self.put_blob(&image, lease, layer, labels, open).await?;
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
            Some((media_type, body)) => {
                let desc = OciDescriptor {
                    media_type,
                    digest: top_digest.clone(),
                    size: body.len() as i64,
                    ..Default::default()
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
            repo_digest: format!("{}@{}", registry::name(reference), top_digest),
            image_id: config_desc.digest,
            config: parsed.config,
        })
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
        let OciManifest::ImageIndex(index) = parse_manifest(body).unwrap() else {
            panic!("an index without mediaType is an index");
        };
        let chosen = pick_platform(&index.manifests).unwrap();
        let want = match Arch::default() {
            Arch::Amd64 => "sha256:b",
            Arch::ARM64 => "sha256:a",
            _ => return,
        };
        assert_eq!(chosen.digest, want);
        let m = parse_manifest(br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:x","size":2},"layers":[]}"#)
            .unwrap();
        assert!(matches!(m, OciManifest::Image(_)), "{m:?}");
        let none: &[ImageIndexEntry] = &[];
        assert!(pick_platform(none).is_none());
    }
}
