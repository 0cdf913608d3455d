//! The cart service: one cart per signed-in user, priced from the catalog when a product
//! is added (each line keeps that price snapshot).
//!
//! Adding a product that is already in the cart adds to its quantity; setting a quantity
//! of 0 removes the line. A line holds 1 to [`MAX_QUANTITY`] units and a cart at most
//! [`MAX_LINES`] lines.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use micro_core::client::HttpClient;
use micro_core::service::Service;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, Body, UserId};
use crate::catalog::{Money, Product};
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

/// The cart service.
#[derive(Debug, Clone)]
pub struct Carts {
    store: Store,
    products: HttpClient,
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
    /// The service over `store`, pricing lines with the product service behind `products`.
    pub fn new(store: Store, products: HttpClient) -> Self {
        Self { store, products }
    }

    /// The user's cart.
    pub fn cart(&self, user: &str) -> anyhow::Result<Cart> {
        Ok(self.store.get(CARTS, user)?.unwrap_or_default())
    }

    async fn product(&self, sku: &str) -> Result<Product, ApiError> {
        match self
            .products
            .get_json::<Product>(&format!("/products/{sku}"))
            .await
        {
            Ok(product) => Ok(product),
            Err(error) if error.status() == Some(StatusCode::NOT_FOUND) => Err(
                ApiError::not_found("product_not_found", format!("no product with id `{sku}`")),
            ),
            Err(error) => {
                tracing::warn!(%error, "the product service failed");
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "catalog_unavailable",
                    "the catalog cannot be read now; try again",
                ))
            }
        }
    }

    fn edit(
        &self,
        user: &str,
        f: impl FnOnce(&mut Cart) -> Result<(), ApiError>,
    ) -> Result<Cart, ApiError> {
        self.store
            .write(|tx| {
                let mut cart: Cart = tx.get(CARTS, user)?.unwrap_or_default();
                if let Err(error) = f(&mut cart) {
                    return Ok(Err(error));
                }
                tx.put(CARTS, user, &cart)?;
                Ok(Ok(cart))
            })
            .map_err(ApiError::from)?
    }

    /// Adds units of a product, pricing a new line from the catalog.
    pub async fn add(&self, user: &str, sku: &str, quantity: i64) -> Result<Cart, ApiError> {
        check_quantity(quantity, false)?;
        let product = self.product(sku).await?;
        self.edit(user, |cart| {
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
                sku: product.id,
                name: product.name,
                unit_price: product.price,
                quantity,
            });
            Ok(())
        })
    }

    /// Sets a line's quantity; 0 removes it.
    pub fn set(&self, user: &str, sku: &str, quantity: i64) -> Result<Cart, ApiError> {
        check_quantity(quantity, true)?;
        self.edit(user, |cart| {
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
    }

    /// Empties the cart.
    pub fn clear(&self, user: &str) -> Result<Cart, ApiError> {
        self.edit(user, |cart| {
            cart.lines.clear();
            Ok(())
        })
    }
}

async fn show(
    State(carts): State<Carts>,
    UserId(user): UserId,
) -> Result<Json<CartView>, ApiError> {
    Ok(Json(carts.cart(&user)?.into()))
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
    Ok(Json(carts.set(&user, &sku, item.quantity)?.into()))
}

async fn remove(
    State(carts): State<Carts>,
    UserId(user): UserId,
    Path(sku): Path<String>,
) -> Result<Json<CartView>, ApiError> {
    Ok(Json(carts.set(&user, &sku, 0)?.into()))
}

async fn clear(
    State(carts): State<Carts>,
    UserId(user): UserId,
) -> Result<Json<CartView>, ApiError> {
    Ok(Json(carts.clear(&user)?.into()))
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
