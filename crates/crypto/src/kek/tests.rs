use super::*;
use crate::seal::{GcmSealer, Sealer};

fn b64(bytes: &[u8]) -> String {
    general_purpose::STANDARD.encode(bytes)
}

fn key_material_msg(r: Result<impl std::fmt::Debug, CryptoError>) -> String {
    match r {
        Err(CryptoError::KeyMaterial(msg)) => msg,
        other => panic!("expected KeyMaterial, got {other:?}"),
    }
}

#[cfg(unix)]
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Write a key file by hand with mode 0600.
fn write_key_file(path: &Path, text: &str) {
    let _ = fs::remove_file(path);
    let mut f = create_private(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

// ----- Kek ---------------------------------------------------------------

#[test]
fn wrap_unwrap_round_trip() {
    let kek = Kek::generate("kek-a");
    let dek = DataKey::generate();
    let wrapped = kek.wrap(&dek, "patient/123");
    assert_eq!(wrapped.kek_id, "kek-a");
    assert_eq!(wrapped.blob.len(), WRAPPED_LEN);
    let back = kek.unwrap(&wrapped, "patient/123").unwrap();
    assert_eq!(back.expose_bytes(), dek.expose_bytes());
    // The unwrapped key opens what the original sealed.
    let sealed = GcmSealer.seal(&dek, b"aad", b"body");
    assert_eq!(GcmSealer.open(&back, b"aad", &sealed).unwrap(), b"body");
    // Wrapping twice gives different blobs (fresh nonce).
    assert_ne!(kek.wrap(&dek, "patient/123").blob, wrapped.blob);
}

#[test]
fn unwrap_wrong_name_kek_or_tamper_fails() {
    let kek = Kek::generate("kek-a");
    let dek = DataKey::generate();
    let wrapped = kek.wrap(&dek, "patient/123");
    assert!(matches!(
        kek.unwrap(&wrapped, "patient/124"),
        Err(CryptoError::Integrity)
    ));
    assert!(matches!(
        kek.unwrap(&wrapped, ""),
        Err(CryptoError::Integrity)
    ));
    let other = Kek::generate("kek-a");
    assert!(matches!(
        other.unwrap(&wrapped, "patient/123"),
        Err(CryptoError::Integrity)
    ));
    for i in 0..wrapped.blob.len() {
        let mut bad = wrapped.clone();
        bad.blob[i] ^= 0x40;
        assert!(
            matches!(kek.unwrap(&bad, "patient/123"), Err(CryptoError::Integrity)),
            "tampered byte {i} accepted"
        );
    }
    for cut in [0, 1, 12, 28, WRAPPED_LEN - 1] {
        let bad = WrappedKey {
            kek_id: "kek-a".into(),
            blob: wrapped.blob[..cut].to_vec(),
        };
        assert!(matches!(
            kek.unwrap(&bad, "patient/123"),
            Err(CryptoError::Integrity)
        ));
    }
    let mut longer = wrapped.clone();
    longer.blob.push(0);
    assert!(matches!(
        kek.unwrap(&longer, "patient/123"),
        Err(CryptoError::Integrity)
    ));
}

#[test]
fn wrap_aad_is_domain_separated() {
    // A key sealed with GcmSealer-style framing cannot be passed off as a
    // wrapped key: the wrap AAD carries its own prefix.
    let kek = Kek::new("k", [3u8; 32]);
    let dek = DataKey::from_bytes([4u8; 32]);
    let blob = gcm_seal(kek.key.aead_key(), &[], b"patient/1", dek.expose_bytes());
    let fake = WrappedKey {
        kek_id: "k".into(),
        blob,
    };
    assert!(matches!(
        kek.unwrap(&fake, "patient/1"),
        Err(CryptoError::Integrity)
    ));
}

#[test]
fn kek_debug_hides_key() {
    let kek = Kek::new("kek-visible", [0xabu8; 32]);
    let dbg = format!("{kek:?}");
    assert!(dbg.contains("kek-visible"));
    assert!(!dbg.contains("171") && !dbg.to_lowercase().contains("abab"));
    assert!(!dbg.contains(&b64(&[0xabu8; 32])));
    let dek = DataKey::from_bytes([0xabu8; 32]);
    assert_eq!(format!("{dek:?}"), "DataKey(..)");
}

#[test]
fn send_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Kek>();
    assert_send_sync::<FileKekProvider>();
    assert_send_sync::<EnvKekProvider>();
    assert_send_sync::<Arc<dyn KekProvider>>();
}

// ----- FileKekProvider -----------------------------------------------------

#[test]
fn create_and_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    FileKekProvider::create(&path).unwrap();
    #[cfg(unix)]
    assert_eq!(mode_of(&path), 0o600);

    let text = fs::read_to_string(&path).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["version"], 1);
    let keks = json["keks"].as_array().unwrap();
    assert_eq!(keks.len(), 1);
    let id = keks[0]["id"].as_str().unwrap();
    assert_eq!(id.len(), 4 + 16);
    assert!(id.starts_with("kek-"));
    assert!(
        id[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    assert_eq!(keks[0]["state"], "primary");
    let created = keks[0]["created"].as_str().unwrap();
    assert!(
        time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "created {created:?} is not RFC 3339"
    );
    assert!(created.ends_with('Z'));

    let p = FileKekProvider::open(&path).unwrap();
    assert_eq!(p.path(), &path);
    assert_eq!(p.list(), vec![(id.to_owned(), KekState::Primary)]);
    let primary = p.primary().unwrap();
    assert_eq!(primary.id(), id);
    assert!(Arc::ptr_eq(&primary, &p.get(id).unwrap()));
    assert!(matches!(p.get("kek-nope"), Err(CryptoError::UnknownKek(s)) if s == "kek-nope"));
    p.refresh().unwrap();
    assert!(format!("{p:?}").contains(id));

    // Opened twice: same key.
    let dek = DataKey::generate();
    let wrapped = primary.wrap(&dek, "patient/1");
    let q = FileKekProvider::open(&path).unwrap();
    let back = q
        .get(&wrapped.kek_id)
        .unwrap()
        .unwrap(&wrapped, "patient/1")
        .unwrap();
    assert_eq!(back.expose_bytes(), dek.expose_bytes());

    // Never overwritten.
    let msg = key_material_msg(FileKekProvider::create(&path));
    assert!(msg.contains("already exists"));
    assert_eq!(fs::read_to_string(&path).unwrap(), text);
}

#[test]
fn create_needs_parent_dir() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("keys.json");
    let msg = key_material_msg(FileKekProvider::create(&path));
    assert!(msg.contains("does not exist"), "{msg}");
}

#[test]
fn open_missing_file_is_io() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    match FileKekProvider::open(&path) {
        Err(CryptoError::Io(e)) => {
            assert_eq!(e.kind(), io::ErrorKind::NotFound);
            assert!(e.to_string().contains("keys.json"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[cfg(unix)]
#[test]
fn open_refuses_group_or_other_access() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    FileKekProvider::create(&path).unwrap();
    for mode in [0o644, 0o640, 0o604, 0o660, 0o601, 0o610] {
        set_mode(&path, mode);
        let msg = key_material_msg(FileKekProvider::open(&path));
        assert!(msg.contains("chmod 600"), "{msg}");
        assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
    }
    set_mode(&path, 0o400);
    FileKekProvider::open(&path).unwrap();
    set_mode(&path, 0o600);
    let p = FileKekProvider::open(&path).unwrap();
    // A refresh after the file became readable by others is refused too.
    set_mode(&path, 0o644);
    let mut text = fs::read_to_string(&path).unwrap();
    text.push('\n');
    fs::write(&path, text).unwrap();
    assert!(matches!(p.refresh(), Err(CryptoError::KeyMaterial(_))));
    // The provider keeps working with what it had.
    p.primary().unwrap();
}

#[test]
fn open_refuses_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    #[cfg(unix)]
    set_mode(dir.path(), 0o700);
    let msg = key_material_msg(FileKekProvider::open(dir.path()));
    assert!(msg.contains("not a regular file"), "{msg}");
}

#[test]
fn open_refuses_malformed_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let secret = b64(&[0x11u8; 32]);
    let short = b64(&[0x11u8; 16]);
    let entry = |id: &str, state: &str, key: &str| {
        format!(
            r#"{{"id":"{id}","state":"{state}","key":"{key}","created":"2025-01-01T00:00:00Z"}}"#
        )
    };
    let file = |entries: &[String]| format!(r#"{{"version":1,"keks":[{}]}}"#, entries.join(","));
    let cases: Vec<(String, &str)> = vec![
        ("".into(), "not valid JSON"),
        ("{".into(), "not valid JSON"),
        (format!("[{}]", entry("a", "primary", &secret)), "object"),
        (file(&[]), "empty"),
        (file(&[entry("a", "retired", &secret)]), "no primary"),
        (
            file(&[
                entry("a", "primary", &secret),
                entry("b", "primary", &secret),
            ]),
            "2 primary",
        ),
        (
            file(&[
                entry("a", "primary", &secret),
                entry("a", "retired", &secret),
            ]),
            "duplicate",
        ),
        (file(&[entry("a", "primary", &short)]), "32 bytes"),
        (file(&[entry("a", "primary", "!!notbase64!!")]), "32 bytes"),
        (file(&[entry("a", "active", &secret)]), "state"),
        (file(&[entry("", "primary", &secret)]), "invalid id"),
        (file(&[entry("a b", "primary", &secret)]), "invalid id"),
        (
            format!(
                r#"{{"version":2,"keks":[{}]}}"#,
                entry("a", "primary", &secret)
            ),
            "version",
        ),
        (
            format!(r#"{{"keks":[{}]}}"#, entry("a", "primary", &secret)),
            "version",
        ),
        (
            format!(
                r#"{{"version":1,"extra":0,"keks":[{}]}}"#,
                entry("a", "primary", &secret)
            ),
            "unexpected field",
        ),
        (
            format!(r#"{{"version":1,"keks":[{{"id":"a","state":"primary","key":"{secret}"}}]}}"#),
            "created",
        ),
        (
            r#"{"version":1,"keks":[{"id":"a","state":"primary","key":1,"created":"x"}]}"#
                .to_owned(),
            "\"key\"",
        ),
        // A key in the wrong place is not echoed.
        (
            format!(
                r#"{{"version":1,"keks":[{{"id":"a","state":"{secret}","key":"{secret}","created":"x"}}]}}"#
            ),
            "state",
        ),
        (format!(r#"{{"version":"{secret}","keks":[]}}"#), "version"),
    ];
    for (text, expected) in cases {
        write_key_file(&path, &text);
        let msg = key_material_msg(FileKekProvider::open(&path));
        assert!(msg.contains(expected), "for {text:?}: {msg}");
        assert!(
            !msg.contains(&secret) && !msg.contains(&short),
            "leaks key: {msg}"
        );
    }
    // The well-formed version of the same is accepted, unpadded base64 too.
    write_key_file(&path, &file(&[entry("a", "primary", &secret)]));
    FileKekProvider::open(&path).unwrap();
    write_key_file(
        &path,
        &file(&[entry("a", "primary", secret.trim_end_matches('='))]),
    );
    let p = FileKekProvider::open(&path).unwrap();
    assert_eq!(p.primary().unwrap().key_bytes(), &[0x11u8; 32]);
}

#[test]
fn rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    FileKekProvider::create(&path).unwrap();
    let p = FileKekProvider::open(&path).unwrap();
    // Another process's view of the same file.
    let other = FileKekProvider::open(&path).unwrap();

    let old = p.primary().unwrap();
    let old_id = old.id().to_owned();
    let dek = DataKey::generate();
    let wrapped = old.wrap(&dek, "patient/7");

    let new_id = p.add_primary().unwrap();
    assert_ne!(new_id, old_id);
    assert!(new_id.starts_with("kek-") && new_id.len() == 20);
    assert_eq!(
        p.list(),
        vec![
            (old_id.clone(), KekState::Retired),
            (new_id.clone(), KekState::Primary)
        ]
    );
    assert_eq!(p.primary().unwrap().id(), new_id);
    #[cfg(unix)]
    assert_eq!(mode_of(&path), 0o600);

    // Old wrapped keys still unwrap through the retired KEK.
    let back = p
        .get(&wrapped.kek_id)
        .unwrap()
        .unwrap(&wrapped, "patient/7")
        .unwrap();
    assert_eq!(back.expose_bytes(), dek.expose_bytes());
    // The retired KEK is the same key as before.
    assert_eq!(p.get(&old_id).unwrap().key_bytes(), old.key_bytes());

    // Re-wrap under the new primary.
    let rewrapped = p.primary().unwrap().wrap(&back, "patient/7");
    assert_eq!(rewrapped.kek_id, new_id);

    // The other process: still the old primary until refreshed, but an
    // unknown id is picked up at once.
    assert_eq!(other.primary().unwrap().id(), old_id);
    let k = other.get(&new_id).unwrap();
    assert_eq!(
        k.unwrap(&rewrapped, "patient/7").unwrap().expose_bytes(),
        dek.expose_bytes()
    );
    assert_eq!(other.primary().unwrap().id(), new_id);
    let third = FileKekProvider::open(&path).unwrap();
    assert_eq!(third.primary().unwrap().id(), new_id);

    // The primary cannot be removed; nothing changes.
    let msg = key_material_msg(p.remove_retired(&[old_id.clone(), new_id.clone()]));
    assert!(msg.contains("primary"), "{msg}");
    assert_eq!(p.list().len(), 2);
    p.get(&old_id).unwrap();

    // Remove the retired KEK.
    p.remove_retired(std::slice::from_ref(&old_id)).unwrap();
    assert_eq!(p.list(), vec![(new_id.clone(), KekState::Primary)]);
    assert!(matches!(p.get(&old_id), Err(CryptoError::UnknownKek(id)) if id == old_id));
    assert!(matches!(
        FileKekProvider::open(&path).unwrap().get(&old_id),
        Err(CryptoError::UnknownKek(_))
    ));
    // Repeating is harmless.
    p.remove_retired(std::slice::from_ref(&old_id)).unwrap();

    // The other process drops it on refresh.
    other.refresh().unwrap();
    assert!(matches!(
        other.get(&old_id),
        Err(CryptoError::UnknownKek(_))
    ));
    assert_eq!(other.primary().unwrap().id(), new_id);

    #[cfg(unix)]
    assert_eq!(mode_of(&path), 0o600);
    // No temporary files left behind.
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["keys.json".to_owned()]);
}

#[test]
fn refresh_picks_up_rotation_by_another_provider() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    FileKekProvider::create(&path).unwrap();
    let a = FileKekProvider::open(&path).unwrap();
    let b = FileKekProvider::open(&path).unwrap();
    let first = a.primary().unwrap().id().to_owned();
    let second = a.add_primary().unwrap();
    let third = a.add_primary().unwrap();
    assert_eq!(b.primary().unwrap().id(), first);
    b.refresh().unwrap();
    assert_eq!(b.primary().unwrap().id(), third);
    assert_eq!(
        b.list(),
        vec![
            (first, KekState::Retired),
            (second, KekState::Retired),
            (third, KekState::Primary)
        ]
    );
    // b can rotate too, starting from the file's current content.
    let fourth = b.add_primary().unwrap();
    a.refresh().unwrap();
    assert_eq!(a.primary().unwrap().id(), fourth);
    assert_eq!(a.list().len(), 4);
}

#[test]
fn relative_path_in_current_dir() {
    // parent_dir of a bare file name is ".".
    assert_eq!(parent_dir(Path::new("keys.json")), Path::new("."));
    assert_eq!(parent_dir(Path::new("/a/keys.json")), Path::new("/a"));
}

// ----- EnvKekProvider ----------------------------------------------------

#[test]
fn env_parse_valid() {
    let k1 = b64(&[1u8; 32]);
    let k2 = b64(&[2u8; 32]);
    let p = EnvKekProvider::parse(&format!("kek-one:{k1}")).unwrap();
    assert_eq!(p.ids(), vec!["kek-one"]);
    assert_eq!(p.primary().unwrap().key_bytes(), &[1u8; 32]);

    let p =
        EnvKekProvider::parse(&format!(" new:{k2} , old:{}\n", k1.trim_end_matches('='))).unwrap();
    assert_eq!(p.ids(), vec!["new", "old"]);
    assert_eq!(p.primary().unwrap().id(), "new");
    assert_eq!(p.get("old").unwrap().key_bytes(), &[1u8; 32]);
    assert_eq!(p.get("new").unwrap().key_bytes(), &[2u8; 32]);
    assert!(matches!(p.get("nope"), Err(CryptoError::UnknownKek(_))));
    p.refresh().unwrap();

    // Wrap with one provider, unwrap with another parsed from the same value.
    let dek = DataKey::generate();
    let w = p.primary().unwrap().wrap(&dek, "x");
    let q = EnvKekProvider::parse(&format!("new:{k2}")).unwrap();
    assert_eq!(
        q.get(&w.kek_id)
            .unwrap()
            .unwrap(&w, "x")
            .unwrap()
            .expose_bytes(),
        dek.expose_bytes()
    );
    let dbg = format!("{p:?}");
    assert!(dbg.contains("new") && !dbg.contains(&k1) && !dbg.contains(&k2));
}

#[test]
fn env_parse_malformed() {
    let k = b64(&[0x42u8; 32]);
    let short = b64(&[0x42u8; 31]);
    let long = b64(&[0x42u8; 33]);
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "empty"),
        ("  \n".into(), "empty"),
        (k.clone(), "id:base64key"),
        (format!("a:{k},"), "entry 2 is empty"),
        (format!(",a:{k}"), "entry 1 is empty"),
        (format!(":{k}"), "invalid id"),
        (format!("a b:{k}"), "invalid id"),
        (format!("{}:{k}", "x".repeat(65)), "invalid id"),
        ("a:".into(), "32 bytes"),
        (format!("a:{short}"), "32 bytes"),
        (format!("a:{long}"), "32 bytes"),
        (format!("a:{k}x"), "32 bytes"),
        (format!("a:{}", k.replace('Q', "*")), "32 bytes"),
        (format!("a:{k},b:{k},a:{k}"), "entries 1 and 3"),
        // Key and id swapped: the key must not be echoed.
        (format!("{k}:a"), "invalid id"),
        (format!("{}:kek", k.trim_end_matches('=')), "32 bytes"),
    ];
    for (value, expected) in cases {
        let msg = key_material_msg(EnvKekProvider::parse(&value));
        assert!(msg.contains(expected), "for {value:?}: {msg}");
        assert!(!msg.contains(&k[..20]), "leaks key: {msg}");
    }
}

#[test]
fn env_missing_variable() {
    let var = "CUSTOS_TEST_SURELY_UNSET_KEK_VARIABLE_5f3a";
    let msg = key_material_msg(EnvKekProvider::from_env(var));
    assert!(msg.contains(var) && msg.contains("not set"), "{msg}");
}
