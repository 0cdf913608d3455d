//! Between micro's errors and gRPC statuses, keeping whether a retry is safe.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use http::StatusCode;
use tonic::{Code, Status};

use crate::error::{BoxError, Permanent, Retryable, Transient};
use crate::resilience::{BulkheadFull, CircuitOpen, Elapsed};

/// The metadata key by which a server tells a client when to retry: milliseconds, or a
/// negative number for "do not retry" (gRPC's retry design, A6).
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// The server's retry pushback of `status`: `Some(Ok(delay))` to retry after `delay`,
/// `Some(Err(()))` when it said not to retry, `None` when it said nothing.
fn pushback(status: &Status) -> Option<Result<Duration, ()>> {
    let value = status.metadata().get(RETRY_PUSHBACK)?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(Duration::from_millis)
            .ok_or(()),
    )
}

/// Whether a failed call that ended with `status` may be tried again, its request being
/// safe to repeat: `UNAVAILABLE` unless the server pushed back with a negative delay, and
/// `RESOURCE_EXHAUSTED` only when the server sent a pushback delay.
impl Retryable for Status {
    fn is_retryable(&self) -> bool {
        match self.code() {
            Code::Unavailable => !matches!(pushback(self), Some(Err(()))),
            Code::ResourceExhausted => matches!(pushback(self), Some(Ok(_))),
            _ => false,
        }
    }
}

/// The gRPC code of an HTTP status, as a service answering in HTTP means it: `400`
/// `INVALID_ARGUMENT`, `401` `UNAUTHENTICATED`, `403` `PERMISSION_DENIED`, `404`
/// `NOT_FOUND`, `409` `ABORTED`, `412` `FAILED_PRECONDITION`, `413` and `429`
/// `RESOURCE_EXHAUSTED`,
/// `499` `CANCELLED`, `501` `UNIMPLEMENTED`, `502`/`503` `UNAVAILABLE`, `504`
/// `DEADLINE_EXCEEDED`, other `4xx` `FAILED_PRECONDITION`, other `5xx` `INTERNAL`; `2xx`
/// is `OK` and anything else `UNKNOWN`.
pub fn code_from_http(status: StatusCode) -> Code {
    match status.as_u16() {
        200..=299 => Code::Ok,
        400 | 414 | 422 => Code::InvalidArgument,
        413 | 429 => Code::ResourceExhausted,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::Aborted,
        412 => Code::FailedPrecondition,
        499 => Code::Cancelled,
        501 => Code::Unimplemented,
        502 | 503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        402 | 405..=499 => Code::FailedPrecondition,
        500..=599 => Code::Internal,
        _ => Code::Unknown,
    }
}

/// The HTTP status that answers for a gRPC code (as gRPC-Gateway and Envoy's transcoder
/// map them): the inverse of [`code_from_http`] for the codes it yields.
pub fn http_from_code(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status code"),
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The canonical name of a code, as in metric labels and the gRPC specification: `OK`,
/// `NOT_FOUND`, `UNAVAILABLE`, ...
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The status a failed call answers with, from micro's error kinds, keeping whether a
/// retry is safe:
///
/// | error | status |
/// |---|---|
/// | a [`Status`] or a [`CallError`] (anywhere in the chain) | that status |
/// | [`CircuitOpen`] | `UNAVAILABLE` with a pushback of `-1`: do not retry |
/// | [`BulkheadFull`] | `RESOURCE_EXHAUSTED` with a pushback of `0`: retry |
/// | [`Elapsed`] | `DEADLINE_EXCEEDED` |
/// | [`client::Error`](crate::client::Error) | by kind: `Connect` `UNAVAILABLE`, `Timeout` `DEADLINE_EXCEEDED`, `Status` by [`code_from_http`], `CircuitOpen` as above |
/// | any other retryable error ([`is_retryable`](crate::error::is_retryable)) | `UNAVAILABLE` |
/// | anything else | `INTERNAL` |
///
/// A [`Permanent`] error that would map to `UNAVAILABLE` gets a pushback of `-1`. The
/// message is the error's own for the kinds above, and `internal error` otherwise, so no
/// internals leak to the caller; log the error itself.
pub fn status_from_error(err: &(dyn StdError + 'static)) -> Status {
    if let Some(call) = find_call_error(err) {
        // Its own verdict: whether a new call is safe, which its retry flag (this
        // channel's) may not say.
        return Status::from(CallError {
            status: clone_status(&call.status),
            retryable: call.retryable,
            repeatable: call.repeatable,
            instance_failure: call.instance_failure,
            source: None,
        });
    }
    let retryable = crate::error::is_retryable(err);
    let mut status = known_status(err).unwrap_or_else(|| {
        if retryable {
            Status::unavailable("the service is unavailable")
        } else {
            Status::internal("internal error")
        }
    });
    if !retryable && status.code() == Code::Unavailable && pushback(&status).is_none() {
        no_retry(&mut status);
    }
    status
}

fn no_retry(status: &mut Status) {
    status.metadata_mut().insert(
        RETRY_PUSHBACK,
        tonic::metadata::MetadataValue::from_static("-1"),
    );
}

/// The nearest [`CallError`] of `err`'s chain, unless a status or a retry marker (whose
/// verdict wins) comes first.
fn find_call_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a CallError> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(call) = err.downcast_ref::<CallError>() {
            return Some(call);
        }
        if err.is::<Status>() || err.is::<Transient>() || err.is::<Permanent>() {
            return None;
        }
        next = err.source();
    }
    None
}

/// The nearest error of `err`'s chain that names a status.
fn known_status(err: &(dyn StdError + 'static)) -> Option<Status> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(status) = err.downcast_ref::<Status>() {
            return Some(clone_status(status));
        }
        if let Some(call) = err.downcast_ref::<CallError>() {
            return Some(clone_status(&call.status));
        }
        if let Some(open) = err.downcast_ref::<CircuitOpen>() {
            let mut status = Status::unavailable(open.to_string());
            no_retry(&mut status);
            return Some(status);
        }
        if err.is::<BulkheadFull>() {
            let mut status = Status::resource_exhausted(err.to_string());
            status.metadata_mut().insert(
                RETRY_PUSHBACK,
                tonic::metadata::MetadataValue::from_static("0"),
            );
            return Some(status);
        }
        if err.is::<Elapsed>() {
            return Some(Status::deadline_exceeded(err.to_string()));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | BrokenPipe
                    | UnexpectedEof
            ) {
                return Some(Status::unavailable(io.to_string()));
            }
        }
        if let Some(client) = err.downcast_ref::<crate::client::Error>() {
            use crate::client::ErrorKind;
            let status = match client.kind() {
                ErrorKind::Connect => Status::unavailable(client.to_string()),
                ErrorKind::Timeout => Status::deadline_exceeded(client.to_string()),
                ErrorKind::Status => {
                    let code = client.status().map_or(Code::Unknown, code_from_http);
                    Status::new(code, client.to_string())
                }
                ErrorKind::CircuitOpen => {
                    let mut status = Status::unavailable(client.to_string());
                    no_retry(&mut status);
                    status
                }
                _ => {
                    next = err.source();
                    continue;
                }
            };
            return Some(status);
        }
        // The markers display as what they wrap; look inside them, which `source` skips.
        if let Some(marked) = err.downcast_ref::<Transient>() {
            next = Some(marked.get_ref());
            continue;
        }
        if let Some(marked) = err.downcast_ref::<Permanent>() {
            next = Some(marked.get_ref());
            continue;
        }
        next = err.source();
    }
    None
}

/// A copy of `status` without its source, which `Status` cannot clone.
fn clone_status(status: &Status) -> Status {
    Status::with_details_and_metadata(
        status.code(),
        status.message().to_owned(),
        status.details().to_vec().into(),
        status.metadata().clone(),
    )
}

/// A failed call made through a [`GrpcChannel`](super::GrpcChannel): its status, and
/// whether sending it again is safe (the method is idempotent or the call was never sent)
/// and worth it (the status is retryable).
///
/// The channel's retry layer decides on [`is_retryable`](Self::is_retryable); the
/// generated client receives [`status`](Self::status) (`Status::from(error)`).
#[derive(Debug)]
pub struct CallError {
    status: Status,
    /// Whether this channel may send the call again (it is repeatable and its request
    /// can still be sent).
    retryable: bool,
    /// Whether sending the same call again is safe, for whoever makes it anew.
    repeatable: bool,
    instance_failure: bool,
    source: Option<BoxError>,
}

impl CallError {
    /// A call that ended with `status`; retryable when `replay_safe` and the status is.
    pub(crate) fn from_status(status: Status, replay_safe: bool) -> Self {
        let retryable = replay_safe && status.is_retryable();
        let instance_failure = matches!(
            status.code(),
            Code::Unavailable | Code::Internal | Code::Unknown | Code::DataLoss
        );
        Self {
            status,
            retryable,
            repeatable: replay_safe,
            instance_failure,
            source: None,
        }
    }

    /// A call that failed on the connection; `sent` says whether the request may have
    /// reached the server, `resendable` whether its request can be sent again (it was
    /// buffered).
    pub(crate) fn transport(
        source: BoxError,
        sent: bool,
        replay_safe: bool,
        resendable: bool,
    ) -> Self {
        let status = Status::unavailable(source.to_string());
        let repeatable = !sent || replay_safe;
        Self {
            status,
            retryable: repeatable && resendable,
            repeatable,
            instance_failure: true,
            source: Some(source),
        }
    }

    /// An attempt that outlived its deadline.
    pub(crate) fn deadline(after: Duration, replay_safe: bool) -> Self {
        Self {
            status: Status::deadline_exceeded(format!("no answer within {after:?}")),
            retryable: replay_safe,
            repeatable: replay_safe,
            instance_failure: true,
            source: None,
        }
    }

    /// A call that could not be made at all (an invalid request); never retryable.
    pub(crate) fn invalid(status: Status) -> Self {
        Self {
            status,
            retryable: false,
            repeatable: false,
            instance_failure: false,
            source: None,
        }
    }

    /// The status the call ended with.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// The gRPC code the call ended with.
    pub fn code(&self) -> Code {
        self.status.code()
    }

    /// Whether the channel may send the same call again: it is safe, may succeed, and
    /// its request can still be sent.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// Whether making the same call anew is safe (a call that was never sent, or of an
    /// idempotent method), whatever this channel can still do; the [`Status`] it becomes
    /// says so.
    pub fn is_repeatable(&self) -> bool {
        self.repeatable
    }

    /// Whether the failure says the instance is unwell (it could not be reached, broke
    /// the connection, timed out or answered `UNAVAILABLE` or `INTERNAL`), rather than the
    /// call being wrong; balancers eject instances on it.
    pub fn is_instance_failure(&self) -> bool {
        self.instance_failure
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "grpc call failed with {}: {}",
            code_name(self.status.code()),
            self.status.message()
        )
    }
}

impl StdError for CallError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl Retryable for CallError {
    fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl From<CallError> for Status {
    fn from(error: CallError) -> Self {
        let repeatable = error.repeatable;
        let mut status = error.status;
        if !repeatable && status.code() == Code::Unavailable && pushback(&status).is_none() {
            no_retry(&mut status);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{is_retryable, permanent, retryable};
    use proptest::prelude::*;

    const CODES: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    proptest! {
        #[test]
        fn every_http_error_status_maps_to_a_code_whose_http_status_maps_back(
            status in prop_oneof![200u16..300, 400u16..600]
        ) {
            let status = StatusCode::from_u16(status).unwrap();
            let code = code_from_http(status);
            prop_assert_eq!(code_from_http(http_from_code(code)), code);
        }
    }

    #[test]
    fn codes_map_to_http_and_back_for_the_codes_http_can_carry() {
        for code in CODES {
            let back = code_from_http(http_from_code(code));
            let merged = matches!(
                (code, back),
                (Code::OutOfRange, Code::InvalidArgument)
                    | (Code::AlreadyExists, Code::Aborted)
                    | (Code::Unknown | Code::DataLoss, Code::Internal)
            );
            assert!(back == code || merged, "{code:?} came back as {back:?}");
        }
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
    }

    #[test]
    fn statuses_say_whether_to_retry() {
        assert!(is_retryable(&Status::unavailable("down")));
        assert!(!is_retryable(&Status::not_found("no")));
        assert!(!is_retryable(&Status::deadline_exceeded("late")));
        let mut exhausted = Status::resource_exhausted("slow down");
        assert!(!is_retryable(&exhausted), "no pushback, no retry");
        exhausted
            .metadata_mut()
            .insert(RETRY_PUSHBACK, "250".parse().unwrap());
        assert!(is_retryable(&exhausted));
        let mut refused = Status::unavailable("draining");
        refused
            .metadata_mut()
            .insert(RETRY_PUSHBACK, "-1".parse().unwrap());
        assert!(!is_retryable(&refused));
        let boxed: BoxError = Box::new(Status::unavailable("down"));
        assert!(is_retryable(&*boxed));
    }

    #[test]
    fn micro_errors_become_statuses_that_keep_the_retry_verdict() {
        let cases: Vec<(BoxError, Code)> = vec![
            (Box::new(CircuitOpen::new(None)), Code::Unavailable),
            (Box::new(BulkheadFull::new()), Code::ResourceExhausted),
            (
                Box::new(Elapsed::new(Duration::from_secs(1))),
                Code::DeadlineExceeded,
            ),
            (retryable("the ledger is busy"), Code::Unavailable),
            (
                permanent(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
                Code::Unavailable,
            ),
            ("validation failed".into(), Code::Internal),
            (
                Box::new(Status::not_found("no such product")),
                Code::NotFound,
            ),
            (
                retryable(Status::already_exists("twice")),
                Code::AlreadyExists,
            ),
        ];
        for (error, code) in cases {
            let status = status_from_error(&*error);
            assert_eq!(status.code(), code, "{error}");
            assert_eq!(
                is_retryable(&status),
                is_retryable(&*error)
                    && code != Code::DeadlineExceeded
                    && code != Code::AlreadyExists,
                "{error} as {status:?}"
            );
        }
        let status = status_from_error(&*BoxError::from("secret detail"));
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn a_call_error_is_retryable_only_when_its_call_is_replay_safe() {
        let unavailable = CallError::from_status(Status::unavailable("down"), true);
        assert!(is_retryable(&unavailable));
        assert!(unavailable.is_instance_failure());
        let unsafe_call = CallError::from_status(Status::unavailable("down"), false);
        assert!(!is_retryable(&unsafe_call));
        let status = Status::from(unsafe_call);
        assert!(!is_retryable(&status), "the verdict travels as a pushback");
        let never_sent = CallError::transport("refused".into(), false, false, true);
        assert!(is_retryable(&never_sent));
        let streamed = CallError::transport("refused".into(), false, false, false);
        assert!(!is_retryable(&streamed), "its request is gone");
        assert!(
            is_retryable(&Status::from(streamed)),
            "but a new call is safe"
        );
        let lost = CallError::transport("reset".into(), true, false, true);
        assert!(!is_retryable(&lost));
        assert!(!is_retryable(&Status::from(lost)));
        let wrapped: BoxError = Box::new(CallError::from_status(Status::not_found("no"), true));
        assert_eq!(status_from_error(&*wrapped).code(), Code::NotFound);
    }
}
