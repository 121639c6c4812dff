//! The demo's HTML report: one self-contained page (inline SVG and CSS, no
//! script, nothing fetched) with the summary and, second by second, both
//! runs' success rate and p99 latency and the protected run's breakers.

use std::fmt::Write as _;

use super::shop::{quantile, PATIENCE};
use super::{Options, Run, Tick, ROUTES};

const WIDTH: f64 = 900.0;
const PLOT_LEFT: f64 = 120.0;
const PLOT_RIGHT: f64 = 20.0;
const NAIVE_COLOUR: &str = "#d1495b";
const KEEL_COLOUR: &str = "#00798c";

/// The page.
pub(crate) fn html(
    options: &Options,
    ticks: &[Tick],
    events: &[(f64, &'static str)],
    faults_end: f64,
    naive: &Run,
    keel: &Run,
) -> String {
    let seconds = ticks.len().max(1) as f64;
    let mut page = String::new();
    let _ = write!(
        page,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>keel demo: checkout with and without keel</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 940px; color: #222; }}
h1 {{ font-size: 1.5em; margin-bottom: 0.2em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ padding: 0.25em 0.9em; border-bottom: 1px solid #ddd; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.naive {{ color: {NAIVE_COLOUR}; }} .keel {{ color: {KEEL_COLOUR}; }}
svg text {{ font: 12px system-ui, sans-serif; fill: #444; }}
.note {{ color: #666; font-size: 0.9em; }}
</style></head><body>
<h1>Checkout, with and without keel</h1>
<p class="note">{rate} checkouts a second for {duration}, each run on its own copy of the same three services, on one fault timeline. Measured by <code>keel demo</code>; a customer waits at most {patience}s.</p>
"#,
        rate = options.rate,
        duration = keel::config::format_duration(options.duration),
        patience = PATIENCE.as_secs(),
    );

    page.push_str(
        "<table><tr><th></th><th class=\"naive\">naive</th><th class=\"keel\">keel</th></tr>\n",
    );
    let rows = super::rows(naive, keel);
    for (what, a, b) in rows {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{a}</td><td>{b}</td></tr>",
            what.trim_start()
        );
    }
    page.push_str("</table>\n<p class=\"note\">Fault timeline: ");
    for (i, (at, says)) in events.iter().enumerate() {
        let _ = write!(
            page,
            "{}{at:.0}s {}",
            if i > 0 { "; " } else { "" },
            escape(says)
        );
    }
    page.push_str(".</p>\n");

    let success = |s: &super::shop::Second| (s.total() > 0).then(|| s.success());
    let p99 = |s: &super::shop::Second| (s.total() > 0).then(|| quantile(&s.latencies, 0.99));
    page.push_str("<h2>Checkout success rate (%)</h2>\n");
    page.push_str(&line_chart(
        ticks,
        events,
        faults_end,
        seconds,
        100.0,
        "%",
        |t| (success(&t.naive), success(&t.keel)),
    ));
    page.push_str("<h2>p99 checkout latency (ms)</h2>\n");
    let top = PATIENCE.as_secs_f64() * 1000.0;
    page.push_str(&line_chart(
        ticks,
        events,
        faults_end,
        seconds,
        top,
        "ms",
        |t| (p99(&t.naive), p99(&t.keel)),
    ));
    page.push_str("<h2>keel's circuit breakers</h2>\n");
    page.push_str(&breakers(ticks, seconds));
    let _ = write!(
        page,
        "<p class=\"note\">Lines: <span class=\"naive\">naive</span> (direct calls, no timeouts, three tries back to back) and <span class=\"keel\">keel</span> (the same calls through the keel sidecar, <code>examples/checkout.toml</code>). Shaded: a fault is on. Seconds without a finished checkout are gaps. Latency counts every checkout, failed ones included, from the moment it was due until its answer or the customer giving up ({patience}s), by the second it ended in.</p>\n</body></html>\n",
        patience = PATIENCE.as_secs()
    );
    page
}

fn x_of(second: f64, seconds: f64) -> f64 {
    PLOT_LEFT + (WIDTH - PLOT_LEFT - PLOT_RIGHT) * second / seconds
}

/// A chart of two series (naive, keel) per second, from 0 to `top`.
fn line_chart(
    ticks: &[Tick],
    events: &[(f64, &'static str)],
    faults_end: f64,
    seconds: f64,
    top: f64,
    unit: &str,
    value: impl Fn(&Tick) -> (Option<f64>, Option<f64>),
) -> String {
    const HEIGHT: f64 = 240.0;
    const PLOT_TOP: f64 = 10.0;
    const PLOT_BOTTOM: f64 = 30.0;
    let y_of =
        |v: f64| PLOT_TOP + (HEIGHT - PLOT_TOP - PLOT_BOTTOM) * (1.0 - (v / top).clamp(0.0, 1.0));
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">"#
    );
    // Faults: from each change that starts one to the next change.
    for pair in events.windows(2) {
        let (start, says) = pair[0];
        if says.contains("fail") || says.contains("slow") {
            let end = pair[1].0.min(faults_end.max(start));
            let _ = write!(
                svg,
                r##"<rect x="{:.1}" y="{PLOT_TOP}" width="{:.1}" height="{:.1}" fill="#f3e3c3" opacity="0.7"><title>{}</title></rect>"##,
                x_of(start, seconds),
                (x_of(end, seconds) - x_of(start, seconds)).max(1.0),
                HEIGHT - PLOT_TOP - PLOT_BOTTOM,
                escape(says)
            );
        }
    }
    for i in 0..=4 {
        let v = top * f64::from(i) / 4.0;
        let y = y_of(v);
        let _ = write!(
            svg,
            r##"<line x1="{PLOT_LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}{unit}</text>"##,
            WIDTH - PLOT_RIGHT,
            PLOT_LEFT - 6.0,
            y + 4.0
        );
    }
    let step = if seconds > 60.0 { 10 } else { 5 };
    for s in (0..=seconds as usize).step_by(step) {
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{s}s</text>"#,
            x_of(s as f64, seconds),
            HEIGHT - 10.0
        );
    }
    for (colour, pick) in [(NAIVE_COLOUR, 0usize), (KEEL_COLOUR, 1usize)] {
        // Gaps split the line.
        let mut path = String::new();
        let mut pen_down = false;
        for (i, tick) in ticks.iter().enumerate() {
            let (a, b) = value(tick);
            match if pick == 0 { a } else { b } {
                Some(v) => {
                    let _ = write!(
                        path,
                        "{}{:.1},{:.1} ",
                        if pen_down { "L" } else { "M" },
                        x_of(i as f64 + 0.5, seconds),
                        y_of(v)
                    );
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        let _ = write!(
            svg,
            r#"<path d="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            path.trim_end()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A row of coloured seconds per route: the breaker's state.
fn breakers(ticks: &[Tick], seconds: f64) -> String {
    const ROW: f64 = 26.0;
    let height = ROW * ROUTES.len() as f64 + 30.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img">"#
    );
    let colour = |state: &str| match state {
        "closed" => "#7fb77e",
        "open" | "forced_open" => "#d1495b",
        "half_open" => "#edae49",
        _ => "#cccccc",
    };
    for (r, route) in ROUTES.iter().enumerate() {
        let y = 5.0 + ROW * r as f64;
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{route}</text>"#,
            PLOT_LEFT - 6.0,
            y + 15.0
        );
        for (i, tick) in ticks.iter().enumerate() {
            let state = tick.breakers[r];
            let _ = write!(
                svg,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}s: {state}</title></rect>"#,
                x_of(i as f64, seconds),
                (x_of(1.0, seconds) - x_of(0.0, seconds)).max(1.0),
                ROW - 6.0,
                colour(state),
                i + 1
            );
        }
    }
    let legend_y = 5.0 + ROW * ROUTES.len() as f64 + 14.0;
    for (i, state) in ["closed", "half_open", "open"].iter().enumerate() {
        let x = PLOT_LEFT + 110.0 * i as f64;
        let _ = write!(
            svg,
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{state}</text>"#,
            legend_y - 10.0,
            colour(state),
            x + 16.0,
            legend_y
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
