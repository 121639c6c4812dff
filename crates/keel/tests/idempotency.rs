//! Idempotency: behaviour on tokio's paused time, concurrent duplicates,
//! store failures, and the memory store against a reference model.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel::classify::Verdict;
use keel::clock::{ManualClock, TokioClock};
use keel::idempotency::{
    scoped_key, Begin, Begun, FailMode, Idempotency, IdempotencyStore, MemoryStore, OnUnknown,
    Settle, Settled, StoreError, StoreFuture, Token,
};
use keel::Error;
use proptest::prelude::*;

fn executor(store: MemoryStore) -> Idempotency {
    Idempotency::builder("payments")
        .store(store)
        .ttl(Duration::from_secs(60))
        .lock_timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

fn paused_store() -> MemoryStore {
    MemoryStore::new().clock(TokioClock::new())
}

/// An operation that counts its runs and answers `value` after `delay`.
fn counted(
    runs: &Arc<AtomicUsize>,
    delay: Duration,
    value: Result<String, String>,
) -> impl FnOnce() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> {
    let runs = runs.clone();
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            value
        })
    }
}

#[tokio::test(start_paused = true)]
async fn the_first_call_runs_and_a_later_duplicate_is_replayed() {
    let idem = executor(paused_store());
    let runs = Arc::new(AtomicUsize::new(0));
    let ok = || Ok("receipt 1".to_owned());
    let first = idem
        .call("k", b"charge 42", counted(&runs, Duration::ZERO, ok()))
        .await
        .unwrap();
    let again = idem
        .call("k", b"charge 42", counted(&runs, Duration::ZERO, ok()))
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!((first.value.as_str(), first.replayed), ("receipt 1", false));
    assert_eq!((again.value.as_str(), again.replayed), ("receipt 1", true));
    // Another key runs.
    idem.call("k2", b"charge 42", counted(&runs, Duration::ZERO, ok()))
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn twenty_concurrent_duplicates_run_once_and_share_the_result() {
    let idem = executor(paused_store());
    let runs = Arc::new(AtomicUsize::new(0));
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let (idem, runs) = (idem.clone(), runs.clone());
            tokio::spawn(async move {
                let value = Ok(format!("made by call {i}"));
                idem.call(
                    "order-7",
                    b"fp",
                    counted(&runs, Duration::from_millis(500), value),
                )
                .await
                .unwrap()
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran once");
    let first = &answers.iter().find(|a| !a.replayed).unwrap().value;
    assert!(answers.iter().all(|a| &a.value == first), "{answers:?}");
    assert_eq!(answers.iter().filter(|a| a.replayed).count(), 19);
}

#[tokio::test(start_paused = true)]
async fn the_same_key_with_another_fingerprint_is_refused() {
    let idem = executor(paused_store());
    let runs = Arc::new(AtomicUsize::new(0));
    let running = {
        let (idem, runs) = (idem.clone(), runs.clone());
        tokio::spawn(async move {
            idem.call(
                "k",
                b"charge 42",
                counted(&runs, Duration::from_secs(1), Ok("a".into())),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    // While the first runs...
    let err = idem
        .call(
            "k",
            b"charge 43",
            counted(&runs, Duration::ZERO, Ok("b".into())),
        )
        .await
        .unwrap_err();
    assert_eq!(err, Error::KeyMismatch);
    running.await.unwrap().unwrap();
    // ...and once it is stored.
    let err = idem
        .call(
            "k",
            b"charge 43",
            counted(&runs, Duration::ZERO, Ok("b".into())),
        )
        .await
        .unwrap_err();
    assert_eq!(err, Error::KeyMismatch);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_retryable_failure_releases_the_key_and_a_final_one_is_stored() {
    let idem = executor(paused_store());
    let runs = Arc::new(AtomicUsize::new(0));
    // Default classifier: every error is retryable, so "did not act".
    let err = idem
        .call(
            "k",
            b"fp",
            counted(&runs, Duration::ZERO, Err("refused".into())),
        )
        .await
        .unwrap_err();
    assert_eq!(err, Error::Inner("refused".to_owned()));
    let ok = idem
        .call(
            "k",
            b"fp",
            counted(&runs, Duration::ZERO, Ok("done".into())),
        )
        .await
        .unwrap();
    assert!(!ok.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // A classifier that says a "declined" error is final: it is stored and
    // replayed as the same error.
    let final_errors = |r: &Result<String, String>| match r {
        Err(e) if e == "declined" => Verdict::failure().with_retryable(false),
        Err(_) => Verdict::failure(),
        Ok(_) => Verdict::success(),
    };
    for _ in 0..2 {
        let err = idem
            .call_classified(
                &final_errors,
                "k2",
                b"fp",
                counted(&runs, Duration::ZERO, Err("declined".into())),
            )
            .await
            .unwrap_err();
        assert_eq!(err, Error::Inner("declined".to_owned()));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3, "the declined call ran once");
}

#[tokio::test(start_paused = true)]
async fn a_result_is_kept_for_its_ttl() {
    let idem = executor(paused_store());
    let runs = Arc::new(AtomicUsize::new(0));
    let call = || counted(&runs, Duration::ZERO, Ok("x".into()));
    idem.call("k", b"fp", call()).await.unwrap();
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(idem.call("k", b"fp", call()).await.unwrap().replayed);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(!idem.call("k", b"fp", call()).await.unwrap().replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_key_whose_holder_died_is_taken_after_the_lock_timeout() {
    let store = Arc::new(paused_store());
    let idem = Idempotency::builder("payments")
        .shared_store(store.clone())
        .lock_timeout(Duration::from_secs(3))
        .wait_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // A holder that never finishes nor renews (a killed process).
    let Begin::Acquired(_) = store
        .begin("k", b"fp", Duration::from_secs(3))
        .await
        .unwrap()
    else {
        panic!("the key was free");
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let started = tokio::time::Instant::now();
    let answer = idem
        .call(
            "k",
            b"fp",
            counted(&runs, Duration::ZERO, Ok("mine".into())),
        )
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(!answer.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_millis(3100),
        "took the key {waited:?} after the dead holder took it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_live_holder_renews_its_lock_past_the_lock_timeout() {
    let idem = Idempotency::builder("payments")
        .store(paused_store())
        .lock_timeout(Duration::from_secs(3))
        .wait_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let slow = {
        let (idem, runs) = (idem.clone(), runs.clone());
        tokio::spawn(async move {
            idem.call(
                "k",
                b"fp",
                counted(&runs, Duration::from_secs(10), Ok("slow".into())),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(7)).await;
    // Well past one lock_timeout: the duplicate still waits for the holder.
    let dup = idem
        .call("k", b"fp", counted(&runs, Duration::ZERO, Ok("dup".into())))
        .await
        .unwrap();
    assert_eq!((dup.value.as_str(), dup.replayed), ("slow", true));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(!slow.await.unwrap().unwrap().replayed);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_call_releases_its_key() {
    let idem = executor(paused_store());
    let runs = Arc::new(AtomicUsize::new(0));
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        idem.call(
            "k",
            b"fp",
            counted(&runs, Duration::from_secs(10), Ok("never".into())),
        ),
    )
    .await;
    assert!(cancelled.is_err());
    tokio::task::yield_now().await;
    let started = tokio::time::Instant::now();
    let next = idem
        .call(
            "k",
            b"fp",
            counted(&runs, Duration::ZERO, Ok("next".into())),
        )
        .await
        .unwrap();
    assert_eq!((next.value.as_str(), next.replayed), ("next", false));
    assert!(
        started.elapsed() < Duration::from_millis(10),
        "no wait for the lock"
    );
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_gives_up_after_its_wait_timeout() {
    let idem = Idempotency::builder("payments")
        .store(paused_store())
        .wait_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let _slow = {
        let (idem, runs) = (idem.clone(), runs.clone());
        tokio::spawn(async move {
            idem.call(
                "k",
                b"fp",
                counted(&runs, Duration::from_secs(20), Ok("slow".into())),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    let err = idem
        .call("k", b"fp", counted(&runs, Duration::ZERO, Ok("dup".into())))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InProgress { retry_after } if retry_after == Duration::from_secs(1)),
        "{err:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A store that is down (every call fails) or hangs (never answers).
#[derive(Debug)]
struct BrokenStore {
    hangs: bool,
}

impl BrokenStore {
    fn fail<'a, T: Send + 'a>(&self) -> StoreFuture<'a, T> {
        if self.hangs {
            Box::pin(std::future::pending())
        } else {
            Box::pin(std::future::ready(Err(StoreError::Unavailable(
                "connection refused".into(),
            ))))
        }
    }
}

impl IdempotencyStore for BrokenStore {
    fn begin<'a>(&'a self, _: &'a str, _: &'a [u8], _: Duration) -> StoreFuture<'a, Begin> {
        self.fail()
    }
    fn complete<'a>(
        &'a self,
        _: &'a str,
        _: Token,
        _: &'a [u8],
        _: Duration,
    ) -> StoreFuture<'a, bool> {
        self.fail()
    }
    fn release<'a>(&'a self, _: &'a str, _: Token) -> StoreFuture<'a, ()> {
        self.fail()
    }
    fn extend<'a>(&'a self, _: &'a str, _: Token, _: Duration) -> StoreFuture<'a, bool> {
        self.fail()
    }
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_store_fails_closed_by_default_and_open_when_told() {
    for hangs in [false, true] {
        let runs = Arc::new(AtomicUsize::new(0));
        let closed = Idempotency::builder("payments")
            .store(BrokenStore { hangs })
            .store_timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        let started = tokio::time::Instant::now();
        let err = closed
            .call("k", b"fp", counted(&runs, Duration::ZERO, Ok("x".into())))
            .await
            .unwrap_err();
        assert_eq!(err, Error::StoreUnavailable);
        assert_eq!(runs.load(Ordering::SeqCst), 0, "fail-closed runs nothing");
        let expected = if hangs {
            Duration::from_millis(200)
        } else {
            Duration::ZERO
        };
        assert_eq!(started.elapsed(), expected, "hangs: {hangs}");

        let open = Idempotency::builder("payments")
            .store(BrokenStore { hangs })
            .store_timeout(Duration::from_millis(200))
            .on_store_error(FailMode::FailOpen)
            .build()
            .unwrap();
        let answer = open
            .call("k", b"fp", counted(&runs, Duration::ZERO, Ok("x".into())))
            .await
            .unwrap();
        assert!(!answer.replayed);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "fail-open runs the call");
    }
}

#[test]
fn zero_durations_are_refused_naming_the_field() {
    let err = Idempotency::builder("p")
        .lock_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "lock_timeout");
}

#[test]
fn a_full_memory_store_forgets_results_closest_to_expiry_and_refuses_only_calls_in_flight() {
    let clock = ManualClock::new();
    // A record here: a 1-byte key, a 2-byte fingerprint, a 1-byte value,
    // and the store's 160 bytes of overhead. Room for three.
    let store = MemoryStore::with_max_bytes(3 * 164).clock(clock.clone());
    let lock = Duration::from_secs(60);
    let begin = |key: &str| futures_ready(store.begin(key, b"fp", lock));
    let token = |begun: Result<Begin, StoreError>| match begun {
        Ok(Begin::Acquired(token)) => token,
        other => panic!("{other:?}"),
    };
    let (a, b, c) = (token(begin("a")), token(begin("b")), token(begin("c")));
    assert_eq!(begin("d"), Err(StoreError::Full), "every byte is in flight");
    // A held key is still answered.
    assert!(matches!(begin("a"), Ok(Begin::InFlight { .. })));
    let ttl = Duration::from_secs(10);
    assert_eq!(futures_ready(store.complete("a", a, b"1", ttl)), Ok(true));
    clock.advance(Duration::from_secs(1));
    assert_eq!(futures_ready(store.complete("b", b, b"2", ttl)), Ok(true));
    // d takes a's room: a's result expires first.
    let d = token(begin("d"));
    assert!(matches!(begin("b"), Ok(Begin::Done { .. })));
    assert!(
        matches!(begin("a"), Ok(Begin::Acquired(_))),
        "a was forgotten"
    );
    assert_eq!(
        begin("e"),
        Err(StoreError::Full),
        "b went for a; c, d, a run"
    );
    assert_eq!(store.len(), 3);
    // Expired results go as time passes, before anything is evicted.
    assert_eq!(
        futures_ready(store.complete("c", c, b"3", Duration::from_secs(1))),
        Ok(true)
    );
    assert_eq!(
        futures_ready(store.complete("d", d, b"4", Duration::from_secs(100))),
        Ok(true)
    );
    clock.advance(Duration::from_secs(2));
    let _e = token(begin("e"));
    assert!(matches!(begin("d"), Ok(Begin::Done { .. })), "d outlives c");
    assert!(store.bytes() <= 3 * 164);
}

/// Completing or releasing one key wakes the duplicates waiting for that
/// key, not every waiter in the store.
#[test]
fn a_change_wakes_only_that_keys_waiters() {
    let store = MemoryStore::new();
    let lock = Duration::from_secs(60);
    let Ok(Begin::Acquired(a)) = futures_ready(store.begin("a", b"fp", lock)) else {
        panic!()
    };
    let Ok(Begin::Acquired(b)) = futures_ready(store.begin("b", b"fp", lock)) else {
        panic!()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut waiting_a = tokio_test::task::spawn(store.changed("a", Duration::from_secs(60)));
    let mut waiting_b = tokio_test::task::spawn(store.changed("b", Duration::from_secs(60)));
    tokio_test::assert_pending!(waiting_a.poll());
    tokio_test::assert_pending!(waiting_b.poll());
    futures_ready(store.complete("b", b, b"done", lock)).unwrap();
    assert!(waiting_b.is_woken());
    assert!(!waiting_a.is_woken(), "a's waiter slept through b's change");
    tokio_test::assert_ready!(waiting_b.poll());
    futures_ready(store.release("a", a)).unwrap();
    assert!(waiting_a.is_woken());
    // A key that is not in flight is answered at once.
    let mut settled = tokio_test::task::spawn(store.changed("b", Duration::from_secs(60)));
    tokio_test::assert_ready!(settled.poll());
}

/// A detached call runs to its end and keeps its result when its caller
/// stops waiting: the duplicate gets the replay, and the operation ran
/// once.
#[tokio::test(start_paused = true)]
async fn a_detached_call_outlives_its_caller_and_is_replayed() {
    let idem = Idempotency::builder("payments")
        .store(paused_store())
        .execution_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let store_all = |_: &Result<String, String>| Settle::Store;
    let first = tokio::time::timeout(
        Duration::from_secs(1),
        idem.call_detached(
            "k",
            b"fp",
            store_all,
            counted(&runs, Duration::from_secs(5), Ok("charged".into())),
        ),
    )
    .await;
    assert!(first.is_err(), "the caller gave up first");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let again = idem
        .call_detached(
            "k",
            b"fp",
            store_all,
            counted(&runs, Duration::ZERO, Ok("again".into())),
        )
        .await
        .unwrap();
    assert_eq!((again.value.as_str(), again.replayed), ("charged", true));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Past its execution timeout a call's outcome is unknown: with
/// `Conflict` the key is kept (duplicates are refused until the record
/// expires), with `Release` the next one runs.
#[tokio::test(start_paused = true)]
async fn an_unknown_outcome_keeps_or_frees_the_key_as_configured() {
    for (on_unknown, runs_again) in [(OnUnknown::Conflict, false), (OnUnknown::Release, true)] {
        let idem = Idempotency::builder("payments")
            .store(paused_store())
            .ttl(Duration::from_secs(60))
            .execution_timeout(Duration::from_secs(2))
            .on_unknown(on_unknown)
            .build()
            .unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let store_all = |_: &Result<String, String>| Settle::Store;
        let first = idem
            .call_detached(
                "k",
                b"fp",
                store_all,
                counted(&runs, Duration::from_secs(10), Ok("late".into())),
            )
            .await;
        assert!(matches!(first, Err(Error::Timeout { .. })), "{first:?}");
        let dup = idem
            .call_detached(
                "k",
                b"fp",
                store_all,
                counted(&runs, Duration::ZERO, Ok("dup".into())),
            )
            .await;
        if runs_again {
            assert_eq!(dup.unwrap().value, "dup");
        } else {
            assert_eq!(dup, Err(Error::OutcomeUnknown));
            tokio::time::sleep(Duration::from_secs(61)).await;
            let later = idem
                .call_detached(
                    "k",
                    b"fp",
                    store_all,
                    counted(&runs, Duration::ZERO, Ok("later".into())),
                )
                .await;
            assert_eq!(later.unwrap().value, "later", "the record expired");
        }
    }
}

/// A result that ran but was not kept refuses duplicates; a release lets
/// the next one run.
#[tokio::test(start_paused = true)]
async fn settled_outcomes_decide_what_a_duplicate_gets() {
    let idem = executor(paused_store());
    let Ok(Begun::Run(claim)) = idem.begin("big", b"fp").await else {
        panic!()
    };
    claim.settle(Settled::NotReplayable).await;
    assert!(matches!(
        idem.begin("big", b"fp").await,
        Err(Error::NotReplayable)
    ));
    let Ok(Begun::Run(claim)) = idem.begin("free", b"fp").await else {
        panic!()
    };
    claim.settle(Settled::Released).await;
    assert!(matches!(idem.begin("free", b"fp").await, Ok(Begun::Run(_))));
}

/// A result too large for the store is kept as "not replayable": the
/// operation ran, so its key must not run again.
#[tokio::test(start_paused = true)]
async fn a_result_too_large_for_the_store_keeps_its_key() {
    let idem = executor(MemoryStore::with_max_bytes(4096).clock(TokioClock::new()));
    let Ok(Begun::Run(small)) = idem.begin("small", b"fp").await else {
        panic!()
    };
    small.complete(b"kept").await;
    let Ok(Begun::Run(claim)) = idem.begin("k", b"fp").await else {
        panic!()
    };
    claim.complete(&[0u8; 8192]).await;
    assert!(matches!(
        idem.begin("k", b"fp").await,
        Err(Error::NotReplayable)
    ));
    // It could never fit: nothing was forgotten trying.
    assert!(matches!(idem.begin("small", b"fp").await, Ok(Begun::Replay(v)) if v == b"kept"));
}

#[test]
fn scoped_keys_bind_a_principal_without_keeping_it() {
    let alice = scoped_key("order-1", [&b"Bearer alice"[..]]);
    let bob = scoped_key("order-1", [&b"Bearer bob"[..]]);
    assert_ne!(alice, bob);
    assert_eq!(alice, scoped_key("order-1", [&b"Bearer alice"[..]]));
    assert!(!alice.contains("alice"));
    assert!(alice.ends_with("~order-1"));
    assert_eq!(scoped_key("order-1", std::iter::empty()), "order-1");
    // Values are length-prefixed: moving bytes between them is another scope.
    assert_ne!(
        scoped_key("k", [&b"ab"[..], &b"c"[..]]),
        scoped_key("k", [&b"a"[..], &b"bc"[..]])
    );
    // Stable across processes and versions: the first bytes of SHA-256.
    assert_eq!(
        scoped_key("k", [&b""[..]]),
        "af5570f5a1810b7af78caf4bc70a660f~k"
    );
}

/// The memory store answers at once; this takes that answer.
fn futures_ready<T>(fut: StoreFuture<'_, T>) -> Result<T, StoreError> {
    tokio_test::block_on(fut)
}

/// Operations on the store, for the model test.
#[derive(Debug, Clone)]
enum Op {
    Begin { key: u8, fp: u8 },
    Complete { key: u8, holder: usize, value: u8 },
    Release { key: u8, holder: usize },
    Extend { key: u8, holder: usize },
    Advance { ms: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3u8, 0..2u8).prop_map(|(key, fp)| Op::Begin { key, fp }),
        2 => (0..3u8, 0..8usize, any::<u8>()).prop_map(|(key, holder, value)| Op::Complete { key, holder, value }),
        1 => (0..3u8, 0..8usize).prop_map(|(key, holder)| Op::Release { key, holder }),
        1 => (0..3u8, 0..8usize).prop_map(|(key, holder)| Op::Extend { key, holder }),
        2 => (0..1500u16).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// The reference: per key, who holds it until when, or the stored value
/// until when, on a plain clock in milliseconds.
#[derive(Debug, Clone, PartialEq)]
enum Model {
    Held { holder: usize, fp: u8, until: u64 },
    Done { fp: u8, value: u8, until: u64 },
}

const LOCK_MS: u64 = 1000;
const TTL_MS: u64 = 3000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn the_memory_store_matches_a_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        let clock = ManualClock::new();
        let store = MemoryStore::new().clock(clock.clone());
        let mut model: HashMap<u8, Model> = HashMap::new();
        let mut now = 0u64;
        // Tokens handed out, by holder number (the model's name for them).
        let mut tokens: Vec<(u8, Token)> = Vec::new();
        let lock = Duration::from_millis(LOCK_MS);
        for op in ops {
            match op {
                Op::Advance { ms } => {
                    clock.advance(Duration::from_millis(u64::from(ms)));
                    now += u64::from(ms);
                }
                Op::Begin { key, fp } => {
                    let got = futures_ready(store.begin(&key.to_string(), &[fp], lock)).unwrap();
                    let live = model.get(&key).filter(|m| match m {
                        Model::Held { until, .. } | Model::Done { until, .. } => *until > now,
                    });
                    match (live.cloned(), got) {
                        (None, Begin::Acquired(token)) => {
                            tokens.push((key, token));
                            model.insert(key, Model::Held { holder: tokens.len() - 1, fp, until: now + LOCK_MS });
                        }
                        (Some(Model::Held { fp: held, .. }), Begin::InFlight { fingerprint }) => {
                            prop_assert_eq!(fingerprint, vec![held]);
                        }
                        (Some(Model::Done { fp: done, value, .. }), Begin::Done { fingerprint, value: got }) => {
                            prop_assert_eq!(fingerprint, vec![done]);
                            prop_assert_eq!(got, vec![value]);
                        }
                        (expected, got) => prop_assert!(false, "model {:?}, store {:?}", expected, got),
                    }
                }
                Op::Complete { key, holder, value } => {
                    let Some(&(_, token)) = tokens.get(holder) else { continue };
                    let stored = futures_ready(store.complete(&key.to_string(), token, &[value], Duration::from_millis(TTL_MS))).unwrap();
                    let holds = matches!(model.get(&key), Some(Model::Held { holder: h, until, .. }) if *h == holder && *until > now);
                    prop_assert_eq!(stored, holds);
                    if holds {
                        let Some(Model::Held { fp, .. }) = model.get(&key).cloned() else { unreachable!() };
                        model.insert(key, Model::Done { fp, value, until: now + TTL_MS });
                    }
                }
                Op::Release { key, holder } => {
                    let Some(&(_, token)) = tokens.get(holder) else { continue };
                    futures_ready(store.release(&key.to_string(), token)).unwrap();
                    if matches!(model.get(&key), Some(Model::Held { holder: h, until, .. }) if *h == holder && *until > now) {
                        model.remove(&key);
                    }
                }
                Op::Extend { key, holder } => {
                    let Some(&(_, token)) = tokens.get(holder) else { continue };
                    let renewed = futures_ready(store.extend(&key.to_string(), token, lock)).unwrap();
                    let holds = matches!(model.get(&key), Some(Model::Held { holder: h, until, .. }) if *h == holder && *until > now);
                    prop_assert_eq!(renewed, holds);
                    if let (true, Some(Model::Held { until, .. })) = (holds, model.get_mut(&key)) {
                        *until = now + LOCK_MS;
                    }
                }
            }
        }
    }
}

#[cfg(feature = "embedded")]
mod embedded {
    use super::*;
    use keel::idempotency::EmbeddedStore;

    /// A database file of its own, removed at the end.
    struct TempDb(std::path::PathBuf);

    impl TempDb {
        fn new(name: &str) -> TempDb {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            TempDb(
                std::env::temp_dir()
                    .join(format!("keel-{name}-{}-{nanos}.redb", std::process::id())),
            )
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn executor(store: EmbeddedStore) -> Idempotency {
        Idempotency::builder("payments")
            .store(store)
            .build()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn twenty_concurrent_duplicates_run_once() {
        let db = TempDb::new("concurrent");
        let idem = executor(EmbeddedStore::open(&db.0).unwrap());
        let runs = Arc::new(AtomicUsize::new(0));
        let calls: Vec<_> = (0..20)
            .map(|i| {
                let (idem, runs) = (idem.clone(), runs.clone());
                tokio::spawn(async move {
                    let value = Ok(format!("made by call {i}"));
                    idem.call(
                        "order-7",
                        b"fp",
                        counted(&runs, Duration::from_millis(50), value),
                    )
                    .await
                    .unwrap()
                })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap());
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran once");
        assert!(
            answers.iter().all(|a| a.value == answers[0].value),
            "{answers:?}"
        );
        assert_eq!(answers.iter().filter(|a| a.replayed).count(), 19);
    }

    /// Expired records are deleted, so the file holds the working set
    /// only; live ones stay.
    #[tokio::test]
    async fn a_sweep_deletes_expired_records_and_keeps_live_ones() {
        let db = TempDb::new("sweep");
        let store = EmbeddedStore::open(&db.0).unwrap();
        let lock = Duration::from_secs(60);
        for (key, ttl) in [("old-1", 1), ("old-2", 1), ("live", 3_600_000)] {
            let Begin::Acquired(token) = store.begin(key, b"fp", lock).await.unwrap() else {
                panic!()
            };
            let ttl = Duration::from_millis(ttl);
            assert!(store.complete(key, token, b"v", ttl).await.unwrap());
        }
        // The wall clock's millisecond passes.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(store.sweep().unwrap(), 2);
        assert_eq!(store.sweep().unwrap(), 0);
        assert!(matches!(
            store.begin("live", b"fp", lock).await.unwrap(),
            Begin::Done { .. }
        ));
    }

    #[tokio::test]
    async fn a_stored_result_is_replayed_after_a_restart() {
        let db = TempDb::new("restart");
        let runs = Arc::new(AtomicUsize::new(0));
        {
            let idem = executor(EmbeddedStore::open(&db.0).unwrap());
            let first = idem
                .call(
                    "k",
                    b"fp",
                    counted(&runs, Duration::ZERO, Ok("first".into())),
                )
                .await
                .unwrap();
            assert!(!first.replayed);
            // A failure releases its key: nothing of it survives.
            idem.call(
                "k2",
                b"fp",
                counted(&runs, Duration::ZERO, Err("down".into())),
            )
            .await
            .unwrap_err();
        }
        // The database closed with the executor and its store: a restart.
        let idem = executor(EmbeddedStore::open(&db.0).unwrap());
        let again = idem
            .call(
                "k",
                b"fp",
                counted(&runs, Duration::ZERO, Ok("second".into())),
            )
            .await
            .unwrap();
        assert_eq!((again.value.as_str(), again.replayed), ("first", true));
        let err = idem
            .call(
                "k",
                b"other",
                counted(&runs, Duration::ZERO, Ok("x".into())),
            )
            .await
            .unwrap_err();
        assert_eq!(err, Error::KeyMismatch);
        let k2 = idem
            .call(
                "k2",
                b"fp",
                counted(&runs, Duration::ZERO, Ok("ran".into())),
            )
            .await
            .unwrap();
        assert!(!k2.replayed);
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn an_unopenable_file_is_an_error_naming_it() {
        let err = EmbeddedStore::open("/nonexistent-dir/keel.redb").unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-dir/keel.redb"),
            "{err}"
        );
    }
}

/// A claim marked for work that may have reached the dependency records an
/// unknown outcome when dropped unsettled (a panic, a cancelled task),
/// instead of freeing the key for a second run.
#[tokio::test(start_paused = true)]
async fn a_claim_dropped_after_its_work_started_leaves_the_outcome_unknown() {
    let idem = executor(paused_store());
    let Ok(Begun::Run(mut claim)) = idem.begin("k", b"fp").await else {
        panic!()
    };
    claim.unknown_if_dropped();
    drop(claim);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(matches!(
        idem.begin("k", b"fp").await,
        Err(Error::OutcomeUnknown)
    ));
}
