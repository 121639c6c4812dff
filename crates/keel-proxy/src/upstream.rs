//! Upstreams: their endpoints, the connection pool to them, the choice of an
//! endpoint per attempt (power of two choices on requests in flight), active
//! health checks, and outlier ejection.
//!
//! An endpoint is in rotation while it passes its health checks (or has
//! none) and is not ejected. Outlier detection ejects an endpoint after
//! `consecutive_failures` failures in a row (connect failures, resets,
//! timeouts, 5xx) for `base_ejection_time` times the number of times it was
//! ejected in a row, at most `max_ejection_time`; it never ejects the last
//! endpoint in rotation.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::Authority;
use hyper::body::{Body, Frame, SizeHint};
use metrics::{Counter, Gauge};

use crate::config::{self, FieldError};
use crate::h1::{Conn, ExchangeError, Framing, Outgoing, RequestBody, Step};
use crate::stall::{ClientBodyError, Stall};

/// The largest frame of bytes keel read ahead of a body it relays.
const PREFIX_FRAME: usize = 16 * 1024;

/// Why an attempt got no response from the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendError {
    /// No connection could be made (or no endpoint is in rotation).
    Connect,
    /// The endpoint's `max_connections` were all busy until the connect
    /// timeout: keel's own bound, not the endpoint failing.
    PoolFull,
    /// The connection failed after the request was (maybe) sent.
    Reset,
    /// The client's request body failed or ended short: the upstream is
    /// not to blame.
    RequestBody,
    /// The client's request body stalled past `server.request_body_timeout`.
    RequestTimeout,
    /// No response head within the upstream's `read_timeout`.
    Timeout,
}

/// Counts, in a request's extensions, the attempts that had a connection
/// and started writing the request: each may have made the upstream act,
/// whatever came back.
#[derive(Debug, Clone, Default)]
pub(crate) struct Written(Arc<AtomicU32>);

impl Written {
    pub(crate) fn count(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }
}

/// One upstream and its endpoints.
pub(crate) struct Upstream {
    pub(crate) name: Arc<str>,
    pub(crate) config: config::Upstream,
    pub(crate) endpoints: Box<[Endpoint]>,
    epoch: Instant,
    /// Health-check tasks, stopped when the upstream goes (on reload).
    checks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// One endpoint of an upstream.
pub(crate) struct Endpoint {
    /// Its place in its upstream's list.
    index: usize,
    pub(crate) address: Arc<str>,
    authority: Authority,
    /// Its connections: the kept-alive ones ready for a request, and the
    /// count of all open.
    pool: Arc<Pool>,
    in_flight: AtomicU32,
    /// Passing its health checks (always, without any).
    healthy: AtomicBool,
    consecutive_failures: AtomicU32,
    /// Nanoseconds since the upstream's epoch until which it is ejected;
    /// 0 when it is not.
    ejected_until: AtomicU64,
    /// Ejections in a row, for the growing ejection time.
    ejections: AtomicU32,
    in_rotation: Gauge,
    ejected_total: Counter,
}

impl Upstream {
    /// Builds an upstream and, with a runtime, starts its health checks.
    /// The configuration was checked with the same parsers; an error names
    /// its field all the same.
    pub(crate) fn new(name: &str, config: &config::Upstream) -> Result<Arc<Upstream>, FieldError> {
        let at = |field: String, reason: String| FieldError {
            path: format!("upstreams.{name}.{field}"),
            reason,
        };
        let authorities = config
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| config::endpoint(e).map_err(|r| at(format!("endpoints[{i}]"), r)))
            .collect::<Result<Vec<_>, _>>()?;
        let check = match &config.health_check {
            Some(hc) => Some((
                hc.clone(),
                config::health_check_request(&hc.path)
                    .map_err(|r| at("health_check.path".into(), r))?,
            )),
            None => None,
        };
        let endpoints = config
            .endpoints
            .iter()
            .zip(authorities)
            .enumerate()
            .map(|(index, (address, authority))| Endpoint {
                index,
                address: address.as_str().into(),
                authority,
                pool: Arc::new(Pool::new(config)),
                in_flight: AtomicU32::new(0),
                healthy: AtomicBool::new(true),
                consecutive_failures: AtomicU32::new(0),
                ejected_until: AtomicU64::new(0),
                ejections: AtomicU32::new(0),
                in_rotation: metrics::gauge!(crate::metrics::UPSTREAM_HEALTHY, "upstream" => name.to_owned(), "endpoint" => address.clone()),
                ejected_total: metrics::counter!(crate::metrics::EJECTIONS, "upstream" => name.to_owned(), "endpoint" => address.clone()),
            })
            .collect::<Box<[_]>>();
        for e in endpoints.iter() {
            e.in_rotation.set(1.0);
        }
        let upstream = Arc::new(Upstream {
            name: name.into(),
            config: config.clone(),
            endpoints,
            epoch: Instant::now(),
            checks: std::sync::Mutex::default(),
        });
        if let Some((hc, request)) = check {
            let tasks = (0..upstream.endpoints.len())
                .map(|i| {
                    tokio::spawn(health_check(
                        Arc::downgrade(&upstream),
                        i,
                        hc.clone(),
                        request.clone(),
                    ))
                })
                .collect();
            *upstream.checks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        }
        Ok(upstream)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Whether `e` is ejected now. Reads the clock only for an endpoint
    /// that was ejected, so the common path (nothing ejected) has no clock
    /// read per request.
    fn ejected(&self, e: &Endpoint) -> bool {
        let until = e.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if self.now() < until {
            return true;
        }
        // The ejection is over: back in rotation (once, for the gauge).
        if e.ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::info!(upstream = %self.name, endpoint = %e.address, "endpoint back in rotation after ejection");
            if e.healthy.load(Ordering::Relaxed) {
                e.in_rotation.set(1.0);
            }
        }
        false
    }

    /// Endpoints passing their health checks (ejection aside).
    pub(crate) fn healthy_endpoints(&self) -> usize {
        self.endpoints
            .iter()
            .filter(|e| e.healthy.load(Ordering::Relaxed))
            .count()
    }

    /// Picks an endpoint in rotation: the less busy of two chosen at random.
    pub(crate) fn pick(&self) -> Option<Picked<'_>> {
        let n = self.endpoints.len();
        let eligible = |i: usize| {
            self.endpoints[i].healthy.load(Ordering::Relaxed) && !self.ejected(&self.endpoints[i])
        };
        let chosen = if n == 1 {
            eligible(0).then_some(0)
        } else {
            let a = random_below(n);
            let b = (a + 1 + random_below(n - 1)) % n;
            match (eligible(a), eligible(b)) {
                (true, true) => {
                    let load = |i: usize| self.endpoints[i].in_flight.load(Ordering::Relaxed);
                    Some(if load(b) < load(a) { b } else { a })
                }
                (true, false) => Some(a),
                (false, true) => Some(b),
                // Both out: take the first in rotation from a random start.
                (false, false) => (0..n).map(|k| (a + k) % n).find(|&i| eligible(i)),
            }
        };
        let endpoint = &self.endpoints[chosen?];
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            upstream: self,
            endpoint,
        })
    }

    /// Sends a request (its head borrowed: a retry sends it again) to
    /// `endpoint` on a kept-alive connection, or a new one, and reads the
    /// response head. The URI goes out as its path and query (origin form:
    /// an absolute-form URI, meant for a forward proxy, is cut down to them).
    ///
    /// `head_timeout` bounds the wait for the response head (the caller
    /// leaves it out when a timeout of its own ends sooner); the body's
    /// bytes are each bounded by `read_timeout`, and a body cut short counts
    /// against the endpoint in outlier detection.
    pub(crate) async fn send(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        parts: &http::request::Parts,
        body: RequestBody,
        head_timeout: Option<std::time::Duration>,
    ) -> Result<http::Response<PooledBody>, SendError> {
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut leased = self.connection(endpoint).await?;
        let conn = &mut leased.conn;
        if let Some(written) = parts.extensions.get::<Written>() {
            written.0.fetch_add(1, Ordering::AcqRel);
        }
        let request = Outgoing {
            method: &parts.method,
            target,
            headers: &parts.headers,
            host: endpoint.authority.as_str(),
        };
        let head = match body.into_small() {
            Ok(body) => conn.exchange_small(request, &body, head_timeout).await,
            Err(body) => Box::pin(conn.exchange(request, body, head_timeout)).await,
        };
        let head = head.map_err(|e| {
                tracing::debug!(upstream = %self.name, endpoint = %endpoint.address, error = %e, "upstream exchange failed");
                match e {
                    ExchangeError::RequestBody(ClientBodyError::Stalled) => SendError::RequestTimeout,
                    ExchangeError::RequestBody(_) => SendError::RequestBody,
                    ExchangeError::Io(_) => SendError::Reset,
                    ExchangeError::HeadTimeout => SendError::Timeout,
                }
            })?;
        let mut response = http::Response::new(PooledBody {
            prefix: None,
            framing: head.framing,
            conn: Some(leased),
            keep_alive: head.keep_alive,
            pool: endpoint.pool.clone(),
            stall: Stall::new(self.config.read_timeout),
            from: Some((self.clone(), endpoint.index)),
        });
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        if head.framing.is_done() {
            response.body_mut().release();
        }
        Ok(response)
    }

    /// A connection to `endpoint` ready for a request: the most recently
    /// used idle one that is still open, else a new one if the endpoint
    /// has fewer than `max_connections`, else the first to come free, all
    /// within `connect_timeout`.
    async fn connection(&self, endpoint: &Endpoint) -> Result<Leased, SendError> {
        let pool = &endpoint.pool;
        if let Some(leased) = pool.take() {
            // The common case, without a clock read.
            return Ok(leased);
        }
        let deadline = tokio::time::Instant::now() + self.config.connect_timeout;
        loop {
            if let Some(slot) = pool.slot() {
                let connect = tokio::net::TcpStream::connect(endpoint.address.as_ref());
                let stream = match tokio::time::timeout_at(deadline, connect).await {
                    Ok(Ok(stream)) => stream,
                    _ => return Err(SendError::Connect),
                };
                let _ = stream.set_nodelay(true);
                return Ok(Leased {
                    conn: Box::new(Conn::new(stream)),
                    _slot: slot,
                });
            }
            // Every connection is busy: wait for one to be put back or
            // closed. Registered before looking again, so that neither
            // can slip by unheard.
            let freed = pool.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            let _waiting = Waiter::new(&pool.waiting);
            let ready = pool.has_idle() || pool.has_room();
            let waited = if ready {
                Ok(())
            } else {
                tokio::time::timeout_at(deadline, freed).await
            };
            if waited.is_err() {
                return Err(SendError::PoolFull);
            }
            if let Some(leased) = pool.take() {
                return Ok(leased);
            }
        }
    }

    /// Closes the connections idle longer than `idle_timeout`.
    pub(crate) fn close_idle(&self) {
        for e in self.endpoints.iter() {
            e.pool.close_idle();
        }
    }

    fn record(&self, endpoint: &Endpoint, failed: bool) {
        let outlier = &self.config.outlier_detection;
        if outlier.consecutive_failures == 0 {
            return;
        }
        if !failed {
            endpoint.consecutive_failures.store(0, Ordering::Relaxed);
            if endpoint.ejected_until.load(Ordering::Relaxed) == 0 {
                endpoint.ejections.store(0, Ordering::Relaxed);
            }
            return;
        }
        let failures = endpoint
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if failures < outlier.consecutive_failures {
            return;
        }
        if self.ejected(endpoint) {
            return;
        }
        // Never eject the last endpoint in rotation.
        let others = self
            .endpoints
            .iter()
            .filter(|e| {
                !std::ptr::eq(*e, endpoint) && e.healthy.load(Ordering::Relaxed) && !self.ejected(e)
            })
            .count();
        if others == 0 {
            return;
        }
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        let times = endpoint.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let time = outlier
            .base_ejection_time
            .saturating_mul(times)
            .min(outlier.max_ejection_time);
        let until = self
            .now()
            .saturating_add(u64::try_from(time.as_nanos()).unwrap_or(u64::MAX));
        endpoint.ejected_until.store(until, Ordering::Relaxed);
        endpoint.in_rotation.set(0.0);
        endpoint.ejected_total.increment(1);
        tracing::warn!(upstream = %self.name, endpoint = %endpoint.address, failures, ejected_for = ?time, "endpoint ejected after failures in a row");
    }

    /// For `/state`: each endpoint's standing.
    pub(crate) fn state(&self) -> serde_json::Value {
        let endpoints: Vec<_> = self
            .endpoints
            .iter()
            .map(|e| {
                serde_json::json!({
                    "endpoint": &*e.address,
                    "healthy": e.healthy.load(Ordering::Relaxed),
                    "ejected": self.ejected(e),
                    "in_flight": e.in_flight.load(Ordering::Relaxed),
                })
            })
            .collect();
        serde_json::json!({ "endpoints": endpoints, "required": self.config.required })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for task in self
            .checks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

/// An endpoint chosen for one attempt; counts it as in flight until told
/// how the attempt went, or dropped.
pub(crate) struct Picked<'a> {
    upstream: &'a Upstream,
    pub(crate) endpoint: &'a Endpoint,
}

impl Picked<'_> {
    /// The attempt is over; `failed` feeds outlier detection.
    pub(crate) fn done(self, failed: bool) {
        self.upstream.record(self.endpoint, failed);
    }
}

impl Drop for Picked<'_> {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An upstream connection, counted against its endpoint's
/// `max_connections` while it is open. Its state is on the heap, allocated
/// once per connection: what moves with each request (into and out of the
/// pool, inside every response body and every policy's future) is two
/// pointers, not the socket and its buffers.
pub(crate) struct Leased {
    pub(crate) conn: Box<Conn>,
    _slot: Slot,
}

/// An endpoint's connections: the idle ones, and how many are open.
struct Pool {
    /// Kept-alive connections ready for a request and since when they are
    /// idle, the most recent last.
    idle: std::sync::Mutex<Vec<(Leased, u32)>>,
    /// The pool's clock, in seconds: advanced by [`Pool::close_idle`],
    /// which the proxy's upkeep calls every second. Idle connections are
    /// stamped with it, so that putting one back and taking one read no
    /// clock.
    ticks: AtomicU32,
    /// `idle_timeout` in ticks, rounded up.
    open: Arc<Open>,
    /// Requests waiting for a connection to come free.
    waiting: AtomicU32,
    freed: Arc<tokio::sync::Notify>,
    idle_ticks: u32,
}

/// The count of an endpoint's open connections.
struct Open {
    count: AtomicU32,
    max: u32,
    freed: Arc<tokio::sync::Notify>,
}

/// A request counted as waiting for a connection while it lives (a wait
/// cut short by a timeout uncounts itself too).
struct Waiter<'a>(&'a AtomicU32);

impl<'a> Waiter<'a> {
    fn new(count: &'a AtomicU32) -> Waiter<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Waiter(count)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One open connection's place in the count.
struct Slot(Arc<Open>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        // A waiter, if any, may open one now.
        self.0.freed.notify_one();
    }
}

impl Pool {
    fn new(config: &config::Upstream) -> Pool {
        let freed = Arc::new(tokio::sync::Notify::new());
        Pool {
            idle: std::sync::Mutex::default(),
            open: Arc::new(Open {
                count: AtomicU32::new(0),
                max: config.max_connections,
                freed: freed.clone(),
            }),
            waiting: AtomicU32::new(0),
            freed,
            ticks: AtomicU32::new(0),
            idle_ticks: u32::try_from(config.idle_timeout.as_millis().div_ceil(1000))
                .unwrap_or(u32::MAX),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Leased, u32)>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection that is still open. One idle
    /// past `idle_timeout` is closed by the next [`Pool::close_idle`],
    /// within a second.
    fn take(&self) -> Option<Leased> {
        let mut idle = self.lock();
        while let Some((leased, _)) = idle.pop() {
            if leased.conn.is_usable() {
                return Some(leased);
            }
        }
        None
    }

    fn put(&self, leased: Leased) {
        let now = self.ticks.load(Ordering::Relaxed);
        self.lock().push((leased, now));
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_one();
        }
    }

    /// A place for a new connection, if the endpoint has room.
    fn slot(&self) -> Option<Slot> {
        let open = &self.open;
        open.count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < open.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(open.clone()))
    }

    fn has_idle(&self) -> bool {
        !self.lock().is_empty()
    }

    fn has_room(&self) -> bool {
        self.open.count.load(Ordering::SeqCst) < self.open.max
    }

    /// One tick of the pool's clock, then closes the connections idle past
    /// `idle_timeout`. One stamped `since` has been idle more than
    /// `now - since - 1` whole ticks, so it goes once that reaches
    /// `idle_ticks`: never early, at most a tick late.
    fn close_idle(&self) {
        let now = self.ticks.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let mut idle = self.lock();
        let expired = idle
            .iter()
            .take_while(|(_, since)| now.wrapping_sub(*since).saturating_sub(1) >= self.idle_ticks)
            .count();
        idle.drain(..expired);
    }
}

/// An upstream response's body, decoded from its connection as it is
/// polled. Once it has been read to the end, the connection goes back to
/// the endpoint's idle list (when the upstream keeps it alive); dropped
/// before the end, the connection is closed with it.
pub(crate) struct PooledBody {
    /// Bytes already read from the body by keel, sent first.
    prefix: Option<Bytes>,
    framing: Framing,
    /// `None` once the body is read or failed.
    conn: Option<Leased>,
    keep_alive: bool,
    pool: Arc<Pool>,
    /// The wait for the body's next bytes, up to `read_timeout`.
    stall: Stall,
    /// The upstream and endpoint it comes from, told if it fails.
    from: Option<(Arc<Upstream>, usize)>,
}

impl PooledBody {
    /// The body with `read` (bytes keel read from it already) put back in
    /// front.
    pub(crate) fn with_prefix(mut self, read: Bytes) -> PooledBody {
        self.prefix = Some(read);
        self
    }

    fn release(&mut self) {
        self.from = None;
        if let Some(leased) = self.conn.take() {
            if self.keep_alive && leased.conn.is_clean() {
                self.pool.put(leased);
            }
        }
    }

    /// The body failed with `e`: the connection is closed and the endpoint
    /// hears of it.
    fn fail(&mut self, e: std::io::Error) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.conn = None;
        if let Some((upstream, i)) = self.from.take() {
            tracing::debug!(upstream = %upstream.name, endpoint = %upstream.endpoints[i].address, error = %e, "upstream response body failed");
            upstream.record(&upstream.endpoints[i], true);
        }
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if let Some(read) = this.prefix.as_mut() {
            // In frames of the size a read gives, so that the client's
            // progress is seen (server.response_idle_timeout) as it takes
            // them.
            let frame = if read.len() > PREFIX_FRAME {
                read.split_to(PREFIX_FRAME)
            } else {
                this.prefix.take().unwrap_or_default()
            };
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        loop {
            let Some(Leased { conn, .. }) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match conn.decode(&mut this.framing) {
                Ok(Step::Frame(frame)) => {
                    if this.framing.is_done() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(Step::End) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => return this.fail(e),
            }
            match conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) if this.framing == Framing::Close => {
                    this.framing = Framing::Length(0);
                    this.conn = None;
                    this.from = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    return this.fail(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before the body's end",
                    ));
                }
                Poll::Ready(Ok(_)) => this.stall.progress(),
                Poll::Ready(Err(e)) => return this.fail(e),
                Poll::Pending => {
                    std::task::ready!(this.stall.poll_expired(cx));
                    return this.fail(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no byte of the upstream's body within read_timeout",
                    ));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && (self.conn.is_none() || self.framing.is_done())
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n + prefix),
            _ if self.conn.is_none() => SizeHint::with_exact(prefix),
            _ => {
                let mut hint = SizeHint::new();
                hint.set_lower(prefix);
                hint
            }
        }
    }
}

/// Checks endpoint `i` every interval while the upstream lives.
async fn health_check(
    upstream: Weak<Upstream>,
    i: usize,
    hc: config::HealthCheck,
    request: http::request::Parts,
) {
    let mut passes = 0u32;
    let mut failures = 0u32;
    let mut tick = tokio::time::interval(hc.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(up) = upstream.upgrade() else { return };
        let endpoint = &up.endpoints[i];
        // Read to the end, so that the connection is kept for the next one.
        let check = async {
            let body = RequestBody::Buffered(Bytes::new());
            let response = match up.send(endpoint, &request, body, None).await {
                Ok(response) => response,
                // Every connection busy with traffic: says nothing of health.
                Err(SendError::PoolFull) => return None,
                Err(_) => return Some(false),
            };
            let ok = response.status().is_success();
            let read = http_body_util::BodyExt::collect(response.into_body()).await;
            Some(ok && read.is_ok())
        };
        let ok = match tokio::time::timeout(hc.timeout, check).await {
            Ok(Some(ok)) => ok,
            Ok(None) => continue,
            Err(_) => false,
        };
        let was = endpoint.healthy.load(Ordering::Relaxed);
        if ok {
            passes += 1;
            failures = 0;
            if !was && passes >= hc.healthy_threshold {
                endpoint.healthy.store(true, Ordering::Relaxed);
                if !up.ejected(endpoint) {
                    endpoint.in_rotation.set(1.0);
                }
                tracing::info!(upstream = %up.name, endpoint = %endpoint.address, "endpoint passes its health check: back in rotation");
            }
        } else {
            failures += 1;
            passes = 0;
            if was && failures >= hc.unhealthy_threshold {
                endpoint.healthy.store(false, Ordering::Relaxed);
                endpoint.in_rotation.set(0.0);
                tracing::warn!(upstream = %up.name, endpoint = %endpoint.address, failures, "endpoint fails its health check: out of rotation");
            }
        }
    }
}

/// A random number below `n` (n > 0), from a per-thread xorshift.
fn random_below(n: usize) -> usize {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new().build_hasher().finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (((x >> 32) * n as u64) >> 32) as usize
    })
}
