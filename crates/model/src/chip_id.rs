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

/// What every peer session's server name ends with (docs/protocol.md
/// section 14.3: the server name presents the user a peer site acts for).
pub const PEER_SESSION_SUFFIX: &str = ".peer.chipsite.invalid";

/// The server name that presents `chip_id`: its bytes in lowercase hex, in
/// labels of at most 62 digits, then [`SUFFIX`].
pub fn session_name(chip_id: &str) -> String {
    let hex: String = chip_id.bytes().map(|b| format!("{b:02x}")).collect();
    let labels: Vec<&str> = hex
        .as_bytes()
        .chunks(62)
        .filter_map(|c| std::str::from_utf8(c).ok())
        .collect();
    format!("{}{PEER_SESSION_SUFFIX}", labels.join("."))
}

/// The CHIP ID a session server name presents, if it is one.
/// Server names are compared without case, as DNS names are.
pub fn chip_id_of_session_name(name: &str) -> Option<String> {
    let name = name.to_ascii_lowercase();
    let hex: String = name.strip_suffix(PEER_SESSION_SUFFIX)?.split('.').collect();
    if !hex.len().is_multiple_of(2) || hex.len() > 128 {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let chip_id = String::from_utf8(bytes).ok()?;
    (is_chip_id(&chip_id) && session_name(&chip_id) == name).then_some(chip_id)
}

#[cfg(test)]
mod session_name_tests {
    use super::*;

    #[test]
    fn server_names_carry_any_chip_id_and_nothing_else() {
        for chip_id in ["bob", "a", "x.y_z-9", &"a".repeat(64), "0."] {
            let name = session_name(chip_id);
            assert!(name.split('.').all(|l| l.len() <= 63), "{name}");
            assert_eq!(chip_id_of_session_name(&name).as_deref(), Some(chip_id), "{name}");
        }
        assert_eq!(session_name("bob"), "626f62.peer.chipsite.invalid");
        assert_eq!(
            chip_id_of_session_name("626F62.PEER.chipsite.INVALID").as_deref(),
            Some("bob"),
            "without case"
        );
        for bad in [
            "626f62.peer.chipsite.example",
            "626f6.peer.chipsite.invalid",
            "62.6f62.peer.chipsite.invalid",
            "2e.peer.chipsite.invalid",
            ".peer.chipsite.invalid",
            "zz.peer.chipsite.invalid",
        ] {
            assert_eq!(chip_id_of_session_name(bad), None, "{bad}");
        }
    }
}
