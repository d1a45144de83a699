//! The metadata JSON of mongodump's prelude: canonical Extended JSON v2 as mongo-tools writes
//! it (`bson.MarshalExtJSON(meta, canonical, no HTML escaping)`), documents in their key order.
//! Key order matters: an index `{b: 1, a: -1}` is not the index `{a: -1, b: 1}`. So documents
//! and arrays are walked here, and only single values go through bson's canonical form
//! (serde_json sorts object keys, which is harmless inside a value like `$binary`).

use bson::{Bson, RawBsonRef, RawDocument, RawDocumentBuf};

use bk_core::error::{Error, Result};

/// One value as canonical Extended JSON, appended to `out`.
fn write_value(out: &mut String, value: RawBsonRef) -> Result<()> {
    let elements = |out: &mut String, (key, value): (Option<&str>, RawBsonRef)| -> Result<()> {
        if let Some(key) = key {
            out.push_str(&serde_json::Value::from(key).to_string());
            out.push(':');
        }
        write_value(out, value)
    };
    let malformed = |e: bson::error::Error| Error::data(format!("a malformed document from the server: {e}"));
    match value {
        RawBsonRef::Document(doc) => {
            out.push('{');
            for (i, element) in doc.iter().enumerate() {
                let (key, value) = element.map_err(malformed)?;
                if i > 0 {
                    out.push(',');
                }
                elements(out, (Some(key.as_str()), value))?;
            }
            out.push('}');
        }
        RawBsonRef::Array(array) => {
            out.push('[');
            for (i, value) in array.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                elements(out, (None, value.map_err(malformed)?))?;
            }
            out.push(']');
        }
        other => {
            let value = Bson::try_from(other).map_err(malformed)?;
            out.push_str(&value.into_canonical_extjson().to_string());
        }
    }
    Ok(())
}

/// What mongodump writes for a collection or view (mongodump/metadata_dump.go `Metadata`):
/// `options` (omitted when empty), `indexes` (listIndexes' documents whole, `[]` for a view),
/// `uuid` (hex, only for a UUID), `collectionName`, `type` (omitted when empty).
pub fn metadata(
    options: Option<&RawDocument>,
    indexes: &[RawDocumentBuf],
    uuid: Option<&[u8]>,
    collection: &str,
    kind: &str,
) -> Result<String> {
    let mut out = String::from("{");
    if let Some(options) = options.filter(|o| !o.is_empty()) {
        out.push_str("\"options\":");
        write_value(&mut out, RawBsonRef::Document(options))?;
        out.push(',');
    }
    out.push_str("\"indexes\":[");
    for (i, index) in indexes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_value(&mut out, RawBsonRef::Document(index))?;
    }
    out.push(']');
    if let Some(uuid) = uuid {
        let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
        out.push_str(&format!(",\"uuid\":\"{hex}\""));
    }
    let string = |s: &str| serde_json::Value::from(s).to_string();
    out.push_str(&format!(",\"collectionName\":{}", string(collection)));
    if !kind.is_empty() {
        out.push_str(&format!(",\"type\":{}", string(kind)));
    }
    out.push('}');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::rawdoc;

    /// The metadata of the design note's worked example (mongo-probes/archive_example_make.py).
    #[test]
    fn writes_mongodumps_metadata() {
        let indexes = [
            rawdoc! {"v": 2, "key": {"_id": 1}, "name": "_id_"},
            rawdoc! {"v": 2, "key": {"sku": 1}, "name": "sku_1"},
        ];
        let uuid = [
            0x06, 0x79, 0xdb, 0x72, 0x0f, 0x49, 0x44, 0xde, 0x90, 0xae, 0x27, 0x47, 0x26, 0x64, 0xe9, 0x4a,
        ];
        let json = metadata(Some(&rawdoc! {}), &indexes, Some(&uuid), "items", "collection").unwrap();
        assert_eq!(
            json,
            r#"{"indexes":[{"v":{"$numberInt":"2"},"key":{"_id":{"$numberInt":"1"}},"name":"_id_"},{"v":{"$numberInt":"2"},"key":{"sku":{"$numberInt":"1"}},"name":"sku_1"}],"uuid":"0679db720f4944de90ae27472664e94a","collectionName":"items","type":"collection"}"#
        );
    }

    /// A compound key keeps its order; typed values keep their types; a view has no indexes.
    #[test]
    fn keeps_key_order_and_types() {
        let index = rawdoc! {
            "v": 2, "key": {"b": 1, "a": -1i64}, "name": "b_1_a_-1",
            "partialFilterExpression": {"at": {"$gt": bson::DateTime::from_millis(-1)},
                                        "id": bson::oid::ObjectId::from_bytes([1; 12]), "r": 0.5},
        };
        let json = metadata(None, &[index], None, "c", "").unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"indexes":[{"v":{"$numberInt":"2"},"key":{"b":{"$numberInt":"1"},"a":{"$numberLong":"-1"}},"#,
                r#""name":"b_1_a_-1","partialFilterExpression":{"at":{"$gt":{"$date":{"$numberLong":"-1"}}},"#,
                r#""id":{"$oid":"010101010101010101010101"},"r":{"$numberDouble":"0.5"}}}],"collectionName":"c"}"#
            )
        );
        let view = rawdoc! {"viewOn": "c", "pipeline": [{"$match": {"x": "<&>\"é"}}]};
        let json = metadata(Some(&view), &[], None, "v", "view").unwrap();
        assert_eq!(
            json,
            r#"{"options":{"viewOn":"c","pipeline":[{"$match":{"x":"<&>\"é"}}]},"indexes":[],"collectionName":"v","type":"view"}"#
        );
    }
}
