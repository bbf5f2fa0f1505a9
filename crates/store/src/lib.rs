//! Storage for Custos.
//!
//! The store keeps **sealed** resource versions, **blind** index rows and
//! **wrapped** data keys. It never sees a key-encryption key, an unwrapped
//! data key or a clear resource body: everything PHI-bearing arrives already
//! sealed or hashed by `custos-records`. Backends implement [`Store`]; the
//! [`conformance`] suite states the contract every backend must pass.
//!
//! Work is submitted as closures over a transaction ([`ReadTx`] /
//! [`WriteTx`]), so that multi-step logic (conditional create, optimistic
//! locking, a whole transaction Bundle) runs atomically on the backend
//! while the trait stays async and backend-neutral.

pub mod conformance;
mod key_seal;
mod model;
mod postgres;
mod sqlite;

pub use model::*;
pub use postgres::{MIGRATIONS, Migration, PostgresConfig, PostgresStore, is_postgres_url};
pub use sqlite::{SqliteConfig, SqliteStore, Synchronous, audit_path};

use std::any::Any;

/// A job run in a read transaction (a consistent snapshot).
pub type ReadJob = Box<dyn FnOnce(&mut dyn ReadTx) -> StoreResult<Box<dyn Any + Send>> + Send>;
/// A job run in a write transaction: all of its changes commit or none do.
pub type WriteJob = Box<dyn FnOnce(&mut dyn WriteTx) -> StoreResult<Box<dyn Any + Send>> + Send>;
/// Called with a submitted write job's result once its transaction has
/// committed (or failed): see [`Store::submit_write`].
pub type WriteDone = Box<dyn FnOnce(StoreResult<Box<dyn Any + Send>>) + Send>;

/// Where a backend's writer delivers a job's result.
pub(crate) enum WriteReply {
    /// To a task awaiting [`Store::run_write`].
    Wait(tokio::sync::oneshot::Sender<StoreResult<Box<dyn Any + Send>>>),
    /// To the callback of [`Store::submit_write`], run on the backend's commit thread.
    Call(CallOnce),
}

/// A [`WriteDone`] that is called exactly once: with the job's result, or,
/// if the job is dropped unanswered (the writer thread died), with an error,
/// so that whoever relies on the callback is never left waiting.
pub(crate) struct CallOnce(Option<WriteDone>);

impl CallOnce {
    fn call(&mut self, result: StoreResult<Box<dyn Any + Send>>) {
        if let Some(done) = self.0.take()
            && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(result))).is_err()
        {
            // Contained here, so that a callback cannot stop the writer.
            tracing::error!("a write job's completion callback panicked");
        }
    }
}

impl Drop for CallOnce {
    fn drop(&mut self) {
        self.call(Err(StoreError::Backend("writer thread stopped".into())));
    }
}

impl WriteReply {
    /// Deliver `result`.
    pub(crate) fn send(self, result: StoreResult<Box<dyn Any + Send>>) {
        match self {
            WriteReply::Wait(tx) => {
                let _ = tx.send(result);
            }
            WriteReply::Call(mut done) => done.call(result),
        }
    }

    /// A callback for [`Store::submit_write`].
    pub(crate) fn call(done: WriteDone) -> WriteReply {
        WriteReply::Call(CallOnce(Some(done)))
    }
}

/// Hand `job` to a backend's writer thread, which answers through `reply`.
/// If it cannot be queued, nothing is answered (a callback is not called):
/// the error is the answer.
pub(crate) fn queue_write(
    writer: &parking_lot::Mutex<Option<std::sync::mpsc::Sender<(WriteJob, WriteReply)>>>,
    job: WriteJob,
    reply: WriteReply,
) -> StoreResult<()> {
    let writer = writer.lock();
    let Some(sender) = writer.as_ref() else {
        defuse(reply);
        return Err(StoreError::Backend("store is closed".into()));
    };
    sender.send((job, reply)).map_err(|e| {
        defuse((e.0).1);
        StoreError::Backend("writer thread stopped".into())
    })
}

/// Drop `reply` without answering it.
fn defuse(reply: WriteReply) {
    if let WriteReply::Call(mut once) = reply {
        once.0 = None;
    }
}

/// A storage backend.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Run `job` in a read transaction.
    async fn run_read(&self, job: ReadJob) -> StoreResult<Box<dyn Any + Send>>;
    /// Run a short, bounded `job` (a lookup by key) in a read transaction.
    /// Backends may run it on the calling thread to save a thread hand-off;
    /// the default is [`Store::run_read`].
    async fn run_read_point(&self, job: ReadJob) -> StoreResult<Box<dyn Any + Send>> {
        self.run_read(job).await
    }
    /// Run `job` in a write transaction. An `Err` from the job rolls back
    /// everything it did; other jobs are unaffected.
    async fn run_write(&self, job: WriteJob) -> StoreResult<Box<dyn Any + Send>>;
    /// Queue `job` like [`Store::run_write`] without waiting for it: `done`
    /// gets its result after the commit is durable, on one of the backend's
    /// own threads (so it must be quick: wake someone, never block); if the
    /// writer stops with the job still queued, `done` gets an error. On
    /// `Err` (the store is closed) the job was not queued and `done` is not
    /// called. This spares
    /// a caller that only relays the result (the audit trail's group
    /// commit) a thread hand-off per commit.
    fn submit_write(&self, job: WriteJob, done: WriteDone) -> StoreResult<()>;
    /// The version of one system record (`0` if absent), as cheaply as the
    /// backend can tell it: asked on every request for the security epoch.
    /// The default is a point read.
    async fn sys_version(&self, kind: &str, key: &str) -> StoreResult<i64> {
        let (k, id) = (kind.to_string(), key.to_string());
        let r = self
            .run_read_point(Box::new(move |tx| {
                Ok(Box::new(
                    tx.sys_get(&k, &id)?.map(|r| r.version).unwrap_or(0),
                ))
            }))
            .await?;
        Ok(*r.downcast::<i64>().expect("the job returns an i64"))
    }
    /// A short name for logs and reports (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;
    /// Where the data lives, for logs (a path, or host/database; never a password).
    fn describe(&self) -> String {
        self.backend().to_string()
    }
    /// Campaign for a role held by one process at a time among all that
    /// share this store (`audit-leader`: signs checkpoints, publishes the
    /// audit stream, runs detection). `Some` while this process holds it;
    /// check [`Lease::held`] before acting and drop the lease to resign.
    /// A single-process backend always wins.
    async fn campaign(&self, _role: &str) -> StoreResult<Option<std::sync::Arc<dyn Lease>>> {
        Ok(Some(std::sync::Arc::new(SoleProcess)))
    }
    /// The schema migrations applied, oldest first: (version, name).
    async fn migrations(&self) -> StoreResult<Vec<(i64, String)>> {
        Ok(Vec::new())
    }
    /// Figures for metrics (connection pool use).
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
    /// Finish queued writes and stop accepting new ones.
    fn close(&self) {}
    /// Files holding the store's data (for scans and backups); empty for server databases.
    fn files(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
}

/// A role won by [`Store::campaign`].
pub trait Lease: Send + Sync {
    /// Whether the role is still held (false once the backend lost it).
    fn held(&self) -> bool;
}

/// The lease of a backend only one process uses.
struct SoleProcess;

impl Lease for SoleProcess {
    fn held(&self) -> bool {
        true
    }
}

/// Backend figures for metrics; `None` where a backend has no such thing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Open connections of the pool.
    pub pool_size: Option<u64>,
    /// Idle connections of the pool.
    pub pool_idle: Option<u64>,
    /// The pool's limit.
    pub pool_max: Option<u64>,
}

/// Typed helpers over [`Store`].
#[async_trait::async_trait]
pub trait StoreExt: Store {
    /// Run a typed read job.
    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn ReadTx) -> StoreResult<T> + Send + 'static,
    {
        let any = self
            .run_read(Box::new(move |tx| {
                f(tx).map(|t| Box::new(t) as Box<dyn Any + Send>)
            }))
            .await?;
        Ok(*any.downcast::<T>().expect("read job returns its own type"))
    }

    /// Run a typed point read (see [`Store::run_read_point`]).
    async fn read_point<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn ReadTx) -> StoreResult<T> + Send + 'static,
    {
        let any = self
            .run_read_point(Box::new(move |tx| {
                f(tx).map(|t| Box::new(t) as Box<dyn Any + Send>)
            }))
            .await?;
        Ok(*any.downcast::<T>().expect("read job returns its own type"))
    }

    /// Run a typed write job.
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn WriteTx) -> StoreResult<T> + Send + 'static,
    {
        let any = self
            .run_write(Box::new(move |tx| {
                f(tx).map(|t| Box::new(t) as Box<dyn Any + Send>)
            }))
            .await?;
        Ok(*any.downcast::<T>().expect("write job returns its own type"))
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What a callback was called with.
    type Seen = Arc<Mutex<Vec<Result<(), String>>>>;

    fn recorder() -> (WriteDone, Seen) {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        let done: WriteDone = Box::new(move |r| {
            s.lock()
                .unwrap()
                .push(r.map(drop).map_err(|e| e.to_string()));
        });
        (done, seen)
    }

    /// A callback whose job is dropped unanswered (its writer died) still
    /// hears of it, once.
    #[test]
    fn an_unanswered_callback_gets_an_error() {
        let (done, seen) = recorder();
        drop(WriteReply::call(done));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(
            seen[0]
                .as_ref()
                .unwrap_err()
                .contains("writer thread stopped")
        );
    }

    /// An answered callback is called once, with the answer.
    #[test]
    fn an_answered_callback_is_called_once() {
        let (done, seen) = recorder();
        WriteReply::call(done).send(Ok(Box::new(())));
        assert_eq!(*seen.lock().unwrap(), vec![Ok(())]);
    }

    /// A job that cannot be queued is answered by the error alone.
    #[test]
    fn a_job_not_queued_does_not_call_back() {
        let (done, seen) = recorder();
        let closed = parking_lot::Mutex::new(None);
        let job: WriteJob = Box::new(|_| Ok(Box::new(())));
        assert!(queue_write(&closed, job, WriteReply::call(done)).is_err());
        let (tx, rx) = std::sync::mpsc::channel();
        drop(rx);
        let stopped = parking_lot::Mutex::new(Some(tx));
        let (done, seen2) = recorder();
        let job: WriteJob = Box::new(|_| Ok(Box::new(())));
        assert!(queue_write(&stopped, job, WriteReply::call(done)).is_err());
        assert!(seen.lock().unwrap().is_empty());
        assert!(seen2.lock().unwrap().is_empty());
    }
}
