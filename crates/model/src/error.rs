//! The error codes that cross process boundaries.

/// The gRPC metadata key (ASCII) under which a site service puts the
/// [`ErrorCode`] of every error it returns, so that callers (the gateways,
/// chipsctl, the console) decide by code, never by message text.
pub const CODE_METADATA: &str = "chipsite-code";

/// What went wrong, as every part of the site names it. Each code maps to
/// a gRPC status code (inside the site) and to a wire error (for apps and
/// peer sites; the gateways do that mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request itself is wrong (a malformed field, a bad value).
    InvalidArgument,
    /// The thing named does not exist.
    NotFound,
    /// The thing to create exists already.
    AlreadyExists,
    /// The user or the site is locked down.
    LockedDown,
    /// The site key is sealed.
    Sealed,
    /// There is no site key yet.
    NoSiteKey,
    /// The site key pass phrase is wrong.
    WrongPassphrase,
    /// Too many attempts: try again later.
    Throttled,
    /// A ticket redemption failed (one answer for every reason).
    Refused,
    /// This caller may not make this call.
    Forbidden,
    /// The state of things does not allow it (other than the above).
    FailedPrecondition,
    /// A service the call needs cannot be reached now.
    Unavailable,
    /// A fault inside the site (database, I/O, a bug). Its detail is logged
    /// where it happened and never sent to the caller.
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        Self::InvalidArgument,
        Self::NotFound,
        Self::AlreadyExists,
        Self::LockedDown,
        Self::Sealed,
        Self::NoSiteKey,
        Self::WrongPassphrase,
        Self::Throttled,
        Self::Refused,
        Self::Forbidden,
        Self::FailedPrecondition,
        Self::Unavailable,
        Self::Internal,
    ];

    /// The code's stable name (the metadata value).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::LockedDown => "locked_down",
            Self::Sealed => "sealed",
            Self::NoSiteKey => "no_site_key",
            Self::WrongPassphrase => "wrong_passphrase",
            Self::Throttled => "throttled",
            Self::Refused => "refused",
            Self::Forbidden => "forbidden",
            Self::FailedPrecondition => "failed_precondition",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_back_from_its_name_and_names_are_distinct() {
        let mut names = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
            assert!(names.insert(c.as_str()), "{c} twice");
        }
        assert_eq!(ErrorCode::parse("no such code"), None);
    }
}
