//! The golden signals of a named dependency, read back from a Prometheus
//! recorder scoped to each test.

use std::time::Duration;

use keel::bulkhead::Bulkhead;
use keel::observe::Observer;
use keel::{Error, Pipeline};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

const MS: Duration = Duration::from_millis(1);

/// An observer whose handles live in a recorder of its own.
fn observed(name: &str) -> (Observer, PrometheusHandle) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let observer = metrics::with_local_recorder(&recorder, || Observer::new(name));
    (observer, handle)
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[tokio::test(start_paused = true)]
async fn a_pipeline_step_counts_outcomes_latency_and_in_flight() {
    let (observer, handle) = observed("payment");
    let bulkhead = Bulkhead::builder("payment")
        .max_concurrent(1)
        .build()
        .unwrap();
    let pipeline = Pipeline::builder()
        .observe(observer)
        .bulkhead(bulkhead.clone())
        .build();

    let ok = pipeline
        .call(|| async {
            tokio::time::sleep(40 * MS).await;
            Ok::<_, &str>(())
        })
        .await;
    assert!(ok.is_ok());
    assert!(pipeline
        .call(|| async { Err::<(), _>("down") })
        .await
        .is_err());
    let seat = bulkhead.try_acquire().unwrap();
    let refused = pipeline.call(|| async { Ok::<_, &str>(()) }).await;
    assert!(matches!(refused, Err(Error::BulkheadFull)));
    drop(seat);
    // Dropped before it finished: ignored, and no longer in flight.
    let cancelled = tokio::time::timeout(
        10 * MS,
        pipeline.call(std::future::pending::<Result<(), &str>>),
    )
    .await;
    assert!(cancelled.is_err());

    let text = handle.render();
    let calls = |outcome: &str| {
        sample(
            &text,
            &format!("keel_calls_total{{policy=\"call\",name=\"payment\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(
        [
            calls("success"),
            calls("failure"),
            calls("rejected"),
            calls("ignored")
        ],
        [1.0, 1.0, 1.0, 1.0]
    );
    assert_eq!(sample(&text, "keel_in_flight{name=\"payment\"}"), 0.0);
    assert_eq!(
        sample(&text, "keel_call_duration_seconds_count{name=\"payment\"}"),
        4.0
    );
    // 40ms + 0 + 0 + 10ms on the paused clock.
    let sum = sample(&text, "keel_call_duration_seconds_sum{name=\"payment\"}");
    assert!((sum - 0.05).abs() < 1e-9, "{sum}");
}
