use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use tower_service::Service;

use super::error::{Error, RequestInfo};
use super::{BoxError, ClientRequest, Connector};

/// The bottom of the client stack: one exchange over a pooled hyper connection.
///
/// It reads the whole response body and fails non-`2xx` answers here, below the
/// layers added by the user, so that a retry layer sees the classified [`Error`].
#[derive(Debug, Clone)]
pub(super) struct Transport {
    pub(super) client: Client<Connector, Full<Bytes>>,
    pub(super) timeout: Option<Duration>,
    pub(super) max_body: usize,
}

impl Service<ClientRequest> for Transport {
    type Response = http::Response<Bytes>;
    type Error = BoxError;
    type Future = crate::service::BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ClientRequest) -> Self::Future {
        let info = RequestInfo::of(&req);
        let exchange = exchange(self.client.clone(), req, self.max_body);
        let timeout = self.timeout;
        Box::pin(async move {
            let result = match timeout {
                Some(after) => tokio::time::timeout(after, exchange)
                    .await
                    .unwrap_or_else(|_| Err(Error::timeout(after))),
                None => exchange.await,
            };
            result.map_err(|err| err.with_request(&info).into())
        })
    }
}

async fn exchange(
    client: Client<Connector, Full<Bytes>>,
    req: ClientRequest,
    max_body: usize,
) -> Result<http::Response<Bytes>, Error> {
    let (parts, body) = client
        .request(req)
        .await
        .map_err(Error::hyper)?
        .into_parts();
    let body = Limited::new(body, max_body)
        .collect()
        .await
        .map_err(|err| {
            if err.is::<LengthLimitError>() {
                Error::body_too_large(max_body)
            } else {
                Error::transport(err)
            }
        })?
        .to_bytes();
    if !parts.status.is_success() {
        return Err(Error::status_code(parts.status, body));
    }
    Ok(http::Response::from_parts(parts, body))
}
