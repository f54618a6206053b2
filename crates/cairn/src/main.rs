//! `cairn`: the one binary. Offline commands on a recovery space or disk pool, the
//! location daemon (`cairn serve`), and the client of its API (`CAIRN_URL`) for
//! everything the daemon owns.
//!
//! Exit codes (docs and tests rely on them):
//! - 0: success
//! - 1: the operation failed (the message says why: bad input, unreachable space, ...)
//! - 2: the command line is wrong (unknown flag, missing argument)
//! - 3: stored data is damaged (verify found damage; restore or rollback met a damaged or
//!   missing chunk)
//! - 4: nothing was done because confirmation is required (e.g. rollback without --yes)
//!
//! Through the daemon: an API error answer prints `error: <message>` and exits 3 for the
//! code `damaged`, 4 for `confirmation_required`, 1 otherwise; a followed job that failed
//! exits 1.

mod client;
mod commands;
mod live;
mod pairs;
mod progress;
mod remote;
mod serve;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Output piped into a reader that stops early (`cairn point list S | head`): end
    // quietly, as a shell tool does, instead of a panic about a broken pipe.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
    let matches = <commands::Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <commands::Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let remote = commands::remote_creds(&matches);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli, remote)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<commands::UsageError>().is_some() {
                return ExitCode::from(2);
            }
            if let Some(api) = e.downcast_ref::<client::ApiError>() {
                return ExitCode::from(api.exit_code());
            }
            if let Some(job) = e.downcast_ref::<client::JobFailed>() {
                return ExitCode::from(if job.damaged { 3 } else { 1 });
            }
            let damaged = e
                .downcast_ref::<cairn_store::SpaceError>()
                .is_some_and(cairn_store::SpaceError::is_damage)
                || e.downcast_ref::<cairn_volume::VolumeError>()
                    .is_some_and(cairn_volume::VolumeError::is_damage);
            ExitCode::from(if damaged { 3 } else { 1 })
        }
    }
}
