//! systemd's notification protocol as tern's units use it (`Type=notify`,
//! `WatchdogSec=`), on a socket of our own standing in for systemd: READY
//! only once the service does its job, watchdog pings while it runs,
//! STOPPING on SIGTERM. (Under a real systemd: `scripts/vm-test.sh systemd`.)

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_system_tests::*;

/// systemd's end: a datagram socket and what arrives on it.
struct Systemd {
    socket: UnixDatagram,
}

impl Systemd {
    fn new(path: &Path) -> Self {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        Systemd { socket }
    }

    /// Messages until one contains `what`, or `within` passes (None).
    fn until(&self, what: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == what) {
                    return Some(msg);
                }
            }
        }
        None
    }

    /// Counts watchdog pings for `during`.
    fn pings(&self, during: Duration) -> usize {
        let deadline = Instant::now() + during;
        let mut buf = [0u8; 4096];
        let mut n = 0;
        while Instant::now() < deadline {
            if let Ok(len) = self.socket.recv(&mut buf) {
                n += String::from_utf8_lossy(&buf[..len]).lines().filter(|l| *l == "WATCHDOG=1").count();
            }
        }
        n
    }
}

/// `cmd` started as systemd would: NOTIFY_SOCKET, and a watchdog of 400 ms
/// for this very process (WATCHDOG_PID, set by a shell that then execs).
fn spawn_notified(cmd: Command, notify: &Path, log: &Path) -> Child {
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut sh = Command::new("sh");
    sh.arg("-c").arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"").arg(program).args(args);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    sh.env("NOTIFY_SOCKET", notify).env("WATCHDOG_USEC", "400000");
    sh.stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap()).spawn().expect("spawn")
}

fn sigterm(child: &Child) {
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
}

#[test]
fn serve_is_ready_once_listening_pings_the_watchdog_and_says_stopping() {
    let vm = TestVm::new(VmSpec::default());
    let systemd = Systemd::new(&vm.dir.path().join("notify.sock"));
    let log = vm.dir.path().join("serve.log");
    let mut cmd = vm.tern();
    cmd.args(["serve", "vm1", "--listen"]).arg(format!("unix:{}", vm.socket.display()));
    let mut child = spawn_notified(cmd, &vm.dir.path().join("notify.sock"), &log);
    let ready = systemd.until("READY=1", Duration::from_secs(15));
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let ready = ready.unwrap_or_else(|| panic!("no READY=1 from tern serve: {}", read_log()));
    // READY means a client can connect now.
    std::os::unix::net::UnixStream::connect(&vm.socket).expect("READY=1 came before the socket accepted");
    assert!(ready.contains("STATUS=serving VM 'vm1' on unix:"), "{ready}");
    // 400 ms watchdog: a ping at least every 100 ms or so.
    let pings = systemd.pings(Duration::from_secs(2));
    assert!(pings >= 8, "{pings} watchdog pings in 2 s with WatchdogSec=400ms: {}", read_log());
    sigterm(&child);
    let stopping = systemd.until("STOPPING=1", Duration::from_secs(10));
    assert!(stopping.is_some(), "no STOPPING=1 after SIGTERM: {}", read_log());
    assert!(child.wait().unwrap().success(), "{}", read_log());
}

#[test]
fn ship_and_apply_are_ready_and_ping_the_watchdog() {
    let vm = TestVm::new(VmSpec::default());
    let served = vm.serve(&[]);
    for what in ["ship", "apply"] {
        let notify = vm.dir.path().join(format!("notify-{what}.sock"));
        let systemd = Systemd::new(&notify);
        let log = vm.dir.path().join(format!("{what}.log"));
        let mut cmd = vm.tern();
        if what == "ship" {
            cmd.args(["ship", "vm1"]);
        } else {
            cmd.args(["apply", "--cache"])
                .arg(vm.dir.path().join("cache"))
                .arg("--target")
                .arg(vm.dir.path().join("target"));
        }
        let mut child = spawn_notified(cmd, &notify, &log);
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        let ready = systemd.until("READY=1", Duration::from_secs(15));
        let ready = ready.unwrap_or_else(|| panic!("no READY=1 from tern {what}: {}", read_log()));
        let status = if what == "ship" { "STATUS=shipping VM 'vm1' to " } else { "STATUS=applying " };
        assert!(ready.contains(status), "{what}: {ready}");
        let pings = systemd.pings(Duration::from_secs(2));
        assert!(pings >= 4, "tern {what}: {pings} watchdog pings in 2 s with WatchdogSec=400ms: {}", read_log());
        sigterm(&child);
        assert!(child.wait().unwrap().success(), "tern {what}: {}", read_log());
    }
    served.stop();
}
