//! The real `netpol-agent` binary as a child process, for system tests.
//!
//! ```text
//!  test ──spawn──► netpol-agent --node N --kubeconfig <fake apiserver> --log-format json
//!                      ├─ --netns <node netns>: its nft and its netlink socket go there   (NftRoute::Netns)
//!                      └─ PATH=<dir>/bin-N:$PATH, nft (wrapper) ──► exit 1              (NftRoute::Refuse)
//! ```
//!
//! The agent stays in the root namespace (the fake apiserver listens on 127.0.0.1 there);
//! only its nftables work is redirected, so the host's ruleset is never touched. (A refused
//! agent never sends over netlink: it does so only after nft accepted a full sync.) Its JSON
//! log goes to a file the test reads: [`AgentProcess::applied`] counts the transactions the
//! kernel accepted.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use clap::CommandFactory as _;

use crate::agent::AgentConfig;

/// Where the agent's `nft` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NftRoute {
    /// The real nft, inside this network namespace.
    Netns(String),
    /// Nowhere: every nft call fails (for tests that must never program anything).
    Refuse,
    /// Nowhere, slowly: every nft call hangs until it is killed (for the agent's bound on
    /// external calls).
    Hang,
}

/// How to start one agent.
#[derive(Clone, Debug)]
pub struct AgentLaunch {
    /// The `netpol-agent` binary (`env!("CARGO_BIN_EXE_netpol-agent")` in integration tests).
    pub binary: PathBuf,
    pub node: String,
    pub table: String,
    pub kubeconfig: PathBuf,
    pub nft: NftRoute,
    /// Holds the refusing `nft` (`bin-<node>/nft`) and the logs; the caller removes it.
    pub workdir: PathBuf,
    /// `--admin-addr` (default `127.0.0.1:0`: any free port).
    pub admin_addr: String,
    /// `--log-level` (default `info`; the log is JSON so [`AgentProcess::applied`] can read it).
    pub log_level: String,
    /// Appended to the command line (e.g. `--debounce`, `--cleanup-on-exit`).
    pub extra_args: Vec<String>,
    /// Environment set for the agent (e.g. `MALLOC_ARENA_MAX`), after every variable the
    /// agent's flags fall back to has been removed.
    pub env: Vec<(String, String)>,
}

/// A running agent, killed (SIGKILL) and reaped on drop if still running.
pub struct AgentProcess {
    child: Child,
    log: PathBuf,
    node: String,
}

impl AgentLaunch {
    /// A launch with the defaults above and no extra arguments or environment.
    pub fn new(
        binary: impl Into<PathBuf>,
        node: impl Into<String>,
        table: impl Into<String>,
        kubeconfig: impl Into<PathBuf>,
        nft: NftRoute,
        workdir: impl Into<PathBuf>,
    ) -> AgentLaunch {
        AgentLaunch {
            binary: binary.into(),
            node: node.into(),
            table: table.into(),
            kubeconfig: kubeconfig.into(),
            nft,
            workdir: workdir.into(),
            admin_addr: "127.0.0.1:0".into(),
            log_level: "info".into(),
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// For [`NftRoute::Refuse`] and [`NftRoute::Hang`], writes an `nft` that always fails
    /// or hangs; returns the directory
    /// to put first on `PATH`. (With [`NftRoute::Netns`] the agent enters the namespace
    /// itself, `--netns`, for nft and its netlink socket.)
    fn write_refusing_nft(&self) -> io::Result<Option<PathBuf>> {
        use std::os::unix::fs::PermissionsExt as _;
        let script = match self.nft {
            NftRoute::Refuse => "#!/bin/sh\necho 'nft refused by the test harness' >&2\nexit 1\n",
            // `exec`: the hanging process is the agent's child itself, as the real nft is.
            NftRoute::Hang => "#!/bin/sh\nexec sleep 600\n",
            NftRoute::Netns(_) => return Ok(None),
        };
        let bin = self.workdir.join(format!("bin-{}", self.node));
        std::fs::create_dir_all(&bin)?;
        let wrapper = bin.join("nft");
        std::fs::write(&wrapper, script)?;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        Ok(Some(bin))
    }

    /// Starts the agent; its log goes to `<workdir>/<log_name>`.
    pub fn spawn(&self, log_name: &str) -> io::Result<AgentProcess> {
        let refusing = self.write_refusing_nft()?;
        let log = self.workdir.join(log_name);
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--node", &self.node, "--table", &self.table, "--admin-addr", &self.admin_addr])
            .args(["--log-format", "json", "--log-level", &self.log_level])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(&self.extra_args);
        if let NftRoute::Netns(ns) = &self.nft {
            cmd.args(["--netns", ns]);
        }
        // Only the command line configures the agent under test: no variable its flags fall
        // back to (the list comes from the flags themselves) leaks in from the caller.
        for var in AgentConfig::command().get_arguments().filter_map(|a| a.get_env()) {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(bin) = refusing {
            cmd.env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()));
        }
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(File::create(&log)?).spawn()?;
        Ok(AgentProcess { child, log, node: self.node.clone() })
    }
}

impl AgentProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many nft transactions the agent reports as applied (`kind` `full` or
    /// `incremental`; `None`: both), from its JSON log.
    pub fn applied(&self, kind: Option<&str>) -> usize {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "applied")
            .filter(|v| kind.is_none_or(|k| v["fields"]["kind"] == k))
            .count()
    }

    /// The exit status, if the agent has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` (a `kill` name such as `TERM`) without waiting.
    pub fn signal(&self, signal: &str) -> io::Result<()> {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status()?;
        if status.success() { Ok(()) } else { Err(io::Error::other(format!("kill -{signal} failed: {status}"))) }
    }

    /// Waits up to `limit` for the agent to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, then waits up to `limit` for the exit.
    pub fn terminate(&mut self, limit: Duration) -> io::Result<Option<ExitStatus>> {
        self.signal("TERM")?;
        Ok(self.wait_exit(limit))
    }

    /// SIGKILL (no cleanup, no goodbye), then reaps.
    pub fn kill_hard(&mut self) -> io::Result<ExitStatus> {
        self.child.kill()?;
        self.child.wait()
    }

    /// Waits up to `limit` until the agent has applied at least `count` transactions of
    /// `kind`; `Err` with the log if it exits or the time runs out.
    pub fn wait_applied(&mut self, kind: Option<&str>, count: usize, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if self.applied(kind) >= count {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                return Err(format!("agent for {} exited ({status}) before applying:\n{}", self.node, self.log()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "agent for {} applied {} of {count} {kind:?} transactions within {limit:?}:\n{}",
                    self.node,
                    self.applied(kind),
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
