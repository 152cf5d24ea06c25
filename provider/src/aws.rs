//! Turning AWS SDK errors into diagnostics that name the resource and the failed operation.
//!
//! Throttling and transient errors are retried by the SDK's standard retry mode (exponential
//! backoff with jitter, budget from the provider's `max_retries`), so by the time an error
//! reaches here retrying has already been tried.

use aws_sdk_sqs::error::{ConnectorError, DisplayErrorContext, ProvideErrorMetadata};

use crate::framework::Diagnostics;
use crate::timeouts;

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

/// Display of the SDK's `SdkError::TimeoutError` (an operation or attempt timeout); its
/// payload type is private to the SDK runtime, so the variant is recognised by this text.
const SDK_TIMEOUT: &str = "request has timed out";

/// Whether a failed call ran out of time: the SDK's operation/attempt timeout, or the HTTP
/// client's connect/read timeout (a timeout `ConnectorError` somewhere in the chain).
pub fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    if err.to_string() == SDK_TIMEOUT {
        return true;
    }
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<ConnectorError>()
            .is_some_and(ConnectorError::is_timeout)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A diagnostic for a failed AWS call on `resource` (e.g. `agentplane_queue "jobs"`).
pub fn diag<E>(err: &E, resource: &str, op: &str) -> Diagnostics
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if is_timeout(err) {
        return Diagnostics::single(
            format!("AWS did not answer {op} for {resource} in time"),
            format!(
                "{}\nCheck that the endpoint is up and reachable, or raise `{}`, `{}` or `{}` in the provider block.",
                DisplayErrorContext(err),
                timeouts::CONNECT,
                timeouts::READ,
                timeouts::OPERATION,
            ),
        );
    }
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
