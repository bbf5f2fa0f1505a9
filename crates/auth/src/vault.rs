//! Sealed system records: users, clients, tokens and signing keys are kept
//! in the store's system records, sealed with AES-256-GCM under a system
//! data key (wrapped by the KEK like every other data key), bound by their
//! associated data to their kind and key.
use std::sync::Arc;

use custos_crypto::{DataKey, GcmSealer, Sealer};
use custos_records::Records;
use custos_store::{Store, StoreError, StoreExt, SysRecord, WriteTx};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::AuthError;

/// The name of the data key that seals system records.
pub const SYSTEM_KEY: &str = "system/auth";

/// Seals and opens system records.
#[derive(Clone)]
pub struct Vault {
    store: Arc<dyn Store>,
    key: Arc<DataKey>,
    records: Records,
}

fn aad(kind: &str, key: &str) -> Vec<u8> {
    format!("custos-sys-v1|{kind}|{key}").into_bytes()
}

impl Vault {
    /// Load (or create) the system data key.
    pub async fn open(records: &Records) -> Result<Vault, AuthError> {
        let r = records.clone();
        let key = records
            .store()
            .write(move |tx| {
                r.keys()
                    .key_for_write(tx, SYSTEM_KEY)
                    .map_err(StoreError::abort)
            })
            .await
            .map_err(|e| AuthError::Internal(format!("system key: {e}")))?;
        Ok(Vault {
            store: records.store().clone(),
            key,
            records: records.clone(),
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn records(&self) -> &Records {
        &self.records
    }

    /// A keyed, non-reversible lookup key for an identifying string (a
    /// username): the store never sees it in clear.
    pub fn blind_key(&self, domain: &str, value: &str) -> String {
        let t = self.records.keys().blind().token(&[
            b"custos-sys-lookup",
            domain.as_bytes(),
            value.as_bytes(),
        ]);
        custos_crypto::to_hex(&t)
    }

    pub fn seal<T: Serialize>(&self, kind: &str, key: &str, value: &T) -> Vec<u8> {
        let json = serde_json::to_vec(value).expect("system records serialize");
        GcmSealer.seal(&self.key, &aad(kind, key), &json)
    }

    /// Seal raw bytes (already serialized).
    pub fn seal_bytes(&self, kind: &str, key: &str, bytes: &[u8]) -> Vec<u8> {
        GcmSealer.seal(&self.key, &aad(kind, key), bytes)
    }

    /// Open a record to its raw bytes.
    pub fn open_bytes(&self, rec: &SysRecord) -> Result<Vec<u8>, AuthError> {
        GcmSealer
            .open(&self.key, &aad(&rec.kind, &rec.key), &rec.value)
            .map_err(|_| {
                AuthError::Internal(format!(
                    "system record {}/… failed its integrity check",
                    rec.kind
                ))
            })
    }

    pub fn open_record<T: DeserializeOwned>(&self, rec: &SysRecord) -> Result<T, AuthError> {
        let plain = self.open_bytes(rec)?;
        serde_json::from_slice(&plain)
            .map_err(|_| AuthError::Internal(format!("system record {} does not decode", rec.kind)))
    }

    /// Read and open one record: its version and value.
    pub async fn get<T: DeserializeOwned + Send + 'static>(
        &self,
        kind: &str,
        key: &str,
    ) -> Result<Option<(i64, T)>, AuthError> {
        let (k, id) = (kind.to_string(), key.to_string());
        let rec = self
            .store
            .read(move |tx| tx.sys_get(&k, &id))
            .await
            .map_err(backend)?;
        match rec {
            None => Ok(None),
            Some(r) => Ok(Some((r.version, self.open_record(&r)?))),
        }
    }

    /// Every record of a kind, opened.
    pub async fn list<T: DeserializeOwned + Send + 'static>(
        &self,
        kind: &str,
    ) -> Result<Vec<(String, i64, T)>, AuthError> {
        let k = kind.to_string();
        let recs = self
            .store
            .read(move |tx| tx.sys_list(&k))
            .await
            .map_err(backend)?;
        recs.iter()
            .map(|r| Ok((r.key.clone(), r.version, self.open_record(r)?)))
            .collect()
    }

    /// Seal and write one record (see [`WriteTx::sys_put`] for `expect`).
    pub async fn put<T: Serialize>(
        &self,
        kind: &str,
        key: &str,
        value: &T,
        expect: Option<i64>,
    ) -> Result<i64, AuthError> {
        let sealed = self.seal(kind, key, value);
        let (k, id) = (kind.to_string(), key.to_string());
        self.store
            .write(move |tx| tx.sys_put(&k, &id, &sealed, expect))
            .await
            .map_err(|e| match e {
                StoreError::Conflict { .. } => AuthError::Conflict,
                other => backend(other),
            })
    }

    /// Run a write job over system records (for read-modify-write cycles).
    /// An `Err` from `f` rolls back everything it wrote.
    pub async fn write<T, F>(&self, f: F) -> Result<T, AuthError>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn WriteTx, &Vault) -> Result<T, AuthError> + Send + 'static,
    {
        let this = self.clone();
        self.store
            .write(move |tx| f(tx, &this).map_err(StoreError::abort))
            .await
            .map_err(|e| match e.into_aborted::<AuthError>() {
                Ok(own) => own,
                Err(other) => backend(other),
            })
    }
}

pub(crate) fn backend(e: StoreError) -> AuthError {
    AuthError::Internal(format!("store: {e}"))
}
