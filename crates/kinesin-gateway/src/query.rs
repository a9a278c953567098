//! The awsQuery protocol (SNS; SQS for SDKs older than its JSON protocol):
//! a form-encoded request whose `Action` field names the operation, an XML
//! response, and errors as `<ErrorResponse>`.
//!
//! Handlers work on the JSON form, as for every protocol. A form decodes to
//! it by the protocol's serialisation rules, which need no service model:
//! `Name.member.N` is a list, `Name.N` a flattened list, `Name.entry.N.key`
//! with `.value` (or `.Name` with `.Value`) a map, and every scalar arrives
//! as text, which the accessors of [`crate::input::Input`] read as the
//! member's type. Going out, a list is written as `<member>` elements and
//! the members a service names as maps as `<entry><key/><value/></entry>`.

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::http::StatusCode;
use serde_json::{Map, Value};

use crate::error::ApiError;

pub const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";
pub const XML_CONTENT_TYPE: &str = "text/xml";

/// How a query service writes its responses.
#[derive(Debug)]
pub struct QueryShape {
    /// The namespace of the response elements
    /// (`http://sns.amazonaws.com/doc/2010-03-31/`).
    pub xmlns: &'static str,
    /// Response members that are maps.
    pub maps: &'static [&'static str],
    /// List members written as one element of the member's name per item,
    /// without a wrapper (SQS's `<QueueUrl>`, `<Message>`).
    pub flattened: &'static [&'static str],
    /// Map members written as one element of the member's name per entry,
    /// holding the key and value elements named here (SQS's
    /// `<Attribute><Name/><Value/></Attribute>`).
    pub flattened_maps: &'static [(&'static str, &'static str, &'static str)],
}

/// A decoded query request.
#[derive(Debug, PartialEq)]
pub struct QueryRequest {
    /// The operation the `Action` field names.
    pub action: String,
    /// The other fields (`Version` left out) in the JSON form.
    pub input: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Segment {
    /// A 1-based position in a list.
    Index(u32),
    Name(String),
}

impl Segment {
    fn of(part: &str) -> Segment {
        match part.parse::<u32>() {
            Ok(i) if i > 0 && !part.starts_with('0') => Segment::Index(i),
            _ => Segment::Name(part.to_string()),
        }
    }

    fn is_name(&self, name: &str) -> bool {
        matches!(self, Segment::Name(n) if n == name)
    }
}

/// The fields under one parameter-name prefix.
#[derive(Default)]
struct Node {
    text: Option<String>,
    children: BTreeMap<Segment, Node>,
}

impl Node {
    fn is_list(&self) -> bool {
        self.text.is_none()
            && !self.children.is_empty()
            && self.children.keys().all(|s| matches!(s, Segment::Index(_)))
    }
}

/// Most parts in one parameter name (`A.member.1.B…`): the deepest AWS
/// query shapes need a dozen; the bound keeps the recursive decoding of
/// hostile input off the end of the stack.
const MAX_NAME_PARTS: usize = 32;
/// Most parameters in one request.
const MAX_PARAMETERS: usize = 10_000;

fn malformed(message: impl Into<String>) -> ApiError {
    ApiError::new("MalformedQueryString", StatusCode::BAD_REQUEST, message)
}

/// Decodes a form-encoded query request.
pub fn decode(body: &[u8]) -> Result<QueryRequest, ApiError> {
    let mut root = Node::default();
    let mut action = None;
    for (n, (key, value)) in form_urlencoded::parse(body).enumerate() {
        if n == MAX_PARAMETERS {
            return Err(malformed(format!(
                "the request has more than {MAX_PARAMETERS} parameters"
            )));
        }
        match key.as_ref() {
            "Action" => {
                action = Some(value.into_owned());
                continue;
            }
            "Version" => continue,
            _ => {}
        }
        if key.split('.').count() > MAX_NAME_PARTS {
            return Err(malformed(format!(
                "the parameter name '{key}' has more than {MAX_NAME_PARTS} parts"
            )));
        }
        let mut node = &mut root;
        for part in key.split('.') {
            if part.is_empty() {
                return Err(malformed(format!(
                    "the parameter name '{key}' has an empty part"
                )));
            }
            node = node.children.entry(Segment::of(part)).or_default();
        }
        if node.text.replace(value.into_owned()).is_some() {
            return Err(malformed(format!("the parameter '{key}' is given twice")));
        }
    }
    let action = action.filter(|a| !a.is_empty()).ok_or_else(|| {
        ApiError::new(
            "MissingAction",
            StatusCode::BAD_REQUEST,
            "the request has no Action parameter naming an operation",
        )
    })?;
    let input = if root.children.is_empty() {
        Value::Object(Map::new())
    } else {
        to_json(root, "")?
    };
    if !input.is_object() {
        return Err(malformed(
            "parameter names start with a member name, not a list position",
        ));
    }
    Ok(QueryRequest { action, input })
}

fn join(path: &str, part: &str) -> String {
    if path.is_empty() {
        part.to_string()
    } else {
        format!("{path}.{part}")
    }
}

fn to_json(node: Node, path: &str) -> Result<Value, ApiError> {
    if node.children.is_empty() {
        return Ok(Value::String(node.text.unwrap_or_default()));
    }
    if node.text.is_some() {
        return Err(malformed(format!(
            "'{path}' is given both as a value and as a structure"
        )));
    }
    if node.children.len() == 1 {
        let (segment, inner) = node.children.first_key_value().expect("one child");
        if segment.is_name("member") && inner.is_list() {
            let (_, inner) = node.children.into_iter().next().expect("one child");
            return list(inner, &join(path, "member"));
        }
        if segment.is_name("entry") && inner.is_list() {
            let (_, inner) = node.children.into_iter().next().expect("one child");
            return map(inner, &join(path, "entry"));
        }
    }
    if node.is_list() {
        return list(node, path);
    }
    let mut out = Map::new();
    for (segment, child) in node.children {
        let Segment::Name(name) = segment else {
            return Err(malformed(format!(
                "'{path}' mixes list positions and member names"
            )));
        };
        let value = to_json(child, &join(path, &name))?;
        out.insert(name, value);
    }
    Ok(Value::Object(out))
}

fn list(node: Node, path: &str) -> Result<Value, ApiError> {
    node.children
        .into_iter()
        .map(|(segment, item)| {
            let Segment::Index(i) = segment else {
                unreachable!("is_list checked every position")
            };
            to_json(item, &join(path, &i.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn map(node: Node, path: &str) -> Result<Value, ApiError> {
    let mut out = Map::new();
    for (segment, mut entry) in node.children {
        let Segment::Index(i) = segment else {
            unreachable!("is_list checked every position")
        };
        let here = join(path, &i.to_string());
        let mut take = |lower: &str, upper: &str| {
            entry
                .children
                .remove(&Segment::Name(lower.to_string()))
                .or_else(|| entry.children.remove(&Segment::Name(upper.to_string())))
        };
        let (Some(key), Some(value)) = (take("key", "Name"), take("value", "Value")) else {
            return Err(malformed(format!(
                "the map entry '{here}' needs a key and a value"
            )));
        };
        let (Some(key), true) = (key.text, key.children.is_empty()) else {
            return Err(malformed(format!("the key of '{here}' must be a value")));
        };
        if !entry.children.is_empty() || entry.text.is_some() {
            return Err(malformed(format!(
                "the map entry '{here}' has fields other than its key and value"
            )));
        }
        let value = to_json(value, &join(&here, "value"))?;
        if out.insert(key.clone(), value).is_some() {
            return Err(malformed(format!(
                "the map '{path}' has the key '{key}' twice"
            )));
        }
    }
    Ok(Value::Object(out))
}

/// `<{operation}Response>` holding the output (if any) in
/// `<{operation}Result>` and the request id.
pub fn encode(shape: &QueryShape, operation: &str, request_id: &str, output: &Value) -> Vec<u8> {
    let mut out = String::new();
    let _ = write!(out, "<{operation}Response xmlns=\"{}\">", shape.xmlns);
    if let Value::Object(members) = output {
        if !members.is_empty() {
            let _ = write!(out, "<{operation}Result>");
            for (name, value) in members {
                element(shape, name, value, &mut out);
            }
            let _ = write!(out, "</{operation}Result>");
        }
    }
    let _ = write!(
        out,
        "<ResponseMetadata><RequestId>{}</RequestId></ResponseMetadata></{operation}Response>",
        escape(request_id)
    );
    out.into_bytes()
}

/// Who an error blames, as `<Type>` of a query error and the second half
/// of `x-amzn-query-error`.
pub fn fault(status: StatusCode) -> &'static str {
    if status.is_server_error() {
        "Receiver"
    } else {
        "Sender"
    }
}

/// `<ErrorResponse>` with the error's query code.
pub fn encode_error(shape: &QueryShape, code: &str, e: &ApiError, request_id: &str) -> Vec<u8> {
    format!(
        "<ErrorResponse xmlns=\"{}\"><Error><Type>{}</Type><Code>{}</Code><Message>{}</Message></Error><RequestId>{}</RequestId></ErrorResponse>",
        shape.xmlns,
        fault(e.status),
        escape(code),
        escape(&e.message),
        escape(request_id)
    )
    .into_bytes()
}

fn element(shape: &QueryShape, name: &str, value: &Value, out: &mut String) {
    let flattened_map = shape.flattened_maps.iter().find(|(n, _, _)| *n == name);
    match value {
        Value::Null => {}
        Value::Array(items) if shape.flattened.contains(&name) => {
            for item in items {
                let _ = write!(out, "<{name}>");
                content(shape, item, out);
                let _ = write!(out, "</{name}>");
            }
        }
        Value::Object(entries) if flattened_map.is_some() => {
            let (_, key_name, value_name) = flattened_map.expect("checked");
            for (key, value) in entries {
                let _ = write!(
                    out,
                    "<{name}><{key_name}>{}</{key_name}><{value_name}>",
                    escape(key)
                );
                content(shape, value, out);
                let _ = write!(out, "</{value_name}></{name}>");
            }
        }
        Value::Object(entries) if shape.maps.contains(&name) => {
            let _ = write!(out, "<{name}>");
            for (key, value) in entries {
                let _ = write!(out, "<entry><key>{}</key><value>", escape(key));
                content(shape, value, out);
                out.push_str("</value></entry>");
            }
            let _ = write!(out, "</{name}>");
        }
        _ => {
            let _ = write!(out, "<{name}>");
            content(shape, value, out);
            let _ = write!(out, "</{name}>");
        }
    }
}

fn content(shape: &QueryShape, value: &Value, out: &mut String) {
    match value {
        Value::Null => {}
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => out.push_str(&escape(s)),
        Value::Array(items) => {
            for item in items {
                element(shape, "member", item, out);
            }
        }
        Value::Object(members) => {
            for (name, value) in members {
                element(shape, name, value, out);
            }
        }
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#xD;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SHAPE: QueryShape = QueryShape {
        xmlns: "http://example.com/doc/2010-03-31/",
        maps: &["Attributes"],
        flattened: &["Url"],
        flattened_maps: &[("Tag", "Key", "Value")],
    };

    fn decoded(form: &str) -> QueryRequest {
        decode(form.as_bytes()).unwrap()
    }

    #[test]
    fn lists_maps_and_structures_decode_to_the_json_form() {
        let q = decoded(concat!(
            "Action=Publish&Version=2010-03-31&TopicArn=arn%3Aaws%3Asns%3Ax&Message=hi+there%21",
            "&MessageAttributes.entry.1.Name=color&MessageAttributes.entry.1.Value.DataType=String",
            "&MessageAttributes.entry.1.Value.StringValue=red",
            "&Attributes.entry.2.key=b&Attributes.entry.2.value=2",
            "&Attributes.entry.1.key=a&Attributes.entry.1.value=1",
            "&Tags.member.2.Key=k2&Tags.member.2.Value=v2&Tags.member.1.Key=k1&Tags.member.1.Value=v1",
            "&AttributeName.1=All&AttributeName.10=Last&AttributeName.2=Policy",
        ));
        assert_eq!(q.action, "Publish");
        assert_eq!(
            q.input,
            json!({
                "TopicArn": "arn:aws:sns:x",
                "Message": "hi there!",
                "MessageAttributes": {"color": {"DataType": "String", "StringValue": "red"}},
                "Attributes": {"a": "1", "b": "2"},
                "Tags": [{"Key": "k1", "Value": "v1"}, {"Key": "k2", "Value": "v2"}],
                "AttributeName": ["All", "Policy", "Last"],
            })
        );
    }

    #[test]
    fn an_empty_list_is_an_empty_value_and_no_fields_an_empty_input() {
        assert_eq!(decoded("Action=ListTopics").input, json!({}));
        assert_eq!(decoded("Action=X&Tags=").input, json!({"Tags": ""}));
    }

    #[test]
    fn malformed_forms_are_refused_in_the_aws_shape() {
        for form in [
            "Version=1",
            "Action=",
            "Action=X&A=1&A=2",
            "Action=X&A=1&A.B=2",
            "Action=X&A..B=1",
            "Action=X&A.1=x&A.B=y",
            "Action=X&M.entry.1.key=k",
            "Action=X&M.entry.1.key=k&M.entry.1.value=v&M.entry.2.key=k&M.entry.2.value=w",
            // A list where the request's structure must be (found by the
            // request_body fuzz target).
            "Action=S&1=x",
            "Action=S&1.M=x&2.M=y",
            "Action=S&member.1=x",
        ] {
            let e = decode(form.as_bytes()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{form}");
            assert!(
                ["MissingAction", "MalformedQueryString"].contains(&e.name),
                "{form}: {e:?}"
            );
        }
        // Hostile sizes are refused before the recursive decoding.
        let deep = format!("Action=X&{}=1", vec!["a"; 33].join("."));
        let e = decode(deep.as_bytes()).unwrap_err();
        assert!(e.message.contains("more than 32 parts"), "{e:?}");
        let many: String = (0..10_001).map(|i| format!("&a{i}=1")).collect();
        let e = decode(format!("Action=X{many}").as_bytes()).unwrap_err();
        assert!(e.message.contains("more than 10000 parameters"), "{e:?}");
    }

    #[test]
    fn responses_are_xml_with_members_lists_and_maps() {
        let out = encode(
            &SHAPE,
            "GetTopicAttributes",
            "req-1",
            &json!({
                "Attributes": {"Policy": "{\"a\":\"<b>\"}", "Owner": "1"},
                "Topics": [{"TopicArn": "t1"}, {"TopicArn": "t2"}],
                "NextToken": null,
                "Count": 2,
                "Done": true,
            }),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            concat!(
                "<GetTopicAttributesResponse xmlns=\"http://example.com/doc/2010-03-31/\">",
                "<GetTopicAttributesResult>",
                "<Attributes><entry><key>Owner</key><value>1</value></entry>",
                "<entry><key>Policy</key><value>{&quot;a&quot;:&quot;&lt;b&gt;&quot;}</value></entry></Attributes>",
                "<Count>2</Count><Done>true</Done>",
                "<Topics><member><TopicArn>t1</TopicArn></member><member><TopicArn>t2</TopicArn></member></Topics>",
                "</GetTopicAttributesResult>",
                "<ResponseMetadata><RequestId>req-1</RequestId></ResponseMetadata>",
                "</GetTopicAttributesResponse>"
            )
        );
        let empty = String::from_utf8(encode(&SHAPE, "DeleteTopic", "r", &json!({}))).unwrap();
        assert!(!empty.contains("DeleteTopicResult"), "{empty}");
    }

    #[test]
    fn errors_are_error_responses_blaming_sender_or_receiver() {
        let e = ApiError::new("NotFoundException", StatusCode::NOT_FOUND, "no <topic>");
        let out = String::from_utf8(encode_error(&SHAPE, "NotFound", &e, "r")).unwrap();
        assert!(
            out.contains(
                "<Type>Sender</Type><Code>NotFound</Code><Message>no &lt;topic&gt;</Message>"
            ),
            "{out}"
        );
        assert_eq!(fault(StatusCode::INTERNAL_SERVER_ERROR), "Receiver");
    }
}
