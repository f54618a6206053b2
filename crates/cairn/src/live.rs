//! The live side of the CLI: disk pools, servers, disks, and `serve-nbd`. Commands that
//! change a running server go to the pool's serving process (its control socket) when
//! one runs; otherwise they work on the pool directly.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytesize::ByteSize;
use cairn_volume::Pool;
use cairn_volume::host::{self, Host};
use cairn_volume::pool::ServerState;
use cairn_volume::serve::{self, Answer, Request};
use clap::{Args, Subcommand};

use crate::client::Conn;
use crate::commands::{RunArgs, print_json, print_point, size, table, time};

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create a disk pool for a location whose recovery space is SPACE.
    Init {
        pool: PathBuf,
        /// The location's recovery space (a folder made with `cairn space init`).
        #[arg(long)]
        space: String,
        /// The location's name.
        #[arg(long, default_value = "local")]
        location: String,
        #[arg(long)]
        json: bool,
    },
    /// Show a pool: its location, space, servers and disks.
    Info {
        pool: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// `cairn server`: the daemon form (`cairn server create NAME`, through CAIRN_URL) or the
/// offline form on a pool (`cairn server create POOL NAME`).
#[derive(Debug, Subcommand)]
#[command(after_help = crate::commands::DUAL_FORMS)]
pub enum ServerCommand {
    /// Create a server (a named set of disks), stopped.
    #[command(
        override_usage = "cairn server create NAME [OPTIONS]\n       cairn server create POOL NAME [OPTIONS]"
    )]
    Create {
        /// NAME (daemon form), or POOL NAME (offline form).
        #[arg(value_name = "[POOL] NAME", num_args = 1..=2, required = true)]
        args: Vec<String>,
        /// Command run (sh -c) before its disks are frozen for a point (e.g. fsfreeze).
        #[arg(long)]
        pre_hook: Option<String>,
        /// Command run right after the freeze (e.g. thaw).
        #[arg(long)]
        post_hook: Option<String>,
        /// Print the daemon's answer as JSON (daemon form).
        #[arg(long)]
        json: bool,
    },
    /// List servers and their state.
    #[command(
        override_usage = "cairn server list [--json]\n       cairn server list POOL [--json]"
    )]
    List {
        /// A pool path (offline form); none for the daemon form.
        #[arg(value_name = "POOL")]
        pool: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one server: state, disks and their NBD exports (daemon form).
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Start a server: its disks are exported over NBD.
    #[command(override_usage = "cairn server start NAME\n       cairn server start POOL NAME")]
    Start {
        /// NAME (daemon form), or POOL NAME (offline form).
        #[arg(value_name = "[POOL] NAME", num_args = 1..=2, required = true)]
        args: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stop a server: clients are disconnected, its disks synced and closed.
    #[command(override_usage = "cairn server stop NAME\n       cairn server stop POOL NAME")]
    Stop {
        /// NAME (daemon form), or POOL NAME (offline form).
        #[arg(value_name = "[POOL] NAME", num_args = 1..=2, required = true)]
        args: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a stopped server that has no disks.
    #[command(override_usage = "cairn server delete NAME\n       cairn server delete POOL NAME")]
    Delete {
        /// NAME (daemon form), or POOL NAME (offline form).
        #[arg(value_name = "[POOL] NAME", num_args = 1..=2, required = true)]
        args: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

/// `cairn disk`: the daemon form (`cairn disk create web/root --size 1GiB`, through
/// CAIRN_URL) or the offline form on a pool (`cairn disk create POOL web/root ...`).
#[derive(Debug, Subcommand)]
#[command(after_help = crate::commands::DUAL_FORMS)]
pub enum DiskCommand {
    /// Create an empty disk of a size.
    #[command(
        override_usage = "cairn disk create SERVER/DISK --size SIZE\n       cairn disk create POOL SERVER/DISK --size SIZE"
    )]
    Create {
        /// SERVER/DISK (daemon form), or POOL SERVER/DISK (offline form).
        #[arg(value_name = "[POOL] SERVER/DISK", num_args = 1..=2, required = true)]
        args: Vec<String>,
        #[arg(long)]
        size: ByteSize,
        #[arg(long)]
        json: bool,
    },
    /// Import an image (raw; qcow2, vmdk, ... through qemu-img) as a new disk (offline).
    Import {
        pool: PathBuf,
        disk: String,
        image: PathBuf,
        /// The image's format (default: detected).
        #[arg(long)]
        format: Option<String>,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Export a stopped server's disk to an image (raw, or qcow2 etc. through qemu-img)
    /// (offline).
    Export {
        pool: PathBuf,
        disk: String,
        target: PathBuf,
        #[arg(long, default_value = "raw")]
        format: String,
        /// Overwrite an existing target.
        #[arg(long)]
        force: bool,
        #[arg(long, short)]
        quiet: bool,
    },
    /// List disks (of one server, or all).
    #[command(
        override_usage = "cairn disk list [SERVER] [--json]\n       cairn disk list POOL [SERVER] [--json]"
    )]
    List {
        /// [SERVER] (daemon form), or POOL [SERVER] (offline form).
        #[arg(value_name = "[POOL] [SERVER]", num_args = 0..=2)]
        args: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one disk: size, changed bytes, hydration (daemon form).
    Show {
        /// SERVER/DISK
        disk: String,
        #[arg(long)]
        json: bool,
    },
    /// Grow a stopped server's disk.
    #[command(
        override_usage = "cairn disk grow SERVER/DISK --size SIZE\n       cairn disk grow POOL SERVER/DISK --size SIZE"
    )]
    Grow {
        /// SERVER/DISK (daemon form), or POOL SERVER/DISK (offline form).
        #[arg(value_name = "[POOL] SERVER/DISK", num_args = 1..=2, required = true)]
        args: Vec<String>,
        #[arg(long)]
        size: ByteSize,
        #[arg(long)]
        json: bool,
    },
    /// Delete a stopped server's disk (irreversible: needs --yes).
    #[command(
        override_usage = "cairn disk delete SERVER/DISK [--yes]\n       cairn disk delete POOL SERVER/DISK [--yes]"
    )]
    Delete {
        /// SERVER/DISK (daemon form), or POOL SERVER/DISK (offline form).
        #[arg(value_name = "[POOL] SERVER/DISK", num_args = 1..=2, required = true)]
        args: Vec<String>,
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
    /// Make a new disk from a recovery point's disk, usable at once (copy-on-read)
    /// (offline; through the daemon: `cairn point clone`).
    Clone {
        pool: PathBuf,
        /// Point id, unique prefix, or `latest`.
        point: String,
        /// The new disk, SERVER/DISK (its server must exist and be stopped).
        disk: String,
        /// Which disk of the point (needed when it has several).
        #[arg(long)]
        from_disk: Option<String>,
        /// The space the point is in (default: the pool's location's space).
        #[arg(long)]
        space: Option<String>,
    },
    /// Copy the rest of a clone now; resumes where it stopped.
    #[command(
        override_usage = "cairn disk hydrate SERVER/DISK\n       cairn disk hydrate POOL SERVER/DISK"
    )]
    Hydrate {
        /// SERVER/DISK (daemon form), or POOL SERVER/DISK (offline form).
        #[arg(value_name = "[POOL] SERVER/DISK", num_args = 1..=2, required = true)]
        args: Vec<String>,
        #[arg(long, short)]
        quiet: bool,
        #[arg(long)]
        json: bool,
    },
}

/// `cairn server ...`: the offline form on a pool, or a request to the daemon.
pub async fn server_command(c: ServerCommand, conn: &Conn) -> Result<ExitCode> {
    use crate::commands::{Form, form, no_json_offline, usage};
    let offline = match c {
        ServerCommand::Create {
            args,
            pre_hook,
            post_hook,
            json,
        } => match form(&args, 1) {
            Form::Offline(pool, rest) => {
                no_json_offline("server create", json)?;
                let [name] = rest else {
                    return Err(usage("server create", "give POOL NAME"));
                };
                OfflineServer::Create {
                    pool: pool.into(),
                    name: name.clone(),
                    pre_hook,
                    post_hook,
                }
            }
            Form::Daemon(rest) => {
                return crate::remote::server_create(conn, &rest[0], pre_hook, post_hook, json)
                    .await;
            }
        },
        ServerCommand::List { pool, json } => match pool {
            Some(pool) => OfflineServer::List {
                pool: pool.into(),
                json,
            },
            None => return crate::remote::server_list(conn, json).await,
        },
        ServerCommand::Show { name, json } => {
            return crate::remote::server_show(conn, &name, json).await;
        }
        ServerCommand::Start { args, json } => match server_action(&args, "start", json)? {
            Some(pool) => OfflineServer::Start {
                pool,
                name: args[1].clone(),
            },
            None => return crate::remote::server_action(conn, &args[0], "start", json).await,
        },
        ServerCommand::Stop { args, json } => match server_action(&args, "stop", json)? {
            Some(pool) => OfflineServer::Stop {
                pool,
                name: args[1].clone(),
            },
            None => return crate::remote::server_action(conn, &args[0], "stop", json).await,
        },
        ServerCommand::Delete { args, json } => match server_action(&args, "delete", json)? {
            Some(pool) => OfflineServer::Delete {
                pool,
                name: args[1].clone(),
            },
            None => return crate::remote::server_action(conn, &args[0], "delete", json).await,
        },
    };
    offline_server(offline).await
}

/// `server start|stop|delete [POOL] NAME`: `Some(pool)` for the offline form.
fn server_action(args: &[String], verb: &str, json: bool) -> Result<Option<PathBuf>> {
    use crate::commands::{Form, form, no_json_offline, usage};
    match form(args, 1) {
        Form::Offline(pool, rest) => {
            no_json_offline(&format!("server {verb}"), json)?;
            if rest.len() != 1 {
                return Err(usage(&format!("server {verb}"), "give POOL NAME"));
            }
            Ok(Some(pool.into()))
        }
        Form::Daemon(_) => Ok(None),
    }
}

/// `disk VERB [POOL] SERVER/DISK`: `Some(pool)` for the offline form, and the disk.
fn disk_target(args: &[String], verb: &str, json: bool) -> Result<(Option<PathBuf>, String)> {
    use crate::commands::{Form, form, no_json_offline, usage};
    match form(args, 1) {
        Form::Offline(pool, rest) => {
            no_json_offline(&format!("disk {verb}"), json)?;
            let [disk] = rest else {
                return Err(usage(&format!("disk {verb}"), "give POOL SERVER/DISK"));
            };
            Ok((Some(pool.into()), disk.clone()))
        }
        Form::Daemon(rest) => Ok((None, rest[0].clone())),
    }
}

/// `cairn disk ...`: the offline form on a pool, or a request to the daemon.
pub async fn disk_command(c: DiskCommand, conn: &Conn) -> Result<ExitCode> {
    use crate::commands::{Form, form, no_json_offline};
    let offline = match c {
        DiskCommand::Create { args, size, json } => match disk_target(&args, "create", json)? {
            (Some(pool), disk) => OfflineDisk::Create { pool, disk, size },
            (None, disk) => {
                return crate::remote::disk_create(conn, &disk, size.as_u64(), json).await;
            }
        },
        DiskCommand::Import {
            pool,
            disk,
            image,
            format,
            quiet,
        } => OfflineDisk::Import {
            pool,
            disk,
            image,
            format,
            quiet,
        },
        DiskCommand::Export {
            pool,
            disk,
            target,
            format,
            force,
            quiet,
        } => OfflineDisk::Export {
            pool,
            disk,
            target,
            format,
            force,
            quiet,
        },
        DiskCommand::List { args, json } => match form(&args, 1) {
            Form::Offline(pool, rest) => OfflineDisk::List {
                pool: pool.into(),
                server: rest.first().cloned(),
                json,
            },
            Form::Daemon(rest) => {
                return crate::remote::disk_list(conn, rest.first().map(String::as_str), json)
                    .await;
            }
        },
        DiskCommand::Show { disk, json } => {
            return crate::remote::disk_show(conn, &disk, json).await;
        }
        DiskCommand::Grow { args, size, json } => match disk_target(&args, "grow", json)? {
            (Some(pool), disk) => OfflineDisk::Grow { pool, disk, size },
            (None, disk) => {
                return crate::remote::disk_grow(conn, &disk, size.as_u64(), json).await;
            }
        },
        DiskCommand::Delete { args, yes, json } => match disk_target(&args, "delete", json)? {
            (Some(pool), disk) => OfflineDisk::Delete { pool, disk, yes },
            (None, disk) => return crate::remote::disk_delete(conn, &disk, yes, json).await,
        },
        DiskCommand::Clone {
            pool,
            point,
            disk,
            from_disk,
            space,
        } => OfflineDisk::Clone {
            pool,
            point,
            disk,
            from_disk,
            space,
        },
        DiskCommand::Hydrate { args, quiet, json } => match disk_target(&args, "hydrate", json)? {
            (Some(pool), disk) => OfflineDisk::Hydrate { pool, disk, quiet },
            (None, disk) => return crate::remote::disk_hydrate(conn, &disk, quiet, json).await,
        },
    };
    let _ = no_json_offline;
    offline_disk(offline).await
}

/// The offline forms of `cairn server` (on a pool directly), as chosen by
/// `server_command`; their flags and help are `ServerCommand`'s.
#[derive(Debug)]
pub enum OfflineServer {
    Create {
        pool: PathBuf,
        name: String,
        pre_hook: Option<String>,
        post_hook: Option<String>,
    },
    List {
        pool: PathBuf,
        json: bool,
    },
    Start {
        pool: PathBuf,
        name: String,
    },
    Stop {
        pool: PathBuf,
        name: String,
    },
    Delete {
        pool: PathBuf,
        name: String,
    },
}

/// The offline forms of `cairn disk` (on a pool directly), as chosen by
/// `disk_command`; their flags and help are `DiskCommand`'s.
#[derive(Debug)]
pub enum OfflineDisk {
    Create {
        pool: PathBuf,
        disk: String,
        size: ByteSize,
    },
    Import {
        pool: PathBuf,
        disk: String,
        image: PathBuf,
        format: Option<String>,
        quiet: bool,
    },
    Export {
        pool: PathBuf,
        disk: String,
        target: PathBuf,
        format: String,
        force: bool,
        quiet: bool,
    },
    List {
        pool: PathBuf,
        server: Option<String>,
        json: bool,
    },
    Grow {
        pool: PathBuf,
        disk: String,
        size: ByteSize,
    },
    Delete {
        pool: PathBuf,
        disk: String,
        yes: bool,
    },
    Clone {
        pool: PathBuf,
        point: String,
        disk: String,
        from_disk: Option<String>,
        space: Option<String>,
    },
    Hydrate {
        pool: PathBuf,
        disk: String,
        quiet: bool,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    pool: PathBuf,
    /// TCP address to listen on (`none` for none).
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Also listen on this Unix socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Do not hydrate clones in the background (they fill as they are read, or with
    /// `cairn disk hydrate`).
    #[arg(long)]
    no_hydrate: bool,
}

fn spec(s: &str) -> Result<(String, String)> {
    Ok(cairn_volume::pool::parse_disk_spec(s)?)
}

/// Sends a request to the pool's serving process, if one runs.
async fn remote(pool: &Path, req: Request) -> Result<Option<serde_json::Value>> {
    let Some(stream) = serve::connect(pool).await else {
        return Ok(None);
    };
    let Answer {
        ok,
        result,
        error,
        damage,
    } = serve::request(stream, &req).await?;
    if ok {
        return Ok(Some(result));
    }
    let msg = error.unwrap_or_else(|| "unknown error".into());
    if damage {
        // Exit code 3: the serving process met damaged stored data.
        return Err(cairn_volume::VolumeError::RemoteDamage(msg).into());
    }
    bail!("{msg}")
}

pub async fn pool_command(c: PoolCommand) -> Result<ExitCode> {
    match c {
        PoolCommand::Init {
            pool,
            space,
            location,
            json,
        } => {
            let backend = cairn_store::space::open_location(&space, false)?;
            let s = cairn_store::Space::open(backend).await?;
            // A folder is kept as an absolute path; an object-store URL as given.
            let space_path = if space.starts_with("s3://") {
                space.clone()
            } else {
                std::fs::canonicalize(space.strip_prefix("file://").unwrap_or(&space))
                    .with_context(|| format!("cannot resolve {space}"))?
                    .display()
                    .to_string()
            };
            let p = Pool::init(&pool, &location, &space_path, s.config().id)?;
            if json {
                print_json(p.meta())?;
            } else {
                println!(
                    "created disk pool {} for location {:?} (recovery space {})",
                    pool.display(),
                    location,
                    space_path
                );
            }
        }
        PoolCommand::Info { pool, json } => {
            let p = Pool::open(&pool)?;
            let servers = p.servers()?;
            let served = serve::connect(&pool).await.is_some();
            if json {
                let mut disks = Vec::new();
                for s in &servers {
                    disks.extend(p.disks(&s.name)?);
                }
                print_json(&serde_json::json!({
                    "pool": p.meta(), "served": served, "servers": servers, "disks": disks,
                }))?;
            } else {
                let m = p.meta();
                println!("disk pool        {}", pool.display());
                println!("location         {}", m.location);
                println!("recovery space   {} ({})", m.space, m.space_id);
                println!("created          {}", time(&m.created_at));
                println!("served           {}", if served { "yes" } else { "no" });
                println!("servers          {}", servers.len());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn offline_server(c: OfflineServer) -> Result<ExitCode> {
    match c {
        OfflineServer::Create {
            pool,
            name,
            pre_hook,
            post_hook,
        } => {
            let p = Pool::open(&pool)?;
            p.create_server(&name, pre_hook, post_hook)?;
            println!("created server {name} (stopped; add disks with `cairn disk create`)");
        }
        OfflineServer::List { pool, json } => {
            let p = Pool::open(&pool)?;
            let servers = p.servers()?;
            let attached: Vec<String> = match remote(&pool, Request::Status).await? {
                Some(v) => serde_json::from_value(v["running"].clone()).unwrap_or_default(),
                None => Vec::new(),
            };
            let mut rows = Vec::new();
            for s in &servers {
                let disks = p.disks(&s.name)?;
                rows.push(serde_json::json!({
                    "name": s.name,
                    "state": s.state,
                    "served": attached.contains(&s.name),
                    "disks": disks.iter().map(|d| d.name.clone()).collect::<Vec<_>>(),
                    "size": disks.iter().map(|d| d.size).sum::<u64>(),
                    "pre_hook": s.pre_hook, "post_hook": s.post_hook,
                }));
            }
            if json {
                print_json(&rows)?;
            } else if rows.is_empty() {
                println!("no servers in {}", pool.display());
            } else {
                let mut t = table(&["SERVER", "STATE", "SERVED", "DISKS", "SIZE"]);
                for r in &rows {
                    t.add_row(vec![
                        r["name"].as_str().unwrap_or_default().to_string(),
                        r["state"].as_str().unwrap_or_default().to_string(),
                        if r["served"].as_bool() == Some(true) {
                            "yes"
                        } else {
                            "no"
                        }
                        .into(),
                        r["disks"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|d| d.as_str())
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default(),
                        size(r["size"].as_u64().unwrap_or(0)),
                    ]);
                }
                println!("{t}");
            }
        }
        OfflineServer::Start { pool, name } => {
            if set_state(&pool, &name, ServerState::Running).await? {
                println!("server {name} is running: its disks are exported as {name}/<disk>");
            } else {
                println!(
                    "server {name} is marked running; its disks are exported while `cairn serve-nbd {}` runs",
                    pool.display()
                );
            }
        }
        OfflineServer::Stop { pool, name } => {
            set_state(&pool, &name, ServerState::Stopped).await?;
            println!("server {name} is stopped");
        }
        OfflineServer::Delete { pool, name } => {
            let p = Pool::open(&pool)?;
            p.delete_server(&name)?;
            println!("deleted server {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts or stops a server through the serving process (true), or records the desired
/// state for the next `serve-nbd` when none runs (false).
async fn set_state(pool: &Path, name: &str, state: ServerState) -> Result<bool> {
    let p = Pool::open(pool)?;
    let mut m = p.server(name)?;
    let server = name.to_string();
    let req = match state {
        ServerState::Running => Request::Start { server },
        ServerState::Stopped => Request::Stop { server },
    };
    if remote(pool, req).await?.is_some() {
        return Ok(true);
    }
    m.state = state;
    p.save_server(&m)?;
    Ok(false)
}

pub async fn offline_disk(c: OfflineDisk) -> Result<ExitCode> {
    match c {
        OfflineDisk::Create {
            pool,
            disk,
            size: sz,
        } => {
            let p = Pool::open(&pool)?;
            let (s, d) = spec(&disk)?;
            let m = host::create_disk(&p, &s, &d, sz.as_u64())?;
            println!("created disk {s}/{d} ({})", size(m.size));
        }
        OfflineDisk::Import {
            pool,
            disk,
            image,
            format,
            quiet,
        } => {
            let p = Pool::open(&pool)?;
            let (s, d) = spec(&disk)?;
            let bar = crate::progress::Bar::new(quiet);
            let m = tokio::task::block_in_place(|| {
                host::import_disk(&p, &s, &d, &image, format.as_deref(), &bar)
            })?;
            println!(
                "imported {} as disk {s}/{d} ({})",
                image.display(),
                size(m.size)
            );
        }
        OfflineDisk::Export {
            pool,
            disk,
            target,
            format,
            force,
            quiet,
        } => {
            let p = Pool::open(&pool)?;
            let (s, d) = spec(&disk)?;
            let bar = crate::progress::Bar::new(quiet);
            tokio::task::block_in_place(|| {
                host::export_disk(&p, &s, &d, &target, &format, force, &bar)
            })?;
            println!("exported disk {s}/{d} to {} ({format})", target.display());
        }
        OfflineDisk::List { pool, server, json } => {
            let p = Pool::open(&pool)?;
            let servers = match server {
                Some(s) => vec![p.server(&s)?],
                None => p.servers()?,
            };
            let live: Vec<serde_json::Value> = match remote(&pool, Request::Status).await? {
                Some(v) => serde_json::from_value(v["disks"].clone()).unwrap_or_default(),
                None => Vec::new(),
            };
            let mut rows = Vec::new();
            for s in &servers {
                for d in p.disks(&s.name)? {
                    let served = live
                        .iter()
                        .find(|l| l["server"] == s.name.as_str() && l["disk"] == d.name.as_str());
                    let paths = p.disk_paths(&s.name, &d.name);
                    let allocated = std::fs::metadata(&paths.data)
                        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                        .unwrap_or(0);
                    let cbt = cairn_volume::volume::read_cbt(&paths, d.size)
                        .ok()
                        .flatten();
                    let (base, changed) = match served {
                        Some(l) => (l["change_base"].clone(), l["changed_bytes"].clone()),
                        None => (
                            cbt.as_ref().map(|(b, _)| b.point.to_string()).into(),
                            cbt.as_ref()
                                .map(|(_, m)| m.count() * cairn_volume::volume::GRAIN)
                                .into(),
                        ),
                    };
                    rows.push(serde_json::json!({
                        "server": s.name, "disk": d.name, "size": d.size, "allocated": allocated,
                        "state": s.state,
                        "served": served.is_some(),
                        "clone_of": d.origin.as_ref().map(|o| format!("{}:{}", o.point, o.disk)),
                        "hydration": served.map(|l| l["hydration"].clone()),
                        "change_base": base,
                        "changed_bytes": changed,
                    }));
                }
            }
            if json {
                print_json(&rows)?;
            } else if rows.is_empty() {
                println!("no disks");
            } else {
                let mut t = table(&[
                    "DISK",
                    "SIZE",
                    "ALLOCATED",
                    "SERVER STATE",
                    "CHANGED SINCE LAST POINT",
                    "CLONE OF",
                ]);
                for r in &rows {
                    t.add_row(vec![
                        format!(
                            "{}/{}",
                            r["server"].as_str().unwrap_or(""),
                            r["disk"].as_str().unwrap_or("")
                        ),
                        size(r["size"].as_u64().unwrap_or(0)),
                        size(r["allocated"].as_u64().unwrap_or(0)),
                        r["state"].as_str().unwrap_or("").into(),
                        match r["changed_bytes"].as_u64() {
                            Some(n) => size(n),
                            None => "unknown (next point reads all)".into(),
                        },
                        r["clone_of"].as_str().unwrap_or("").into(),
                    ]);
                }
                println!("{t}");
            }
        }
        OfflineDisk::Grow {
            pool,
            disk,
            size: sz,
        } => {
            let p = Pool::open(&pool)?;
            let (s, d) = spec(&disk)?;
            let m = host::grow_disk(&p, &s, &d, sz.as_u64())?;
            println!("disk {s}/{d} is now {}", size(m.size));
        }
        OfflineDisk::Delete { pool, disk, yes } => {
            let p = Pool::open(&pool)?;
            let (s, d) = spec(&disk)?;
            let m = p.disk(&s, &d)?;
            if !yes {
                println!(
                    "deleting disk {s}/{d} ({}) destroys its data and cannot be undone. Nothing was changed; run the same command with --yes.",
                    size(m.size)
                );
                return Ok(ExitCode::from(4));
            }
            if let Some(origin) = host::delete_disk(&p, &s, &d)? {
                let space = host::open_space(&p).await?;
                host::unpin(&space, &origin).await?;
            }
            println!("deleted disk {s}/{d}");
        }
        OfflineDisk::Clone {
            pool,
            point,
            disk,
            from_disk,
            space,
        } => {
            let p = Pool::open(&pool)?;
            let (s, d) = spec(&disk)?;
            let sp = match &space {
                Some(loc) => {
                    let backend = cairn_store::space::open_location(loc, false)?;
                    Arc::new(cairn_store::Space::open(backend).await?)
                }
                None => host::open_space(&p).await?,
            };
            let id = host::resolve_point(&sp, None, &point).await?;
            let m = host::clone_disk(&p, &sp, &id, from_disk.as_deref(), &s, &d).await?;
            let o = m.origin.as_ref().expect("a clone");
            println!(
                "created disk {s}/{d} ({}) as a clone of disk {} of point {}: usable now (start the server), filled from the point as it is read; `cairn disk hydrate {} {s}/{d}` copies the rest",
                size(m.size),
                o.disk,
                o.point,
                pool.display()
            );
        }
        OfflineDisk::Hydrate { pool, disk, quiet } => {
            let (s, d) = spec(&disk)?;
            let h = Host::open(&pool).await?;
            let served = remote(&pool, Request::Status).await?;
            let attached = served
                .as_ref()
                .and_then(|v| serde_json::from_value::<Vec<String>>(v["running"].clone()).ok())
                .is_some_and(|r| r.contains(&s));
            if attached {
                remote(
                    &pool,
                    Request::Hydrate {
                        server: s.clone(),
                        disk: d.clone(),
                    },
                )
                .await?;
            } else {
                h.hydrate(&s, &d, &crate::progress::Bar::new(quiet)).await?;
            }
            println!("disk {s}/{d} is hydrated: it no longer depends on its recovery point");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cairn point create POOL --server NAME`.
pub async fn point_create(
    pool: &Path,
    server: &str,
    operator: Option<String>,
    run: &RunArgs,
) -> Result<ExitCode> {
    let operator = operator.unwrap_or_else(cairn_store::create::default_operator);
    let req = Request::Point {
        server: server.into(),
        operator: operator.clone(),
        trigger: "cli".into(),
    };
    let attached = match remote(pool, Request::Status).await? {
        Some(v) => serde_json::from_value::<Vec<String>>(v["running"].clone())
            .unwrap_or_default()
            .contains(&server.to_string()),
        None => false,
    };
    let point = if attached {
        let v = remote(pool, req)
            .await?
            .context("the serving process went away")?;
        serde_json::from_value::<serde_json::Value>(v)?
    } else {
        let h = Host::open(pool).await?;
        serde_json::to_value(h.take_point(server, &operator, "cli", &run.bar()).await?)?
    };
    if run.json {
        print_json(&point)?;
    } else {
        let record: cairn_format::record::PointRecord =
            serde_json::from_value(point["record"].clone())?;
        print_point(&record);
        for w in point["warnings"].as_array().into_iter().flatten() {
            eprintln!("warning: {}", w.as_str().unwrap_or_default());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cairn point rollback POOL ID --server NAME [--disk D] [--yes]`.
pub async fn rollback(
    pool: &Path,
    id: &str,
    server: &str,
    disk: Option<&str>,
    yes: bool,
    run: &RunArgs,
) -> Result<ExitCode> {
    let p = Pool::open(pool)?;
    let space = host::open_space(&p).await?;
    let id = host::resolve_point(&space, Some(server), id).await?;
    let bar = run.bar();
    let reports = host::rollback_server(&p, &space, &id, server, disk, yes, &bar).await?;
    if run.json {
        print_json(&serde_json::json!({"applied": yes, "point": id, "disks": reports}))?;
    } else {
        for r in &reports {
            let verb = if yes { "rewrote" } else { "would rewrite" };
            let how = if r.method == "changed-block map" {
                "the areas written since the point, from the changed-block map".to_string()
            } else {
                format!("compared {} using the {}", size(r.bytes_compared), r.method)
            };
            println!(
                "{server}/{}: {verb} {} in {} chunks ({how})",
                r.disk,
                size(if yes {
                    r.bytes_rewritten
                } else {
                    r.bytes_to_rewrite
                }),
                r.chunks_differing,
            );
        }
        if !yes {
            println!(
                "Nothing was changed. This is irreversible: the disks' current content in those chunks is lost. Run the same command with --yes."
            );
        } else {
            println!("server {server} is rolled back to point {id}");
        }
    }
    Ok(if yes {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(4)
    })
}

/// `cairn serve-nbd POOL`: runs until SIGINT or SIGTERM, then closes every disk cleanly.
pub async fn serve_nbd(a: ServeArgs) -> Result<ExitCode> {
    let control = serve::bind_control(&a.pool).await?;
    let h = Host::open(&a.pool).await?;
    h.set_background_hydration(!a.no_hydrate);
    for (server, e) in h.attach_running().await {
        eprintln!("warning: server {server} not started: {e}");
    }
    let exports: Arc<dyn cairn_nbd::server::Exports> = h.clone();
    let mut tasks = tokio::task::JoinSet::new();
    if a.listen != "none" {
        let l = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.listen))?;
        let ex = exports.clone();
        tasks.spawn(async move { cairn_nbd::server::serve_tcp(l, ex).await });
        eprintln!("serving NBD on nbd://{}/<server>/<disk>", a.listen);
    }
    if let Some(path) = &a.socket {
        let _ = std::fs::remove_file(path);
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        let ex = exports.clone();
        tasks.spawn(async move { cairn_nbd::server::serve_unix(l, ex).await });
        eprintln!("serving NBD on unix socket {}", path.display());
    }
    let running = h.running().await;
    eprintln!(
        "pool {}: running servers: {}",
        a.pool.display(),
        if running.is_empty() {
            "none".into()
        } else {
            running.join(", ")
        }
    );
    tokio::spawn(serve::serve_control(h.clone(), control));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        Some(r) = tasks.join_next() => {
            if let Ok(Err(e)) = r { eprintln!("error: listener failed: {e}"); }
        }
    }
    eprintln!("shutting down: closing disks");
    h.detach_all().await;
    let _ = std::fs::remove_file(a.pool.join("control.sock"));
    Ok(ExitCode::SUCCESS)
}
