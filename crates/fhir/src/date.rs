//! FHIR date, dateTime and instant values as half-open time ranges.

/// A half-open range `[start, end)` of UTC microseconds since the Unix epoch.
/// A partial date covers its whole extent: `2020` is all of 2020.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DateRange {
    pub start: i64,
    pub end: i64,
}

/// Parse a FHIR date / dateTime / instant (`YYYY`, `YYYY-MM`, `YYYY-MM-DD`,
/// `YYYY-MM-DDThh:mm[:ss[.fff]][Z|+hh:mm]`) into the range it covers.
/// A dateTime without a zone is taken as UTC. Returns `None` when invalid.
pub fn parse_range(s: &str) -> Option<DateRange> {
    let _ = s;
    todo!("HELPER")
}

/// Format microseconds since the epoch as a FHIR instant (`2024-01-02T03:04:05.678Z`).
pub fn format_instant(micros: i64) -> String {
    let _ = micros;
    todo!("HELPER")
}
