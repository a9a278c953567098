//! The checks hostile input must pass, shared by the random-input property
//! tests (`robustness`) and the coverage-guided fuzz targets (`fuzz/`, built
//! with `--cfg fuzzing`). Each panics on a violation: any bytes decode or are
//! refused with an error in the AWS shape, never a panic or a server error.

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderValue, Method, Uri};
use base64::Engine;

use crate::auth::{self, Credential, Scope, SignedRequest};
use crate::codec::Protocol;
use crate::iterator::{self, PageToken, ShardIterator, Token};

const PROTOCOLS: [Protocol; 4] = [
    Protocol::Json10,
    Protocol::Json11,
    Protocol::Cbor,
    Protocol::Query,
];

/// A request body in every protocol decodes to an object or is refused with
/// a 4xx.
pub fn request_body(body: &[u8]) {
    for protocol in PROTOCOLS {
        match protocol.decode(body) {
            Ok(decoded) => assert!(decoded.input.is_object(), "{protocol:?}: not an object"),
            Err(e) => assert!(
                e.status.is_client_error(),
                "{protocol:?}: {} {}",
                e.status,
                e.message
            ),
        }
    }
}

const KEY: [u8; 32] = [7; 32];

/// Iterator and page-token texts: `bytes` as the text itself, as an
/// unsigned token's body, as a body with a random tag, and as a body
/// correctly signed with the node's key (so that what follows the tag check
/// is reached too). Each decodes or is refused as invalid; without a key a
/// signed one may instead be refused for a retry.
pub fn token(bytes: &[u8]) {
    token_of::<ShardIterator>(bytes, "ShardIterator");
    token_of::<PageToken>(bytes, "NextToken");
}

fn token_of<T: Token>(bytes: &[u8], what: &str) {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut texts = vec![
        b64(&[&[1][..], bytes].concat()),
        b64(&[&[2][..], bytes].concat()),
        b64(&iterator::signed_body::<T>(&KEY, bytes)),
    ];
    if let Ok(text) = std::str::from_utf8(bytes) {
        texts.push(text.to_string());
    }
    for text in &texts {
        for key in [Some(&KEY[..]), None] {
            if let Err(e) = iterator::decode::<T>(text, what, key) {
                let retry = key.is_none() && e.name == "ServiceUnavailable";
                assert!(
                    e.name == "InvalidArgumentException" || retry,
                    "{what} {text:?}: {}",
                    e.name
                );
            }
        }
    }
}

/// The key pair the SigV4 checks know, for a signer outside this crate.
pub const ACCESS_KEY: &str = "AKIDTEST";
pub const SECRET_KEY: &str = "secret";
/// The time the SigV4 checks run at (2025-12-02T00:00:00Z).
pub const NOW: Duration = Duration::from_secs(1_764_633_600);

fn credentials() -> Vec<Credential> {
    vec![Credential {
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: SECRET_KEY.into(),
        account_id: "123456789012".into(),
    }]
}

/// SigV4 headers: none is a valid signature, so each is refused with a 4xx,
/// by the check before the body is read and by the whole check after.
pub fn signature_headers(authorization: &str, date: &str, sha: Option<&str>) {
    let credentials = credentials();
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("localhost"));
    for (name, value) in [
        ("authorization", Some(authorization)),
        ("x-amz-date", Some(date)),
        ("x-amz-content-sha256", sha),
    ] {
        // Bytes no HTTP parser would pass on do not reach the check.
        if let Some(Ok(value)) = value.map(HeaderValue::from_str) {
            headers.insert(name, value);
        }
    }
    let uri: Uri = "/".parse().unwrap();
    let request = SignedRequest {
        method: &Method::POST,
        uri: &uri,
        headers: &headers,
        body: b"{}",
    };
    let scope = Scope {
        service: "kinesis",
        region: "us-east-1",
    };
    let now = SystemTime::UNIX_EPOCH + NOW;
    let refused = auth::authenticate(&credentials, &request, scope, now).unwrap_err();
    assert!(refused.status.is_client_error(), "{}", refused.message);
    if let Err(e) = auth::precheck(&credentials, &headers, scope, now) {
        assert!(e.status.is_client_error(), "{}", e.message);
    }
}

/// A request the AWS SDKs' signer (aws-sigv4, in a fuzz target) signed for
/// `service` with [`ACCESS_KEY`] at [`NOW`] is accepted, whatever its
/// method, path, query, headers and body: the canonical request this server
/// builds is the one clients sign.
pub fn sdk_signed(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8], service: &str) {
    let scope = Scope {
        service,
        region: "us-east-1",
    };
    let now = SystemTime::UNIX_EPOCH + NOW;
    let request = SignedRequest {
        method,
        uri,
        headers,
        body,
    };
    // `authenticate` makes the checks of `precheck` first.
    if let Err(e) = auth::authenticate(&credentials(), &request, scope, now) {
        panic!("{method} {uri} {headers:?} refused: {}", e.message);
    }
}

/// [`signature_headers`] of one input: its lines are the authorization
/// header, the date and the content hash.
pub fn signature_input(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.split('\n');
    let authorization = lines.next().unwrap_or_default();
    let date = lines.next().unwrap_or_default();
    signature_headers(authorization, date, lines.next());
}
