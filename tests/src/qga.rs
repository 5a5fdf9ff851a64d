//! A qemu guest agent on a host socket for the tests that need one
//! misbehaving on purpose (silent, refusing, late): it speaks qemu-ga's
//! protocol (one JSON command a line, 0xff before the answer to
//! `guest-sync-delimited`) and answers the fsfreeze commands as an agent
//! with two filesystems does. The real qemu-ga is tested in a guest
//! (`scripts/vm-test.sh freeze`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the agent answers.
#[derive(Clone, Copy)]
pub enum Behaviour {
    /// As qemu-ga does with two filesystems.
    Answer,
    /// A previous client's unread answers (and half of one) are in the
    /// channel before the sync's answer.
    Stale,
    /// Never a byte back (the agent is not running in the guest).
    Silent,
    /// The freeze is refused (e.g. fsfreeze disabled in the guest).
    Refuse,
    /// The freeze is answered only after this long; then the thaw.
    Late(Duration),
    /// The first connection's thaw goes unanswered (a channel that broke);
    /// a thaw on a new connection is answered.
    LoseFirstThaw,
    /// No thaw is ever answered (an agent that hung after the freeze).
    NeverThaw,
    /// The sync's sentinel, then 100 KiB without a line end.
    Flood,
}

/// An agent listening at `socket`; `commands` lists what it was asked,
/// in order.
pub struct Agent {
    pub socket: PathBuf,
    commands: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    pub fn start(dir: &Path, behaviour: Behaviour) -> Agent {
        let socket = dir.join("qga.sock");
        let listener = UnixListener::bind(&socket).expect("bind the agent's socket");
        let commands = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&commands);
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(conn) = conn else { return };
                let seen = Arc::clone(&seen);
                // Only the first connection loses its thaw.
                let behaviour = match behaviour {
                    Behaviour::LoseFirstThaw if n > 0 => Behaviour::Answer,
                    b => b,
                };
                std::thread::spawn(move || converse(conn, behaviour, &seen));
            }
        });
        Agent { socket, commands }
    }

    pub fn spec(&self) -> String {
        format!("qga:{}", self.socket.display())
    }

    pub fn commands(&self) -> Vec<String> {
        self.commands.lock().unwrap().clone()
    }
}

fn converse(conn: UnixStream, behaviour: Behaviour, seen: &Mutex<Vec<String>>) {
    let mut out = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line).map(|n| n > 0).unwrap_or(false) {
        // 0xff resets the parser: drop it.
        let text: Vec<u8> = line.drain(..).filter(|&b| b != 0xff).collect();
        let Ok(cmd) = serde_json::from_slice::<serde_json::Value>(&text) else { continue };
        let name = cmd["execute"].as_str().unwrap_or("").to_owned();
        seen.lock().unwrap().push(name.clone());
        if matches!(behaviour, Behaviour::Silent) {
            continue;
        }
        let answer = match name.as_str() {
            "guest-sync-delimited" => {
                if matches!(behaviour, Behaviour::Flood) {
                    let mut flood = vec![0xff];
                    flood.resize(100 << 10, b'x');
                    let _ = out.write_all(&flood);
                    continue;
                }
                if matches!(behaviour, Behaviour::Stale) {
                    out.write_all(b"{\"return\": 2}\n{\"return\": 77}\n{\"ret").unwrap();
                }
                let mut a = vec![0xff];
                a.extend_from_slice(serde_json::json!({ "return": cmd["arguments"]["id"] }).to_string().as_bytes());
                a
            }
            "guest-fsfreeze-freeze" => match behaviour {
                Behaviour::Refuse => {
                    br#"{"error": {"class": "GenericError", "desc": "fsfreeze is disabled"}}"#.to_vec()
                }
                Behaviour::Late(d) => {
                    std::thread::sleep(d);
                    br#"{"return": 2}"#.to_vec()
                }
                _ => br#"{"return": 2}"#.to_vec(),
            },
            "guest-fsfreeze-thaw" if matches!(behaviour, Behaviour::LoseFirstThaw | Behaviour::NeverThaw) => continue,
            "guest-fsfreeze-thaw" => br#"{"return": 2}"#.to_vec(),
            "guest-fsfreeze-status" => br#"{"return": "thawed"}"#.to_vec(),
            _ => br#"{"error": {"class": "CommandNotFound", "desc": "unknown"}}"#.to_vec(),
        };
        out.write_all(&answer).unwrap();
        out.write_all(b"\n").unwrap();
    }
}
