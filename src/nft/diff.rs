//! From the ruleset the kernel has to the one we want, in one atomic transaction.
//!
//! ```text
//!  1 add chain        new chains (declared, empty)      create before use
//!  2 add set/map      new sets and maps, with elements
//!  3 add element      new elements of kept sets/maps (a changed map verdict, or a changed
//!                     interval set: delete first, in the same transaction)
//!  4 flush + add rule changed chains rewritten; new chains filled
//!  5 delete element   gone elements of kept sets/maps
//!  6 flush chain      obsolete chains (drops their references)
//!  7 delete set/map   obsolete sets and maps                delete after last use
//!  8 delete chain     obsolete chains
//! ```
//!
//! Sets are never emptied and refilled: only their changed elements move. A set that is the
//! same allocation in both rulesets (the compiler reused it) is skipped unread. A changed layout
//! (another table, base chain, or set type under the same name) makes the diff a full sync.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::ir::{Element, MapVerdict, Ruleset, Set};
use super::{Op, Transaction};

/// Replaces the whole table atomically: `add table` (so `delete` cannot fail), `delete
/// table`, then the full definition, all in one transaction. Never flush-then-fill.
pub fn full_sync(desired: &Ruleset) -> Transaction {
    Transaction {
        table: desired.table.clone(),
        ops: vec![Op::AddTable, Op::DeleteTable, Op::DefineTable(Box::new(desired.clone()))],
    }
}

/// Does `desired` keep `applied`'s layout (so an incremental diff is possible)?
fn same_layout(applied: &Ruleset, desired: &Ruleset) -> bool {
    if applied.table != desired.table {
        return false;
    }
    let bases = |rs: &Ruleset| rs.chains.iter().filter_map(|(n, c)| c.base.map(|b| (n.clone(), b))).collect::<Vec<_>>();
    if bases(applied) != bases(desired) {
        return false;
    }
    let chains_ok = applied
        .chains
        .iter()
        .all(|(n, c)| desired.chains.get(n).is_none_or(|d| d.base == c.base && d.comment == c.comment));
    let sets_ok = applied.sets.iter().all(|(n, s)| desired.sets.get(n).is_none_or(|d| d.same_declaration(s)));
    let maps_ok = applied.maps.iter().all(|(n, m)| desired.maps.get(n).is_none_or(|d| d.same_declaration(m)));
    // A name may not change kind (set ↔ map).
    let kinds_ok = !applied.sets.keys().any(|n| desired.maps.contains_key(n))
        && !applied.maps.keys().any(|n| desired.sets.contains_key(n));
    chains_ok && sets_ok && maps_ok && kinds_ok
}

/// How one set changed between two rulesets, as its producer (the incremental compiler)
/// knows it: `to` is `from` without `gone` and with `added` (both sorted, `gone` ⊆ `from`,
/// `added` disjoint from it).
#[derive(Clone, Debug)]
pub struct SetDelta {
    pub from: Arc<Set>,
    pub to: Arc<Set>,
    pub gone: Vec<Element>,
    pub added: Vec<Element>,
}

/// Known set changes by set name.
pub type SetDeltas = HashMap<String, SetDelta>;

/// The transaction that turns `applied` into `desired`.
pub fn diff(applied: &Ruleset, desired: &Ruleset) -> Transaction {
    diff_with(applied, desired, &SetDeltas::new())
}

/// [`diff`], taking the element changes of a set from `known` where it holds exactly the
/// two sets compared (the same allocations): O(changes) instead of O(elements) for a big set
/// that gained or lost a few members. Same transaction either way.
pub fn diff_with(applied: &Ruleset, desired: &Ruleset, known: &SetDeltas) -> Transaction {
    if !same_layout(applied, desired) {
        return full_sync(desired);
    }
    let mut tx = Transaction::new(desired.table.clone());
    let ops = &mut tx.ops;

    // 1. New chains, declared.
    for (name, chain) in &desired.chains {
        if !applied.chains.contains_key(name) {
            ops.push(Op::AddChain { name: name.clone(), chain: (**chain).clone() });
        }
    }
    // 2. New sets and maps.
    for (name, set) in &desired.sets {
        if !applied.sets.contains_key(name) {
            ops.push(Op::AddSet { name: name.clone(), set: set.clone() });
        }
    }
    for (name, map) in &desired.maps {
        if !applied.maps.contains_key(name) {
            ops.push(Op::AddMap { name: name.clone(), map: map.clone() });
        }
    }
    // 3. New elements of kept sets and maps.
    let mut removals = Vec::new();
    for (name, set) in &desired.sets {
        if let Some(old) = applied.sets.get(name) {
            if Arc::ptr_eq(old, set) {
                continue; // the compiler reused it: unchanged, whatever its size
            }
            let (added, removed): (Vec<Element>, Vec<Element>) = match known.get(name) {
                Some(d) if Arc::ptr_eq(&d.from, old) && Arc::ptr_eq(&d.to, set) => (d.added.clone(), d.gone.clone()),
                _ => (
                    set.elements.difference(&old.elements).cloned().collect(),
                    old.elements.difference(&set.elements).cloned().collect(),
                ),
            };
            if !removed.is_empty() {
                // Interval elements must not overlap, not even for an instant inside the
                // transaction: delete first (still atomic for packets), then add.
                let op = Op::DeleteElements { set: name.clone(), elements: removed };
                if set.interval { ops.push(op) } else { removals.push(op) }
            }
            if !added.is_empty() {
                ops.push(Op::AddElements { set: name.clone(), elements: added });
            }
        }
    }
    for (name, map) in &desired.maps {
        if let Some(old) = applied.maps.get(name) {
            let changed: Vec<Element> = map
                .elements
                .iter()
                .filter(|(k, v)| old.elements.get(*k).is_some_and(|o| o != *v))
                .map(|(k, _)| k.clone())
                .collect();
            let added: Vec<(Element, MapVerdict)> = map
                .elements
                .iter()
                .filter(|(k, v)| old.elements.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let removed: Vec<Element> =
                old.elements.keys().filter(|k| !map.elements.contains_key(*k)).cloned().collect();
            if !changed.is_empty() {
                ops.push(Op::DeleteMapElements { map: name.clone(), elements: changed });
            }
            if !added.is_empty() {
                ops.push(Op::AddMapElements { map: name.clone(), elements: added });
            }
            if !removed.is_empty() {
                removals.push(Op::DeleteMapElements { map: name.clone(), elements: removed });
            }
        }
    }
    // 4. Changed chains rewritten, new chains filled.
    for (name, chain) in &desired.chains {
        match applied.chains.get(name) {
            Some(old) if Arc::ptr_eq(old, chain) || old.rules == chain.rules => continue,
            Some(old) if !old.rules.is_empty() => ops.push(Op::FlushChain { name: name.clone() }),
            _ => {}
        }
        for rule in &chain.rules {
            ops.push(Op::AddRule { chain: name.clone(), rule: rule.clone() });
        }
    }
    // 5. Gone elements.
    ops.extend(removals);
    // 6–8. Obsolete objects, after their last use.
    let obsolete: BTreeSet<&String> = applied.chains.keys().filter(|n| !desired.chains.contains_key(*n)).collect();
    for name in &obsolete {
        if !applied.chains[*name].rules.is_empty() {
            ops.push(Op::FlushChain { name: (*name).clone() });
        }
    }
    for name in applied.maps.keys().filter(|n| !desired.maps.contains_key(*n)) {
        ops.push(Op::DeleteMap { name: name.clone() });
    }
    for name in applied.sets.keys().filter(|n| !desired.sets.contains_key(*n)) {
        ops.push(Op::DeleteSet { name: name.clone() });
    }
    for name in obsolete {
        ops.push(Op::DeleteChain { name: name.clone() });
    }
    tx
}
