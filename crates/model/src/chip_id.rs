//! CHIP IDs: a user's name on a site, the same rule everywhere.

/// Whether `s` is a CHIP ID: 1-64 of `a-z`, `0-9`, `.`, `_`, `-`, starting
/// with a letter or a digit.
pub fn is_chip_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// A CHIP ID, checked once when made.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChipId(String);

/// Why a string is not a CHIP ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadChipId(pub String);

impl std::fmt::Display for BadChipId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid CHIP ID {:?}: use 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
            self.0
        )
    }
}

impl std::error::Error for BadChipId {}

impl ChipId {
    pub fn parse(s: &str) -> Result<Self, BadChipId> {
        if is_chip_id(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadChipId(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ChipId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ChipId {
    type Err = BadChipId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for ChipId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A user's account status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccountStatus {
    Active,
    Suspended,
    Closed,
}

impl AccountStatus {
    pub const ALL: [AccountStatus; 3] = [Self::Active, Self::Suspended, Self::Closed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chip_ids_follow_one_rule() {
        for good in ["alice", "a", "0day", "bob.smith_2-x", &"a".repeat(64)] {
            assert_eq!(ChipId::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", "Alice", "-bob", ".x", "a b", "ä", "a/b", &"a".repeat(65)] {
            let e = ChipId::parse(bad).unwrap_err();
            assert!(e.to_string().contains("invalid CHIP ID"), "{e}");
        }
        for s in AccountStatus::ALL {
            assert_eq!(AccountStatus::parse(s.as_str()), Some(s));
        }
    }
}
