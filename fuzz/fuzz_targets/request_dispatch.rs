#![no_main]

//! AWS API requests sent to a running one-node cluster, so that what
//! follows decoding is fuzzed too: each operation's input checks, the
//! commands it proposes and the answers it builds. An input is up to
//! `MAX_REQUESTS` requests, one after the other, separated by lines of
//! `--`, so that one input can make a queue and then use it. A request's
//! first line is the `X-Amz-Target` of a JSON request (`AmazonSQS.SendMessage`)
//! or, starting with `/`, the path of a query request (a form body, as SQS's
//! query protocol sends); the rest is the body. Requests are signed (SigV4)
//! with the key of the account that owns what inputs make; a first line
//! that starts with `!` is signed by another account's key (which resource
//! policies may let in), one that starts with `~` is not signed.
//!
//! Every request must get an answer: a success, or an AWS error of the
//! request's protocol with a 4xx status, or 503 `ServiceUnavailable`. A
//! 500, a closed connection or no answer within the time limit is a crash.
//! fuzz/dicts/request_dispatch.dict (made by fuzz/make-dict.py) gives
//! libFuzzer the operations' names, members and enum values.
//!
//! The cluster lives for the run, so an input also meets the streams,
//! queues and delivery streams earlier inputs made; a crash may need the
//! inputs before it to reproduce. The cluster is replaced after
//! `CREATES_PER_CLUSTER` successful creates, so that the groups inputs
//! make stay bounded.

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use kinesin_gateway::{Credential, SignedRequest, DEV_ACCOUNT_ID};
use kinesin_server::FsyncSetting;
use kinesin_testkit::{TestCluster, TestOptions};

const CREATES_PER_CLUSTER: u32 = 1000;
/// The most requests one input makes: with `RECEIVE_WITHIN` each, a run of
/// receives still ends well inside libFuzzer's `-timeout`.
const MAX_REQUESTS: usize = 8;
/// What separates an input's requests.
const SEPARATOR: &[u8] = b"\n--\n";
/// The access key and secret of the account that owns what inputs make
/// (the account seeds name in ARNs), and of another account.
const OWNER: (&str, &str) = ("AKIDFUZZOWNER", "owner-secret");
const OTHER: (&str, &str) = ("AKIDFUZZOTHER", "other-secret");
/// The most a request may take: libFuzzer's `-timeout` (10 s in
/// scripts/fuzz.sh) must leave room for a cluster's replacement as well.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// How long a receive is given: it may rightly wait up to 20 s for a
/// message (long polling), so one still waiting then is let go.
const RECEIVE_WITHIN: Duration = Duration::from_millis(500);

struct World {
    runtime: tokio::runtime::Runtime,
    cluster: Option<TestCluster>,
    creates: u32,
}

static WORLD: LazyLock<Mutex<World>> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    Mutex::new(World {
        runtime,
        cluster: None,
        creates: 0,
    })
});

async fn start() -> TestCluster {
    let options = TestOptions {
        // Durability is not what this target looks for; fsyncs would
        // make each write wait for the disk.
        fsync: FsyncSetting::NeverUnsafe,
        // Reshards make groups too: the shard limit bounds them.
        configure: |c| {
            c.api_subscription_lifetime_ms = 1000;
            c.shard_limit = 50;
            let credential = |(key, secret): (&str, &str), account: &str| Credential {
                access_key_id: key.to_string(),
                secret_access_key: secret.to_string(),
                account_id: account.to_string(),
            };
            c.credentials = vec![
                credential(OWNER, DEV_ACCOUNT_ID),
                credential(OTHER, "111111111111"),
            ];
            c.home_account = Some(DEV_ACCOUNT_ID.to_string());
        },
        ..Default::default()
    };
    TestCluster::start_with(1, options)
        .await
        .expect("one-node cluster")
}

/// The requests of an input: the parts between separators that parse.
fn requests(data: &[u8]) -> Vec<Request<'_>> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() < MAX_REQUESTS {
        let (part, next) = match rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
            Some(at) => (&rest[..at], Some(&rest[at + SEPARATOR.len()..])),
            None => (rest, None),
        };
        out.extend(Request::parse(part));
        match next {
            Some(next) => rest = next,
            None => break,
        }
    }
    out
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let requests = requests(data);
    if requests.is_empty() {
        return;
    }
    let mut world = WORLD.lock().unwrap_or_else(|e| e.into_inner());
    let World {
        runtime,
        cluster,
        creates,
    } = &mut *world;
    runtime.block_on(async {
        if *creates >= CREATES_PER_CLUSTER {
            if let Some(old) = cluster.take() {
                old.shutdown().await;
            }
            *creates = 0;
        }
        let address = match cluster {
            Some(cluster) => cluster.node(1).api_address(),
            None => cluster.insert(start().await).node(1).api_address(),
        };
        for request in &requests {
            if request.send_and_check(&address).await && request.creates() {
                *creates += 1;
            }
        }
    });
});

struct Request<'a> {
    head: &'a str,
    body: &'a [u8],
    /// Whose key signs the request, if any.
    signer: Option<(&'static str, &'static str)>,
}

impl<'a> Request<'a> {
    fn parse(data: &'a [u8]) -> Option<Request<'a>> {
        let newline = data.iter().position(|&b| b == b'\n')?;
        let head = std::str::from_utf8(&data[..newline]).ok()?;
        let (head, signer) = if let Some(head) = head.strip_prefix('!') {
            (head, Some(OTHER))
        } else if let Some(head) = head.strip_prefix('~') {
            (head, None)
        } else {
            (head, Some(OWNER))
        };
        Some(Request {
            head,
            body: &data[newline + 1..],
            signer,
        })
    }

    fn is_query(&self) -> bool {
        self.head.starts_with('/')
    }

    /// Whether the operation is `name`, or may be for a query request.
    fn may_be(&self, name: &str) -> bool {
        let name = name.as_bytes();
        self.head.as_bytes().ends_with(name)
            || self.is_query() && self.body.windows(name.len()).any(|w| w == name)
    }

    fn may_wait(&self) -> bool {
        self.may_be("ReceiveMessage")
    }

    /// Whether the request, if it succeeds, may make a stream, a queue or
    /// a delivery stream.
    fn creates(&self) -> bool {
        self.may_be("CreateStream")
            || self.may_be("CreateQueue")
            || self.may_be("CreateDeliveryStream")
    }

    /// The service whose name a signature's scope carries.
    fn service(&self) -> &'static str {
        if self.is_query() || self.head.starts_with("AmazonSQS.") {
            "sqs"
        } else if self.head.starts_with("Firehose_") {
            "firehose"
        } else {
            "kinesis"
        }
    }

    /// The HTTP request, or None for a head that cannot be one (a path or
    /// header value HTTP does not allow).
    fn http(&self) -> Option<hyper::Request<Full<Bytes>>> {
        let builder = hyper::Request::post(if self.is_query() { self.head } else { "/" })
            .header("host", "127.0.0.1");
        let builder = if self.is_query() {
            builder.header("content-type", "application/x-www-form-urlencoded")
        } else {
            let json = if self.service() == "sqs" {
                "application/x-amz-json-1.0"
            } else {
                "application/x-amz-json-1.1"
            };
            builder
                .header("content-type", json)
                .header("x-amz-target", self.head)
        };
        let mut request = builder
            .body(Full::new(Bytes::copy_from_slice(self.body)))
            .ok()?;
        if let Some(key) = self.signer {
            let signed = SignedRequest {
                method: request.method(),
                uri: request.uri(),
                headers: request.headers(),
                body: self.body,
            };
            let headers = kinesin_gateway::sign(
                key,
                "us-east-1",
                self.service(),
                &signed,
                std::time::SystemTime::now(),
            );
            for (name, value) in headers {
                request.headers_mut().insert(name, value.parse().ok()?);
            }
        }
        Some(request)
    }

    /// Whether the request succeeded.
    async fn send_and_check(&self, address: &str) -> bool {
        let Some(request) = self.http() else {
            return false;
        };
        let within = if self.may_wait() {
            RECEIVE_WITHIN
        } else {
            ANSWER_WITHIN
        };
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("the API port accepts connections");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        let connection = tokio::spawn(connection);
        let answer = tokio::time::timeout(within, async {
            let response = sender.send_request(request).await?;
            let status = response.status();
            let streamed = response
                .headers()
                .get("content-type")
                .is_some_and(|v| v == "application/vnd.amazon.eventstream");
            // A subscription's events go on for its lifetime: its status
            // and headers are the answer.
            let body = if streamed {
                Bytes::new()
            } else {
                response.into_body().collect().await?.to_bytes()
            };
            Ok::<_, hyper::Error>((status, body))
        })
        .await;
        connection.abort();
        match answer {
            Err(_) if self.may_wait() => false,
            Err(_) => panic!("{}: no answer within {within:?}", self.head),
            Ok(Err(e)) => panic!("{}: the connection ended without an answer: {e}", self.head),
            Ok(Ok((status, body))) => self.check(status, &body),
        }
    }

    /// Whether `status` is a success; anything else must be an AWS error.
    fn check(&self, status: StatusCode, body: &[u8]) -> bool {
        if status.is_success() {
            return true;
        }
        let text = String::from_utf8_lossy(body);
        let name = if self.is_query() {
            query_error(&text)
        } else {
            json_error(body)
        };
        let Some(name) = name else {
            panic!(
                "{}: {status} without an AWS error of its protocol: {text}",
                self.head
            );
        };
        let unavailable = status == StatusCode::SERVICE_UNAVAILABLE && name == "ServiceUnavailable";
        assert!(
            status.is_client_error() || unavailable,
            "{}: {status} {name}: {text}",
            self.head
        );
        false
    }
}

/// The error name of an awsJson answer (`__type`, without its namespace).
fn json_error(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let name = value.get("__type")?.as_str()?;
    let name = name.rsplit_once('#').map_or(name, |(_, n)| n);
    (!name.is_empty()).then(|| name.to_string())
}

/// The error code of an awsQuery `<ErrorResponse>`.
fn query_error(text: &str) -> Option<String> {
    let (_, rest) = text.split_once("<ErrorResponse")?;
    let (_, rest) = rest.split_once("<Code>")?;
    let (code, _) = rest.split_once("</Code>")?;
    (!code.is_empty()).then(|| code.to_string())
}
