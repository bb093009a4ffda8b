//! The watch plumbing both controllers share: a reflector per kind feeding a cache, every
//! event waking the controller's one loop, and the tasks stopped with the loop.
//!
//! ```text
//!  watcher(kind) ─► reflector(store writer) ─► backoff ─► wake.notify_one() ─► loop pass
//!  AbortOnDrop: the loop ends (leadership lost, run() dropped) ─► every watch task aborted
//! ```

use std::{hash::Hash, sync::Arc, time::Duration};

use futures::{Stream, StreamExt, future::BoxFuture};
use kube::{
    Resource,
    runtime::{
        WatchStreamExt,
        reflector::{
            self,
            store::{Writer, WriterDropped},
        },
        watcher,
    },
};
use tokio::{sync::Notify, task::JoinHandle};

/// Aborts the watch tasks when the loop that owns them ends.
pub struct AbortOnDrop(pub Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Keeps `writer`'s cache filled from `events` (retried with backoff) and wakes the loop on
/// every change. `kind` names the watch in logs.
pub fn spawn_reflector<K, S>(
    writer: Writer<K>,
    events: S,
    wake: Arc<Notify>,
    kind: &'static str,
) -> JoinHandle<()>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let stream = reflector::reflector(writer, events)
        .default_backoff()
        .touched_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                tracing::warn!(kind, error = %e, "watch failed; retrying with backoff");
            }
            wake.notify_one();
        }
    })
}

/// How long a loop waits after its `failures`-th failed pass in a row (200 ms doubling, at
/// most 12.8 s).
pub fn failure_backoff(failures: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << failures.min(6)))
}

/// Sleeps until `wake` fires or `wait` passes, then lets a burst of watch events settle so
/// it becomes one pass.
pub async fn next_pass(wake: &Notify, wait: Duration) {
    tokio::select! {
        () = wake.notified() => {}
        () = tokio::time::sleep(wait) => {}
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Waits until every cache listed in `waits` holds its first full list. False when a watch
/// ended before that (logged, naming `loop_name`): the loop must not decide from empty caches.
pub async fn caches_filled(
    waits: Vec<BoxFuture<'_, Result<(), WriterDropped>>>,
    loop_name: &'static str,
) -> bool {
    for ready in waits {
        if ready.await.is_err() {
            tracing::error!(
                loop_name,
                "a watch ended before its cache filled; the loop stops"
            );
            return false;
        }
    }
    tracing::info!(loop_name, "caches filled");
    true
}
