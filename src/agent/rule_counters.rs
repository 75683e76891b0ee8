//! Per-rule packet totals: the kernel's named counters, made monotonic across syncs.
//!
//! ```text
//!  NftTarget::sync ──applied(counters of the applied ruleset, replaced?)──┐
//!        │ before a full sync, or one deleting counters: read ─┐         ▼
//!  /metrics scrape ──read (nft -j list counters) ──────────────┴──► RuleCounters
//!                                                          base (what gone or reset counters
//!                                                          had counted) + last read, by labels
//!                                                                    │ totals()
//!                                                                    ▼
//!        netpol_policy_rule_packets_total / netpol_policy_denied_packets_total
//! ```
//!
//! A counter object lives as long as some rule counts into it: a partial sync keeps it,
//! count and all; a full sync replaces the table and every counter starts again at zero.
//! So what a counter last showed is folded into a base of its labels when it goes (a
//! partial sync deleted it, a full sync replaced it, or a read finds it lower than before),
//! and a total is base + the live counter: it never goes down while the agent runs (a
//! restart starts again at zero, which Prometheus reads as a counter reset). Packets
//! counted between the last read and a full sync's replacement are lost, never counted
//! twice: the sync reads right before it replaces the table.
//!
//! Reads and syncs race (a scrape reads while a sync replaces the table): each read
//! carries the generation it started in and is dropped when a sync changed the counters
//! meanwhile, so a stale read can never be folded in twice.
//!
//! Cardinality: one series per (policy rule, direction) of the policies selecting this
//! node's pods, one per (namespace, isolating policies, direction) of its isolated pods;
//! never per remote pod. Series whose counters left the ruleset stay (so a policy that
//! comes back continues its total) up to [`RETIRED_SERIES`] of them, oldest dropped first.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use crate::nft::ir::CounterLabels;
use crate::nft::{CounterValue, NftError};

/// Series of counters no longer in the ruleset kept at most (oldest go first).
pub const RETIRED_SERIES: usize = 1024;

/// Reads the table's named counters (`nft -j list counters table inet <t>`).
pub type CounterReader = Arc<dyn Fn() -> Result<Vec<CounterValue>, NftError> + Send + Sync>;

/// The totals, shared by the sync target and the admin server.
#[derive(Clone)]
pub struct RuleCounters {
    state: Arc<Mutex<State>>,
    reader: CounterReader,
}

impl std::fmt::Debug for RuleCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleCounters").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    /// The labels of the counters the applied ruleset declares, by counter name.
    labels: BTreeMap<String, Arc<CounterLabels>>,
    /// Packets each live counter showed at the last read.
    last: HashMap<String, u64>,
    /// What counters that went or were reset had counted, by labels.
    base: HashMap<Arc<CounterLabels>, u64>,
    /// Labels in `base` no live counter carries, oldest first.
    retired: VecDeque<Arc<CounterLabels>>,
    /// Bumped by every applied sync: a read started before is stale.
    generation: u64,
}

impl State {
    fn fold(&mut self, name: &str) {
        if let Some(packets) = self.last.remove(name)
            && let Some(labels) = self.labels.get(name)
        {
            *self.base.entry(labels.clone()).or_default() += packets;
        }
    }
}

impl RuleCounters {
    pub fn new(reader: CounterReader) -> Self {
        RuleCounters { state: Arc::default(), reader }
    }

    /// Reads the kernel's counters into the totals (a scrape, or a sync about to replace
    /// or delete counters). A failed read changes nothing and is returned.
    pub fn read(&self) -> Result<(), NftError> {
        let generation = self.lock().generation;
        let values = (self.reader)()?;
        let mut state = self.lock();
        if state.generation != generation {
            return Ok(()); // a sync changed the counters meanwhile: this read is stale
        }
        for v in values {
            if !state.labels.contains_key(&v.name) {
                continue; // not ours, or from before the agent's first sync
            }
            let before = state.last.get(&v.name).copied().unwrap_or(0);
            if v.packets < before {
                // Recreated since the last read (a sync we did not see read first).
                state.fold(&v.name);
            }
            state.last.insert(v.name, v.packets);
        }
        Ok(())
    }

    /// A sync applied a ruleset with these `counters`; `replaced`: the whole table was
    /// (every counter starts again at zero).
    ///
    /// One walk over the old and the new counters by name (both sorted), touching only
    /// those that came or went: on the sync path, where a set of every live counter's
    /// labels, rebuilt and hashed on each sync, cost more than the sync's compile at 10k
    /// pods (perf, agent bench).
    pub fn applied(&self, counters: &BTreeMap<String, Arc<CounterLabels>>, replaced: bool) {
        let mut state = self.lock();
        let state = &mut *state;
        state.generation += 1;
        if replaced {
            let live: Vec<String> = state.last.keys().cloned().collect();
            for name in live {
                state.fold(&name);
            }
        }
        let mut went: Vec<(String, Arc<CounterLabels>)> = Vec::new();
        let mut came: Vec<(String, Arc<CounterLabels>)> = Vec::new();
        let (mut old, mut new) = (state.labels.iter().peekable(), counters.iter().peekable());
        loop {
            match (old.peek(), new.peek()) {
                (Some((o, ol)), Some((n, nl))) if o == n => {
                    if ol != nl {
                        went.push(((*o).clone(), Arc::clone(ol)));
                        came.push(((*n).clone(), Arc::clone(nl)));
                    }
                    old.next();
                    new.next();
                }
                (Some((o, ol)), Some((n, _))) if o < n => {
                    went.push(((*o).clone(), Arc::clone(ol)));
                    old.next();
                }
                (Some((o, ol)), None) => {
                    went.push(((*o).clone(), Arc::clone(ol)));
                    old.next();
                }
                (_, Some((n, nl))) => {
                    came.push(((*n).clone(), Arc::clone(nl)));
                    new.next();
                }
                (None, None) => break,
            }
        }
        if went.is_empty() && came.is_empty() {
            return;
        }
        for (name, _) in &went {
            state.fold(name);
            state.labels.remove(name);
        }
        // Back in use: no longer retired. Out of use now, with a total: retired last.
        let live_again: HashSet<&Arc<CounterLabels>> = came.iter().map(|(_, l)| l).collect();
        if !live_again.is_empty() {
            state.retired.retain(|l| !live_again.contains(l));
        }
        for (_, labels) in &went {
            if !live_again.contains(labels) && state.base.contains_key(labels) && !state.retired.contains(labels) {
                state.retired.push_back(Arc::clone(labels));
            }
        }
        while state.retired.len() > RETIRED_SERIES {
            if let Some(oldest) = state.retired.pop_front() {
                state.base.remove(&oldest);
            }
        }
        for (name, labels) in came {
            state.labels.insert(name, labels);
        }
    }

    /// Packets per labels: what gone counters counted, plus the live ones as last read.
    pub fn totals(&self) -> Vec<(Arc<CounterLabels>, u64)> {
        let state = self.lock();
        let mut totals: HashMap<&Arc<CounterLabels>, u64> = state.base.iter().map(|(l, n)| (l, *n)).collect();
        for (name, labels) in &state.labels {
            *totals.entry(labels).or_default() += state.last.get(name).copied().unwrap_or(0);
        }
        let mut out: Vec<(Arc<CounterLabels>, u64)> = totals.into_iter().map(|(l, n)| (l.clone(), n)).collect();
        out.sort();
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(rule: &str) -> Arc<CounterLabels> {
        Arc::new(CounterLabels {
            tier: "NetworkPolicy".into(),
            namespace: "shop".into(),
            policy: "web".into(),
            direction: "ingress".into(),
            rule: rule.into(),
            action: "accept".into(),
            denied: false,
        })
    }

    /// Counters whose values the test sets, read through the reader.
    fn kernel() -> (Arc<Mutex<Vec<CounterValue>>>, RuleCounters) {
        let values: Arc<Mutex<Vec<CounterValue>>> = Arc::default();
        let shared = Arc::clone(&values);
        (values, RuleCounters::new(Arc::new(move || Ok(shared.lock().unwrap().clone()))))
    }

    fn set(values: &Mutex<Vec<CounterValue>>, now: &[(&str, u64)]) {
        *values.lock().unwrap() =
            now.iter().map(|(n, p)| CounterValue { name: n.to_string(), packets: *p, bytes: 0 }).collect();
    }

    fn total(c: &RuleCounters, rule: &str) -> u64 {
        c.totals().into_iter().find(|(l, _)| *l == labels(rule)).map_or(0, |(_, n)| n)
    }

    #[test]
    fn totals_survive_a_full_sync_and_a_counter_deleted_and_recreated() {
        let (kernel, c) = kernel();
        let counters = BTreeMap::from([("a".to_string(), labels("0")), ("b".to_string(), labels("1"))]);
        c.applied(&counters, true);
        set(&kernel, &[("a", 5), ("b", 7)]);
        c.read().unwrap();
        assert_eq!((total(&c, "0"), total(&c, "1")), (5, 7));
        // A full sync: the sync reads first, then the table starts again at zero.
        set(&kernel, &[("a", 6), ("b", 7)]);
        c.read().unwrap();
        c.applied(&counters, true);
        set(&kernel, &[("a", 0), ("b", 2)]);
        c.read().unwrap();
        assert_eq!((total(&c, "0"), total(&c, "1")), (6, 9));
        // A partial sync deletes b (its last value stays in the total), then brings it back.
        c.applied(&BTreeMap::from([("a".to_string(), labels("0"))]), false);
        assert_eq!(total(&c, "1"), 9);
        c.applied(&counters, false);
        set(&kernel, &[("a", 1), ("b", 3)]);
        c.read().unwrap();
        assert_eq!((total(&c, "0"), total(&c, "1")), (7, 12));
    }

    #[test]
    fn a_counter_found_lower_than_before_was_recreated_and_its_count_is_kept() {
        let (kernel, c) = kernel();
        c.applied(&BTreeMap::from([("a".to_string(), labels("0"))]), true);
        set(&kernel, &[("a", 10)]);
        c.read().unwrap();
        set(&kernel, &[("a", 4)]);
        c.read().unwrap();
        assert_eq!(total(&c, "0"), 14);
    }

    #[test]
    fn a_read_that_a_sync_overtook_is_dropped() {
        let values: Arc<Mutex<Vec<CounterValue>>> = Arc::default();
        let c = RuleCounters::new(Arc::new(|| Ok(Vec::new())));
        let counters = BTreeMap::from([("a".to_string(), labels("0"))]);
        c.applied(&counters, true);
        // The reader answers with the old table's value after a full sync happened.
        let late = c.clone();
        let reader_values = Arc::clone(&values);
        let stale = RuleCounters {
            state: Arc::clone(&c.state),
            reader: Arc::new(move || {
                late.applied(&BTreeMap::from([("a".to_string(), labels("0"))]), true);
                Ok(reader_values.lock().unwrap().clone())
            }),
        };
        set(&values, &[("a", 50)]);
        stale.read().unwrap();
        assert_eq!(total(&c, "0"), 0, "the stale value is not taken");
    }

    #[test]
    fn series_of_counters_gone_are_kept_up_to_a_bound() {
        let (kernel, c) = kernel();
        for i in 0..RETIRED_SERIES + 10 {
            let name = format!("c{i}");
            c.applied(&BTreeMap::from([(name.clone(), labels(&i.to_string()))]), false);
            set(&kernel, &[(&name, 1)]);
            c.read().unwrap();
        }
        c.applied(&BTreeMap::new(), false);
        let totals = c.totals();
        assert_eq!(totals.len(), RETIRED_SERIES);
        assert!(totals.iter().all(|(_, n)| *n == 1));
        assert_eq!(total(&c, "0"), 0, "the oldest went first");
    }
}
