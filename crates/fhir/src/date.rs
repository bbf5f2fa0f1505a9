//! FHIR date, dateTime and instant values as half-open time ranges.
//!
//! A FHIR date-like value names a span of time whose width is its precision:
//! `2020` is the whole year, `2020-03-04` the whole (UTC) day,
//! `2020-03-04T10:00:00Z` one second and `2020-03-04T10:00:00.25Z` a hundredth
//! of a second. Search compares these spans ([`DateRange`]), per
//! <http://hl7.org/fhir/R4/search.html#date>.
use time::{Date, Month};

/// A half-open range `[start, end)` of UTC microseconds since the Unix epoch.
/// A partial date covers its whole extent: `2020` is all of 2020.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DateRange {
    /// First microsecond covered.
    pub start: i64,
    /// First microsecond after the range.
    pub end: i64,
}

impl DateRange {
    /// The range of exactly one microsecond at `micros` (a stored instant).
    pub fn instant(micros: i64) -> DateRange {
        DateRange {
            start: micros,
            end: micros.saturating_add(1),
        }
    }

    /// Whether the two ranges share at least one microsecond.
    pub fn overlaps(&self, other: &DateRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_MINUTE: i64 = 60 * MICROS_PER_SECOND;
const MICROS_PER_HOUR: i64 = 60 * MICROS_PER_MINUTE;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;
/// Julian day number of 1970-01-01.
const UNIX_EPOCH_JULIAN_DAY: i64 = 2_440_588;

/// Parse a FHIR date / dateTime / instant (`YYYY`, `YYYY-MM`, `YYYY-MM-DD`,
/// `YYYY-MM-DDThh:mm[:ss[.fff]][Z|+hh:mm]`) into the range it covers.
/// A dateTime without a zone is taken as UTC. Returns `None` when invalid.
///
/// Fractional seconds give the range the width of their last digit (at least
/// one microsecond: digits past the sixth are truncated). A leap second
/// (`:60`) is read as the last second of the minute.
pub fn parse_range(s: &str) -> Option<DateRange> {
    let b = s.as_bytes();
    let year = digits(b, 0, 4)? as i32;
    if year == 0 {
        return None;
    }
    if b.len() == 4 {
        let start = day_start(year, Month::January, 1)?;
        let days = if time::util::is_leap_year(year) {
            366
        } else {
            365
        };
        return Some(DateRange {
            start,
            end: start + days * MICROS_PER_DAY,
        });
    }
    expect(b, 4, b'-')?;
    let month = Month::try_from(digits(b, 5, 2)? as u8).ok()?;
    if b.len() == 7 {
        let start = day_start(year, month, 1)?;
        let days = i64::from(time::util::days_in_month(month, year));
        return Some(DateRange {
            start,
            end: start + days * MICROS_PER_DAY,
        });
    }
    expect(b, 7, b'-')?;
    let day = digits(b, 8, 2)? as u8;
    let day_micros = day_start(year, month, day)?;
    if b.len() == 10 {
        return Some(DateRange {
            start: day_micros,
            end: day_micros + MICROS_PER_DAY,
        });
    }
    expect(b, 10, b'T')?;
    let hour = digits(b, 11, 2)?;
    expect(b, 13, b':')?;
    let minute = digits(b, 14, 2)?;
    if hour > 23 || minute > 59 {
        return None;
    }
    let mut pos = 16;
    let mut local = day_micros + hour * MICROS_PER_HOUR + minute * MICROS_PER_MINUTE;
    let mut width = MICROS_PER_MINUTE;
    if b.get(pos) == Some(&b':') {
        let second = digits(b, pos + 1, 2)?;
        if second > 60 {
            return None;
        }
        local += second.min(59) * MICROS_PER_SECOND;
        width = MICROS_PER_SECOND;
        pos += 3;
        if b.get(pos) == Some(&b'.') {
            pos += 1;
            let frac_start = pos;
            let mut frac = 0i64;
            let mut scale = MICROS_PER_SECOND;
            while let Some(&c) = b.get(pos) {
                if !c.is_ascii_digit() {
                    break;
                }
                if scale > 1 {
                    scale /= 10;
                    frac += i64::from(c - b'0') * scale;
                }
                pos += 1;
            }
            if pos == frac_start {
                return None;
            }
            local += frac;
            width = scale.max(1);
        }
    }
    let offset = match b.get(pos) {
        None => 0,
        Some(b'Z') => {
            pos += 1;
            0
        }
        Some(&sign @ (b'+' | b'-')) => {
            let oh = digits(b, pos + 1, 2)?;
            expect(b, pos + 3, b':')?;
            let om = digits(b, pos + 4, 2)?;
            if oh > 14 || om > 59 || (oh == 14 && om != 0) {
                return None;
            }
            pos += 6;
            let off = oh * MICROS_PER_HOUR + om * MICROS_PER_MINUTE;
            if sign == b'-' { -off } else { off }
        }
        Some(_) => return None,
    };
    if pos != b.len() {
        return None;
    }
    let start = local - offset;
    Some(DateRange {
        start,
        end: start + width,
    })
}

/// `n` ASCII digits at `at`, as a number.
fn digits(b: &[u8], at: usize, n: usize) -> Option<i64> {
    let slice = b.get(at..at + n)?;
    let mut v = 0i64;
    for &c in slice {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + i64::from(c - b'0');
    }
    Some(v)
}

fn expect(b: &[u8], at: usize, c: u8) -> Option<()> {
    (b.get(at) == Some(&c)).then_some(())
}

/// Microseconds at 00:00 UTC of a valid calendar date.
fn day_start(year: i32, month: Month, day: u8) -> Option<i64> {
    let date = Date::from_calendar_date(year, month, day).ok()?;
    Some((i64::from(date.to_julian_day()) - UNIX_EPOCH_JULIAN_DAY) * MICROS_PER_DAY)
}

/// The first microsecond that [`format_instant`] can show (0001-01-01T00:00:00Z).
const MIN_INSTANT: i64 = -62_135_596_800 * MICROS_PER_SECOND;
/// The last microsecond that [`format_instant`] can show (9999-12-31T23:59:59.999999Z).
const MAX_INSTANT: i64 = 253_402_300_800 * MICROS_PER_SECOND - 1;

/// Format microseconds since the epoch as a FHIR instant (`2024-01-02T03:04:05.678Z`).
///
/// Whole milliseconds are written with three fraction digits, anything finer
/// with six (`.678901Z`), so the text parses back (with [`parse_range`]) to a
/// range that contains `micros`. Values outside the years 1–9999 that FHIR
/// can express are clamped to that span.
pub fn format_instant(micros: i64) -> String {
    let micros = micros.clamp(MIN_INSTANT, MAX_INSTANT);
    let days = micros.div_euclid(MICROS_PER_DAY);
    let in_day = micros.rem_euclid(MICROS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let hour = in_day / MICROS_PER_HOUR;
    let minute = in_day % MICROS_PER_HOUR / MICROS_PER_MINUTE;
    let second = in_day % MICROS_PER_MINUTE / MICROS_PER_SECOND;
    let frac = in_day % MICROS_PER_SECOND;
    if frac % 1000 == 0 {
        format!(
            "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:03}Z",
            frac / 1000
        )
    } else {
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{frac:06}Z")
    }
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Micros of a UTC dateTime, via the `time` crate (independent of the parser).
    fn utc(y: i32, mo: u8, d: u8, h: u8, mi: u8, s: u8) -> i64 {
        let dt = time::PrimitiveDateTime::new(
            Date::from_calendar_date(y, Month::try_from(mo).unwrap(), d).unwrap(),
            time::Time::from_hms(h, mi, s).unwrap(),
        )
        .assume_utc();
        (dt.unix_timestamp_nanos() / 1000) as i64
    }

    #[test]
    fn year_month_day_cover_their_extent() {
        assert_eq!(
            parse_range("2020"),
            Some(DateRange {
                start: utc(2020, 1, 1, 0, 0, 0),
                end: utc(2021, 1, 1, 0, 0, 0)
            })
        );
        assert_eq!(
            parse_range("2021-02"),
            Some(DateRange {
                start: utc(2021, 2, 1, 0, 0, 0),
                end: utc(2021, 3, 1, 0, 0, 0)
            })
        );
        assert_eq!(
            parse_range("2020-02"),
            Some(DateRange {
                start: utc(2020, 2, 1, 0, 0, 0),
                end: utc(2020, 3, 1, 0, 0, 0)
            })
        );
        assert_eq!(
            parse_range("2020-12-31"),
            Some(DateRange {
                start: utc(2020, 12, 31, 0, 0, 0),
                end: utc(2021, 1, 1, 0, 0, 0)
            })
        );
        assert_eq!(
            parse_range("1970-01-01"),
            Some(DateRange {
                start: 0,
                end: MICROS_PER_DAY
            })
        );
        assert_eq!(
            parse_range("2020-02-29").map(|r| r.end - r.start),
            Some(MICROS_PER_DAY)
        );
    }

    #[test]
    fn date_times_cover_their_precision() {
        let t = utc(2020, 3, 4, 10, 0, 0);
        assert_eq!(
            parse_range("2020-03-04T10:00:00Z"),
            Some(DateRange {
                start: t,
                end: t + 1_000_000
            })
        );
        assert_eq!(
            parse_range("2020-03-04T10:00:00"),
            Some(DateRange {
                start: t,
                end: t + 1_000_000
            })
        );
        assert_eq!(
            parse_range("2020-03-04T10:00"),
            Some(DateRange {
                start: t,
                end: t + 60_000_000
            })
        );
        assert_eq!(
            parse_range("2020-03-04T10:00Z"),
            Some(DateRange {
                start: t,
                end: t + 60_000_000
            })
        );
        assert_eq!(
            parse_range("2020-03-04T10:00:00.5Z"),
            Some(DateRange {
                start: t + 500_000,
                end: t + 600_000
            })
        );
        assert_eq!(
            parse_range("2020-03-04T10:00:00.123Z"),
            Some(DateRange {
                start: t + 123_000,
                end: t + 124_000
            })
        );
        assert_eq!(
            parse_range("2020-03-04T10:00:00.123456Z"),
            Some(DateRange {
                start: t + 123_456,
                end: t + 123_457
            })
        );
        // Past microseconds: truncated, still one microsecond wide.
        assert_eq!(
            parse_range("2020-03-04T10:00:00.123456789Z"),
            Some(DateRange {
                start: t + 123_456,
                end: t + 123_457
            })
        );
        // Leap second.
        assert_eq!(
            parse_range("2016-12-31T23:59:60Z").map(|r| r.start),
            Some(utc(2016, 12, 31, 23, 59, 59))
        );
    }

    #[test]
    fn offsets_convert_to_utc() {
        let t = utc(2020, 3, 4, 10, 0, 0);
        assert_eq!(
            parse_range("2020-03-04T12:00:00+02:00").map(|r| r.start),
            Some(t)
        );
        assert_eq!(
            parse_range("2020-03-04T05:30:00-04:30").map(|r| r.start),
            Some(t)
        );
        assert_eq!(
            parse_range("2020-03-04T10:00:00+00:00").map(|r| r.start),
            Some(t)
        );
        assert_eq!(
            parse_range("2020-03-04T10:00:00-00:00").map(|r| r.start),
            Some(t)
        );
        assert_eq!(
            parse_range("2020-03-05T00:00:00+14:00").map(|r| r.start),
            Some(utc(2020, 3, 4, 10, 0, 0))
        );
        assert_eq!(
            parse_range("2020-03-04T10:00+01:00").map(|r| r.start),
            Some(t - 3_600_000_000)
        );
    }

    #[test]
    fn invalid_values_are_rejected() {
        for bad in [
            "",
            "20",
            "202",
            "20201",
            "0000",
            "2020-",
            "2020-13",
            "2020-00",
            "2020-1",
            "2020-02-30",
            "2021-02-29",
            "2020-04-31",
            "2020-01-00",
            "2020-01-32",
            "2020-01-01T",
            "2020-01-01T24:00:00Z",
            "2020-01-01T10:60:00Z",
            "2020-01-01T10:00:61Z",
            "2020-01-01T10",
            "2020-01-01T10:00:00.Z",
            "2020-01-01T10:00:00+15:00",
            "2020-01-01T10:00:00+14:30",
            "2020-01-01T10:00:00+0200",
            "2020-01-01T10:00:00ZZ",
            "2020-01-01 10:00:00",
            "2020-01-01t10:00:00z",
            "garbage",
            "2020-01-01Tab:cd",
            "２０２０",
            "-2020",
            "+2020",
        ] {
            assert_eq!(parse_range(bad), None, "{bad:?} should be invalid");
        }
    }

    #[test]
    fn extremes_do_not_overflow() {
        let r = parse_range("9999").unwrap();
        assert_eq!(r.end, MAX_INSTANT + 1);
        let r = parse_range("0001-01-01").unwrap();
        assert_eq!(r.start, MIN_INSTANT);
        assert!(parse_range("9999-12-31T23:59:59.999999-14:00").is_some());
    }

    #[test]
    fn format_instant_writes_valid_instants() {
        assert_eq!(format_instant(0), "1970-01-01T00:00:00.000Z");
        let t = utc(2024, 1, 2, 3, 4, 5);
        assert_eq!(format_instant(t + 678_000), "2024-01-02T03:04:05.678Z");
        assert_eq!(format_instant(t + 678_901), "2024-01-02T03:04:05.678901Z");
        assert_eq!(format_instant(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(format_instant(i64::MAX), "9999-12-31T23:59:59.999999Z");
        assert_eq!(format_instant(i64::MIN), "0001-01-01T00:00:00.000Z");
        assert_eq!(
            format_instant(utc(2000, 2, 29, 23, 59, 59)),
            "2000-02-29T23:59:59.000Z"
        );
    }

    #[test]
    fn format_then_parse_round_trips() {
        for micros in [
            0,
            1,
            999,
            1_000,
            1_700_000_000_123_456,
            -86_400_000_001,
            951_782_400_000_000,
        ] {
            let r = parse_range(&format_instant(micros)).unwrap();
            assert!(r.start <= micros && micros < r.end, "{micros}");
            assert_eq!(r.start, micros);
        }
    }

    #[test]
    fn instant_and_overlap_helpers() {
        let a = DateRange::instant(10);
        assert_eq!(a, DateRange { start: 10, end: 11 });
        assert!(a.overlaps(&DateRange { start: 0, end: 11 }));
        assert!(!a.overlaps(&DateRange { start: 11, end: 20 }));
        assert_eq!(DateRange::instant(i64::MAX).end, i64::MAX);
    }
}
