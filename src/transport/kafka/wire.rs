//! Avro binary encoding of the values rowshift builds, without the schema.
//!
//! `apache_avro`'s encoders resolve the schema's named types into a map on
//! every call, and validate the value first (resolving it again): with a
//! key and a value per change, that was the largest share of the producer's
//! own CPU. The values rowshift builds (see [`super::avro`] and
//! [`super::envelope`]) need no schema to encode: records list their fields
//! in the schema's order, unions carry their branch, decimals are
//! `bytes`-based and uuids `string`-based. So this writes them directly.
//! The schema is still what the registry holds and what readers use; the
//! tests check the bytes are those `apache_avro::to_avro_datum` writes for
//! every kind of value.

use apache_avro::types::Value;

/// Appends `value`'s Avro binary encoding to `out`.
pub fn encode(value: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    match value {
        Value::Null => {}
        Value::Boolean(b) => out.push(u8::from(*b)),
        Value::Int(i) | Value::Date(i) => long(i64::from(*i), out),
        Value::Long(i)
        | Value::TimestampMicros(i)
        | Value::LocalTimestampMicros(i)
        | Value::TimeMicros(i) => long(*i, out),
        Value::Float(f) => out.extend_from_slice(&f.to_le_bytes()),
        Value::Double(d) => out.extend_from_slice(&d.to_le_bytes()),
        Value::Bytes(b) => bytes(b, out),
        Value::String(s) => bytes(s.as_bytes(), out),
        Value::Uuid(u) => bytes(u.hyphenated().to_string().as_bytes(), out),
        Value::Decimal(d) => {
            let b = Vec::<u8>::try_from(d).map_err(|e| format!("decimal: {e}"))?;
            bytes(&b, out)
        }
        Value::Union(branch, v) => {
            long(i64::from(*branch), out);
            encode(v, out)?;
        }
        Value::Record(fields) => {
            for (_, v) in fields {
                encode(v, out)?;
            }
        }
        Value::Array(items) => {
            if !items.is_empty() {
                long(items.len() as i64, out);
                for v in items {
                    encode(v, out)?;
                }
            }
            out.push(0);
        }
        other => return Err(format!("no schema-free encoding for {other:?}")),
    }
    Ok(())
}

pub fn bytes(b: &[u8], out: &mut Vec<u8>) {
    long(b.len() as i64, out);
    out.extend_from_slice(b);
}

/// Zig-zag, then a base-128 varint.
pub fn long(i: i64, out: &mut Vec<u8>) {
    let mut z = ((i << 1) ^ (i >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Cell, Change, ChangeEvent, Key, Lsn, Row};
    use crate::spec::TableName;
    use crate::transport::kafka::envelope::{ColumnType, TableSchema};
    use crate::transport::kafka::frame::{Frames, Ids};
    use apache_avro::{to_avro_datum, Schema};

    fn same_as_apache(schema: &Schema, value: &Value) {
        let want = to_avro_datum(schema, value.clone()).expect("apache_avro encodes it");
        let mut got = Vec::new();
        encode(value, &mut got).expect("encodes");
        assert_eq!(got, want, "{value:?}");
    }

    #[test]
    fn longs_match_the_spec() {
        let schema = Schema::Long;
        for i in [0, 1, -1, 63, -64, 64, 8191, -8193, i64::MAX, i64::MIN] {
            same_as_apache(&schema, &Value::Long(i));
        }
    }

    /// Every column type rowshift maps, in records of each kind of change,
    /// encodes to the bytes `apache_avro` writes for the registered schema.
    #[test]
    fn envelope_records_match_apache_avro() {
        let cols: Vec<(&str, &str)> = vec![
            ("id", "bigint"),
            ("n", "integer"),
            ("flag", "boolean"),
            ("r", "real"),
            ("d", "double precision"),
            ("amount", "numeric(12,2)"),
            ("big", "numeric"),
            ("body", "text"),
            ("u", "uuid"),
            ("doc", "jsonb"),
            ("raw", "bytea"),
            ("at", "timestamp with time zone"),
            ("local", "timestamp without time zone"),
            ("day", "date"),
            ("clock", "time without time zone"),
            ("tags", "text[]"),
            ("nums", "integer[]"),
        ];
        let types: Vec<ColumnType> = cols
            .iter()
            .map(|(name, sql_type)| ColumnType {
                name,
                sql_type,
                is_enum: false,
            })
            .collect();
        let table = TableName::parse("public.t").expect("name");
        let schema = TableSchema::new("wire", "p", "db", &table, &types, vec![0]).expect("schema");
        let key_schema = Schema::parse(&schema.key_schema()).expect("key schema");
        let value_schema = Schema::parse(&schema.value_schema()).expect("value schema");
        let full = |id: i64, amount: &str| Row {
            cells: [
                id.to_string().as_str(),
                "-42",
                "t",
                "1.5",
                "-2.25e10",
                amount,
                "12345678901234567890.5",
                "héllo \"world\"",
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                "{\"a\": [1, 2]}",
                "\\x00ff10",
                "2024-02-29 23:59:59.123456+00",
                "1999-12-31 00:00:00",
                "2024-02-29",
                "13:14:15.5",
                "{a,NULL,\"b c\"}",
                "{}",
            ]
            .iter()
            .map(|v| Cell::Present(Some(v.to_string())))
            .collect(),
        };
        let mut nulls = full(3, "0.00");
        for c in nulls.cells.iter_mut().skip(1) {
            *c = Cell::Present(None);
        }
        let mut partial = full(4, "-0.01");
        partial.cells[7] = Cell::Absent;
        let event = |change| ChangeEvent {
            change,
            commit_lsn: Lsn(0x16_B374_D848),
            commit_ts_us: 1_700_000_000_123_456,
            xid: 0,
        };
        let changes = vec![
            Change::Insert {
                new: full(1, "12.34"),
            },
            Change::Insert { new: nulls },
            Change::Update {
                old_key: None,
                new: partial,
            },
            Change::Update {
                old_key: Some(Key(vec![Some("1".into())])),
                new: full(2, "-99999999.99"),
            },
            Change::Delete {
                key: Key(vec![Some("2".into())]),
            },
        ];
        let mut seen = 0;
        let mut frames = Frames::default();
        let ids = Ids {
            key: 7,
            value: 0x0102_0304,
        };
        let framed = |id: u32, v: &Value| {
            let mut out = vec![0];
            out.extend_from_slice(&id.to_be_bytes());
            encode(v, &mut out).expect("encodes");
            out
        };
        for (i, change) in changes.into_iter().enumerate() {
            for snapshot in [false, true] {
                let mut e = event(change.clone());
                // `source.txId`: null, and an id past i32's range.
                if i % 2 == 0 {
                    e.xid = 4_000_000_123;
                }
                let records = schema.records(&e, snapshot, 7).expect("records");
                for r in &records {
                    same_as_apache(&key_schema, &r.key);
                    if let Some(v) = &r.value {
                        same_as_apache(&value_schema, v);
                        seen += 1;
                    }
                }
                // The producer's direct writer gives the same framed bytes.
                schema
                    .write_records(&e, snapshot, 7, ids, &mut frames)
                    .expect("writes");
                assert_eq!(frames.len(), records.len(), "{e:?}");
                for ((k, v), r) in frames.iter().zip(&records) {
                    assert_eq!(k, framed(ids.key, &r.key), "key of {e:?}");
                    let want = r.value.as_ref().map(|v| framed(ids.value, v));
                    assert_eq!(v.map(<[u8]>::to_vec), want, "value of {e:?}");
                }
            }
        }
        assert!(seen >= 12, "too few value records: {seen}");
    }
}
