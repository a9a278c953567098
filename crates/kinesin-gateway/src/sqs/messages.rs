//! Message operations: send, receive (with long polling), delete, change
//! visibility, each alone and in batches.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use base64::Engine;
use futures::stream::{FuturesUnordered, StreamExt};
use kinesin_queue::{
    Delivered, EntryError, Handle, MessageAttribute, NewMessage, QueueCommand, QueueQuery,
    QueueReply, SendRefused,
};
use kinesin_router::Retry;
use kinesin_types::GroupId;
use md5::{Digest, Md5};
use serde_json::{json, Map, Value};

use super::{invalid_parameter, Context, Queue};
use crate::error::ApiError;
use crate::input::Input;

const MAX_BATCH_ENTRIES: usize = 10;
/// Most bytes of one batch's messages together.
const MAX_BATCH_BYTES: usize = 1_048_576;
const MAX_MESSAGE_ATTRIBUTES: usize = 10;
/// The largest MaximumMessageSize a queue can have.
const MAX_MESSAGE_BYTES: usize = 1_048_576;
const MAX_WAIT_SECONDS: i64 = 20;
const MAX_VISIBILITY_SECONDS: i64 = 43_200;
/// How long a caller's `ReceiveRequestAttemptId` repeats its receive, as
/// AWS.
const ATTEMPT_WINDOW_SECONDS: u32 = 300;
/// How long the gateway's own attempt id of a FIFO receive repeats it:
/// longer than the router retries a proposal.
const OWN_ATTEMPT_WINDOW_SECONDS: u32 = 60;
/// A long poll asks the leader in rounds of at most this long (one
/// attempt's bound in the router).
const WAIT_ROUND: Duration = Duration::from_secs(3);
/// Receipt handles: a version byte, then group, sequence and nonce.
const HANDLE_VERSION: u8 = 1;

/// SQS's characters: #x9 | #xA | #xD | #x20 to #xD7FF | #xE000 to #xFFFD |
/// #x10000 to #x10FFFF.
fn valid_text(s: &str) -> bool {
    s.chars().all(|c| {
        matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
    })
}

fn md5_hex(bytes: &[u8]) -> String {
    hex::encode(Md5::digest(bytes))
}

/// MD5 of message attributes as SQS computes it: for each attribute in
/// name order, its name, data type, a transport byte (1 text, 2 binary)
/// and value, each length-prefixed (4 bytes, big-endian).
fn md5_of_attributes(attributes: &[MessageAttribute]) -> Option<String> {
    if attributes.is_empty() {
        return None;
    }
    let mut sorted: Vec<&MessageAttribute> = attributes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut buf = Vec::new();
    let put = |bytes: &[u8], buf: &mut Vec<u8>| {
        buf.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        buf.extend_from_slice(bytes);
    };
    for a in sorted {
        put(a.name.as_bytes(), &mut buf);
        put(a.data_type.as_bytes(), &mut buf);
        match &a.string_value {
            Some(s) => {
                buf.push(1);
                put(s.as_bytes(), &mut buf);
            }
            None => {
                buf.push(2);
                put(&a.binary_value, &mut buf);
            }
        }
    }
    Some(md5_hex(&buf))
}

/// Reads a `MessageAttributes` map; returns the attributes and their
/// size (names, types and values count toward the message size).
fn attributes_of(
    input: &Input<'_>,
    member: &str,
) -> Result<(Vec<MessageAttribute>, usize), ApiError> {
    let Some(map) = input.opt_object(member)? else {
        return Ok((Vec::new(), 0));
    };
    let mut out = Vec::new();
    let mut size = 0;
    for name in map.keys() {
        let value = map.opt_object(name)?.ok_or_else(|| {
            invalid_parameter(format!("The message attribute '{name}' has no value."))
        })?;
        if name.is_empty()
            || name.len() > 256
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            || name.starts_with('.')
            || name.ends_with('.')
            || name.contains("..")
        {
            return Err(invalid_parameter(format!(
                "The message attribute name '{name}' is invalid: up to 256 characters of A-Z, a-z, 0-9, underscore, hyphen and period (not first, last or twice in a row)."
            )));
        }
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("aws.") || lower.starts_with("amazon.") {
            return Err(invalid_parameter(format!(
                "The message attribute name '{name}' is reserved."
            )));
        }
        let data_type = value.str("DataType").map_err(|_| {
            invalid_parameter(format!(
                "The message attribute '{name}' must contain a non-empty attribute type."
            ))
        })?;
        let base = data_type.split('.').next().unwrap_or("");
        let (string_value, binary_value) = match base {
            "String" | "Number" => {
                let s = value.opt_str("StringValue")?.ok_or_else(|| {
                    invalid_parameter(format!("The message attribute '{name}' with type '{data_type}' must use field 'String'."))
                })?;
                if !valid_text(s) {
                    return Err(invalid_parameter(format!(
                        "The message attribute '{name}' contains characters outside the allowed set."
                    )));
                }
                if base == "Number" && s.parse::<f64>().is_err() {
                    return Err(invalid_parameter(format!(
                        "Can't cast the value of message attribute '{name}' to a number."
                    )));
                }
                (Some(s.to_string()), Vec::new())
            }
            "Binary" => {
                let b = value.opt_str("BinaryValue")?.ok_or_else(|| {
                    invalid_parameter(format!("The message attribute '{name}' with type 'Binary' must use field 'Binary'."))
                })?;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|_| invalid_parameter(format!("The binary value of message attribute '{name}' is not base64.")))?;
                (None, bytes)
            }
            _ => {
                return Err(invalid_parameter(format!(
                    "The type of message attribute '{name}' is invalid: String, Number or Binary, optionally with a custom suffix."
                )))
            }
        };
        size += name.len()
            + data_type.len()
            + string_value
                .as_ref()
                .map_or(binary_value.len(), String::len);
        out.push(MessageAttribute {
            name: name.to_string(),
            data_type: data_type.to_string(),
            string_value,
            binary_value,
        });
    }
    if out.len() > MAX_MESSAGE_ATTRIBUTES {
        return Err(invalid_parameter(format!(
            "Number of message attributes [{}] exceeds the allowed maximum [{MAX_MESSAGE_ATTRIBUTES}].",
            out.len()
        )));
    }
    Ok((out, size))
}

/// One message of SendMessage or an entry of SendMessageBatch, checked
/// against the queue's kind and settings.
fn new_message(
    ctx: &Context<'_>,
    queue: &Queue,
    input: &Input<'_>,
) -> Result<NewMessage, ApiError> {
    let fifo = queue.name.ends_with(".fifo");
    let body = input.str("MessageBody")?;
    if body.is_empty() {
        return Err(invalid_parameter(
            "The request must contain the parameter MessageBody.",
        ));
    }
    if !valid_text(body) {
        return Err(ApiError::new(
            "InvalidMessageContents",
            StatusCode::BAD_REQUEST,
            "Invalid characters found. Valid unicode characters are #x9 | #xA | #xD | #x20 to #xD7FF | #xE000 to #xFFFD | #x10000 to #x10FFFF",
        ));
    }
    let delay = input.opt_int_range("DelaySeconds", 0, 900)?;
    if fifo && delay.is_some_and(|d| d > 0) {
        return Err(invalid_parameter(
            "Value for parameter DelaySeconds is invalid. Reason: The request include parameter that is not valid for this queue type.",
        ));
    }
    let (attributes, attributes_size) = attributes_of(input, "MessageAttributes")?;
    let (system_attributes, system_size) = attributes_of_system(input)?;
    // MaximumMessageSize is the queue's to check: at most the largest
    // message any queue takes, checked here without asking it.
    let size = body.len() + attributes_size + system_size;
    if size > MAX_MESSAGE_BYTES {
        return Err(too_large(MAX_MESSAGE_BYTES));
    }
    let group_id = input.opt_str("MessageGroupId")?.map(str::to_string);
    let dedup_id = input.opt_str("MessageDeduplicationId")?.map(str::to_string);
    for (member, value) in [
        ("MessageGroupId", &group_id),
        ("MessageDeduplicationId", &dedup_id),
    ] {
        if let Some(v) = value {
            let ok = !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(invalid_parameter(format!(
                    "Value {v} for parameter {member} is invalid: 1 to 128 printable ASCII characters."
                )));
            }
        }
    }
    if fifo {
        if group_id.is_none() {
            return Err(ApiError::new(
                "MissingParameter",
                StatusCode::BAD_REQUEST,
                "The request must contain the parameter MessageGroupId.",
            ));
        }
    } else if dedup_id.is_some() {
        return Err(invalid_parameter(
            "Value for parameter MessageDeduplicationId is invalid. Reason: The request includes a parameter that is not valid for this queue type.",
        ));
    }
    // Whether the queue deduplicates by content is the queue's to decide.
    let content_dedup_id = (fifo && dedup_id.is_none())
        .then(|| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes())));
    Ok(NewMessage {
        message_id: crate::new_request_id(),
        body: body.to_string(),
        md5_of_body: md5_hex(body.as_bytes()),
        md5_of_attributes: md5_of_attributes(&attributes),
        md5_of_system_attributes: md5_of_attributes(&system_attributes),
        attributes,
        system_attributes,
        sender_id: ctx.account.to_string(),
        delay_seconds: delay.map(|d| d as u32),
        group_id,
        dedup_id,
        content_dedup_id,
        size: size as u32,
    })
}

fn too_large(max: usize) -> ApiError {
    invalid_parameter(format!(
        "One or more parameters are invalid. Reason: Message must be shorter than {max} bytes."
    ))
}

/// A message the queue refused for its settings, as SQS answers it.
fn refused(e: SendRefused) -> ApiError {
    match e {
        SendRefused::TooLarge { max } => too_large(max as usize),
        SendRefused::NoDeduplicationId => invalid_parameter(
            "The queue should either have ContentBasedDeduplication enabled or MessageDeduplicationId provided explicitly",
        ),
    }
}

/// What a send answers about a message besides its id.
struct Digests {
    body: String,
    attributes: Option<String>,
    system_attributes: Option<String>,
}

impl Digests {
    fn of(m: &NewMessage) -> Digests {
        Digests {
            body: m.md5_of_body.clone(),
            attributes: m.md5_of_attributes.clone(),
            system_attributes: m.md5_of_system_attributes.clone(),
        }
    }
}

/// `MessageSystemAttributes`: only `AWSTraceHeader`, a String.
fn attributes_of_system(input: &Input<'_>) -> Result<(Vec<MessageAttribute>, usize), ApiError> {
    let (attributes, size) = attributes_of_unchecked_names(input)?;
    for a in &attributes {
        if a.name != "AWSTraceHeader" || a.data_type != "String" {
            return Err(invalid_parameter(format!(
                "Message system attribute '{}' is not supported: only AWSTraceHeader, of type String.",
                a.name
            )));
        }
    }
    Ok((attributes, size))
}

fn attributes_of_unchecked_names(
    input: &Input<'_>,
) -> Result<(Vec<MessageAttribute>, usize), ApiError> {
    let Some(map) = input.opt_object("MessageSystemAttributes")? else {
        return Ok((Vec::new(), 0));
    };
    let mut out = Vec::new();
    for name in map.keys() {
        let value = map.opt_object(name)?.ok_or_else(|| {
            invalid_parameter(format!("The system attribute '{name}' has no value."))
        })?;
        let data_type = value.str("DataType")?;
        let s = value.opt_str("StringValue")?.unwrap_or("");
        out.push(MessageAttribute {
            name: name.to_string(),
            data_type: data_type.to_string(),
            string_value: Some(s.to_string()),
            binary_value: Vec::new(),
        });
    }
    let size = out
        .iter()
        .map(|a| a.name.len() + a.data_type.len() + a.string_value.as_ref().map_or(0, String::len))
        .sum();
    Ok((out, size))
}

/// The receipt handle of a message received from the partition `group`.
fn receipt(group: GroupId, handle: Handle) -> String {
    let mut b = Vec::with_capacity(33);
    b.push(HANDLE_VERSION);
    b.extend_from_slice(&group.0.to_be_bytes());
    b.extend_from_slice(&handle.seq.to_be_bytes());
    b.extend_from_slice(&handle.nonce.to_be_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn invalid_receipt(handle: &str) -> ApiError {
    ApiError::new(
        "ReceiptHandleIsInvalid",
        StatusCode::BAD_REQUEST,
        format!("The input receipt handle \"{handle}\" is not a valid receipt handle."),
    )
}

/// The partition, message and receive a receipt handle names, if it is
/// one of this queue's.
fn parse_receipt(queue: &Queue, handle: &str) -> Result<(GroupId, Handle), ApiError> {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(handle)
        .map_err(|_| invalid_receipt(handle))?;
    if b.len() != 33 || b[0] != HANDLE_VERSION {
        return Err(invalid_receipt(handle));
    }
    let group = GroupId(u64::from_be_bytes(b[1..9].try_into().expect("8 bytes")));
    if !queue.partitions.contains(&group) {
        return Err(invalid_receipt(handle));
    }
    let handle = Handle {
        seq: u128::from_be_bytes(b[9..25].try_into().expect("16 bytes")),
        nonce: u64::from_be_bytes(b[25..33].try_into().expect("8 bytes")),
    };
    Ok((group, handle))
}

fn sequence_number(seq: u128) -> String {
    format!("{seq:020}")
}

/// The entries of a batch call, checked as SQS does: 1 to 10, ids unique
/// and well-formed.
fn batch_entries<'a>(input: &Input<'a>) -> Result<Vec<Input<'a>>, ApiError> {
    let entries = input
        .opt_array("Entries")?
        .map(Vec::as_slice)
        .unwrap_or_default();
    if entries.is_empty() {
        return Err(ApiError::new(
            "EmptyBatchRequest",
            StatusCode::BAD_REQUEST,
            "There should be at least one SendMessageBatchRequestEntry in the request.",
        ));
    }
    if entries.len() > MAX_BATCH_ENTRIES {
        return Err(ApiError::new(
            "TooManyEntriesInBatchRequest",
            StatusCode::BAD_REQUEST,
            format!(
                "Maximum number of entries per request are {MAX_BATCH_ENTRIES}. You have sent {}.",
                entries.len()
            ),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Object(map) = entry else {
            return Err(ApiError::serialization("a batch entry must be a structure"));
        };
        let entry = input.child(map);
        let id = entry.str("Id")?;
        let ok = !id.is_empty()
            && id.len() <= 80
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(ApiError::new(
                "InvalidBatchEntryId",
                StatusCode::BAD_REQUEST,
                "A batch entry id can only contain alphanumeric characters, hyphens and underscores. It can be at most 80 letters long.",
            ));
        }
        if !seen.insert(id) {
            return Err(ApiError::new(
                "BatchEntryIdsNotDistinct",
                StatusCode::BAD_REQUEST,
                format!("Id {id} repeated."),
            ));
        }
        out.push(entry);
    }
    Ok(out)
}

fn failure(id: &str, e: &ApiError) -> Value {
    json!({
        "Id": id,
        "SenderFault": !e.status.is_server_error(),
        "Code": e.name,
        "Message": e.message,
    })
}

fn sent_entry(digests: &Digests, sent: &kinesin_queue::Sent, fifo: bool) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("MessageId".into(), Value::String(sent.message_id.clone()));
    out.insert(
        "MD5OfMessageBody".into(),
        Value::String(digests.body.clone()),
    );
    if let Some(md5) = &digests.attributes {
        out.insert("MD5OfMessageAttributes".into(), Value::String(md5.clone()));
    }
    if let Some(md5) = &digests.system_attributes {
        out.insert(
            "MD5OfMessageSystemAttributes".into(),
            Value::String(md5.clone()),
        );
    }
    if fifo {
        out.insert(
            "SequenceNumber".into(),
            Value::String(sequence_number(sent.seq)),
        );
    }
    out
}

async fn send(
    ctx: &Context<'_>,
    queue: &Queue,
    messages: Vec<NewMessage>,
) -> Result<Vec<Result<kinesin_queue::Sent, SendRefused>>, ApiError> {
    let count = messages.len();
    // Each send to one partition, any that can commit: a FIFO queue has one.
    let open = reachable(ctx, queue);
    let group = open[rand::random_range(0..open.len())];
    // A send whose outcome is unknown is not repeated here: a standard
    // queue would hold the message twice. FIFO queues deduplicate, so the
    // client's own retry is safe there.
    match ctx
        .command(group, &QueueCommand::Send(messages), Retry::BeforeProposing)
        .await?
    {
        QueueReply::Sent(sent) if sent.len() == count => Ok(sent),
        other => Err(super::internal(format!(
            "unexpected reply to a send: {other:?}"
        ))),
    }
}

pub(super) async fn send_message(ctx: &Context<'_>, input: &Input<'_>) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    let message = new_message(ctx, &queue, input)?;
    let digests = Digests::of(&message);
    let sent = send(ctx, &queue, vec![message])
        .await?
        .remove(0)
        .map_err(refused)?;
    Ok(Value::Object(sent_entry(
        &digests,
        &sent,
        queue.name.ends_with(".fifo"),
    )))
}

pub(super) async fn send_message_batch(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    let entries = batch_entries(input)?;
    let mut failed = Vec::new();
    let mut ids = Vec::new();
    let mut messages = Vec::new();
    let mut total = 0;
    for entry in &entries {
        let id = entry.str("Id")?;
        match new_message(ctx, &queue, entry) {
            Ok(message) => {
                total += message.size as usize;
                ids.push((id, Digests::of(&message)));
                messages.push(message);
            }
            Err(e) => failed.push(failure(id, &e)),
        }
    }
    if total > MAX_BATCH_BYTES {
        return Err(ApiError::new(
            "BatchRequestTooLong",
            StatusCode::BAD_REQUEST,
            format!("Batch requests cannot be longer than {MAX_BATCH_BYTES} bytes. You have sent {total} bytes."),
        ));
    }
    let mut successful = Vec::new();
    if !messages.is_empty() {
        let sent = send(ctx, &queue, messages).await?;
        let fifo = queue.name.ends_with(".fifo");
        for ((id, digests), sent) in ids.iter().zip(sent) {
            match sent {
                Ok(sent) => {
                    let mut entry = sent_entry(digests, &sent, fifo);
                    entry.insert("Id".into(), Value::String(id.to_string()));
                    successful.push(Value::Object(entry));
                }
                Err(e) => failed.push(failure(id, &refused(e))),
            }
        }
    }
    Ok(reply([
        ("Successful", Value::Array(successful)),
        ("Failed", Value::Array(failed)),
    ]))
}

/// Which names of a selection list to keep: `All`, `.*`, exact names and
/// `prefix.*`.
fn selected(wanted: &[&str], name: &str) -> bool {
    wanted.iter().any(|w| {
        *w == "All"
            || *w == ".*"
            || *w == name
            || w.strip_suffix(".*").is_some_and(|prefix| {
                name.starts_with(prefix) && name[prefix.len()..].starts_with('.')
            })
    })
}

fn attribute_value(a: &MessageAttribute) -> Value {
    let mut v = Map::new();
    v.insert("DataType".into(), Value::String(a.data_type.clone()));
    match &a.string_value {
        Some(s) => v.insert("StringValue".into(), Value::String(s.clone())),
        None => v.insert(
            "BinaryValue".into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(&a.binary_value)),
        ),
    };
    Value::Object(v)
}

fn message_out(
    group: GroupId,
    mut d: Delivered,
    system: &[&str],
    wanted_attributes: &[&str],
) -> Value {
    let mut out = Map::new();
    out.insert(
        "ReceiptHandle".into(),
        Value::String(receipt(group, d.received.handle)),
    );
    let m = &mut d.message.message;
    out.insert(
        "MessageId".into(),
        Value::String(std::mem::take(&mut m.message_id)),
    );
    out.insert(
        "MD5OfBody".into(),
        Value::String(std::mem::take(&mut m.md5_of_body)),
    );
    out.insert("Body".into(), Value::String(std::mem::take(&mut m.body)));
    let m = &d.message.message;
    let mut attrs = Map::new();
    let mut put = |name: &str, value: String| {
        if selected(system, name) {
            attrs.insert(name.to_string(), Value::String(value));
        }
    };
    put("SenderId", m.sender_id.clone());
    put("SentTimestamp", d.message.sent_ms.to_string());
    put(
        "ApproximateReceiveCount",
        d.received.receive_count.to_string(),
    );
    put(
        "ApproximateFirstReceiveTimestamp",
        d.received.first_receive_ms.to_string(),
    );
    if let Some(g) = &m.group_id {
        put("MessageGroupId", g.clone());
    }
    if let Some(id) = &m.dedup_id {
        put("MessageDeduplicationId", id.clone());
        put("SequenceNumber", sequence_number(d.message.seq));
    }
    if let Some(trace) = m
        .system_attributes
        .iter()
        .find(|a| a.name == "AWSTraceHeader")
    {
        put(
            "AWSTraceHeader",
            trace.string_value.clone().unwrap_or_default(),
        );
    }
    if !attrs.is_empty() {
        out.insert("Attributes".into(), Value::Object(attrs));
    }
    let chosen: Vec<MessageAttribute> = m
        .attributes
        .iter()
        .filter(|a| selected(wanted_attributes, &a.name))
        .cloned()
        .collect();
    if let Some(md5) = md5_of_attributes(&chosen) {
        out.insert("MD5OfMessageAttributes".into(), Value::String(md5));
        out.insert(
            "MessageAttributes".into(),
            Value::Object(
                chosen
                    .iter()
                    .map(|a| (a.name.clone(), attribute_value(a)))
                    .collect(),
            ),
        );
    }
    Value::Object(out)
}

pub(super) async fn receive_message(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    let max = input
        .opt_int_range(
            "MaxNumberOfMessages",
            1,
            i64::from(kinesin_queue::MAX_RECEIVE),
        )?
        .unwrap_or(1) as u32;
    let visibility = input
        .opt_int_range("VisibilityTimeout", 0, MAX_VISIBILITY_SECONDS)?
        .map(|v| v as u32);
    let wait = input
        .opt_int_range("WaitTimeSeconds", 0, MAX_WAIT_SECONDS)?
        .map(|w| w as u64);
    let mut system = input.opt_str_list("AttributeNames")?.unwrap_or_default();
    system.extend(
        input
            .opt_str_list("MessageSystemAttributeNames")?
            .unwrap_or_default(),
    );
    let wanted_attributes = input
        .opt_str_list("MessageAttributeNames")?
        .unwrap_or_default();
    let attempt = input.opt_str_len("ReceiveRequestAttemptId", 1, 128)?;
    if attempt.is_some_and(|a| !a.bytes().all(|b| b.is_ascii_graphic())) {
        return Err(invalid_parameter(
            "ReceiveRequestAttemptId can contain only alphanumeric characters and punctuation.",
        ));
    }
    // On a FIFO queue every receive has an attempt id, the caller's or
    // one of its own (with a space, which no caller's can have): a receive
    // the router repeats after an unknown outcome then answers the
    // messages the first one took instead of hiding them until their
    // visibility timeout ends.
    let (command, ready) = if queue.name.ends_with(".fifo") {
        let (attempt, window_seconds) = match attempt {
            Some(a) => (a.to_string(), ATTEMPT_WINDOW_SECONDS),
            None => (
                format!("kinesin {}", crate::new_request_id()),
                OWN_ATTEMPT_WINDOW_SECONDS,
            ),
        };
        let ready = QueueQuery::ReadyFor(attempt.clone());
        let command = QueueCommand::ReceiveAttempt {
            max,
            visibility_seconds: visibility,
            attempt,
            window_seconds,
        };
        (command, ready)
    } else {
        let command = QueueCommand::Receive {
            max,
            visibility_seconds: visibility,
        };
        (command, QueueQuery::Ready)
    };
    let ready = kinesin_queue::encode(&ready);
    let command = kinesin_queue::encode(&command);
    let started = Instant::now();
    let (queue, command, ready) = (&queue, &command, &ready);
    let receive = |wait: u64| {
        let deadline = started + Duration::from_secs(wait);
        async move {
            if queue.partitions.len() == 1 {
                receive_one(ctx, queue.group, command, ready, deadline).await
            } else {
                receive_spread(ctx, queue, max, visibility, ready, deadline).await
            }
        }
    };
    // Without a WaitTimeSeconds the queue's ReceiveMessageWaitTimeSeconds
    // applies, which matters only if there is nothing to take: a receive
    // that finds messages answers at once whatever its wait, so the
    // queue's settings (a read at a quorum) are read only after one that
    // found none.
    let delivered = match (receive(wait.unwrap_or(0)).await, wait) {
        (Ok(got), _) if !got.is_empty() => got,
        (first, Some(_)) => first?,
        (first, None) => {
            let default_wait = ctx
                .query::<BTreeMap<String, String>>(queue.group, &QueueQuery::Settings)
                .await?
                .get("ReceiveMessageWaitTimeSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if default_wait > 0 {
                receive(default_wait).await?
            } else {
                first?
            }
        }
    };
    let messages: Vec<Value> = delivered
        .into_iter()
        .map(|(group, d)| message_out(group, d, &system, &wanted_attributes))
        .collect();
    if messages.is_empty() {
        return Ok(json!({}));
    }
    Ok(reply([("Messages", Value::Array(messages))]))
}

/// A reply of these fields, moved in: `json!` given a variable serializes
/// it anew, a deep copy (of every body a receive returns).
fn reply<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Object(
        fields
            .into_iter()
            .map(|(name, value)| (name.to_string(), value))
            .collect(),
    )
}

/// The messages a receive's reply carries.
fn delivered_of(reply: &[u8]) -> Result<Vec<Delivered>, ApiError> {
    match kinesin_queue::decode(reply).map_err(super::internal)? {
        QueueReply::Delivered(d) => Ok(d),
        other => Err(super::internal(format!(
            "unexpected reply to a receive: {other:?}"
        ))),
    }
}

/// A receive from a queue of one partition, its leader waiting in rounds
/// until `ready` or the deadline.
async fn receive_one(
    ctx: &Context<'_>,
    group: GroupId,
    command: &[u8],
    ready: &[u8],
    deadline: Instant,
) -> Result<Vec<(GroupId, Delivered)>, ApiError> {
    loop {
        let round = deadline
            .saturating_duration_since(Instant::now())
            .min(WAIT_ROUND);
        // A receive is repeated when its outcome is unknown: the messages
        // it may have taken become visible again after their timeout.
        let reply = ctx
            .router
            .propose_when_ready(
                group,
                command.to_vec(),
                Retry::Always,
                ready.to_vec(),
                round,
            )
            .await
            .map_err(super::queue_error)?;
        let delivered = match reply {
            Some(bytes) => delivered_of(&bytes)?,
            None => Vec::new(),
        };
        if !delivered.is_empty() || Instant::now() >= deadline {
            return Ok(delivered.into_iter().map(|d| (group, d)).collect());
        }
    }
}

/// The partitions of `queue` whose replicas are not mostly down as this
/// node sees them ([`super::with_quorum`]), or all of them if none is: a
/// send or receive skips a partition that could not answer before the
/// router's retry budget ends.
fn reachable(ctx: &Context<'_>, queue: &Queue) -> Vec<GroupId> {
    let open = super::with_quorum(ctx, &queue.partitions);
    if open.is_empty() {
        queue.partitions.clone()
    } else {
        open
    }
}

/// How long a round of waiting at every partition may outlast the round
/// itself (each partition's leader answers when the round ends).
const WAIT_GRACE: Duration = Duration::from_secs(1);

/// A receive from a standard queue of several partitions: it takes from
/// each partition in turn, starting at a random one so that none starves,
/// until it has `max`. Finding none, it waits at every partition's leader
/// at once and takes from the first that has a message. The wait's
/// proposal is a receive of no message (which every version of the queue
/// kind applies), so a wait it then drops took nothing. A partition
/// without a leader does not stop a receive from the others: one whose
/// replicas are mostly down is skipped, and a round of waiting ends with
/// the round even if a partition has not answered.
async fn receive_spread(
    ctx: &Context<'_>,
    queue: &Queue,
    max: u32,
    visibility_seconds: Option<u32>,
    ready: &[u8],
    deadline: Instant,
) -> Result<Vec<(GroupId, Delivered)>, ApiError> {
    // The partition a wait found ready is asked first in the next round.
    let mut first: Option<GroupId> = None;
    loop {
        let partitions = reachable(ctx, queue);
        let n = partitions.len();
        let start = first
            .and_then(|g| partitions.iter().position(|p| *p == g))
            .unwrap_or_else(|| rand::random_range(0..n));
        let mut got = Vec::new();
        let mut failure = None;
        for i in 0..n {
            let left = max - got.len() as u32;
            if left == 0 {
                break;
            }
            let group = partitions[(start + i) % n];
            let command = kinesin_queue::encode(&QueueCommand::Receive {
                max: left,
                visibility_seconds,
            });
            let reply = ctx
                .router
                .propose_when_ready(
                    group,
                    command,
                    Retry::Always,
                    ready.to_vec(),
                    Duration::ZERO,
                )
                .await;
            match reply {
                Ok(Some(bytes)) => {
                    got.extend(delivered_of(&bytes)?.into_iter().map(|d| (group, d)))
                }
                Ok(None) => {}
                Err(e) => failure = Some(e),
            }
        }
        if !got.is_empty() {
            return Ok(got);
        }
        let round = deadline
            .saturating_duration_since(Instant::now())
            .min(WAIT_ROUND);
        if round.is_zero() {
            return match failure {
                Some(e) => Err(super::queue_error(e)),
                None => Ok(Vec::new()),
            };
        }
        let mut waits: FuturesUnordered<_> = partitions
            .iter()
            .enumerate()
            .map(|(k, group)| async move {
                let nothing = kinesin_queue::encode(&QueueCommand::Receive {
                    max: 0,
                    visibility_seconds: None,
                });
                let woken = ctx
                    .router
                    .propose_when_ready(*group, nothing, Retry::Always, ready.to_vec(), round)
                    .await
                    .map(|reply| reply.is_some());
                (k, woken)
            })
            .collect();
        let round_end = tokio::time::Instant::now() + round + WAIT_GRACE;
        let mut failed = 0;
        while let Ok(Some((k, outcome))) = tokio::time::timeout_at(round_end, waits.next()).await {
            match outcome {
                Ok(true) => {
                    first = Some(partitions[k]);
                    break;
                }
                Ok(false) => {}
                Err(e) => {
                    failed += 1;
                    if failed == n {
                        return Err(super::queue_error(e));
                    }
                }
            }
        }
    }
}

fn entry_error(e: EntryError, handle: &str) -> ApiError {
    match e {
        EntryError::ReceiptHandleIsInvalid => invalid_receipt(handle),
        EntryError::MessageNotInflight => ApiError::new(
            "MessageNotInflight",
            StatusCode::BAD_REQUEST,
            "The message referred to is not in flight.",
        ),
    }
}

/// A partition's share of a batch: its entries' handles (with a new
/// visibility timeout) and their places in the batch.
type PartitionEntries = (Vec<(Handle, Option<u32>)>, Vec<usize>);

/// Runs handle-based entries (delete, change visibility) as one command
/// per partition; entries whose handle does not parse fail alone.
async fn handle_entries(
    ctx: &Context<'_>,
    queue: &Queue,
    entries: &[(String, String, Option<u32>)],
    make: impl Fn(Vec<(Handle, Option<u32>)>) -> QueueCommand,
) -> Result<Vec<Result<(), ApiError>>, ApiError> {
    let mut results: Vec<Option<Result<(), ApiError>>> = vec![None; entries.len()];
    let mut by_partition: BTreeMap<GroupId, PartitionEntries> = BTreeMap::new();
    for (i, (_, handle, extra)) in entries.iter().enumerate() {
        match parse_receipt(queue, handle) {
            Ok((group, h)) => {
                let (parsed, positions) = by_partition.entry(group).or_default();
                parsed.push((h, *extra));
                positions.push(i);
            }
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    let commands = by_partition
        .into_iter()
        .map(|(group, (parsed, positions))| {
            let command = make(parsed);
            async move {
                let reply = ctx.command(group, &command, Retry::Always).await?;
                Ok::<_, ApiError>((reply, positions))
            }
        });
    for (reply, positions) in futures::future::try_join_all(commands).await? {
        match reply {
            QueueReply::Entries(outcomes) => {
                for (i, outcome) in positions.into_iter().zip(outcomes) {
                    results[i] = Some(outcome.map_err(|e| entry_error(e, &entries[i].1)));
                }
            }
            other => return Err(super::internal(format!("unexpected reply: {other:?}"))),
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(super::internal("an entry got no outcome".into()))))
        .collect())
}

fn delete_command(entries: Vec<(Handle, Option<u32>)>) -> QueueCommand {
    QueueCommand::Delete(entries.into_iter().map(|(h, _)| h).collect())
}

fn visibility_command(entries: Vec<(Handle, Option<u32>)>) -> QueueCommand {
    QueueCommand::ChangeVisibility(
        entries
            .into_iter()
            .map(|(h, s)| (h, s.unwrap_or(0)))
            .collect(),
    )
}

pub(super) async fn delete_message(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    let handle = input.str("ReceiptHandle")?.to_string();
    let entries = [(String::new(), handle, None)];
    let mut results = handle_entries(ctx, &queue, &entries, delete_command).await?;
    results.remove(0)?;
    Ok(json!({}))
}

pub(super) async fn change_message_visibility(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    let handle = input.str("ReceiptHandle")?.to_string();
    let seconds = visibility_of(input)?;
    let entries = [(String::new(), handle, Some(seconds))];
    let mut results = handle_entries(ctx, &queue, &entries, visibility_command).await?;
    results.remove(0)?;
    Ok(json!({}))
}

fn visibility_of(input: &Input<'_>) -> Result<u32, ApiError> {
    input
        .opt_int_range("VisibilityTimeout", 0, MAX_VISIBILITY_SECONDS)?
        .map(|v| v as u32)
        .ok_or_else(|| {
            ApiError::new(
                "MissingParameter",
                StatusCode::BAD_REQUEST,
                "The request must contain the parameter VisibilityTimeout.",
            )
        })
}

async fn batch_of_handles(
    ctx: &Context<'_>,
    input: &Input<'_>,
    with_visibility: bool,
) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    let mut entries = Vec::new();
    let mut failed = Vec::new();
    for entry in batch_entries(input)? {
        let id = entry.str("Id")?.to_string();
        let handle = entry.str("ReceiptHandle")?.to_string();
        let seconds = if with_visibility {
            match visibility_of(&entry) {
                Ok(s) => Some(s),
                Err(e) => {
                    failed.push(failure(&id, &e));
                    continue;
                }
            }
        } else {
            None
        };
        entries.push((id, handle, seconds));
    }
    let make = if with_visibility {
        visibility_command
    } else {
        delete_command
    };
    let results = handle_entries(ctx, &queue, &entries, make).await?;
    let mut successful = Vec::new();
    for ((id, _, _), result) in entries.iter().zip(results) {
        match result {
            Ok(()) => successful.push(json!({ "Id": id })),
            Err(e) => failed.push(failure(id, &e)),
        }
    }
    Ok(reply([
        ("Successful", Value::Array(successful)),
        ("Failed", Value::Array(failed)),
    ]))
}

pub(super) async fn delete_message_batch(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    batch_of_handles(ctx, input, false).await
}

pub(super) async fn change_message_visibility_batch(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    batch_of_handles(ctx, input, true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_digests_match_what_aws_sdks_compute() {
        // The body digest of "hello" and an attribute digest computed by
        // the algorithm the AWS SDKs check against.
        assert_eq!(md5_hex(b"hello"), "5d41402abc4b2a76b9719d911017c592");
        let a = MessageAttribute {
            name: "a".into(),
            data_type: "String".into(),
            string_value: Some("b".into()),
            binary_value: Vec::new(),
        };
        let mut buf = Vec::new();
        buf.extend_from_slice(&[0, 0, 0, 1, b'a', 0, 0, 0, 6]);
        buf.extend_from_slice(b"String");
        buf.extend_from_slice(&[1, 0, 0, 0, 1, b'b']);
        assert_eq!(md5_of_attributes(&[a]), Some(md5_hex(&buf)));
        assert_eq!(md5_of_attributes(&[]), None);
    }

    #[test]
    fn selections_take_all_names_and_prefixes() {
        assert!(selected(&["All"], "x"));
        assert!(selected(&["a.*"], "a.b"));
        assert!(!selected(&["a.*"], "ab"));
        assert!(selected(&["x"], "x"));
        assert!(!selected(&[], "x"));
    }
}
