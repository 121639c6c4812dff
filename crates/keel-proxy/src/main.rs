//! The `keel` command.
//!
//! ```text
//! keel check --config FILE   validate a configuration; list every error
//! ```

use std::process::ExitCode;

use keel_proxy::Config;

const USAGE: &str = "usage: keel check --config FILE";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["check", "--config", path] => check(path),
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

fn check(path: &str) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("{path}: cannot read: {e}");
            return ExitCode::from(1);
        }
    };
    match Config::parse(&text) {
        Ok(config) => {
            println!(
                "{path}: ok ({} routes, {} upstreams)",
                config.routes.len(),
                config.upstreams.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{path}: {} error(s)", errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            ExitCode::from(1)
        }
    }
}
