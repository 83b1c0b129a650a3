//! Offsets in rule tests (`at: +15m`), parsed with checked arithmetic: a
//! test file's typo is an error, never an overflow.

use chrono::Duration;

/// Parses `+15m`, `-2d`, `90s`, `+1d2h30m` (units s, m, h, d).
pub fn offset(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not an offset like +15m, -2d, 90s or +1d2h");
    let t = s.trim();
    let (sign, rest) = match t.strip_prefix('-') {
        Some(r) => (-1, r),
        None => (1, t.strip_prefix('+').unwrap_or(t)),
    };
    if rest.is_empty() {
        return Err(bad());
    }
    let mut secs = 0i64;
    let mut digits = String::new();
    for c in rest.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: i64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        secs = n
            .checked_mul(unit)
            .and_then(|x| secs.checked_add(x))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() {
        return Err(bad());
    }
    Duration::try_seconds(sign * secs).ok_or_else(bad)
}
