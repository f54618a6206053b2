//! API tokens and roles. A token is 32 random bytes shown once (`cairn_` + hex); the
//! database keeps only its BLAKE3 hash (a fast hash is enough: tokens are random, not
//! passwords). The token's name is the principal recorded on jobs and in the audit log.

use std::path::Path;

use rand::RngCore;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::db::{Db, DbError, now_text};

/// What a principal may do. Ordered: each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

fn hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

fn open(data_dir: &Path) -> anyhow::Result<Db> {
    if !data_dir.exists() {
        anyhow::bail!(
            "data directory {} does not exist (start `cairn serve --data-dir {}` once, or create it)",
            data_dir.display(),
            data_dir.display()
        );
    }
    Ok(Db::open(&data_dir.join("cairn.db"))?)
}

/// Creates a token (offline, on the daemon's host); returns it (the only time it is seen).
pub fn create_token(data_dir: &Path, name: &str, role: &str) -> anyhow::Result<String> {
    cairn_format::name::validate("token", name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let role = Role::parse(role)
        .ok_or_else(|| anyhow::anyhow!("unknown role {role:?}: use viewer, operator or admin"))?;
    let db = open(data_dir)?;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("cairn_{}", hex::encode(bytes));
    let h = hash(&token);
    let name2 = name.to_string();
    db.call_sync(move |c| {
        let existing: Option<Option<String>> = c
            .query_row(
                "SELECT revoked_at FROM tokens WHERE name = ?1",
                params![name2],
                |r| r.get(0),
            )
            .optional()?;
        match existing {
            Some(None) => Ok(Err(anyhow::anyhow!(
                "a token named {name2} exists; revoke it first (`cairn token revoke {name2}`)"
            ))),
            Some(Some(_)) => {
                c.execute(
                    "UPDATE tokens SET role = ?2, hash = ?3, created_at = ?4, revoked_at = NULL WHERE name = ?1",
                    params![name2, role.as_str(), h, now_text()],
                )?;
                Ok(Ok(()))
            }
            None => {
                c.execute(
                    "INSERT INTO tokens (name, role, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                    params![name2, role.as_str(), h, now_text()],
                )?;
                Ok(Ok(()))
            }
        }
    })??;
    Ok(token)
}

pub fn list_tokens(data_dir: &Path) -> anyhow::Result<Vec<TokenInfo>> {
    let db = open(data_dir)?;
    Ok(db.call_sync(|c| {
        let mut st =
            c.prepare("SELECT name, role, created_at, revoked_at FROM tokens ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(TokenInfo {
                name: r.get(0)?,
                role: r.get(1)?,
                created_at: r.get(2)?,
                revoked_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    })?)
}

pub fn revoke_token(data_dir: &Path, name: &str) -> anyhow::Result<()> {
    let db = open(data_dir)?;
    let name2 = name.to_string();
    let n = db.call_sync(move |c| {
        Ok(c.execute(
            "UPDATE tokens SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
            params![name2, now_text()],
        )?)
    })?;
    if n == 0 {
        anyhow::bail!("no active token named {name}");
    }
    Ok(())
}

/// The principal a bearer token belongs to, if it is valid and not revoked.
pub async fn authenticate(db: &Db, token: &str) -> Result<Option<Principal>, DbError> {
    let h = hash(token);
    db.read(move |c| {
        Ok(c.prepare_cached(
            "SELECT name, role FROM tokens WHERE hash = ?1 AND revoked_at IS NULL",
        )?
        .query_row(params![h], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .optional()?
        .and_then(|(name, role)| Role::parse(&role).map(|role| Principal { name, role })))
    })
    .await
}
