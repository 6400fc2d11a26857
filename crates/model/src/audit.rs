//! Audit outcomes in words, for people (the console's audit page, chipsctl's
//! text output); scripts keep the codes (`chipsctl --json`, the API).

/// An audit outcome as an operator reads it: `refused_unknown` is "refused:
/// no such ticket"; admin's `ok` is "done"; anything else as it is.
pub fn outcome_words(outcome: &str) -> String {
    let words = match outcome {
        "ok" => "done",
        "redeemed" => "redeemed",
        "throttled" => "refused: too many attempts from this address",
        "refused_unknown" => "refused: no such ticket",
        "refused_used" => "refused: already used",
        "refused_revoked" => "refused: revoked",
        "refused_expired" => "refused (burned): expired",
        "refused_kind" => "refused (burned): a ticket of another kind",
        "refused_chip_id" => "refused (burned): for another user",
        "refused_request" => "refused (burned): a malformed request",
        "refused_locked" => "refused (burned): the user or the site is locked down",
        other => {
            return match other.strip_prefix("refused_") {
                Some(why) => format!("refused (burned): {}", why.replace('_', " ")),
                None => other.to_owned(),
            };
        }
    };
    words.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_as_words() {
        assert_eq!(outcome_words("refused_unknown"), "refused: no such ticket");
        assert_eq!(
            outcome_words("refused_new_reason"),
            "refused (burned): new reason"
        );
        assert_eq!(outcome_words("ok"), "done");
        assert_eq!(outcome_words("InvalidArgument: bad"), "InvalidArgument: bad");
    }
}
