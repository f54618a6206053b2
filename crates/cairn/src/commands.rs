//! The command line: clap definitions, and one thin handler per command that calls the
//! library and prints its report (a table for people, JSON with `--json`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytesize::ByteSize;
use cairn_format::config::SpaceConfig;
use cairn_format::record::PointRecord;
use cairn_store::create::{CreateOptions, DiskSource, ParentChoice};
use cairn_store::gc::GcOptions;
use cairn_store::restore::RestoreOptions;
use cairn_store::retention::RetentionPolicy;
use cairn_store::{Space, space::open_location};
use clap::{Args, Parser, Subcommand};
use comfy_table::{Table, presets::NOTHING};

use crate::progress::Bar;

/// How a command chooses between the daemon and a pool or space on disk (shown in `--help`).
pub const DUAL_FORMS: &str = "\
Daemon or offline: `server`, `disk` and `point` commands have two forms. The offline form \
works on a pool or space directly and is used when the first argument is an existing \
directory, a path (starting with /, ./ or ../), a URL with a scheme (file://, s3://), or \
when there are more arguments than the daemon form takes. Otherwise the command asks the \
daemon given by CAIRN_URL (or --url) with the token CAIRN_TOKEN (or --token). `policy` and \
`job` always ask the daemon.";

/// Cairn: disaster recovery for virtual-machine disks.
#[derive(Debug, Parser)]
#[command(name = "cairn", version, about, long_about = None, after_help = DUAL_FORMS)]
pub struct Cli {
    #[command(flatten)]
    conn: crate::client::Conn,
    #[command(subcommand)]
    command: Command,
}

/// A command line that parses but does not make sense (exit 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A usage error of `cairn CMD` (exit 2).
pub fn usage(cmd: &str, msg: &str) -> anyhow::Error {
    UsageError(format!("cairn {cmd}: {msg} (see `cairn {cmd} --help`)")).into()
}

/// Which form a dual command takes (see [`DUAL_FORMS`]).
pub enum Form<'a> {
    /// A pool or space path, and the other arguments.
    Offline(&'a str, &'a [String]),
    /// Every argument belongs to the daemon form.
    Daemon(&'a [String]),
}

/// True when `arg` names a pool or space rather than a daemon object: an existing
/// directory, a path, or a URL with a scheme.
pub fn is_location(arg: &str) -> bool {
    let scheme = arg.split_once("://").is_some_and(|(s, _)| {
        !s.is_empty()
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    scheme
        || arg.starts_with('/')
        || arg.starts_with("./")
        || arg.starts_with("../")
        || arg == "."
        || arg == ".."
        || std::path::Path::new(arg).is_dir()
}

/// The form of a dual command whose daemon form takes at most `daemon_max` positional
/// arguments.
pub fn form(args: &[String], daemon_max: usize) -> Form<'_> {
    match args.first() {
        Some(first) if is_location(first) || args.len() > daemon_max => {
            Form::Offline(first, &args[1..])
        }
        _ => Form::Daemon(args),
    }
}

/// `--json` is refused where the offline form prints no report.
pub fn no_json_offline(cmd: &str, json: bool) -> Result<()> {
    if json {
        return Err(usage(cmd, "--json is only for the daemon form"));
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Recovery spaces: create, inspect, collect garbage, apply retention.
    #[command(subcommand)]
    Space(SpaceCommand),
    /// Recovery points: create, list, show, restore, clone, roll back, verify, delete.
    #[command(subcommand)]
    Point(PointCommand),
    /// Disk pools: create one for a location, show it.
    #[command(subcommand)]
    Pool(crate::live::PoolCommand),
    /// Servers (named sets of disks): create, list, show, start, stop, delete.
    #[command(subcommand)]
    Server(crate::live::ServerCommand),
    /// Disks: create, import, export, list, show, grow, delete, clone, hydrate.
    #[command(subcommand)]
    Disk(crate::live::DiskCommand),
    /// Replication policies of the daemon: create, list, show, update, delete, pause,
    /// resume, replicate-now, verify.
    #[command(subcommand)]
    Policy(crate::remote::PolicyCommand),
    /// Jobs of the daemon (replication, verify): list, show, follow.
    #[command(subcommand)]
    Job(crate::remote::JobCommand),
    /// Serve a pool: export the disks of its running servers over NBD.
    ServeNbd(crate::live::ServeArgs),
    /// Run a location: its disk pool, NBD listener, recovery space, scheduler and HTTP API.
    Serve(crate::serve::ServeArgs),
    /// API tokens (on the daemon's host, with its data directory).
    #[command(subcommand)]
    Token(crate::serve::TokenCommand),
    /// Other locations this one knows: add, list, remove.
    #[command(subcommand)]
    Location(crate::pairs::LocationCommand),
    /// DR pairs: a server protected by a standby at another location — create, show,
    /// replicate-now, pause, resume, restart, failover, drill, drill-cleanup.
    #[command(subcommand)]
    Pair(crate::pairs::PairCommand),
}

/// For `cairn location add`, `--url` and `--token` given on the command line name the
/// location being added; this daemon is then reached by CAIRN_URL and CAIRN_TOKEN.
pub fn remote_creds(m: &clap::ArgMatches) -> Option<crate::pairs::RemoteCreds> {
    let (_, loc) = m.subcommand().filter(|(n, _)| *n == "location")?;
    let (_, add) = loc.subcommand().filter(|(n, _)| *n == "add")?;
    let given = |id: &str| {
        (add.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
            .then(|| add.get_one::<String>(id).cloned())
            .flatten()
    };
    Some(crate::pairs::RemoteCreds {
        url: given("url"),
        token: given("token"),
    })
}

#[derive(Debug, Subcommand)]
enum SpaceCommand {
    /// Create a recovery space in a folder (created if missing).
    Init {
        space: String,
        /// Chunk size: a power of two from 64KiB to 16MiB.
        #[arg(long, default_value = "4MiB")]
        chunk_size: ByteSize,
        /// zstd compression level, 1 (fastest) to 19.
        #[arg(long, default_value_t = cairn_format::config::DEFAULT_COMPRESSION_LEVEL)]
        compression_level: i32,
        #[arg(long)]
        json: bool,
    },
    /// Show a space's config and contents.
    Info {
        space: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete chunks no recovery point references (mark and sweep).
    Gc {
        space: String,
        #[command(flatten)]
        gc: GcArgs,
        #[arg(long)]
        json: bool,
    },
    /// Apply a retention policy: print the plan, then delete what it removes.
    Prune {
        space: String,
        #[command(flatten)]
        keep: KeepArgs,
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
        /// Do not collect garbage after deleting points.
        #[arg(long)]
        no_gc: bool,
        #[command(flatten)]
        gc: GcArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct GcArgs {
    /// Unreferenced chunks younger than this are kept (protects running writers).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Referenced chunk ids held in memory per pass (bounds memory; more passes if less).
    #[arg(long, default_value_t = 4 << 20)]
    max_ids_per_pass: usize,
}

#[derive(Debug, Args)]
struct KeepArgs {
    /// Keep the N newest points.
    #[arg(long)]
    keep_last: Option<u32>,
    /// Keep the newest point of each of the N newest hours (UTC).
    #[arg(long)]
    keep_hourly: Option<u32>,
    /// Keep the newest point of each of the N newest days (UTC).
    #[arg(long)]
    keep_daily: Option<u32>,
    /// Keep the newest point of each of the N newest ISO weeks.
    #[arg(long)]
    keep_weekly: Option<u32>,
    /// Keep the newest point of each of the N newest months.
    #[arg(long)]
    keep_monthly: Option<u32>,
    /// Keep every point within this long of the newest (e.g. 7d, 36h).
    #[arg(long, value_parser = humantime::parse_duration)]
    keep_within: Option<Duration>,
}

#[derive(Debug, Subcommand)]
enum PointCommand {
    /// Take a recovery point of disk images (`SPACE IMAGE...`), or of a server of a disk
    /// pool (`POOL --server NAME`: crash-consistent across its disks, even while it runs).
    Create {
        /// A recovery space, or a disk pool (with --server).
        space: String,
        images: Vec<PathBuf>,
        /// Disk names, in the order of the images (default: each image's file name).
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// Incremental to this point: `latest` or a point id.
        #[arg(long)]
        parent: Option<String>,
        /// The server these disks belong to.
        #[arg(long)]
        server: Option<String>,
        /// Recorded as who took the point (default: the login name).
        #[arg(long)]
        operator: Option<String>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// List recovery points: of a space, oldest first (offline), or of the daemon's
    /// policies, newest first.
    #[command(
        override_usage = "cairn point list [--policy P] [--scope-changed] [--json]\n       cairn point list SPACE [--json]"
    )]
    List {
        /// A recovery space or pool's space (offline form); none for the daemon form.
        #[arg(value_name = "SPACE")]
        space: Option<String>,
        /// Only this policy's points (daemon form).
        #[arg(long)]
        policy: Option<String>,
        /// Only points whose scope (set of disks) changed from the policy's point before
        /// (daemon form).
        #[arg(long)]
        scope_changed: bool,
        /// Only points of this disk, SERVER/DISK (daemon form).
        #[arg(long)]
        disk: Option<String>,
        /// Only points in this state: succeeded, failed, ... (daemon form).
        #[arg(long)]
        state: Option<String>,
        /// At most this many points (daemon form; default: all).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Show one recovery point.
    #[command(
        override_usage = "cairn point show POINT [--json]\n       cairn point show SPACE ID [--json]"
    )]
    Show {
        /// POINT (daemon form: a job id, unique prefix, or space point id), or SPACE ID
        /// (offline form: a point id, unique id prefix, or `latest`).
        #[arg(value_name = "[SPACE] POINT", num_args = 1..=2, required = true)]
        args: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write a disk of a recovery point out to a file or block device.
    Restore {
        space: String,
        id: String,
        target: PathBuf,
        /// Which disk (needed when the point has several).
        #[arg(long)]
        disk: Option<String>,
        /// Overwrite an existing target.
        #[arg(long)]
        force: bool,
        /// Skip the final fsync of the target.
        #[arg(long)]
        no_sync: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Make a disk equal to a recovery point, rewriting only what differs: through the
    /// daemon (`POINT --disk SERVER/DISK` or `POINT --server NAME`, the server stopped), an
    /// image (`SPACE ID IMAGE`), or a stopped server's disks of a pool (`POOL ID --server
    /// NAME`).
    #[command(
        override_usage = "cairn point rollback POINT (--disk SERVER/DISK | --server NAME) [--yes]\n       cairn point rollback SPACE ID IMAGE [--disk NAME] [--yes]\n       cairn point rollback POOL ID --server NAME [--disk NAME] [--yes]"
    )]
    Rollback {
        /// POINT (daemon form), or SPACE ID [IMAGE] / POOL ID (offline forms).
        #[arg(value_name = "[SPACE] POINT [IMAGE]", num_args = 1..=3, required = true)]
        args: Vec<String>,
        /// Roll back this server (all its disks in the point, or --disk).
        #[arg(long)]
        server: Option<String>,
        /// The disk: SERVER/DISK through the daemon, the point's disk name offline.
        #[arg(long)]
        disk: Option<String>,
        /// Really do it (irreversible). Without it, only say what would be rewritten.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Clone a recovery point's disk into a new disk, usable at once over NBD (daemon).
    Clone {
        /// A job id, unique prefix, or the space's point id.
        point: String,
        /// The point's disk, SERVER/DISK.
        #[arg(long)]
        disk: String,
        /// The new disk, SERVER/DISK (its server is created if missing).
        #[arg(long)]
        to: String,
        /// Do not start the new disk's server.
        #[arg(long)]
        no_start: bool,
        #[arg(long)]
        json: bool,
    },
    /// Read back every chunk of points and check it: through the daemon (a verify job
    /// per POINT), or of a space (all points by default; exit 3 on damage).
    #[command(
        override_usage = "cairn point verify POINT... [--wait]\n       cairn point verify SPACE [ID...] [--repair]"
    )]
    Verify {
        /// POINT... (daemon form), or SPACE [ID...] (offline form).
        #[arg(value_name = "[SPACE] POINT", num_args = 1.., required = true)]
        args: Vec<String>,
        /// Quarantine damaged chunks, so that the next point of the same data stores them
        /// again (which heals every point that references them) (offline form).
        #[arg(long)]
        repair: bool,
        /// Wait for the verify job to end, with a progress bar (daemon form).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Delete recovery points (offline: their chunks go at the next gc).
    #[command(
        override_usage = "cairn point delete POINT... [--json]\n       cairn point delete SPACE ID... [--json]"
    )]
    Delete {
        /// POINT... (daemon form), or SPACE ID... (offline form).
        #[arg(value_name = "[SPACE] POINT", num_args = 1.., required = true)]
        args: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Print a JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Chunks in flight at once (default: 2 per core + 2).
    #[arg(long)]
    concurrency: Option<usize>,
}

impl RunArgs {
    fn concurrency(&self) -> usize {
        self.concurrency
            .unwrap_or_else(cairn_store::create::default_concurrency)
    }
    pub fn bar(&self) -> Bar {
        Bar::new(self.quiet || self.json)
    }
}

pub async fn run(cli: Cli, remote: Option<crate::pairs::RemoteCreds>) -> Result<ExitCode> {
    let mut conn = cli.conn;
    match cli.command {
        Command::Space(c) => space_command(c).await,
        Command::Point(c) => point_command(c, &conn).await,
        Command::Pool(c) => crate::live::pool_command(c).await,
        Command::Server(c) => crate::live::server_command(c, &conn).await,
        Command::Disk(c) => crate::live::disk_command(c, &conn).await,
        Command::Policy(c) => crate::remote::policy_command(c, &conn).await,
        Command::Job(c) => crate::remote::job_command(c, &conn).await,
        Command::ServeNbd(a) => crate::live::serve_nbd(a).await,
        Command::Serve(a) => crate::serve::serve(a).await,
        Command::Token(c) => crate::serve::token(c).await,
        Command::Location(c) => {
            let remote = remote.unwrap_or(crate::pairs::RemoteCreds {
                url: None,
                token: None,
            });
            // The flags were the other location's: this daemon is the environment's.
            if remote.url.is_some() {
                conn.url = std::env::var("CAIRN_URL").ok();
            }
            if remote.token.is_some() {
                conn.token = std::env::var("CAIRN_TOKEN").ok();
            }
            crate::pairs::location_command(c, &conn, remote).await
        }
        Command::Pair(c) => crate::pairs::pair_command(c, &conn).await,
    }
}

async fn open(space: &str) -> Result<Space> {
    let backend = open_location(space, false)?;
    Ok(Space::open(backend).await?)
}

pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(v)?;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        // A reader that went away (`| head`) is not an error worth a panic.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => Ok(r?),
    }
}

pub fn size(n: u64) -> String {
    ByteSize(n).display().iec().to_string()
}

pub fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(NOTHING).set_header(header.to_vec());
    t
}

async fn space_command(c: SpaceCommand) -> Result<ExitCode> {
    match c {
        SpaceCommand::Init {
            space,
            chunk_size,
            compression_level,
            json,
        } => {
            let config = SpaceConfig::new(chunk_size.as_u64(), compression_level)?;
            let backend = open_location(&space, true)?;
            let s = Space::init(backend, config).await?;
            if json {
                print_json(s.config())?;
            } else {
                println!(
                    "created recovery space {} (chunk size {}, zstd level {})",
                    s.describe(),
                    size(u64::from(s.config().chunk_size)),
                    s.config().compression_level
                );
            }
        }
        SpaceCommand::Info { space, json } => {
            let s = open(&space).await?;
            let points = s.list_points().await?;
            let written: u64 = points.iter().map(|p| p.stats.bytes_written).sum();
            if json {
                print_json(&serde_json::json!({
                    "location": s.describe(),
                    "config": s.config(),
                    "points": points.len(),
                    "bytes_written_by_points": written,
                }))?;
            } else {
                let c = s.config();
                println!("recovery space   {}", s.describe());
                println!("format version   {}", c.version);
                println!("id               {}", c.id);
                println!("created          {}", time(&c.created_at));
                println!("chunk size       {}", size(u64::from(c.chunk_size)));
                println!(
                    "compression      {} level {}",
                    c.compression, c.compression_level
                );
                println!("encryption       {}", c.encryption);
                println!("recovery points  {}", points.len());
                println!("stored by points {}", size(written));
            }
        }
        SpaceCommand::Gc { space, gc, json } => {
            let s = open(&space).await?;
            let report = run_gc(&s, &gc, false, json).await?;
            if json {
                print_json(&report)?;
            }
        }
        SpaceCommand::Prune {
            space,
            keep,
            dry_run,
            no_gc,
            gc,
            json,
        } => {
            let s = open(&space).await?;
            let policy = RetentionPolicy {
                keep_last: keep.keep_last,
                keep_hourly: keep.keep_hourly,
                keep_daily: keep.keep_daily,
                keep_weekly: keep.keep_weekly,
                keep_monthly: keep.keep_monthly,
                keep_within: keep.keep_within,
            };
            let plan = cairn_store::gc::prune_plan(&s, &policy).await?;
            if !json {
                let mut t = table(&["POINT", "TAKEN", "ACTION", "WHY"]);
                for p in &plan.keep {
                    t.add_row(vec![
                        p.id.to_string(),
                        time(&p.snapshot_at),
                        "keep".into(),
                        p.reasons.join(", "),
                    ]);
                }
                for p in &plan.remove {
                    t.add_row(vec![
                        p.id.to_string(),
                        time(&p.snapshot_at),
                        "remove".into(),
                        String::new(),
                    ]);
                }
                println!("{t}");
                println!(
                    "retention plan: keep {}, remove {}{}",
                    plan.keep.len(),
                    plan.remove.len(),
                    if dry_run {
                        " (dry run: nothing removed)"
                    } else {
                        ""
                    }
                );
            }
            let mut gc_report = None;
            if !dry_run {
                let ids: Vec<_> = plan.remove.iter().map(|p| p.id).collect();
                cairn_store::gc::delete_points(&s, &ids).await?;
                if !no_gc && !ids.is_empty() {
                    gc_report = Some(run_gc(&s, &gc, false, json).await?);
                }
            }
            if json {
                print_json(
                    &serde_json::json!({"plan": plan, "dry_run": dry_run, "gc": gc_report}),
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_gc(
    s: &Space,
    gc: &GcArgs,
    dry_run: bool,
    json: bool,
) -> Result<cairn_store::gc::GcReport> {
    let opts = GcOptions {
        grace: gc.grace,
        max_ids_per_pass: gc.max_ids_per_pass,
        dry_run,
        ..GcOptions::default()
    };
    let report = cairn_store::gc::gc(s, &opts, &Bar::new(json)).await?;
    if !json {
        println!(
            "gc: {} points, {} chunks seen, {} referenced; deleted {} chunks ({} freed); {} unreferenced kept in the {} grace period; {} orphan indexes and {} stale leases removed",
            report.points,
            report.chunks_seen,
            report.chunks_referenced,
            report.chunks_deleted,
            size(report.bytes_freed),
            report.chunks_in_grace,
            humantime::format_duration(gc.grace),
            report.indexes_deleted,
            report.leases_removed
        );
    }
    Ok(report)
}

fn disk_name_of(path: &std::path::Path) -> Result<String> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .with_context(|| format!("cannot name a disk after {}; use --disk", path.display()))?;
    Ok(stem)
}

#[allow(clippy::cast_precision_loss)]
fn ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "all reused".into()
    }
}

pub fn print_point(p: &PointRecord) {
    println!("recovery point  {}", p.id);
    if let Some(s) = &p.server {
        println!("server          {s}");
    }
    println!("snapshot at     {}", time(&p.snapshot_at));
    println!("completed at    {}", time(&p.completed_at));
    println!("duration        {:.1} s", p.duration_ms as f64 / 1000.0);
    println!("trigger         {}", p.trigger);
    println!("operator        {}", p.operator);
    println!(
        "parent          {}",
        p.parent
            .map_or_else(|| "none (full)".to_string(), |id| id.to_string())
    );
    println!("chunk size      {}", size(u64::from(p.chunk_size)));
    let s = &p.stats;
    println!(
        "data            {} covered, {} read, {} new ({} stored)",
        size(s.bytes_total),
        size(s.bytes_read),
        size(s.bytes_new),
        size(s.bytes_written)
    );
    println!(
        "chunks          {} total: {} new, {} reused, {} zero",
        s.chunks_total, s.chunks_new, s.chunks_reused, s.chunks_zero
    );
    println!(
        "ratios          dedup {}, compression {}",
        ratio(s.dedup_ratio(p.chunk_size)),
        ratio(s.compression_ratio())
    );
    let mut t = table(&[
        "DISK",
        "SIZE",
        "READ",
        "NEW",
        "STORED",
        "CHUNKS NEW/REUSED/ZERO",
        "SOURCE",
    ]);
    for d in &p.disks {
        t.add_row(vec![
            d.name.clone(),
            size(d.size),
            size(d.stats.bytes_read),
            size(d.stats.bytes_new),
            size(d.stats.bytes_written),
            format!(
                "{}/{}/{}",
                d.stats.chunks_new, d.stats.chunks_reused, d.stats.chunks_zero
            ),
            d.source.clone(),
        ]);
    }
    println!("{t}");
}

async fn point_command(c: PointCommand, conn: &crate::client::Conn) -> Result<ExitCode> {
    match c {
        PointCommand::Create {
            space,
            images,
            disks,
            parent,
            server,
            operator,
            run,
        } => {
            let pool_path = std::path::Path::new(&space);
            if images.is_empty() {
                if let (true, Some(server)) = (cairn_volume::Pool::exists(pool_path), &server) {
                    return crate::live::point_create(pool_path, server, operator, &run).await;
                }
                bail!(
                    "nothing to take: give disk images (`cairn point create SPACE IMAGE...`) or a pool and a server (`cairn point create POOL --server NAME`)"
                );
            }
            if disks.len() > images.len() {
                bail!("{} --disk names for {} images", disks.len(), images.len());
            }
            let s = open(&space).await?;
            let mut sources = Vec::with_capacity(images.len());
            for (i, path) in images.iter().enumerate() {
                let name = match disks.get(i) {
                    Some(n) => n.clone(),
                    None => disk_name_of(path)?,
                };
                sources.push(DiskSource {
                    name,
                    path: path.clone(),
                });
            }
            let mut opts = CreateOptions::new(sources);
            opts.parent = match parent.as_deref() {
                None => ParentChoice::None,
                Some("latest") => ParentChoice::Latest,
                Some(id) => ParentChoice::Id(s.resolve_point(id).await?),
            };
            opts.server = server;
            if let Some(op) = operator {
                opts.operator = op;
            }
            opts.concurrency = run.concurrency();
            let record = cairn_store::create::create_point(&s, &opts, &run.bar()).await?;
            if run.json {
                print_json(&record)?;
            } else {
                print_point(&record);
            }
        }
        PointCommand::List {
            space,
            policy,
            scope_changed,
            disk,
            state,
            limit,
            json,
        } => {
            let Some(space) = space else {
                let filter = crate::remote::PointFilter {
                    policy,
                    scope_changed,
                    disk,
                    state,
                    limit,
                };
                return crate::remote::point_list(conn, &filter, json).await;
            };
            if policy.is_some()
                || scope_changed
                || disk.is_some()
                || state.is_some()
                || limit.is_some()
            {
                return Err(usage(
                    "point list",
                    "--policy, --scope-changed, --disk, --state and --limit are for the daemon form (without SPACE)",
                ));
            }
            let s = open(&space).await?;
            let points = s.list_points().await?;
            if json {
                print_json(&points)?;
            } else if points.is_empty() {
                println!("no recovery points in {}", s.describe());
            } else {
                let mut t = table(&[
                    "POINT",
                    "SNAPSHOT AT",
                    "SERVER",
                    "DISKS",
                    "SIZE",
                    "NEW",
                    "STORED",
                    "DURATION",
                    "PARENT",
                ]);
                for p in &points {
                    t.add_row(vec![
                        p.id.to_string(),
                        time(&p.snapshot_at),
                        p.server.clone().unwrap_or_default(),
                        p.disks
                            .iter()
                            .map(|d| d.name.as_str())
                            .collect::<Vec<_>>()
                            .join(","),
                        size(p.stats.bytes_total),
                        size(p.stats.bytes_new),
                        size(p.stats.bytes_written),
                        format!("{:.1} s", p.duration_ms as f64 / 1000.0),
                        p.parent
                            .map(|id| id.to_string()[..13].to_string())
                            .unwrap_or_else(|| "-".into()),
                    ]);
                }
                println!("{t}");
            }
        }
        PointCommand::Show { args, json } => {
            let (space, id) = match form(&args, 1) {
                Form::Offline(space, [id]) => (space.to_string(), id.clone()),
                Form::Offline(..) => return Err(usage("point show", "give SPACE ID")),
                Form::Daemon(rest) => return crate::remote::point_show(conn, &rest[0], json).await,
            };
            let s = open(&space).await?;
            let id = s.resolve_point(&id).await?;
            let p = s.load_point(&id).await?;
            if json {
                print_json(&p)?;
            } else {
                print_point(&p);
            }
        }
        PointCommand::Restore {
            space,
            id,
            target,
            disk,
            force,
            no_sync,
            run,
        } => {
            let s = open(&space).await?;
            let id = s.resolve_point(&id).await?;
            let p = s.load_point(&id).await?;
            let opts = RestoreOptions {
                force,
                sync: !no_sync,
                concurrency: run.concurrency(),
            };
            let started = std::time::Instant::now();
            let r = cairn_store::restore::restore_disk(
                &s,
                &p,
                disk.as_deref(),
                &target,
                &opts,
                &run.bar(),
            )
            .await?;
            if run.json {
                print_json(&r)?;
            } else {
                println!(
                    "restored disk {} of point {} to {}: {} ({} written, {} chunks fetched, {} zero chunks) in {:.1} s",
                    r.disk,
                    r.point,
                    r.target.display(),
                    size(r.disk_size),
                    size(r.bytes_written),
                    r.chunks_fetched,
                    r.chunks_zero,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        PointCommand::Rollback {
            args,
            server,
            disk,
            yes,
            run,
        } => {
            let (space, id, image) = match form(&args, 1) {
                Form::Offline(space, [id]) => (space.to_string(), id.clone(), None),
                Form::Offline(space, [id, image]) => {
                    (space.to_string(), id.clone(), Some(PathBuf::from(image)))
                }
                Form::Offline(..) => {
                    return Err(usage(
                        "point rollback",
                        "give SPACE ID IMAGE or POOL ID --server NAME",
                    ));
                }
                Form::Daemon(rest) => {
                    return crate::remote::point_rollback(
                        conn,
                        &rest[0],
                        server.as_deref(),
                        disk.as_deref(),
                        yes,
                        &run,
                    )
                    .await;
                }
            };
            let image = match (image, server) {
                (None, Some(server)) => {
                    return crate::live::rollback(
                        std::path::Path::new(&space),
                        &id,
                        &server,
                        disk.as_deref(),
                        yes,
                        &run,
                    )
                    .await;
                }
                (Some(i), None) => i,
                (Some(_), Some(_)) => bail!("give either an IMAGE or --server, not both"),
                (None, None) => bail!(
                    "what to roll back: an image (`cairn point rollback SPACE ID IMAGE`) or a server of a pool (`cairn point rollback POOL ID --server NAME`)"
                ),
            };
            let s = open(&space).await?;
            let id = s.resolve_point(&id).await?;
            let p = s.load_point(&id).await?;
            let bar = run.bar();
            let plan = cairn_store::rollback::plan_rollback(
                &s,
                &p,
                disk.as_deref(),
                &image,
                run.concurrency(),
                &bar,
            )
            .await?;
            if !yes {
                if run.json {
                    print_json(&serde_json::json!({"applied": false, "plan": plan}))?;
                } else {
                    println!(
                        "rollback of {} to disk {} of point {} would rewrite {} of {} chunks ({} of {}).",
                        plan.image.display(),
                        plan.disk,
                        plan.point,
                        plan.chunks_differing,
                        plan.chunks_total,
                        size(plan.bytes_to_rewrite),
                        size(plan.disk_size)
                    );
                    println!(
                        "Nothing was changed. This is irreversible: the image's current content in those chunks is lost."
                    );
                    println!("Stop whatever uses the image, then run the same command with --yes.");
                }
                return Ok(ExitCode::from(4));
            }
            let r = cairn_store::rollback::apply_rollback(&s, &p, &plan, run.concurrency(), &bar)
                .await?;
            if run.json {
                print_json(&serde_json::json!({"applied": true, "report": r}))?;
            } else {
                println!(
                    "rolled {} back to disk {} of point {}: rewrote {} chunks ({}), read {}",
                    r.image.display(),
                    r.disk,
                    r.point,
                    r.chunks_rewritten,
                    size(r.bytes_rewritten),
                    size(r.bytes_read)
                );
            }
        }
        PointCommand::Verify {
            args,
            repair,
            wait,
            run,
        } => {
            let (space, ids) = match form(&args, usize::MAX) {
                Form::Offline(space, ids) => {
                    if wait {
                        return Err(usage(
                            "point verify",
                            "--wait is for the daemon form (offline, verify always waits)",
                        ));
                    }
                    (space.to_string(), ids.to_vec())
                }
                Form::Daemon(points) => {
                    if repair {
                        return Err(usage(
                            "point verify",
                            "--repair works on a space directly: give SPACE first",
                        ));
                    }
                    return crate::remote::point_verify(conn, points, wait, &run).await;
                }
            };
            let s = open(&space).await?;
            let resolved = s.resolve_points(&ids).await?;
            let report = cairn_store::verify::verify_and_repair(
                &s,
                &resolved,
                repair,
                run.concurrency(),
                &run.bar(),
            )
            .await?;
            if run.json {
                print_json(&report)?;
            } else {
                println!(
                    "verified {} points ({} disks): {} distinct chunks, {} of data",
                    report.points,
                    report.disks,
                    report.chunks_checked,
                    size(report.bytes_checked)
                );
                for d in &report.damage {
                    match &d.chunk {
                        Some(c) => println!("DAMAGED chunk {c}: {}", d.problem),
                        None => println!("DAMAGED: {}", d.problem),
                    }
                    for a in &d.affected {
                        let ranges: Vec<String> =
                            a.ranges.iter().map(|(s, e)| format!("{s}..{e}")).collect();
                        println!(
                            "  point {} disk {} bytes {}",
                            a.point,
                            a.disk,
                            ranges.join(", ")
                        );
                    }
                }
                if report.is_clean() {
                    println!("no damage found");
                } else {
                    println!("{} problems found", report.damage.len());
                }
                if report.quarantined > 0 {
                    println!(
                        "quarantined {} damaged chunks: the next point of the same disks stores them again, which heals every point listed above; until then, restore those ranges from another point",
                        report.quarantined
                    );
                } else if !report.is_clean() && !repair {
                    println!(
                        "run again with --repair to quarantine the damaged chunks, so that the next point stores them again"
                    );
                }
            }
            if !report.is_clean() {
                return Ok(ExitCode::from(3));
            }
        }
        PointCommand::Clone {
            point,
            disk,
            to,
            no_start,
            json,
        } => {
            return crate::remote::point_clone(conn, &point, &disk, &to, !no_start, json).await;
        }
        PointCommand::Delete { args, json } => {
            let (space, ids) = match form(&args, usize::MAX) {
                Form::Offline(_, []) => {
                    return Err(usage(
                        "point delete",
                        "give SPACE ID... (the points to delete)",
                    ));
                }
                Form::Offline(space, ids) => (space.to_string(), ids.to_vec()),
                Form::Daemon(points) => {
                    return crate::remote::point_delete(conn, points, json).await;
                }
            };
            let s = open(&space).await?;
            let resolved = s.resolve_points(&ids).await?;
            let deleted = cairn_store::gc::delete_points(&s, &resolved).await?;
            if json {
                print_json(&serde_json::json!({"deleted": deleted}))?;
            } else {
                for id in &deleted {
                    println!("deleted recovery point {id}");
                }
                println!("space is reclaimed by `cairn space gc {space}`");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
