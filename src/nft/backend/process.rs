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
//!
//! Every call is bounded: an nft that has not exited after `timeout` (a kernel or a lock
//! gone wrong, a hung binary) is killed and the call fails, so a sync never waits forever
//! (the sync loop's next sync is then full).

use std::fs::File;
use std::io::Read;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::nft::{CounterValue, NftError, Nftables, Transaction};

#[derive(Clone, Debug)]
pub struct RealNftables {
    /// The `nft` binary (default: `nft` from `PATH`).
    pub nft: PathBuf,
    /// Run inside this network namespace (`ip netns exec <name> nft ...`).
    pub netns: Option<String>,
    /// nft is killed, and the call fails, when it has not exited after this long.
    pub timeout: Duration,
}

/// Default bound of one nft call. A full sync of a 100k-pod cluster's ruleset through
/// nft takes a few seconds; a call taking ten times that is stuck.
pub const DEFAULT_NFT_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for RealNftables {
    fn default() -> Self {
        RealNftables { nft: PathBuf::from("nft"), netns: None, timeout: DEFAULT_NFT_TIMEOUT }
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
        let mut child = cmd.spawn().map_err(|e| NftError::Spawn(format!("{}: {e}", self.nft.display())))?;
        // Its commits are ours: the table monitor must not take them for a foreign change.
        super::monitor::note_own_child(child.id());
        // Both pipes are drained while nft runs (a full pipe would stall it).
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_micros(200);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(NftError::Spawn(format!(
                        "{} did not finish within {:?}; killed it",
                        self.nft.display(),
                        self.timeout
                    )));
                }
                Ok(None) => {
                    std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(e) => {
                    let _ = child.kill();
                    return Err(NftError::Spawn(e.to_string()));
                }
            }
        };
        let (stdout, stderr) = (collect(stdout), collect(stderr));
        if status.success() {
            Ok(String::from_utf8_lossy(&stdout).into_owned())
        } else {
            Err(NftError::Rejected(String::from_utf8_lossy(&stderr).trim().to_string()))
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

/// Reads a child's pipe to its end on a thread of its own.
fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<std::thread::JoinHandle<Vec<u8>>> {
    let mut pipe = pipe?;
    Some(std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = pipe.read_to_end(&mut out);
        out
    }))
}

/// What a [`drain`] read; called once the child has exited, so the pipe is at its end.
fn collect(reader: Option<std::thread::JoinHandle<Vec<u8>>>) -> Vec<u8> {
    reader.and_then(|r| r.join().ok()).unwrap_or_default()
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

    fn counters(&self, table: &str) -> Result<Vec<CounterValue>, NftError> {
        if !table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(NftError::NoSuchTable(table.to_string()));
        }
        let out = self.run(&["-j", "list", "counters", "table", "inet", table], "").map_err(|e| match e {
            NftError::Rejected(msg) if msg.contains("No such file") => NftError::NoSuchTable(table.to_string()),
            e => e,
        })?;
        parse_counters(&out)
    }
}

/// The named counters of `nft -j list counters` output:
/// `{"nftables": [{"metainfo": ..}, {"counter": {"name": .., "packets": .., "bytes": ..}}, ..]}`.
fn parse_counters(json: &str) -> Result<Vec<CounterValue>, NftError> {
    let bad = |why: &str| NftError::Rejected(format!("unexpected `nft -j list counters` output: {why}"));
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(&e.to_string()))?;
    let objects = v.get("nftables").and_then(|o| o.as_array()).ok_or_else(|| bad("no nftables array"))?;
    objects
        .iter()
        .filter_map(|o| o.get("counter"))
        .map(|c| {
            let name = c.get("name").and_then(|n| n.as_str()).ok_or_else(|| bad("a counter without a name"))?;
            let number =
                |key: &str| c.get(key).and_then(|n| n.as_u64()).ok_or_else(|| bad(&format!("{name}: no {key}")));
            Ok(CounterValue { name: name.to_string(), packets: number("packets")?, bytes: number("bytes")? })
        })
        .collect()
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
    fn named_counters_are_read_from_nft_json_and_bad_output_is_an_error() {
        let out = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "inet",
            "name": "cnt_a", "table": "t", "handle": 2, "comment": "c", "packets": 3, "bytes": 180}}]}"#;
        assert_eq!(parse_counters(out).unwrap(), vec![CounterValue { name: "cnt_a".into(), packets: 3, bytes: 180 }]);
        assert!(parse_counters(r#"{"nftables": [{"counter": {"name": "x"}}]}"#).is_err());
        assert!(parse_counters("Error").is_err());
    }

    #[test]
    fn nft_starts_with_the_whole_script_already_in_its_input() {
        let dir = tempfile::tempdir().unwrap();
        let nft = RealNftables { nft: stdin_reporter(dir.path()), ..RealNftables::default() };
        let script = "flush ruleset\n".repeat(50_000); // far more than a pipe buffer
        let out = nft.run(&["-f", "-"], &script).unwrap();
        assert_eq!(out.trim(), format!("regular file {}", script.len()));
    }

    #[test]
    fn an_nft_that_hangs_is_killed_after_the_timeout_and_the_call_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nft");
        let pid_file = dir.path().join("pid");
        // `exec`: the hanging process is the child itself, as the real nft is.
        std::fs::write(&path, format!("#!/bin/sh\necho $$ > {}\nexec sleep 600\n", pid_file.display())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let nft = RealNftables { nft: path, timeout: Duration::from_millis(300), ..RealNftables::default() };
        let started = Instant::now();
        let err = nft.apply_text("flush ruleset\n").unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(err.contains("did not finish within 300ms; killed it"), "{err}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(!std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(), "the hung nft is gone");
    }

    #[test]
    fn a_quick_nft_answers_with_its_output_and_its_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nft");
        std::fs::write(
            &path,
            "#!/bin/sh\nif [ \"$1\" = list ]; then echo listed; exit 0; fi\necho refused >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let nft = RealNftables { nft: path, ..RealNftables::default() };
        assert_eq!(nft.run(&["list"], "").unwrap().trim(), "listed");
        assert!(matches!(nft.apply_text("x"), Err(NftError::Rejected(m)) if m == "refused"));
    }
}
