//! PostgreSQL's text for the values Avro carries as numbers or bytes
//! (decimal, date, time, timestamp, uuid, bytea), as the applier hands them
//! to the sink.
//!
//! Every record of a table with such columns goes through here, so each
//! value is written digit by digit into one string, without the formatting
//! machinery or intermediate strings.

use crate::calendar;

/// The decimal digits of `n` (most significant first), in a buffer of its own.
struct Digits {
    buf: [u8; 40],
    start: usize,
}

impl Digits {
    fn of(n: u128) -> Digits {
        let mut buf = [b'0'; 40];
        let mut start = buf.len();
        let mut wide = n;
        while wide > u128::from(u64::MAX) {
            start -= 1;
            buf[start] = b'0' + (wide % 10) as u8;
            wide /= 10;
        }
        let mut n = wide as u64;
        loop {
            start -= 1;
            buf[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        Digits { buf, start }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Appends `n`, zero-padded to at least `width` digits.
fn push_padded(out: &mut String, n: u64, width: usize) {
    let d = Digits::of(u128::from(n));
    let digits = d.bytes();
    out.extend(std::iter::repeat_n('0', width.saturating_sub(digits.len())));
    out.extend(digits.iter().map(|&b| char::from(b)));
}

/// An integer.
pub fn integer(n: i64) -> String {
    let d = Digits::of(u128::from(n.unsigned_abs()));
    let digits = d.bytes();
    let mut s = String::with_capacity(digits.len() + 1);
    if n < 0 {
        s.push('-');
    }
    s.extend(digits.iter().map(|&b| char::from(b)));
    s
}

/// Appends a byte as two lower-case hex digits.
fn push_hex(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

/// bytea's hex text.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("\\x");
    for &b in bytes {
        push_hex(&mut s, b);
    }
    s
}

/// A uuid written as its 16 bytes, in the usual hyphenated text
/// (8-4-4-4-12 hex digits).
pub fn uuid(b: &[u8]) -> String {
    let mut s = String::with_capacity(36);
    for (i, &byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        push_hex(&mut s, byte);
    }
    s
}

/// An Avro decimal (big-endian two's complement, at most 16 bytes) with
/// `scale` digits after the point.
pub fn decimal(bytes: &[u8], scale: u32) -> Result<String, String> {
    if bytes.is_empty() || bytes.len() > 16 {
        return Err("decimal out of range".into());
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xff } else { 0 };
    let mut buf = [fill; 16];
    buf[16 - bytes.len()..].copy_from_slice(bytes);
    let n = i128::from_be_bytes(buf);
    let d = Digits::of(n.unsigned_abs());
    let digits = d.bytes();
    let scale = scale as usize;
    // At least one digit before the point.
    let width = digits.len().max(scale + 1);
    let int_len = width - scale;
    let mut s = String::with_capacity(width + 2);
    if n < 0 {
        s.push('-');
    }
    let padded = std::iter::repeat_n(b'0', width - digits.len()).chain(digits.iter().copied());
    for (i, c) in padded.enumerate() {
        if i == int_len {
            s.push('.');
        }
        s.push(char::from(c));
    }
    Ok(s)
}

fn push_date(out: &mut String, days: i64) {
    let (y, m, d) = calendar::civil_from_days(days);
    // Four characters for the year, a minus sign included.
    if y < 0 {
        out.push('-');
        push_padded(out, y.unsigned_abs(), 3);
    } else {
        push_padded(out, y.unsigned_abs(), 4);
    }
    out.push('-');
    push_padded(out, m, 2);
    out.push('-');
    push_padded(out, d, 2);
}

/// A time of day in microseconds (0 to 24:00:00).
fn push_clock(out: &mut String, us: i64) {
    let (secs, micros) = (us.div_euclid(1_000_000), us.rem_euclid(1_000_000));
    let secs = secs.unsigned_abs();
    push_padded(out, secs / 3600, 2);
    out.push(':');
    push_padded(out, secs / 60 % 60, 2);
    out.push(':');
    push_padded(out, secs % 60, 2);
    if micros != 0 {
        out.push('.');
        push_padded(out, micros.unsigned_abs(), 6);
    }
}

/// A date: days from 1970-01-01 (Avro's `date`), or ±infinity.
pub fn date(days: i64) -> String {
    match days {
        d if d == i64::from(i32::MAX) => "infinity".into(),
        d if d == i64::from(i32::MIN) => "-infinity".into(),
        d => {
            let mut s = String::with_capacity(10);
            push_date(&mut s, d);
            s
        }
    }
}

/// A time of day from microseconds after midnight.
pub fn clock(us: i64) -> String {
    let mut s = String::with_capacity(15);
    push_clock(&mut s, us);
    s
}

/// A timestamp from microseconds after 1970-01-01 00:00, or ±infinity;
/// `utc` appends the zone (`timestamptz` read as UTC).
pub fn timestamp(us: i64, utc: bool) -> String {
    match us {
        i64::MAX => "infinity".into(),
        i64::MIN => "-infinity".into(),
        us => {
            let mut s = String::with_capacity(29);
            push_date(&mut s, us.div_euclid(86_400_000_000));
            s.push(' ');
            push_clock(&mut s, us.rem_euclid(86_400_000_000));
            if utc {
                s.push_str("+00");
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_read_as_postgres_writes_them() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(-1), "1969-12-31");
        assert_eq!(date(10_956), "1999-12-31");
        assert_eq!(date(11_016), "2000-02-29");
        assert_eq!(date(-719_162), "0001-01-01");
        assert_eq!(date(-719_163), "0000-12-31");
        assert_eq!(date(-719_529), "-001-12-31");
        assert_eq!(date(2_932_897), "10000-01-01");
        assert_eq!(date(i64::from(i32::MAX)), "infinity");
        assert_eq!(date(i64::from(i32::MIN)), "-infinity");
        assert_eq!(clock(0), "00:00:00");
        assert_eq!(clock(86_400_000_000), "24:00:00");
        assert_eq!(clock(47_655_500_000), "13:14:15.500000");
        assert_eq!(clock(1), "00:00:00.000001");
        assert_eq!(timestamp(0, false), "1970-01-01 00:00:00");
        assert_eq!(timestamp(-1, true), "1969-12-31 23:59:59.999999+00");
        assert_eq!(
            timestamp(1_709_251_199_000_001, true),
            "2024-02-29 23:59:59.000001+00"
        );
        assert_eq!(timestamp(i64::MAX, true), "infinity");
        assert_eq!(timestamp(i64::MIN, false), "-infinity");
    }

    #[test]
    fn every_day_of_four_centuries_is_written_as_its_calendar_date() {
        // From 1900-01-01 on; the calendar's own test checks the dates
        // day by day, this one the text.
        for days in -25_567..(-25_567 + 146_097) {
            let (y, m, d) = calendar::civil_from_days(days);
            assert_eq!(date(days), format!("{y:04}-{m:02}-{d:02}"), "day {days}");
        }
        assert_eq!(date(-25_567), "1900-01-01");
        assert_eq!(date(-25_567 + 146_096), "2299-12-31");
    }

    #[test]
    fn decimals_keep_their_scale_and_sign() {
        let dec = |n: i128, scale: u32| {
            let bytes = n.to_be_bytes();
            // The shortest two's complement, as Avro writes it.
            let skip = (0..15)
                .take_while(|&i| {
                    let (b, next) = (bytes[i], bytes[i + 1]);
                    (b == 0 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0)
                })
                .count();
            decimal(&bytes[skip..], scale).unwrap()
        };
        assert_eq!(dec(-5, 2), "-0.05");
        assert_eq!(dec(12_340, 2), "123.40");
        assert_eq!(dec(7, 0), "7");
        assert_eq!(dec(0, 3), "0.000");
        assert_eq!(dec(-1_500, 3), "-1.500");
        assert_eq!(dec(314_159, 5), "3.14159");
        assert_eq!(dec(i128::MAX, 0), i128::MAX.to_string());
        assert_eq!(
            dec(i128::MIN, 38),
            "-1.70141183460469231731687303715884105728"
        );
        assert_eq!(dec(42, 45), format!("0.{}42", "0".repeat(43)));
        assert!(decimal(&[], 2).is_err());
        assert!(decimal(&[1; 17], 2).is_err());
    }

    #[test]
    fn integers_as_display_writes_them() {
        for n in [
            0,
            7,
            -7,
            10,
            -10,
            1_000_000,
            i64::from(i32::MIN),
            i64::MAX,
            i64::MIN,
        ] {
            assert_eq!(integer(n), n.to_string());
        }
    }

    #[test]
    fn bytes_read_as_hex_and_uuid() {
        assert_eq!(hex(&[0x00, 0xff, 0x10]), "\\x00ff10");
        let u = [
            0x0b, 0x8f, 0x6c, 0x7e, 0x8f, 0x3a, 0x4a, 0x7e, 0x9a, 0x51, 0x2c, 0x1a, 0x3e, 0x0d,
            0x9f, 0x10,
        ];
        assert_eq!(uuid(&u), "0b8f6c7e-8f3a-4a7e-9a51-2c1a3e0d9f10");
    }
}
