//! Minimal civil-calendar arithmetic (no time-zone database needed): days
//! since 1970-01-01 and minutes since the epoch in local wall-clock time,
//! formatted with a fixed UTC offset.

use std::fmt::Write;

/// A US time zone: hours behind UTC in standard time, and whether daylight
/// saving time is observed (not in Arizona).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tz {
    pub std_hours: i64,
    pub dst: bool,
}

const OFFSETS: [&str; 5] = ["-04:00", "-05:00", "-06:00", "-07:00", "-08:00"];

/// Day of the week, 0 = Sunday.
const fn weekday(day: i64) -> i64 {
    (day + 4).rem_euclid(7)
}

/// The first Sunday on or after `day`.
const fn sunday_from(day: i64) -> i64 {
    day + (7 - weekday(day)) % 7
}

impl Tz {
    /// The UTC offset in effect at local time `minutes` (US rules since
    /// 2007: from the second Sunday of March to the first Sunday of November).
    pub(crate) fn offset(self, minutes: i64) -> &'static str {
        let day = minutes.div_euclid(DAY);
        let mut hours = self.std_hours;
        if self.dst {
            let (y, _, _) = civil_from_days(day);
            let begin = sunday_from(days_from_civil(y, 3, 1)) + 7;
            let end = sunday_from(days_from_civil(y, 11, 1));
            if day >= begin && day < end {
                hours -= 1;
            }
        }
        OFFSETS[(hours - 4).clamp(0, 4) as usize]
    }
}

/// Minutes in a day.
pub(crate) const DAY: i64 = 24 * 60;

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub(crate) const fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month, day) of a day number.
pub(crate) const fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn push_date(out: &mut String, day: i64) {
    let (y, m, d) = civil_from_days(day);
    let _ = write!(out, "{y:04}-{m:02}-{d:02}");
}

/// `YYYY-MM-DD`.
pub(crate) fn date(day: i64) -> String {
    let mut s = String::with_capacity(10);
    push_date(&mut s, day);
    s
}

/// `YYYY-MM-DDThh:mm:ss+zz:zz` for local minutes since the epoch.
pub(crate) fn date_time(minutes: i64, tz: Tz) -> String {
    let offset = tz.offset(minutes);
    let mut s = String::with_capacity(25);
    push_date(&mut s, minutes.div_euclid(DAY));
    let mod_day = minutes.rem_euclid(DAY);
    let _ = write!(s, "T{:02}:{:02}:00{offset}", mod_day / 60, mod_day % 60);
    s
}

/// An `instant` (with milliseconds) for local minutes since the epoch.
pub(crate) fn instant(minutes: i64, tz: Tz) -> String {
    let offset = tz.offset(minutes);
    let mut s = String::with_capacity(29);
    push_date(&mut s, minutes.div_euclid(DAY));
    let mod_day = minutes.rem_euclid(DAY);
    let _ = write!(s, "T{:02}:{:02}:00.000{offset}", mod_day / 60, mod_day % 60);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        for day in -30_000..30_000 {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(date(days_from_civil(2000, 2, 29)), "2000-02-29");
        let eastern = Tz {
            std_hours: 5,
            dst: true,
        };
        let arizona = Tz {
            std_hours: 7,
            dst: false,
        };
        assert_eq!(
            date_time(days_from_civil(2019, 3, 4) * DAY + 10 * 60 + 15, eastern),
            "2019-03-04T10:15:00-05:00"
        );
        // 2019: DST from March 10 to November 3.
        let at = |m, d| days_from_civil(2019, m, d) * DAY + 12 * 60;
        assert_eq!(eastern.offset(at(3, 9)), "-05:00");
        assert_eq!(eastern.offset(at(3, 10)), "-04:00");
        assert_eq!(eastern.offset(at(11, 2)), "-04:00");
        assert_eq!(eastern.offset(at(11, 3)), "-05:00");
        assert_eq!(arizona.offset(at(7, 1)), "-07:00");
        assert_eq!(
            instant(days_from_civil(2024, 7, 1) * DAY + 59, eastern),
            "2024-07-01T00:59:00.000-04:00"
        );
    }
}
