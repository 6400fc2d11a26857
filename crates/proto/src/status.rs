//! [`ErrorCode`]s across gRPC: every site service returns its errors with
//! the code in the `chipsite-code` metadata, and every caller reads it back
//! with [`code_of`]. Internal faults reach callers as a generic message; the
//! detail is logged where it happened ([`internal`]).

pub use chipsite_model::{CODE_METADATA, ErrorCode};
use tonic::{Code, Status, metadata::MetadataMap};

/// The gRPC code an error code travels with.
pub fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::LockedDown | ErrorCode::Sealed | ErrorCode::NoSiteKey | ErrorCode::FailedPrecondition => {
            Code::FailedPrecondition
        }
        ErrorCode::WrongPassphrase | ErrorCode::Refused | ErrorCode::Forbidden => Code::PermissionDenied,
        ErrorCode::Throttled => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Internal => Code::Internal,
    }
}

/// A status carrying `code` (in its metadata) and `message`.
pub fn status(code: ErrorCode, message: impl Into<String>) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert(
        CODE_METADATA,
        tonic::metadata::MetadataValue::from_static(code.as_str()),
    );
    Status::with_metadata(grpc_code(code), message, metadata)
}

/// An internal fault: logged here with its whole chain of sources, sent
/// to the caller as "internal error" only.
pub fn internal(error: &(dyn std::error::Error + 'static)) -> Status {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    tracing::error!(error = %chain, "internal error");
    status(ErrorCode::Internal, "internal error")
}

/// The code of a status: the one a site service put in its metadata, else
/// one derived from its gRPC code (a status made by the transport: an
/// unreachable service, a deadline).
pub fn code_of(s: &Status) -> ErrorCode {
    if let Some(code) = s
        .metadata()
        .get(CODE_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorCode::parse)
    {
        return code;
    }
    match s.code() {
        Code::InvalidArgument => ErrorCode::InvalidArgument,
        Code::NotFound => ErrorCode::NotFound,
        Code::AlreadyExists => ErrorCode::AlreadyExists,
        Code::PermissionDenied | Code::Unauthenticated => ErrorCode::Forbidden,
        Code::ResourceExhausted => ErrorCode::Throttled,
        Code::FailedPrecondition => ErrorCode::FailedPrecondition,
        Code::Unavailable | Code::DeadlineExceeded => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_code_survives_the_trip_through_http_headers() {
        for code in ErrorCode::ALL {
            let sent = status(code, "why");
            // What a client sees: the status rebuilt from the HTTP response.
            let http = sent.into_http::<()>();
            let received = Status::from_header_map(http.headers()).unwrap();
            assert_eq!(code_of(&received), code);
            assert_eq!(received.code(), grpc_code(code));
        }
        // A transport status carries no code: it is derived.
        assert_eq!(
            code_of(&Status::unavailable("connection refused")),
            ErrorCode::Unavailable
        );
    }

    #[test]
    fn internal_faults_keep_their_detail_out_of_the_status() {
        let fault = std::io::Error::other("password=hunter2 in a connection string");
        let s = internal(&fault);
        assert_eq!(s.message(), "internal error");
        assert_eq!(code_of(&s), ErrorCode::Internal);
    }
}
