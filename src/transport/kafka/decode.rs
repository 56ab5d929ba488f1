//! The consuming side of the record format: an Avro envelope back into a
//! change event whose values are in PostgreSQL's text format again (what
//! the sink binds), aligned to the applier's source column list by name.
//! A column the record does not have (an older schema version) or lists as
//! `unavailable` stays absent, so the sink leaves it alone.

use super::avro::AvroType;
use crate::model::{Cell, Change, ChangeEvent, Key, Lsn, Row};
use apache_avro::types::Value;

/// PostgreSQL text of an Avro value written by [`AvroType::value`].
pub fn text(t: &AvroType, v: &Value) -> Result<Option<String>, String> {
    let v = match v {
        Value::Union(_, inner) => inner.as_ref(),
        other => other,
    };
    Ok(Some(match (t, v) {
        (_, Value::Null) => return Ok(None),
        (_, Value::Int(i)) => i.to_string(),
        (_, Value::Long(i)) => i.to_string(),
        (_, Value::Boolean(b)) => if *b { "t" } else { "f" }.to_string(),
        (_, Value::Float(f)) => f.to_string(),
        (_, Value::Double(f)) => f.to_string(),
        (_, Value::String(s)) => s.clone(),
        (_, Value::Uuid(u)) => u.to_string(),
        (_, Value::Bytes(b)) if matches!(t, AvroType::Decimal { .. }) => decimal_text(b, t)?,
        (AvroType::Decimal { .. }, Value::Decimal(d)) => {
            let bytes: Vec<u8> = d.try_into().map_err(|e| format!("decimal: {e:?}"))?;
            decimal_text(&bytes, t)?
        }
        (_, Value::Bytes(b)) => {
            let mut s = String::with_capacity(2 + b.len() * 2);
            s.push_str("\\x");
            for byte in b {
                s.push_str(&format!("{byte:02x}"));
            }
            s
        }
        (_, Value::Date(d)) => date_text(*d as i64),
        (_, Value::TimeMicros(us)) => clock_text(*us),
        (_, Value::TimestampMicros(us)) => format!("{}+00", timestamp_text(*us)),
        (_, Value::LocalTimestampMicros(us)) => timestamp_text(*us),
        (AvroType::Array(inner), Value::Array(items)) => {
            let parts: Vec<String> = items
                .iter()
                .map(|i| match text(inner, i)? {
                    None => Ok("NULL".to_string()),
                    Some(s) => Ok(format!(
                        "\"{}\"",
                        s.replace('\\', "\\\\").replace('"', "\\\"")
                    )),
                })
                .collect::<Result<_, String>>()?;
            format!("{{{}}}", parts.join(","))
        }
        (t, v) => return Err(format!("an Avro {v:?} does not fit {t:?}")),
    }))
}

fn decimal_text(bytes: &[u8], t: &AvroType) -> Result<String, String> {
    let AvroType::Decimal { scale, .. } = t else {
        return Err("not a decimal".into());
    };
    if bytes.is_empty() || bytes.len() > 16 {
        return Err("decimal out of range".into());
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xff } else { 0 };
    let mut buf = [fill; 16];
    buf[16 - bytes.len()..].copy_from_slice(bytes);
    let n = i128::from_be_bytes(buf);
    let digits = n.unsigned_abs().to_string();
    let scale = *scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    let sign = if n < 0 { "-" } else { "" };
    Ok(if scale == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    })
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn date_text(days: i64) -> String {
    match days {
        d if d == i32::MAX as i64 => "infinity".into(),
        d if d == i32::MIN as i64 => "-infinity".into(),
        d => {
            let (y, m, d) = civil_from_days(d);
            format!("{y:04}-{m:02}-{d:02}")
        }
    }
}

fn clock_text(us: i64) -> String {
    let (secs, micros) = (us.div_euclid(1_000_000), us.rem_euclid(1_000_000));
    let base = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if micros == 0 {
        base
    } else {
        format!("{base}.{micros:06}")
    }
}

fn timestamp_text(us: i64) -> String {
    match us {
        i64::MAX => "infinity".into(),
        i64::MIN => "-infinity".into(),
        us => {
            let days = us.div_euclid(86_400_000_000);
            format!(
                "{} {}",
                date_text(days),
                clock_text(us.rem_euclid(86_400_000_000))
            )
        }
    }
}

/// Columns a consumer applies: names and Avro types, in source order, and
/// the key positions.
pub struct Layout<'a> {
    pub columns: &'a [(String, AvroType)],
    pub key: &'a [usize],
}

fn field<'v>(fields: &'v [(String, Value)], name: &str) -> Option<&'v Value> {
    fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

fn record(v: Option<&Value>) -> Option<&[(String, Value)]> {
    match v? {
        Value::Union(_, inner) => match inner.as_ref() {
            Value::Record(f) => Some(f),
            _ => None,
        },
        Value::Record(f) => Some(f),
        _ => None,
    }
}

impl Layout<'_> {
    fn row(&self, fields: &[(String, Value)], unavailable: &[String]) -> Result<Row, String> {
        let mut cells = Vec::with_capacity(self.columns.len());
        for (name, t) in self.columns {
            let cell = match field(fields, name) {
                Some(_) if unavailable.iter().any(|u| u == name) => Cell::Absent,
                Some(v) => Cell::Present(text(t, v)?),
                None => Cell::Absent,
            };
            cells.push(cell);
        }
        Ok(Row { cells })
    }

    /// The change event of a decoded envelope (`None` for records that
    /// change nothing, such as tombstones, which the caller skips).
    pub fn event(&self, envelope: &Value) -> Result<Option<ChangeEvent>, String> {
        let Value::Record(env) = envelope else {
            return Err("the value is not an envelope record".into());
        };
        let op = match field(env, "op") {
            Some(Value::String(s)) => s.as_str(),
            _ => return Err("the envelope has no op".into()),
        };
        let unavailable: Vec<String> = match field(env, "unavailable") {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|i| match i {
                    Value::String(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let source = record(field(env, "source")).unwrap_or(&[]);
        let lsn = match field(source, "lsn") {
            Some(Value::Union(_, v)) => match v.as_ref() {
                Value::Long(l) => Lsn(*l as u64),
                _ => Lsn::ZERO,
            },
            _ => Lsn::ZERO,
        };
        let ts_us = match field(source, "ts_ms") {
            Some(Value::Long(ms)) => ms * 1000,
            _ => 0,
        };
        let change = match op {
            "c" | "r" | "u" => {
                let after = record(field(env, "after")).ok_or("an upsert without after")?;
                let new = self.row(after, &unavailable)?;
                // A create that left columns out (the new key of a key
                // change whose TOASTed columns did not change) is applied as
                // a partial update: the sink re-reads the row it lacks.
                // Columns this layout does not read (added to the source
                // later) do not matter.
                let lacking = unavailable
                    .iter()
                    .any(|u| self.columns.iter().any(|(name, _)| name == u));
                if op == "u" || lacking {
                    Change::Update { old_key: None, new }
                } else {
                    Change::Insert { new }
                }
            }
            "d" => {
                let before = record(field(env, "before")).ok_or("a delete without before")?;
                let row = self.row(before, &[])?;
                let key = row.key(self.key).ok_or("a delete without its key")?;
                Change::Delete { key: Key(key.0) }
            }
            other => return Err(format!("unknown op {other:?}")),
        };
        Ok(Some(ChangeEvent {
            change,
            commit_lsn: lsn,
            commit_ts_us: ts_us,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::envelope::{ColumnType, TableSchema};
    use super::*;
    use crate::spec::TableName;

    #[test]
    fn text_round_trips_through_avro() {
        let cases = [
            ("bigint", "-42"),
            ("boolean", "f"),
            ("numeric(10,2)", "-0.05"),
            ("numeric(10,2)", "123.40"),
            ("numeric(6,0)", "7"),
            ("bytea", "\\x00ff10"),
            ("date", "1999-12-31"),
            ("timestamp with time zone", "2024-02-29 23:59:59.000001+00"),
            ("timestamp without time zone", "1970-01-01 00:00:00"),
            ("time without time zone", "13:14:15.5"),
            ("uuid", "0b8f6c7e-8f3a-4a7e-9a51-2c1a3e0d9f10"),
            ("text[]", r#"{"a b","c\"d",NULL}"#),
        ];
        for (ty, input) in cases {
            let t = AvroType::of(ty, false).expect(ty);
            let v = t.value(input).expect(input);
            let back = text(&t, &v).expect("text").expect("not null");
            let again = t.value(&back).expect("re-read");
            assert_eq!(again, v, "{ty}: {input} -> {back}");
        }
        let t = AvroType::of("time without time zone", false).unwrap();
        assert_eq!(
            text(&t, &t.value("13:14:15.5").unwrap()).unwrap().unwrap(),
            "13:14:15.500000"
        );
    }

    #[test]
    fn envelopes_decode_into_the_events_they_were_made_from() {
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
        ];
        let schema = TableSchema::new(
            "t",
            "p",
            "db",
            &TableName::parse("t").unwrap(),
            &cols,
            vec![0],
        )
        .unwrap();
        let layout = Layout {
            columns: &schema.columns,
            key: &schema.key,
        };
        let row = |id: &str, body: Cell| Row {
            cells: vec![Cell::Present(Some(id.into())), body],
        };
        let events = [
            Change::Insert {
                new: row("1", Cell::Present(Some("x".into()))),
            },
            Change::Update {
                old_key: None,
                new: row("1", Cell::Absent),
            },
            Change::Delete {
                key: Key(vec![Some("1".into())]),
            },
        ];
        for change in events {
            let e = ChangeEvent {
                change: change.clone(),
                commit_lsn: Lsn(7),
                commit_ts_us: 9_000,
            };
            let recs = schema.records(&e, false, 0).unwrap();
            let decoded = layout
                .event(recs[0].value.as_ref().unwrap())
                .unwrap()
                .unwrap();
            assert_eq!(decoded.change, change);
            assert_eq!(decoded.commit_lsn, Lsn(7));
            assert_eq!(decoded.commit_ts_us, 9_000);
        }
    }
}
