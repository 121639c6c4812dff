//! The atomics and locks that lock-free code in this crate uses.
//!
//! Under `--cfg keel_loom` they come from [`loom`], so the models in
//! `tests/loom_*.rs` explore every interleaving of the real code. A custom cfg
//! name (not plain `loom`) keeps tokio and other dependencies on their normal
//! code paths.

#[cfg(keel_loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicU64, AtomicU8, Ordering},
    Mutex, MutexGuard,
};
#[cfg(not(keel_loom))]
pub(crate) use std::sync::{
    atomic::{AtomicU64, AtomicU8, Ordering},
    Mutex, MutexGuard,
};

/// Locks `m`, ignoring poisoning: every critical section in keel leaves its
/// data consistent at each step, so a panic elsewhere cannot corrupt it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Backs off inside a short spin wait.
pub(crate) fn spin() {
    #[cfg(keel_loom)]
    loom::thread::yield_now();
    #[cfg(not(keel_loom))]
    std::thread::yield_now();
}
