//! SQLite allocates through mimalloc, like the rest of the process.
//!
//! The bundled SQLite calls glibc `malloc` by default and keeps memory
//! statistics behind one process-wide mutex on every allocation, which its
//! writer thread and every reading connection share. In the ingest profile
//! glibc's `malloc`/`free` and that mutex were about a seventh of the SQLite
//! writer's time. SQLite's documented hook (`SQLITE_CONFIG_MALLOC`) takes an
//! allocator's functions; these forward to mimalloc, which needs no lock.

use std::ffi::{c_int, c_void};

use rusqlite::ffi;

unsafe extern "C" fn malloc(n: c_int) -> *mut c_void {
    // SQLite never asks for a negative size; mimalloc aligns to 16 bytes
    // (SQLite needs 8).
    unsafe { libmimalloc_sys::mi_malloc(n.max(0) as usize) }
}

unsafe extern "C" fn free(p: *mut c_void) {
    unsafe { libmimalloc_sys::mi_free(p) }
}

unsafe extern "C" fn realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    unsafe { libmimalloc_sys::mi_realloc(p, n.max(0) as usize) }
}

/// The usable size of an allocation (SQLite may use all of it).
unsafe extern "C" fn size(p: *mut c_void) -> c_int {
    let n = unsafe { libmimalloc_sys::mi_usable_size(p) };
    c_int::try_from(n).unwrap_or(c_int::MAX)
}

unsafe extern "C" fn roundup(n: c_int) -> c_int {
    n.saturating_add(7) & !7
}

unsafe extern "C" fn init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn shutdown(_: *mut c_void) {}

/// Point SQLite at mimalloc and turn off its allocation statistics (the
/// global mutex). Must run before the first connection opens, i.e. before
/// SQLite initializes; later it changes nothing and says so.
pub fn install() -> anyhow::Result<()> {
    let methods = ffi::sqlite3_mem_methods {
        xMalloc: Some(malloc),
        xFree: Some(free),
        xRealloc: Some(realloc),
        xSize: Some(size),
        xRoundup: Some(roundup),
        xInit: Some(init),
        xShutdown: Some(shutdown),
        pAppData: std::ptr::null_mut(),
    };
    // SAFETY: both calls run before SQLite is initialized (no connection
    // exists yet); SQLite copies `methods`, whose functions live forever.
    let (stats, alloc) = unsafe {
        (
            ffi::sqlite3_config(ffi::SQLITE_CONFIG_MEMSTATUS, 0 as c_int),
            ffi::sqlite3_config(
                ffi::SQLITE_CONFIG_MALLOC,
                &methods as *const ffi::sqlite3_mem_methods,
            ),
        )
    };
    if stats != ffi::SQLITE_OK || alloc != ffi::SQLITE_OK {
        anyhow::bail!("SQLite was already initialized (codes {stats}, {alloc})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hooks_allocate_resize_and_free() {
        unsafe {
            let p = malloc(100) as *mut u8;
            assert!(!p.is_null() && (p as usize).is_multiple_of(8));
            assert!(size(p.cast()) >= 100);
            for i in 0..100 {
                *p.add(i) = i as u8;
            }
            let q = realloc(p.cast(), 10_000) as *mut u8;
            assert!(size(q.cast()) >= 10_000);
            assert!((0..100).all(|i| *q.add(i) == i as u8));
            free(q.cast());
            assert_eq!(roundup(1), 8);
            assert_eq!(roundup(16), 16);
            assert_eq!(roundup(c_int::MAX), c_int::MAX & !7);
        }
    }
}
