//! Sizes as people write and read them: qemu-style suffixes in, `64 MiB` out.
//!
//! [`parse_size`] accepts what `qemu-img` accepts for sizes: a plain number of
//! bytes, or a number with a binary suffix (`K`, `M`, `G`, `T`, `P`, `E`,
//! either case, optionally a fraction: `1.5G`). [`format_size`] prints like
//! qemu's `size_to_str` (three significant digits and an IEC unit).

use crate::error::{Error, ErrorKind, Result};

/// Parses a size such as `512`, `64K`, `1M`, `10G` or `1.5G` into bytes.
///
/// Suffixes are binary (`K` = 1024). A fraction needs a suffix, and the
/// result must be a whole number of bytes, as in qemu.
pub fn parse_size(text: &str) -> Result<u64> {
    let invalid = |why: &str| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("invalid size '{text}': {why}"),
        )
    };
    let s = text.trim();
    let (number, shift) = match s.char_indices().last() {
        None => return Err(invalid("empty")),
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => return Err(invalid("unknown suffix (use K, M, G, T, P or E)")),
            };
            (&s[..i], shift)
        }
        Some(_) => (s, 0),
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !(fraction.is_empty() || digits(fraction)) {
        return Err(invalid("not a number"));
    }
    if number.ends_with('.') {
        return Err(invalid("not a number"));
    }
    let too_large = || invalid("too large");
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    let mut bytes = whole
        .checked_shl(shift)
        .filter(|v| v >> shift == whole)
        .ok_or_else(too_large)?;
    if !fraction.is_empty() {
        // value = fraction_digits / 10^len, scaled by 2^shift; computed exactly
        // in u128 so "1.5G" is exactly 1.5 * 2^30.
        let digits_len = u32::try_from(fraction.len()).map_err(|_| invalid("fraction too long"))?;
        if digits_len > 18 {
            return Err(invalid("fraction too long"));
        }
        let numerator: u128 = fraction
            .parse::<u128>()
            .map_err(|_| invalid("not a number"))?
            << shift;
        let denominator = 10u128.pow(digits_len);
        if !numerator.is_multiple_of(denominator) {
            return Err(invalid("not a whole number of bytes"));
        }
        let extra = u64::try_from(numerator / denominator).map_err(|_| too_large())?;
        bytes = bytes.checked_add(extra).ok_or_else(too_large)?;
    }
    Ok(bytes)
}

/// Formats bytes as qemu does: `512 B`, `64 KiB`, `1.5 GiB`, `2.25 MiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    // Three significant digits, trailing zeros dropped, like printf("%0.3g").
    let decimals = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    let mut text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.truncate(text.trim_end_matches('0').trim_end_matches('.').len());
    }
    format!("{text} {}", UNITS[unit])
}

/// Throughput in MiB/s; zero when no time passed.
pub fn mib_per_sec(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / (1024.0 * 1024.0) / seconds
    } else {
        0.0
    }
}

/// A `qemu-img resize` size: `SIZE`, `+SIZE` (grow by) or `-SIZE` (shrink
/// by), against the image's `current` size.
pub fn parse_resize(text: &str, current: u64) -> Result<u64> {
    let t = text.trim();
    let overflow = || {
        Error::new(
            ErrorKind::InvalidInput,
            format!("invalid size '{text}': out of range"),
        )
    };
    if let Some(rest) = t.strip_prefix('+') {
        current.checked_add(parse_size(rest)?).ok_or_else(overflow)
    } else if let Some(rest) = t.strip_prefix('-') {
        current.checked_sub(parse_size(rest)?).ok_or_else(overflow)
    } else {
        parse_size(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_style_sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.5K").unwrap(), 512);
        assert_eq!(parse_size("100B").unwrap(), 100);
        assert_eq!(parse_size(" 4K ").unwrap(), 4096);
        assert_eq!(parse_size("15E").unwrap(), 15 << 60);
    }

    #[test]
    fn rejects_what_qemu_rejects() {
        for bad in [
            "",
            "K",
            "-1",
            "1X",
            "1.5",
            "1.K",
            ".5K",
            "1..5K",
            "0.1K",
            "16E",
            "1 2",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
        let err = parse_size("1X").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.message().contains("'1X'"), "{}", err.message());
    }

    #[test]
    fn formats_like_qemu() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(196 << 10), "196 KiB");
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size((9 << 20) / 4), "2.25 MiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
    }

    #[test]
    fn rate_of_nothing_is_zero() {
        assert_eq!(mib_per_sec(1 << 20, 0.0), 0.0);
        assert_eq!(mib_per_sec(1 << 21, 2.0), 1.0);
    }

    #[test]
    fn resize_sizes() {
        assert_eq!(parse_resize("2G", 1 << 30).unwrap(), 2 << 30);
        assert_eq!(parse_resize("+1M", 1 << 20).unwrap(), 2 << 20);
        assert_eq!(parse_resize("-512K", 1 << 20).unwrap(), 512 << 10);
        assert!(parse_resize("-2M", 1 << 20).is_err());
        assert!(parse_resize("+x", 1).is_err());
    }
}
