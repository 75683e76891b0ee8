//! The real nftables: one `nft -f -` process per transaction, the script on stdin, so the
//! kernel applies it atomically. Optionally inside a network namespace (`nsenter`, or
//! `ip netns exec` without it).
//! The only place in the library that spawns processes.
//!
//! ```text
//!  Transaction ──render──► script ──► memfd (complete) ──► nft -f - (stdin = memfd) ──► kernel
//! ```
//!
//! The script is written into an in-memory file *before* nft starts, not streamed through a
//! pipe: nft reads its input until end of file and commits what it read as one transaction,
//! so if we were killed (SIGKILL, OOM) halfway through writing a pipe, nft would see a
//! truncated script, and a full sync cut after its `delete table` would commit an empty
//! table — a window in which isolated pods are reachable. A memfd needs no writable
//! filesystem (the DaemonSet's root filesystem is read-only).

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
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
            // nsenter joins only the network namespace, where `ip netns exec` also sets up
            // a mount namespace (~4 ms more per call).
            Some(ns) if nsenter_available() => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(&self.nft);
                c
            }
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.nft);
                c
            }
            None => Command::new(&self.nft),
        }
    }

    /// Runs nft with `args`, `script` as its stdin; nft's stdout, or its stderr as the error.
    pub fn run(&self, args: &[&str], script: &str) -> Result<String, NftError> {
        let input = complete_input(script).map_err(|e| NftError::Spawn(format!("preparing nft's input: {e}")))?;
        let mut cmd = self.command();
        cmd.args(args).stdin(Stdio::from(input)).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|e| NftError::Spawn(format!("{}: {e}", self.nft.display())))?;
        // Its commits are ours: the table monitor must not take them for a foreign change.
        super::monitor::note_own_child(child.id());
        let out = child.wait_with_output().map_err(|e| NftError::Spawn(e.to_string()))?;
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

fn nsenter_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| Command::new("nsenter").arg("--version").output().is_ok_and(|o| o.status.success()))
}

/// An in-memory file holding all of `script`, positioned at its start: nft's stdin exists
/// in full before nft is started (see the module docs for why).
fn complete_input(script: &str) -> std::io::Result<File> {
    let fd = nix::sys::memfd::memfd_create(c"netpol-nft-script", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let mut file = File::from(fd);
    file.write_all(script.as_bytes())?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A stand-in `nft` that reports what its stdin is when it starts: a regular file and
    /// its size (a pipe would report `fifo`, and a size that says nothing).
    fn stdin_reporter(dir: &std::path::Path) -> PathBuf {
        let path = dir.join("nft");
        std::fs::write(&path, "#!/bin/sh\nstat -L -c '%F %s' /dev/stdin\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn nft_starts_with_the_whole_script_already_in_its_input() {
        let dir = tempfile::tempdir().unwrap();
        let nft = RealNftables { nft: stdin_reporter(dir.path()), netns: None };
        let script = "flush ruleset\n".repeat(50_000); // far more than a pipe buffer
        let out = nft.run(&["-f", "-"], &script).unwrap();
        assert_eq!(out.trim(), format!("regular file {}", script.len()));
    }
}
