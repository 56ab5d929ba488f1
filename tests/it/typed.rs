//! The sink's binary array parameters (`sink::postgres::typed`) against the
//! server's own text casts: for every type it binds in binary, edge values
//! and series are written out by the server, read back by the sink's
//! readers, and the array bound that way must equal (as text, so that `-0`,
//! display scales and offsets count) the same text cast by the server. What
//! a reader must not take (another `DateStyle`, dates before the common era,
//! numerics too long for `numeric_recv`) falls back to text.

use crate::support::*;
use rowshift::sink::postgres::typed::{self, Bind, Param};
use tokio_postgres::Client;

const MAIN: &str = "ROWSHIFT_TEST_PG_PORT";

/// The server's text of each value of `values` (an array expression of `ty`).
async fn texts(c: &Client, ty: &str, values: &str) -> Vec<Option<String>> {
    c.query(
        // As the type's output function writes it (what pgoutput sends;
        // `bool::text` would write `true`).
        &format!("SELECT CASE WHEN v IS NOT NULL THEN format('%s', v) END FROM unnest(({values})::{ty}[]) AS v"),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("{ty} values: {e}"))
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Binds `values` both ways and compares; returns whether they went binary.
async fn same_both_ways(c: &Client, bind: Bind, ty: &str, values: &str) -> bool {
    let texts = texts(c, ty, values).await;
    assert!(!texts.is_empty(), "{ty}: no values");
    let refs: Vec<Option<&str>> = texts.iter().map(|t| t.as_deref()).collect();
    let param = typed::column(bind, refs.clone());
    let binary = param.is_binary();
    let arr = if binary { bind.array_sql() } else { "text[]" };
    let row = c
        .query_one(
            &format!("SELECT ($1::{arr})::{ty}[]::text, ($2::text[])::{ty}[]::text"),
            &[&param, &refs],
        )
        .await
        .unwrap_or_else(|e| panic!("{ty}: {e}: {:?}", e.as_db_error().map(|d| d.message())));
    let (ours, theirs): (String, String) = (row.get(0), row.get(1));
    assert_eq!(
        ours, theirs,
        "{ty}: the binary array differs from the server's cast"
    );
    binary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_parameters_equal_the_servers_casts() {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    c.batch_execute("SET DateStyle = ISO; SET TimeZone = 'UTC'; SET extra_float_digits = 1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let series = |expr: &str, n: u32| {
        format!("(SELECT array_agg({expr}) FROM generate_series(1, {n}) AS g)")
    };
    let cases: Vec<(Bind, &str, String)> = vec![
        (Bind::Int2, "smallint", "ARRAY[-32768, 32767, 0, -1, NULL]".into()),
        (Bind::Int4, "integer", "ARRAY[-2147483648, 2147483647, 0, 7]".into()),
        (Bind::Int8, "bigint", "ARRAY[-9223372036854775808, 9223372036854775807, 0, -42]".into()),
        (Bind::Int8, "bigint", series("(random() * 1e18)::bigint - 5e17::bigint", 500)),
        (Bind::Bool, "boolean", "ARRAY[true, false, NULL]".into()),
        (Bind::Float4, "real", "ARRAY['NaN', 'Infinity', '-Infinity', '-0', '1.17549435e-38', '3.4028235e38', '1e-45', '0.1']".into()),
        (Bind::Float4, "real", series("(random() * 1e6)::real / 7", 500)),
        (Bind::Float8, "double precision", "ARRAY['NaN', '-Infinity', '-0', '5e-324', '1.7976931348623157e308', '0.1', '1e22', '123456789.125']".into()),
        (Bind::Float8, "double precision", series("random() * power(10, (random() * 600 - 300)::int)", 500)),
        (Bind::Numeric, "numeric", "ARRAY['0', '0.00', '-0.001', '123456789012345678901234567890.123456789', 'NaN', 'Infinity', '-Infinity', '0.00000000000000000001', '99999999', '10000', '1.0000', '-10000.0001', '5', NULL]".into()),
        (Bind::Numeric, "numeric", "ARRAY[repeat('9', 1000) || '.' || repeat('1', 999)]".into()),
        (Bind::Numeric, "numeric", series("round((random() * 1e9 - 5e8)::numeric, (g % 12))", 500)),
        (Bind::Numeric, "numeric(12,2)", series("round((random() * 1e9)::numeric, 2)", 200)),
        (Bind::Date, "date", "ARRAY['2000-01-01', '0001-01-01', '5874897-12-31', 'infinity', '-infinity', '1999-12-31', '2024-02-29', '1900-02-28']".into()),
        (Bind::Date, "date", series("date '1600-01-01' + g * 29", 5000)),
        (Bind::Timestamp, "timestamp", "ARRAY['0001-01-01 00:00:00', '294276-12-31 23:59:59.999999', 'infinity', '-infinity', '2000-01-01 00:00:00.000001', '1999-12-31 23:59:59.5']".into()),
        (Bind::Timestamp, "timestamp", series("timestamp '1800-01-01' + g * interval '12345 minutes 6.789012 seconds'", 3000)),
        (Bind::Uuid, "uuid", "ARRAY['00000000-0000-0000-0000-000000000000', 'ffffffff-ffff-ffff-ffff-ffffffffffff']".into()),
        (Bind::Uuid, "uuid", series("md5(g::text)::uuid", 300)),
    ];
    for (bind, ty, values) in &cases {
        assert!(
            same_both_ways(&c, *bind, ty, values).await,
            "{ty} {values}: expected binary"
        );
    }
    // Time zones with minutes and seconds in their offsets (local mean
    // time before 1900), and ones west of Greenwich.
    let zoned = [
        "ARRAY['0001-01-02 12:00:00+00', '294276-12-31 23:59:59.999999+00', 'infinity', '2000-01-01 00:00:00.000001+00']",
        "(SELECT array_agg(timestamptz '1850-01-01 00:00:00+00' + g * interval '9876 minutes 5.4321 seconds') FROM generate_series(1, 3000) AS g)",
    ];
    for zone in [
        "UTC",
        "Asia/Kolkata",
        "America/St_Johns",
        "Europe/Amsterdam",
        "Pacific/Chatham",
        "America/Los_Angeles",
    ] {
        c.batch_execute(&format!("SET TimeZone = '{zone}'"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for values in zoned {
            assert!(
                same_both_ways(&c, Bind::Timestamptz, "timestamptz", values).await,
                "timestamptz in {zone}: expected binary"
            );
        }
    }
    // What the readers must not take goes as text, and still lands right.
    let refused: Vec<(Bind, &str, &str)> = vec![
        (Bind::Date, "date", "ARRAY['2000-01-01', '0044-03-15 BC']"),
        (
            Bind::Timestamptz,
            "timestamptz",
            "ARRAY['2000-01-01 00:00:00+00', '0044-03-15 12:00:00+00 BC']",
        ),
        (Bind::Numeric, "numeric", "ARRAY[repeat('7', 13000)]"),
    ];
    for (bind, ty, values) in refused {
        assert!(
            !same_both_ways(&c, bind, ty, values).await,
            "{ty} {values}: expected text"
        );
    }
    c.batch_execute("SET DateStyle = 'SQL, DMY'")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !same_both_ways(
            &c,
            Bind::Timestamptz,
            "timestamptz",
            "ARRAY['2020-03-08 10:30:00+00', '2020-07-01 00:00:00.25+00']"
        )
        .await,
        "timestamps in another DateStyle must go as text"
    );
    assert!(!same_both_ways(&c, Bind::Date, "date", "ARRAY['2000-01-31']").await);
    let _: Param = typed::column(Bind::Text, vec![Some("x")]);
}
