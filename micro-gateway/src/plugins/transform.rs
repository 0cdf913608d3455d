//! Transforms of requests and responses: Kong's `request-transformer` (headers, query
//! string, body) and `response-transformer` (headers, JSON body).
//!
//! Each edit is one of Kong's, in Kong's order: `remove`, `rename`, `replace`, `add`,
//! `append`; each section lists what it edits: `headers`, `querystring` and `body` for
//! requests, `headers` and `json` for responses. A body is edited when it is JSON (an
//! object at the top) or, for requests, a form (`application/x-www-form-urlencoded`);
//! any other body goes on untouched, as Kong does. A body edit reads the whole body, up
//! to [`MAX_TRANSFORMED_BODY`]; a longer one is answered `413`. Anything else in the
//! file (Kong's `http_method`, `uri`, `json_types`, a section for the other side) is
//! refused at load, with its place.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use micro_core::service::BoxFuture;
use serde::Deserialize;
use tower_layer::Layer;
use tower_service::Service;

use super::HttpService;

/// The largest body a body edit reads: 1 MiB.
pub const MAX_TRANSFORMED_BODY: usize = 1 << 20;

/// Edits of named fields (query parameters, form fields, top-level JSON members), in
/// Kong's order; entries are `"name:value"` (`"old:new"` for rename, a bare name for
/// remove). Values are strings, as Kong writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FieldEdits {
    /// Fields to drop.
    pub remove: Vec<String>,
    /// Fields to rename, old to new.
    pub rename: Vec<(String, String)>,
    /// Fields to overwrite when present.
    pub replace: Vec<(String, String)>,
    /// Fields to set when absent.
    pub add: Vec<(String, String)>,
    /// Values to add beside those already there (a JSON member becomes an array).
    pub append: Vec<(String, String)>,
}

impl FieldEdits {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.rename.is_empty()
            && self.replace.is_empty()
            && self.add.is_empty()
            && self.append.is_empty()
    }

    /// Applies the edits to `pairs`, a query string's or a form's fields in order.
    pub fn apply_pairs(&self, pairs: &mut Vec<(String, String)>) {
        for name in &self.remove {
            pairs.retain(|(n, _)| n != name);
        }
        for (old, new) in &self.rename {
            for (n, _) in pairs.iter_mut() {
                if n == old {
                    n.clone_from(new);
                }
            }
        }
        for (name, value) in &self.replace {
            if pairs.iter().any(|(n, _)| n == name) {
                pairs.retain(|(n, _)| n != name);
                pairs.push((name.clone(), value.clone()));
            }
        }
        for (name, value) in &self.add {
            if !pairs.iter().any(|(n, _)| n == name) {
                pairs.push((name.clone(), value.clone()));
            }
        }
        for (name, value) in &self.append {
            pairs.push((name.clone(), value.clone()));
        }
    }

    /// Applies the edits to the members of a JSON object.
    pub fn apply_json(&self, object: &mut serde_json::Map<String, serde_json::Value>) {
        use serde_json::Value;
        for name in &self.remove {
            object.remove(name);
        }
        for (old, new) in &self.rename {
            if let Some(value) = object.remove(old) {
                object.insert(new.clone(), value);
            }
        }
        for (name, value) in &self.replace {
            if let Some(slot) = object.get_mut(name) {
                *slot = Value::String(value.clone());
            }
        }
        for (name, value) in &self.add {
            object
                .entry(name.clone())
                .or_insert_with(|| Value::String(value.clone()));
        }
        for (name, value) in &self.append {
            let value = Value::String(value.clone());
            match object.remove(name) {
                None => {
                    object.insert(name.clone(), value);
                }
                Some(Value::Array(mut items)) => {
                    items.push(value);
                    object.insert(name.clone(), Value::Array(items));
                }
                Some(other) => {
                    object.insert(name.clone(), Value::Array(vec![other, value]));
                }
            }
        }
    }
}

/// A request transformer's edits: headers, query string and body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestEdits {
    /// Header edits.
    pub headers: HeaderTransform,
    /// Query parameter edits.
    pub querystring: FieldEdits,
    /// Body field edits (JSON or form).
    pub body: FieldEdits,
}

/// A response transformer's edits: headers and JSON body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResponseEdits {
    /// Header edits.
    pub headers: HeaderTransform,
    /// JSON member edits.
    pub json: FieldEdits,
}

/// Kong's `remove: {...}, rename: {...}, ...` with the sections `S` of one side.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawEdits<S> {
    remove: S,
    rename: S,
    replace: S,
    add: S,
    append: S,
}

impl<S> RawEdits<S> {
    /// The five edits' entries of one section (`headers`, `querystring`, ...).
    fn section<'a>(&'a self, pick: impl Fn(&'a S) -> &'a Vec<String>) -> RawEdits<&'a [String]> {
        RawEdits {
            remove: pick(&self.remove),
            rename: pick(&self.rename),
            replace: pick(&self.replace),
            add: pick(&self.add),
            append: pick(&self.append),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct HeaderSection {
    headers: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RequestSection {
    headers: Vec<String>,
    querystring: Vec<String>,
    body: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ResponseSection {
    headers: Vec<String>,
    json: Vec<String>,
}

fn field_pair<E: serde::de::Error>(entry: &str) -> Result<(String, String), E> {
    let (name, value) = entry
        .split_once(':')
        .ok_or_else(|| E::custom(format!("`{entry}` is not written `name:value`")))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(E::custom(format!("`{entry}` has no name")));
    }
    Ok((name.to_owned(), value.trim().to_owned()))
}

fn field_edits<E: serde::de::Error>(lists: RawEdits<&[String]>) -> Result<FieldEdits, E> {
    let pairs = |entries: &[String]| -> Result<Vec<(String, String)>, E> {
        entries.iter().map(|e| field_pair::<E>(e)).collect()
    };
    Ok(FieldEdits {
        remove: lists.remove.iter().map(|n| n.trim().to_owned()).collect(),
        rename: pairs(lists.rename)?,
        replace: pairs(lists.replace)?,
        add: pairs(lists.add)?,
        append: pairs(lists.append)?,
    })
}

fn header_name<E: serde::de::Error>(text: &str) -> Result<HeaderName, E> {
    HeaderName::from_bytes(text.trim().as_bytes())
        .map_err(|_| E::custom(format!("`{text}` is not a header name")))
}

fn header_pair<E: serde::de::Error>(entry: &str) -> Result<(HeaderName, String), E> {
    let (left, right) = entry
        .split_once(':')
        .ok_or_else(|| E::custom(format!("`{entry}` is not written `name:value`")))?;
    Ok((header_name(left)?, right.trim().to_owned()))
}

fn header_values<E: serde::de::Error>(
    entries: &[String],
) -> Result<Vec<(HeaderName, HeaderValue)>, E> {
    entries
        .iter()
        .map(|entry| {
            let (name, value) = header_pair::<E>(entry)?;
            let value = HeaderValue::try_from(value)
                .map_err(|_| E::custom(format!("`{entry}` has an invalid header value")))?;
            Ok((name, value))
        })
        .collect()
}

fn header_transform<E: serde::de::Error>(lists: RawEdits<&[String]>) -> Result<HeaderTransform, E> {
    Ok(HeaderTransform {
        remove: lists
            .remove
            .iter()
            .map(|text| header_name::<E>(text))
            .collect::<Result<_, _>>()?,
        rename: lists
            .rename
            .iter()
            .map(|entry| {
                let (old, new) = header_pair::<E>(entry)?;
                Ok((old, header_name::<E>(&new)?))
            })
            .collect::<Result<_, E>>()?,
        replace: header_values(lists.replace)?,
        add: header_values(lists.add)?,
        append: header_values(lists.append)?,
    })
}

impl<'de> Deserialize<'de> for RequestEdits {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawEdits::<RequestSection>::deserialize(deserializer)?;
        Ok(Self {
            headers: header_transform(raw.section(|s| &s.headers))?,
            querystring: field_edits(raw.section(|s| &s.querystring))?,
            body: field_edits(raw.section(|s| &s.body))?,
        })
    }
}

impl<'de> Deserialize<'de> for ResponseEdits {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawEdits::<ResponseSection>::deserialize(deserializer)?;
        Ok(Self {
            headers: header_transform(raw.section(|s| &s.headers))?,
            json: field_edits(raw.section(|s| &s.json))?,
        })
    }
}

/// Header edits, applied in Kong's order: remove, rename, replace, add, append.
///
/// Entries are written as Kong writes them: `"name:value"` (and `"old:new"` for rename).
///
/// - `remove`: drop these headers;
/// - `rename`: move a header's values to a new name;
/// - `replace`: set a header only when it is present;
/// - `add`: set a header only when it is absent;
/// - `append`: add a value, keeping those already there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeaderTransform {
    /// Headers to drop.
    pub remove: Vec<HeaderName>,
    /// Headers to rename, old to new.
    pub rename: Vec<(HeaderName, HeaderName)>,
    /// Headers to overwrite when present.
    pub replace: Vec<(HeaderName, HeaderValue)>,
    /// Headers to set when absent.
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// Values to append.
    pub append: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderTransform {
    /// Applies the edits to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (old, new) in &self.rename {
            let values: Vec<HeaderValue> = headers.get_all(old).iter().cloned().collect();
            if !values.is_empty() {
                headers.remove(old);
                for value in values {
                    headers.append(new.clone(), value);
                }
            }
        }
        for (name, value) in &self.replace {
            if headers.contains_key(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
        for (name, value) in &self.add {
            if !headers.contains_key(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
        for (name, value) in &self.append {
            headers.append(name.clone(), value.clone());
        }
    }
}

impl<'de> Deserialize<'de> for HeaderTransform {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawEdits::<HeaderSection>::deserialize(deserializer)?;
        header_transform(raw.section(|s| &s.headers))
    }
}

/// What a [`Transform`] edits.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Edits {
    Request(Arc<RequestEdits>),
    Response(Arc<ResponseEdits>),
}

/// Applies [`Transform`].
#[derive(Debug, Clone)]
pub struct TransformLayer {
    edits: Edits,
}

impl TransformLayer {
    /// Edits the headers of each request before it goes on.
    pub fn request(transform: HeaderTransform) -> Self {
        Self::request_edits(RequestEdits {
            headers: transform,
            ..RequestEdits::default()
        })
    }

    /// Edits the headers, query string and body of each request before it goes on.
    pub fn request_edits(edits: RequestEdits) -> Self {
        Self {
            edits: Edits::Request(Arc::new(edits)),
        }
    }

    /// Edits the headers of each response before it goes back.
    pub fn response(transform: HeaderTransform) -> Self {
        Self::response_edits(ResponseEdits {
            headers: transform,
            ..ResponseEdits::default()
        })
    }

    /// Edits the headers and JSON body of each response before it goes back.
    pub fn response_edits(edits: ResponseEdits) -> Self {
        Self {
            edits: Edits::Response(Arc::new(edits)),
        }
    }
}

impl<S> Layer<S> for TransformLayer {
    type Service = Transform<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Transform {
            inner,
            edits: self.edits.clone(),
        }
    }
}

/// Edits requests or responses as its [`TransformLayer`] says.
#[derive(Debug, Clone)]
pub struct Transform<S> {
    inner: S,
    edits: Edits,
}

impl<S> Transform<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// How a body is written, when a body edit can read it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Json,
    Form,
}

fn body_kind(headers: &HeaderMap) -> Option<BodyKind> {
    let value = headers.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next()?.trim().to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        Some(BodyKind::Json)
    } else if essence == "application/x-www-form-urlencoded" {
        Some(BodyKind::Form)
    } else {
        None
    }
}

/// Why a body could not be read for an edit.
enum Unread {
    /// Longer than [`MAX_TRANSFORMED_BODY`].
    TooLong,
    /// The body failed while being read (the peer went away, a read timed out).
    Broken,
}

/// `body` edited by `edits` when it is of a kind they apply to (`form` too, for
/// requests).
async fn edit_body(
    headers: &mut HeaderMap,
    body: Body,
    edits: &FieldEdits,
    form: bool,
) -> Result<Body, Unread> {
    let kind = match body_kind(headers) {
        Some(BodyKind::Form) if !form => return Ok(body),
        Some(kind) => kind,
        None => return Ok(body),
    };
    let limited = http_body_util::Limited::new(body, MAX_TRANSFORMED_BODY);
    let bytes = match http_body_util::BodyExt::collect(limited).await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return Err(Unread::TooLong)
        }
        Err(_) => return Err(Unread::Broken),
    };
    let edited = match kind {
        BodyKind::Json => match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(mut object)) => {
                edits.apply_json(&mut object);
                serde_json::to_vec(&object).ok()
            }
            // Not an object: nothing to edit; it goes on as it came.
            _ => None,
        },
        BodyKind::Form => {
            let mut pairs: Vec<(String, String)> =
                form_urlencoded::parse(&bytes).into_owned().collect();
            edits.apply_pairs(&mut pairs);
            Some(
                form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(pairs)
                    .finish()
                    .into_bytes(),
            )
        }
    };
    let bytes = edited.map_or(bytes, bytes::Bytes::from);
    headers.remove(http::header::TRANSFER_ENCODING);
    headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok(Body::from(bytes))
}

/// The request's URI with its query string edited.
fn edit_query(uri: &http::Uri, edits: &FieldEdits) -> Option<http::Uri> {
    let mut pairs: Vec<(String, String)> = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    edits.apply_pairs(&mut pairs);
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let path_and_query = if query.is_empty() {
        uri.path().to_owned()
    } else {
        format!("{}?{query}", uri.path())
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

impl<S: HttpService> Service<Request<Body>> for Transform<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        match self.edits.clone() {
            Edits::Request(edits) => {
                edits.headers.apply(request.headers_mut());
                if !edits.querystring.is_empty() {
                    match edit_query(request.uri(), &edits.querystring) {
                        Some(uri) => *request.uri_mut() = uri,
                        None => {
                            return Box::pin(async {
                                Ok(crate::error::error_response(
                                    http::StatusCode::BAD_REQUEST,
                                    "bad_query",
                                    "the query string cannot be rewritten",
                                ))
                            })
                        }
                    }
                }
                if edits.body.is_empty() {
                    return Box::pin(self.inner.call(request));
                }
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    let (mut parts, body) = request.into_parts();
                    match edit_body(&mut parts.headers, body, &edits.body, true).await {
                        Ok(body) => inner.call(Request::from_parts(parts, body)).await,
                        Err(Unread::TooLong) => Ok(super::body_limit::too_large()),
                        Err(Unread::Broken) => Ok(crate::error::error_response(
                            http::StatusCode::BAD_REQUEST,
                            "body_unreadable",
                            "the request body could not be read",
                        )),
                    }
                })
            }
            Edits::Response(edits) => {
                let response = self.inner.call(request);
                Box::pin(async move {
                    let mut response = response.await?;
                    edits.headers.apply(response.headers_mut());
                    if edits.json.is_empty() {
                        return Ok(response);
                    }
                    let (mut parts, body) = response.into_parts();
                    match edit_body(&mut parts.headers, body, &edits.json, false).await {
                        Ok(body) => Ok(Response::from_parts(parts, body)),
                        Err(Unread::TooLong) => Ok(crate::error::error_response(
                            http::StatusCode::BAD_GATEWAY,
                            "upstream_body_too_large",
                            "the upstream's answer is too large to transform",
                        )),
                        Err(Unread::Broken) => Ok(crate::error::error_response(
                            http::StatusCode::BAD_GATEWAY,
                            "upstream_failed",
                            "the upstream's answer broke off",
                        )),
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_follow_kongs_rules_and_order() {
        let transform: HeaderTransform = serde_json::from_value(serde_json::json!({
            "remove": { "headers": ["x-internal"] },
            "rename": { "headers": ["x-old:x-new"] },
            "replace": { "headers": ["x-version:2", "x-absent:1"] },
            "add": { "headers": ["x-gateway:micro", "x-version:3"] },
            "append": { "headers": ["x-tag:b"] }
        }))
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-internal", HeaderValue::from_static("secret"));
        headers.insert("x-old", HeaderValue::from_static("moved"));
        headers.insert("x-version", HeaderValue::from_static("1"));
        headers.insert("x-tag", HeaderValue::from_static("a"));
        transform.apply(&mut headers);
        assert!(!headers.contains_key("x-internal"));
        assert!(!headers.contains_key("x-old"));
        assert_eq!(headers["x-new"], "moved");
        assert_eq!(headers["x-version"], "2", "add must not overwrite");
        assert!(!headers.contains_key("x-absent"), "replace must not create");
        assert_eq!(headers["x-gateway"], "micro");
        let tags: Vec<_> = headers.get_all("x-tag").iter().collect();
        assert_eq!(tags, ["a", "b"]);
    }

    #[test]
    fn bad_entries_are_named() {
        let error = serde_json::from_value::<HeaderTransform>(serde_json::json!({
            "add": { "headers": ["no-colon"] }
        }))
        .unwrap_err();
        assert!(error.to_string().contains("`no-colon`"), "{error}");
        let error = serde_json::from_value::<HeaderTransform>(serde_json::json!({
            "add": { "headers": ["bad name:1"] }
        }))
        .unwrap_err();
        assert!(error.to_string().contains("`bad name`"), "{error}");
    }
}
