//! The space config (`config.json`): written once by `cairn space init`, read by every
//! operation, never rewritten. Its `version` is the format version of the whole space.

use serde::{Deserialize, Serialize};

/// The space format version this cairn writes and reads.
pub const SPACE_VERSION: u32 = 1;
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
pub const DEFAULT_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;

/// Why a space config is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "this recovery space has format version {found}; this cairn reads only version {SPACE_VERSION} (upgrade cairn)"
    )]
    UnknownVersion { found: u32 },
    #[error("not a Cairn recovery space config: {0}")]
    Malformed(String),
    #[error("chunk size {0} is not allowed: use a power of two from 64 KiB to 16 MiB (e.g. 4MiB)")]
    ChunkSize(u64),
    #[error("compression level {0} is not allowed: use 1 to 19")]
    Level(i32),
    #[error("this recovery space uses {what} {value:?}, which this cairn does not support")]
    Unsupported { what: &'static str, value: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpaceConfig {
    /// Always "cairn-recovery-space".
    pub kind: String,
    pub version: u32,
    /// A random id, to tell spaces apart.
    pub id: uuid::Uuid,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub chunk_size: u32,
    /// "blake3" (reserved: "blake3-keyed" with encryption).
    pub chunk_id: String,
    /// "zstd".
    pub compression: String,
    pub compression_level: i32,
    /// "none" (reserved: "xchacha20poly1305").
    pub encryption: String,
}

const KIND: &str = "cairn-recovery-space";

impl SpaceConfig {
    /// A new config after checking the operator's choices.
    pub fn new(chunk_size: u64, compression_level: i32) -> Result<SpaceConfig, ConfigError> {
        check_chunk_size(chunk_size)?;
        if !(1..=19).contains(&compression_level) {
            return Err(ConfigError::Level(compression_level));
        }
        Ok(SpaceConfig {
            kind: KIND.to_string(),
            version: SPACE_VERSION,
            id: uuid::Uuid::new_v4(),
            created_at: chrono::Utc::now(),
            chunk_size: u32::try_from(chunk_size)
                .map_err(|_| ConfigError::ChunkSize(chunk_size))?,
            chunk_id: "blake3".to_string(),
            compression: "zstd".to_string(),
            compression_level,
            encryption: "none".to_string(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("config serializes");
        v.push(b'\n');
        v
    }

    /// Parses a config, refusing unknown versions before anything else is interpreted.
    pub fn decode(bytes: &[u8]) -> Result<SpaceConfig, ConfigError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Malformed(e.to_string()))?;
        if value.get("kind").and_then(|k| k.as_str()) != Some(KIND) {
            return Err(ConfigError::Malformed(
                "missing \"kind\": \"cairn-recovery-space\"".into(),
            ));
        }
        let version = value
            .get("version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| ConfigError::Malformed("missing \"version\"".into()))?;
        if version != u64::from(SPACE_VERSION) {
            return Err(ConfigError::UnknownVersion {
                found: u32::try_from(version).unwrap_or(u32::MAX),
            });
        }
        let config: SpaceConfig =
            serde_json::from_value(value).map_err(|e| ConfigError::Malformed(e.to_string()))?;
        check_chunk_size(u64::from(config.chunk_size))?;
        for (what, value, ok) in [
            ("chunk id", &config.chunk_id, "blake3"),
            ("compression", &config.compression, "zstd"),
            ("encryption", &config.encryption, "none"),
        ] {
            if value != ok {
                return Err(ConfigError::Unsupported {
                    what,
                    value: value.clone(),
                });
            }
        }
        Ok(config)
    }
}

fn check_chunk_size(size: u64) -> Result<(), ConfigError> {
    if !size.is_power_of_two()
        || size < u64::from(MIN_CHUNK_SIZE)
        || size > u64::from(MAX_CHUNK_SIZE)
    {
        return Err(ConfigError::ChunkSize(size));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let c = SpaceConfig::new(4 << 20, 3).unwrap();
        assert_eq!(SpaceConfig::decode(&c.encode()).unwrap(), c);
        assert_eq!(
            SpaceConfig::new(100_000, 3),
            Err(ConfigError::ChunkSize(100_000))
        );
        assert_eq!(
            SpaceConfig::new(32 << 20, 3),
            Err(ConfigError::ChunkSize(32 << 20))
        );
        assert_eq!(SpaceConfig::new(1 << 20, 0), Err(ConfigError::Level(0)));
        let mut v: serde_json::Value = serde_json::from_slice(&c.encode()).unwrap();
        v["version"] = 7.into();
        let e = SpaceConfig::decode(v.to_string().as_bytes()).unwrap_err();
        assert_eq!(e, ConfigError::UnknownVersion { found: 7 });
        assert!(e.to_string().contains("format version 7"));
        assert!(matches!(
            SpaceConfig::decode(b"{}"),
            Err(ConfigError::Malformed(_))
        ));
    }
}
