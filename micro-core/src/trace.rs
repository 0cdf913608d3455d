//! W3C Trace Context propagation, without an OpenTelemetry dependency.
//!
//! A [`TraceContext`] is the content of the [`traceparent`] header: a trace id shared
//! by every hop of one request, the id of the caller's span (the spec's `parent-id`)
//! and the `sampled` flag.
//!
//! The server side parses the incoming header with [`TraceContext::from_headers`] (or
//! starts a trace with [`TraceContext::new_root`]) and runs the handler inside
//! [`TraceContext::scope`]. Code called from there reads the context with
//! [`TraceContext::current`], and outgoing requests carry a child of it, written by
//! [`inject_current`] or by the [`PropagateTraceLayer`] middleware.
//!
//! ```
//! use micro_core::trace::{self, TraceContext};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let incoming = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
//!     .unwrap();
//! incoming
//!     .scope(async {
//!         let mut headers = http::HeaderMap::new();
//!         trace::inject_current(&mut headers);
//!         let outgoing = TraceContext::from_headers(&headers).unwrap();
//!         assert_eq!(outgoing.trace_id(), incoming.trace_id());
//!         assert_ne!(outgoing.span_id(), incoming.span_id());
//!     })
//!     .await;
//! # }
//! ```
//!
//! [`traceparent`]: https://www.w3.org/TR/trace-context/#traceparent-header

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::task::{Context, Poll};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use rand::Rng;
use tower_layer::Layer;
use tower_service::Service;

/// The `traceparent` header name.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

const SAMPLED: u8 = 0x01;

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// A 16-byte trace id, never all zeros. Displays as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

/// An 8-byte span id, never all zeros. Displays as 16 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 8]);

macro_rules! id_impls {
    ($ty:ident, $len:literal, $err:expr) => {
        impl $ty {
            /// Returns a random id.
            pub fn random() -> Self {
                let mut rng = rand::rng();
                loop {
                    let bytes: [u8; $len] = rng.random();
                    if let Some(id) = Self::from_bytes(bytes) {
                        return id;
                    }
                }
            }

            /// Wraps raw bytes, or returns `None` when they are all zero (an invalid id).
            pub fn from_bytes(bytes: [u8; $len]) -> Option<Self> {
                (bytes != [0; $len]).then_some(Self(bytes))
            }

            /// Returns the raw bytes.
            pub fn to_bytes(self) -> [u8; $len] {
                self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut buf = [0u8; $len * 2];
                f.write_str(encode_hex(&self.0, &mut buf))
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($ty), "({})"), self)
            }
        }

        impl FromStr for $ty {
            type Err = ParseError;

            /// Parses lowercase hex of the exact length; all zeros is rejected.
            fn from_str(s: &str) -> Result<Self, ParseError> {
                let mut bytes = [0u8; $len];
                decode_hex(s.as_bytes(), &mut bytes).ok_or($err)?;
                Self::from_bytes(bytes).ok_or($err)
            }
        }
    };
}

id_impls!(TraceId, 16, ParseError::TraceId);
id_impls!(SpanId, 8, ParseError::ParentId);

/// Why a `traceparent` value (or a trace or span id) was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The value has the wrong length for its version.
    #[error("traceparent has the wrong length")]
    Length,
    /// The fields are not separated by single dashes.
    #[error("traceparent fields are not separated by dashes")]
    Separator,
    /// The version is not two lowercase hex digits, or is the forbidden `ff`.
    #[error("invalid traceparent version")]
    Version,
    /// The trace id is not 32 lowercase hex digits, or is all zeros.
    #[error("invalid trace id")]
    TraceId,
    /// The parent (span) id is not 16 lowercase hex digits, or is all zeros.
    #[error("invalid parent id")]
    ParentId,
    /// The trace flags are not two lowercase hex digits.
    #[error("invalid trace flags")]
    Flags,
}

/// The W3C trace context of one hop: trace id, parent (span) id and sampled flag.
///
/// See the [module docs](self) for how it travels through a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: TraceId,
    span_id: SpanId,
    sampled: bool,
}

impl TraceContext {
    /// Builds a context from its parts.
    pub fn new(trace_id: TraceId, span_id: SpanId, sampled: bool) -> Self {
        Self {
            trace_id,
            span_id,
            sampled,
        }
    }

    /// Starts a new trace: random trace and span ids, sampled.
    pub fn new_root() -> Self {
        Self::new(TraceId::random(), SpanId::random(), true)
    }

    /// Returns a context for a new span in the same trace: same trace id and sampled
    /// flag, new random span id.
    pub fn child(&self) -> Self {
        Self::new(self.trace_id, SpanId::random(), self.sampled)
    }

    /// The trace id, shared by every span of the trace.
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The span id (the `parent-id` field of `traceparent`).
    pub fn span_id(&self) -> SpanId {
        self.span_id
    }

    /// Whether the caller recorded this trace.
    pub fn is_sampled(&self) -> bool {
        self.sampled
    }

    /// Parses a `traceparent` header value.
    ///
    /// Version `00` must be exactly 55 characters. A higher version is parsed as
    /// version `00` when it is at least that long and, if longer, continues with a
    /// dash (the spec's forward-compatibility rule). Uppercase hex, all-zero ids and
    /// version `ff` are rejected.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        const LEN: usize = 55;
        let s = s.as_bytes();
        if s.len() < LEN {
            return Err(ParseError::Length);
        }
        let mut version = [0u8; 1];
        decode_hex(&s[0..2], &mut version).ok_or(ParseError::Version)?;
        match version[0] {
            0xff => return Err(ParseError::Version),
            0x00 if s.len() != LEN => return Err(ParseError::Length),
            _ if s.len() > LEN && s[LEN] != b'-' => return Err(ParseError::Separator),
            _ => {}
        }
        if s[2] != b'-' || s[35] != b'-' || s[52] != b'-' {
            return Err(ParseError::Separator);
        }

        let mut trace_id = [0u8; 16];
        decode_hex(&s[3..35], &mut trace_id).ok_or(ParseError::TraceId)?;
        let mut span_id = [0u8; 8];
        decode_hex(&s[36..52], &mut span_id).ok_or(ParseError::ParentId)?;
        let mut flags = [0u8; 1];
        decode_hex(&s[53..55], &mut flags).ok_or(ParseError::Flags)?;

        Ok(Self {
            trace_id: TraceId::from_bytes(trace_id).ok_or(ParseError::TraceId)?,
            span_id: SpanId::from_bytes(span_id).ok_or(ParseError::ParentId)?,
            sampled: flags[0] & SAMPLED != 0,
        })
    }

    /// Reads the `traceparent` header. Returns `None` when it is missing, invalid or
    /// present more than once.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        Self::parse(value.to_str().ok()?).ok()
    }

    /// Formats the context as a version `00` `traceparent` value.
    pub fn to_traceparent(&self) -> String {
        self.to_string()
    }

    /// Writes this context as the `traceparent` header, replacing any previous value.
    ///
    /// To send a request on behalf of the current span, inject a [`child`](Self::child)
    /// (or use [`inject_current`]).
    pub fn inject(&self, headers: &mut HeaderMap) {
        // Written in place rather than formatted: this runs for every proxied request.
        let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
        encode_hex(&self.trace_id.0, &mut buf[3..35]);
        encode_hex(&self.span_id.0, &mut buf[36..52]);
        if self.sampled {
            buf[54] = b'1';
        }
        let value =
            HeaderValue::from_bytes(&buf).expect("a traceparent is always a valid header value");
        headers.insert(TRACEPARENT, value);
    }

    /// Returns the context of the enclosing [`scope`](Self::scope), if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(|ctx| *ctx).ok()
    }

    /// Runs `fut` with this context as the [`current`](Self::current) one.
    ///
    /// The context is task-local: it is not inherited by tasks spawned from `fut`;
    /// wrap their futures in a scope of their own.
    pub fn scope<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        self.scoped(fut)
    }

    /// [`scope`](Self::scope) with a type that can be named, for response futures.
    pub(crate) fn scoped<F: Future>(
        self,
        fut: F,
    ) -> tokio::task::futures::TaskLocalFuture<TraceContext, F> {
        CURRENT.scope(self, fut)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flags = if self.sampled { SAMPLED } else { 0 };
        write!(f, "00-{}-{}-{flags:02x}", self.trace_id, self.span_id)
    }
}

impl FromStr for TraceContext {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        Self::parse(s)
    }
}

/// Writes a [`child`](TraceContext::child) of the current context as the
/// `traceparent` header; does nothing outside a [`TraceContext::scope`].
pub fn inject_current(headers: &mut HeaderMap) {
    if let Some(ctx) = TraceContext::current() {
        ctx.child().inject(headers);
    }
}

/// Layer that applies [`PropagateTrace`] to outgoing requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct PropagateTraceLayer {
    _priv: (),
}

impl PropagateTraceLayer {
    /// Creates the layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for PropagateTraceLayer {
    type Service = PropagateTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PropagateTrace::new(inner)
    }
}

/// Middleware for outgoing requests that writes the `traceparent` header.
///
/// The parent is a [`TraceContext`] found in the request's extensions, else the
/// [current](TraceContext::current) one; the header carries a
/// [`child`](TraceContext::child) of it, so every request (and every retry of one)
/// gets its own span id. A request that already has a `traceparent` header, or that
/// is made without any context, is passed on unchanged.
///
/// A context in the extensions lets the parent survive layers that hand the request
/// to another task, where the task-local context is not visible.
#[derive(Debug, Clone)]
pub struct PropagateTrace<S> {
    inner: S,
}

impl<S> PropagateTrace<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }

    /// Returns a [`PropagateTraceLayer`].
    pub fn layer() -> PropagateTraceLayer {
        PropagateTraceLayer::new()
    }

    /// Returns a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Returns a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Returns the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<http::Request<B>> for PropagateTrace<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if !req.headers().contains_key(TRACEPARENT) {
            let parent = req
                .extensions()
                .get::<TraceContext>()
                .copied()
                .or_else(TraceContext::current);
            if let Some(parent) = parent {
                parent.child().inject(req.headers_mut());
            }
        }
        self.inner.call(req)
    }
}

fn encode_hex<'a>(bytes: &[u8], buf: &'a mut [u8]) -> &'a str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (byte, out) in bytes.iter().zip(buf.chunks_exact_mut(2)) {
        out[0] = DIGITS[usize::from(byte >> 4)];
        out[1] = DIGITS[usize::from(byte & 0x0f)];
    }
    std::str::from_utf8(buf).expect("hex digits are ascii")
}

/// Decodes lowercase hex into `out`; `None` unless `hex` is exactly twice as long.
fn decode_hex(hex: &[u8], out: &mut [u8]) -> Option<()> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if hex.len() != out.len() * 2 {
        return None;
    }
    for (pair, byte) in hex.chunks_exact(2).zip(out.iter_mut()) {
        *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example() {
        let ctx = TraceContext::parse(VALID).unwrap();
        assert_eq!(
            ctx.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(ctx.span_id().to_string(), "00f067aa0ba902b7");
        assert!(ctx.is_sampled());
        assert_eq!(ctx.to_traceparent(), VALID);

        let unsampled =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.is_sampled());
    }

    #[test]
    fn rejects_the_spec_invalid_examples() {
        use ParseError::*;
        let cases = [
            ("", Length),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
                Length,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                Length,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
                Length,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Version,
            ),
            (
                "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Version,
            ),
            (
                "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Version,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                TraceId,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                TraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                TraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                ParentId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
                ParentId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
                Flags,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
                Flags,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Separator,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
                Separator,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",
                Separator,
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
                Separator,
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                Length,
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(TraceContext::parse(input), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn parses_future_versions_by_the_version_00_layout() {
        let ctx = TraceContext::parse(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-the-future",
        )
        .unwrap();
        assert!(ctx.is_sampled());
        assert_eq!(ctx.to_traceparent(), VALID);
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").is_ok()
        );
    }

    #[test]
    fn ids_parse_and_reject_like_the_header() {
        let trace_id: TraceId = "4bf92f3577b34da6a3ce929d0e0e4736".parse().unwrap();
        assert_eq!(
            format!("{trace_id:?}"),
            "TraceId(4bf92f3577b34da6a3ce929d0e0e4736)"
        );
        assert_eq!("0".repeat(16).parse::<SpanId>(), Err(ParseError::ParentId));
        assert_eq!("abc".parse::<TraceId>(), Err(ParseError::TraceId));
        assert!(TraceId::from_bytes([0; 16]).is_none());
    }

    #[test]
    fn from_headers_needs_exactly_one_valid_value() {
        let mut headers = HeaderMap::new();
        assert_eq!(TraceContext::from_headers(&headers), None);
        headers.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        assert_eq!(
            TraceContext::from_headers(&headers),
            Some(VALID.parse().unwrap())
        );
        headers.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert_eq!(TraceContext::from_headers(&headers), None);
        headers.insert(TRACEPARENT, HeaderValue::from_static("garbage"));
        assert_eq!(TraceContext::from_headers(&headers), None);
    }

    #[test]
    fn roots_and_children() {
        let root = TraceContext::new_root();
        assert!(root.is_sampled());
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
        assert_ne!(TraceContext::new_root().trace_id(), root.trace_id());
    }

    #[tokio::test]
    async fn current_is_set_only_inside_scope() {
        assert_eq!(TraceContext::current(), None);
        let mut headers = HeaderMap::new();
        inject_current(&mut headers);
        assert!(headers.is_empty());

        let ctx = TraceContext::new_root();
        let (current, headers) = ctx
            .scope(async {
                let mut headers = HeaderMap::new();
                inject_current(&mut headers);
                (TraceContext::current(), headers)
            })
            .await;
        assert_eq!(current, Some(ctx));
        let sent = TraceContext::from_headers(&headers).unwrap();
        assert_eq!(sent.trace_id(), ctx.trace_id());
        assert_ne!(sent.span_id(), ctx.span_id());
    }

    async fn sent_traceparent(req: http::Request<()>) -> Option<TraceContext> {
        let svc = PropagateTraceLayer::new().layer(tower::service_fn(
            |req: http::Request<()>| async move {
                Ok::<_, Infallible>(TraceContext::from_headers(req.headers()))
            },
        ));
        svc.oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn layer_writes_a_child_of_the_extension_or_current_context() {
        assert_eq!(sent_traceparent(http::Request::new(())).await, None);

        let current = TraceContext::new_root();
        let sent = current
            .scope(sent_traceparent(http::Request::new(())))
            .await
            .unwrap();
        assert_eq!(sent.trace_id(), current.trace_id());
        assert_ne!(sent.span_id(), current.span_id());

        let explicit = TraceContext::new_root();
        let mut req = http::Request::new(());
        req.extensions_mut().insert(explicit);
        let sent = current.scope(sent_traceparent(req)).await.unwrap();
        assert_eq!(sent.trace_id(), explicit.trace_id());
    }

    #[tokio::test]
    async fn layer_keeps_an_existing_header() {
        let existing: TraceContext = VALID.parse().unwrap();
        let mut req = http::Request::new(());
        existing.inject(req.headers_mut());
        let sent = TraceContext::new_root().scope(sent_traceparent(req)).await;
        assert_eq!(sent, Some(existing));
    }

    fn any_context() -> impl Strategy<Value = TraceContext> {
        (any::<[u8; 16]>(), any::<[u8; 8]>(), any::<bool>()).prop_filter_map(
            "all-zero id",
            |(trace_id, span_id, sampled)| {
                Some(TraceContext::new(
                    TraceId::from_bytes(trace_id)?,
                    SpanId::from_bytes(span_id)?,
                    sampled,
                ))
            },
        )
    }

    proptest! {
        #[test]
        fn traceparent_round_trips(ctx in any_context()) {
            let header = ctx.to_traceparent();
            prop_assert_eq!(header.len(), 55);
            prop_assert_eq!(TraceContext::parse(&header), Ok(ctx));
        }

        #[test]
        fn garbage_never_panics(s in "\\PC*") {
            let _ = TraceContext::parse(&s);
        }

        #[test]
        fn near_valid_garbage_never_panics(s in "[0-9a-fA-F-]{50,60}") {
            let _ = TraceContext::parse(&s);
        }

        #[test]
        fn mutated_headers_never_panic(ctx in any_context(), at in 0usize..55, byte in any::<u8>()) {
            let mut bytes = ctx.to_traceparent().into_bytes();
            bytes[at] = byte;
            let s = String::from_utf8_lossy(&bytes);
            let _ = TraceContext::parse(&s);
        }
    }
}
