//! The `keel` command.
//!
//! ```text
//! keel run --config FILE     serve until SIGTERM/SIGINT; SIGHUP reloads FILE
//! keel check --config FILE   validate a configuration; list every error
//! keel demo [--duration 60s] [--rate 40] [--report FILE]
//!                            the checkout scenario with and without keel
//! ```

use std::path::Path;
use std::process::ExitCode;

const USAGE: &str = "usage: keel run --config FILE\n       keel check --config FILE\n       keel demo [--duration 60s] [--rate 40] [--report keel-demo-report.html]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["run", "--config", path] => run(Path::new(path)),
        ["check", "--config", path] => check(Path::new(path)),
        ["demo", options @ ..] => demo(options),
        ["--help" | "-h" | "help"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match keel_proxy::run(path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::from(1)
        }
    }
}

fn demo(options: &[&str]) -> ExitCode {
    let options = match keel_proxy::demo::Options::parse(options) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("keel demo: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // The sidecar inside logs only what goes wrong with it.
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match keel_proxy::demo::run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("keel demo: {message}");
            ExitCode::from(1)
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match keel_proxy::load(path) {
        Ok(config) => {
            println!(
                "{}: ok ({} routes, {} upstreams)",
                path.display(),
                config.routes.len(),
                config.upstreams.len()
            );
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("{message}");
            ExitCode::from(1)
        }
    }
}
