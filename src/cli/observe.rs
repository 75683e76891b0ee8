//! The flags that choose the ruleset's counters and drop log, shared by `netpol-agent` and
//! `netpol-check ruleset` (which prints what the agent installs with the same flags).
//!
//! ```text
//!  --rule-counters, --drop-log, --drop-log-group, --drop-log-rate, --drop-log-burst
//!        ──► ObserveArgs::observe() ──► compile::Observe (NodeConfig::observe)
//! ```

use clap::Args;

use crate::compile::{DropLog, Observe};

/// Counters and drop log, as flags (defaults: [`Observe::default`]).
#[derive(Debug, Clone, Args)]
pub struct ObserveArgs {
    /// A named counter per policy rule and direction, and per final drop (pods of a
    /// namespace isolated by the same policies share one): the agent exports them as
    /// `netpol_policy_rule_packets_total` and `netpol_policy_denied_packets_total`.
    #[arg(long, env = "NETPOL_RULE_COUNTERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub rule_counters: bool,

    /// Each pod chain's final drop first logs the packet to an NFLOG group, prefixed with
    /// the pod chain's name, under one node-wide rate limit.
    #[arg(long, env = "NETPOL_DROP_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub drop_log: bool,

    /// The NFLOG group of the drop log.
    #[arg(long, env = "NETPOL_DROP_LOG_GROUP", default_value_t = DropLog::DEFAULT_GROUP)]
    pub drop_log_group: u16,

    /// Denied packets logged per second by the whole node (the rest are only counted).
    #[arg(long, env = "NETPOL_DROP_LOG_RATE", default_value_t = DropLog::DEFAULT_PER_SECOND,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub drop_log_rate: u32,

    /// Packets the drop log's budget may save up above its rate.
    #[arg(long, env = "NETPOL_DROP_LOG_BURST", default_value_t = DropLog::DEFAULT_BURST,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub drop_log_burst: u32,
}

impl ObserveArgs {
    pub fn observe(&self) -> Observe {
        Observe {
            rule_counters: self.rule_counters,
            drop_log: self.drop_log.then_some(DropLog {
                group: self.drop_log_group,
                per_second: self.drop_log_rate,
                burst: self.drop_log_burst,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        observe: ObserveArgs,
    }

    fn parse(args: &[&str]) -> Result<Observe, clap::Error> {
        Cmd::try_parse_from(std::iter::once("cmd").chain(args.iter().copied())).map(|c| c.observe.observe())
    }

    #[test]
    fn by_default_counters_and_the_rate_limited_drop_log_are_on() {
        assert_eq!(parse(&[]).unwrap(), Observe::default());
        assert_eq!(Observe::default().drop_log.unwrap(), DropLog { group: 9469, per_second: 10, burst: 50 });
    }

    #[test]
    fn each_flag_turns_its_part_off_or_sets_it() {
        let o = parse(&["--rule-counters=false", "--drop-log=false"]).unwrap();
        assert_eq!(o, Observe::OFF);
        let o = parse(&["--drop-log-group", "7", "--drop-log-rate", "100", "--drop-log-burst", "5"]).unwrap();
        assert_eq!(o.drop_log, Some(DropLog { group: 7, per_second: 100, burst: 5 }));
        assert!(parse(&["--drop-log-rate", "0"]).is_err());
        assert!(parse(&["--drop-log-group", "65536"]).is_err());
    }
}
