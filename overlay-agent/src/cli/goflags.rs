//! flanneld's flag syntax, as Go's flag package and flagutil read it: `-flag value` and
//! `--flag=value` alike, Go's integers, booleans and durations, and the flags whose
//! FLANNELD_ variable Go cannot parse yet still sets.

use std::{ffi::OsString, time::Duration};

use clap::CommandFactory as _;

use super::Cli;

/// flanneld's boolean and integer flags: a `FLANNELD_` value that Go's flag package cannot
/// parse still sets them, to false or 0 (what strconv returns), and flanneld only logs it.
pub(super) const GO_BOOL_FLAGS: [&str; 6] =
    ["ip-masq", "ip-masq-fully-random-disable", "iptables-forward-rules", "ip-blackhole-route", "kube-subnet-mgr", "set-node-network-unavailable"];
pub(super) const GO_INT_FLAGS: [&str; 4] = ["subnet-lease-renew-margin", "healthz-port", "iptables-resync", "v"];


/// Whether `arg`'s own value parser takes each of `values` (the reason if not).
pub(super) fn check_values(arg: &clap::Arg, values: &[String]) -> std::result::Result<(), String> {
    let probe = clap::Command::new("env")
        .no_binary_name(true)
        .arg(clap::Arg::new("value").long("value").action(clap::ArgAction::Set).allow_hyphen_values(true).value_parser(arg.get_value_parser().clone()));
    for v in values {
        if let Err(e) = probe.clone().try_get_matches_from([format!("--value={v}")]) {
            return Err(std::error::Error::source(&e).map_or_else(|| e.kind().to_string(), |s| s.to_string()));
        }
    }
    Ok(())
}

/// An integer as Go's flag package reads one (strconv.ParseInt with base 0): an optional
/// sign, then decimal, `0x`/`0X` hex, `0o`/`0O` or a leading `0` octal, or `0b`/`0B` binary,
/// with `_` allowed between digits.
pub fn parse_go_int(s: &str) -> std::result::Result<i64, String> {
    let bad = || format!("{s:?} is not an integer");
    let (neg, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d.to_string())
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d.to_string())
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d.to_string())
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].to_string())
    } else {
        (10, lower.clone())
    };
    if digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') || digits.contains("__") {
        return Err(bad());
    }
    let v = i64::from_str_radix(&digits.replace('_', ""), radix).map_err(|_| bad())?;
    Ok(if neg { -v } else { v })
}

pub(super) fn go_int_in<T: TryFrom<i64>>(s: &str) -> std::result::Result<T, String> {
    let v = parse_go_int(s)?;
    T::try_from(v).map_err(|_| format!("{v} is out of range"))
}

pub(super) fn parse_go_u16(s: &str) -> std::result::Result<u16, String> {
    go_int_in(s)
}

pub(super) fn parse_go_u64(s: &str) -> std::result::Result<u64, String> {
    go_int_in(s)
}

pub(super) fn parse_go_i32(s: &str) -> std::result::Result<i32, String> {
    go_int_in(s)
}

/// A duration in Go's `time.ParseDuration` form, as flannel's Go flags take them: numbers
/// with optional fractions, each with a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`), e.g.
/// `24h`, `1h30m`, `1.5h`, `300ms`; a plain number is seconds (this agent's earlier form).
/// A lease TTL must be positive (and at least a second: etcd's TTLs are whole seconds).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 24h, 1h30m, 1.5h or 300ms");
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().map_err(|_| bad())?;
        return positive(Duration::from_secs(secs));
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(|| format!("{s:?}: a number needs a unit (ns, us, ms, s, m, h)"))?;
        let (num, tail) = rest.split_at(num_end);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(bad());
        }
        let value: f64 = num.parse().map_err(|_| bad())?;
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (ns, us, ms, s, m, h)")),
        };
        total += value * scale;
        rest = tail;
    }
    if !total.is_finite() || total > u32::MAX as f64 {
        return Err(format!("{s:?} is too long"));
    }
    positive(Duration::from_secs_f64(total))
}

pub(super) fn positive(d: Duration) -> std::result::Result<Duration, String> {
    if d < Duration::from_secs(1) {
        return Err("a lease TTL must be at least 1s (etcd counts whole seconds)".into());
    }
    Ok(d)
}

pub(super) fn parse_regex(s: &str) -> std::result::Result<regex::Regex, String> {
    regex::Regex::new(s).map_err(|e| format!("--iface-regex {s:?}: {e}"))
}

/// A boolean as Go's flag package reads one (strconv.ParseBool): 1, t, T, TRUE, true, True,
/// 0, f, F, FALSE, false, False. flanneld's unit files and FLANNELD_ variables use them all.
pub fn parse_go_bool(s: &str) -> std::result::Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False)")),
    }
}

/// flannel's range for --subnet-lease-renew-margin: 1 to 1439 minutes (less than a day).
pub(super) fn parse_renew_margin(s: &str) -> std::result::Result<u64, String> {
    let m = parse_go_int(s).map_err(|_| format!("{s:?} is not a number of minutes"))?;
    if !(1..24 * 60).contains(&m) {
        return Err(format!("{m} is out of range: the renew margin is 1 to 1439 minutes, as flannel's"));
    }
    Ok(m as u64)
}

/// Accept Go's flag syntax as flanneld users write it: `-etcd-cafile=F` and `-ip-masq` mean
/// `--etcd-cafile=F` and `--ip-masq`. Only single-dash words naming one of our long flags are
/// rewritten; short flags (`-h`) and values are left alone.
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    fn longs(cmd: &clap::Command, out: &mut Vec<String>) {
        out.extend(cmd.get_arguments().filter_map(|a| a.get_long().map(str::to_string)));
        for sub in cmd.get_subcommands() {
            longs(sub, out);
        }
    }
    let mut known = Vec::new();
    longs(&Cli::command(), &mut known);
    known.extend(["help".to_string(), "version".to_string()]);
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let Some(s) = a.to_str() else { return a };
            if i == 0 || s.starts_with("--") || !s.starts_with('-') || s.len() <= 2 {
                return a;
            }
            let name = s[1..].split('=').next().unwrap_or("");
            if known.iter().any(|k| k == name) {
                OsString::from(format!("-{s}"))
            } else {
                a
            }
        })
        .collect()
}
