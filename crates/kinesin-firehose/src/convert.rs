//! Record format conversion: JSON records into one Parquet object, with the
//! columns of the table the conversion names (`DataFormatConversion`).
//! `arrow-json` reads the records into Arrow arrays of the table's types and
//! `parquet` writes them; this module maps Hive types to Arrow types and
//! does what the JSON deserializers do to keys first.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as Codec, GzipLevel};
use parquet::file::properties::{WriterProperties, WriterVersion};
use serde_json::{Map, Value};

use crate::model::{Column, Conversion, Deserializer, ParquetCompression};

/// The Arrow type of a Hive column type as Glue stores them: `string`,
/// `varchar(n)`, `char(n)`, `boolean`, `tinyint`, `smallint`, `int`,
/// `bigint`, `float`, `double`, `decimal(p,s)`, `date`, `timestamp`,
/// `binary`, `array<t>`, `map<k,v>`, `struct<name:t,…>`.
pub fn arrow_type(hive: &str) -> Result<DataType, String> {
    let mut p = TypeParser {
        text: hive,
        at: 0,
        depth: 0,
    };
    let t = p.parse()?;
    p.skip_space();
    if p.at != hive.len() {
        return Err(p.error("unexpected text after the type"));
    }
    Ok(t)
}

/// Deepest nesting of a column type.
const MAX_TYPE_DEPTH: u32 = 32;

struct TypeParser<'a> {
    text: &'a str,
    at: usize,
    depth: u32,
}

impl TypeParser<'_> {
    fn error(&self, what: &str) -> String {
        format!("the column type '{}' is invalid: {what}", self.text)
    }

    fn skip_space(&mut self) {
        while self.text[self.at..].starts_with(' ') {
            self.at += 1;
        }
    }

    fn word(&mut self) -> &str {
        self.skip_space();
        let start = self.at;
        let rest = &self.text[start..];
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        self.at += len;
        &self.text[start..start + len]
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        self.skip_space();
        if self.text[self.at..].starts_with(c) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected '{c}' at position {}", self.at)))
        }
    }

    fn peek(&mut self, c: char) -> bool {
        self.skip_space();
        self.text[self.at..].starts_with(c)
    }

    fn number(&mut self) -> Result<u32, String> {
        let word = self.word().to_string();
        word.parse()
            .map_err(|_| self.error(&format!("'{word}' is not a number")))
    }

    /// `(n)` or `(p,s)` after a type name, when present.
    fn arguments(&mut self) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        if self.peek('(') {
            self.expect('(')?;
            out.push(self.number()?);
            while self.peek(',') {
                self.expect(',')?;
                out.push(self.number()?);
            }
            self.expect(')')?;
        }
        Ok(out)
    }

    fn parse(&mut self) -> Result<DataType, String> {
        self.depth += 1;
        if self.depth > MAX_TYPE_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        let name = self.word().to_ascii_lowercase();
        let t = match name.as_str() {
            "string" => DataType::Utf8,
            "varchar" | "char" => {
                self.arguments()?;
                DataType::Utf8
            }
            "boolean" => DataType::Boolean,
            "tinyint" => DataType::Int8,
            "smallint" => DataType::Int16,
            "int" | "integer" => DataType::Int32,
            "bigint" => DataType::Int64,
            "float" => DataType::Float32,
            "double" => DataType::Float64,
            "date" => DataType::Date32,
            "timestamp" => DataType::Timestamp(TimeUnit::Millisecond, None),
            "binary" => DataType::Binary,
            "decimal" => {
                let args = self.arguments()?;
                let (precision, scale) = match args[..] {
                    [] => (10, 0),
                    [p] => (p, 0),
                    [p, s] => (p, s),
                    _ => return Err(self.error("decimal takes a precision and a scale")),
                };
                if !(1..=38).contains(&precision) || scale > precision {
                    return Err(
                        self.error("decimal needs 1 <= precision <= 38 and scale <= precision")
                    );
                }
                DataType::Decimal128(precision as u8, scale as i8)
            }
            "array" => {
                self.expect('<')?;
                let item = self.parse()?;
                self.expect('>')?;
                DataType::List(Arc::new(Field::new("element", item, true)))
            }
            "map" => {
                self.expect('<')?;
                let key = self.parse()?;
                if key != DataType::Utf8 {
                    return Err(self.error("map keys must be strings (JSON object keys)"));
                }
                self.expect(',')?;
                let value = self.parse()?;
                self.expect('>')?;
                let entries = Field::new(
                    "key_value",
                    DataType::Struct(Fields::from(vec![
                        Field::new("key", DataType::Utf8, false),
                        Field::new("value", value, true),
                    ])),
                    false,
                );
                DataType::Map(Arc::new(entries), false)
            }
            "struct" => {
                self.expect('<')?;
                let mut fields = Vec::new();
                loop {
                    let name = self.word().to_ascii_lowercase();
                    if name.is_empty() {
                        return Err(self.error("a struct field needs a name"));
                    }
                    self.expect(':')?;
                    fields.push(Field::new(name, self.parse()?, true));
                    if !self.peek(',') {
                        break;
                    }
                    self.expect(',')?;
                }
                self.expect('>')?;
                DataType::Struct(Fields::from(fields))
            }
            "" => return Err(self.error(&format!("expected a type at position {}", self.at))),
            other => return Err(self.error(&format!("'{other}' is not a type Kinesin converts"))),
        };
        self.depth -= 1;
        Ok(t)
    }
}

/// The Arrow schema of a table's columns (names lower case, as Glue keeps
/// them; every column nullable).
pub fn schema(columns: &[Column]) -> Result<SchemaRef, String> {
    if columns.is_empty() {
        return Err("the table has no columns".into());
    }
    let mut fields = Vec::with_capacity(columns.len());
    for c in columns {
        let name = c.name.to_ascii_lowercase();
        if name.is_empty() {
            return Err("a column needs a name".into());
        }
        if fields.iter().any(|f: &Field| f.name() == &name) {
            return Err(format!("the column '{name}' is named twice"));
        }
        fields.push(Field::new(name, arrow_type(&c.type_name)?, true));
    }
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    arrow_json::ReaderBuilder::new(schema.clone())
        .build_decoder()
        .map_err(|e| format!("the table's columns cannot be read from JSON: {e}"))?;
    Ok(schema)
}

/// The columns of Glue tables by (database, table), lower case as Glue
/// keeps names: what a conversion's SchemaConfiguration names.
pub type GlueTables = BTreeMap<(String, String), Vec<Column>>;

/// Reads Glue table definitions: a JSON array of the objects `aws glue
/// create-table` takes, `{"DatabaseName": …, "TableInput": {"Name": …,
/// "StorageDescriptor": {"Columns": [{"Name": …, "Type": …}, …]}}}` (other
/// members are ignored). Every column type is checked.
pub fn glue_tables(json: &str) -> Result<GlueTables, String> {
    let tables: Vec<Value> =
        serde_json::from_str(json).map_err(|e| format!("not a JSON array of tables: {e}"))?;
    let mut out = GlueTables::new();
    for (i, t) in tables.iter().enumerate() {
        let text = |v: Option<&Value>, what: &str| {
            v.and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_ascii_lowercase)
                .ok_or_else(|| format!("table {i}: {what} is missing"))
        };
        let database = text(t.get("DatabaseName"), "DatabaseName")?;
        let input = t.get("TableInput");
        let table = text(input.and_then(|t| t.get("Name")), "TableInput.Name")?;
        let columns = input
            .and_then(|t| t.pointer("/StorageDescriptor/Columns"))
            .and_then(Value::as_array)
            .ok_or_else(|| {
                format!("table {database}.{table}: StorageDescriptor.Columns is missing")
            })?;
        let mut parsed = Vec::with_capacity(columns.len());
        for c in columns {
            parsed.push(Column {
                name: text(c.get("Name"), "a column's Name")?,
                type_name: text(c.get("Type"), "a column's Type")?,
            });
        }
        schema(&parsed).map_err(|e| format!("table {database}.{table}: {e}"))?;
        if out
            .insert((database.clone(), table.clone()), parsed)
            .is_some()
        {
            return Err(format!("table {database}.{table} is defined twice"));
        }
    }
    Ok(out)
}

/// A record's JSON documents (a record may hold several, `{…}{…}`), each
/// an object, with keys as the deserializer reads them.
fn rows(record: &[u8], input: &Deserializer, columns: &Fields) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for doc in serde_json::Deserializer::from_slice(record).into_iter::<Value>() {
        match doc.map_err(|e| format!("the record is not JSON: {e}"))? {
            Value::Object(map) => out.push(Value::Object(keys(map, input, columns, true))),
            _ => return Err("the record is not a JSON object".into()),
        }
    }
    if out.is_empty() {
        return Err("the record is empty".into());
    }
    Ok(out)
}

/// Renames an object's keys to the fields they fill: OpenX's column
/// mappings (top level only), dots to underscores and lower case; Hive's
/// JSON SerDe matches columns ignoring case. Nested structs are renamed
/// alike; the keys of map columns are data and stay as they are.
fn keys(
    map: Map<String, Value>,
    input: &Deserializer,
    fields: &Fields,
    top: bool,
) -> Map<String, Value> {
    let mut out = Map::with_capacity(map.len());
    for (key, value) in map {
        let name = match input {
            Deserializer::OpenX {
                case_insensitive,
                dots_to_underscores,
                mappings,
            } => {
                let mapped = top
                    .then(|| mappings.iter().find(|(_, json)| **json == key))
                    .flatten();
                match mapped {
                    Some((column, _)) => column.clone(),
                    None => {
                        let key = if *dots_to_underscores {
                            key.replace('.', "_")
                        } else {
                            key
                        };
                        if *case_insensitive {
                            key.to_lowercase()
                        } else {
                            key
                        }
                    }
                }
            }
            Deserializer::Hive { .. } => key.to_lowercase(),
        };
        let value = match fields.find(&name) {
            Some((_, field)) => shape(value, field.data_type(), input),
            None => value,
        };
        out.insert(name, value);
    }
    out
}

/// A value with the keys of the structs in it renamed for their type.
fn shape(value: Value, t: &DataType, input: &Deserializer) -> Value {
    match (value, t) {
        (Value::Object(inner), DataType::Struct(fields)) => {
            Value::Object(keys(inner, input, fields, false))
        }
        (Value::Array(items), DataType::List(item)) => Value::Array(
            items
                .into_iter()
                .map(|v| shape(v, item.data_type(), input))
                .collect(),
        ),
        (Value::Object(entries), DataType::Map(entry, _)) => match entry.data_type() {
            DataType::Struct(kv) if kv.len() == 2 => Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, shape(v, kv[1].data_type(), input)))
                    .collect(),
            ),
            _ => Value::Object(entries),
        },
        (value, _) => value,
    }
}

/// What a batch's records convert to: the Parquet object (none when no
/// record converts), and the index and reason of each record that does not.
pub type Converted = (Option<Vec<u8>>, Vec<(usize, String)>);

/// One Parquet object of the records that convert, and the index and
/// reason of each record that does not (it goes to the error prefix). No
/// object when none converts. Deterministic, so a retried upload writes
/// the same bytes.
pub fn convert(records: &[Vec<u8>], conversion: &Conversion) -> Result<Converted, String> {
    let schema = schema(&conversion.columns)?;
    let mut failed = Vec::new();
    let mut good: Vec<(usize, Vec<Value>)> = Vec::with_capacity(records.len());
    for (i, record) in records.iter().enumerate() {
        match rows(record, &conversion.input, schema.fields()) {
            Ok(rows) => good.push((i, rows)),
            Err(reason) => failed.push((i, reason)),
        }
    }
    let all: Vec<&Value> = good.iter().flat_map(|(_, rows)| rows).collect();
    let batch = match decode(&schema, &all) {
        Ok(batch) => batch,
        Err(_) => {
            // Some record has a value of the wrong type: find which, one
            // record at a time, and convert the others.
            let mut kept = Vec::with_capacity(good.len());
            for (i, rows) in good {
                let rows: Vec<&Value> = rows.iter().collect();
                match decode(&schema, &rows) {
                    Ok(_) => kept.extend(rows.into_iter().cloned()),
                    Err(reason) => failed.push((i, reason)),
                }
            }
            failed.sort_by_key(|(i, _)| *i);
            let kept: Vec<&Value> = kept.iter().collect();
            decode(&schema, &kept)?
        }
    };
    if batch.num_rows() == 0 {
        return Ok((None, failed));
    }
    Ok((Some(write(&schema, &batch, conversion)?), failed))
}

fn decode(schema: &SchemaRef, rows: &[&Value]) -> Result<RecordBatch, String> {
    let mut decoder = arrow_json::ReaderBuilder::new(schema.clone())
        .with_batch_size(rows.len().max(1))
        .build_decoder()
        .map_err(|e| e.to_string())?;
    decoder
        .serialize(rows)
        .map_err(|e| format!("the record does not match the table's columns: {e}"))?;
    Ok(decoder
        .flush()
        .map_err(|e| format!("the record does not match the table's columns: {e}"))?
        .unwrap_or_else(|| RecordBatch::new_empty(schema.clone())))
}

fn write(schema: &SchemaRef, batch: &RecordBatch, c: &Conversion) -> Result<Vec<u8>, String> {
    let o = &c.output;
    let codec = match o.compression {
        ParquetCompression::Uncompressed => Codec::UNCOMPRESSED,
        ParquetCompression::Gzip => Codec::GZIP(GzipLevel::default()),
        ParquetCompression::Snappy => Codec::SNAPPY,
    };
    let properties = WriterProperties::builder()
        .set_created_by("kinesin".to_string())
        .set_compression(codec)
        .set_dictionary_enabled(o.dictionary)
        .set_data_page_size_limit(o.page_size as usize)
        .set_writer_version(if o.writer_v2 {
            WriterVersion::PARQUET_2_0
        } else {
            WriterVersion::PARQUET_1_0
        })
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, schema.clone(), Some(properties))
        .map_err(|e| e.to_string())?;
    writer.write(batch).map_err(|e| e.to_string())?;
    writer.close().map_err(|e| e.to_string())?;
    Ok(out)
}

/// A conversion of the test table (id bigint, name string, …) with OpenX.
#[cfg(test)]
pub(crate) fn tests_conversion() -> Conversion {
    tests::conversion(tests::openx())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type, TimestampMillisecondType};
    use arrow_array::Array;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;
    use crate::model::{ParquetSerDe, SchemaConfig};

    fn column(name: &str, type_name: &str) -> Column {
        Column {
            name: name.into(),
            type_name: type_name.into(),
        }
    }

    pub(super) fn conversion(input: Deserializer) -> Conversion {
        Conversion {
            enabled: true,
            schema: SchemaConfig {
                role_arn: "arn:aws:iam::000000000000:role/r".into(),
                catalog_id: None,
                database: "db".into(),
                table: "t".into(),
                region: None,
                version_id: "LATEST".into(),
            },
            columns: vec![
                column("id", "bigint"),
                column("name", "string"),
                column("ts", "timestamp"),
                column("tags", "array<string>"),
                column("geo", "struct<lat:double,lon:double>"),
                column("n", "int"),
            ],
            input,
            output: ParquetSerDe {
                block_size: 256 << 20,
                page_size: 1 << 20,
                compression: ParquetCompression::Snappy,
                dictionary: false,
                max_padding: 0,
                writer_v2: false,
            },
        }
    }

    pub(super) fn openx() -> Deserializer {
        Deserializer::OpenX {
            case_insensitive: true,
            dots_to_underscores: false,
            mappings: BTreeMap::from([("name".to_string(), "user name".to_string())]),
        }
    }

    #[test]
    fn hive_types_become_arrow_types() {
        assert_eq!(arrow_type("bigint").unwrap(), DataType::Int64);
        assert_eq!(arrow_type("VARCHAR(20)").unwrap(), DataType::Utf8);
        assert_eq!(
            arrow_type("decimal(12, 2)").unwrap(),
            DataType::Decimal128(12, 2)
        );
        let nested = arrow_type("struct<a:array<int>, b:map<string,double>>").unwrap();
        let DataType::Struct(fields) = nested else {
            panic!("{nested:?}")
        };
        assert_eq!(fields.len(), 2);
        assert!(matches!(fields[0].data_type(), DataType::List(_)));
        assert!(matches!(fields[1].data_type(), DataType::Map(_, _)));
        for bad in [
            "",
            "uuid",
            "array<int",
            "int extra",
            "map<int,string>",
            "decimal(40,2)",
            "struct<>",
            &"array<".repeat(100),
        ] {
            assert!(arrow_type(bad).is_err(), "{bad:?}");
        }
        assert!(schema(&[column("a", "int"), column("A", "string")]).is_err());
        assert!(schema(&[]).is_err());
    }

    #[test]
    fn records_convert_to_parquet_and_the_rest_are_reported() {
        let records: Vec<Vec<u8>> = [
            r#"{"ID": 1, "user name": "ann", "ts": "2026-12-01T13:04:05.678Z", "tags": ["a","b"], "geo": {"Lat": 1.5, "lon": 2.5}, "extra": true}"#,
            r#"{"id": 2, "ts": 1796130245678}{"id": 3, "n": "7"}"#,
            "not json",
            r#"{"id": 4, "n": "seven"}"#,
            "[1, 2]",
        ]
        .map(|r| r.as_bytes().to_vec())
        .to_vec();
        let c = conversion(openx());
        let (body, failed) = convert(&records, &c).unwrap();
        let body = body.expect("some records convert");
        assert_eq!(
            convert(&records, &c).unwrap().0.unwrap(),
            body,
            "deterministic"
        );
        let failed: Vec<usize> = failed.iter().map(|(i, _)| *i).collect();
        assert_eq!(failed, [2, 3, 4]);

        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(body))
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        let batch = arrow_select_concat(&batches);
        assert_eq!(batch.num_rows(), 3);
        let ids: Vec<i64> = batch
            .column_by_name("id")
            .unwrap()
            .as_primitive::<Int64Type>()
            .values()
            .to_vec();
        assert_eq!(ids, [1, 2, 3]);
        let names = batch.column_by_name("name").unwrap().as_string::<i32>();
        assert_eq!(names.value(0), "ann", "mapped from 'user name'");
        assert!(names.is_null(1));
        let ts = batch
            .column_by_name("ts")
            .unwrap()
            .as_primitive::<TimestampMillisecondType>();
        assert_eq!(ts.value(0), 1_796_130_245_678);
        assert_eq!(ts.value(1), 1_796_130_245_678);
        let n = batch
            .column_by_name("n")
            .unwrap()
            .as_primitive::<Int32Type>();
        assert_eq!(n.value(2), 7, "numeric text converts");
        let geo = batch.column_by_name("geo").unwrap().as_struct();
        assert_eq!(
            geo.column_by_name("lat")
                .unwrap()
                .as_primitive::<arrow_array::types::Float64Type>()
                .value(0),
            1.5,
            "nested keys are matched ignoring case"
        );
    }

    #[test]
    fn case_matters_when_openx_says_so() {
        let c = conversion(Deserializer::OpenX {
            case_insensitive: false,
            dots_to_underscores: true,
            mappings: BTreeMap::new(),
        });
        let records = vec![br#"{"ID": 1, "n.x": 2, "id": 5}"#.to_vec()];
        let (body, failed) = convert(&records, &c).unwrap();
        assert!(failed.is_empty());
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(body.unwrap()))
            .unwrap()
            .build()
            .unwrap();
        let batch = reader.map(Result::unwrap).next().unwrap();
        let id = batch.column_by_name("id").unwrap();
        assert_eq!(id.as_primitive::<Int64Type>().value(0), 5);
        let (none, failed) = convert(&[b"{".to_vec()], &c).unwrap();
        assert!(none.is_none(), "no object when nothing converts");
        assert_eq!(failed.len(), 1);
    }

    #[test]
    fn glue_tables_read_as_create_table_takes_them() {
        let tables = glue_tables(
            r#"[{"DatabaseName": "Analytics", "TableInput": {"Name": "events",
                "StorageDescriptor": {"Columns": [{"Name": "Id", "Type": "bigint"}]}}}]"#,
        )
        .unwrap();
        let columns = &tables[&("analytics".to_string(), "events".to_string())];
        assert_eq!(columns, &[column("id", "bigint")]);
        for bad in [
            "{}",
            r#"[{"TableInput": {"Name": "t", "StorageDescriptor": {"Columns": []}}}]"#,
            r#"[{"DatabaseName": "d", "TableInput": {"Name": "t"}}]"#,
            r#"[{"DatabaseName": "d", "TableInput": {"Name": "t", "StorageDescriptor": {"Columns": [{"Name": "a", "Type": "uuid"}]}}}]"#,
        ] {
            assert!(glue_tables(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn map_keys_are_data_and_struct_keys_are_names() {
        let mut c = conversion(openx());
        c.columns = vec![
            column("id", "bigint"),
            column("attrs", "map<string,struct<Val:int>>"),
        ];
        let records = vec![br#"{"ID": 1, "attrs": {"Color.Name": {"VAL": 2}}}"#.to_vec()];
        let (body, failed) = convert(&records, &c).unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(body.unwrap()))
            .unwrap()
            .build()
            .unwrap();
        let batch = reader.map(Result::unwrap).next().unwrap();
        let attrs = batch.column_by_name("attrs").unwrap().as_map();
        let keys = attrs.keys().as_string::<i32>();
        assert_eq!(keys.value(0), "Color.Name", "map keys are kept");
        let values = attrs.values().as_struct();
        let val = values.column(0).as_primitive::<Int32Type>();
        assert_eq!(
            val.value(0),
            2,
            "struct keys in map values match ignoring case"
        );
    }

    fn arrow_select_concat(batches: &[RecordBatch]) -> RecordBatch {
        assert_eq!(batches.len(), 1, "one row group for a small batch");
        batches[0].clone()
    }
}
