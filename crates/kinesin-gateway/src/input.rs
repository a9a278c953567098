//! Typed access to a decoded request with AWS-shaped validation errors.

use serde_json::{Map, Value};

use crate::codec::Protocol;
use crate::error::ApiError;

pub struct Input<'a> {
    map: &'a Map<String, Value>,
    /// Scalars arrive as text (awsQuery): numbers and booleans are parsed,
    /// and an empty value is an empty list or map.
    text: bool,
}

static NO_ITEMS: Vec<Value> = Vec::new();

/// The member path as AWS writes it in validation messages: the last
/// segment in lowerCamel case (`records.3.member.partitionKey`).
fn wire_name(member: &str) -> String {
    let (path, last) = match member.rsplit_once('.') {
        Some((path, last)) => (format!("{path}."), last),
        None => (String::new(), member),
    };
    let mut chars = last.chars();
    match chars.next() {
        Some(c) => path + &c.to_lowercase().chain(chars).collect::<String>(),
        None => path,
    }
}

/// `1 validation error detected: Value 'v' at 'member' failed to satisfy
/// constraint: Member must …`, the form AWS uses for model violations.
pub fn constraint(member: &str, value: impl std::fmt::Display, rule: &str) -> ApiError {
    ApiError::validation(format!(
        "1 validation error detected: Value '{value}' at '{}' failed to satisfy constraint: Member must {rule}",
        wire_name(member)
    ))
}

fn wrong_type(member: &str, expected: &str) -> ApiError {
    ApiError::serialization(format!("{member} must be {expected}"))
}

impl<'a> Input<'a> {
    pub fn new(value: &'a Value) -> Result<Self, ApiError> {
        value
            .as_object()
            .map(|map| Input { map, text: false })
            .ok_or_else(|| ApiError::serialization("the request body must be an object"))
    }

    /// A request decoded from `protocol`.
    pub fn decoded(value: &'a Value, protocol: Protocol) -> Result<Self, ApiError> {
        Ok(Input {
            text: protocol == Protocol::Query,
            ..Self::new(value)?
        })
    }

    pub fn of_map(map: &'a Map<String, Value>) -> Self {
        Input { map, text: false }
    }

    /// A structure inside this input (a list entry), read as this one is.
    pub fn child(&self, map: &'a Map<String, Value>) -> Input<'a> {
        Input {
            map,
            text: self.text,
        }
    }

    /// The members given, in name order.
    pub fn keys(&self) -> impl Iterator<Item = &'a String> {
        self.map.keys()
    }

    /// A scalar given as text, parsed.
    fn parsed<T: std::str::FromStr>(
        &self,
        member: &str,
        expected: &str,
    ) -> Result<Option<T>, ApiError> {
        match self.get(member) {
            Some(Value::String(s)) if self.text => s
                .parse()
                .map(Some)
                .map_err(|_| wrong_type(member, expected)),
            _ => Err(wrong_type(member, expected)),
        }
    }

    fn get(&self, member: &str) -> Option<&'a Value> {
        self.map.get(member).filter(|v| !v.is_null())
    }

    pub fn opt_str(&self, member: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(member) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(wrong_type(member, "a string")),
        }
    }

    pub fn str(&self, member: &str) -> Result<&'a str, ApiError> {
        self.opt_str(member)?
            .ok_or_else(|| constraint(member, "null", "not be null"))
    }

    /// A string of `min..=max` characters.
    pub fn opt_str_len(
        &self,
        member: &str,
        min: usize,
        max: usize,
    ) -> Result<Option<&'a str>, ApiError> {
        let Some(s) = self.opt_str(member)? else {
            return Ok(None);
        };
        let n = s.chars().count();
        if n < min {
            return Err(constraint(
                member,
                s,
                &format!("have length greater than or equal to {min}"),
            ));
        }
        if n > max {
            return Err(constraint(
                member,
                s,
                &format!("have length less than or equal to {max}"),
            ));
        }
        Ok(Some(s))
    }

    pub fn opt_i64(&self, member: &str) -> Result<Option<i64>, ApiError> {
        match self.get(member) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| wrong_type(member, "an integer")),
            Some(_) => self.parsed(member, "an integer"),
        }
    }

    /// An integer within `min..=max`.
    pub fn opt_int_range(&self, member: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.opt_i64(member)? else {
            return Ok(None);
        };
        if v < min {
            return Err(constraint(
                member,
                v,
                &format!("have value greater than or equal to {min}"),
            ));
        }
        if v > max {
            return Err(constraint(
                member,
                v,
                &format!("have value less than or equal to {max}"),
            ));
        }
        Ok(Some(v))
    }

    pub fn opt_bool(&self, member: &str) -> Result<Option<bool>, ApiError> {
        match self.get(member) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => self.parsed(member, "a boolean"),
        }
    }

    /// A timestamp as epoch seconds (fractional allowed), returned in
    /// milliseconds.
    pub fn opt_timestamp_ms(&self, member: &str) -> Result<Option<u64>, ApiError> {
        match self.get(member) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let secs = n
                    .as_f64()
                    .ok_or_else(|| wrong_type(member, "a timestamp"))?;
                Ok(Some((secs.max(0.0) * 1000.0).round() as u64))
            }
            Some(_) => Err(wrong_type(member, "a timestamp in epoch seconds")),
        }
    }

    pub fn opt_array(&self, member: &str) -> Result<Option<&'a Vec<Value>>, ApiError> {
        match self.get(member) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(Value::String(s)) if self.text && s.is_empty() => Ok(Some(&NO_ITEMS)),
            Some(_) => Err(wrong_type(member, "a list")),
        }
    }

    pub fn opt_object(&self, member: &str) -> Result<Option<Input<'a>>, ApiError> {
        match self.get(member) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Input {
                map: m,
                text: self.text,
            })),
            Some(_) => Err(wrong_type(member, "a structure")),
        }
    }

    /// A list of strings.
    pub fn opt_str_list(&self, member: &str) -> Result<Option<Vec<&'a str>>, ApiError> {
        let Some(items) = self.opt_array(member)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| wrong_type(member, "a list of strings"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// A map of strings to strings.
    pub fn opt_str_map(&self, member: &str) -> Result<Option<Vec<(&'a str, &'a str)>>, ApiError> {
        match self.get(member) {
            None => Ok(None),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    v.as_str()
                        .map(|v| (k.as_str(), v))
                        .ok_or_else(|| wrong_type(member, "a map of strings"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(Value::String(s)) if self.text && s.is_empty() => Ok(Some(Vec::new())),
            Some(_) => Err(wrong_type(member, "a map")),
        }
    }
}

/// Checks `[a-zA-Z0-9_.-]+` of 1–128 characters (stream and shard ids).
pub fn check_name_pattern(member: &str, s: &str) -> Result<(), ApiError> {
    if s.is_empty() || s.len() > 128 {
        return Err(constraint(
            member,
            s,
            "have length between 1 and 128 characters",
        ));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(constraint(
            member,
            s,
            "satisfy regular expression pattern: [a-zA-Z0-9_.-]+",
        ));
    }
    Ok(())
}

/// Checks a decimal of `0|([1-9]\d{0,max_digits-1})`.
pub fn check_decimal(member: &str, s: &str, max_digits: usize) -> Result<(), ApiError> {
    let ok = !s.is_empty()
        && s.len() <= max_digits
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    if ok {
        Ok(())
    } else {
        Err(constraint(
            member,
            s,
            &format!(
                "satisfy regular expression pattern: 0|([1-9]\\d{{0,{}}})",
                max_digits - 1
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_scalars_are_read_as_their_members_types_json_ones_are_not() {
        let body = json!({"Limit": "25", "Fifo": "true", "Tags": "", "Attributes": "", "Nested": {"N": "7"}});
        let query = Input::decoded(&body, Protocol::Query).unwrap();
        assert_eq!(query.opt_i64("Limit").unwrap(), Some(25));
        assert_eq!(query.opt_bool("Fifo").unwrap(), Some(true));
        assert_eq!(query.opt_array("Tags").unwrap().map(Vec::len), Some(0));
        assert_eq!(query.opt_str_map("Attributes").unwrap(), Some(vec![]));
        let nested = query.opt_object("Nested").unwrap().unwrap();
        assert_eq!(nested.opt_i64("N").unwrap(), Some(7));
        assert_eq!(
            query.opt_i64("Fifo").unwrap_err().name,
            "SerializationException"
        );

        let json = Input::decoded(&body, Protocol::Json11).unwrap();
        assert_eq!(
            json.opt_i64("Limit").unwrap_err().name,
            "SerializationException"
        );
        assert!(json.opt_bool("Fifo").is_err());
        assert!(json.opt_array("Tags").is_err());
    }
}
