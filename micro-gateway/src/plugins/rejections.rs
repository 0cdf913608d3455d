//! The rejection counter shared by the plugins that refuse requests.

use axum::body::Body;
use http::Request;

use crate::gateway::MatchedRoute;

/// Counts `micro_gateway_rejections_total{route, reason}`, `route` being the name of the
/// gateway route the request matched (empty outside a [`Gateway`](crate::gateway::Gateway)).
pub(crate) fn count_rejection(request: &Request<Body>, reason: &'static str) {
    let route = request
        .extensions()
        .get::<MatchedRoute>()
        .map(|matched| matched.name.to_string())
        .unwrap_or_default();
    metrics::counter!("micro_gateway_rejections_total", "route" => route, "reason" => reason)
        .increment(1);
}
