//! The journeys a virtual user runs, and what each expects of the shop.

use std::str::FromStr;
use std::time::Instant;

use http::Method;
use serde_json::{json, Value};

use super::user::{unexpected, Failure, Step, VirtualUser};
use crate::payment::{DECLINED_CARD, GOOD_CARD, TIMEOUT_CARD};

/// A user journey: a few requests that together do one thing a shopper does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Journey {
    /// Registering and logging in (or just taking a name, without the user service);
    /// once per virtual user, not weighted.
    SignIn,
    /// Pages through the catalog and opens a product.
    Browse,
    /// Searches the catalog.
    Search,
    /// Opens a product and adds it to the cart.
    AddToCart,
    /// Changes a line's quantity, then removes it.
    EditCart,
    /// Looks at the cart and checks its total.
    ViewCart,
    /// Buys one product and waits for the order to be confirmed.
    Checkout,
    /// Buys several products and waits for the order to be confirmed.
    MultiCheckout,
    /// Lists the orders, by status, and opens one.
    OrderHistory,
    /// Cancels a confirmed order (placing one first when there is none).
    Cancel,
    /// Pays with a card that is declined: the order ends cancelled.
    DeclinedCard,
    /// Buys a product that is never in stock: the order ends cancelled (refunded) with
    /// a reason about the stock.
    OutOfStock,
    /// Pays with a card whose charge times out: the order ends cancelled, after as
    /// long as the payment service waits.
    PaymentTimeout,
}

impl Journey {
    /// Every weighted journey.
    pub const ALL: &'static [Journey] = &[
        Journey::Browse,
        Journey::Search,
        Journey::AddToCart,
        Journey::EditCart,
        Journey::ViewCart,
        Journey::Checkout,
        Journey::MultiCheckout,
        Journey::OrderHistory,
        Journey::Cancel,
        Journey::DeclinedCard,
        Journey::OutOfStock,
        Journey::PaymentTimeout,
    ];

    /// The journey's name, as `--weights` and the report spell it.
    pub fn name(self) -> &'static str {
        match self {
            Journey::SignIn => "sign-in",
            Journey::Browse => "browse",
            Journey::Search => "search",
            Journey::AddToCart => "add-to-cart",
            Journey::EditCart => "edit-cart",
            Journey::ViewCart => "view-cart",
            Journey::Checkout => "checkout",
            Journey::MultiCheckout => "multi-checkout",
            Journey::OrderHistory => "order-history",
            Journey::Cancel => "cancel",
            Journey::DeclinedCard => "declined-card",
            Journey::OutOfStock => "out-of-stock",
            Journey::PaymentTimeout => "payment-timeout",
        }
    }
}

impl FromStr for Journey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Journey::ALL
            .iter()
            .copied()
            .find(|j| j.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Journey::ALL.iter().map(|j| j.name()).collect();
                format!("unknown journey `{s}` (one of {})", names.join(", "))
            })
    }
}

/// The products that are in stock at the start.
const SKUS: &[&str] = &[
    "SKU-1001", "SKU-1002", "SKU-1003", "SKU-1004", "SKU-1005", "SKU-1006", "SKU-1007", "SKU-1008",
];
const OUT_OF_STOCK_SKU: &str = "SKU-OOS";
/// Searches that find something in the seed catalog, and one that finds nothing.
const FINDS: &[&str] = &[
    "coffee", "cup", "kettle", "steel", "filter", "grinder", "MILK",
];
const FINDS_NOTHING: &str = "teapot-xyz";
/// A cart line is trimmed back above this, so that adding never hits the limit.
const LINE_CAP: i64 = 20;

/// How an order ended.
#[derive(Debug)]
struct Settled {
    order: Value,
}

impl Settled {
    fn status(&self) -> &str {
        self.order["status"].as_str().unwrap_or("")
    }

    fn reasons(&self) -> String {
        self.order["history"]
            .as_array()
            .map(|h| {
                h.iter()
                    .filter_map(|c| c["reason"].as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default()
    }

    fn unexpected(&self, wanted: &str) -> Failure {
        Failure::Unexpected(format!(
            "order {} ended {} ({}), not {wanted}",
            self.order["id"].as_str().unwrap_or("?"),
            self.status(),
            self.reasons()
        ))
    }

    /// Confirmed, or cancelled because the stock ran out under load (expected).
    fn confirmed(&self) -> Step<()> {
        match self.status() {
            "CONFIRMED" => Ok(()),
            "CANCELLED" if self.reasons().contains("stock") => Err(Failure::Expected(
                "checkout cancelled: the stock ran out".to_owned(),
            )),
            _ => Err(self.unexpected("CONFIRMED")),
        }
    }

    fn cancelled_because(&self, why: &str) -> Step<()> {
        if self.status() == "CANCELLED" && self.reasons().to_lowercase().contains(why) {
            Ok(())
        } else {
            Err(self.unexpected(&format!("CANCELLED because of `{why}`")))
        }
    }
}

impl VirtualUser {
    /// Runs one journey.
    pub(crate) async fn journey(&mut self, journey: Journey) -> Step<()> {
        match journey {
            Journey::SignIn => Ok(()),
            Journey::Browse => self.browse().await,
            Journey::Search => self.search().await,
            Journey::AddToCart => self.add_to_cart().await,
            Journey::EditCart => self.edit_cart().await,
            Journey::ViewCart => self.view_cart().await.map(drop),
            Journey::Checkout => {
                let count = 1;
                self.checkout(count, GOOD_CARD).await?.confirmed()
            }
            Journey::MultiCheckout => {
                let count = self.rng.between(2, 4) as usize;
                self.checkout(count, GOOD_CARD).await?.confirmed()
            }
            Journey::OrderHistory => self.order_history().await,
            Journey::Cancel => self.cancel().await,
            Journey::DeclinedCard => self
                .checkout(1, DECLINED_CARD)
                .await?
                .cancelled_because("declined"),
            Journey::OutOfStock => self.out_of_stock().await,
            Journey::PaymentTimeout => self.checkout(1, TIMEOUT_CARD).await?.cancelled_because(""),
        }
    }

    async fn browse(&mut self) -> Step<()> {
        let per_page = self.rng.between(2, 4);
        let mut page = 1;
        let mut seen = Vec::new();
        loop {
            let path = format!("/api/products?page={page}&per_page={per_page}");
            let body = self.get(&path).await?;
            let items = body["items"].as_array().cloned().unwrap_or_default();
            let total = body["total"].as_i64().unwrap_or(0);
            seen.extend(
                items
                    .iter()
                    .filter_map(|p| p["id"].as_str().map(str::to_owned)),
            );
            if items.is_empty() || page * per_page >= total || page == 3 {
                break;
            }
            page += 1;
        }
        if seen.is_empty() {
            return Err(Failure::Unexpected(
                "the catalog's first pages are empty".to_owned(),
            ));
        }
        let sku = self.rng.pick(&seen).clone();
        let product = self.get(&format!("/api/products/{sku}")).await?;
        if product["id"] != sku.as_str() {
            return Err(Failure::Unexpected(format!(
                "GET /api/products/{sku} answered {product}"
            )));
        }
        Ok(())
    }

    async fn search(&mut self) -> Step<()> {
        let (term, finds) = if self.rng.below(8) == 0 {
            (FINDS_NOTHING, false)
        } else {
            (*self.rng.pick(FINDS), true)
        };
        let body = self.get(&format!("/api/products?q={term}")).await?;
        let found = body["items"].as_array().map_or(0, Vec::len);
        if (found > 0) != finds {
            return Err(Failure::Unexpected(format!(
                "searching `{term}` found {found} products"
            )));
        }
        Ok(())
    }

    async fn add(&mut self, sku: &str, quantity: i64) -> Step<Value> {
        let body = json!({"sku": sku, "quantity": quantity});
        self.expect(Method::POST, "/api/carts/me/items", Some(body), 200)
            .await
    }

    async fn add_to_cart(&mut self) -> Step<()> {
        let sku = *self.rng.pick(SKUS);
        self.get(&format!("/api/products/{sku}")).await?;
        let quantity = self.rng.between(1, 3);
        let cart = self.add(sku, quantity).await?;
        let line = line_quantity(&cart, sku).ok_or_else(|| {
            Failure::Unexpected(format!("{sku} is not in the cart after adding it: {cart}"))
        })?;
        if line > LINE_CAP {
            self.expect(
                Method::DELETE,
                &format!("/api/carts/me/items/{sku}"),
                None,
                200,
            )
            .await?;
        }
        Ok(())
    }

    async fn edit_cart(&mut self) -> Step<()> {
        let cart = self.get("/api/carts/me").await?;
        let skus: Vec<String> = lines(&cart)
            .iter()
            .filter_map(|l| l["sku"].as_str().map(str::to_owned))
            .collect();
        let sku = match skus.is_empty() {
            true => {
                let sku = (*self.rng.pick(SKUS)).to_owned();
                self.add(&sku, 1).await?;
                sku
            }
            false => self.rng.pick(&skus).clone(),
        };
        let path = format!("/api/carts/me/items/{sku}");
        let quantity = self.rng.between(1, 5);
        let cart = self
            .expect(Method::PUT, &path, Some(json!({"quantity": quantity})), 200)
            .await?;
        if line_quantity(&cart, &sku) != Some(quantity) {
            return Err(Failure::Unexpected(format!(
                "setting {sku} to {quantity} gave {cart}"
            )));
        }
        let cart = if self.rng.below(2) == 0 {
            self.expect(Method::DELETE, &path, None, 200).await?
        } else {
            self.expect(Method::PUT, &path, Some(json!({"quantity": 0})), 200)
                .await?
        };
        if line_quantity(&cart, &sku).is_some() {
            return Err(Failure::Unexpected(format!(
                "{sku} stayed in the cart after its removal: {cart}"
            )));
        }
        Ok(())
    }

    async fn view_cart(&mut self) -> Step<Value> {
        let cart = self.get("/api/carts/me").await?;
        let sum: i64 = lines(&cart)
            .iter()
            .map(|l| {
                l["unit_price"]["amount"].as_i64().unwrap_or(0)
                    * l["quantity"].as_i64().unwrap_or(0)
            })
            .sum();
        let total = cart["total"]["amount"].as_i64().unwrap_or(0);
        if total != sum {
            return Err(Failure::Unexpected(format!(
                "the cart's total {total} is not the sum of its lines {sum}: {cart}"
            )));
        }
        Ok(cart)
    }

    /// Empties the cart, fills it with `count` products and places the order with
    /// `card`; the order once final.
    async fn checkout(&mut self, count: usize, card: &str) -> Step<Settled> {
        self.expect(Method::DELETE, "/api/carts/me", None, 200)
            .await?;
        let mut skus = SKUS.to_vec();
        for _ in 0..count.min(skus.len()) {
            let index = self.rng.below(skus.len() as u64) as usize;
            let sku = skus.swap_remove(index);
            let quantity = self.rng.between(1, 2);
            self.add(sku, quantity).await?;
        }
        self.place(card).await
    }

    async fn place(&mut self, card: &str) -> Step<Settled> {
        let key = uuid::Uuid::new_v4().to_string();
        let body = json!({"card_number": card});
        let reply = self
            .call(Method::POST, "/api/orders", Some(body), Some(&key))
            .await?;
        if reply.status != 202 {
            return Err(unexpected("POST /api/orders", &reply));
        }
        let id = reply.body["id"]
            .as_str()
            .ok_or_else(|| Failure::Unexpected(format!("an order without id: {}", reply.body)))?
            .to_owned();
        self.settled(&id).await
    }

    /// Polls the order until it is final, or fails after the order timeout.
    async fn settled(&mut self, id: &str) -> Step<Settled> {
        let deadline = Instant::now() + self.config.order_timeout;
        let path = format!("/api/orders/{id}");
        loop {
            let order = self.get(&path).await?;
            match order["status"].as_str() {
                Some("PENDING" | "PAID" | "CANCELLING") => {}
                Some(_) => return Ok(Settled { order }),
                None => {
                    return Err(Failure::Unexpected(format!(
                        "order {id} has no status: {order}"
                    )))
                }
            }
            if Instant::now() >= deadline {
                return Err(Failure::Unexpected(format!(
                    "order {id} is still {} after {:?}",
                    order["status"], self.config.order_timeout
                )));
            }
            tokio::time::sleep(self.config.poll_interval).await;
        }
    }

    async fn order_history(&mut self) -> Step<()> {
        let all = self.get("/api/orders").await?;
        let all = all
            .as_array()
            .ok_or_else(|| Failure::Unexpected(format!("GET /api/orders answered {all}")))?
            .clone();
        let status = *self.rng.pick(&["CONFIRMED", "CANCELLED"]);
        let some = self.get(&format!("/api/orders?status={status}")).await?;
        let some = some.as_array().cloned().unwrap_or_default();
        if some.iter().any(|o| o["status"] != status) || some.len() > all.len() {
            return Err(Failure::Unexpected(format!(
                "the orders filtered by {status} are not: {some:?}"
            )));
        }
        if let Some(order) = all.first() {
            let id = order["id"].as_str().unwrap_or("");
            let one = self.get(&format!("/api/orders/{id}")).await?;
            if one["id"] != order["id"] {
                return Err(Failure::Unexpected(format!(
                    "GET /api/orders/{id} answered {one}"
                )));
            }
        }
        Ok(())
    }

    async fn cancel(&mut self) -> Step<()> {
        let confirmed = self.get("/api/orders?status=CONFIRMED").await?;
        let id = match confirmed[0]["id"].as_str() {
            Some(id) => id.to_owned(),
            None => {
                let settled = self.checkout(1, GOOD_CARD).await?;
                settled.confirmed()?;
                settled.order["id"].as_str().unwrap_or_default().to_owned()
            }
        };
        let path = format!("/api/orders/{id}/cancel");
        let reply = self.call(Method::POST, &path, None, None).await?;
        // 200 once cancelled, 202 while the cancel goes on.
        if reply.status != 200 && reply.status != 202 {
            return Err(unexpected(&format!("POST {path}"), &reply));
        }
        let order = self.settled(&id).await?.order;
        if order["status"] != "CANCELLED" {
            return Err(Failure::Unexpected(format!(
                "cancelling order {id} left it {}",
                order["status"]
            )));
        }
        Ok(())
    }

    async fn out_of_stock(&mut self) -> Step<()> {
        self.expect(Method::DELETE, "/api/carts/me", None, 200)
            .await?;
        if self.rng.below(2) == 0 {
            let sku = *self.rng.pick(SKUS);
            self.add(sku, 1).await?;
        }
        self.add(OUT_OF_STOCK_SKU, 1).await?;
        self.place(GOOD_CARD).await?.cancelled_because("stock")
    }
}

fn lines(cart: &Value) -> Vec<Value> {
    cart["lines"].as_array().cloned().unwrap_or_default()
}

fn line_quantity(cart: &Value, sku: &str) -> Option<i64> {
    lines(cart)
        .iter()
        .find(|l| l["sku"] == sku)
        .and_then(|l| l["quantity"].as_i64())
}
