//! The S3 and ExtendedS3 destination: read from a configuration or an
//! update, checked, and described.

use kinesin_firehose::{evaluate_prefix, Compression, Partition, S3Destination, PARTITION_FAILED};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::input::{constraint, Input};

const DEFAULT_SIZE_MIB: u32 = 5;
const DEFAULT_INTERVAL_S: u32 = 300;

/// Destinations other than S3 that CreateDeliveryStream may name.
pub(super) const OTHER_DESTINATIONS: &[&str] = &[
    "RedshiftDestinationConfiguration",
    "ElasticsearchDestinationConfiguration",
    "AmazonopensearchserviceDestinationConfiguration",
    "SplunkDestinationConfiguration",
    "HttpEndpointDestinationConfiguration",
    "AmazonOpenSearchServerlessDestinationConfiguration",
    "SnowflakeDestinationConfiguration",
    "IcebergDestinationConfiguration",
];

/// The one destination id of a delivery stream, as AWS numbers them.
pub(super) const DESTINATION_ID: &str = "destinationId-000000000001";

fn not_supported(what: &str) -> ApiError {
    ApiError::invalid_argument(format!("{what} is not supported by Kinesin"))
}

/// A destination from `config` (an S3 or ExtendedS3 configuration or
/// update) laid over `base` (the current destination of an update).
pub(super) fn read(
    config: &Input<'_>,
    base: Option<&S3Destination>,
    extended: bool,
) -> Result<S3Destination, ApiError> {
    let role = config.opt_str_len("RoleARN", 1, 512)?;
    let bucket = config.opt_str_len("BucketARN", 1, 2048)?;
    let (role_arn, bucket_arn) = match (role, bucket, base) {
        (Some(r), Some(b), _) => (r.to_string(), b.to_string()),
        (r, b, Some(base)) => (
            r.map_or_else(|| base.role_arn.clone(), str::to_string),
            b.map_or_else(|| base.bucket_arn.clone(), str::to_string),
        ),
        (None, _, None) => return Err(constraint("RoleARN", "null", "not be null")),
        (_, None, None) => return Err(constraint("BucketARN", "null", "not be null")),
    };
    check_bucket(&bucket_arn)?;
    if !role_arn.starts_with("arn:") || !role_arn.contains(":iam::") {
        return Err(constraint(
            "RoleARN",
            &role_arn,
            "satisfy regular expression pattern: arn:.*:iam::\\d{12}:role/[a-zA-Z_0-9+=,.@\\-_/]+",
        ));
    }
    let text = |member: &str, old: Option<&Option<String>>| -> Result<Option<String>, ApiError> {
        Ok(match config.opt_str_len(member, 0, 1024)? {
            Some("") => None,
            Some(v) => Some(v.to_string()),
            None => old.cloned().flatten(),
        })
    };
    let prefix = text("Prefix", base.map(|b| &b.prefix))?;
    let error_output_prefix = text("ErrorOutputPrefix", base.map(|b| &b.error_output_prefix))?;
    let hints = config.opt_object("BufferingHints")?;
    let size_mib = match hints.as_ref().map(|h| h.opt_int_range("SizeInMBs", 1, 128)) {
        Some(v) => v?,
        None => None,
    };
    let interval_s = match hints
        .as_ref()
        .map(|h| h.opt_int_range("IntervalInSeconds", 0, 900))
    {
        Some(v) => v?,
        None => None,
    };
    let compression = match config.opt_str("CompressionFormat")? {
        None => base.map_or(Compression::Uncompressed, |b| b.compression),
        Some("ZIP") => return Err(not_supported("CompressionFormat ZIP")),
        Some(name) => Compression::from_name(name).ok_or_else(|| {
            constraint(
                "CompressionFormat",
                name,
                "satisfy enum value set: [UNCOMPRESSED, GZIP, ZIP, Snappy, HADOOP_SNAPPY]",
            )
        })?,
    };
    let processing = match config.opt_object("ProcessingConfiguration")? {
        Some(processing) => processors(&processing)?,
        None => Processing {
            append: base.is_some_and(|b| b.append_delimiter),
            query: base.and_then(|b| b.partition_query.clone()),
        },
    };
    let dynamic = match config.opt_object("DynamicPartitioningConfiguration")? {
        Some(c) => c.opt_bool("Enabled")?.unwrap_or(false),
        None => base.is_some_and(|b| b.partition_query.is_some()),
    };
    let partition_query = match (dynamic, processing.query) {
        (true, Some(query)) => {
            kinesin_firehose::check_query(&query).map_err(ApiError::invalid_argument)?;
            Some(query)
        }
        (true, None) => {
            return Err(ApiError::invalid_argument(
                "Dynamic partitioning needs a MetadataExtraction processor with a MetadataExtractionQuery",
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid_argument(
                "The MetadataExtraction processor needs DynamicPartitioningConfiguration enabled",
            ))
        }
        (false, None) => None,
    };
    if let Some(c) = config.opt_object("DataFormatConversionConfiguration")? {
        if c.opt_bool("Enabled")?.unwrap_or(true) {
            return Err(not_supported("DataFormatConversionConfiguration"));
        }
    }
    if config.opt_str("S3BackupMode")? == Some("Enabled") {
        return Err(not_supported("S3BackupMode Enabled"));
    }
    if let Some(encryption) = config.opt_object("EncryptionConfiguration")? {
        if encryption.opt_object("KMSEncryptionConfig")?.is_some() {
            return Err(not_supported("KMSEncryptionConfig"));
        }
    }
    let destination = S3Destination {
        bucket_arn,
        role_arn,
        prefix,
        error_output_prefix,
        size_mib: size_mib.map_or_else(
            || base.map_or(DEFAULT_SIZE_MIB, |b| b.size_mib),
            |v| v as u32,
        ),
        interval_s: interval_s.map_or_else(
            || base.map_or(DEFAULT_INTERVAL_S, |b| b.interval_s),
            |v| v as u32,
        ),
        compression,
        append_delimiter: processing.append,
        extended: extended || base.is_some_and(|b| b.extended),
        partition_query,
    };
    check_prefixes(&destination)?;
    Ok(destination)
}

fn check_bucket(arn: &str) -> Result<(), ApiError> {
    let bucket = arn.split_once(":s3:::");
    let valid = bucket.is_some_and(|(head, b)| {
        head.starts_with("arn:")
            && (1..=255).contains(&b.len())
            && b.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
    });
    if valid {
        Ok(())
    } else {
        Err(constraint(
            "BucketARN",
            arn,
            "satisfy regular expression pattern: arn:.*:s3:::[\\w\\.\\-]{1,255}",
        ))
    }
}

/// What the processors do: append a delimiter, extract partition keys.
struct Processing {
    append: bool,
    query: Option<String>,
}

/// The processors Kinesin runs; any other enabled processor is refused.
fn processors(processing: &Input<'_>) -> Result<Processing, ApiError> {
    let mut out = Processing {
        append: false,
        query: None,
    };
    if processing.opt_bool("Enabled")? == Some(false) {
        return Ok(out);
    }
    for p in processing.opt_array("Processors")?.into_iter().flatten() {
        let kind = p.get("Type").and_then(Value::as_str).unwrap_or("");
        let parameter = |name: &str| {
            p.get("Parameters")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|x| x.get("ParameterName").and_then(Value::as_str) == Some(name))
                .and_then(|x| x.get("ParameterValue").and_then(Value::as_str))
        };
        match kind {
            "AppendDelimiterToRecord" => out.append = true,
            "MetadataExtraction" => {
                if let Some(engine) = parameter("JsonParsingEngine").filter(|e| *e != "JQ-1.6") {
                    return Err(ApiError::invalid_argument(format!(
                        "JsonParsingEngine {engine} is not supported (JQ-1.6 is)"
                    )));
                }
                out.query = parameter("MetadataExtractionQuery").map(str::to_string);
            }
            other => return Err(not_supported(&format!("the processor {other}"))),
        }
    }
    Ok(out)
}

/// Prefixes whose expressions Kinesin evaluates; as AWS, a prefix with
/// expressions needs an error prefix.
fn check_prefixes(d: &S3Destination) -> Result<(), ApiError> {
    let invalid = |e: kinesin_firehose::KeyError| ApiError::invalid_argument(e.0);
    let partition = if d.partition_query.is_some() {
        Partition::Any
    } else {
        Partition::Off
    };
    let expressions = match &d.prefix {
        Some(p) => {
            evaluate_prefix(p, 0, 0, None, partition)
                .map_err(invalid)?
                .1
        }
        None => false,
    };
    if let Some(p) = &d.error_output_prefix {
        evaluate_prefix(p, 0, 0, Some(PARTITION_FAILED), Partition::Off).map_err(invalid)?;
    }
    let keyed = d
        .prefix
        .as_deref()
        .is_some_and(|p| p.contains("!{partitionKeyFromQuery:"));
    if d.partition_query.is_some() && !keyed {
        return Err(ApiError::invalid_argument(
            "With dynamic partitioning, Prefix must use a partition key: !{partitionKeyFromQuery:<key>}",
        ));
    }
    if expressions && d.error_output_prefix.is_none() {
        return Err(ApiError::invalid_argument(
            "ErrorOutputPrefix cannot be null or empty when Prefix contains expressions",
        ));
    }
    Ok(())
}

/// The destination as DescribeDeliveryStream shows it.
pub(super) fn describe(d: &S3Destination) -> Value {
    let s3 = json!({
        "RoleARN": d.role_arn,
        "BucketARN": d.bucket_arn,
        "Prefix": d.prefix,
        "ErrorOutputPrefix": d.error_output_prefix,
        "BufferingHints": {"SizeInMBs": d.size_mib, "IntervalInSeconds": d.interval_s},
        "CompressionFormat": d.compression.name(),
        "EncryptionConfiguration": {"NoEncryptionConfig": "NoEncryption"},
        "CloudWatchLoggingOptions": {"Enabled": false},
    });
    let mut extended = s3.clone();
    extended["S3BackupMode"] = json!("Disabled");
    let mut processors = Vec::new();
    if let Some(query) = &d.partition_query {
        processors.push(json!({"Type": "MetadataExtraction", "Parameters": [
            {"ParameterName": "MetadataExtractionQuery", "ParameterValue": query},
            {"ParameterName": "JsonParsingEngine", "ParameterValue": "JQ-1.6"},
        ]}));
    }
    if d.append_delimiter {
        processors.push(json!({"Type": "AppendDelimiterToRecord", "Parameters": []}));
    }
    extended["ProcessingConfiguration"] =
        json!({"Enabled": !processors.is_empty(), "Processors": processors});
    extended["DynamicPartitioningConfiguration"] = json!({"Enabled": d.partition_query.is_some()});
    json!({
        "DestinationId": DESTINATION_ID,
        "S3DestinationDescription": s3,
        "ExtendedS3DestinationDescription": extended,
    })
}
