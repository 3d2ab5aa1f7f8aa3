//! Child processes that die with their job. Every program the worker starts (ffmpeg, ffprobe, command
//! plugins) runs in its own process group, so that stopping it also stops whatever it started.

use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Puts the command in a new process group and kills the child if its handle is dropped.
pub fn isolate(command: &mut Command) -> &mut Command {
    command.process_group(0).kill_on_drop(true)
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
