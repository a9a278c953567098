//! A queue's access policy (the `Policy` attribute, IAM's policy language):
//! what AddPermission and RemovePermission write, and whether it lets
//! another account call an action on the queue.
//!
//! Evaluation covers what AddPermission writes and what hand-written queue
//! policies commonly hold: `Effect`, `Principal` (`*`, or `AWS` with
//! account ids or `arn:aws:iam::<account>:root`), `Action` and `Resource`
//! (strings or lists, with `*` and `?` wildcards; actions ignore case). An
//! explicit Deny wins over any Allow. A statement with `Condition`,
//! `NotPrincipal`, `NotAction` or `NotResource` grants nothing, and denies
//! when its Effect is Deny and its other parts match: Kinesin cannot
//! evaluate those, so it errs toward refusing.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Why a permission change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PermissionRefused {
    /// AddPermission with a label a statement already has.
    LabelExists,
    /// RemovePermission with a label no statement has.
    NoSuchLabel,
    /// The policy would be longer than an attribute may be.
    TooLarge { max: u32 },
}

/// The statements of a policy, as a list whatever form the document used.
fn statements(policy: &Value) -> Vec<Value> {
    match policy.get("Statement") {
        Some(Value::Array(all)) => all.clone(),
        Some(one @ Value::Object(_)) => vec![one.clone()],
        _ => Vec::new(),
    }
}

fn has_label(statement: &Value, label: &str) -> bool {
    statement.get("Sid").and_then(Value::as_str) == Some(label)
}

/// `policy` (None: none yet, then one with the id `id`) with `statement`
/// added under the label `label` (its `Sid`).
pub fn with_statement(
    policy: Option<&str>,
    id: &str,
    label: &str,
    mut statement: Value,
) -> Result<String, PermissionRefused> {
    let mut doc = policy
        .and_then(|p| serde_json::from_str::<Value>(p).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({ "Version": "2012-10-17", "Id": id }));
    let mut all = statements(&doc);
    if all.iter().any(|s| has_label(s, label)) {
        return Err(PermissionRefused::LabelExists);
    }
    if !statement.is_object() {
        statement = json!({});
    }
    statement["Sid"] = label.into();
    all.push(statement);
    doc["Statement"] = Value::Array(all);
    Ok(doc.to_string())
}

/// `policy` without the statements labelled `label`; None when no
/// statement is left.
pub fn without_statement(
    policy: Option<&str>,
    label: &str,
) -> Result<Option<String>, PermissionRefused> {
    let Some(mut doc) = policy.and_then(|p| serde_json::from_str::<Value>(p).ok()) else {
        return Err(PermissionRefused::NoSuchLabel);
    };
    let all = statements(&doc);
    let kept: Vec<Value> = all
        .iter()
        .filter(|s| !has_label(s, label))
        .cloned()
        .collect();
    if kept.len() == all.len() {
        return Err(PermissionRefused::NoSuchLabel);
    }
    if kept.is_empty() {
        return Ok(None);
    }
    doc["Statement"] = Value::Array(kept);
    Ok(Some(doc.to_string()))
}

/// Whether `pattern` (with `*` and `?`) matches `text`.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // The classic two-pointer match with one backtrack point per `*`.
    let (mut i, mut j, mut star, mut from) = (0, 0, None, 0);
    while j < t.len() {
        if i < p.len() && (p[i] == '?' || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            from = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            from += 1;
            j = from;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

/// The strings of a policy element that is one string or a list of them.
fn strings(value: Option<&Value>) -> Vec<&str> {
    match value {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(all)) => all.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

fn principal_matches(principal: Option<&Value>, account: &str) -> bool {
    let aws = match principal {
        Some(Value::String(s)) => return s == "*",
        Some(Value::Object(p)) => p.get("AWS"),
        _ => return false,
    };
    let root = format!("arn:aws:iam::{account}:root");
    strings(aws)
        .into_iter()
        .any(|p| p == "*" || p == account || p == root)
}

/// Whether `policy` lets `account` call `action` (an SQS operation name,
/// `SendMessage`) on the queue `resource` (its ARN).
pub fn allows(policy: Option<&str>, account: &str, action: &str, resource: &str) -> bool {
    let Some(doc) = policy.and_then(|p| serde_json::from_str::<Value>(p).ok()) else {
        return false;
    };
    let action = format!("sqs:{action}").to_ascii_lowercase();
    let mut allowed = false;
    for statement in statements(&doc) {
        let unsupported = ["Condition", "NotPrincipal", "NotAction", "NotResource"]
            .iter()
            .any(|k| statement.get(k).is_some());
        let principal = statement.get("NotPrincipal").is_some()
            || principal_matches(statement.get("Principal"), account);
        let acts = statement.get("NotAction").is_some()
            || strings(statement.get("Action"))
                .into_iter()
                .any(|a| glob(&a.to_ascii_lowercase(), &action));
        let on = statement.get("NotResource").is_some()
            || strings(statement.get("Resource"))
                .into_iter()
                .any(|r| glob(r, resource));
        if !(principal && acts && on) {
            continue;
        }
        match statement.get("Effect").and_then(Value::as_str) {
            Some("Deny") => return false,
            Some("Allow") if !unsupported => allowed = true,
            _ => {}
        }
    }
    allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUEUE: &str = "arn:aws:sqs:us-east-1:111111111111:orders";

    fn grant(accounts: Value, actions: Value) -> Value {
        json!({"Effect": "Allow", "Principal": {"AWS": accounts},
               "Action": actions, "Resource": QUEUE})
    }

    #[test]
    fn wildcards_match_as_iam_does() {
        assert!(glob("sqs:*", "sqs:sendmessage"));
        assert!(glob("sqs:send*", "sqs:sendmessagebatch"));
        assert!(glob("sqs:?endMessage", "sqs:SendMessage"));
        assert!(glob("*", ""));
        assert!(!glob("sqs:send*", "sqs:receivemessage"));
        assert!(!glob("sqs:SendMessage", "sqs:SendMessageBatch"));
        assert!(glob("arn:aws:sqs:*:111111111111:*", QUEUE));
    }

    #[test]
    fn a_policy_allows_what_its_statements_grant_and_a_deny_wins() {
        let policy = with_statement(
            None,
            "id",
            "send",
            grant(
                json!("arn:aws:iam::222222222222:root"),
                json!("SQS:SendMessage"),
            ),
        )
        .unwrap();
        let p = Some(policy.as_str());
        assert!(allows(p, "222222222222", "SendMessage", QUEUE));
        assert!(!allows(p, "222222222222", "ReceiveMessage", QUEUE));
        assert!(!allows(p, "333333333333", "SendMessage", QUEUE));
        assert!(!allows(
            p,
            "222222222222",
            "SendMessage",
            "arn:aws:sqs:us-east-1:111111111111:other"
        ));
        assert!(!allows(None, "222222222222", "SendMessage", QUEUE));

        let everyone = with_statement(p, "id", "all", grant(json!("*"), json!(["sqs:*"]))).unwrap();
        assert!(allows(Some(&everyone), "333333333333", "PurgeQueue", QUEUE));
        let deny = json!({"Effect": "Deny", "Principal": "*",
                          "Action": "sqs:Purge*", "Resource": "*"});
        let denied = with_statement(Some(&everyone), "id", "no", deny).unwrap();
        assert!(!allows(Some(&denied), "333333333333", "PurgeQueue", QUEUE));
        assert!(allows(Some(&denied), "333333333333", "SendMessage", QUEUE));

        let conditional = json!({"Statement": {"Effect": "Allow", "Principal": "*", "Action": "*",
                                 "Resource": "*", "Condition": {"ArnEquals": {"aws:SourceArn": "x"}}}});
        assert!(!allows(
            Some(&conditional.to_string()),
            "333333333333",
            "SendMessage",
            QUEUE
        ));
    }

    #[test]
    fn labels_are_unique_and_removing_the_last_statement_removes_the_policy() {
        let one = with_statement(None, "id", "a", grant(json!("*"), json!("*"))).unwrap();
        assert_eq!(
            with_statement(Some(&one), "id", "a", json!({})),
            Err(PermissionRefused::LabelExists)
        );
        let two = with_statement(Some(&one), "id", "b", grant(json!("*"), json!("*"))).unwrap();
        let back = without_statement(Some(&two), "b").unwrap().unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&back).unwrap(),
            serde_json::from_str::<Value>(&one).unwrap()
        );
        assert_eq!(without_statement(Some(&one), "a"), Ok(None));
        assert_eq!(
            without_statement(Some(&one), "zzz"),
            Err(PermissionRefused::NoSuchLabel)
        );
        assert_eq!(
            without_statement(None, "a"),
            Err(PermissionRefused::NoSuchLabel)
        );
    }
}
