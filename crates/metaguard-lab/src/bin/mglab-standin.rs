//! `mglab-standin`: what the machine lab's stand-in units run inside the
//! booted machine (see `metaguard_lab::standin`).
//!
//! ```text
//! mglab-standin dockerd              docker.service (socket-activated by docker.socket)
//! mglab-standin ecs-init-pre-start   ecs.service's ExecStartPre
//! mglab-standin ecs-agent            ecs.service
//! mglab-standin pause                a container's process
//! ```
#![forbid(unsafe_code)]

use std::process::ExitCode;

use metaguard_lab::standin::{agent, dockerd};

fn main() -> ExitCode {
    let cmd = std::env::args().nth(1).unwrap_or_default();
    let result = match cmd.as_str() {
        "dockerd" => std::env::current_exe()
            .map_err(|e| format!("own executable: {e}"))
            .and_then(|exe| dockerd::run(&exe)),
        "ecs-init-pre-start" => agent::pre_start(),
        "ecs-agent" => agent::run(),
        "pause" => loop {
            // A container's process: sleeps until a signal ends it.
            std::thread::park();
        },
        _ => Err("usage: mglab-standin dockerd | ecs-init-pre-start | ecs-agent | pause".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mglab-standin {cmd}: {e}");
            ExitCode::from(1)
        }
    }
}
