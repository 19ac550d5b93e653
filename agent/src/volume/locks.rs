//! Async locks by key: the volume manager's lock per pod (its setup, refresh and teardown) and
//! per CSI staging path (stage and the last user's unstage), so one pod's slow volume work
//! stalls no other pod. A key's lock lives while someone holds or awaits it and is dropped
//! after. Written by hand: a map of weak references to `tokio::sync::Mutex`, about twenty
//! lines, is less than a dependency.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OwnedMutexGuard;

/// One async mutex per key.
pub struct KeyedLocks<K> {
    locks: Mutex<BTreeMap<K, Weak<tokio::sync::Mutex<()>>>>,
}

impl<K: Ord + Clone> Default for KeyedLocks<K> {
    fn default() -> Self {
        Self {
            locks: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<K: Ord + Clone> KeyedLocks<K> {
    /// Waits for `key`'s lock.
    pub async fn lock(&self, key: &K) -> OwnedMutexGuard<()> {
        self.mutex(key).lock_owned().await
    }

    /// `key`'s lock if nobody holds it now.
    pub fn try_lock(&self, key: &K) -> Option<OwnedMutexGuard<()>> {
        self.mutex(key).try_lock_owned().ok()
    }

    fn mutex(&self, key: &K) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().expect("keyed locks");
        locks.retain(|_, m| m.strong_count() > 0);
        if let Some(m) = locks.get(key).and_then(Weak::upgrade) {
            return m;
        }
        let m = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(key.clone(), Arc::downgrade(&m));
        m
    }

    /// How many keys have a lock held or awaited.
    #[cfg(test)]
    fn live(&self) -> usize {
        let locks = self.locks.lock().expect("keyed locks");
        locks.values().filter(|m| m.strong_count() > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_key_is_exclusive_and_other_keys_are_free() {
        let locks = KeyedLocks::<String>::default();
        let a = locks.lock(&"a".to_string()).await;
        assert!(locks.try_lock(&"a".to_string()).is_none());
        let b = locks
            .try_lock(&"b".to_string())
            .expect("another key is free");
        assert_eq!(locks.live(), 2);
        drop(a);
        assert!(locks.try_lock(&"a".to_string()).is_some());
        drop(b);
        assert_eq!(locks.live(), 0, "unused locks are dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_the_lock_when_it_is_released() {
        let locks = Arc::new(KeyedLocks::<u32>::default());
        let held = locks.lock(&1).await;
        let waiter = tokio::spawn({
            let locks = locks.clone();
            async move {
                let _g = locks.lock(&1).await;
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        waiter.await.unwrap();
    }
}
