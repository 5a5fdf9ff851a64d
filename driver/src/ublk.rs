//! The ublk front-end: each disk of a mirror as a kernel block device,
//! `/dev/ublkbN`, through the kernel's ublk driver (Linux ≥ 6.0, module
//! `ublk_drv`) and the `libublk` crate (io_uring underneath).
//!
//! The same mirror, journal and invariants as the NBD front-end: every
//! request becomes one call on [`Mirror`] — READ, WRITE (FUA made durable
//! before it completes), FLUSH, DISCARD (a trim) and WRITE_ZEROES. One
//! queue per CPU (at most 4), each a thread that carries its requests out
//! one after another, as deep as the kernel may send (64).
//!
//! Devices are created with `UBLK_F_USER_RECOVERY_REISSUE`: if `tern
//! serve` dies, the kernel keeps `/dev/ublkbN` and holds the VM's I/O
//! until a new `tern serve --ublk` attaches ([`serve`] finds the device
//! the VM's state recorded and recovers it) and re-issues what was in
//! flight. A write re-issued after it reached the mirror is written twice,
//! with the same bytes: harmless.

use std::path::PathBuf;
use std::sync::Arc;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, BufDescList, UblkError, UblkFlags, UblkIORes};

use crate::mirror::ZeroMode;
use crate::{Error, Mirror, Result};

/// The largest request the kernel sends (its max_sectors).
const IO_BUF_BYTES: u32 = 512 << 10;
const QUEUE_DEPTH: u16 = 64;

/// The devices of one served VM, by disk.
pub struct Devices {
    ids: Vec<i32>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The block device of ublk device `id`: `/dev/ublkb<id>`.
pub fn device_path(id: i32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// Why the kernel refused, in words an operator acts on.
fn explain(e: UblkError, what: &str) -> Error {
    let why = match e {
        UblkError::OtherError(code) if code == -libc::ENOENT => {
            "this kernel has no ublk driver: `modprobe ublk_drv` (Linux 6.0 or later, CONFIG_BLK_DEV_UBLK)".to_string()
        }
        UblkError::IOError(ref io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            "permission denied opening /dev/ublk-control (run as root)".to_string()
        }
        other => format!("{other:?}"),
    };
    Error::Invalid(format!("cannot {what}: {why}"))
}

/// Presents every disk of `mirror` as a ublk device, new ones or, where
/// `recover` names a device left by a `tern serve` that died, that one
/// (re-attached: the VM's held I/O goes on). Returns once every device is
/// up; `on_ready(disk, device id)` is called for each.
pub fn serve(mirror: Arc<Mirror>, recover: &[Option<i32>], on_ready: impl Fn(usize, i32)) -> Result<Devices> {
    if !std::path::Path::new("/dev/ublk-control").exists() {
        return Err(explain(UblkError::OtherError(-libc::ENOENT), "present the disks over ublk"));
    }
    let queues = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4) as u16;
    let mut devices = Devices { ids: Vec::new(), threads: Vec::new() };
    for disk in 0..mirror.disk_count() {
        let name = mirror.disk_name(disk).to_string();
        let builder = UblkCtrlBuilder::default()
            .name("tern")
            .nr_queues(queues)
            .depth(QUEUE_DEPTH)
            .io_buf_bytes(IO_BUF_BYTES)
            .ctrl_flags((sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64);
        let recovering = recover.get(disk).copied().flatten();
        // libublk's control ring belongs to the thread that opens it: the
        // device is created, run and stopped on its own thread, which
        // sends back its id once the device is up (or why it is not).
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<i32>>();
        let m = Arc::clone(&mirror);
        let size = mirror.disk_size(disk);
        let thread_name = name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ublk-{name}"))
            .spawn(move || {
                let name = thread_name;
                let ctrl = match open(builder, recovering, &name) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let id = ctrl.dev_info().dev_id as i32;
                let init = move |dev: &mut UblkDev| {
                    dev.set_default_params(size);
                    let p = &mut dev.tgt.params;
                    p.basic.attrs |= sys::UBLK_ATTR_FUA;
                    p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
                    p.discard = sys::ublk_param_discard {
                        discard_granularity: 4096,
                        max_discard_sectors: 1 << 22,
                        max_write_zeroes_sectors: 1 << 22,
                        max_discard_segments: 1,
                        ..Default::default()
                    };
                    Ok(())
                };
                let queue = move |qid: u16, dev: &UblkDev| run_queue(qid, dev, &m, disk);
                let ready = ready_tx.clone();
                let started = move |_: &UblkCtrl| {
                    let _ = ready.send(Ok(id));
                };
                if let Err(e) = ctrl.run_target(init, queue, started) {
                    let _ = ready_tx.send(Err(explain(e, &format!("run /dev/ublkb{id} of disk '{name}'"))));
                }
            })
            .map_err(|e| Error::Invalid(format!("cannot start the ublk thread of disk '{name}': {e}")))?;
        let id = ready_rx
            .recv()
            .map_err(|_| Error::Invalid(format!("the ublk device of disk '{name}' did not start")))??;
        devices.threads.push(thread);
        devices.ids.push(id);
        on_ready(disk, id);
    }
    Ok(devices)
}

/// A new device, or the one a dead `tern serve` left (`recovering`),
/// opened for recovery.
fn open(builder: UblkCtrlBuilder, recovering: Option<i32>, name: &str) -> Result<UblkCtrl> {
    let Some(id) = recovering else {
        return builder
            .id(-1)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|e| explain(e, &format!("add a ublk device for disk '{name}'")));
    };
    let ctrl = builder
        .id(id)
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .build()
        .map_err(|e| explain(e, &format!("find /dev/ublkb{id} of disk '{name}' again")))?;
    match ctrl.start_user_recover() {
        Ok(r) if r >= 0 => Ok(ctrl),
        Ok(r) => Err(explain(UblkError::OtherError(r), &format!("recover /dev/ublkb{id}"))),
        Err(e) => Err(explain(e, &format!("recover /dev/ublkb{id}"))),
    }
}

impl Devices {
    /// The device id of each disk.
    pub fn ids(&self) -> &[i32] {
        &self.ids
    }

    /// Removes the devices (the VM must have let go of them): the kernel
    /// fails what is still queued, the queue threads end.
    pub fn remove(self) {
        for id in &self.ids {
            let removed = UblkCtrl::new_simple(*id).and_then(|c| c.kill_dev().and_then(|_| c.del_dev()));
            if let Err(e) = removed {
                log::warn!(
                    "cannot remove /dev/ublkb{id}: {e:?}; it stays until deleted (ublksrv's `ublk del -n {id}`, or a reboot); the next `tern serve --ublk` makes a new one"
                );
            }
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// One queue's thread: each request carried out on the mirror, in turn.
fn run_queue(qid: u16, dev: &UblkDev, mirror: &Mirror, disk: usize) {
    let mut bufs = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            // libublk waits for every queue before it starts the device: a
            // queue that cannot start would leave it waiting forever.
            log::error!("ublk queue {qid}: {e:?}");
            std::process::exit(1);
        }
    };
    queue.wait_and_handle_io(move |q: &UblkQueue, tag: u16, _| {
        let iod = q.get_iod(tag);
        let (offset, len) = (iod.start_sector << 9, (iod.nr_sectors as u64) << 9);
        let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
        let buf = bufs[tag as usize].as_mut_slice();
        let result = match iod.op_flags & 0xff {
            sys::UBLK_IO_OP_READ => mirror.read(disk, offset, &mut buf[..len as usize]).map(|()| len as i32),
            sys::UBLK_IO_OP_WRITE => mirror.write(disk, offset, &buf[..len as usize], fua).map(|()| len as i32),
            sys::UBLK_IO_OP_FLUSH => mirror.flush(disk).map(|()| 0),
            sys::UBLK_IO_OP_DISCARD => mirror.trim(disk, offset, len, fua).map(|()| 0),
            sys::UBLK_IO_OP_WRITE_ZEROES => {
                let mode = ZeroMode { may_punch: iod.op_flags & sys::UBLK_IO_F_NOUNMAP == 0, fast_only: false };
                mirror.zero(disk, offset, len, mode, fua).map(|()| 0)
            }
            _ => Err(Error::Invalid("unknown ublk operation".into())),
        };
        let res = result.unwrap_or_else(|e| -e.errno());
        let _ =
            q.complete_io_cmd_unified(tag, BufDesc::Slice(bufs[tag as usize].as_slice()), Ok(UblkIORes::Result(res)));
    });
}
