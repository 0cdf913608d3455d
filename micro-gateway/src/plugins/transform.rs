//! Header transforms of requests and responses (the header parts of Kong's
//! `request-transformer` and `response-transformer`).

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
        use serde::de::Error;

        #[derive(Deserialize, Default)]
        #[serde(default, deny_unknown_fields)]
        struct Raw {
            remove: Section,
            rename: Section,
            replace: Section,
            add: Section,
            append: Section,
        }

        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Section {
            headers: Vec<String>,
        }

        fn name<E: Error>(text: &str) -> Result<HeaderName, E> {
            HeaderName::from_bytes(text.trim().as_bytes())
                .map_err(|_| E::custom(format!("`{text}` is not a header name")))
        }

        fn pair<E: Error>(entry: &str) -> Result<(HeaderName, String), E> {
            let (left, right) = entry
                .split_once(':')
                .ok_or_else(|| E::custom(format!("`{entry}` is not written `name:value`")))?;
            Ok((name(left)?, right.trim().to_owned()))
        }

        fn pairs<E: Error>(entries: &[String]) -> Result<Vec<(HeaderName, HeaderValue)>, E> {
            entries
                .iter()
                .map(|entry| {
                    let (name, value) = pair::<E>(entry)?;
                    let value = HeaderValue::try_from(value)
                        .map_err(|_| E::custom(format!("`{entry}` has an invalid header value")))?;
                    Ok((name, value))
                })
                .collect()
        }

        let raw = Raw::deserialize(deserializer)?;
        Ok(Self {
            remove: raw
                .remove
                .headers
                .iter()
                .map(|text| name::<D::Error>(text))
                .collect::<Result<_, _>>()?,
            rename: raw
                .rename
                .headers
                .iter()
                .map(|entry| {
                    let (old, new) = pair::<D::Error>(entry)?;
                    Ok((old, name::<D::Error>(&new)?))
                })
                .collect::<Result<_, D::Error>>()?,
            replace: pairs(&raw.replace.headers)?,
            add: pairs(&raw.add.headers)?,
            append: pairs(&raw.append.headers)?,
        })
    }
}

/// Which side of the exchange a [`Transform`] edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

/// Applies [`Transform`].
#[derive(Debug, Clone)]
pub struct TransformLayer {
    transform: Arc<HeaderTransform>,
    side: Side,
}

impl TransformLayer {
    /// Edits the headers of each request before it goes on.
    pub fn request(transform: HeaderTransform) -> Self {
        Self {
            transform: Arc::new(transform),
            side: Side::Request,
        }
    }

    /// Edits the headers of each response before it goes back.
    pub fn response(transform: HeaderTransform) -> Self {
        Self {
            transform: Arc::new(transform),
            side: Side::Response,
        }
    }
}

impl<S> Layer<S> for TransformLayer {
    type Service = Transform<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Transform {
            inner,
            transform: self.transform.clone(),
            side: self.side,
        }
    }
}

/// Edits request or response headers with a [`HeaderTransform`].
#[derive(Debug, Clone)]
pub struct Transform<S> {
    inner: S,
    transform: Arc<HeaderTransform>,
    side: Side,
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

impl<S: HttpService> Service<Request<Body>> for Transform<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        match self.side {
            Side::Request => {
                self.transform.apply(request.headers_mut());
                Box::pin(self.inner.call(request))
            }
            Side::Response => {
                let transform = self.transform.clone();
                let response = self.inner.call(request);
                Box::pin(async move {
                    let mut response = response.await?;
                    transform.apply(response.headers_mut());
                    Ok(response)
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
