//! The product service over gRPC: `shop.product.v1.ProductService` from
//! `proto/product.proto`, answered by the same [`Catalog`] as the REST API, and a client
//! for the services that price from the catalog.

use std::pin::Pin;

use futures_util::Stream;
use micro_core::grpc::GrpcServices;
use tonic::{Request, Response, Status};

use crate::catalog::{self, Catalog, Product};

/// The code generated from `proto/product.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("shop.product.v1");

    /// The encoded descriptor set of `product.proto`, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/product_descriptor.bin"));
}

pub use pb::product_service_client::ProductServiceClient;

/// The fully qualified name of the service.
pub const SERVICE: &str = "shop.product.v1.ProductService";

/// The product service's gRPC services, for [`micro_core::service::Service::grpc`].
pub fn services(catalog: Catalog) -> GrpcServices {
    GrpcServices::new()
        .add_service(pb::product_service_server::ProductServiceServer::new(
            Products(catalog),
        ))
        .file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
}

impl From<Product> for pb::ProductResponse {
    fn from(product: Product) -> Self {
        // Display only, as the reference has it; the exact price is `unit_price`.
        #[allow(clippy::cast_precision_loss)]
        let price = product.price.amount as f64 / 100.0;
        Self {
            id: product.id,
            name: product.name,
            price,
            description: product.description,
            unit_price: Some(pb::Money {
                amount: product.price.amount,
                currency: product.price.currency,
            }),
        }
    }
}

impl TryFrom<pb::ProductResponse> for Product {
    type Error = Status;

    fn try_from(product: pb::ProductResponse) -> Result<Self, Status> {
        let price = product
            .unit_price
            .ok_or_else(|| Status::data_loss("a product without its unit price"))?;
        Ok(Self {
            id: product.id,
            name: product.name,
            description: product.description,
            price: catalog::Money {
                amount: price.amount,
                currency: price.currency,
            },
        })
    }
}

struct Products(Catalog);

fn unavailable(error: anyhow::Error) -> Status {
    tracing::error!(error = format!("{error:#}"), "the catalog cannot be read");
    Status::unavailable("the catalog cannot be read now")
}

#[tonic::async_trait]
impl pb::product_service_server::ProductService for Products {
    async fn get_product(
        &self,
        request: Request<pb::ProductRequest>,
    ) -> Result<Response<pb::ProductResponse>, Status> {
        let id = &request.get_ref().product_id;
        match self.0.get(id).await.map_err(unavailable)? {
            Some(product) => Ok(Response::new(product.into())),
            None => Err(Status::not_found(format!("no product with id `{id}`"))),
        }
    }

    async fn list_products(
        &self,
        request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        let ask = request.into_inner();
        let page = usize::try_from(ask.page.max(1)).unwrap_or(usize::MAX);
        let per_page = match ask.per_page {
            0 => catalog::DEFAULT_PER_PAGE,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        if per_page > catalog::MAX_PER_PAGE {
            return Err(Status::invalid_argument(
                "page starts at 1 and per_page is between 1 and 100",
            ));
        }
        let (items, total) = self
            .0
            .find(None, page, per_page)
            .await
            .map_err(unavailable)?;
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Response::new(pb::ListProductsResponse {
            items: items.into_iter().map(Into::into).collect(),
            page: count(page),
            per_page: count(per_page),
            total: count(total),
        }))
    }

    type SearchProductsStream =
        Pin<Box<dyn Stream<Item = Result<pb::ProductResponse, Status>> + Send>>;

    /// Streams the matches a page of the catalog at a time, so a large catalog is never
    /// held whole.
    async fn search_products(
        &self,
        request: Request<pb::SearchProductsRequest>,
    ) -> Result<Response<Self::SearchProductsStream>, Status> {
        let needle = request.into_inner().query.to_lowercase();
        let catalog = self.0.clone();
        let pages = futures_util::stream::try_unfold(Some(1), move |page| {
            let (catalog, needle) = (catalog.clone(), needle.clone());
            async move {
                let Some(page) = page else {
                    return Ok::<_, Status>(None);
                };
                let needle = (!needle.is_empty()).then_some(needle.as_str());
                let (items, total) = catalog
                    .find(needle, page, catalog::MAX_PER_PAGE)
                    .await
                    .map_err(unavailable)?;
                let next = (page * catalog::MAX_PER_PAGE < total).then_some(page + 1);
                let items = items.into_iter().map(|p| Ok(p.into()));
                Ok(Some((futures_util::stream::iter(items), next)))
            }
        });
        use futures_util::TryStreamExt;
        Ok(Response::new(Box::pin(pages.try_flatten())))
    }

    async fn batch_get_products(
        &self,
        request: Request<pb::BatchGetProductsRequest>,
    ) -> Result<Response<pb::BatchGetProductsResponse>, Status> {
        let ids = request.into_inner().product_ids;
        if ids.is_empty() || ids.len() > catalog::MAX_BATCH {
            return Err(Status::invalid_argument("give 1 to 100 product ids"));
        }
        let mut answer = pb::BatchGetProductsResponse::default();
        for id in ids {
            match self.0.get(&id).await.map_err(unavailable)? {
                Some(product) => answer.items.push(product.into()),
                None => answer.missing.push(id),
            }
        }
        Ok(Response::new(answer))
    }
}
