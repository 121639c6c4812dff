//! What policies' serde configuration structs share: durations written the
//! way operators write them (`"250ms"`, `"1m30s"`).
//!
//! Every policy has a config struct (`BulkheadConfig`, ...) that deserializes
//! from any serde format, rejects unknown fields, and builds the policy with
//! a [`ConfigError`](crate::ConfigError) naming the field that is wrong.

use std::time::Duration;

/// Parses a duration: one or more `<number><unit>` parts, units `ns`, `us`,
/// `ms`, `s`, `m`, `h`, `d` (`"1s"`, `"250ms"`, `"1m30s"`, `"1.5s"`).
///
/// ```
/// use keel::config::parse_duration;
/// use std::time::Duration;
/// assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
/// assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert!(parse_duration("10").is_err()); // a unit is required
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration; write it like \"250ms\" or \"1m30s\"".into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("\"{text}\" has no unit; use ns, us, ms, s, m, h or d"))?;
        let (number, tail) = rest.split_at(number_len);
        if number.is_empty() {
            return Err(format!(
                "\"{text}\" is not a duration; write a number and a unit, like \"250ms\" or \"1m30s\""
            ));
        }
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("\"{text}\": \"{number}\" is not a number"))?;
        let seconds = match unit.trim() {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            other => {
                return Err(format!(
                    "\"{text}\": unknown unit \"{other}\"; use ns, us, ms, s, m, h or d"
                ))
            }
        };
        total += value * seconds;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|_| format!("\"{text}\" is out of range"))
}

/// Formats a duration so that [`parse_duration`] reads it back.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}ns", d.as_nanos())
    }
}

/// `#[serde(with = "keel::config::duration")]` for `Duration` fields.
pub mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Reads a duration string such as `"250ms"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }

    /// Writes a duration string such as `"250ms"`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }
}

/// `#[serde(default, with = "keel::config::optional_duration")]` for
/// `Option<Duration>` fields: absent is `None`.
pub mod optional_duration {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    /// Reads a duration string such as `"250ms"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }

    /// Writes a duration string, or nothing.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums_parts() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("0ms"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10us"), Ok(Duration::from_micros(10)));
        assert_eq!(parse_duration(" 5s "), Ok(Duration::from_secs(5)));
    }

    #[test]
    fn rejects_what_it_cannot_read_and_says_why() {
        assert!(parse_duration("").unwrap_err().contains("empty"));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("10 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("1..2s")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_duration("soon")
            .unwrap_err()
            .contains("not a duration"));
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn formats_what_it_parses() {
        for d in [
            Duration::ZERO,
            Duration::from_secs(30),
            Duration::from_millis(250),
            Duration::from_nanos(1_500),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
