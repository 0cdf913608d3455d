//! The cart service: one cart per signed-in user, priced from the catalog when a product
//! is added (each line keeps that price snapshot), asked over gRPC
//! (`shop.product.v1.ProductService/GetProduct`).
//!
//! Adding a product that is already in the cart adds to its quantity; setting a quantity
//! of 0 removes the line. A line holds 1 to [`MAX_QUANTITY`] units and a cart at most
//! [`MAX_LINES`] lines.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use micro_core::grpc::GrpcChannel;
use micro_core::service::Service;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, Body, UserId};
use crate::catalog::{Money, Product};
use crate::product_grpc::{pb, ProductServiceClient};
use crate::store::Store;

const CARTS: &str = "carts";

/// The most units of one product in a cart.
pub const MAX_QUANTITY: i64 = 99;
/// The most lines in a cart.
pub const MAX_LINES: usize = 50;

/// A line of a cart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The product's id (its SKU).
    pub sku: String,
    /// Its name when it was added.
    pub name: String,
    /// Its price when it was added.
    pub unit_price: Money,
    /// Units.
    pub quantity: i64,
}

/// A user's cart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cart {
    /// The lines, in the order they were added.
    pub lines: Vec<Line>,
}

impl Cart {
    /// The sum of the lines, when they share one currency.
    pub fn total(&self) -> Option<Money> {
        let currency = self.lines.first()?.unit_price.currency.clone();
        let mut amount = 0;
        for line in &self.lines {
            if line.unit_price.currency != currency {
                return None;
            }
            amount += line.unit_price.amount * line.quantity;
        }
        Some(Money { amount, currency })
    }
}

/// A cart as the API answers it.
#[derive(Debug, Serialize, Deserialize)]
pub struct CartView {
    /// The lines.
    pub lines: Vec<Line>,
    /// Their sum.
    pub total: Option<Money>,
}

impl From<Cart> for CartView {
    fn from(cart: Cart) -> Self {
        Self {
            total: cart.total(),
            lines: cart.lines,
        }
    }
}

/// `POST /carts/me/items`.
#[derive(Debug, Deserialize)]
pub struct AddItem {
    /// The product.
    pub sku: String,
    /// Units to add, 1 by default.
    #[serde(default = "one")]
    pub quantity: i64,
}

fn one() -> i64 {
    1
}

/// `PUT /carts/me/items/{sku}`.
#[derive(Debug, Deserialize)]
pub struct SetQuantity {
    /// The new quantity; 0 removes the line.
    pub quantity: i64,
}

/// How long a cart kept in Redis lives after its last change: 30 days.
pub const REDIS_CART_TTL_SECS: u64 = 30 * 24 * 3600;

/// Where carts are kept: the service's embedded store, or Redis.
#[derive(Clone)]
pub enum CartStore {
    /// The service's own embedded store.
    Embedded(Store),
    /// Redis, one JSON value per cart under `<prefix>cart:<user>`; edits are
    /// compare-and-set, so concurrent edits of one cart never lose one another, and a
    /// cart expires [`REDIS_CART_TTL_SECS`] after its last change.
    Redis {
        /// The connection.
        connection: redis::aio::ConnectionManager,
        /// Put before every key.
        prefix: String,
    },
}

impl std::fmt::Debug for CartStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded(store) => f.debug_tuple("Embedded").field(store).finish(),
            Self::Redis { prefix, .. } => f.debug_struct("Redis").field("prefix", prefix).finish(),
        }
    }
}

/// Replaces a cart only if it is still what the editor read (`""` for no cart); a cart
/// left alone for [`REDIS_CART_TTL_SECS`] expires.
const COMPARE_AND_SET: &str = r"
local current = redis.call('GET', KEYS[1])
if (current == false and ARGV[1] == '') or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
";

impl CartStore {
    /// Carts in the Redis at `url` (`redis://127.0.0.1:6379`), under `prefix`.
    ///
    /// # Errors
    ///
    /// When Redis cannot be reached.
    pub async fn redis(url: &str, prefix: impl Into<String>) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let connection = redis::aio::ConnectionManager::new(client).await?;
        Ok(Self::Redis {
            connection,
            prefix: prefix.into(),
        })
    }

    async fn get(&self, user: &str) -> anyhow::Result<Cart> {
        match self {
            Self::Embedded(store) => Ok(store.get(CARTS, user)?.unwrap_or_default()),
            Self::Redis { connection, prefix } => {
                let raw: Option<String> = redis::cmd("GET")
                    .arg(format!("{prefix}cart:{user}"))
                    .query_async(&mut connection.clone())
                    .await?;
                Ok(match raw {
                    Some(raw) => serde_json::from_str(&raw)?,
                    None => Cart::default(),
                })
            }
        }
    }

    /// Applies `f` to the user's cart and stores the result, atomically.
    async fn edit(
        &self,
        user: &str,
        f: impl Fn(&mut Cart) -> Result<(), ApiError>,
    ) -> Result<Cart, ApiError> {
        match self {
            Self::Embedded(store) => store
                .write(|tx| {
                    let mut cart: Cart = tx.get(CARTS, user)?.unwrap_or_default();
                    if let Err(error) = f(&mut cart) {
                        return Ok(Err(error));
                    }
                    tx.put(CARTS, user, &cart)?;
                    Ok(Ok(cart))
                })
                .map_err(ApiError::from)?,
            Self::Redis { connection, prefix } => {
                let key = format!("{prefix}cart:{user}");
                let script = redis::Script::new(COMPARE_AND_SET);
                let mut connection = connection.clone();
                // Another edit that won the race makes this one read again.
                for _ in 0..50 {
                    let read: Option<String> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut connection)
                        .await
                        .map_err(anyhow::Error::from)?;
                    let mut cart: Cart = match &read {
                        Some(raw) => serde_json::from_str(raw).map_err(anyhow::Error::from)?,
                        None => Cart::default(),
                    };
                    f(&mut cart)?;
                    let written = serde_json::to_string(&cart).map_err(anyhow::Error::from)?;
                    let swapped: i32 = script
                        .key(&key)
                        .arg(read.as_deref().unwrap_or(""))
                        .arg(&written)
                        .arg(REDIS_CART_TTL_SECS)
                        .invoke_async(&mut connection)
                        .await
                        .map_err(anyhow::Error::from)?;
                    if swapped == 1 {
                        return Ok(cart);
                    }
                }
                Err(ApiError::conflict(
                    "cart_busy",
                    "the cart is being changed elsewhere; try again",
                ))
            }
        }
    }
}

/// The cart service.
#[derive(Debug, Clone)]
pub struct Carts {
    store: CartStore,
    products: ProductServiceClient<GrpcChannel>,
}

fn check_quantity(quantity: i64, allow_zero: bool) -> Result<(), ApiError> {
    let low = if allow_zero { 0 } else { 1 };
    if (low..=MAX_QUANTITY).contains(&quantity) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_quantity",
            format!("a quantity is between {low} and {MAX_QUANTITY}"),
        ))
    }
}

impl Carts {
    /// The service over `store`, pricing lines with the product service's gRPC
    /// `ProductService` behind `products`.
    pub fn new(store: CartStore, products: GrpcChannel) -> Self {
        Self {
            store,
            products: ProductServiceClient::new(products),
        }
    }

    /// The user's cart.
    pub async fn cart(&self, user: &str) -> anyhow::Result<Cart> {
        self.store.get(user).await
    }

    async fn product(&self, sku: &str) -> Result<Product, ApiError> {
        let asked = pb::ProductRequest {
            product_id: sku.to_owned(),
        };
        let answer = self.products.clone().get_product(asked).await;
        match answer.and_then(|answer| Product::try_from(answer.into_inner())) {
            Ok(product) => Ok(product),
            Err(status) if status.code() == tonic::Code::NotFound => Err(ApiError::not_found(
                "product_not_found",
                format!("no product with id `{sku}`"),
            )),
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "the product service failed");
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "catalog_unavailable",
                    "the catalog cannot be read now; try again",
                ))
            }
        }
    }

    /// Adds units of a product, pricing a new line from the catalog.
    pub async fn add(&self, user: &str, sku: &str, quantity: i64) -> Result<Cart, ApiError> {
        check_quantity(quantity, false)?;
        let product = self.product(sku).await?;
        self.store
            .edit(user, |cart| {
                if let Some(line) = cart.lines.iter_mut().find(|l| l.sku == sku) {
                    check_quantity(line.quantity + quantity, false)?;
                    line.quantity += quantity;
                    return Ok(());
                }
                if cart.lines.len() >= MAX_LINES {
                    return Err(ApiError::bad_request(
                        "cart_full",
                        format!("a cart holds at most {MAX_LINES} lines"),
                    ));
                }
                cart.lines.push(Line {
                    sku: product.id.clone(),
                    name: product.name.clone(),
                    unit_price: product.price.clone(),
                    quantity,
                });
                Ok(())
            })
            .await
    }

    /// Sets a line's quantity; 0 removes it.
    pub async fn set(&self, user: &str, sku: &str, quantity: i64) -> Result<Cart, ApiError> {
        check_quantity(quantity, true)?;
        self.store
            .edit(user, |cart| {
                let Some(index) = cart.lines.iter().position(|l| l.sku == sku) else {
                    return Err(ApiError::not_found(
                        "not_in_cart",
                        format!("`{sku}` is not in the cart"),
                    ));
                };
                if quantity == 0 {
                    cart.lines.remove(index);
                } else {
                    cart.lines[index].quantity = quantity;
                }
                Ok(())
            })
            .await
    }

    /// Empties the cart.
    pub async fn clear(&self, user: &str) -> Result<Cart, ApiError> {
        self.store
            .edit(user, |cart| {
                cart.lines.clear();
                Ok(())
            })
            .await
    }
}

async fn show(
    State(carts): State<Carts>,
    UserId(user): UserId,
) -> Result<Json<CartView>, ApiError> {
    Ok(Json(carts.cart(&user).await?.into()))
}

async fn add(
    State(carts): State<Carts>,
    UserId(user): UserId,
    Body(item): Body<AddItem>,
) -> Result<Json<CartView>, ApiError> {
    Ok(Json(
        carts.add(&user, &item.sku, item.quantity).await?.into(),
    ))
}

async fn set(
    State(carts): State<Carts>,
    UserId(user): UserId,
    Path(sku): Path<String>,
    Body(item): Body<SetQuantity>,
) -> Result<Json<CartView>, ApiError> {
    Ok(Json(carts.set(&user, &sku, item.quantity).await?.into()))
}

async fn remove(
    State(carts): State<Carts>,
    UserId(user): UserId,
    Path(sku): Path<String>,
) -> Result<Json<CartView>, ApiError> {
    Ok(Json(carts.set(&user, &sku, 0).await?.into()))
}

async fn clear(
    State(carts): State<Carts>,
    UserId(user): UserId,
) -> Result<Json<CartView>, ApiError> {
    Ok(Json(carts.clear(&user).await?.into()))
}

impl Service for Carts {
    fn name(&self) -> &str {
        "cart-service"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/carts/me", get(show).delete(clear))
            .route("/carts/me/items", post(add))
            .route("/carts/me/items/{sku}", delete(remove).put(set))
            .with_state(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(sku: &str, quantity: i64) -> Line {
        Line {
            sku: sku.to_owned(),
            name: sku.to_owned(),
            unit_price: Money {
                amount: 100,
                currency: "USD".to_owned(),
            },
            quantity,
        }
    }

    /// Twenty concurrent edits of one cart: none is lost.
    async fn concurrent_edits_all_land(store: CartStore) {
        let edits = (0..20).map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .edit("u1", |cart| {
                        match cart.lines.first_mut() {
                            Some(line) => line.quantity += 1,
                            None => cart.lines.push(line("SKU-1", 1)),
                        }
                        Ok(())
                    })
                    .await
                    .unwrap()
            })
        });
        for edit in edits.collect::<Vec<_>>() {
            edit.await.unwrap();
        }
        assert_eq!(store.get("u1").await.unwrap().lines[0].quantity, 20);
        let refused = store
            .edit("u1", |_| Err(ApiError::bad_request("no", "refused")))
            .await;
        assert_eq!(refused.unwrap_err().code(), "no");
        assert_eq!(store.get("u1").await.unwrap().lines[0].quantity, 20);
        assert!(store.get("u2").await.unwrap().lines.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn edits_are_atomic_in_the_embedded_store() {
        concurrent_edits_all_land(CartStore::Embedded(Store::in_memory().unwrap())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn edits_are_atomic_in_redis() {
        let url = std::env::var("MICRO_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let prefix = format!(
            "shop-test-{}-{}:",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        let store = CartStore::redis(&url, prefix)
            .await
            .unwrap_or_else(|e| panic!("Redis at {url} is unreachable: {e}"));
        concurrent_edits_all_land(store).await;
    }
}
