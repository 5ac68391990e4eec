//! Locks that say when they are poisoned. A lock is poisoned when a thread
//! panicked while holding it; the data behind it may be half-changed, so the
//! work that needed it is skipped, but never silently: the first time each
//! call site meets a poisoned lock it logs an error naming that site (and
//! `troop_poisoned_locks_total` counts every time).

use std::panic::Location;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A mutex's guard, or `None` when it is poisoned (logged at the caller).
pub trait MutexExt<T: ?Sized> {
    fn locked(&self) -> Option<MutexGuard<'_, T>>;
}

/// A reader-writer lock's guards, or `None` when it is poisoned (logged at
/// the caller).
pub trait RwLockExt<T: ?Sized> {
    fn reading(&self) -> Option<RwLockReadGuard<'_, T>>;
    fn writing(&self) -> Option<RwLockWriteGuard<'_, T>>;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    #[track_caller]
    fn locked(&self) -> Option<MutexGuard<'_, T>> {
        let at = Location::caller();
        self.lock().map_err(|_| poisoned(at)).ok()
    }
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    #[track_caller]
    fn reading(&self) -> Option<RwLockReadGuard<'_, T>> {
        let at = Location::caller();
        self.read().map_err(|_| poisoned(at)).ok()
    }

    #[track_caller]
    fn writing(&self) -> Option<RwLockWriteGuard<'_, T>> {
        let at = Location::caller();
        self.write().map_err(|_| poisoned(at)).ok()
    }
}

fn poisoned(at: &'static Location<'static>) {
    use std::collections::HashSet;
    static SEEN: Mutex<Option<HashSet<(&'static str, u32)>>> = Mutex::new(None);
    metrics::counter!("troop_poisoned_locks_total").increment(1);
    let first = match SEEN.lock() {
        Ok(mut seen) => seen
            .get_or_insert_with(HashSet::new)
            .insert((at.file(), at.line())),
        Err(_) => true,
    };
    if first {
        tracing::error!(
            file = at.file(),
            line = at.line(),
            "a lock is poisoned (a thread panicked while holding it): the work that needs it is skipped"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_gives_none_and_a_sound_one_its_guard() {
        let m = std::sync::Arc::new(Mutex::new(1));
        assert_eq!(m.locked().map(|g| *g), Some(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock();
            panic!("poison it");
        })
        .join();
        assert!(m.locked().is_none());
        let rw = RwLock::new(2);
        assert_eq!(rw.reading().map(|g| *g), Some(2));
        if let Some(mut g) = rw.writing() {
            *g = 3;
        }
        assert_eq!(rw.reading().map(|g| *g), Some(3));
    }
}
