//! One home for every rule a typed or read value must follow: Kubernetes names and label
//! keys/values, nftables table names, durations and CIDRs, each with its one error message.
//!
//! ```text
//!  YAML / API objects ─► k8s::convert ─┐
//!  netpol-check flags ─► bin, cli/ ────┼─► validate (pure: &str ─► value, or the reason)
//!  netpol-agent flags ─► agent::config ┘
//! ```
//!
//! Callers add only where the value came from (a field path, a flag name); the reason is
//! the same text whichever binary or layer reports it. Nothing here does I/O or needs a
//! Cargo feature.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

// --- Kubernetes names, as apimachinery's `validation` package spells them -------------------

/// What a DNS label (RFC 1123; a namespace name) looks like, for messages.
pub const DNS_LABEL_RULE: &str =
    "at most 63 lower case letters, digits or '-', starting and ending with a letter or digit";

/// What a DNS subdomain (RFC 1123; most object names, a node name) looks like, for messages.
/// It says what makes `a..b` invalid: every dot-separated part is a label.
pub const DNS_SUBDOMAIN_RULE: &str = "dot-separated parts of lower case letters, digits or '-', each starting and ending with a letter or digit, at most 253 characters in all";

/// An RFC 1123 label: 1-63 characters of `[a-z0-9-]`, not starting or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && is_label_shaped(s)
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`: apimachinery's `dns1123LabelFmt`, without a length.
fn is_label_shaped(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 subdomain as apimachinery's `IsDNS1123Subdomain` checks it: at most 253
/// characters matching `dns1123LabelFmt ("\." dns1123LabelFmt)*`, so `a..b`, `.a` and `a.`
/// are not. The API server bounds only the whole name, not each part: a pod name with a
/// 64-character part is valid, and refusing it would refuse a real cluster's pod.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_label_shaped)
}

/// A DNS label (a namespace's name), or why not.
pub fn dns_label(s: &str) -> Result<(), String> {
    name(s, is_dns_label, DNS_LABEL_RULE)
}

/// A DNS subdomain (an object's name, a node's name), or why not.
pub fn dns_subdomain(s: &str) -> Result<(), String> {
    name(s, is_dns_subdomain, DNS_SUBDOMAIN_RULE)
}

/// A Service's name: a DNS-1035 label (`ValidateServiceName`), or why not.
pub fn service_name(s: &str) -> Result<(), String> {
    dns_label(s)?;
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("{s:?} is not a valid name: a Service name must start with a letter (a DNS-1035 label)"));
    }
    Ok(())
}

/// A required name, checked by `is_valid`; `rule` says what a valid one looks like.
fn name(s: &str, is_valid: fn(&str) -> bool, rule: &str) -> Result<(), String> {
    if is_valid(s) {
        Ok(())
    } else if s.is_empty() {
        Err("is required".into())
    } else {
        Err(format!("{s:?} is not a valid name: must be {rule}"))
    }
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 characters: a label key's name
/// part, and a non-empty label value.
fn is_qualified_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A label key: an optional DNS subdomain prefix and `/`, then a qualified name part.
pub fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if prefix.is_some_and(|p| !is_dns_subdomain(p)) {
        return Err(format!(
            "invalid label key {key:?}: prefix must be a DNS subdomain (lower case letters, digits, '-', '.')"
        ));
    }
    if !is_qualified_name_part(name) {
        return Err(format!(
            "invalid label key {key:?}: name part must be 1-63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A label value: empty, or a qualified name part.
pub fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_qualified_name_part(value) {
        Ok(())
    } else {
        Err(format!(
            "invalid label value {value:?}: must be at most 63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

/// IANA_SVC_NAME (a container port's name): 1-15 characters of `[a-z0-9-]`, at least one
/// letter, no leading, trailing or doubled hyphen.
pub fn port_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid port name {name:?}: must be 1-15 lower case letters, digits or '-', with at least one letter and no leading, trailing or double '-'"
        ))
    }
}

// --- domain names -----------------------------------------------------------------------------

/// One label of a `domainNames` entry as the API's pattern has it:
/// `[a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?` (no length bound in the pattern).
fn is_domain_label(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
}

/// A `domainNames` entry of a ClusterNetworkPolicy (or AdminNetworkPolicy): two or more
/// labels, an optional trailing dot, and `*.` allowed only as a prefix (the CRD's pattern
/// `^(\*\.)?([a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.)+[a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.?$`).
pub fn domain_pattern(text: &str) -> Result<(), String> {
    let name = text.strip_prefix("*.").unwrap_or(text);
    if is_domain_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not a valid domain name: must be two or more dot-separated labels of letters, digits, '-' or '_' \
             (each starting and ending with a letter or digit), optionally with a trailing '.' or a leading '*.'"
        ))
    }
}

/// A domain name without a wildcard, as [`domain_pattern`] has it.
fn is_domain_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let labels: Vec<&str> = name.split('.').collect();
    labels.len() >= 2 && labels.iter().all(|l| is_domain_label(l))
}

/// `NAME=IP` (netpol-check's `--resolve`): what a domain name resolves to. The name is
/// returned in lower case without a trailing dot (DNS compares names so); it takes no `*`.
pub fn resolve_arg(text: &str) -> Result<(String, IpAddr), String> {
    let Some((name, ip)) = text.split_once('=') else {
        return Err(format!("{text:?} is not NAME=IP (e.g. example.com=203.0.113.7)"));
    };
    let (name, ip) = (name.trim(), ip.trim());
    if !is_domain_name(name) {
        return Err(format!(
            "{name:?} is not a domain name: must be two or more dot-separated labels of letters, digits, '-' or '_' \
             (each starting and ending with a letter or digit), without a '*'"
        ));
    }
    let ip: IpAddr = ip.parse().map_err(|_| format!("{ip:?} is not an IPv4 or IPv6 address"))?;
    Ok((name.trim_end_matches('.').to_ascii_lowercase(), ip))
}

// --- nftables table names ---------------------------------------------------------------------

/// The longest table name: the kernel's `NFT_NAME_MAXLEN` is 256 bytes with the NUL (since
/// Linux 4.16, older than any kernel the ruleset's features need). One limit for the agent
/// and the CLI: the agent used to stop at 32 and the CLI at 64, so a table the CLI printed
/// could be one the agent refused. The name is embedded only where nft itself takes it
/// (`table inet NAME`, the netlink table attribute, the monitor's comparison), so the
/// kernel's limit is the only one.
pub const MAX_TABLE_NAME_LEN: usize = 255;

/// An nftables table name we own: a letter, then letters, digits or `_`. nft's own
/// identifiers allow a few more characters (`/`, `-`, `.`); this subset renders unquoted
/// everywhere and cannot be mistaken for a keyword's argument.
pub fn table_name(s: &str) -> Result<(), String> {
    let ok = s.len() <= MAX_TABLE_NAME_LEN
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not an nftables table name (a letter, then letters, digits or '_'; at most {MAX_TABLE_NAME_LEN})"
        ))
    }
}

// --- durations ----------------------------------------------------------------------------------

/// Parses a duration: a number (decimals allowed) and a unit, `ms`, `s`, `m` or `h`:
/// `500ms`, `1.5s`, `5m`, `1h`. `0` needs no unit.
///
/// A bare number is refused: the agent read it as seconds and netpol-check as milliseconds,
/// so the same `300` meant five minutes in one binary and a third of a second in the other.
/// Reading it either way silently changes what some existing command line means; refusing
/// it, with the two spellings it could have meant, changes nothing silently.
pub fn duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let not_a_duration = || format!("{text:?} is not a duration (a number and a unit: 500ms, 1.5s, 5m, 1h)");
    let value: f64 = number.parse().map_err(|_| not_a_duration())?;
    let seconds = match unit.trim_start() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "" if value == 0.0 => 0.0,
        "" => return Err(format!("{text:?} has no unit (write {number}ms or {number}s)")),
        other => return Err(format!("{text:?} has an unknown unit {other:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is too long"))
}

/// [`duration`], within `min..=max` (no upper bound when `max` is `None`).
pub fn duration_in(text: &str, min: Duration, max: Option<Duration>) -> Result<Duration, String> {
    let d = duration(text)?;
    match max {
        Some(max) if d < min || d > max => {
            Err(format!("{text:?} is out of range ({} to {})", show_duration(min), show_duration(max)))
        }
        None if d < min => Err(format!("{text:?} is too short (at least {})", show_duration(min))),
        _ => Ok(d),
    }
}

/// A bound as a user would type it: `10ms`, `1s`, `60s`, `10m`, `1h`.
fn show_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        format!("{}ms", d.as_millis())
    } else if secs >= 3600 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs > 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

// --- CIDRs --------------------------------------------------------------------------------------

/// Parses a CIDR as the API server's `ParseCIDR` does: host bits may be set and are masked
/// (`10.0.0.7/8` is `10.0.0.0/8`). No surrounding spaces (the API server allows none).
pub fn cidr(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .map(|net| net.trunc())
        .map_err(|_| format!("{text:?} is not a valid CIDR (expected e.g. 10.0.0.0/16 or fd00::/64)"))
}

/// [`cidr`] for a command-line flag or an environment variable: surrounding spaces, as in
/// `NETPOL_POD_CIDRS="10.244.1.0/24, fd00::/64"`, are ignored.
pub fn cidr_arg(text: &str) -> Result<IpNet, String> {
    cidr(text.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_patterns_take_two_labels_or_more_and_a_wildcard_only_as_a_prefix() {
        for ok in ["example.com", "EXAMPLE.com.", "*.example.com", "a_b.c-d.io", "1.2"] {
            assert_eq!(domain_pattern(ok), Ok(()), "{ok}");
        }
        for bad in ["com", "*.com", "a.*.com", "*example.com", "a-.com", "_a.com", "a..com", ".a.com", ""] {
            assert!(domain_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_resolve_entry_is_a_lower_case_name_without_trailing_dot_and_an_ip() {
        assert_eq!(resolve_arg("Example.COM.=203.0.113.7"), Ok(("example.com".into(), "203.0.113.7".parse().unwrap())));
        assert_eq!(
            resolve_arg("a.example.com=2001:db8::1"),
            Ok(("a.example.com".into(), "2001:db8::1".parse().unwrap()))
        );
        assert_eq!(
            resolve_arg("example.com"),
            Err("\"example.com\" is not NAME=IP (e.g. example.com=203.0.113.7)".into())
        );
        assert_eq!(resolve_arg("example.com=10.0.0.0/8"), Err("\"10.0.0.0/8\" is not an IPv4 or IPv6 address".into()));
        assert!(resolve_arg("*.example.com=10.0.0.1").unwrap_err().contains("without a '*'"));
        assert!(resolve_arg("localhost=127.0.0.1").unwrap_err().starts_with("\"localhost\" is not a domain name"));
    }

    #[test]
    fn dns_labels_and_subdomains_follow_rfc_1123() {
        let long_label = "a".repeat(63);
        let too_long_label = "a".repeat(64);
        let subdomain_253 = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
        let subdomain_254 = format!("{subdomain_253}e");
        // (name, is a label, is a subdomain)
        let cases: &[(&str, bool, bool)] = &[
            ("a", true, true),
            ("node-1", true, true),
            ("0", true, true),
            (&long_label, true, true),
            // The API server bounds a subdomain's length, not its parts'.
            (&too_long_label, false, true),
            ("node-1.example.com", false, true),
            (&subdomain_253, false, true),
            (&subdomain_254, false, false),
            ("", false, false),
            ("a..b", false, false),
            (".a", false, false),
            ("a.", false, false),
            ("-a", false, false),
            ("a-", false, false),
            ("a.-b", false, false),
            ("Node_A", false, false),
            ("a_b", false, false),
            ("a b", false, false),
            ("é", false, false),
        ];
        for &(name, label, subdomain) in cases {
            assert_eq!(is_dns_label(name), label, "label {name:?}");
            assert_eq!(is_dns_subdomain(name), subdomain, "subdomain {name:?}");
            assert_eq!(dns_label(name).is_ok(), label, "{name:?}");
            assert_eq!(dns_subdomain(name).is_ok(), subdomain, "{name:?}");
        }
        assert_eq!(dns_subdomain(""), Err("is required".to_string()));
        assert_eq!(dns_subdomain("a..b"), Err(format!("\"a..b\" is not a valid name: must be {DNS_SUBDOMAIN_RULE}")));
        assert_eq!(dns_label("a.b"), Err(format!("\"a.b\" is not a valid name: must be {DNS_LABEL_RULE}")));
    }

    #[test]
    fn label_keys_and_values_follow_the_api_server() {
        for (key, ok) in [
            ("app", true),
            ("example.com/app", true),
            ("app.kubernetes.io/name", true),
            ("a..b/app", false),
            ("Example.com/app", false),
            ("-bad", false),
            ("/app", false),
            ("app/", false),
            ("a b", false),
            (&"k".repeat(64), false),
        ] {
            assert_eq!(label_key(key).is_ok(), ok, "{key:?}");
        }
        for (value, ok) in [("", true), ("v1", true), ("A_b.c-9", true), ("a b", false), ("-a", false), ("a.", false)] {
            assert_eq!(label_value(value).is_ok(), ok, "{value:?}");
        }
    }

    #[test]
    fn port_names_are_iana_service_names() {
        for (name, ok) in [
            ("http", true),
            ("web-8080", true),
            ("a", true),
            ("abcdefghijklmno", true),
            ("abcdefghijklmnop", false),
            ("80", false),
            ("", false),
            ("-http", false),
            ("http-", false),
            ("ht--tp", false),
            ("HTTP", false),
            ("h_t", false),
        ] {
            assert_eq!(port_name(name).is_ok(), ok, "{name:?}");
        }
    }

    #[test]
    fn table_names_are_a_letter_then_letters_digits_or_underscores_up_to_the_kernel_limit() {
        let longest = format!("t{}", "_".repeat(MAX_TABLE_NAME_LEN - 1));
        let too_long = format!("{longest}x");
        for (name, ok) in [
            ("netpol", true),
            ("Netpol_2", true),
            ("t", true),
            (longest.as_str(), true),
            (too_long.as_str(), false),
            ("", false),
            ("1bad", false),
            ("_x", false),
            ("x;y", false),
            ("a-b", false),
            ("a.b", false),
            ("a b", false),
        ] {
            assert_eq!(table_name(name).is_ok(), ok, "{name:?}");
        }
        assert_eq!(
            table_name("x;y"),
            Err("\"x;y\" is not an nftables table name (a letter, then letters, digits or '_'; at most 255)".into())
        );
    }

    #[test]
    fn durations_need_a_unit_except_zero() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        let cases: &[(&str, Result<Duration, &str>)] = &[
            ("500ms", Ok(ms(500))),
            ("1.5s", Ok(ms(1500))),
            ("20s", Ok(s(20))),
            ("5m", Ok(s(300))),
            ("1h", Ok(s(3600))),
            (" 2 s ", Ok(s(2))),
            ("0", Ok(Duration::ZERO)),
            ("0ms", Ok(Duration::ZERO)),
            ("300", Err("\"300\" has no unit (write 300ms or 300s)")),
            ("1.5", Err("\"1.5\" has no unit (write 1.5ms or 1.5s)")),
            ("5 parsecs", Err("\"5 parsecs\" has an unknown unit \"parsecs\" (use ms, s, m or h)")),
            ("5us", Err("\"5us\" has an unknown unit \"us\" (use ms, s, m or h)")),
            ("soon", Err("\"soon\" is not a duration (a number and a unit: 500ms, 1.5s, 5m, 1h)")),
            ("", Err("\"\" is not a duration (a number and a unit: 500ms, 1.5s, 5m, 1h)")),
            ("-5s", Err("\"-5s\" is not a duration (a number and a unit: 500ms, 1.5s, 5m, 1h)")),
            ("s", Err("\"s\" is not a duration (a number and a unit: 500ms, 1.5s, 5m, 1h)")),
            ("1e30h", Err("\"1e30h\" has an unknown unit \"e30h\" (use ms, s, m or h)")),
            ("99999999999999999999999h", Err("\"99999999999999999999999h\" is too long")),
        ];
        for (text, want) in cases {
            assert_eq!(duration(text), want.map_err(str::to_string), "{text:?}");
        }
    }

    #[test]
    fn durations_out_of_their_range_name_the_range() {
        let (lo, hi) = (Duration::from_millis(10), Duration::from_secs(60));
        assert_eq!(duration_in("300ms", lo, Some(hi)), Ok(Duration::from_millis(300)));
        assert_eq!(duration_in("1m", lo, Some(hi)), Ok(hi));
        assert_eq!(duration_in("2ms", lo, Some(hi)), Err("\"2ms\" is out of range (10ms to 60s)".into()));
        assert_eq!(duration_in("61s", lo, Some(hi)), Err("\"61s\" is out of range (10ms to 60s)".into()));
        assert_eq!(
            duration_in("10ms", Duration::from_secs(1), None),
            Err("\"10ms\" is too short (at least 1s)".into())
        );
        assert_eq!(
            duration_in("1h", Duration::from_millis(100), Some(Duration::from_secs(600))),
            Err("\"1h\" is out of range (100ms to 10m)".into())
        );
        assert_eq!(
            duration_in("11s", Duration::ZERO, Some(Duration::from_secs(10))),
            Err("\"11s\" is out of range (0ms to 10s)".into())
        );
    }

    #[test]
    fn cidrs_mask_host_bits_and_only_arguments_ignore_spaces() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        // (text, as a field, as an argument)
        type Parsed = Result<IpNet, ()>;
        let cases: &[(&str, Parsed, Parsed)] = &[
            ("10.244.1.0/24", Ok(net("10.244.1.0/24")), Ok(net("10.244.1.0/24"))),
            ("10.9.0.7/16", Ok(net("10.9.0.0/16")), Ok(net("10.9.0.0/16"))),
            ("fd00:1::5/64", Ok(net("fd00:1::/64")), Ok(net("fd00:1::/64"))),
            (" 10.0.0.0/8", Err(()), Ok(net("10.0.0.0/8"))),
            ("10.0.0.0/33", Err(()), Err(())),
            ("10.0.0.300/24", Err(()), Err(())),
            ("10.0.0.1", Err(()), Err(())),
            ("", Err(()), Err(())),
        ];
        for (text, strict, arg) in cases {
            assert_eq!(cidr(text).map_err(|_| ()), *strict, "{text:?}");
            assert_eq!(cidr_arg(text).map_err(|_| ()), *arg, "{text:?}");
        }
        assert_eq!(
            cidr("10.0.0.0/33"),
            Err("\"10.0.0.0/33\" is not a valid CIDR (expected e.g. 10.0.0.0/16 or fd00::/64)".into())
        );
    }
}
