//! The serving process of a pool (`cairn serve-nbd`): NBD listeners over the [`Host`]'s
//! exports, and a control socket (`<pool>/control.sock`) through which the CLI starts
//! and stops servers, takes points of running servers and hydrates clones while the
//! process runs. The control protocol is one JSON request per line, one JSON answer per
//! line (docs/FORMAT.md, "control socket"); only the pool's owner can reach it (the
//! socket is created mode 0600).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::error::VolumeError;
use crate::host::Host;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Start {
        server: String,
    },
    Stop {
        server: String,
    },
    Point {
        server: String,
        operator: String,
        trigger: String,
    },
    Hydrate {
        server: String,
        disk: String,
    },
    Status,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default)]
    pub result: serde_json::Value,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub damage: bool,
}

async fn handle(host: &Arc<Host>, req: Request) -> Result<serde_json::Value, VolumeError> {
    let progress = cairn_store::progress::NoProgress;
    Ok(match req {
        Request::Start { server } => {
            host.start(&server).await?;
            serde_json::json!({ "server": server, "state": "running" })
        }
        Request::Stop { server } => {
            host.stop(&server).await?;
            serde_json::json!({ "server": server, "state": "stopped" })
        }
        Request::Point {
            server,
            operator,
            trigger,
        } => serde_json::to_value(
            host.take_point(&server, &operator, &trigger, &progress)
                .await?,
        )
        .expect("serializes"),
        Request::Hydrate { server, disk } => {
            host.hydrate(&server, &disk, &progress).await?;
            serde_json::json!({ "server": server, "disk": disk, "hydrated": true })
        }
        Request::Status => {
            serde_json::json!({ "running": host.running().await, "pid": std::process::id() })
        }
    })
}

/// Serves the control socket until the process ends.
pub async fn serve_control(host: Arc<Host>, listener: tokio::net::UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let host = host.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let answer = match serde_json::from_str::<Request>(&line) {
                    Err(e) => Answer {
                        ok: false,
                        result: serde_json::Value::Null,
                        error: Some(format!("malformed control request: {e}")),
                        damage: false,
                    },
                    Ok(req) => match handle(&host, req).await {
                        Ok(v) => Answer {
                            ok: true,
                            result: v,
                            error: None,
                            damage: false,
                        },
                        Err(e) => Answer {
                            ok: false,
                            result: serde_json::Value::Null,
                            error: Some(e.to_string()),
                            damage: e.is_damage(),
                        },
                    },
                };
                let mut out = serde_json::to_vec(&answer).expect("serializes");
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Binds the control socket of a pool, replacing a stale one (left by a killed process).
/// Fails if another process serves the pool.
pub async fn bind_control(pool_root: &Path) -> Result<tokio::net::UnixListener, VolumeError> {
    let path = pool_root.join("control.sock");
    if path.exists() {
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            return Err(VolumeError::Other(format!(
                "pool {} is already served by another process (its control socket {} answers)",
                pool_root.display(),
                path.display()
            )));
        }
        let _ = std::fs::remove_file(&path);
    }
    let l = tokio::net::UnixListener::bind(&path)
        .map_err(|e| VolumeError::io("cannot bind control socket", &path, e))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    Ok(l)
}

/// A connection to a pool's serving process, if one runs.
pub async fn connect(pool_root: &Path) -> Option<tokio::net::UnixStream> {
    tokio::net::UnixStream::connect(pool_root.join("control.sock"))
        .await
        .ok()
}

/// Sends one request to the serving process and waits for the answer.
pub async fn request(stream: tokio::net::UnixStream, req: &Request) -> Result<Answer, VolumeError> {
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).expect("serializes");
    line.push(b'\n');
    let path = PathBuf::from("control.sock");
    w.write_all(&line)
        .await
        .map_err(|e| VolumeError::io("cannot talk to the serving process over", &path, e))?;
    let mut lines = BufReader::new(r).lines();
    let answer = lines
        .next_line()
        .await
        .map_err(|e| VolumeError::io("no answer from the serving process over", &path, e))?
        .ok_or_else(|| {
            VolumeError::Other("the serving process closed the control connection".into())
        })?;
    serde_json::from_str(&answer)
        .map_err(|e| VolumeError::Other(format!("unreadable answer from the serving process: {e}")))
}
