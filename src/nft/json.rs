//! The IR as `nft -j` JSON (libnftables' JSON schema), via the `nftables` crate's types.
//!
//! ```text
//!  Ruleset ──► {"nftables": [ {table}, {chain}…, {set}…, {map}…, {rule}… ]}
//! ```
//!
//! The output is what `nft -j list table` prints and what `nft -j -f` accepts as adds.
//! Only serialization: the crate's process helpers are never called (the only process
//! spawner is [`crate::nft::backend::process`]).

use std::borrow::Cow;
use std::collections::HashSet;

use nftables::expr::{self, Expression, NamedExpression};
use nftables::schema::{self, NfListObject, NfObject, Nftables, SetFlag, SetType, SetTypeValue};
use nftables::stmt::{self, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::ir::{
    AddrField, ChainPolicy, Element, Hook, Key, KeyType, MapVerdict, Match, Rule, Ruleset, Value, Verdict,
};

fn set_type(key: &[KeyType]) -> SetTypeValue<'static> {
    let t = |k: &KeyType| match k {
        KeyType::Ipv4Addr => SetType::Ipv4Addr,
        KeyType::Ipv6Addr => SetType::Ipv6Addr,
        KeyType::InetProto => SetType::InetProto,
        KeyType::InetService => SetType::InetService,
    };
    if key.len() == 1 {
        SetTypeValue::Single(t(&key[0]))
    } else {
        SetTypeValue::Concatenated(key.iter().map(t).collect::<Vec<_>>().into())
    }
}

fn flags(interval: bool) -> Option<HashSet<SetFlag>> {
    interval.then(|| HashSet::from([SetFlag::Interval]))
}

fn value(v: &Value) -> Expression<'static> {
    match v {
        Value::Addr(ip) => Expression::String(ip.to_string().into()),
        Value::Prefix(net) => Expression::Named(NamedExpression::Prefix(expr::Prefix {
            addr: Box::new(Expression::String(net.network().to_string().into())),
            len: u32::from(net.prefix_len()),
        })),
        Value::Proto(p) => Expression::String(super::ir::proto_name(*p).into()),
        Value::Port(p) => Expression::Number(u32::from(*p)),
        Value::PortRange(a, b) => Expression::Range(Box::new(expr::Range {
            range: [Expression::Number(u32::from(*a)), Expression::Number(u32::from(*b))],
        })),
    }
}

fn element(e: &Element) -> Expression<'static> {
    if let [v] = e.values() {
        value(v)
    } else {
        Expression::Named(NamedExpression::Concat(e.values().iter().map(value).collect()))
    }
}

fn payload_field(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(expr::Payload::PayloadField(expr::PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

fn key(k: Key) -> Expression<'static> {
    let addr = |f: super::ir::IpFamily, a: AddrField| {
        Expression::Named(NamedExpression::Payload(expr::Payload::PayloadField(expr::PayloadField {
            protocol: f.keyword().into(),
            field: a.as_str().into(),
        })))
    };
    let l4 = || Expression::Named(NamedExpression::Meta(expr::Meta { key: expr::MetaKey::L4proto }));
    let dport = || {
        Expression::Named(NamedExpression::Payload(expr::Payload::PayloadField(expr::PayloadField {
            protocol: "th".into(),
            field: "dport".into(),
        })))
    };
    match k {
        Key::Addr(f, a) => addr(f, a),
        Key::ProtoDport => Expression::Named(NamedExpression::Concat(vec![l4(), dport()])),
        Key::AddrProtoDport(f, a) => Expression::Named(NamedExpression::Concat(vec![addr(f, a), l4(), dport()])),
    }
}

fn map_verdict(v: &MapVerdict) -> Expression<'static> {
    Expression::Verdict(match v {
        MapVerdict::Accept => expr::Verdict::Accept,
        MapVerdict::Drop => expr::Verdict::Drop,
        MapVerdict::Return => expr::Verdict::Return,
        MapVerdict::Jump(c) => expr::Verdict::Jump(stmt::JumpTarget { target: c.clone().into() }),
        MapVerdict::Goto(c) => expr::Verdict::Goto(stmt::JumpTarget { target: c.clone().into() }),
    })
}

fn statements(r: &Rule) -> Vec<Statement<'static>> {
    let mut out = Vec::new();
    for m in &r.matches {
        out.push(match m {
            Match::CtState(states) => Statement::Match(stmt::Match {
                left: Expression::Named(NamedExpression::CT(expr::CT { key: "state".into(), family: None, dir: None })),
                right: Expression::List(states.iter().map(|s| Expression::String(s.as_str().into())).collect()),
                op: Operator::IN,
            }),
            Match::Lookup { key: k, set, negate } => Statement::Match(stmt::Match {
                left: key(*k),
                right: Expression::String(format!("@{set}").into()),
                op: if *negate { Operator::NEQ } else { Operator::EQ },
            }),
            Match::NfProto(f) => Statement::Match(stmt::Match {
                left: Expression::Named(NamedExpression::Meta(expr::Meta { key: expr::MetaKey::Nfproto })),
                right: Expression::String(if f.keyword() == "ip" { "ipv4" } else { "ipv6" }.into()),
                op: Operator::EQ,
            }),
            Match::Icmpv6Type(lo, hi) => Statement::Match(stmt::Match {
                left: payload_field("icmpv6", "type"),
                right: if lo == hi {
                    Expression::Number(u32::from(*lo))
                } else {
                    Expression::Range(Box::new(expr::Range {
                        range: [Expression::Number(u32::from(*lo)), Expression::Number(u32::from(*hi))],
                    }))
                },
                op: Operator::EQ,
            }),
            Match::Ip6HopLimit(n) => Statement::Match(stmt::Match {
                left: payload_field("ip6", "hoplimit"),
                right: Expression::Number(u32::from(*n)),
                op: Operator::EQ,
            }),
            Match::TcpNotSyn => Statement::Match(stmt::Match {
                left: Expression::BinaryOperation(Box::new(expr::BinaryOperation::AND(
                    payload_field("tcp", "flags"),
                    Expression::List(
                        ["fin", "syn", "rst", "ack"].into_iter().map(|f| Expression::String(f.into())).collect(),
                    ),
                ))),
                right: Expression::String("syn".into()),
                op: Operator::NEQ,
            }),
        });
    }
    if let Some(log) = &r.log {
        if let Some(limit) = &log.limit {
            // The crate has no reference to a named limit: a placeholder `to_value` rewrites.
            out.push(Statement::Limit(stmt::Limit {
                rate: 0,
                rate_unit: Some(LIMIT_REF.into()),
                per: Some(limit.clone().into()),
                burst: None,
                burst_unit: None,
                inv: None,
            }));
        }
        out.push(Statement::Log(Some(stmt::Log {
            prefix: Some(log.prefix.clone().into()),
            ..stmt::Log::new(Some(u32::from(log.group)))
        })));
    }
    if let Some(c) = &r.named_counter {
        out.push(Statement::Counter(stmt::Counter::Named(c.name.clone().into())));
    } else if r.counter {
        out.push(Statement::Counter(stmt::Counter::Anonymous(None)));
    }
    match &r.verdict {
        None => {}
        Some(Verdict::Accept) => out.push(Statement::Accept(None)),
        Some(Verdict::Drop) => out.push(Statement::Drop(None)),
        Some(Verdict::Return) => out.push(Statement::Return(None)),
        Some(Verdict::Jump(c)) => out.push(Statement::Jump(stmt::JumpTarget { target: c.clone().into() })),
        Some(Verdict::Goto(c)) => out.push(Statement::Goto(stmt::JumpTarget { target: c.clone().into() })),
        Some(Verdict::Vmap { key: k, map }) => out.push(Statement::VerdictMap(stmt::VerdictMap {
            key: key(*k),
            data: Expression::String(format!("@{map}").into()),
        })),
    }
    out
}

/// The `rate_unit` of the placeholder that stands for `{"limit": "<name>"}`.
const LIMIT_REF: &str = "named limit";

/// The whole table as libnftables JSON objects (table, chains, sets, maps, then rules).
/// Verdict maps carry a placeholder data type here (the crate cannot name `verdict`), a
/// named limit's reference a placeholder statement, and named counter and limit objects
/// are missing (the crate's cannot carry a comment); use [`to_value`] or [`to_string`]
/// for the JSON nft accepts.
pub fn ruleset(rs: &Ruleset) -> Nftables<'static> {
    let table: Cow<'static, str> = rs.table.clone().into();
    let mut objects: Vec<NfObject<'static>> = vec![NfObject::ListObject(NfListObject::Table(schema::Table {
        family: NfFamily::INet,
        name: table.clone(),
        handle: None,
    }))];
    // JSON input is processed in order: declare chains before the maps that jump to them.
    for (name, chain) in &rs.chains {
        let base = chain.base;
        objects.push(NfObject::ListObject(NfListObject::Chain(schema::Chain {
            family: NfFamily::INet,
            table: table.clone(),
            name: name.clone().into(),
            _type: base.map(|_| NfChainType::Filter),
            hook: base.map(|b| match b.hook {
                Hook::Prerouting => NfHook::Prerouting,
                Hook::Input => NfHook::Input,
                Hook::Forward => NfHook::Forward,
                Hook::Output => NfHook::Output,
                Hook::Postrouting => NfHook::Postrouting,
            }),
            prio: base.map(|b| b.priority),
            policy: base
                .map(|b| if b.policy == ChainPolicy::Accept { NfChainPolicy::Accept } else { NfChainPolicy::Drop }),
            ..schema::Chain::default()
        })));
    }
    for (name, set) in &rs.sets {
        objects.push(NfObject::ListObject(NfListObject::Set(Box::new(schema::Set {
            family: NfFamily::INet,
            table: table.clone(),
            name: name.clone().into(),
            set_type: set_type(&set.key),
            flags: flags(set.interval),
            elem: (!set.elements.is_empty())
                .then(|| set.elements.iter().map(|e| element(&e)).collect::<Vec<_>>().into()),
            comment: set.comment.clone().map(Into::into),
            ..schema::Set::default()
        }))));
    }
    for (name, map) in &rs.maps {
        objects.push(NfObject::ListObject(NfListObject::Map(Box::new(schema::Map {
            family: NfFamily::INet,
            table: table.clone(),
            name: name.clone().into(),
            set_type: set_type(&map.key),
            // The crate's `SetType` has no `verdict`: a placeholder that `to_value` rewrites.
            map: SetTypeValue::Single(SetType::Mark),
            flags: flags(map.interval),
            elem: (!map.elements.is_empty()).then(|| {
                map.elements
                    .iter()
                    .map(|(k, v)| Expression::List(vec![element(k), map_verdict(v)]))
                    .collect::<Vec<_>>()
                    .into()
            }),
            comment: map.comment.clone().map(Into::into),
            ..schema::Map::default()
        }))));
    }
    for (name, chain) in &rs.chains {
        for r in &chain.rules {
            objects.push(NfObject::ListObject(NfListObject::Rule(schema::Rule {
                family: NfFamily::INet,
                table: table.clone(),
                chain: name.clone().into(),
                expr: statements(r).into(),
                comment: r.comment.clone().map(Into::into),
                ..schema::Rule::default()
            })));
        }
    }
    Nftables { objects: objects.into() }
}

/// The table as `nft -j` JSON.
pub fn to_value(rs: &Ruleset) -> serde_json::Value {
    use serde_json::{Value as J, json};
    let mut v = serde_json::to_value(ruleset(rs)).expect("the nftables schema always serializes");
    if let Some(objects) = v.get_mut("nftables").and_then(|o| o.as_array_mut()) {
        for o in objects.iter_mut() {
            if let Some(map) = o.get_mut("map").and_then(|m| m.as_object_mut()) {
                map.insert("map".into(), J::String("verdict".into()));
            }
            let statements = o.get_mut("rule").and_then(|r| r.get_mut("expr")).and_then(|e| e.as_array_mut());
            for st in statements.into_iter().flatten() {
                let limit = st.get("limit").filter(|l| l.get("rate_unit").and_then(J::as_str) == Some(LIMIT_REF));
                if let Some(name) = limit.and_then(|l| l.get("per")).cloned() {
                    *st = json!({ "limit": name });
                }
            }
        }
        // Named objects right after the table: declared before the rules that name them.
        let table = &rs.table;
        let named = rs
            .counters
            .iter()
            .map(|(name, labels)| {
                json!({"counter": {"family": "inet", "table": table, "name": name, "comment": labels.comment()}})
            })
            .chain(rs.limits.iter().map(|(name, l)| {
                json!({"limit": {"family": "inet", "table": table, "name": name, "rate": l.per_second,
                                 "per": "second", "burst": l.burst}})
            }));
        let at = 1.min(objects.len());
        objects.splice(at..at, named);
    }
    v
}

/// `nft -j` text of the table.
pub fn to_string(rs: &Ruleset) -> String {
    to_value(rs).to_string()
}
