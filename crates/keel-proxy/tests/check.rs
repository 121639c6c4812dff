//! `keel check`: the real binary on files, and the parser's errors.

use std::path::PathBuf;
use std::process::Command;

use keel_proxy::config::{Condition, RateKey};
use keel_proxy::Config;

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// Runs `keel check` on `text`: the exit status and what it printed.
fn keel_check(text: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("keel-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{:x}.toml", fxhash(text)));
    std::fs::write(&file, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    let printed =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), printed)
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin = "127.0.0.1:9901"

[upstreams.payment]
endpoints = ["127.0.0.1:9001"]

[[routes]]
name = "payment"
path_prefix = "/pay"
upstream = "payment"
"#;

#[test]
fn the_example_configuration_is_accepted() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["check", "--config"])
        .arg(repo_file("examples/keel.toml"))
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("ok (3 routes, 3 upstreams)"), "{printed}");
}

#[test]
fn the_demos_checkout_configuration_is_accepted() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["check", "--config"])
        .arg(repo_file("examples/checkout.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_minimal_configuration_takes_the_documented_defaults() {
    let config = Config::parse(MINIMAL).unwrap();
    let route = &config.routes[0];
    assert_eq!(route.timeout, std::time::Duration::from_secs(15));
    assert_eq!(route.priority, keel::shed::Priority::High);
    assert!(route.retry.is_none() && route.circuit_breaker.is_none());
    assert!(config.upstreams["payment"].required);
    assert_eq!(
        config.server.shutdown_timeout,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(
        config.server.request_head_timeout,
        std::time::Duration::from_secs(30)
    );

    let with_tables = format!(
        "{MINIMAL}\n[routes.retry]\n[routes.fault]\nabort = {{ percent = 5 }}\n[routes.rate_limit]\nrequests_per_second = 10\nkey = \"header:X-User\"\n"
    );
    let config = Config::parse(&with_tables).unwrap();
    let route = &config.routes[0];
    let retry = route.retry.as_ref().unwrap();
    assert_eq!(retry.max_attempts, 3);
    assert_eq!(
        retry.on,
        [
            Condition::ConnectFailure,
            Condition::Reset,
            Condition::Timeout,
            Condition::GatewayError
        ]
    );
    assert_eq!(retry.backoff.jitter, keel::retry::JitterKind::Full);
    assert_eq!(
        route.fault.as_ref().unwrap().abort.as_ref().unwrap().status,
        503
    );
    assert!(route.fault.as_ref().unwrap().delay.is_none());
    let rl = route.rate_limit.as_ref().unwrap();
    assert_eq!((rl.burst, &rl.key), (1, &RateKey::Header("x-user".into())));
}

#[test]
fn every_error_is_listed_with_its_field_path() {
    let text = r#"
[server]
listen = "127.0.0.1:8080"
admin = "localhost"
request_head_timeout = "0s"

[upstreams.payment]
endpoints = ["127.0.0.1:9001", "nope"]

[[routes]]
name = "payment"
path_prefix = "/pay"
upstream = "payment"
timeout = "1s"

[routes.retry]
max_attempts = 0
per_try_timeout = "2s"
on = ["timeout", "circuit-open"]

[routes.circuit_breaker]
failure_rate = 1.5

[[routes]]
name = "payment"
path_prefix = "pay"
upstream = "nope"

[routes.fault]
abort = { percent = 150, status = 42 }
"#;
    let (ok, printed) = keel_check(text);
    assert!(!ok);
    for line in [
        "server.admin: \"localhost\" is not an address like \"127.0.0.1:8080\"",
        "server.request_head_timeout: must be longer than zero",
        "upstreams.payment.endpoints[1]: \"nope\" is not an endpoint",
        "routes[0].retry.per_try_timeout: is longer than the route's timeout (1s)",
        "routes[0].retry.on[1]: keel's own refusals are not retried",
        "routes[0].retry.max_attempts: must be at least 1",
        "routes[0].circuit_breaker.failure_rate: must be a fraction in (0, 1], got 1.5",
        "routes[1].name: \"payment\" is also the name of routes[0]",
        "routes[1].path_prefix: must start with \"/\", got \"pay\"",
        "routes[1].upstream: no upstream named \"nope\"",
        "routes[1].fault.abort.percent: must be between 0 and 100, got 150",
        "routes[1].fault.abort.status: must be an HTTP status (100 to 599), got 42",
    ] {
        assert!(printed.contains(line), "missing {line:?} in:\n{printed}");
    }
    assert!(printed.contains("12 error(s)"), "{printed}");
}

#[test]
fn type_errors_and_unknown_fields_name_their_path() {
    let (ok, printed) = keel_check(&format!(
        "{MINIMAL}\n[routes.retry]\nmax_attempts = \"three\"\n"
    ));
    assert!(!ok);
    assert!(
        printed.contains("routes[0].retry.max_attempts: invalid type"),
        "{printed}"
    );

    let (ok, printed) = keel_check(&format!(
        "{MINIMAL}\n[routes.bulkhead]\nmax_concurent = 10\n"
    ));
    assert!(!ok);
    assert!(printed.contains("routes[0].bulkhead"), "{printed}");
    assert!(
        printed.contains("unknown field `max_concurent`"),
        "{printed}"
    );

    let (ok, printed) = keel_check(&format!("{MINIMAL}\n[routes.retry]\non = [\"6xx\"]\n"));
    assert!(!ok);
    assert!(
        printed.contains("routes[0].retry.on[0]: unknown condition \"6xx\""),
        "{printed}"
    );

    let (ok, printed) = keel_check("[server]\nlisten = \"127.0.0.1:1\"\n");
    assert!(!ok);
    assert!(
        printed.contains("server: missing field `admin`"),
        "{printed}"
    );

    let (ok, printed) = keel_check("[server\n");
    assert!(!ok);
    assert!(printed.contains("not valid TOML"), "{printed}");
}

#[test]
fn the_command_line_says_how_to_use_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("nonsense")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let usage = String::from_utf8_lossy(&out.stderr);
    assert!(usage.contains("keel run --config FILE"), "{usage}");
    assert!(usage.contains("keel check --config FILE"), "{usage}");
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["check", "--config", "/nonexistent/keel.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
    // `run` on a bad file fails at once with the same list, and serves nothing.
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["run", "--config", "/nonexistent/keel.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn store_and_idempotency_tables_take_defaults_and_name_their_errors() {
    use keel::store::FailMode;
    use keel_proxy::config::StoreKind;
    use std::time::Duration;

    let config = Config::parse(&format!("{MINIMAL}\n[routes.idempotency]\n")).unwrap();
    assert_eq!(config.store.kind, StoreKind::Memory);
    let idem = config.routes[0].idempotency.as_ref().unwrap();
    assert_eq!(idem.header, "idempotency-key");
    assert_eq!(idem.ttl, Duration::from_secs(24 * 3600));
    assert_eq!(idem.lock_timeout, Duration::from_secs(30));
    assert_eq!(idem.max_body.0, 1 << 20);
    assert_eq!(idem.on_store_error, FailMode::FailClosed);

    let shared = format!(
        "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6390/\"\n{MINIMAL}\n[routes.rate_limit]\nrequests_per_second = 5\nshared = true\n[routes.idempotency]\nmax_body = \"64KiB\"\n"
    );
    let config = Config::parse(&shared).unwrap();
    let rl = config.routes[0].rate_limit.as_ref().unwrap();
    assert!(rl.shared);
    assert_eq!(rl.on_store_error, FailMode::FailOpen);
    assert_eq!(
        config.routes[0].idempotency.as_ref().unwrap().max_body.0,
        64 << 10
    );

    let (ok, printed) = keel_check(&format!(
        "[store]\npath = \"x.redb\"\nurl = \"redis://h/\"\ntimeout = \"0s\"\n{MINIMAL}\n[routes.rate_limit]\nrequests_per_second = 5\nshared = true\n[routes.idempotency]\nheader = \"bad header\"\nttl = \"0s\"\n"
    ));
    assert!(!ok);
    for line in [
        "store.path: is for kind = \"embedded\"",
        "store.url: is for kind = \"redis\"",
        "store.timeout: must be longer than zero",
        "routes[0].rate_limit.shared: needs [store] kind = \"redis\"",
        "routes[0].idempotency.header: \"bad header\" is not a header name",
        "routes[0].idempotency.ttl: must be longer than zero",
    ] {
        assert!(printed.contains(line), "missing {line:?} in:\n{printed}");
    }

    for (table, field) in [
        (
            "[store]\nkind = \"disk\"\n",
            "store.kind: unknown variant `disk`",
        ),
        (
            "[store]\nkind = \"redis\"\nurl = \"http://nope\"\n",
            "store.url: not a Redis URL",
        ),
    ] {
        let (ok, printed) = keel_check(&format!("{table}{MINIMAL}"));
        assert!(!ok);
        assert!(printed.contains(field), "missing {field:?} in:\n{printed}");
    }
    let (ok, printed) = keel_check(&format!(
        "{MINIMAL}\n[routes.idempotency]\nmax_body = \"1 parsec\"\n"
    ));
    assert!(!ok);
    assert!(
        printed.contains("routes[0].idempotency.max_body: \"1 parsec\" is not a size"),
        "{printed}"
    );
}

/// Values the running proxy parses are checked by `keel check` (and so on
/// reload) with the same parsers, naming their field: a health check's path
/// with a space passed the check and then panicked `keel run`; a UTF-8
/// fallback header passed and was then silently dropped.
#[test]
fn values_the_data_plane_parses_are_checked_where_they_are_read() {
    let long_host = format!("{}.example:80", "a".repeat(300));
    for (table, field) in [
        (
            "[upstreams.web]\nendpoints = [\"127.0.0.1:9001\"]\nhealth_check = { path = \"/a b\" }\n".to_owned(),
            "upstreams.web.health_check.path",
        ),
        (
            "[upstreams.web]\nendpoints = [\"127.0.0.1:9001\"]\nhealth_check = { path = \"/a\\u0001\" }\n".to_owned(),
            "upstreams.web.health_check.path",
        ),
        (
            format!("[upstreams.web]\nendpoints = [\"{long_host}\"]\n"),
            "upstreams.web.endpoints[0]",
        ),
        (
            "[upstreams.web]\nendpoints = [\"127.0.0.1:9001\"]\n[[routes]]\nname = \"r\"\npath_prefix = \"/r\"\nupstream = \"web\"\nfallback = { status = 200, headers = { \"x-a\" = \"line\\nbreak\" } }\n".to_owned(),
            "routes[0].fallback.headers.x-a",
        ),
        (
            "[upstreams.web]\nendpoints = [\"127.0.0.1:9001\"]\n[[routes]]\nname = \"r\"\npath_prefix = \"/r/../s\"\nupstream = \"web\"\n".to_owned(),
            "routes[0].path_prefix",
        ),
        (
            "[upstreams.web]\nendpoints = [\"127.0.0.1:9001\"]\n[[routes]]\nname = \"r\"\npath_prefix = \"/r\"\nupstream = \"web\"\n[[routes]]\nname = \"s\"\npath_prefix = \"/r/\"\nupstream = \"web\"\n".to_owned(),
            "routes[1].path_prefix",
        ),
        (
            "[upstreams.web]\nendpoints = [\"127.0.0.1:9001\"]\nread_timeout = \"10000000000000000000s\"\n".to_owned(),
            "upstreams.web.read_timeout",
        ),
    ] {
        let text = format!("[server]\nlisten = \"127.0.0.1:8080\"\nadmin = \"127.0.0.1:9901\"\n{table}");
        let (ok, printed) = keel_check(&text);
        assert!(!ok, "{field}: accepted\n{text}");
        assert!(printed.contains(&format!("{field}: ")), "{field}: {printed}");
    }
    // A header value in UTF-8 is a value, sent as it is.
    let text =
        format!("{MINIMAL}fallback = {{ status = 200, headers = {{ \"x-a\" = \"café\" }} }}\n");
    assert!(keel_check(&text).0);
}

#[test]
fn an_admin_plane_off_loopback_needs_a_token_which_is_never_printed() {
    let open = MINIMAL.replace("admin = \"127.0.0.1:9901\"", "admin = \"0.0.0.0:9901\"");
    let (ok, printed) = keel_check(&open);
    assert!(!ok);
    assert!(
        printed.contains("server.admin_token: is required"),
        "{printed}"
    );
    let guarded = open.replace("[server]\n", "[server]\nadmin_token = \"hunter2-s3cret\"\n");
    let (ok, printed) = keel_check(&guarded);
    assert!(ok, "{printed}");
    let config = Config::parse(&guarded).unwrap();
    assert_eq!(
        config.server.admin_token.as_ref().map(|t| t.expose()),
        Some("hunter2-s3cret")
    );
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    // IPv6 loopback is loopback.
    let v6 = MINIMAL.replace("admin = \"127.0.0.1:9901\"", "admin = \"[::1]:9901\"");
    assert!(keel_check(&v6).0);
}
