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

use std::collections::{BTreeMap, BTreeSet, HashMap};
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

/// The names of two maps in order, each with its value in the one and in the other: one
/// walk over both (a lookup per name would compare names a dozen times each, thousands of
/// chains and sets on every sync).
fn by_name<'a, A, B>(
    applied: &'a BTreeMap<String, A>,
    desired: &'a BTreeMap<String, B>,
) -> impl Iterator<Item = (&'a String, Option<&'a A>, Option<&'a B>)> {
    let mut a = applied.iter().peekable();
    let mut b = desired.iter().peekable();
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (None, None) => None,
        (Some(_), None) => a.next().map(|(n, x)| (n, Some(x), None)),
        (None, Some(_)) => b.next().map(|(n, y)| (n, None, Some(y))),
        (Some((na, _)), Some((nb, _))) => match na.cmp(nb) {
            std::cmp::Ordering::Less => a.next().map(|(n, x)| (n, Some(x), None)),
            std::cmp::Ordering::Greater => b.next().map(|(n, y)| (n, None, Some(y))),
            std::cmp::Ordering::Equal => {
                let (n, x) = a.next()?;
                let (_, y) = b.next()?;
                Some((n, Some(x), Some(y)))
            }
        },
    })
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
    let chains_ok = by_name(&applied.chains, &desired.chains).all(|(_, a, d)| match (a, d) {
        (Some(a), Some(d)) => Arc::ptr_eq(a, d) || (d.base == a.base && d.comment == a.comment),
        _ => true,
    });
    let sets_ok = by_name(&applied.sets, &desired.sets).all(|(_, a, d)| match (a, d) {
        (Some(a), Some(d)) => Arc::ptr_eq(a, d) || d.same_declaration(a),
        _ => true,
    });
    let maps_ok = by_name(&applied.maps, &desired.maps).all(|(_, a, d)| match (a, d) {
        (Some(a), Some(d)) => d.same_declaration(a),
        _ => true,
    });
    // A name may not change kind (set ↔ map). (Maps are few: look them up in the sets.)
    let kinds_ok = !desired.maps.keys().any(|n| applied.sets.contains_key(n))
        && !applied.maps.keys().any(|n| desired.sets.contains_key(n));
    chains_ok && sets_ok && maps_ok && kinds_ok
}

/// How one set changed between two rulesets, as its producer (the incremental compiler)
/// knows it: `to` is `from` without `gone` and with `added` (both sorted, `gone` ⊆ `from`,
/// `added` disjoint from it). `from` is the allocation the earlier ruleset holds: the
/// version before, or a stand-in without elements when the set was changed in place (see
/// [`crate::compile::IncrementalCompiler::compile_after`]).
#[derive(Clone, Debug)]
pub struct SetDelta {
    pub from: Arc<Set>,
    pub to: Arc<Set>,
    pub gone: Vec<Element>,
    pub added: Vec<Element>,
}

impl SetDelta {
    /// The elements of the set before the change: `to` without `added`, with `gone`.
    pub fn before(&self) -> BTreeSet<Element> {
        let mut before = self.to.elements.clone();
        for e in &self.added {
            before.remove(e);
        }
        before.extend(self.gone.iter().cloned());
        before
    }
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
    // One walk over the chains and one over the sets, each op put in its phase.
    let mut add_chains = Vec::new();
    let mut fill_chains = Vec::new();
    let mut flush_obsolete = Vec::new();
    let mut delete_chains = Vec::new();
    for (name, old, chain) in by_name(&applied.chains, &desired.chains) {
        match (old, chain) {
            // 1. New chains, declared; 4. filled.
            (None, Some(chain)) => {
                add_chains.push(Op::AddChain { name: name.clone(), chain: (**chain).clone() });
                fill_chains
                    .extend(chain.rules.iter().map(|rule| Op::AddRule { chain: name.clone(), rule: rule.clone() }));
            }
            // 4. Changed chains rewritten.
            (Some(old), Some(chain)) => {
                if Arc::ptr_eq(old, chain) || old.rules == chain.rules {
                    continue;
                }
                if !old.rules.is_empty() {
                    fill_chains.push(Op::FlushChain { name: name.clone() });
                }
                fill_chains
                    .extend(chain.rules.iter().map(|rule| Op::AddRule { chain: name.clone(), rule: rule.clone() }));
            }
            // 6, 8. Obsolete chains: emptied (drops their references), deleted last.
            (Some(old), None) => {
                if !old.rules.is_empty() {
                    flush_obsolete.push(Op::FlushChain { name: name.clone() });
                }
                delete_chains.push(Op::DeleteChain { name: name.clone() });
            }
            (None, None) => {}
        }
    }
    let mut add_sets = Vec::new();
    let mut elements = Vec::new();
    let mut removals = Vec::new();
    let mut delete_sets = Vec::new();
    for (name, old, set) in by_name(&applied.sets, &desired.sets) {
        match (old, set) {
            // 2. New sets.
            (None, Some(set)) => add_sets.push(Op::AddSet { name: name.clone(), set: set.clone() }),
            // 3. New elements of kept sets (5. gone ones).
            (Some(old), Some(set)) => {
                if Arc::ptr_eq(old, set) {
                    continue; // the compiler reused it: unchanged, whatever its size
                }
                let (added, removed): (Vec<Element>, Vec<Element>) = match known.get(name) {
                    Some(d) if Arc::ptr_eq(&d.from, old) && Arc::ptr_eq(&d.to, set) => {
                        (d.added.clone(), d.gone.clone())
                    }
                    // Patched, then built anew after all (its policy changed): compare with
                    // what the kernel has, which `from` may no longer hold (a stand-in).
                    Some(d) if Arc::ptr_eq(&d.from, old) => {
                        let before = d.before();
                        (
                            set.elements.difference(&before).cloned().collect(),
                            before.difference(&set.elements).cloned().collect(),
                        )
                    }
                    _ => (
                        set.elements.difference(&old.elements).cloned().collect(),
                        old.elements.difference(&set.elements).cloned().collect(),
                    ),
                };
                if !removed.is_empty() {
                    // Interval elements must not overlap, not even for an instant inside the
                    // transaction: delete first (still atomic for packets), then add.
                    let op = Op::DeleteElements { set: name.clone(), elements: removed };
                    if set.interval { elements.push(op) } else { removals.push(op) }
                }
                if !added.is_empty() {
                    elements.push(Op::AddElements { set: name.clone(), elements: added });
                }
            }
            // 7. Obsolete sets.
            (Some(_), None) => delete_sets.push(Op::DeleteSet { name: name.clone() }),
            (None, None) => {}
        }
    }
    let mut add_maps = Vec::new();
    for (name, map) in &desired.maps {
        if !applied.maps.contains_key(name) {
            add_maps.push(Op::AddMap { name: name.clone(), map: map.clone() });
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
                elements.push(Op::DeleteMapElements { map: name.clone(), elements: changed });
            }
            if !added.is_empty() {
                elements.push(Op::AddMapElements { map: name.clone(), elements: added });
            }
            if !removed.is_empty() {
                removals.push(Op::DeleteMapElements { map: name.clone(), elements: removed });
            }
        }
    }
    let delete_maps =
        applied.maps.keys().filter(|n| !desired.maps.contains_key(*n)).map(|name| Op::DeleteMap { name: name.clone() });
    let delete_maps: Vec<Op> = delete_maps.collect();
    for phase in [
        add_chains,
        add_sets,
        add_maps,
        elements,
        fill_chains,
        removals,
        flush_obsolete,
        delete_maps,
        delete_sets,
        delete_chains,
    ] {
        tx.ops.extend(phase);
    }
    tx
}
