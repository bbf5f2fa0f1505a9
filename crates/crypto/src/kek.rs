//! Key-encryption keys and where they come from.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, general_purpose};
use ring::aead::NONCE_LEN;
use serde_json::Value;
use zeroize::{Zeroize, Zeroizing};

use crate::error::CryptoError;
use crate::seal::{DataKey, TAG_LEN, WrappedKey, gcm_open_into, gcm_seal, random_fill};

/// Associated-data prefix of a wrapped data key; the key name follows.
const WRAP_AAD_PREFIX: &[u8] = b"custos-dek-v1|";
/// Length of a wrapped 32-byte key: nonce ‖ ciphertext ‖ tag.
const WRAPPED_LEN: usize = NONCE_LEN + 32 + TAG_LEN;
/// Key files larger than this are refused as malformed.
const MAX_KEY_FILE_LEN: u64 = 1 << 20;
/// Longest KEK id accepted.
const MAX_ID_LEN: usize = 64;

/// Standard base64; decoding accepts the padding present or absent.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decode a base64 AES-256 key; `None` unless it is valid base64 of exactly
/// 32 bytes. The decoded buffer is zeroized.
fn decode_key(b64: &str) -> Option<DataKey> {
    let raw = Zeroizing::new(B64.decode(b64.trim().as_bytes()).ok()?);
    DataKey::from_slice(&raw)
}

/// Whether `id` is acceptable as a KEK id: 1 to 64 ASCII letters, digits,
/// `-`, `_` or `.`.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// One key-encryption key. The key bytes are zeroized on drop and never
/// printed (its `Debug` shows the id only).
pub struct Kek {
    id: String,
    /// The raw key (boxed, zeroized on drop) and its prepared AES key.
    key: DataKey,
}

impl Kek {
    /// A KEK from its id and raw key bytes (for providers outside this crate
    /// and for tests).
    pub fn new(id: impl Into<String>, mut key: [u8; 32]) -> Kek {
        let kek = Kek {
            id: id.into(),
            key: DataKey::from_bytes(key),
        };
        key.zeroize();
        kek
    }
    /// A KEK with a fresh random key.
    pub fn generate(id: impl Into<String>) -> Kek {
        Kek {
            id: id.into(),
            key: DataKey::generate(),
        }
    }
    /// The KEK's id (stored next to every key it wraps).
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Wrap `dek` under this KEK; `key_name` (for example `patient/123`) is
    /// bound as associated data so that a wrapped key cannot be swapped
    /// between rows.
    pub fn wrap(&self, dek: &DataKey, key_name: &str) -> WrappedKey {
        let aad = wrap_aad(key_name);
        WrappedKey {
            kek_id: self.id.clone(),
            blob: gcm_seal(self.key.aead_key(), &[], &aad, dek.expose_bytes()),
        }
    }
    /// Unwrap a key wrapped by [`Kek::wrap`] with the same `key_name`.
    ///
    /// Fails with [`CryptoError::Integrity`] if the blob was altered, was
    /// wrapped for another `key_name`, or under another KEK. (The blob's
    /// `kek_id` is not consulted: routing by id is the provider's job.)
    pub fn unwrap(&self, wrapped: &WrappedKey, key_name: &str) -> Result<DataKey, CryptoError> {
        if wrapped.blob.len() != WRAPPED_LEN {
            return Err(CryptoError::Integrity);
        }
        let aad = wrap_aad(key_name);
        let mut plain = Zeroizing::new(Vec::with_capacity(WRAPPED_LEN));
        gcm_open_into(self.key.aead_key(), &aad, &wrapped.blob, &mut plain)?;
        DataKey::from_slice(&plain).ok_or(CryptoError::Integrity)
    }

    fn key_bytes(&self) -> &[u8; 32] {
        self.key.expose_bytes()
    }
}

fn wrap_aad(key_name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_AAD_PREFIX.len() + key_name.len());
    aad.extend_from_slice(WRAP_AAD_PREFIX);
    aad.extend_from_slice(key_name.as_bytes());
    aad
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

/// The life-cycle state of a KEK in a key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KekState {
    /// Wraps new data keys (exactly one KEK is primary).
    Primary,
    /// Only unwraps keys not yet re-wrapped after a rotation.
    Retired,
}

/// Where KEKs come from. Implementations must be cheap to call per request.
pub trait KekProvider: Send + Sync {
    /// The KEK that wraps new data keys.
    fn primary(&self) -> Result<Arc<Kek>, CryptoError>;
    /// The KEK with this id (primary or retired). A file provider re-reads its
    /// file once when the id is unknown, so a rotation done by another process
    /// is picked up without restart.
    fn get(&self, id: &str) -> Result<Arc<Kek>, CryptoError>;
    /// Re-read the source if it changed (called before wrapping new keys).
    fn refresh(&self) -> Result<(), CryptoError> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// File provider
// ---------------------------------------------------------------------------

/// One KEK of a loaded key file.
struct Entry {
    kek: Arc<Kek>,
    state: KekState,
    created: String,
}

/// What identifies a version of the key file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    dev: u64,
    #[cfg(unix)]
    ino: u64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        Stamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            dev: meta.dev(),
            #[cfg(unix)]
            ino: meta.ino(),
        }
    }
}

/// The parsed content of a key file.
struct Loaded {
    entries: Vec<Entry>,
    primary: Arc<Kek>,
    stamp: Stamp,
}

impl Loaded {
    fn find(&self, id: &str) -> Option<&Arc<Kek>> {
        self.entries.iter().find(|e| e.kek.id == id).map(|e| &e.kek)
    }
}

/// KEKs in a JSON key file (created owner-only, mode 0600):
/// `{"version":1,"keks":[{"id":"kek-…","state":"primary","key":"<base64>","created":"…"}]}`.
///
/// The file must hold exactly one primary KEK, unique ids and 32-byte keys
/// in standard base64; on Unix it must not be accessible by group or
/// others. The KEKs are kept in memory, so [`KekProvider::primary`] and
/// [`KekProvider::get`] of a known id cost a read lock; changes are written
/// atomically (temporary file in the same directory, fsync, rename, fsync
/// of the directory). Rotations are expected to be run by one process at a
/// time; within a process they are serialized.
pub struct FileKekProvider {
    path: PathBuf,
    state: RwLock<Arc<Loaded>>,
    /// Serializes changes of the file made through this provider.
    writer: Mutex<()>,
}

impl FileKekProvider {
    /// Create a new key file holding one fresh primary KEK; fails if it exists.
    ///
    /// The parent directory must exist. The file is created with mode 0600
    /// (owner read/write only) and synced to disk with its directory.
    pub fn create(path: &Path) -> Result<(), CryptoError> {
        let dir = parent_dir(path);
        if !dir.is_dir() {
            return Err(CryptoError::KeyMaterial(format!(
                "cannot create key file {}: directory {} does not exist",
                path.display(),
                dir.display()
            )));
        }
        let entry = Entry {
            kek: Arc::new(Kek::generate(new_id(&[]))),
            state: KekState::Primary,
            created: now_rfc3339(),
        };
        let bytes = serialize(std::slice::from_ref(&entry))?;
        let mut file = create_private(path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                CryptoError::KeyMaterial(format!(
                    "key file {} already exists; refusing to overwrite it",
                    path.display()
                ))
            } else {
                io_err(e, "creating key file", path)
            }
        })?;
        let written = file
            .write_all(&bytes)
            .and_then(|()| file.sync_all())
            .and_then(|()| sync_dir(dir));
        if let Err(e) = written {
            drop(file);
            let _ = fs::remove_file(path);
            return Err(io_err(e, "writing key file", path));
        }
        Ok(())
    }

    /// Open an existing key file (refusing one readable by group or others).
    pub fn open(path: &Path) -> Result<Self, CryptoError> {
        let loaded = load(path)?;
        Ok(FileKekProvider {
            path: path.to_path_buf(),
            state: RwLock::new(Arc::new(loaded)),
            writer: Mutex::new(()),
        })
    }

    /// Rotation step 1: add a fresh KEK as primary and mark the old primary
    /// retired, atomically (write to a temp file, fsync, rename). Returns the new id.
    pub fn add_primary(&self) -> Result<String, CryptoError> {
        let _guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        // Start from what is on disk now, not from a possibly stale copy.
        let current = load(&self.path)?;
        let ids: Vec<&str> = current.entries.iter().map(|e| e.kek.id()).collect();
        let id = new_id(&ids);
        let mut entries: Vec<Entry> = current
            .entries
            .iter()
            .map(|e| Entry {
                kek: e.kek.clone(),
                state: KekState::Retired,
                created: e.created.clone(),
            })
            .collect();
        entries.push(Entry {
            kek: Arc::new(Kek::generate(id.clone())),
            state: KekState::Primary,
            created: now_rfc3339(),
        });
        self.rewrite(&entries)?;
        Ok(id)
    }

    /// Rotation last step: drop retired KEKs whose ids are in `ids`
    /// (the caller checks that no wrapped key still uses them).
    ///
    /// Ids not in the file are ignored (so the step can be repeated); naming
    /// the primary KEK is refused with [`CryptoError::KeyMaterial`] and
    /// nothing is removed.
    pub fn remove_retired(&self, ids: &[String]) -> Result<(), CryptoError> {
        let _guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = load(&self.path)?;
        if ids.iter().any(|id| id == current.primary.id()) {
            return Err(CryptoError::KeyMaterial(format!(
                "refusing to remove KEK {:?}: it is the primary KEK",
                current.primary.id()
            )));
        }
        let kept: Vec<Entry> = current
            .entries
            .iter()
            .filter(|e| !ids.iter().any(|id| *id == e.kek.id))
            .map(|e| Entry {
                kek: e.kek.clone(),
                state: e.state,
                created: e.created.clone(),
            })
            .collect();
        if kept.len() == current.entries.len() {
            // Nothing to remove; just make sure our copy is current.
            self.install(current);
            return Ok(());
        }
        self.rewrite(&kept)
    }

    /// Ids and states of all KEKs in the file.
    pub fn list(&self) -> Vec<(String, KekState)> {
        self.current()
            .entries
            .iter()
            .map(|e| (e.kek.id.clone(), e.state))
            .collect()
    }

    /// The key file's path, as given to [`FileKekProvider::open`].
    pub fn path(&self) -> &PathBuf {
        &self.path
    }

    fn current(&self) -> Arc<Loaded> {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn install(&self, loaded: Loaded) {
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(loaded);
    }

    /// Re-read the file. Serialized with rewrites so that a slow re-read
    /// cannot install an older content over a newer one.
    fn reload(&self) -> Result<Arc<Loaded>, CryptoError> {
        let _guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        self.reload_locked()
    }

    /// [`Self::reload`] for callers that hold `writer`.
    fn reload_locked(&self) -> Result<Arc<Loaded>, CryptoError> {
        let loaded = Arc::new(load(&self.path)?);
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = loaded.clone();
        Ok(loaded)
    }

    /// Atomically replace the file with `entries` and load the result
    /// (the caller holds `writer`).
    fn rewrite(&self, entries: &[Entry]) -> Result<(), CryptoError> {
        let bytes = serialize(entries)?;
        write_atomic(&self.path, &bytes)?;
        self.reload_locked().map(|_| ())
    }
}

impl KekProvider for FileKekProvider {
    fn primary(&self) -> Result<Arc<Kek>, CryptoError> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        Ok(state.primary.clone())
    }

    fn get(&self, id: &str) -> Result<Arc<Kek>, CryptoError> {
        {
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(kek) = state.find(id) {
                return Ok(kek.clone());
            }
        }
        // Unknown: maybe another process rotated; re-read once.
        self.reload()?
            .find(id)
            .cloned()
            .ok_or_else(|| CryptoError::UnknownKek(id.to_owned()))
    }

    fn refresh(&self) -> Result<(), CryptoError> {
        let meta =
            fs::metadata(&self.path).map_err(|e| io_err(e, "reading key file", &self.path))?;
        if Stamp::of(&meta) != self.current().stamp {
            self.reload()?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for FileKekProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKekProvider")
            .field("path", &self.path)
            .field("keks", &self.list())
            .finish()
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// An I/O error with the path and what was being done, keeping its kind.
fn io_err(e: io::Error, what: &str, path: &Path) -> CryptoError {
    CryptoError::Io(io::Error::new(
        e.kind(),
        format!("{what} {}: {e}", path.display()),
    ))
}

/// A fresh id `kek-<16 hex>` not among `taken`.
fn new_id(taken: &[&str]) -> String {
    loop {
        let mut raw = [0u8; 8];
        random_fill(&mut raw);
        let mut id = String::with_capacity(4 + 16);
        id.push_str("kek-");
        for b in raw {
            id.push_str(&format!("{b:02x}"));
        }
        if !taken.contains(&id.as_str()) {
            return id;
        }
    }
}

/// Now as RFC 3339 UTC with whole seconds, like `2025-01-31T12:00:00Z`.
fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// Refuse a key file that group or others may access, or that is not a
/// regular file.
fn check_file_meta(meta: &fs::Metadata, path: &Path) -> Result<(), CryptoError> {
    if !meta.is_file() {
        return Err(CryptoError::KeyMaterial(format!(
            "key file {} is not a regular file",
            path.display()
        )));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(CryptoError::KeyMaterial(format!(
                "key file {} is accessible by group or others (mode {mode:04o}); \
                 restrict it to its owner with `chmod 600 {}`",
                path.display(),
                path.display()
            )));
        }
    }
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(CryptoError::KeyMaterial(format!(
            "key file {} is too large to be a key file",
            path.display()
        )));
    }
    Ok(())
}

/// Read, check and parse the key file.
fn load(path: &Path) -> Result<Loaded, CryptoError> {
    let mut file = File::open(path).map_err(|e| io_err(e, "opening key file", path))?;
    // Check the file we opened, not the path (no race with a swap).
    let meta = file
        .metadata()
        .map_err(|e| io_err(e, "reading key file", path))?;
    check_file_meta(&meta, path)?;
    let mut text = Zeroizing::new(String::with_capacity(meta.len() as usize + 1));
    (&mut file)
        .take(MAX_KEY_FILE_LEN + 1)
        .read_to_string(&mut text)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                CryptoError::KeyMaterial(format!("key file {} is not UTF-8", path.display()))
            } else {
                io_err(e, "reading key file", path)
            }
        })?;
    let entries = parse_key_file(&text)
        .map_err(|msg| CryptoError::KeyMaterial(format!("key file {}: {msg}", path.display())))?;
    let primary = entries
        .iter()
        .find(|e| e.state == KekState::Primary)
        .map(|e| e.kek.clone())
        .ok_or_else(|| CryptoError::KeyMaterial("no primary KEK".into()))?;
    Ok(Loaded {
        entries,
        primary,
        stamp: Stamp::of(&meta),
    })
}

/// Parse the JSON of a key file. Error messages name fields and positions
/// but never echo values (a misplaced key must not end up in a log).
fn parse_key_file(text: &str) -> Result<Vec<Entry>, String> {
    let mut value: Value = serde_json::from_str(text)
        .map_err(|e| format!("not valid JSON (line {}, column {})", e.line(), e.column()))?;
    let result = parse_key_value(&value);
    scrub(&mut value);
    result
}

/// Zeroize every `key` string of a parsed key file.
fn scrub(value: &mut Value) {
    if let Some(keks) = value.get_mut("keks").and_then(Value::as_array_mut) {
        for entry in keks {
            if let Some(Value::String(key)) = entry.get_mut("key") {
                key.zeroize();
            }
        }
    }
}

fn parse_key_value(value: &Value) -> Result<Vec<Entry>, String> {
    let obj = value
        .as_object()
        .ok_or("the top level must be a JSON object")?;
    if let Some(field) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "version" | "keks"))
    {
        return Err(format!("unexpected field {field:?}"));
    }
    match obj.get("version").and_then(Value::as_u64) {
        Some(1) => {}
        Some(v) => return Err(format!("unsupported version {v} (expected 1)")),
        None => return Err("missing or non-numeric \"version\"".into()),
    }
    let keks = obj
        .get("keks")
        .and_then(Value::as_array)
        .ok_or("missing \"keks\" array")?;
    if keks.is_empty() {
        return Err("\"keks\" is empty".into());
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(keks.len());
    for (i, kek) in keks.iter().enumerate() {
        let kek = kek
            .as_object()
            .ok_or_else(|| format!("keks[{i}] is not an object"))?;
        if let Some(field) = kek
            .keys()
            .find(|k| !matches!(k.as_str(), "id" | "state" | "key" | "created"))
        {
            return Err(format!("keks[{i}]: unexpected field {field:?}"));
        }
        let field = |name: &str| {
            kek.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("keks[{i}]: missing or non-string {name:?}"))
        };
        let id = field("id")?;
        if !valid_id(id) {
            return Err(format!(
                "keks[{i}]: invalid id (1 to {MAX_ID_LEN} letters, digits, '-', '_' or '.')"
            ));
        }
        if entries.iter().any(|e| e.kek.id == id) {
            return Err(format!("duplicate KEK id {id:?}"));
        }
        let state = match field("state")? {
            "primary" => KekState::Primary,
            "retired" => KekState::Retired,
            _ => {
                return Err(format!(
                    "keks[{i}] ({id}): \"state\" must be \"primary\" or \"retired\""
                ));
            }
        };
        let key = decode_key(field("key")?)
            .ok_or_else(|| format!("keks[{i}] ({id}): \"key\" must be base64 of 32 bytes"))?;
        let created = field("created")?.to_owned();
        entries.push(Entry {
            kek: Arc::new(Kek {
                id: id.to_owned(),
                key,
            }),
            state,
            created,
        });
    }
    match entries
        .iter()
        .filter(|e| e.state == KekState::Primary)
        .count()
    {
        1 => Ok(entries),
        0 => Err("no primary KEK (exactly one is required)".into()),
        n => Err(format!("{n} primary KEKs (exactly one is required)")),
    }
}

/// A base64 key string, zeroized on drop.
struct KeyB64(String);

impl Drop for KeyB64 {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl serde::Serialize for KeyB64 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[derive(serde::Serialize)]
struct FileOut<'a> {
    version: u32,
    keks: Vec<EntryOut<'a>>,
}

#[derive(serde::Serialize)]
struct EntryOut<'a> {
    id: &'a str,
    state: KekState,
    key: KeyB64,
    created: &'a str,
}

/// The key file's JSON (in a buffer zeroized on drop).
fn serialize(entries: &[Entry]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let out = FileOut {
        version: 1,
        keks: entries
            .iter()
            .map(|e| EntryOut {
                id: &e.kek.id,
                state: e.state,
                key: KeyB64(general_purpose::STANDARD.encode(e.kek.key_bytes())),
                created: &e.created,
            })
            .collect(),
    };
    // Sized up front so that growing never leaves copies behind.
    let mut buf = Zeroizing::new(Vec::with_capacity(256 + 256 * entries.len()));
    serde_json::to_writer_pretty(&mut *buf, &out)
        .map_err(|e| CryptoError::KeyMaterial(format!("serializing key file: {e}")))?;
    buf.push(b'\n');
    Ok(buf)
}

/// Create `path` (which must not exist) for writing, owner-only.
fn create_private(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// Make a rename or creation in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Replace `path` with `bytes` atomically: temp file (0600) in the same
/// directory, fsync, rename over `path`, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CryptoError> {
    let dir = parent_dir(path);
    let name = path.file_name().ok_or_else(|| {
        CryptoError::KeyMaterial(format!("key file path {} has no file name", path.display()))
    })?;
    let mut suffix = [0u8; 6];
    random_fill(&mut suffix);
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!(".{}.tmp-{suffix}", name.to_string_lossy()));
    let result = (|| {
        let mut file = create_private(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(e, "rewriting key file", path)
    })
}

// ---------------------------------------------------------------------------
// Environment provider
// ---------------------------------------------------------------------------

/// KEKs from an environment variable: `id:base64key[,id:base64key…]`, the
/// first being primary (for containers that inject secrets as variables).
///
/// Ids are 1 to 64 ASCII letters, digits, `-`, `_` or `.`; keys are standard
/// base64 (padding optional) of 32 bytes; whitespace around entries is
/// ignored. Error messages name entries by position only, never by content.
pub struct EnvKekProvider {
    /// The KEKs in order; the first is primary. Never empty.
    keks: Vec<Arc<Kek>>,
}

impl EnvKekProvider {
    /// Read the variable `var` (for example `CUSTOS_KEK`).
    pub fn from_env(var: &str) -> Result<Self, CryptoError> {
        let value = std::env::var_os(var).ok_or_else(|| {
            CryptoError::KeyMaterial(format!("environment variable {var} is not set"))
        })?;
        let value = Zeroizing::new(value.into_string().map_err(|_| {
            CryptoError::KeyMaterial(format!("environment variable {var} is not valid UTF-8"))
        })?);
        Self::parse_value(&value)
            .map_err(|msg| CryptoError::KeyMaterial(format!("environment variable {var}: {msg}")))
    }

    /// Parse a value in the variable's format (`id:base64key[,…]`), for
    /// callers that obtain it elsewhere and for tests.
    pub fn parse(value: &str) -> Result<Self, CryptoError> {
        Self::parse_value(value).map_err(CryptoError::KeyMaterial)
    }

    fn parse_value(value: &str) -> Result<Self, String> {
        if value.trim().is_empty() {
            return Err("is empty (expected id:base64key[,id:base64key…])".into());
        }
        let mut keks: Vec<Arc<Kek>> = Vec::new();
        for (i, entry) in value.split(',').enumerate() {
            let n = i + 1;
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(format!("entry {n} is empty"));
            }
            let (id, key) = entry
                .split_once(':')
                .ok_or_else(|| format!("entry {n} is not of the form id:base64key"))?;
            let id = id.trim();
            if !valid_id(id) {
                return Err(format!(
                    "entry {n} has an invalid id (1 to {MAX_ID_LEN} letters, digits, '-', '_' or '.')"
                ));
            }
            let key = decode_key(key)
                .ok_or_else(|| format!("entry {n}: key must be base64 of 32 bytes"))?;
            if let Some(j) = keks.iter().position(|k| k.id == id) {
                return Err(format!("entries {} and {n} have the same id", j + 1));
            }
            keks.push(Arc::new(Kek {
                id: id.to_owned(),
                key,
            }));
        }
        Ok(EnvKekProvider { keks })
    }

    /// Ids of the KEKs, the primary first.
    pub fn ids(&self) -> Vec<String> {
        self.keks.iter().map(|k| k.id.clone()).collect()
    }
}

impl KekProvider for EnvKekProvider {
    fn primary(&self) -> Result<Arc<Kek>, CryptoError> {
        self.keks
            .first()
            .cloned()
            .ok_or_else(|| CryptoError::KeyMaterial("no KEK configured".into()))
    }

    fn get(&self, id: &str) -> Result<Arc<Kek>, CryptoError> {
        self.keks
            .iter()
            .find(|k| k.id == id)
            .cloned()
            .ok_or_else(|| CryptoError::UnknownKek(id.to_owned()))
    }
}

impl std::fmt::Debug for EnvKekProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvKekProvider")
            .field("ids", &self.ids())
            .finish()
    }
}

#[cfg(test)]
mod tests;
