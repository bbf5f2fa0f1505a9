//! The log as C2SP `tlog-tiles`: Merkle tiles (`tile/<L>/<N>[.p/<W>]`, 256
//! hashes of tree level 8·L each) and entry bundles
//! (`tile/entries/<N>[.p/<W>]`, each entry a big-endian `u16` length and the
//! leaf), read from the stored hashes and leaves, so that transparency-log
//! tooling (monitors, witnesses, `sunlight`/`tlog` clients) can follow it.
//!
//! Paths are parsed by `tlog_tiles` (Go sumdb's tile coordinates, height in
//! the path): a C2SP path is the sumdb path of height 8 without that segment.

use custos_store::{ReadTx, StoreError, StoreResult};
use tlog_tiles::Tile;

/// Hashes (or entries) per full tile: C2SP fixes the tile height at 8.
pub const TILE_WIDTH: u64 = 256;
const TILE_HEIGHT: u8 = 8;
/// Tree levels reachable by a `u64` size: level-L tiles hold level 8·L hashes.
const MAX_LEVEL: u8 = 7;

/// What a tile path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileRequest {
    /// Hashes of level `8 * level` nodes `index * 256 ..` (`width` of them).
    Hashes { level: u8, index: u64, width: u64 },
    /// Leaves `index * 256 ..` (`width` of them).
    Entries { index: u64, width: u64 },
}

impl TileRequest {
    /// Parse a C2SP path (`tile/…`); `None` if it is not a tile path.
    pub fn parse(path: &str) -> Option<TileRequest> {
        let rest = path.strip_prefix("tile/")?;
        let sumdb = match rest.strip_prefix("entries/") {
            Some(n) => format!("tile/{TILE_HEIGHT}/data/{n}"),
            None => {
                let level: u8 = rest.split('/').next()?.parse().ok()?;
                if level > MAX_LEVEL {
                    return None;
                }
                format!("tile/{TILE_HEIGHT}/{rest}")
            }
        };
        // `Tile::from_path` panics (through `Tile::new`) on a width of 0 or
        // a level of 64 and more: both are refused before it sees them.
        if let Some((_, w)) = sumdb.rsplit_once(".p/") {
            let w: u32 = w.parse().ok()?;
            if !(1..TILE_WIDTH as u32).contains(&w) {
                return None;
            }
        }
        let tile = Tile::from_path(&sumdb).ok()?;
        let width = u64::from(tile.width());
        let index = tile.level_index();
        if tile.is_data() {
            return Some(TileRequest::Entries { index, width });
        }
        Some(TileRequest::Hashes {
            level: tile.level(),
            index,
            width,
        })
    }

    /// Whether the tree of `size` leaves holds all of the tile.
    pub fn within(&self, size: u64) -> bool {
        let (complete, index, width) = match *self {
            TileRequest::Hashes {
                level,
                index,
                width,
            } => (size >> (8 * u32::from(level)), index, width),
            TileRequest::Entries { index, width } => (size, index, width),
        };
        index
            .checked_mul(TILE_WIDTH)
            .and_then(|first| first.checked_add(width))
            .is_some_and(|end| end <= complete)
    }

    /// Whether the tile is full (immutable at any later size as well).
    pub fn is_full(&self) -> bool {
        match *self {
            TileRequest::Hashes { width, .. } | TileRequest::Entries { width, .. } => {
                width == TILE_WIDTH
            }
        }
    }

    /// The tile's bytes as the log holds them now; `None` if the tree does
    /// not (yet) hold all of it.
    pub(crate) fn read(&self, tx: &mut dyn ReadTx) -> StoreResult<Option<Vec<u8>>> {
        if !self.within(tx.audit_size()?) {
            return Ok(None);
        }
        match *self {
            TileRequest::Hashes {
                level,
                index,
                width,
            } => {
                let first = index * TILE_WIDTH;
                let indexes: Vec<u64> = (first..first + width)
                    .map(|n| tlog_tiles::stored_hash_index(TILE_HEIGHT * level, n))
                    .collect();
                Ok(Some(tx.audit_hashes(&indexes)?.concat()))
            }
            TileRequest::Entries { index, width } => {
                let (start, end) = (index * TILE_WIDTH, index * TILE_WIDTH + width);
                let leaves: Vec<Vec<u8>> = tx
                    .audit_entries(start, end, width as usize)?
                    .into_iter()
                    .map(|e| e.data)
                    .collect();
                if leaves.len() as u64 != width {
                    return Err(StoreError::Backend(format!(
                        "audit entries {start}..{end} are missing"
                    )));
                }
                entry_bundle(&leaves).map(Some).ok_or_else(|| {
                    StoreError::Backend(format!(
                        "an audit entry of {start}..{end} is longer than an entry bundle allows"
                    ))
                })
            }
        }
    }
}

/// An entry bundle of `leaves`; `None` if a leaf is too long for its
/// 16-bit length prefix.
pub fn entry_bundle(leaves: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(leaves.iter().map(|l| l.len() + 2).sum());
    for leaf in leaves {
        let len = u16::try_from(leaf.len()).ok()?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(leaf);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_c2sp() {
        assert_eq!(
            TileRequest::parse("tile/0/000"),
            Some(TileRequest::Hashes {
                level: 0,
                index: 0,
                width: 256
            })
        );
        assert_eq!(
            TileRequest::parse("tile/1/x001/x234/067.p/8"),
            Some(TileRequest::Hashes {
                level: 1,
                index: 1_234_067,
                width: 8
            })
        );
        assert_eq!(
            TileRequest::parse("tile/entries/001.p/255"),
            Some(TileRequest::Entries {
                index: 1,
                width: 255
            })
        );
        for bad in [
            "tile/0/0",
            "tile/0/000.p/0",
            "tile/0/000.p/256",
            "tile/8/000",
            "tile/0/x000/001",
            "tile/entries/",
            "tiles/0/000",
            "tile/0/-01",
            "tile/0/000/",
            "tile/64/000",
            "tile/entries/000.p/0",
            "tile/entries/000.p/x",
        ] {
            assert_eq!(TileRequest::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn bounds_follow_the_tree() {
        let t = |p| TileRequest::parse(p).unwrap();
        assert!(t("tile/0/000.p/5").within(5));
        assert!(!t("tile/0/000.p/6").within(5));
        assert!(t("tile/0/000").within(256));
        assert!(!t("tile/0/001.p/1").within(256));
        assert!(t("tile/1/000.p/1").within(256));
        assert!(!t("tile/1/000.p/2").within(511));
        assert!(t("tile/1/000.p/2").within(512));
        assert!(t("tile/entries/000.p/3").within(3));
        assert!(!t("tile/7/x018/x446/x744/x073/x709/x551/615").within(u64::MAX));
    }

    proptest::proptest! {
        /// Any path is parsed or refused, never a panic; what parses has a
        /// C2SP width and is the tile whose C2SP path is the path given.
        #[test]
        fn no_path_panics(
            path in "tile/(entries|[0-9]{1,3})(/x?[0-9]{1,3}){1,7}(\\.p/[0-9]{1,4})?",
        ) {
            if let Some(t) = TileRequest::parse(&path) {
                let (level, index, width, data) = match t {
                    TileRequest::Hashes { level, index, width } => (level, index, width, false),
                    TileRequest::Entries { index, width } => (0, index, width, true),
                };
                proptest::prop_assert!((1..=TILE_WIDTH).contains(&width));
                let sumdb = Tile::new(TILE_HEIGHT, level, index, width as u32, data).path();
                let c2sp = sumdb
                    .replacen("tile/8/data/", "tile/entries/", 1)
                    .replacen("tile/8/", "tile/", 1);
                proptest::prop_assert_eq!(c2sp, path);
            }
        }
    }

    #[test]
    fn bundles_are_length_prefixed() {
        assert_eq!(
            entry_bundle(&[b"ab".to_vec(), Vec::new()]).unwrap(),
            vec![0, 2, b'a', b'b', 0, 0]
        );
        assert!(entry_bundle(&[vec![0; 70_000]]).is_none());
    }
}
