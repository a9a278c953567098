#![no_main]

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use kinesin_gateway::fuzzing::{sdk_signed, ACCESS_KEY, NOW, SECRET_KEY};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// What SDKs escape in path labels and query parameters: all but RFC 3986's
/// unreserved characters.
const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Headers the signer or the transport sets, not the caller.
const OWN: [&str; 5] = [
    "authorization",
    "host",
    "x-amz-date",
    "x-amz-content-sha256",
    "x-amz-security-token",
];

type Input = (
    bool,
    Vec<String>,
    Vec<(String, String)>,
    Vec<(String, String)>,
    Vec<u8>,
);

// A request built as an SDK builds one (escaped path labels and query
// parameters, any header values, any body), signed by the SDKs' signer,
// must be accepted.
libfuzzer_sys::fuzz_target!(|input: Input| {
    let (get, labels, query, extra, body) = input;
    let method = if get { Method::GET } else { Method::POST };
    let mut target: String = labels
        .iter()
        .map(|l| format!("/{}", utf8_percent_encode(l, ESCAPED)))
        .collect();
    if target.is_empty() {
        target.push('/');
    }
    if !query.is_empty() {
        let pairs: Vec<String> = query
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    utf8_percent_encode(k, ESCAPED),
                    utf8_percent_encode(v, ESCAPED)
                )
            })
            .collect();
        target = format!("{target}?{}", pairs.join("&"));
    }
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("localhost:4567"));
    for (name, value) in &extra {
        // Clients disagree on tabs in header values (botocore folds them
        // into a space as this server does, aws-sigv4 keeps them), and
        // HTTP servers strip them at either end; SDK requests hold none.
        if value.contains('\t') {
            continue;
        }
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()),
            HeaderValue::from_str(value),
        ) else {
            continue;
        };
        if !OWN.contains(&name.as_str()) {
            headers.append(name, value);
        }
    }
    let Ok(signable_headers) = headers
        .iter()
        .map(|(n, v)| v.to_str().map(|v| (n.as_str(), v)))
        .collect::<Result<Vec<_>, _>>()
    else {
        return;
    };
    let identity = Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "fuzz").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name("kinesis")
        .time(SystemTime::UNIX_EPOCH + NOW)
        .settings(SigningSettings::default())
        .build()
        .expect("signing parameters")
        .into();
    let url = format!("http://localhost:4567{target}");
    let signable = SignableRequest::new(
        method.as_str(),
        url.as_str(),
        signable_headers.into_iter(),
        SignableBody::Bytes(&body),
    )
    .expect("a request the SDK can sign");
    let (instructions, _) = sign(signable, &params).expect("signed").into_parts();
    for (name, value) in instructions.headers() {
        headers.insert(
            HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
            HeaderValue::from_str(value).expect("a header value"),
        );
    }
    let uri: Uri = target.parse().expect("an escaped request target");
    sdk_signed(&method, &uri, &headers, &body, "kinesis");
});
