//! The S3 and ExtendedS3 destination: read from a configuration or an
//! update, checked, and described.

use std::collections::BTreeMap;

use kinesin_firehose::{
    evaluate_prefix, Column, Compression, Conversion, Deserializer, GlueTables, ParquetCompression,
    ParquetSerDe, Partition, S3Destination, SchemaConfig, PARTITION_FAILED,
};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::input::{constraint, Input};

const DEFAULT_SIZE_MIB: u32 = 5;
const DEFAULT_INTERVAL_S: u32 = 300;
/// Buffer size with record format conversion or dynamic partitioning:
/// default and least (AWS's).
const LARGE_SIZE_MIB: u32 = 128;
const LARGE_MIN_SIZE_MIB: u32 = 64;

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
    tables: &GlueTables,
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
    if config.opt_str("S3BackupMode")? == Some("Enabled") {
        return Err(not_supported("S3BackupMode Enabled"));
    }
    if let Some(encryption) = config.opt_object("EncryptionConfiguration")? {
        if encryption.opt_object("KMSEncryptionConfig")?.is_some() {
            return Err(not_supported("KMSEncryptionConfig"));
        }
    }
    let old = base.and_then(|b| b.conversion.as_ref());
    let conversion = match config.opt_object("DataFormatConversionConfiguration")? {
        Some(c) => conversion(&c, old, tables)?,
        None => old.cloned(),
    };
    let converting = conversion.as_ref().is_some_and(|c| c.enabled);
    if converting && compression != Compression::Uncompressed {
        return Err(ApiError::invalid_argument(
            "CompressionFormat must be UNCOMPRESSED when data format conversion is enabled (ParquetSerDe compresses)",
        ));
    }
    // AWS's least buffer with conversion or dynamic partitioning.
    let large = match (converting, partition_query.is_some()) {
        (true, _) => Some("data format conversion"),
        (false, true) => Some("dynamic partitioning"),
        (false, false) => None,
    };
    if let Some(feature) = large {
        if size_mib.is_some_and(|s| s < i64::from(LARGE_MIN_SIZE_MIB)) {
            return Err(ApiError::invalid_argument(format!(
                "BufferingHints.SizeInMBs must be at least {LARGE_MIN_SIZE_MIB} when {feature} is enabled"
            )));
        }
    }
    let destination = S3Destination {
        bucket_arn,
        role_arn,
        prefix,
        error_output_prefix,
        size_mib: size_mib.map_or_else(
            || match (base, large) {
                (Some(b), None) => b.size_mib,
                (Some(b), Some(_)) if b.size_mib >= LARGE_MIN_SIZE_MIB => b.size_mib,
                (_, None) => DEFAULT_SIZE_MIB,
                (_, Some(_)) => LARGE_SIZE_MIB,
            },
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
        conversion,
    };
    check_prefixes(&destination)?;
    Ok(destination)
}

/// A DataFormatConversionConfiguration: the Glue table's columns from the
/// node's table definitions, the JSON deserializer and the Parquet
/// serializer. None when disabled without the details.
fn conversion(
    c: &Input<'_>,
    old: Option<&Conversion>,
    tables: &GlueTables,
) -> Result<Option<Conversion>, ApiError> {
    let enabled = c.opt_bool("Enabled")?.unwrap_or(true);
    let detailed = [
        "SchemaConfiguration",
        "InputFormatConfiguration",
        "OutputFormatConfiguration",
    ]
    .iter()
    .any(|m| c.opt_object(m).ok().flatten().is_some());
    // An update that only turns the conversion on or off keeps its details
    // (turned on, with the table's columns as they are now).
    if let (false, Some(old)) = (detailed, old) {
        let columns = if enabled {
            table_columns(tables, &old.schema.database, &old.schema.table)?
        } else {
            old.columns.clone()
        };
        return Ok(Some(Conversion {
            enabled,
            columns,
            ..old.clone()
        }));
    }
    let required = |member: &str| {
        ApiError::invalid_argument(format!(
            "{member} is required when data format conversion is enabled"
        ))
    };
    let (Some(schema), Some(input), Some(output)) = (
        c.opt_object("SchemaConfiguration")?,
        c.opt_object("InputFormatConfiguration")?,
        c.opt_object("OutputFormatConfiguration")?,
    ) else {
        if !enabled {
            return Ok(None);
        }
        let missing = ["SchemaConfiguration", "InputFormatConfiguration"]
            .into_iter()
            .find(|m| c.opt_object(m).ok().flatten().is_none())
            .unwrap_or("OutputFormatConfiguration");
        return Err(required(missing));
    };
    let word = |input: &Input<'_>, member: &str| -> Result<Option<String>, ApiError> {
        let value = input.opt_str_len(member, 1, 1024)?;
        if let Some(v) = value.filter(|v| v.contains(char::is_whitespace)) {
            return Err(constraint(
                member,
                v,
                "satisfy regular expression pattern: ^\\S+$",
            ));
        }
        Ok(value.map(str::to_string))
    };
    let database = word(&schema, "DatabaseName")?
        .ok_or_else(|| required("SchemaConfiguration.DatabaseName"))?;
    let table =
        word(&schema, "TableName")?.ok_or_else(|| required("SchemaConfiguration.TableName"))?;
    let columns = if enabled {
        table_columns(tables, &database, &table)?
    } else {
        // A disabled conversion keeps its details without a table.
        tables
            .get(&(database.to_ascii_lowercase(), table.to_ascii_lowercase()))
            .cloned()
            .unwrap_or_default()
    };
    let schema = SchemaConfig {
        role_arn: word(&schema, "RoleARN")?.unwrap_or_default(),
        catalog_id: word(&schema, "CatalogId")?,
        database,
        table,
        region: word(&schema, "Region")?,
        version_id: word(&schema, "VersionId")?.unwrap_or_else(|| "LATEST".to_string()),
    };
    let deserializer = input
        .opt_object("Deserializer")?
        .ok_or_else(|| required("InputFormatConfiguration.Deserializer"))?;
    let input = match (
        deserializer.opt_object("OpenXJsonSerDe")?,
        deserializer.opt_object("HiveJsonSerDe")?,
    ) {
        (Some(openx), None) => Deserializer::OpenX {
            case_insensitive: openx.opt_bool("CaseInsensitive")?.unwrap_or(true),
            dots_to_underscores: openx
                .opt_bool("ConvertDotsInJsonKeysToUnderscores")?
                .unwrap_or(false),
            mappings: openx
                .opt_str_map("ColumnToJsonKeyMappings")?
                .unwrap_or_default()
                .into_iter()
                .map(|(column, key)| (column.to_ascii_lowercase(), key.to_string()))
                .collect::<BTreeMap<_, _>>(),
        },
        (None, Some(hive)) => Deserializer::Hive {
            timestamp_formats: hive
                .opt_str_list("TimestampFormats")?
                .unwrap_or_default()
                .into_iter()
                .map(str::to_string)
                .collect(),
        },
        _ => {
            return Err(ApiError::invalid_argument(
                "The Deserializer must name exactly one of OpenXJsonSerDe and HiveJsonSerDe",
            ))
        }
    };
    let serializer = output
        .opt_object("Serializer")?
        .ok_or_else(|| required("OutputFormatConfiguration.Serializer"))?;
    if serializer.opt_object("OrcSerDe")?.is_some() {
        return Err(not_supported("OrcSerDe (ORC output)"));
    }
    let parquet = serializer
        .opt_object("ParquetSerDe")?
        .ok_or_else(|| required("OutputFormatConfiguration.Serializer.ParquetSerDe"))?;
    let output = ParquetSerDe {
        block_size: parquet
            .opt_int_range("BlockSizeBytes", 64 << 20, i64::from(i32::MAX))?
            .map_or(256 << 20, |v| v as u32),
        page_size: parquet
            .opt_int_range("PageSizeBytes", 64 << 10, i64::from(i32::MAX))?
            .map_or(1 << 20, |v| v as u32),
        compression: match parquet.opt_str("Compression")? {
            None | Some("SNAPPY") => ParquetCompression::Snappy,
            Some("GZIP") => ParquetCompression::Gzip,
            Some("UNCOMPRESSED") => ParquetCompression::Uncompressed,
            Some(other) => {
                return Err(constraint(
                    "Compression",
                    other,
                    "satisfy enum value set: [UNCOMPRESSED, GZIP, SNAPPY]",
                ))
            }
        },
        dictionary: parquet
            .opt_bool("EnableDictionaryCompression")?
            .unwrap_or(false),
        max_padding: parquet
            .opt_int_range("MaxPaddingBytes", 0, i64::from(i32::MAX))?
            .map_or(0, |v| v as u32),
        writer_v2: match parquet.opt_str("WriterVersion")? {
            None | Some("V1") => false,
            Some("V2") => true,
            Some(other) => {
                return Err(constraint(
                    "WriterVersion",
                    other,
                    "satisfy enum value set: [V1, V2]",
                ))
            }
        },
    };
    Ok(Some(Conversion {
        enabled,
        schema,
        columns,
        input,
        output,
    }))
}

/// The columns of a Glue table of the node's definitions.
fn table_columns(
    tables: &GlueTables,
    database: &str,
    table: &str,
) -> Result<Vec<Column>, ApiError> {
    tables
        .get(&(database.to_ascii_lowercase(), table.to_ascii_lowercase()))
        .cloned()
        .ok_or_else(|| {
            ApiError::invalid_argument(format!(
                "The Glue table {database}.{table} is not defined: Kinesin reads tables from the nodes' glue_tables_file"
            ))
        })
}

/// DataFormatConversionConfiguration as DescribeDeliveryStream shows it.
fn describe_conversion(c: &Conversion) -> Value {
    let s = &c.schema;
    let deserializer = match &c.input {
        Deserializer::OpenX {
            case_insensitive,
            dots_to_underscores,
            mappings,
        } => json!({"OpenXJsonSerDe": {
            "CaseInsensitive": case_insensitive,
            "ConvertDotsInJsonKeysToUnderscores": dots_to_underscores,
            "ColumnToJsonKeyMappings": mappings,
        }}),
        Deserializer::Hive { timestamp_formats } => {
            json!({"HiveJsonSerDe": {"TimestampFormats": timestamp_formats}})
        }
    };
    let o = &c.output;
    json!({
        "Enabled": c.enabled,
        "SchemaConfiguration": {
            "RoleARN": s.role_arn,
            "CatalogId": s.catalog_id,
            "DatabaseName": s.database,
            "TableName": s.table,
            "Region": s.region,
            "VersionId": s.version_id,
        },
        "InputFormatConfiguration": {"Deserializer": deserializer},
        "OutputFormatConfiguration": {"Serializer": {"ParquetSerDe": {
            "BlockSizeBytes": o.block_size,
            "PageSizeBytes": o.page_size,
            "Compression": match o.compression {
                ParquetCompression::Uncompressed => "UNCOMPRESSED",
                ParquetCompression::Gzip => "GZIP",
                ParquetCompression::Snappy => "SNAPPY",
            },
            "EnableDictionaryCompression": o.dictionary,
            "MaxPaddingBytes": o.max_padding,
            "WriterVersion": if o.writer_v2 { "V2" } else { "V1" },
        }}},
    })
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
    if let Some(c) = &d.conversion {
        extended["DataFormatConversionConfiguration"] = describe_conversion(c);
    }
    json!({
        "DestinationId": DESTINATION_ID,
        "S3DestinationDescription": s3,
        "ExtendedS3DestinationDescription": extended,
    })
}
