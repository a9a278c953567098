//! The history of a run: one JSON object per line, in the order events
//! happened. Operations are `invoke` then `ok`, `fail` (certainly did not
//! happen) or `info` (outcome unknown, e.g. a timeout).

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Invoke,
    Ok,
    Fail,
    Info,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub time_ms: u64,
    pub process: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// put | read | fault | heal | liveness | final-read | degraded |
    /// degraded-op
    pub op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    /// The partition key of an acknowledged put.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<String>,
    /// Records a read returned, as (sequence number, value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Event {
    pub fn new(process: &str, kind: Kind, op: &str) -> Event {
        Event {
            time_ms: 0,
            process: process.to_string(),
            kind,
            op: op.to_string(),
            value: None,
            node: None,
            shard: None,
            key: None,
            seq: None,
            records: Vec::new(),
            error: None,
        }
    }

    pub fn value(mut self, v: &str) -> Event {
        self.value = Some(v.to_string());
        self
    }

    pub fn node(mut self, n: u32) -> Event {
        self.node = Some(n);
        self
    }

    pub fn shard(mut self, s: &str) -> Event {
        self.shard = Some(s.to_string());
        self
    }

    pub fn key(mut self, k: &str) -> Event {
        self.key = Some(k.to_string());
        self
    }

    pub fn seq(mut self, s: &str) -> Event {
        self.seq = Some(s.to_string());
        self
    }

    pub fn records(mut self, r: Vec<(String, String)>) -> Event {
        self.records = r;
        self
    }

    pub fn error(mut self, e: impl ToString) -> Event {
        self.error = Some(e.to_string());
        self
    }
}

/// Appends events to `history.jsonl` as they happen.
#[derive(Clone)]
pub struct History {
    start: Instant,
    out: Arc<Mutex<std::io::BufWriter<std::fs::File>>>,
}

impl History {
    pub fn create(path: &Path) -> anyhow::Result<History> {
        Ok(History {
            start: Instant::now(),
            out: Arc::new(Mutex::new(std::io::BufWriter::new(std::fs::File::create(
                path,
            )?))),
        })
    }

    pub fn log(&self, mut event: Event) {
        let mut out = self.out.lock().expect("history lock");
        event.time_ms = self.start.elapsed().as_millis() as u64;
        serde_json::to_writer(&mut *out, &event).expect("events serialize");
        out.write_all(b"\n").expect("history is writable");
    }

    pub fn flush(&self) -> anyhow::Result<()> {
        self.out.lock().expect("history lock").flush()?;
        Ok(())
    }
}

pub fn load(path: &Path) -> anyhow::Result<Vec<Event>> {
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut events = Vec::new();
    for line in file.lines() {
        let line = line?;
        if !line.trim().is_empty() {
            events.push(serde_json::from_str(&line)?);
        }
    }
    Ok(events)
}
