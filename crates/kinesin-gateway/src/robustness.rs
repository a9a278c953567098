//! Property tests of the decoders hostile input reaches first: request
//! bodies in every protocol, SigV4 headers and shard iterators, with the
//! checks of [`crate::fuzzing`] (which the coverage-guided fuzz targets
//! run too).

use proptest::prelude::*;

use crate::fuzzing;

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

proptest! {
    #[test]
    fn any_body_decodes_to_an_object_or_a_client_error(
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        fuzzing::request_body(&body);
    }

    #[test]
    fn a_mutated_valid_body_decodes_to_an_object_or_a_client_error(body in mutated()) {
        fuzzing::request_body(&body);
    }

    #[test]
    fn any_iterator_or_token_text_is_refused_or_decoded(
        text in "[A-Za-z0-9+/=]{0,200}",
        bytes in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        fuzzing::token(text.as_bytes());
        fuzzing::token(&bytes);
    }

    #[test]
    fn any_signature_headers_are_refused_with_a_client_error(
        authorization in "(AWS4-HMAC-SHA256 )?(Credential=)?(AKIDTEST)?[/a-z0-9_,; =-]{0,80}(SignedHeaders=)?[a-z;-]{0,30}(, Signature=)?[0-9a-f]{0,64}",
        date in "[0-9TZ]{0,20}",
        sha in prop::option::of("[0-9a-zA-Z-]{0,64}"),
    ) {
        fuzzing::signature_headers(&authorization, &date, sha.as_deref());
    }
}
