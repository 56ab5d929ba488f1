//! Avro for change events: key and value schemas derived from the source
//! table, and the conversion of pgoutput's text values into Avro values.
//!
//! The value is a Debezium-compatible envelope: `before`, `after` (records
//! of the table's columns), `source` (version, connector, name, ts_ms, db,
//! schema, table, txId, lsn), `op` (`c` create, `u` update, `d` delete,
//! `r` read by the backfill) and `ts_ms`. One field goes beyond Debezium:
//! `unavailable` lists the columns an update did not carry (unchanged TOAST
//! values, null in `after`), so a consumer never mistakes them for NULL.
//! Every column is an optional field with a null default, so adding a
//! column on the source gives a backward-compatible schema.
//!
//! Types (PostgreSQL → Avro): smallint/integer → int; bigint → long;
//! boolean; real → float; double precision → double; numeric(p,s) →
//! bytes/decimal(p,s); numeric without a scale, text, varchar, char, enums
//! → string; bytea → bytes; uuid → string/uuid; json/jsonb → string named
//! `io.debezium.data.Json`; timestamptz → long/timestamp-micros; timestamp →
//! long/local-timestamp-micros; date → int/date; time → long/time-micros;
//! one-dimensional arrays of these → array. Anything else is refused when
//! the pipeline is planned.

use super::wire;
use crate::calendar;
use apache_avro::types::Value;
use serde_json::{json, Value as Json};

/// The Avro shape of one PostgreSQL type.
#[derive(Debug, Clone, PartialEq)]
pub enum AvroType {
    Int,
    Long,
    Boolean,
    Float,
    Double,
    Decimal { precision: u32, scale: u32 },
    String,
    Bytes,
    Uuid,
    Json,
    TimestampMicros,
    LocalTimestampMicros,
    Date,
    TimeMicros,
    Array(Box<AvroType>),
}

impl AvroType {
    /// Maps a `format_type` name; `None` when rowshift cannot carry it.
    pub fn of(sql_type: &str, is_enum: bool) -> Option<AvroType> {
        if let Some(element) = sql_type.strip_suffix("[]") {
            if element.ends_with("[]") {
                return None;
            }
            return AvroType::of(element, is_enum).map(|t| AvroType::Array(Box::new(t)));
        }
        if is_enum {
            return Some(AvroType::String);
        }
        let base = sql_type.split('(').next().unwrap_or(sql_type).trim();
        Some(match base {
            "smallint" | "integer" => AvroType::Int,
            "bigint" => AvroType::Long,
            "boolean" => AvroType::Boolean,
            "real" => AvroType::Float,
            "double precision" => AvroType::Double,
            "numeric" => match typmod(sql_type) {
                Some((p, s)) if p <= 38 => AvroType::Decimal {
                    precision: p,
                    scale: s,
                },
                _ => AvroType::String,
            },
            "text" | "character varying" | "character" | "name" | "citext" | "inet" | "cidr"
            | "macaddr" => AvroType::String,
            "bytea" => AvroType::Bytes,
            "uuid" => AvroType::Uuid,
            "json" | "jsonb" => AvroType::Json,
            "timestamp with time zone" => AvroType::TimestampMicros,
            "timestamp without time zone" => AvroType::LocalTimestampMicros,
            "date" => AvroType::Date,
            "time without time zone" => AvroType::TimeMicros,
            _ => return None,
        })
    }

    /// The Avro schema JSON of a non-null value of this type.
    pub fn schema(&self) -> Json {
        match self {
            AvroType::Int => json!("int"),
            AvroType::Long => json!("long"),
            AvroType::Boolean => json!("boolean"),
            AvroType::Float => json!("float"),
            AvroType::Double => json!("double"),
            AvroType::Decimal { precision, scale } => {
                json!({"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale})
            }
            AvroType::String => json!("string"),
            AvroType::Bytes => json!("bytes"),
            AvroType::Uuid => json!({"type": "string", "logicalType": "uuid"}),
            AvroType::Json => json!({"type": "string", "connect.name": "io.debezium.data.Json"}),
            AvroType::TimestampMicros => json!({"type": "long", "logicalType": "timestamp-micros"}),
            AvroType::LocalTimestampMicros => {
                json!({"type": "long", "logicalType": "local-timestamp-micros"})
            }
            AvroType::Date => json!({"type": "int", "logicalType": "date"}),
            AvroType::TimeMicros => json!({"type": "long", "logicalType": "time-micros"}),
            AvroType::Array(t) => json!({"type": "array", "items": ["null", t.schema()]}),
        }
    }

    /// Appends the Avro binary encoding of PostgreSQL's text output of a
    /// value: the bytes [`Self::value`] then [`super::wire::encode`] give,
    /// without building the value for the common scalar types.
    pub fn write(&self, text: &str, out: &mut Vec<u8>) -> Result<(), String> {
        let bad = |what: &str| format!("cannot read {text:?} as {what}");
        match self {
            AvroType::Int => {
                let i: i32 = text.parse().map_err(|_| bad("an integer"))?;
                wire::long(i64::from(i), out);
            }
            AvroType::Long => wire::long(text.parse().map_err(|_| bad("a bigint"))?, out),
            AvroType::Boolean => out.push(u8::from(text == "t" || text == "true")),
            AvroType::String | AvroType::Json => wire::bytes(text.as_bytes(), out),
            AvroType::Decimal { scale, .. } => wire::bytes(&decimal_bytes(text, *scale)?, out),
            AvroType::TimestampMicros => wire::long(timestamp_micros(text, true)?, out),
            AvroType::LocalTimestampMicros => wire::long(timestamp_micros(text, false)?, out),
            AvroType::Date => wire::long(i64::from(date_days(text)?), out),
            AvroType::TimeMicros => wire::long(time_micros(text)?, out),
            AvroType::Float
            | AvroType::Double
            | AvroType::Uuid
            | AvroType::Bytes
            | AvroType::Array(_) => wire::encode(&self.value(text)?, out)?,
        }
        Ok(())
    }

    /// Converts PostgreSQL's text output of a value into an Avro value.
    pub fn value(&self, text: &str) -> Result<Value, String> {
        let bad = |what: &str| format!("cannot read {text:?} as {what}");
        Ok(match self {
            AvroType::Int => Value::Int(text.parse().map_err(|_| bad("an integer"))?),
            AvroType::Long => Value::Long(text.parse().map_err(|_| bad("a bigint"))?),
            AvroType::Boolean => Value::Boolean(text == "t" || text == "true"),
            AvroType::Float => Value::Float(text.parse().map_err(|_| bad("a real"))?),
            AvroType::Double => Value::Double(text.parse().map_err(|_| bad("a double"))?),
            AvroType::Decimal { scale, .. } => Value::Decimal(decimal_bytes(text, *scale)?.into()),
            AvroType::String | AvroType::Json => Value::String(text.to_string()),
            AvroType::Uuid => Value::Uuid(text.parse().map_err(|_| bad("a uuid"))?),
            AvroType::Bytes => Value::Bytes(bytea(text)?),
            AvroType::TimestampMicros => Value::TimestampMicros(timestamp_micros(text, true)?),
            AvroType::LocalTimestampMicros => {
                Value::LocalTimestampMicros(timestamp_micros(text, false)?)
            }
            AvroType::Date => Value::Date(date_days(text)?),
            AvroType::TimeMicros => Value::TimeMicros(time_micros(text)?),
            AvroType::Array(t) => Value::Array(
                array_elements(text)?
                    .into_iter()
                    .map(|e| match e {
                        None => Ok(Value::Union(0, Box::new(Value::Null))),
                        Some(s) => Ok(Value::Union(1, Box::new(t.value(&s)?))),
                    })
                    .collect::<Result<_, String>>()?,
            ),
        })
    }
}

/// `(precision, scale)` from `numeric(p,s)`.
fn typmod(sql_type: &str) -> Option<(u32, u32)> {
    let inner = sql_type.split_once('(')?.1.strip_suffix(')')?;
    let (p, s) = inner.split_once(',').unwrap_or((inner, "0"));
    Some((p.trim().parse().ok()?, s.trim().parse().ok()?))
}

/// The unscaled value at `scale`, big-endian two's complement.
fn decimal_bytes(text: &str, scale: u32) -> Result<Vec<u8>, String> {
    if text == "NaN" || text.contains("Infinity") {
        return Err(format!("{text} cannot be an Avro decimal"));
    }
    let (neg, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if frac.len() > scale as usize {
        return Err(format!("{text} has more than {scale} decimal places"));
    }
    let padded = format!("{int}{frac:0<width$}", width = scale as usize);
    let mut n: i128 = padded
        .parse()
        .map_err(|_| format!("cannot read {text:?} as a numeric"))?;
    if neg {
        n = -n;
    }
    let bytes = n.to_be_bytes();
    // Shortest two's complement form.
    let mut start = 0;
    while start < 15 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    Ok(bytes[start..].to_vec())
}

/// `\x0a1b...` → bytes.
fn bytea(text: &str) -> Result<Vec<u8>, String> {
    let hex = text
        .strip_prefix("\\x")
        .ok_or_else(|| "bytea must arrive in hex format (bytea_output = hex)".to_string())?;
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad hex in bytea at {i}"))
        })
        .collect()
}

fn date_parts(text: &str) -> Result<(i64, i64, i64), String> {
    let mut it = text.splitn(3, '-');
    let mut next = || -> Result<i64, String> {
        it.next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("cannot read {text:?} as a date"))
    };
    Ok((next()?, next()?, next()?))
}

fn date_days(text: &str) -> Result<i32, String> {
    match text {
        "infinity" => return Ok(i32::MAX),
        "-infinity" => return Ok(i32::MIN),
        _ => {}
    }
    if text.ends_with(" BC") {
        return Err(format!(
            "{text}: dates before the common era are not carried"
        ));
    }
    let (y, m, d) = date_parts(text)?;
    Ok(calendar::days_from_civil(y, m, d) as i32)
}

/// `HH:MM:SS[.ffffff]` → microseconds.
fn time_micros(text: &str) -> Result<i64, String> {
    let bad = || format!("cannot read {text:?} as a time");
    let (hms, frac) = text.split_once('.').unwrap_or((text, ""));
    let parts: Vec<i64> = hms
        .split(':')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let [h, m, s] = parts.as_slice() else {
        return Err(bad());
    };
    let micros: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}")[..6].parse().map_err(|_| bad())?
    };
    Ok(((h * 60 + m) * 60 + s) * 1_000_000 + micros)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM[:SS]]]` → microseconds since the
/// epoch (UTC when `zoned`, wall clock otherwise).
fn timestamp_micros(text: &str, zoned: bool) -> Result<i64, String> {
    match text {
        "infinity" => return Ok(i64::MAX),
        "-infinity" => return Ok(i64::MIN),
        _ => {}
    }
    if text.ends_with(" BC") {
        return Err(format!(
            "{text}: dates before the common era are not carried"
        ));
    }
    let (date, rest) = text
        .split_once(' ')
        .ok_or_else(|| format!("cannot read {text:?} as a timestamp"))?;
    let (y, m, d) = date_parts(date)?;
    let (clock, offset_s) = if zoned {
        let pos = rest
            .rfind(['+', '-'])
            .ok_or_else(|| format!("{text:?} has no time zone offset"))?;
        let (clock, off) = rest.split_at(pos);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let nums: Vec<i64> = off[1..]
            .split(':')
            .map(|p| p.parse().map_err(|_| format!("bad offset in {text:?}")))
            .collect::<Result<_, _>>()?;
        let secs = nums.first().copied().unwrap_or(0) * 3600
            + nums.get(1).copied().unwrap_or(0) * 60
            + nums.get(2).copied().unwrap_or(0);
        (clock, sign * secs)
    } else {
        (rest, 0)
    };
    let day_micros = time_micros(clock)?;
    Ok(calendar::days_from_civil(y, m, d) * 86_400_000_000 + day_micros - offset_s * 1_000_000)
}

/// Elements of a one-dimensional array in PostgreSQL's text format.
fn array_elements(text: &str) -> Result<Vec<Option<String>>, String> {
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| format!("cannot read {text:?} as an array"))?;
    if inner.starts_with('{') {
        return Err("multi-dimensional arrays are not carried".into());
    }
    let mut out = Vec::new();
    if inner.is_empty() {
        return Ok(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        let mut item = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => item.extend(chars.next()),
                    '"' => break,
                    c => item.push(c),
                }
            }
        }
        while let Some(&c) = chars.peek() {
            if c == ',' {
                break;
            }
            item.push(c);
            chars.next();
        }
        out.push(if !quoted && item == "NULL" {
            None
        } else {
            Some(item)
        });
        if chars.next().is_none() {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
