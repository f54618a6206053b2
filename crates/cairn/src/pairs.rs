//! `cairn location` and `cairn pair`: other locations and DR pairs, through the daemon's
//! API (docs/API.md).

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::{Client, Conn, path};
use crate::commands::{print_json, size, table, usage};
use crate::remote::{WaitArgs, ms, s, schedule_text, started_job, when};

#[derive(Debug, Subcommand)]
pub enum LocationCommand {
    /// Register another location (its API and one of its tokens). Here `--url` and
    /// `--token` are the other location's; this daemon is reached by CAIRN_URL and
    /// CAIRN_TOKEN.
    Add {
        /// Its name (as it calls itself: `cairn serve --location NAME`).
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// The locations this one knows.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Forget a location (refused while a DR pair or policy uses it).
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum PairCommand {
    /// Protect a server of this location by a standby at another location; prints the
    /// DR pair id and starts the initial copy.
    Create {
        #[arg(long)]
        server: String,
        /// The standby location (added with `cairn location add`).
        #[arg(long)]
        standby_location: String,
        /// When to replicate: a cron expression, e.g. '*/5 * * * *' (default: every 15m).
        #[arg(long, value_name = "CRON", conflicts_with = "every")]
        schedule: Option<String>,
        /// The time zone of --schedule (IANA name; default UTC).
        #[arg(long, value_name = "TZ")]
        timezone: Option<String>,
        /// Or replicate at a fixed interval, e.g. 5m.
        #[arg(long, value_name = "DURATION")]
        every: Option<String>,
        /// Keep the N newest points (default 24, with --keep-daily 7).
        #[arg(long)]
        keep_last: Option<u32>,
        /// Keep the newest point of each of the N newest days.
        #[arg(long)]
        keep_daily: Option<u32>,
        /// Keep every point within this long of the newest (e.g. 2d).
        #[arg(long, value_name = "DURATION")]
        keep_within: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The DR pairs of this location (as primary or standby).
    List {
        #[arg(long)]
        json: bool,
    },
    /// A pair's state, last point and its age, jobs, recovery points and history.
    Show {
        pair: String,
        #[arg(long)]
        json: bool,
    },
    /// Replicate now (at the primary).
    ReplicateNow {
        pair: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Pause replication (at the primary): nothing is copied until resumed.
    Pause {
        pair: String,
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused pair; replication continues incrementally.
    Resume {
        pair: String,
        #[arg(long)]
        json: bool,
    },
    /// Restart Replication (at the primary): PERMANENTLY DELETES every recovery point
    /// of the pair, discards the change map and copies everything again.
    Restart {
        pair: String,
        /// Confirm the deletion of all of the pair's recovery points.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
    /// Fail over (at the standby): start the server here from a recovery point, its
    /// disks instant clones (hydrating in the background), exported over NBD.
    Failover {
        pair: String,
        /// `latest` or a point id (or a unique prefix of one).
        #[arg(long, default_value = "latest")]
        point: String,
        /// Name of the server to create (default: the pair's server name).
        #[arg(long)]
        name: Option<String>,
        /// Confirm the failover.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
    /// Failover drill (at the standby): the same into an isolated server
    /// (`<server>-drill`), while replication goes on.
    Drill {
        pair: String,
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Failback, step 1 (at the location that failed over): reverse the pair — this
    /// location becomes the primary, the old primary the standby (its server there is
    /// stopped and becomes the failback target); only what differs is sent back.
    Reverse {
        pair: String,
        /// The reversed replication's schedule, a cron expression (default: every 15m).
        #[arg(long, value_name = "CRON")]
        schedule: Option<String>,
        /// Confirm the reversal.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete a DR pair (at the primary: its policy, and the standby's copy; at the
    /// standby: this side only). Say what happens to its recovery points.
    Delete {
        pair: String,
        /// Its recovery points stay (restorable from the space).
        #[arg(long, conflicts_with = "delete_points")]
        keep_points: bool,
        /// Its recovery points are permanently deleted.
        #[arg(long)]
        delete_points: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove the servers of a pair's drills (at the standby).
    DrillCleanup {
        pair: String,
        #[arg(long)]
        json: bool,
    },
}

/// `location add`: the other location's URL and token, given as `--url`/`--token`.
pub struct RemoteCreds {
    pub url: Option<String>,
    pub token: Option<String>,
}

pub async fn location_command(
    cmd: LocationCommand,
    conn: &Conn,
    remote: RemoteCreds,
) -> Result<ExitCode> {
    match cmd {
        LocationCommand::Add { name, json } => {
            let (Some(url), Some(token)) = (remote.url, remote.token) else {
                return Err(usage(
                    "location add",
                    "give the other location's API and a token of it: --url http://HOST:PORT --token TOKEN",
                ));
            };
            let c = Client::new(conn)?;
            let ans = c
                .post(
                    "locations",
                    &json!({"name": name, "url": url, "token": token}),
                )
                .await?;
            if json {
                print_json(&ans)?;
            } else {
                println!(
                    "added location {} at {} (its recovery space {})",
                    s(&ans["name"]),
                    s(&ans["url"]),
                    s(&ans["space_id"])
                );
            }
        }
        LocationCommand::List { json } => {
            let c = Client::new(conn)?;
            let ans = c.get("locations").await?;
            if json {
                print_json(&ans)?;
            } else if ans.as_array().is_none_or(|a| a.is_empty()) {
                println!(
                    "no other locations known (add one with `cairn location add NAME --url URL --token TOKEN`)"
                );
            } else {
                let mut t = table(&["LOCATION", "URL", "SPACE", "ADDED", "BY"]);
                for l in ans.as_array().into_iter().flatten() {
                    t.add_row(vec![
                        s(&l["name"]),
                        s(&l["url"]),
                        s(&l["space_id"]),
                        when(&l["added_at"]),
                        s(&l["added_by"]),
                    ]);
                }
                println!("{t}");
            }
        }
        LocationCommand::Remove { name } => {
            let c = Client::new(conn)?;
            c.delete(&path(&["locations", &name])).await?;
            println!("location {name} forgotten");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn pair_command(cmd: PairCommand, conn: &Conn) -> Result<ExitCode> {
    // Refusals that need no daemon come first.
    if let PairCommand::Restart {
        pair, yes: false, ..
    } = &cmd
    {
        eprintln!(
            "error: Restart Replication of DR pair {pair} PERMANENTLY DELETES every recovery point of the pair and copies the whole server again; until that copy is done the standby cannot fail over. Run again with --yes to do it. Nothing was changed."
        );
        return Ok(ExitCode::from(4));
    }
    if let PairCommand::Failover {
        pair, yes: false, ..
    } = &cmd
    {
        eprintln!(
            "error: failover of DR pair {pair} starts its server at this (the standby) location from a recovery point and ends replication from the primary. Run again with --yes to do it. Nothing was changed."
        );
        return Ok(ExitCode::from(4));
    }
    if let PairCommand::Reverse {
        pair, yes: false, ..
    } = &cmd
    {
        eprintln!(
            "error: reversing DR pair {pair} makes this location the primary and the old primary the standby; the old primary's server becomes the target of the failover back and is overwritten by it. Run again with --yes to do it. Nothing was changed."
        );
        return Ok(ExitCode::from(4));
    }
    if let PairCommand::Delete {
        pair,
        keep_points: false,
        delete_points: false,
        ..
    } = &cmd
    {
        eprintln!(
            "error: deleting DR pair {pair}: say what happens to its recovery points: --keep-points (they stay in the standby's space) or --delete-points (permanently deleted). Nothing was changed."
        );
        return Ok(ExitCode::from(4));
    }
    let c = Client::new(conn)?;
    match cmd {
        PairCommand::Delete {
            pair,
            delete_points,
            json,
            ..
        } => {
            let mode = if delete_points { "delete" } else { "keep" };
            let ans = c
                .delete(&format!("{}?points={mode}", path(&["pairs", &pair])))
                .await?;
            if json {
                print_json(&ans)?;
            } else {
                println!(
                    "DR pair {} deleted ({} side); {} recovery point(s) deleted{}",
                    s(&ans["pair"]),
                    s(&ans["role"]),
                    s(&ans["deleted_points"]),
                    ans["standby"]
                        .as_str()
                        .map(|t| format!("; {t}"))
                        .unwrap_or_default()
                );
            }
        }
        PairCommand::Reverse {
            pair,
            schedule,
            json,
            ..
        } => {
            let mut body = json!({"confirm": true});
            if let Some(cron) = schedule {
                body["schedule"] = json!({"cron": cron});
            }
            let p = c.post(&path(&["pairs", &pair, "reverse"]), &body).await?;
            done(
                &p,
                json,
                &format!(
                    "reversed: {} is now the primary, {} the standby; replicating back only what differs",
                    s(&p["primary_location"]),
                    s(&p["standby_location"])
                ),
            )?;
        }
        PairCommand::Create {
            server,
            standby_location,
            schedule,
            timezone,
            every,
            keep_last,
            keep_daily,
            keep_within,
            json,
        } => {
            let mut body = json!({"server": server, "standby_location": standby_location});
            match (schedule, every) {
                (Some(cron), _) => {
                    body["schedule"] = json!({"cron": cron});
                    if let Some(tz) = timezone {
                        body["schedule"]["timezone"] = tz.into();
                    }
                }
                (None, Some(iv)) => body["schedule"] = json!({"interval": iv}),
                (None, None) => {}
            }
            if keep_last.is_some() || keep_daily.is_some() || keep_within.is_some() {
                let mut r = json!({});
                if let Some(n) = keep_last {
                    r["keep_last"] = n.into();
                }
                if let Some(n) = keep_daily {
                    r["keep_daily"] = n.into();
                }
                if let Some(w) = keep_within {
                    r["keep_within"] = w.into();
                }
                body["retention"] = r;
            }
            let ans = c.post("pairs", &body).await?;
            if json {
                print_json(&ans)?;
            } else {
                println!("{}", s(&ans["id"]));
                eprintln!(
                    "DR pair {}: server {} of {} protected at {} ({}); initial replication started — follow it with `cairn pair show {}`",
                    s(&ans["id"]),
                    s(&ans["server"]),
                    s(&ans["primary_location"]),
                    s(&ans["standby_location"]),
                    schedule_text(&ans),
                    s(&ans["id"])
                );
            }
        }
        PairCommand::List { json } => {
            let ans = c.get("pairs").await?;
            if json {
                print_json(&ans)?;
            } else if ans.as_array().is_none_or(|a| a.is_empty()) {
                println!(
                    "no DR pairs (create one with `cairn pair create --server S --standby-location L`)"
                );
            } else {
                let mut t = table(&[
                    "PAIR",
                    "ROLE",
                    "SERVER",
                    "PRIMARY",
                    "STANDBY",
                    "STATE",
                    "LAST POINT",
                    "AGE",
                ]);
                for p in ans.as_array().into_iter().flatten() {
                    t.add_row(vec![
                        s(&p["id"]),
                        s(&p["role"]),
                        s(&p["server"]),
                        s(&p["primary_location"]),
                        s(&p["standby_location"]),
                        s(&p["state_label"]),
                        when(&p["last_point"]["snapshot_at"]),
                        age(&p["last_point_age_s"]),
                    ]);
                }
                println!("{t}");
            }
        }
        PairCommand::Show { pair, json } => {
            let p = c.get(&path(&["pairs", &pair])).await?;
            if json {
                print_json(&p)?;
            } else {
                print_pair(&p);
            }
        }
        PairCommand::ReplicateNow { pair, wait } => {
            let ans = c
                .post(&path(&["pairs", &pair, "replicate-now"]), &json!({}))
                .await?;
            return started_job(&c, &ans, &wait).await;
        }
        PairCommand::Pause { pair, json } => {
            let p = c
                .post(&path(&["pairs", &pair, "pause"]), &json!({}))
                .await?;
            done(
                &p,
                json,
                "paused: nothing is copied until `cairn pair resume`",
            )?;
        }
        PairCommand::Resume { pair, json } => {
            let p = c
                .post(&path(&["pairs", &pair, "resume"]), &json!({}))
                .await?;
            done(&p, json, "resumed: replication continues incrementally")?;
        }
        PairCommand::Restart { pair, json, .. } => {
            let p = c
                .post(
                    &path(&["pairs", &pair, "restart"]),
                    &json!({"confirm": true}),
                )
                .await?;
            eprintln!(
                "warning: every recovery point of DR pair {pair} was permanently deleted; everything is being copied again"
            );
            done(
                &p,
                json,
                "restarted: all its recovery points were deleted; initial replication is running",
            )?;
        }
        PairCommand::Failover {
            pair,
            point,
            name,
            json,
            ..
        } => {
            let mut body = json!({"point": point, "confirm": true});
            if let Some(n) = name {
                body["name"] = n.into();
            }
            let ans = c.post(&path(&["pairs", &pair, "failover"]), &body).await?;
            print_failover(&ans, json, "failed over")?;
        }
        PairCommand::Drill {
            pair,
            point,
            name,
            json,
        } => {
            let mut body = json!({"point": point});
            if let Some(n) = name {
                body["name"] = n.into();
            }
            let ans = c.post(&path(&["pairs", &pair, "drill"]), &body).await?;
            print_failover(&ans, json, "drill")?;
        }
        PairCommand::DrillCleanup { pair, json } => {
            let p = c
                .post(&path(&["pairs", &pair, "drill-cleanup"]), &json!({}))
                .await?;
            done(&p, json, "drill servers removed")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn age(v: &Value) -> String {
    match v.as_i64() {
        None => "-".into(),
        Some(s) if s < 120 => format!("{s} s"),
        Some(s) if s < 7200 => format!("{} min", s / 60),
        Some(s) if s < 172_800 => format!("{} h", s / 3600),
        Some(s) => format!("{} d", s / 86_400),
    }
}

fn done(p: &Value, json: bool, msg: &str) -> Result<()> {
    if json {
        return print_json(p);
    }
    println!("DR pair {}: {msg}", s(&p["id"]));
    println!("state: {}", state_line(p));
    Ok(())
}

fn state_line(p: &Value) -> String {
    match p["detail"].as_str().filter(|d| !d.is_empty()) {
        Some(d) => format!("{} ({d})", s(&p["state_label"])),
        None => s(&p["state_label"]),
    }
}

fn print_failover(ans: &Value, json: bool, what: &str) -> Result<()> {
    if json {
        return print_json(ans);
    }
    println!(
        "{what}: server {} runs at this location from point {} (taken {}); first byte after {} ms; job {}",
        s(&ans["server"]),
        s(&ans["point"]),
        when(&ans["snapshot_at"]),
        s(&ans["first_byte_ms"]),
        s(&ans["job"]["id"])
    );
    for e in ans["exports"].as_array().into_iter().flatten() {
        println!("  {}", s(e));
    }
    if ans["hydrating"] == true {
        println!("its disks hydrate in the background (`cairn disk list` shows progress)");
    } else {
        println!(
            "its existing disks were rolled back to the point (only what differed was rewritten)"
        );
    }
    Ok(())
}

fn print_pair(p: &Value) {
    println!("DR pair      {}", s(&p["id"]));
    println!(
        "server       {} ({} → {}; this location is the {})",
        s(&p["server"]),
        s(&p["primary_location"]),
        s(&p["standby_location"]),
        s(&p["role"])
    );
    println!("state        {}", state_line(p));
    if p["policy"].is_string() {
        println!(
            "schedule     {} (policy {})",
            schedule_text(p),
            s(&p["policy"])
        );
    }
    match p["last_point"].as_object() {
        Some(_) => println!(
            "last point   {} taken {} ({} ago)",
            s(&p["last_point"]["id"]),
            when(&p["last_point"]["snapshot_at"]),
            age(&p["last_point_age_s"])
        ),
        None => println!("last point   none yet"),
    }
    if let Some(d) = p["drills"].as_array().filter(|d| !d.is_empty()) {
        println!(
            "drills       {} (remove with `cairn pair drill-cleanup {}`)",
            d.iter().map(s).collect::<Vec<_>>().join(", "),
            s(&p["id"])
        );
    }
    let points = p["points"].as_array().cloned().unwrap_or_default();
    println!("\nrecovery points ({}):", points.len());
    if !points.is_empty() {
        let mut t = table(&["POINT", "TAKEN", "DISKS", "SIZE", "SCOPE CHANGED"]);
        for pt in &points {
            let disks = pt["disks"].as_array().cloned().unwrap_or_default();
            let total: u64 = disks.iter().filter_map(|d| d["size"].as_u64()).sum();
            t.add_row(vec![
                s(&pt["id"]),
                when(&pt["snapshot_at"]),
                disks
                    .iter()
                    .map(|d| s(&d["disk"]))
                    .collect::<Vec<_>>()
                    .join(","),
                size(total),
                if pt["scope_changed"] == true {
                    "yes"
                } else {
                    ""
                }
                .to_string(),
            ]);
        }
        println!("{t}");
    }
    let jobs = p["jobs"].as_array().cloned().unwrap_or_default();
    if !jobs.is_empty() {
        println!("\njobs (newest first):");
        let mut t = table(&["JOB", "KIND", "STATE", "BY", "STARTED", "DURATION", "ERROR"]);
        for j in &jobs {
            t.add_row(vec![
                s(&j["id"]),
                s(&j["kind"]),
                s(&j["state"]),
                s(&j["operator"]),
                when(&j["started_at"]),
                ms(&j["duration_ms"]),
                s(&j["error"]),
            ]);
        }
        println!("{t}");
    }
    let history = p["history"].as_array().cloned().unwrap_or_default();
    if !history.is_empty() {
        println!("\nhistory:");
        let mut t = table(&["AT", "EVENT", "STATE", "BY", "DETAIL"]);
        for e in &history {
            t.add_row(vec![
                when(&e["at"]),
                s(&e["kind"]),
                s(&e["state"]),
                s(&e["operator"]),
                s(&e["detail"]),
            ]);
        }
        println!("{t}");
    }
}
