//! Idempotency look-ups per store: a replayed duplicate (the stored result,
//! nothing runs) and a first call (claim, run, store). See
//! docs/BENCHMARKS.md. The embedded store needs `--features embedded`, the
//! Redis one `--features redis` and a `redis-server` on PATH (the bench
//! starts its own on a free loopback port).

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use keel::idempotency::{Idempotency, IdempotencyStore, MemoryStore};

#[allow(dead_code)]
mod support;

fn group(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    store_name: &str,
    store: impl IdempotencyStore + 'static,
) {
    // Results kept 1 ms: "first_call" cycles through 100k keys, each
    // expired by the time it comes round again, so the store stays small.
    let idem = Idempotency::builder("bench")
        .store(store)
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
    group(c, &support::runtime(), "memory", MemoryStore::new());
}

#[cfg(feature = "embedded")]
fn embedded(c: &mut Criterion) {
    let path = std::env::temp_dir().join(format!("keel-bench-{}.redb", std::process::id()));
    let _ = std::fs::remove_file(&path);
    group(
        c,
        &support::runtime(),
        "embedded",
        keel::idempotency::EmbeddedStore::open(&path).unwrap(),
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
    group(c, &rt, "redis", store);
}

#[cfg(not(feature = "redis"))]
fn redis(_: &mut Criterion) {
    eprintln!("idempotency_redis: skipped, build with --features redis");
}

criterion_group!(benches, memory, embedded, redis);
criterion_main!(benches);
