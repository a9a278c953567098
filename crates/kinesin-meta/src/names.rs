//! Names are per account, as in AWS: two accounts may each have a stream
//! `orders`. The map keys a stream of the *home account* by its bare name,
//! so that data directories from before accounts were namespaces, the
//! native API and the CLI keep working unchanged, and any other account's
//! stream as `<account>:<name>`; `:` cannot occur in a stream name
//! (`[a-zA-Z0-9_.-]+`), so the two forms never collide. The home account
//! is the account of the first configured credentials (the development
//! account without credentials).

/// The map key of `account`'s stream `name`.
pub fn stream_key(home: &str, account: &str, name: &str) -> String {
    if account == home {
        name.to_string()
    } else {
        format!("{account}:{name}")
    }
}

/// The account (none: the home account) and name a map key stands for.
pub fn split_stream_key(key: &str) -> (Option<&str>, &str) {
    match key.split_once(':') {
        Some((account, name)) => (Some(account), name),
        None => (None, key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_home_account_keeps_bare_names_others_are_qualified() {
        let home = "111111111111";
        assert_eq!(stream_key(home, home, "orders"), "orders");
        let other = stream_key(home, "222222222222", "orders");
        assert_eq!(other, "222222222222:orders");
        assert_eq!(split_stream_key("orders"), (None, "orders"));
        assert_eq!(split_stream_key(&other), (Some("222222222222"), "orders"));
    }
}
