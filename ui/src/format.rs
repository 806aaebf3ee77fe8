//! How ids, ages and durations are written on screen.

/// The first 12 characters of a build id.
pub(crate) fn short_id(id: &str) -> &str {
    match id.char_indices().nth(12) {
        Some((i, _)) => &id[..i],
        None => id,
    }
}

/// A span of seconds at minute granularity: `<1m`, `42m`, `3h05m`, `2d04h`.
pub(crate) fn minutes(secs: u64) -> String {
    let m = secs / 60;
    match m {
        0 => "<1m".to_owned(),
        1..60 => format!("{m}m"),
        60..1440 => format!("{}h{:02}m", m / 60, m % 60),
        _ => format!("{}d{:02}h", m / 1440, m % 1440 / 60),
    }
}

/// How long ago `then` was, or `None` before the first `Msg::Now`.
pub(crate) fn age(now: u64, then: u64) -> Option<String> {
    (now > 0).then(|| format!("{} ago", minutes(now.saturating_sub(then))))
}

/// A build's duration: `850ms`, `12.3s`, `2m05s`.
pub(crate) fn duration(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 => format!("{}.{}s", ms / 1000, ms % 1000 / 100),
        _ => format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(short_id("0123456789abcdef0123"), "0123456789ab");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(minutes(59), "<1m");
        assert_eq!(minutes(61), "1m");
        assert_eq!(minutes(3 * 3600 + 5 * 60 + 7), "3h05m");
        assert_eq!(minutes(2 * 86400 + 4 * 3600), "2d04h");
        assert_eq!(age(0, 5), None);
        assert_eq!(age(100, 200).as_deref(), Some("<1m ago"));
        assert_eq!(duration(850), "850ms");
        assert_eq!(duration(12_345), "12.3s");
        assert_eq!(duration(125_000), "2m05s");
    }
}
