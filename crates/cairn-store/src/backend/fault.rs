//! A decorator that fails chosen backend calls and counts requests, for tests and for
//! measuring request costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

use super::{Backend, BackendError, BlockingBackend, ObjectInfo, PutMode};

/// Which backend call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Put,
    Delete,
    Stat,
    List,
}

/// Decides, for each call, whether it fails (and how). Gets the call, the key and the
/// number of calls of that kind made before.
pub type FaultRule = Arc<dyn Fn(Op, &str, u64) -> Option<BackendError> + Send + Sync>;

/// Request counters, by kind.
#[derive(Debug, Default)]
pub struct RequestCounts {
    pub get: AtomicU64,
    pub put: AtomicU64,
    pub put_bytes: AtomicU64,
    pub delete: AtomicU64,
    pub stat: AtomicU64,
    pub list: AtomicU64,
}

impl RequestCounts {
    fn counter(&self, op: Op) -> &AtomicU64 {
        match op {
            Op::Get => &self.get,
            Op::Put => &self.put,
            Op::Delete => &self.delete,
            Op::Stat => &self.stat,
            Op::List => &self.list,
        }
    }

    /// Total requests of every kind.
    pub fn total(&self) -> u64 {
        [Op::Get, Op::Put, Op::Delete, Op::Stat, Op::List]
            .iter()
            .map(|op| self.counter(*op).load(Ordering::Relaxed))
            .sum()
    }
}

/// Wraps a backend; every call first asks the rule whether to fail.
#[derive(Clone)]
pub struct FaultBackend {
    inner: Arc<dyn Backend>,
    rule: FaultRule,
    counts: Arc<RequestCounts>,
}

impl std::fmt::Debug for FaultBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultBackend({:?})", self.inner)
    }
}

impl FaultBackend {
    pub fn new(inner: Arc<dyn Backend>, rule: FaultRule) -> Self {
        FaultBackend {
            inner,
            rule,
            counts: Arc::default(),
        }
    }

    /// A decorator that never fails, only counts.
    pub fn counting(inner: Arc<dyn Backend>) -> Self {
        Self::new(inner, Arc::new(|_, _, _| None))
    }

    pub fn counts(&self) -> Arc<RequestCounts> {
        self.counts.clone()
    }

    fn check(&self, op: Op, key: &str) -> Result<(), BackendError> {
        let n = self.counts.counter(op).fetch_add(1, Ordering::Relaxed);
        match (self.rule)(op, key, n) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl Backend for FaultBackend {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        self.check(Op::Get, key)?;
        self.inner.get(key).await
    }

    async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, BackendError> {
        self.check(Op::Get, key)?;
        self.inner.get_range(key, range).await
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), BackendError> {
        self.check(Op::Put, key)?;
        self.counts
            .put_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.inner.put(key, data, mode).await
    }

    async fn put_deferred(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.check(Op::Put, key)?;
        self.counts
            .put_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.inner.put_deferred(key, data).await
    }

    async fn flush_deferred(&self) -> Result<(), BackendError> {
        self.inner.flush_deferred().await
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.check(Op::Delete, key)?;
        self.inner.delete(key).await
    }

    async fn stat(&self, key: &str) -> Result<Option<ObjectInfo>, BackendError> {
        self.check(Op::Stat, key)?;
        self.inner.stat(key).await
    }

    async fn remove_incomplete(
        &self,
        older_than: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, BackendError> {
        self.inner.remove_incomplete(older_than).await
    }

    fn list(&self, prefix: &str) -> BoxStream<'static, Result<ObjectInfo, BackendError>> {
        if let Err(e) = self.check(Op::List, prefix) {
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        self.inner.list(prefix)
    }

    fn blocking(&self) -> Option<Arc<dyn BlockingBackend>> {
        Some(Arc::new(FaultBlocking {
            inner: self.inner.blocking()?,
            outer: self.clone(),
        }))
    }
}

/// The blocking calls of a [`FaultBackend`]'s inner backend, under the same rule and
/// counters.
#[derive(Debug)]
struct FaultBlocking {
    inner: Arc<dyn BlockingBackend>,
    outer: FaultBackend,
}

impl BlockingBackend for FaultBlocking {
    fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        self.outer.check(Op::Get, key)?;
        self.inner.get(key)
    }

    fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes, BackendError> {
        self.outer.check(Op::Get, key)?;
        self.inner.get_range(key, range)
    }

    fn exists(&self, key: &str) -> Result<bool, BackendError> {
        self.outer.check(Op::Stat, key)?;
        self.inner.exists(key)
    }

    fn put_deferred(&self, key: &str, data: &[u8]) -> Result<bool, BackendError> {
        self.outer.check(Op::Put, key)?;
        self.outer
            .counts
            .put_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.inner.put_deferred(key, data)
    }
}
