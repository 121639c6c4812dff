//! What the end-to-end tests share: programmable stub upstreams on loopback,
//! the real `keel` binary started on a configuration, and an HTTP client.
//!
//! These tests run real processes on real time. They never wait a fixed time
//! hoping something happened: they poll for the state they expect up to a
//! generous deadline, and time bounds are one-sided (at least / well under).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A request the stub received.
#[derive(Debug, Clone)]
pub struct Hit {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

/// What the stub does with a request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Answer, after a delay.
    Respond {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
        delay: Duration,
    },
    /// Drop the connection without answering.
    Reset,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply::Respond {
            status,
            headers: Vec::new(),
            body: format!("{status}\n"),
            delay: Duration::ZERO,
        }
    }

    pub fn ok(body: &str) -> Reply {
        Reply::Respond {
            status: 200,
            headers: Vec::new(),
            body: body.to_owned(),
            delay: Duration::ZERO,
        }
    }

    pub fn after(self, d: Duration) -> Reply {
        match self {
            Reply::Respond {
                status,
                headers,
                body,
                ..
            } => Reply::Respond {
                status,
                headers,
                body,
                delay: d,
            },
            other => other,
        }
    }

    pub fn header(self, name: &'static str, value: &str) -> Reply {
        match self {
            Reply::Respond {
                status,
                mut headers,
                body,
                delay,
            } => {
                headers.push((name, value.to_owned()));
                Reply::Respond {
                    status,
                    headers,
                    body,
                    delay,
                }
            }
            other => other,
        }
    }
}

type Behaviour = Arc<dyn Fn(&Hit, usize) -> Reply + Send + Sync>;

/// A programmable upstream on a loopback port.
#[derive(Clone)]
pub struct Stub {
    pub addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Stub {
    /// A stub answering `200 ok` until told otherwise.
    pub async fn start() -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let ok: Behaviour = Arc::new(|_, _| Reply::ok("ok\n"));
        let behaviour = Arc::new(Mutex::new(ok));
        let (h, b) = (hits.clone(), behaviour.clone());
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (hits, behaviour) = (h.clone(), b.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (hits, behaviour) = (hits.clone(), behaviour.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let hit = Hit {
                                method: parts.method,
                                // The request target as sent: the origin
                                // form, unless it came in absolute form.
                                path: parts.uri.to_string(),
                                headers: parts.headers,
                                body,
                                at: Instant::now(),
                            };
                            // Health checks are not counted as traffic.
                            let counted = hit.headers.get("user-agent").map(|v| v.as_bytes())
                                != Some(b"keel-health-check");
                            let n = {
                                let mut hits = hits.lock().unwrap();
                                if counted {
                                    hits.push(hit.clone());
                                }
                                hits.len()
                            };
                            let behave = behaviour.lock().unwrap().clone();
                            match behave(&hit, n) {
                                Reply::Respond {
                                    status,
                                    headers,
                                    body,
                                    delay,
                                } => {
                                    tokio::time::sleep(delay).await;
                                    let mut response = Response::new(Full::new(Bytes::from(body)));
                                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                                    for (k, v) in headers {
                                        response.headers_mut().insert(k, v.parse().unwrap());
                                    }
                                    Ok::<_, std::io::Error>(response)
                                }
                                Reply::Reset => Err(std::io::Error::other("reset on purpose")),
                            }
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Stub {
            addr,
            hits,
            behaviour,
            connections,
            task: Arc::new(task),
        }
    }

    /// From now on, answers with `f(hit, n)` where `n` counts requests
    /// (health checks aside) since the stub started, this one included.
    pub fn behave(&self, f: impl Fn(&Hit, usize) -> Reply + Send + Sync + 'static) {
        *self.behaviour.lock().unwrap() = Arc::new(f);
    }

    /// The requests received so far (health checks aside).
    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }

    /// Stops listening (and answering).
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// A loopback port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `keel run` process.
pub struct Keel {
    pub child: tokio::process::Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    pub client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    server: String,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn reason(&self) -> Option<&str> {
        self.header("x-keel-reason")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn temp_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "keel-e2e-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Keel {
    /// Starts keel on `rest` (everything but `[server]`, whose listeners go
    /// on free ports; `server_extra` adds lines to it) and waits until it
    /// reports started. A free port can be taken between its test and
    /// keel's bind (by any connection's ephemeral port): keel then exits,
    /// and is started again on other ports.
    pub async fn start_with(server_extra: &str, rest: &str) -> Keel {
        for _ in 0..3 {
            let mut keel = Keel::spawn(server_extra, rest);
            match keel.started().await {
                Ok(()) => return keel,
                Err(log) if log.contains("cannot listen on") => continue,
                Err(log) => panic!("keel did not start; log:\n{log}"),
            }
        }
        panic!("keel lost its free ports three times in a row")
    }

    fn spawn(server_extra: &str, rest: &str) -> Keel {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let server = format!(
            "[server]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\nworkers = 1\nshutdown_timeout = \"5s\"\n{server_extra}\n"
        );
        let dir = temp_dir();
        let config = dir.join("keel.toml");
        let log = dir.join("keel.log");
        std::fs::write(&config, format!("{server}\n{rest}")).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["run", "--config"])
            .arg(&config)
            .env("KEEL_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Keel {
            child,
            listen,
            admin,
            config,
            log,
            client: Client::builder(TokioExecutor::new()).build_http(),
            server,
        }
    }

    /// Waits until keel reports started: its log if it exits or takes
    /// over 20 s.
    async fn started(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Err(self.log_text());
            }
            if self
                .admin_get("/health/startup")
                .await
                .is_ok_and(|a| a.status == 200)
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(self.log_text())
    }

    pub async fn start(rest: &str) -> Keel {
        Keel::start_with("", rest).await
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces the configuration file (the `[server]` table stays).
    pub fn rewrite(&self, rest: &str) {
        std::fs::write(&self.config, format!("{}\n{rest}", self.server)).unwrap();
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("keel is running").to_string();
        // The shell's own `kill`: no procps needed.
        let status = std::process::Command::new("sh")
            .args(["-c", &format!("kill -{name} {pid}")])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn send(
        &self,
        to: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Answer, String> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{to}{path}"));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// A data-plane GET; panics if the proxy does not answer.
    pub async fn get(&self, path: &str) -> Answer {
        self.request("GET", path, &[], "").await
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        self.send(self.listen, method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\nlog:\n{}", self.log_text()))
    }

    pub async fn admin_get(&self, path: &str) -> Result<Answer, String> {
        self.send(self.admin, "GET", path, &[], "").await
    }

    /// An admin request; a POST is sent as JSON unless `headers` give a
    /// content type.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        let mut headers = headers.to_vec();
        if method == "POST"
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            headers.push(("content-type", "application/json"));
        }
        self.send(self.admin, method, path, &headers, body)
            .await
            .unwrap()
    }

    /// `/metrics`, the value of the series `name{labels}` (labels as
    /// written, in the exposition's order), if present.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.admin_get("/metrics").await.unwrap().body;
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

/// Polls `check` until it gives `Some`, or `deadline` passes.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() > until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An upstream table for `stubs`, health checks and outlier detection off.
pub fn upstream(name: &str, endpoints: &[SocketAddr]) -> String {
    let list: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[upstreams.{name}]\nendpoints = [{}]\noutlier_detection = {{ consecutive_failures = 0 }}\n",
        list.join(", ")
    )
}

/// Sends raw bytes to `addr` and reads what comes back until the peer closes
/// or 2 s pass.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
