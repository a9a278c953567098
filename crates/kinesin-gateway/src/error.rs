//! Errors in the AWS shape: an error name, an HTTP status and a message.

use axum::http::StatusCode;
use kinesin_router::RouterError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The `__type` clients map to an exception class.
    pub name: &'static str,
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(name: &'static str, status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            name,
            status,
            message: message.into(),
        }
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new("ValidationException", StatusCode::BAD_REQUEST, message)
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new("InvalidArgumentException", StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            "ResourceNotFoundException",
            StatusCode::BAD_REQUEST,
            message,
        )
    }

    pub fn in_use(message: impl Into<String>) -> Self {
        Self::new("ResourceInUseException", StatusCode::BAD_REQUEST, message)
    }

    pub fn limit_exceeded(message: impl Into<String>) -> Self {
        Self::new("LimitExceededException", StatusCode::BAD_REQUEST, message)
    }

    pub fn serialization(message: impl Into<String>) -> Self {
        Self::new("SerializationException", StatusCode::BAD_REQUEST, message)
    }

    pub fn unknown_operation(message: impl Into<String>) -> Self {
        Self::new(
            "UnknownOperationException",
            StatusCode::BAD_REQUEST,
            message,
        )
    }
}

impl From<RouterError> for ApiError {
    fn from(e: RouterError) -> Self {
        let message = e.to_string();
        match e {
            RouterError::ResourceNotFound(_) => ApiError::not_found(message),
            RouterError::ResourceInUse(_) => ApiError::in_use(message),
            RouterError::InvalidArgument(_) => ApiError::invalid_argument(message),
            RouterError::LimitExceeded(_) => ApiError::limit_exceeded(message),
            RouterError::Throttled(_) => ApiError::new(
                "ProvisionedThroughputExceededException",
                StatusCode::BAD_REQUEST,
                message,
            ),
            // SDKs retry 503 ServiceUnavailable with backoff.
            RouterError::Unavailable(_)
            | RouterError::NotLeader(_)
            | RouterError::ShardClosed(_) => ApiError::new(
                "ServiceUnavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                message,
            ),
            RouterError::Internal(_) | RouterError::Indeterminate(_) => ApiError::new(
                "InternalFailure",
                StatusCode::INTERNAL_SERVER_ERROR,
                message,
            ),
        }
    }
}
