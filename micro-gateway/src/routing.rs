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
//!
//! # Lookup
//!
//! A [`RouteTable`] keeps an index in front of those checks: a trie of the literal
//! path segments each pattern starts with (`/api/orders/{id}` files under `api` →
//! `orders`), split by exact host and by method. A lookup walks the request's path
//! segments down the trie of its host and the trie of routes without an exact host,
//! collects the routes filed along the way under its method or under no method, and
//! runs the full checks on those candidates alone, in precedence order. The winner is
//! the one a scan of every route in precedence order would pick, at a cost that follows
//! the number of candidates, not the size of the table.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
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
                (normalized(path) == exact).then(|| (Params::default(), path.len()))
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

    /// The literal segments every path this pattern matches begins with: all of a
    /// prefix's or an exact path's, a template's up to its first parameter.
    fn literal_prefix(&self) -> Vec<&str> {
        match &self.kind {
            PathKind::Exact(p) | PathKind::Prefix(p) if p == "/" => Vec::new(),
            PathKind::Exact(p) | PathKind::Prefix(p) => p[1..].split('/').collect(),
            PathKind::Template { segments, .. } => segments
                .iter()
                .map_while(|segment| match segment {
                    Segment::Literal(literal) => Some(literal.as_str()),
                    Segment::Param(_) => None,
                })
                .collect(),
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
    normalized(path).to_owned()
}

/// `path` without its trailing slashes, `/` when nothing else is left.
fn normalized(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        "/"
    } else {
        trimmed
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
        match self.0.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1 && {
                    let dot = host.len() - suffix.len() - 1;
                    host.as_bytes()[dot] == b'.'
                        && host.as_bytes()[dot + 1..].eq_ignore_ascii_case(suffix.as_bytes())
                }
            }
            None => host.eq_ignore_ascii_case(&self.0),
        }
    }

    /// The host when the pattern names exactly one, not a wildcard.
    fn exact(&self) -> Option<&str> {
        (!self.0.starts_with("*.")).then_some(self.0.as_str())
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

/// Routes in precedence order, with an index in front (see [Lookup](self#lookup)).
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Predicates>,
    /// The routes, most specific first.
    order: Vec<usize>,
    /// Each route's place in `order`.
    position: Vec<usize>,
    /// Routes whose hosts are all exact, by (lowercase) host.
    by_host: HashMap<String, Trie>,
    /// Routes without a host predicate or with a wildcard host.
    any_host: Trie,
}

/// Routes filed by the literal path segments their patterns begin with.
#[derive(Debug, Clone, Default)]
struct Trie {
    root: Node,
}

#[derive(Debug, Clone, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    here: Bucket,
}

/// The routes filed at one node: those without a method predicate, and the others by
/// method.
#[derive(Debug, Clone, Default)]
struct Bucket {
    any_method: Vec<usize>,
    by_method: Vec<(Method, Vec<usize>)>,
}

impl Trie {
    fn insert(&mut self, segments: &[&str], methods: &[Method], route: usize) {
        let mut node = &mut self.root;
        for segment in segments {
            node = node.children.entry((*segment).into()).or_default();
        }
        let bucket = &mut node.here;
        if methods.is_empty() {
            push_once(&mut bucket.any_method, route);
        }
        for method in methods {
            match bucket.by_method.iter_mut().find(|(m, _)| m == method) {
                Some((_, routes)) => push_once(routes, route),
                None => bucket.by_method.push((method.clone(), vec![route])),
            }
        }
    }

    /// Adds to `out` every route filed along `path`'s segments under `method` or under
    /// no method.
    fn collect(&self, method: &Method, path: &str, out: &mut Vec<usize>) {
        let mut node = &self.root;
        let mut segments = path[1..].split('/');
        loop {
            out.extend_from_slice(&node.here.any_method);
            if let Some((_, routes)) = node.here.by_method.iter().find(|(m, _)| m == method) {
                out.extend_from_slice(routes);
            }
            match segments
                .next()
                .and_then(|segment| node.children.get(segment))
            {
                Some(child) => node = child,
                None => return,
            }
        }
    }
}

fn push_once(routes: &mut Vec<usize>, route: usize) {
    if routes.last() != Some(&route) {
        routes.push(route);
    }
}

impl RouteTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route; its index is the number of routes added before it.
    pub fn add(&mut self, predicates: Predicates) -> usize {
        let index = self.routes.len();
        self.file(index, &predicates);
        self.routes.push(predicates);
        let mut order: Vec<usize> = (0..self.routes.len()).collect();
        order.sort_by(|&a, &b| {
            rank(&self.routes[b])
                .cmp(&rank(&self.routes[a]))
                .then(a.cmp(&b))
        });
        self.position = vec![0; order.len()];
        for (place, &route) in order.iter().enumerate() {
            self.position[route] = place;
        }
        self.order = order;
        index
    }

    /// Files route `index` in the index: under each exact host (or with the routes of
    /// any host), at the literal prefix of each of its path patterns (or at the root),
    /// under each of its methods (or under none).
    fn file(&mut self, index: usize, route: &Predicates) {
        let exact_hosts: Option<Vec<&str>> = route.hosts.iter().map(HostPattern::exact).collect();
        let prefixes: Vec<Vec<&str>> = if route.paths.is_empty() {
            vec![Vec::new()]
        } else {
            route
                .paths
                .iter()
                .map(PathPattern::literal_prefix)
                .collect()
        };
        let file_in = |trie: &mut Trie| {
            for prefix in &prefixes {
                trie.insert(prefix, &route.methods, index);
            }
        };
        match exact_hosts {
            Some(mut hosts) if !hosts.is_empty() => {
                hosts.sort_unstable();
                hosts.dedup();
                for host in hosts {
                    file_in(self.by_host.entry(host.to_owned()).or_default());
                }
            }
            _ => file_in(&mut self.any_host),
        }
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
        if !path.starts_with('/') {
            // Not a path the index files; only an exact `/` or a prefix `/` can match it.
            return self
                .order
                .iter()
                .find_map(|&index| self.check(index, method, host, path, headers));
        }
        let mut candidates = Vec::new();
        self.any_host.collect(method, path, &mut candidates);
        if let Some(host) = host {
            let host = match host.bytes().any(|b| b.is_ascii_uppercase()) {
                true => Cow::Owned(host.to_ascii_lowercase()),
                false => Cow::Borrowed(host),
            };
            if let Some(trie) = self.by_host.get(&*host) {
                trie.collect(method, path, &mut candidates);
            }
        }
        candidates.sort_unstable_by_key(|&index| self.position[index]);
        candidates.dedup();
        candidates
            .into_iter()
            .find_map(|index| self.check(index, method, host, path, headers))
    }

    /// Every route checked in precedence order, without the index: what
    /// [`find`](Self::find) must agree with.
    #[cfg(test)]
    fn find_by_scan(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<Match> {
        let host = host.map(strip_port);
        self.order
            .iter()
            .find_map(|&index| self.check(index, method, host, path, headers))
    }

    /// Route `index`'s full checks against the request.
    fn check(
        &self,
        index: usize,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<Match> {
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

    const SEGMENTS: [&str; 5] = ["a", "b", "api", "", "A"];

    fn arbitrary_pattern() -> impl Strategy<Value = PathPattern> {
        let segment = prop_oneof![
            4 => prop::sample::select(&SEGMENTS[..]).prop_map(str::to_owned),
            1 => Just("{p}".to_owned()),
        ];
        (
            prop::sample::select(&["", "=", ""][..]),
            prop::collection::vec(segment, 0..4),
            prop::sample::select(&["", "/", "/{*rest}"][..]),
        )
            .prop_filter_map("a valid pattern", |(exact, segments, tail)| {
                PathPattern::parse(&format!("{exact}/{}{tail}", segments.join("/"))).ok()
            })
    }

    fn arbitrary_route() -> impl Strategy<Value = Predicates> {
        let methods = prop::collection::vec(
            prop::sample::select(vec![Method::GET, Method::POST, Method::DELETE]),
            0..3,
        );
        let hosts = prop::collection::vec(
            prop::sample::select(&["a.example", "B.example", "*.example", "*.a.example"][..])
                .prop_map(HostPattern::new),
            0..3,
        );
        let headers = prop::collection::vec(
            prop::sample::select(&["1", "2"][..]).prop_map(|v| {
                (
                    HeaderName::from_static("x-v"),
                    vec![HeaderValue::from_static(v)],
                )
            }),
            0..2,
        );
        (
            prop::collection::vec(arbitrary_pattern(), 0..3),
            methods,
            hosts,
            headers,
        )
            .prop_map(|(paths, methods, hosts, headers)| Predicates {
                paths,
                methods,
                hosts,
                headers,
            })
    }

    fn arbitrary_request() -> impl Strategy<Value = (Method, Option<String>, String, HeaderMap)> {
        let segment = prop::sample::select(&SEGMENTS[..]);
        (
            prop::sample::select(vec![Method::GET, Method::POST, Method::PUT]),
            prop::option::of(prop::sample::select(
                &[
                    "a.example",
                    "A.EXAMPLE:8080",
                    "x.a.example",
                    "b.example",
                    "example",
                ][..],
            )),
            prop::collection::vec(segment, 0..5),
            prop::sample::select(&["", "/", "x"][..]),
            prop::option::of(prop::sample::select(&["1", "2"][..])),
        )
            .prop_map(|(method, host, segments, tail, header)| {
                let mut headers = HeaderMap::new();
                if let Some(value) = header {
                    headers.insert("x-v", HeaderValue::from_static(value));
                }
                let path = match tail {
                    "x" => segments.join("/"),
                    tail => format!("/{}{tail}", segments.join("/")),
                };
                (method, host.map(str::to_owned), path, headers)
            })
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
        fn the_index_finds_what_a_scan_finds(
            table in prop::collection::vec(arbitrary_route(), 1..40),
            requests in prop::collection::vec(arbitrary_request(), 1..20),
        ) {
            let table = routes(table);
            for (method, host, path, headers) in requests {
                let host = host.as_deref();
                prop_assert_eq!(
                    table.find(&method, host, &path, &headers),
                    table.find_by_scan(&method, host, &path, &headers),
                    "{} {:?} {}", method, host, path
                );
            }
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
