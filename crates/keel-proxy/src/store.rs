//! The proxy's one `[store]`: where idempotency records and shared rate
//! limits live. Built once, and kept across reloads while its backend
//! (kind, path, url, prefix) is unchanged, so that an embedded file stays
//! open and a Redis connection stays up.

use std::fmt;
use std::sync::Arc;

use keel::idempotency::{EmbeddedStore, IdempotencyStore, MemoryStore};
use keel::rate_limit::GcraStore;
use keel::store::RedisStore;

use crate::config::{self, FieldError, StoreKind};

/// The store, as each of its users sees it.
pub(crate) struct Stores {
    pub(crate) config: config::Store,
    pub(crate) idempotency: Arc<dyn IdempotencyStore>,
    /// Only a store shared by instances (Redis) counts shared rate limits.
    pub(crate) gcra: Option<Arc<dyn GcraStore>>,
}

impl fmt::Debug for Stores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stores")
            .field("kind", &self.config.kind)
            .field("idempotency", &self.idempotency)
            .finish_non_exhaustive()
    }
}

impl Stores {
    /// Opens the store `config` describes, or takes `old`'s if it is the
    /// same backend.
    pub(crate) fn open(
        config: &config::Store,
        old: Option<&Arc<Stores>>,
    ) -> Result<Arc<Stores>, FieldError> {
        if let Some(old) = old.filter(|old| same_backend(&old.config, config)) {
            if old.config == *config {
                return Ok(old.clone());
            }
            if old.config.max_bytes != config.max_bytes {
                tracing::warn!(
                    "store.max_bytes takes effect on restart only: the records held now are kept"
                );
            }
            return Ok(Arc::new(Stores {
                config: config.clone(),
                idempotency: old.idempotency.clone(),
                gcra: old.gcra.clone(),
            }));
        }
        let (idempotency, gcra): (Arc<dyn IdempotencyStore>, Option<Arc<dyn GcraStore>>) =
            match config.kind {
                StoreKind::Memory => (
                    Arc::new(MemoryStore::with_max_bytes(
                        usize::try_from(config.max_bytes()).unwrap_or(usize::MAX),
                    )),
                    None,
                ),
                StoreKind::Embedded => {
                    let store = EmbeddedStore::open(config.path()).map_err(|e| FieldError {
                        path: "store.path".into(),
                        reason: e.to_string(),
                    })?;
                    (Arc::new(store), None)
                }
                StoreKind::Redis => {
                    let store = RedisStore::open(config.url())
                        .map_err(|e| FieldError {
                            path: "store.url".into(),
                            reason: e.reason().to_owned(),
                        })?
                        .key_prefix(config.key_prefix.clone());
                    let store = Arc::new(store);
                    (store.clone(), Some(store))
                }
            };
        Ok(Arc::new(Stores {
            config: config.clone(),
            idempotency,
            gcra,
        }))
    }
}

/// Whether two configurations name the same backend (the timeout is its
/// users' business).
fn same_backend(a: &config::Store, b: &config::Store) -> bool {
    a.kind == b.kind && a.path() == b.path() && a.url() == b.url() && a.key_prefix == b.key_prefix
}
