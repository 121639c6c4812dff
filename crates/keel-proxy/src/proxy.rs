//! The routing table and the proxy that serves requests through it.
//!
//! A [`Table`] is built from a checked [`Config`]. On reload the new table
//! takes over, from the old one, every upstream whose configuration did not
//! change and every route whose configuration and upstream did not change,
//! so their state (breakers, limiters, bulkheads, endpoint health) goes on.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use keel::shed::LoadShedder;

use crate::config::{Config, ConfigErrors, FieldError};
use crate::metrics::{Metrics, RouteMetrics, UNMATCHED};
use crate::path::AboveRoot;
use crate::route::{Failure, Peer, ResponseBody, Route, PRIORITY};
use crate::stall::ClientBody;
use crate::store::Stores;
use crate::upstream::Upstream;

/// Everything one configuration serves with.
#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) config: Config,
    /// Longest prefix first.
    pub(crate) routes: Vec<Arc<Route>>,
    pub(crate) upstreams: BTreeMap<String, Arc<Upstream>>,
    pub(crate) shed: Option<LoadShedder>,
    pub(crate) stores: Arc<Stores>,
}

impl Table {
    /// Builds the table for `config`, keeping what did not change from
    /// `old`. Needs a tokio runtime (health checks are tasks).
    pub(crate) fn build(
        config: Config,
        old: Option<&Table>,
        metrics: &Metrics,
    ) -> Result<Table, ConfigErrors> {
        metrics.set_routes(config.routes.iter().map(|r| r.name.as_str()));
        let mut upstreams = BTreeMap::new();
        for (name, cfg) in &config.upstreams {
            let kept = old
                .and_then(|t| t.upstreams.get(name))
                .filter(|u| u.config == *cfg)
                .cloned();
            let upstream = match kept {
                Some(upstream) => upstream,
                None => Upstream::new(name, cfg).map_err(|e| ConfigErrors(vec![e]))?,
            };
            upstreams.insert(name.clone(), upstream);
        }
        let stores = Stores::open(&config.store, old.map(|t| &t.stores))
            .map_err(|e| ConfigErrors(vec![e]))?;
        let mut errors = Vec::new();
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, cfg) in config.routes.iter().enumerate() {
            let Some(upstream) = upstreams.get(&cfg.upstream) else {
                errors.push(FieldError {
                    path: format!("routes[{i}].upstream"),
                    reason: format!("no upstream named \"{}\"", cfg.upstream),
                });
                continue;
            };
            let kept = old.and_then(|t| {
                t.routes.iter().find(|r| {
                    r.config == *cfg
                        && Arc::ptr_eq(&r.upstream, upstream)
                        && r.stores.as_ref().is_none_or(|s| Arc::ptr_eq(s, &stores))
                })
            });
            match kept {
                Some(route) => routes.push(route.clone()),
                None => match Route::new(cfg, upstream.clone(), &stores) {
                    Ok(route) => routes.push(Arc::new(route)),
                    Err(e) => errors.push(FieldError {
                        path: format!("routes[{i}].{}", e.field()),
                        reason: e.reason().to_owned(),
                    }),
                },
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        routes.sort_by_key(|r| {
            let prefix = &r.config.path_prefix;
            std::cmp::Reverse(prefix.strip_suffix('/').unwrap_or(prefix).len())
        });
        let shed = match (&config.load_shed, old) {
            (None, _) => None,
            (Some(ls), Some(old)) if old.config.load_shed.as_ref() == Some(ls) => old.shed.clone(),
            (Some(ls), _) => Some(
                LoadShedder::builder("load_shed")
                    .capacity(ls.max_in_flight)
                    .build()
                    .map_err(|e| {
                        ConfigErrors(vec![FieldError {
                            path: "load_shed.max_in_flight".into(),
                            reason: e.reason().to_owned(),
                        }])
                    })?,
            ),
        };
        Ok(Table {
            config,
            routes,
            upstreams,
            shed,
            stores,
        })
    }

    /// The route for the normalised `path`: the longest prefix matching
    /// whole segments.
    pub(crate) fn route(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes
            .iter()
            .find(|r| crate::path::matches(&r.config.path_prefix, path))
    }

    /// The route called `name`.
    pub(crate) fn route_named(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| &*r.name == name)
    }
}

/// The running proxy: the current table and the process's standing.
#[derive(Debug)]
pub(crate) struct Proxy {
    /// Read per request without a lock or a shared count: a load leaves
    /// its mark in the reading thread's own slot (arc-swap), and a reload
    /// swaps the pointer.
    table: ArcSwap<Table>,
    pub(crate) metrics: Metrics,
    unmatched: RouteMetrics,
    /// The configuration is loaded and the listeners are bound.
    pub(crate) started: AtomicBool,
    /// Shutting down: readiness fails while in-flight requests finish.
    pub(crate) draining: AtomicBool,
}

impl Proxy {
    pub(crate) fn new(table: Table, metrics: Metrics) -> Proxy {
        Proxy {
            table: ArcSwap::from_pointee(table),
            metrics,
            unmatched: RouteMetrics::new(UNMATCHED),
            started: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    /// The table now serving.
    pub(crate) fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// Serves `config` from now on, keeping unchanged routes' state.
    pub(crate) fn reload(&self, config: Config) -> Result<(), ConfigErrors> {
        let old = self.table();
        let table = Table::build(config, Some(&old), &self.metrics)?;
        let kept = table
            .routes
            .iter()
            .filter(|r| old.routes.iter().any(|o| Arc::ptr_eq(o, r)))
            .count();
        tracing::info!(
            routes = table.routes.len(),
            kept,
            "configuration reloaded; unchanged routes keep their state"
        );
        self.table.store(Arc::new(table));
        Ok(())
    }

    /// Serves one data-plane request.
    pub(crate) async fn handle(
        &self,
        mut request: Request<Incoming>,
        peer: &Peer,
    ) -> Response<ResponseBody> {
        // The table is held only while routing: what the request needs
        // after is its route's (counted per route) and the shedder.
        let (route, shed, body_timeout) = {
            let table = self.table.load();
            if let Err(failure) = admit(&mut request, table.config.server.trust_priority_header) {
                return self.unmatched(failure);
            }
            let Some(route) = table.route(request.uri().path()) else {
                return self.unmatched(Failure::NoRoute);
            };
            (
                route.clone(),
                table.shed.clone(),
                table.config.server.request_body_timeout,
            )
        };
        let request = request.map(|body| ClientBody::new(body, body_timeout));
        route.serve(shed.as_ref(), request, peer).await
    }

    /// A request answered before any route took it.
    fn unmatched(&self, failure: Failure) -> Response<ResponseBody> {
        let started = Instant::now();
        let response = failure.response("");
        self.unmatched
            .answered(response.status().as_u16(), started.elapsed());
        response
    }

    pub(crate) fn is_started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// The request rules every request passes before routing; puts the request
/// in the form routes see and forward:
///
/// - `TRACE` (it would echo the request, credentials included, back) and
///   `CONNECT` (keel is not a tunnel) are refused;
/// - HTTP/1.1 needs exactly one `Host` (RFC 9112 section 3.2);
/// - a target in absolute form names the host itself: its authority is the
///   `Host` sent upstream (RFC 9112 section 3.2.2);
/// - the path is normalised ([`crate::path`]) and forwarded so;
/// - unless the configuration trusts it, a client's `x-keel-priority` is
///   dropped, so the route's priority applies.
fn admit(request: &mut Request<Incoming>, trust_priority: bool) -> Result<(), Failure> {
    if request.method() == Method::TRACE || request.method() == Method::CONNECT {
        return Err(Failure::MethodNotAllowed);
    }
    let hosts = request.headers().get_all(header::HOST).iter().count();
    if let Some(authority) = request.uri().authority() {
        // Host and port only: userinfo is never sent on.
        let host = match authority.port() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_owned(),
        };
        let host = HeaderValue::from_str(&host).map_err(|_| Failure::BadHost)?;
        request.headers_mut().insert(header::HOST, host);
    } else if hosts > 1 || (hosts == 0 && request.version() == Version::HTTP_11) {
        return Err(Failure::BadHost);
    }
    if !trust_priority {
        request.headers_mut().remove(PRIORITY);
    }
    let path = request.uri().path();
    let normal = match crate::path::normalise(path) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(normal)) => normal,
        Err(AboveRoot) => return Err(Failure::BadPath),
    };
    let target = match request.uri().query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    *request.uri_mut() = PathAndQuery::try_from(target)
        .map_err(|_| Failure::BadPath)?
        .into();
    Ok(())
}
