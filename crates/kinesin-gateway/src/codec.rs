//! Request and response bodies: awsJson1_0, awsJson1_1 and CBOR here,
//! awsQuery in [`crate::query`].
//!
//! Handlers work on the JSON form. A CBOR body is converted to it on the way
//! in (byte strings → base64 text, tag-1 timestamps → epoch seconds) and back
//! on the way out, where the few blob and timestamp members of the Kinesis
//! responses are known by name.

use base64::Engine;
use ciborium::Value as Cbor;
use serde_json::{Map, Number, Value};

use crate::error::ApiError;
use crate::query;

pub const JSON_1_0_CONTENT_TYPE: &str = "application/x-amz-json-1.0";
pub const JSON_CONTENT_TYPE: &str = "application/x-amz-json-1.1";
pub const CBOR_CONTENT_TYPE: &str = "application/x-amz-cbor-1.1";

/// The most elements (values, member names and containers) a JSON or CBOR
/// body may hold. The largest requests served hold a few thousand (500
/// records of PutRecords or PutRecordBatch, an SQS batch of 10 messages with
/// their attributes); a body of tiny elements would otherwise decode to a
/// tree of values tens of times its size (a 32 MiB body to gigabytes). A
/// scan counts them before anything is decoded.
pub const MAX_ELEMENTS: usize = 50_000;

/// Response members that are blobs (base64 in JSON, byte strings in CBOR).
const BLOB_MEMBERS: &[&str] = &["Data"];
/// Response members that are timestamps (epoch seconds in JSON, tag 1 with
/// integer milliseconds in CBOR, as the Java SDK expects).
const TIMESTAMP_MEMBERS: &[&str] = &[
    "ApproximateArrivalTimestamp",
    "StreamCreationTimestamp",
    "ConsumerCreationTimestamp",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// awsJson1_0 (SQS, DynamoDB-style services).
    Json10,
    /// awsJson1_1 (Kinesis, Firehose).
    Json11,
    Cbor,
    /// awsQuery: form-encoded requests, XML answers.
    Query,
}

/// A decoded request body.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    /// The operation a query request names in its `Action` field; the
    /// other protocols name it in `X-Amz-Target`.
    pub action: Option<String>,
    /// The input in the JSON form.
    pub input: Value,
}

impl Protocol {
    /// The content type of a request in this protocol.
    pub fn content_type(self) -> &'static str {
        match self {
            Protocol::Json10 => JSON_1_0_CONTENT_TYPE,
            Protocol::Json11 => JSON_CONTENT_TYPE,
            Protocol::Cbor => CBOR_CONTENT_TYPE,
            Protocol::Query => query::FORM_CONTENT_TYPE,
        }
    }

    /// The content type of an answer in this protocol.
    pub fn response_content_type(self) -> &'static str {
        match self {
            Protocol::Query => query::XML_CONTENT_TYPE,
            other => other.content_type(),
        }
    }

    pub fn decode(self, body: &[u8]) -> Result<Decoded, ApiError> {
        if self == Protocol::Query {
            let q = query::decode(body)?;
            return Ok(Decoded {
                action: Some(q.action),
                input: q.input,
            });
        }
        // No input: an empty body (or, in JSON, only whitespace). In CBOR a
        // byte such as 0x0A is an item (the integer 10), not whitespace.
        let empty = match self {
            Protocol::Cbor => body.is_empty(),
            _ => body.iter().all(u8::is_ascii_whitespace),
        };
        if empty {
            return Ok(Decoded {
                action: None,
                input: Value::Object(Map::new()),
            });
        }
        let within = match self {
            Protocol::Cbor => cbor_elements_within(body, MAX_ELEMENTS),
            _ => json_elements_within(body, MAX_ELEMENTS),
        };
        if !within {
            return Err(ApiError::serialization(format!(
                "the request body holds more than {MAX_ELEMENTS} elements"
            )));
        }
        let value = match self {
            Protocol::Cbor => {
                let cbor: Cbor = ciborium::from_reader(body).map_err(|e| {
                    ApiError::serialization(format!("the request body is not valid CBOR: {e}"))
                })?;
                cbor_to_json(cbor)?
            }
            _ => serde_json::from_slice(body).map_err(|e| {
                ApiError::serialization(format!("the request body is not valid JSON: {e}"))
            })?,
        };
        if !value.is_object() {
            return Err(ApiError::serialization(
                "the request body must be an object",
            ));
        }
        Ok(Decoded {
            action: None,
            input: value,
        })
    }

    /// A JSON or CBOR document: an answer, or an event's payload. (A query
    /// answer is XML that names its operation: [`query::encode`].)
    pub fn encode(self, value: &Value) -> Vec<u8> {
        match self {
            Protocol::Cbor => {
                let mut out = Vec::new();
                ciborium::into_writer(&json_to_cbor(None, value), &mut out)
                    .expect("writing CBOR to a Vec cannot fail");
                out
            }
            _ => serde_json::to_vec(value).expect("JSON values always serialize"),
        }
    }
}

/// Whether a JSON text holds at most `max` elements, counted as the
/// separators and openings outside strings (an upper bound of the values
/// and member names, off by at most one per container). A malformed text
/// passes: the parser reports it.
fn json_elements_within(body: &[u8], max: usize) -> bool {
    let mut count = 0usize;
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        match b {
            b'"' => loop {
                i += 1;
                match body
                    .get(i..)
                    .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                {
                    None => return true,
                    Some(k) if body[i + k] == b'\\' => i += k + 1,
                    Some(k) => {
                        i += k;
                        break;
                    }
                }
            },
            b',' | b':' | b'[' | b'{' => {
                count += 1;
                if count > max {
                    return false;
                }
            }
            _ => {}
        }
        i += 1;
    }
    true
}

/// Whether a CBOR item holds at most `max` data items, walked by their
/// heads without building them (strings are skipped by their lengths). A
/// malformed item passes: the decoder reports it.
fn cbor_elements_within(body: &[u8], max: usize) -> bool {
    const INDEFINITE: u64 = u64::MAX;
    // Items still to come in each open container, innermost last.
    let mut open: Vec<u64> = vec![1];
    let mut count = 0usize;
    let mut i = 0usize;
    while let Some(left) = open.last_mut() {
        if *left == 0 {
            open.pop();
            continue;
        }
        let Some(&head) = body.get(i) else {
            return true;
        };
        i += 1;
        if head == 0xFF {
            if *left != INDEFINITE {
                return true;
            }
            open.pop();
            continue;
        }
        if *left != INDEFINITE {
            *left -= 1;
        }
        count += 1;
        if count > max {
            return false;
        }
        let argument = match head & 0x1F {
            n @ 0..=23 => Some(u64::from(n)),
            n @ 24..=27 => {
                let width = 1usize << (n - 24);
                let Some(bytes) = body.get(i..i + width) else {
                    return true;
                };
                i += width;
                Some(bytes.iter().fold(0u64, |a, &b| a << 8 | u64::from(b)))
            }
            31 => None,
            _ => return true,
        };
        match (head >> 5, argument) {
            (2 | 3, Some(len)) => match usize::try_from(len).ok().and_then(|l| i.checked_add(l)) {
                Some(end) if end <= body.len() => i = end,
                _ => return true,
            },
            (2..=5, None) => open.push(INDEFINITE),
            (4, Some(n)) => open.push(n),
            (5, Some(n)) => open.push(n.saturating_mul(2)),
            (6, _) => open.push(1),
            _ => {}
        }
    }
    true
}

fn cbor_to_json(value: Cbor) -> Result<Value, ApiError> {
    Ok(match value {
        Cbor::Null => Value::Null,
        Cbor::Bool(b) => Value::Bool(b),
        Cbor::Integer(i) => {
            let i = i128::from(i);
            if let Ok(u) = u64::try_from(i) {
                Value::Number(u.into())
            } else if let Ok(s) = i64::try_from(i) {
                Value::Number(s.into())
            } else {
                return Err(ApiError::serialization("CBOR integer out of range"));
            }
        }
        Cbor::Float(f) => float(f)?,
        Cbor::Text(s) => Value::String(s),
        Cbor::Bytes(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        // Epoch time: integer milliseconds from the Java SDK, fractional
        // seconds from RFC 8949 encoders.
        Cbor::Tag(1, inner) => match *inner {
            Cbor::Integer(i) => {
                let ms = i128::from(i);
                float(ms as f64 / 1000.0)?
            }
            Cbor::Float(f) => float(f)?,
            _ => return Err(ApiError::serialization("CBOR tag 1 must hold a number")),
        },
        Cbor::Tag(_, inner) => cbor_to_json(*inner)?,
        Cbor::Array(items) => Value::Array(
            items
                .into_iter()
                .map(cbor_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Cbor::Map(entries) => {
            let mut map = Map::new();
            for (k, v) in entries {
                let Cbor::Text(key) = k else {
                    return Err(ApiError::serialization("CBOR map keys must be text"));
                };
                map.insert(key, cbor_to_json(v)?);
            }
            Value::Object(map)
        }
        _ => return Err(ApiError::serialization("unsupported CBOR value")),
    })
}

fn float(f: f64) -> Result<Value, ApiError> {
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| ApiError::serialization("numbers must be finite"))
}

fn json_to_cbor(member: Option<&str>, value: &Value) -> Cbor {
    match (member, value) {
        (Some(m), Value::String(s)) if BLOB_MEMBERS.contains(&m) => Cbor::Bytes(
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .expect("handlers encode blobs as base64"),
        ),
        (Some(m), Value::Number(n)) if TIMESTAMP_MEMBERS.contains(&m) => {
            let ms = (n.as_f64().unwrap_or(0.0) * 1000.0).round() as i64;
            Cbor::Tag(1, Box::new(Cbor::Integer(ms.into())))
        }
        (_, Value::Null) => Cbor::Null,
        (_, Value::Bool(b)) => Cbor::Bool(*b),
        (_, Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Cbor::Integer(u.into()),
            (None, Some(i)) => Cbor::Integer(i.into()),
            _ => Cbor::Float(n.as_f64().unwrap_or(0.0)),
        },
        (_, Value::String(s)) => Cbor::Text(s.clone()),
        (m, Value::Array(items)) => Cbor::Array(items.iter().map(|v| json_to_cbor(m, v)).collect()),
        (_, Value::Object(map)) => Cbor::Map(
            map.iter()
                .map(|(k, v)| (Cbor::Text(k.clone()), json_to_cbor(Some(k), v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cbor_requests_carry_millisecond_timestamps_and_byte_blobs() {
        let request = Cbor::Map(vec![
            (Cbor::Text("StreamName".into()), Cbor::Text("s".into())),
            (
                Cbor::Text("Timestamp".into()),
                Cbor::Tag(1, Box::new(Cbor::Integer(1_700_000_000_123_i64.into()))),
            ),
            (Cbor::Text("Data".into()), Cbor::Bytes(vec![0, 1, 2, 255])),
        ]);
        let mut body = Vec::new();
        ciborium::into_writer(&request, &mut body).unwrap();
        let v = Protocol::Cbor.decode(&body).unwrap().input;
        assert_eq!(v["StreamName"], "s");
        assert_eq!(v["Timestamp"].as_f64().unwrap(), 1_700_000_000.123);
        assert_eq!(v["Data"], "AAEC/w==");
    }

    #[test]
    fn cbor_responses_round_trip_blobs_and_timestamps_in_milliseconds() {
        let response = json!({
            "Records": [{
                "Data": "AAEC/w==",
                "ApproximateArrivalTimestamp": 1_700_000_000.123,
                "PartitionKey": "k",
                "SequenceNumber": "49590338271490256608559692538361571095921575989136588898",
            }],
            "MillisBehindLatest": 0,
        });
        let body = Protocol::Cbor.encode(&response);
        let cbor: Cbor = ciborium::from_reader(body.as_slice()).unwrap();
        let records = cbor
            .as_map()
            .unwrap()
            .iter()
            .find(|(k, _)| k.as_text() == Some("Records"))
            .and_then(|(_, v)| v.as_array())
            .unwrap();
        let record = records[0].as_map().unwrap();
        let get = |name: &str| {
            record
                .iter()
                .find(|(k, _)| k.as_text() == Some(name))
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get("Data"), Cbor::Bytes(vec![0, 1, 2, 255]));
        assert_eq!(
            get("ApproximateArrivalTimestamp"),
            Cbor::Tag(1, Box::new(Cbor::Integer(1_700_000_000_123_i64.into())))
        );
        assert_eq!(Protocol::Cbor.decode(&body).unwrap().input, response);
    }

    #[test]
    fn bodies_of_too_many_elements_are_refused_before_decoding() {
        let many = |n: usize| format!("{{\"Records\":[{}0]}}", "0,".repeat(n));
        assert!(Protocol::Json11
            .decode(many(MAX_ELEMENTS - 3).as_bytes())
            .is_ok());
        let err = Protocol::Json11
            .decode(many(MAX_ELEMENTS).as_bytes())
            .unwrap_err();
        assert_eq!(err.name, "SerializationException");
        assert!(err.message.contains("elements"), "{}", err.message);
        // Separators inside strings, escaped quotes included, are not counted.
        let text = format!("{{\"Data\":\"\\\"{}\"}}", ",[{:".repeat(MAX_ELEMENTS));
        assert!(json_elements_within(text.as_bytes(), 2));
        assert!(!json_elements_within(b"{\"a\":1,\"b\":2}", 3));

        let array = |n: usize| {
            let request = Cbor::Map(vec![(
                Cbor::Text("Records".into()),
                Cbor::Array(vec![Cbor::Integer(0.into()); n]),
            )]);
            let mut body = Vec::new();
            ciborium::into_writer(&request, &mut body).unwrap();
            body
        };
        assert!(Protocol::Cbor.decode(&array(MAX_ELEMENTS - 3)).is_ok());
        let err = Protocol::Cbor.decode(&array(MAX_ELEMENTS)).unwrap_err();
        assert_eq!(err.name, "SerializationException");
        // Indefinite lengths, tags, floats and long strings are walked.
        let mut body = vec![0xBF, 0x61, b'a', 0x9F];
        body.extend([0xC1, 0xFB, 0, 0, 0, 0, 0, 0, 0, 0]);
        body.extend([0x59, 0x01, 0x00]);
        body.extend([0xFF_u8; 256]);
        body.extend([0xFF, 0xFF]);
        assert!(cbor_elements_within(&body, 6));
        assert!(!cbor_elements_within(&body, 5));
        // A declared length beyond the body is the decoder's to report.
        assert!(cbor_elements_within(
            &[0x9B, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
            1
        ));
        assert!(Protocol::Cbor
            .decode(&[0x5B, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
            .is_err());
    }

    #[test]
    fn bodies_that_are_not_objects_are_serialization_errors() {
        assert_eq!(
            Protocol::Json11.decode(b"[1]").unwrap_err().name,
            "SerializationException"
        );
        assert_eq!(
            Protocol::Json10.decode(b"{").unwrap_err().name,
            "SerializationException"
        );
        assert!(Protocol::Json11.decode(b"").unwrap().input.is_object());
        assert!(Protocol::Json11.decode(b" \n").unwrap().input.is_object());
        assert!(Protocol::Cbor.decode(b"").unwrap().input.is_object());
        // The CBOR integer 10, whose byte is a newline in ASCII.
        assert_eq!(
            Protocol::Cbor.decode(b"\n").unwrap_err().name,
            "SerializationException"
        );
        assert_eq!(
            Protocol::Query
                .decode(b"Action=ListTopics")
                .unwrap()
                .action
                .as_deref(),
            Some("ListTopics")
        );
    }
}
