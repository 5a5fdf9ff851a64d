//! Making the ring durable: `sync` writes the published part of the live
//! ring (and then the header with the durable head and tail) to the
//! journal file, so acknowledged FLUSHes survive a host crash (invariant 3
//! of docs/DESIGN.md); `discard_unconsumed` empties the ring after one.

use std::sync::atomic::Ordering;

use super::*;

impl Journal {
    /// Empties the ring after a host crash: zeroes the live ring's data area
    /// (no stale record can look published again), moves the tail to the
    /// head and makes it durable. Returns the position both are at.
    pub fn discard_unconsumed(&self) -> Result<Position> {
        use nix::fcntl::FallocateFlags as F;
        use std::os::fd::AsRawFd;
        let (start, len) = (HEADER_SIZE as i64, self.fields.capacity as i64);
        let fd = self.ring.as_raw_fd();
        let punched = nix::fcntl::fallocate(fd, F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE, start, len);
        let zeroed = match punched {
            // Allocate again, so a store into the mapping never meets a hole.
            Ok(()) => nix::fcntl::fallocate(fd, F::empty(), start, len).map_err(std::io::Error::from),
            Err(_) => {
                let zeroes = vec![0u8; 1 << 20];
                use std::os::unix::fs::FileExt;
                (0..self.fields.capacity).step_by(1 << 20).try_for_each(|off| {
                    let n = (1u64 << 20).min(self.fields.capacity - off) as usize;
                    self.ring.write_all_at(&zeroes[..n], HEADER_SIZE as u64 + off)
                })
            }
        };
        zeroed.map_err(|source| Error::Write {
            path: self.ring_path.clone(),
            offset: HEADER_SIZE as u64,
            len: len as usize,
            source,
        })?;
        // Sequence numbers jump ahead: the durable header may be older than
        // what the shipper already shipped (its tail moves are not synced),
        // so continuing from the saved head could reuse shipped numbers.
        // The jump makes the gap unmistakable: the shipper starts an epoch.
        let word = self.head_word();
        let mut cur = word.load(Ordering::Acquire);
        let jumped = loop {
            let h = Position::unpack(cur);
            let next = Position { pos: h.pos, seq: h.seq + SEQ_JUMP_AFTER_DISCARD };
            let flag = cur & ((OVERFLOW_BIT as u128) << 64);
            match word.compare_exchange(cur, next.pack() | flag, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break next,
                Err(actual) => cur = actual,
            }
        };
        self.tail_word().store(jumped.pack(), Ordering::Release);
        self.sync()?;
        Ok(jumped)
    }

    /// Bytes of the ring the next [`Journal::sync`] writes to the durable
    /// file: records neither consumed nor synced yet.
    pub fn unsynced_bytes(&self) -> u64 {
        let synced = self.synced.lock().unwrap_or_else(|p| p.into_inner()).to;
        self.head().pos.saturating_sub(synced.max(self.tail().pos))
    }

    /// Makes the header and every record published so far durable: the
    /// group commit behind FLUSH and FUA (invariant 3). Writes the records
    /// reserved since the last sync that the consumer has not taken yet
    /// (those it took are already durable in the cache store, invariant
    /// 5), then a snapshot of the header, then `fdatasync`. A shipper that
    /// keeps up leaves almost nothing to write; FLUSHes that find nothing
    /// changed since the last sync (another connection's, just before)
    /// write nothing.
    pub fn sync(&self) -> Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        // Other processes (`tern tag`, an offline resync) sync too; one at a
        // time, so the durable header only moves forward.
        let _lock = FileLock::exclusive(&self.durable, &self.path)?;
        let (tail, head) = self.head_and_tail();
        let to = Position::unpack(head).pos;
        let from = synced.to.max(Position::unpack(tail).pos);
        let header = self.header_snapshot(head, tail);
        if from >= to && header == synced.header {
            return Ok(());
        }
        // Where the published records from `from` end. A slot still being
        // filled may be copied unpublished or half-written now, so the next
        // sync copies it again, and everything after it: its write is
        // acknowledged only after it is published, and a FLUSH that must
        // cover it comes after that. Records published after such a slot
        // are copied now all the same: their writes may be acknowledged.
        // A busy record (published, its producer still writing the image
        // from it) ends it too: its copy carries the busy mark, which must
        // not be what the durable file keeps once it is released.
        let mut published_to = from;
        while published_to < to {
            match self.locate(published_to) {
                Ok(Some((h, _, _))) if !self.is_busy(published_to) => published_to += h.footprint(),
                _ => break,
            }
        }
        let cap = self.fields.capacity;
        let mut pos = from;
        while pos < to {
            let slot = pos % cap;
            let n = (to - pos).min(cap - slot);
            self.write_durable(HEADER_SIZE as u64 + slot, n as usize)?;
            pos += n;
        }
        crate::fail::hit(crate::fail::Failpoint::JournalRecordsWritten)
            .map_err(|source| Error::Sync { path: self.path.clone(), source })?;
        use std::os::unix::fs::FileExt;
        self.durable.write_all_at(&header, 0).map_err(|source| Error::Write {
            path: self.path.clone(),
            offset: 0,
            len: header.len(),
            source,
        })?;
        self.durable.sync_data().map_err(|source| Error::Sync { path: self.path.clone(), source })?;
        *synced = Synced { to: published_to, header };
        Ok(())
    }

    /// The head and tail words as they stood together at one instant. Read
    /// apart, the consumer could move the tail between the two loads and
    /// producers reserve into the space it freed: a tail read first would
    /// then lag the head by more than the capacity (a header
    /// `Journal::open` refuses after a reboot), a tail read last could pass
    /// the head. So the tail is read on both sides of the head, until it
    /// stood still (it only grows, so equal means unchanged).
    pub(super) fn head_and_tail(&self) -> (u128, u128) {
        loop {
            let tail = self.tail_word().load(Ordering::Acquire);
            #[cfg(test)]
            tests_hook::between_tail_and_head();
            let head = self.head_word().load(Ordering::Acquire);
            if self.tail_word().load(Ordering::Acquire) == tail {
                return (tail, head);
            }
        }
    }

    /// Copies `len` bytes of the live ring at file offset `at` to the same
    /// offset of the durable file. Some of them may be slots producers are
    /// still filling: the kernel copies whatever is there (see `sync`).
    pub(super) fn write_durable(&self, at: u64, len: usize) -> Result<()> {
        use std::os::fd::AsRawFd;
        let mut done = 0;
        while done < len {
            // SAFETY: `at + len` lies inside the mapping (the header plus a
            // range of the data area that does not cross the wrap); the
            // mapping lives as long as `self`. The kernel reads the bytes;
            // no Rust reference to memory other threads write is formed.
            let n = unsafe {
                libc::pwrite(
                    self.durable.as_raw_fd(),
                    self.map.as_ptr().add(at as usize + done).cast(),
                    len - done,
                    (at as usize + done) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    return Err(Error::Write {
                        path: self.path.clone(),
                        offset: at + done as u64,
                        len: len - done,
                        source: std::io::ErrorKind::WriteZero.into(),
                    })
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(Error::Write {
                            path: self.path.clone(),
                            offset: at + done as u64,
                            len: len - done,
                            source: e,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The header as it is now, with the given head and tail words, each
    /// field read atomically.
    pub(super) fn header_snapshot(&self, head: u128, tail: u128) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..48].copy_from_slice(&self.fields.encode());
        b[OFF_HEAD..OFF_HEAD + 16].copy_from_slice(&head.to_le_bytes());
        b[OFF_TAIL..OFF_TAIL + 16].copy_from_slice(&tail.to_le_bytes());
        b[OFF_WINDOW..OFF_WINDOW + 4]
            .copy_from_slice(&self.atomic_u32(OFF_WINDOW).load(Ordering::Acquire).to_le_bytes());
        b[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&self.flags().to_le_bytes());
        for off in [OFF_BOOT_ID, OFF_BOOT_ID + 8, OFF_OVERFLOW_SEQ, OFF_RECOVERIES] {
            b[off..off + 8].copy_from_slice(&self.atomic_u64(off).load(Ordering::Acquire).to_le_bytes());
        }
        b
    }
}
