//! `cairn serve` (the location daemon) and `cairn token` (API tokens, on the daemon's host).

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};

pub use cairn_daemon::config::ServeArgs;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token; prints only the token (shown once, stored hashed).
    Create {
        /// The token's name: recorded as the operator of the jobs it starts.
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// List tokens (names, roles, creation; never the tokens).
    List {
        #[command(flatten)]
        dir: DataDir,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token at once.
    Revoke {
        name: String,
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Debug, Args)]
pub struct DataDir {
    /// The daemon's data directory.
    #[arg(long, env = "CAIRN_DATA_DIR", default_value = "./cairn-data")]
    pub data_dir: std::path::PathBuf,
}

pub async fn serve(args: ServeArgs) -> Result<ExitCode> {
    cairn_daemon::run(args).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn token(cmd: TokenCommand) -> Result<ExitCode> {
    match cmd {
        TokenCommand::Create { name, role, dir } => {
            let token = cairn_daemon::auth::create_token(&dir.data_dir, &name, &role)?;
            println!("{token}");
        }
        TokenCommand::List { dir, json } => {
            let list = cairn_daemon::auth::list_tokens(&dir.data_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for t in list {
                    println!(
                        "{}\t{}\t{}{}",
                        t.name,
                        t.role,
                        t.created_at,
                        t.revoked_at
                            .map(|r| format!("\trevoked {r}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        TokenCommand::Revoke { name, dir } => {
            cairn_daemon::auth::revoke_token(&dir.data_dir, &name)?;
            eprintln!("token {name} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}
