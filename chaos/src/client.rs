//! A Kinesis JSON client for the workloads: one keep-alive HTTP/1.1
//! connection per client, every call bounded in time, and every error
//! classified as definite (the request did nothing) or indefinite (it may
//! have taken effect).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

#[derive(Debug, Clone)]
pub enum CallError {
    /// Nothing was sent (connection refused or unreachable).
    NotSent(String),
    /// The service answered with an AWS error.
    Aws {
        status: u16,
        name: String,
        message: String,
    },
    /// No answer in time, or the connection broke mid-request.
    Unknown(String),
}

impl CallError {
    /// A definite failure: the request certainly did not take effect.
    /// Client errors (4xx) are definite; 5xx and timeouts are not.
    pub fn definite(&self) -> bool {
        match self {
            CallError::NotSent(_) => true,
            CallError::Aws { status, .. } => (400..500).contains(status),
            CallError::Unknown(_) => false,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NotSent(m) => write!(f, "not sent: {m}"),
            CallError::Aws {
                status,
                name,
                message,
            } => write!(f, "HTTP {status} {name}: {message}"),
            CallError::Unknown(m) => write!(f, "unknown outcome: {m}"),
        }
    }
}

pub struct Client {
    address: String,
    timeout: Duration,
    /// Target prefix and content type of the API the client speaks.
    api: (&'static str, &'static str),
    sender: Option<Sender>,
}

impl Client {
    pub fn new(address: String, timeout: Duration) -> Client {
        Client {
            address,
            timeout,
            api: ("Kinesis_20131202", "application/x-amz-json-1.1"),
            sender: None,
        }
    }

    /// A client of the SQS API (awsJson1_0).
    pub fn sqs(address: String, timeout: Duration) -> Client {
        Client {
            api: ("AmazonSQS", "application/x-amz-json-1.0"),
            ..Client::new(address, timeout)
        }
    }

    async fn connect(&mut self) -> Result<&mut Sender, CallError> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let connect = async {
                let tcp = tokio::net::TcpStream::connect(&self.address).await?;
                tcp.set_nodelay(true)?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                        .await
                        .map_err(std::io::Error::other)?;
                tokio::spawn(connection);
                Ok::<_, std::io::Error>(sender)
            };
            let sender = tokio::time::timeout(Duration::from_secs(2), connect)
                .await
                .map_err(|_| {
                    CallError::NotSent(format!("connecting to {} timed out", self.address))
                })?
                .map_err(|e| CallError::NotSent(format!("{}: {e}", self.address)))?;
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("connected above"))
    }

    /// Calls `Kinesis_20131202.<op>` with a JSON body.
    pub async fn call(&mut self, op: &str, body: &Value) -> Result<Value, CallError> {
        let request = hyper::Request::post("/")
            .header("host", &self.address)
            .header("content-type", self.api.1)
            .header("x-amz-target", format!("{}.{op}", self.api.0))
            .body(Full::new(Bytes::from(
                serde_json::to_vec(body).expect("JSON values serialize"),
            )))
            .expect("a valid request");
        let timeout = self.timeout;
        let sender = self.connect().await?;
        let exchange = async {
            sender
                .ready()
                .await
                .map_err(|e| CallError::NotSent(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| CallError::Unknown(e.to_string()))?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::Unknown(e.to_string()))?
                .to_bytes();
            let value: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            if status == 200 {
                return Ok(value);
            }
            let name = value["__type"]
                .as_str()
                .unwrap_or("Unknown")
                .rsplit('#')
                .next()
                .unwrap_or("Unknown")
                .to_string();
            Err(CallError::Aws {
                status,
                name,
                message: value["message"].as_str().unwrap_or_default().to_string(),
            })
        };
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Unknown(format!("no answer in {timeout:?}"))),
        };
        if matches!(
            result,
            Err(CallError::Unknown(_)) | Err(CallError::NotSent(_))
        ) {
            self.sender = None;
        }
        result
    }
}

/// One GET on a fresh connection (admin endpoints): status and body.
pub async fn get(address: &str, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(address).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header("host", address)
            .body(Full::new(Bytes::new()))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("GET http://{address}{path}: no answer in {timeout:?}"))?
}
