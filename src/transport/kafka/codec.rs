//! Encoding records in the Confluent wire format (magic byte 0, 4-byte
//! schema id, Avro datum). `schema_registry_converter` registers the key and
//! value schemas of a table under `<topic>-key` and `<topic>-value` on first
//! use and gives their ids. The producer writes its records with
//! [`super::frame`]; [`Encoder::encode`] frames a [`Record`] built as
//! values, written by [`super::wire`] (tools and tests use it).

use super::envelope::{Record, TableSchema};
use super::frame::Ids;
use super::wire;
use crate::error::{Error, Result};
use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::AvroEncoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use tokio::sync::OnceCell;

/// Encodes one table's records.
pub struct Encoder {
    inner: AvroEncoder<'static>,
    key: SubjectNameStrategy,
    value: SubjectNameStrategy,
    /// The registered ids of the key and value schemas, once known.
    key_id: OnceCell<u32>,
    value_id: OnceCell<u32>,
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
            key_id: OnceCell::new(),
            value_id: OnceCell::new(),
        }
    }

    /// The id `strategy`'s schema is registered under (registering it on
    /// first use).
    async fn id(&self, cell: &OnceCell<u32>, strategy: &SubjectNameStrategy) -> Result<u32> {
        cell.get_or_try_init(|| async {
            let subject = strategy
                .get_subject()
                .map_err(|e| Error::Replication(format!("schema subject: {e}")))?;
            self.inner
                .get_schema_and_id(&subject, strategy.clone())
                .await
                .map(|s| s.id)
                .map_err(|e| Error::Replication(format!("register schema {subject}: {e}")))
        })
        .await
        .copied()
    }

    /// The ids the key and value schemas are registered under (registering
    /// them on first use).
    pub async fn ids(&self) -> Result<Ids> {
        Ok(Ids {
            key: self.id(&self.key_id, &self.key).await?,
            value: self.id(&self.value_id, &self.value).await?,
        })
    }

    /// Key bytes and value bytes (`None`: a tombstone).
    pub async fn encode(&self, record: &Record) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
        let key_id = self.id(&self.key_id, &self.key).await?;
        let key = framed(key_id, &record.key, 32)
            .map_err(|e| Error::Replication(format!("encode key: {e}")))?;
        let value = match &record.value {
            None => None,
            Some(v) => {
                let id = self.id(&self.value_id, &self.value).await?;
                Some(
                    framed(id, v, 256)
                        .map_err(|e| Error::Replication(format!("encode value: {e}")))?,
                )
            }
        };
        Ok((key, value))
    }
}

/// The Confluent frame: magic byte 0, the schema id (big-endian), the datum.
fn framed(id: u32, value: &Value, capacity: usize) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(capacity);
    out.push(0);
    out.extend_from_slice(&id.to_be_bytes());
    wire::encode(value, &mut out)?;
    Ok(out)
}
