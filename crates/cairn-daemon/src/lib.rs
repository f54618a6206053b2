//! Cairn's location daemon (`cairn serve`): one per location. It owns the location's
//! disk pool and NBD listener (through `cairn-volume`), its recovery space (through
//! `cairn-store`), a SQLite database of control state (policies, jobs, tokens, audit),
//! the scheduler and job runner, and the HTTP API with its OpenAPI document and metrics.

pub mod api;
pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod location;
pub mod metrics;
pub mod model;
pub mod pair_api;
pub mod pairs;
pub mod peer;
pub mod schedule;
pub mod space_api;

use std::sync::Arc;

use anyhow::Context;
use cairn_volume::Pool;
use cairn_volume::host::Host;

pub use config::{Config, ServeArgs};
pub use location::Location;

/// Creates the location's space and pool on first start; checks them on later ones.
pub async fn prepare_pool(config: &Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    let pool_path = config.pool_path();
    if Pool::exists(&pool_path) {
        let pool = Pool::open(&pool_path)?;
        if pool.meta().location != config.location {
            anyhow::bail!(
                "the pool in {} belongs to location {:?}, not {:?} (start with --location {} or another --data-dir)",
                pool_path.display(),
                pool.meta().location,
                config.location,
                pool.meta().location
            );
        }
        return Ok(());
    }
    let backend = cairn_store::space::open_location(&config.space, true)?;
    let space = match cairn_store::Space::open(backend.clone()).await {
        Ok(s) => s,
        Err(cairn_store::SpaceError::NotASpace { .. }) => {
            let cfg = cairn_format::config::SpaceConfig::new(
                u64::from(cairn_format::config::DEFAULT_CHUNK_SIZE),
                cairn_format::config::DEFAULT_COMPRESSION_LEVEL,
            )?;
            cairn_store::Space::init(backend, cfg).await?
        }
        Err(e) => return Err(e.into()),
    };
    Pool::init(
        &pool_path,
        &config.location,
        &config.space,
        space.config().id,
    )?;
    Ok(())
}

/// Opens everything and serves until SIGTERM or SIGINT.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(&args)?;
    prepare_pool(&config).await?;
    let _daemon_lock = lock_data_dir(&config)?;
    let db = db::Db::open(&config.db_path())?;
    let host = Host::open(&config.pool_path()).await?;
    host.set_background_hydration(config.hydration);
    let clock: Arc<dyn schedule::Clock> = Arc::new(schedule::SystemClock);
    let loc = Location::new(config.clone(), db, host.clone(), clock);
    let interrupted = loc.recover_interrupted().await?;
    if interrupted > 0 {
        eprintln!("{interrupted} job(s) were interrupted by the previous stop; recorded as failed");
    }
    for (server, e) in host.attach_running().await {
        eprintln!("warning: server {server} not started: {e}");
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} for the API", config.listen))?;
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = &config.nbd_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for NBD"))?;
        let ex: Arc<dyn cairn_nbd::server::Exports> = host.clone();
        tasks.spawn(async move { cairn_nbd::server::serve_tcp(l, ex).await });
    }
    let (app, _doc) = api::router(loc.clone());
    let sched = tokio::spawn(loc.clone().scheduler());
    let gc = tokio::spawn(loc.clone().gc_loop());
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
    });
    eprintln!(
        "cairn location {:?} serving\n  API:  http://{}  (token: cairn token create NAME --role admin --data-dir {})\n  NBD:  {}\n  data: {}",
        config.location,
        config.listen,
        config.data_dir.display(),
        config
            .nbd_listen
            .as_deref()
            .map_or("off".to_string(), |a| format!("nbd://{a}/<server>/<disk>")),
        config.data_dir.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        Some(r) = tasks.join_next() => {
            if let Ok(Err(e)) = r { eprintln!("error: NBD listener failed: {e}"); }
        }
    }
    eprintln!(
        "shutting down: no new jobs; waiting up to {} for running ones",
        humantime::format_duration(config.shutdown_grace)
    );
    loc.shutdown().await;
    sched.abort();
    gc.abort();
    stop_tx.send_replace(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), http).await;
    host.detach_all().await;
    eprintln!("stopped");
    Ok(())
}

/// One daemon per data directory.
fn lock_data_dir(config: &Config) -> anyhow::Result<std::fs::File> {
    let path = config.data_dir.join("daemon.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| {
        anyhow::anyhow!(
            "another cairn serve runs on {} already",
            config.data_dir.display()
        )
    })?;
    Ok(f)
}
