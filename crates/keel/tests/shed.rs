//! Load shedding: which classes go first, on both signals, on a manual clock.

use std::time::Duration;

use keel::clock::ManualClock;
use keel::shed::{LoadShedder, Permit, Priority, ShedConfig};
use keel::{Error, Pipeline};

const MS: Duration = Duration::from_millis(1);

/// Which priorities the shedder admits right now (each admission released
/// at once, so probing does not change the load).
fn admitted(shedder: &LoadShedder) -> Vec<Priority> {
    Priority::ALL
        .into_iter()
        .filter(|&p| shedder.try_acquire(p).is_ok())
        .collect()
}

#[test]
fn rising_in_flight_sheds_low_then_medium_then_high_never_critical() {
    use Priority::*;
    let shedder = LoadShedder::builder("api")
        .capacity(10)
        .thresholds(0.5, 0.7, 0.9)
        .build()
        .unwrap();
    let mut held: Vec<Permit> = Vec::new();
    let mut seen = Vec::new();
    for in_flight in 0..=12 {
        seen.push((in_flight, admitted(&shedder)));
        held.push(shedder.try_acquire(Critical).unwrap());
    }
    let expect = |n: usize| match n {
        0..=4 => vec![Critical, High, Medium, Low],
        5..=6 => vec![Critical, High, Medium],
        7..=8 => vec![Critical, High],
        _ => vec![Critical], // at and beyond capacity
    };
    for (n, got) in seen {
        assert_eq!(got, expect(n), "with {n} in flight");
    }
    assert_eq!(shedder.metrics().in_flight, 13);
    assert_eq!(shedder.metrics().level, 3);
    // As calls finish, classes come back in the reverse order.
    held.truncate(8);
    assert_eq!(admitted(&shedder), [Critical, High]);
    held.truncate(4);
    assert_eq!(admitted(&shedder), Priority::ALL);
    let m = shedder.metrics();
    assert_eq!(m.shed[Critical as usize], 0);
    assert!(m.shed[Low as usize] > m.shed[Medium as usize]);
    assert!(m.shed[Medium as usize] > m.shed[High as usize]);
}

#[test]
fn a_standing_queue_sheds_one_more_class_per_interval_and_clears_at_once() {
    use Priority::*;
    let clock = ManualClock::new();
    let shedder = LoadShedder::builder("api")
        .capacity(1000)
        .queue_delay(5 * MS, 100 * MS)
        .clock(clock.clone())
        .build()
        .unwrap();
    let interval_with_min = |min: Duration| {
        // A burst above the target, and the interval's least delay.
        shedder.observe_queue_delay(min + 40 * MS);
        shedder.observe_queue_delay(min);
        clock.advance(100 * MS);
    };
    interval_with_min(Duration::ZERO); // opens the first interval
    assert_eq!(admitted(&shedder), Priority::ALL);
    // A short spike is not a standing queue: the minimum stayed at target.
    interval_with_min(5 * MS);
    assert_eq!(admitted(&shedder), Priority::ALL);
    interval_with_min(8 * MS);
    assert_eq!(admitted(&shedder), [Critical, High, Medium]);
    interval_with_min(8 * MS);
    assert_eq!(admitted(&shedder), [Critical, High]);
    interval_with_min(8 * MS);
    assert_eq!(admitted(&shedder), [Critical]);
    interval_with_min(30 * MS);
    assert_eq!(admitted(&shedder), [Critical], "Critical is never shed");
    // One interval at the target clears it.
    interval_with_min(2 * MS);
    assert_eq!(admitted(&shedder), Priority::ALL);
}

#[test]
fn an_interval_without_queueing_clears_the_level() {
    let clock = ManualClock::new();
    let shedder = LoadShedder::builder("api")
        .queue_delay(5 * MS, 100 * MS)
        .clock(clock.clone())
        .build()
        .unwrap();
    shedder.observe_queue_delay(50 * MS);
    clock.advance(100 * MS);
    shedder.observe_queue_delay(50 * MS);
    clock.advance(100 * MS);
    assert_eq!(shedder.metrics().level, 2);
    // Nothing queued for a whole interval: no requests waited at all.
    clock.advance(100 * MS);
    assert_eq!(shedder.metrics().level, 0);
}

#[test]
fn the_higher_of_the_two_signals_decides() {
    use Priority::*;
    let clock = ManualClock::new();
    let shedder = LoadShedder::builder("api")
        .capacity(4)
        .thresholds(0.5, 0.75, 1.0)
        .queue_delay(5 * MS, 100 * MS)
        .clock(clock.clone())
        .build()
        .unwrap();
    shedder.observe_queue_delay(50 * MS);
    clock.advance(100 * MS);
    shedder.observe_queue_delay(50 * MS); // level 1 from the queue
    let _a = shedder.try_acquire(Critical).unwrap();
    assert_eq!(admitted(&shedder), [Critical, High, Medium]);
    let _b = shedder.try_acquire(Critical).unwrap();
    let _c = shedder.try_acquire(Critical).unwrap(); // 3 of 4: level 2
    assert_eq!(admitted(&shedder), [Critical, High]);
}

#[tokio::test]
async fn a_shed_call_does_not_run_and_is_not_retried() {
    let shedder = LoadShedder::builder("api").capacity(2).build().unwrap();
    let _busy = shedder.try_acquire(Priority::Critical).unwrap();
    let pipeline = Pipeline::builder()
        .retry(
            keel::retry::Retry::builder()
                .max_attempts(3)
                .build()
                .unwrap(),
        )
        .shed(shedder.with_priority(Priority::Low))
        .build();
    let runs = std::sync::atomic::AtomicU32::new(0);
    let result: Result<(), Error<std::io::Error>> = pipeline
        .call(|| async {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
        .await;
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shed {
                priority: Priority::Low
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("low priority work is turned away"));
    assert_eq!(runs.into_inner(), 0);
    assert_eq!(
        shedder.metrics().shed[Priority::Low as usize],
        1,
        "shed once, not retried"
    );
}

#[tokio::test]
async fn the_tower_layer_classes_each_request() {
    use tower::{service_fn, Layer, ServiceExt};
    let shedder = LoadShedder::builder("api").capacity(2).build().unwrap();
    let layer = keel::shed::LoadShedLayer::new(shedder.clone(), |req: &&'static str| {
        if req.starts_with("/checkout") {
            Priority::Critical
        } else {
            Priority::Low
        }
    });
    let svc = layer.layer(service_fn(|req: &'static str| async move {
        Ok::<_, std::io::Error>(req.len())
    }));
    let _busy = shedder.try_acquire(Priority::Critical).unwrap();
    assert_eq!(svc.clone().oneshot("/checkout").await.unwrap(), 9);
    let err = svc.clone().oneshot("/recommendations").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shed {
                priority: Priority::Low
            }
        ),
        "{err}"
    );
    assert_eq!(
        shedder.metrics().in_flight,
        1,
        "the layer's permits were returned"
    );
}

#[test]
fn configuration_names_the_field() {
    let config: ShedConfig = toml::from_str(
        "capacity = 50\nlow_at = 0.6\nqueue_delay_target = \"10ms\"\nqueue_delay_interval = \"200ms\"",
    )
    .unwrap();
    assert_eq!(config.queue_delay_target, Some(10 * MS));
    config.build("api").unwrap();
    let bad: ShedConfig = toml::from_str("low_at = 0.8\nmedium_at = 0.7").unwrap();
    let err = bad.build("api").unwrap_err();
    assert_eq!(
        err.to_string(),
        "medium_at: must not be below low_at (0.8), got 0.7"
    );
    let bad: ShedConfig = toml::from_str("capacity = 0").unwrap();
    assert_eq!(bad.build("api").unwrap_err().field(), "capacity");
    assert!(toml::from_str::<ShedConfig>("priority = \"low\"").is_err());
    let p: Priority = serde_json_like("\"medium\"");
    assert_eq!(p, Priority::Medium);
}

fn serde_json_like(text: &str) -> Priority {
    #[derive(serde::Deserialize)]
    struct P {
        p: Priority,
    }
    toml::from_str::<P>(&format!("p = {text}")).unwrap().p
}

#[test]
fn many_threads_never_push_a_class_past_its_threshold() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let shedder = LoadShedder::builder("api")
        .capacity(10)
        .thresholds(0.5, 0.7, 0.9)
        .build()
        .unwrap();
    let most = AtomicU32::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let mut held = Vec::new();
                for i in 0..20_000 {
                    if let Ok(p) = shedder.try_acquire(Priority::Low) {
                        most.fetch_max(shedder.metrics().in_flight, Ordering::Relaxed);
                        held.push(p);
                    }
                    if i % 3 == 0 {
                        held.clear();
                    }
                }
            });
        }
    });
    // Low is admitted only below 5 in flight, so at most 5 are ever out.
    assert!(most.into_inner() <= 5);
    assert_eq!(shedder.metrics().in_flight, 0);
}
