//! The daemon's configuration: embedded defaults, then a TOML file, then environment
//! variables and flags (those two through clap: a flag wins over its variable).
//! Unknown keys in the file are errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

/// `cairn serve` flags (each also settable by its `CAIRN_*` variable).
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// A TOML config file (default: `<data-dir>/cairn.toml` if it exists).
    #[arg(long, env = "CAIRN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the location keeps its database, pool and (by default) recovery space.
    #[arg(long, env = "CAIRN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// This location's name (fixed once the pool exists).
    #[arg(long, env = "CAIRN_LOCATION")]
    pub location: Option<String>,
    /// HTTP API address.
    #[arg(long, env = "CAIRN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// NBD address (`none` to export nothing over TCP).
    #[arg(long, env = "CAIRN_NBD_LISTEN")]
    pub nbd_listen: Option<String>,
    /// The recovery space: a folder or `file://` URL (default: `<data-dir>/space`).
    #[arg(long, env = "CAIRN_SPACE")]
    pub space: Option<String>,
    /// Replication and verify jobs running at once, across policies.
    #[arg(long, env = "CAIRN_MAX_JOBS")]
    pub max_jobs: Option<usize>,
    /// How long running jobs may take to finish on SIGTERM (e.g. `30s`).
    #[arg(long, env = "CAIRN_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
}

/// The config file's keys (all optional; unknown keys are refused).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    location: Option<String>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    nbd_listen: Option<String>,
    space: Option<String>,
    max_jobs: Option<usize>,
    shutdown_grace: Option<String>,
    gc_interval: Option<String>,
    gc_grace: Option<String>,
    hydration: Option<bool>,
    /// S3 credentials of an `s3://` space (else the environment's `AWS_*`).
    s3_access_key_id: Option<String>,
    s3_secret_access_key: Option<String>,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub location: String,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// `None`: no NBD over TCP.
    pub nbd_listen: Option<String>,
    pub space: String,
    pub max_jobs: usize,
    pub shutdown_grace: Duration,
    pub gc_interval: Duration,
    pub gc_grace: Duration,
    pub hydration: bool,
}

pub const DEFAULT_DATA_DIR: &str = "./cairn-data";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";

fn duration(key: &str, s: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(s)
        .map_err(|e| anyhow::anyhow!("config key {key}: {s:?} is not a duration ({e})"))
}

impl Config {
    /// Defaults, then the file, then `args` (flags and environment).
    pub fn load(args: &ServeArgs) -> anyhow::Result<Config> {
        let explicit_file = args.config.clone();
        let data_dir_hint = args
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let file_path = explicit_file
            .clone()
            .or_else(|| Some(data_dir_hint.join("cairn.toml")).filter(|p| p.exists()));
        let file = match &file_path {
            Some(p) => Self::read_file(p)?,
            None => FileConfig::default(),
        };
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let location = args
            .location
            .clone()
            .or(file.location)
            .unwrap_or_else(|| "local".to_string());
        cairn_format::name::validate("location", &location).map_err(|e| anyhow::anyhow!("{e}"))?;
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("default address"));
        let nbd = args
            .nbd_listen
            .clone()
            .or(file.nbd_listen)
            .unwrap_or_else(|| DEFAULT_NBD_LISTEN.to_string());
        let nbd_listen = if nbd == "none" {
            None
        } else {
            nbd.parse::<SocketAddr>().map_err(|_| {
                anyhow::anyhow!(
                    "nbd_listen {nbd:?} is not an address like 127.0.0.1:10809 (or `none`)"
                )
            })?;
            Some(nbd)
        };
        let space = args
            .space
            .clone()
            .or(file.space)
            .unwrap_or_else(|| data_dir.join("space").to_string_lossy().into_owned());
        let max_jobs = args.max_jobs.or(file.max_jobs).unwrap_or(4);
        if max_jobs == 0 {
            anyhow::bail!("max_jobs must be at least 1");
        }
        let shutdown_grace = match (args.shutdown_grace, &file.shutdown_grace) {
            (Some(d), _) => d,
            (None, Some(s)) => duration("shutdown_grace", s)?,
            (None, None) => Duration::from_secs(30),
        };
        let gc_interval = match &file.gc_interval {
            Some(s) => duration("gc_interval", s)?,
            None => Duration::from_secs(24 * 3600),
        };
        let gc_grace = match &file.gc_grace {
            Some(s) => duration("gc_grace", s)?,
            None => Duration::from_secs(3600),
        };
        match (&file.s3_access_key_id, &file.s3_secret_access_key) {
            (Some(k), Some(sk)) => cairn_store::space::configure_s3_credentials(k, sk),
            (None, None) => {}
            _ => anyhow::bail!(
                "config file: give both s3_access_key_id and s3_secret_access_key, or neither (then AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY from the environment are used)"
            ),
        }
        Ok(Config {
            location,
            data_dir,
            listen,
            nbd_listen,
            space,
            max_jobs,
            shutdown_grace,
            gc_interval,
            gc_grace,
            hydration: file.hydration.unwrap_or(true),
        })
    }

    fn read_file(p: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", p.display()))?;
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {}", p.display(), e.message()))
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("cairn.db")
    }

    pub fn pool_path(&self) -> PathBuf {
        self.data_dir.join("pool")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("cairn.toml"),
            "location = \"ams\"\nlisten_port = 1\n",
        )
        .unwrap();
        let args = ServeArgs {
            data_dir: Some(d.path().to_path_buf()),
            ..Default::default()
        };
        let e = Config::load(&args).unwrap_err().to_string();
        assert!(e.contains("listen_port"), "{e}");
    }

    #[test]
    fn s3_credentials_come_in_pairs() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("cairn.toml"),
            "s3_access_key_id = \"AKIAEXAMPLE\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            data_dir: Some(d.path().to_path_buf()),
            ..Default::default()
        };
        let e = Config::load(&args).unwrap_err().to_string();
        assert!(e.contains("s3_secret_access_key"), "{e}");
        assert!(
            !e.contains("AKIAEXAMPLE"),
            "a credential is never shown: {e}"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("cairn.toml"),
            "location = \"ams\"\nmax_jobs = 2\nnbd_listen = \"none\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            data_dir: Some(d.path().to_path_buf()),
            location: Some("fra".into()),
            ..Default::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.location, "fra");
        assert_eq!(c.max_jobs, 2);
        assert_eq!(c.nbd_listen, None);
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    }
}
