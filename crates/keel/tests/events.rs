//! Typed events: per-policy and global subscriptions, bounded buffers that
//! drop the oldest and count the drops, and the ring of recent events.

use std::time::Duration;

use keel::bulkhead::Bulkhead;
use keel::circuit_breaker::{CircuitBreaker, State, Window};
use keel::clock::ManualClock;
use keel::events::{self, EventKind, Policy, Reason, RECENT};

const SEC: Duration = Duration::from_secs(1);

fn full_bulkhead(name: &str) -> (Bulkhead, keel::bulkhead::OwnedPermit) {
    let b = Bulkhead::builder(name).max_concurrent(1).build().unwrap();
    let seat = b.try_acquire_owned().unwrap();
    (b, seat)
}

#[test]
fn a_policy_subscription_sees_that_policys_events_in_order() {
    let clock = ManualClock::new();
    let cb = CircuitBreaker::builder("payment")
        .window(Window::Count(2))
        .minimum_calls(2)
        .wait_in_open(5 * SEC)
        .clock(clock.clone())
        .build()
        .unwrap();
    let mut events = cb.events().subscribe(16);
    let (other, _seat) = full_bulkhead("not-payment");
    let _ = other.try_acquire();

    cb.try_acquire().unwrap().failure();
    cb.try_acquire().unwrap().failure();
    let _ = cb.try_acquire();

    let first = events.try_recv().unwrap();
    assert_eq!(first.policy, Policy::CircuitBreaker);
    assert_eq!(&*first.name, "payment");
    assert_eq!(
        first.kind,
        EventKind::StateChanged {
            from: State::Closed,
            to: State::Open
        }
    );
    let second = events.try_recv().unwrap();
    assert_eq!(
        second.kind,
        EventKind::Rejected {
            reason: Reason::CircuitOpen,
            retry_after: Some(5 * SEC)
        }
    );
    assert!(events.try_recv().is_none(), "nothing of the bulkhead's");
    assert_eq!(events.dropped(), 0);
}

#[test]
fn a_full_subscription_drops_the_oldest_and_counts_it_without_blocking() {
    let (b, _seat) = full_bulkhead("inventory");
    let mut events = b.events().subscribe(3);
    for _ in 0..10 {
        assert!(b.try_acquire().is_err());
    }
    assert_eq!(events.dropped(), 7);
    let mut kept = 0;
    while let Some(event) = events.try_recv() {
        assert!(matches!(
            event.kind,
            EventKind::Rejected {
                reason: Reason::BulkheadFull,
                ..
            }
        ));
        kept += 1;
    }
    assert_eq!(kept, 3);
}

#[test]
fn the_recent_ring_keeps_the_last_events_without_any_subscriber() {
    let (b, _seat) = full_bulkhead("ring");
    for _ in 0..(RECENT + 5) {
        assert!(b.try_acquire().is_err());
    }
    let recent = b.events().recent();
    assert_eq!(recent.len(), RECENT);
    assert!(recent.windows(2).all(|w| w[0].at <= w[1].at));
}

#[test]
fn a_global_subscription_sees_every_policy_and_stops_when_dropped() {
    let mut all = events::subscribe(1024);
    let (a, _sa) = full_bulkhead("global-a");
    let (b, _sb) = full_bulkhead("global-b");
    let _ = a.try_acquire();
    let _ = b.try_acquire();
    // Other tests run at the same time: look for ours among theirs.
    let mut names = Vec::new();
    while let Some(event) = all.try_recv() {
        if event.name.starts_with("global-") {
            names.push(event.name.to_string());
        }
    }
    assert_eq!(names, ["global-a", "global-b"]);
    drop(all);
    // With no subscriber left, events still reach the policy's ring.
    assert!(a.try_acquire().is_err());
    assert_eq!(a.events().recent().len(), 2);
}

#[tokio::test]
async fn recv_waits_for_the_next_event() {
    let (b, _seat) = full_bulkhead("waiting");
    let mut events = b.events().subscribe(4);
    let waiter = tokio::spawn(async move { events.recv().await });
    tokio::task::yield_now().await;
    assert!(b.try_acquire().is_err());
    let event = waiter.await.unwrap();
    assert_eq!(&*event.name, "waiting");
    assert_eq!(
        event.to_string(),
        "bulkhead \"waiting\": rejected: bulkhead_full"
    );
}
