//! Change events as Kafka records: the Avro key (the primary key) and the
//! Debezium-compatible value envelope, per source table.
//!
//! A change of primary key becomes a delete of the old key and a create of
//! the new one; every delete is followed by a tombstone (the key with a null
//! value) so log compaction can drop the key, as Debezium does.

use super::avro::AvroType;
use crate::model::{Cell, Change, ChangeEvent, Key, Row};
use crate::spec::TableName;
use apache_avro::types::Value;
use serde_json::{json, Value as Json};

/// Identifies rowshift in `source.connector` / `source.version`.
pub const CONNECTOR: &str = "rowshift-postgresql";

/// The Avro shape of one source table's change events.
#[derive(Debug, Clone)]
pub struct TableSchema {
    pub topic: String,
    /// Logical server name (`source.name`): the pipeline.
    pub name: String,
    pub db: String,
    pub table: TableName,
    pub columns: Vec<(String, AvroType)>,
    pub key: Vec<usize>,
}

/// One Kafka record: key bytes' Avro value and an optional value (`None`: tombstone).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub key: Value,
    pub value: Option<Value>,
}

/// A column as the schema needs it: name, `format_type`, enum or not.
pub struct ColumnType<'a> {
    pub name: &'a str,
    pub sql_type: &'a str,
    pub is_enum: bool,
}

impl TableSchema {
    /// Refuses (listing every column) when a type has no Avro mapping.
    pub fn new(
        topic: &str,
        name: &str,
        db: &str,
        table: &TableName,
        columns: &[ColumnType<'_>],
        key: Vec<usize>,
    ) -> Result<TableSchema, Vec<String>> {
        let mut out = Vec::new();
        let mut problems = Vec::new();
        for c in columns {
            match AvroType::of(c.sql_type, c.is_enum) {
                Some(t) => out.push((c.name.to_string(), t)),
                None => problems.push(format!(
                    "column {} has type {}, which the kafka transport cannot encode as Avro",
                    c.name, c.sql_type
                )),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(TableSchema {
            topic: topic.to_string(),
            name: name.to_string(),
            db: db.to_string(),
            table: table.clone(),
            columns: out,
            key,
        })
    }

    /// This schema with `added` columns appended (refused like `new`).
    pub fn with_columns(&self, added: &[ColumnType<'_>]) -> Result<TableSchema, Vec<String>> {
        let extra = TableSchema::new(
            &self.topic,
            &self.name,
            &self.db,
            &self.table,
            added,
            Vec::new(),
        )?;
        let mut out = self.clone();
        out.columns.extend(extra.columns);
        Ok(out)
    }

    fn namespace(&self) -> String {
        self.topic
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// `<topic>-key`: the primary key columns (never null).
    pub fn key_schema(&self) -> Json {
        let fields: Vec<Json> = self
            .key
            .iter()
            .map(|&i| json!({"name": self.columns[i].0, "type": self.columns[i].1.schema()}))
            .collect();
        json!({"type": "record", "name": "Key", "namespace": self.namespace(), "fields": fields})
    }

    /// `<topic>-value`: the envelope.
    pub fn value_schema(&self) -> Json {
        let ns = self.namespace();
        let fields: Vec<Json> = self
            .columns
            .iter()
            .map(|(n, t)| json!({"name": n, "type": ["null", t.schema()], "default": null}))
            .collect();
        json!({
            "type": "record", "name": "Envelope", "namespace": ns,
            "connect.name": format!("{ns}.Envelope"),
            "fields": [
                {"name": "before", "type": ["null", {"type": "record", "name": "Value", "fields": fields}], "default": null},
                {"name": "after", "type": ["null", "Value"], "default": null},
                {"name": "source", "type": {"type": "record", "name": "Source", "namespace": "io.rowshift", "fields": [
                    {"name": "version", "type": "string"},
                    {"name": "connector", "type": "string"},
                    {"name": "name", "type": "string"},
                    {"name": "ts_ms", "type": "long"},
                    {"name": "db", "type": "string"},
                    {"name": "schema", "type": "string"},
                    {"name": "table", "type": "string"},
                    {"name": "txId", "type": ["null", "long"], "default": null},
                    {"name": "lsn", "type": ["null", "long"], "default": null}
                ]}},
                {"name": "op", "type": "string"},
                {"name": "ts_ms", "type": ["null", "long"], "default": null},
                {"name": "unavailable", "type": {"type": "array", "items": "string"}, "default": []}
            ]
        })
    }

    /// Each key column's name, type and value in `key` (none may be NULL).
    pub(super) fn key_texts<'a>(
        &'a self,
        key: &'a Key,
    ) -> impl Iterator<Item = Result<(&'a str, &'a AvroType, &'a str), String>> + 'a {
        self.key.iter().enumerate().map(move |(i, &pos)| {
            let (name, t) = &self.columns[pos];
            key.0
                .get(i)
                .and_then(|v| v.as_deref())
                .map(|text| (name.as_str(), t, text))
                .ok_or_else(|| format!("key column {name} is NULL"))
        })
    }

    fn key_value(&self, key: &Key) -> Result<Value, String> {
        let mut fields = Vec::new();
        for k in self.key_texts(key) {
            let (name, t, text) = k?;
            fields.push((name.to_string(), t.value(text)?));
        }
        Ok(Value::Record(fields))
    }

    /// The `Value` record of a row, and the columns it did not carry.
    fn row_value(&self, row: &Row) -> Result<(Value, Vec<Value>), String> {
        let mut fields = Vec::new();
        let mut unavailable = Vec::new();
        for (i, (name, t)) in self.columns.iter().enumerate() {
            let v = match row.cells.get(i) {
                Some(Cell::Present(Some(text))) => Value::Union(1, Box::new(t.value(text)?)),
                Some(Cell::Present(None)) => Value::Union(0, Box::new(Value::Null)),
                Some(Cell::Absent) | None => {
                    unavailable.push(Value::String(name.clone()));
                    Value::Union(0, Box::new(Value::Null))
                }
            };
            fields.push((name.clone(), v));
        }
        Ok((Value::Record(fields), unavailable))
    }

    /// A `before` image holding only the key (deletes carry no more).
    fn key_row_value(&self, key: &Key) -> Result<Value, String> {
        let mut cells = vec![Cell::Present(None); self.columns.len()];
        for (i, &pos) in self.key.iter().enumerate() {
            cells[pos] = Cell::Present(key.0.get(i).cloned().flatten());
        }
        Ok(self.row_value(&Row { cells })?.0)
    }

    fn envelope(
        &self,
        op: &str,
        before: Option<Value>,
        after: Option<Value>,
        unavailable: Vec<Value>,
        e: &ChangeEvent,
        now_ms: i64,
    ) -> Value {
        let opt = |v: Option<Value>| match v {
            Some(v) => Value::Union(1, Box::new(v)),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        Value::Record(vec![
            ("before".into(), opt(before)),
            ("after".into(), opt(after)),
            (
                "source".into(),
                Value::Record(vec![
                    (
                        "version".into(),
                        Value::String(env!("CARGO_PKG_VERSION").into()),
                    ),
                    ("connector".into(), Value::String(CONNECTOR.into())),
                    ("name".into(), Value::String(self.name.clone())),
                    ("ts_ms".into(), Value::Long(e.commit_ts_us / 1000)),
                    ("db".into(), Value::String(self.db.clone())),
                    ("schema".into(), Value::String(self.table.schema.clone())),
                    ("table".into(), Value::String(self.table.name.clone())),
                    (
                        "txId".into(),
                        match e.xid {
                            0 => Value::Union(0, Box::new(Value::Null)),
                            xid => Value::Union(1, Box::new(Value::Long(xid as i64))),
                        },
                    ),
                    (
                        "lsn".into(),
                        Value::Union(1, Box::new(Value::Long(e.commit_lsn.0 as i64))),
                    ),
                ]),
            ),
            ("op".into(), Value::String(op.into())),
            (
                "ts_ms".into(),
                Value::Union(1, Box::new(Value::Long(now_ms))),
            ),
            ("unavailable".into(), Value::Array(unavailable)),
        ])
    }

    /// The records of one change event (`snapshot`: a backfill read, op `r`).
    pub fn records(
        &self,
        e: &ChangeEvent,
        snapshot: bool,
        now_ms: i64,
    ) -> Result<Vec<Record>, String> {
        let row_key = |row: &Row| {
            row.key(&self.key)
                .ok_or_else(|| "a row arrived without its key columns".to_string())
        };
        let delete = |key: &Key| -> Result<Vec<Record>, String> {
            let k = self.key_value(key)?;
            let before = self.key_row_value(key)?;
            Ok(vec![
                Record {
                    key: k.clone(),
                    value: Some(self.envelope("d", Some(before), None, Vec::new(), e, now_ms)),
                },
                Record {
                    key: k,
                    value: None,
                },
            ])
        };
        Ok(match &e.change {
            Change::Insert { new } => {
                let (after, unavailable) = self.row_value(new)?;
                let op = if snapshot { "r" } else { "c" };
                vec![Record {
                    key: self.key_value(&row_key(new)?)?,
                    value: Some(self.envelope(op, None, Some(after), unavailable, e, now_ms)),
                }]
            }
            Change::Update { old_key, new } => {
                let mut out = Vec::new();
                let op = if let Some(old) = old_key {
                    out.extend(delete(old)?);
                    "c"
                } else {
                    "u"
                };
                let (after, unavailable) = self.row_value(new)?;
                out.push(Record {
                    key: self.key_value(&row_key(new)?)?,
                    value: Some(self.envelope(op, None, Some(after), unavailable, e, now_ms)),
                });
                out
            }
            Change::Delete { key } => delete(key)?,
            Change::Truncate => Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Lsn;
    use apache_avro::{from_avro_datum, to_avro_datum, Schema};

    fn schema() -> TableSchema {
        let cols = [
            ColumnType {
                name: "id",
                sql_type: "bigint",
                is_enum: false,
            },
            ColumnType {
                name: "body",
                sql_type: "text",
                is_enum: false,
            },
            ColumnType {
                name: "price",
                sql_type: "numeric(10,2)",
                is_enum: false,
            },
        ];
        TableSchema::new(
            "rs.public.items",
            "p",
            "db",
            &TableName::parse("public.items").unwrap(),
            &cols,
            vec![0],
        )
        .unwrap()
    }

    fn event(change: Change) -> ChangeEvent {
        ChangeEvent {
            change,
            commit_lsn: Lsn(99),
            commit_ts_us: 5_000,
            xid: 0,
        }
    }

    #[test]
    fn every_kind_of_change_encodes_against_the_schemas() {
        let s = schema();
        let key_schema = Schema::parse(&s.key_schema()).unwrap();
        let value_schema = Schema::parse(&s.value_schema()).unwrap();
        let row = |id: &str, body: Cell| Row {
            cells: vec![
                Cell::Present(Some(id.into())),
                body,
                Cell::Present(Some("1.50".into())),
            ],
        };
        let cases = [
            (
                event(Change::Insert {
                    new: row("1", Cell::Present(Some("x".into()))),
                }),
                vec!["c"],
            ),
            (
                event(Change::Update {
                    old_key: None,
                    new: row("1", Cell::Absent),
                }),
                vec!["u"],
            ),
            (
                event(Change::Update {
                    old_key: Some(Key(vec![Some("1".into())])),
                    new: row("2", Cell::Present(None)),
                }),
                vec!["d", "tombstone", "c"],
            ),
            (
                event(Change::Delete {
                    key: Key(vec![Some("2".into())]),
                }),
                vec!["d", "tombstone"],
            ),
        ];
        for (e, ops) in cases {
            let records = s.records(&e, false, 7).unwrap();
            let got: Vec<String> = records
                .iter()
                .map(|r| {
                    to_avro_datum(&key_schema, r.key.clone()).unwrap();
                    match &r.value {
                        None => "tombstone".to_string(),
                        Some(v) => {
                            let bytes = to_avro_datum(&value_schema, v.clone()).unwrap();
                            let back = from_avro_datum(&value_schema, &mut bytes.as_slice(), None)
                                .unwrap();
                            let Value::Record(fields) = back else {
                                panic!("record")
                            };
                            match &fields[3].1 {
                                Value::String(op) => op.clone(),
                                other => panic!("{other:?}"),
                            }
                        }
                    }
                })
                .collect();
            assert_eq!(got, ops);
        }
        // The partial update names the column it did not carry.
        let partial = s
            .records(
                &event(Change::Update {
                    old_key: None,
                    new: row("1", Cell::Absent),
                }),
                false,
                7,
            )
            .unwrap();
        let Some(Value::Record(fields)) = &partial[0].value else {
            panic!()
        };
        assert_eq!(
            fields[5].1,
            Value::Array(vec![Value::String("body".into())])
        );
    }

    #[test]
    fn unsupported_types_are_listed() {
        let cols = [
            ColumnType {
                name: "a",
                sql_type: "point",
                is_enum: false,
            },
            ColumnType {
                name: "b",
                sql_type: "tsvector",
                is_enum: false,
            },
        ];
        let err = TableSchema::new(
            "t",
            "p",
            "db",
            &TableName::parse("t").unwrap(),
            &cols,
            vec![0],
        )
        .unwrap_err();
        assert_eq!(err.len(), 2);
    }
}
