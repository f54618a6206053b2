//! The daemon forms of the CLI: each command is one or a few requests to `cairn serve`'s
//! API (`docs/API.md`) through [`crate::client`], and a table for people or the answer
//! as JSON (`--json`).

use std::process::ExitCode;

use anyhow::Result;
use clap::{ArgGroup, Args, Subcommand};
use serde_json::{Value, json};

use crate::client::{Client, Conn, disk_path, path};
use crate::commands::{RunArgs, print_json, size, table, usage};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create a replication policy: what (scope), when (schedule), how long (retention).
    #[command(group(ArgGroup::new("when").required(true).args(["schedule", "every"])))]
    Create {
        name: String,
        #[command(flatten)]
        spec: PolicySpec,
        /// Create it paused (no scheduled runs until `cairn policy resume`).
        #[arg(long)]
        paused: bool,
        #[arg(long)]
        json: bool,
    },
    /// List policies with their protection status.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one policy (name or id).
    Show {
        policy: String,
        #[arg(long)]
        json: bool,
    },
    /// Change a policy: only the fields given change (`--keep-*` are merged into its
    /// retention; `--scope` replaces the scope).
    Update {
        policy: String,
        #[command(flatten)]
        spec: PolicySpec,
        /// Pause it (like `cairn policy pause`).
        #[arg(long, conflicts_with = "enabled")]
        paused: bool,
        /// Resume it (like `cairn policy resume`).
        #[arg(long)]
        enabled: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete a policy: say what happens to its recovery points (exit 4 if not said).
    Delete {
        policy: String,
        /// Keep its recovery points (still listed and restorable).
        #[arg(long, conflicts_with = "delete_points")]
        keep_points: bool,
        /// Delete its recovery points' data too.
        #[arg(long)]
        delete_points: bool,
        #[arg(long)]
        json: bool,
    },
    /// Pause a policy: no scheduled runs until resumed.
    Pause {
        policy: String,
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused policy.
    Resume {
        policy: String,
        #[arg(long)]
        json: bool,
    },
    /// Run a policy's replication now (skipped if one of its jobs is already running).
    ReplicateNow {
        policy: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Verify every recovery point of a policy (a verify job).
    Verify {
        policy: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// The fields of a policy that `create` and `update` take.
#[derive(Debug, Args)]
pub struct PolicySpec {
    /// Servers (`web`) or disks (`web/root`) to protect; repeat or separate with commas.
    #[arg(long, value_delimiter = ',', value_name = "SERVER[/DISK]")]
    scope: Vec<String>,
    /// When to run: a cron expression (5 fields, or 6 with seconds), e.g. '0 2 * * *'.
    #[arg(long, value_name = "CRON", conflicts_with = "every")]
    schedule: Option<String>,
    /// The time zone of --schedule (IANA name; default UTC).
    #[arg(long, value_name = "TZ", conflicts_with = "every")]
    timezone: Option<String>,
    /// Or run at a fixed interval, e.g. 15m, 1h.
    #[arg(long, value_name = "DURATION", value_parser = duration_string)]
    every: Option<String>,
    /// Keep the N newest points.
    #[arg(long)]
    keep_last: Option<u32>,
    /// Keep the newest point of each of the N newest hours.
    #[arg(long)]
    keep_hourly: Option<u32>,
    /// Keep the newest point of each of the N newest days.
    #[arg(long)]
    keep_daily: Option<u32>,
    /// Keep the newest point of each of the N newest weeks.
    #[arg(long)]
    keep_weekly: Option<u32>,
    /// Keep the newest point of each of the N newest months.
    #[arg(long)]
    keep_monthly: Option<u32>,
    /// Keep every point within this long of the newest (e.g. 2d, 36h).
    #[arg(long, value_name = "DURATION", value_parser = duration_string)]
    keep_within: Option<String>,
    /// Free text.
    #[arg(long)]
    description: Option<String>,
    /// The recovery space the points go to (default: the location's).
    #[arg(long)]
    space: Option<String>,
}

/// A duration as the API takes it (a string), checked here first.
fn duration_string(s: &str) -> Result<String, String> {
    humantime::parse_duration(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("{s:?} is not a duration like 15m, 1h 30m, 2d ({e})"))
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait until the job ends (progress bar on a terminal); exit 1 if it failed.
    #[arg(long)]
    wait: bool,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// List jobs, newest first.
    List {
        /// Only this policy's jobs.
        #[arg(long)]
        policy: Option<String>,
        /// Only jobs in this state: queued, running, succeeded, failed, skipped.
        #[arg(long)]
        state: Option<String>,
        /// Only jobs of this kind: replication, verify.
        #[arg(long)]
        kind: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show one job.
    Show {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// Follow a job until it ends, with a progress bar; exit 1 if it failed.
    Follow {
        job: String,
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        quiet: bool,
    },
}

/// Filters of `cairn point list` (daemon form).
pub struct PointFilter {
    pub policy: Option<String>,
    pub scope_changed: bool,
    pub disk: Option<String>,
    pub state: Option<String>,
    pub limit: Option<usize>,
}

// ---------------------------------------------------------------- helpers

pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An RFC 3339 time as `2026-11-23 06:08:04 UTC`; anything else as it is.
pub(crate) fn when(v: &Value) -> String {
    match v.as_str() {
        Some(t) => chrono::DateTime::parse_from_rfc3339(t)
            .map(|d| crate::commands::time(&d.with_timezone(&chrono::Utc)))
            .unwrap_or_else(|_| t.to_string()),
        None => "-".into(),
    }
}

pub(crate) fn ms(v: &Value) -> String {
    match v.as_u64() {
        Some(ms) => format!("{:.1} s", ms as f64 / 1000.0),
        None => "-".into(),
    }
}

fn yes_no(v: &Value) -> &'static str {
    if v == &Value::Bool(true) { "yes" } else { "no" }
}

/// A list of names (strings, or objects with a `name`/`disk`), comma-separated.
fn names(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| match x {
                    Value::String(s) => s.clone(),
                    o => s(if o["name"].is_null() {
                        &o["disk"]
                    } else {
                        &o["name"]
                    }),
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// The job in an answer: `{"job": Job, ...}` or the job itself.
fn job_of(answer: &Value) -> &Value {
    if answer["job"].is_object() {
        &answer["job"]
    } else {
        answer
    }
}

pub(crate) fn schedule_text(p: &Value) -> String {
    let sch = &p["schedule"];
    if let Some(c) = sch["cron"].as_str() {
        match sch["timezone"].as_str() {
            Some(tz) => format!("{c} ({tz})"),
            None => c.to_string(),
        }
    } else if let Some(i) = sch["interval"].as_str() {
        format!("every {i}")
    } else {
        s(sch)
    }
}

fn retention_text(r: &Value) -> String {
    let mut out = Vec::new();
    for (k, label) in [
        ("keep_last", "last"),
        ("keep_hourly", "hourly"),
        ("keep_daily", "daily"),
        ("keep_weekly", "weekly"),
        ("keep_monthly", "monthly"),
        ("keep_within", "within"),
    ] {
        if !r[k].is_null() {
            out.push(format!("{label} {}", s(&r[k])));
        }
    }
    if out.is_empty() {
        "all".into()
    } else {
        out.join(", ")
    }
}

/// The location's NBD address as `nbd://HOST:PORT`, if it exports over TCP.
async fn nbd_base(c: &Client) -> Option<String> {
    let loc = c.get("location").await.ok()?;
    let v = ["nbd_url", "nbd_listen", "nbd"]
        .iter()
        .find_map(|k| loc[*k].as_str().map(str::to_string))?;
    Some(if v.contains("://") {
        v.trim_end_matches('/').to_string()
    } else {
        format!("nbd://{v}")
    })
}

/// Prints a job's outcome in a line (or its JSON).
fn print_job_end(job: &Value, json: bool) -> Result<()> {
    if json {
        return print_json(job);
    }
    let id = s(&job["id"]);
    let kind = job["kind"].as_str().unwrap_or("job");
    let policy = s(&job["policy"]);
    let state = s(&job["state"]);
    let mut line = format!(
        "job {id} ({kind} of policy {policy}) {state} in {}",
        ms(&job["duration_ms"])
    );
    if let Some(res) = job["resources"].as_array().filter(|r| !r.is_empty()) {
        let total: u64 = res.iter().filter_map(|r| r["size"].as_u64()).sum();
        let changed: u64 = res.iter().filter_map(|r| r["bytes_changed"].as_u64()).sum();
        let written: u64 = res.iter().filter_map(|r| r["bytes_written"].as_u64()).sum();
        line.push_str(&format!(
            ": {} disks, {} covered, {} changed, {} written",
            res.len(),
            size(total),
            size(changed),
            size(written)
        ));
    }
    println!("{line}");
    if kind == "replication" && state == "succeeded" {
        println!("recovery point: {id} (use it with `cairn point show|clone|rollback {id}`)");
    }
    Ok(())
}

/// The answer to an action that starts a job: wait for it (`--wait`) or say how to.
pub(crate) async fn started_job(c: &Client, answer: &Value, wait: &WaitArgs) -> Result<ExitCode> {
    let job = job_of(answer);
    let id = s(&job["id"]);
    if answer["skipped"] == true || job["state"] == "skipped" {
        if wait.json {
            print_json(answer)?;
        } else {
            let msg = answer["message"]
                .as_str()
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .unwrap_or_else(|| {
                    format!(
                        "job {} of policy {} is already running",
                        s(&job["skipped_for"]),
                        s(&job["policy"])
                    )
                });
            let msg = msg.strip_prefix("skipped: ").unwrap_or(&msg);
            println!("skipped: {msg} (nothing new was started)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !wait.wait {
        if wait.json {
            print_json(answer)?;
        } else {
            println!(
                "job {id} queued ({} of policy {}); follow it with `cairn job follow {id}`",
                job["kind"].as_str().unwrap_or("job"),
                s(&job["policy"])
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let end = c.follow(&id, wait.quiet || wait.json, wait.json).await?;
    print_job_end(&end, wait.json)?;
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------- servers and disks

pub async fn server_create(
    conn: &Conn,
    name: &str,
    pre_hook: Option<String>,
    post_hook: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let mut body = json!({ "name": name });
    if let Some(h) = pre_hook {
        body["pre_hook"] = h.into();
    }
    if let Some(h) = post_hook {
        body["post_hook"] = h.into();
    }
    let ans = c.post("servers", &body).await?;
    if json {
        print_json(&ans)?;
    } else {
        println!(
            "created server {name} (stopped; add disks with `cairn disk create {name}/DISK --size SIZE`)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn server_list(conn: &Conn, json: bool) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let servers = c.list("servers", &[], false, None).await?;
    if json {
        print_json(&servers)?;
    } else if servers.is_empty() {
        println!("no servers");
    } else {
        let mut t = table(&["SERVER", "STATE", "DISKS", "SIZE"]);
        for v in &servers {
            let total: u64 = v["disks"]
                .as_array()
                .map(|a| a.iter().filter_map(|d| d["size"].as_u64()).sum())
                .unwrap_or(0);
            t.add_row(vec![
                s(&v["name"]),
                s(&v["state"]),
                names(&v["disks"]),
                size(v["size"].as_u64().unwrap_or(total)),
            ]);
        }
        println!("{t}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The NBD URLs of a server's disks.
async fn exports(c: &Client, server: &Value) -> Vec<String> {
    if let Some(disks) = server["disks"].as_array() {
        let e: Vec<String> = disks
            .iter()
            .filter_map(|d| d["export"].as_str().map(str::to_string))
            .collect();
        if !e.is_empty() {
            return e;
        }
    }
    let Some(base) = nbd_base(c).await else {
        return Vec::new();
    };
    let name = s(&server["name"]);
    names(&server["disks"])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{base}/{name}/{d}"))
        .collect()
}

pub async fn server_show(conn: &Conn, name: &str, json: bool) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let v = c.get(&path(&["servers", name])).await?;
    if json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("server     {}", s(&v["name"]));
    println!("state      {}", s(&v["state"]));
    if !v["pre_hook"].is_null() {
        println!("pre hook   {}", s(&v["pre_hook"]));
    }
    if !v["post_hook"].is_null() {
        println!("post hook  {}", s(&v["post_hook"]));
    }
    println!("disks      {}", names(&v["disks"]));
    if v["state"] == "running" {
        for e in exports(&c, &v).await {
            println!("export     {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn server_action(conn: &Conn, name: &str, verb: &str, json: bool) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let ans = match verb {
        "delete" => c.delete(&path(&["servers", name])).await?,
        _ => c.post(&path(&["servers", name, verb]), &json!({})).await?,
    };
    if json {
        print_json(&ans)?;
        return Ok(ExitCode::SUCCESS);
    }
    match verb {
        "start" => {
            let server = if ans["name"].is_string() {
                ans
            } else {
                c.get(&path(&["servers", name])).await?
            };
            let e = exports(&c, &server).await;
            if e.is_empty() {
                println!("server {name} is running");
            } else {
                println!("server {name} is running: exports {}", e.join(" "));
            }
        }
        "stop" => println!("server {name} is stopped"),
        _ => println!("deleted server {name}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn disk_name(v: &Value) -> String {
    let d = if v["disk"].is_string() {
        &v["disk"]
    } else {
        &v["name"]
    };
    let d = s(d);
    if d.contains('/') || v["server"].is_null() {
        d
    } else {
        format!("{}/{d}", s(&v["server"]))
    }
}

pub async fn disk_create(conn: &Conn, disk: &str, bytes: u64, json: bool) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    cairn_volume::pool::parse_disk_spec(disk)?;
    let ans = c
        .post("disks", &json!({"disk": disk, "size": bytes}))
        .await?;
    if json {
        print_json(&ans)?;
    } else {
        println!(
            "created disk {disk} ({})",
            size(ans["size"].as_u64().unwrap_or(bytes))
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn disk_list(conn: &Conn, server: Option<&str>, json: bool) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let q: Vec<(&str, String)> = server
        .map(|s| ("server", s.to_string()))
        .into_iter()
        .collect();
    let disks = c.list("disks", &q, false, None).await?;
    if json {
        print_json(&disks)?;
    } else if disks.is_empty() {
        println!("no disks");
    } else {
        let mut t = table(&[
            "DISK",
            "SIZE",
            "CHANGED SINCE LAST POINT",
            "HYDRATION",
            "CLONE OF",
        ]);
        for d in &disks {
            t.add_row(vec![
                disk_name(d),
                size(d["size"].as_u64().unwrap_or(0)),
                match d["changed_bytes"].as_u64() {
                    Some(n) => size(n),
                    None => "unknown".into(),
                },
                hydration(&d["hydration"]),
                s(&d["clone_of"]),
            ]);
        }
        println!("{t}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Hydration `[present, total]` (chunks) as a percentage.
fn hydration(h: &Value) -> String {
    match (h[0].as_u64(), h[1].as_u64()) {
        (Some(d), Some(t)) if t > 0 => format!("{}%", d * 100 / t),
        _ => s(h),
    }
}

pub async fn disk_show(conn: &Conn, disk: &str, json: bool) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let v = c.get(&format!("disks/{}", disk_path(disk)?)).await?;
    if json {
        print_json(&v)?;
    } else {
        println!("disk       {}", disk_name(&v));
        println!("size       {}", size(v["size"].as_u64().unwrap_or(0)));
        if let Some(n) = v["changed_bytes"].as_u64() {
            println!("changed    {} since the last point", size(n));
        }
        if !v["hydration"].is_null() {
            println!("hydration  {}", hydration(&v["hydration"]));
        }
        if !v["clone_of"].is_null() {
            println!("clone of   {}", s(&v["clone_of"]));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn disk_grow(conn: &Conn, disk: &str, bytes: u64, json: bool) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let ans = c
        .post(
            &format!("disks/{}/grow", disk_path(disk)?),
            &json!({"size": bytes}),
        )
        .await?;
    if json {
        print_json(&ans)?;
    } else {
        println!(
            "disk {disk} is now {}",
            size(ans["size"].as_u64().unwrap_or(bytes))
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn disk_delete(conn: &Conn, disk: &str, yes: bool, json: bool) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let p = format!("disks/{}", disk_path(disk)?);
    if !yes {
        let v = c.get(&p).await?;
        println!(
            "deleting disk {disk} ({}) destroys its data and cannot be undone. Nothing was changed; run the same command with --yes.",
            size(v["size"].as_u64().unwrap_or(0))
        );
        return Ok(ExitCode::from(4));
    }
    let ans = c.delete(&p).await?;
    if json {
        print_json(&ans)?;
    } else {
        println!("deleted disk {disk}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `disk hydrate S/D` through the daemon: starts the copy, then follows the disk
/// (`hydration` while its server runs) until it no longer depends on a point.
pub async fn disk_hydrate(conn: &Conn, disk: &str, quiet: bool, json: bool) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let p = format!("disks/{}", disk_path(disk)?);
    let ans = c.post(&format!("{p}/hydrate"), &json!({})).await?;
    if ans["hydrated"] != true {
        let bar = crate::client::job_bar(
            quiet || json,
            "{msg:>12} [{wide_bar}] {pos}/{len} chunks ETA {eta}",
        );
        bar.set_message("hydrate");
        // The daemon hydrates in the background and only logs a failure: give up when
        // the progress shown does not move for two minutes rather than wait forever.
        let mut last = None;
        let mut since = std::time::Instant::now();
        loop {
            let d = c.get(&p).await?;
            if d["clone_of"].is_null() {
                break;
            }
            let now = (d["hydration"][0].as_u64(), d["hydration"][1].as_u64());
            if let (Some(done), Some(total)) = now {
                bar.set_length(total);
                bar.set_position(done.min(total));
            }
            // (Progress is only shown while the server runs; a stopped server's clone is
            // waited for without a limit.)
            if last != Some(now) || now.0.is_none() {
                last = Some(now);
                since = std::time::Instant::now();
            } else if since.elapsed() > std::time::Duration::from_secs(120) {
                bar.finish_and_clear();
                anyhow::bail!(
                    "hydration of {disk} made no progress for two minutes; see the daemon's log (run `cairn disk hydrate {disk}` again to resume)"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        bar.finish_and_clear();
    }
    if json {
        print_json(&c.get(&p).await?)?;
    } else {
        println!("disk {disk} is hydrated: it no longer depends on its recovery point");
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------- points

fn point_row(p: &Value) -> Vec<String> {
    let res = p["resources"].as_array();
    let sum = |k: &str| -> u64 {
        res.map(|r| r.iter().filter_map(|x| x[k].as_u64()).sum())
            .unwrap_or(0)
    };
    vec![
        s(&p["id"]),
        s(&p["policy"]),
        if !p["deleted"].is_null() {
            "deleted".into()
        } else {
            s(&p["state"])
        },
        when(if p["started_at"].is_null() {
            &p["queued_at"]
        } else {
            &p["started_at"]
        }),
        res.map(|r| {
            r.iter()
                .map(|x| s(&x["disk"]))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default(),
        if p["scope_changed"] == true {
            "yes"
        } else {
            ""
        }
        .into(),
        size(sum("size")),
        size(sum("bytes_changed")),
        size(sum("bytes_written")),
        yes_no(&p["restorable"]).into(),
    ]
}

pub async fn point_list(conn: &Conn, f: &PointFilter, json: bool) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let mut q: Vec<(&str, String)> = Vec::new();
    if let Some(p) = &f.policy {
        q.push(("policy", p.clone()));
    }
    if f.scope_changed {
        q.push(("scope_changed", "true".into()));
    }
    if let Some(d) = &f.disk {
        q.push(("disk", d.clone()));
    }
    if let Some(st) = &f.state {
        q.push(("state", st.clone()));
    }
    let points = c.list("points", &q, true, f.limit).await?;
    if json {
        print_json(&points)?;
    } else if points.is_empty() {
        println!("no recovery points");
    } else {
        let mut t = table(&[
            "POINT",
            "POLICY",
            "STATE",
            "TAKEN",
            "DISKS",
            "SCOPE CHANGED",
            "SIZE",
            "CHANGED",
            "WRITTEN",
            "RESTORABLE",
        ]);
        for p in &points {
            t.add_row(point_row(p));
        }
        println!("{t}");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_job(j: &Value) {
    let rows = [
        ("id", s(&j["id"])),
        ("policy", s(&j["policy"])),
        ("kind", s(&j["kind"])),
        ("trigger", s(&j["trigger"])),
        ("operator", s(&j["operator"])),
        (
            "state",
            if !j["deleted"].is_null() {
                format!("{} (deleted: {})", s(&j["state"]), s(&j["deleted"]))
            } else {
                s(&j["state"])
            },
        ),
        ("queued", when(&j["queued_at"])),
        ("started", when(&j["started_at"])),
        ("ended", when(&j["ended_at"])),
        ("duration", ms(&j["duration_ms"])),
    ];
    for (k, v) in rows {
        println!("{k:<14} {v}");
    }
    if let (Some(d), Some(t)) = (
        j["progress"]["done"].as_u64(),
        j["progress"]["total"].as_u64(),
    ) {
        println!("{:<14} {} of {}", "progress", size(d), size(t));
    }
    if !j["error"].is_null() {
        println!("{:<14} {}", "error", s(&j["error"]));
    }
    if !j["skipped_for"].is_null() {
        println!("{:<14} job {} was running", "skipped", s(&j["skipped_for"]));
    }
    if !j["restorable"].is_null() {
        println!("{:<14} {}", "restorable", yes_no(&j["restorable"]));
    }
    if !j["scope_changed"].is_null() {
        println!("{:<14} {}", "scope changed", yes_no(&j["scope_changed"]));
    }
    if let Some(res) = j["resources"].as_array().filter(|r| !r.is_empty()) {
        let mut t = table(&["DISK", "SIZE", "CHANGED", "WRITTEN"]);
        for r in res {
            t.add_row(vec![
                s(&r["disk"]),
                size(r["size"].as_u64().unwrap_or(0)),
                size(r["bytes_changed"].as_u64().unwrap_or(0)),
                size(r["bytes_written"].as_u64().unwrap_or(0)),
            ]);
        }
        println!("{t}");
    }
    match &j["points"] {
        Value::Object(m) if !m.is_empty() => {
            for (server, id) in m {
                println!("space point    {server}: {}", s(id));
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for p in a {
                println!(
                    "space point    {}: {}",
                    s(&p["server"]),
                    s(if p["point"].is_null() {
                        &p["id"]
                    } else {
                        &p["point"]
                    })
                );
            }
        }
        _ => {}
    }
}

pub async fn point_show(conn: &Conn, point: &str, json: bool) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let v = c.get(&path(&["points", point])).await?;
    if json {
        print_json(&v)?;
    } else {
        print_job(&v);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn point_delete(conn: &Conn, points: &[String], json: bool) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let mut answers = Vec::new();
    for p in points {
        let ans = c.delete(&path(&["points", p])).await?;
        if !json {
            println!("deleted recovery point {p}");
        }
        answers.push(ans);
    }
    if json {
        print_json(&answers)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn point_verify(
    conn: &Conn,
    points: &[String],
    wait: bool,
    run: &RunArgs,
) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let w = WaitArgs {
        wait,
        json: run.json,
        quiet: run.quiet,
    };
    for p in points {
        let ans = c.post(&path(&["points", p, "verify"]), &json!({})).await?;
        started_job(&c, &ans, &w).await?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn point_clone(
    conn: &Conn,
    point: &str,
    disk: &str,
    to: &str,
    start: bool,
    json: bool,
) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    cairn_volume::pool::parse_disk_spec(disk)?;
    cairn_volume::pool::parse_disk_spec(to)?;
    let ans = c
        .post(
            &path(&["points", point, "clone"]),
            &json!({"disk": disk, "to": to, "start": start}),
        )
        .await?;
    if json {
        print_json(&ans)?;
        return Ok(ExitCode::SUCCESS);
    }
    let sz = ans["size"]
        .as_u64()
        .map(|n| format!(" ({})", size(n)))
        .unwrap_or_default();
    println!(
        "created disk {to}{sz} as a clone of disk {disk} of point {point}: usable now, filled from the point as it is read"
    );
    if ans["started"] != false && start {
        match nbd_base(&c).await {
            Some(base) => println!("exported at {base}/{to}"),
            None => println!("its server is running"),
        }
    } else {
        let server = to.split('/').next().unwrap_or(to);
        println!("start it with `cairn server start {server}`");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn point_rollback(
    conn: &Conn,
    point: &str,
    server: Option<&str>,
    disk: Option<&str>,
    yes: bool,
    run: &RunArgs,
) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    let mut body = json!({ "confirm": yes });
    if let Some(d) = disk {
        if !d.contains('/') && server.is_none() {
            return Err(usage(
                "point rollback",
                "through the daemon, --disk is SERVER/DISK (or give --server NAME)",
            ));
        }
        body["disk"] = d.into();
    }
    if let Some(s) = server {
        body["server"] = s.into();
    }
    let target = disk.or(server).unwrap_or("the point's disks").to_string();
    let ans = match c.post(&path(&["points", point, "rollback"]), &body).await {
        Err(e)
            if e.downcast_ref::<crate::client::ApiError>()
                .is_some_and(|a| a.code == "confirmation_required") =>
        {
            println!(
                "rollback of {target} to point {point} overwrites the disk with the point's content and cannot be undone. Nothing was changed; run the same command with --yes."
            );
            return Ok(ExitCode::from(4));
        }
        r => r?,
    };
    let applied = ans["applied"].as_bool().unwrap_or(yes);
    if run.json {
        print_json(&ans)?;
    } else if applied {
        let mut detail = String::new();
        if let Some(disks) = ans["disks"].as_array() {
            let bytes: u64 = disks
                .iter()
                .filter_map(|d| d["bytes_rewritten"].as_u64())
                .sum();
            detail = format!(": rewrote {}", size(bytes));
        } else if let Some(b) = ans["bytes_rewritten"].as_u64() {
            detail = format!(": rewrote {}", size(b));
        }
        println!("rolled {target} back to point {point}{detail}");
    } else {
        println!(
            "rollback of {target} to point {point}: nothing was changed. This is irreversible: run the same command with --yes."
        );
    }
    Ok(if applied {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(4)
    })
}

// ---------------------------------------------------------------- policies and jobs

impl PolicySpec {
    fn schedule(&self, current: Option<&Value>) -> Option<Value> {
        if let Some(every) = &self.every {
            return Some(json!({ "interval": every }));
        }
        match (&self.schedule, &self.timezone) {
            (Some(cron), tz) => {
                let tz = tz
                    .clone()
                    .or_else(|| current.and_then(|c| c["timezone"].as_str().map(str::to_string)))
                    .unwrap_or_else(|| "UTC".into());
                Some(json!({ "cron": cron, "timezone": tz }))
            }
            (None, Some(tz)) => {
                let cron = current.and_then(|c| c["cron"].as_str())?;
                Some(json!({ "cron": cron, "timezone": tz }))
            }
            (None, None) => None,
        }
    }

    fn keeps(&self) -> bool {
        self.keep_last.is_some()
            || self.keep_hourly.is_some()
            || self.keep_daily.is_some()
            || self.keep_weekly.is_some()
            || self.keep_monthly.is_some()
            || self.keep_within.is_some()
    }

    /// The retention object: `base` (the current one, or all null) with the flags given.
    fn retention(&self, base: Option<&Value>) -> Value {
        let mut r = json!({
            "keep_last": null, "keep_hourly": null, "keep_daily": null,
            "keep_weekly": null, "keep_monthly": null, "keep_within": null,
        });
        if let Some(Value::Object(b)) = base {
            for (k, v) in b {
                if r.get(k).is_some() {
                    r[k] = v.clone();
                }
            }
        }
        let set = |r: &mut Value, k: &str, v: Option<u32>| {
            if let Some(n) = v {
                r[k] = n.into();
            }
        };
        set(&mut r, "keep_last", self.keep_last);
        set(&mut r, "keep_hourly", self.keep_hourly);
        set(&mut r, "keep_daily", self.keep_daily);
        set(&mut r, "keep_weekly", self.keep_weekly);
        set(&mut r, "keep_monthly", self.keep_monthly);
        if let Some(w) = &self.keep_within {
            r["keep_within"] = w.clone().into();
        }
        r
    }
}

fn print_policy(p: &Value) {
    let rows = [
        ("name", s(&p["name"])),
        ("id", s(&p["id"])),
        ("status", s(&p["status"])),
        ("enabled", yes_no(&p["enabled"]).to_string()),
        ("description", s(&p["description"])),
        ("scope", names(&p["scope"])),
        ("schedule", schedule_text(p)),
        ("retention", retention_text(&p["retention"])),
        ("space", s(&p["space"])),
        ("last job", s(&p["last_job"]["id"]).to_string()),
        ("last success", when(&p["last_success_at"])),
        ("next run", when(&p["next_run_at"])),
        ("created", when(&p["created_at"])),
        ("updated", when(&p["updated_at"])),
    ];
    for (k, v) in rows {
        let v = if k == "last job" && v.is_empty() {
            s(&p["last_job"])
        } else {
            v
        };
        println!("{k:<13} {}", if v.is_empty() { "-" } else { &v });
    }
}

fn policy_done(ans: &Value, json: bool, msg: &str) -> Result<ExitCode> {
    if json {
        print_json(ans)?;
    } else {
        println!("{msg}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn policy_command(cmd: PolicyCommand, conn: &Conn) -> Result<ExitCode> {
    // Checked before the daemon is needed: refusing costs nothing.
    if let PolicyCommand::Delete {
        policy,
        keep_points: false,
        delete_points: false,
        ..
    } = &cmd
    {
        eprintln!(
            "error: deleting policy {policy}: say what happens to its recovery points: --keep-points (they stay, listed and restorable) or --delete-points (their data is deleted too). Nothing was changed."
        );
        return Ok(ExitCode::from(4));
    }
    let c = Client::new(conn)?;
    match cmd {
        PolicyCommand::Create {
            name,
            spec,
            paused,
            json,
        } => {
            if spec.scope.is_empty() {
                return Err(usage(
                    "policy create",
                    "give --scope SERVER[/DISK] (what the policy protects)",
                ));
            }
            let mut body = json!({
                "name": name,
                "scope": spec.scope,
                "retention": spec.retention(None),
                "enabled": !paused,
            });
            if let Some(sch) = spec.schedule(None) {
                body["schedule"] = sch;
            }
            if let Some(d) = &spec.description {
                body["description"] = d.clone().into();
            }
            if let Some(sp) = &spec.space {
                body["space"] = sp.clone().into();
            }
            let ans = c.post("policies", &body).await?;
            if json {
                print_json(&ans)?;
            } else {
                let next = when(&ans["next_run_at"]);
                println!(
                    "created policy {name}: {} of {}, keep {}{}{}",
                    schedule_text(&body),
                    names(&body["scope"]),
                    retention_text(&body["retention"]),
                    if paused { " (paused)" } else { "" },
                    if next == "-" {
                        String::new()
                    } else {
                        format!("; next run {next}")
                    }
                );
            }
        }
        PolicyCommand::List { json } => {
            let list = c.list("policies", &[], false, None).await?;
            if json {
                print_json(&list)?;
            } else if list.is_empty() {
                println!("no policies");
            } else {
                let mut t = table(&[
                    "POLICY",
                    "STATUS",
                    "SCOPE",
                    "SCHEDULE",
                    "KEEP",
                    "LAST SUCCESS",
                    "NEXT RUN",
                ]);
                for p in &list {
                    t.add_row(vec![
                        s(&p["name"]),
                        s(&p["status"]),
                        names(&p["scope"]),
                        schedule_text(p),
                        retention_text(&p["retention"]),
                        when(&p["last_success_at"]),
                        when(&p["next_run_at"]),
                    ]);
                }
                println!("{t}");
            }
        }
        PolicyCommand::Show { policy, json } => {
            let p = c.get(&path(&["policies", &policy])).await?;
            if json {
                print_json(&p)?;
            } else {
                print_policy(&p);
            }
        }
        PolicyCommand::Update {
            policy,
            spec,
            paused,
            enabled,
            json,
        } => {
            let p = path(&["policies", &policy]);
            let needs_current =
                spec.keeps() || (spec.timezone.is_some() && spec.schedule.is_none());
            let current = if needs_current {
                Some(c.get(&p).await?)
            } else {
                None
            };
            let mut body = json!({});
            if !spec.scope.is_empty() {
                body["scope"] = json!(spec.scope);
            }
            if spec.schedule.is_some() || spec.every.is_some() || spec.timezone.is_some() {
                match spec.schedule(current.as_ref().map(|c| &c["schedule"])) {
                    Some(sch) => body["schedule"] = sch,
                    None => {
                        return Err(usage(
                            "policy update",
                            "--timezone alone applies to a cron schedule; this policy runs at an interval (give --schedule CRON too)",
                        ));
                    }
                }
            }
            if spec.keeps() {
                body["retention"] = spec.retention(current.as_ref().map(|c| &c["retention"]));
            }
            if let Some(d) = &spec.description {
                body["description"] = d.clone().into();
            }
            if let Some(sp) = &spec.space {
                body["space"] = sp.clone().into();
            }
            if paused || enabled {
                body["enabled"] = enabled.into();
            }
            if body.as_object().is_some_and(serde_json::Map::is_empty) {
                return Err(usage("policy update", "nothing to change: give a flag"));
            }
            let ans = c.patch(&p, &body).await?;
            return policy_done(&ans, json, &format!("updated policy {policy}"));
        }
        PolicyCommand::Delete {
            policy,
            keep_points,
            json,
            ..
        } => {
            let points = if keep_points { "keep" } else { "delete" };
            let ans = c
                .delete(&format!("{}?points={points}", path(&["policies", &policy])))
                .await?;
            let what = if keep_points {
                "its recovery points are kept"
            } else {
                "its recovery points are deleted"
            };
            return policy_done(&ans, json, &format!("deleted policy {policy}; {what}"));
        }
        PolicyCommand::Pause { policy, json } => {
            let ans = c
                .post(&path(&["policies", &policy, "pause"]), &json!({}))
                .await?;
            return policy_done(
                &ans,
                json,
                &format!(
                    "policy {policy} is paused: no scheduled runs until `cairn policy resume {policy}`"
                ),
            );
        }
        PolicyCommand::Resume { policy, json } => {
            let ans = c
                .post(&path(&["policies", &policy, "resume"]), &json!({}))
                .await?;
            let next = when(&ans["next_run_at"]);
            let tail = if next == "-" {
                String::new()
            } else {
                format!("; next run {next}")
            };
            return policy_done(&ans, json, &format!("policy {policy} is resumed{tail}"));
        }
        PolicyCommand::ReplicateNow { policy, wait } => {
            let ans = c
                .post(&path(&["policies", &policy, "replicate-now"]), &json!({}))
                .await?;
            return started_job(&c, &ans, &wait).await;
        }
        PolicyCommand::Verify { policy, wait } => {
            let ans = c
                .post(&path(&["policies", &policy, "verify"]), &json!({}))
                .await?;
            return started_job(&c, &ans, &wait).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn job_command(cmd: JobCommand, conn: &Conn) -> Result<ExitCode> {
    let c = Client::new(conn)?;
    match cmd {
        JobCommand::List {
            policy,
            state,
            kind,
            limit,
            json,
        } => {
            let mut q: Vec<(&str, String)> = Vec::new();
            if let Some(p) = policy {
                q.push(("policy", p));
            }
            if let Some(st) = state {
                q.push(("state", st));
            }
            if let Some(k) = kind {
                q.push(("kind", k));
            }
            let jobs = c.list("jobs", &q, true, Some(limit)).await?;
            if json {
                print_json(&jobs)?;
            } else if jobs.is_empty() {
                println!("no jobs");
            } else {
                let mut t = table(&[
                    "JOB", "POLICY", "KIND", "TRIGGER", "STATE", "QUEUED", "DURATION", "OPERATOR",
                ]);
                for j in &jobs {
                    t.add_row(vec![
                        s(&j["id"]),
                        s(&j["policy"]),
                        s(&j["kind"]),
                        s(&j["trigger"]),
                        s(&j["state"]),
                        when(&j["queued_at"]),
                        ms(&j["duration_ms"]),
                        s(&j["operator"]),
                    ]);
                }
                println!("{t}");
            }
        }
        JobCommand::Show { job, json } => {
            let j = c.get(&path(&["jobs", &job])).await?;
            if json {
                print_json(&j)?;
            } else {
                print_job(&j);
            }
        }
        JobCommand::Follow { job, json, quiet } => {
            let end = c.follow(&job, quiet || json, json).await?;
            if end["state"] == "skipped" {
                if json {
                    print_json(&end)?;
                } else {
                    println!(
                        "skipped: job {} of policy {} was already running",
                        s(&end["skipped_for"]),
                        s(&end["policy"])
                    );
                }
            } else {
                print_job_end(&end, json)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
