//! The shop's deployment artifacts (`examples/shop/deploy/`): no Docker engine or cluster
//! runs here, so the Dockerfile and the Kubernetes manifests are parsed and checked against
//! what the shop binary does: its services and ports, its health endpoints, its drain
//! deadline, the `SHOP_` settings its configuration accepts, the secrets each service
//! uses, the features `shop serve` needs, and who may call whom (`shop::trust::CALLERS`,
//! which the NetworkPolicies must say too). `lint.sh` (kubernetes-validate, checkov,
//! hadolint) is run as well.
//!
//! Each check returns the problems it finds instead of panicking at the first, and the
//! tests at the end break a good manifest on purpose to show that every check can fail.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use micro_core::config::ConfigLoader;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml_ng::Value;
use shop::app::ShopConfig;
use shop::trust::{CALLERS, GATEWAY};

/// Every process of the shop: `shop serve <arg>`, its Kubernetes name, its port.
const SERVICES: [(&str, &str, u16); 8] = [
    ("user", "user-service", 8001),
    ("product", "product-service", 8002),
    ("order", "order-service", 8003),
    ("cart", "cart-service", 8004),
    ("payment", "payment-service", 8005),
    ("inventory", "inventory-service", 8006),
    ("notification", "notification-service", 8007),
    ("gateway", "gateway", 8080),
];

/// The Secret every secret setting comes from. It is not in the manifests: the operator
/// creates it once, with the command the docs show (`kubectl create secret generic`).
const SECRET: &str = "shop-secrets";

/// The keys of that Secret, the same in the docs' command, with a value of the kind the
/// command puts there (for loading the configuration).
const SECRET_KEYS: [(&str, &str); 2] = [
    (
        "SHOP_JWT_SECRET",
        "c2VjcmV0LWZvci10aGUtZGVwbG95LXRlc3RzLW9ubHktNDgtYnl0ZXMtbG9uZy0hIQ==",
    ),
    (
        "SHOP_POSTGRES_URL",
        "postgres://shop:PASSWORD@postgres:5432/shop",
    ),
];

/// Which services get each secret setting, and no other: the user service signs login
/// tokens and the gateway checks them; the services whose data is in PostgreSQL reach it.
/// (Every service signs and checks the calls between services with the keys file of
/// [`KEYS_SECRET`].)
const SECRET_USERS: [(&str, &[&str]); 2] = [
    ("SHOP_JWT_SECRET", &["user", "gateway"]),
    ("SHOP_POSTGRES_URL", &["user", "product", "order"]),
];

/// The Secret that holds the services' keys file, which every Deployment mounts as a
/// volume: not in the manifests either, created with the command the docs show.
const KEYS_SECRET: &str = "shop-identity-keys";

/// Its one key, the file the services read, with a value of the kind the docs' command
/// puts there.
const KEYS_SECRET_KEY: (&str, &str) = (
    "keys",
    "k1 aWRlbnRpdHktZm9yLXRoZS1kZXBsb3ktdGVzdHMtb25seS00OC1ieXRlcy1sb25nIQ==\n",
);

/// The setting that names the keys file; every service needs it.
const KEYS_FILE_SETTING: &str = "SHOP_IDENTITY_KEYS_FILE";

/// The setting for a single key in the environment, which the Deployments must not use:
/// a key in the environment changes only with a restart.
const KEY_IN_ENV_SETTING: &str = "SHOP_IDENTITY_SECRET";

/// Where the commands that create the Secrets are shown.
const SECRET_DOCS: [&str; 2] = ["docs/src/shop-deploy.md", "examples/shop/deploy/README.md"];

/// Variables the binary reads that are not `ShopConfig` settings.
const OTHER_ENV: [&str; 1] = ["RUST_LOG"];

/// Packages the builder stage needs (cmake for librdkafka, protoc for the etcd client).
const BUILD_PACKAGES: [&str; 6] = [
    "cmake",
    "protobuf-compiler",
    "libprotobuf-dev",
    "pkg-config",
    "libssl-dev",
    "zlib1g-dev",
];

/// The kinds the manifests use and their current stable API versions.
const API_VERSIONS: [(&str, &str); 10] = [
    ("Namespace", "v1"),
    ("ConfigMap", "v1"),
    ("Secret", "v1"),
    ("Service", "v1"),
    ("PersistentVolumeClaim", "v1"),
    ("Deployment", "apps/v1"),
    ("PodDisruptionBudget", "policy/v1"),
    ("HorizontalPodAutoscaler", "autoscaling/v2"),
    ("Ingress", "networking.k8s.io/v1"),
    ("NetworkPolicy", "networking.k8s.io/v1"),
];

/// The namespace Prometheus scrapes from, admitted on every service's port.
const MONITORING_NAMESPACE: &str = "monitoring";

/// The feature `shop serve <service>` needs, which the image must be built with.
const REQUIRED_FEATURE: &str = "real-servers";

/// The drain deadline when `SHOP_HOST__DRAIN_TIMEOUT` is not set.
const DEFAULT_DRAIN_SECONDS: f64 = 30.0;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shop/deploy")
}

// ---------------------------------------------------------------------------------------
// The subset of the Kubernetes API the checks read. Fields the checks need are required or
// defaulted; everything else is ignored.

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Object {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: Value,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    string_data: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    #[serde(default)]
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeploymentSpec {
    replicas: Option<u32>,
    selector: LabelSelector,
    #[serde(default)]
    strategy: Strategy,
    template: PodTemplate,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LabelSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct Strategy {
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PodTemplate {
    #[serde(default)]
    metadata: Metadata,
    spec: PodSpec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    termination_grace_period_seconds: Option<f64>,
    #[serde(default)]
    security_context: SecurityContext,
    containers: Vec<Container>,
    #[serde(default)]
    init_containers: Vec<Container>,
    #[serde(default)]
    volumes: Vec<Volume>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecurityContext {
    run_as_non_root: Option<bool>,
    run_as_user: Option<i64>,
    read_only_root_filesystem: Option<bool>,
    allow_privilege_escalation: Option<bool>,
    privileged: Option<bool>,
    capabilities: Option<Capabilities>,
}

#[derive(Debug, Default, Deserialize)]
struct Capabilities {
    #[serde(default)]
    drop: Vec<String>,
    #[serde(default)]
    add: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    name: String,
    #[serde(default)]
    image: String,
    command: Option<Vec<String>>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    ports: Vec<ContainerPort>,
    #[serde(default)]
    env: Vec<EnvVar>,
    #[serde(default)]
    env_from: Vec<EnvFrom>,
    liveness_probe: Option<Probe>,
    readiness_probe: Option<Probe>,
    startup_probe: Option<Probe>,
    lifecycle: Option<Lifecycle>,
    resources: Option<Resources>,
    #[serde(default)]
    security_context: SecurityContext,
    #[serde(default)]
    volume_mounts: Vec<VolumeMount>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPort {
    name: Option<String>,
    container_port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvVar {
    name: String,
    value: Option<String>,
    value_from: Option<EnvSource>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvSource {
    secret_key_ref: Option<KeyRef>,
    config_map_key_ref: Option<KeyRef>,
    field_ref: Option<FieldRef>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FieldRef {
    field_path: String,
}

#[derive(Debug, Deserialize)]
struct KeyRef {
    name: String,
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvFrom {
    prefix: Option<String>,
    config_map_ref: Option<NameRef>,
    secret_ref: Option<NameRef>,
}

#[derive(Debug, Deserialize)]
struct NameRef {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    http_get: Option<HttpGet>,
}

#[derive(Debug, Deserialize)]
struct HttpGet {
    path: String,
    port: IntOrString,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(u16),
    String(String),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Lifecycle {
    pre_stop: Option<Handler>,
}

#[derive(Debug, Deserialize)]
struct Handler {
    exec: Option<ExecAction>,
    sleep: Option<SleepAction>,
}

#[derive(Debug, Deserialize)]
struct ExecAction {
    command: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct SleepAction {
    seconds: f64,
}

#[derive(Debug, Deserialize)]
struct Resources {
    #[serde(default)]
    requests: BTreeMap<String, Value>,
    #[serde(default)]
    limits: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolumeMount {
    name: String,
    mount_path: String,
    #[serde(default)]
    read_only: bool,
    sub_path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Volume {
    name: String,
    persistent_volume_claim: Option<ClaimRef>,
    config_map: Option<NameRef>,
    secret: Option<SecretVolume>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretVolume {
    secret_name: String,
    #[serde(default)]
    items: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimRef {
    claim_name: String,
}

#[derive(Debug, Deserialize)]
struct ServiceSpec {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<ServicePort>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePort {
    port: u16,
    target_port: Option<IntOrString>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NetworkPolicySpec {
    pod_selector: Selector,
    policy_types: Option<Vec<String>>,
    #[serde(default)]
    ingress: Vec<IngressRule>,
    #[serde(default)]
    egress: Vec<Value>,
}

/// A label selector; `matchExpressions` is kept to be refused, as the checks don't read it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    match_expressions: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngressRule {
    #[serde(default)]
    from: Vec<Peer>,
    #[serde(default)]
    ports: Vec<PolicyPort>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Peer {
    pod_selector: Option<Selector>,
    namespace_selector: Option<Selector>,
    ip_block: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyPort {
    port: Option<IntOrString>,
    protocol: Option<String>,
    end_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HpaSpec {
    scale_target_ref: TargetRef,
    min_replicas: Option<u32>,
    max_replicas: u32,
}

#[derive(Debug, Deserialize)]
struct TargetRef {
    kind: String,
    name: String,
}

// ---------------------------------------------------------------------------------------
// Loading.

/// Every document of every manifest in `k8s/` but the kustomization, with its file.
fn load_manifests() -> Vec<(String, Value)> {
    let mut documents = Vec::new();
    for file in manifest_files() {
        let text = std::fs::read_to_string(deploy_dir().join("k8s").join(&file))
            .unwrap_or_else(|e| panic!("cannot read {file}: {e}"));
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"));
            if !value.is_null() {
                documents.push((file.clone(), value));
            }
        }
    }
    assert!(
        !documents.is_empty(),
        "no manifest in examples/shop/deploy/k8s"
    );
    documents
}

fn manifest_files() -> Vec<String> {
    let dir = deploy_dir().join("k8s");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    files.sort();
    files
}

fn typed<T: DeserializeOwned>(value: &Value, what: &str, problems: &mut Vec<String>) -> Option<T> {
    serde_yaml_ng::from_value(value.clone())
        .map_err(|e| problems.push(format!("{what}: {e}")))
        .ok()
}

// ---------------------------------------------------------------------------------------
// Values.

/// A Kubernetes quantity (`250m`, `0.5`, `1`, `128Mi`, `1G`) as a number.
fn quantity(value: &Value) -> Option<f64> {
    let text = match value {
        Value::Number(n) => return n.as_f64(),
        Value::String(s) => s.trim(),
        _ => return None,
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(number * factor)
}

fn resolve_port(port: &IntOrString, container: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(port) => Some(*port),
        IntOrString::String(name) => container
            .ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

/// A `SHOP_` variable as the TOML figment would read from it: `SHOP_HOST__DRAIN_TIMEOUT=30s`
/// is `host.drain_timeout = "30s"`.
fn toml_line(name: &str, value: &str) -> String {
    let key = name
        .trim_start_matches("SHOP_")
        .to_lowercase()
        .split("__")
        .collect::<Vec<_>>()
        .join(".");
    let value = if value.parse::<i64>().is_ok() || value == "true" || value == "false" {
        value.to_owned()
    } else {
        serde_json::to_string(value).unwrap()
    };
    format!("{key} = {value}\n")
}

// ---------------------------------------------------------------------------------------
// The checks.

/// Every object of the manifests by kind and name, with the file it is in.
struct Objects {
    all: BTreeMap<(String, String), (String, Object)>,
}

impl Objects {
    fn read(documents: &[(String, Value)], problems: &mut Vec<String>) -> Self {
        let mut objects = BTreeMap::new();
        for (file, value) in documents {
            let Some(object) = typed::<Object>(value, file, problems) else {
                continue;
            };
            let key = (object.kind.clone(), object.metadata.name.clone());
            if objects.contains_key(&key) {
                problems.push(format!("{file}: {} {} is defined twice", key.0, key.1));
            }
            objects.insert(key, (file.clone(), object));
        }
        Self { all: objects }
    }

    fn get(&self, kind: &str, name: &str) -> Option<&Object> {
        self.all
            .get(&(kind.to_owned(), name.to_owned()))
            .map(|(_, object)| object)
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Object> + 'a {
        self.all
            .iter()
            .filter(move |((k, _), _)| k == kind)
            .map(|(_, (_, object))| object)
    }

    /// The keys of a ConfigMap or Secret, with their values; those of the documented
    /// [`SECRET`], which is not in the manifests, for it.
    fn keys(&self, kind: &str, name: &str) -> Option<BTreeMap<String, String>> {
        if kind == "Secret" && name == SECRET {
            let keys = SECRET_KEYS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()));
            return Some(keys.collect());
        }
        if kind == "Secret" && name == KEYS_SECRET {
            let (key, value) = KEYS_SECRET_KEY;
            return Some(BTreeMap::from([(key.to_owned(), value.to_owned())]));
        }
        let object = self.get(kind, name)?;
        let mut keys = object.data.clone();
        keys.extend(object.string_data.clone());
        Some(keys)
    }
}

/// Every check on the manifests; empty when they are right.
fn check_manifests(documents: &[(String, Value)]) -> Vec<String> {
    let mut problems = Vec::new();
    let objects = Objects::read(documents, &mut problems);

    for ((kind, name), (file, object)) in &objects.all {
        match API_VERSIONS.iter().find(|(k, _)| k == kind) {
            None => problems.push(format!(
                "{file}: {kind} {name}: a kind the shop does not use"
            )),
            Some((_, version)) if *version != object.api_version => problems.push(format!(
                "{file}: {kind} {name} is {}, expected {version}",
                object.api_version
            )),
            Some(_) => {}
        }
        if kind == "Namespace" {
            continue;
        }
        if object.metadata.namespace.as_deref() != Some("shop") {
            problems.push(format!(
                "{file}: {kind} {name} is not in the shop namespace"
            ));
        }
    }
    for secret in objects.of_kind("Secret") {
        if !secret.data.is_empty() || !secret.string_data.is_empty() {
            problems.push(format!(
                "Secret {} is committed with values: create it by hand, as the docs show",
                secret.metadata.name
            ));
        }
        let name = &secret.metadata.name;
        if name == SECRET || name == KEYS_SECRET {
            problems.push(format!(
                "Secret {name} is in the manifests: applying them would overwrite the one \
                 created by hand"
            ));
        }
    }
    if objects.get("Namespace", "shop").is_none() {
        problems.push("no Namespace shop".to_owned());
    }

    let mut images = BTreeSet::new();
    for (service, name, port) in SERVICES {
        let Some(deployment) = objects.get("Deployment", name) else {
            problems.push(format!("{service}: no Deployment {name}"));
            continue;
        };
        let what = format!("Deployment {name}");
        let Some(spec) = typed::<DeploymentSpec>(&deployment.spec, &what, &mut problems) else {
            continue;
        };
        check_deployment(
            &objects,
            service,
            name,
            port,
            &spec,
            &mut images,
            &mut problems,
        );
        match objects.get("Service", name) {
            None => problems.push(format!("{service}: no Service {name}")),
            Some(object) => check_service(service, name, port, object, &spec, &mut problems),
        }
    }
    if images.len() > 1 {
        problems.push(format!("the services run different images: {images:?}"));
    }

    let known: BTreeSet<&str> = SERVICES.iter().map(|(_, name, _)| *name).collect();
    for deployment in objects.of_kind("Deployment") {
        let at = format!("Deployment {}", deployment.metadata.name);
        if let Some(spec) = typed::<DeploymentSpec>(&deployment.spec, &at, &mut Vec::new()) {
            check_pod_security(&at, &spec.template.spec, &mut problems);
        }
        if !known.contains(deployment.metadata.name.as_str()) {
            problems.push(format!(
                "Deployment {} runs no shop service",
                deployment.metadata.name
            ));
        }
    }

    problems.extend(check_network_policies(&objects, CALLERS));

    for hpa in objects.of_kind("HorizontalPodAutoscaler") {
        let what = format!("HorizontalPodAutoscaler {}", hpa.metadata.name);
        let Some(spec) = typed::<HpaSpec>(&hpa.spec, &what, &mut problems) else {
            continue;
        };
        let target = &spec.scale_target_ref;
        if target.kind != "Deployment" || objects.get("Deployment", &target.name).is_none() {
            problems.push(format!(
                "{what} scales {} {}, which is not defined",
                target.kind, target.name
            ));
        }
        let min = spec.min_replicas.unwrap_or(1);
        if min < 2 || min > spec.max_replicas {
            problems.push(format!(
                "{what}: replicas from {min} to {} (at least 2, min <= max)",
                spec.max_replicas
            ));
        }
    }

    let gateway = objects
        .get("Service", "gateway")
        .and_then(|s| typed::<ServiceSpec>(&s.spec, "Service gateway", &mut Vec::new()));
    let public = gateway.is_some_and(|s| s.kind.as_deref() == Some("LoadBalancer"))
        || objects.of_kind("Ingress").next().is_some();
    if !public {
        problems.push(
            "the gateway is not reachable from outside: no LoadBalancer Service, no Ingress"
                .to_owned(),
        );
    }

    problems
}

fn check_deployment(
    objects: &Objects,
    service: &str,
    name: &str,
    port: u16,
    spec: &DeploymentSpec,
    images: &mut BTreeSet<String>,
    problems: &mut Vec<String>,
) {
    let at = format!("Deployment {name}");
    let pod = &spec.template.spec;

    if spec.selector.match_labels.is_empty()
        || spec
            .selector
            .match_labels
            .iter()
            .any(|(k, v)| spec.template.metadata.labels.get(k) != Some(v))
    {
        problems.push(format!(
            "{at}: the selector does not match the pod's labels"
        ));
    }

    let [container] = pod.containers.as_slice() else {
        problems.push(format!(
            "{at}: one container expected, found {}",
            pod.containers.len()
        ));
        return;
    };
    let at = format!("{at}, container {}", container.name);
    images.insert(container.image.clone());
    if container.image.is_empty()
        || container.image.ends_with(":latest")
        || !container.image.contains(':')
    {
        problems.push(format!(
            "{at}: image `{}` has no fixed tag",
            container.image
        ));
    }
    if container.command.is_some() {
        problems.push(format!("{at}: `command` replaces the image's ENTRYPOINT"));
    }
    if container.args != ["serve", service] {
        problems.push(format!(
            "{at}: args {:?}, expected [\"serve\", \"{service}\"]",
            container.args
        ));
    }
    let ports: Vec<u16> = container.ports.iter().map(|p| p.container_port).collect();
    if ports != [port] {
        problems.push(format!(
            "{at}: container ports {ports:?}, expected [{port}]"
        ));
    }

    // Probes: the right endpoint on the service's own port.
    let probes = [
        (
            "livenessProbe",
            container.liveness_probe.as_ref(),
            &["/health/live"][..],
        ),
        (
            "readinessProbe",
            container.readiness_probe.as_ref(),
            &["/health/ready"][..],
        ),
        (
            "startupProbe",
            container.startup_probe.as_ref(),
            &["/health/live", "/health/ready"][..],
        ),
    ];
    for (probe_name, probe, paths) in probes {
        let Some(probe) = probe else {
            if probe_name != "startupProbe" {
                problems.push(format!("{at}: no {probe_name}"));
            }
            continue;
        };
        let Some(get) = &probe.http_get else {
            problems.push(format!("{at}: {probe_name} is not an httpGet"));
            continue;
        };
        if !paths.contains(&get.path.as_str()) {
            problems.push(format!(
                "{at}: {probe_name} asks {}, expected {paths:?}",
                get.path
            ));
        }
        if resolve_port(&get.port, container) != Some(port) {
            problems.push(format!(
                "{at}: {probe_name} asks port {:?}, expected {port}",
                get.port
            ));
        }
    }

    // Metrics are scraped from the same port.
    let annotations = &spec.template.metadata.annotations;
    if annotations.get("prometheus.io/port") != Some(&port.to_string())
        || annotations.get("prometheus.io/path").map(String::as_str) != Some("/metrics")
    {
        problems.push(format!(
            "{at}: prometheus annotations do not point at :{port}/metrics"
        ));
    }

    // Resources: requests and limits for cpu and memory, requests <= limits.
    match &container.resources {
        None => problems.push(format!("{at}: no resources")),
        Some(resources) => {
            for resource in ["cpu", "memory"] {
                let request = resources.requests.get(resource);
                let limit = resources.limits.get(resource);
                match (request.map(quantity), limit.map(quantity)) {
                    (Some(Some(request)), Some(Some(limit))) => {
                        if request > limit {
                            problems.push(format!(
                                "{at}: {resource} request {request} is above its limit {limit}"
                            ));
                        }
                    }
                    (None, _) => problems.push(format!("{at}: no {resource} request")),
                    (_, None) => problems.push(format!("{at}: no {resource} limit")),
                    _ => problems.push(format!("{at}: a {resource} quantity does not parse")),
                }
            }
        }
    }

    // Environment: names and values the shop's configuration accepts.
    let (env, config) = check_env(objects, &at, service, port, container, problems);

    // Shutdown: the preStop pause, then the drain, both inside the grace period.
    let pause = container
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|handler| match (&handler.sleep, &handler.exec) {
            (Some(sleep), _) => Some(sleep.seconds),
            (None, Some(exec)) => match exec.command.as_slice() {
                [sleep, seconds] if sleep == "sleep" || sleep.ends_with("/sleep") => {
                    seconds.parse().ok()
                }
                _ => None,
            },
            (None, None) => None,
        });
    let pause = match pause {
        Some(pause) if pause > 0.0 => pause,
        _ => {
            problems.push(format!("{at}: no preStop pause (`sleep N`)"));
            0.0
        }
    };
    let drain = config.as_ref().map_or(DEFAULT_DRAIN_SECONDS, |config| {
        config.host.drain_timeout.as_secs_f64()
    });
    match pod.termination_grace_period_seconds {
        None => problems.push(format!(
            "{at}: no terminationGracePeriodSeconds (the default 30 s cuts the drain short)"
        )),
        Some(grace) if grace <= pause + drain || grace <= 30.0 => problems.push(format!(
            "{at}: terminationGracePeriodSeconds {grace} leaves no time for the {pause} s \
             pause and the {drain} s drain"
        )),
        Some(_) => {}
    }

    // Security (non-root, read-only root) is checked for every Deployment, by
    // check_pod_security; here, the writable volumes the service needs.
    let volumes: BTreeMap<&str, &Volume> =
        pod.volumes.iter().map(|v| (v.name.as_str(), v)).collect();
    for mount in &container.volume_mounts {
        if !volumes.contains_key(mount.name.as_str()) {
            problems.push(format!("{at}: mounts undefined volume {}", mount.name));
        }
        // A mount inside another needs its mount point made in that volume, which a
        // ConfigMap or Secret volume (read-only, rewritten by the kubelet) can't hold.
        let nested_in = container.volume_mounts.iter().find(|outer| {
            let outer_path = outer.mount_path.trim_end_matches('/');
            outer.name != mount.name
                && mount
                    .mount_path
                    .strip_prefix(outer_path)
                    .is_some_and(|rest| rest.starts_with('/'))
        });
        if let Some(outer) = nested_in {
            problems.push(format!(
                "{at}: {} is mounted inside {} ({}): mount it beside it instead",
                mount.mount_path, outer.mount_path, outer.name
            ));
        }
    }
    let writable = |path: &str| {
        container
            .volume_mounts
            .iter()
            .any(|m| m.mount_path == path && !m.read_only)
    };
    let data_dir = config
        .as_ref()
        .and_then(|config| config.data_dir.as_ref())
        .map(|dir| dir.to_string_lossy().into_owned());
    match &data_dir {
        Some(dir) if writable(dir) => {}
        Some(dir) => problems.push(format!(
            "{at}: the data directory {dir} is not a writable mount (SHOP_DATA_DIR)"
        )),
        None => {}
    }

    // Replicas: a service whose data is on a claimed volume runs alone and is replaced,
    // not rolled; the others run at least two pods.
    let data_volume = container
        .volume_mounts
        .iter()
        .find(|m| Some(&m.mount_path) == data_dir.as_ref())
        .and_then(|m| volumes.get(m.name.as_str()));
    let replicas = spec.replicas.unwrap_or(1);
    match data_volume.and_then(|v| v.persistent_volume_claim.as_ref()) {
        Some(claim) => {
            if replicas != 1 || spec.strategy.kind.as_deref() != Some("Recreate") {
                problems.push(format!(
                    "{at}: its data is on claim {} (embedded storage): one replica and the \
                     Recreate strategy, found {replicas} and {:?}",
                    claim.claim_name, spec.strategy.kind
                ));
            }
            if objects
                .get("PersistentVolumeClaim", &claim.claim_name)
                .is_none()
            {
                problems.push(format!(
                    "{at}: no PersistentVolumeClaim {}",
                    claim.claim_name
                ));
            }
        }
        None if replicas < 2 => {
            problems.push(format!("{at}: {replicas} replica(s), at least 2 expected"));
        }
        None => {}
    }

    check_keys_file(&at, container, &volumes, &env, problems);
    if service == "gateway" {
        check_gateway_config(objects, &at, container, &volumes, &env, problems);
    }
}

/// The services' keys: `SHOP_IDENTITY_KEYS_FILE` names the file `keys` of a read-only mount
/// of the whole Secret [`KEYS_SECRET`], which the kubelet replaces in place when the Secret
/// changes, so that a rotated key reaches the running service (a `subPath` mount, an
/// `items` selection renaming the file, or a key in the environment would each need a
/// restart).
fn check_keys_file(
    at: &str,
    container: &Container,
    volumes: &BTreeMap<&str, &Volume>,
    env: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) {
    if env.contains_key(KEY_IN_ENV_SETTING) {
        problems.push(format!(
            "{at}: {KEY_IN_ENV_SETTING} is set: the services' keys come from \
             {KEYS_FILE_SETTING}, which follows a rotated Secret without a restart"
        ));
    }
    let Some(path) = env.get(KEYS_FILE_SETTING) else {
        problems.push(format!(
            "{at}: {KEYS_FILE_SETTING} is not set, and `shop serve` needs the services' keys"
        ));
        return;
    };
    // The deepest mount that holds the path is the one the file is read from.
    let mounted = container
        .volume_mounts
        .iter()
        .filter_map(|mount| {
            let file = path.strip_prefix(mount.mount_path.trim_end_matches('/'))?;
            Some((mount, file.strip_prefix('/')?))
        })
        .max_by_key(|(mount, _)| mount.mount_path.len());
    let Some((mount, file)) = mounted else {
        problems.push(format!(
            "{at}: {KEYS_FILE_SETTING} is {path}, which is in no mounted volume"
        ));
        return;
    };
    let secret = volumes
        .get(mount.name.as_str())
        .and_then(|volume| volume.secret.as_ref());
    match secret {
        Some(secret) if secret.secret_name == KEYS_SECRET => {
            if !secret.items.is_empty() {
                problems.push(format!(
                    "{at}: volume {} selects items of {KEYS_SECRET}; mount it whole",
                    mount.name
                ));
            }
        }
        _ => problems.push(format!(
            "{at}: {path} is not from the Secret {KEYS_SECRET} (volume {})",
            mount.name
        )),
    }
    if file != KEYS_SECRET_KEY.0 {
        problems.push(format!(
            "{at}: {KEYS_FILE_SETTING} names {file} in the mount, not the Secret's key `{}`",
            KEYS_SECRET_KEY.0
        ));
    }
    if !mount.read_only {
        problems.push(format!(
            "{at}: the keys at {} are mounted writable",
            mount.mount_path
        ));
    }
    if mount.sub_path.is_some() {
        problems.push(format!(
            "{at}: the keys are mounted with a subPath, which the kubelet never updates: \
             a rotated key would need a restart"
        ));
    }
}

/// Every container of the pod, init containers included, runs as a user other than root
/// (`runAsNonRoot`), cannot gain privileges, has every capability dropped and a read-only
/// root filesystem.
fn check_pod_security(at: &str, pod: &PodSpec, problems: &mut Vec<String>) {
    for container in pod.init_containers.iter().chain(&pod.containers) {
        let at = format!("{at}, container {}", container.name);
        let context = &container.security_context;
        let non_root = context
            .run_as_non_root
            .or(pod.security_context.run_as_non_root);
        if non_root != Some(true) {
            problems.push(format!("{at}: runAsNonRoot is not set"));
        }
        let user = context.run_as_user.or(pod.security_context.run_as_user);
        if user == Some(0) {
            problems.push(format!("{at}: runs as root"));
        }
        if context.allow_privilege_escalation != Some(false) || context.privileged == Some(true) {
            problems.push(format!(
                "{at}: allowPrivilegeEscalation is not false, or the container is privileged"
            ));
        }
        let capabilities = context.capabilities.as_ref();
        if !capabilities.is_some_and(|c| c.drop.iter().any(|d| d == "ALL") && c.add.is_empty()) {
            problems.push(format!("{at}: capabilities are not all dropped"));
        }
        if context.read_only_root_filesystem != Some(true) {
            problems.push(format!("{at}: the root filesystem is writable"));
        }
    }
}

/// The container's environment resolved (ConfigMaps and Secrets read); records unknown
/// names, dangling references and values `ShopConfig` rejects.
fn check_env(
    objects: &Objects,
    at: &str,
    service: &str,
    port: u16,
    container: &Container,
    problems: &mut Vec<String>,
) -> (BTreeMap<String, String>, Option<ShopConfig>) {
    let mut env = BTreeMap::new();
    // The names whose value comes from a Secret.
    let mut secret = BTreeSet::new();
    for from in &container.env_from {
        let (kind, reference) = match (&from.config_map_ref, &from.secret_ref) {
            (Some(r), None) => ("ConfigMap", r),
            (None, Some(r)) => ("Secret", r),
            _ => {
                problems.push(format!(
                    "{at}: an envFrom names neither one ConfigMap nor one Secret"
                ));
                continue;
            }
        };
        match objects.keys(kind, &reference.name) {
            None => problems.push(format!(
                "{at}: envFrom {kind} {} is not defined",
                reference.name
            )),
            Some(keys) => {
                let prefix = from.prefix.clone().unwrap_or_default();
                for (key, value) in keys {
                    let name = format!("{prefix}{key}");
                    if kind == "Secret" {
                        secret.insert(name.clone());
                    } else {
                        secret.remove(&name);
                    }
                    env.insert(name, value);
                }
            }
        }
    }
    for var in &container.env {
        let value = match (&var.value, &var.value_from) {
            (Some(value), None) => Some(value.clone()),
            (
                None,
                Some(EnvSource {
                    field_ref: Some(field),
                    ..
                }),
            ) => {
                // The pod's own IP, which the service registers in discovery.
                if field.field_path == "status.podIP" {
                    Some("10.0.0.1".to_owned())
                } else {
                    problems.push(format!(
                        "{at}: {} comes from {}, not the pod's IP",
                        var.name, field.field_path
                    ));
                    None
                }
            }
            (None, Some(source)) => {
                let (kind, key_ref) = match (&source.config_map_key_ref, &source.secret_key_ref) {
                    (Some(r), None) => ("ConfigMap", r),
                    (None, Some(r)) => ("Secret", r),
                    _ => {
                        problems.push(format!(
                            "{at}: {} comes from neither a ConfigMap nor a Secret",
                            var.name
                        ));
                        continue;
                    }
                };
                let value = objects
                    .keys(kind, &key_ref.name)
                    .and_then(|keys| keys.get(&key_ref.key).cloned());
                if value.is_none() {
                    problems.push(format!(
                        "{at}: {} refers to {kind} {} key {}, which is not defined",
                        var.name, key_ref.name, key_ref.key
                    ));
                }
                value
            }
            _ => {
                problems.push(format!("{at}: {} has no value", var.name));
                None
            }
        };
        if let Some(value) = value {
            if var
                .value_from
                .as_ref()
                .is_some_and(|source| source.secret_key_ref.is_some())
            {
                secret.insert(var.name.clone());
            } else {
                secret.remove(&var.name);
            }
            env.insert(var.name.clone(), value);
        }
    }

    // Secret settings: each service has those it uses, from the Secret, and no other.
    for (setting, users) in SECRET_USERS {
        match (users.contains(&service), env.contains_key(setting)) {
            (true, false) => problems.push(format!(
                "{at}: {setting} is not set, and `shop serve {service}` needs it"
            )),
            (false, true) => problems.push(format!("{at}: gets {setting}, which it does not use")),
            _ => {}
        }
        if env.contains_key(setting) && !secret.contains(setting) {
            problems.push(format!("{at}: {setting} is not taken from a Secret"));
        }
    }

    if service != "gateway" && !env.contains_key("SHOP_ADVERTISE_HOST") {
        problems.push(format!(
            "{at}: SHOP_ADVERTISE_HOST is not set, so the service would register 0.0.0.0"
        ));
    }
    let (found, config) = check_env_names(&env);
    problems.extend(found.into_iter().map(|problem| format!("{at}: {problem}")));
    if let Some(config) = &config {
        let listen = serde_json::to_value(&config.listen).unwrap();
        let addr: Option<SocketAddr> = listen
            .get(service)
            .and_then(|addr| serde_json::from_value(addr.clone()).ok());
        if !addr.is_some_and(|addr| addr.ip().is_unspecified() && addr.port() == port) {
            problems.push(format!(
                "{at}: listens on {addr:?}, expected every interface at :{port} \
                 (SHOP_LISTEN__{})",
                service.to_uppercase()
            ));
        }
    }
    (env, config)
}

/// Whether `ShopConfig` accepts these variables, as the binary's figment would read them.
fn check_env_names(env: &BTreeMap<String, String>) -> (Vec<String>, Option<ShopConfig>) {
    let mut problems = Vec::new();
    let mut toml = String::new();
    for (name, value) in env {
        if OTHER_ENV.contains(&name.as_str()) {
            continue;
        }
        if !name.starts_with("SHOP_") {
            problems.push(format!("{name} is not a setting of the shop"));
            continue;
        }
        toml.push_str(&toml_line(name, value));
    }
    let config = ConfigLoader::new()
        .defaults(&ShopConfig::default())
        .toml_str(&toml)
        .load::<ShopConfig>()
        .map_err(|error| {
            problems.push(format!(
                "the shop's configuration rejects its environment: {error}"
            ));
        })
        .ok();
    (problems, config)
}

/// The gateway reads its YAML from the ConfigMap built from examples/shop/config/gateway.yaml,
/// mounted as a directory so that updates reach the file.
fn check_gateway_config(
    objects: &Objects,
    at: &str,
    container: &Container,
    volumes: &BTreeMap<&str, &Volume>,
    env: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) {
    let Some(path) = env.get("SHOP_GATEWAY_CONFIG") else {
        problems.push(format!("{at}: no SHOP_GATEWAY_CONFIG"));
        return;
    };
    let path = Path::new(path);
    let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
        problems.push(format!("{at}: SHOP_GATEWAY_CONFIG is not a file path"));
        return;
    };
    let mount = container
        .volume_mounts
        .iter()
        .find(|m| Path::new(&m.mount_path) == dir);
    let Some(mount) = mount else {
        problems.push(format!("{at}: nothing is mounted at {}", dir.display()));
        return;
    };
    if mount.sub_path.is_some() {
        problems.push(format!(
            "{at}: the gateway configuration is a subPath mount, which never updates"
        ));
    }
    let config_map = volumes
        .get(mount.name.as_str())
        .and_then(|v| v.config_map.as_ref());
    let keys = config_map.and_then(|c| objects.keys("ConfigMap", &c.name));
    let file = file.to_string_lossy();
    if keys
        .as_ref()
        .and_then(|keys| keys.get(file.as_ref()))
        .is_none()
    {
        problems.push(format!(
            "{at}: {} is not a key of a ConfigMap mounted at {}",
            file,
            dir.display()
        ));
    }
}

fn check_service(
    service: &str,
    name: &str,
    port: u16,
    object: &Object,
    deployment: &DeploymentSpec,
    problems: &mut Vec<String>,
) {
    let at = format!("Service {name}");
    let Some(spec) = typed::<ServiceSpec>(&object.spec, &at, problems) else {
        return;
    };
    let labels = &deployment.template.metadata.labels;
    if spec.selector.is_empty() || spec.selector.iter().any(|(k, v)| labels.get(k) != Some(v)) {
        problems.push(format!(
            "{at}: the selector does not select the pods of Deployment {name}"
        ));
    }
    let Some(container) = deployment.template.spec.containers.first() else {
        return;
    };
    let targets: Vec<Option<u16>> = spec
        .ports
        .iter()
        .map(|p| {
            resolve_port(
                p.target_port.as_ref().unwrap_or(&IntOrString::Int(p.port)),
                container,
            )
        })
        .collect();
    if targets.is_empty() || targets.iter().any(|t| *t != Some(port)) {
        problems.push(format!("{at}: target ports {targets:?}, expected {port}"));
    }
    if service != "gateway" && !spec.ports.iter().any(|p| p.port == port) {
        problems.push(format!(
            "{at}: does not serve port {port} inside the cluster"
        ));
    }
}

// ---------------------------------------------------------------------------------------
// Network policies.

/// Where a connection comes from, as a NetworkPolicy rule admits it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// Any address, inside the cluster or not.
    Anywhere,
    /// The pods of one of the manifests' Deployments.
    Pods(String),
    /// Every pod of the namespaces with these labels.
    Namespaces(String),
    /// Anything else (an ipBlock, pods of other namespaces, pods of no Deployment).
    Other(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Anywhere => f.write_str("anywhere"),
            Source::Pods(name) => write!(f, "the pods of {name}"),
            Source::Namespaces(labels) => write!(f, "the namespaces {labels}"),
            Source::Other(what) => f.write_str(what),
        }
    }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", pairs.join(", "))
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// What the network policies should admit to each Deployment, derived from `callers`
/// (callee → the services it accepts calls from, as `shop::trust::CALLERS`): on the
/// service's port, the pods of its callers and Prometheus; the gateway admits anyone.
fn expected_ingress(callers: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<(Source, String)>> {
    let monitoring = Source::Namespaces(format!(
        "{{kubernetes.io/metadata.name={MONITORING_NAMESPACE}}}"
    ));
    SERVICES
        .iter()
        .map(|(_, name, port)| {
            let port = format!("TCP/{port}");
            let mut admitted = BTreeSet::from([(monitoring.clone(), port.clone())]);
            if *name == GATEWAY {
                admitted.insert((Source::Anywhere, port));
            } else {
                let allowed = callers
                    .iter()
                    .find(|(callee, _)| callee == name)
                    .map_or(&[][..], |(_, callers)| *callers);
                for caller in allowed {
                    admitted.insert((Source::Pods(caller.to_string()), port.clone()));
                }
            }
            (name.to_string(), admitted)
        })
        .collect()
}

/// Every difference between what the NetworkPolicies admit to the shop's pods and what
/// `callers` allows ([`expected_ingress`]); that every pod is denied by default; and that
/// nothing the check cannot model (egress, matchExpressions, port ranges) is there.
fn check_network_policies(objects: &Objects, callers: &[(&str, &[&str])]) -> Vec<String> {
    let mut problems = Vec::new();
    let pods: BTreeMap<String, (BTreeMap<String, String>, Vec<ContainerPort>)> = objects
        .of_kind("Deployment")
        .filter_map(|d| {
            let spec: DeploymentSpec = serde_yaml_ng::from_value(d.spec.clone()).ok()?;
            let template = spec.template;
            let ports = template
                .spec
                .containers
                .into_iter()
                .flat_map(|c| c.ports)
                .collect();
            Some((d.metadata.name.clone(), (template.metadata.labels, ports)))
        })
        .collect();
    for (callee, callers) in callers {
        for name in std::iter::once(callee).chain(callers.iter()) {
            if !pods.contains_key(*name) {
                problems.push(format!(
                    "shop::trust::CALLERS names {name}, which no Deployment runs"
                ));
            }
        }
    }

    let mut isolated = BTreeSet::new();
    let mut admitted: BTreeMap<String, BTreeSet<(Source, String)>> = BTreeMap::new();
    let mut default_deny = false;
    for policy in objects.of_kind("NetworkPolicy") {
        let at = format!("NetworkPolicy {}", policy.metadata.name);
        let Some(spec) = typed::<NetworkPolicySpec>(&policy.spec, &at, &mut problems) else {
            continue;
        };
        let types = spec.policy_types.clone().unwrap_or_else(|| {
            let mut types = vec!["Ingress".to_owned()];
            if !spec.egress.is_empty() {
                types.push("Egress".to_owned());
            }
            types
        });
        if types.iter().any(|t| t == "Egress") {
            problems.push(format!(
                "{at}: restricts egress, which the check does not model"
            ));
        }
        if !types.iter().any(|t| t == "Ingress") {
            continue;
        }
        let mut selectors = vec![&spec.pod_selector];
        for rule in &spec.ingress {
            for peer in &rule.from {
                selectors.extend(peer.pod_selector.iter().chain(&peer.namespace_selector));
            }
        }
        if selectors.iter().any(|s| s.match_expressions.is_some()) {
            problems.push(format!(
                "{at}: matchExpressions, which the check does not read"
            ));
            continue;
        }
        if spec.pod_selector.match_labels.is_empty() && spec.ingress.is_empty() {
            default_deny = true;
        }
        for (name, (labels, ports)) in &pods {
            if !selects(&spec.pod_selector.match_labels, labels) {
                continue;
            }
            isolated.insert(name.clone());
            let into = admitted.entry(name.clone()).or_default();
            for rule in &spec.ingress {
                let sources = if rule.from.is_empty() {
                    vec![Source::Anywhere]
                } else {
                    rule.from
                        .iter()
                        .flat_map(|peer| peer_sources(peer, &pods))
                        .collect()
                };
                let ports = if rule.ports.is_empty() {
                    vec!["every port".to_owned()]
                } else {
                    rule.ports.iter().map(|p| policy_port(p, ports)).collect()
                };
                for source in &sources {
                    for port in &ports {
                        into.insert((source.clone(), port.clone()));
                    }
                }
            }
        }
    }
    if !default_deny {
        problems.push(
            "no NetworkPolicy denies ingress by default (podSelector: {}, policyTypes: \
             [Ingress], no rules)"
                .to_owned(),
        );
    }

    for (name, expected) in expected_ingress(callers) {
        if !isolated.contains(&name) {
            problems.push(format!(
                "Deployment {name}: no NetworkPolicy selects its pods, so anything may connect"
            ));
            continue;
        }
        let found = admitted.remove(&name).unwrap_or_default();
        for (source, port) in expected.difference(&found) {
            problems.push(format!(
                "Deployment {name}: {source} may not connect on {port}, which \
                 shop::trust::CALLERS allows"
            ));
        }
        for (source, port) in found.difference(&expected) {
            problems.push(format!(
                "Deployment {name}: {source} may connect on {port}, which \
                 shop::trust::CALLERS does not allow"
            ));
        }
    }
    problems
}

/// Whom one `from` entry admits, by the Deployments whose pods it selects.
fn peer_sources(
    peer: &Peer,
    pods: &BTreeMap<String, (BTreeMap<String, String>, Vec<ContainerPort>)>,
) -> Vec<Source> {
    match (&peer.pod_selector, &peer.namespace_selector, &peer.ip_block) {
        (Some(selector), None, None) => {
            let matched: Vec<Source> = pods
                .iter()
                .filter(|(_, (labels, _))| selects(&selector.match_labels, labels))
                .map(|(name, _)| Source::Pods(name.clone()))
                .collect();
            if matched.is_empty() {
                vec![Source::Other(format!(
                    "pods {} (of no Deployment)",
                    labels_text(&selector.match_labels)
                ))]
            } else {
                matched
            }
        }
        (None, Some(namespaces), None) => {
            vec![Source::Namespaces(labels_text(&namespaces.match_labels))]
        }
        (Some(selector), Some(namespaces), None) => vec![Source::Other(format!(
            "pods {} of the namespaces {}",
            labels_text(&selector.match_labels),
            labels_text(&namespaces.match_labels)
        ))],
        _ => vec![Source::Other(format!("the peer {peer:?}"))],
    }
}

/// A policy port as `PROTOCOL/number`, a named one resolved on the pod's container ports.
fn policy_port(port: &PolicyPort, container_ports: &[ContainerPort]) -> String {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    let number = match &port.port {
        None => return format!("every {protocol} port"),
        Some(IntOrString::Int(number)) => Some(*number),
        Some(IntOrString::String(name)) => container_ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    };
    match (number, port.end_port) {
        (Some(number), None) => format!("{protocol}/{number}"),
        (Some(number), Some(end)) => format!("{protocol}/{number}-{end}"),
        (None, _) => format!("{protocol}/{:?} (not a port of the pod)", port.port),
    }
}

// ---------------------------------------------------------------------------------------
// The Dockerfile.

/// The Dockerfile's instructions: continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, rest) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                instructions.push((keyword.to_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    instructions
}

/// Every check on the Dockerfile; empty when it is right. `run_as_user` is the user the
/// pods run as.
fn check_dockerfile(text: &str, run_as_user: Option<i64>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut stages: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (keyword, rest) in instructions(text) {
        if keyword == "FROM" {
            stages.push((rest, Vec::new()));
        } else if let Some((_, body)) = stages.last_mut() {
            body.push((keyword, rest));
        } else if keyword != "ARG" {
            problems.push(format!("{keyword} before the first FROM"));
        }
    }
    let froms: Vec<&str> = stages.iter().map(|(from, _)| from.as_str()).collect();
    if froms
        != [
            "rust:1.95-slim-bookworm AS builder",
            "debian:bookworm-slim AS runtime",
        ]
    {
        problems.push(format!(
            "stages {froms:?}, expected a rust:1.95-slim-bookworm builder and a \
             debian:bookworm-slim runtime"
        ));
    }
    let runs = |stage: usize| -> Vec<&str> {
        stages.get(stage).map_or(Vec::new(), |(_, body)| {
            body.iter()
                .filter(|(k, _)| k == "RUN")
                .map(|(_, rest)| rest.as_str())
                .collect()
        })
    };

    // The builder's ARG defaults, expanded in its RUN lines as a build without
    // `--build-arg` would.
    let args: BTreeMap<&str, String> = stages.first().map_or(BTreeMap::new(), |(_, body)| {
        body.iter()
            .filter(|(k, _)| k == "ARG")
            .filter_map(|(_, rest)| rest.split_once('='))
            .map(|(name, value)| (name.trim(), value.trim().trim_matches('"').to_owned()))
            .collect()
    });
    let expand = |run: &str| {
        args.iter().fold(run.to_owned(), |run, (name, value)| {
            run.replace(&format!("${{{name}}}"), value)
                .replace(&format!("${name}"), value)
        })
    };
    let expanded: Vec<String> = runs(0).into_iter().map(expand).collect();
    let builder: Vec<&str> = expanded.iter().map(String::as_str).collect();
    let installed: BTreeSet<&str> = builder
        .iter()
        .filter(|run| run.contains("apt-get install"))
        .flat_map(|run| run.split_whitespace())
        .collect();
    for package in BUILD_PACKAGES {
        if !installed.contains(package) {
            problems.push(format!("the builder does not install {package}"));
        }
    }
    let builds = builder.iter().any(|run| {
        let words: Vec<&str> = run.split_whitespace().collect();
        words.windows(2).any(|w| w == ["cargo", "build"])
            && words.contains(&"--release")
            && words.windows(2).any(|w| w == ["-p", "shop"])
    });
    if !builds {
        problems.push("the builder does not run `cargo build --release -p shop`".to_owned());
    }
    let features: BTreeSet<String> = builder
        .iter()
        .filter(|run| run.contains("cargo build"))
        .flat_map(|run| cargo_features(run))
        .collect();
    if !features.contains(REQUIRED_FEATURE) && !features.contains("--all-features") {
        problems.push(format!(
            "the shop is built with features {features:?}, without {REQUIRED_FEATURE}, \
             which `shop serve` needs"
        ));
    }

    let Some((_, runtime)) = stages.get(1) else {
        return problems;
    };
    let last = |keyword: &str| {
        runtime
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, rest)| rest.as_str())
    };
    if !runtime.iter().any(|(k, rest)| {
        k == "COPY" && rest.starts_with("--from=builder") && rest.ends_with("/shop")
    }) {
        problems.push("the runtime does not copy the shop binary from the builder".to_owned());
    }
    match last("ENTRYPOINT").map(serde_json::from_str::<Vec<String>>) {
        Some(Ok(entrypoint)) if entrypoint == ["shop"] => {}
        other => problems.push(format!(
            "ENTRYPOINT is {other:?}, expected [\"shop\"] in exec form"
        )),
    }
    let uid = last("USER")
        .and_then(|user| user.split(':').next())
        .and_then(|uid| uid.parse::<i64>().ok());
    match uid {
        Some(uid) if uid != 0 => {
            if run_as_user.is_some_and(|pods| pods != uid) {
                problems.push(format!(
                    "the image runs as {uid} but the pods as {}",
                    run_as_user.unwrap()
                ));
            }
        }
        _ => problems.push(format!(
            "USER is {:?}: a numeric user other than 0, for runAsNonRoot",
            last("USER")
        )),
    }

    let mut env = BTreeMap::new();
    for (_, rest) in runtime.iter().filter(|(k, _)| k == "ENV") {
        for pair in rest.split_whitespace() {
            match pair.split_once('=') {
                Some((name, value)) => {
                    env.insert(name.to_owned(), value.to_owned());
                }
                None => problems.push(format!("ENV `{rest}`: write NAME=value")),
            }
        }
    }
    let (found, _) = check_env_names(&env);
    problems.extend(found.into_iter().map(|p| format!("ENV: {p}")));
    problems
}

/// The features a cargo command line asks for (`--features a,b`, `--features=a`, `-F a`);
/// `--all-features` as itself.
fn cargo_features(command: &str) -> Vec<String> {
    let mut features = Vec::new();
    let mut words = command.split_whitespace();
    while let Some(word) = words.next() {
        let list = match word {
            "--features" | "-F" => words.next().unwrap_or_default(),
            "--all-features" => {
                features.push(word.to_owned());
                continue;
            }
            _ => match word.strip_prefix("--features=") {
                Some(list) => list,
                None => continue,
            },
        };
        features.extend(
            list.split(',')
                .filter(|f| !f.is_empty())
                .map(|f| f.trim_matches('"').to_owned()),
        );
    }
    features
}

// ---------------------------------------------------------------------------------------
// Tests.

fn dockerfile() -> String {
    std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("the Dockerfile")
}

fn pods_user() -> Option<i64> {
    let documents = load_manifests();
    let objects = Objects::read(&documents, &mut Vec::new());
    let deployment = objects.get("Deployment", "gateway")?;
    let spec: DeploymentSpec = serde_yaml_ng::from_value(deployment.spec.clone()).ok()?;
    spec.template.spec.security_context.run_as_user
}

fn assert_no_problem(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

fn assert_found(problems: &[String], expected: &str) {
    assert!(
        problems.iter().any(|p| p.contains(expected)),
        "expected a problem containing `{expected}`, found {problems:#?}"
    );
}

#[test]
fn the_manifests_pass_every_check() {
    assert_no_problem(&check_manifests(&load_manifests()));
}

#[test]
fn the_dockerfile_builds_the_shop_and_runs_it_as_a_user() {
    assert_no_problem(&check_dockerfile(&dockerfile(), pods_user()));
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let text = std::fs::read_to_string(deploy_dir().join("k8s/kustomization.yaml")).unwrap();
    let kustomization: Value = serde_yaml_ng::from_str(&text).unwrap();
    let listed: Vec<String> =
        serde_yaml_ng::from_value(kustomization["resources"].clone()).unwrap();
    assert_eq!(listed, manifest_files(), "kustomization.yaml resources");
}

#[test]
fn the_gateway_config_map_holds_the_shipped_gateway_yaml() {
    let shipped = std::fs::read_to_string(deploy_dir().join("../config/gateway.yaml")).unwrap();
    let documents = load_manifests();
    let objects = Objects::read(&documents, &mut Vec::new());
    let keys = objects
        .keys("ConfigMap", "shop-gateway")
        .expect("a ConfigMap shop-gateway");
    assert!(
        keys.get("gateway.yaml") == Some(&shipped),
        "k8s/02-gateway-config.yaml differs from examples/shop/config/gateway.yaml: \
         regenerate it with the command at its top"
    );
}

/// The manifests with one change made by `edit` to the document of `kind` `name`.
fn broken(kind: &str, name: &str, edit: impl FnOnce(&mut Value)) -> Vec<(String, Value)> {
    let mut documents = load_manifests();
    let (_, document) = documents
        .iter_mut()
        .find(|(_, d)| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"));
    edit(document);
    documents
}

fn container(document: &mut Value) -> &mut Value {
    &mut document["spec"]["template"]["spec"]["containers"][0]
}

fn remove(value: &mut Value, key: &str) {
    value.as_mapping_mut().unwrap().remove(key).unwrap();
}

#[test]
fn a_missing_probe_is_caught() {
    let documents = broken("Deployment", "order-service", |d| {
        remove(container(d), "readinessProbe");
    });
    assert_found(
        &check_manifests(&documents),
        "order-service, container order: no readinessProbe",
    );

    let documents = broken("Deployment", "cart-service", |d| {
        container(d)["livenessProbe"]["httpGet"]["path"] = "/health".into();
    });
    assert_found(&check_manifests(&documents), "livenessProbe asks /health,");
}

#[test]
fn a_probe_on_another_port_is_caught() {
    let documents = broken("Deployment", "user-service", |d| {
        container(d)["readinessProbe"]["httpGet"]["port"] = 8002.into();
    });
    assert_found(
        &check_manifests(&documents),
        "readinessProbe asks port Int(8002), expected 8001",
    );
}

#[test]
fn a_wrong_port_is_caught() {
    let documents = broken("Deployment", "payment-service", |d| {
        container(d)["ports"][0]["containerPort"] = 8004.into();
    });
    let problems = check_manifests(&documents);
    assert_found(&problems, "container ports [8004], expected [8005]");
    // The probes and the Service follow the named port, so they are wrong too.
    assert_found(
        &problems,
        "Service payment-service: target ports [Some(8004)]",
    );
}

#[test]
fn a_listener_or_data_directory_out_of_reach_is_caught() {
    let documents = broken("Deployment", "order-service", |d| {
        container(d)["env"][0]["value"] = "127.0.0.1:8003".into();
    });
    assert_found(
        &check_manifests(&documents),
        "listens on Some(127.0.0.1:8003)",
    );

    let documents = broken("ConfigMap", "shop-env", |d| {
        remove(&mut d["data"], "SHOP_DATA_DIR");
    });
    assert_found(
        &check_manifests(&documents),
        "target/shop-data is not a writable mount",
    );
}

#[test]
fn a_missing_service_is_caught() {
    let mut documents = load_manifests();
    documents
        .retain(|(_, d)| !(d["kind"] == "Service" && d["metadata"]["name"] == "inventory-service"));
    assert_found(
        &check_manifests(&documents),
        "inventory: no Service inventory-service",
    );

    let documents = broken("HorizontalPodAutoscaler", "gateway", |d| {
        d["apiVersion"] = "autoscaling/v2beta2".into();
    });
    assert_found(
        &check_manifests(&documents),
        "is autoscaling/v2beta2, expected autoscaling/v2",
    );

    let mut documents = load_manifests();
    documents.retain(|(_, d)| !(d["kind"] == "Deployment" && d["metadata"]["name"] == "gateway"));
    let problems = check_manifests(&documents);
    assert_found(&problems, "gateway: no Deployment gateway");
    assert_found(&problems, "scales Deployment gateway, which is not defined");
}

#[test]
fn resources_missing_or_inverted_are_caught() {
    let documents = broken("Deployment", "product-service", |d| {
        container(d)["resources"]["requests"]["memory"] = "1Gi".into();
    });
    assert_found(
        &check_manifests(&documents),
        "memory request 1073741824 is above its limit",
    );

    let documents = broken("Deployment", "notification-service", |d| {
        remove(&mut container(d)["resources"], "limits");
    });
    let problems = check_manifests(&documents);
    assert_found(&problems, "no cpu limit");
    assert_found(&problems, "no memory limit");
}

#[test]
fn a_short_grace_period_is_caught() {
    let documents = broken("Deployment", "gateway", |d| {
        d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30.into();
    });
    assert_found(
        &check_manifests(&documents),
        "terminationGracePeriodSeconds 30 leaves no time",
    );

    let documents = broken("Deployment", "gateway", |d| {
        remove(container(d), "lifecycle");
    });
    assert_found(&check_manifests(&documents), "no preStop pause");
}

#[test]
fn a_different_image_is_caught() {
    let documents = broken("Deployment", "cart-service", |d| {
        container(d)["image"] = "shop:latest".into();
    });
    let problems = check_manifests(&documents);
    assert_found(&problems, "the services run different images");
    assert_found(&problems, "image `shop:latest` has no fixed tag");
}

#[test]
fn unknown_settings_are_caught() {
    let documents = broken("Deployment", "order-service", |d| {
        let env = container(d)["env"].as_sequence_mut().unwrap();
        env.push(
            serde_yaml_ng::from_str("{name: SHOP_DATABASE_URL, value: postgres://x}").unwrap(),
        );
    });
    assert_found(
        &check_manifests(&documents),
        "the shop's configuration rejects its environment",
    );

    let documents = broken("ConfigMap", "shop-env", |d| {
        d["data"]["DB_HOST"] = "user-db".into();
    });
    assert_found(
        &check_manifests(&documents),
        "DB_HOST is not a setting of the shop",
    );

    let documents = broken("ConfigMap", "shop-env", |d| {
        d["data"]["SHOP_HOST__DRAIN_TIMEOUT"] = "30 seconds".into();
    });
    assert_found(&check_manifests(&documents), "rejects its environment");
}

#[test]
fn a_dangling_reference_is_caught() {
    let documents = broken("Deployment", "gateway", |d| {
        env_var(d, "SHOP_JWT_SECRET")["valueFrom"]["secretKeyRef"]["key"] = "SHOP_JWT_KEY".into();
    });
    assert_found(
        &check_manifests(&documents),
        "SHOP_JWT_SECRET refers to Secret shop-secrets key SHOP_JWT_KEY, which is not defined",
    );

    let documents = broken("Deployment", "order-service", |d| {
        *volume(d, "identity-keys") = serde_yaml_ng::from_str(
            "{name: identity-keys, secret: {secretName: order-keys, defaultMode: 288}}",
        )
        .unwrap();
    });
    assert_found(
        &check_manifests(&documents),
        "Deployment order-service, container order: /etc/shop-identity/keys is not from the Secret \
         shop-identity-keys (volume identity-keys)",
    );

    let documents = broken("Deployment", "gateway", |d| {
        *volume(d, "gateway-config") =
            serde_yaml_ng::from_str("{name: gateway-config, configMap: {name: gateway-yaml}}")
                .unwrap();
    });
    assert_found(
        &check_manifests(&documents),
        "gateway.yaml is not a key of a ConfigMap mounted at /etc/shop",
    );
}

/// The volume `name` in the pod of `document`, as a mutable YAML value.
fn volume<'a>(document: &'a mut Value, name: &str) -> &'a mut Value {
    document["spec"]["template"]["spec"]["volumes"]
        .as_sequence_mut()
        .unwrap()
        .iter_mut()
        .find(|volume| volume["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The mount of the services' keys in the first container of `document`.
fn keys_mount(document: &mut Value) -> &mut Value {
    container(document)["volumeMounts"]
        .as_sequence_mut()
        .unwrap()
        .iter_mut()
        .find(|mount| mount["name"] == "identity-keys")
        .expect("no mount identity-keys")
}

/// The env var `name` of the first container of `document`, as a mutable YAML value.
fn env_var<'a>(document: &'a mut Value, name: &str) -> &'a mut Value {
    container(document)["env"]
        .as_sequence_mut()
        .unwrap()
        .iter_mut()
        .find(|var| var["name"] == name)
        .unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn a_secret_missing_misplaced_or_committed_is_caught() {
    let documents = broken("Deployment", "payment-service", |d| {
        let mounts = container(d)["volumeMounts"].as_sequence_mut().unwrap();
        mounts.retain(|mount| mount["name"] != "identity-keys");
    });
    assert_found(
        &check_manifests(&documents),
        "Deployment payment-service, container payment: SHOP_IDENTITY_KEYS_FILE is /etc/shop-identity/keys, \
         which is in no mounted volume",
    );

    let documents = broken("Deployment", "cart-service", |d| {
        keys_mount(d)["subPath"] = "keys".into();
        keys_mount(d)["readOnly"] = false.into();
    });
    let problems = check_manifests(&documents);
    assert_found(
        &problems,
        "container cart: the keys are mounted with a subPath",
    );
    assert_found(
        &problems,
        "container cart: the keys at /etc/shop-identity are mounted writable",
    );

    let documents = broken("Deployment", "gateway", |d| {
        keys_mount(d)["mountPath"] = "/etc/shop/identity".into();
    });
    assert_found(
        &check_manifests(&documents),
        "container gateway: /etc/shop/identity is mounted inside /etc/shop (gateway-config)",
    );

    let documents = broken("Deployment", "inventory-service", |d| {
        let key_in_env = serde_yaml_ng::from_str(
            "{name: SHOP_IDENTITY_SECRET, valueFrom: {secretKeyRef: {name: shop-secrets, key: \
             SHOP_JWT_SECRET}}}",
        )
        .unwrap();
        container(d)["env"]
            .as_sequence_mut()
            .unwrap()
            .push(key_in_env);
    });
    assert_found(
        &check_manifests(&documents),
        "container inventory: SHOP_IDENTITY_SECRET is set",
    );

    let documents = broken("Deployment", "user-service", |d| {
        *env_var(d, "SHOP_JWT_SECRET") = serde_yaml_ng::from_str(
            "{name: SHOP_JWT_SECRET, value: 0123456789abcdef0123456789abcdef}",
        )
        .unwrap();
    });
    assert_found(
        &check_manifests(&documents),
        "container user: SHOP_JWT_SECRET is not taken from a Secret",
    );

    let documents = broken("Deployment", "cart-service", |d| {
        let gateway_key = serde_yaml_ng::from_str(
            "{name: SHOP_JWT_SECRET, valueFrom: {secretKeyRef: {name: shop-secrets, key: \
             SHOP_JWT_SECRET}}}",
        )
        .unwrap();
        container(d)["env"]
            .as_sequence_mut()
            .unwrap()
            .push(gateway_key);
    });
    assert_found(
        &check_manifests(&documents),
        "container cart: gets SHOP_JWT_SECRET, which it does not use",
    );

    let mut documents = load_manifests();
    let committed = "apiVersion: v1\nkind: Secret\nmetadata: {name: shop-secrets, namespace: \
                     shop}\nstringData: {SHOP_JWT_SECRET: change-me}\n";
    documents.push((
        "03-secrets.yaml".to_owned(),
        serde_yaml_ng::from_str(committed).unwrap(),
    ));
    let problems = check_manifests(&documents);
    assert_found(&problems, "Secret shop-secrets is committed with values");
    assert_found(&problems, "Secret shop-secrets is in the manifests");
}

/// The keys the docs' `kubectl create secret generic <secret>` command gives, in the
/// order it gives them; `None` when `text` has no such command.
fn documented_secret_keys(text: &str, secret: &str) -> Option<Vec<String>> {
    let command = format!("create secret generic {secret} ");
    let start = text.find(&command)?;
    let mut keys = Vec::new();
    for line in text[start..].lines() {
        for word in line.split_whitespace() {
            if let Some(literal) = word
                .strip_prefix("--from-literal=")
                .or_else(|| word.strip_prefix("--from-file="))
            {
                keys.push(literal.split('=').next().unwrap_or_default().to_owned());
            }
        }
        if !line.trim_end().ends_with('\\') {
            break;
        }
    }
    Some(keys)
}

/// Every difference between the keys the docs' commands create and those the manifests
/// read: [`SECRET_KEYS`] in [`SECRET`], and [`KEYS_SECRET_KEY`] in [`KEYS_SECRET`].
fn check_secret_docs(file: &str, text: &str) -> Vec<String> {
    let secrets: [(&str, BTreeSet<&str>); 2] = [
        (SECRET, SECRET_KEYS.iter().map(|(key, _)| *key).collect()),
        (KEYS_SECRET, BTreeSet::from([KEYS_SECRET_KEY.0])),
    ];
    let mut problems = Vec::new();
    for (secret, expected) in secrets {
        let Some(documented) = documented_secret_keys(text, secret) else {
            problems.push(format!(
                "{file} does not show `kubectl -n shop create secret generic {secret}`"
            ));
            continue;
        };
        let documented: BTreeSet<&str> = documented.iter().map(String::as_str).collect();
        for key in expected.difference(&documented) {
            problems.push(format!(
                "{file}: the command that creates {secret} does not give {key}"
            ));
        }
        for key in documented.difference(&expected) {
            problems.push(format!(
                "{file}: the command that creates {secret} gives {key}, which no service reads"
            ));
        }
    }
    problems
}

#[test]
fn the_docs_create_the_secret_with_every_key_the_manifests_read() {
    let root = deploy_dir().join("../../..");
    let mut problems = Vec::new();
    for file in SECRET_DOCS {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        problems.extend(check_secret_docs(file, &text));
    }
    assert_no_problem(&problems);
    for (key, _) in SECRET_KEYS {
        assert!(
            SECRET_USERS.iter().any(|(setting, _)| *setting == key),
            "no service is given {key}"
        );
    }

    let text = std::fs::read_to_string(root.join(SECRET_DOCS[0])).unwrap();
    let without = text
        .replace("--from-literal=SHOP_JWT_SECRET=", "--from-literal=X=")
        .replace("--from-file=keys=", "--from-file=key=");
    let problems = check_secret_docs("shop-deploy.md", &without);
    assert_found(&problems, "shop-secrets does not give SHOP_JWT_SECRET");
    assert_found(&problems, "shop-secrets gives X, which no service reads");
    assert_found(&problems, "shop-identity-keys does not give keys");
    let problems = check_secret_docs("README.md", "no command here");
    assert_found(
        &problems,
        "does not show `kubectl -n shop create secret generic shop-secrets`",
    );
    assert_found(
        &problems,
        "does not show `kubectl -n shop create secret generic shop-identity-keys`",
    );
}

#[test]
fn network_policies_other_than_the_callers_table_are_caught() {
    // The order service cut off from payments.
    let documents = broken("NetworkPolicy", "payment-service", |d| {
        let peers = d["spec"]["ingress"][0]["from"].as_sequence_mut().unwrap();
        peers.retain(|peer| {
            peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] != "order-service"
        });
    });
    assert_found(
        &check_manifests(&documents),
        "Deployment payment-service: the pods of order-service may not connect on TCP/8005, \
         which shop::trust::CALLERS allows",
    );

    // The cart service let into the inventory.
    let documents = broken("NetworkPolicy", "inventory-service", |d| {
        let peers = d["spec"]["ingress"][0]["from"].as_sequence_mut().unwrap();
        peers.push(
            serde_yaml_ng::from_str(
                "{podSelector: {matchLabels: {app.kubernetes.io/name: cart-service}}}",
            )
            .unwrap(),
        );
    });
    assert_found(
        &check_manifests(&documents),
        "Deployment inventory-service: the pods of cart-service may connect on TCP/8006, \
         which shop::trust::CALLERS does not allow",
    );

    // Every pod of the shop, by a broader label.
    let documents = broken("NetworkPolicy", "user-service", |d| {
        d["spec"]["ingress"][0]["from"][0] = serde_yaml_ng::from_str(
            "{podSelector: {matchLabels: {app.kubernetes.io/part-of: shop}}}",
        )
        .unwrap();
    });
    assert_found(
        &check_manifests(&documents),
        "Deployment user-service: the pods of order-service may connect on TCP/8001",
    );

    // The wrong port; a named port is the container's.
    let documents = broken("NetworkPolicy", "user-service", |d| {
        d["spec"]["ingress"][0]["ports"][0]["port"] = 8080.into();
    });
    let problems = check_manifests(&documents);
    assert_found(&problems, "the pods of gateway may not connect on TCP/8001");
    assert_found(&problems, "the pods of gateway may connect on TCP/8080");
    let documents = broken("NetworkPolicy", "user-service", |d| {
        d["spec"]["ingress"][0]["ports"][0]["port"] = "http".into();
    });
    assert_no_problem(&check_manifests(&documents));

    // No Prometheus; a gateway open only inside.
    let documents = broken("NetworkPolicy", "order-service", |d| {
        d["spec"]["ingress"].as_sequence_mut().unwrap().pop();
    });
    assert_found(
        &check_manifests(&documents),
        "Deployment order-service: the namespaces {kubernetes.io/metadata.name=monitoring} \
         may not connect on TCP/8003",
    );
    let documents = broken("NetworkPolicy", "gateway", |d| {
        d["spec"]["ingress"][0]["from"] = serde_yaml_ng::from_str("[{podSelector: {}}]").unwrap();
    });
    assert_found(
        &check_manifests(&documents),
        "Deployment gateway: anywhere may not connect on TCP/8080",
    );

    // Egress is not modelled, so not allowed through unchecked.
    let documents = broken("NetworkPolicy", "cart-service", |d| {
        d["spec"]["policyTypes"] = serde_yaml_ng::from_str("[Ingress, Egress]").unwrap();
    });
    assert_found(
        &check_manifests(&documents),
        "NetworkPolicy cart-service: restricts egress",
    );
}

#[test]
fn a_pod_left_open_is_caught() {
    let mut documents = load_manifests();
    documents.retain(|(_, d)| {
        !(d["kind"] == "NetworkPolicy" && d["metadata"]["name"] == "default-deny-ingress")
    });
    assert_found(
        &check_manifests(&documents),
        "no NetworkPolicy denies ingress by default",
    );
    documents.retain(|(_, d)| {
        !(d["kind"] == "NetworkPolicy" && d["metadata"]["name"] == "notification-service")
    });
    assert_found(
        &check_manifests(&documents),
        "Deployment notification-service: no NetworkPolicy selects its pods",
    );

    // With the default deny, a service without its policy admits nobody.
    let mut documents = load_manifests();
    documents.retain(|(_, d)| {
        !(d["kind"] == "NetworkPolicy" && d["metadata"]["name"] == "notification-service")
    });
    assert_found(
        &check_manifests(&documents),
        "Deployment notification-service: the pods of gateway may not connect on TCP/8007",
    );
}

#[test]
fn the_policies_follow_a_change_of_the_callers_table() {
    let documents = load_manifests();
    let objects = Objects::read(&documents, &mut Vec::new());
    assert_no_problem(&check_network_policies(&objects, CALLERS));

    // The order service now calls the user service: its policy must say so.
    let mut callers: Vec<(&str, &[&str])> = CALLERS.to_vec();
    let with_order: &[&str] = &[GATEWAY, "order-service"];
    callers
        .iter_mut()
        .find(|(callee, _)| *callee == "user-service")
        .unwrap()
        .1 = with_order;
    assert_found(
        &check_network_policies(&objects, &callers),
        "Deployment user-service: the pods of order-service may not connect on TCP/8001, \
         which shop::trust::CALLERS allows",
    );

    let callers: &[(&str, &[&str])] = &[("search-service", &[GATEWAY])];
    assert_found(
        &check_network_policies(&objects, callers),
        "shop::trust::CALLERS names search-service, which no Deployment runs",
    );
}

#[test]
fn an_unsafe_security_context_is_caught() {
    let documents = broken("Deployment", "inventory-service", |d| {
        container(d)["securityContext"]["readOnlyRootFilesystem"] = false.into();
        d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0.into();
    });
    let problems = check_manifests(&documents);
    assert_found(&problems, "the root filesystem is writable");
    assert_found(&problems, "runs as root");

    // Any Deployment, and every container of it.
    let documents = broken("Deployment", "cart-service", |d| {
        let init = serde_yaml_ng::from_str(
            "{name: migrate, image: shop:0.1.0, securityContext: {runAsUser: 0}}",
        )
        .unwrap();
        d["spec"]["template"]["spec"]["initContainers"] = Value::Sequence(vec![init]);
        container(d)["securityContext"]["capabilities"]["add"] =
            serde_yaml_ng::from_str("[NET_ADMIN]").unwrap();
    });
    let problems = check_manifests(&documents);
    assert_found(&problems, "cart-service, container migrate: runs as root");
    assert_found(
        &problems,
        "cart-service, container migrate: the root filesystem is writable",
    );
    assert_found(
        &problems,
        "cart-service, container cart: capabilities are not all dropped",
    );
    let mut documents = load_manifests();
    let (file, mut debug) = documents
        .iter()
        .find(|(_, d)| d["kind"] == "Deployment" && d["metadata"]["name"] == "gateway")
        .cloned()
        .unwrap();
    debug["metadata"]["name"] = "debug".into();
    remove(&mut debug["spec"]["template"]["spec"], "securityContext");
    remove(container(&mut debug), "securityContext");
    documents.push((file, debug));
    let problems = check_manifests(&documents);
    assert_found(&problems, "Deployment debug runs no shop service");
    assert_found(
        &problems,
        "Deployment debug, container gateway: runAsNonRoot is not set",
    );
    assert_found(
        &problems,
        "Deployment debug, container gateway: the root filesystem is writable",
    );
}

#[test]
fn replicas_that_do_not_fit_the_storage_are_caught() {
    let documents = broken("Deployment", "inventory-service", |d| {
        d["spec"]["replicas"] = 2.into();
    });
    assert_found(
        &check_manifests(&documents),
        "one replica and the Recreate strategy",
    );

    let documents = broken("Deployment", "user-service", |d| {
        d["spec"]["replicas"] = 1.into();
    });
    assert_found(
        &check_manifests(&documents),
        "1 replica(s), at least 2 expected",
    );
}

#[test]
fn a_broken_dockerfile_is_caught() {
    let good = dockerfile();
    let user = pods_user();

    let text = good.replace("ENTRYPOINT [\"shop\"]", "ENTRYPOINT shop");
    assert_found(&check_dockerfile(&text, user), "ENTRYPOINT is");

    let text = good.replace(
        "FROM debian:bookworm-slim AS runtime",
        "FROM debian:bookworm AS runtime",
    );
    assert_found(&check_dockerfile(&text, user), "stages");

    let text = good.replace(" protobuf-compiler ", " ");
    assert_found(
        &check_dockerfile(&text, user),
        "the builder does not install protobuf-compiler",
    );

    let text = good.replace("USER 10001:10001", "USER root");
    assert_found(&check_dockerfile(&text, user), "USER is Some(\"root\")");

    assert_found(&check_dockerfile(&good, Some(1000)), "the pods as 1000");

    let text = good.replace("-p shop", "-p micro-gateway");
    assert_found(
        &check_dockerfile(&text, user),
        "cargo build --release -p shop",
    );

    let text = good.replace(
        r#"ARG SHOP_FEATURES="--features real-servers""#,
        r#"ARG SHOP_FEATURES="""#,
    );
    assert_found(
        &check_dockerfile(&text, user),
        "without real-servers, which `shop serve` needs",
    );
    let text = good.replace("--features real-servers", "--features=real-servers,extra");
    assert_no_problem(&check_dockerfile(&text, user));
}

/// Runs lint.sh on the manifests in `k8s` (its own k8s/ when `None`), installing its
/// tools from PyPI the first time; whether it passed, and what it printed.
fn lint(k8s: Option<&Path>) -> (bool, String) {
    let mut command = std::process::Command::new("bash");
    command.arg(deploy_dir().join("lint.sh"));
    command.args(k8s);
    let output = command.output().expect("bash runs lint.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn the_linters_pass() {
    let (passed, output) = lint(None);
    assert!(passed, "lint.sh failed:\n{output}");
    for step in [
        "manifests against Kubernetes 1.37.0",
        "Failed checks: 0",
        "lint.sh: no problem",
    ] {
        assert!(
            output.contains(step),
            "lint.sh did not say `{step}`:\n{output}"
        );
    }
}

#[test]
fn checkov_catches_what_the_checks_here_do_not() {
    // Not a hidden directory (tempdir's default `.tmp`), which checkov would not scan.
    let dir = tempfile::Builder::new().prefix("k8s").tempdir().unwrap();
    for file in manifest_files() {
        let text = std::fs::read_to_string(deploy_dir().join("k8s").join(&file)).unwrap();
        // The host's network namespace: valid Kubernetes, but no isolation.
        let text = text.replace(
            "      automountServiceAccountToken: false\n",
            "      automountServiceAccountToken: false\n      hostNetwork: true\n",
        );
        std::fs::write(dir.path().join(file), text).unwrap();
    }
    let (passed, output) = lint(Some(dir.path()));
    assert!(
        !passed,
        "lint.sh passed a pod on the host's network:\n{output}"
    );
    assert!(output.contains("CKV_K8S_19"), "{output}");
}

#[test]
fn quantities_parse_as_kubernetes_writes_them() {
    let q = |text: &str| quantity(&Value::String(text.to_owned()));
    assert_eq!(q("250m"), Some(0.25));
    assert_eq!(q("1"), Some(1.0));
    assert_eq!(q("0.5"), Some(0.5));
    assert_eq!(q("128Mi"), Some(128.0 * 1024.0 * 1024.0));
    assert_eq!(q("1G"), Some(1e9));
    assert_eq!(q("12 parsecs"), None);
    assert_eq!(quantity(&Value::Number(2.into())), Some(2.0));
}

/// The shop's alert rules load in Prometheus's own checker and fire as their unit tests
/// expect (Debian's `promtool`, which scripts/servers.sh installs).
#[test]
fn the_alert_rules_pass_promtool_and_name_only_metrics_the_framework_records() {
    let dir = deploy_dir().join("prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let output = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool runs (Debian's prometheus package; scripts/servers.sh installs it)");
        assert!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    // Every metric an alert reads is one the framework's code records.
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let mut source = String::new();
    let root = deploy_dir().join("../../..");
    for krate in [
        "micro-core",
        "micro-events",
        "micro-saga",
        "micro-discovery",
        "micro-gateway",
    ] {
        let mut pending = vec![root.join(krate).join("src")];
        while let Some(path) = pending.pop() {
            for entry in std::fs::read_dir(&path).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    source.push_str(&std::fs::read_to_string(&path).unwrap());
                }
            }
        }
    }
    let names: BTreeSet<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("micro_") || word.starts_with("http_server_"))
        .collect();
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        assert!(
            source.contains(&format!("\"{name}\"")),
            "alerts.yml reads `{name}`, which no framework crate records"
        );
    }
}
