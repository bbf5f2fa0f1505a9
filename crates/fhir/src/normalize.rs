//! Text normalization for string search: case- and accent-insensitive.

/// Normalize for R4 string search: Unicode NFKD, combining marks removed,
/// lower-cased, runs of white space folded to one space, trimmed.
/// `"  Zoë  O'Brien "` → `"zoe o'brien"`.
pub fn search_string(s: &str) -> String {
    let _ = s;
    todo!("HELPER")
}
