//! Reading Avro's binary encoding without building `apache_avro` values.
//!
//! `apache_avro`'s decoder resolves the writer schema's named types into a
//! hash map for every record and gives every field a freshly allocated name
//! and value; on the applier that was most of the time spent on a record.
//! Here a writer schema is compiled once (per schema id) into a [`Node`]
//! tree, and a record is read against that tree straight from the payload:
//! scalars it does not need are skipped, and column values become
//! PostgreSQL's text directly ([`text`]).

use super::avro::AvroType;
use super::pgtext;
use apache_avro::schema::{NamesRef, Namespace, ResolvedSchema, Schema};

/// The shape of one Avro value in the binary encoding (logical types keep
/// their meaning; named references are resolved).
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    Fixed(usize),
    Enum(Vec<String>),
    /// A decimal stored in `bytes`, or in a fixed of the given size.
    Decimal {
        scale: u32,
        fixed: Option<usize>,
    },
    BigDecimal,
    Uuid,
    Date,
    TimeMillis,
    TimeMicros,
    TimestampMillis,
    TimestampMicros,
    TimestampNanos,
    LocalTimestampMillis,
    LocalTimestampMicros,
    LocalTimestampNanos,
    Duration,
    Array(Box<Node>),
    Map(Box<Node>),
    Union(Vec<Node>),
    Record(Vec<(String, Node)>),
}

/// How deep named types may nest (a recursive type is refused, not looped
/// on).
const MAX_DEPTH: usize = 64;

/// Compiles a writer schema.
pub fn compile(schema: &Schema) -> Result<Node, String> {
    let resolved = ResolvedSchema::try_from(schema).map_err(|e| format!("writer schema: {e}"))?;
    node(schema, resolved.get_names(), &None, 0)
}

fn node(s: &Schema, names: &NamesRef, ns: &Namespace, depth: usize) -> Result<Node, String> {
    if depth > MAX_DEPTH {
        return Err("the writer schema nests too deeply (a recursive type?)".into());
    }
    let sub = |s: &Schema, ns: &Namespace| node(s, names, ns, depth + 1);
    Ok(match s {
        Schema::Null => Node::Null,
        Schema::Boolean => Node::Boolean,
        Schema::Int => Node::Int,
        Schema::Long => Node::Long,
        Schema::Float => Node::Float,
        Schema::Double => Node::Double,
        Schema::Bytes => Node::Bytes,
        Schema::String => Node::String,
        Schema::Fixed(f) => Node::Fixed(f.size),
        Schema::Enum(e) => Node::Enum(e.symbols.clone()),
        Schema::Decimal(d) => Node::Decimal {
            scale: u32::try_from(d.scale).map_err(|_| "decimal scale out of range")?,
            fixed: match d.inner.as_ref() {
                Schema::Fixed(f) => Some(f.size),
                _ => None,
            },
        },
        Schema::BigDecimal => Node::BigDecimal,
        Schema::Uuid => Node::Uuid,
        Schema::Date => Node::Date,
        Schema::TimeMillis => Node::TimeMillis,
        Schema::TimeMicros => Node::TimeMicros,
        Schema::TimestampMillis => Node::TimestampMillis,
        Schema::TimestampMicros => Node::TimestampMicros,
        Schema::TimestampNanos => Node::TimestampNanos,
        Schema::LocalTimestampMillis => Node::LocalTimestampMillis,
        Schema::LocalTimestampMicros => Node::LocalTimestampMicros,
        Schema::LocalTimestampNanos => Node::LocalTimestampNanos,
        Schema::Duration => Node::Duration,
        Schema::Array(a) => Node::Array(Box::new(sub(&a.items, ns)?)),
        Schema::Map(m) => Node::Map(Box::new(sub(&m.types, ns)?)),
        Schema::Union(u) => Node::Union(
            u.variants()
                .iter()
                .map(|v| sub(v, ns))
                .collect::<Result<_, _>>()?,
        ),
        Schema::Record(r) => {
            let inner = r.name.fully_qualified_name(ns).namespace;
            Node::Record(
                r.fields
                    .iter()
                    .map(|f| Ok((f.name.clone(), sub(&f.schema, &inner)?)))
                    .collect::<Result<_, String>>()?,
            )
        }
        Schema::Ref { name } => {
            let full = name.fully_qualified_name(ns);
            let target = names
                .get(&full)
                .ok_or_else(|| format!("the writer schema names an unknown type {full}"))?;
            node(target, names, &full.namespace, depth + 1)?
        }
    })
}

/// A cursor over one datum.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

const TRUNCATED: &str = "the record ends early";

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or(TRUNCATED)?;
        let out = self.buf.get(self.pos..end).ok_or(TRUNCATED)?;
        self.pos = end;
        Ok(out)
    }

    /// A zig-zag varint (`int` and `long` alike).
    pub fn long(&mut self) -> Result<i64, String> {
        let mut n: u64 = 0;
        for i in 0..10 {
            let b = *self.buf.get(self.pos).ok_or(TRUNCATED)?;
            self.pos += 1;
            n |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok((n >> 1) as i64 ^ -((n & 1) as i64));
            }
        }
        Err("a varint longer than ten bytes".into())
    }

    pub fn int(&mut self) -> Result<i32, String> {
        i32::try_from(self.long()?).map_err(|_| "an int out of range".to_string())
    }

    fn len(&mut self) -> Result<usize, String> {
        usize::try_from(self.long()?).map_err(|_| "a negative length".to_string())
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.len()?;
        self.take(n)
    }

    pub fn str(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|_| "a string that is not UTF-8".to_string())
    }

    fn boolean(&mut self) -> Result<bool, String> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("a boolean byte {b}")),
        }
    }

    /// The variant a union value takes.
    pub fn variant<'n>(&mut self, variants: &'n [Node]) -> Result<&'n Node, String> {
        let i = self.long()?;
        usize::try_from(i)
            .ok()
            .and_then(|i| variants.get(i))
            .ok_or_else(|| format!("union index {i} out of range"))
    }

    /// The item count of the next block of an array or map (0: the end). A
    /// block written with its byte size (a negative count) has it skipped.
    fn block(&mut self) -> Result<usize, String> {
        let n = self.long()?;
        if n < 0 {
            self.len()?;
        }
        usize::try_from(n.unsigned_abs()).map_err(|_| "a block count out of range".to_string())
    }

    /// Calls `item` for each item of an array.
    pub fn items(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        loop {
            let n = self.block()?;
            if n == 0 {
                return Ok(());
            }
            for _ in 0..n {
                item(self)?;
            }
        }
    }

    /// Reads past one value.
    pub fn skip(&mut self, node: &Node) -> Result<(), String> {
        match node {
            Node::Null => {}
            Node::Boolean => {
                self.take(1)?;
            }
            Node::Int
            | Node::Long
            | Node::Enum(_)
            | Node::Date
            | Node::TimeMillis
            | Node::TimeMicros
            | Node::TimestampMillis
            | Node::TimestampMicros
            | Node::TimestampNanos
            | Node::LocalTimestampMillis
            | Node::LocalTimestampMicros
            | Node::LocalTimestampNanos => {
                self.long()?;
            }
            Node::Float => {
                self.take(4)?;
            }
            Node::Double => {
                self.take(8)?;
            }
            Node::Duration => {
                self.take(12)?;
            }
            Node::Fixed(n) | Node::Decimal { fixed: Some(n), .. } => {
                self.take(*n)?;
            }
            Node::Bytes
            | Node::String
            | Node::Uuid
            | Node::BigDecimal
            | Node::Decimal { fixed: None, .. } => {
                self.bytes()?;
            }
            Node::Array(inner) => self.items(|r| r.skip(inner))?,
            Node::Map(inner) => self.items(|r| {
                r.bytes()?;
                r.skip(inner)
            })?,
            Node::Union(variants) => {
                let v = self.variant(variants)?;
                self.skip(v)?;
            }
            Node::Record(fields) => {
                for (_, f) in fields {
                    self.skip(f)?;
                }
            }
        }
        Ok(())
    }

    /// Where the reader is (for [`Self::at`]).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// A reader of the same datum from `pos` on.
    pub fn at(&self, pos: usize) -> Reader<'a> {
        Reader { buf: self.buf, pos }
    }

    /// A long, or `None` for a null (a union picks the variant; any other
    /// value is read past and gives `None`).
    pub fn opt_long(&mut self, node: &Node) -> Result<Option<i64>, String> {
        match node {
            Node::Int | Node::Long => self.long().map(Some),
            Node::Union(variants) => {
                let v = self.variant(variants)?;
                self.opt_long(v)
            }
            other => self.skip(other).map(|_| None),
        }
    }

    /// The strings of an array of strings (empty for a null or any other
    /// value, which is read past).
    pub fn strings(&mut self, node: &Node) -> Result<Vec<&'a str>, String> {
        match node {
            Node::Array(inner) if **inner == Node::String => {
                let mut out = Vec::new();
                self.items(|r| {
                    out.push(r.str()?);
                    Ok(())
                })?;
                Ok(out)
            }
            Node::Union(variants) => {
                let v = self.variant(variants)?;
                self.strings(v)
            }
            other => self.skip(other).map(|_| Vec::new()),
        }
    }
}

/// PostgreSQL's text of the value `node` describes (`None`: NULL). `hint`
/// is the column's type at the consumer: it says how to read bytes that
/// carry no logical type of their own (a decimal), and what an array holds.
pub fn text(r: &mut Reader, node: &Node, hint: &AvroType) -> Result<Option<String>, String> {
    Ok(Some(match (node, hint) {
        (Node::Null, _) => return Ok(None),
        (Node::Union(variants), _) => {
            let v = r.variant(variants)?;
            return text(r, v, hint);
        }
        (Node::Int, _) => pgtext::integer(i64::from(r.int()?)),
        (Node::Long, _) => pgtext::integer(r.long()?),
        (Node::Boolean, _) => if r.boolean()? { "t" } else { "f" }.to_string(),
        (Node::Float, _) => {
            let b: [u8; 4] = r.take(4)?.try_into().map_err(|_| TRUNCATED)?;
            f32::from_le_bytes(b).to_string()
        }
        (Node::Double, _) => {
            let b: [u8; 8] = r.take(8)?.try_into().map_err(|_| TRUNCATED)?;
            f64::from_le_bytes(b).to_string()
        }
        (Node::String, _) => r.str()?.to_string(),
        (Node::Enum(symbols), _) => {
            let i = r.long()?;
            usize::try_from(i)
                .ok()
                .and_then(|i| symbols.get(i))
                .ok_or_else(|| format!("enum index {i} out of range"))?
                .clone()
        }
        (Node::Uuid, _) => match r.bytes()? {
            b if b.len() == 16 => pgtext::uuid(b),
            b => std::str::from_utf8(b)
                .map_err(|_| "a uuid that is not UTF-8".to_string())?
                .to_string(),
        },
        (Node::Decimal { scale, fixed }, _) => {
            let bytes = match fixed {
                Some(n) => r.take(*n)?,
                None => r.bytes()?,
            };
            pgtext::decimal(bytes, *scale)?
        }
        (Node::Bytes, AvroType::Decimal { scale, .. }) => pgtext::decimal(r.bytes()?, *scale)?,
        (Node::Bytes, _) => pgtext::hex(r.bytes()?),
        (Node::Date, _) => pgtext::date(i64::from(r.int()?)),
        (Node::TimeMicros, _) => pgtext::clock(r.long()?),
        (Node::TimestampMicros, _) => pgtext::timestamp(r.long()?, true),
        (Node::LocalTimestampMicros, _) => pgtext::timestamp(r.long()?, false),
        (Node::Array(inner), AvroType::Array(inner_hint)) => {
            let mut out = String::from("{");
            r.items(|r| {
                if out.len() > 1 {
                    out.push(',');
                }
                match text(r, inner, inner_hint)? {
                    None => out.push_str("NULL"),
                    Some(s) => {
                        out.push('"');
                        for c in s.chars() {
                            if c == '\\' || c == '"' {
                                out.push('\\');
                            }
                            out.push(c);
                        }
                        out.push('"');
                    }
                }
                Ok(())
            })?;
            out.push('}');
            out
        }
        (node, hint) => return Err(format!("an Avro {node:?} does not fit {hint:?}")),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value;
    use apache_avro::Schema;

    fn datum(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        super::super::wire::encode(v, &mut out).unwrap();
        out
    }

    #[test]
    fn text_round_trips_through_avro() {
        let cases = [
            ("bigint", "-42"),
            ("integer", "2147483647"),
            ("boolean", "f"),
            ("real", "1.5"),
            ("double precision", "-2.25"),
            ("numeric(10,2)", "-0.05"),
            ("numeric(10,2)", "123.40"),
            ("numeric(6,0)", "7"),
            ("numeric", "3.14159"),
            ("bytea", "\\x00ff10"),
            ("jsonb", r#"{"a": [1, 2]}"#),
            ("date", "1999-12-31"),
            ("timestamp with time zone", "2024-02-29 23:59:59.000001+00"),
            ("timestamp without time zone", "1970-01-01 00:00:00"),
            ("time without time zone", "13:14:15.5"),
            ("uuid", "0b8f6c7e-8f3a-4a7e-9a51-2c1a3e0d9f10"),
            ("text[]", r#"{"a b","c\"d",NULL}"#),
            ("numeric(8,3)[]", r#"{"1.500",NULL,"-2.000"}"#),
        ];
        for (ty, input) in cases {
            let t = AvroType::of(ty, false).expect(ty);
            let node = compile(&Schema::parse(&t.schema()).unwrap()).unwrap();
            let v = t.value(input).expect(input);
            let bytes = datum(&v);
            let mut r = Reader::new(&bytes);
            let back = text(&mut r, &node, &t).expect("text").expect("not null");
            assert_eq!(r.position(), bytes.len(), "{ty}: the whole datum is read");
            let again = t.value(&back).expect("re-read");
            assert_eq!(again, v, "{ty}: {input} -> {back}");
        }
        let t = AvroType::of("time without time zone", false).unwrap();
        let node = compile(&Schema::parse(&t.schema()).unwrap()).unwrap();
        let bytes = datum(&t.value("13:14:15.5").unwrap());
        let text = text(&mut Reader::new(&bytes), &node, &t).unwrap();
        assert_eq!(text.as_deref(), Some("13:14:15.500000"));
    }
}
