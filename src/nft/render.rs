//! The IR as `nft -f` text: whole tables (block syntax) and transactions (command syntax).
//!
//! Names are already `[a-z0-9_]` (see [`crate::nft::names`]); comments are sanitised there
//! and quoted here, so no input can break out of a token.

use std::fmt::Write;

use super::ir::{Chain, CounterLabels, Element, Key, Limit, Map, MapVerdict, Match, Rule, Ruleset, Set, Verdict};
use super::{Op, Transaction};

/// `"<text>"`, with anything unsafe replaced (defence in depth: IR comments are already safe).
pub fn quote(text: &str) -> String {
    format!("\"{}\"", super::names::comment(text))
}

pub fn key(k: Key) -> String {
    match k {
        Key::Addr(f, a) => format!("{} {}", f.keyword(), a.as_str()),
        Key::ProtoDport => "meta l4proto . th dport".to_string(),
        Key::AddrProtoDport(f, a) => {
            format!("{} {} . meta l4proto . th dport", f.keyword(), a.as_str())
        }
    }
}

pub fn match_expr(m: &Match) -> String {
    match m {
        Match::CtState(states) => {
            format!("ct state {}", states.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","))
        }
        Match::Lookup { key: k, set, negate } => {
            format!("{} {}@{set}", key(*k), if *negate { "!= " } else { "" })
        }
        Match::NfProto(f) => format!("meta nfproto {}", if f.keyword() == "ip" { "ipv4" } else { "ipv6" }),
        Match::Icmpv6Type(lo, hi) if lo == hi => format!("icmpv6 type {lo}"),
        Match::Icmpv6Type(lo, hi) => format!("icmpv6 type {lo}-{hi}"),
        Match::Ip6HopLimit(n) => format!("ip6 hoplimit {n}"),
        Match::TcpNotSyn => "tcp flags & (fin | syn | rst | ack) != syn".into(),
    }
}

pub fn verdict(v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accept".into(),
        Verdict::Drop => "drop".into(),
        Verdict::Return => "return".into(),
        Verdict::Jump(c) => format!("jump {c}"),
        Verdict::Goto(c) => format!("goto {c}"),
        Verdict::Vmap { key: k, map } => format!("{} vmap @{map}", key(*k)),
    }
}

pub fn map_verdict(v: &MapVerdict) -> String {
    match v {
        MapVerdict::Accept => "accept".into(),
        MapVerdict::Drop => "drop".into(),
        MapVerdict::Return => "return".into(),
        MapVerdict::Jump(c) => format!("jump {c}"),
        MapVerdict::Goto(c) => format!("goto {c}"),
    }
}

/// One rule's statement text (what follows `add rule <family> <table> <chain>`).
pub fn rule(r: &Rule) -> String {
    let mut parts: Vec<String> = r.matches.iter().map(match_expr).collect();
    if let Some(log) = &r.log {
        if let Some(limit) = &log.limit {
            parts.push(format!("limit name {}", quote(limit)));
        }
        parts.push(format!("log prefix {} group {}", quote(&log.prefix), log.group));
    }
    if let Some(c) = &r.named_counter {
        parts.push(format!("counter name {}", quote(&c.name)));
    } else if r.counter {
        parts.push("counter".into());
    }
    if let Some(v) = &r.verdict {
        parts.push(verdict(v));
    }
    if let Some(c) = &r.comment {
        parts.push(format!("comment {}", quote(c)));
    }
    parts.join(" ")
}

fn key_type(types: &[super::ir::KeyType]) -> String {
    types.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(" . ")
}

fn elements<E: std::borrow::Borrow<Element>>(items: impl Iterator<Item = E>) -> String {
    items.map(|e| e.borrow().to_string()).collect::<Vec<_>>().join(", ")
}

fn map_elements<'a>(items: impl Iterator<Item = (&'a Element, &'a MapVerdict)>) -> String {
    items.map(|(e, v)| format!("{e} : {}", map_verdict(v))).collect::<Vec<_>>().join(", ")
}

/// The body of a set declaration, `; `-separated (for command syntax).
fn set_spec(set: &Set) -> Vec<String> {
    let mut out = vec![format!("type {}", key_type(&set.key))];
    if set.interval {
        out.push("flags interval".into());
    }
    if let Some(c) = &set.comment {
        out.push(format!("comment {}", quote(c)));
    }
    if !set.elements.is_empty() {
        out.push(format!("elements = {{ {} }}", elements(set.elements.iter())));
    }
    out
}

fn map_spec(map: &Map) -> Vec<String> {
    let mut out = vec![format!("type {} : verdict", key_type(&map.key))];
    if map.interval {
        out.push("flags interval".into());
    }
    if let Some(c) = &map.comment {
        out.push(format!("comment {}", quote(c)));
    }
    if !map.elements.is_empty() {
        out.push(format!("elements = {{ {} }}", map_elements(map.elements.iter())));
    }
    out
}

fn counter_spec(labels: &CounterLabels) -> Vec<String> {
    vec![format!("comment {}", quote(&labels.comment()))]
}

fn limit_spec(limit: &Limit) -> Vec<String> {
    vec![format!("rate {}/second burst {} packets", limit.per_second, limit.burst)]
}

fn chain_spec(chain: &Chain) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(b) = chain.base {
        out.push(format!("type filter hook {} priority {}; policy {}", b.hook.as_str(), b.priority, b.policy.as_str()));
    }
    if let Some(c) = &chain.comment {
        out.push(format!("comment {}", quote(c)));
    }
    out
}

/// A whole table in `nft -f` block syntax, deterministic (sets, maps, chains by name).
/// nft declares every chain of a block before adding rules, so order is free.
pub fn ruleset(rs: &Ruleset) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "table {} {} {{", rs.family().as_str(), rs.table);
    for (name, set) in &rs.sets {
        let _ = writeln!(s, "\tset {name} {{");
        for line in set_spec(set) {
            let _ = writeln!(s, "\t\t{line}");
        }
        let _ = writeln!(s, "\t}}");
    }
    for (name, map) in &rs.maps {
        let _ = writeln!(s, "\tmap {name} {{");
        for line in map_spec(map) {
            let _ = writeln!(s, "\t\t{line}");
        }
        let _ = writeln!(s, "\t}}");
    }
    for (kind, name, spec) in rs
        .counters
        .iter()
        .map(|(n, l)| ("counter", n, counter_spec(l)))
        .chain(rs.limits.iter().map(|(n, l)| ("limit", n, limit_spec(l))))
    {
        let _ = writeln!(s, "\t{kind} {name} {{");
        for line in spec {
            let _ = writeln!(s, "\t\t{line}");
        }
        let _ = writeln!(s, "\t}}");
    }
    for (name, chain) in &rs.chains {
        let _ = writeln!(s, "\tchain {name} {{");
        for line in chain_spec(chain) {
            let _ = writeln!(s, "\t\t{line};");
        }
        for r in &chain.rules {
            let _ = writeln!(s, "\t\t{}", rule(r));
        }
        let _ = writeln!(s, "\t}}");
    }
    s.push_str("}\n");
    s
}

/// One operation in command syntax.
pub fn op(table: &str, op: &Op) -> String {
    let t = format!("inet {table}");
    match op {
        Op::AddTable => format!("add table {t}"),
        Op::DeleteTable => format!("delete table {t}"),
        Op::AddChain { name, chain } => {
            let spec = chain_spec(chain);
            if spec.is_empty() {
                format!("add chain {t} {name}")
            } else {
                format!("add chain {t} {name} {{ {}; }}", spec.join("; "))
            }
        }
        Op::FlushChain { name } => format!("flush chain {t} {name}"),
        Op::DeleteChain { name } => format!("delete chain {t} {name}"),
        Op::AddRule { chain, rule: r } => format!("add rule {t} {chain} {}", rule(r)),
        Op::AddSet { name, set } => {
            format!("add set {t} {name} {{ {}; }}", set_spec(set).join("; "))
        }
        Op::DeleteSet { name } => format!("delete set {t} {name}"),
        Op::AddMap { name, map } => {
            format!("add map {t} {name} {{ {}; }}", map_spec(map).join("; "))
        }
        Op::DeleteMap { name } => format!("delete map {t} {name}"),
        Op::AddElements { set, elements: e } => {
            format!("add element {t} {set} {{ {} }}", elements(e.iter()))
        }
        Op::DeleteElements { set, elements: e } => {
            format!("delete element {t} {set} {{ {} }}", elements(e.iter()))
        }
        Op::AddMapElements { map, elements: e } => {
            format!("add element {t} {map} {{ {} }}", map_elements(e.iter().map(|(k, v)| (k, v))))
        }
        Op::DeleteMapElements { map, elements: e } => {
            format!("delete element {t} {map} {{ {} }}", elements(e.iter()))
        }
        Op::AddCounter { name, labels } => format!("add counter {t} {name} {{ {}; }}", counter_spec(labels).join("; ")),
        Op::DeleteCounter { name } => format!("delete counter {t} {name}"),
        Op::AddLimit { name, limit } => format!("add limit {t} {name} {{ {}; }}", limit_spec(limit).join("; ")),
        Op::DefineTable(rs) => ruleset(rs).trim_end().to_string(),
    }
}

/// A transaction as one `nft -f` script: applied atomically by nft.
pub fn transaction(tx: &Transaction) -> String {
    let mut s = String::new();
    for o in &tx.ops {
        s.push_str(&op(&tx.table, o));
        s.push('\n');
    }
    s
}
