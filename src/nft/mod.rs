//! nftables: the typed IR, its names, its renderings, its interpreter, diffs between two
//! rulesets, and the one trait through which a ruleset reaches a kernel.
//!
//! ```text
//!  compile ──► ir::Ruleset ──┬─► render (nft -f text) / json (nft -j)
//!                            ├─► interpret (decide a packet like the kernel)
//!                            └─► diff(applied, desired) ──► Transaction ──► Nftables::apply
//!                                                                           ├─ backend::netlink (own batch; the agent)
//!                                                                           ├─ backend::process (nft -f -)
//!                                                                           └─ fake (in memory)
//! ```

pub mod backend;
pub mod diff;
pub mod fake;
pub mod interpret;
pub mod ir;
pub mod json;
pub mod names;
pub mod render;
pub mod staging;

use std::sync::Arc;

use ir::{Chain, CounterLabels, Element, Limit, Map, MapVerdict, Rule, Ruleset, Set};

/// One typed operation of a transaction (nft command syntax when rendered).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `add table inet <t>` (no error if it exists).
    AddTable,
    /// `delete table inet <t>` (error if missing).
    DeleteTable,
    /// `add chain`: declaration only (its `rules` are ignored; add them with `AddRule`).
    AddChain {
        name: String,
        chain: Chain,
    },
    FlushChain {
        name: String,
    },
    DeleteChain {
        name: String,
    },
    AddRule {
        chain: String,
        rule: Rule,
    },
    /// `add set`, with any elements it carries.
    AddSet {
        name: String,
        set: Arc<Set>,
    },
    DeleteSet {
        name: String,
    },
    AddMap {
        name: String,
        map: Map,
    },
    DeleteMap {
        name: String,
    },
    AddElements {
        set: String,
        elements: Vec<Element>,
    },
    DeleteElements {
        set: String,
        elements: Vec<Element>,
    },
    AddMapElements {
        map: String,
        elements: Vec<(Element, MapVerdict)>,
    },
    DeleteMapElements {
        map: String,
        elements: Vec<Element>,
    },
    /// `add counter`: a named counter object, starting at zero (the labels become its
    /// comment). Adding one that exists keeps its count.
    AddCounter {
        name: String,
        labels: Arc<CounterLabels>,
    },
    DeleteCounter {
        name: String,
    },
    /// `add limit`: a named limit object.
    AddLimit {
        name: String,
        limit: Limit,
    },
    /// A whole table in block syntax (what a full sync loads after `delete table`).
    DefineTable(Box<Ruleset>),
}

/// A list of operations on one `inet` table, applied all or nothing.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Transaction {
    pub table: String,
    pub ops: Vec<Op>,
}

impl Transaction {
    pub fn new(table: impl Into<String>) -> Self {
        Transaction { table: table.into(), ops: Vec::new() }
    }

    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The `nft -f` script.
    pub fn render(&self) -> String {
        render::transaction(self)
    }

    /// How much the transaction touches: (element adds + deletes, chains created/flushed/deleted, rules added).
    pub fn stats(&self) -> TxStats {
        let mut s = TxStats::default();
        for op in &self.ops {
            match op {
                Op::AddElements { elements, .. }
                | Op::DeleteElements { elements, .. }
                | Op::DeleteMapElements { elements, .. } => s.elements += elements.len(),
                Op::AddMapElements { elements, .. } => s.elements += elements.len(),
                Op::AddSet { set, .. } => {
                    s.sets += 1;
                    s.elements += set.elements.len()
                }
                Op::AddMap { map, .. } => {
                    s.sets += 1;
                    s.elements += map.elements.len()
                }
                Op::DeleteSet { .. } | Op::DeleteMap { .. } => s.sets += 1,
                Op::AddChain { .. } | Op::FlushChain { .. } | Op::DeleteChain { .. } => s.chains += 1,
                Op::AddRule { .. } => s.rules += 1,
                Op::AddTable
                | Op::DeleteTable
                | Op::AddCounter { .. }
                | Op::DeleteCounter { .. }
                | Op::AddLimit { .. } => {}
                Op::DefineTable(rs) => {
                    s.chains += rs.chains.len();
                    s.rules += rs.rule_count();
                    s.sets += rs.sets.len() + rs.maps.len();
                    s.elements += rs.element_count();
                }
            }
        }
        s
    }
}

/// What a transaction touches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxStats {
    pub elements: usize,
    pub sets: usize,
    pub chains: usize,
    pub rules: usize,
}

impl std::fmt::Display for TxStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} elements, {} sets/maps, {} chain ops, {} rules",
            self.elements, self.sets, self.chains, self.rules
        )
    }
}

/// A failure to apply, check or list.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum NftError {
    /// nft (or the fake) refused the transaction; nothing was applied.
    #[error("nftables rejected the transaction: {0}")]
    Rejected(String),
    /// The table does not exist.
    #[error("no such table: inet {0}")]
    NoSuchTable(String),
    /// nft could not be run at all.
    #[error("cannot run nft: {0}")]
    Spawn(String),
}

/// The one way a ruleset reaches nftables: the kernel (via `nft`) or the in-memory fake.
pub trait Nftables {
    /// Applies the transaction atomically: all of it, or nothing and an error.
    fn apply(&mut self, tx: &Transaction) -> Result<(), NftError>;
    /// Would `apply` succeed? Changes nothing.
    fn check(&self, tx: &Transaction) -> Result<(), NftError>;
    /// The table as nft text (`nft list table inet <table>` for the real one).
    fn list(&self, table: &str) -> Result<String, NftError>;
    /// The values of the table's named counters (`nft list counters table inet <table>`),
    /// in no particular order.
    fn counters(&self, table: &str) -> Result<Vec<CounterValue>, NftError>;
}

/// What a named counter object has counted since it was created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterValue {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}
