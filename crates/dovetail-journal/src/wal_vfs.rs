//! A VFS shim that hands SQLite's write-ahead log to the kernel one commit
//! at a time.
//!
//! SQLite writes each WAL frame with two `pwrite`s, its 24-byte header and
//! then the page, so a commit of 17 frames costs 34 system calls before its
//! fsync. On the journal writer they were a fifth of the thread's time. This
//! shim wraps the default VFS and, for `-wal` files only, gathers writes
//! that continue one another into a buffer, which goes down as a single
//! write when SQLite syncs the file (the commit), reads it, asks its size,
//! truncates, controls or closes it, or when a write does not continue the
//! buffer or would grow it past [`GATHER_LIMIT`]. Every other file, and
//! every other call, goes straight to the wrapped VFS.
//!
//! This is sound only where a commit's frames are synced before other
//! connections can see them: SQLite appends a commit to the shared WAL index
//! after its `xSync`, so under `synchronous = FULL` nothing is ever visible
//! that is still in the buffer. Two cases break that, so the shim is not
//! used there:
//! - `synchronous = NORMAL` or `OFF` syncs no commit: [`SqliteJournal`]
//!   opens its writer through the shim only when it fsyncs every commit;
//! - a database without powersafe overwrite (`psow=0`, or a device without
//!   it) makes SQLite pad the WAL to a sector and write the tail after the
//!   sync: its `-wal` file is passed through ungathered. SQLite reads this
//!   from the database file, so the shim does too.
//!
//! Frames SQLite wrote and then abandoned (a cache spill in a transaction
//! that rolled back) are still in the buffer when the transaction ends, and
//! another writer may then write its commit where they lie. So the shim
//! links each gathering `-wal` file to its database file, and writes what is
//! left before the database file lets go of the WAL write lock (`xShmLock`,
//! or `xUnlock` in exclusive locking mode): the file then holds what it would
//! have held without the shim, while no other writer can be at work.
//!
//! A write the shim passes down that fails has lost frames SQLite believes
//! written. The failure sticks to the file until the write lock is let go:
//! every later read, write and sync of it fails, so the transaction cannot
//! commit and rolls back. Reads report it as an I/O error, which makes
//! SQLite roll the whole transaction back (a "disk full" from a read would
//! undo only the statement and let the transaction go on).
//!
//! Durability is unchanged: nothing is promised before `xSync` returns, and
//! the buffer is written before the wrapped `xSync` runs. A crash before then
//! loses exactly the frames a crash between SQLite's own writes would have.
//!
//! [`SqliteJournal`]: crate::SqliteJournal

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name connections open the shim by.
pub(crate) const NAME: &CStr = c"dovetail-wal-gather";

/// The most a `-wal` file keeps back before it writes: a commit of a
/// thousand records is about 250 pages.
const GATHER_LIMIT: usize = 1 << 20;

/// The most one write passes down: the unix VFS keeps only the low 17 bits
/// of a write's length (`nBuf &= 0x1ffff`, SQLite itself never writing more
/// than a 64 KiB page and its header), so a longer buffer goes in pieces.
const MOST_PER_WRITE: usize = 0x1f000;

/// Registers the shim over the default VFS, once per process. `Err` holds
/// SQLite's result code when it could not be.
pub(crate) fn register() -> Result<(), c_int> {
    static REGISTERED: OnceLock<Result<(), c_int>> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        // SAFETY: `sqlite3_vfs_find(NULL)` returns the default VFS, which
        // SQLite never frees. The shim is leaked, so it outlives every
        // connection, as `sqlite3_vfs_register` requires.
        unsafe {
            let real = ffi::sqlite3_vfs_find(ptr::null());
            if real.is_null() {
                return Err(ffi::SQLITE_ERROR);
            }
            let size = c_int::try_from(REAL_AT).map_err(|_| ffi::SQLITE_ERROR)?;
            let shim = Box::leak(Box::new(ffi::sqlite3_vfs {
                iVersion: (*real).iVersion.min(2),
                szOsFile: size + (*real).szOsFile,
                mxPathname: (*real).mxPathname,
                pNext: ptr::null_mut(),
                zName: NAME.as_ptr(),
                pAppData: real.cast(),
                xOpen: Some(open),
                xDelete: Some(delete),
                xAccess: Some(access),
                xFullPathname: Some(full_pathname),
                xDlOpen: Some(dl_open),
                xDlError: Some(dl_error),
                xDlSym: Some(dl_sym),
                xDlClose: Some(dl_close),
                xRandomness: Some(randomness),
                xSleep: Some(sleep),
                xCurrentTime: Some(current_time),
                xGetLastError: Some(get_last_error),
                xCurrentTimeInt64: Some(current_time_int64),
                xSetSystemCall: None,
                xGetSystemCall: None,
                xNextSystemCall: None,
            }));
            match ffi::sqlite3_vfs_register(shim, 0) {
                ffi::SQLITE_OK => Ok(()),
                rc => Err(rc),
            }
        }
    })
}

/// The shim's file: SQLite's header, the wrapped VFS's file (in the same
/// allocation, right after this struct) and, for a gathered `-wal` file,
/// the writes kept back.
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    /// A gathering `-wal` file's buffer; null for every other file.
    gathered: *mut Gathered,
    /// A database file's gathering `-wal` file while it is open, else null.
    wal: *mut File,
}

/// Where the wrapped VFS's file starts in the shim's: `File` rounded up so
/// that it is aligned for the 64-bit fields it holds on any target.
const REAL_AT: usize = size_of::<File>().next_multiple_of(16);

/// Writes kept back: `buf` belongs at `start` in the file.
struct Gathered {
    start: i64,
    buf: Vec<u8>,
    /// The result of a write passed down that failed, until the write lock
    /// is let go; `SQLITE_OK` otherwise.
    failed: c_int,
    /// The database file, whose `wal` points back here.
    db: *mut File,
}

/// Calls the wrapped VFS's method `$m` (with the wrapped VFS first), or
/// yields `$missing` if it has none. Inside `unsafe`, on the shim's VFS.
macro_rules! to_vfs {
    ($vfs:expr, $m:ident, $missing:expr $(, $arg:expr)*) => {{
        let rv = real_vfs($vfs);
        match (*rv).$m {
            Some(f) => f(rv $(, $arg)*),
            None => $missing,
        }
    }};
}

/// Calls the wrapped file's method `$m` (with the wrapped file first), or
/// yields `$missing` if it has none. Inside `unsafe`, on a file the shim
/// opened.
macro_rules! to_file {
    ($file:expr, $m:ident, $missing:expr $(, $arg:expr)*) => {{
        let (real, m) = real($file);
        match (*m).$m {
            Some(f) => f(real $(, $arg)*),
            None => $missing,
        }
    }};
}

/// The wrapped VFS.
///
/// # Safety
/// `vfs` is the shim registered by [`register`].
unsafe fn real_vfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    unsafe { (*vfs).pAppData.cast() }
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite hands us `szOsFile` bytes at `file`, room for a `File`
    // followed by the wrapped VFS's file.
    unsafe {
        let shim = file.cast::<File>();
        let real = file.cast::<u8>().add(REAL_AT).cast::<ffi::sqlite3_file>();
        let blank = ffi::sqlite3_file { pMethods: ptr::null() };
        ptr::write(shim, File { base: blank, real, gathered: ptr::null_mut(), wal: ptr::null_mut() });
        (*real).pMethods = ptr::null();
        let rc = to_vfs!(vfs, xOpen, ffi::SQLITE_CANTOPEN, name, real, flags, out_flags);
        let methods = (*real).pMethods;
        if rc != ffi::SQLITE_OK || methods.is_null() {
            if !methods.is_null() {
                to_file!(file, xClose, ffi::SQLITE_OK);
            }
            return if rc == ffi::SQLITE_OK { ffi::SQLITE_CANTOPEN } else { rc };
        }
        (*shim).base.pMethods = match (*methods).iVersion {
            ..=1 => &METHODS_V1,
            2 => &METHODS_V2,
            _ => &METHODS_V3,
        };
        if flags & ffi::SQLITE_OPEN_WAL != 0 {
            let db = database_of(name);
            // SQLite pads a commit to a sector when the *database* file lacks
            // powersafe overwrite, and writes the padding after the sync.
            if !db.is_null() && device_characteristics(db.cast()) & ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE != 0 {
                let g = Gathered { start: 0, buf: Vec::new(), failed: ffi::SQLITE_OK, db };
                (*shim).gathered = Box::into_raw(Box::new(g));
                (*db).wal = shim;
            }
        }
        ffi::SQLITE_OK
    }
}

/// The shim's database file that the `-wal` file `name` belongs to, or null
/// if SQLite's database file is not one of the shim's.
///
/// # Safety
/// `name` is the name SQLite passed to `xOpen` for a `-wal` file.
unsafe fn database_of(name: ffi::sqlite3_filename) -> *mut File {
    unsafe {
        let db = ffi::sqlite3_database_file_object(name);
        let ours = |m: *const ffi::sqlite3_io_methods| {
            ptr::eq(m, &METHODS_V1) || ptr::eq(m, &METHODS_V2) || ptr::eq(m, &METHODS_V3)
        };
        if db.is_null() || !ours((*db).pMethods) { ptr::null_mut() } else { db.cast() }
    }
}

unsafe extern "C" fn delete(vfs: *mut ffi::sqlite3_vfs, name: *const c_char, sync_dir: c_int) -> c_int {
    unsafe { to_vfs!(vfs, xDelete, ffi::SQLITE_IOERR_DELETE, name, sync_dir) }
}

unsafe extern "C" fn access(vfs: *mut ffi::sqlite3_vfs, name: *const c_char, flags: c_int, out: *mut c_int) -> c_int {
    unsafe { to_vfs!(vfs, xAccess, ffi::SQLITE_IOERR_ACCESS, name, flags, out) }
}

unsafe extern "C" fn full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    unsafe { to_vfs!(vfs, xFullPathname, ffi::SQLITE_CANTOPEN, name, n, out) }
}

unsafe extern "C" fn dl_open(vfs: *mut ffi::sqlite3_vfs, name: *const c_char) -> *mut c_void {
    unsafe { to_vfs!(vfs, xDlOpen, ptr::null_mut(), name) }
}

unsafe extern "C" fn dl_error(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) {
    unsafe { to_vfs!(vfs, xDlError, (), n, out) }
}

type DlSym = unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char);

unsafe extern "C" fn dl_sym(vfs: *mut ffi::sqlite3_vfs, handle: *mut c_void, symbol: *const c_char) -> Option<DlSym> {
    unsafe { to_vfs!(vfs, xDlSym, None, handle, symbol) }
}

unsafe extern "C" fn dl_close(vfs: *mut ffi::sqlite3_vfs, handle: *mut c_void) {
    unsafe { to_vfs!(vfs, xDlClose, (), handle) }
}

unsafe extern "C" fn randomness(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    unsafe { to_vfs!(vfs, xRandomness, 0, n, out) }
}

unsafe extern "C" fn sleep(vfs: *mut ffi::sqlite3_vfs, micros: c_int) -> c_int {
    unsafe { to_vfs!(vfs, xSleep, 0, micros) }
}

unsafe extern "C" fn current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    unsafe { to_vfs!(vfs, xCurrentTime, ffi::SQLITE_ERROR, out) }
}

unsafe extern "C" fn get_last_error(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    unsafe { to_vfs!(vfs, xGetLastError, 0, n, out) }
}

unsafe extern "C" fn current_time_int64(vfs: *mut ffi::sqlite3_vfs, out: *mut ffi::sqlite3_int64) -> c_int {
    unsafe {
        if (*real_vfs(vfs)).iVersion >= 2 {
            to_vfs!(vfs, xCurrentTimeInt64, ffi::SQLITE_ERROR, out)
        } else {
            ffi::SQLITE_ERROR
        }
    }
}

/// The methods of a file the shim opened, one table per version the
/// wrapped file may have: SQLite reads which calls exist from `iVersion`.
const fn methods(version: c_int) -> ffi::sqlite3_io_methods {
    ffi::sqlite3_io_methods {
        iVersion: version,
        xClose: Some(close),
        xRead: Some(read),
        xWrite: Some(write),
        xTruncate: Some(truncate),
        xSync: Some(sync),
        xFileSize: Some(file_size),
        xLock: Some(lock),
        xUnlock: Some(unlock),
        xCheckReservedLock: Some(check_reserved_lock),
        xFileControl: Some(file_control),
        xSectorSize: Some(sector_size),
        xDeviceCharacteristics: Some(device_characteristics),
        xShmMap: Some(shm_map),
        xShmLock: Some(shm_lock),
        xShmBarrier: Some(shm_barrier),
        xShmUnmap: Some(shm_unmap),
        xFetch: Some(fetch),
        xUnfetch: Some(unfetch),
    }
}

static METHODS_V1: ffi::sqlite3_io_methods = methods(1);
static METHODS_V2: ffi::sqlite3_io_methods = methods(2);
static METHODS_V3: ffi::sqlite3_io_methods = methods(3);

/// The wrapped file and its methods.
///
/// # Safety
/// `file` was opened by the shim's `open` and is not closed.
unsafe fn real(file: *mut ffi::sqlite3_file) -> (*mut ffi::sqlite3_file, *const ffi::sqlite3_io_methods) {
    unsafe {
        let real = (*file.cast::<File>()).real;
        (real, (*real).pMethods)
    }
}

/// Writes what `file` kept back, if anything, and empties the buffer. A
/// failure sticks (see the module's documentation) and is returned.
///
/// # Safety
/// As [`real`].
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let Some(g) = (*file.cast::<File>()).gathered.as_mut() else { return ffi::SQLITE_OK };
        if g.failed != ffi::SQLITE_OK || g.buf.is_empty() {
            return g.failed;
        }
        let mut at = g.start;
        for chunk in g.buf.chunks(MOST_PER_WRITE) {
            // `MOST_PER_WRITE` keeps both within range.
            let len = c_int::try_from(chunk.len()).unwrap_or(c_int::MAX);
            g.failed = match injected_failure() {
                Some(rc) => rc,
                None => to_file!(file, xWrite, ffi::SQLITE_IOERR_WRITE, chunk.as_ptr().cast(), len, at),
            };
            if g.failed != ffi::SQLITE_OK {
                break;
            }
            at += i64::try_from(chunk.len()).unwrap_or(i64::MAX);
        }
        g.buf.clear();
        g.failed
    }
}

/// A failure a test asked for, in place of the next write passed down.
#[cfg(test)]
use tally::passed_down as injected_failure;

#[cfg(not(test))]
const fn injected_failure() -> Option<c_int> {
    None
}

/// Runs `then` after writing what `file` kept back. If that write failed,
/// now or before in this transaction, `then` does not run and the result is
/// `SQLITE_IOERR_WRITE`: an I/O error rolls the transaction back whole.
///
/// # Safety
/// As [`real`].
unsafe fn flushed(file: *mut ffi::sqlite3_file, then: impl FnOnce() -> c_int) -> c_int {
    match unsafe { flush(file) } {
        ffi::SQLITE_OK => then(),
        _ => ffi::SQLITE_IOERR_WRITE,
    }
}

/// The database file `file` is letting go of the WAL write lock: what its
/// `-wal` file still holds (frames of a rolled-back transaction) goes to
/// the file now, while no other writer can be at work, and a failure no
/// longer sticks. A failed write here is of frames no commit refers to.
///
/// # Safety
/// As [`real`].
unsafe fn end_of_writes(file: *mut ffi::sqlite3_file) {
    unsafe {
        let wal = (*file.cast::<File>()).wal;
        if wal.is_null() {
            return;
        }
        flush(wal.cast());
        if let Some(g) = (*wal).gathered.as_mut() {
            g.failed = ffi::SQLITE_OK;
            g.buf.clear();
        }
    }
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let flushed = flush(file);
        let rc = to_file!(file, xClose, ffi::SQLITE_OK);
        let shim = file.cast::<File>();
        if !(*shim).gathered.is_null() {
            let g = Box::from_raw((*shim).gathered);
            (*shim).gathered = ptr::null_mut();
            if ptr::eq((*g.db).wal, shim) {
                (*g.db).wal = ptr::null_mut();
            }
        }
        if flushed != ffi::SQLITE_OK { flushed } else { rc }
    }
}

unsafe extern "C" fn read(file: *mut ffi::sqlite3_file, out: *mut c_void, amount: c_int, offset: i64) -> c_int {
    unsafe { flushed(file, || to_file!(file, xRead, ffi::SQLITE_IOERR_READ, out, amount, offset)) }
}

unsafe extern "C" fn write(file: *mut ffi::sqlite3_file, data: *const c_void, amount: c_int, offset: i64) -> c_int {
    unsafe {
        let pass = || to_file!(file, xWrite, ffi::SQLITE_IOERR_WRITE, data, amount, offset);
        // A raw pointer, not a reference: `flush` reaches the same buffer.
        let g = (*file.cast::<File>()).gathered;
        if g.is_null() {
            return pass();
        }
        if (*g).failed != ffi::SQLITE_OK {
            return (*g).failed;
        }
        let Ok(len @ 1..) = usize::try_from(amount) else { return pass() };
        let held = (*g).buf.len();
        let end = (*g).start.saturating_add(i64::try_from(held).unwrap_or(i64::MAX));
        if held > 0 && (offset != end || held + len > GATHER_LIMIT) {
            let rc = flush(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        if len > GATHER_LIMIT {
            return pass();
        }
        if (*g).buf.is_empty() {
            (*g).start = offset;
        }
        (*g).buf.extend_from_slice(std::slice::from_raw_parts(data.cast::<u8>(), len));
        #[cfg(test)]
        tally::gathered();
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    unsafe { flushed(file, || to_file!(file, xTruncate, ffi::SQLITE_IOERR_TRUNCATE, size)) }
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    unsafe {
        // A failed write keeps its own code here ("disk full"): it fails the
        // commit, which SQLite rolls back whole.
        match flush(file) {
            ffi::SQLITE_OK => {
                to_file!(file, xSync, ffi::SQLITE_IOERR_FSYNC, flags)
            }
            rc => rc,
        }
    }
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, out: *mut i64) -> c_int {
    unsafe { flushed(file, || to_file!(file, xFileSize, ffi::SQLITE_IOERR_FSTAT, out)) }
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe { to_file!(file, xLock, ffi::SQLITE_IOERR_LOCK, level) }
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe {
        // In exclusive locking mode there is no shared-memory lock to let go.
        end_of_writes(file);
        to_file!(file, xUnlock, ffi::SQLITE_IOERR_UNLOCK, level)
    }
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    unsafe { to_file!(file, xCheckReservedLock, ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, out) }
}

unsafe extern "C" fn file_control(file: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    unsafe { flushed(file, || to_file!(file, xFileControl, ffi::SQLITE_NOTFOUND, op, arg)) }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe { to_file!(file, xSectorSize, 4096) }
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe { to_file!(file, xDeviceCharacteristics, 0) }
}

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    unsafe { to_file!(file, xShmMap, ffi::SQLITE_IOERR_SHMMAP, page, size, extend, out) }
}

/// The WAL write lock's slot among the shared-memory locks (`WAL_WRITE_LOCK`).
const WAL_WRITE_LOCK: c_int = 0;

unsafe extern "C" fn shm_lock(file: *mut ffi::sqlite3_file, offset: c_int, n: c_int, flags: c_int) -> c_int {
    unsafe {
        if flags & ffi::SQLITE_SHM_UNLOCK != 0 && offset <= WAL_WRITE_LOCK && WAL_WRITE_LOCK < offset.saturating_add(n)
        {
            end_of_writes(file);
        }
        to_file!(file, xShmLock, ffi::SQLITE_IOERR_SHMLOCK, offset, n, flags)
    }
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    unsafe { to_file!(file, xShmBarrier, ()) }
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    unsafe { to_file!(file, xShmUnmap, ffi::SQLITE_OK, delete) }
}

unsafe extern "C" fn fetch(file: *mut ffi::sqlite3_file, offset: i64, amount: c_int, out: *mut *mut c_void) -> c_int {
    unsafe {
        flushed(file, || {
            if (*real(file).1).iVersion < 3 {
                *out = ptr::null_mut();
                return ffi::SQLITE_OK;
            }
            to_file!(file, xFetch, ffi::SQLITE_OK, offset, amount, out)
        })
    }
}

unsafe extern "C" fn unfetch(file: *mut ffi::sqlite3_file, offset: i64, p: *mut c_void) -> c_int {
    unsafe {
        if (*real(file).1).iVersion < 3 {
            return ffi::SQLITE_OK;
        }
        to_file!(file, xUnfetch, ffi::SQLITE_OK, offset, p)
    }
}

/// Per-thread counts of gathered and passed-down writes, for the tests: the
/// writes happen on the thread that runs the statement.
#[cfg(test)]
mod tally {
    use std::cell::Cell;

    thread_local! {
        static COUNTS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
        static FAIL_NEXT: Cell<Option<std::ffi::c_int>> = const { Cell::new(None) };
    }

    pub(super) fn gathered() {
        COUNTS.with(|c| c.set((c.get().0 + 1, c.get().1)));
    }

    /// Counts a write passed down; `Some(code)` if the test made it fail.
    pub(super) fn passed_down() -> Option<std::ffi::c_int> {
        COUNTS.with(|c| c.set((c.get().0, c.get().1 + 1)));
        FAIL_NEXT.with(Cell::take)
    }

    /// The next write passed down on this thread fails with `code`.
    pub(super) fn fail_next(code: std::ffi::c_int) {
        FAIL_NEXT.with(|f| f.set(Some(code)));
    }

    /// (writes SQLite made to `-wal` files, writes the shim passed down) on this thread so far.
    pub(super) fn take() -> (u64, u64) {
        COUNTS.with(|c| c.replace((0, 0)))
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, OpenFlags};

    use super::*;

    fn shim_connection(path: &std::path::Path) -> Connection {
        register().unwrap();
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let conn = Connection::open_with_flags_and_vfs(path, flags, NAME).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL)").unwrap();
        conn
    }

    #[test]
    fn each_commit_reaches_the_wal_in_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = shim_connection(&dir.path().join("j.db"));
        tally::take();
        let commits = 20;
        for c in 0..commits {
            let tx = conn.transaction().unwrap();
            for i in 0..50 {
                tx.execute("INSERT INTO t (id, body) VALUES (?1, zeroblob(900))", [c * 100 + i]).unwrap();
            }
            tx.commit().unwrap();
        }
        let (made, passed) = tally::take();
        // Fifty rows of 900 bytes fill a dozen pages: two writes a frame.
        assert!(made >= commits as u64 * 20, "SQLite made only {made} writes to the WAL");
        assert_eq!(passed, commits as u64, "{made} writes went down as {passed}, not one per commit");
    }

    #[test]
    fn another_connection_sees_every_commit_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let writer = shim_connection(&path);
        // Checkpoints every few commits, so the WAL restarts from its header.
        writer.pragma_update(None, "wal_autocheckpoint", 20).unwrap();
        let reader = Connection::open(&path).unwrap();
        for i in 0..200 {
            writer.execute("INSERT INTO t (id, body) VALUES (?1, randomblob(3000))", [i]).unwrap();
            let (n, last): (i64, i64) =
                reader.query_row("SELECT COUNT(*), MAX(id) FROM t", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
            assert_eq!((n, last), (i + 1, i));
        }
        let (made, passed) = tally::take();
        assert!(passed < made, "nothing was gathered: {made} writes, {passed} passed down");
        drop(writer);
        let n: i64 = reader.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 200);
    }

    #[test]
    fn a_commit_larger_than_one_write_arrives_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let mut writer = shim_connection(&path);
        let reader = Connection::open(&path).unwrap();
        tally::take();
        for c in 0..3 {
            let tx = writer.transaction().unwrap();
            // About 300 KiB: the unix VFS takes under 128 KiB a write.
            for i in 0..100 {
                tx.execute("INSERT INTO t (id, body) VALUES (?1, randomblob(3000))", [c * 1000 + i]).unwrap();
            }
            tx.commit().unwrap();
            let digest = |conn: &Connection| -> (i64, i64) {
                conn.query_row("SELECT COUNT(*), SUM(unicode(hex(body)) + length(body)) FROM t", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .unwrap()
            };
            assert_eq!(digest(&reader), digest(&writer));
            assert_eq!(digest(&reader).0, (c + 1) * 100);
        }
        let (made, passed) = tally::take();
        assert!(passed >= 3 * 3 && passed < made / 10, "{made} writes went down as {passed}");
    }

    /// Inserts rows 1 to `n` in one transaction, each body made by `body`.
    fn fill(conn: &Connection, n: i64, body: &str) {
        let sql = format!(
            "WITH RECURSIVE n(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM n WHERE value < ?1)
             INSERT INTO t (id, body) SELECT value, {body} FROM n"
        );
        conn.execute(&sql, [n]).unwrap();
    }

    /// What the file holds, as a fresh connection (and a recovery) reads it.
    fn rows_in(path: &std::path::Path) -> (i64, i64) {
        let conn = Connection::open(path).unwrap();
        let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(ok, "ok");
        conn.query_row("SELECT COUNT(*), COALESCE(SUM(length(body)), 0) FROM t", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
    }

    /// A transaction's spilled frames, rolled back, must not land on what
    /// another writer committed after it.
    #[test]
    fn frames_of_a_rolled_back_transaction_never_cover_a_later_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let writer = shim_connection(&path);
        fill(&writer, 400, "zeroblob(1000)");
        writer.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA cache_size = 20").unwrap();
        // The update spills pages to the WAL before it is rolled back.
        writer.execute_batch("BEGIN; UPDATE t SET body = zeroblob(1500); ROLLBACK").unwrap();
        let (made, _) = tally::take();
        assert!(made > 0, "the transaction spilled nothing to the WAL");
        let other = Connection::open(&path).unwrap();
        other.execute_batch("UPDATE t SET body = zeroblob(700) WHERE id <= 100").unwrap();
        // The writer reads again: a flush now would cover the other's commit.
        let n: i64 = writer.query_row("SELECT COUNT(*) FROM t WHERE length(body) = 700", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 100);
        assert_eq!(rows_in(&path), (400, 300 * 1000 + 100 * 700));
    }

    /// A write passed down that fails loses frames SQLite thinks written:
    /// the transaction must not commit, and the file stays whole.
    #[test]
    fn a_failed_write_fails_the_rest_of_its_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let writer = shim_connection(&path);
        fill(&writer, 400, "zeroblob(1000)");
        writer.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA cache_size = 20; BEGIN").unwrap();
        writer.execute_batch("UPDATE t SET body = zeroblob(1500) WHERE id <= 200").unwrap();
        // Reading the spilled pages back writes them first, and that fails.
        tally::fail_next(ffi::SQLITE_FULL);
        // A statement that may change many rows: SQLite could undo just it
        // and keep the transaction, which must not happen here.
        let read = writer.execute("UPDATE t SET body = zeroblob(1200)", []);
        assert!(read.is_err(), "the statement went on after the failed write: {read:?}");
        // Rolled back whole: a transaction still open could commit frames
        // whose bytes were never written.
        assert!(writer.is_autocommit(), "the transaction outlived the failed write");
        assert_eq!(rows_in(&path), (400, 400 * 1000), "the failed transaction left a trace");
        // The next transaction starts clean.
        writer.execute_batch("UPDATE t SET body = zeroblob(10) WHERE id > 390").unwrap();
        assert_eq!(rows_in(&path), (400, 390 * 1000 + 10 * 10));
    }

    #[test]
    fn a_database_without_powersafe_overwrite_is_not_gathered() {
        register().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let uri = format!("file:{}?psow=0", path.display());
        let writer = Connection::open_with_flags_and_vfs(&uri, rusqlite::OpenFlags::default(), NAME).unwrap();
        writer.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL").unwrap();
        writer.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL)").unwrap();
        tally::take();
        let reader = Connection::open(&path).unwrap();
        for i in 0..20 {
            writer.execute("INSERT INTO t (id, body) VALUES (?1, zeroblob(5000))", [i]).unwrap();
            let n: i64 = reader.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0)).unwrap();
            assert_eq!(n, i + 1);
        }
        assert_eq!(tally::take(), (0, 0), "writes to a padded WAL were gathered");
    }

    #[test]
    fn a_commit_past_the_gather_limit_arrives_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let writer = shim_connection(&path);
        tally::take();
        // About 1.6 MiB of frames in one commit.
        fill(&writer, 400, "randomblob(4000)");
        let (made, passed) = tally::take();
        assert!(made > 2 * 400 && passed < made / 20, "{made} writes went down as {passed}");
        assert_eq!(rows_in(&path), (400, 400 * 4000));
    }

    #[test]
    fn a_reopened_file_holds_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let writer = shim_connection(&path);
        for i in 0..50 {
            writer.execute("INSERT INTO t (id, body) VALUES (?1, randomblob(5000))", [i]).unwrap();
        }
        // The WAL is left behind as after a crash: no checkpoint on close.
        std::mem::forget(writer);
        let copy = dir.path().join("copy.db");
        std::fs::copy(&path, &copy).unwrap();
        std::fs::copy(dir.path().join("j.db-wal"), dir.path().join("copy.db-wal")).unwrap();
        let reopened = Connection::open(&copy).unwrap();
        let n: i64 = reopened.query_row("SELECT COUNT(*) FROM t WHERE length(body) = 5000", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 50);
    }
}
