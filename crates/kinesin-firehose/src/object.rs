//! What a sealed batch becomes: its object key, as AWS names delivered
//! objects, and its bytes.

use std::collections::BTreeMap;
use std::io::Write;

use base64::Engine;
use chrono::{DateTime, Utc};

use crate::model::{Batch, Compression, Converting, Partitioning, S3Destination};

/// A prefix Firehose cannot evaluate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(pub String);

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The Java `DateTimeFormatter` pattern of a `!{timestamp:…}` expression
/// as a chrono format; letters other than these are refused.
fn timestamp_format(pattern: &str) -> Result<String, KeyError> {
    let mut out = String::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            for quoted in chars.by_ref() {
                if quoted == '\'' {
                    break;
                }
                out.push(quoted);
            }
            continue;
        }
        if !c.is_ascii_alphabetic() {
            if c == '%' {
                out.push('%');
            }
            out.push(c);
            continue;
        }
        let mut run = 1;
        while chars.peek() == Some(&c) {
            chars.next();
            run += 1;
        }
        out.push_str(match (c, run) {
            ('y', 4) | ('u', 4) => "%Y",
            ('y', 2) | ('u', 2) => "%y",
            ('M', 2) => "%m",
            ('d', 2) => "%d",
            ('H', 2) => "%H",
            ('m', 2) => "%M",
            ('s', 2) => "%S",
            _ => {
                return Err(KeyError(format!(
                    "the timestamp pattern '{pattern}' uses '{}', which Kinesin does not format (yyyy, yy, MM, dd, HH, mm, ss)",
                    c.to_string().repeat(run)
                )))
            }
        });
    }
    Ok(out)
}

fn time_of(ms: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms as i64).unwrap_or_default()
}

/// A deterministic stand-in for AWS's random strings: derived from the
/// batch's first sequence number, so a retried upload names the same key.
fn batch_string(from: u128) -> String {
    let folded = (from as u64) ^ ((from >> 64) as u64).rotate_left(17);
    format!("{:011x}", folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20)
}

/// Evaluates a prefix's `!{namespace:value}` expressions; `error_type` is
/// the value of `!{firehose:error-output-type}` (only error prefixes may
/// use it). Returns the prefix and whether it had expressions.
pub fn evaluate_prefix(
    prefix: &str,
    arrival_ms: u64,
    from: u128,
    error_type: Option<&str>,
    partition: Partition<'_>,
) -> Result<(String, bool), KeyError> {
    let mut out = String::new();
    let mut rest = prefix;
    let mut any = false;
    while let Some(start) = rest.find("!{") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            return Err(KeyError(format!(
                "the prefix '{prefix}' has an unterminated expression"
            )));
        };
        let expression = &rest[start + 2..start + end];
        any = true;
        match expression.split_once(':') {
            Some(("timestamp", pattern)) => {
                let format = timestamp_format(pattern)?;
                out.push_str(&time_of(arrival_ms).format(&format).to_string());
            }
            Some(("firehose", "random-string")) => out.push_str(&batch_string(from)),
            Some(("firehose", "error-output-type")) => match error_type {
                Some(t) => out.push_str(t),
                None => {
                    return Err(KeyError(
                        "!{firehose:error-output-type} may only be used in ErrorOutputPrefix"
                            .into(),
                    ))
                }
            },
            Some(("partitionKeyFromQuery", name)) => match partition {
                Partition::Off => {
                    return Err(KeyError(format!(
                        "!{{partitionKeyFromQuery:{name}}} needs dynamic partitioning with a MetadataExtraction query"
                    )))
                }
                Partition::Any => out.push_str(name),
                Partition::Keys(keys) => match keys.get(name) {
                    Some(value) => out.push_str(value),
                    None => {
                        return Err(KeyError(format!(
                            "the query gave no partition key '{name}'"
                        )))
                    }
                },
            },
            _ => {
                return Err(KeyError(format!(
                    "the prefix '{prefix}' has the expression '!{{{expression}}}', which Kinesin does not evaluate"
                )))
            }
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok((out, any))
}

/// What `!{partitionKeyFromQuery:…}` may name.
#[derive(Debug, Clone, Copy)]
pub enum Partition<'a> {
    /// Not a dynamically partitioned stream: the expression is refused.
    Off,
    /// Checking a configuration: any key is accepted.
    Any,
    /// A record's partition keys.
    Keys(&'a BTreeMap<String, String>),
}

/// What names a batch's objects besides their prefix.
#[derive(Debug, Clone, Copy)]
pub struct Naming<'a> {
    pub stream: &'a str,
    pub version: u64,
    pub first_arrival_ms: u64,
    pub from: u128,
    /// What ends the key: the format's extension (`.gz`, `.parquet`, …).
    pub extension: &'static str,
}

/// The extension AWS gives an object: `.parquet` when records are
/// converted, else the compression's.
pub fn extension(compression: Compression, converted: bool) -> &'static str {
    if converted {
        ".parquet"
    } else {
        compression.extension()
    }
}

/// The key of the object a batch becomes, as AWS names them:
/// `<prefix>YYYY/MM/dd/HH/<stream>-<version>-YYYY-MM-dd-HH-mm-ss-<id>`
/// (UTC, at the arrival of the batch's first record), where a prefix with
/// expressions replaces the time part. AWS's random id is the batch's
/// first sequence number here.
pub fn object_key(
    naming: Naming<'_>,
    prefix: Option<&str>,
    error_type: Option<&str>,
    partition: Partition<'_>,
) -> Result<String, KeyError> {
    let Naming {
        stream,
        version,
        first_arrival_ms,
        from,
        extension,
    } = naming;
    let time = time_of(first_arrival_ms);
    let (mut key, expressions) = evaluate_prefix(
        prefix.unwrap_or(""),
        first_arrival_ms,
        from,
        error_type,
        partition,
    )?;
    if !expressions {
        key.push_str(&time.format("%Y/%m/%d/%H/").to_string());
    }
    let id = format!("{from:032x}");
    key.push_str(&format!(
        "{stream}-{version}-{}-{}-{}-{}-{}-{}{}",
        time.format("%Y-%m-%d-%H-%M-%S"),
        &id[0..8],
        &id[8..12],
        &id[12..16],
        &id[16..20],
        &id[20..32],
        extension
    ));
    Ok(key)
}

/// How the objects of a batch about to be sealed are named: its key, or
/// (dynamically partitioned) what names each partition's object; and with
/// record format conversion, the format and the key of the object of
/// records that do not convert.
pub fn batch_naming(
    destination: &S3Destination,
    naming: Naming<'_>,
) -> Result<(String, Option<Partitioning>, Option<Converting>), KeyError> {
    let conversion = match destination.converting() {
        None => None,
        Some(format) => {
            let prefix = destination
                .error_output_prefix
                .as_deref()
                .unwrap_or(DEFAULT_CONVERSION_ERRORS);
            let errors = Naming {
                extension: "",
                ..naming
            };
            Some(Converting {
                format: format.clone(),
                error_key: object_key(
                    errors,
                    Some(prefix),
                    Some(CONVERSION_FAILED),
                    Partition::Off,
                )?,
            })
        }
    };
    match &destination.partition_query {
        None => Ok((
            object_key(naming, destination.prefix.as_deref(), None, Partition::Off)?,
            None,
            conversion,
        )),
        Some(query) => Ok((
            String::new(),
            Some(Partitioning {
                query: query.clone(),
                prefix: destination.prefix.clone().unwrap_or_default(),
                error_prefix: destination.error_output_prefix.clone().unwrap_or_default(),
                stream: naming.stream.to_string(),
                version: naming.version,
            }),
            conversion,
        )),
    }
}

/// The `!{firehose:error-output-type}` of records whose partition keys
/// could not be extracted.
pub const PARTITION_FAILED: &str = "processing-failed";

/// The `!{firehose:error-output-type}` of records that do not convert.
pub const CONVERSION_FAILED: &str = "format-conversion-failed";

/// Where records that do not convert go without an ErrorOutputPrefix.
const DEFAULT_CONVERSION_ERRORS: &str = "format-conversion-failed/";

/// A record that did not make it into an object, as a JSON line of the
/// error object: the record in base64, why, and AWS's error code.
fn failure(record: &[u8], code: &str, reason: &str) -> Vec<u8> {
    serde_json::json!({
        "rawData": base64::engine::general_purpose::STANDARD.encode(record),
        "errorCode": code,
        "errorMessage": reason,
    })
    .to_string()
    .into_bytes()
}

/// The objects a sealed batch becomes, `(key, bytes)`: one, or with
/// dynamic partitioning one per partition (records in their order) and one
/// under the error prefix for records without partition keys, each a JSON
/// line with the record in base64. Deterministic, as [`render`].
pub fn objects(batch: &Batch, records: Vec<Vec<u8>>) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut groups: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    // Error objects by key: failures of both kinds share one object when
    // the error prefix names them alike.
    let mut errors: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    match &batch.partitioning {
        None => {
            groups.insert(batch.key.clone(), records);
        }
        Some(p) => {
            let naming = Naming {
                stream: &p.stream,
                version: p.version,
                first_arrival_ms: batch.first_arrival_ms,
                from: batch.from,
                extension: batch.extension(),
            };
            let keys = crate::partition::partition_keys(&p.query, &records)?;
            let mut unpartitioned = Vec::new();
            for (record, keys) in records.into_iter().zip(keys) {
                let key = keys.and_then(|k| {
                    object_key(naming, Some(&p.prefix), None, Partition::Keys(&k)).map_err(|e| e.0)
                });
                match key {
                    Ok(key) => groups.entry(key).or_default().push(record),
                    Err(reason) => unpartitioned.push(failure(
                        &record,
                        "DynamicPartitioning.MetadataExtractionFailed",
                        &reason,
                    )),
                }
            }
            if !unpartitioned.is_empty() {
                let key = object_key(
                    Naming {
                        extension: batch.compression.extension(),
                        ..naming
                    },
                    Some(&p.error_prefix),
                    Some(PARTITION_FAILED),
                    Partition::Off,
                )
                .map_err(|e| e.0)?;
                errors.entry(key).or_default().extend(unpartitioned);
            }
        }
    }
    let mut out = Vec::with_capacity(groups.len() + 2);
    for (key, records) in groups {
        match &batch.conversion {
            None => {
                let body = render(&records, batch.compression, batch.append_delimiter, &key)
                    .map_err(|e| e.to_string())?;
                out.push((key, body));
            }
            Some(c) => {
                let (body, failed) = crate::convert::convert(&records, &c.format)?;
                out.extend(body.map(|body| (key, body)));
                for (i, reason) in failed {
                    errors.entry(c.error_key.clone()).or_default().push(failure(
                        &records[i],
                        "DataFormatConversion.MalformedData",
                        &reason,
                    ));
                }
            }
        }
    }
    for (key, lines) in errors {
        let body = render(&lines, batch.compression, true, &key).map_err(|e| e.to_string())?;
        out.push((key, body));
    }
    Ok(out)
}

/// Hadoop's block size for Snappy streams (`io.compression.codec.snappy.buffersize`).
const HADOOP_BLOCK: usize = 256 * 1024;

/// The object's bytes: the records in order (each followed by a newline
/// with `append_delimiter`), compressed. Deterministic, so a retried
/// upload writes the same object.
pub fn render(
    records: &[Vec<u8>],
    compression: Compression,
    append_delimiter: bool,
    key: &str,
) -> std::io::Result<Vec<u8>> {
    let size: usize = records.iter().map(|r| r.len() + 1).sum();
    let mut plain = Vec::with_capacity(size);
    for r in records {
        plain.extend_from_slice(r);
        if append_delimiter {
            plain.push(b'\n');
        }
    }
    match compression {
        Compression::Uncompressed => Ok(plain),
        Compression::Gzip => {
            let mut out = flate2::write::GzEncoder::new(
                Vec::with_capacity(plain.len() / 2),
                flate2::Compression::default(),
            );
            out.write_all(&plain)?;
            out.finish()
        }
        Compression::Snappy => {
            let mut out = snap::write::FrameEncoder::new(Vec::with_capacity(plain.len() / 2));
            out.write_all(&plain)?;
            out.into_inner().map_err(|e| e.into_error())
        }
        Compression::HadoopSnappy => {
            let mut out = Vec::with_capacity(plain.len() / 2);
            let mut encoder = snap::raw::Encoder::new();
            for block in plain.chunks(HADOOP_BLOCK) {
                let compressed = encoder.compress_vec(block).map_err(std::io::Error::other)?;
                out.extend_from_slice(&(block.len() as u32).to_be_bytes());
                out.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
                out.extend_from_slice(&compressed);
            }
            Ok(out)
        }
        Compression::Zip => {
            let name = key.rsplit('/').next().unwrap_or(key);
            let name = name.strip_suffix(".zip").unwrap_or(name);
            let mut out =
                zip::ZipWriter::new(std::io::Cursor::new(Vec::with_capacity(plain.len() / 2)));
            let options = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .last_modified_time(zip::DateTime::default())
                .large_file(plain.len() > u32::MAX as usize);
            out.start_file(name, options)
                .map_err(std::io::Error::other)?;
            out.write_all(&plain)?;
            Ok(out.finish().map_err(std::io::Error::other)?.into_inner())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// 2026-12-01T13:04:05.678Z
    const T: u64 = 1_796_130_245_678;

    #[test]
    fn default_keys_carry_the_hour_prefix_and_the_aws_name() {
        let key = object_key(
            naming("logs", 1, 0x1234 << 32, Compression::Gzip),
            None,
            None,
            Partition::Off,
        )
        .unwrap();
        assert_eq!(
            key,
            "2026/12/01/13/logs-1-2026-12-01-13-04-05-00000000-0000-0000-0000-123400000000.gz"
        );
        let key = object_key(
            naming("logs", 3, 7, Compression::Uncompressed),
            Some("raw/"),
            None,
            Partition::Off,
        )
        .unwrap();
        assert!(key.starts_with("raw/2026/12/01/13/logs-3-"), "{key}");
    }

    #[test]
    fn expressions_replace_the_time_prefix() {
        let prefix = "year=!{timestamp:yyyy}/month=!{timestamp:MM}/!{firehose:random-string}/";
        let n = naming("s", 1, 99, Compression::Uncompressed);
        let a = object_key(n, Some(prefix), None, Partition::Off).unwrap();
        let b = object_key(n, Some(prefix), None, Partition::Off).unwrap();
        assert_eq!(a, b, "a retry names the same key");
        assert!(a.starts_with("year=2026/month=12/"), "{a}");
        assert!(!a.contains("2026/12/01/13/"), "{a}");
        let (error, _) = evaluate_prefix(
            "err/!{firehose:error-output-type}/",
            T,
            1,
            Some("processing-failed"),
            Partition::Off,
        )
        .unwrap();
        assert_eq!(error, "err/processing-failed/");
        let n = naming("s", 1, 1, Compression::Gzip);
        let refused = |prefix: &str| object_key(n, Some(prefix), None, Partition::Off).is_err();
        assert!(refused("!{firehose:error-output-type}"));
        assert!(refused("!{timestamp:yyyy-QQ}"));
        assert!(refused("!{timestamp:yyyy"));
        assert!(refused("!{partitionKeyFromQuery:customer}"));
        let keys = BTreeMap::from([("customer".to_string(), "a".to_string())]);
        let key = object_key(
            n,
            Some("c=!{partitionKeyFromQuery:customer}/"),
            None,
            Partition::Keys(&keys),
        );
        assert!(key.unwrap().starts_with("c=a/s-1-"));
        let other = object_key(
            n,
            Some("!{partitionKeyFromQuery:region}/"),
            None,
            Partition::Keys(&keys),
        );
        assert!(other.is_err());
    }

    fn naming(stream: &str, version: u64, from: u128, compression: Compression) -> Naming<'_> {
        Naming {
            stream,
            version,
            first_arrival_ms: T,
            from,
            extension: compression.extension(),
        }
    }

    #[test]
    fn a_partitioned_batch_becomes_one_object_per_partition_and_one_of_failures() {
        let batch = Batch {
            from: 5,
            to: 9,
            records: 4,
            bytes: 0,
            bucket: "b".into(),
            key: String::new(),
            compression: Compression::Uncompressed,
            append_delimiter: true,
            first_arrival_ms: T,
            ranges: Vec::new(),
            finished: Vec::new(),
            partitioning: Some(Partitioning {
                query: "{customer: .c}".into(),
                prefix: "customer=!{partitionKeyFromQuery:customer}/".into(),
                error_prefix: "errors/!{firehose:error-output-type}/".into(),
                stream: "s".into(),
                version: 2,
            }),
            conversion: None,
        };
        let records = [
            r#"{"c":"a","n":1}"#,
            r#"{"c":"b"}"#,
            "oops",
            r#"{"c":"a","n":2}"#,
        ]
        .map(|r| r.as_bytes().to_vec())
        .to_vec();
        let out = objects(&batch, records.clone()).unwrap();
        assert_eq!(out, objects(&batch, records).unwrap(), "deterministic");
        let keys: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert!(
            keys[0].starts_with("customer=a/s-2-2026-12-01-13-04-05-"),
            "{keys:?}"
        );
        assert!(keys[1].starts_with("customer=b/"), "{keys:?}");
        assert!(
            keys[2].starts_with("errors/processing-failed/s-2-"),
            "{keys:?}"
        );
        assert_eq!(out[0].1, b"{\"c\":\"a\",\"n\":1}\n{\"c\":\"a\",\"n\":2}\n");
        let failure: serde_json::Value =
            serde_json::from_slice(out[2].1.strip_suffix(b"\n").unwrap()).unwrap();
        assert_eq!(failure["rawData"], "b29wcw==");
        assert_eq!(
            failure["errorCode"],
            "DynamicPartitioning.MetadataExtractionFailed"
        );
    }

    #[test]
    fn failures_of_both_kinds_under_one_error_key_share_one_object() {
        let conversion = crate::convert::tests_conversion();
        let batch = Batch {
            from: 5,
            to: 7,
            records: 3,
            bytes: 0,
            bucket: "b".into(),
            key: String::new(),
            compression: Compression::Uncompressed,
            append_delimiter: false,
            first_arrival_ms: T,
            ranges: Vec::new(),
            finished: Vec::new(),
            partitioning: Some(Partitioning {
                query: "{c: .c}".into(),
                prefix: "c=!{partitionKeyFromQuery:c}/".into(),
                error_prefix: "errors/".into(),
                stream: "s".into(),
                version: 1,
            }),
            conversion: Some(Converting {
                format: conversion,
                error_key: object_key(
                    naming("s", 1, 5, Compression::Uncompressed),
                    Some("errors/"),
                    Some(CONVERSION_FAILED),
                    Partition::Off,
                )
                .unwrap(),
            }),
        };
        let records = [r#"{"c":"a","id":1}"#, "oops", r#"{"c":"a","id":"x"}"#]
            .map(|r| r.as_bytes().to_vec())
            .to_vec();
        let out = objects(&batch, records).unwrap();
        let keys: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(keys[0].starts_with("c=a/") && keys[0].ends_with(".parquet"));
        assert!(keys[1].starts_with("errors/"), "{keys:?}");
        assert_eq!(
            out[1]
                .1
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count(),
            2
        );
    }

    #[test]
    fn every_compression_round_trips_and_is_deterministic() {
        let records: Vec<Vec<u8>> = (0..2000)
            .map(|i| format!("record {i}").into_bytes())
            .collect();
        let expected: Vec<u8> = records
            .iter()
            .flat_map(|r| r.iter().copied().chain([b'\n']))
            .collect();
        for compression in [
            Compression::Uncompressed,
            Compression::Gzip,
            Compression::Snappy,
            Compression::HadoopSnappy,
            Compression::Zip,
        ] {
            let bytes = render(&records, compression, true, "k.zip").unwrap();
            assert_eq!(bytes, render(&records, compression, true, "k.zip").unwrap());
            let plain = match compression {
                Compression::Uncompressed => bytes,
                Compression::Gzip => {
                    let mut out = Vec::new();
                    flate2::read::GzDecoder::new(&bytes[..])
                        .read_to_end(&mut out)
                        .unwrap();
                    out
                }
                Compression::Snappy => {
                    let mut out = Vec::new();
                    snap::read::FrameDecoder::new(&bytes[..])
                        .read_to_end(&mut out)
                        .unwrap();
                    out
                }
                Compression::HadoopSnappy => {
                    let (mut out, mut at) = (Vec::new(), 0);
                    while at < bytes.len() {
                        let raw = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
                        let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap());
                        let block = &bytes[at + 8..at + 8 + len as usize];
                        let plain = snap::raw::Decoder::new().decompress_vec(block).unwrap();
                        assert_eq!(plain.len(), raw as usize);
                        out.extend(plain);
                        at += 8 + len as usize;
                    }
                    out
                }
                Compression::Zip => {
                    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
                    assert_eq!(archive.len(), 1);
                    let mut entry = archive.by_index(0).unwrap();
                    assert_eq!(
                        entry.name().unwrap(),
                        "k",
                        "the entry is named as the object"
                    );
                    let mut out = Vec::new();
                    entry.read_to_end(&mut out).unwrap();
                    out
                }
            };
            assert_eq!(plain, expected, "{compression:?}");
        }
        assert_eq!(
            render(&records[..2], Compression::Uncompressed, false, "k").unwrap(),
            b"record 0record 1"
        );
    }
}
