//! Property tests of the decoders hostile input reaches first: request
//! bodies in every protocol, SigV4 headers and shard iterators. Any bytes
//! must decode or be refused with an error in the AWS shape, never panic;
//! bodies that decode are objects.

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderValue, Method, Uri};
use proptest::prelude::*;

use crate::auth::{self, Credential, Scope, SignedRequest};
use crate::codec::Protocol;
use crate::iterator::{self, PageToken, ShardIterator};

const PROTOCOLS: [Protocol; 4] = [
    Protocol::Json10,
    Protocol::Json11,
    Protocol::Cbor,
    Protocol::Query,
];

/// Valid bodies of each kind, for mutation.
fn seeds() -> Vec<Vec<u8>> {
    let json = br#"{"StreamName":"s","Records":[{"Data":"AAE=","PartitionKey":"k"}],"Limit":5}"#;
    use ciborium::Value as Cbor;
    let record = Cbor::Map(vec![
        (Cbor::Text("Data".into()), Cbor::Bytes(vec![0, 1])),
        (Cbor::Text("PartitionKey".into()), Cbor::Text("k".into())),
        (
            Cbor::Text("At".into()),
            Cbor::Tag(1, Box::new(Cbor::Integer(1_700_000_000_000_i64.into()))),
        ),
    ]);
    let value = Cbor::Map(vec![(
        Cbor::Text("Records".into()),
        Cbor::Array(vec![record]),
    )]);
    let mut cbor = Vec::new();
    ciborium::into_writer(&value, &mut cbor).unwrap();
    let form = b"Action=SendMessageBatch&QueueUrl=u&SendMessageBatchRequestEntry.1.Id=a&SendMessageBatchRequestEntry.1.MessageBody=b".to_vec();
    vec![json.to_vec(), cbor, form]
}

/// A valid body with bytes replaced, inserted or cut.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(seeds()),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    )
        .prop_map(|(mut body, edits)| {
            for (at, byte, kind) in edits {
                if body.is_empty() {
                    body.push(byte);
                    continue;
                }
                let k = at.index(body.len());
                match kind {
                    0 => body[k] = byte,
                    1 => body.insert(k, byte),
                    _ => body.truncate(k),
                }
            }
            body
        })
}

fn check_decode(body: &[u8]) -> Result<(), TestCaseError> {
    for protocol in PROTOCOLS {
        match protocol.decode(body) {
            Ok(decoded) => prop_assert!(decoded.input.is_object()),
            Err(e) => prop_assert!(e.status.is_client_error(), "{:?}: {}", protocol, e.message),
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn any_body_decodes_to_an_object_or_a_client_error(
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        check_decode(&body)?;
    }

    #[test]
    fn a_mutated_valid_body_decodes_to_an_object_or_a_client_error(body in mutated()) {
        check_decode(&body)?;
    }

    #[test]
    fn any_iterator_or_token_text_is_refused_or_decoded(
        text in "[A-Za-z0-9+/=]{0,200}",
        bytes in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        use base64::Engine;
        let with = |first: u8| base64::engine::general_purpose::STANDARD.encode([&[first][..], &bytes].concat());
        for t in [&text, &with(1), &with(2)] {
            // Without a key, a signed token is refused for a retry.
            for key in [Some(&[7u8; 32][..]), None] {
                let allowed = |name: &str| {
                    name == "InvalidArgumentException" || (key.is_none() && name == "ServiceUnavailable")
                };
                if let Err(e) = iterator::decode::<ShardIterator>(t, "ShardIterator", key) {
                    prop_assert!(allowed(e.name), "{}", e.name);
                }
                if let Err(e) = iterator::decode::<PageToken>(t, "NextToken", key) {
                    prop_assert!(allowed(e.name), "{}", e.name);
                }
            }
        }
    }

    #[test]
    fn any_signature_headers_are_refused_with_a_client_error(
        authorization in "(AWS4-HMAC-SHA256 )?(Credential=)?(AKIDTEST)?[/a-z0-9_,; =-]{0,80}(SignedHeaders=)?[a-z;-]{0,30}(, Signature=)?[0-9a-f]{0,64}",
        date in "[0-9TZ]{0,20}",
        sha in prop::option::of("[0-9a-zA-Z-]{0,64}"),
    ) {
        let credentials = vec![Credential {
            access_key_id: "AKIDTEST".into(),
            secret_access_key: "secret".into(),
            account_id: "123456789012".into(),
        }];
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("localhost"));
        let value = |s: &str| HeaderValue::from_str(s).unwrap();
        headers.insert("authorization", value(&authorization));
        headers.insert("x-amz-date", value(&date));
        if let Some(sha) = &sha {
            headers.insert("x-amz-content-sha256", value(sha));
        }
        let uri: Uri = "/".parse().unwrap();
        let request = SignedRequest { method: &Method::POST, uri: &uri, headers: &headers, body: b"{}" };
        let scope = Scope { service: "kinesis", region: "us-east-1" };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_633_600);
        // Nothing random is a valid signature: every one is refused.
        let refused = auth::authenticate(&credentials, &request, scope, now).unwrap_err();
        prop_assert!(refused.status.is_client_error(), "{}", refused.message);
        if let Err(e) = auth::precheck(&credentials, &headers, scope, now) {
            prop_assert!(e.status.is_client_error(), "{}", e.message);
        }
    }
}
