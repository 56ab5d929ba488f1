//! Stream statements' array parameters in binary, as their own type.
//!
//! Values travel as PostgreSQL's text (see [`crate::model`]), and a `text[]`
//! parameter costs the target its types' input functions: on the bench's
//! one 200,000-row transaction, `timestamptz_in`, `numeric_in` and the
//! integer casts took about a sixth of what the applying backends spent
//! (docs/benchmarks.md, issue 2). For the common scalar types this module
//! turns the text into the type's binary form here, and the statement binds
//! `int8[]`, `timestamptz[]`, ... instead. The server's receive functions
//! only copy those bytes.
//!
//! **Nothing is guessed.** Each reader accepts exactly the form the type's
//! output function writes with `DateStyle = ISO` (any `TimeZone`), and
//! nothing else. If one value of a column does not read (another
//! `DateStyle`, a date before the common era, anything unexpected), that
//! column of that batch is bound as `text[]` and cast by the server, as
//! before. The result is the same either way: `tests/it/sink.rs` checks
//! every reader against the server's own cast over edge values.

use crate::calendar::days_from_civil;
use crate::transform::Mapping;
use bytes::{BufMut, BytesMut};
use std::error::Error as StdError;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// How one source column's values are bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bind {
    Text,
    Int2,
    Int4,
    Int8,
    Bool,
    Float4,
    Float8,
    Numeric,
    Date,
    Timestamp,
    Timestamptz,
    Uuid,
}

/// Microseconds and days from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;
const DAY_US: i64 = 86_400_000_000;
/// The first microsecond after the last one a timestamp holds (294277-01-01).
const TIMESTAMP_END_US: i64 = 9_223_371_331_200_000_000;

impl Bind {
    /// The bind for a column of `format_type` name `sql_type`. Domains,
    /// enums, arrays and every other type stay text.
    pub fn of(sql_type: &str) -> Bind {
        // `numeric(12,2)`, `timestamp(3) with time zone`: the typmod is
        // applied by the statement's cast to the column type.
        let mut base = String::with_capacity(sql_type.len());
        let mut depth = 0;
        for c in sql_type.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 => base.push(c),
                _ => {}
            }
        }
        match base.trim() {
            "smallint" => Bind::Int2,
            "integer" => Bind::Int4,
            "bigint" => Bind::Int8,
            "boolean" => Bind::Bool,
            "real" => Bind::Float4,
            "double precision" => Bind::Float8,
            "numeric" => Bind::Numeric,
            "date" => Bind::Date,
            "timestamp without time zone" | "timestamp" => Bind::Timestamp,
            "timestamp with time zone" => Bind::Timestamptz,
            "uuid" => Bind::Uuid,
            _ => Bind::Text,
        }
    }

    /// The parameter's type in SQL (`$n::int8[]`).
    pub fn array_sql(self) -> &'static str {
        match self {
            Bind::Text => "text[]",
            Bind::Int2 => "int2[]",
            Bind::Int4 => "int4[]",
            Bind::Int8 => "int8[]",
            Bind::Bool => "bool[]",
            Bind::Float4 => "float4[]",
            Bind::Float8 => "float8[]",
            Bind::Numeric => "numeric[]",
            Bind::Date => "date[]",
            Bind::Timestamp => "timestamp[]",
            Bind::Timestamptz => "timestamptz[]",
            Bind::Uuid => "uuid[]",
        }
    }

    fn types(self) -> (Type, Type) {
        match self {
            Bind::Text => (Type::TEXT, Type::TEXT_ARRAY),
            Bind::Int2 => (Type::INT2, Type::INT2_ARRAY),
            Bind::Int4 => (Type::INT4, Type::INT4_ARRAY),
            Bind::Int8 => (Type::INT8, Type::INT8_ARRAY),
            Bind::Bool => (Type::BOOL, Type::BOOL_ARRAY),
            Bind::Float4 => (Type::FLOAT4, Type::FLOAT4_ARRAY),
            Bind::Float8 => (Type::FLOAT8, Type::FLOAT8_ARRAY),
            Bind::Numeric => (Type::NUMERIC, Type::NUMERIC_ARRAY),
            Bind::Date => (Type::DATE, Type::DATE_ARRAY),
            Bind::Timestamp => (Type::TIMESTAMP, Type::TIMESTAMP_ARRAY),
            Bind::Timestamptz => (Type::TIMESTAMPTZ, Type::TIMESTAMPTZ_ARRAY),
            Bind::Uuid => (Type::UUID, Type::UUID_ARRAY),
        }
    }

    /// Appends the binary form of one value's text; `None` when the text is
    /// not in the form this type's output function writes.
    fn write(self, text: &str, out: &mut Vec<u8>) -> Option<()> {
        match self {
            Bind::Text => out.extend_from_slice(text.as_bytes()),
            Bind::Int2 => out.extend_from_slice(&integer::<i16>(text)?.to_be_bytes()),
            Bind::Int4 => out.extend_from_slice(&integer::<i32>(text)?.to_be_bytes()),
            Bind::Int8 => out.extend_from_slice(&integer::<i64>(text)?.to_be_bytes()),
            Bind::Bool => out.push(match text {
                "t" | "true" => 1,
                "f" | "false" => 0,
                _ => return None,
            }),
            Bind::Float4 => out.extend_from_slice(&float::<f32>(text)?.to_be_bytes()),
            Bind::Float8 => out.extend_from_slice(&float::<f64>(text)?.to_be_bytes()),
            Bind::Numeric => numeric(text, out)?,
            Bind::Date => out.extend_from_slice(&date(text)?.to_be_bytes()),
            Bind::Timestamp => out.extend_from_slice(&timestamp(text, false)?.to_be_bytes()),
            Bind::Timestamptz => out.extend_from_slice(&timestamp(text, true)?.to_be_bytes()),
            Bind::Uuid => out.extend_from_slice(&uuid(text)?),
        }
        Some(())
    }
}

/// The binds of a mapping's source columns, by position.
pub fn binds(m: &Mapping) -> Vec<Bind> {
    m.source_columns
        .iter()
        .map(|c| Bind::of(&c.sql_type))
        .collect()
}

/// One array parameter: a column's values, one element per row.
#[derive(Debug)]
pub enum Param<'a> {
    /// Bound as `text[]` and cast by the server.
    Text(Vec<Option<&'a str>>),
    /// The array already in binary (`array_send`'s form) and its type.
    Binary { array: Type, bytes: Vec<u8> },
}

impl Param<'_> {
    /// How this parameter is bound (which statement variant it needs).
    pub fn is_binary(&self) -> bool {
        matches!(self, Param::Binary { .. })
    }
}

/// The column's values in `bind`'s binary form, or as text when `bind` is
/// text or some value does not read.
pub fn column<'a>(bind: Bind, values: Vec<Option<&'a str>>) -> Param<'a> {
    if bind == Bind::Text {
        return Param::Text(values);
    }
    match binary_array(bind, &values) {
        Some(bytes) => Param::Binary {
            array: bind.types().1,
            bytes,
        },
        None => Param::Text(values),
    }
}

/// [`column`] for each column's values, with `binds[i]` for column `i`.
pub fn columns<'a>(values: Vec<Vec<Option<&'a str>>>, binds: &[Bind]) -> Vec<Param<'a>> {
    values
        .into_iter()
        .zip(binds)
        .map(|(v, &bind)| column(bind, v))
        .collect()
}

/// The binds the statement for `params` needs: a column whose values did
/// not all read is bound as text (no parameters: `binds` as they are).
pub fn used_binds(params: &[Param<'_>], binds: &[Bind]) -> Vec<Bind> {
    if params.is_empty() {
        return binds.to_vec();
    }
    params
        .iter()
        .zip(binds)
        .map(|(p, &b)| if p.is_binary() { b } else { Bind::Text })
        .collect()
}

/// `array_send`'s form: dimensions, null flag, element type, then each
/// element's length (-1: NULL) and bytes.
fn binary_array(bind: Bind, values: &[Option<&str>]) -> Option<Vec<u8>> {
    let element = bind.types().0;
    let n = i32::try_from(values.len()).ok()?;
    let mut out = Vec::with_capacity(20 + values.len() * 12);
    let has_null = values.iter().any(Option::is_none);
    out.extend_from_slice(&i32::from(n > 0).to_be_bytes());
    out.extend_from_slice(&i32::from(has_null).to_be_bytes());
    out.extend_from_slice(&element.oid().to_be_bytes());
    if n > 0 {
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&1i32.to_be_bytes());
    }
    for v in values {
        match v {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(text) => {
                let at = out.len();
                out.extend_from_slice(&[0; 4]);
                bind.write(text, &mut out)?;
                let len = i32::try_from(out.len() - at - 4).ok()?;
                out[at..at + 4].copy_from_slice(&len.to_be_bytes());
            }
        }
    }
    Some(out)
}

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            Param::Text(values) => values.to_sql(ty, out),
            Param::Binary { array, bytes } => {
                if ty != array {
                    return Err(format!("a {array} parameter bound to {ty}").into());
                }
                out.put_slice(bytes);
                Ok(IsNull::No)
            }
        }
    }

    /// Checked in `to_sql`: which array type a parameter is depends on the
    /// value, not on the Rust type.
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// An integer as `int2out`/`int4out`/`int8out` write it.
fn integer<T: std::str::FromStr>(text: &str) -> Option<T> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A float as `float4out`/`float8out` write it: the shortest decimal that
/// reads back exactly (which a correctly rounded parse does), or `NaN`,
/// `Infinity`, `-Infinity`. With `extra_float_digits` below 1 the server
/// writes fewer digits; its own `float8in` reads those the same way.
fn float<T: std::str::FromStr>(text: &str) -> Option<T> {
    let plain = text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e'));
    if plain || matches!(text, "NaN" | "Infinity" | "-Infinity") {
        text.parse().ok()
    } else {
        None
    }
}

const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;
/// `NUMERIC_DSCALE_MAX`.
const NUMERIC_DSCALE_MAX: usize = 0x3FFF;
/// The most base-10000 digits `numeric_recv` takes
/// (`NUMERIC_MAX_PRECISION + NUMERIC_MAX_RESULT_SCALE`).
const NUMERIC_RECV_DIGITS: usize = 3_000;

/// `numeric_send`'s form of `numeric_out`'s text (`-?digits[.digits]`):
/// digit count, weight, sign and display scale, then base-10000 digits
/// (leading and trailing zero groups left out).
fn numeric(text: &str, out: &mut Vec<u8>) -> Option<()> {
    let special = match text {
        "NaN" => Some(NUMERIC_NAN),
        "Infinity" => Some(NUMERIC_PINF),
        "-Infinity" => Some(NUMERIC_NINF),
        _ => None,
    };
    if let Some(sign) = special {
        for v in [0u16, 0, sign, 0] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        return Some(());
    }
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty()
        || !digits_ok(int)
        || !digits_ok(frac)
        || (body.contains('.') && frac.is_empty())
    {
        return None;
    }
    let dscale = frac.len();
    if dscale > NUMERIC_DSCALE_MAX {
        return None;
    }
    let int = int.trim_start_matches('0');
    // Groups of four decimal digits, aligned on the decimal point.
    let int_groups = int.len().div_ceil(4);
    let frac_groups = frac.len().div_ceil(4);
    let mut groups: Vec<u16> = Vec::with_capacity(int_groups + frac_groups);
    let lead = int_groups * 4 - int.len();
    let mut acc = 0u16;
    for (i, b) in int.bytes().enumerate() {
        acc = acc * 10 + u16::from(b - b'0');
        if (i + lead + 1) % 4 == 0 {
            groups.push(acc);
            acc = 0;
        }
    }
    for chunk in frac.as_bytes().chunks(4) {
        let mut g = 0u16;
        for i in 0..4 {
            g = g * 10 + chunk.get(i).map_or(0, |b| u16::from(b - b'0'));
        }
        groups.push(g);
    }
    let mut weight = int_groups as i64 - 1;
    let first = groups.iter().position(|&g| g != 0);
    let (sign, weight, digits) = match first {
        None => (NUMERIC_POS, 0, &groups[..0]),
        Some(first) => {
            let last = groups.iter().rposition(|&g| g != 0).unwrap_or(first);
            weight -= first as i64;
            let sign = if negative { NUMERIC_NEG } else { NUMERIC_POS };
            (sign, weight, &groups[first..=last])
        }
    };
    if digits.len() > NUMERIC_RECV_DIGITS {
        return None;
    }
    let ndigits = i16::try_from(digits.len()).ok()?;
    let weight = i16::try_from(weight).ok()?;
    out.extend_from_slice(&ndigits.to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&(dscale as u16).to_be_bytes());
    for g in digits {
        out.extend_from_slice(&g.to_be_bytes());
    }
    Some(())
}

/// Reads `n` ASCII digits at the front of `s`.
fn fixed(s: &[u8], n: usize) -> Option<i64> {
    let digits = s.get(..n)?;
    digits.iter().try_fold(0i64, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
    })
}

/// `YYYY-MM-DD` (four or more year digits, common era) at the front of `s`:
/// days from 2000-01-01, and the rest of `s`.
fn civil_date(s: &[u8]) -> Option<(i64, &[u8])> {
    let year_len = s.iter().position(|&b| b == b'-')?;
    if !(4..=7).contains(&year_len) {
        return None;
    }
    let y = fixed(s, year_len)?;
    let rest = &s[year_len + 1..];
    let m = fixed(rest, 2)?;
    if rest.get(2) != Some(&b'-') {
        return None;
    }
    let d = fixed(&rest[3..], 2)?;
    if y < 1 || !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
        return None;
    }
    Some((days_from_civil(y, m, d) - PG_EPOCH_DAYS, &rest[5..]))
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `date_out`'s ISO form: days from 2000-01-01.
fn date(text: &str) -> Option<i32> {
    match text {
        "infinity" => return Some(i32::MAX),
        "-infinity" => return Some(i32::MIN),
        _ => {}
    }
    let (days, rest) = civil_date(text.as_bytes())?;
    if !rest.is_empty() {
        return None;
    }
    i32::try_from(days).ok()
}

/// `timestamp_out`/`timestamptz_out`'s ISO form
/// (`YYYY-MM-DD HH:MM:SS[.ffffff]`, then `±HH[:MM[:SS]]` when `zoned`):
/// microseconds from 2000-01-01 00:00 (UTC when `zoned`).
fn timestamp(text: &str, zoned: bool) -> Option<i64> {
    match text {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (days, rest) = civil_date(text.as_bytes())?;
    let rest = rest.strip_prefix(b" ")?;
    let (h, m, s) = (
        fixed(rest, 2)?,
        fixed(rest.get(3..)?, 2)?,
        fixed(rest.get(6..)?, 2)?,
    );
    if rest.get(2) != Some(&b':') || rest.get(5) != Some(&b':') || h > 23 || m > 59 || s > 59 {
        return None;
    }
    let mut rest = &rest[8..];
    let mut micros = 0i64;
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=6).contains(&n) {
            return None;
        }
        micros = fixed(frac, n)? * 10i64.pow(6 - n as u32);
        rest = &frac[n..];
    }
    let mut offset_s = 0i64;
    if zoned {
        let sign = match rest.first()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let parts: Vec<&[u8]> = rest[1..].split(|&b| b == b':').collect();
        if parts.is_empty() || parts.len() > 3 || parts.iter().any(|p| p.len() != 2) {
            return None;
        }
        let mut secs = 0;
        for (i, p) in parts.iter().enumerate() {
            secs += fixed(p, 2)? * [3600, 60, 1][i];
        }
        offset_s = sign * secs;
    } else if !rest.is_empty() {
        return None;
    }
    let us = days
        .checked_mul(DAY_US)?
        .checked_add(((h * 60 + m) * 60 + s) * 1_000_000 + micros)?
        .checked_sub(offset_s * 1_000_000)?;
    (us < TIMESTAMP_END_US).then_some(us)
}

/// `uuid_out`'s form: 32 hex digits in groups of 8-4-4-4-12.
fn uuid(text: &str) -> Option<[u8; 16]> {
    let b = text.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let mut out = [0u8; 16];
    let mut hex = b.iter().filter(|&&c| c != b'-');
    for byte in out.iter_mut() {
        let hi = (*hex.next()? as char).to_digit(16)?;
        let lo = (*hex.next()? as char).to_digit(16)?;
        *byte = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests;
