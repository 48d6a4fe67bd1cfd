//! Sizes such as `64MiB`, `20G` or `4096`: binary units, as qemu-img and nbdkit read them.

/// The largest size accepted: what a file offset can address.
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Why a size was refused. The message quotes the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number with a unit.
    #[error(
        "bad size {text:?}: {why} (expected a number with an optional unit, like 512, 64KiB, 20GiB or 1T)"
    )]
    Malformed {
        /// What was given.
        text: String,
        /// What the parser said.
        why: String,
    },
    /// Zero.
    #[error("bad size {0:?}: a size must be greater than zero")]
    Zero(String),
    /// Beyond what a file can hold.
    #[error("bad size {0:?}: the largest size is 8 EiB - 1 byte")]
    TooLarge(String),
}

/// Parses a size in bytes. Units are binary: `K`, `KiB` and `KB` all mean 1024.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let n = parse_size::Config::new()
        .with_binary()
        .parse_size(text.trim())
        .map_err(|e| match e {
            parse_size::Error::PosOverflow => SizeError::TooLarge(text.to_owned()),
            other => SizeError::Malformed {
                text: text.to_owned(),
                why: other.to_string(),
            },
        })?;
    if n == 0 {
        return Err(SizeError::Zero(text.to_owned()));
    }
    if n > MAX_SIZE {
        return Err(SizeError::TooLarge(text.to_owned()));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_binary() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(64 << 20), "64 MiB");
        assert_eq!(human(3 << 29), "1.50 GiB");
        assert_eq!(human(1 << 40), "1 TiB");
    }

    #[test]
    fn a_size_or_zero_takes_zero_and_sizes() {
        #[derive(Debug, serde::Deserialize)]
        struct T {
            r: SizeOrZero,
        }
        let r = |t: &str| {
            toml::from_str::<T>(t)
                .map(|t| t.r.0)
                .map_err(|e| e.message().to_owned())
        };
        assert_eq!(r("r = 0"), Ok(0));
        assert_eq!(r("r = \"0\""), Ok(0));
        assert_eq!(r("r = \"32MiB\""), Ok(32 << 20));
        assert_eq!(r("r = 4096"), Ok(4096));
        assert_eq!(
            r("r = -1"),
            Err("bad size -1: it must not be negative".to_owned())
        );
        assert_eq!(r("r = \"0KiB\""), Ok(0));
        assert_eq!(
            r("r = \"lots\""),
            Err("bad size \"lots\": invalid digit found in string (expected a number with an optional unit, like 512, 64KiB, 20GiB or 1T)".to_owned())
        );
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        assert_eq!(
            parse_size("abc").unwrap_err().to_string(),
            "bad size \"abc\": invalid digit found in string (expected a number with an optional unit, like 512, 64KiB, 20GiB or 1T)"
        );
        assert_eq!(
            parse_size("0").unwrap_err().to_string(),
            "bad size \"0\": a size must be greater than zero"
        );
        assert_eq!(
            parse_size("9EiB").unwrap_err().to_string(),
            "bad size \"9EiB\": the largest size is 8 EiB - 1 byte"
        );
        assert_eq!(
            parse_size("99999999999999999999").unwrap_err().to_string(),
            "bad size \"99999999999999999999\": the largest size is 8 EiB - 1 byte"
        );
    }
}

/// A size in a parameter table: a string with a unit (`"4MiB"`) or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size like \"64MiB\" or a number of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Size, E> {
                parse_size(s).map(Size).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Size, E> {
                if n == 0 || n > MAX_SIZE {
                    return Err(E::custom(format!(
                        "bad size {n}: a size must be between 1 byte and 8 EiB - 1"
                    )));
                }
                Ok(Size(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Size, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!("bad size {n}: a size must be positive"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A size that may be zero, which turns something off: `readahead = "0"` (or `0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeOrZero(pub u64);

impl<'de> serde::Deserialize<'de> for SizeOrZero {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SizeOrZero;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size like \"64MiB\", a number of bytes, or 0")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<SizeOrZero, E> {
                match parse_size(s) {
                    Ok(n) => Ok(SizeOrZero(n)),
                    Err(SizeError::Zero(_)) => Ok(SizeOrZero(0)),
                    Err(e) => Err(E::custom(e)),
                }
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<SizeOrZero, E> {
                if n == 0 {
                    return Ok(SizeOrZero(0));
                }
                <Size as serde::Deserialize>::deserialize(
                    serde::de::value::U64Deserializer::<E>::new(n),
                )
                .map(|s| SizeOrZero(s.0))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<SizeOrZero, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!("bad size {n}: it must not be negative"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A size for people: `64 MiB`, `1.5 GiB`, `512 bytes`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if (v - v.round()).abs() < 0.005 {
        format!("{} {}", v.round() as u64, UNITS[i])
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}
