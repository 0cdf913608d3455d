//! [`RedisStore`]: the rate limiter's state in Redis, one limit across every gateway that
//! points at the same server and prefix.

use std::time::Duration;

use micro_core::service::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use super::gcra::{Decision, Quota};
use super::store::{RateLimitStore, StoreError};

/// GCRA over every quota in one atomic step, on the server's clock (`TIME`, in
/// microseconds) so gateways with skewed clocks still share one limit. KEYS: one per
/// quota; ARGV: limit and period (µs) per quota. Returns {allowed, limit, remaining,
/// reset µs}, where reset is the wait when refused.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local allowed = 1
local best_remaining, best_limit, best_used = -1, 0, 0
local wait, wait_limit = -1, 0
local new_tats = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  local interval = math.max(math.floor(period / limit), 1)
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local used = new_tat - now
  if used > period then
    allowed = 0
    if used - period > wait then wait, wait_limit = used - period, limit end
  else
    local remaining = math.floor((period - used) / interval)
    if best_remaining < 0 or remaining < best_remaining then
      best_remaining, best_limit, best_used = remaining, limit, used
    end
  end
  new_tats[i] = new_tat
end
if allowed == 0 then
  return {0, wait_limit, 0, wait}
end
for i = 1, #KEYS do
  local ttl = math.ceil((new_tats[i] - now) / 1000) + 1
  redis.call('SET', KEYS[i], string.format('%d', new_tats[i]), 'PX', ttl)
end
return {1, best_limit, best_remaining, best_used}
";

/// A [`RateLimitStore`] in Redis. It connects on first use and reconnects after a
/// failure; every key it writes starts with its prefix and expires when its bucket is
/// full again.
pub struct RedisStore {
    client: redis::Client,
    timeout: Duration,
    prefix: String,
    script: redis::Script,
    connection: OnceCell<ConnectionManager>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("server", &self.client.get_connection_info().addr())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on the server at `url` (`redis://[user:password@]host:port/db`), writing
    /// keys that start with `prefix`, waiting at most `timeout` for an answer.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the URL cannot be parsed; the server is only
    /// contacted on first use.
    pub fn new(
        url: &str,
        prefix: impl Into<String>,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        Ok(Self {
            client,
            timeout,
            prefix: prefix.into(),
            script: redis::Script::new(GCRA),
            connection: OnceCell::new(),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        self.connection
            .get_or_try_init(|| self.client.get_connection_manager_with_config(config))
            .await
            .cloned()
    }

    async fn decide(&self, key: &str, quotas: &[Quota]) -> Result<Decision, redis::RedisError> {
        let mut connection = self.connection().await?;
        let mut invocation = self.script.prepare_invoke();
        for quota in quotas {
            let period = u64::try_from(quota.period.as_micros()).unwrap_or(u64::MAX);
            invocation
                .key(format!("{}{key}:{}", self.prefix, quota.period.as_secs()))
                .arg(quota.limit)
                .arg(period);
        }
        let (allowed, limit, remaining, micros): (i64, u64, u64, u64) =
            invocation.invoke_async(&mut connection).await?;
        let after = Duration::from_micros(micros);
        Ok(Decision {
            allowed: allowed == 1,
            limit,
            remaining,
            reset: after,
            retry_after: (allowed != 1).then_some(after),
        })
    }
}

impl RateLimitStore for RedisStore {
    fn check<'a>(
        &'a self,
        key: &'a str,
        quotas: &'a [Quota],
    ) -> BoxFuture<'a, Result<Decision, StoreError>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout * 2, self.decide(key, quotas))
                .await
                .map_err(|elapsed| StoreError::Unavailable(Box::new(elapsed)))?
                .map_err(|e| StoreError::Unavailable(Box::new(e)))
        })
    }
}
