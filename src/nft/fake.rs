//! An in-memory nftables that behaves like `nft -f` where it matters to us: transactions are
//! atomic (all or nothing); references to missing chains, sets and maps are refused; `delete`
//! of a missing object or of one still referenced fails; `add` of an existing object is a
//! no-op when it agrees and an error when it does not; the last transaction is recorded;
//! dumps are deterministic. Named counters count what a test says they saw
//! ([`FakeNftables::count`]) and, as in the kernel, start at zero when (re)created.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::ir::{Chain, Element, Map, MapVerdict, Match, Rule, Ruleset, Set, Verdict};
use super::{CounterValue, NftError, Nftables, Op, Transaction, render};

/// The fake. Public so that the agent's tests (and anyone's) can use it.
#[derive(Clone, Debug, Default)]
pub struct FakeNftables {
    tables: BTreeMap<String, Ruleset>,
    last: Option<Transaction>,
    applied: usize,
    /// (table, counter) → packets and bytes counted, for the named counters that exist.
    counts: BTreeMap<(String, String), (u64, u64)>,
}

impl FakeNftables {
    pub fn new() -> Self {
        FakeNftables::default()
    }

    /// The table as the IR, if it exists.
    pub fn ruleset(&self, table: &str) -> Option<&Ruleset> {
        self.tables.get(table)
    }

    /// The last transaction applied successfully.
    pub fn last_transaction(&self) -> Option<&Transaction> {
        self.last.as_ref()
    }

    /// How many transactions were applied successfully.
    pub fn applied_count(&self) -> usize {
        self.applied
    }

    /// Named counter `name` of `table` sees `packets` more packets (`bytes` more bytes),
    /// as the kernel's would when rules count into it. False if no such counter exists.
    pub fn count(&mut self, table: &str, name: &str, packets: u64, bytes: u64) -> bool {
        if !self.tables.get(table).is_some_and(|t| t.counters.contains_key(name)) {
            return false;
        }
        let c = self.counts.entry((table.to_string(), name.to_string())).or_default();
        *c = (c.0 + packets, c.1 + bytes);
        true
    }

    /// Every table, rendered, in name order.
    pub fn dump(&self) -> String {
        self.tables.values().map(render::ruleset).collect()
    }

    /// [`FakeNftables::dump`] without the sets no rule looks up: what decides packets.
    pub fn dump_without_idle_sets(&self) -> String {
        self.tables.values().map(|t| render::ruleset(&t.without_idle_sets())).collect()
    }
}

impl Nftables for FakeNftables {
    fn apply(&mut self, tx: &Transaction) -> Result<(), NftError> {
        let mut tables = self.tables.clone();
        execute(&mut tables, tx)?;
        self.tables = tables;
        // A deleted table or counter takes its count with it.
        for op in &tx.ops {
            match op {
                Op::DeleteTable => self.counts.retain(|(t, _), _| *t != tx.table),
                Op::DeleteCounter { name } => {
                    self.counts.remove(&(tx.table.clone(), name.clone()));
                }
                _ => {}
            }
        }
        self.last = Some(tx.clone());
        self.applied += 1;
        Ok(())
    }

    fn check(&self, tx: &Transaction) -> Result<(), NftError> {
        let mut tables = self.tables.clone();
        execute(&mut tables, tx)
    }

    fn list(&self, table: &str) -> Result<String, NftError> {
        self.tables.get(table).map(render::ruleset).ok_or_else(|| NftError::NoSuchTable(table.to_string()))
    }

    fn counters(&self, table: &str) -> Result<Vec<CounterValue>, NftError> {
        let t = self.tables.get(table).ok_or_else(|| NftError::NoSuchTable(table.to_string()))?;
        Ok(t.counters
            .keys()
            .map(|name| {
                let (packets, bytes) = self.counts.get(&(table.to_string(), name.clone())).copied().unwrap_or_default();
                CounterValue { name: name.clone(), packets, bytes }
            })
            .collect())
    }
}

fn execute(tables: &mut BTreeMap<String, Ruleset>, tx: &Transaction) -> Result<(), NftError> {
    for (i, op) in tx.ops.iter().enumerate() {
        apply_op(tables, &tx.table, op).map_err(|reason| {
            let text = render::op(&tx.table, op);
            let text: String = text.chars().take(200).collect();
            NftError::Rejected(format!("operation {} `{text}`: {reason}", i + 1))
        })?;
    }
    Ok(())
}

type R = Result<(), String>;

fn apply_op(tables: &mut BTreeMap<String, Ruleset>, table: &str, op: &Op) -> R {
    match op {
        Op::AddTable => {
            tables.entry(table.to_string()).or_insert_with(|| Ruleset::new(table));
            Ok(())
        }
        Op::DeleteTable => {
            tables.remove(table).map(|_| ()).ok_or_else(|| "No such file or directory (table)".to_string())
        }
        Op::DefineTable(rs) => {
            if rs.table != table {
                return Err(format!("table {} defined in a transaction on {table}", rs.table));
            }
            tables.entry(table.to_string()).or_insert_with(|| Ruleset::new(table));
            let t = tables.get_mut(table).expect("just added");
            // nft declares every chain of a block first, then sets and maps, then rules.
            for (name, chain) in &rs.chains {
                add_chain(t, name, chain)?;
            }
            for (name, set) in &rs.sets {
                add_set(t, name, set)?;
            }
            for (name, map) in &rs.maps {
                add_map(t, name, map)?;
            }
            for (name, labels) in &rs.counters {
                t.counters.entry(name.clone()).or_insert_with(|| labels.clone());
            }
            for (name, limit) in &rs.limits {
                add_limit(t, name, limit)?;
            }
            for (name, chain) in &rs.chains {
                for rule in &chain.rules {
                    add_rule(t, name, rule)?;
                }
            }
            Ok(())
        }
        _ => {
            let t = tables.get_mut(table).ok_or("No such file or directory (table)")?;
            match op {
                Op::AddChain { name, chain } => add_chain(t, name, chain),
                Op::FlushChain { name } => {
                    Arc::make_mut(t.chains.get_mut(name).ok_or("No such file or directory (chain)")?).rules.clear();
                    Ok(())
                }
                Op::DeleteChain { name } => {
                    if !t.chains.contains_key(name) {
                        return Err("No such file or directory (chain)".into());
                    }
                    if chain_referenced(t, name) {
                        return Err("Device or resource busy (chain is referenced)".into());
                    }
                    t.chains.remove(name);
                    Ok(())
                }
                Op::AddRule { chain, rule } => add_rule(t, chain, rule),
                Op::AddSet { name, set } => add_set(t, name, set),
                Op::DeleteSet { name } => {
                    if !t.sets.contains_key(name) {
                        return Err("No such file or directory (set)".into());
                    }
                    if set_referenced(t, name) {
                        return Err("Device or resource busy (set is referenced)".into());
                    }
                    t.sets.remove(name);
                    Ok(())
                }
                Op::AddMap { name, map } => add_map(t, name, map),
                Op::DeleteMap { name } => {
                    if !t.maps.contains_key(name) {
                        return Err("No such file or directory (map)".into());
                    }
                    if set_referenced(t, name) {
                        return Err("Device or resource busy (map is referenced)".into());
                    }
                    t.maps.remove(name);
                    Ok(())
                }
                Op::AddElements { set, elements } => {
                    let s = t.sets.get_mut(set).ok_or("No such file or directory (set)")?;
                    add_elements(Arc::make_mut(s), elements)
                }
                Op::DeleteElements { set, elements } => {
                    let s = Arc::make_mut(t.sets.get_mut(set).ok_or("No such file or directory (set)")?);
                    for e in elements {
                        if !s.elements.remove(e) {
                            return Err(format!("No such file or directory (element {e})"));
                        }
                    }
                    Ok(())
                }
                Op::AddMapElements { map, elements } => {
                    let chains = t.chains.clone();
                    let m = t.maps.get_mut(map).ok_or("No such file or directory (map)")?;
                    add_map_elements(m, elements.iter().map(|(e, v)| (e, v)), &chains)
                }
                Op::DeleteMapElements { map, elements } => {
                    let m = t.maps.get_mut(map).ok_or("No such file or directory (map)")?;
                    for e in elements {
                        if m.elements.remove(e).is_none() {
                            return Err(format!("No such file or directory (element {e})"));
                        }
                    }
                    Ok(())
                }
                Op::AddCounter { name, labels } => {
                    t.counters.entry(name.clone()).or_insert_with(|| labels.clone());
                    Ok(())
                }
                Op::DeleteCounter { name } => {
                    if !t.counters.contains_key(name) {
                        return Err("No such file or directory (counter)".into());
                    }
                    if t.chains
                        .values()
                        .flat_map(|c| &c.rules)
                        .any(|r| r.named_counter.as_ref().is_some_and(|c| c.name == *name))
                    {
                        return Err("Device or resource busy (counter is referenced)".into());
                    }
                    t.counters.remove(name);
                    Ok(())
                }
                Op::AddLimit { name, limit } => add_limit(t, name, limit),
                Op::AddTable | Op::DeleteTable | Op::DefineTable(_) => {
                    unreachable!("handled above")
                }
            }
        }
    }
}

fn add_chain(t: &mut Ruleset, name: &str, chain: &Chain) -> R {
    match t.chains.get(name) {
        Some(existing) if existing.base != chain.base => {
            Err("File exists (chain with another hook, priority or policy)".into())
        }
        Some(_) => Ok(()),
        None => {
            t.chains.insert(
                name.to_string(),
                Arc::new(Chain { base: chain.base, comment: chain.comment.clone(), rules: Vec::new() }),
            );
            Ok(())
        }
    }
}

fn add_limit(t: &mut Ruleset, name: &str, limit: &super::ir::Limit) -> R {
    match t.limits.get(name) {
        Some(existing) if existing != limit => Err(format!("File exists (limit {name} with another rate)")),
        _ => {
            t.limits.insert(name.to_string(), *limit);
            Ok(())
        }
    }
}

fn check_target(chains: &BTreeMap<String, Arc<Chain>>, target: &str) -> R {
    match chains.get(target) {
        None => Err(format!("No such file or directory (chain {target})")),
        Some(c) if c.base.is_some() => Err(format!("Operation not supported (jump to base chain {target})")),
        Some(_) => Ok(()),
    }
}

fn add_rule(t: &mut Ruleset, chain: &str, rule: &Rule) -> R {
    if !t.chains.contains_key(chain) {
        return Err(format!("No such file or directory (chain {chain})"));
    }
    for m in &rule.matches {
        match m {
            Match::Lookup { key, set, .. } => {
                let s = t.sets.get(set).ok_or_else(|| format!("No such file or directory (set {set})"))?;
                if s.key != key.key_types() {
                    return Err(format!("datatype mismatch: set {set} is not keyed by {}", render::key(*key)));
                }
            }
            // nft: "Error: Range has zero or negative size".
            Match::Icmpv6Type(lo, hi) if lo > hi => {
                return Err(format!("Range has zero or negative size (icmpv6 type {lo}-{hi})"));
            }
            _ => {}
        }
    }
    if let Some(c) = &rule.named_counter
        && !t.counters.contains_key(&c.name)
    {
        return Err(format!("No such file or directory (counter {})", c.name));
    }
    if let Some(limit) = rule.log.as_ref().and_then(|l| l.limit.as_ref())
        && !t.limits.contains_key(limit)
    {
        return Err(format!("No such file or directory (limit {limit})"));
    }
    // nft refuses a rule whose matches imply both families ("conflicting protocols").
    let families: std::collections::BTreeSet<_> = rule.matches.iter().filter_map(|m| m.family()).collect();
    if families.len() > 1 {
        return Err("conflicting protocols specified: ip vs. ip6".to_string());
    }
    match &rule.verdict {
        Some(Verdict::Jump(c) | Verdict::Goto(c)) => check_target(&t.chains, c)?,
        Some(Verdict::Vmap { key, map }) => {
            let m = t.maps.get(map).ok_or_else(|| format!("No such file or directory (map {map})"))?;
            if m.key != key.key_types() {
                return Err(format!("datatype mismatch: map {map} is not keyed by {}", render::key(*key)));
            }
        }
        _ => {}
    }
    Arc::make_mut(t.chains.get_mut(chain).expect("checked")).rules.push(rule.clone());
    Ok(())
}

fn check_element(key: &[super::ir::KeyType], interval: bool, e: &Element) -> R {
    if e.key_types() != key {
        return Err(format!("datatype mismatch: element {e}"));
    }
    if e.is_interval() && !interval {
        return Err(format!("you must add 'flags interval' to your set for element {e}"));
    }
    Ok(())
}

fn add_elements(s: &mut Set, elements: &[Element]) -> R {
    for e in elements {
        check_element(&s.key, s.interval, e)?;
        if s.elements.contains(e) {
            continue;
        }
        if s.interval
            && let Some(other) = s.elements.iter().find(|o| o.overlaps(e))
        {
            return Err(format!("File exists (interval {e} overlaps {other})"));
        }
        s.elements.insert(e.clone());
    }
    Ok(())
}

fn add_set(t: &mut Ruleset, name: &str, set: &Set) -> R {
    match t.sets.get_mut(name) {
        Some(existing) if !existing.same_declaration(set) => {
            Err(format!("File exists (set {name} with another type or flags)"))
        }
        Some(existing) => add_elements(Arc::make_mut(existing), &set.elements.iter().collect::<Vec<_>>()),
        None => {
            let mut s = Set { elements: Default::default(), ..set.clone() };
            add_elements(&mut s, &set.elements.iter().collect::<Vec<_>>())?;
            t.sets.insert(name.to_string(), Arc::new(s));
            Ok(())
        }
    }
}

fn add_map_elements<'e>(
    m: &mut Map,
    elements: impl Iterator<Item = (&'e Element, &'e MapVerdict)>,
    chains: &BTreeMap<String, Arc<Chain>>,
) -> R {
    for (e, v) in elements {
        check_element(&m.key, m.interval, e)?;
        if let MapVerdict::Jump(c) | MapVerdict::Goto(c) = v {
            check_target(chains, c)?;
        }
        match m.elements.get(e) {
            Some(existing) if existing == v => {}
            Some(_) => return Err(format!("File exists (element {e} maps to another verdict)")),
            None => {
                m.elements.insert(e.clone(), v.clone());
            }
        }
    }
    Ok(())
}

fn add_map(t: &mut Ruleset, name: &str, map: &Map) -> R {
    let chains = t.chains.clone();
    match t.maps.get_mut(name) {
        Some(existing) if !existing.same_declaration(map) => {
            Err(format!("File exists (map {name} with another type or flags)"))
        }
        Some(existing) => add_map_elements(existing, map.elements.iter(), &chains),
        None => {
            let mut m = Map { elements: Default::default(), ..map.clone() };
            add_map_elements(&mut m, map.elements.iter(), &chains)?;
            t.maps.insert(name.to_string(), m);
            Ok(())
        }
    }
}

fn chain_referenced(t: &Ruleset, name: &str) -> bool {
    let by_rule = t
        .chains
        .values()
        .flat_map(|c| &c.rules)
        .any(|r| matches!(&r.verdict, Some(Verdict::Jump(c) | Verdict::Goto(c)) if c == name));
    let by_map = t
        .maps
        .values()
        .flat_map(|m| m.elements.values())
        .any(|v| matches!(v, MapVerdict::Jump(c) | MapVerdict::Goto(c) if c == name));
    by_rule || by_map
}

fn set_referenced(t: &Ruleset, name: &str) -> bool {
    t.chains.values().flat_map(|c| &c.rules).any(|r| {
        r.matches.iter().any(|m| matches!(m, Match::Lookup { set, .. } if set == name))
            || matches!(&r.verdict, Some(Verdict::Vmap { map, .. }) if map == name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::ir::{KeyType, Value};

    fn tx(ops: Vec<Op>) -> Transaction {
        Transaction { table: "t".into(), ops }
    }

    #[test]
    fn a_rule_mixing_families_or_with_an_empty_icmpv6_type_range_is_refused_as_nft_refuses_it() {
        use crate::nft::ir::{AddrField, IpFamily, Key};
        let mut f = FakeNftables::new();
        let chain = || Op::AddChain { name: "c".into(), chain: Chain::default() };
        let set = Set { key: vec![KeyType::Ipv4Addr], ..Set::default() };
        let rule = |matches| Op::AddRule { chain: "c".into(), rule: Rule { matches, ..Rule::default() } };
        let lookup = Match::Lookup { key: Key::Addr(IpFamily::V4, AddrField::Saddr), set: "s".into(), negate: false };
        let mixed = rule(vec![lookup, Match::Ip6HopLimit(255)]);
        let base = vec![Op::AddTable, chain(), Op::AddSet { name: "s".into(), set: Arc::new(set) }];
        let err = f.apply(&tx([base.clone(), vec![mixed]].concat())).unwrap_err();
        assert!(err.to_string().contains("conflicting protocols"), "{err}");
        let err = f.apply(&tx([base.clone(), vec![rule(vec![Match::Icmpv6Type(136, 133)])]].concat())).unwrap_err();
        assert!(err.to_string().contains("Range has zero or negative size"), "{err}");
        let nd = rule(vec![Match::Icmpv6Type(133, 136), Match::Ip6HopLimit(255)]);
        f.apply(&tx([base, vec![nd]].concat())).unwrap();
    }

    #[test]
    fn a_failing_transaction_changes_nothing() {
        let mut f = FakeNftables::new();
        f.apply(&tx(vec![Op::AddTable])).unwrap();
        let before = f.dump();
        let bad = tx(vec![
            Op::AddChain { name: "c".into(), chain: Chain::default() },
            Op::AddRule {
                chain: "c".into(),
                rule: Rule { verdict: Some(Verdict::Jump("missing".into())), ..Rule::default() },
            },
        ]);
        let err = f.apply(&bad).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert_eq!(f.dump(), before);
    }

    #[test]
    fn deleting_a_referenced_set_or_a_missing_element_fails() {
        let mut f = FakeNftables::new();
        let set = Set { key: vec![KeyType::Ipv4Addr], ..Set::default() };
        let rule = Rule {
            matches: vec![Match::Lookup {
                key: crate::nft::ir::Key::Addr(crate::nft::ir::IpFamily::V4, crate::nft::ir::AddrField::Saddr),
                set: "s".into(),
                negate: false,
            }],
            verdict: Some(Verdict::Accept),
            ..Rule::default()
        };
        f.apply(&tx(vec![
            Op::AddTable,
            Op::AddSet { name: "s".into(), set: set.into() },
            Op::AddChain { name: "c".into(), chain: Chain::default() },
            Op::AddRule { chain: "c".into(), rule },
        ]))
        .unwrap();
        assert!(f.apply(&tx(vec![Op::DeleteSet { name: "s".into() }])).is_err());
        let e = Element::single(Value::Addr("192.0.2.1".parse().unwrap()));
        assert!(f.apply(&tx(vec![Op::DeleteElements { set: "s".into(), elements: vec![e] }])).is_err());
        assert!(f.apply(&tx(vec![Op::FlushChain { name: "c".into() }, Op::DeleteSet { name: "s".into() }])).is_ok());
    }

    #[test]
    fn overlapping_intervals_are_refused() {
        let mut f = FakeNftables::new();
        let p = |s: &str| Element::single(Value::Prefix(s.parse().unwrap()));
        let set = Set { key: vec![KeyType::Ipv4Addr], interval: true, ..Set::default() };
        f.apply(&tx(vec![
            Op::AddTable,
            Op::AddSet { name: "s".into(), set: set.into() },
            Op::AddElements { set: "s".into(), elements: vec![p("10.0.0.0/24")] },
        ]))
        .unwrap();
        assert!(f.apply(&tx(vec![Op::AddElements { set: "s".into(), elements: vec![p("10.0.0.128/25")] }])).is_err());
    }
}
