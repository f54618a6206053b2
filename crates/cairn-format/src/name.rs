//! Names chosen by operators (servers, disks): validated once, so that they can be used in
//! object keys, file names and NBD export names without any path trick.

/// A name that cannot be used for a server or disk.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{kind} name is empty")]
    Empty { kind: &'static str },
    #[error("{kind} name {name:?} is longer than 64 characters")]
    TooLong { kind: &'static str, name: String },
    #[error(
        "{kind} name {name:?} has the character {ch:?}; use letters, digits, '.', '_' and '-' (not first)"
    )]
    BadChar {
        kind: &'static str,
        name: String,
        ch: char,
    },
}

/// Checks a server or disk name: 1 to 64 characters of `[A-Za-z0-9._-]`, not starting with
/// `.` or `-` (so never `.`, `..` or something that reads as a flag).
pub fn validate(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > 64 {
        return Err(NameError::TooLong {
            kind,
            name: name.to_string(),
        });
    }
    for (i, ch) in name.chars().enumerate() {
        let ok = ch.is_ascii_alphanumeric() || ch == '_' || (i > 0 && (ch == '.' || ch == '-'));
        if !ok {
            return Err(NameError::BadChar {
                kind,
                name: name.to_string(),
                ch,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for n in ["root", "data-1", "db_01.img", "A"] {
            validate("disk", n).unwrap();
        }
    }

    #[test]
    fn refuses_path_tricks() {
        for n in ["", ".", "..", "../x", "a/b", "-rf", ".hidden", "a b", "é"] {
            assert!(validate("disk", n).is_err(), "{n:?} accepted");
        }
        let e = validate("disk", "a/b").unwrap_err().to_string();
        assert!(e.contains("disk name \"a/b\""), "{e}");
    }
}
