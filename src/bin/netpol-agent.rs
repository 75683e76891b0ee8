//! `netpol-agent`: enforces Kubernetes NetworkPolicies on this node with nftables.
//! Thin: configuration, logging, wiring, exit codes (0 clean shutdown, 1 fatal runtime
//! error, 2 bad configuration).

use std::process::ExitCode;

use clap::Parser;

use netpol::agent::nft_target::NftTarget;
use netpol::agent::{self, AgentConfig, AgentError};
use netpol::nft::real::RealNftables;

const BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let config = match AgentConfig::try_parse() {
        Ok(c) => c,
        // clap prints the reason (or --help / --version) and picks the code: 2 for errors.
        Err(e) => e.exit(),
    };
    if let Err(e) = config.init_logging() {
        eprintln!("netpol-agent: {e}");
        return ExitCode::from(BAD_CONFIG);
    }
    // One worker is plenty: it only decodes watch events and serves the admin endpoints;
    // syncs run on a blocking thread. Fewer threads also means fewer malloc arenas holding
    // freed memory (see benches/agent-bench.sh).
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("netpol-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let target = NftTarget::new(RealNftables::default(), config.node.clone(), config.table.clone());
    let result = runtime.block_on(async {
        let shutdown = agent::shutdown_signal()?;
        Ok::<_, std::io::Error>(agent::run(config, target, shutdown).await)
    });
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("netpol-agent: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    match result {
        Ok(_) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e @ AgentError::Kubeconfig(_)) => {
            tracing::error!("{e}");
            eprintln!("netpol-agent: {e}");
            ExitCode::from(BAD_CONFIG)
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("netpol-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
