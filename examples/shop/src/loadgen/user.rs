//! A virtual user: its identity, its requests, and the loop that runs its journeys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use micro_core::client::HttpClient;
use serde_json::{json, Value};

use super::report::Recorder;
use super::{Journey, LoadgenConfig, Rng};

/// How often a user tries to sign in while the gateway answers `429`.
const SIGN_IN_ATTEMPTS: usize = 10;

/// How the users of a run identify themselves, once decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthMode {
    Jwt,
    Header,
}

impl AuthMode {
    /// JWT when the gateway routes the login, else the header: a gateway without the
    /// route answers `404` with code `no_route`.
    pub(crate) async fn detect(client: &HttpClient) -> anyhow::Result<Self> {
        let probe = client
            .request(Method::POST, "/api/users/login")
            .json(&json!({}))
            .send()
            .await;
        match probe {
            Ok(_) => Ok(Self::Jwt),
            Err(error) => match error.status() {
                Some(status) => {
                    let code = error
                        .body_json::<Value>()
                        .and_then(|b| b["error"]["code"].as_str().map(str::to_owned));
                    if status == http::StatusCode::NOT_FOUND && code.as_deref() == Some("no_route")
                    {
                        Ok(Self::Header)
                    } else {
                        Ok(Self::Jwt)
                    }
                }
                None => Err(anyhow::anyhow!(error).context(format!(
                    "the gateway at {} does not answer",
                    client.base_url()
                ))),
            },
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::Header => "x-user-id",
        }
    }
}

/// Why a journey did not go as planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Something the shop may rightly answer under load: a `429`, stock running out.
    Expected(String),
    /// A bug, an outage or a broken promise of the API.
    Unexpected(String),
}

/// What a journey's steps return.
pub(crate) type Step<T> = Result<T, Failure>;

/// An HTTP answer: its status and JSON body (`null` when the body is not JSON).
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Value,
}

#[derive(Debug)]
enum Identity {
    Header,
    Bearer { token: String, renew_at: Instant },
}

/// One simulated shopper with its own identity, cart and random choices.
#[derive(Debug)]
pub(crate) struct VirtualUser {
    client: HttpClient,
    pub(crate) config: Arc<LoadgenConfig>,
    auth: AuthMode,
    name: String,
    identity: Option<Identity>,
    registered: bool,
    pub(crate) rng: Rng,
    requests: u64,
}

impl VirtualUser {
    pub(crate) fn new(
        client: HttpClient,
        config: Arc<LoadgenConfig>,
        auth: AuthMode,
        name: String,
        rng: Rng,
    ) -> Self {
        Self {
            client,
            config,
            auth,
            name,
            identity: None,
            registered: false,
            rng,
            requests: 0,
        }
    }

    /// Signs in, then runs the journeys `next` hands out until it hands out none. A
    /// journey that met an expected error (a `429`) runs again up to `retries` times;
    /// signing in, up to [`SIGN_IN_ATTEMPTS`] times.
    pub(crate) async fn run(
        mut self,
        recorder: &mut Recorder,
        retries: usize,
        mut next: impl FnMut(&mut Rng) -> Option<Journey>,
    ) {
        let mut signed_in = Err(Failure::Expected(String::new()));
        for _ in 0..SIGN_IN_ATTEMPTS {
            signed_in = self.timed(recorder, Journey::SignIn).await;
            if !matches!(signed_in, Err(Failure::Expected(_))) {
                break;
            }
        }
        if signed_in.is_err() {
            return;
        }
        while let Some(journey) = next(&mut self.rng) {
            for _ in 0..=retries {
                let outcome = self.timed(recorder, journey).await;
                if !matches!(outcome, Err(Failure::Expected(_))) {
                    break;
                }
            }
        }
    }

    /// Runs `journey` and records it.
    async fn timed(&mut self, recorder: &mut Recorder, journey: Journey) -> Step<()> {
        self.requests = 0;
        let started = Instant::now();
        let outcome = if journey == Journey::SignIn {
            self.sign_in().await
        } else {
            self.journey(journey).await
        };
        recorder.record(journey, started.elapsed(), self.requests, &outcome);
        outcome
    }

    async fn sign_in(&mut self) -> Step<()> {
        match self.auth {
            AuthMode::Header => {
                self.identity = Some(Identity::Header);
                Ok(())
            }
            AuthMode::Jwt => self.log_in().await,
        }
    }

    async fn log_in(&mut self) -> Step<()> {
        let email = format!("{}@loadgen.example", self.name);
        let password = format!("pw-{}-secret", self.name);
        self.identity = None;
        if !self.registered {
            let body = json!({"email": email, "password": password, "name": self.name});
            let reply = self
                .call(Method::POST, "/api/users/register", Some(body), None)
                .await?;
            // 409: registered by an earlier login of this user.
            if !matches!(reply.status, 200 | 201 | 409) {
                return Err(unexpected("POST /api/users/register", &reply));
            }
            self.registered = true;
        }
        let body = json!({"email": email, "password": password});
        let reply = self
            .expect(Method::POST, "/api/users/login", Some(body), 200)
            .await?;
        let token = reply["token"]
            .as_str()
            .ok_or_else(|| Failure::Unexpected(format!("the login answered no token: {reply}")))?
            .to_owned();
        let lifetime = Duration::from_secs(reply["expires_in"].as_u64().unwrap_or(300));
        self.identity = Some(Identity::Bearer {
            token,
            renew_at: Instant::now() + lifetime.mul_f64(0.8),
        });
        Ok(())
    }

    /// Sends a request as this user. A `429` waits a moment and is an expected
    /// failure; a failure to get any answer is an unexpected one.
    pub(crate) async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
        idempotency_key: Option<&str>,
    ) -> Step<Reply> {
        if let Some(Identity::Bearer { renew_at, .. }) = &self.identity {
            if Instant::now() >= *renew_at {
                Box::pin(self.log_in()).await?;
            }
        }
        let mut request = self.client.request(method.clone(), path);
        match &self.identity {
            Some(Identity::Bearer { token, .. }) => {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            Some(Identity::Header) => request = request.header("x-user-id", self.name.as_str()),
            None => {}
        }
        if let Some(key) = idempotency_key {
            request = request.idempotency_key(key);
        }
        if let Some(body) = &body {
            request = request.json(body);
        }
        self.requests += 1;
        let reply = match request.send().await {
            Ok(response) => Reply {
                status: response.status().as_u16(),
                body: serde_json::from_slice(response.body()).unwrap_or(Value::Null),
            },
            Err(error) => match error.status() {
                Some(status) => Reply {
                    status: status.as_u16(),
                    body: error.body_json().unwrap_or(Value::Null),
                },
                None => return Err(Failure::Unexpected(format!("{method} {path}: {error}"))),
            },
        };
        if reply.status == 429 {
            // The client does not expose the answer's headers, so Retry-After is
            // approximated by a short pause.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Err(Failure::Expected("rate limited (429)".to_owned()));
        }
        Ok(reply)
    }

    /// Sends a request that must answer `status`; its body.
    pub(crate) async fn expect(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
        status: u16,
    ) -> Step<Value> {
        let what = format!("{method} {path}");
        let reply = self.call(method, path, body, None).await?;
        if reply.status == status {
            Ok(reply.body)
        } else {
            Err(unexpected(&what, &reply))
        }
    }

    /// `GET path`, which must answer `200`.
    pub(crate) async fn get(&mut self, path: &str) -> Step<Value> {
        self.expect(Method::GET, path, None, 200).await
    }
}

/// An unexpected answer to `what`, with the error code the shop gave.
pub(crate) fn unexpected(what: &str, reply: &Reply) -> Failure {
    let code = reply.body["error"]["code"].as_str().unwrap_or("-");
    let message = reply.body["error"]["message"].as_str().unwrap_or("");
    Failure::Unexpected(format!(
        "{what}: answered {} {code} {message}",
        reply.status
    ))
}
