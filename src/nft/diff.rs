//! From the ruleset the kernel has to the one we want, in one atomic transaction.
//!
//! ```text
//!  1 add chain        new chains (declared, empty)      create before use
//!    add counter      new named counters (kept ones keep their counts)
//!  2 add set/map      new sets and maps, with elements
//!  3 add element      new elements of kept sets/maps (a changed map verdict, or a changed
//!                     interval set: delete first, in the same transaction)
//!  4 flush + add rule changed chains rewritten; new chains filled
//!  5 delete element   gone elements of kept sets/maps
//!  6 flush chain      obsolete chains (drops their references)
//!  7 delete set/map   obsolete sets and maps, and counters  delete after last use
//!  8 delete chain     obsolete chains
//! ```
//!
//! A named limit that changes or goes (other drop-log flags) is a new layout: a full sync.
//!
//! Sets are never emptied and refilled: only their changed elements move. A set that is the
//! same allocation in both rulesets (the compiler reused it) is skipped unread. A changed layout
//! (another table, base chain, or set type under the same name) makes the diff a full sync.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::ir::{Element, Elements, MapVerdict, Ruleset, Set};
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

/// How one set changed between two rulesets, as its producer (the incremental compiler)
/// knows it: `to` is `from` without `gone` and with `added` (both sorted, `gone` ⊆ `from`,
/// `added` disjoint from it). `from` is the allocation the earlier ruleset holds: the
/// version before, or a stand-in without elements when the set was changed in place (see
/// [`crate::compile::IncrementalCompiler::compile`]).
#[derive(Clone, Debug)]
pub struct SetDelta {
    pub from: Arc<Set>,
    pub to: Arc<Set>,
    pub gone: Vec<Element>,
    pub added: Vec<Element>,
}

impl SetDelta {
    /// The elements of the set before the change: `to` without `added`, with `gone`.
    pub fn before(&self) -> Elements {
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

/// The elements the kernel holds of the applied set `name` (`held`, its entry in the
/// applied ruleset): its own, or, when the compiler made it a stand-in, those its delta
/// says it had.
pub fn applied_elements<'a>(name: &str, held: &'a Arc<Set>, known: &SetDeltas) -> Cow<'a, Elements> {
    match known.get(name).filter(|d| Arc::ptr_eq(&d.from, held)) {
        Some(d) => Cow::Owned(d.before()),
        None => Cow::Borrowed(&held.elements),
    }
}

/// The transaction that turns `applied` into `desired`.
pub fn diff(applied: &Ruleset, desired: &Ruleset) -> Transaction {
    diff_with(applied, desired, &SetDeltas::new())
}

/// [`diff`], taking the element changes of a set from `known` where it holds exactly the
/// two sets compared (the same allocations): O(changes) instead of O(elements) for a big set
/// that gained or lost a few members. Same transaction either way.
pub fn diff_with(applied: &Ruleset, desired: &Ruleset, known: &SetDeltas) -> Transaction {
    incremental(applied, desired, known).unwrap_or_else(|| full_sync(desired))
}

/// The elements `after` adds to `before`, and those it takes away.
fn element_changes(before: &Elements, after: &Elements) -> (Vec<Element>, Vec<Element>) {
    (after.difference(before).collect(), before.difference(after).collect())
}

/// [`diff_with`] while `desired` keeps `applied`'s layout; `None` once it does not (another
/// table, base chain, chain comment or set type under the same name, or a name that changes
/// kind), which takes a full sync. One walk over the chains, one over the sets and one over
/// the maps, each op put in its phase.
fn incremental(applied: &Ruleset, desired: &Ruleset, known: &SetDeltas) -> Option<Transaction> {
    // A name may not change kind (set ↔ map). (Maps are few: look them up in the sets.)
    if applied.table != desired.table
        || desired.maps.keys().any(|n| applied.sets.contains_key(n))
        || applied.maps.keys().any(|n| desired.sets.contains_key(n))
    {
        return None;
    }
    let mut add_chains = Vec::new();
    let mut fill_chains = Vec::new();
    let mut flush_obsolete = Vec::new();
    let mut delete_chains = Vec::new();
    for (name, old, chain) in by_name(&applied.chains, &desired.chains) {
        match (old, chain) {
            // 1. New chains, declared; 4. filled. (A new base chain is a new layout.)
            (None, Some(chain)) => {
                if chain.base.is_some() {
                    return None;
                }
                add_chains.push(Op::AddChain { name: name.clone(), chain: (**chain).clone() });
                fill_chains
                    .extend(chain.rules.iter().map(|rule| Op::AddRule { chain: name.clone(), rule: rule.clone() }));
            }
            // 4. Changed chains rewritten.
            (Some(old), Some(chain)) => {
                if Arc::ptr_eq(old, chain) {
                    continue;
                }
                if old.base != chain.base || old.comment != chain.comment {
                    return None;
                }
                if old.rules == chain.rules {
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
                if old.base.is_some() {
                    return None;
                }
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
                if !set.same_declaration(old) {
                    return None;
                }
                let (added, removed) = match known.get(name).filter(|d| Arc::ptr_eq(&d.from, old)) {
                    Some(d) if Arc::ptr_eq(&d.to, set) => (d.added.clone(), d.gone.clone()),
                    // Patched, then built anew after all (its policy changed): compare with
                    // what the kernel has, which `from` may no longer hold (a stand-in).
                    Some(d) => element_changes(&d.before(), &set.elements),
                    None => element_changes(&old.elements, &set.elements),
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
    let mut map_elements = Vec::new();
    let mut map_removals = Vec::new();
    let mut delete_maps = Vec::new();
    for (name, old, map) in by_name(&applied.maps, &desired.maps) {
        match (old, map) {
            (None, Some(map)) => add_maps.push(Op::AddMap { name: name.clone(), map: map.clone() }),
            (Some(old), Some(map)) => {
                if !map.same_declaration(old) {
                    return None;
                }
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
                    map_elements.push(Op::DeleteMapElements { map: name.clone(), elements: changed });
                }
                if !added.is_empty() {
                    map_elements.push(Op::AddMapElements { map: name.clone(), elements: added });
                }
                if !removed.is_empty() {
                    map_removals.push(Op::DeleteMapElements { map: name.clone(), elements: removed });
                }
            }
            (Some(_), None) => delete_maps.push(Op::DeleteMap { name: name.clone() }),
            (None, None) => {}
        }
    }
    // Named limits: any change is a change of flags, rare enough for a full sync.
    if applied.limits != desired.limits {
        return None;
    }
    let mut add_counters = Vec::new();
    let mut delete_counters = Vec::new();
    for (name, old, labels) in by_name(&applied.counters, &desired.counters) {
        match (old, labels) {
            (None, Some(labels)) => add_counters.push(Op::AddCounter { name: name.clone(), labels: labels.clone() }),
            (Some(_), None) => delete_counters.push(Op::DeleteCounter { name: name.clone() }),
            // The same name, the same labels (names are derived from them): kept, count and all.
            _ => {}
        }
    }
    let mut tx = Transaction::new(desired.table.clone());
    for phase in [
        add_chains,
        add_counters,
        add_sets,
        add_maps,
        elements,
        map_elements,
        fill_chains,
        removals,
        map_removals,
        flush_obsolete,
        delete_maps,
        delete_sets,
        delete_counters,
        delete_chains,
    ] {
        tx.ops.extend(phase);
    }
    Some(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{NodeConfig, compile};

    fn is_full(tx: &Transaction) -> bool {
        matches!(tx.ops.as_slice(), [Op::AddTable, Op::DeleteTable, Op::DefineTable(_)])
    }

    /// A node's ruleset with policy chains, peer sets and the dispatch maps.
    fn node_ruleset() -> Ruleset {
        (0..50)
            .map(|seed| compile(&crate::cli::generate::small_random(seed), &NodeConfig::new("node-1")))
            .find(|rs| rs.chains.len() > 5 && rs.sets.values().any(|s| !s.elements.is_empty()))
            .expect("a random cluster with policies on node-1")
    }

    #[test]
    fn a_changed_layout_makes_the_diff_a_full_sync_and_changed_elements_do_not() {
        let applied = node_ruleset();
        let regular = applied.chains.iter().find(|(_, c)| c.base.is_none()).map(|(n, _)| n.clone()).unwrap();
        let base = applied.chains.iter().find(|(_, c)| c.base.is_some()).map(|(n, _)| n.clone()).unwrap();
        let (set_name, set) = applied.sets.iter().find(|(_, s)| !s.elements.is_empty()).unwrap();
        let full_after = |what: &str, change: &dyn Fn(&mut Ruleset)| {
            let mut desired = applied.clone();
            change(&mut desired);
            assert!(is_full(&diff(&applied, &desired)), "{what}: expected a full sync");
        };
        full_after("another table", &|rs| rs.table = "other".into());
        full_after("a chain's comment", &|rs| {
            Arc::make_mut(rs.chains.get_mut(&regular).unwrap()).comment = Some("x".into());
        });
        full_after("a base chain gone", &|rs| {
            rs.chains.remove(&base);
        });
        full_after("a new base chain", &|rs| {
            let copy = Arc::clone(&rs.chains[&base]);
            rs.chains.insert("zz_new_base".into(), copy);
        });
        full_after("a set's type", &|rs| Arc::make_mut(rs.sets.get_mut(set_name).unwrap()).interval ^= true);
        full_after("a set becoming a map", &|rs| {
            rs.sets.remove(set_name);
            rs.maps.insert(set_name.clone(), Default::default());
        });
        let mut desired = applied.clone();
        let gone = set.elements.first().unwrap().clone();
        Arc::make_mut(desired.sets.get_mut(set_name).unwrap()).elements.remove(&gone);
        let tx = diff(&applied, &desired);
        assert_eq!(tx.ops, [Op::DeleteElements { set: set_name.clone(), elements: vec![gone] }]);
    }
}
