//! Child processes that die with their job. Every program the worker starts (ffmpeg, ffprobe, command
//! plugins) runs in its own process group, so that stopping it also stops whatever it started.
//!
//! They also die with the worker, even when it is killed with `kill -9` and cleans up nothing:
//! - each child gets a parent-death signal (SIGKILL), so the kernel kills it when the worker dies;
//! - a small watchdog process (`/bin/sh`, started with the first child) holds a pipe from the worker and knows
//!   every live group; when the pipe closes, because the worker is gone, it kills those groups, which takes
//!   along the grandchildren (a plugin script's ffmpeg) that the parent-death signal does not reach.
//!
//! A program that leaves its group on purpose (`setsid`) escapes both; see the `command` plugin kind for how
//! such a process is kept from holding a stage.

use std::io::Write as _;
use std::sync::OnceLock;
use std::sync::mpsc::Sender;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Puts the command in a new process group, kills the child if its handle is dropped, and kills it when
/// the worker dies. Prefer [`spawn`], which also tells the watchdog about the group.
pub fn isolate(command: &mut Command) -> &mut Command {
    die_with_parent(command);
    command.process_group(0).kill_on_drop(true)
}

/// Asks the kernel to send SIGKILL to the child when the worker dies (`PR_SET_PDEATHSIG`).
///
/// Linux sends it when the *thread* that started the child ends, so children must be started from threads that
/// live as long as their jobs: the async runtime's, not `spawn_blocking` ones (which end when idle).
///
/// This is the crate's one `unsafe` block: setting a process attribute between `fork` and `exec` can only be
/// done in a `pre_exec` hook, which std marks unsafe because it runs in a forked copy of a multi-threaded
/// process.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    let parent = nix::unistd::getpid();
    let hook = move || {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
        // The worker may have died between fork and prctl; then no signal will ever come, so give up now.
        if nix::unistd::getppid() != parent {
            return Err(std::io::Error::from(nix::errno::Errno::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe functions may
    // be called. It makes two system calls (prctl and getppid; the worker's pid was read before the fork),
    // allocates nothing, takes no lock and touches no state shared with other threads; its error is built
    // from a plain errno.
    unsafe {
        command.pre_exec(hook);
    }
}

/// A started child's process group. Dropping it kills the group and tells the watchdog it is gone, so a
/// job that ends in any way (success, error, cancel, abort) leaves none of its processes behind.
#[derive(Debug)]
pub struct Group(Option<Pid>);

impl Group {
    /// The group's id (its leader's pid), while known.
    pub fn id(&self) -> Option<Pid> {
        self.0
    }

    /// Sends SIGKILL to whatever is left in the group.
    pub fn kill(&self) {
        kill_group(self.0);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        kill_group(self.0);
        if let Some(group) = self.0 {
            watchdog(format!("-{group}\n"));
        }
    }
}

/// Starts `command` as an isolated child (see [`isolate`]) and registers its group with the watchdog.
///
/// # Errors
/// The I/O error of the spawn.
pub fn spawn(command: &mut Command) -> std::io::Result<(Child, Group)> {
    isolate(command);
    let child = command.spawn()?;
    let group = group(&child);
    if let Some(group) = group {
        watchdog(format!("+{group}\n"));
    }
    Ok((child, Group(group)))
}

/// The process group of a child started with [`isolate`] (its pid), while it has one.
pub fn group(child: &Child) -> Option<Pid> {
    child.id().and_then(|pid| i32::try_from(pid).ok()).map(Pid::from_raw)
}

/// Sends SIGKILL to a group; a group that is already gone is fine.
pub fn kill_group(group: Option<Pid>) {
    if let Some(group) = group {
        let _ = killpg(group, Signal::SIGKILL);
    }
}

/// Stops a child and its group: SIGTERM, then SIGKILL after `grace` (or at once if the leader exits sooner,
/// for whatever it left behind), then reaps the child.
pub async fn terminate(child: &mut Child, grace: Duration) {
    let group = group(child);
    if let Some(group) = group {
        let _ = killpg(group, Signal::SIGTERM);
        let _ = tokio::time::timeout(grace, child.wait()).await;
    }
    kill_group(group);
    let _ = child.kill().await;
}

/// The watchdog's script: it keeps the list of live groups from `+ID` and `-ID` lines on stdin and, when
/// stdin ends (the worker exited or was killed), kills every group still listed.
const WATCHDOG_SCRIPT: &str = r#"groups=' '
while IFS= read -r line; do
    case $line in
        +*) groups="$groups${line#+} " ;;
        -*) group=${line#-}
            case $groups in *" $group "*) groups="${groups%% $group *} ${groups#* $group }" ;; esac ;;
    esac
done
for group in $groups; do kill -KILL -"$group" 2>/dev/null; done
"#;

/// Sends one line to the watchdog, starting it first if needed. Lines go through a thread, so a stalled
/// watchdog can never block the worker. Without a watchdog (no `/bin/sh`) the parent-death signal remains.
fn watchdog(line: String) {
    static LINES: OnceLock<Option<Sender<String>>> = OnceLock::new();
    let lines = LINES.get_or_init(|| match start_watchdog() {
        Ok(sender) => Some(sender),
        Err(error) => {
            tracing::warn!(%error, "cannot start the child watchdog; `kill -9` of the worker may leave grandchildren running");
            None
        }
    });
    if let Some(lines) = lines {
        let _ = lines.send(line);
    }
}

fn start_watchdog() -> std::io::Result<Sender<String>> {
    use std::os::unix::process::CommandExt as _;
    use std::process::Stdio;
    // Its own group: a Ctrl-C meant for the worker must not reach it. No parent-death signal: it must
    // outlive the worker to do its job, and it exits by itself as soon as the worker is gone.
    let mut watchdog = std::process::Command::new("/bin/sh")
        .args(["-c", WATCHDOG_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    let mut stdin = watchdog.stdin.take().ok_or_else(|| std::io::Error::other("no stdin pipe"))?;
    let (sender, receiver) = std::sync::mpsc::channel::<String>();
    std::thread::Builder::new().name("child-watchdog".into()).spawn(move || {
        for line in receiver {
            if stdin.write_all(line.as_bytes()).is_err() {
                break;
            }
        }
        // Reaps the watchdog if this thread ever ends (it does not while the process lives).
        drop(stdin);
        let _ = watchdog.wait();
    })?;
    Ok(sender)
}
