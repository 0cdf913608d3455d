use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode, Uri};
use serde::de::DeserializeOwned;

use super::{BoxError, IDEMPOTENCY_KEY};
use crate::resilience::{CircuitOpen, Elapsed};

/// What went wrong with a call made by [`HttpClient`](super::HttpClient).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The base URL, path or request URI is not a valid `http` URL.
    InvalidUrl,
    /// A header name or value given for the request is invalid.
    InvalidRequest,
    /// The request body could not be encoded as JSON.
    Encode,
    /// No connection could be made; the request was never sent.
    Connect,
    /// The request did not complete within the client's timeout.
    Timeout,
    /// The connection failed after it was made, while the request or the response
    /// was in flight.
    Transport,
    /// The response body is larger than the client accepts.
    BodyTooLarge,
    /// The server answered with a status outside `2xx`; see [`Error::status`] and
    /// [`Error::body`].
    Status,
    /// The response body could not be decoded as the expected JSON type.
    Decode,
    /// A circuit breaker layer refused the request without sending it.
    CircuitOpen,
    /// TLS failed: the client's settings can't be used (a CA bundle or client
    /// certificate that can't be read, from
    /// [`ClientBuilder::build`](super::ClientBuilder::build), with the
    /// [`TlsError`](crate::tls::TlsError) as the source), or the handshake failed (the
    /// server's certificate did not verify, or the server refused ours, with rustls's
    /// error in the source chain). Never retryable: trying again meets the same
    /// certificates.
    #[cfg(feature = "tls")]
    Tls,
    /// Another layer added with [`ClientBuilder::layer`](super::ClientBuilder::layer)
    /// failed the request; its error is the [`source`](std::error::Error::source).
    Rejected,
}

/// The error of [`HttpClient`](super::HttpClient) calls.
///
/// It tells what went wrong ([`kind`](Self::kind)), carries the status and body of a
/// non-`2xx` answer, and says whether the call may be retried
/// ([`is_retryable`](Self::is_retryable)).
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    detail: Option<Cow<'static, str>>,
    request: Option<RequestInfo>,
    status: Option<StatusCode>,
    body: Option<Bytes>,
    source: Option<BoxError>,
}

/// What an error needs to know about the request that failed.
#[derive(Debug, Clone)]
pub(super) struct RequestInfo {
    method: Method,
    uri: Uri,
    replay_safe: bool,
}

impl RequestInfo {
    pub(super) fn of<B>(req: &http::Request<B>) -> Self {
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            replay_safe: req.method().is_idempotent()
                || req.headers().contains_key(IDEMPOTENCY_KEY),
        }
    }
}

impl Error {
    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The status of the response, when one was received (errors of kind
    /// [`Status`](ErrorKind::Status) and [`Decode`](ErrorKind::Decode)).
    pub fn status(&self) -> Option<StatusCode> {
        self.inner.status
    }

    /// The body of the response, when one was received (errors of kind
    /// [`Status`](ErrorKind::Status) and [`Decode`](ErrorKind::Decode)).
    pub fn body(&self) -> Option<&[u8]> {
        self.inner.body.as_deref()
    }

    /// The response body as text, invalid UTF-8 replaced.
    pub fn body_text(&self) -> Option<Cow<'_, str>> {
        self.body().map(String::from_utf8_lossy)
    }

    /// The response body decoded as JSON, or `None` when there is no body or it does
    /// not decode as `T`.
    pub fn body_json<T: DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_slice(self.body()?).ok()
    }

    /// Whether sending the same request again may succeed and is safe.
    ///
    /// True when the connection could not be made (the request was never sent). For a
    /// timeout, a broken connection or a `429`, `502`, `503` or `504` answer, true
    /// only when repeating the request is safe: its method is idempotent (not `POST`,
    /// `PATCH` or `CONNECT`) or it carries an [`Idempotency-Key`](IDEMPOTENCY_KEY)
    /// header. A call a layer turned away is retryable when the layer's error is (a
    /// full bulkhead is, an open circuit breaker is not).
    pub fn is_retryable(&self) -> bool {
        let replay_safe = self.inner.request.as_ref().is_some_and(|r| r.replay_safe);
        match self.inner.kind {
            ErrorKind::Connect => true,
            ErrorKind::Timeout | ErrorKind::Transport => replay_safe,
            ErrorKind::Status => {
                replay_safe
                    && self.inner.status.is_some_and(|s| {
                        matches!(
                            s,
                            StatusCode::TOO_MANY_REQUESTS
                                | StatusCode::BAD_GATEWAY
                                | StatusCode::SERVICE_UNAVAILABLE
                                | StatusCode::GATEWAY_TIMEOUT
                        )
                    })
            }
            // A layer that turned the call away (a full bulkhead) never sent it.
            ErrorKind::Rejected => self
                .inner
                .source
                .as_deref()
                .is_some_and(|source| crate::error::is_retryable(source)),
            _ => false,
        }
    }

    fn new(kind: ErrorKind) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                detail: None,
                request: None,
                status: None,
                body: None,
                source: None,
            }),
        }
    }

    fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    fn with_detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.inner.detail = Some(detail.into());
        self
    }

    pub(super) fn with_request(mut self, info: &RequestInfo) -> Self {
        self.inner.request = Some(info.clone());
        self
    }

    pub(super) fn invalid_url(url: &str, source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::InvalidUrl)
            .with_detail(url.to_owned())
            .with_source(source)
    }

    #[cfg(feature = "tls")]
    pub(super) fn tls(source: crate::tls::TlsError) -> Self {
        Self::new(ErrorKind::Tls).with_source(source)
    }

    pub(super) fn invalid_request(source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::InvalidRequest).with_source(source)
    }

    pub(super) fn encode<T: ?Sized>(source: serde_json::Error) -> Self {
        Self::new(ErrorKind::Encode)
            .with_detail(std::any::type_name::<T>())
            .with_source(source)
    }

    pub(super) fn hyper(source: hyper_util::client::legacy::Error) -> Self {
        let kind = if source.is_connect() {
            #[cfg(feature = "tls")]
            if is_tls_failure(&source) {
                return Self::new(ErrorKind::Tls).with_source(source);
            }
            ErrorKind::Connect
        } else {
            ErrorKind::Transport
        };
        Self::new(kind).with_source(source)
    }

    pub(super) fn transport(source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Transport).with_source(source)
    }

    pub(super) fn body_too_large(limit: usize) -> Self {
        Self::new(ErrorKind::BodyTooLarge).with_detail(limit.to_string())
    }

    pub(super) fn timeout(after: Duration) -> Self {
        Self::new(ErrorKind::Timeout).with_detail(format!("{after:?}"))
    }

    pub(super) fn status_code(status: StatusCode, body: Bytes) -> Self {
        let mut err = Self::new(ErrorKind::Status);
        err.inner.status = Some(status);
        err.inner.body = Some(body);
        err
    }

    pub(super) fn decode<T>(status: StatusCode, body: Bytes, source: serde_json::Error) -> Self {
        let empty = if body.is_empty() { "empty " } else { "" };
        let mut err = Self::new(ErrorKind::Decode)
            .with_detail(format!(
                "{empty}response body as `{}`",
                std::any::type_name::<T>()
            ))
            .with_source(source);
        err.inner.status = Some(status);
        err.inner.body = Some(body);
        err
    }

    /// Turns what came out of the layered stack back into an `Error`.
    pub(super) fn from_stack(err: BoxError, info: &RequestInfo) -> Self {
        let err = match err.downcast::<Self>() {
            Ok(err) => return *err,
            Err(other) => other,
        };
        let mut kind = ErrorKind::Rejected;
        let mut detail = None;
        if err.is::<CircuitOpen>() {
            kind = ErrorKind::CircuitOpen;
        } else if let Some(elapsed) = err.downcast_ref::<Elapsed>() {
            kind = ErrorKind::Timeout;
            detail = Some(format!("{:?}", elapsed.timeout()));
        }
        let mut error = Self::new(kind).with_source(err).with_request(info);
        error.inner.detail = detail.map(Cow::Owned);
        error
    }
}

impl crate::error::Retryable for Error {
    fn is_retryable(&self) -> bool {
        Error::is_retryable(self)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let detail = self.inner.detail.as_deref().unwrap_or_default();
        match self.inner.kind {
            ErrorKind::InvalidUrl => write!(f, "invalid url `{detail}`")?,
            ErrorKind::InvalidRequest => f.write_str("invalid request")?,
            ErrorKind::Encode => write!(f, "failed to encode `{detail}` as json")?,
            ErrorKind::Connect => f.write_str("failed to connect")?,
            ErrorKind::Timeout => write!(f, "request timed out after {detail}")?,
            ErrorKind::Transport => f.write_str("connection failed during the request")?,
            ErrorKind::BodyTooLarge => write!(f, "response body exceeds {detail} bytes")?,
            ErrorKind::Status => match self.inner.status {
                Some(status) => write!(f, "server answered {status}")?,
                None => f.write_str("server answered an error status")?,
            },
            ErrorKind::Decode => write!(f, "failed to decode {detail}")?,
            ErrorKind::CircuitOpen => f.write_str("circuit breaker is open")?,
            ErrorKind::Rejected => f.write_str("request rejected by a client layer")?,
            #[cfg(feature = "tls")]
            ErrorKind::Tls => f.write_str("tls failed")?,
        }
        if let Some(request) = &self.inner.request {
            write!(f, " ({} {})", request.method, request.uri)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("client::Error");
        d.field("kind", &self.inner.kind);
        if let Some(detail) = &self.inner.detail {
            d.field("detail", detail);
        }
        if let Some(request) = &self.inner.request {
            d.field("method", &request.method)
                .field("uri", &request.uri);
        }
        if let Some(status) = &self.inner.status {
            d.field("status", status);
        }
        if let Some(body) = &self.inner.body {
            d.field("body_len", &body.len());
        }
        if let Some(source) = &self.inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Whether rustls failed the handshake somewhere in `error`'s chain (hyper-rustls hands it
/// over inside an `io::Error`, whose `source` skips the error it wraps).
#[cfg(feature = "tls")]
fn is_tls_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return true;
            }
        }
        next = error.source();
    }
    false
}

/// A reason without an underlying error, used as a `source`.
#[derive(Debug)]
pub(super) struct Reason(pub(super) &'static str);

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Reason {}
