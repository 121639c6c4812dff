//! `keel demo`, short: it runs both checkouts on the fault timeline, prints
//! the live lines (stdout is not a terminal here) and the summary, and
//! writes a self-contained report.

use std::process::Command;

#[test]
fn a_short_demo_prints_the_summary_and_writes_the_report() {
    let dir = std::env::temp_dir().join(format!("keel-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("report.html");
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["demo", "--duration", "6s", "--rate", "20", "--report"])
        .arg(&report)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");

    // The timeline and a plain line a second.
    for event in [
        "s: recommendations fail 100%",
        "s: payment becomes 3 s slow",
        "s: payment recovers: every fault has ended",
    ] {
        assert!(stdout.contains(event), "missing {event:?} in:\n{stdout}");
    }
    let per_second = stdout
        .lines()
        .filter(|l| l.contains("s  naive ") && l.contains("| keel "))
        .count();
    assert!(per_second >= 6, "{per_second} live lines in:\n{stdout}");
    assert!(!stdout.contains('\x1b'), "no terminal codes when piped");

    // The summary: every row, a value for each run.
    let summary = stdout.split("summary").nth(1).expect("a summary");
    for row in [
        "checkouts",
        "checkout success rate",
        "p50 latency",
        "p99 latency",
        "requests that reached payment",
        "per checkout (retry amplification)",
        "requests that reached recommendations",
        "time to recover after the faults",
    ] {
        let line = summary
            .lines()
            .find(|l| l.trim_start().starts_with(row))
            .unwrap_or_else(|| panic!("no {row:?} row in:\n{summary}"));
        let values = line.trim_start()[row.len()..].split_whitespace().count();
        assert!(values >= 2, "{row:?} needs a value per run: {line:?}");
    }
    let checkouts: Vec<u64> = summary
        .lines()
        .find(|l| l.trim_start().starts_with("checkouts"))
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(checkouts, [120, 120], "6 s at 20 a second, each run");

    // The report: where it said, self-contained, with the three charts.
    let said = stdout
        .lines()
        .find_map(|l| l.strip_prefix("report: "))
        .expect("the report's path");
    assert_eq!(
        std::fs::canonicalize(said).unwrap(),
        std::fs::canonicalize(&report).unwrap()
    );
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert_eq!(html.matches("<svg").count(), 3, "success, p99, breakers");
    assert_eq!(
        html.matches("<path d=\"M").count(),
        4,
        "two runs in two charts"
    );
    for outside in ["<script", "src=", "href=", "@import", "url("] {
        assert!(
            !html.contains(outside),
            "the report fetches nothing: {outside}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
