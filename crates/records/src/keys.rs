//! The key service: data keys per patient compartment, unwrapped on demand
//! and cached in memory, and the blind indexer. The store only ever sees
//! wrapped keys.
use std::num::NonZeroUsize;
use std::sync::Arc;

use custos_crypto::{BlindIndexer, DataKey, KekProvider, Sealer, WrappedKey};
use custos_fhir::FhirError;
use custos_store::{KeyRecord, ReadTx, Store, StoreError, StoreExt, WriteTx};
use lru::LruCache;
use parking_lot::Mutex;

/// The name of the data key that seals the blind-index key.
const INDEX_KEY_NAME: &str = "_index";
/// The data key of resources outside any patient compartment.
pub const SHARED_KEY_NAME: &str = "shared";

/// The data key name for a patient's compartment.
pub fn patient_key_name(patient_id: &str) -> String {
    format!("patient/{patient_id}")
}

/// An unwrapped key and the wrapped blob it came from.
type CachedKey = (Vec<u8>, Arc<DataKey>);

/// Keys and sealing, shared by every request.
pub struct KeyService {
    provider: Arc<dyn KekProvider>,
    sealer: Arc<dyn Sealer>,
    /// Unwrapped keys with the wrapped record they came from (see `key_for_write`).
    cache: Mutex<LruCache<String, CachedKey>>,
    blind: BlindIndexer,
}

fn crypto_err(e: custos_crypto::CryptoError) -> FhirError {
    // Never include key material; CryptoError messages do not carry any.
    FhirError::internal(format!("key service: {e}"))
}

pub(crate) fn store_err(e: StoreError) -> FhirError {
    match e {
        StoreError::Conflict {
            rtype,
            id,
            expected,
            found,
        } => FhirError::conflict(format!(
            "version conflict on {rtype}/{id}: expected {expected}, found {found}"
        )),
        StoreError::Aborted(b) => match b.downcast::<FhirError>() {
            Ok(e) => *e,
            Err(b) => FhirError::internal(format!("aborted: {b}")),
        },
        StoreError::Backend(msg) => {
            tracing::error!(error = %msg, "storage backend failure");
            FhirError::internal("storage failure; see the server log")
        }
    }
}

impl KeyService {
    /// Load (or on first start create) the blind-index key and build the service.
    pub async fn open(
        store: &Arc<dyn Store>,
        provider: Arc<dyn KekProvider>,
        sealer: Arc<dyn Sealer>,
        cache_size: usize,
    ) -> Result<KeyService, FhirError> {
        let existing = store
            .read(|tx| tx.data_key(INDEX_KEY_NAME))
            .await
            .map_err(store_err)?;
        let index_key = match existing {
            Some(rec) => unwrap_record(provider.as_ref(), &rec)?,
            None => {
                let key = DataKey::generate();
                let kek = provider.primary().map_err(crypto_err)?;
                let wrapped = kek.wrap(&key, INDEX_KEY_NAME);
                let rec = KeyRecord {
                    name: INDEX_KEY_NAME.into(),
                    kek_id: wrapped.kek_id,
                    blob: wrapped.blob,
                };
                let put = store.write(move |tx| tx.put_data_key(&rec, false)).await;
                match put {
                    Ok(()) => key,
                    // Another node created it first: use theirs.
                    Err(StoreError::Conflict { .. }) => {
                        let rec = store
                            .read(|tx| tx.data_key(INDEX_KEY_NAME))
                            .await
                            .map_err(store_err)?;
                        let rec = rec.ok_or_else(|| FhirError::internal("index key vanished"))?;
                        unwrap_record(provider.as_ref(), &rec)?
                    }
                    Err(e) => return Err(store_err(e)),
                }
            }
        };
        let blind = BlindIndexer::new(index_key.expose_bytes());
        let cap = NonZeroUsize::new(cache_size.max(1)).expect("non-zero");
        Ok(KeyService {
            provider,
            sealer,
            cache: Mutex::new(LruCache::new(cap)),
            blind,
        })
    }

    /// The blind indexer.
    pub fn blind(&self) -> &BlindIndexer {
        &self.blind
    }

    /// The sealer.
    pub fn sealer(&self) -> &dyn Sealer {
        self.sealer.as_ref()
    }

    /// The data key `name` for reading; `None` if it no longer exists (erased).
    pub fn key_for_read(
        &self,
        tx: &mut dyn ReadTx,
        name: &str,
    ) -> Result<Option<Arc<DataKey>>, FhirError> {
        if let Some((_, k)) = self.cache.lock().get(name) {
            return Ok(Some(k.clone()));
        }
        let Some(rec) = tx.data_key(name).map_err(store_err)? else {
            return Ok(None);
        };
        let key = Arc::new(unwrap_record(self.provider.as_ref(), &rec)?);
        self.cache
            .lock()
            .put(name.to_string(), (rec.blob, key.clone()));
        Ok(Some(key))
    }

    /// The data key `name` for writing, created and stored wrapped if new.
    /// Called inside the write transaction so that the key and the data it
    /// seals commit together.
    pub fn key_for_write(
        &self,
        tx: &mut dyn WriteTx,
        name: &str,
    ) -> Result<Arc<DataKey>, FhirError> {
        // Always checked against the transaction's view, never taken from
        // the cache alone: a key created by a write that then rolled back
        // (or one another node replaced) may still be cached, and sealing
        // with a key the database does not hold would lose the data.
        if let Some(rec) = tx.data_key(name).map_err(store_err)? {
            if let Some((blob, k)) = self.cache.lock().get(name)
                && *blob == rec.blob
            {
                return Ok(k.clone());
            }
            let key = Arc::new(unwrap_record(self.provider.as_ref(), &rec)?);
            self.cache
                .lock()
                .put(name.to_string(), (rec.blob, key.clone()));
            return Ok(key);
        }
        self.provider.refresh().map_err(crypto_err)?;
        let kek = self.provider.primary().map_err(crypto_err)?;
        let key = DataKey::generate();
        let wrapped = kek.wrap(&key, name);
        let rec = KeyRecord {
            name: name.to_string(),
            kek_id: wrapped.kek_id,
            blob: wrapped.blob,
        };
        tx.put_data_key(&rec, false).map_err(store_err)?;
        let key = Arc::new(key);
        // Cached before the commit is known; if the write rolls back, the
        // next write finds no record and replaces the entry (above).
        self.cache
            .lock()
            .put(name.to_string(), (rec.blob, key.clone()));
        Ok(key)
    }

    /// Forget a cached key (after erasure).
    pub fn forget(&self, name: &str) {
        self.cache.lock().pop(name);
    }

    /// Re-wrap up to `batch` data keys not yet under the primary KEK.
    /// Returns how many were re-wrapped (0 when rotation is complete).
    pub async fn rewrap_batch(
        &self,
        store: &Arc<dyn Store>,
        batch: usize,
    ) -> Result<usize, FhirError> {
        self.provider.refresh().map_err(crypto_err)?;
        let primary = self.provider.primary().map_err(crypto_err)?;
        let primary_id = primary.id().to_string();
        let pid = primary_id.clone();
        let pending = store
            .read(move |tx| tx.data_keys_not_under(&pid, batch))
            .await
            .map_err(store_err)?;
        if pending.is_empty() {
            return Ok(0);
        }
        let mut rewrapped = Vec::with_capacity(pending.len());
        for rec in &pending {
            let key = unwrap_record(self.provider.as_ref(), rec)?;
            let w = primary.wrap(&key, &rec.name);
            rewrapped.push((
                rec.clone(),
                KeyRecord {
                    name: rec.name.clone(),
                    kek_id: w.kek_id,
                    blob: w.blob,
                },
            ));
        }
        let n = rewrapped.len();
        store
            .write(move |tx| {
                for (old, new) in &rewrapped {
                    // Skip keys changed or erased since they were read.
                    if tx.data_key(&old.name)?.as_ref() == Some(old) {
                        tx.put_data_key(new, true)?;
                    }
                }
                Ok(())
            })
            .await
            .map_err(store_err)?;
        Ok(n)
    }
}

fn unwrap_record(provider: &dyn KekProvider, rec: &KeyRecord) -> Result<DataKey, FhirError> {
    let kek = provider.get(&rec.kek_id).map_err(crypto_err)?;
    kek.unwrap(
        &WrappedKey {
            kek_id: rec.kek_id.clone(),
            blob: rec.blob.clone(),
        },
        &rec.name,
    )
    .map_err(crypto_err)
}
