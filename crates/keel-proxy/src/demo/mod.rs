//! `keel demo`: the checkout scenario, with and without keel, side by side.
//!
//! One process holds everything: two copies of the simulated dependencies
//! (payment, inventory, recommendations; `world`), two copies of the
//! checkout service (`shop`: one calls its dependencies directly, one
//! through a keel proxy running here on `examples/checkout.toml`), an open
//! loop of checkouts driving each at the same rate, and one fault timeline
//! applied to both worlds at once. A live view prints each second; the end
//! prints a summary and writes an HTML report (`report`).

mod report;
mod shop;
mod world;

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use crate::config::Config;
use crate::proxy::Proxy;
use shop::{quantile, Calls, Second, Shop};
use world::{World, FAULTS_END, TIMELINE};

/// The sidecar configuration the protected checkout runs behind.
const CHECKOUT_TOML: &str = include_str!("../../../../examples/checkout.toml");

/// The routes whose breakers the live view and the report show.
const ROUTES: [&str; 3] = ["payment", "inventory", "recommendations"];

/// What `keel demo` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long the load runs (default 60 s).
    pub duration: Duration,
    /// Checkouts started a second, in each run (default 40).
    pub rate: f64,
    /// Where the HTML report goes (default `keel-demo-report.html`).
    pub report: PathBuf,
}

impl Options {
    /// Parses `--duration 30s --rate 40 --report FILE`.
    pub fn parse(args: &[&str]) -> Result<Options, String> {
        let mut options = Options {
            duration: Duration::from_secs(60),
            rate: 40.0,
            report: PathBuf::from("keel-demo-report.html"),
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match *flag {
                "--duration" => {
                    options.duration = keel::config::parse_duration(value)
                        .map_err(|e| format!("--duration: {e}"))?;
                    if options.duration < Duration::from_secs(2) {
                        return Err("--duration: at least 2s".into());
                    }
                }
                "--rate" => {
                    options.rate = value
                        .parse::<f64>()
                        .ok()
                        .filter(|r| *r > 0.0 && *r <= 2000.0)
                        .ok_or_else(|| {
                            format!("--rate: checkouts a second, above 0 and at most 2000, got {value:?}")
                        })?;
                }
                "--report" => options.report = PathBuf::from(value),
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        Ok(options)
    }
}

/// One second of the live view, kept for the report.
#[derive(Debug, Clone)]
pub(crate) struct Tick {
    pub(crate) naive: Second,
    pub(crate) keel: Second,
    /// The protected run's breaker per route in [`ROUTES`].
    pub(crate) breakers: [&'static str; 3],
    /// Retries keel made in this second.
    pub(crate) retries: u64,
}

/// Runs the demo on a runtime of its own.
pub fn run(options: &Options) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(demo(options))
}

async fn demo(options: &Options) -> Result<(), String> {
    let io = |e: std::io::Error| format!("cannot listen on loopback: {e}");
    let naive_world = World::start().await.map_err(io)?;
    let keel_world = World::start().await.map_err(io)?;

    // The protected checkout's sidecar, on the example configuration with
    // this run's addresses.
    let mut config = Config::parse(CHECKOUT_TOML).map_err(|e| e.to_string())?;
    for (name, dep) in [
        ("payment", &keel_world.payment),
        ("inventory", &keel_world.inventory),
        ("recommendations", &keel_world.recommendations),
    ] {
        if let Some(upstream) = config.upstreams.get_mut(name) {
            upstream.endpoints = vec![dep.addr.to_string()];
        }
    }
    let data = TcpListener::bind("127.0.0.1:0").await.map_err(io)?;
    let admin = TcpListener::bind("127.0.0.1:0").await.map_err(io)?;
    let proxy_addr = data.local_addr().map_err(io)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (up, proxy) = tokio::sync::oneshot::channel::<Arc<Proxy>>();
    let sidecar = tokio::spawn(crate::server::serve_in_process(
        config,
        data,
        admin,
        async move {
            let _ = stopped.await;
        },
        move |proxy| {
            let _ = up.send(proxy);
        },
    ));
    let proxy = proxy
        .await
        .map_err(|_| "the sidecar did not start".to_owned())?;

    let started = Instant::now();
    let naive = Arc::new(Shop::naive(&naive_world, started));
    let keel = Arc::new(Shop::new(Calls::Protected { proxy: proxy_addr }, started));
    let duration = options.duration;
    println!(
        "keel demo: {} checkouts a second for {}, each run on its own copy of payment (~50 ms), inventory (~5 ms) and recommendations (~20 ms, optional)",
        options.rate,
        keel::config::format_duration(duration)
    );
    println!(
        "  naive: direct calls, no timeouts, 3 tries back to back, {} shared workers",
        32
    );
    println!("  keel:  the same calls through the keel sidecar (examples/checkout.toml)");
    println!("  a customer waits at most {}s", shop::PATIENCE.as_secs());
    println!();

    let events: Arc<Mutex<Vec<(f64, &'static str)>>> = Arc::default();
    let timeline = {
        let events = events.clone();
        let worlds = (naive_world, keel_world);
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            for change in TIMELINE {
                tokio::time::sleep_until(start + duration.mul_f64(change.at)).await;
                change.apply(&[&worlds.0, &worlds.1]);
                let at = started.elapsed().as_secs_f64();
                events
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((at, change.says));
            }
            worlds
        })
    };

    let ticks: Arc<Mutex<Vec<Tick>>> = Arc::default();
    let live = tokio::spawn(live_view(
        naive.clone(),
        keel.clone(),
        proxy.clone(),
        events.clone(),
        ticks.clone(),
        started,
    ));
    tokio::join!(
        naive.drive(options.rate, duration),
        keel.drive(options.rate, duration)
    );
    // One more tick for the last second, then the summary.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    live.abort();
    let worlds = timeline.await.map_err(|e| e.to_string())?;
    let _ = stop.send(());
    let _ = sidecar.await;

    let ticks = ticks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let events = events.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let faults_end = duration.as_secs_f64() * FAULTS_END;
    let naive_run = Run::measure(&naive, &worlds.0, faults_end);
    let keel_run = Run::measure(&keel, &worlds.1, faults_end);
    println!();
    print!("{}", summary(&naive_run, &keel_run));
    let html = report::html(options, &ticks, &events, faults_end, &naive_run, &keel_run);
    std::fs::write(&options.report, html)
        .map_err(|e| format!("{}: cannot write the report: {e}", options.report.display()))?;
    let path = std::fs::canonicalize(&options.report).unwrap_or(options.report.clone());
    println!("\nreport: {}", path.display());
    Ok(())
}

/// Prints a second at a time: a panel redrawn in place on a terminal,
/// plain lines otherwise.
async fn live_view(
    naive: Arc<Shop>,
    keel: Arc<Shop>,
    proxy: Arc<Proxy>,
    events: Arc<Mutex<Vec<(f64, &'static str)>>>,
    ticks: Arc<Mutex<Vec<Tick>>>,
    started: Instant,
) {
    let terminal = std::io::stdout().is_terminal();
    let mut drawn = 0usize;
    let mut retries_before = retries(&proxy);
    let mut said = 0usize;
    let mut phase = "normal";
    for i in 0usize.. {
        tokio::time::sleep_until((started + Duration::from_secs(i as u64 + 1)).into()).await;
        let retries_now = retries(&proxy);
        let table = proxy.table();
        let breakers = ROUTES.map(|name| {
            table
                .route_named(name)
                .and_then(|r| r.breaker.as_ref())
                .map_or("none", |b| b.state().as_str())
        });
        let tick = Tick {
            naive: naive.stats.second(i),
            keel: keel.stats.second(i),
            breakers,
            retries: retries_now.saturating_sub(retries_before),
        };
        retries_before = retries_now;
        let new_events: Vec<_> = {
            let events = events.lock().unwrap_or_else(|p| p.into_inner());
            events[said..].to_vec()
        };
        said += new_events.len();
        if let Some(&(_, says)) = new_events.last() {
            phase = says;
        }
        let mut out = String::new();
        if terminal {
            // Events scroll above the panel; the panel is redrawn in place.
            if drawn > 0 {
                let _ = write!(out, "\x1b[{drawn}A\x1b[J");
            }
            for (at, says) in &new_events {
                let _ = writeln!(out, "at {at:.1}s: {says}");
            }
            let _ = writeln!(out, "t = {:>3}s   {phase}", i + 1);
            let _ = writeln!(out, "         checkouts ok     p50      p95      p99");
            for (name, s) in [("naive", &tick.naive), ("keel", &tick.keel)] {
                let _ = writeln!(out, "{}", row(name, s));
            }
            let _ = writeln!(
                out,
                "keel:    breakers payment={} inventory={} recommendations={}   retries {}   fallbacks {}   rejections {}",
                breakers[0],
                breakers[1],
                breakers[2],
                tick.retries,
                keel.stats.fallbacks.load(std::sync::atomic::Ordering::Relaxed),
                keel.stats.rejections.load(std::sync::atomic::Ordering::Relaxed),
            );
            drawn = 5;
        } else {
            for (at, says) in &new_events {
                let _ = writeln!(out, "at {at:.1}s: {says}");
            }
            let _ = writeln!(
                out,
                "{:>3}s  naive {}  | keel {}  breakers {}/{}/{} retries {} fallbacks {} rejections {}",
                i + 1,
                brief(&tick.naive),
                brief(&tick.keel),
                breakers[0],
                breakers[1],
                breakers[2],
                tick.retries,
                keel.stats.fallbacks.load(std::sync::atomic::Ordering::Relaxed),
                keel.stats.rejections.load(std::sync::atomic::Ordering::Relaxed),
            );
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
        ticks.lock().unwrap_or_else(|p| p.into_inner()).push(tick);
    }
}

fn row(name: &str, s: &Second) -> String {
    format!(
        "{name:<8} {:>5} {:>6.1}%  {:>6.0}ms {:>6.0}ms {:>6.0}ms",
        s.total(),
        s.success(),
        quantile(&s.latencies, 0.50),
        quantile(&s.latencies, 0.95),
        quantile(&s.latencies, 0.99),
    )
}

fn brief(s: &Second) -> String {
    format!(
        "{:>3} done {:>5.1}% ok p50 {:>5.0}ms p99 {:>5.0}ms",
        s.total(),
        s.success(),
        quantile(&s.latencies, 0.50),
        quantile(&s.latencies, 0.99)
    )
}

/// Retries keel has made so far, every route together.
fn retries(proxy: &Proxy) -> u64 {
    proxy
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("keel_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A run's totals.
pub(crate) struct Run {
    pub(crate) checkouts: u64,
    pub(crate) success: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) payment_requests: u64,
    pub(crate) recommendation_requests: u64,
    /// Seconds from the end of the faults until success stayed at 95% or
    /// more for three seconds; `None` if it never did.
    pub(crate) recovery: Option<f64>,
}

impl Run {
    fn measure(shop: &Shop, world: &World, faults_end: f64) -> Run {
        let seconds = shop.stats.seconds();
        let all: Vec<f64> = seconds.iter().flat_map(|s| s.latencies.clone()).collect();
        let ok: u64 = seconds.iter().map(|s| s.ok).sum();
        let total: u64 = seconds.iter().map(Second::total).sum();
        let from = faults_end.ceil() as usize;
        let recovery = (from..seconds.len()).find(|&s| {
            let window = &seconds[s..(s + 3).min(seconds.len())];
            window.len() == 3 && window.iter().all(|w| w.total() > 0 && w.success() >= 95.0)
        });
        Run {
            checkouts: total,
            success: if total == 0 {
                0.0
            } else {
                100.0 * ok as f64 / total as f64
            },
            p50: quantile(&all, 0.50),
            p99: quantile(&all, 0.99),
            payment_requests: world.payment.hits(),
            recommendation_requests: world.recommendations.hits(),
            recovery: recovery.map(|s| (s as f64 - faults_end).max(0.0)),
        }
    }

    pub(crate) fn recovery_text(&self) -> String {
        match self.recovery {
            Some(s) => format!("{s:.0}s"),
            None => "not within the run".into(),
        }
    }
}

/// The summary's rows: what, naive's value, keel's value.
pub(crate) fn rows(naive: &Run, keel: &Run) -> Vec<(&'static str, String, String)> {
    let both = |f: &dyn Fn(&Run) -> String| (f(naive), f(keel));
    let rows: [(&'static str, (String, String)); 8] = [
        ("checkouts", both(&|r| r.checkouts.to_string())),
        (
            "checkout success rate",
            both(&|r| format!("{:.1}%", r.success)),
        ),
        ("p50 latency", both(&|r| format!("{:.0}ms", r.p50))),
        ("p99 latency", both(&|r| format!("{:.0}ms", r.p99))),
        (
            "requests that reached payment",
            both(&|r| r.payment_requests.to_string()),
        ),
        (
            "  per checkout (retry amplification)",
            both(&|r| format!("{:.2}", ratio(r.payment_requests, r.checkouts))),
        ),
        (
            "requests that reached recommendations",
            both(&|r| r.recommendation_requests.to_string()),
        ),
        (
            "time to recover after the faults",
            both(&Run::recovery_text),
        ),
    ];
    rows.into_iter()
        .map(|(what, (a, b))| (what, a, b))
        .collect()
}

/// The side-by-side summary.
fn summary(naive: &Run, keel: &Run) -> String {
    let mut out = String::from("summary                                naive        keel\n");
    for (what, a, b) in rows(naive, keel) {
        let _ = writeln!(out, "  {what:<34} {a:>10}  {b:>10}");
    }
    out
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}
