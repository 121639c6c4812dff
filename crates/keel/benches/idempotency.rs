//! Idempotency look-ups per store: a replayed duplicate (the stored result,
//! nothing runs) and a first call (claim, run, store). See
//! docs/BENCHMARKS.md. The embedded store needs `--features embedded`, the
//! Redis one `--features redis` and a `redis-server` on PATH (the bench
//! starts its own on a free loopback port).

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use keel::idempotency::{Idempotency, IdempotencyStore, MemoryStore};

#[allow(dead_code)]
mod support;

fn group(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    store_name: &str,
    store: Arc<dyn IdempotencyStore>,
) {
    // Results kept 1 ms: "first_call" cycles through 100k keys, each
    // expired by the time it comes round again, so the store stays small.
    let idem = Idempotency::builder("bench")
        .shared_store(store)
        .ttl(Duration::from_millis(1))
        .build()
        .unwrap();
    let op = || async { Ok::<_, Infallible>(b"{\"paid\":true}".to_vec()) };
    let replays = Idempotency::builder("bench")
        .shared_store(idem.store().clone())
        .build()
        .unwrap();
    rt.block_on(replays.call("replayed", b"fp", op)).unwrap();
    let mut g = c.benchmark_group(format!("idempotency_{store_name}"));
    g.bench_function("replay", |b| {
        b.to_async(rt).iter(|| async {
            let done = replays
                .call(black_box("replayed"), b"fp", op)
                .await
                .unwrap();
            assert!(done.replayed);
        })
    });
    let next = AtomicU64::new(0);
    g.bench_function("first_call", |b| {
        b.to_async(rt).iter(|| async {
            let key = format!("key-{}", next.fetch_add(1, Ordering::Relaxed) % 100_000);
            let done = idem.call(&key, b"fp", op).await.unwrap();
            assert!(!done.replayed);
        })
    });
    g.finish();
}

fn memory(c: &mut Criterion) {
    group(
        c,
        &support::runtime(),
        "memory",
        Arc::new(MemoryStore::new()),
    );
}

/// The same with 1,000,000 stored results held (kept a day), in a store
/// large enough for them: look-ups and the expiry index at that size.
fn memory_1m(c: &mut Criterion) {
    let rt = support::runtime();
    let store = Arc::new(MemoryStore::with_max_bytes(1 << 30));
    let held = Idempotency::builder("bench")
        .shared_store(store.clone())
        .build()
        .unwrap();
    let op = || async { Ok::<_, Infallible>(b"{\"paid\":true}".to_vec()) };
    rt.block_on(async {
        for i in 0..1_000_000 {
            held.call(&format!("held-{i}"), b"fp", op).await.unwrap();
        }
    });
    assert!(store.len() >= 1_000_000);
    group(c, &rt, "memory_1m", store);
}

#[cfg(feature = "embedded")]
fn embedded(c: &mut Criterion) {
    let path = std::env::temp_dir().join(format!("keel-bench-{}.redb", std::process::id()));
    let _ = std::fs::remove_file(&path);
    group(
        c,
        &support::runtime(),
        "embedded",
        Arc::new(keel::idempotency::EmbeddedStore::open(&path).unwrap()),
    );
    let _ = std::fs::remove_file(&path);
}

#[cfg(not(feature = "embedded"))]
fn embedded(_: &mut Criterion) {
    eprintln!("idempotency_embedded: skipped, build with --features embedded");
}

#[cfg(feature = "redis")]
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

#[cfg(feature = "redis")]
fn redis(c: &mut Criterion) {
    let server = redis_server::RedisServer::start();
    let rt = support::runtime_with_io();
    let store = keel::store::RedisStore::open(&server.url()).unwrap();
    group(c, &rt, "redis", Arc::new(store));
}

#[cfg(not(feature = "redis"))]
fn redis(_: &mut Criterion) {
    eprintln!("idempotency_redis: skipped, build with --features redis");
}

criterion_group!(benches, memory, memory_1m, embedded, redis);
criterion_main!(benches);
