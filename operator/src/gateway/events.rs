//! Routes the store's change feed to the event streams that want each task, so an open stream wakes
//! for its own task only (with one broadcast receiver per stream, every stream would wake for every
//! change of every task).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{DynStore, TaskRecord};

/// What a watcher hears.
#[derive(Debug)]
pub enum Update {
    /// The task as just written.
    Changed(Arc<TaskRecord>),
    /// Changes may have been missed: read the task again.
    Reread,
}

/// Per-watcher buffer; a watcher that falls this far behind gets `Reread` semantics via its poll.
const WATCH_BUFFER: usize = 16;

type Watchers = HashMap<String, HashMap<u64, mpsc::Sender<Update>>>;

#[derive(Default)]
struct Inner {
    watchers: Mutex<Watchers>,
    next_key: std::sync::atomic::AtomicU64,
}

pub struct EventHub {
    inner: Arc<Inner>,
}

/// A registration for one task's updates; dropping it unregisters.
pub struct Watch {
    pub updates: mpsc::Receiver<Update>,
    id: String,
    key: u64,
    inner: Weak<Inner>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            let mut w = inner.watchers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(set) = w.get_mut(&self.id) {
                set.remove(&self.key);
                if set.is_empty() {
                    w.remove(&self.id);
                }
            }
        }
    }
}

impl EventHub {
    /// Starts the dispatcher; it stops with `shutdown` or when the store's feed closes.
    pub fn start(store: &DynStore, shutdown: CancellationToken) -> Arc<EventHub> {
        let inner = Arc::new(Inner::default());
        let mut feed = store.changes();
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    ev = feed.recv() => ev,
                };
                let Some(inner) = weak.upgrade() else { return };
                let mut w = inner.watchers.lock().unwrap_or_else(|e| e.into_inner());
                match ev {
                    Ok(ev) => {
                        if let Some(set) = w.get_mut(&ev.id) {
                            // A full buffer means a stalled client; its fallback poll catches up.
                            set.retain(|_, tx| {
                                !matches!(
                                    tx.try_send(Update::Changed(ev.task.clone())),
                                    Err(mpsc::error::TrySendError::Closed(_))
                                )
                            });
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        for set in w.values_mut() {
                            for tx in set.values() {
                                let _ = tx.try_send(Update::Reread);
                            }
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Arc::new(EventHub { inner })
    }

    /// Registers interest in one task. Register before reading the task, so no change falls between.
    pub fn watch(&self, id: &str) -> Watch {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let key = self
            .inner
            .next_key
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_default()
            .insert(key, tx);
        Watch {
            updates: rx,
            id: id.to_owned(),
            key,
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Tasks with at least one watcher (for tests and metrics).
    pub fn watched(&self) -> usize {
        self.inner
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}
