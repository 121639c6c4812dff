//! Behaviour of the semaphore bulkhead, on tokio's paused clock.

use std::collections::VecDeque;
use std::time::Duration;

use keel::bulkhead::{Bulkhead, BulkheadConfig, BulkheadLayer, OwnedPermit};
use keel::{Error, Pipeline};
use proptest::prelude::*;
use tokio_test::task::{spawn, Spawn};
use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok};

const MS: Duration = Duration::from_millis(1);

fn bulkhead(max_concurrent: u32, max_queue: u32, queue_timeout: Duration) -> Bulkhead {
    Bulkhead::builder("dep")
        .max_concurrent(max_concurrent)
        .max_queue(max_queue)
        .queue_timeout(queue_timeout)
        .build()
        .unwrap()
}

#[test]
fn seats_are_bounded_and_released_on_drop() {
    let b = bulkhead(2, 0, Duration::ZERO);
    let first = b.try_acquire().unwrap();
    let second = b.try_acquire_owned().unwrap();
    let full = b.try_acquire().unwrap_err();
    assert_eq!(
        full.to_string(),
        "bulkhead dep is full: every seat is taken and no place to wait was free in time"
    );
    assert_eq!(b.metrics().in_use, 2);
    assert_eq!(b.metrics().rejected, 1);
    drop(first);
    assert_eq!(b.metrics().in_use, 1);
    drop(second);
    assert_eq!(b.metrics().available, 2);
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_arrival_order() {
    let b = bulkhead(1, 3, 10 * MS);
    let held = b.try_acquire_owned().unwrap();
    let mut waiters: Vec<Spawn<_>> = (0..3).map(|_| spawn(b.acquire_owned())).collect();
    for w in &mut waiters {
        assert_pending!(w.poll());
    }
    assert_eq!(b.metrics().waiting, 3);
    // try_acquire never jumps the queue.
    drop(held);
    assert!(b.try_acquire().is_err());
    let mut order = Vec::new();
    for _ in 0..3 {
        let i = waiters
            .iter_mut()
            .position(|w| w.is_woken())
            .expect("the first in line is woken");
        let seat = assert_ready_ok!(waiters[i].poll());
        order.push(i);
        drop(seat);
    }
    assert_eq!(order, [0, 1, 2]);
    assert_eq!(b.metrics().waiting, 0);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_rejects_at_once() {
    let b = bulkhead(1, 1, 10 * MS);
    let _held = b.try_acquire().unwrap();
    let mut waiter = spawn(b.acquire());
    assert_pending!(waiter.poll());
    let mut second = spawn(b.acquire());
    assert_ready_err!(second.poll());
    assert_eq!(b.metrics().rejected, 1);
}

#[tokio::test(start_paused = true)]
async fn waiting_ends_after_queue_timeout_and_frees_the_place() {
    let b = bulkhead(1, 1, 100 * MS);
    let _held = b.try_acquire().unwrap();
    let mut waiter = spawn(b.acquire());
    assert_pending!(waiter.poll());
    tokio::time::advance(99 * MS).await;
    assert_pending!(waiter.poll());
    tokio::time::advance(MS).await;
    assert_ready_err!(waiter.poll());
    drop(waiter);
    assert_eq!(b.metrics().waiting, 0);
    assert_eq!(b.metrics().rejected, 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_call_leaks_neither_seat_nor_place() {
    let b = bulkhead(1, 1, Duration::from_secs(60));
    // Cancelled while running: the seat comes back.
    let mut running = spawn(b.call(std::future::pending::<Result<(), ()>>));
    assert_pending!(running.poll());
    assert_eq!(b.metrics().in_use, 1);
    // Cancelled while waiting: the place comes back.
    let mut queued = spawn(b.acquire());
    assert_pending!(queued.poll());
    assert_eq!(b.metrics().waiting, 1);
    drop(queued);
    assert_eq!(b.metrics().waiting, 0);
    drop(running);
    assert_eq!(b.metrics().in_use, 0);
    assert!(b.try_acquire().is_ok());
}

#[tokio::test(start_paused = true)]
async fn the_pipeline_step_and_tower_layer_share_the_seats() {
    use tower::{Service, ServiceExt};

    let b = bulkhead(1, 0, Duration::ZERO);
    let pipeline = Pipeline::builder().bulkhead(b.clone()).build();
    let mut svc = tower::ServiceBuilder::new()
        .layer(BulkheadLayer::new(b.clone()))
        .service_fn(|()| async { Ok::<_, std::io::Error>("ok") });

    // The pipeline holds the only seat while its call runs.
    let mut call = spawn(pipeline.call(std::future::pending::<Result<(), ()>>));
    assert_pending!(call.poll());
    // The service stays ready; the call is refused as the call's result.
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(matches!(err, Error::BulkheadFull), "{err:?}");
    assert!(matches!(
        pipeline.call(|| async { Ok::<_, ()>(()) }).await,
        Err(Error::BulkheadFull)
    ));
    drop(call);
    assert_eq!(svc.ready().await.unwrap().call(()).await.unwrap(), "ok");
    assert_eq!(b.metrics().in_use, 0);
}

#[tokio::test(start_paused = true)]
async fn the_tower_layer_waits_in_poll_ready_when_a_queue_is_configured() {
    let b = bulkhead(1, 1, 50 * MS);
    let held = b.try_acquire_owned().unwrap();
    let mut svc = tower_test::mock::Spawn::new(
        tower::ServiceBuilder::new()
            .layer(BulkheadLayer::new(b.clone()))
            .service_fn(|()| async { Ok::<_, std::io::Error>(1) }),
    );
    assert_pending!(svc.poll_ready());
    assert_eq!(b.metrics().waiting, 1);
    drop(held);
    assert_ready_ok!(svc.poll_ready());
    let response = svc.call(());
    assert_eq!(b.metrics().in_use, 1);
    assert_eq!(response.await.unwrap(), 1);
    assert_eq!(b.metrics().in_use, 0);
    assert_ready_ok!(svc.poll_ready());
}

#[test]
fn configuration_is_data_and_errors_name_the_field() {
    let config: BulkheadConfig = toml::from_str(
        r#"
        max_concurrent = 10
        max_queue = 0
        queue_timeout = "0ms"
        "#,
    )
    .unwrap();
    assert_eq!(config.max_concurrent, 10);
    config.build("payment").unwrap();

    let unknown = toml::from_str::<BulkheadConfig>("max_concurent = 10").unwrap_err();
    assert!(
        unknown
            .to_string()
            .contains("unknown field `max_concurent`"),
        "{unknown}"
    );
    let bad_duration = toml::from_str::<BulkheadConfig>(r#"queue_timeout = "soon""#).unwrap_err();
    assert!(
        bad_duration.to_string().contains("is not a duration"),
        "{bad_duration}"
    );

    let zero = BulkheadConfig {
        max_concurrent: 0,
        ..BulkheadConfig::default()
    };
    assert_eq!(zero.build("x").unwrap_err().field(), "max_concurrent");
    let queue_without_time = BulkheadConfig {
        max_queue: 3,
        ..BulkheadConfig::default()
    };
    let err = queue_without_time.build("x").unwrap_err();
    assert_eq!(err.field(), "queue_timeout");
    assert_eq!(
        err.to_string(),
        "queue_timeout: must be longer than zero when max_queue is 3 (a queue nobody may wait in)"
    );
}

// ---- property: no leak, no over-admission ------------------------------------

#[derive(Debug, Clone, Copy)]
enum Op {
    TryAcquire,
    Acquire,
    Release(usize),
    CancelWaiter(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::TryAcquire),
        3 => Just(Op::Acquire),
        3 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::CancelWaiter),
        1 => (0u64..40).prop_map(Op::Advance),
    ]
}

type Waiter = Spawn<
    std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<OwnedPermit, keel::bulkhead::BulkheadFull>>
                + Send,
        >,
    >,
>;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Whatever the sequence of acquires, releases, cancellations and time,
    /// seats in use equal the permits held and never exceed the maximum, the
    /// queue never exceeds its bound, and waiters are served in order.
    #[test]
    fn seats_never_leak_or_over_admit(
        max_concurrent in 1u32..4,
        max_queue in 0u32..4,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let b = bulkhead(max_concurrent, max_queue, 30 * MS);
            let mut held: Vec<OwnedPermit> = Vec::new();
            let mut waiters: VecDeque<(u64, Waiter)> = VecDeque::new();
            let mut next_id = 0u64;
            let mut served: Vec<u64> = Vec::new();
            for op in ops {
                match op {
                    Op::TryAcquire => {
                        if let Ok(p) = b.try_acquire_owned() {
                            held.push(p);
                        }
                    }
                    Op::Acquire => {
                        let mut w: Waiter = spawn(Box::pin(b.acquire_owned()));
                        match w.poll() {
                            std::task::Poll::Ready(Ok(p)) => held.push(p),
                            std::task::Poll::Ready(Err(_)) => {}
                            std::task::Poll::Pending => {
                                waiters.push_back((next_id, w));
                                next_id += 1;
                            }
                        }
                    }
                    Op::Release(i) => {
                        if !held.is_empty() {
                            drop(held.swap_remove(i % held.len()));
                        }
                    }
                    Op::CancelWaiter(i) => {
                        if !waiters.is_empty() {
                            let _ = waiters.remove(i % waiters.len());
                        }
                    }
                    Op::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
                }
                // Let every waiter that can finish do so.
                let mut still = VecDeque::new();
                while let Some((id, mut w)) = waiters.pop_front() {
                    match w.poll() {
                        std::task::Poll::Ready(Ok(p)) => {
                            held.push(p);
                            served.push(id);
                        }
                        std::task::Poll::Ready(Err(_)) => {}
                        std::task::Poll::Pending => still.push_back((id, w)),
                    }
                }
                waiters = still;
                let m = b.metrics();
                prop_assert_eq!(m.in_use as usize, held.len());
                prop_assert!(m.in_use <= max_concurrent);
                prop_assert_eq!(m.waiting as usize, waiters.len());
                prop_assert!(m.waiting <= max_queue);
            }
            prop_assert!(served.windows(2).all(|w| w[0] < w[1]), "served out of order: {:?}", served);
            drop(waiters);
            drop(held);
            prop_assert_eq!(b.metrics().in_use, 0);
            prop_assert_eq!(b.metrics().waiting, 0);
            Ok(())
        })?;
    }
}

mod thread_pool {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::mpsc;
    use std::sync::Arc;

    use keel::bulkhead::{ThreadPool, ThreadPoolConfig};

    /// A job that blocks its thread until the test lets it go.
    fn blocker(
        pool: &ThreadPool,
    ) -> (
        keel::bulkhead::Run<()>,
        mpsc::Sender<()>,
        mpsc::Receiver<()>,
    ) {
        let (release, gate) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        let run = pool.run(move || {
            let _ = started_tx.send(());
            gate.recv().unwrap();
        });
        (run, release, started)
    }

    #[tokio::test]
    async fn a_saturated_pool_does_not_delay_another() {
        let slow = ThreadPool::builder("slow")
            .threads(2)
            .max_queue(2)
            .build()
            .unwrap();
        let fast = ThreadPool::builder("fast")
            .threads(1)
            .max_queue(0)
            .build()
            .unwrap();

        // Both of slow's threads block, and its queue fills up behind them.
        let (a, release_a, started_a) = blocker(&slow);
        let (b, release_b, started_b) = blocker(&slow);
        started_a.recv().unwrap();
        started_b.recv().unwrap();
        let (c, release_c, _) = blocker(&slow);
        let (d, release_d, _) = blocker(&slow);
        let m = slow.metrics();
        assert_eq!((m.busy, m.queued), (2, 2));
        // Full: rejected at once, without running.
        let ran = Arc::new(AtomicU32::new(0));
        let r = ran.clone();
        let full = slow
            .run(move || r.fetch_add(1, Ordering::SeqCst))
            .await
            .unwrap_err();
        assert_eq!(&*full.name, "slow");
        assert_eq!(slow.metrics().rejected, 1);

        // The other pool answers while slow's threads are still blocked.
        let thread = fast
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert_eq!(thread.as_deref(), Some("fast-0"));
        assert_eq!(slow.metrics().busy, 2, "slow's jobs were still blocked");

        for release in [release_a, release_b, release_c, release_d] {
            release.send(()).unwrap();
        }
        for run in [a, b, c, d] {
            run.await.unwrap();
        }
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert_eq!(slow.metrics().queued, 0);
    }

    #[tokio::test]
    async fn a_job_withdrawn_before_it_starts_never_runs() {
        let pool = ThreadPool::builder("p")
            .threads(1)
            .max_queue(4)
            .build()
            .unwrap();
        let (a, release, started) = blocker(&pool);
        started.recv().unwrap();
        let ran = Arc::new(AtomicU32::new(0));
        let r = ran.clone();
        drop(pool.run(move || r.fetch_add(1, Ordering::SeqCst)));
        release.send(()).unwrap();
        a.await.unwrap();
        // One thread, FIFO: once this job has run, the withdrawn one would
        // have run before it.
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_withdrawn_job_gives_its_place_back_at_once() {
        let pool = ThreadPool::builder("p")
            .threads(1)
            .max_queue(1)
            .build()
            .unwrap();
        let (a, release, started) = blocker(&pool);
        started.recv().unwrap();
        let queued = pool.run(|| 1);
        assert_eq!(pool.metrics().queued, 1);
        drop(queued);
        assert_eq!(pool.metrics().queued, 0);
        // The place is free while the worker is still blocked.
        let next = pool.run(|| 2);
        release.send(()).unwrap();
        a.await.unwrap();
        assert_eq!(next.await.unwrap(), 2);
    }

    /// Panics when dropped: a result nobody waits for any more.
    struct Explosive;

    impl Drop for Explosive {
        fn drop(&mut self) {
            panic!("dropped");
        }
    }

    #[tokio::test]
    async fn a_panic_dropping_an_undelivered_result_does_not_kill_the_worker() {
        let pool = ThreadPool::builder("p")
            .threads(1)
            .max_queue(1)
            .build()
            .unwrap();
        let (release, gate) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        let abandoned = pool.run(move || {
            let _ = started_tx.send(());
            gate.recv().unwrap();
            Explosive
        });
        started.recv().unwrap();
        drop(abandoned); // the caller stops waiting; the job runs on
        release.send(()).unwrap();
        // The worker dropped the result (and its panic) and lives on.
        assert_eq!(pool.run(|| 3).await.unwrap(), 3);
        assert_eq!(pool.metrics().busy, 0);
    }

    #[tokio::test]
    async fn a_panicking_job_panics_its_caller_and_the_pool_lives_on() {
        let pool = ThreadPool::builder("p")
            .threads(1)
            .max_queue(1)
            .build()
            .unwrap();
        let caller = tokio::spawn(pool.run(|| panic!("job failed")));
        let err = caller.await.unwrap_err();
        assert!(err.is_panic());
        assert_eq!(pool.run(|| 1 + 1).await.unwrap(), 2);
        assert_eq!(pool.metrics().busy, 0);
    }

    #[test]
    fn workers_exit_when_the_pool_is_dropped() {
        let pool = ThreadPool::builder("short-lived")
            .threads(2)
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let done = pool.run(move || tx.send(()).unwrap());
        drop(pool);
        // The queued job still runs: dropping the pool drains its queue.
        rx.recv().unwrap();
        drop(done);
    }

    #[derive(Debug, Clone)]
    enum PoolOp {
        Submit,
        /// Lets the n-th running job (modulo) finish.
        Release(usize),
        /// Drops the n-th live job's future (modulo): a cancelled caller.
        Cancel(usize),
    }

    fn pool_op() -> impl Strategy<Value = PoolOp> {
        prop_oneof![
            3 => Just(PoolOp::Submit),
            2 => any::<usize>().prop_map(PoolOp::Release),
            1 => any::<usize>().prop_map(PoolOp::Cancel),
        ]
    }

    struct Job {
        id: usize,
        run: Option<tokio_test::task::Spawn<keel::bulkhead::Run<()>>>,
        gate: mpsc::Sender<()>,
        running: bool,
    }

    /// Waits (bounded) until the pool's workers have caught up with what
    /// the model says: this waits for a condition, it does not guess a time.
    fn settled(
        pool: &ThreadPool,
        busy: u32,
        queued: u32,
        started: &Mutex<Vec<usize>>,
        want: &[usize],
    ) -> Result<(), TestCaseError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let m = pool.metrics();
            let mut got = started.lock().unwrap().clone();
            got.sort_unstable();
            if (m.busy, m.queued) == (busy, queued) && got == want {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(TestCaseError::fail(format!(
                    "pool never reached busy {busy}, queued {queued}, started {want:?}: {m:?}, started {got:?}"
                )));
            }
            std::thread::yield_now();
        }
    }

    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;
    use std::sync::Mutex;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Against a model of a FIFO pool: a submission is admitted exactly
        /// when fewer than threads + max_queue jobs are held; at most
        /// `threads` run; a cancelled queued job never runs and gives its
        /// place back at once; and when every job is let go the pool is
        /// empty.
        #[test]
        fn the_pool_never_leaks_or_over_admits(
            threads in 1u32..=3,
            max_queue in 0u32..=3,
            ops in proptest::collection::vec(pool_op(), 1..40),
        ) {
            let pool = ThreadPool::builder("model").threads(threads).max_queue(max_queue).build().unwrap();
            let started = Arc::new(Mutex::new(Vec::new()));
            // Live jobs in submission order; `running` as the model says.
            let mut jobs: Vec<Job> = Vec::new();
            let mut ever_started: Vec<usize> = Vec::new();
            let mut rejected = 0u64;
            for (id, op) in ops.into_iter().enumerate() {
                match op {
                    PoolOp::Submit => {
                        let (gate, wait) = mpsc::channel::<()>();
                        let s = started.clone();
                        let mut run = tokio_test::task::spawn(pool.run(move || {
                            s.lock().unwrap().push(id);
                            let _ = wait.recv();
                        }));
                        let admit = (jobs.len() as u32) < threads + max_queue;
                        let rejected_now = matches!(run.poll(), std::task::Poll::Ready(Err(_)));
                        prop_assert_eq!(rejected_now, !admit, "job {} with {} held", id, jobs.len());
                        if admit {
                            jobs.push(Job { id, run: Some(run), gate, running: false });
                        } else {
                            rejected += 1;
                        }
                    }
                    PoolOp::Release(n) => {
                        let running: Vec<usize> = (0..jobs.len()).filter(|&i| jobs[i].running).collect();
                        if running.is_empty() {
                            continue;
                        }
                        let job = jobs.remove(running[n % running.len()]);
                        job.gate.send(()).unwrap();
                    }
                    PoolOp::Cancel(n) => {
                        if jobs.is_empty() {
                            continue;
                        }
                        // A queued job leaves the queue at once; a running
                        // one runs on until released.
                        let i = n % jobs.len();
                        if jobs[i].running {
                            jobs[i].run = None;
                        } else {
                            jobs.remove(i);
                        }
                    }
                }
                // The model's workers: free ones take queued jobs in order.
                let mut busy = jobs.iter().filter(|j| j.running).count() as u32;
                let mut i = 0;
                while i < jobs.len() && busy < threads {
                    if jobs[i].running {
                        i += 1;
                    } else {
                        jobs[i].running = true;
                        ever_started.push(jobs[i].id);
                        busy += 1;
                        i += 1;
                    }
                }
                prop_assert!(busy <= threads);
                let queued = jobs.len() as u32 - busy;
                ever_started.sort_unstable();
                settled(&pool, busy, queued, &started, &ever_started)?;
                prop_assert_eq!(pool.metrics().rejected, rejected);
            }
            // Let everything go: the pool ends empty.
            for job in jobs.drain(..) {
                let _ = job.gate.send(());
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while pool.metrics().busy + pool.metrics().queued > 0 {
                prop_assert!(std::time::Instant::now() < deadline, "pool never emptied: {:?}", pool.metrics());
                std::thread::yield_now();
            }
        }
    }

    #[test]
    fn configuration_names_the_field() {
        let err = ThreadPool::builder("p").threads(0).build().unwrap_err();
        assert_eq!(
            err.to_string(),
            "threads: must be between 1 and 1024, got 0"
        );
        let err = toml::from_str::<ThreadPoolConfig>("thread = 2").unwrap_err();
        assert!(err.to_string().contains("unknown field `thread`"), "{err}");
    }
}
