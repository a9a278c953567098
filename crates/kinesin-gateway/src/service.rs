//! The AWS services the gateway answers, each declared once: how a request
//! is recognised, how it is signed, the protocols it speaks, and its one
//! operation table, which dispatch, metric labels and the admin endpoint's
//! pre-registered series all read.

use crate::codec::Protocol;

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
}

/// Every service of the endpoint.
pub const SERVICES: &[&Service] = &[&crate::kinesis::SERVICE];

/// The service and operation an `X-Amz-Target` header names.
pub fn recognise(target: &str) -> Option<(&'static Service, &str)> {
    SERVICES.iter().find_map(|service| {
        target
            .strip_prefix(service.target_prefix)
            .map(|op| (*service, op))
    })
}

/// Declares a service's operation table once: `OPERATIONS` (the names, in
/// table order) and `call`, which runs the one a request names. Each entry
/// is an expression in the request's context and input, named by the first
/// two arguments.
macro_rules! operation_table {
    ($context:ty, $ctx:ident, $input:ident; $($name:literal => $handler:expr,)*) => {
        /// Every operation this endpoint answers.
        pub const OPERATIONS: &[&str] = &[$($name),*];

        /// Runs `operation` on a decoded request body.
        pub async fn call(
            $ctx: &$context,
            operation: &str,
            body: &serde_json::Value,
        ) -> Result<serde_json::Value, $crate::error::ApiError> {
            let input = $crate::input::Input::new(body)?;
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
        assert!(recognise("AmazonSQS.SendMessage").is_none());
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
            Protocol::Json
        );
        assert_eq!(kinesis.protocol(None), Protocol::Json);
    }
}
