//! Each policy's own `call` is a `Send + 'static` future when the operation
//! is, so it can be spawned on a multi-threaded runtime. (A `Pipeline`
//! call is not yet: see docs/ARCHITECTURE.md.)

use std::time::Duration;

use keel::bulkhead::Bulkhead;
use keel::circuit_breaker::CircuitBreaker;
use keel::fallback::Fallback;
use keel::hedge::{Hedge, Idempotent};
use keel::retry::Retry;
use keel::timeout::Timeout;
use keel::Error;

async fn op() -> Result<u32, std::io::Error> {
    tokio::task::yield_now().await;
    Ok(7)
}

#[test]
fn every_policy_call_can_be_spawned_on_a_multi_threaded_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let retry = Retry::builder().build().unwrap();
    let timeout = Timeout::new(Duration::from_secs(5));
    let bulkhead = Bulkhead::builder("b").build().unwrap();
    let breaker = CircuitBreaker::builder("c").build().unwrap();
    let hedge = Hedge::builder().build().unwrap();
    let fallback = Fallback::builder().value(|| 0u32).build();
    let tasks = vec![
        rt.spawn(async move { retry.call(op).await }),
        rt.spawn(async move { timeout.call(op).await }),
        rt.spawn(async move { bulkhead.call(op).await }),
        rt.spawn(async move { breaker.call(op).await }),
        rt.spawn(async move { hedge.call(Idempotent(op)).await }),
        rt.spawn(async move {
            fallback
                .call(|| async { op().await.map_err(Error::Inner) })
                .await
                .map(|served| served.value)
        }),
    ];
    for task in tasks {
        assert_eq!(rt.block_on(task).unwrap().unwrap(), 7);
    }
}
