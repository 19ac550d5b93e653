//! Writing an image into containerd (containerd 1.6 has no transfer service): blobs streamed
//! into the content store under the pull's lease with the GC labels ctr and CRI set
//! (`containerd.io/gc.ref.content.*`, the snapshot reference on the config,
//! `containerd.io/uncompressed` on layers), layers unpacked into the snapshotter (snapshots
//! Prepare → diff Apply → snapshots Commit, named by chain ID) and the image record. What the
//! registry client fetched ends here; nothing in this file speaks to a registry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    AddResourceRequest, ApplyRequest, CreateImageRequest, Image, Info as ContentInfo, InfoRequest,
    ReadContentRequest, Resource as LeaseResource, UpdateImageRequest,
    UpdateRequest as ContentUpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor;
use futures::StreamExt;
use oci_client::manifest::OciDescriptor;

use super::image::pull_error;
use super::{grpc, leased, Result, Runtime, RuntimeError, SNAPSHOTTER};

/// The most of a manifest, index or config read whole into memory.
pub(super) const MAX_MANIFEST: usize = 4 << 20;
const WRITE_CHUNK: usize = 1 << 20;

impl Runtime {
    /// Creates or updates the image record pointing at `target`.
    pub(super) async fn record_image(&self, image: &str, target: &OciDescriptor) -> Result<()> {
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
    pub(super) async fn unpack_layer(
        &self,
        image: &str,
        lease: &str,
        layer: &OciDescriptor,
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
    pub(super) async fn lease_resource(&self, lease: &str, id: &str, kind: &str) -> Result<()> {
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
    pub(super) async fn read_blob_opt(&self, digest: &str) -> Result<Option<Vec<u8>>> {
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
    pub(super) async fn put_small_blob(
        &self,
        image: &str,
        lease: &str,
        desc: &OciDescriptor,
        body: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let open = || {
            let chunks = futures::stream::iter([Ok::<_, String>(body.clone())]);
            futures::future::ready(Ok(chunks))
        };
        self.put_blob(image, lease, desc, labels, open).await
    }

    /// Writes a blob unless present (from the stream `open` makes), then makes sure its labels
    /// are set; a blob gone between the write and the update is written once more.
    pub(super) async fn put_blob<S, F>(
        &self,
        image: &str,
        lease: &str,
        desc: &OciDescriptor,
        labels: HashMap<String, String>,
        open: impl Fn() -> F,
    ) -> Result<()>
    where
        S: futures::Stream<Item = std::result::Result<Vec<u8>, String>> + Send + 'static,
        F: std::future::Future<Output = Result<S>>,
    {
        for attempt in 0..2 {
            if !self.leased_content_exists(lease, &desc.digest).await? {
                self.write_blob(image, lease, desc, open().await?, labels.clone())
                    .await?;
            }
            match self.set_labels(&desc.digest, labels.clone()).await {
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
        desc: &OciDescriptor,
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

fn descriptor(d: &OciDescriptor) -> Descriptor {
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
