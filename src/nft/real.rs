//! The real nftables: one `nft -f -` process per transaction, the script on stdin, so the
//! kernel applies it atomically. Optionally inside a network namespace (`ip netns exec`).
//! The only place in the library that spawns processes.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{NftError, Nftables, Transaction};

#[derive(Clone, Debug)]
pub struct RealNftables {
    /// The `nft` binary (default: `nft` from `PATH`).
    pub nft: PathBuf,
    /// Run inside this network namespace (`ip netns exec <name> nft ...`).
    pub netns: Option<String>,
}

impl Default for RealNftables {
    fn default() -> Self {
        RealNftables { nft: PathBuf::from("nft"), netns: None }
    }
}

impl RealNftables {
    pub fn new() -> Self {
        RealNftables::default()
    }

    pub fn in_netns(name: impl Into<String>) -> Self {
        RealNftables { netns: Some(name.into()), ..RealNftables::default() }
    }

    fn command(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.nft);
                c
            }
            None => Command::new(&self.nft),
        }
    }

    /// Runs nft with `args`, feeding `script` on stdin; nft's stdout, or its stderr as the error.
    pub fn run(&self, args: &[&str], script: &str) -> Result<String, NftError> {
        let mut cmd = self.command();
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| NftError::Spawn(format!("{}: {e}", self.nft.display())))?;
        let mut stdin = child.stdin.take().expect("piped");
        // nft reads all of stdin before it answers; write it from this thread, then wait.
        let write = stdin.write_all(script.as_bytes());
        drop(stdin);
        let out = child.wait_with_output().map_err(|e| NftError::Spawn(e.to_string()))?;
        write.map_err(|e| NftError::Spawn(format!("writing to nft: {e}")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(NftError::Rejected(String::from_utf8_lossy(&out.stderr).trim().to_string()))
        }
    }

    /// `nft --check -f -` of arbitrary text (golden files, rendered rulesets).
    pub fn check_text(&self, script: &str) -> Result<(), NftError> {
        self.run(&["--check", "-f", "-"], script).map(|_| ())
    }

    /// `nft -f -` of arbitrary text.
    pub fn apply_text(&self, script: &str) -> Result<(), NftError> {
        self.run(&["-f", "-"], script).map(|_| ())
    }
}

impl Nftables for RealNftables {
    fn apply(&mut self, tx: &Transaction) -> Result<(), NftError> {
        self.apply_text(&tx.render())
    }

    fn check(&self, tx: &Transaction) -> Result<(), NftError> {
        self.check_text(&tx.render())
    }

    fn list(&self, table: &str) -> Result<String, NftError> {
        if !table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(NftError::NoSuchTable(table.to_string()));
        }
        self.run(&["list", "table", "inet", table], "").map_err(|e| match e {
            NftError::Rejected(msg) if msg.contains("No such file") => NftError::NoSuchTable(table.to_string()),
            e => e,
        })
    }
}
