//! Which route a request belongs to: path (exact, prefix, or a template with
//! parameters), method, host and header predicates, and the most specific match wins.
//!
//! # Path patterns
//!
//! | pattern | matches |
//! |---|---|
//! | `/api/users` | `/api/users` and everything below it (`/api/users/7`), not `/api/usersx` |
//! | `=/health` | exactly `/health` |
//! | `/api/orders/{id}` | one segment for `id`, and everything below it |
//! | `/files/{*rest}` | everything below `/files/`, the rest captured |
//!
//! A prefix pattern is what Kong's `paths` are; templates are ours. Captured parameters
//! are returned with the match and can be used to rewrite the upstream path.
//!
//! # Precedence
//!
//! Among the routes that match, the one that wins is, in order: the one with a host
//! predicate; then the one with more header predicates; then the one with a method
//! predicate; then an exact path over a template over a prefix; then the longer pattern;
//! then the one declared first. The rule is the same as Kong's in spirit: the more a
//! route says about a request, the more it is trusted with it.

use std::collections::BTreeMap;
use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// A path pattern that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid route pattern `{pattern}`: {reason}")]
pub struct InvalidPattern {
    pattern: String,
    reason: String,
}

impl InvalidPattern {
    fn new(pattern: &str, reason: impl Into<String>) -> Self {
        Self {
            pattern: pattern.to_owned(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// A parsed path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    kind: PathKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathKind {
    Exact(String),
    Prefix(String),
    Template {
        segments: Vec<Segment>,
        catch_all: Option<String>,
    },
}

impl PathPattern {
    /// Parses a pattern; see the [module docs](self).
    ///
    /// # Errors
    ///
    /// When it does not start with `/`, has an empty or repeated parameter name, a
    /// catch-all that is not last, or a brace in the middle of a segment.
    pub fn parse(pattern: &str) -> Result<Self, InvalidPattern> {
        let (exact, path) = match pattern.strip_prefix('=') {
            Some(rest) => (true, rest),
            None => (false, pattern),
        };
        if !path.starts_with('/') {
            return Err(InvalidPattern::new(pattern, "it must start with `/`"));
        }
        if !path.contains(['{', '}']) {
            let path = normalize(path);
            let kind = if exact {
                PathKind::Exact(path)
            } else {
                PathKind::Prefix(path)
            };
            return Ok(Self {
                text: pattern.to_owned(),
                kind,
            });
        }
        if exact {
            return Err(InvalidPattern::new(
                pattern,
                "an exact path cannot have parameters",
            ));
        }
        let mut segments = Vec::new();
        let mut catch_all = None;
        let mut names = Vec::new();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        for (index, part) in parts.iter().enumerate() {
            if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                let (name, is_catch_all) = match inner.strip_prefix('*') {
                    Some(name) => (name, true),
                    None => (inner, false),
                };
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(InvalidPattern::new(
                        pattern,
                        format!("bad parameter name `{inner}`"),
                    ));
                }
                if names.contains(&name) {
                    return Err(InvalidPattern::new(
                        pattern,
                        format!("parameter `{name}` appears twice"),
                    ));
                }
                names.push(name);
                if is_catch_all {
                    if index != parts.len() - 1 {
                        return Err(InvalidPattern::new(
                            pattern,
                            "a catch-all must be the last segment",
                        ));
                    }
                    catch_all = Some(name.to_owned());
                } else {
                    segments.push(Segment::Param(name.to_owned()));
                }
            } else if part.contains(['{', '}']) {
                return Err(InvalidPattern::new(
                    pattern,
                    format!("segment `{part}` mixes text and a parameter"),
                ));
            } else {
                segments.push(Segment::Literal((*part).to_owned()));
            }
        }
        Ok(Self {
            text: pattern.to_owned(),
            kind: PathKind::Template {
                segments,
                catch_all,
            },
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Matches `path`, returning the captured parameters and the length of the matched
    /// prefix of `path` (what `strip_path` removes).
    pub fn matches(&self, path: &str) -> Option<(Params, usize)> {
        match &self.kind {
            PathKind::Exact(exact) => {
                (normalize(path) == *exact).then(|| (Params::default(), path.len()))
            }
            PathKind::Prefix(prefix) => {
                if prefix == "/" {
                    return Some((Params::default(), 0));
                }
                let rest = path.strip_prefix(prefix.as_str())?;
                (rest.is_empty() || rest.starts_with('/'))
                    .then(|| (Params::default(), prefix.len()))
            }
            PathKind::Template {
                segments,
                catch_all,
            } => {
                let mut params = Params::default();
                let mut consumed = 0;
                let mut rest = path;
                for segment in segments {
                    let after_slash = rest.strip_prefix('/')?;
                    let end = after_slash.find('/').unwrap_or(after_slash.len());
                    let value = &after_slash[..end];
                    match segment {
                        Segment::Literal(literal) if literal == value => {}
                        Segment::Param(name) if !value.is_empty() => {
                            params.0.insert(name.clone(), value.to_owned());
                        }
                        _ => return None,
                    }
                    consumed += 1 + end;
                    rest = &after_slash[end..];
                }
                if let Some(name) = catch_all {
                    let tail = rest.strip_prefix('/').unwrap_or(rest);
                    params.0.insert(name.clone(), tail.to_owned());
                    return Some((params, path.len()));
                }
                (rest.is_empty() || rest.starts_with('/')).then_some((params, consumed))
            }
        }
    }

    fn rank(&self) -> (u8, usize) {
        match &self.kind {
            PathKind::Exact(p) => (2, p.len()),
            PathKind::Template { .. } => (1, self.text.len()),
            PathKind::Prefix(p) => (0, p.len()),
        }
    }
}

fn normalize(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// Path parameters captured by a template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    /// The value of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Every parameter, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Fills `{name}` placeholders of `template` with the captured values
    /// (`/users/{id}` with `id = 7` gives `/users/7`); an unknown name is left as it is.
    pub fn render(&self, template: &str) -> String {
        let mut out = template.to_owned();
        for (name, value) in &self.0 {
            out = out.replace(&format!("{{{name}}}"), value);
            out = out.replace(&format!("{{*{name}}}"), value);
        }
        out
    }
}

/// A host predicate: `api.example.com` or `*.example.com`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern(String);

impl HostPattern {
    /// Parses a host pattern (lowercased; a leading `*.` is a wildcard of one label or
    /// more).
    pub fn new(host: &str) -> Self {
        Self(host.trim().to_ascii_lowercase())
    }

    /// Whether the request's host (without the port) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        match self.0.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
            None => host == self.0,
        }
    }
}

/// What a route requires of a request. Empty lists require nothing.
#[derive(Debug, Clone, Default)]
pub struct Predicates {
    /// Path patterns; one must match.
    pub paths: Vec<PathPattern>,
    /// Methods; one must match.
    pub methods: Vec<Method>,
    /// Hosts; one must match the `Host` header (or the URI's authority).
    pub hosts: Vec<HostPattern>,
    /// Headers; each must be present with one of its values.
    pub headers: Vec<(HeaderName, Vec<HeaderValue>)>,
}

/// A match: which route, its parameters and how much of the path the route's pattern
/// covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// The index of the route, in the order routes were added.
    pub route: usize,
    /// The parameters the path template captured.
    pub params: Params,
    /// The length of the path prefix the pattern matched.
    pub matched_len: usize,
}

/// Routes in precedence order.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Predicates>,
    order: Vec<usize>,
}

impl RouteTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route; its index is the number of routes added before it.
    pub fn add(&mut self, predicates: Predicates) -> usize {
        self.routes.push(predicates);
        let mut order: Vec<usize> = (0..self.routes.len()).collect();
        order.sort_by(|&a, &b| {
            rank(&self.routes[b])
                .cmp(&rank(&self.routes[a]))
                .then(a.cmp(&b))
        });
        self.order = order;
        self.routes.len() - 1
    }

    /// The number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether the table has no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The most specific route that matches the request, if any.
    pub fn find(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<Match> {
        let host = host.map(strip_port);
        self.order.iter().find_map(|&index| {
            let route = &self.routes[index];
            if !route.methods.is_empty() && !route.methods.contains(method) {
                return None;
            }
            if !route.hosts.is_empty()
                && !host.is_some_and(|h| route.hosts.iter().any(|p| p.matches(h)))
            {
                return None;
            }
            let headers_ok = route.headers.iter().all(|(name, values)| {
                headers
                    .get_all(name)
                    .iter()
                    .any(|v| values.iter().any(|want| want == v))
            });
            if !headers_ok {
                return None;
            }
            if route.paths.is_empty() {
                return Some(Match {
                    route: index,
                    params: Params::default(),
                    matched_len: 0,
                });
            }
            // The most specific of this route's own patterns.
            let mut best: Option<((u8, usize), Params, usize)> = None;
            for pattern in &route.paths {
                if let Some((params, len)) = pattern.matches(path) {
                    if best
                        .as_ref()
                        .is_none_or(|(rank, _, _)| pattern.rank() > *rank)
                    {
                        best = Some((pattern.rank(), params, len));
                    }
                }
            }
            best.map(|(_, params, matched_len)| Match {
                route: index,
                params,
                matched_len,
            })
        })
    }
}

fn rank(route: &Predicates) -> (bool, usize, bool, (u8, usize)) {
    let best_path = route
        .paths
        .iter()
        .map(PathPattern::rank)
        .max()
        .unwrap_or((0, 0));
    (
        !route.hosts.is_empty(),
        route.headers.len(),
        !route.methods.is_empty(),
        best_path,
    )
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| h.trim_start_matches('['));
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn path(p: &str) -> PathPattern {
        PathPattern::parse(p).unwrap()
    }

    fn routes(list: Vec<Predicates>) -> RouteTable {
        let mut table = RouteTable::new();
        for p in list {
            table.add(p);
        }
        table
    }

    fn find(table: &RouteTable, method: Method, host: &str, p: &str) -> Option<usize> {
        table
            .find(&method, Some(host), p, &HeaderMap::new())
            .map(|m| m.route)
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let p = path("/api/users");
        assert_eq!(p.matches("/api/users").unwrap().1, 10);
        assert_eq!(p.matches("/api/users/7").unwrap().1, 10);
        assert!(p.matches("/api/usersx").is_none());
        assert!(p.matches("/api").is_none());
        assert!(path("/").matches("/anything").is_some());
    }

    #[test]
    fn exact_paths_match_only_themselves() {
        let p = path("=/health");
        assert!(p.matches("/health").is_some());
        assert!(p.matches("/health/").is_some());
        assert!(p.matches("/health/x").is_none());
    }

    #[test]
    fn templates_capture_parameters_and_catch_alls() {
        let (params, len) = path("/api/orders/{id}")
            .matches("/api/orders/42/items")
            .unwrap();
        assert_eq!(params.get("id"), Some("42"));
        assert_eq!(len, "/api/orders/42".len());
        assert!(path("/api/orders/{id}").matches("/api/orders/").is_none());
        let (params, _) = path("/files/{*rest}").matches("/files/a/b.txt").unwrap();
        assert_eq!(params.get("rest"), Some("a/b.txt"));
        assert_eq!(params.render("/v2/{*rest}"), "/v2/a/b.txt");
    }

    #[test]
    fn bad_patterns_are_named_with_the_reason() {
        for (bad, reason) in [
            ("api", "start with `/`"),
            ("/a/{}", "bad parameter name"),
            ("/a/{id}/{id}", "appears twice"),
            ("/a/{*rest}/b", "catch-all must be the last"),
            ("/a/x{id}", "mixes text"),
            ("=/a/{id}", "exact path cannot"),
        ] {
            let error = PathPattern::parse(bad).unwrap_err().to_string();
            assert!(error.contains(bad) && error.contains(reason), "{error}");
        }
    }

    #[test]
    fn hosts_match_exactly_or_by_wildcard() {
        assert!(HostPattern::new("API.example.com").matches("api.example.com"));
        assert!(HostPattern::new("*.example.com").matches("a.b.example.com"));
        assert!(!HostPattern::new("*.example.com").matches("example.com"));
        assert!(!HostPattern::new("*.example.com").matches("badexample.com"));
    }

    #[test]
    fn the_most_specific_route_wins() {
        let table = routes(vec![
            Predicates {
                paths: vec![path("/api")],
                ..Default::default()
            },
            Predicates {
                paths: vec![path("/api/users")],
                ..Default::default()
            },
            Predicates {
                paths: vec![path("/api/users/{id}")],
                ..Default::default()
            },
            Predicates {
                paths: vec![path("=/api/users/me")],
                ..Default::default()
            },
            Predicates {
                paths: vec![path("/api/users")],
                methods: vec![Method::POST],
                ..Default::default()
            },
            Predicates {
                paths: vec![path("/api")],
                hosts: vec![HostPattern::new("admin.example.com")],
                ..Default::default()
            },
        ]);
        assert_eq!(
            find(&table, Method::GET, "shop.example.com", "/api/products"),
            Some(0)
        );
        assert_eq!(
            find(&table, Method::GET, "shop.example.com", "/api/users"),
            Some(1)
        );
        assert_eq!(
            find(&table, Method::GET, "shop.example.com", "/api/users/7"),
            Some(2)
        );
        assert_eq!(
            find(&table, Method::GET, "shop.example.com", "/api/users/me"),
            Some(3)
        );
        assert_eq!(
            find(&table, Method::POST, "shop.example.com", "/api/users"),
            Some(4)
        );
        assert_eq!(
            find(&table, Method::GET, "admin.example.com:8080", "/api/users"),
            Some(5)
        );
        assert_eq!(
            find(&table, Method::GET, "shop.example.com", "/other"),
            None
        );
    }

    #[test]
    fn header_predicates_must_all_hold() {
        let table = routes(vec![
            Predicates {
                paths: vec![path("/api")],
                ..Default::default()
            },
            Predicates {
                paths: vec![path("/api")],
                headers: vec![(
                    HeaderName::from_static("x-version"),
                    vec![HeaderValue::from_static("2")],
                )],
                ..Default::default()
            },
        ]);
        let mut headers = HeaderMap::new();
        assert_eq!(
            table
                .find(&Method::GET, None, "/api/x", &headers)
                .unwrap()
                .route,
            0
        );
        headers.insert("x-version", HeaderValue::from_static("2"));
        assert_eq!(
            table
                .find(&Method::GET, None, "/api/x", &headers)
                .unwrap()
                .route,
            1
        );
    }

    proptest! {
        #[test]
        fn a_template_matches_the_path_built_from_it(
            first in "[a-z0-9_-]{1,12}",
            second in "[a-z0-9_.-]{1,12}",
            tail in "(/[a-z0-9]{1,6}){0,3}",
        ) {
            let pattern = path("/shop/{first}/items/{second}");
            let built = format!("/shop/{first}/items/{second}{tail}");
            let (params, len) = pattern.matches(&built).unwrap();
            prop_assert_eq!(params.get("first"), Some(first.as_str()));
            prop_assert_eq!(params.get("second"), Some(second.as_str()));
            prop_assert_eq!(len, built.len() - tail.len());
        }

        #[test]
        fn matching_never_panics(pattern in "\\PC{0,40}", request in "\\PC{0,60}") {
            if let Ok(p) = PathPattern::parse(&pattern) {
                let _ = p.matches(&request);
            }
            let _ = HostPattern::new(&pattern).matches(&request);
        }
    }
}
