use super::*;

fn numeric_parts(text: &str) -> Option<(i16, i16, u16, u16, Vec<u16>)> {
    let mut out = Vec::new();
    numeric(text, &mut out)?;
    let w: Vec<u16> = out
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((w[0] as i16, w[1] as i16, w[2], w[3], w[4..].to_vec()))
}

#[test]
fn column_types_pick_their_binds() {
    assert_eq!(Bind::of("bigint"), Bind::Int8);
    assert_eq!(Bind::of("numeric(12,2)"), Bind::Numeric);
    assert_eq!(Bind::of("timestamp(3) with time zone"), Bind::Timestamptz);
    assert_eq!(Bind::of("timestamp without time zone"), Bind::Timestamp);
    assert_eq!(Bind::of("double precision"), Bind::Float8);
    for other in [
        "text",
        "bigint[]",
        "jsonb",
        "public.money_amount",
        "character varying(20)",
        "\"bigint\"",
    ] {
        assert_eq!(Bind::of(other), Bind::Text, "{other}");
    }
}

#[test]
fn integers_read_only_as_written() {
    assert_eq!(integer::<i64>("-9223372036854775808"), Some(i64::MIN));
    assert_eq!(integer::<i16>("32767"), Some(i16::MAX));
    for bad in ["32768", "+1", "1.0", "", "-", " 1", "1e3"] {
        assert_eq!(integer::<i16>(bad), None, "{bad}");
    }
}

#[test]
fn floats_keep_their_bits() {
    assert_eq!(float::<f64>("0.1"), Some(0.1));
    assert_eq!(
        float::<f64>("-0").map(f64::to_bits),
        Some((-0.0f64).to_bits())
    );
    assert_eq!(float::<f64>("1e+300"), Some(1e300));
    assert_eq!(float::<f64>("Infinity"), Some(f64::INFINITY));
    assert!(float::<f64>("NaN").is_some_and(f64::is_nan));
    assert_eq!(float::<f32>("3.4028235e+38"), Some(f32::MAX));
    for bad in ["inf", "nan", "0x10", "1,5", ""] {
        assert_eq!(float::<f64>(bad), None, "{bad}");
    }
}

#[test]
fn numerics_in_base_ten_thousand() {
    assert_eq!(numeric_parts("123.45"), Some((2, 0, 0, 2, vec![123, 4500])));
    assert_eq!(
        numeric_parts("1234567.89"),
        Some((3, 1, 0, 2, vec![123, 4567, 8900]))
    );
    assert_eq!(numeric_parts("0"), Some((0, 0, 0, 0, vec![])));
    assert_eq!(numeric_parts("0.00"), Some((0, 0, 0, 2, vec![])));
    assert_eq!(
        numeric_parts("-0.001"),
        Some((1, -1, NUMERIC_NEG, 3, vec![10]))
    );
    assert_eq!(numeric_parts("0.00000001"), Some((1, -2, 0, 8, vec![1])));
    assert_eq!(numeric_parts("10000"), Some((1, 1, 0, 0, vec![1])));
    assert_eq!(
        numeric_parts("100000000.0001"),
        Some((4, 2, 0, 4, vec![1, 0, 0, 1]))
    );
    assert_eq!(numeric_parts("NaN"), Some((0, 0, NUMERIC_NAN, 0, vec![])));
    assert_eq!(
        numeric_parts("-Infinity"),
        Some((0, 0, NUMERIC_NINF, 0, vec![]))
    );
    for bad in [".5", "5.", "1e5", "+1", "--1", "1.2.3", "", "١٢"] {
        assert_eq!(numeric_parts(bad), None, "{bad}");
    }
}

#[test]
fn dates_count_days_from_2000() {
    assert_eq!(date("2000-01-01"), Some(0));
    assert_eq!(date("1999-12-31"), Some(-1));
    assert_eq!(date("2000-03-01"), Some(60));
    assert_eq!(date("2024-02-29"), Some(8825));
    assert_eq!(date("0001-01-01"), Some(-730_119));
    assert_eq!(date("infinity"), Some(i32::MAX));
    for bad in [
        "2023-02-29",
        "2000-13-01",
        "2000-1-01",
        "01/01/2000",
        "2000-01-01 BC",
        "200-01-01",
        "2000-01-01 ",
    ] {
        assert_eq!(date(bad), None, "{bad}");
    }
}

#[test]
fn timestamps_count_microseconds_from_2000() {
    assert_eq!(timestamp("2000-01-01 00:00:00", false), Some(0));
    assert_eq!(timestamp("2000-01-01 00:00:01.5", false), Some(1_500_000));
    assert_eq!(timestamp("1999-12-31 23:59:59.999999", false), Some(-1));
    assert_eq!(timestamp("2000-01-01 01:00:00+01", true), Some(0));
    assert_eq!(timestamp("1999-12-31 23:00:00-01", true), Some(0));
    assert_eq!(timestamp("2000-01-01 05:30:00+05:30", true), Some(0));
    assert_eq!(
        timestamp("2000-01-01 00:00:00-00:00:15", true),
        Some(15_000_000)
    );
    assert_eq!(
        timestamp("294276-12-31 23:59:59.999999+00", true),
        Some(TIMESTAMP_END_US - 1)
    );
    assert_eq!(timestamp("-infinity", true), Some(i64::MIN));
    for (bad, zoned) in [
        ("2000-01-01 00:00:00", true),
        ("2000-01-01 00:00:00+00", false),
        ("2000-01-01T00:00:00+00", true),
        ("Sat Jan 01 00:00:00 2000 UTC", true),
        ("2000-01-01 24:00:00+00", true),
        ("2000-01-01 00:00:00.1234567+00", true),
        ("2000-01-01 00:00:00.+00", true),
        ("2000-01-01 00:00:00+00 BC", true),
        ("2000-01-01 00:00:00 BC", false),
        ("2000-01-01 00:00:00+0", true),
        ("2000-01-01 00:00:00 UTC", true),
    ] {
        assert_eq!(timestamp(bad, zoned), None, "{bad}");
    }
}

#[test]
fn uuids_read_as_sixteen_bytes() {
    let u = uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap_or_default();
    assert_eq!(u[0], 0xa0);
    assert_eq!(u[15], 0x11);
    assert_eq!(uuid("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"), Some(u));
    for bad in [
        "a0eebc999c0b4ef8bb6d6bb9bd380a11",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1g",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1-",
    ] {
        assert_eq!(uuid(bad), None, "{bad}");
    }
}

#[test]
fn arrays_in_array_send_form_and_text_when_a_value_does_not_read() {
    let Param::Binary { array, bytes } = column(Bind::Int4, vec![Some("7"), None]) else {
        panic!("expected a binary array");
    };
    assert_eq!(array, Type::INT4_ARRAY);
    let words: Vec<i32> = bytes
        .chunks(4)
        .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    // ndim, has-null, element type, length, lower bound, then (len, value), (-1).
    assert_eq!(words, vec![1, 1, 23, 2, 1, 4, 7, -1]);
    assert!(
        matches!(column(Bind::Int4, vec![Some("7"), Some("x")]), Param::Text(v) if v.len() == 2)
    );
    assert!(matches!(
        column(Bind::Text, vec![Some("7")]),
        Param::Text(_)
    ));
    let Param::Binary { bytes, .. } = column(Bind::Date, vec![]) else {
        panic!("expected a binary array");
    };
    assert_eq!(bytes.len(), 12, "an empty array has no dimensions");
}
