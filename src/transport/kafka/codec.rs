//! Encoding records in the Confluent wire format (magic byte 0, 4-byte
//! schema id, Avro datum) with `schema_registry_converter`: the key and
//! value schemas of a table are registered under `<topic>-key` and
//! `<topic>-value` on first use.

use super::envelope::{Record, TableSchema};
use crate::error::{Error, Result};
use schema_registry_converter::async_impl::avro::AvroEncoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};

/// Encodes one table's records.
pub struct Encoder {
    inner: AvroEncoder<'static>,
    key: SubjectNameStrategy,
    value: SubjectNameStrategy,
}

fn supplied(name: String, schema: &serde_json::Value) -> SuppliedSchema {
    SuppliedSchema {
        name: Some(name),
        schema_type: SchemaType::Avro,
        schema: schema.to_string(),
        references: Vec::new(),
        properties: None,
        tags: None,
    }
}

impl Encoder {
    pub fn new(registry_url: &str, table: &TableSchema) -> Encoder {
        let ns = table
            .topic
            .replace(|c: char| !(c.is_ascii_alphanumeric() || c == '.'), "_");
        Encoder {
            inner: AvroEncoder::new(SrSettings::new(registry_url.to_string())),
            key: SubjectNameStrategy::TopicNameStrategyWithSchema(
                table.topic.clone(),
                true,
                supplied(format!("{ns}.Key"), &table.key_schema()),
            ),
            value: SubjectNameStrategy::TopicNameStrategyWithSchema(
                table.topic.clone(),
                false,
                supplied(format!("{ns}.Envelope"), &table.value_schema()),
            ),
        }
    }

    /// Key bytes and value bytes (`None`: a tombstone).
    pub async fn encode(&self, record: &Record) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
        let key = self
            .inner
            .encode_value(record.key.clone(), &self.key)
            .await
            .map_err(|e| Error::Replication(format!("encode key: {e}")))?;
        let value = match &record.value {
            None => None,
            Some(v) => Some(
                self.inner
                    .encode_value(v.clone(), &self.value)
                    .await
                    .map_err(|e| Error::Replication(format!("encode value: {e}")))?,
            ),
        };
        Ok((key, value))
    }
}
