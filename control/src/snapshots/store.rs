//! The project store: where snapshot objects live, behind `object_store`
//! (a local directory or an S3-compatible bucket). It knows objects, not
//! versions: a streamed put that hashes and counts as it goes and leaves
//! nothing behind when it fails, a streamed get, and delete.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, WriteMultipart};
use sha2::{Digest, Sha256};

use crate::config::StoreLocation;

/// Parts being uploaded at once per put: bounds the memory one put holds
/// (object_store's parts are 5 MiB).
const PARTS_IN_FLIGHT: usize = 2;

/// The project store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.inner)
    }
}

/// Why a put stored nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum PutFailure {
    /// More than `limit` bytes came.
    TooLarge { limit: u64 },
    /// What came does not hash to what the sender said.
    Mismatch { actual: String },
    /// The body broke off.
    Broken(String),
    /// The store refused or failed.
    Store(String),
}

impl PutFailure {
    /// The `reason` label of `opencloud_control_snapshot_failures_total`.
    pub fn label(&self) -> &'static str {
        match self {
            PutFailure::TooLarge { .. } => "quota",
            PutFailure::Mismatch { .. } => "sha256_mismatch",
            PutFailure::Broken(_) => "upload_broken",
            PutFailure::Store(_) => "store",
        }
    }
}

/// A complete object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub size_bytes: u64,
    /// Lower-case hex SHA-256 of the bytes stored.
    pub sha256: String,
}

impl Store {
    /// Opens the store `location` names: makes a local directory (owner
    /// only) or reads an S3 store's credentials from their files.
    pub fn open(location: &StoreLocation) -> anyhow::Result<Self> {
        match location {
            StoreLocation::Local(dir) => Self::local(dir),
            StoreLocation::S3 {
                bucket,
                prefix,
                endpoint,
                region,
                access_key_id_file,
                secret_access_key_file,
            } => {
                let read = |what, path: &Path| -> anyhow::Result<String> {
                    let text = opencloud_protocol::config::read_private_file(what, path)?;
                    let value = text.trim().to_owned();
                    anyhow::ensure!(!value.is_empty(), "the {what} {} is empty", path.display());
                    Ok(value)
                };
                let mut builder = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_access_key_id(read("store access key id", access_key_id_file)?)
                    .with_secret_access_key(read(
                        "store secret access key",
                        secret_access_key_file,
                    )?);
                if !endpoint.is_empty() {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                let s3 = builder
                    .build()
                    .map_err(|e| anyhow::anyhow!("the s3 store ({bucket}): {e}"))?;
                Ok(Self::wrap(s3, prefix))
            }
        }
    }

    /// A store in the local directory `dir`, made (mode 0700) when missing.
    pub fn local(dir: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| anyhow::anyhow!("cannot make the store {}: {e}", dir.display()))?;
        let local = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| anyhow::anyhow!("the store {}: {e}", dir.display()))?;
        Ok(Self {
            inner: Arc::new(local),
        })
    }

    fn wrap(store: impl ObjectStore, prefix: &str) -> Self {
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(store)
        } else {
            Arc::new(PrefixStore::new(store, prefix))
        };
        Self { inner }
    }

    /// Streams `body` into a new object `key`, hashing and counting as it
    /// goes. The object is completed only when at most `limit` bytes came,
    /// the body ended cleanly and its SHA-256 is `expected_sha256`;
    /// otherwise the upload is aborted and no object appears.
    pub async fn put<E: std::fmt::Display>(
        &self,
        key: &str,
        body: impl Stream<Item = Result<Bytes, E>>,
        limit: u64,
        expected_sha256: &str,
    ) -> Result<Written, PutFailure> {
        let path = ObjectPath::from(key);
        let upload = self
            .inner
            .put_multipart(&path)
            .await
            .map_err(|e| PutFailure::Store(e.to_string()))?;
        let mut writer = WriteMultipart::new(upload);
        let mut hasher = Sha256::new();
        let mut size_bytes = 0u64;
        let mut body = std::pin::pin!(body);
        let failure = loop {
            match body.next().await {
                None => break None,
                Some(Err(e)) => break Some(PutFailure::Broken(e.to_string())),
                Some(Ok(chunk)) => {
                    size_bytes += chunk.len() as u64;
                    if size_bytes > limit {
                        break Some(PutFailure::TooLarge { limit });
                    }
                    hasher.update(&chunk);
                    writer.put(chunk);
                    if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                        break Some(PutFailure::Store(e.to_string()));
                    }
                }
            }
        };
        let sha256 = hex::encode(hasher.finalize());
        let failure = failure.or_else(|| {
            (sha256 != expected_sha256).then(|| PutFailure::Mismatch {
                actual: sha256.clone(),
            })
        });
        if let Some(failure) = failure {
            if let Err(e) = writer.abort().await {
                tracing::warn!(key, error = %e, "aborting a snapshot upload failed");
            }
            return Err(failure);
        }
        writer
            .finish()
            .await
            .map_err(|e| PutFailure::Store(e.to_string()))?;
        Ok(Written { size_bytes, sha256 })
    }

    /// The object `key` as a stream of its bytes.
    pub async fn get(
        &self,
        key: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, object_store::Error>>, object_store::Error> {
        Ok(self.inner.get(&ObjectPath::from(key)).await?.into_stream())
    }

    /// Deletes the object `key`; one already gone is fine.
    pub async fn delete(&self, key: &str) -> Result<(), object_store::Error> {
        match self.inner.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A store in a fresh temporary directory (removed by the caller).
    pub(crate) fn temp_store(name: &str) -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "oc-store-{name}-{}-{}",
            std::process::id(),
            crate::ids::random_id()
        ));
        (Store::local(&dir).unwrap(), dir)
    }

    /// Every file under `dir`, staging files included.
    pub(crate) fn files(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    todo.push(path);
                } else {
                    out.push(path.display().to_string());
                }
            }
        }
        out
    }

    pub(crate) fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    pub(crate) fn chunks(
        parts: Vec<Result<Bytes, String>>,
    ) -> impl Stream<Item = Result<Bytes, String>> {
        futures_util::stream::iter(parts)
    }

    async fn read(store: &Store, key: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut stream = store.get(key).await.unwrap();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_complete_body_with_its_hash_is_stored_and_read_back() {
        let (store, dir) = temp_store("good");
        let body = vec![7u8; 6 << 20];
        let parts = body
            .chunks(1 << 20)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let written = store
            .put("p/1/a", chunks(parts), 10 << 20, &sha(&body))
            .await
            .unwrap();
        assert_eq!(written.size_bytes, body.len() as u64);
        assert_eq!(written.sha256, sha(&body));
        assert_eq!(read(&store, "p/1/a").await, body);
        store.delete("p/1/a").await.unwrap();
        store.delete("p/1/a").await.unwrap();
        assert!(files(&dir).is_empty(), "{:?}", files(&dir));
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn a_broken_a_mismatched_or_an_oversized_body_leaves_nothing() {
        let (store, dir) = temp_store("bad");
        let body = vec![1u8; 3 << 20];
        let whole = || Ok(Bytes::from(body.clone()));
        let broken = store
            .put(
                "p/1/broken",
                chunks(vec![whole(), Err("connection reset".into())]),
                10 << 20,
                &sha(&body),
            )
            .await
            .unwrap_err();
        assert_eq!(broken.label(), "upload_broken");
        let mismatch = store
            .put(
                "p/1/mismatch",
                chunks(vec![whole()]),
                10 << 20,
                &sha(b"other"),
            )
            .await
            .unwrap_err();
        assert_eq!(mismatch.label(), "sha256_mismatch");
        let big = store
            .put(
                "p/1/big",
                chunks(vec![whole(), whole()]),
                4 << 20,
                &sha(&body),
            )
            .await
            .unwrap_err();
        assert_eq!(big, PutFailure::TooLarge { limit: 4 << 20 });
        for key in ["p/1/broken", "p/1/mismatch", "p/1/big"] {
            assert!(store.get(key).await.is_err(), "{key} must not exist");
        }
        assert!(files(&dir).is_empty(), "left behind: {:?}", files(&dir));
        std::fs::remove_dir_all(dir).ok();
    }
}
