//! The product service's gRPC `ProductService`, called by an independent client (Python's
//! `grpcio`, with stubs generated from `proto/product.proto` by `grpcio-tools`): the same
//! data as its REST API, a verified caller required, and the cart pricing over gRPC.

use std::process::Command;
use std::time::Duration;

use http::Method;
use micro_core::client::HttpClient;
use micro_core::identity::Caller;
use serde_json::{json, Value};
use shop::app::{Listen, ShopConfig};
use shop::trust::{keys_from_secret, SecretString};

use crate::support::{send, sign_up};

const SECRET: &str = "a grpc test secret that is long enough to sign with";

/// Generates the Python stubs and calls the product service at `addr`: `GetProduct`
/// with and without the caller's token, and the streaming `SearchProducts`.
const CLIENT: &str = r#"
import json, sys
import grpc
sys.path.insert(0, sys.argv[1])
import product_pb2, product_pb2_grpc

addr, token = sys.argv[2], sys.argv[3]
stub = product_pb2_grpc.ProductServiceStub(grpc.insecure_channel(addr))
signed = [("x-micro-identity", token)]

def product(p):
    return {"id": p.id, "name": p.name, "description": p.description,
            "price": {"amount": p.unit_price.amount, "currency": p.unit_price.currency},
            "display_price": p.price}

out = {}
out["get"] = product(stub.GetProduct(product_pb2.ProductRequest(product_id="SKU-1002"), metadata=signed, timeout=10))
try:
    stub.GetProduct(product_pb2.ProductRequest(product_id="SKU-9"), metadata=signed, timeout=10)
    out["missing"] = "OK"
except grpc.RpcError as e:
    out["missing"] = e.code().name
try:
    stub.GetProduct(product_pb2.ProductRequest(product_id="SKU-1002"), timeout=10)
    out["anonymous"] = "OK"
except grpc.RpcError as e:
    out["anonymous"] = e.code().name
out["search"] = [product(p) for p in stub.SearchProducts(product_pb2.SearchProductsRequest(query="STEEL"), metadata=signed, timeout=10)]
out["search_all"] = [p.id for p in stub.SearchProducts(product_pb2.SearchProductsRequest(query=""), metadata=signed, timeout=10)]
batch = stub.BatchGetProducts(product_pb2.BatchGetProductsRequest(product_ids=["SKU-1003", "SKU-9"]), metadata=signed, timeout=10)
out["batch"] = {"items": [p.id for p in batch.items], "missing": list(batch.missing)}
print(json.dumps(out))
"#;

fn python_client(addr: std::net::SocketAddr, token: &str) -> Value {
    let stubs = tempfile::tempdir().unwrap();
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let generated = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I", proto])
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .arg(format!("{proto}/product.proto"))
        .output()
        .expect("python3 runs");
    assert!(
        generated.status.success(),
        "grpcio-tools is missing (scripts/servers.sh installs it): {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let called = Command::new("python3")
        .args(["-c", CLIENT])
        .arg(stubs.path())
        .arg(addr.to_string())
        .arg(token)
        .output()
        .expect("python3 runs");
    assert!(
        called.status.success(),
        "the grpcio client failed: {}",
        String::from_utf8_lossy(&called.stderr)
    );
    serde_json::from_slice(&called.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_grpc_client_gets_the_rest_apis_data_and_carts_price_over_grpc() {
    let config = ShopConfig {
        listen: Listen::ephemeral(),
        data_dir: None,
        identity_secret: Some(SecretString::new(SECRET)),
        password_iterations: 1_000,
        ..ShopConfig::default()
    };
    let shop = shop::app::start(&config).await.unwrap();
    let product = shop.host.local_addr("product-service").unwrap();
    let keys = keys_from_secret(SECRET).unwrap();
    let token = keys
        .sign(&Caller::service("cart-service"), "product-service")
        .unwrap();

    let grpc = tokio::task::spawn_blocking(move || python_client(product, &token))
        .await
        .unwrap();

    let token = keys
        .sign(&Caller::service("cart-service"), "product-service")
        .unwrap();
    let rest = HttpClient::builder(&format!("http://{product}"))
        .default_header("x-micro-identity", token)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut get = grpc["get"].clone();
    assert_eq!(
        get["display_price"],
        json!(49.0),
        "the reference's price field"
    );
    get.as_object_mut().unwrap().remove("display_price");
    let by_rest: Value = rest.get_json("/products/SKU-1002").await.unwrap();
    assert_eq!(get, by_rest);
    assert_eq!(grpc["missing"], "NOT_FOUND");
    assert_eq!(
        grpc["anonymous"], "UNAUTHENTICATED",
        "identity holds for gRPC"
    );

    let searched: Value = rest.get_json("/products?q=steel").await.unwrap();
    let mut streamed = grpc["search"].as_array().unwrap().clone();
    for product in &mut streamed {
        product.as_object_mut().unwrap().remove("display_price");
    }
    assert_eq!(Value::Array(streamed), searched["items"]);
    let all: Value = rest.get_json("/products?per_page=100").await.unwrap();
    let ids: Vec<&Value> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["id"])
        .collect();
    assert_eq!(
        grpc["search_all"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        ids
    );
    assert_eq!(
        grpc["batch"],
        json!({"items": ["SKU-1003"], "missing": ["SKU-9"]})
    );

    // The cart prices its lines by asking the product service over gRPC.
    let gateway = HttpClient::builder(&format!("http://{}", shop.gateway()))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let user = sign_up(&gateway, "grpc@shop.test").await;
    let item = json!({"sku": "SKU-1002", "quantity": 2});
    let (status, cart) = send(
        &gateway,
        Method::POST,
        "/api/carts/me/items",
        Some(&user),
        None,
        Some(item),
    )
    .await;
    assert_eq!(status, 200, "{cart}");
    assert_eq!(cart["lines"][0]["unit_price"]["amount"], 4900, "{cart}");
    let item = json!({"sku": "SKU-9", "quantity": 1});
    let (status, body) = send(
        &gateway,
        Method::POST,
        "/api/carts/me/items",
        Some(&user),
        None,
        Some(item),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("product_not_found"))
    );

    shop.host.shutdown_trigger().trigger();
    shop.host.run_until(std::future::pending()).await;
}
