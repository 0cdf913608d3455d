//! The product catalog service: list with paging, search, get by id, batch get.
//!
//! The catalog is seeded at start, in memory, or once into PostgreSQL when the shop is
//! configured for it. Prices are integer minor units with a currency, never floats.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use micro_core::health::HealthCheck;
use micro_core::service::Service;
use serde::{Deserialize, Serialize};

/// A price in minor units (cents) of a currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    /// Amount in minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
}

/// A catalog entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// Stable id, also the SKU.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Short description.
    pub description: String,
    /// Unit price.
    pub price: Money,
}

/// The catalog service: its products in memory, or in PostgreSQL.
#[derive(Debug, Clone)]
pub struct Catalog {
    products: Arc<Vec<Product>>,
    #[cfg(feature = "real-servers")]
    postgres: Option<Arc<PgCatalog>>,
}

/// A `products` table in PostgreSQL.
#[cfg(feature = "real-servers")]
struct PgCatalog {
    pool: micro_events::postgres::Pool,
    schema: String,
}

#[cfg(feature = "real-servers")]
impl std::fmt::Debug for PgCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCatalog")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl Catalog {
    /// A catalog holding `products`.
    pub fn new(products: Vec<Product>) -> Self {
        Self {
            products: Arc::new(products),
            #[cfg(feature = "real-servers")]
            postgres: None,
        }
    }

    /// The catalog in PostgreSQL at `url`, in `schema` (created if missing), holding at
    /// least the products of `seed`.
    ///
    /// # Errors
    ///
    /// When PostgreSQL cannot be reached or the schema is not a plain name.
    #[cfg(feature = "real-servers")]
    pub async fn in_postgres(url: &str, schema: &str, seed: &Catalog) -> anyhow::Result<Self> {
        let pool = crate::store::postgres::pool_with_schema(url, schema, "product-service").await?;
        let client = pool.get().await?;
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {schema}.products (
                     id text PRIMARY KEY,
                     doc jsonb NOT NULL
                 )"
            ))
            .await?;
        for product in seed.products.iter() {
            client
                .execute(
                    &format!(
                        "INSERT INTO {schema}.products (id, doc) VALUES ($1, $2)
                         ON CONFLICT (id) DO NOTHING"
                    ),
                    &[&product.id, &serde_json::to_value(product)?],
                )
                .await?;
        }
        Ok(Self {
            products: seed.products.clone(),
            postgres: Some(Arc::new(PgCatalog {
                pool,
                schema: schema.to_owned(),
            })),
        })
    }

    /// The products matching `needle` (lowercase), a page of them and how many in all.
    pub(crate) async fn find(
        &self,
        needle: Option<&str>,
        page: usize,
        per_page: usize,
    ) -> anyhow::Result<(Vec<Product>, usize)> {
        #[cfg(feature = "real-servers")]
        if let Some(pg) = &self.postgres {
            let s = &pg.schema;
            let filter = "$1::text IS NULL OR strpos(lower(doc->>'name'), $1) > 0 \
                          OR strpos(lower(doc->>'description'), $1) > 0";
            let client = pg.pool.get().await?;
            let total: i64 = client
                .query_one(
                    &format!("SELECT count(*) FROM {s}.products WHERE {filter}"),
                    &[&needle],
                )
                .await?
                .get(0);
            let (limit, offset) = (
                i64::try_from(per_page)?,
                i64::try_from((page - 1) * per_page)?,
            );
            let rows = client
                .query(
                    &format!(
                        "SELECT doc FROM {s}.products WHERE {filter} ORDER BY id LIMIT $2 OFFSET $3"
                    ),
                    &[&needle, &limit, &offset],
                )
                .await?;
            let items = rows
                .into_iter()
                .map(|row| serde_json::from_value(row.get(0)))
                .collect::<Result<_, _>>()?;
            return Ok((items, usize::try_from(total)?));
        }
        let matching: Vec<&Product> = self
            .products
            .iter()
            .filter(|p| {
                needle.is_none_or(|n| {
                    p.name.to_lowercase().contains(n) || p.description.to_lowercase().contains(n)
                })
            })
            .collect();
        let items = matching
            .iter()
            .skip((page - 1) * per_page)
            .take(per_page)
            .map(|p| (*p).clone())
            .collect();
        Ok((items, matching.len()))
    }

    /// The product `id`, if there is one.
    pub(crate) async fn get(&self, id: &str) -> anyhow::Result<Option<Product>> {
        #[cfg(feature = "real-servers")]
        if let Some(pg) = &self.postgres {
            let row = pg
                .pool
                .get()
                .await?
                .query_opt(
                    &format!("SELECT doc FROM {}.products WHERE id = $1", pg.schema),
                    &[&id],
                )
                .await?;
            return Ok(row.map(|r| serde_json::from_value(r.get(0))).transpose()?);
        }
        Ok(self.products.iter().find(|p| p.id == id).cloned())
    }

    /// Every product.
    pub fn products(&self) -> &[Product] {
        &self.products
    }

    /// The seed catalog the shop starts with.
    pub fn seeded() -> Self {
        let product = |id: &str, name: &str, description: &str, cents: i64| Product {
            id: id.to_owned(),
            name: name.to_owned(),
            description: description.to_owned(),
            price: Money {
                amount: cents,
                currency: "USD".to_owned(),
            },
        };
        Self::new(vec![
            product("SKU-1001", "Espresso cup", "Porcelain, 90 ml", 1200),
            product("SKU-1002", "Pour-over kettle", "Gooseneck, 1 l", 4900),
            product("SKU-1003", "Hand grinder", "Ceramic burrs", 6500),
            product("SKU-1004", "Coffee beans", "Single origin, 250 g", 1450),
            product("SKU-1005", "Paper filters", "Pack of 100", 600),
            product("SKU-1006", "Milk jug", "Stainless steel, 350 ml", 1800),
            product("SKU-1007", "Scale", "0.1 g resolution with timer", 3900),
            product("SKU-1008", "Tamper", "58 mm, flat base", 2500),
            product(
                "SKU-OOS",
                "Limited roast",
                "Always sold out (test SKU)",
                2900,
            ),
        ])
    }
}

/// Paging and search parameters of `GET /products`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// 1-based page number.
    #[serde(default = "first_page")]
    pub page: usize,
    /// Products per page, 1 to 100.
    #[serde(default = "default_per_page")]
    pub per_page: usize,
    /// Case-insensitive text to find in the name or description.
    pub q: Option<String>,
}

fn first_page() -> usize {
    1
}

fn default_per_page() -> usize {
    DEFAULT_PER_PAGE
}

/// Products per page when the caller does not say.
pub(crate) const DEFAULT_PER_PAGE: usize = 20;
/// The most products per page, and per search page streamed over gRPC.
pub(crate) const MAX_PER_PAGE: usize = 100;
/// The most ids of one batch get.
pub(crate) const MAX_BATCH: usize = 100;

/// A page of products.
#[derive(Debug, Serialize, Deserialize)]
pub struct Page {
    /// The products on this page.
    pub items: Vec<Product>,
    /// This page's number.
    pub page: usize,
    /// Products per page.
    pub per_page: usize,
    /// Products matching the query, on all pages.
    pub total: usize,
}

/// An error answered as `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

async fn list(
    State(catalog): State<Catalog>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_query",
        message: rejection.body_text(),
    })?;
    if query.page == 0 || !(1..=MAX_PER_PAGE).contains(&query.per_page) {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_paging",
            message: "page starts at 1 and per_page is between 1 and 100".to_owned(),
        });
    }
    let needle = query.q.as_deref().map(str::to_lowercase);
    let (items, total) = catalog
        .find(needle.as_deref(), query.page, query.per_page)
        .await
        .map_err(|error| {
            tracing::error!(error = format!("{error:#}"), "the catalog cannot be read");
            ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "catalog_unavailable",
                message: "the catalog cannot be read now".to_owned(),
            }
        })?;
    Ok(Json(Page {
        items,
        page: query.page,
        per_page: query.per_page,
        total,
    }))
}

async fn product(
    State(catalog): State<Catalog>,
    Path(id): Path<String>,
) -> Result<Json<Product>, ApiError> {
    let found = catalog.get(&id).await.map_err(|error| {
        tracing::error!(error = format!("{error:#}"), "the catalog cannot be read");
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "catalog_unavailable",
            message: "the catalog cannot be read now".to_owned(),
        }
    })?;
    found.map(Json).ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        code: "product_not_found",
        message: format!("no product with id `{id}`"),
    })
}

/// `GET /products/batch?ids=SKU-1001,SKU-1002`.
#[derive(Debug, Deserialize)]
pub struct BatchQuery {
    /// Product ids, comma-separated, at most 100.
    pub ids: String,
}

/// The answer to a batch get.
#[derive(Debug, Serialize, Deserialize)]
pub struct Batch {
    /// The products found, in the order asked.
    pub items: Vec<Product>,
    /// The ids with no product.
    pub missing: Vec<String>,
}

async fn batch(
    State(catalog): State<Catalog>,
    query: Result<Query<BatchQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Batch>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_query",
        message: rejection.body_text(),
    })?;
    let ids: Vec<&str> = query
        .ids
        .split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .collect();
    if ids.is_empty() || ids.len() > MAX_BATCH {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_ids",
            message: "give 1 to 100 product ids, comma-separated".to_owned(),
        });
    }
    let mut found = Batch {
        items: Vec::with_capacity(ids.len()),
        missing: Vec::new(),
    };
    for id in ids {
        match catalog.get(id).await.map_err(|error| {
            tracing::error!(error = format!("{error:#}"), "the catalog cannot be read");
            ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "catalog_unavailable",
                message: "the catalog cannot be read now".to_owned(),
            }
        })? {
            Some(product) => found.items.push(product),
            None => found.missing.push(id.to_owned()),
        }
    }
    Ok(Json(found))
}

impl Service for Catalog {
    fn name(&self) -> &str {
        "product-service"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/products", get(list))
            .route("/products/batch", get(batch))
            .route("/products/{id}", get(product))
            .with_state(self.clone())
    }

    /// `shop.product.v1.ProductService`, from the same catalog; see [`crate::product_grpc`].
    fn grpc(&self) -> Option<micro_core::grpc::GrpcServices> {
        Some(crate::product_grpc::services(self.clone()))
    }

    fn health_checks(&self) -> Vec<HealthCheck> {
        let products = self.products.clone();
        #[cfg_attr(not(feature = "real-servers"), allow(unused_mut))]
        let mut checks = vec![HealthCheck::new("catalog", move || {
            let loaded = !products.is_empty();
            async move {
                if loaded {
                    Ok(())
                } else {
                    Err("the catalog is empty".into())
                }
            }
        })];
        #[cfg(feature = "real-servers")]
        if let Some(pg) = &self.postgres {
            checks.push(crate::store::postgres::health_check(&pg.pool));
        }
        checks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn call(uri: &str) -> (StatusCode, serde_json::Value) {
        let router = Service::router(&Catalog::seeded());
        let response = router
            .oneshot(axum::http::Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn pages_through_the_catalog() {
        let (status, page) = call("/products?page=2&per_page=4").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(page["total"], 9);
        assert_eq!(page["items"].as_array().unwrap().len(), 4);
        assert_eq!(page["items"][0]["id"], "SKU-1005");
        let (_, last) = call("/products?page=3&per_page=4").await;
        assert_eq!(last["items"].as_array().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn searches_names_and_descriptions() {
        let (_, page) = call("/products?q=KETTLE").await;
        assert_eq!(page["total"], 1);
        assert_eq!(page["items"][0]["price"]["amount"], 4900);
        let (_, page) = call("/products?q=steel").await;
        assert_eq!(page["items"][0]["id"], "SKU-1006");
    }

    #[tokio::test]
    async fn a_batch_get_answers_in_the_order_asked_and_names_the_missing() {
        let (status, batch) = call("/products/batch?ids=SKU-1003,SKU-9,SKU-1001").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(batch["items"][0]["id"], "SKU-1003");
        assert_eq!(batch["items"][1]["id"], "SKU-1001");
        assert_eq!(batch["missing"], serde_json::json!(["SKU-9"]));
        let (status, body) = call("/products/batch?ids=").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_ids");
    }

    #[tokio::test]
    async fn bad_input_gets_a_json_error() {
        let (status, body) = call("/products?per_page=0").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_paging");
        let (status, body) = call("/products?page=abc").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_query");
        let (status, body) = call("/products/SKU-9").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "product_not_found");
    }

    #[cfg(feature = "real-servers")]
    #[tokio::test]
    async fn the_catalog_in_postgres_pages_searches_and_gets_like_the_one_in_memory() {
        let url = std::env::var("MICRO_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let schema = format!("shop_products_test_{}", uuid::Uuid::new_v4().simple());
        let memory = Catalog::seeded();
        let pg = Catalog::in_postgres(&url, &schema, &memory)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {url} is unreachable: {e:#}"));
        for (needle, page, per_page) in [
            (None, 2, 4),
            (None, 3, 4),
            (Some("kettle"), 1, 20),
            (Some("steel"), 1, 2),
            (Some("nothing"), 1, 5),
        ] {
            let expected = memory.find(needle, page, per_page).await.unwrap();
            assert_eq!(
                pg.find(needle, page, per_page).await.unwrap(),
                expected,
                "{needle:?} {page}"
            );
        }
        assert_eq!(
            pg.get("SKU-1002").await.unwrap(),
            memory.get("SKU-1002").await.unwrap()
        );
        assert!(pg.get("SKU-9").await.unwrap().is_none());
        let pg = pg.postgres.unwrap();
        pg.pool
            .get()
            .await
            .unwrap()
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }
}
