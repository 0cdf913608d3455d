//! The `grpc-timeout` header: a call's deadline, as the time left.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

/// The request header that carries a call's deadline, as the time left (`"250m"`).
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Reads a `grpc-timeout` value: at most eight digits and a unit (`H`, `M`, `S`, `m`, `u`,
/// `n`). `None` when it is not one.
pub fn parse_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Writes `timeout` as a `grpc-timeout` value, in the finest unit that fits in eight
/// digits, rounded up so the server never sees less time than there is.
pub fn format_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    let units: [(u128, &str); 6] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
        (60_000_000_000, "M"),
        (3_600_000_000_000, "H"),
    ];
    let (amount, unit) = units
        .iter()
        .map(|(size, unit)| (nanos.div_ceil(*size), *unit))
        .find(|(amount, _)| *amount <= MAX)
        .unwrap_or((MAX, "H"));
    HeaderValue::try_from(format!("{amount}{unit}")).expect("digits and a unit are a valid value")
}

/// The deadline a request carries, if any.
pub(crate) fn timeout_of(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(GRPC_TIMEOUT)
        .and_then(|value| value.to_str().ok())
        .and_then(parse_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_every_unit_and_refuses_the_rest() {
        assert_eq!(parse_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789m", "1x", "-1S", "1.5S", " 1S"] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn a_formatted_timeout_reads_back_never_shorter(nanos in 0u64..u64::MAX / 4) {
            let timeout = Duration::from_nanos(nanos);
            let value = format_timeout(timeout);
            let back = parse_timeout(value.to_str().unwrap()).unwrap();
            prop_assert!(back >= timeout);
        }
    }
}
