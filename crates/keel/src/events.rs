//! Subscriptions to what policies do.
//!
//! A policy keeps a [`Listeners`] list; listeners are called synchronously on
//! the thread that caused the event, outside of any lock the policy holds, so
//! a listener may call back into the policy. Keep them quick: hand the event
//! to a channel if there is real work to do.

use std::fmt;
use std::sync::{Arc, Mutex};

type Listener<E> = Arc<dyn Fn(&E) + Send + Sync>;

/// A list of callbacks for events of type `E`.
pub struct Listeners<E> {
    list: Mutex<Arc<Vec<Listener<E>>>>,
}

impl<E> Default for Listeners<E> {
    fn default() -> Self {
        Listeners {
            list: Mutex::new(Arc::new(Vec::new())),
        }
    }
}

impl<E> fmt::Debug for Listeners<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listeners")
            .field("count", &self.snapshot().len())
            .finish()
    }
}

impl<E> Listeners<E> {
    /// Adds a listener.
    pub fn add(&self, listener: impl Fn(&E) + Send + Sync + 'static) {
        let mut guard = self.list.lock().unwrap_or_else(|p| p.into_inner());
        let mut next: Vec<Listener<E>> = guard.as_ref().clone();
        next.push(Arc::new(listener));
        *guard = Arc::new(next);
    }

    fn snapshot(&self) -> Arc<Vec<Listener<E>>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Calls every listener with `event`.
    pub fn emit(&self, event: &E) {
        for l in self.snapshot().iter() {
            l(event);
        }
    }
}
