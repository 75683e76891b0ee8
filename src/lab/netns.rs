//! Namespace plumbing: entering a lab namespace from a short-lived thread (network
//! namespaces are per thread, so the rest of the process never moves), and running `ip`
//! and `nft` against lab namespaces.
//!
//! `nix::sched::setns` is a safe wrapper, so this needs no `unsafe`.

use std::fs::File;
use std::io::{self, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use nix::sched::{CloneFlags, setns};

use super::LabError;

/// Where `ip netns add` mounts named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Move the calling thread into namespace `name` and check that it really is there (the
/// thread's `ns/net` is the same nsfs inode as the mounted one), so nothing meant for a
/// lab namespace can land in the root namespace.
fn enter(name: &str) -> io::Result<()> {
    let file = File::open(path(name))?;
    let want = file.metadata()?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let now = std::fs::metadata("/proc/thread-self/ns/net")?;
    if (now.dev(), now.ino()) != (want.dev(), want.ino()) {
        return Err(io::Error::other(format!("setns into {name} did not take effect")));
    }
    Ok(())
}

/// Run `f` on a fresh thread inside namespace `name`. The thread ends with `f`, so the
/// caller's namespace never changes. Sockets `f` creates stay in `name` for their lifetime.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(name)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("lab namespace thread panicked")))
    })
}

/// Write sysctls (paths relative to `/proc/sys`) inside namespace `name`: `/proc/sys/net`
/// shows the namespace of the thread that opens it. A missing IPv6 tree (IPv6 disabled
/// on the kernel command line) is tolerated; the build fails later only if a pod has an
/// IPv6 address.
pub fn sysctls(name: &str, values: &[(&str, &str)]) -> io::Result<()> {
    run_in(name, || {
        for (key, value) in values {
            match std::fs::write(format!("/proc/sys/{key}"), value) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && key.starts_with("net/ipv6") => {}
                r => r.map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}: {e}")))?,
            }
        }
        Ok(())
    })
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Spawn `cmd` with `input` on its standard input.
fn spawn_with_input(mut cmd: Command, input: &str) -> Result<(String, Child), LabError> {
    let what = describe(&cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::io(format!("cannot run `{what}`"), e))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // A child that failed early closes its stdin; its exit status tells why.
    let _ = stdin.write_all(input.as_bytes());
    drop(stdin);
    Ok((what, child))
}

fn finish(what: String, child: Child) -> Result<(), LabError> {
    let out = child.wait_with_output().map_err(|e| LabError::io(format!("waiting for `{what}`"), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            command: what,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn ip_command(netns: Option<&str>, force: bool) -> Command {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    if force {
        cmd.arg("-force");
    }
    cmd.args(["-batch", "-"]);
    cmd
}

/// Create namespaces (the only root-namespace `ip` call of a build: `netns add` lines).
pub fn add_namespaces(names: &[String]) -> Result<(), LabError> {
    let script: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
    let (what, child) = spawn_with_input(ip_command(None, false), &script)?;
    finish(what, child)
}

/// Delete namespaces, going on past errors (`-force`) so one failure leaves no others.
pub fn delete_namespaces(names: &[String]) -> Result<(), LabError> {
    if names.is_empty() {
        return Ok(());
    }
    let script: String = names.iter().map(|n| format!("netns del {n}\n")).collect();
    let (what, child) = spawn_with_input(ip_command(None, true), &script)?;
    let result = finish(what, child);
    // Someone else (a concurrent `cleanup_leftovers`, the interrupt handler) may have
    // deleted some first: that is success, as long as none is left.
    if result.is_err()
        && let Ok(present) = list()
        && !names.iter().any(|n| present.contains(n))
    {
        return Ok(());
    }
    result
}

/// Delete those of `names` that exist (a build that failed half-way created only some).
pub fn delete_existing(names: &[String]) -> Result<(), LabError> {
    let present = list().map_err(|e| LabError::io(format!("listing {NETNS_DIR}"), e))?;
    let doomed: Vec<String> = names.iter().filter(|n| present.contains(n)).cloned().collect();
    delete_namespaces(&doomed)
}

/// Run `ip -n <ns> -batch -` for every (namespace, script) concurrently; first error wins.
pub fn ip_batches(scripts: &[(String, String)]) -> Result<(), LabError> {
    let mut running = Vec::with_capacity(scripts.len());
    let mut first_err = None;
    for (ns, script) in scripts {
        match spawn_with_input(ip_command(Some(ns), false), script) {
            Ok(c) => running.push(c),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    for (what, child) in running {
        if let Err(e) = finish(what, child) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// True when every interface in `ip -o link show` output, loopback aside, is
/// operationally up with its real qdisc attached. Both happen in the kernel's link
/// watcher, asynchronously after `link set up`; until then a veth drops what it is given
/// (`qdisc noop`), which would turn the first probes into false "blocked"s.
pub fn links_ready(ip_o_link: &str) -> bool {
    ip_o_link
        .lines()
        .filter(|l| !l.contains(" lo: ") && !l.trim().is_empty())
        .all(|l| l.contains(" state UP ") && !l.contains(" qdisc noop "))
}

/// Wait until every interface of `names` is ready (see [`links_ready`]), at most `limit`.
pub fn wait_links_ready(names: &[String], limit: std::time::Duration) -> Result<(), LabError> {
    let deadline = std::time::Instant::now() + limit;
    let mut pending: Vec<&String> = names.iter().collect();
    loop {
        let children: Vec<(&String, io::Result<Child>)> = pending
            .iter()
            .map(|ns| {
                let child = Command::new("ip")
                    .args(["-n", ns, "-o", "link", "show"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn();
                (*ns, child)
            })
            .collect();
        let mut still = Vec::new();
        for (ns, child) in children {
            let out = child
                .and_then(Child::wait_with_output)
                .map_err(|e| LabError::io(format!("listing links of {ns}"), e))?;
            if !out.status.success() || !links_ready(&String::from_utf8_lossy(&out.stdout)) {
                still.push(ns);
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let list: Vec<&str> = still.iter().map(|s| s.as_str()).collect();
            return Err(LabError::io(
                "waiting for lab links to come up",
                io::Error::new(io::ErrorKind::TimedOut, list.join(", ")),
            ));
        }
        pending = still;
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Load an nft script in namespace `ns` in one transaction (`nft -f -`).
pub fn nft_load(ns: &str, script: &str) -> Result<(), LabError> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "nft", "-f", "-"]);
    let (what, child) = spawn_with_input(cmd, script)?;
    finish(what, child)
}

/// Names of the namespaces currently mounted under [`NETNS_DIR`].
pub fn list() -> io::Result<Vec<String>> {
    match std::fs::read_dir(NETNS_DIR) {
        Ok(dir) => {
            let mut v = Vec::new();
            for e in dir {
                v.push(e?.file_name().to_string_lossy().into_owned());
            }
            v.sort();
            Ok(v)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn links_are_ready_only_when_up_with_a_real_qdisc() {
        let lo = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT";
        let up = "2: eth0@if3: <BROADCAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT";
        let noop = "2: eth0@if3: <BROADCAST,UP,LOWER_UP> mtu 1500 qdisc noop state UP mode DEFAULT";
        let down = "2: eth0@if3: <NO-CARRIER,UP> mtu 1500 qdisc noqueue state DOWN mode DEFAULT";
        assert!(super::links_ready(&format!("{lo}\n{up}\n")));
        assert!(!super::links_ready(&format!("{lo}\n{noop}\n")));
        assert!(!super::links_ready(&format!("{lo}\n{down}\n")));
    }
}
