//! The AWS services the gateway answers, each declared once: how a request
//! is recognised, how it is signed, the protocols it speaks, its one
//! operation table (which dispatch, metric labels and the admin endpoint's
//! pre-registered series all read) and its error table.
//!
//! A JSON or CBOR request names its service and operation in `X-Amz-Target`;
//! a query request (form-encoded, no target) names its operation in the
//! `Action` field and its service by the SigV4 credential scope.

use axum::http::StatusCode;

use crate::codec::Protocol;
use crate::error::ApiError;
use crate::query::{QueryShape, FORM_CONTENT_TYPE};

#[derive(Debug)]
pub struct Service {
    /// The `service` label of metrics.
    pub name: &'static str,
    /// The service of the SigV4 credential scope.
    pub signing_name: &'static str,
    /// `X-Amz-Target` starts with this (dot included) for its operations.
    pub target_prefix: &'static str,
    /// The protocols the service speaks; the first is its answer to a
    /// request whose content type names none of them.
    pub protocols: &'static [Protocol],
    /// Every operation, in the order of its table.
    pub operations: &'static [&'static str],
    /// How query answers are written, for a service that speaks awsQuery.
    pub query: Option<QueryShape>,
    /// Errors whose query code differs from their name
    /// (`QueueDoesNotExist` → `AWS.SimpleQueueService.NonExistentQueue`).
    pub query_errors: &'static [(&'static str, &'static str)],
    /// A JSON service that SDKs built for its query protocol still call:
    /// its errors also carry `x-amzn-query-error: <query code>;<fault>`.
    pub query_compatible: bool,
}

impl Service {
    /// The operation a target names, as the table spells it (a label with
    /// bounded values).
    pub fn operation(&self, name: &str) -> Option<&'static str> {
        self.operations.iter().find(|op| **op == name).copied()
    }

    /// The protocol of a request with this content type.
    pub fn protocol(&self, content_type: Option<&str>) -> Protocol {
        let first = self.protocols[0];
        content_type
            .and_then(|ct| {
                self.protocols
                    .iter()
                    .find(|p| ct.starts_with(p.content_type()))
            })
            .copied()
            .unwrap_or(first)
    }

    /// The code a query client knows an error by.
    pub fn query_code(&self, name: &'static str) -> &'static str {
        self.query_errors
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(name, |(_, code)| code)
    }
}

/// Every service of the endpoint.
pub const SERVICES: &[&Service] = &[
    &crate::kinesis::SERVICE,
    &crate::sqs::SERVICE,
    &crate::firehose::SERVICE,
];

/// The service and operation an `X-Amz-Target` header names.
pub fn recognise(target: &str) -> Option<(&'static Service, &str)> {
    SERVICES.iter().find_map(|service| {
        target
            .strip_prefix(service.target_prefix)
            .map(|op| (*service, op))
    })
}

/// The service a request without `X-Amz-Target` is for: a form-encoded
/// query request, for the query service its credential scope names (or,
/// unsigned, the only query service).
pub fn recognise_query(
    content_type: Option<&str>,
    signing_name: Option<&str>,
) -> Result<&'static Service, ApiError> {
    let no_target = || {
        ApiError::unknown_operation(
            "the request has no X-Amz-Target header naming an operation, and is not a form-encoded query request",
        )
    };
    if !content_type.is_some_and(|ct| ct.starts_with(FORM_CONTENT_TYPE)) {
        return Err(no_target());
    }
    let query_services: Vec<&'static Service> = SERVICES
        .iter()
        .copied()
        .filter(|s| s.protocols.contains(&Protocol::Query))
        .collect();
    let refuse = |message: String| ApiError::new("InvalidAction", StatusCode::BAD_REQUEST, message);
    match (signing_name, query_services.as_slice()) {
        (Some(name), services) => services
            .iter()
            .find(|s| s.signing_name == name)
            .copied()
            .ok_or_else(|| refuse(format!("this endpoint has no query service '{name}'"))),
        (None, [only]) => Ok(only),
        (None, []) => Err(refuse(
            "no service of this endpoint speaks the query protocol".to_string(),
        )),
        (None, _) => Err(refuse(
            "a query request must be signed: its credential scope names the service".to_string(),
        )),
    }
}

/// Declares a service's operation table once: `OPERATIONS` (the names, in
/// table order) and `call`, which runs the one a request names. Each entry
/// is an expression in the request's context and input, named by the first
/// two arguments.
macro_rules! operation_table {
    ($context:ty, $ctx:ident, $input:ident; $($name:literal => $handler:expr,)*) => {
        /// Every operation this endpoint answers.
        pub const OPERATIONS: &[&str] = &[$($name),*];

        /// Runs `operation` on a request body decoded from `protocol`.
        pub async fn call(
            $ctx: &$context,
            operation: &str,
            body: &serde_json::Value,
            protocol: $crate::codec::Protocol,
        ) -> Result<serde_json::Value, $crate::error::ApiError> {
            let input = $crate::input::Input::decoded(body, protocol)?;
            let $input = &input;
            match operation {
                $($name => $handler,)*
                other => Err(unsupported(other)),
            }
        }
    };
}

pub(crate) use operation_table;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_names_its_service_and_operation() {
        let (service, op) = recognise("Kinesis_20131202.PutRecord").unwrap();
        assert_eq!(service.name, "kinesis");
        assert_eq!(service.operation(op), Some("PutRecord"));
        assert_eq!(service.operation("Nope"), None);
        let (service, op) = recognise("AmazonSQS.SendMessage").unwrap();
        assert_eq!((service.name, op), ("sqs", "SendMessage"));
        assert!(recognise("AmazonSNS.Publish").is_none());
        assert!(recognise("").is_none());
    }

    #[test]
    fn the_protocol_follows_the_content_type() {
        let kinesis = &crate::kinesis::SERVICE;
        assert_eq!(
            kinesis.protocol(Some("application/x-amz-cbor-1.1")),
            Protocol::Cbor
        );
        assert_eq!(
            kinesis.protocol(Some("application/x-amz-json-1.1; charset=utf-8")),
            Protocol::Json11
        );
        assert_eq!(kinesis.protocol(None), Protocol::Json11);
    }

    #[test]
    fn every_service_is_declared_consistently() {
        for service in SERVICES {
            assert_eq!(
                service.query.is_some(),
                service.protocols.contains(&Protocol::Query),
                "{}: a query shape exactly when it speaks awsQuery",
                service.name
            );
            assert!(service.target_prefix.ends_with('.'), "{}", service.name);
        }
    }

    #[test]
    fn a_request_without_target_must_be_a_form_for_a_query_service() {
        let e = recognise_query(None, None).unwrap_err();
        assert_eq!(e.name, "UnknownOperationException");
        // Kinesis speaks no query protocol.
        let e = recognise_query(Some(FORM_CONTENT_TYPE), Some("kinesis")).unwrap_err();
        assert_eq!(e.name, "InvalidAction");
        // Unsigned, the one query service (SQS) is meant.
        let service = recognise_query(Some(FORM_CONTENT_TYPE), None).unwrap();
        assert_eq!(service.name, "sqs");
        let service = recognise_query(Some(FORM_CONTENT_TYPE), Some("sqs")).unwrap();
        assert_eq!(service.name, "sqs");
        // Without an entry in the error table, the query code is the name.
        assert_eq!(
            crate::kinesis::SERVICE.query_code("ResourceNotFoundException"),
            "ResourceNotFoundException"
        );
    }
}
