//! Who acts: the operator a call from the operators' identities
//! (`admin-client`, the console) is made for, carried in gRPC metadata and
//! named in admin's audit rows as `console (alice)`.

/// The gRPC metadata naming the operator.
pub const METADATA: &str = "chipsite-operator";

/// Whether `name` may name an operator: 1-48 of letters, digits and `._@+-`.
pub fn valid(name: &str) -> bool {
    (1..=48).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '+' | '-'))
}

/// The operator an audit actor or a ticket's issuer names: `alice` of
/// `admin-client (alice)`; the identity itself when it names none.
pub fn of_actor(actor: &str) -> &str {
    actor
        .strip_suffix(')')
        .and_then(|a| a.split_once(" ("))
        .map_or(actor, |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_are_named_plainly() {
        for good in ["alice", "a.b-c_d@example.org", "x+1"] {
            assert!(valid(good), "{good}");
        }
        for bad in ["", "two words", "tab\t", "é", &"x".repeat(49), "a)", "(a"] {
            assert!(!valid(bad), "{bad}");
        }
        assert_eq!(of_actor("admin-client (alice)"), "alice");
        assert_eq!(of_actor("admin-client"), "admin-client");
    }
}
