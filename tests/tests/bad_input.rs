//! Invariant 8 on the NBD socket: every bad request gets the spec's answer
//! or a clean disconnect of that client only; the server never panics,
//! other clients keep working, and nothing acknowledged is lost.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tern_system_tests::*;

const SIZE: u64 = 16 << 20;

fn vm() -> TestVm {
    TestVm::new(VmSpec { disk_size: SIZE, journal_size: "256MiB", ..Default::default() })
}

/// A well-behaved client's write, read back, on a fresh connection: the
/// server still works and still has `pattern` at `offset`.
fn assert_server_works(vm: &TestVm, offset: u64, pattern: u8) {
    let mut c = RawClient::connect(&vm.socket, "disk0");
    let r = c.call(CMD_READ, 0, offset, 4096, &[]);
    assert_eq!(r.error, 0);
    assert!(r.data.iter().all(|&b| b == pattern), "data at {offset} changed");
}

#[test]
fn out_of_range_requests_get_the_spec_errors_and_the_stream_stays_in_sync() {
    let vm = vm();
    let served = vm.serve(&[]);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    assert_eq!(c.size, SIZE);
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &[0x42; 4096]).error, 0);
    // Past the end, per command.
    assert_eq!(c.call(CMD_READ, 0, SIZE - 10, 11, &[]).error, EINVAL);
    assert_eq!(c.call(CMD_WRITE, 0, SIZE - 10, 11, &[7; 11]).error, ENOSPC);
    assert_eq!(c.call(CMD_TRIM, 0, SIZE, 1, &[]).error, EINVAL);
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, SIZE - 1, 2, &[]).error, ENOSPC);
    assert_eq!(c.call(CMD_BLOCK_STATUS, 0, 0, 512, &[]).error, EINVAL, "no base:allocation negotiated");
    // offset + length overflows 64 bits.
    assert_eq!(c.call(CMD_READ, 0, u64::MAX - 5, 4096, &[]).error, EINVAL);
    assert_eq!(c.call(CMD_WRITE, 0, u64::MAX - 5, 16, &[9; 16]).error, EINVAL);
    // Unknown command and unknown or misplaced flags.
    assert_eq!(c.call(99, 0, 0, 0, &[]).error, EINVAL);
    assert_eq!(c.call(CMD_READ, 1 << 12, 0, 512, &[]).error, EINVAL);
    assert_eq!(c.call(CMD_WRITE, 1 << 1, 0, 4, &[1; 4]).error, EINVAL, "NO_HOLE on a WRITE");
    // READ over 32 MiB: refused, connection kept.
    assert_eq!(c.call(CMD_READ, 0, 0, (32 << 20) + 1, &[]).error, EINVAL);
    // After all that, the stream is in sync and nothing was written.
    let r = c.call(CMD_READ, 0, 0, 4096, &[]);
    assert_eq!(r.error, 0);
    assert!(r.data.iter().all(|&b| b == 0x42));
    let r = c.call(CMD_READ, 0, SIZE - 16, 16, &[]);
    assert!(r.data.iter().all(|&b| b == 0), "a refused write reached the disk");
    c.send(CMD_DISC, 0, 0, 0, 0, &[]);
    served.stop();
    vm.assert_journal_reproduces_source();
}

#[test]
fn a_client_stalled_mid_payload_holds_up_neither_replication_nor_overlapping_writes() {
    let vm = vm();
    let served = vm.serve(&[]);
    let mut staller = RawClient::connect(&vm.socket, "disk0");
    // A 1 MiB WRITE of which only the first 4 KiB arrive for now (a TCP
    // peer gone quiet). Its payload was being received into its journal
    // record; the server gives the record up after a while.
    staller.send(CMD_WRITE, 0, 7, 0, 1 << 20, &[0x5a; 4096]);
    std::thread::sleep(Duration::from_millis(1000));
    // A write overlapping the stalled one's range completes.
    let mut bystander = RawClient::connect(&vm.socket, "disk0");
    assert_eq!(bystander.call(CMD_WRITE, 0, 4096, 4096, &[0x17; 4096]).error, 0);
    assert_eq!(bystander.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
    // The consumer can read past the stalled write's place in the ring.
    let dump = run(vm.tern().args(["journal", "dump", &vm.name]));
    assert!(dump.contains("write  disk 0 offset 4096 length 4096"), "{dump}");
    assert!(!dump.contains("not yet published"), "{dump}");
    // The stalled client finishes; its write lands after the bystander's.
    staller.sock.write_all(&[0x5a; (1 << 20) - 4096]).expect("rest of the payload");
    let r = staller.reply(|_| 0).expect("a reply");
    assert_eq!((r.cookie, r.error), (7, 0));
    assert_server_works(&vm, 4096, 0x5a);
    assert!(!served.log().contains("panicked"), "{}", served.log());
    served.stop();
    vm.assert_journal_reproduces_source();
}

/// A client gone in the middle of a request: that request is dropped (a
/// half-received write never reaches the disk or the journal's history),
/// and the log says where the client stopped, unlike a plain hang-up
/// between requests.
#[test]
fn a_client_gone_mid_request_is_logged_as_such_and_its_write_is_dropped() {
    let vm = vm();
    let served = vm.serve(&[]);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    c.send(CMD_WRITE, 0, 1, 0, 65536, &[0x66; 4096]);
    drop(c);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    let mut head = 0x2560_9513u32.to_be_bytes().to_vec();
    head.extend_from_slice(&[0; 6]);
    c.sock.write_all(&head).expect("part of a request header");
    drop(c);
    let quiet = RawClient::connect(&vm.socket, "disk0");
    drop(quiet);
    let wanted = [
        "client closed the connection 4096 bytes into a 65536-byte WRITE payload; that request was not carried out",
        "client closed the connection 10 bytes into a 28-byte request header",
        "client closed the connection\n",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !wanted.iter().all(|w| served.log().contains(w)) {
        assert!(std::time::Instant::now() < deadline, "{}", served.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = served.log();
    assert_eq!(
        log.matches("client closed the connection\n").count(),
        1,
        "only the hang-up between requests is plain: {log}"
    );
    assert_server_works(&vm, 0, 0);
    served.stop();
    vm.assert_journal_reproduces_source();
}

#[test]
fn write_over_32_mib_is_refused_and_only_that_client_is_dropped() {
    let vm = vm();
    let served = vm.serve(&[]);
    let mut bystander = RawClient::connect(&vm.socket, "disk0");
    assert_eq!(bystander.call(CMD_WRITE, 0, 8192, 4096, &[0x17; 4096]).error, 0);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    // The header claims 64 MiB of payload; send a little, as a confused
    // client would.
    c.send(CMD_WRITE, 0, 5, 0, 64 << 20, &[0xee; 1024]);
    let r = c.reply(|_| 0).expect("an error reply before the disconnect");
    assert_eq!((r.cookie, r.error), (5, EINVAL));
    assert!(c.reply(|_| 0).is_none(), "the server must drop a client whose stream is out of sync");
    assert_server_works(&vm, 8192, 0x17);
    let r = bystander.call(CMD_READ, 0, 0, 4096, &[]);
    assert!(r.data.iter().all(|&b| b == 0), "the refused payload reached the disk");
    served.stop();
    vm.assert_journal_reproduces_source();
}

/// With more connections than request threads (`--threads 2`, two
/// connections: one worker busy each, the other parked), a client that
/// leaves still ends its connection, parked worker and all (the server
/// logs the end only once every thread of it has returned), and the
/// other client is served on, before and after.
#[test]
fn a_connection_with_a_parked_worker_ends_when_its_client_leaves() {
    let vm = vm();
    let served = vm.serve(&["--threads", "2"]);
    let mut leaving = RawClient::connect(&vm.socket, "disk0");
    let mut staying = RawClient::connect(&vm.socket, "disk0");
    // A reply on `staying` means the server counts it in: from now on
    // each connection keeps one worker busy.
    assert_eq!(staying.call(CMD_READ, 0, 0, 4096, &[]).error, 0);
    // Requests pipelined: the two workers of `leaving` both take turns at
    // its socket, and the one past its share parks after its turn.
    for round in 0..4 {
        for i in 0..32 {
            leaving.send(CMD_READ, 0, i, i * 4096, 4096, &[]);
        }
        for _ in 0..32 {
            let r = leaving.reply(|_| 4096).expect("a reply");
            assert_eq!(r.error, 0, "round {round}, READ {}", r.cookie);
        }
    }
    leaving.send(CMD_DISC, 0, 7, 0, 0, &[]);
    drop(leaving);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !served.log().contains("client disconnected (NBD_CMD_DISC)") {
        assert!(std::time::Instant::now() < deadline, "the connection did not end: {}", served.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..6 {
        assert_eq!(staying.call(CMD_READ, 0, 0, 4096, &[]).error, 0);
    }
    drop(staying);
    served.stop();
}

#[test]
fn a_client_that_hangs_up_with_replies_queued_harms_nobody() {
    let vm = vm();
    let served = vm.serve(&[]);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &[0x33; 4096]).error, 0);
    for round in 0..20 {
        let mut greedy = RawClient::connect(&vm.socket, "disk0");
        for i in 0..64 {
            greedy.send(CMD_READ, 0, i, (i % 16) << 20, 1 << 20, &[]);
        }
        greedy.send(CMD_WRITE, 0, 99, 1 << 20, 4096, &[round as u8; 4096]);
        drop(greedy); // gone before reading a single reply
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_server_works(&vm, 0, 0x33);
    assert!(!served.log().contains("panicked"), "{}", served.log());
    served.stop();
    vm.assert_journal_reproduces_source();
}

#[test]
fn random_bytes_at_every_phase_never_take_the_server_down() {
    let vm = vm();
    let served = vm.serve(&[]);
    let mut keeper = RawClient::connect(&vm.socket, "disk0");
    assert_eq!(keeper.call(CMD_WRITE, 0, 65536, 4096, &[0x5c; 4096]).error, 0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for i in 0..300 {
        let mut junk = vec![0u8; rng.gen_range(1..4096)];
        rng.fill(&mut junk[..]);
        if i % 3 == 0 {
            // Garbage straight after connecting.
            let mut s = UnixStream::connect(&vm.socket).expect("connect");
            let _ = s.write_all(&junk);
        } else {
            // Garbage after a valid handshake, sometimes behind a valid
            // request header's magic.
            let mut c = RawClient::connect(&vm.socket, "disk0");
            if i % 3 == 1 {
                junk[..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
            }
            let _ = c.sock.write_all(&junk);
            let _ = c.sock.set_read_timeout(Some(Duration::from_millis(50)));
            let mut sink = [0u8; 4096];
            let _ = c.sock.read(&mut sink);
        }
        if i % 50 == 0 {
            let r = keeper.call(CMD_READ, 0, 65536, 4096, &[]);
            assert!(r.error == 0 && r.data.iter().all(|&b| b == 0x5c), "the well-behaved client was disturbed");
        }
    }
    assert_server_works(&vm, 65536, 0x5c);
    assert!(!served.log().contains("panicked"), "{}", served.log());
    served.stop();
    // Random writes may have landed; whatever did is in the journal.
    vm.assert_journal_reproduces_source();
}

#[test]
fn handshake_limits_are_enforced_without_losing_sync() {
    let vm = vm();
    let served = vm.serve(&[]);
    let mut s = UnixStream::connect(&vm.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    let reply_type = |s: &mut UnixStream| {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("reply");
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
        let mut d = vec![0u8; len];
        s.read_exact(&mut d).expect("data");
        u32::from_be_bytes(h[12..16].try_into().expect("4"))
    };
    let option = |opt: u32, data: &[u8]| {
        let mut b = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    };
    // An export name longer than the spec's 4096 bytes.
    let mut go = 5000u32.to_be_bytes().to_vec();
    go.extend(vec![b'x'; 5000]);
    go.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&option(7, &go)).expect("send");
    assert_eq!(reply_type(&mut s), 0x8000_0003, "ERR_INVALID");
    // 1 MiB of option data: read and discarded, then ERR_TOO_BIG.
    s.write_all(&option(3, &vec![0; 1 << 20])).expect("send");
    assert_eq!(reply_type(&mut s), 0x8000_0009, "ERR_TOO_BIG");
    // An unknown option, then a valid LIST: still in sync.
    s.write_all(&option(4242, &[1, 2, 3])).expect("send");
    assert_eq!(reply_type(&mut s), 0x8000_0001, "ERR_UNSUP");
    s.write_all(&option(3, &[])).expect("send");
    assert_eq!(reply_type(&mut s), 2, "NBD_REP_SERVER for disk0");
    assert_eq!(reply_type(&mut s), 1, "ACK");
    drop(s);
    assert_server_works(&vm, 0, 0);
    served.stop();
}

/// `tern serve --ublk` on a kernel without the ublk driver (this host's:
/// the guest test `scripts/vm-test.sh ublk` runs it where there is one)
/// fails at once with one line saying what to load, and leaves the VM
/// servable over NBD.
#[test]
fn ublk_without_the_kernel_driver_says_what_to_load() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        eprintln!("this kernel has ublk: the guest test covers it");
        return;
    }
    let vm = vm();
    let out = vm.tern().args(["serve", "vm1", "--ublk"]).output().expect("tern serve --ublk");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("modprobe ublk_drv") && err.contains("Linux 6.0"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    let served = vm.serve(&[]);
    assert_server_works(&vm, 0, 0);
    drop(served);
}
