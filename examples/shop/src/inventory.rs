//! The inventory service: stock levels, and per-order reservations that are committed
//! when the order is confirmed or released when it is not.
//!
//! Every operation is idempotent by order id, so that a saga step sent twice has one
//! effect. For every SKU, `available + reserved = initial - committed` at all times.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use micro_core::health::HealthCheck;
use micro_core::service::Service;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, Body};
use crate::store::Store;
use crate::trust::{only, ORDER_SERVICE};

const STOCK: &str = "stock";
const RESERVATIONS: &str = "reservations";

/// SKUs the inventory never has.
pub const ALWAYS_OUT_OF_STOCK: &[&str] = &["SKU-OOS"];

/// One SKU's stock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    /// Units that can be reserved.
    pub available: i64,
    /// Units held by open reservations.
    pub reserved: i64,
    /// Units that left with confirmed orders.
    pub committed: i64,
}

/// A line of a reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The SKU.
    pub sku: String,
    /// Units, at least 1.
    pub quantity: i64,
}

/// Where a reservation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReservationState {
    /// Units held.
    Reserved,
    /// Units gone with the order.
    Committed,
    /// Units returned.
    Released,
}

/// The units held for one order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The order.
    pub order_id: String,
    /// What is held.
    pub items: Vec<Item>,
    /// Where it is.
    pub state: ReservationState,
}

/// `POST /inventory/reservations`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReserveRequest {
    /// The order the units are for.
    pub order_id: String,
    /// What to hold.
    pub items: Vec<Item>,
}

/// The inventory service.
#[derive(Debug, Clone)]
pub struct Inventory {
    store: Store,
    refuse_releases: bool,
}

impl Inventory {
    /// The service over `store`, stocking `initial` units of each SKU not yet known.
    pub fn new(store: Store, initial: &BTreeMap<String, i64>) -> anyhow::Result<Self> {
        store.write(|tx| {
            for (sku, units) in initial {
                if tx.get::<Stock>(STOCK, sku)?.is_none() {
                    let available = if ALWAYS_OUT_OF_STOCK.contains(&sku.as_str()) {
                        0
                    } else {
                        *units
                    };
                    let stock = Stock {
                        available,
                        reserved: 0,
                        committed: 0,
                    };
                    tx.put(STOCK, sku, &stock)?;
                }
            }
            Ok(())
        })?;
        Ok(Self {
            store,
            refuse_releases: false,
        })
    }

    /// A fault for demos and tests: every release is answered `503
    /// inventory_unavailable`, as from an inventory that is down for them, and returns
    /// nothing. Sagas retry the release until an inventory without the fault answers.
    pub fn refusing_releases(mut self, refuse: bool) -> Self {
        self.refuse_releases = refuse;
        self
    }

    /// Every SKU's stock.
    pub fn levels(&self) -> anyhow::Result<BTreeMap<String, Stock>> {
        Ok(self.store.list(STOCK, "")?.into_iter().collect())
    }

    /// Holds `items` for `order_id`, all or none. Asking again for the same order answers
    /// the reservation made the first time.
    pub fn reserve(&self, order_id: &str, items: &[Item]) -> Result<Reservation, ApiError> {
        if items.is_empty() || items.iter().any(|i| i.quantity < 1) {
            return Err(ApiError::bad_request(
                "invalid_items",
                "a reservation needs items with a quantity of at least 1",
            ));
        }
        self.store
            .write(|tx| {
                if let Some(existing) = tx.get::<Reservation>(RESERVATIONS, order_id)? {
                    return Ok(Ok(existing));
                }
                let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
                for item in items {
                    *wanted.entry(&item.sku).or_default() += item.quantity;
                }
                // Everything is checked before anything is written: all or nothing.
                let mut updated = Vec::with_capacity(wanted.len());
                for (sku, quantity) in &wanted {
                    let Some(mut stock) = tx.get::<Stock>(STOCK, sku)? else {
                        return Ok(Err(ApiError::not_found(
                            "unknown_sku",
                            format!("no stock is kept for `{sku}`"),
                        )));
                    };
                    if stock.available < *quantity {
                        return Ok(Err(ApiError::conflict(
                            "out_of_stock",
                            format!("`{sku}` is out of stock"),
                        )));
                    }
                    stock.available -= quantity;
                    stock.reserved += quantity;
                    updated.push((*sku, stock));
                }
                for (sku, stock) in updated {
                    tx.put(STOCK, sku, &stock)?;
                }
                let reservation = Reservation {
                    order_id: order_id.to_owned(),
                    items: items.to_vec(),
                    state: ReservationState::Reserved,
                };
                tx.put(RESERVATIONS, order_id, &reservation)?;
                Ok(Ok(reservation))
            })
            .map_err(ApiError::from)?
    }

    /// Moves the order's reservation to `to` (committed or released), once.
    fn settle(&self, order_id: &str, to: ReservationState) -> Result<Reservation, ApiError> {
        self.store
            .write(|tx| {
                let Some(mut reservation) = tx.get::<Reservation>(RESERVATIONS, order_id)? else {
                    if to == ReservationState::Released {
                        // Releasing what was never reserved holds nothing back: the
                        // reservation may have failed, or may still be on its way (its
                        // answer was lost), and compensation runs anyway. The empty
                        // released reservation it leaves makes a late reservation for the
                        // order reserve nothing.
                        let released = Reservation {
                            order_id: order_id.to_owned(),
                            items: Vec::new(),
                            state: ReservationState::Released,
                        };
                        tx.put(RESERVATIONS, order_id, &released)?;
                        return Ok(Ok(released));
                    }
                    return Ok(Err(ApiError::not_found(
                        "no_reservation",
                        format!("nothing is reserved for order `{order_id}`"),
                    )));
                };
                if reservation.state == to {
                    return Ok(Ok(reservation));
                }
                let restock = reservation.state == ReservationState::Committed
                    && to == ReservationState::Released;
                if reservation.state != ReservationState::Reserved && !restock {
                    return Ok(Err(ApiError::conflict(
                        "reservation_settled",
                        format!("the reservation of order `{order_id}` is already settled"),
                    )));
                }
                for item in &reservation.items {
                    let mut stock: Stock = tx.get(STOCK, &item.sku)?.unwrap_or(Stock {
                        available: 0,
                        reserved: 0,
                        committed: 0,
                    });
                    if restock {
                        stock.committed -= item.quantity;
                    } else {
                        stock.reserved -= item.quantity;
                    }
                    match to {
                        ReservationState::Committed => stock.committed += item.quantity,
                        _ => stock.available += item.quantity,
                    }
                    tx.put(STOCK, &item.sku, &stock)?;
                }
                reservation.state = to;
                tx.put(RESERVATIONS, order_id, &reservation)?;
                Ok(Ok(reservation))
            })
            .map_err(ApiError::from)?
    }

    /// The units leave with the order.
    pub fn commit(&self, order_id: &str) -> Result<Reservation, ApiError> {
        self.settle(order_id, ReservationState::Committed)
    }

    /// The units return to stock (also after a commit, when a confirmed order is cancelled).
    pub fn release(&self, order_id: &str) -> Result<Reservation, ApiError> {
        if self.refuse_releases {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "inventory_unavailable",
                "stock cannot be returned now; try again",
            ));
        }
        self.settle(order_id, ReservationState::Released)
    }
}

async fn levels(
    State(inventory): State<Inventory>,
) -> Result<Json<BTreeMap<String, Stock>>, ApiError> {
    Ok(Json(inventory.levels()?))
}

async fn level(
    State(inventory): State<Inventory>,
    Path(sku): Path<String>,
) -> Result<Json<Stock>, ApiError> {
    inventory
        .store
        .get(STOCK, &sku)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("unknown_sku", format!("no stock is kept for `{sku}`")))
}

async fn reserve(
    State(inventory): State<Inventory>,
    Body(request): Body<ReserveRequest>,
) -> Result<(StatusCode, Json<Reservation>), ApiError> {
    let reservation = inventory.reserve(&request.order_id, &request.items)?;
    Ok((StatusCode::CREATED, Json(reservation)))
}

async fn commit(
    State(inventory): State<Inventory>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>, ApiError> {
    inventory.commit(&order_id).map(Json)
}

async fn release(
    State(inventory): State<Inventory>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>, ApiError> {
    inventory.release(&order_id).map(Json)
}

impl Service for Inventory {
    fn name(&self) -> &str {
        "inventory-service"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn router(&self) -> Router {
        // Stock moves for orders only: the order service alone reserves, commits and
        // releases.
        let reservations = Router::new()
            .route("/inventory/reservations", post(reserve))
            .route("/inventory/reservations/{order_id}/commit", post(commit))
            .route("/inventory/reservations/{order_id}/release", post(release))
            .route_layer(only([ORDER_SERVICE]));
        Router::new()
            .route("/inventory", get(levels))
            .route("/inventory/{sku}", get(level))
            .merge(reservations)
            .with_state(self.clone())
    }

    fn health_checks(&self) -> Vec<HealthCheck> {
        let store = self.store.clone();
        vec![HealthCheck::new("store", move || {
            let read = store.get::<Stock>(STOCK, "");
            async move { read.map(|_| ()).map_err(Into::into) }
        })]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory() -> Inventory {
        let initial = [("SKU-1", 5), ("SKU-2", 2), ("SKU-OOS", 10)]
            .into_iter()
            .map(|(s, n)| (s.to_owned(), n))
            .collect();
        Inventory::new(Store::in_memory().unwrap(), &initial).unwrap()
    }

    fn items(list: &[(&str, i64)]) -> Vec<Item> {
        list.iter()
            .map(|(sku, quantity)| Item {
                sku: (*sku).to_owned(),
                quantity: *quantity,
            })
            .collect()
    }

    fn holds(inventory: &Inventory) {
        for (sku, stock) in inventory.levels().unwrap() {
            let initial = match sku.as_str() {
                "SKU-1" => 5,
                "SKU-2" => 2,
                _ => 0,
            };
            assert_eq!(
                stock.available + stock.reserved + stock.committed,
                initial,
                "{sku}"
            );
        }
    }

    #[test]
    fn a_reservation_is_all_or_nothing_and_idempotent() {
        let inventory = inventory();
        let error = inventory
            .reserve("o1", &items(&[("SKU-1", 2), ("SKU-2", 3)]))
            .unwrap_err();
        assert_eq!(error.code(), "out_of_stock");
        assert_eq!(inventory.levels().unwrap()["SKU-1"].available, 5);

        let first = inventory.reserve("o2", &items(&[("SKU-1", 2)])).unwrap();
        let again = inventory.reserve("o2", &items(&[("SKU-1", 2)])).unwrap();
        assert_eq!(first, again);
        assert_eq!(inventory.levels().unwrap()["SKU-1"].available, 3);
        holds(&inventory);
        let error = inventory
            .reserve("o3", &items(&[("SKU-OOS", 1)]))
            .unwrap_err();
        assert_eq!(error.code(), "out_of_stock");
    }

    #[test]
    fn commit_and_release_settle_once() {
        let inventory = inventory();
        inventory.reserve("o1", &items(&[("SKU-1", 2)])).unwrap();
        inventory.reserve("o2", &items(&[("SKU-1", 1)])).unwrap();
        inventory.commit("o1").unwrap();
        inventory.commit("o1").unwrap();
        inventory.release("o2").unwrap();
        inventory.release("o2").unwrap();
        assert_eq!(
            inventory.levels().unwrap()["SKU-1"],
            Stock {
                available: 3,
                reserved: 0,
                committed: 2
            }
        );
        assert_eq!(
            inventory.commit("o2").unwrap_err().code(),
            "reservation_settled"
        );
        // A confirmed order that is cancelled returns its units.
        inventory.release("o1").unwrap();
        assert_eq!(inventory.levels().unwrap()["SKU-1"].available, 5);
        // Releasing what was never reserved does nothing.
        inventory.release("never").unwrap();
        holds(&inventory);
    }

    #[test]
    fn a_reservation_arriving_after_its_release_reserves_nothing() {
        let inventory = inventory();
        // The saga's reservation timed out, so it released the order, and only then
        // does the reservation arrive.
        inventory.release("late").unwrap();
        let late = inventory.reserve("late", &items(&[("SKU-1", 2)])).unwrap();
        assert_eq!(late.state, ReservationState::Released);
        assert_eq!(inventory.levels().unwrap()["SKU-1"].available, 5);
        assert_eq!(inventory.levels().unwrap()["SKU-1"].reserved, 0);
        holds(&inventory);
    }
}
