use super::*;
use apache_avro::{from_avro_datum, to_avro_datum, Schema};

fn round_trip(t: &AvroType, text: &str) -> Value {
    let schema = Schema::parse(&json!(["null", t.schema()])).expect("schema");
    let v = Value::Union(1, Box::new(t.value(text).expect("value")));
    let bytes = to_avro_datum(&schema, v).expect("encode");
    from_avro_datum(&schema, &mut bytes.as_slice(), None).expect("decode")
}

fn inner(v: Value) -> Value {
    match v {
        Value::Union(_, b) => *b,
        other => other,
    }
}

#[test]
fn types_map_and_round_trip() {
    let t = |s: &str| AvroType::of(s, false).expect(s);
    assert_eq!(inner(round_trip(&t("bigint"), "-42")), Value::Long(-42));
    assert_eq!(inner(round_trip(&t("boolean"), "t")), Value::Boolean(true));
    assert_eq!(
        inner(round_trip(&t("text"), "o'brien")),
        Value::String("o'brien".into())
    );
    assert_eq!(
        inner(round_trip(&t("bytea"), "\\x00ff10")),
        Value::Bytes(vec![0, 255, 16])
    );
    assert_eq!(inner(round_trip(&t("date"), "1970-01-02")), Value::Date(1));
    assert_eq!(
        inner(round_trip(
            &t("timestamp with time zone"),
            "2024-01-01 01:00:00.5+01"
        )),
        Value::TimestampMicros(1_704_067_200_500_000)
    );
    assert_eq!(
        inner(round_trip(
            &t("timestamp without time zone"),
            "2024-01-01 00:00:00"
        )),
        Value::LocalTimestampMicros(1_704_067_200_000_000)
    );
    assert_eq!(
        inner(round_trip(&t("time without time zone"), "00:00:01.25")),
        Value::TimeMicros(1_250_000)
    );
    let d = inner(round_trip(&t("numeric(12,2)"), "-1.5"));
    assert_eq!(
        d,
        Value::Decimal(vec![0xff, 0x6a].into()),
        "-150 in two's complement"
    );
    assert!(matches!(
        inner(round_trip(
            &t("uuid"),
            "0b8f6c7e-8f3a-4a7e-9a51-2c1a3e0d9f10"
        )),
        Value::Uuid(_)
    ));
    let arr = inner(round_trip(&t("integer[]"), "{1,NULL,3}"));
    assert_eq!(
        arr,
        Value::Array(vec![
            Value::Union(1, Box::new(Value::Int(1))),
            Value::Union(0, Box::new(Value::Null)),
            Value::Union(1, Box::new(Value::Int(3)))
        ])
    );
    assert_eq!(AvroType::of("numeric", false), Some(AvroType::String));
    assert_eq!(AvroType::of("point", false), None);
    assert_eq!(AvroType::of("integer[][]", false), None);
    assert_eq!(AvroType::of("mood", true), Some(AvroType::String));
}

#[test]
fn text_arrays_with_quotes_and_escapes() {
    assert_eq!(
        array_elements(r#"{a,"b c","d\"e",NULL,"NULL"}"#).unwrap(),
        vec![
            Some("a".into()),
            Some("b c".into()),
            Some("d\"e".into()),
            None,
            Some("NULL".into())
        ]
    );
    assert_eq!(array_elements("{}").unwrap(), Vec::<Option<String>>::new());
}

#[test]
fn decimals_are_shortest_twos_complement_at_the_scale() {
    assert_eq!(decimal_bytes("1.5", 2).unwrap(), vec![0x00, 0x96]);
    assert_eq!(decimal_bytes("0", 2).unwrap(), vec![0]);
    assert_eq!(decimal_bytes("1.27", 2).unwrap(), vec![0x7f]);
    assert_eq!(decimal_bytes("1.28", 2).unwrap(), vec![0x00, 0x80]);
    assert!(decimal_bytes("1.234", 2).is_err());
    assert!(decimal_bytes("NaN", 2).is_err());
}
