//! The listeners besides the default Unix socket: TCP on loopback and one
//! connection on standard input/output.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use tern_system_tests::*;

#[test]
fn tcp_listener_serves_the_same_disk_as_the_unix_socket() {
    require("qemu-io");
    let vm = TestVm::new(VmSpec::default());
    // Ask the kernel for a free port, then hand it to tern.
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let served = vm.serve(&["--listen", &format!("tcp:{port}")]);
    let tcp = format!("nbd://127.0.0.1:{port}/disk0");
    let out = run(Command::new("qemu-io").args(["-f", "raw", &tcp, "-c", "write -P 0x61 1M 64k"]));
    assert!(out.contains("wrote 65536/65536"), "{out}");
    // The write over TCP is visible over the Unix socket.
    let out = run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "read -P 0x61 1M 64k"]));
    assert!(out.contains("read 65536/65536") && !out.contains("failed"), "{out}");
    served.stop();
    vm.assert_journal_reproduces_source();
}

#[test]
fn stdio_mode_serves_one_connection_for_libnbd() {
    require("nbdsh");
    let vm = TestVm::new(VmSpec::default());
    // libnbd starts the server itself, talking over a socket pair on its
    // standard input and output.
    let script =
        "h.pwrite(b'tern' * 1024, 8192)\nh.flush()\nassert h.pread(4096, 8192) == b'tern' * 1024\nprint(h.get_size())";
    let mut cmd = Command::new("nbdsh");
    // nbdsh runs the first python3 on PATH; Debian's has the nbd module.
    cmd.env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()));
    cmd.env("TERN_RING_DIR", vm.ring_dir());
    cmd.args(["-c", "h.set_export_name('disk0')", "-c"])
        .arg(format!(
            "h.connect_command(['{}', '--state', '{}', '-q', 'serve', 'vm1', '--listen', 'stdio'])",
            tern_bin().display(),
            vm.state.display()
        ))
        .args(["-c", script]);
    let out = run(&mut cmd);
    assert_eq!(out.trim(), (64u64 << 20).to_string());
    // The server exited after the connection and detached cleanly: no
    // recovery is needed on the next start.
    let header = run(vm.tern().args(["journal", "dump", "vm1", "--header"]));
    assert!(header.contains("flags 0x0"), "{header}");
    vm.assert_journal_reproduces_source();
}

/// Issue 18 (item 11): libvirt runs qemu as its own user. `--socket-group`
/// and `--socket-mode` let it connect; by default only tern's user can.
#[test]
fn socket_group_and_mode_let_another_user_connect() {
    require("setpriv");
    require("qemu-io");
    let vm = TestVm::new(VmSpec { disk_size: 1 << 20, journal_size: "16MiB", ..Default::default() });
    let as_nobody = |vm: &TestVm| {
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "qemu-io", "-f", "raw", "-c", "read 0 4k"])
            .arg(vm.uri("disk0"))
            .output()
            .expect("setpriv")
    };
    let served = vm.serve(&[]);
    let mode = std::fs::metadata(&vm.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only tern's user by default");
    assert!(!as_nobody(&vm).status.success(), "another user is kept out");
    served.stop();
    let served = vm.serve(&["--socket-group", "nogroup", "--socket-mode", "0660"]);
    let meta = std::fs::metadata(&vm.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let out = as_nobody(&vm);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    served.stop();
    let out = vm.tern().args(["serve", &vm.name, "--socket-mode", "rw"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a file mode"));
    let out = vm
        .tern()
        .args(["serve", &vm.name, "--socket-group", "no-such-group-here", "--listen"])
        .arg(format!("unix:{}", vm.socket.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no group named 'no-such-group-here'"), "{err}");
    assert!(!vm.socket.exists(), "a serve that failed leaves no socket behind");
}
