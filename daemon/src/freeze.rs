//! Guest freeze: an application-consistent point without the application's
//! help, through the qemu guest agent (qemu-ga) on the VM's virtio-serial
//! channel (`-chardev socket,path=SOCKET,server=on,wait=off` on the host).
//!
//! `guest-fsfreeze-freeze` makes the guest flush and freeze every
//! filesystem: a journaling filesystem frozen is clean on disk (its journal
//! committed, its recovery flag cleared). Every write of that flush was
//! acknowledged by the front-end before the agent answers, so a tag
//! appended then follows all of them in the journal; then
//! `guest-fsfreeze-thaw`. The whole freeze has a deadline: an agent that
//! does not answer by then is never waited on — the point is taken
//! crash-consistent with the reason, and the thaw is sent regardless (the
//! agent reads commands in order, so it thaws right after a late freeze).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tern_store::target::Quiesce;

/// How long the thaw's answer is waited for once the tag is in place
/// (and again on a new connection, if the first goes unanswered).
const THAW_WAIT: Duration = Duration::from_secs(10);

/// The longest answer read from the agent: the guest writes the channel,
/// and no answer of the few commands sent is near this long.
const MAX_ANSWER: usize = 64 << 10;

/// `text` with control characters replaced and cut to `max` characters:
/// the guest's words go into points, logs and terminals.
fn printable(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).map(|c| if c.is_control() { '?' } else { c }).collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

/// A guest agent to freeze a VM through: `qga:<socket>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Agent {
    pub socket: PathBuf,
}

impl std::str::FromStr for Agent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("qga:") {
            Some(path) if !path.is_empty() => Ok(Agent { socket: path.into() }),
            _ => Err(format!(
                "{s:?}: a freeze agent is qga:SOCKET, the host side of the VM's qemu guest agent channel (qemu -chardev socket,path=SOCKET,server=on,wait=off,id=qga0 -device virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0)"
            )),
        }
    }
}

impl TryFrom<String> for Agent {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Agent> for String {
    fn from(a: Agent) -> String {
        a.to_string()
    }
}

impl std::fmt::Display for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "qga:{}", self.socket.display())
    }
}

/// What went wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the guest agent at {socket} did not answer {command} within {waited:.1?}")]
    Silent { socket: String, command: &'static str, waited: Duration },
    #[error("the guest agent at {socket} refused {command}: {desc}")]
    Refused { socket: String, command: &'static str, desc: String },
    #[error("cannot talk to the guest agent at {socket} ({doing}): {source}")]
    Io { socket: String, doing: &'static str, source: std::io::Error },
    #[error("the guest agent at {socket} answered {command} with something that is not the protocol: {text}")]
    Protocol { socket: String, command: &'static str, text: String },
}

/// A connection to qemu-ga, one command at a time. Answers come in the
/// order of the commands; `pending` lists the commands sent whose answer
/// has not been read (after a timeout, a late answer is skipped by it).
pub struct Qga {
    stream: UnixStream,
    socket: String,
    buf: Vec<u8>,
    pending: VecDeque<&'static str>,
    /// When the newest command was sent, for "did not answer within".
    sent_at: Instant,
}

impl Qga {
    /// Connects and synchronizes (`guest-sync-delimited`: whatever a
    /// previous client left unread in the channel is skipped).
    pub fn connect(agent: &Agent, deadline: Instant) -> Result<Qga, AgentError> {
        let socket = agent.socket.display().to_string();
        // A connect blocks while the channel's backlog is full (a client
        // already on it): on a thread, given up on at the deadline.
        let (tx, rx) = std::sync::mpsc::channel();
        let path = agent.socket.clone();
        std::thread::spawn(move || {
            let _ = tx.send(UnixStream::connect(path));
        });
        let left = deadline.saturating_duration_since(Instant::now());
        let connected = rx.recv_timeout(left).map_err(|_| AgentError::Silent {
            socket: socket.clone(),
            command: "connect (another client on the channel?)",
            waited: left,
        })?;
        let stream = connected.map_err(|source| AgentError::Io {
            socket: socket.clone(),
            doing: "connect; is the VM running with that channel, and no other client on it?",
            source,
        })?;
        let mut qga = Qga { stream, socket, buf: Vec::new(), pending: VecDeque::new(), sent_at: Instant::now() };
        qga.sync(deadline)?;
        Ok(qga)
    }

    fn sync(&mut self, deadline: Instant) -> Result<(), AgentError> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        let id = u64::from(std::process::id()) << 32 | u64::from(nanos);
        // 0xff first: it resets the agent's parser after a client that died
        // mid-command.
        let mut msg = vec![0xff];
        msg.extend_from_slice(
            serde_json::json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } }).to_string().as_bytes(),
        );
        msg.push(b'\n');
        self.send(&msg, "guest-sync-delimited")?;
        // The answer follows a 0xff sentinel; what comes before it is stale.
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == 0xff) {
                self.buf.drain(..=at);
                break;
            }
            self.buf.clear();
            self.fill(deadline, "guest-sync-delimited")?;
        }
        loop {
            let answer = self.next_answer(deadline, "guest-sync-delimited")?;
            if answer.get("return").and_then(serde_json::Value::as_u64) == Some(id) {
                self.pending.clear();
                return Ok(());
            }
        }
    }

    /// Sends `command` and waits until `deadline` for its answer: its
    /// `return` value, or the agent's error.
    pub fn execute(&mut self, command: &'static str, deadline: Instant) -> Result<serde_json::Value, AgentError> {
        self.send_command(command)?;
        self.answer_to(command, deadline)
    }

    fn send_command(&mut self, command: &'static str) -> Result<(), AgentError> {
        let mut msg = serde_json::json!({ "execute": command }).to_string().into_bytes();
        msg.push(b'\n');
        self.send(&msg, command)?;
        self.pending.push_back(command);
        Ok(())
    }

    /// The answer to the oldest command sent, skipping the late answers of
    /// commands given up on before it.
    fn answer_to(&mut self, command: &'static str, deadline: Instant) -> Result<serde_json::Value, AgentError> {
        loop {
            let answer = self.next_answer(deadline, command)?;
            let of = self.pending.pop_front();
            if of != Some(command) {
                continue; // a late answer to an earlier command
            }
            if let Some(v) = answer.get("return") {
                return Ok(v.clone());
            }
            let desc = answer
                .pointer("/error/desc")
                .and_then(serde_json::Value::as_str)
                .map(|d| printable(d, 300))
                .unwrap_or_else(|| printable(&answer.to_string(), 300));
            return Err(AgentError::Refused { socket: self.socket.clone(), command, desc });
        }
    }

    fn send(&mut self, msg: &[u8], command: &'static str) -> Result<(), AgentError> {
        self.sent_at = Instant::now();
        self.stream.write_all(msg).map_err(|source| AgentError::Io {
            socket: self.socket.clone(),
            doing: command,
            source,
        })
    }

    /// The next JSON object the agent sent (one per line).
    fn next_answer(&mut self, deadline: Instant, command: &'static str) -> Result<serde_json::Value, AgentError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{fffd}');
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_str(text).map_err(|_| AgentError::Protocol {
                    socket: self.socket.clone(),
                    command,
                    text: printable(text, 200),
                });
            }
            // The guest writes this channel: what it sends is bounded.
            if self.buf.len() > MAX_ANSWER {
                return Err(AgentError::Protocol {
                    socket: self.socket.clone(),
                    command,
                    text: format!("an answer of over {MAX_ANSWER} bytes without a line end"),
                });
            }
            self.fill(deadline, command)?;
        }
    }

    fn fill(&mut self, deadline: Instant, command: &'static str) -> Result<(), AgentError> {
        let silent =
            |qga: &Qga| AgentError::Silent { socket: qga.socket.clone(), command, waited: qga.sent_at.elapsed() };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(silent(self));
        }
        self.stream.set_read_timeout(Some(left)).map_err(|source| AgentError::Io {
            socket: self.socket.clone(),
            doing: command,
            source,
        })?;
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(AgentError::Io {
                socket: self.socket.clone(),
                doing: command,
                source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the channel closed (qemu stopped?)"),
            }),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                Err(silent(self))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(source) => Err(AgentError::Io { socket: self.socket.clone(), doing: command, source }),
        }
    }
}

/// A guest freeze under way, from [`freeze`]: thaw it with [`Freeze::thaw`]
/// (always, whatever the freeze's outcome).
pub struct Freeze {
    agent: Agent,
    qga: Option<Qga>,
    /// Whether `guest-fsfreeze-freeze` was sent (then a thaw is owed).
    sent: bool,
    started: Instant,
    /// When the agent answered the freeze (from its start), if it did.
    pub answered: Option<Duration>,
    /// The outcome the point records.
    pub quiesce: Quiesce,
}

/// How a freeze ended, for the operator.
#[derive(Debug)]
pub struct Thawed {
    /// From the freeze sent to the thaw's answer (or to giving up on it).
    pub frozen_for: Duration,
    /// The thaw's answer: the filesystems thawed; `Err` says why unconfirmed.
    pub result: Result<u32, String>,
}

/// Freezes the guest's filesystems through `agent`, giving up at
/// `started + timeout`. Never fails: the outcome (frozen, or why not) is in
/// [`Freeze::quiesce`], for the point; the freeze must be thawed.
pub fn freeze(agent: &Agent, timeout: Duration) -> Freeze {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut f = Freeze {
        agent: agent.clone(),
        qga: None,
        sent: false,
        started,
        answered: None,
        quiesce: Quiesce { agent: agent.to_string(), frozen: false, filesystems: None, reason: None },
    };
    let outcome = (|| -> Result<u32, AgentError> {
        let qga = f.qga.insert(Qga::connect(agent, deadline)?);
        qga.send_command("guest-fsfreeze-freeze")?;
        f.sent = true;
        let n = qga.answer_to("guest-fsfreeze-freeze", deadline)?;
        n.as_u64().map(|n| n as u32).ok_or_else(|| AgentError::Protocol {
            socket: agent.socket.display().to_string(),
            command: "guest-fsfreeze-freeze",
            text: n.to_string(),
        })
    })();
    match outcome {
        Ok(n) => {
            f.answered = Some(started.elapsed());
            f.quiesce.frozen = true;
            f.quiesce.filesystems = Some(n);
        }
        Err(e) => {
            log::warn!("guest freeze through {agent} failed: {e}; the point will be crash-consistent");
            f.quiesce.reason = Some(printable(&e.to_string(), 600));
        }
    }
    f
}

impl Freeze {
    /// Thaws the guest (if a freeze was sent: even one not answered, which
    /// the agent carries out before this), waiting up to 10 s for the
    /// answer; unanswered, once more on a new connection (the agent reads
    /// commands in order, so that thaw comes after the freeze too).
    pub fn thaw(mut self) -> Thawed {
        Thawed { frozen_for: self.started.elapsed(), result: self.thaw_now() }
    }

    fn thaw_now(&mut self) -> Result<u32, String> {
        let Some(mut qga) = self.qga.take().filter(|_| self.sent) else {
            return Ok(0); // nothing was frozen
        };
        let agent = &self.agent;
        let first = match qga.execute("guest-fsfreeze-thaw", Instant::now() + THAW_WAIT) {
            Ok(n) => return Ok(n.as_u64().unwrap_or(0) as u32),
            Err(e) => e,
        };
        drop(qga);
        log::warn!("{first}; thawing again through a new connection to {agent}");
        let deadline = Instant::now() + THAW_WAIT;
        let again = Qga::connect(agent, deadline).and_then(|mut q| q.execute("guest-fsfreeze-thaw", deadline));
        match again {
            Ok(n) => Ok(n.as_u64().unwrap_or(0) as u32),
            Err(e) => {
                log::error!(
                    "{e}: THE GUEST MAY STILL BE FROZEN: the thaws are queued in the agent behind the freeze, which it carries out first; check the guest (`guest-fsfreeze-status` through {agent}) and thaw it (`guest-fsfreeze-thaw`)"
                );
                Err(e.to_string())
            }
        }
    }
}

/// Thaws the guest through `agent` by hand (`tern thaw`): the thaw, then
/// what `guest-fsfreeze-status` says ("thawed", "frozen").
pub fn thaw_now(agent: &Agent) -> anyhow::Result<String> {
    let deadline = Instant::now() + THAW_WAIT;
    let mut qga = Qga::connect(agent, deadline)?;
    qga.execute("guest-fsfreeze-thaw", deadline)?;
    let status = qga.execute("guest-fsfreeze-status", Instant::now() + THAW_WAIT)?;
    Ok(status.as_str().map(|s| printable(s, 40)).unwrap_or_else(|| printable(&status.to_string(), 40)))
}

impl Drop for Freeze {
    /// A freeze dropped unthawed (a panic, an early return) is thawed all
    /// the same: a guest is never left frozen by tern.
    fn drop(&mut self) {
        if self.qga.is_some() && self.sent {
            let _ = self.thaw_now();
        }
    }
}

/// A tag taken through a guest freeze (`TAG_QUIESCE`, docs/FORMATS.md):
/// its label and the freeze's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuiescedTag {
    pub version: u32,
    pub label: String,
    pub quiesce: Quiesce,
}

impl QuiescedTag {
    pub fn parse(data: &[u8]) -> anyhow::Result<QuiescedTag> {
        use anyhow::Context;
        let t: QuiescedTag = serde_json::from_slice(data).context("a quiesced tag that is not valid JSON")?;
        if t.version != 1 {
            anyhow::bail!("a quiesced tag of version {} (this tern reads version 1)", t.version);
        }
        Ok(t)
    }
}

/// How an app point quiesces its VM.
#[derive(Debug, Clone)]
pub enum Quiescing {
    /// No agent: whoever tags quiesced the application.
    None,
    /// Freeze the guest through this agent, for at most this long.
    Freeze(Agent, Duration),
}

impl Quiescing {
    /// The VM's `[app-points]` policy, unless overridden (`--freeze`,
    /// `--no-freeze`, `--freeze-timeout`).
    pub fn of(
        config: &tern_driver::vm::VmConfig,
        agent: Option<&Agent>,
        no_freeze: bool,
        timeout: Option<Duration>,
    ) -> anyhow::Result<Quiescing> {
        use anyhow::Context;
        if no_freeze {
            return Ok(Quiescing::None);
        }
        let agent = match (agent, &config.app_points.freeze) {
            (Some(a), _) => a.clone(),
            (None, Some(f)) => f
                .parse::<Agent>()
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("VM '{}': vm.toml [app-points] freeze", config.name))?,
            (None, None) => return Ok(Quiescing::None),
        };
        Ok(Quiescing::Freeze(agent, timeout.unwrap_or(config.app_points.freeze_timeout)))
    }
}

/// An app point's tag, as taken by [`tag`].
#[derive(Debug)]
pub struct Tagged {
    pub seq: u64,
    /// The freeze's outcome, when an agent was asked.
    pub quiesce: Option<Quiesce>,
    /// The freeze's answer time and the thaw.
    pub freeze_answered: Option<Duration>,
    pub thawed: Option<Thawed>,
}

/// Takes an app point of one VM: freezes the guest (if `quiescing` says
/// so), appends the tag under the VM's tag lock, thaws. A failed freeze
/// still tags, crash-consistent with the reason, and still thaws (a freeze
/// not answered may yet be carried out). `Ok(None)`: the journal had no
/// room (full, or catching up after an overflow).
pub fn tag(
    journal: &tern_driver::journal::Journal,
    paths: &tern_driver::vm::VmPaths,
    label: &str,
    quiescing: &Quiescing,
) -> anyhow::Result<Option<Tagged>> {
    let tagged = tag_quiesced(journal, &paths.tag_lock(), label, quiescing)?;
    if let Some(t) = &tagged {
        LastAppPoint::now(label, t.seq, t.quiesce.as_ref(), t.thawed.as_ref()).record(paths);
    }
    Ok(tagged)
}

fn tag_quiesced(
    journal: &tern_driver::journal::Journal,
    tag_lock: &std::path::Path,
    label: &str,
    quiescing: &Quiescing,
) -> anyhow::Result<Option<Tagged>> {
    let Quiescing::Freeze(agent, timeout) = quiescing else {
        let seq = tern_driver::tag::append(journal, tag_lock, label)?;
        return Ok(seq.map(|seq| Tagged { seq, quiesce: None, freeze_answered: None, thawed: None }));
    };
    tern_driver::tag::check_label(label)?;
    let f = freeze(agent, *timeout);
    let quiesce = f.quiesce.clone();
    let description =
        serde_json::to_vec(&QuiescedTag { version: 1, label: label.to_owned(), quiesce: quiesce.clone() });
    let seq = description
        .map_err(anyhow::Error::from)
        .and_then(|d| tern_driver::tag::append_quiesced(journal, tag_lock, &d).map_err(anyhow::Error::from));
    // Thawed whatever the append did (the freeze may be late, not failed).
    let freeze_answered = f.answered;
    let thawed = Some(f.thaw());
    Ok(seq?.map(|seq| Tagged { seq, quiesce: Some(quiesce), freeze_answered, thawed }))
}

/// "application-consistent: …" or "crash-consistent: …", for the operator.
pub fn describe(quiesce: &Quiesce, answered: Option<Duration>, thawed: Option<&Thawed>) -> String {
    let mut text = if quiesce.frozen {
        format!(
            "application-consistent: {} filesystem(s) frozen through {}{}",
            quiesce.filesystems.unwrap_or(0),
            quiesce.agent,
            answered.map(|d| format!(" (the freeze took {:.0} ms)", d.as_secs_f64() * 1000.0)).unwrap_or_default()
        )
    } else {
        format!("crash-consistent only: {}", quiesce.reason.as_deref().unwrap_or("the guest was not frozen"))
    };
    match thawed {
        Some(Thawed { frozen_for, result: Ok(_) }) if quiesce.frozen => {
            text += &format!("; thawed, frozen for {:.0} ms", frozen_for.as_secs_f64() * 1000.0)
        }
        Some(Thawed { result: Err(e), .. }) => text += &format!("; THE THAW IS NOT CONFIRMED ({e}): check the guest"),
        _ => {}
    }
    text
}

/// [`describe`] for each frozen member of a group cut ("" when none was).
pub fn describe_group(cut: &crate::group::Cut) -> String {
    cut.tag
        .quiesce
        .iter()
        .map(|(vm, q)| {
            let thawed = cut.thawed.iter().find(|(t, _)| t == vm).map(|(_, t)| t);
            format!("; VM '{vm}' {}", describe(q, None, thawed))
        })
        .collect()
}

/// `<state>/<vm>/app-point.json`: the newest app point tagged here and
/// whether its guest freeze worked, for `tern status` (a freeze that fails
/// at every scheduled point must not go unseen).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastAppPoint {
    pub time: String,
    pub label: String,
    pub seq: u64,
    /// "application", or "crash" when the guest freeze failed.
    pub consistency: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why the agent did not confirm the thaw: the guest may be frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thaw_unconfirmed: Option<String>,
}

impl LastAppPoint {
    pub fn now(label: &str, seq: u64, quiesce: Option<&Quiesce>, thawed: Option<&Thawed>) -> LastAppPoint {
        LastAppPoint {
            thaw_unconfirmed: thawed.and_then(|t| t.result.as_ref().err().cloned()),
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            label: label.to_owned(),
            seq,
            consistency: Quiesce::consistency(quiesce).into(),
            agent: quiesce.map(|q| q.agent.clone()),
            reason: quiesce.and_then(|q| q.reason.clone()),
        }
    }

    fn file(paths: &tern_driver::vm::VmPaths) -> PathBuf {
        paths.dir().join("app-point.json")
    }

    /// Written in place of the last (a temporary file renamed); a failure
    /// is logged, never the tag's.
    pub fn record(&self, paths: &tern_driver::vm::VmPaths) {
        let path = Self::file(paths);
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        let written = serde_json::to_vec_pretty(self)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            log::warn!("cannot record the app point in {}: {e}", path.display());
        }
    }

    pub fn load(paths: &tern_driver::vm::VmPaths) -> Option<LastAppPoint> {
        serde_json::from_slice(&std::fs::read(Self::file(paths)).ok()?).ok()
    }
}
