//! Dynamic partitioning: the `MetadataExtraction` processor's jq query
//! (run by jaq) turns each JSON record into its partition keys, which the
//! prefix names with `!{partitionKeyFromQuery:<key>}`.

use std::collections::BTreeMap;

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{data, unwrap_valr, Compiler, Ctx, Vars};
use jaq_json::Val;

/// A record's partition keys, or why it has none.
pub type Keys = Result<BTreeMap<String, String>, String>;

/// Runs `f` with the compiled query.
fn with_query<T>(
    query: &str,
    f: impl FnOnce(&jaq_core::compile::Filter<jaq_core::Native<data::JustLut<Val>>>) -> T,
) -> Result<T, String> {
    let defs = jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs());
    let funs = jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs());
    let loader = Loader::new(defs);
    let arena = Arena::default();
    let modules = loader
        .load(
            &arena,
            File {
                code: query,
                path: (),
            },
        )
        .map_err(|e| format!("the query '{query}' does not parse: {e:?}"))?;
    let filter = Compiler::default()
        .with_funs(funs)
        .compile(modules)
        .map_err(|e| format!("the query '{query}' does not compile: {e:?}"))?;
    Ok(f(&filter))
}

/// Whether a MetadataExtractionQuery compiles.
pub fn check_query(query: &str) -> Result<(), String> {
    with_query(query, |_| ())
}

/// Each record's partition keys: the query's first output must be an
/// object; strings are taken as they are, other values as JSON text.
pub fn partition_keys(query: &str, records: &[Vec<u8>]) -> Result<Vec<Keys>, String> {
    with_query(query, |filter| {
        records
            .iter()
            .map(|record| {
                let input = jaq_json::read::parse_single(record)
                    .map_err(|e| format!("the record is not JSON: {e}"))?;
                let ctx = Ctx::<data::JustLut<Val>>::new(&filter.lut, Vars::new([]));
                let first = filter
                    .id
                    .run((ctx, input))
                    .map(unwrap_valr)
                    .next()
                    .ok_or_else(|| "the query gave no value".to_string())?
                    .map_err(|e| format!("the query failed: {e}"))?;
                let object: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(&first.to_string())
                        .map_err(|_| format!("the query gave {first}, not an object"))?;
                Ok(object
                    .into_iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => (k, s),
                        other => (k, other.to_string()),
                    })
                    .collect())
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_get_their_keys_or_a_reason() {
        let records: Vec<Vec<u8>> = [
            r#"{"customer": "a", "n": 1}"#,
            r#"{"customer": "b", "n": 2}"#,
            "not json",
            r#"{"n": 3}"#,
        ]
        .iter()
        .map(|r| r.as_bytes().to_vec())
        .collect();
        let keys = partition_keys("{customer: .customer, n: .n}", &records).unwrap();
        assert_eq!(keys[0].as_ref().unwrap()["customer"], "a");
        assert_eq!(keys[1].as_ref().unwrap()["n"], "2");
        assert!(keys[2].is_err());
        assert_eq!(keys[3].as_ref().unwrap()["customer"], "null");
        assert!(partition_keys(".customer", &records[..1]).unwrap()[0].is_err());
        assert!(check_query("{a: .a").is_err());
        assert!(check_query("{day: .ts | strftime(\"%Y-%m-%d\")}").is_ok());
    }
}
