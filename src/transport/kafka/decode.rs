//! The consuming side of the record format: a record's Confluent frame and
//! Avro envelope back into a change event whose values are in PostgreSQL's
//! text format again (what the sink binds), aligned to the applier's source
//! column list by name. A column the record does not have (an older schema
//! version) or lists as `unavailable` stays absent, so the sink leaves it
//! alone.
//!
//! Each writer schema is compiled once into a [`Plan`] for the applier's
//! columns (see [`super::binary`]); a record is then read in one pass over
//! its bytes, and only the row image its op needs is turned into text.

use super::avro::AvroType;
use super::binary::{self, Node, Reader};
use crate::model::{Cell, Change, ChangeEvent, Lsn, Row};
use apache_avro::Schema;

/// The schema id and the datum of a record in the Confluent wire format.
pub fn frame(payload: &[u8]) -> Result<(u32, &[u8]), String> {
    match payload {
        [0, a, b, c, d, datum @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), datum)),
        _ => Err("not in the Confluent wire format (magic byte 0, schema id)".into()),
    }
}

/// Columns a consumer applies: names and Avro types, in source order, and
/// the key positions.
pub struct Layout<'a> {
    pub columns: &'a [(String, AvroType)],
    pub key: &'a [usize],
}

impl Layout<'_> {
    fn position(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|(n, _)| n == name)
    }
}

/// A `before` or `after` field: its shape, where the row record sits in it
/// (`None`: the field is the record), and for each column of the record
/// the layout position it fills (`None`: a column the applier does not
/// have, read past).
struct Image {
    shape: Node,
    at: Option<usize>,
    columns: Vec<(Option<usize>, Node)>,
}

enum SourceField {
    Lsn,
    TsMs,
    TxId,
    Other,
}

/// One field of the writer's envelope.
enum Part {
    Op(Node),
    Before(Image),
    After(Image),
    Source(Vec<(SourceField, Node)>),
    Unavailable(Node),
    Skip(Node),
}

/// A writer schema's envelope compiled for one layout.
pub struct Plan {
    parts: Vec<Part>,
}

impl Image {
    fn new(field: &str, shape: &Node, layout: &Layout) -> Result<Image, String> {
        let (at, record) = match shape {
            Node::Record(columns) => (None, columns),
            Node::Union(variants) => variants
                .iter()
                .enumerate()
                .find_map(|(i, v)| match v {
                    Node::Record(columns) => Some((Some(i), columns)),
                    _ => None,
                })
                .ok_or_else(|| format!("the envelope's {field} holds no record"))?,
            _ => return Err(format!("the envelope's {field} is not a record")),
        };
        Ok(Image {
            shape: shape.clone(),
            at,
            columns: record
                .iter()
                .map(|(name, node)| (layout.position(name), node.clone()))
                .collect(),
        })
    }

    /// The row of the image that starts at `r` (`None`: a null image).
    fn row(&self, mut r: Reader, layout: &Layout) -> Result<Option<Row>, String> {
        if let (Node::Union(variants), Some(at)) = (&self.shape, self.at) {
            let i = r.long()?;
            if usize::try_from(i).ok() != Some(at) {
                return match usize::try_from(i).ok().and_then(|i| variants.get(i)) {
                    Some(Node::Null) => Ok(None),
                    _ => Err(format!("an image in union branch {i}")),
                };
            }
        }
        let mut cells = vec![Cell::Absent; layout.columns.len()];
        for (target, node) in &self.columns {
            match target {
                Some(i) => {
                    cells[*i] = Cell::Present(binary::text(&mut r, node, &layout.columns[*i].1)?)
                }
                None => r.skip(node)?,
            }
        }
        Ok(Some(Row { cells }))
    }
}

impl Plan {
    /// Compiles the writer schema `schema` (its JSON text) for `layout`.
    pub fn new(schema: &str, layout: &Layout) -> Result<Plan, String> {
        let schema = Schema::parse_str(schema).map_err(|e| format!("writer schema: {e}"))?;
        let Node::Record(fields) = binary::compile(&schema)? else {
            return Err("the writer schema is not a record".into());
        };
        let mut parts = Vec::with_capacity(fields.len());
        for (name, node) in fields {
            parts.push(match name.as_str() {
                "op" if matches!(node, Node::String | Node::Enum(_)) => Part::Op(node),
                "op" => return Err("the envelope's op is not a string".into()),
                "before" => Part::Before(Image::new("before", &node, layout)?),
                "after" => Part::After(Image::new("after", &node, layout)?),
                "source" => match node {
                    Node::Record(fields) => Part::Source(
                        fields
                            .into_iter()
                            .map(|(name, node)| {
                                let role = match name.as_str() {
                                    "lsn" => SourceField::Lsn,
                                    "ts_ms" => SourceField::TsMs,
                                    "txId" => SourceField::TxId,
                                    _ => SourceField::Other,
                                };
                                (role, node)
                            })
                            .collect(),
                    ),
                    other => Part::Skip(other),
                },
                "unavailable" => Part::Unavailable(node),
                _ => Part::Skip(node),
            });
        }
        if !parts.iter().any(|p| matches!(p, Part::Op(_))) {
            return Err("the writer schema has no op: not a change envelope".into());
        }
        Ok(Plan { parts })
    }

    /// The change event of an envelope's datum (read against the layout the
    /// plan was compiled for).
    pub fn event(&self, datum: &[u8], layout: &Layout) -> Result<ChangeEvent, String> {
        let mut r = Reader::new(datum);
        let (mut op, mut before, mut after) = (None, None, None);
        let (mut lsn, mut ts_ms, mut unavailable) = (None, None, Vec::new());
        let mut tx_id = None;
        for part in &self.parts {
            match part {
                Part::Op(Node::Enum(symbols)) => {
                    let i = r.long()?;
                    op = usize::try_from(i)
                        .ok()
                        .and_then(|i| symbols.get(i))
                        .map(String::as_str);
                }
                Part::Op(_) => op = Some(r.str()?),
                Part::Before(image) | Part::After(image) => {
                    let start = r.at(r.position());
                    r.skip(&image.shape)?;
                    if matches!(part, Part::After(_)) {
                        after = Some((image, start));
                    } else {
                        before = Some((image, start));
                    }
                }
                Part::Source(fields) => {
                    for (role, node) in fields {
                        match role {
                            SourceField::Lsn => lsn = r.opt_long(node)?,
                            SourceField::TsMs => ts_ms = r.opt_long(node)?,
                            SourceField::TxId => tx_id = r.opt_long(node)?,
                            SourceField::Other => r.skip(node)?,
                        }
                    }
                }
                Part::Unavailable(node) => unavailable = r.strings(node)?,
                Part::Skip(node) => r.skip(node)?,
            }
        }
        let image = |which: Option<(&Image, Reader)>| match which {
            Some((image, at)) => image.row(at, layout),
            None => Ok(None),
        };
        let change = match op.ok_or("the envelope has no op")? {
            op @ ("c" | "r" | "u") => {
                let mut new = image(after)?.ok_or("an upsert without after")?;
                // A create that left columns out (the new key of a key
                // change whose TOASTed columns did not change) is applied as
                // a partial update: the sink re-reads the row it lacks.
                // Columns this layout does not read (added to the source
                // later) do not matter.
                let mut lacking = false;
                for i in unavailable.iter().filter_map(|u| layout.position(u)) {
                    new.cells[i] = Cell::Absent;
                    lacking = true;
                }
                if op == "u" || lacking {
                    Change::Update { old_key: None, new }
                } else {
                    Change::Insert { new }
                }
            }
            "d" => {
                let row = image(before)?.ok_or("a delete without before")?;
                let key = row.key(layout.key).ok_or("a delete without its key")?;
                Change::Delete { key }
            }
            other => return Err(format!("unknown op {other:?}")),
        };
        Ok(ChangeEvent {
            change,
            commit_lsn: lsn.map_or(Lsn::ZERO, |l| Lsn(l as u64)),
            commit_ts_us: ts_ms.map_or(0, |ms| ms * 1000),
            // pgoutput's 32-bit id; a writer that sends a wider one (an
            // epoch in the high bits) keeps its low 32 bits.
            xid: tx_id.map_or(0, |x| x as u32),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::envelope::{ColumnType, TableSchema};
    use super::super::wire;
    use super::*;
    use crate::model::Key;
    use crate::spec::TableName;
    use apache_avro::types::Value;

    fn datum(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        wire::encode(v, &mut out).unwrap();
        out
    }

    fn schema(cols: &[(&'static str, &'static str)]) -> TableSchema {
        let cols: Vec<ColumnType> = cols
            .iter()
            .map(|&(name, sql_type)| ColumnType {
                name,
                sql_type,
                is_enum: false,
            })
            .collect();
        TableSchema::new(
            "t",
            "p",
            "db",
            &TableName::parse("t").unwrap(),
            &cols,
            vec![0],
        )
        .unwrap()
    }

    fn row(cells: &[Cell]) -> Row {
        Row {
            cells: cells.to_vec(),
        }
    }

    fn some(s: &str) -> Cell {
        Cell::Present(Some(s.into()))
    }

    /// The events `writer`'s records of `changes` decode into, for the
    /// columns of `reader`.
    fn round_trip(
        writer: &TableSchema,
        reader: &TableSchema,
        changes: &[Change],
    ) -> Vec<ChangeEvent> {
        let layout = Layout {
            columns: &reader.columns,
            key: &reader.key,
        };
        let plan = Plan::new(&writer.value_schema().to_string(), &layout).unwrap();
        changes
            .iter()
            .enumerate()
            .map(|(i, change)| {
                let e = ChangeEvent {
                    change: change.clone(),
                    commit_lsn: Lsn(7),
                    commit_ts_us: 9_000,
                    xid: if i % 2 == 0 { 4_000_000_123 } else { 0 },
                };
                let recs = writer.records(&e, false, 0).unwrap();
                plan.event(&datum(recs[0].value.as_ref().unwrap()), &layout)
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn envelopes_decode_into_the_events_they_were_made_from() {
        let s = schema(&[("id", "bigint"), ("body", "text"), ("tags", "text[]")]);
        let changes = [
            Change::Insert {
                new: row(&[some("1"), some("x"), some("{\"a\"}")]),
            },
            Change::Insert {
                new: row(&[some("2"), Cell::Present(None), Cell::Present(None)]),
            },
            Change::Update {
                old_key: None,
                new: row(&[some("1"), Cell::Absent, some("{}")]),
            },
            Change::Delete {
                key: Key(vec![Some("1".into())]),
            },
        ];
        for (i, (decoded, change)) in round_trip(&s, &s, &changes)
            .iter()
            .zip(&changes)
            .enumerate()
        {
            assert_eq!(&decoded.change, change);
            assert_eq!(decoded.commit_lsn, Lsn(7));
            assert_eq!(decoded.commit_ts_us, 9_000);
            assert_eq!(decoded.xid, if i % 2 == 0 { 4_000_000_123 } else { 0 });
        }
    }

    #[test]
    fn columns_are_matched_by_name_across_schema_versions() {
        // The writer has a column the applier does not know (added on the
        // source later), and lacks one the applier has.
        let writer = schema(&[("id", "bigint"), ("added", "jsonb"), ("body", "text")]);
        let reader = schema(&[("id", "bigint"), ("body", "text"), ("gone", "integer")]);
        let changes = [
            Change::Insert {
                new: row(&[some("5"), some("{}"), some("b")]),
            },
            // A create that lacks a column the applier reads becomes a
            // partial update.
            Change::Insert {
                new: row(&[some("6"), some("{}"), Cell::Absent]),
            },
            Change::Insert {
                new: row(&[some("7"), Cell::Absent, some("c")]),
            },
        ];
        let got: Vec<Change> = round_trip(&writer, &reader, &changes)
            .into_iter()
            .map(|e| e.change)
            .collect();
        assert_eq!(
            got,
            [
                Change::Insert {
                    new: row(&[some("5"), some("b"), Cell::Absent]),
                },
                Change::Update {
                    old_key: None,
                    new: row(&[some("6"), Cell::Absent, Cell::Absent]),
                },
                Change::Insert {
                    new: row(&[some("7"), some("c"), Cell::Absent]),
                },
            ]
        );
    }

    #[test]
    fn a_foreign_envelope_with_other_fields_is_read_past_them() {
        // Fields rowshift does not write, of every kind, around the ones it
        // reads; written by apache_avro itself.
        let schema_json = r#"{"type": "record", "name": "Envelope", "namespace": "x", "fields": [
            {"name": "pre", "type": {"type": "map", "values": {"type": "array", "items": "double"}}},
            {"name": "before", "type": ["null", {"type": "record", "name": "Value", "fields": [
                {"name": "id", "type": "long"},
                {"name": "flag", "type": {"type": "fixed", "name": "F", "size": 3}},
                {"name": "amount", "type": ["null", {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}]}
            ]}]},
            {"name": "after", "type": ["null", "Value"]},
            {"name": "source", "type": {"type": "record", "name": "S", "fields": [
                {"name": "kind", "type": {"type": "enum", "name": "K", "symbols": ["a", "b"]}},
                {"name": "ts_ms", "type": "long"},
                {"name": "lsn", "type": ["null", "long"]},
                {"name": "f", "type": "float"}
            ]}},
            {"name": "op", "type": "string"},
            {"name": "transaction", "type": ["null", {"type": "record", "name": "T", "fields": [
                {"name": "id", "type": "string"}, {"name": "n", "type": "boolean"}]}]}
        ]}"#;
        let writer = Schema::parse_str(schema_json).unwrap();
        let reader = schema(&[("id", "bigint"), ("amount", "numeric(9,2)")]);
        let layout = Layout {
            columns: &reader.columns,
            key: &reader.key,
        };
        let plan = Plan::new(schema_json, &layout).unwrap();
        let image = Value::Record(vec![
            ("id".into(), Value::Long(12)),
            ("flag".into(), Value::Fixed(3, vec![1, 2, 3])),
            (
                "amount".into(),
                Value::Union(1, Box::new(Value::Decimal(vec![0x30, 0x39].into()))),
            ),
        ]);
        let envelope = Value::Record(vec![
            (
                "pre".into(),
                Value::Map(
                    [(
                        "k".to_string(),
                        Value::Array(vec![Value::Double(1.0), Value::Double(2.0)]),
                    )]
                    .into_iter()
                    .collect(),
                ),
            ),
            ("before".into(), Value::Union(0, Box::new(Value::Null))),
            ("after".into(), Value::Union(1, Box::new(image))),
            (
                "source".into(),
                Value::Record(vec![
                    ("kind".into(), Value::Enum(1, "b".into())),
                    ("ts_ms".into(), Value::Long(1_700)),
                    ("lsn".into(), Value::Union(1, Box::new(Value::Long(99)))),
                    ("f".into(), Value::Float(0.5)),
                ]),
            ),
            ("op".into(), Value::String("c".into())),
            (
                "transaction".into(),
                Value::Union(
                    1,
                    Box::new(Value::Record(vec![
                        ("id".into(), Value::String("tx".into())),
                        ("n".into(), Value::Boolean(true)),
                    ])),
                ),
            ),
        ]);
        let bytes = apache_avro::to_avro_datum(&writer, envelope).unwrap();
        let e = plan.event(&bytes, &layout).unwrap();
        assert_eq!(
            e.change,
            Change::Insert {
                new: row(&[some("12"), some("123.45")]),
            }
        );
        assert_eq!((e.commit_lsn, e.commit_ts_us), (Lsn(99), 1_700_000));
        // Every truncation of the datum is an error, never a panic.
        for end in 0..bytes.len() {
            assert!(plan.event(&bytes[..end], &layout).is_err(), "cut at {end}");
        }
    }

    #[test]
    fn arrays_written_in_sized_blocks_are_read() {
        // A block with a negative count carries its byte size (writers may
        // use it so readers can skip); two blocks of a string array.
        let mut bytes = Vec::new();
        let long = |n: i64, out: &mut Vec<u8>| {
            let mut z = ((n << 1) ^ (n >> 63)) as u64;
            loop {
                let b = (z & 0x7f) as u8;
                z >>= 7;
                if z == 0 {
                    out.push(b);
                    break;
                }
                out.push(b | 0x80);
            }
        };
        long(-2, &mut bytes);
        long(4, &mut bytes);
        for s in ["a", "b"] {
            long(1, &mut bytes);
            bytes.extend_from_slice(s.as_bytes());
        }
        long(1, &mut bytes);
        long(1, &mut bytes);
        bytes.push(b'c');
        long(0, &mut bytes);
        let node = Node::Array(Box::new(Node::String));
        assert_eq!(Reader::new(&bytes).strings(&node).unwrap(), ["a", "b", "c"]);
        let mut r = Reader::new(&bytes);
        r.skip(&node).unwrap();
        assert_eq!(r.position(), bytes.len());
    }

    #[test]
    fn records_not_in_the_wire_format_are_refused() {
        assert!(frame(&[1, 0, 0, 0, 1, 2]).is_err());
        assert!(frame(&[0, 0, 0]).is_err());
        assert_eq!(frame(&[0, 0, 0, 1, 2, 9]).unwrap(), (258, &[9u8][..]));
    }
}
