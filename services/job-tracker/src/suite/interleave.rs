//! A store that runs an injected action between two calls of the engine,
//! so a test can put a change exactly where a decision made over several
//! reads could miss it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use crate::kv::{Entry, KvResult, KvStore, Op};

type Action = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Armed {
    calls_left: usize,
    action: Action,
}

/// Wraps a store; [`Interleaved::after_calls`] arms an action.
pub struct Interleaved {
    inner: Arc<dyn KvStore>,
    armed: std::sync::Mutex<Option<Armed>>,
    fired: AtomicBool,
}

impl Interleaved {
    pub fn new(inner: Arc<dyn KvStore>) -> Self {
        Self {
            inner,
            armed: std::sync::Mutex::new(None),
            fired: AtomicBool::new(false),
        }
    }

    /// Runs `action` right after the `n`-th store call (1-based) from now,
    /// before that call's answer reaches the engine. The action's own calls
    /// are not counted.
    pub fn after_calls(&self, n: usize, action: impl Future<Output = ()> + Send + 'static) {
        self.fired.store(false, Ordering::SeqCst);
        *self.armed.lock().expect("hook lock") = Some(Armed {
            calls_left: n.max(1),
            action: Box::pin(action),
        });
    }

    /// Disarms the action; whether it ran.
    pub fn disarm(&self) -> bool {
        self.armed.lock().expect("hook lock").take();
        self.fired.swap(false, Ordering::SeqCst)
    }

    async fn call_done(&self) {
        let due = {
            let mut armed = self.armed.lock().expect("hook lock");
            match armed.as_mut() {
                Some(a) if a.calls_left > 1 => {
                    a.calls_left -= 1;
                    None
                }
                Some(_) => armed.take().map(|a| a.action),
                None => None,
            }
        };
        if let Some(action) = due {
            self.fired.store(true, Ordering::SeqCst);
            action.await;
        }
    }
}

#[async_trait]
impl KvStore for Interleaved {
    async fn get(&self, pk: &str, sk: &str) -> KvResult<Option<Entry>> {
        let r = self.inner.get(pk, sk).await;
        self.call_done().await;
        r
    }

    async fn query(
        &self,
        pk: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> KvResult<Vec<Entry>> {
        let r = self.inner.query(pk, prefix, after, limit).await;
        self.call_done().await;
        r
    }

    async fn transact(&self, ops: Vec<Op>) -> KvResult<()> {
        let r = self.inner.transact(ops).await;
        self.call_done().await;
        r
    }

    async fn ping(&self) -> KvResult<()> {
        self.inner.ping().await
    }
}
