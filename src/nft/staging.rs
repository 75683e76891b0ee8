//! Big set fills in chunks: a sync that would add thousands of elements to sets no rule
//! looks up yet (a policy starts selecting a local pod: its peer sets are new) commits them
//! a chunk at a time, so that no other change waits behind the whole fill.
//!
//! ```text
//!  applied (what the kernel has) ─┐
//!  desired ───────────────────────┼─► stage(chunk) ─► Step: a ruleset between the two ─► diff_with(applied, step)
//!  set deltas ────────────────────┘    │                (committed; becomes `applied`)
//!                                      ├─ sets no applied rule looks up: at most `chunk` new elements
//!                                      │  in all; a set not filled whole is *incomplete*
//!                                      ├─ chains whose desired rules look one up: *held* (their applied
//!                                      │  version, or not created); held new chains hold back the chains
//!                                      │  and dispatch-map elements that jump to them (the old element stays)
//!                                      ├─ what a held chain or an old element still names: kept at its
//!                                      │  applied version (not deleted yet)
//!                                      └─ a new pod whose dispatch element is held: kept out of the sets
//!                                         rules look up negated (the unknown-pod guard) until it comes
//! ```
//!
//! An unreferenced set decides no packet, so filling it in several transactions changes
//! nothing a packet sees until the transaction that also brings the rules naming it; every
//! chain of a step is its applied or its desired version, and every set a rule of the step
//! looks up is complete. The next sync diffs from the step (the kernel's state) to whatever
//! is desired then: the next chunk, with any new change. Pure: no I/O.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::diff::{SetDelta, SetDeltas, applied_elements};
use super::ir::{Element, Elements, MapVerdict, Match, Ruleset, Set, Verdict};

/// Elements a sync adds at least to hash sets no rule looks up yet, when the fill is
/// staged; the rest waits for the next sync. The kernel commits hash set elements at
/// 2-3.5 µs each over netlink (beside a 100 000-element set): ~5 ms a chunk
/// (benches/README.md, "staged fills").
pub const STAGING_CHUNK: usize = 2_048;

/// The kernel's time per hash set element added over netlink, beside a table of 100 000
/// pods' sets and with the agent's monitor listening: 2.9-4.1 µs (medians of the agent's
/// staged syncs in the 100k bench, benches/README.md, "staged fills"). The agent sizes a
/// chunk to what is left of [`SYNC_BUDGET`] after the sync's compile (see [`chunk_for`]).
pub const KERNEL_TIME_PER_ELEMENT: std::time::Duration = std::time::Duration::from_nanos(3_500);

/// What a staged sync that only goes on with a fill may take, compile and commit together:
/// the longest an event that arrives meanwhile waits for it.
pub const SYNC_BUDGET: std::time::Duration = std::time::Duration::from_millis(20);

/// The chunk of a sync that brings changes of the cluster while a fill goes on: ~2 ms of
/// kernel time on top of the changes themselves, so that an event waits for the step in
/// front of it and a short one of its own, not for two steps.
pub const RIDE_ALONG_CHUNK: usize = 512;

/// The chunk of a staged sync, given how long its compile took and what it is: see
/// [`SyncKind`]. A sync that only goes on with a fill takes as many elements as the kernel
/// adds in what its compile left of [`SYNC_BUDGET`], and at least [`STAGING_CHUNK`] (a
/// compile of a few ms leaves ~5 000). A sync that brings changes takes
/// [`RIDE_ALONG_CHUNK`], unless the sync before it did too: then a fill goes on however
/// fast events come, one sync in two at least.
///
/// (Chunks as long as the compile, the rule before, gave the slow first step of a fill
/// the biggest chunk, 8 192 elements and 20-30 ms more that every event queued behind it
/// waited for; and an event that came during a fill waited for the step in flight and
/// then for one more, its own: benches/README.md, "staged fills".)
pub fn chunk_for(compile: std::time::Duration, kind: SyncKind) -> usize {
    if kind == SyncKind::BringsChanges {
        return RIDE_ALONG_CHUNK;
    }
    let left = SYNC_BUDGET.saturating_sub(compile);
    let elements = left.as_nanos() / KERNEL_TIME_PER_ELEMENT.as_nanos();
    usize::try_from(elements).unwrap_or(usize::MAX).max(STAGING_CHUNK)
}

/// What a sync is, for the size of its chunk ([`chunk_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// It brings changes of the cluster, and the sync before it took a full chunk.
    BringsChanges,
    /// It only goes on with a fill, or the sync before it brought changes with a small
    /// chunk: now the fill's turn.
    GoesOnWithAFill,
}

/// One step from the applied ruleset towards the desired one.
#[derive(Debug, Clone)]
pub struct Step {
    /// What the kernel is to hold after this step's transaction: a whole table (every name
    /// a rule or a map element uses is in it).
    pub ruleset: Ruleset,
    /// The element changes of the sets the step fills partly, from their applied entries:
    /// with the compiler's deltas (these first), [`super::diff::diff_with`] takes the step's
    /// transaction in O(chunk) rather than comparing each partly filled set whole.
    pub deltas: SetDeltas,
    /// Elements still to add to incomplete sets after this step (sets no step reached yet
    /// counted by their sizes: more than 0 exactly while any is incomplete).
    pub remaining: usize,
    /// Chains held at their applied version, or not yet created.
    pub held_chains: usize,
}

/// The step from `applied` (the ruleset the kernel holds; sets the compiler patched may be
/// stand-ins, described by `known` as in [`super::diff::diff_with`]) towards `desired` that
/// adds at most `chunk` elements to sets no applied rule looks up, or `None` when the
/// whole change adds no more than `chunk` there (commit `desired` itself).
///
/// The step's transaction is [`super::diff::diff_with`]`(applied, &step.ruleset, known`
/// extended by `step.deltas`). Only for an incremental diff: when `desired` does not keep
/// `applied`'s layout, that is a full sync, and the caller commits `desired` instead.
pub fn stage(applied: &Ruleset, desired: &Ruleset, known: &SetDeltas, chunk: usize) -> Option<Step> {
    let fills = fills(applied, desired, known, chunk);
    let total: usize = fills.iter().map(|fill| fill.count).sum();
    if total <= chunk {
        return None;
    }
    let mut step = desired.clone();
    // Sets in name order, each filled as far as the chunk goes; a set filled whole is
    // desired's own (the compiler's allocation, which the next diff skips unread).
    let mut budget = chunk;
    let mut incomplete: HashSet<&str> = HashSet::new();
    let mut deltas = SetDeltas::new();
    for fill in fills {
        let take = budget.min(fill.count);
        budget -= take;
        if take == fill.count {
            continue;
        }
        let name = fill.name;
        let declaration = desired.sets[name].declaration();
        let added: Vec<Element> = fill.added().take(take).collect();
        // What the kernel has (elements that go, go once the set is complete: no rule looks
        // it up meanwhile), and the chunk's share. Untouched, it stays as it is, unread.
        let kernel = fill.held.map(|held| (held, fill.kernel.unwrap_or_else(|| applied_elements(name, held, known))));
        let elements = match kernel {
            Some((held, Cow::Borrowed(_))) if take == 0 => Arc::clone(held),
            Some((held, kernel)) => {
                let mut elements = kernel.into_owned();
                elements.extend(added.iter().cloned());
                let partial = Arc::new(Set { elements, ..declaration });
                let delta = SetDelta { from: Arc::clone(held), to: Arc::clone(&partial), gone: Vec::new(), added };
                deltas.insert(name.clone(), delta);
                partial
            }
            None => Arc::new(Set { elements: added.into_iter().collect(), ..declaration }),
        };
        step.sets.insert(name.clone(), elements);
        incomplete.insert(name.as_str());
    }
    let held_chains = hold_back(applied, desired, known, &incomplete, &mut step);
    Some(Step { ruleset: step, deltas, remaining: total - chunk, held_chains })
}

/// A set no applied rule looks up, and what it lacks of its desired elements: counted, and
/// read only as far as a chunk goes (a fill of 90 000 elements is not copied on each step).
struct Fill<'a> {
    name: &'a String,
    /// Its desired elements.
    desired: &'a Elements,
    /// Its entry in the applied ruleset, if it is there, and the elements the kernel has.
    held: Option<&'a Arc<Set>>,
    kernel: Option<Cow<'a, Elements>>,
    /// The compiler's delta from what the kernel has to `desired`, when it knows one.
    delta: Option<&'a [Element]>,
    /// How many elements it lacks (at least 1), or, past the first chunk's worth of
    /// sets, an estimate: what a step leaves untouched is not read on every step.
    count: usize,
}

impl Fill<'_> {
    /// The elements it lacks, in order.
    fn added(&self) -> Box<dyn Iterator<Item = Element> + '_> {
        match (self.delta, &self.kernel) {
            (Some(delta), _) => Box::new(delta.iter().cloned()),
            (None, Some(kernel)) => self.desired.difference(kernel),
            (None, None) => Box::new(self.desired.iter()),
        }
    }
}

/// The hash sets of `desired` that no rule of `applied` looks up and that gain elements,
/// in name order. Counted exactly until they lack more than `chunk` in all; the rest
/// (which the step leaves as they are) by their sizes, at least 1 each.
fn fills<'a>(applied: &'a Ruleset, desired: &'a Ruleset, known: &'a SetDeltas, chunk: usize) -> Vec<Fill<'a>> {
    // Which sets applied rules look up takes a walk over every rule: only done once the
    // change might be staged at all (most syncs add a few pods to a few sets).
    let mut looked_up: Option<BTreeSet<&str>> = None;
    let mut fills: Vec<Fill<'a>> = Vec::new();
    let mut counted = 0;
    // Both maps in name order, walked side by side (no lookup by name per set).
    let mut applied_sets = applied.sets.iter().peekable();
    for (name, set) in &desired.sets {
        while applied_sets.next_if(|(n, _)| *n < name).is_some() {}
        let held = applied_sets.next_if(|(n, _)| *n == name).map(|(_, held)| held);
        // Interval sets go whole: chunks added to an existing one go through nft (the
        // netlink encoder leaves range changes to it), which costs ~1 000 times more per
        // element than a new set's (benches/README.md, "staged fills").
        if set.interval || held.is_some_and(|held| Arc::ptr_eq(held, set)) {
            continue;
        }
        let delta = held.and_then(|held| {
            let delta = known.get(name).filter(|d| Arc::ptr_eq(&d.from, held) && Arc::ptr_eq(&d.to, set))?;
            Some(delta.added.as_slice())
        });
        if delta.is_some_and(<[Element]>::is_empty) {
            continue;
        }
        // A set the kernel lacks is looked up by no applied rule (nft would have refused it).
        if held.is_some() && (delta.is_none() || counted > chunk || looked_up.is_some()) {
            if looked_up.is_none() {
                let names = applied.referenced_sets();
                fills.retain(|fill| !names.contains(fill.name.as_str()));
                counted = fills.iter().map(|fill| fill.count).sum();
                looked_up = Some(names);
            }
            if looked_up.as_ref().is_some_and(|names| names.contains(name.as_str())) {
                continue;
            }
        }
        let kernel = held.filter(|_| delta.is_none()).map(|held| applied_elements(name, held, known));
        let mut fill = Fill { name, desired: &set.elements, held, kernel, delta, count: 0 };
        fill.count = match (fill.delta, &fill.kernel) {
            (Some(delta), _) => delta.len(),
            (None, Some(kernel)) if counted > chunk => set.elements.len().saturating_sub(kernel.len()).max(1),
            (None, Some(kernel)) => set.elements.difference(kernel).count(),
            (None, None) => set.elements.len(),
        };
        counted += fill.count;
        if fill.count > 0 {
            fills.push(fill);
        }
    }
    if counted > chunk && looked_up.is_none() {
        let names = applied.referenced_sets();
        fills.retain(|fill| !names.contains(fill.name.as_str()));
    }
    fills
}

/// Holds back, in `step` (a copy of `desired` with the incomplete sets partly filled),
/// every chain and dispatch-map element that needs an incomplete set, and keeps at their
/// applied version the objects what is held back still names. Returns the chains held.
fn hold_back<'a>(
    applied: &'a Ruleset,
    desired: &'a Ruleset,
    known: &SetDeltas,
    incomplete: &HashSet<&str>,
    step: &mut Ruleset,
) -> usize {
    // A chain unchanged since `applied` looks up no incomplete set (no applied rule does)
    // and jumps to no new chain: only the changed ones are read.
    let changed =
        desired.chains.iter().filter(|(name, chain)| !applied.chains.get(*name).is_some_and(|a| Arc::ptr_eq(a, chain)));
    let mut hold: Vec<&'a str> = Vec::new();
    // New chains → the changed chains and the map elements that jump to them.
    let mut jumpers: HashMap<&str, Vec<&str>> = HashMap::new();
    for (name, chain) in changed {
        for rule in &chain.rules {
            let needs_incomplete = rule.matches.iter().any(|m| match m {
                Match::Lookup { set, .. } => incomplete.contains(set.as_str()),
                _ => false,
            });
            if needs_incomplete {
                hold.push(name);
            }
            if let Some(Verdict::Jump(target) | Verdict::Goto(target)) = &rule.verdict
                && !applied.chains.contains_key(target)
            {
                jumpers.entry(target).or_default().push(name);
            }
        }
    }
    let mut map_jumpers: HashMap<&str, Vec<(&str, &Element)>> = HashMap::new();
    for (map, m) in &desired.maps {
        for (key, verdict) in &m.elements {
            if let MapVerdict::Jump(target) | MapVerdict::Goto(target) = verdict
                && !applied.chains.contains_key(target)
            {
                map_jumpers.entry(target).or_default().push((map, key));
            }
        }
    }
    let mut keep = Keep { applied, known, step, scan: Vec::new(), scanned: HashSet::new() };
    let mut held: HashSet<&str> = HashSet::new();
    // Keys of dispatch elements not added (new pods whose chains are held).
    let mut not_dispatched: Vec<&Element> = Vec::new();
    while let Some(name) = hold.pop() {
        if !held.insert(name) {
            continue;
        }
        match applied.chains.get(name) {
            // The applied version stays, with whatever it names.
            Some(old) => {
                keep.step.chains.insert(name.to_string(), Arc::clone(old));
                keep.scan.push(name);
            }
            // Not created yet: nor is anything that jumps to it. A dispatch element keeps
            // its applied verdict, or is not added.
            None => {
                keep.step.chains.remove(name);
                hold.extend(jumpers.get(name).into_iter().flatten());
                for &(map, key) in map_jumpers.get(name).into_iter().flatten() {
                    let old = applied.maps.get(map).and_then(|m| m.elements.get(key));
                    let elements = &mut keep.step.maps.get_mut(map).expect("a map of desired").elements;
                    match old {
                        Some(old) => {
                            elements.insert(key.clone(), old.clone());
                            keep.verdict(old);
                        }
                        None => {
                            elements.remove(key);
                            not_dispatched.push(key);
                        }
                    }
                }
            }
        }
    }
    keep.run();
    hold_out_of_guards(applied, known, step, &not_dispatched);
    held.len()
}

/// Keeps `keys` (new pods not dispatched to their chains yet) out of every set a rule of
/// `step` looks up negated, the unknown-pod guard's set of known pods, unless the kernel
/// has them there already: known to the guard without its rules, a new pod would pass
/// unfiltered until the fill ends; unknown, its traffic is dropped (fail closed) until its
/// rules and its guard element come together.
fn hold_out_of_guards(applied: &Ruleset, known: &SetDeltas, step: &mut Ruleset, keys: &[&Element]) {
    if keys.is_empty() {
        return;
    }
    let guards: Vec<String> = step.negated_lookups().into_iter().map(str::to_string).collect();
    for name in guards {
        let Some(set) = step.sets.get(&name) else { continue };
        let kernel = applied.sets.get(&name).map(|held| applied_elements(&name, held, known));
        let hold: Vec<&Element> = keys
            .iter()
            .copied()
            .filter(|key| set.elements.contains(key) && !kernel.as_ref().is_some_and(|k| k.contains(key)))
            .collect();
        if hold.is_empty() {
            continue;
        }
        let mut guard = Set::clone(set);
        for key in hold {
            guard.elements.remove(key);
        }
        step.sets.insert(name, Arc::new(guard));
    }
}

/// Puts into `step` the applied objects that applied chains and map elements kept there
/// name and `step` lacks (the desired ruleset deletes them): they go only once nothing
/// names them. An applied object names applied objects only.
struct Keep<'a, 'b> {
    applied: &'a Ruleset,
    known: &'b SetDeltas,
    step: &'b mut Ruleset,
    /// Applied chains in `step` whose references are still to be checked.
    scan: Vec<&'a str>,
    scanned: HashSet<&'a str>,
}

impl<'a> Keep<'a, '_> {
    fn run(&mut self) {
        while let Some(name) = self.scan.pop() {
            if !self.scanned.insert(name) {
                continue;
            }
            let Some(chain) = self.applied.chains.get(name) else { continue };
            for rule in &chain.rules {
                for m in &rule.matches {
                    if let Match::Lookup { set, .. } = m {
                        self.set(set);
                    }
                }
                match &rule.verdict {
                    Some(Verdict::Jump(target) | Verdict::Goto(target)) => self.chain(target),
                    Some(Verdict::Vmap { map, .. }) => self.map(map),
                    _ => {}
                }
                if let Some(counter) = &rule.named_counter
                    && !self.step.counters.contains_key(&counter.name)
                    && let Some(labels) = self.applied.counters.get(&counter.name)
                {
                    self.step.counters.insert(counter.name.clone(), labels.clone());
                }
            }
        }
    }

    fn chain(&mut self, name: &'a str) {
        if let Some(old) = self.applied.chains.get(name)
            && !self.step.chains.contains_key(name)
        {
            self.step.chains.insert(name.to_string(), Arc::clone(old));
            self.scan.push(name);
        }
    }

    fn verdict(&mut self, verdict: &'a MapVerdict) {
        if let MapVerdict::Jump(target) | MapVerdict::Goto(target) = verdict {
            self.chain(target);
        }
    }

    fn map(&mut self, name: &'a str) {
        if let Some(old) = self.applied.maps.get(name)
            && !self.step.maps.contains_key(name)
        {
            self.step.maps.insert(name.to_string(), old.clone());
            for verdict in old.elements.values() {
                self.verdict(verdict);
            }
        }
    }

    /// A kept set with the elements the kernel has (a stand-in's, from its delta).
    fn set(&mut self, name: &str) {
        if let Some(old) = self.applied.sets.get(name)
            && !self.step.sets.contains_key(name)
        {
            let kept = match applied_elements(name, old, self.known) {
                std::borrow::Cow::Borrowed(_) => Arc::clone(old),
                std::borrow::Cow::Owned(elements) => Arc::new(Set { elements, ..old.declaration() }),
            };
            self.step.sets.insert(name.to_string(), kept);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::nft::diff::{diff, diff_with, full_sync};
    use crate::nft::fake::FakeNftables;
    use crate::nft::ir::{
        AddrField, BaseChain, Chain, ChainPolicy, CounterLabels, CounterRef, Elements, Hook, IpFamily, Key, KeyType,
        Map, Rule, Value,
    };
    use crate::nft::render;
    use crate::nft::{Nftables, Op};

    fn addr(i: u32) -> Element {
        Element::single(Value::Addr(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))))
    }

    fn peers(range: std::ops::Range<u32>) -> Arc<Set> {
        Arc::new(Set { key: vec![KeyType::Ipv4Addr], elements: range.map(addr).collect(), ..Set::default() })
    }

    fn addresses(pods: &[u32]) -> Arc<Set> {
        Arc::new(Set {
            key: vec![KeyType::Ipv4Addr],
            elements: pods.iter().map(|&i| addr(i)).collect(),
            ..Set::default()
        })
    }

    fn jump(to: &str) -> Rule {
        Rule { verdict: Some(Verdict::Jump(to.into())), ..Rule::default() }
    }

    /// `ip saddr @set accept`, counted into `counter`.
    fn allow_from(set: &str, counter: &str) -> Rule {
        let key = Key::Addr(IpFamily::V4, AddrField::Saddr);
        let labels = CounterLabels { policy: counter.into(), ..CounterLabels::default() };
        Rule {
            matches: vec![Match::Lookup { key, set: set.into(), negate: false }],
            named_counter: Some(Arc::new(CounterRef { name: counter.into(), labels: Arc::new(labels) })),
            verdict: Some(Verdict::Accept),
            ..Rule::default()
        }
    }

    fn chain(rules: Vec<Rule>) -> Arc<Chain> {
        Arc::new(Chain { rules, ..Chain::default() })
    }

    /// A node whose pod 1 is isolated by policy `old` (3 peers): the forward chain
    /// dispatches by destination to the pod chains.
    fn applied() -> Ruleset {
        let mut rs = Ruleset::new("t");
        let base = BaseChain { hook: Hook::Forward, priority: 0, policy: ChainPolicy::Accept };
        let dispatch = Verdict::Vmap { key: Key::Addr(IpFamily::V4, AddrField::Daddr), map: "pods".into() };
        // The unknown-pod guard: a destination that is no known pod is dropped.
        let guard = Rule {
            matches: vec![Match::Lookup {
                key: Key::Addr(IpFamily::V4, AddrField::Daddr),
                set: "known".into(),
                negate: true,
            }],
            verdict: Some(Verdict::Drop),
            ..Rule::default()
        };
        rs.chains.insert(
            "forward".into(),
            Arc::new(Chain {
                base: Some(base),
                rules: vec![guard, Rule { verdict: Some(dispatch), ..Rule::default() }],
                comment: None,
            }),
        );
        rs.sets.insert("known".into(), addresses(&[1, 3]));
        let pods = [(addr(1), MapVerdict::Jump("pod-1".into()))].into_iter().collect();
        rs.maps.insert("pods".into(), Map { key: vec![KeyType::Ipv4Addr], elements: pods, ..Map::default() });
        rs.chains.insert("pod-1".into(), chain(vec![jump("pol-old")]));
        rs.chains.insert("pol-old".into(), chain(vec![allow_from("peers-old", "c-old")]));
        rs.sets.insert("peers-old".into(), peers(1000..1003));
        rs.counters
            .insert("c-old".into(), Arc::new(CounterLabels { policy: "c-old".into(), ..CounterLabels::default() }));
        rs
    }

    /// Policy `old` is gone; policy `new` (100 peers) isolates pod 1 and a new pod 2.
    fn desired() -> Ruleset {
        let mut rs = applied();
        rs.chains.remove("pol-old");
        rs.sets.remove("peers-old");
        rs.counters.remove("c-old");
        rs.maps.get_mut("pods").unwrap().elements.insert(addr(2), MapVerdict::Jump("pod-2".into()));
        rs.sets.insert("known".into(), addresses(&[1, 2]));
        rs.chains.insert("pod-1".into(), chain(vec![jump("pol-new")]));
        rs.chains.insert("pod-2".into(), chain(vec![jump("pol-new")]));
        rs.chains.insert("pol-new".into(), chain(vec![allow_from("peers-new", "c-new")]));
        rs.sets.insert("peers-new".into(), peers(2000..2100));
        rs.counters
            .insert("c-new".into(), Arc::new(CounterLabels { policy: "c-new".into(), ..CounterLabels::default() }));
        rs
    }

    /// Applies steps of at most `chunk` from `applied` until `desired` is in the fake,
    /// checking each step as it goes; the steps' remaining counts.
    fn fill(applied: Ruleset, desired: &Ruleset, chunk: usize) -> (FakeNftables, Vec<usize>) {
        let mut fake = FakeNftables::new();
        fake.apply(&full_sync(&applied)).unwrap();
        let mut kernel = applied;
        let mut remaining = Vec::new();
        while let Some(step) = stage(&kernel, desired, &SetDeltas::new(), chunk) {
            // As the agent diffs it: with the step's deltas (checked against the plain diff).
            let tx = diff_with(&kernel, &step.ruleset, &step.deltas);
            assert_eq!(tx, diff(&kernel, &step.ruleset), "the step's deltas say what the step changes");
            fake.apply(&tx).unwrap_or_else(|e| panic!("{e}\n{}", tx.render()));
            assert_eq!(fake.ruleset("t"), Some(&step.ruleset), "the step is what the kernel holds");
            for (name, c) in &step.ruleset.chains {
                assert!(
                    kernel.chains.get(name) == Some(c) || desired.chains.get(name) == Some(c),
                    "{name} is neither its applied nor its desired version"
                );
            }
            let dispatched = |pod: &Element| step.ruleset.maps["pods"].elements.contains_key(pod);
            for name in step.ruleset.referenced_sets() {
                let want = desired.sets.get(name).or(kernel.sets.get(name)).unwrap();
                let have = &step.ruleset.sets[name];
                if name == "known" {
                    // The guard's: as desired, but for new pods not dispatched yet.
                    let held_out: Vec<Element> = want.elements.difference(&have.elements).collect();
                    assert!(held_out.iter().all(|pod| !dispatched(pod)), "{held_out:?} dispatched but unknown");
                    assert!(have.elements.iter().all(|pod| want.elements.contains(&pod) || !dispatched(&pod)));
                } else {
                    assert_eq!(have, want, "{name} is looked up before it is complete");
                }
            }
            remaining.push(step.remaining);
            kernel = step.ruleset;
        }
        fake.apply(&diff(&kernel, desired)).unwrap();
        (fake, remaining)
    }

    #[test]
    fn a_big_new_set_is_filled_a_chunk_per_step_and_its_rules_wait_for_the_last() {
        let (applied, desired) = (applied(), desired());
        let step = stage(&applied, &desired, &SetDeltas::new(), 30).expect("100 new elements, chunks of 30");
        assert_eq!((step.remaining, step.held_chains), (70, 3));
        let rs = &step.ruleset;
        assert_eq!(rs.sets["peers-new"].elements.len(), 30);
        // Pod 1 keeps its old policy, with what that names; pod 2 and the new policy's chain
        // are not there yet, nor is pod 2's dispatch element.
        assert_eq!(rs.chains["pod-1"], applied.chains["pod-1"]);
        assert!(!rs.chains.contains_key("pod-2") && !rs.chains.contains_key("pol-new"));
        assert_eq!(rs.maps["pods"], applied.maps["pods"]);
        assert!(
            rs.chains.contains_key("pol-old") && rs.sets.contains_key("peers-old") && rs.counters.contains_key("c-old")
        );
        let (fake, remaining) = fill(applied, &desired, 30);
        assert_eq!(remaining, [70, 40, 10]);
        assert_eq!(render::ruleset(fake.ruleset("t").unwrap()), render::ruleset(&desired));
    }

    #[test]
    fn a_new_pod_whose_rules_wait_for_a_fill_stays_unknown_to_the_guard_until_they_land() {
        // Known to the guard but not yet dispatched to its chain, pod 2 would pass
        // unfiltered while the fill runs: it is held out of the guard's set with its rules.
        let (applied, desired) = (applied(), desired());
        let step = stage(&applied, &desired, &SetDeltas::new(), 30).unwrap();
        let known = &step.ruleset.sets["known"].elements;
        assert!(!known.contains(&addr(2)), "pod 2 is known before its rules are in: {known:?}");
        // What the guard is told otherwise goes as desired: pod 3 is gone, pod 1 stays.
        assert_eq!(*known, Elements::from([addr(1)]));
        let (fake, remaining) = fill(applied, &desired, 30);
        assert_eq!(remaining, [70, 40, 10]);
        assert_eq!(fake.ruleset("t").unwrap().sets["known"], desired.sets["known"], "known once its rules are in");
    }

    #[test]
    fn a_fill_within_one_chunk_is_no_step() {
        assert!(stage(&applied(), &desired(), &SetDeltas::new(), 100).is_none());
        let (fake, remaining) = fill(applied(), &desired(), 100);
        assert!(remaining.is_empty());
        assert_eq!(fake.ruleset("t"), Some(&desired()));
    }

    #[test]
    fn sets_rules_already_look_up_are_never_staged() {
        // 500 more peers for the applied policy: one transaction, set and rules together.
        let mut desired = applied();
        desired.sets.insert("peers-old".into(), peers(1000..1500));
        assert!(stage(&applied(), &desired, &SetDeltas::new(), 30).is_none());
    }

    #[test]
    fn an_idle_set_being_refilled_keeps_what_the_kernel_has_and_drops_what_goes_once_complete() {
        // An idle set (no rule looks it up) in the kernel: 10 elements, 5 of them going.
        let mut applied = applied();
        applied.sets.insert("idle".into(), peers(3000..3010));
        let mut desired = applied.clone();
        desired.sets.insert("idle".into(), peers(3005..3100));
        let step = stage(&applied, &desired, &SetDeltas::new(), 40).unwrap();
        let idle = &step.ruleset.sets["idle"].elements;
        assert_eq!(idle.len(), 50);
        assert!((3000..3050).all(|i| idle.contains(&addr(i))), "{idle:?}");
        let (fake, remaining) = fill(applied, &desired, 40);
        assert_eq!(remaining, [50, 10]);
        assert_eq!(fake.ruleset("t"), Some(&desired));
    }

    #[test]
    fn a_set_the_chunk_does_not_reach_stays_the_very_set_the_kernel_has() {
        let mut applied = applied();
        applied.sets.insert("spare".into(), peers(3000..3010));
        let mut desired = desired();
        desired.sets.insert("spare".into(), peers(3000..3100));
        // `spare` comes after `peers-new` (100 elements): a chunk of 30 leaves it untouched.
        let step = stage(&applied, &desired, &SetDeltas::new(), 30).unwrap();
        assert!(Arc::ptr_eq(&step.ruleset.sets["spare"], &applied.sets["spare"]));
        assert_eq!(step.remaining, 160);
    }

    #[test]
    fn a_fill_step_takes_what_its_compile_left_of_the_budget_and_a_sync_with_changes_a_small_chunk() {
        use std::time::Duration;
        let goes_on = SyncKind::GoesOnWithAFill;
        assert_eq!(chunk_for(Duration::ZERO, goes_on), 5_714, "the whole budget");
        assert_eq!(chunk_for(Duration::from_millis(6), goes_on), 4_000);
        assert_eq!(chunk_for(Duration::from_millis(15), goes_on), STAGING_CHUNK, "at least the floor");
        assert_eq!(chunk_for(Duration::from_millis(200), goes_on), STAGING_CHUNK, "a slow compile, the floor");
        for compile in [Duration::ZERO, Duration::from_millis(200)] {
            assert_eq!(chunk_for(compile, SyncKind::BringsChanges), RIDE_ALONG_CHUNK);
        }
    }

    #[test]
    fn an_idle_set_the_compiler_patched_in_place_is_filled_from_what_the_kernel_has() {
        // The kernel has `idle` with 10 elements; the compiler patched it in place (a
        // stand-in in `applied`) to gain 90: a chunk of 40 adds 40 to the kernel's 10.
        let mut applied = applied();
        let kernel = peers(3000..3010);
        let stand_in = Arc::new(kernel.declaration());
        applied.sets.insert("idle".into(), Arc::clone(&stand_in));
        let mut desired = applied.clone();
        let to = peers(3000..3100);
        desired.sets.insert("idle".into(), Arc::clone(&to));
        let added: Vec<Element> = (3010..3100).map(addr).collect();
        let known = SetDeltas::from([(
            "idle".to_string(),
            crate::nft::diff::SetDelta { from: stand_in, to, gone: vec![], added },
        )]);
        let step = stage(&applied, &desired, &known, 40).unwrap();
        assert_eq!(step.remaining, 50);
        assert_eq!(step.ruleset.sets["idle"], peers(3000..3050));
        let mut known = known;
        known.extend(step.deltas);
        let tx = diff_with(&applied, &step.ruleset, &known);
        let chunk: Vec<Element> = (3010..3050).map(addr).collect();
        assert_eq!(tx.ops, [Op::AddElements { set: "idle".into(), elements: chunk }], "{}", tx.render());
        let mut before = applied.clone();
        before.sets.insert("idle".into(), kernel);
        assert_eq!(tx, diff(&before, &step.ruleset), "as from the kernel's own set");
    }

    #[test]
    fn the_kernel_refuses_a_rule_naming_a_set_not_yet_added() {
        // What a step never sends: the new policy's rules without its set. Refused whole.
        let mut fake = FakeNftables::new();
        fake.apply(&full_sync(&applied())).unwrap();
        let mut without_set = desired();
        without_set.sets.remove("peers-new");
        let tx = diff(&applied(), &without_set);
        assert!(fake.apply(&tx).is_err());
        assert_eq!(fake.ruleset("t"), Some(&applied()), "nothing of the refused transaction is in");
    }

    #[test]
    fn a_stand_in_the_compiler_left_in_applied_is_kept_with_the_kernels_elements() {
        // The compiler patched `peers-old` (it lost an element) and left a stand-in in
        // `applied`; the desired ruleset then drops the policy. Held, pod 1 keeps naming
        // it: the step keeps the set with what the kernel has, not the stand-in's nothing.
        let mut applied = applied();
        let before = Arc::clone(&applied.sets["peers-old"]);
        let stand_in = Arc::new(before.declaration());
        applied.sets.insert("peers-old".into(), Arc::clone(&stand_in));
        let to = peers(1000..1002);
        let known = SetDeltas::from([(
            "peers-old".to_string(),
            crate::nft::diff::SetDelta { from: stand_in, to, gone: vec![addr(1002)], added: vec![] },
        )]);
        let step = stage(&applied, &desired(), &known, 30).unwrap();
        assert_eq!(step.ruleset.sets["peers-old"], before);
        let mut known = known;
        known.extend(step.deltas);
        let tx = diff_with(&applied, &step.ruleset, &known);
        assert!(
            !tx.ops
                .iter()
                .any(|op| matches!(op, Op::DeleteSet { name } | Op::AddSet { name, .. } if name == "peers-old"))
        );
    }
}
