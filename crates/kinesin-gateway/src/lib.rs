//! The AWS-compatible HTTP endpoint of a node: one port for every service,
//! HTTP/1.1 and HTTP/2 (h2c). A request's `X-Amz-Target` names a declared
//! service ([`service`]) and operation (a form-encoded query request names
//! its service by its credential scope and its operation by `Action`); its
//! signature headers are checked before the body is read, the body is
//! decoded in its protocol (awsJson1_0, awsJson1_1, CBOR or awsQuery), the
//! signature verified, and the operation's handler validates it and calls
//! the router. The answer is in the request's protocol; errors take the AWS
//! shape of that protocol: `__type` and `message` with the HTTP status, or
//! `<ErrorResponse>` for awsQuery.

mod auth;
mod codec;
mod error;
mod eventstream;
mod firehose;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
mod input;
mod iterator;
mod kinesis;
mod query;
#[cfg(test)]
mod robustness;
mod service;
mod sqs;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use kinesin_router::Router;
use kinesin_types::ShardId;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use auth::{sign, Credential, SignedRequest, DEV_ACCOUNT_ID};
pub use codec::{Protocol, CBOR_CONTENT_TYPE, JSON_1_0_CONTENT_TYPE, JSON_CONTENT_TYPE};
pub use error::ApiError;
use query::QueryShape;
pub use service::{Service, SERVICES};

/// Largest request body: a PutRecords of 500 records at the 10 MiB stream
/// limit is ~14 MiB as base64 JSON.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Region named in ARNs.
    pub region: String,
    /// Accepted access keys. Empty: development mode, any request is
    /// accepted and ARNs name account 000000000000.
    pub credentials: Vec<Credential>,
    /// The account whose streams the map keys by their bare names (those
    /// made before names were per account, and by the native API and CLI).
    /// The same on every node.
    pub home_account: String,
    /// Most open shards the cluster allows.
    pub shard_limit: u32,
    /// How long shard iterators and paging tokens stay valid.
    pub iterator_validity_ms: u64,
    /// Where clients reach this node's API (`http://host:port`): queue URLs
    /// start with it.
    pub public_url: String,
    /// Glue table definitions that Firehose record format conversion
    /// names (`glue_tables_file`).
    pub glue_tables: Arc<kinesin_firehose::GlueTables>,
    /// Most API connections open at once; more are closed as they come.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers (HTTP/1.1),
    /// and its body.
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// How long a connection may stay without a request in flight before
    /// it is closed (gracefully: HTTP/2 gets a GOAWAY).
    pub idle_timeout: Duration,
    /// How long one SubscribeToShard call streams (AWS: five minutes),
    /// whether or not its reader keeps up.
    pub subscription_lifetime: Duration,
}

/// PEM certificate chain and private key of the HTTPS endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_chain: std::path::PathBuf,
    pub private_key: std::path::PathBuf,
}

/// Loads the certificate and key into a rustls server configuration that
/// offers HTTP/2 and HTTP/1.1 by ALPN.
pub fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&files.cert_chain)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "cannot read certificates from {}: {e}",
                files.cert_chain.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no certificate",
            files.cert_chain.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.private_key).map_err(|e| {
        format!(
            "cannot read a private key from {}: {e}",
            files.private_key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("invalid certificate or key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            region: "us-east-1".into(),
            credentials: Vec::new(),
            home_account: DEV_ACCOUNT_ID.to_string(),
            shard_limit: 10_000,
            iterator_validity_ms: 300_000,
            public_url: "http://127.0.0.1:4566".into(),
            glue_tables: Arc::default(),
            max_connections: 10_000,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(300),
            subscription_lifetime: MAX_SUBSCRIPTION_LIFETIME,
        }
    }
}

struct Gateway {
    router: Arc<Router>,
    config: GatewayConfig,
    subscriptions: Arc<Subscriptions>,
    /// [`BODY_BUDGET_KIB`], in KiB.
    body_budget: tokio::sync::Semaphore,
}

/// This node's live SubscribeToShard streams: one per consumer and shard,
/// as AWS allows. A second call within [`SUBSCRIPTION_TAKEOVER`] of the
/// first is refused; a later one takes over and the first stream ends with
/// ResourceInUseException. Enforced per node: two nodes behind a load
/// balancer each keep their own.
#[derive(Default)]
struct Subscriptions {
    live: std::sync::Mutex<HashMap<(String, ShardId), Live>>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Live {
    id: u64,
    started: Instant,
    taken_over: Arc<tokio::sync::Notify>,
}

/// A registered subscription; dropping it (the stream ended) frees the slot.
struct Registration {
    subscriptions: Arc<Subscriptions>,
    key: (String, ShardId),
    id: u64,
    taken_over: Arc<tokio::sync::Notify>,
}

impl Subscriptions {
    fn register(
        self: &Arc<Self>,
        consumer: &str,
        shard: ShardId,
    ) -> Result<Registration, ApiError> {
        let key = (consumer.to_string(), shard);
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(current) = live.get(&key) {
            if current.started.elapsed() < SUBSCRIPTION_TAKEOVER {
                return Err(ApiError::in_use(format!(
                    "Another active subscription exists for this consumer on {shard}; a new one may take it over {} s after it started.",
                    SUBSCRIPTION_TAKEOVER.as_secs()
                )));
            }
            current.taken_over.notify_one();
        }
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let taken_over = Arc::new(tokio::sync::Notify::new());
        live.insert(
            key.clone(),
            Live {
                id,
                started: Instant::now(),
                taken_over: taken_over.clone(),
            },
        );
        Ok(Registration {
            subscriptions: self.clone(),
            key,
            id,
            taken_over,
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut live = self
            .subscriptions
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if live.get(&self.key).is_some_and(|l| l.id == self.id) {
            live.remove(&self.key);
        }
    }
}

impl Gateway {
    /// What a Kinesis handler runs with for a request signed by `account`.
    fn context<'a>(&'a self, account: &'a str) -> kinesis::Context<'a> {
        kinesis::Context {
            router: &self.router,
            region: &self.config.region,
            account,
            home: &self.config.home_account,
            check_arn_accounts: !self.config.credentials.is_empty(),
            shard_limit: self.config.shard_limit,
            validity_ms: self.config.iterator_validity_ms,
            now_ms: kinesin_router::now_ms(),
        }
    }

    /// What a Firehose handler runs with for a request signed by `account`.
    fn firehose_context<'a>(&'a self, account: &'a str) -> firehose::Context<'a> {
        firehose::Context {
            router: &self.router,
            region: &self.config.region,
            account,
            home: &self.config.home_account,
            check_accounts: !self.config.credentials.is_empty(),
            tables: &self.config.glue_tables,
            now_ms: kinesin_router::now_ms(),
        }
    }

    /// What an SQS handler runs with for a request signed by `account`.
    fn sqs_context<'a>(&'a self, account: &'a str, op: &'a str) -> sqs::Context<'a> {
        sqs::Context {
            router: &self.router,
            op,
            region: &self.config.region,
            account,
            check_accounts: !self.config.credentials.is_empty(),
            url_base: &self.config.public_url,
            now_ms: kinesin_router::now_ms(),
        }
    }
}

/// The HTTP application; `serve` runs it on a listener.
pub fn app(router: Arc<Router>, config: GatewayConfig) -> axum::Router {
    axum::Router::new()
        .fallback(handle)
        .with_state(Arc::new(Gateway {
            router,
            config,
            subscriptions: Arc::default(),
            body_budget: tokio::sync::Semaphore::new(BODY_BUDGET_KIB),
        }))
}

/// How long a TLS handshake may take (from the connection's start).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent requests per HTTP/2 connection.
const H2_MAX_STREAMS: u32 = 64;
/// HTTP/2 pings of a quiet connection, and how long an answer may take.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// How long in-flight requests may run on after a stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the endpoint until `stop` turns true: plain HTTP/1.1 and h2c, or
/// with `tls` set HTTPS with HTTP/2 and HTTP/1.1 chosen by ALPN. At most
/// `max_connections` connections are open; more are closed as they come.
/// Headers, TLS handshakes, bodies and idle connections have time limits,
/// HTTP/2 connections a stream limit; bodies being read share the node's
/// body budget.
pub async fn serve(
    listener: TcpListener,
    router: Arc<Router>,
    config: GatewayConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    if config.credentials.is_empty() {
        tracing::warn!(
            "the AWS API accepts any credentials (development mode); configure [[credentials]] to verify SigV4 signatures"
        );
    }
    let permits = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let (header_timeout, idle_timeout) = (config.header_timeout, config.idle_timeout);
    let app = app(router, config);
    let mut builder = auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let builder = Arc::new(builder);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stopped = async {
            let _ = stop.wait_for(|s| *s).await;
        };
        let (tcp, _) = tokio::select! {
            _ = stopped => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept an API connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            metrics::counter!("kinesin_api_connections_refused_total").increment(1);
            continue;
        };
        let (acceptor, app, builder) = (tls.clone(), app.clone(), Arc::clone(&builder));
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let _open = Gauge::up("kinesin_api_connections");
            let _ = tcp.set_nodelay(true);
            let activity = Arc::new(Activity::new());
            let service = {
                let (app, activity) = (
                    hyper_util::service::TowerToHyperService::new(app),
                    Arc::clone(&activity),
                );
                hyper::service::service_fn(move |request| {
                    let busy = activity.busy();
                    let response = hyper::service::Service::call(&app, request);
                    async move {
                        // In flight until its body ends (a subscription's
                        // event stream lasts minutes) or is dropped.
                        let response = response.await?;
                        Ok::<_, std::convert::Infallible>(response.map(|body| {
                            axum::body::Body::new(body.map_err(move |e| {
                                let _in_flight = &busy;
                                e
                            }))
                        }))
                    }
                })
            };
            let until = Closing {
                stop,
                activity: &activity,
                idle: idle_timeout,
            };
            match acceptor {
                None => {
                    // The protocol is told (h2c or HTTP/1.1) without a time
                    // limit of hyper's: give its first bytes the header time.
                    if tokio::time::timeout(header_timeout, opening(&tcp)).await != Ok(true) {
                        return;
                    }
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    until.drive(builder.serve_connection(io, service)).await;
                }
                Some(acceptor) => {
                    let Ok(Ok(mut stream)) =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    // As above; a TLS stream cannot be peeked, so the
                    // opening bytes are read and handed to hyper first.
                    let Ok(Some(head)) =
                        tokio::time::timeout(header_timeout, read_opening(&mut stream)).await
                    else {
                        return;
                    };
                    let (reader, writer) = tokio::io::split(stream);
                    let replayed = std::io::Cursor::new(head).chain(reader);
                    let io = hyper_util::rt::TokioIo::new(tokio::io::join(replayed, writer));
                    until.drive(builder.serve_connection(io, service)).await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
    // Idle connections close now, busy ones after their requests (or the
    // grace period): each saw `stop` (`Closing::drive`).
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.abort_all();
}

/// When a connection is shut down gracefully (requests in flight finish,
/// no new ones start): when the server stops, or once no request was in
/// flight for `idle`. HTTP/1.1 connections also end at hyper's header
/// timeout between requests; HTTP/2 ones answer pings and would otherwise
/// stay open for good.
struct Closing<'a> {
    stop: watch::Receiver<bool>,
    activity: &'a Activity,
    idle: Duration,
}

impl Closing<'_> {
    async fn drive<C: GracefulConnection>(mut self, connection: C) {
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = self.stop.wait_for(|s| *s) => {}
            _ = self.activity.idle_for(self.idle) => {}
        }
        connection.as_mut().graceful_shutdown();
        let _ = connection.await;
    }
}

/// Requests in flight on a connection and when the last one started or
/// ended.
struct Activity {
    opened: Instant,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds after `opened`.
    last_ms: std::sync::atomic::AtomicU64,
}

/// A request in flight; its end counts as activity.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            in_flight: Default::default(),
            last_ms: Default::default(),
        }
    }

    fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(Arc::clone(self))
    }

    /// Returns once no request has been in flight for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let since = self
                .opened
                .elapsed()
                .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::SeqCst)));
            if self.in_flight.load(Ordering::SeqCst) == 0 && since >= limit {
                return;
            }
            tokio::time::sleep(limit.saturating_sub(since).max(limit / 10)).await;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let at = self.0.opened.elapsed().as_millis() as u64;
        self.0.last_ms.fetch_max(at, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The HTTP/2 connection preface (RFC 9113 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a connection's first bytes `head` tell its protocol: the whole
/// HTTP/2 preface, or an HTTP/1.1 request line (a line that does not begin
/// the preface, which has line ends of its own).
fn told(head: &[u8]) -> bool {
    head.len() >= H2_PREFACE.len() || (head.contains(&b'\n') && !H2_PREFACE.starts_with(head))
}

/// Waits until a plain connection's first bytes tell its protocol
/// ([`told`]). False when the client closes first.
async fn opening(tcp: &tokio::net::TcpStream) -> bool {
    let mut head = [0u8; 24];
    loop {
        match tcp.peek(&mut head).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if told(&head[..n]) => return true,
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Reads a connection's first bytes until they tell its protocol
/// ([`told`]); None when the client closes first.
async fn read_opening<R: AsyncRead + Unpin>(io: &mut R) -> Option<Vec<u8>> {
    let mut head = [0u8; 24];
    let mut filled = 0;
    while !told(&head[..filled]) {
        match io.read(&mut head[filled..]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => filled += n,
        }
    }
    Some(head[..filled].to_vec())
}

/// A gauge that is one higher while this lives.
struct Gauge(&'static str);

impl Gauge {
    fn up(name: &'static str) -> Gauge {
        metrics::gauge!(name).increment(1.0);
        Gauge(name)
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}

async fn handle(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    let _in_flight = Gauge::up("kinesin_api_requests_in_flight");
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let content_type = header("content-type");
    let recognised = match header("x-amz-target").filter(|t| !t.is_empty()) {
        Some(target) => service::recognise(target)
            .map(|(service, op)| (service, service.protocol(content_type), Some(op)))
            .ok_or_else(|| ApiError::unknown_operation(format!("unknown operation {target}"))),
        None => service::recognise_query(content_type, auth::signing_service(&parts.headers))
            .map(|service| (service, Protocol::Query, None)),
    };
    let (service, protocol, target_op) = match recognised {
        Ok(recognised) => recognised,
        Err(e) => {
            drain_small(body).await;
            return refuse_unrecognised(started, &e);
        }
    };
    let mut op_label = target_op
        .and_then(|op| service.operation(op))
        .unwrap_or("unknown");
    let mut op_name = target_op.unwrap_or("").to_string();
    let result = async {
        if let Err(e) = auth::precheck(
            &gw.config.credentials,
            &parts.headers,
            auth::Scope {
                service: service.signing_name,
                region: &gw.config.region,
            },
            kinesin_router::wall_clock(),
        ) {
            drain_small(body).await;
            return Err(e);
        }
        if parts.method != Method::POST {
            drain_small(body).await;
            return Err(ApiError::unknown_operation(format!(
                "{} is not supported; AWS API calls are POST requests",
                parts.method
            )));
        }
        let body = read_body(
            &gw.body_budget,
            (gw.config.body_timeout, BODY_BUDGET_WAIT),
            &parts.headers,
            body,
        )
        .await?;
        let request = auth::SignedRequest {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            body: &body,
        };
        let account = auth::authenticate(
            &gw.config.credentials,
            &request,
            auth::Scope {
                service: service.signing_name,
                region: &gw.config.region,
            },
            kinesin_router::wall_clock(),
        )?;
        let decoded = protocol.decode(&body)?;
        if let Some(action) = decoded.action {
            op_label = service.operation(&action).unwrap_or("unknown");
            op_name = action;
        }
        let input = decoded.input;
        let ctx = gw.context(&account);
        if service.name == kinesis::SERVICE.name && op_name == "SubscribeToShard" {
            return subscribe(&gw, protocol, ctx, &input)
                .await
                .map(Answer::Stream);
        }
        let value = match service.name {
            "kinesis" => kinesis::call(&ctx, &op_name, &input, protocol).await?,
            "sqs" => sqs::handle(&gw.sqs_context(&account, &op_name), &input, protocol).await?,
            "firehose" => {
                firehose::call(&gw.firehose_context(&account), &op_name, &input, protocol).await?
            }
            other => unreachable!("service {other} is declared but not dispatched"),
        };
        Ok(Answer::Value(value))
    }
    .await;
    record(service.name, op_label, started, result.as_ref().map(|_| ()));
    match result {
        Ok(Answer::Value(value)) => respond(service, protocol, &op_name, Ok(&value)),
        Ok(Answer::Stream(response)) => response,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(op = op_name, error = %e.message, "request failed");
            }
            respond(service, protocol, &op_name, Err(&e))
        }
    }
}

/// Reads a request's body within the body timeout. Each part takes its
/// share of the node's body budget as it arrives, so that bodies being
/// read at once hold at most [`BODY_BUDGET_KIB`] of memory whatever the
/// number of connections and streams, and a body that is announced but
/// not sent holds none of it: the signature is checked only once the body
/// is here, so a client that knows an access key ID but not its secret
/// must send what it makes the node hold. A body that holds part of the
/// budget and finds no more within `budget_wait` ([`BODY_BUDGET_WAIT`] in
/// service) is refused with 503 and gives back what it held.
async fn read_body(
    budget: &tokio::sync::Semaphore,
    (limit, budget_wait): (Duration, Duration),
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(too_large());
    }
    let read = async {
        let mut body = body;
        let mut parts: Vec<Bytes> = Vec::new();
        let mut len = 0usize;
        let mut taken: Option<tokio::sync::SemaphorePermit<'_>> = None;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(|_| too_large())?.into_data() else {
                continue;
            };
            len += data.len();
            if len > MAX_BODY_BYTES {
                return Err(too_large());
            }
            let kib = len.div_ceil(1024);
            let held_kib = taken.as_ref().map_or(0, |t| t.num_permits());
            if kib > held_kib {
                let wanted = budget.acquire_many((kib - held_kib) as u32);
                match taken.as_mut() {
                    None => taken = Some(wanted.await.expect(BUDGET_OPEN)),
                    // A body holding part of the budget waits a bounded time
                    // for more: bodies that each hold some and all wait for
                    // more would otherwise stand still until the body timeout.
                    Some(held) => match tokio::time::timeout(budget_wait, wanted).await {
                        Ok(more) => held.merge(more.expect(BUDGET_OPEN)),
                        Err(_) => return Err(bodies_over_budget()),
                    },
                }
            }
            parts.push(data);
        }
        Ok(match parts.len() {
            1 => parts.pop().expect("one part"),
            _ => Bytes::from(parts.concat()),
        })
    };
    tokio::time::timeout(limit, read).await.map_err(|_| {
        ApiError::new(
            "RequestTimeout",
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body did not arrive within {limit:?}"),
        )
    })?
}

const BUDGET_OPEN: &str = "the body budget is never closed";

/// How long a body that holds part of the body budget waits for more.
const BODY_BUDGET_WAIT: Duration = Duration::from_secs(2);

/// A body refused because the bodies being read fill the node's budget:
/// 503, which SDKs retry.
fn bodies_over_budget() -> ApiError {
    ApiError::new(
        "ServiceUnavailable",
        StatusCode::SERVICE_UNAVAILABLE,
        "The node is reading as many request bodies as its memory budget allows. Retry.",
    )
}

fn too_large() -> ApiError {
    ApiError::new(
        "SerializationException",
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than {MAX_BODY_BYTES} bytes or was cut short"),
    )
}

/// Memory for request bodies being read at once, in KiB.
const BODY_BUDGET_KIB: usize = 1024 * 1024;

/// A request that names no service or operation this endpoint knows,
/// answered as Kinesis would.
fn refuse_unrecognised(started: Instant, e: &ApiError) -> Response {
    record("unknown", "unknown", started, Err(e));
    let service = &kinesis::SERVICE;
    respond(service, service.protocols[0], "", Err(e))
}

/// Reads a refused request's body if it is small and arrives promptly, so
/// that the refusal reaches the client as a response: answering an HTTP/2
/// stream whose body is still being sent resets it, and clients such as
/// curl then report the reset instead of the error. Larger or slow bodies
/// are not read: refusing them unread is the point of refusing early.
async fn drain_small(body: axum::body::Body) {
    let _ = tokio::time::timeout(
        REFUSED_BODY_WAIT,
        axum::body::to_bytes(body, REFUSED_BODY_BYTES),
    )
    .await;
}

/// The most of a refused request's body that is read before answering.
const REFUSED_BODY_BYTES: usize = 64 * 1024;
/// How long a refused request's body is waited for.
const REFUSED_BODY_WAIT: Duration = Duration::from_millis(500);

/// A successful call: a body in the request's protocol, or an event stream.
enum Answer {
    Value(serde_json::Value),
    Stream(Response),
}

fn record(
    service: &'static str,
    op: &'static str,
    started: Instant,
    result: Result<(), &ApiError>,
) {
    let outcome = match result {
        Ok(()) => "ok",
        Err(e) => {
            metrics::counter!("kinesin_api_errors_total", "service" => service, "op" => op, "code" => e.name)
                .increment(1);
            if e.status.is_server_error() {
                "server_error"
            } else {
                "client_error"
            }
        }
    };
    metrics::histogram!("kinesin_api_request_duration_seconds", "service" => service, "op" => op, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

/// How long one SubscribeToShard call streams at most, as AWS.
pub const MAX_SUBSCRIPTION_LIFETIME: Duration = Duration::from_secs(300);
/// An event goes out at least this often, records or not.
const SUBSCRIPTION_HEARTBEAT: Duration = Duration::from_secs(5);
/// How long one read of a subscription waits at the shard's leader for
/// records to be applied; records are pushed as soon as they are.
const SUBSCRIPTION_WAIT: Duration = Duration::from_secs(1);
/// The pause before reading again after the cluster could not answer, or
/// answered empty without waiting.
const SUBSCRIPTION_RETRY: Duration = Duration::from_millis(100);
/// How long a subscription is protected from being taken over (AWS: 5 s).
const SUBSCRIPTION_TAKEOVER: Duration = Duration::from_secs(5);

/// SubscribeToShard: validates like any call, then answers with an
/// event stream that pushes records for the subscription lifetime (five
/// minutes by default).
async fn subscribe(
    gw: &Arc<Gateway>,
    protocol: Protocol,
    ctx: kinesis::Context<'_>,
    input: &serde_json::Value,
) -> Result<Response, ApiError> {
    let mut sub = kinesis::subscription(&ctx, input).await?;
    kinesis::pin_latest(&gw.router, &mut sub).await?;
    let registration = gw.subscriptions.register(&sub.consumer, sub.shard)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(4);
    let router = gw.router.clone();
    let content_type = protocol.content_type();
    let lifetime = gw.config.subscription_lifetime;
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + lifetime;
        // A send waits for the reader; one that stopped reading ends the
        // stream at the deadline all the same, as does a takeover.
        let send = |frame: Vec<u8>| {
            let (tx, taken_over) = (&tx, &registration.taken_over);
            async move {
                tokio::select! {
                    sent = tokio::time::timeout_at(deadline, tx.send(Ok(Bytes::from(frame)))) => {
                        matches!(sent, Ok(Ok(())))
                    }
                    _ = taken_over.notified() => false,
                }
            }
        };
        let initial = protocol.encode(&json!({}));
        if !send(eventstream::event(
            "initial-response",
            content_type,
            &initial,
        ))
        .await
        {
            return;
        }
        let mut last_sent = Instant::now();
        let mut position = Some(sub.start);
        while let Some(start) = position {
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            let asked = Instant::now();
            let next = tokio::select! {
                next = kinesis::next_event(&router, &sub, start, SUBSCRIPTION_WAIT) => next,
                // A read does not outlast the lifetime: the slot is freed then.
                () = tokio::time::sleep_until(deadline) => break,
                // The reader went away: free the consumer's slot now.
                () = tx.closed() => return,
                _ = registration.taken_over.notified() => {
                    let payload = protocol.encode(&json!({
                        "message": "Another subscription of this consumer took over this shard."
                    }));
                    let frame = eventstream::exception("ResourceInUseException", content_type, &payload);
                    let _ = tokio::time::timeout(SUBSCRIPTION_HEARTBEAT, tx.send(Ok(Bytes::from(frame)))).await;
                    return;
                }
            };
            match next {
                Ok((event, next, count)) => {
                    if count > 0 || next.is_none() || last_sent.elapsed() >= SUBSCRIPTION_HEARTBEAT
                    {
                        let payload = protocol.encode(&event);
                        let frame =
                            eventstream::event("SubscribeToShardEvent", content_type, &payload);
                        if !send(frame).await {
                            return;
                        }
                        last_sent = Instant::now();
                    }
                    // A leader that did not wait (one of an older version)
                    // must not be asked again at once.
                    if count == 0 && next.is_some() && asked.elapsed() < SUBSCRIPTION_RETRY {
                        tokio::time::sleep(SUBSCRIPTION_RETRY).await;
                    }
                    position = next;
                }
                Err(e) if e.status.is_server_error() => {
                    tokio::time::sleep(SUBSCRIPTION_RETRY).await;
                }
                Err(e) => {
                    let payload = protocol.encode(&json!({ "message": e.message }));
                    send(eventstream::exception(e.name, content_type, &payload)).await;
                    return;
                }
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static(eventstream::CONTENT_TYPE),
    );
    if let Ok(v) = HeaderValue::from_str(&new_request_id()) {
        h.insert("x-amzn-requestid", v);
    }
    Ok(response)
}

/// An answer or an error in the request's protocol. Errors are `__type`
/// and `message` with `x-amzn-errortype` in JSON and CBOR (plus
/// `x-amzn-query-error` for a query-compatible service), `<ErrorResponse>`
/// in awsQuery.
fn respond(
    service: &Service,
    protocol: Protocol,
    op: &str,
    outcome: Result<&serde_json::Value, &ApiError>,
) -> Response {
    let request_id = new_request_id();
    let (status, body) = match (protocol, outcome) {
        (Protocol::Query, Ok(value)) => (
            StatusCode::OK,
            query::encode(query_shape(service), op, &request_id, value),
        ),
        (Protocol::Query, Err(e)) => (
            e.status,
            query::encode_error(
                query_shape(service),
                service.query_code(e.name),
                e,
                &request_id,
            ),
        ),
        (_, Ok(value)) => (StatusCode::OK, protocol.encode(value)),
        (_, Err(e)) => (
            e.status,
            protocol.encode(&json!({ "__type": e.name, "message": e.message })),
        ),
    };
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static(protocol.response_content_type()),
    );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert("x-amzn-requestid", v);
    }
    if let (Err(e), false) = (outcome, protocol == Protocol::Query) {
        h.insert("x-amzn-errortype", HeaderValue::from_static(e.name));
        if service.query_compatible {
            let code = format!("{};{}", service.query_code(e.name), query::fault(e.status));
            if let Ok(v) = HeaderValue::from_str(&code) {
                h.insert("x-amzn-query-error", v);
            }
        }
    }
    response
}

/// How `service` writes query answers; every service that speaks awsQuery
/// declares one (a test checks).
fn query_shape(service: &Service) -> &QueryShape {
    const NONE: QueryShape = QueryShape {
        xmlns: "",
        maps: &[],
        flattened: &[],
        flattened_maps: &[],
    };
    service.query.as_ref().unwrap_or(&NONE)
}

fn new_request_id() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// A body whose `parts` arrive at once; the rest of it never does.
    fn arrives_then_stalls(parts: Vec<Bytes>) -> axum::body::Body {
        let parts = futures::stream::iter(parts.into_iter().map(Ok::<_, std::io::Error>));
        axum::body::Body::from_stream(parts.chain(futures::stream::pending()))
    }

    fn kib(n: usize) -> Bytes {
        Bytes::from(vec![7; n * 1024])
    }

    /// Item 4 of issue 18: a body takes the node's body budget as its
    /// bytes arrive, so one announced and not sent holds none; one that
    /// holds part of it and needs more than is free is refused with 503
    /// after a bounded wait and gives back what it held, so that readers
    /// holding part each cannot stand still together; one that holds none
    /// waits for room.
    #[tokio::test]
    async fn bodies_take_the_budget_as_their_bytes_arrive() {
        let budget = tokio::sync::Semaphore::new(4);
        let limits = (Duration::from_secs(60), Duration::from_millis(100));
        let headers = axum::http::HeaderMap::new();
        let read = |body: axum::body::Body| read_body(&budget, limits, &headers, body);
        let mut silent = Box::pin(read(arrives_then_stalls(vec![])));
        let mut holds_three = Box::pin(read(arrives_then_stalls(vec![kib(3)])));
        assert!(futures::poll!(&mut silent).is_pending());
        assert!(futures::poll!(&mut holds_three).is_pending());
        assert_eq!(budget.available_permits(), 1);

        let parts = axum::body::Body::from_stream(futures::stream::iter([
            Ok::<_, std::io::Error>(Bytes::from_static(b"abc")),
            Ok(Bytes::from_static(b"def")),
        ]));
        assert_eq!(read(parts).await.unwrap(), Bytes::from_static(b"abcdef"));

        let started = Instant::now();
        let over = arrives_then_stalls(vec![kib(1), kib(1)]);
        let refused = read(over).await.unwrap_err();
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(started.elapsed() >= limits.1);
        assert_eq!(budget.available_permits(), 1);

        let two = axum::body::Body::from(kib(2));
        let mut waits = Box::pin(read(two));
        assert!(futures::poll!(&mut waits).is_pending());
        drop(holds_three);
        assert_eq!(waits.await.unwrap().len(), 2048);
        assert_eq!(budget.available_permits(), 4);
        drop(silent);
    }

    /// A line of the HTTP/2 preface is not an HTTP/1.1 request line: a
    /// client that stops there is still inside the header time limit.
    #[test]
    fn the_protocol_is_told_by_the_whole_preface_or_a_request_line() {
        assert!(told(H2_PREFACE));
        assert!(told(b"POST / HTTP/1.1\r\n"));
        assert!(told(b"POST /a-path-of-more-than-24-bytes"));
        for unfinished in [
            &b""[..],
            b"POS",
            b"PRI * HTTP/2.0",
            b"PRI * HTTP/2.0\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n",
        ] {
            assert!(!told(unfinished), "{unfinished:?}");
        }
    }
}
