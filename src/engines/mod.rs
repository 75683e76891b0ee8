//! The three engines behind one call: the same cluster and probes in, one matrix per
//! (family, probe) out, whichever engine answers (DESIGN.md §2). `netpol-check matrix` and
//! `verify` and the kernel tests all run engines through here.
//!
//! ```text
//!  Engine::Evaluator ──► matrix::Index (pure)              ┐
//!  Engine::Ruleset   ──► ruleset (pure)                    ├─► result[family][probe]: BitMatrix
//!  Engine::Kernel    ──► kernel (one lab, real nft)        ┘
//! ```

pub mod kernel;
pub mod ruleset;
pub mod verify;

use std::time::Duration;

use crate::policy::bitset::BitMatrix;
use crate::policy::matrix::{self, Family, Probe};
use crate::policy::model::Cluster;
use kernel::KernelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The reference semantics of NetworkPolicy v1.
    Evaluator,
    /// Each node's compiled nftables ruleset, interpreted packet by packet.
    Ruleset,
    /// The compiled rulesets loaded into a real kernel (network namespaces), probed with real
    /// packets. Needs root, `ip` and `nft`.
    Kernel,
}

impl Engine {
    pub const ALL: [Engine; 3] = [Engine::Evaluator, Engine::Ruleset, Engine::Kernel];

    pub fn name(self) -> &'static str {
        match self {
            Engine::Evaluator => "evaluator",
            Engine::Ruleset => "ruleset",
            Engine::Kernel => "kernel",
        }
    }

    /// This engine's matrices over every pod: `result[f][k]` for `families[f]` and
    /// `probes[k]`. The kernel engine builds one lab for all families; `probe_timeout` is
    /// only its.
    pub fn matrices(
        self,
        cluster: &Cluster,
        probes: &[Probe],
        families: &[Family],
        probe_timeout: Duration,
    ) -> Result<Vec<Vec<BitMatrix>>, KernelError> {
        Ok(match self {
            Engine::Evaluator => families
                .iter()
                .map(|&f| {
                    let index = matrix::Index::new(cluster, f);
                    probes.iter().map(|p| index.matrix(p)).collect()
                })
                .collect(),
            Engine::Ruleset => {
                let rulesets = ruleset::Engine::new(cluster);
                families.iter().map(|&f| probes.iter().map(|p| rulesets.matrix(cluster, p, f)).collect()).collect()
            }
            Engine::Kernel => kernel::matrices_per_family(cluster, probes, families, probe_timeout)?,
        })
    }
}
