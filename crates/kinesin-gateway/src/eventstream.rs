//! The AWS event-stream framing of SubscribeToShard responses
//! (`application/vnd.amazon.eventstream`).
//!
//! Frame: total length u32 BE | headers length u32 BE | CRC32 of those 8
//! bytes | headers | payload | CRC32 of everything before. A header is
//! name length u8 | name | type u8 (7 = string) | value length u16 BE | value.

pub const CONTENT_TYPE: &str = "application/vnd.amazon.eventstream";

const STRING_HEADER: u8 = 7;

pub fn frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut head = Vec::new();
    for (name, value) in headers {
        head.push(name.len() as u8);
        head.extend_from_slice(name.as_bytes());
        head.push(STRING_HEADER);
        head.extend_from_slice(&(value.len() as u16).to_be_bytes());
        head.extend_from_slice(value.as_bytes());
    }
    let total = 12 + head.len() + payload.len() + 4;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(total as u32).to_be_bytes());
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    let prelude_crc = crc32fast::hash(&out);
    out.extend_from_slice(&prelude_crc.to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    let message_crc = crc32fast::hash(&out);
    out.extend_from_slice(&message_crc.to_be_bytes());
    out
}

/// An event of the stream: `event_type` names the member of the event
/// union (`initial-response`, `SubscribeToShardEvent`).
pub fn event(event_type: &str, content_type: &str, payload: &[u8]) -> Vec<u8> {
    frame(
        &[
            (":message-type", "event"),
            (":event-type", event_type),
            (":content-type", content_type),
        ],
        payload,
    )
}

/// An error that ends the stream.
pub fn exception(name: &str, content_type: &str, payload: &[u8]) -> Vec<u8> {
    frame(
        &[
            (":message-type", "exception"),
            (":exception-type", name),
            (":content-type", content_type),
        ],
        payload,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses one frame back, checking both CRCs.
    fn parse(frame: &[u8]) -> (Vec<(String, String)>, Vec<u8>) {
        let total = u32::from_be_bytes(frame[0..4].try_into().unwrap()) as usize;
        let head_len = u32::from_be_bytes(frame[4..8].try_into().unwrap()) as usize;
        assert_eq!(total, frame.len());
        assert_eq!(
            u32::from_be_bytes(frame[8..12].try_into().unwrap()),
            crc32fast::hash(&frame[..8])
        );
        assert_eq!(
            u32::from_be_bytes(frame[total - 4..].try_into().unwrap()),
            crc32fast::hash(&frame[..total - 4])
        );
        let mut headers = Vec::new();
        let mut pos = 12;
        while pos < 12 + head_len {
            let n = frame[pos] as usize;
            let name = String::from_utf8(frame[pos + 1..pos + 1 + n].to_vec()).unwrap();
            pos += 1 + n;
            assert_eq!(frame[pos], STRING_HEADER);
            let len = u16::from_be_bytes(frame[pos + 1..pos + 3].try_into().unwrap()) as usize;
            let value = String::from_utf8(frame[pos + 3..pos + 3 + len].to_vec()).unwrap();
            pos += 3 + len;
            headers.push((name, value));
        }
        (headers, frame[12 + head_len..total - 4].to_vec())
    }

    #[test]
    fn frames_carry_headers_payload_and_both_checksums() {
        let f = event(
            "SubscribeToShardEvent",
            "application/json",
            b"{\"Records\":[]}",
        );
        let (headers, payload) = parse(&f);
        assert_eq!(
            headers,
            vec![
                (":message-type".to_string(), "event".to_string()),
                (
                    ":event-type".to_string(),
                    "SubscribeToShardEvent".to_string()
                ),
                (":content-type".to_string(), "application/json".to_string()),
            ]
        );
        assert_eq!(payload, b"{\"Records\":[]}");
    }

    #[test]
    fn an_empty_frame_matches_the_published_prelude_checksum() {
        // The smallest message: no headers, no payload, 16 bytes in all.
        let f = frame(&[], b"");
        assert_eq!(&f[..8], &[0, 0, 0, 16, 0, 0, 0, 0]);
        assert_eq!(&f[8..12], &0x05c2_48ebu32.to_be_bytes());
        assert_eq!(&f[12..], &0x7d98_c8ffu32.to_be_bytes());
    }
}
