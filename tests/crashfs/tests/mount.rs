//! The real thing: the `tern-crashfs` binary mounted through the kernel, used
//! with ordinary syscalls, then power-cut and remounted through the control
//! socket. Needs root and /dev/fuse; without them every test fails saying so.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};
use tern_crashfs::{CutMode, Error, FaultOp, Process};

struct Mounted {
    fs: Process,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mounted {
    fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    fn cut(&mut self, seed: u64, mode: CutMode) -> tern_crashfs::CutStats {
        self.fs.control.power_cut(seed, mode).expect("power cut")
    }
}

fn mount() -> Mounted {
    assert!(nix::unistd::geteuid().is_root(), "tern-crashfs mount tests need root (mount(2)); CI runs as root");
    assert!(Path::new("/dev/fuse").exists(), "tern-crashfs mount tests need /dev/fuse (modprobe fuse)");
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).expect("mkdir mnt");
    let mnt = mnt.canonicalize().expect("canonical mountpoint");
    let fs = Process::spawn(Path::new(env!("CARGO_BIN_EXE_tern-crashfs")), &mnt, &dir.path().join("control.sock"))
        .expect("start tern-crashfs");
    Mounted { fs, mnt, _dir: dir }
}

fn fsync_dir(path: &Path) {
    File::open(path).expect("open dir").sync_all().expect("fsync dir");
}

fn read(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    File::open(path).expect("open").read_to_end(&mut out).expect("read");
    out
}

#[test]
fn write_without_fsync_is_gone_after_power_cut() {
    let mut m = mount();
    let durable_name = File::create(m.path("named")).expect("create");
    durable_name.sync_all().expect("fsync");
    fsync_dir(&m.mnt);
    fs::write(m.path("never-synced"), b"lost").expect("write");
    (&durable_name).write_all(b"lost too").expect("write");
    drop(durable_name);

    let stats = m.cut(1, CutMode::Drop);

    assert!(!m.path("never-synced").exists());
    assert_eq!(read(&m.path("named")), b"", "the name survives, the unsynced data does not");
    assert_eq!(stats.files_with_pending, 2);
}

#[test]
fn fsynced_file_in_fsynced_dir_survives() {
    let mut m = mount();
    fs::create_dir(m.path("d")).expect("mkdir");
    let mut f = File::create(m.path("d/f")).expect("create");
    f.write_all(b"kept").expect("write");
    f.sync_all().expect("fsync");
    fsync_dir(&m.path("d"));
    fsync_dir(&m.mnt);
    drop(f);

    m.cut(2, CutMode::Drop);

    assert_eq!(read(&m.path("d/f")), b"kept");
}

#[test]
fn rename_over_final_name_needs_the_dir_fsync() {
    let mut m = mount();
    for (name, contents) in [("a", b"old"), ("b", b"old")] {
        fs::write(m.path(name), contents).expect("write");
    }
    m.fs.control.sync().expect("sync");
    for (name, fsync_dir_after) in [("a", true), ("b", false)] {
        let tmp = m.path(&format!("{name}.tmp"));
        let mut f = File::create(&tmp).expect("create");
        f.write_all(b"new").expect("write");
        f.sync_all().expect("fsync");
        fs::rename(&tmp, m.path(name)).expect("rename");
        if fsync_dir_after {
            fsync_dir(&m.mnt);
        }
    }

    m.cut(3, CutMode::Drop);

    assert_eq!(read(&m.path("a")), b"new");
    assert_eq!(read(&m.path("b")), b"old", "b's rename was logged after the last dir fsync");
}

#[test]
fn mmap_writes_survive_only_with_msync() {
    let mut m = mount();
    for name in ["synced", "unsynced"] {
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.path(name)).expect("open");
        f.set_len(8192).expect("set_len");
        f.sync_all().expect("fsync");
    }
    fsync_dir(&m.mnt);
    for (name, msync) in [("synced", true), ("unsynced", false)] {
        let f = OpenOptions::new().read(true).write(true).open(m.path(name)).expect("open");
        // SAFETY: the file lives on our test mount and nothing else maps or truncates it.
        let mut map = unsafe { MmapMut::map_mut(&f) }.expect("mmap");
        map[4096..4100].copy_from_slice(b"page");
        if msync {
            map.flush().expect("msync");
        }
    }
    let pending = m.fs.control.stats().expect("stats").pending;
    assert!(
        pending.iter().any(|p| p.path == "/unsynced" && p.writes > 0),
        "the dirty page reached the filesystem on close, not durably: {pending:?}"
    );
    assert!(!pending.iter().any(|p| p.path == "/synced"), "msync made it durable: {pending:?}");

    m.cut(4, CutMode::Drop);

    assert_eq!(&read(&m.path("synced"))[4096..4100], b"page");
    assert_eq!(read(&m.path("unsynced")), vec![0; 8192]);
}

#[test]
fn seek_data_and_hole_report_the_written_blocks() {
    let m = mount();
    let mut f =
        OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.path("sparse")).expect("open");
    f.set_len(1 << 20).expect("set_len");
    for off in [64 << 10, 512 << 10] {
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(off)).expect("seek");
        f.write_all(&[1; 8192]).expect("write");
    }
    let seek = |off, whence| lseek(f.as_raw_fd(), off, whence);

    assert_eq!(seek(0, Whence::SeekData), Ok(64 << 10));
    assert_eq!(seek(64 << 10, Whence::SeekHole), Ok(72 << 10));
    assert_eq!(seek(72 << 10, Whence::SeekData), Ok(512 << 10));
    assert_eq!(seek(513 << 10, Whence::SeekHole), Ok(520 << 10));
    assert_eq!(seek(520 << 10, Whence::SeekData), Err(nix::errno::Errno::ENXIO));
    assert_eq!(f.metadata().expect("stat").len(), 1 << 20);
}

#[test]
fn punched_hole_reads_zeroes_and_is_a_hole() {
    let m = mount();
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.path("p")).expect("open");
    f.write_all(&[0xaa; 12288]).expect("write");

    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(f.as_raw_fd(), flags, 4096, 4096).expect("punch");

    let got = read(&m.path("p"));
    assert_eq!(got.len(), 12288);
    assert!(got[..4096].iter().chain(&got[8192..]).all(|&b| b == 0xaa));
    assert!(got[4096..8192].iter().all(|&b| b == 0));
    assert_eq!(lseek(f.as_raw_fd(), 0, Whence::SeekHole), Ok(4096));
}

#[test]
fn injected_fsync_failure_reaches_the_caller() {
    let mut m = mount();
    m.fs.control.fail(FaultOp::Fsync, libc::EIO, "journal", 1).expect("fail");
    let f = File::create(m.path("journal")).expect("create");

    assert_eq!(f.sync_all().map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));
    assert!(f.sync_all().is_ok(), "count 1: the next fsync succeeds");
    assert!(File::create(m.path("other")).expect("create").sync_all().is_ok());
}

#[test]
fn capacity_makes_writes_fail_with_enospc() {
    let mut m = mount();
    m.fs.control.capacity(Some(64 << 10)).expect("capacity");
    let mut f = File::create(m.path("big")).expect("create");
    f.write_all(&[1; 64 << 10]).expect("fits");

    let err = f.write_all(&[1; 4096]).expect_err("over capacity");

    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    let vfs = nix::sys::statvfs::statvfs(&m.mnt).expect("statvfs");
    assert_eq!(vfs.blocks() * vfs.fragment_size(), 64 << 10);
    assert_eq!(vfs.blocks_available(), 0);
}

#[test]
fn busy_mount_is_named_then_cut_once_released() {
    let mut m = mount();
    let held = File::create(m.path("held")).expect("create");

    let err = m.fs.control.power_cut(5, CutMode::Drop).expect_err("busy");

    assert!(matches!(&err, Error::Busy { message } if message.contains(m.mnt.to_str().unwrap_or("?"))), "{err}");
    drop(held);
    m.cut(5, CutMode::Drop);
    assert!(!m.path("held").exists());
}

#[test]
fn prefix_and_subset_cuts_remount_a_consistent_tree() {
    let mut m = mount();
    for round in 0..6u64 {
        let dir = m.path(&format!("d{round}"));
        fs::create_dir(&dir).expect("mkdir");
        for i in 0..4 {
            fs::write(dir.join(format!("f{i}")), vec![i as u8; 5000]).expect("write");
        }
        let mode = if round % 2 == 0 { CutMode::Prefix } else { CutMode::Subset };
        let stats = m.cut(round, mode);

        assert_eq!(stats.file_ops_kept + stats.file_ops_dropped + stats.writes_torn, 4);
        let stats = m.fs.control.stats().expect("stats");
        assert_eq!((stats.pending_file_ops, stats.pending_dir_ops), (0, 0));
        for entry in fs::read_dir(&m.mnt).expect("readdir") {
            let entry = entry.expect("entry");
            for file in fs::read_dir(entry.path()).expect("readdir") {
                let file = file.expect("entry");
                assert!(read(&file.path()).len() <= 5000);
            }
        }
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => panic!("rm {}: {e}", dir.display()),
            _ => {}
        }
    }
}
