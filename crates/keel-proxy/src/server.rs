//! `keel run`: the listeners, the signals, reload and graceful shutdown.
//!
//! SIGTERM or SIGINT stops accepting, lets requests in flight finish (up to
//! `server.shutdown_timeout`) and returns. SIGHUP reads the file again: an
//! invalid file is logged and the old configuration keeps serving; a valid
//! one takes over, keeping the state of routes that did not change.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::guard::{until_idle, Tracked, Waiting};
use crate::linger::Lingering;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, Table};
use crate::route::Peer;

/// Requests' heads may take this much buffer; larger ones get 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Admin connections open at once at most: the admin plane's own budget,
/// so that probes and scrapes are answered whatever the data plane's
/// clients do.
const MAX_ADMIN_CONNECTIONS: usize = 256;

/// One plane's client connections, against its budget.
#[derive(Debug)]
struct Budget {
    open: AtomicUsize,
    gauge: metrics::Gauge,
    rejected: metrics::Counter,
}

impl Budget {
    fn new(plane: &'static str) -> Arc<Budget> {
        Arc::new(Budget {
            open: AtomicUsize::new(0),
            gauge: metrics::gauge!(crate::metrics::CONNECTIONS, "plane" => plane),
            rejected: metrics::counter!(crate::metrics::CONNECTIONS_REJECTED, "plane" => plane),
        })
    }

    /// A place for one more connection, if fewer than `max` are open;
    /// else the refusal is counted (the caller closes the connection).
    fn admit(self: &Arc<Self>, max: usize) -> Option<Admitted> {
        let admitted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.rejected.increment(1);
            return None;
        }
        self.gauge.increment(1.0);
        Some(Admitted(self.clone()))
    }
}

/// A connection counted in its plane's budget until it ends.
#[derive(Debug)]
struct Admitted(Arc<Budget>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.decrement(1.0);
    }
}

/// Reads and checks the configuration file.
pub fn load(path: &Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    Config::parse(&text).map_err(|errors| {
        let mut message = format!("{}: {} error(s)", path.display(), errors.0.len());
        for e in &errors.0 {
            message.push_str("\n  ");
            message.push_str(&e.to_string());
        }
        message
    })
}

/// Runs the proxy for the configuration at `path` until SIGTERM or SIGINT.
pub fn run(path: &Path) -> Result<(), String> {
    let config = load(path)?;
    let workers = config
        .server
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("keel-worker")
            .enable_all()
            .build()
    }
    .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(serve(path.to_owned(), config))
}

async fn serve(path: PathBuf, config: Config) -> Result<(), String> {
    let metrics = Metrics::install();
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hangup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;

    let listen = config.server.listen.clone();
    let admin_at = config.server.admin.clone();
    let data = TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("server.listen: cannot listen on {listen}: {e}"))?;
    let admin = TcpListener::bind(&admin_at)
        .await
        .map_err(|e| format!("server.admin: cannot listen on {admin_at}: {e}"))?;
    let table = Table::build(config, None, &metrics).map_err(|e| e.to_string())?;
    let proxy = Arc::new(Proxy::new(table, metrics));

    tokio::spawn(upkeep(proxy.clone()));
    tokio::spawn(serve_admin(admin, proxy.clone()));
    proxy.started.store(true, Ordering::Release);
    tracing::info!(listen = %listen, admin = %admin_at, config = %path.display(), "keel is serving");

    let graceful = GracefulShutdown::new();
    let budget = Budget::new("data");
    loop {
        tokio::select! {
            accepted = data.accept() => match accepted {
                Ok((stream, peer)) => connection(stream, peer, &proxy, &graceful, &budget),
                Err(e) => {
                    // Out of file descriptors and the like: wait, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = hangup.recv() => reload(&path, &proxy),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }

    proxy.draining.store(true, Ordering::Release);
    drop(data);
    let timeout = proxy.table().config.server.shutdown_timeout;
    tracing::info!(
        ?timeout,
        "shutting down: no new connections; finishing requests in flight"
    );
    // Keyed requests' executions may outlive their connections: they
    // finish too, or their keys are left held with outcomes unknown.
    let finished = async {
        graceful.shutdown().await;
        crate::route::executions_finished().await;
    };
    match tokio::time::timeout(timeout, finished).await {
        Ok(()) => tracing::info!("every request finished; bye"),
        Err(_) => tracing::warn!(
            ?timeout,
            "requests still in flight at the shutdown timeout were cut off"
        ),
    }
    Ok(())
}

/// Serves one accepted connection on its own task, watched by `graceful`;
/// past `server.max_connections` open, closes it at once.
fn connection(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    proxy: &Arc<Proxy>,
    graceful: &GracefulShutdown,
    budget: &Arc<Budget>,
) {
    let server = &proxy.table().config.server;
    let Some(admitted) = budget.admit(server.max_connections) else {
        tracing::debug!(%peer, max = server.max_connections, "connection closed at once: server.max_connections are open");
        return;
    };
    let _ = stream.set_nodelay(true);
    let (head_timeout, response_timeout) =
        (server.request_head_timeout, server.response_idle_timeout);
    let waiting = Waiting::new();
    let proxy = proxy.clone();
    let client = Arc::new(Peer::new(peer));
    let w = waiting.clone();
    let service = service_fn(move |request| {
        let (proxy, client) = (proxy.clone(), client.clone());
        let in_flight = w.request();
        async move {
            let response = proxy.handle(request, &client).await;
            Ok::<_, Infallible>(response.map(|body| Tracked::new(body, in_flight)))
        }
    });
    // No timer of hyper's: the slow-client guard (guard.rs) does its job
    // with one timer per connection instead of one per request.
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_header_size(MAX_HEAD_BYTES)
        // Head and small bodies in one buffer, one send.
        .writev(false)
        .serve_connection(TokioIo::new(Lingering::new(stream)), service);
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        let _admitted = admitted;
        match until_idle(connection, &waiting, head_timeout, response_timeout).await {
            Some(Err(e)) => {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            Some(Ok(())) => {}
            None => {
                tracing::debug!(%peer, timeout = ?head_timeout, "connection closed: no request head within server.request_head_timeout")
            }
        }
    });
}

/// A proxy serving `config` inside this process (for `keel demo`), on
/// listeners the caller bound, until `stop` resolves; no signals, no reload.
pub(crate) async fn serve_in_process(
    config: Config,
    data: TcpListener,
    admin: TcpListener,
    stop: impl std::future::Future<Output = ()>,
    started: impl FnOnce(Arc<Proxy>),
) -> Result<(), String> {
    let metrics = Metrics::install();
    let table = Table::build(config, None, &metrics).map_err(|e| e.to_string())?;
    let proxy = Arc::new(Proxy::new(table, metrics));
    let upkeep = tokio::spawn(upkeep(proxy.clone()));
    let admin = tokio::spawn(serve_admin(admin, proxy.clone()));
    proxy.started.store(true, Ordering::Release);
    started(proxy.clone());
    let graceful = GracefulShutdown::new();
    let budget = Budget::new("data");
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            accepted = data.accept() => {
                if let Ok((stream, peer)) = accepted {
                    connection(stream, peer, &proxy, &graceful, &budget);
                }
            }
            () = &mut stop => break,
        }
    }
    upkeep.abort();
    admin.abort();
    drop(data);
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
    Ok(())
}

fn reload(path: &Path, proxy: &Proxy) {
    tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
    let config = match load(path) {
        Ok(config) => config,
        Err(errors) => {
            tracing::error!(
                "the new configuration is invalid; the old one keeps serving:\n{errors}"
            );
            return;
        }
    };
    let old = proxy.table();
    if config.server.listen != old.config.server.listen
        || config.server.admin != old.config.server.admin
        || config.server.workers != old.config.server.workers
    {
        tracing::warn!(
            "server.listen, server.admin and server.workers take effect on restart only"
        );
    }
    if let Err(errors) = proxy.reload(config) {
        tracing::error!(
            "the new configuration could not be built; the old one keeps serving:\n{errors}"
        );
    }
}

async fn serve_admin(listener: TcpListener, proxy: Arc<Proxy>) {
    let budget = Budget::new("admin");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(admitted) = budget.admit(MAX_ADMIN_CONNECTIONS) else {
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let service = service_fn(move |request| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(crate::admin::handle(proxy, request).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Every second, closes upstream connections idle past their
/// `idle_timeout`; every five, drains histogram samples, so memory stays
/// flat between scrapes.
async fn upkeep(proxy: Arc<Proxy>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tick.tick().await;
        for upstream in proxy.table().upstreams.values() {
            upstream.close_idle();
        }
        if n % 5 == 0 {
            proxy.metrics.upkeep();
        }
    }
}
