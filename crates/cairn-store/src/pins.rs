//! Pins: a recovery point that a clone still reads from (not yet hydrated) is pinned, and
//! a pinned point cannot be deleted; the error names the clone. A pin is an object
//! `pins/<point id>/<pin id>.json` in the space, written before the clone is usable and
//! removed when its hydration completes or the clone is deleted.

use bytes::Bytes;
use cairn_format::id::PointId;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::backend::{BackendError, PutMode};
use crate::error::SpaceError;
use crate::space::Space;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub id: uuid::Uuid,
    pub point: PointId,
    /// Who holds it: `<location>:<server>/<disk>` of the clone.
    pub holder: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

pub fn pin_prefix(point: &PointId) -> String {
    format!("pins/{point}/")
}

pub fn pin_key(point: &PointId, pin: &uuid::Uuid) -> String {
    format!("pins/{point}/{pin}.json")
}

/// Pins `point` for `holder`; fails if the point does not exist (checked after the pin
/// is written, so a concurrent delete either sees the pin or this sees the point gone).
pub async fn add_pin(space: &Space, point: &PointId, holder: &str) -> Result<Pin, SpaceError> {
    let pin = Pin {
        id: uuid::Uuid::new_v4(),
        point: *point,
        holder: holder.to_string(),
        created_at: chrono::Utc::now(),
    };
    let body = serde_json::to_vec_pretty(&pin).expect("pin serializes");
    space
        .backend()
        .put(
            &pin_key(point, &pin.id),
            Bytes::from(body),
            PutMode::CreateNew,
        )
        .await?;
    if !space.point_exists(point).await? {
        remove_pin(space, point, &pin.id).await?;
        return Err(SpaceError::PointNotFound(point.to_string()));
    }
    Ok(pin)
}

pub async fn remove_pin(
    space: &Space,
    point: &PointId,
    pin: &uuid::Uuid,
) -> Result<(), SpaceError> {
    match space.backend().delete(&pin_key(point, pin)).await {
        Ok(()) | Err(BackendError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The pins on `point`.
pub async fn pins_of(space: &Space, point: &PointId) -> Result<Vec<Pin>, SpaceError> {
    let keys: Vec<String> = space
        .backend()
        .list(&pin_prefix(point))
        .map_ok(|o| o.key)
        .try_collect()
        .await?;
    let mut pins = Vec::with_capacity(keys.len());
    for k in keys {
        let body = match space.backend().get(&k).await {
            Ok(b) => b,
            Err(BackendError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        match serde_json::from_slice::<Pin>(&body) {
            Ok(p) => pins.push(p),
            // An unreadable pin still pins: fail safe.
            Err(e) => pins.push(Pin {
                id: uuid::Uuid::nil(),
                point: *point,
                holder: format!("unreadable pin {k} ({e})"),
                created_at: chrono::Utc::now(),
            }),
        }
    }
    Ok(pins)
}
