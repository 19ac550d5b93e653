//! The `nodelet` binary: tracing, configuration, run until SIGTERM/SIGINT, drain. A second
//! signal exits at once. `nodelet log-driver <path>` runs the per-container log driver (the
//! fallback when its own small binary could not be installed, see runtime::logdriver);
//! `nodelet install-log-driver <dir>` installs that binary; `nodelet pod-init` is PID 1 of a
//! pod's shared PID namespace (see sandbox::pidns).

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(nodelet::sandbox::pidns::SUBCOMMAND) {
        return nodelet::sandbox::pidns::main_with_args();
    }
    if args.get(1).map(String::as_str) == Some(nodelet::runtime::logdriver::PATH_KEY) {
        return nodelet::runtime::logdriver::main_with_args(&args[1..]);
    }
    if let [_, sub, dir] = &args[..] {
        if sub == nodelet::runtime::logdriver::INSTALL_SUBCOMMAND {
            return match nodelet::runtime::logdriver::install(std::path::Path::new(dir)) {
                Ok(_) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("installing the log driver in {dir}: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
    }
    let cli = nodelet::config::Cli::parse();
    let level = match cli.flags.verbosity.unwrap_or(0) {
        0 => "info",
        1..=3 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(format!("nodelet={level},warn"))),
        )
        .init();
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into());
    let config = match nodelet::config::Config::resolve(cli.flags, &hostname) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    nodelet::memory::cap_arenas();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(nodelet::agent::run(config, shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Completes on the first SIGTERM or SIGINT; a second one exits the process at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}
