//! Cross-origin resource sharing (Kong's `cors`), built on tower-http's CORS layer.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Which browser origins may call a route, and with what.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CorsConfig {
    /// Allowed origins; `["*"]` allows any.
    pub origins: Vec<String>,
    /// Allowed methods; empty allows the common ones.
    pub methods: Vec<String>,
    /// Request headers a browser may send; empty mirrors what the preflight asks for.
    pub headers: Vec<String>,
    /// Response headers a browser may read.
    pub exposed_headers: Vec<String>,
    /// Whether credentials (cookies, `Authorization`) may be sent.
    pub credentials: bool,
    /// How long a browser may cache a preflight answer, in seconds.
    pub max_age: Option<u64>,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            origins: vec!["*".to_owned()],
            methods: Vec::new(),
            headers: Vec::new(),
            exposed_headers: Vec::new(),
            credentials: false,
            max_age: None,
        }
    }
}

/// A [`CorsConfig`] that cannot be honoured.
#[derive(Debug, thiserror::Error)]
#[error("invalid cors configuration: {0}")]
pub struct InvalidCors(String);

impl CorsConfig {
    /// Builds the layer.
    ///
    /// # Errors
    ///
    /// When a method, header or origin is malformed, or credentials are allowed together
    /// with any origin (browsers refuse that combination).
    pub fn layer(&self) -> Result<CorsLayer, InvalidCors> {
        let any_origin = self.origins.iter().any(|o| o == "*");
        if any_origin && self.credentials {
            return Err(InvalidCors(
                "credentials cannot be allowed for any origin (`*`): list the origins".to_owned(),
            ));
        }
        let mut layer = CorsLayer::new();
        layer = if any_origin {
            layer.allow_origin(AllowOrigin::any())
        } else {
            let origins = self
                .origins
                .iter()
                .map(|o| {
                    HeaderValue::from_str(o).map_err(|_| InvalidCors(format!("bad origin `{o}`")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            layer.allow_origin(origins)
        };
        let methods = if self.methods.is_empty() {
            vec![
                Method::GET,
                Method::HEAD,
                Method::PUT,
                Method::PATCH,
                Method::POST,
                Method::DELETE,
                Method::OPTIONS,
            ]
        } else {
            self.methods
                .iter()
                .map(|m| {
                    Method::from_bytes(m.as_bytes())
                        .map_err(|_| InvalidCors(format!("bad method `{m}`")))
                })
                .collect::<Result<_, _>>()?
        };
        layer = layer.allow_methods(methods);
        layer = if self.headers.is_empty() {
            layer.allow_headers(tower_http::cors::AllowHeaders::mirror_request())
        } else {
            layer.allow_headers(names(&self.headers)?)
        };
        if !self.exposed_headers.is_empty() {
            layer = layer.expose_headers(names(&self.exposed_headers)?);
        }
        if self.credentials {
            layer = layer.allow_credentials(true);
        }
        if let Some(seconds) = self.max_age {
            layer = layer.max_age(Duration::from_secs(seconds));
        }
        Ok(layer)
    }
}

fn names(texts: &[String]) -> Result<Vec<HeaderName>, InvalidCors> {
    texts
        .iter()
        .map(|h| {
            HeaderName::from_bytes(h.trim().as_bytes())
                .map_err(|_| InvalidCors(format!("bad header `{h}`")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_with_any_origin_are_refused() {
        let config = CorsConfig {
            credentials: true,
            ..CorsConfig::default()
        };
        assert!(config
            .layer()
            .unwrap_err()
            .to_string()
            .contains("credentials"));
        let config = CorsConfig {
            origins: vec!["https://shop.example".into()],
            credentials: true,
            ..CorsConfig::default()
        };
        assert!(config.layer().is_ok());
        let config = CorsConfig {
            methods: vec!["GE T".into()],
            ..CorsConfig::default()
        };
        assert!(config.layer().unwrap_err().to_string().contains("`GE T`"));
    }
}
