//! Turning AWS SDK errors into diagnostics that name the resource and the failed operation.
//!
//! Throttling and transient errors are retried by the SDK's standard retry mode (exponential
//! backoff with jitter, budget from the provider's `max_retries`), so by the time an error
//! reaches here retrying has already been tried.

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata};

use crate::framework::Diagnostics;

/// What kind of failure an AWS error code stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    AccessDenied,
    BadCredentials,
    Throttled,
    Other,
}

pub fn classify(code: Option<&str>) -> ErrorKind {
    let Some(code) = code else {
        return ErrorKind::Other;
    };
    if code.contains("AccessDenied")
        || code == "UnauthorizedOperation"
        || code == "AuthorizationError"
    {
        ErrorKind::AccessDenied
    } else if matches!(
        code,
        "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "InvalidSignatureException"
            | "ExpiredToken"
            | "ExpiredTokenException"
    ) {
        ErrorKind::BadCredentials
    } else if code.contains("Throttl")
        || code == "RequestLimitExceeded"
        || code == "TooManyRequestsException"
    {
        ErrorKind::Throttled
    } else {
        ErrorKind::Other
    }
}

/// A diagnostic for a failed AWS call on `resource` (e.g. `agentplane_queue "jobs"`).
pub fn diag<E>(err: &E, resource: &str, op: &str) -> Diagnostics
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let code = err.code();
    let message = err.message().unwrap_or("");
    match classify(code) {
        ErrorKind::AccessDenied => Diagnostics::single(
            format!("Access denied to {resource}"),
            format!(
                "AWS denied {op} for {resource}: {message}\nGrant the provider's credentials permission for {op}, or use a profile/role that has it."
            ),
        ),
        ErrorKind::BadCredentials => Diagnostics::single(
            format!("Invalid AWS credentials for {resource}"),
            format!(
                "AWS rejected the credentials during {op}: {message}\nCheck the provider's credentials (profile, static keys or environment)."
            ),
        ),
        ErrorKind::Throttled => Diagnostics::single(
            format!("AWS kept throttling {op} for {resource}"),
            format!(
                "{op} was still throttled after the retry budget was spent: {message}\nRaise the provider's `max_retries` or reduce -parallelism."
            ),
        ),
        ErrorKind::Other => Diagnostics::single(
            format!("{op} failed for {resource}"),
            format!("{}", DisplayErrorContext(err)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(
            classify(Some("AccessDeniedException")),
            ErrorKind::AccessDenied
        );
        assert_eq!(classify(Some("AccessDenied")), ErrorKind::AccessDenied);
        assert_eq!(classify(Some("ThrottlingException")), ErrorKind::Throttled);
        assert_eq!(classify(Some("RequestThrottled")), ErrorKind::Throttled);
        assert_eq!(
            classify(Some("InvalidClientTokenId")),
            ErrorKind::BadCredentials
        );
        assert_eq!(classify(Some("QueueDoesNotExist")), ErrorKind::Other);
        assert_eq!(classify(None), ErrorKind::Other);
    }
}
