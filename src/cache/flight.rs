//! Single flight: at most one task at a time per key, its result shared by every caller that
//! asked while it ran. The task is spawned, so callers that go away (a client disconnecting)
//! never cancel it or cause a second one; once it has finished, the next caller starts anew.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

type Pending<V> = Shared<BoxFuture<'static, Option<V>>>;

/// The flights running now, each with the id of the task that runs it.
type Running<K, V> = Arc<Mutex<HashMap<K, (u64, Pending<V>)>>>;

pub struct Flights<K, V> {
    running: Running<K, V>,
    next_id: std::sync::atomic::AtomicU64,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Flights { running: Arc::default(), next_id: Default::default(), waiting: Arc::default() }
    }
}

/// Takes a flight out of the map when its task ends, however it ends.
struct Leave<K: Eq + Hash, V> {
    map: Running<K, V>,
    key: K,
    id: u64,
}

impl<K: Eq + Hash, V> Drop for Leave<K, V> {
    fn drop(&mut self) {
        let mut running = crate::lock(&self.map);
        if running.get(&self.key).is_some_and(|(running_id, _)| *running_id == self.id) {
            running.remove(&self.key);
        }
    }
}

/// Counts a caller among those waiting, until it has its answer or goes away.
struct Waiting(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<K, V> Flights<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The result of the flight for `key`: the one running now, or a new one made by `start`.
    /// `None` only when the task panicked.
    pub async fn run<F, Fut>(&self, key: K, start: F) -> Option<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        self.waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _waiting = Waiting(self.waiting.clone());
        let pending = {
            let mut running = crate::lock(&self.running);
            match running.get(&key) {
                Some((_, pending)) => pending.clone(),
                None => {
                    let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let work = start();
                    let (map, done_key) = (self.running.clone(), key.clone());
                    let task = tokio::spawn(async move {
                        // Gone from the map before anyone sees the result (a caller that reads the
                        // store after this flight and still finds it stale starts a new one), and
                        // gone too if the work panics, so the key is never stuck.
                        let _leave = Leave { map, key: done_key, id };
                        work.await
                    });
                    let pending = task.map(Result::ok).boxed().shared();
                    running.insert(key, (id, pending.clone()));
                    pending
                }
            }
        };
        pending.await
    }

    /// Callers waiting for a flight now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Flights running now.
    pub fn len(&self) -> usize {
        crate::lock(&self.running).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_the_next_round_runs_again() {
        let flights: Arc<Flights<&'static str, usize>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let mut callers = Vec::new();
        for _ in 0..20 {
            let (flights, runs, gate) = (flights.clone(), runs.clone(), gate.clone());
            callers.push(tokio::spawn(async move {
                flights
                    .run("k", move || async move {
                        let mut gate = gate;
                        let _ = gate.wait_for(|open| *open).await;
                        runs.fetch_add(1, Ordering::SeqCst) + 1
                    })
                    .await
            }));
        }
        while flights.is_empty() {
            tokio::task::yield_now().await;
        }
        release.send_replace(true);
        for c in callers {
            assert_eq!(c.await.unwrap(), Some(1));
        }
        assert!(flights.is_empty());
        let again = flights.run("k", || async { 7 }).await;
        assert_eq!(again, Some(7));
    }

    #[tokio::test]
    async fn a_caller_that_leaves_does_not_cancel_the_flight() {
        let flights: Arc<Flights<u8, u8>> = Arc::default();
        let (release, gate) = tokio::sync::watch::channel(false);
        let first = tokio::spawn({
            let flights = flights.clone();
            let mut gate = gate.clone();
            async move {
                flights
                    .run(1, move || async move {
                        let _ = gate.wait_for(|open| *open).await;
                        5
                    })
                    .await
            }
        });
        while flights.is_empty() {
            tokio::task::yield_now().await;
        }
        first.abort();
        let second = tokio::spawn({
            let flights = flights.clone();
            async move { flights.run(1, || async { 9 }).await }
        });
        release.send_replace(true);
        assert_eq!(second.await.unwrap(), Some(5), "the second caller started its own flight");
    }
}
