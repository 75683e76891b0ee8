//! The only code that talks to nf_tables: every other part of `nft` is pure.
//!
//! ```text
//!  Transaction ──► Nftables::apply ─┬─► netlink/ (encode ─► socket ─► parse: own nf_tables batch
//!                                   │              over NETLINK_NETFILTER; the agent)
//!                                   └─► process  (`nft -f -` / `nft -j list`; fallback, lab, CLI)
//!  kernel table events ──► monitor  (NFNLGRP_NFTABLES: who else changed our table)
//! ```

pub mod monitor;
pub mod netlink;
pub mod process;
