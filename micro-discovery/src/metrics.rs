//! The metrics this crate records through the `metrics` facade; the table is in the
//! [crate docs](crate#metrics).

/// Gauge: healthy instances a balancer routes to, by `service`.
pub(crate) const INSTANCES: &str = "micro_discovery_instances";
/// Counter: failed reads of the registry and requests that found no instance, by
/// `service`.
pub(crate) const RESOLUTION_ERRORS: &str = "micro_discovery_resolution_errors_total";
/// Counter: instances ejected by passive health checking, by `service`.
pub(crate) const EJECTIONS: &str = "micro_discovery_ejections_total";

pub(crate) fn instances(service: &str, count: usize) {
    metrics::gauge!(INSTANCES, "service" => service.to_owned()).set(count as f64);
}

pub(crate) fn resolution_error(service: &str) {
    metrics::counter!(RESOLUTION_ERRORS, "service" => service.to_owned()).increment(1);
}

pub(crate) fn ejection(service: &str) {
    metrics::counter!(EJECTIONS, "service" => service.to_owned()).increment(1);
}
