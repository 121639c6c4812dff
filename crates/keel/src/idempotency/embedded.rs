//! Idempotency records on disk, in a redb database: they survive a restart
//! of the process. Feature `embedded`.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, TableDefinition};

use super::store::{after, Begin, IdempotencyStore, Record, StoreError, StoreFuture, Token};

const RECORDS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("keel_idempotency");

/// Records in a redb file. Each call is one write transaction, committed
/// to disk before it answers, run on tokio's blocking threads. Times are
/// the wall clock's (a restart has no other clock in common with the run
/// before), so a record outlives the process that wrote it; expired
/// records are deleted in the background ([`EmbeddedStore::sweep`]).
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    notify: Arc<tokio::sync::Notify>,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens the database at `path`, creating it if missing.
    pub fn open(path: impl AsRef<Path>) -> Result<EmbeddedStore, StoreError> {
        let path = path.as_ref();
        let db = Database::create(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        // The table exists from the start, so readers never miss it.
        let tx = db.begin_write().map_err(unavailable)?;
        tx.open_table(RECORDS).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        let store = EmbeddedStore {
            db: Arc::new(db),
            notify: Arc::default(),
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweeping(Arc::downgrade(&store.db)));
        }
        Ok(store)
    }

    /// Deletes every record whose time is up (results past their `ttl`,
    /// locks past their expiry): found in read transactions, deleted in
    /// write transactions of at most 1,000 deletions; how many it deleted. Runs in the background every 30 s
    /// while the store is open in a tokio
    /// runtime, so the file stops growing at its working set (redb reuses
    /// the freed pages).
    pub fn sweep(&self) -> Result<usize, StoreError> {
        sweep(&self.db)
    }

    /// Runs `change` on the key's record in one write transaction: it gets
    /// the record and now, returns what to write (`Some(None)` deletes)
    /// and the answer.
    fn transact<'a, T: Send + 'static>(
        &'a self,
        key: &str,
        change: impl FnOnce(Option<Record>, u64) -> (Option<Option<Record>>, T) + Send + 'static,
    ) -> StoreFuture<'a, T> {
        let (db, key) = (self.db.clone(), key.to_owned());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let tx = db.begin_write().map_err(unavailable)?;
                let answer = {
                    let mut table = tx.open_table(RECORDS).map_err(unavailable)?;
                    let (write, answer) = change(read(&table, &key)?, wall_nanos());
                    match write {
                        Some(Some(record)) => {
                            table
                                .insert(key.as_str(), encode(&record).as_slice())
                                .map_err(unavailable)?;
                        }
                        Some(None) => {
                            table.remove(key.as_str()).map_err(unavailable)?;
                        }
                        None => {}
                    }
                    answer
                };
                tx.commit().map_err(unavailable)?;
                Ok(answer)
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
        })
    }
}

/// How often an open store deletes its expired records.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Deletions per sweep write transaction (each short: point deletes only).
const SWEEP_BATCH: usize = 1000;

async fn sweeping(db: std::sync::Weak<Database>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(db) = db.upgrade() else { return };
        match tokio::task::spawn_blocking(move || sweep(&db)).await {
            Ok(Ok(n)) if n > 0 => {
                tracing::debug!(target: "keel", policy = "idempotency", deleted = n, "swept expired records")
            }
            Ok(Err(e)) => {
                tracing::warn!(target: "keel", policy = "idempotency", error = %e, "could not sweep expired records")
            }
            _ => {}
        }
    }
}

/// Finds expired records in read transactions (writers go on meanwhile),
/// a batch at a time resuming after the last key seen, and deletes each
/// batch in a short write transaction that checks every record again.
fn sweep(db: &Database) -> Result<usize, StoreError> {
    let mut deleted = 0;
    let mut after: Option<String> = None;
    loop {
        let now = wall_nanos();
        let (expired, last, more) = {
            let tx = db.begin_read().map_err(unavailable)?;
            let table = tx.open_table(RECORDS).map_err(unavailable)?;
            let range = match &after {
                Some(key) => table.range::<&str>((
                    std::ops::Bound::Excluded(key.as_str()),
                    std::ops::Bound::Unbounded,
                )),
                None => table.range::<&str>(..),
            }
            .map_err(unavailable)?;
            let (mut expired, mut last, mut seen) = (Vec::new(), None, 0usize);
            for item in range {
                let (key, bytes) = item.map_err(unavailable)?;
                seen += 1;
                last = Some(key.value().to_owned());
                if until_of(bytes.value()).is_some_and(|until| until <= now) {
                    expired.push(key.value().to_owned());
                }
                if seen == SWEEP_BATCH * 10 || expired.len() == SWEEP_BATCH {
                    break;
                }
            }
            let more = seen == SWEEP_BATCH * 10 || expired.len() == SWEEP_BATCH;
            (expired, last, more)
        };
        if !expired.is_empty() {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut table = tx.open_table(RECORDS).map_err(unavailable)?;
                for key in &expired {
                    let still = table
                        .get(key.as_str())
                        .map_err(unavailable)?
                        .is_some_and(|b| until_of(b.value()).is_some_and(|u| u <= now));
                    if still {
                        table.remove(key.as_str()).map_err(unavailable)?;
                        deleted += 1;
                    }
                }
            }
            tx.commit().map_err(unavailable)?;
        }
        if !more {
            return Ok(deleted);
        }
        after = last;
    }
}

/// A record's expiry, read without decoding the rest (an unreadable record
/// is left for its key's next use to report).
fn until_of(bytes: &[u8]) -> Option<u64> {
    let until = bytes.get(1..9)?;
    matches!(bytes.first(), Some(0 | 1))
        .then(|| u64::from_le_bytes(until.try_into().unwrap_or_default()))
}

fn unavailable(e: impl fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn wall_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The key's record in `table`, if any.
fn read(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Record>, StoreError> {
    match table.get(key).map_err(unavailable)? {
        Some(bytes) => decode(bytes.value())
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt(format!("record for key {key:?}"))),
        None => Ok(None),
    }
}

/// `0 | until | token | fingerprint` or `1 | until | fp len | fingerprint | value`,
/// integers little-endian.
fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::new();
    match record {
        Record::InFlight {
            token,
            fingerprint,
            until,
        } => {
            out.push(0);
            out.extend_from_slice(&until.to_le_bytes());
            out.extend_from_slice(&token.0.to_le_bytes());
            out.extend_from_slice(fingerprint);
        }
        Record::Done {
            fingerprint,
            value,
            until,
        } => {
            out.push(1);
            out.extend_from_slice(&until.to_le_bytes());
            let len = u32::try_from(fingerprint.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(fingerprint);
            out.extend_from_slice(value);
        }
    }
    out
}

fn decode(bytes: &[u8]) -> Option<Record> {
    let (&tag, rest) = bytes.split_first()?;
    let (until, rest) = rest.split_at_checked(8)?;
    let until = u64::from_le_bytes(until.try_into().ok()?);
    match tag {
        0 => {
            let (token, fingerprint) = rest.split_at_checked(16)?;
            Some(Record::InFlight {
                token: Token(u128::from_le_bytes(token.try_into().ok()?)),
                fingerprint: fingerprint.to_vec(),
                until,
            })
        }
        1 => {
            let (len, rest) = rest.split_at_checked(4)?;
            let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
            let (fingerprint, value) = rest.split_at_checked(len)?;
            Some(Record::Done {
                fingerprint: fingerprint.to_vec(),
                value: value.to_vec(),
                until,
            })
        }
        _ => None,
    }
}

impl IdempotencyStore for EmbeddedStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a [u8],
        lock_timeout: Duration,
    ) -> StoreFuture<'a, Begin> {
        // A duplicate finds a live record in a read transaction, without a
        // write (and its sync to disk); only a claim writes.
        let (db, owned_key, fp) = (self.db.clone(), key.to_owned(), fingerprint.to_vec());
        let claim = self.transact(key, move |existing, now| {
            let (begin, record) =
                Record::begin(existing.as_ref(), now, &fp, after(now, lock_timeout));
            (record.map(Some), begin)
        });
        let fp = fingerprint;
        Box::pin(async move {
            let found = tokio::task::spawn_blocking(move || {
                let tx = db.begin_read().map_err(unavailable)?;
                read(&tx.open_table(RECORDS).map_err(unavailable)?, &owned_key)
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))??;
            let now = wall_nanos();
            if let Some(record) = found.filter(|r| r.until() > now) {
                let (begin, _) = Record::begin(Some(&record), now, fp, 0);
                return Ok(begin);
            }
            claim.await
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: Token,
        value: &'a [u8],
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        let value = value.to_vec();
        let notify = self.notify.clone();
        let done = self.transact(key, move |existing, now| {
            if !Record::held_by(existing.as_ref(), token, now) {
                return (None, false);
            }
            let record = existing.map(|r| r.completed(&value, after(now, ttl)));
            (Some(record), true)
        });
        Box::pin(async move {
            let done = done.await;
            notify.notify_waiters();
            done
        })
    }

    fn release<'a>(&'a self, key: &'a str, token: Token) -> StoreFuture<'a, ()> {
        let notify = self.notify.clone();
        let done = self.transact(key, move |existing, now| {
            let held = Record::held_by(existing.as_ref(), token, now);
            (held.then_some(None), ())
        });
        Box::pin(async move {
            let done = done.await;
            notify.notify_waiters();
            done
        })
    }

    fn extend<'a>(
        &'a self,
        key: &'a str,
        token: Token,
        lock_timeout: Duration,
    ) -> StoreFuture<'a, bool> {
        self.transact(key, move |existing, now| {
            if !Record::held_by(existing.as_ref(), token, now) {
                return (None, false);
            }
            let record = existing.map(|mut r| {
                r.renew(after(now, lock_timeout));
                r
            });
            (Some(record), true)
        })
    }

    fn changed<'a>(
        &'a self,
        _key: &'a str,
        at_most: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let _ = tokio::time::timeout(at_most, self.notify.notified()).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_encode_and_decode() {
        for record in [
            Record::InFlight {
                token: Token(7 << 70 | 3),
                fingerprint: b"POST /pay".to_vec(),
                until: 42,
            },
            Record::Done {
                fingerprint: b"fp".to_vec(),
                value: b"the answer".to_vec(),
                until: u64::MAX,
            },
            Record::Done {
                fingerprint: Vec::new(),
                value: Vec::new(),
                until: 0,
            },
        ] {
            assert_eq!(decode(&encode(&record)), Some(record));
        }
        assert_eq!(decode(b"\x01short"), None);
        assert_eq!(decode(b""), None);
    }
}
