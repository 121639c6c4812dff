//! An open-loop HTTP/1.1 load generator, for `bench/proxy.sh`.
//!
//! ```text
//! loadgen --url http://127.0.0.1:PORT/ --rate N --duration SECS --connections C
//! ```
//!
//! wrk is closed-loop: a connection sends its next request only when the
//! previous answer is in, so a server that stalls is simply sent less, and
//! the requests that would have waited through the stall are never measured
//! ("coordinated omission"). Here the schedule is fixed in advance instead:
//! request `i` is due at `start + i / rate`, whatever happened to the
//! requests before it, and its latency is measured from that intended time.
//!
//! The schedule is spread over `C` keep-alive connections, request `i` going
//! to connection `i % C`. Each connection is owned by one task that sends its
//! share in order, one request at a time (HTTP/1.1 without pipelining): when
//! a request falls due while its connection is still busy with an earlier
//! one, it waits, and that wait is part of its latency. So `C` must be large
//! enough for `rate` (at most `C / latency` requests per second get through
//! without queueing), as it is for wrk2.
//!
//! Everything runs on one thread (a current-thread runtime), since
//! `bench/proxy.sh` pins the generator to one CPU.
//!
//! Tokio's timers tick in milliseconds, so a request whose connection is
//! idle is sent up to about a millisecond after its due time, and that
//! lateness is in its latency like any other wait (wrk2 has the same floor).
//! It is the same for every target; `lag_*` in the output show how late the
//! generator itself woke up, and the run against the upstream directly shows
//! the floor of the whole set-up.
//!
//! It prints one line of `key=value` fields:
//!
//! ```text
//! loadgen rate=20000 sent=200000 ok=200000 errors=0 p50_ms=0.612 p90_ms=0.950 p99_ms=1.402 p999_ms=2.113 max_ms=4.020 ...
//! ```
//!
//! `sent` counts the requests issued, `ok` those answered with a 2xx status,
//! `errors` the rest (other statuses, connection errors, timeouts), and
//! `unsent` those still not issued when the run's time was up (the schedule
//! plus a grace period); the percentiles are over the `ok` requests. The
//! first error's text goes to stderr.

#![forbid(unsafe_code)]

use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, Instant};

type BoxError = Box<dyn Error + Send + Sync>;

/// A sender on one HTTP/1.1 connection; the requests have no body.
type Sender = SendRequest<Empty<Bytes>>;

const USAGE: &str = "usage: loadgen --url http://HOST:PORT/PATH --rate REQUESTS_PER_SECOND \
                     --duration SECONDS --connections N";

/// How long one request (connecting included, when a connection has to be
/// re-opened) may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after the last due time requests may still be sent and
/// answered; whatever is not sent by then counts as `unsent`.
const GRACE: Duration = Duration::from_secs(5);

/// The first request is due this long after the connections are open, so
/// that it is not late from the start.
const LEAD_IN: Duration = Duration::from_millis(20);

/// Limits that keep a typo from allocating gigabytes or overflowing times.
const MAX_REQUESTS: u64 = 100_000_000;
const MAX_DURATION_SECS: f64 = 86_400.0;
const MAX_CONNECTIONS: usize = 10_000;

/// The flags, each taking a value.
const FLAGS: [&str; 4] = ["--url", "--rate", "--duration", "--connections"];

/// The command line.
struct Args {
    target: Target,
    /// Requests per second.
    rate: f64,
    /// Seconds the schedule lasts.
    duration: f64,
    /// Keep-alive connections to spread the schedule over.
    connections: usize,
}

/// Where requests go and what they look like.
#[derive(Clone)]
struct Target {
    /// The host to connect to (brackets of an IPv6 literal removed).
    host: String,
    port: u16,
    /// The `Host` header: the URL's authority.
    host_header: HeaderValue,
    /// The request target in origin form (`/path?query`).
    path: Uri,
}

impl Args {
    /// Parses `--flag value` or `--flag=value` pairs; every flag is required.
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut url = None;
        let mut rate = None;
        let mut duration = None;
        let mut connections = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let inline = arg
                .split_once('=')
                .map(|(flag, value)| (flag.to_owned(), value.to_owned()));
            let (flag, value) = match inline {
                Some(pair) => pair,
                None if FLAGS.contains(&arg.as_str()) => {
                    let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
                    (arg, value)
                }
                None => return Err(format!("unknown argument {arg:?}")),
            };
            match flag.as_str() {
                "--url" => url = Some(value),
                "--rate" => rate = Some(positive(&flag, &value)?),
                "--duration" => duration = Some(positive(&flag, &value)?),
                "--connections" => {
                    let n = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_CONNECTIONS).contains(n))
                        .ok_or_else(|| {
                            format!("--connections: expected 1 to {MAX_CONNECTIONS}, got {value:?}")
                        })?;
                    connections = Some(n);
                }
                _ => return Err(format!("unknown argument {flag:?}")),
            }
        }
        let url = url.ok_or("--url is required")?;
        let rate = rate.ok_or("--rate is required")?;
        let duration = duration.ok_or("--duration is required")?;
        let connections = connections.ok_or("--connections is required")?;
        if duration > MAX_DURATION_SECS {
            return Err(format!("--duration: at most {MAX_DURATION_SECS} seconds"));
        }
        let total = (rate * duration).round();
        if total < 1.0 {
            return Err("--rate × --duration is less than one request".into());
        }
        if total > MAX_REQUESTS as f64 {
            return Err(format!(
                "--rate × --duration is {total} requests; at most {MAX_REQUESTS}"
            ));
        }
        Ok(Args {
            target: Target::parse(&url)?,
            rate,
            duration,
            connections,
        })
    }

    /// How many requests the schedule holds.
    fn total(&self) -> u64 {
        (self.rate * self.duration).round() as u64
    }
}

/// A positive, finite number of something.
fn positive(flag: &str, value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .ok_or_else(|| format!("{flag}: expected a positive number, got {value:?}"))
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let uri: Uri = url.parse().map_err(|e| format!("--url {url:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("--url {url:?}: only http:// URLs are supported"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("--url {url:?}: no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|e| format!("--url {url:?}: {e}"))?;
        let path = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse::<Uri>()
            .map_err(|e| format!("--url {url:?}: {e}"))?;
        Ok(Target {
            host,
            port: authority.port_u16().unwrap_or(80),
            host_header,
            path,
        })
    }

    /// Opens a connection and starts its I/O task.
    async fn connect(&self) -> Result<Sender, BoxError> {
        let stream = timeout(
            REQUEST_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| "connect timed out")??;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        // The connection future does the reading and writing; it ends when
        // the sender is dropped or the peer closes. Its errors also fail the
        // request in flight, which is where they are counted.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// One request on `sender`'s connection, opening a new one when there is
    /// none (the last one failed). The connection is put back only when the
    /// exchange completed, so a failure or a timeout (which drops this future
    /// and with it the connection) means a fresh connection next time.
    async fn exchange(&self, sender: &mut Option<Sender>) -> Result<StatusCode, BoxError> {
        let mut reusable = sender.take();
        if let Some(conn) = reusable.as_mut() {
            // Requests on one connection are sequential, so it is idle
            // here; this only finds a connection the peer closed after the
            // last answer (a server's keep-alive limit, say). That is no
            // failure of this request, which was not sent: it goes on a new
            // connection.
            if conn.ready().await.is_err() {
                reusable = None;
            }
        }
        // A fresh connection takes its first request without waiting.
        let mut conn = match reusable {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        let mut request = Request::new(Empty::<Bytes>::new());
        *request.uri_mut() = self.path.clone();
        request.headers_mut().insert(HOST, self.host_header.clone());
        let response = conn.send_request(request).await?;
        let status = response.status();
        // The response is complete (and the connection free for the next
        // request) only once the body is read.
        response.into_body().collect().await?;
        *sender = Some(conn);
        Ok(status)
    }
}

/// One connection's share of the schedule: requests `first`, `first + step`,
/// `first + 2 * step`, ... below `total`.
#[derive(Clone, Copy)]
struct Plan {
    first: u64,
    step: u64,
    total: u64,
    rate: f64,
    start: Instant,
    /// Nothing is sent, and nothing waited for, after this.
    deadline: Instant,
}

impl Plan {
    /// When request `i` is due.
    fn due(&self, i: u64) -> Instant {
        self.start + Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// How many requests of this share are at or after `i`.
    fn left_from(&self, i: u64) -> u64 {
        self.total.saturating_sub(i).div_ceil(self.step)
    }
}

/// What one connection (or, merged, the whole run) saw.
#[derive(Default)]
struct Stats {
    sent: u64,
    ok: u64,
    errors: u64,
    unsent: u64,
    /// Of each `ok` request, from its due time to its last body byte, in
    /// nanoseconds.
    latencies: Vec<u64>,
    /// For requests whose connection was idle at their due time: how late
    /// the generator woke up to send them, in nanoseconds.
    lags: Vec<u64>,
    /// When the last answer (or failure) came in.
    last_done: Option<Instant>,
    first_error: Option<String>,
}

impl Stats {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }

    fn merge(&mut self, other: Stats) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.errors += other.errors;
        self.unsent += other.unsent;
        self.latencies.extend(other.latencies);
        self.lags.extend(other.lags);
        self.last_done = self.last_done.max(other.last_done);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Sends one connection's share of the schedule.
async fn drive(target: Target, sender: Sender, plan: Plan) -> Stats {
    let share = plan.left_from(plan.first);
    let mut stats = Stats {
        latencies: Vec::with_capacity(share as usize),
        lags: Vec::with_capacity(share as usize),
        ..Stats::default()
    };
    let mut sender = Some(sender);
    let mut i = plan.first;
    while i < plan.total {
        let due = plan.due(i);
        if Instant::now() < due {
            // The connection is free before the request is due: wait for
            // the schedule. (When it is not, the request is late already
            // and goes at once; the wait is part of its latency.)
            sleep_until(due).await;
            stats
                .lags
                .push(nanos(Instant::now().saturating_duration_since(due)));
        }
        let left = plan.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            stats.unsent += plan.left_from(i);
            break;
        }
        stats.sent += 1;
        let outcome = timeout(left.min(REQUEST_TIMEOUT), target.exchange(&mut sender)).await;
        let done = Instant::now();
        stats.last_done = Some(done);
        match outcome {
            Ok(Ok(status)) if status.is_success() => {
                stats.ok += 1;
                stats
                    .latencies
                    .push(nanos(done.saturating_duration_since(due)));
            }
            Ok(Ok(status)) => stats.error(format!("status {status}")),
            Ok(Err(e)) => stats.error(e.to_string()),
            Err(_) => stats.error("timed out".into()),
        }
        i += plan.step;
    }
    stats
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The `p`-th percentile (nearest rank) of sorted nanoseconds, in
/// milliseconds with three decimals, or `nan` when there are none.
fn percentile_ms(sorted: &[u64], p: f64) -> String {
    if sorted.is_empty() {
        return "nan".into();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let ns = sorted[rank.clamp(1, sorted.len()) - 1];
    format!("{:.3}", ns as f64 / 1e6)
}

async fn run(args: Args) -> Result<String, BoxError> {
    let target = &args.target;
    // Every connection is opened before the clock starts: connection set-up
    // stays out of the latencies, and a target that is down fails at once.
    let mut senders = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let sender = target
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", target.host, target.port))?;
        senders.push(sender);
    }

    let total = args.total();
    let start = Instant::now() + LEAD_IN;
    let mut plan = Plan {
        first: 0,
        step: args.connections as u64,
        total,
        rate: args.rate,
        start,
        deadline: start,
    };
    plan.deadline = plan.due(total) + GRACE;

    let mut tasks = JoinSet::new();
    for (index, sender) in senders.into_iter().enumerate() {
        let plan = Plan {
            first: index as u64,
            ..plan
        };
        tasks.spawn(drive(target.clone(), sender, plan));
    }
    let mut stats = Stats::default();
    while let Some(share) = tasks.join_next().await {
        stats.merge(share?);
    }

    if let Some(e) = &stats.first_error {
        eprintln!("loadgen: {} error(s); the first: {e}", stats.errors);
    }
    stats.latencies.sort_unstable();
    stats.lags.sort_unstable();
    let elapsed = stats
        .last_done
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(start))
        .as_secs_f64();
    let answered = stats.ok + stats.errors;
    let achieved = if elapsed > 0.0 {
        answered as f64 / elapsed
    } else {
        0.0
    };
    let l = &stats.latencies;
    Ok(format!(
        "loadgen rate={} sent={} ok={} errors={} p50_ms={} p90_ms={} p99_ms={} p999_ms={} \
         max_ms={} duration_s={} connections={} scheduled={total} unsent={} \
         achieved_rps={achieved:.1} lag_p50_ms={} lag_p99_ms={}",
        args.rate,
        stats.sent,
        stats.ok,
        stats.errors,
        percentile_ms(l, 50.0),
        percentile_ms(l, 90.0),
        percentile_ms(l, 99.0),
        percentile_ms(l, 99.9),
        percentile_ms(l, 100.0),
        args.duration,
        args.connections,
        stats.unsent,
        percentile_ms(&stats.lags, 50.0),
        percentile_ms(&stats.lags, 99.0),
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match Args::parse(args) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("loadgen: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(1)
        }
    }
}
