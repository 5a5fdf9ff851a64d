//! The source-image backend: a regular file (or block device) a VM disk lives
//! on, with positional I/O that never silently drops a short read or write.
//!
//! Plain `pread`/`pwrite` from the front-end's worker threads: every request
//! already runs on its own thread and the data sits in the page cache, so an
//! io_uring submission would add a syscall's worth of bookkeeping without
//! saving one. io_uring is used where it pays, in the ublk server.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::{Error, Result};

/// How a range of the image is stored, as `BLOCK_STATUS` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// No storage is allocated: reads return zeroes.
    pub hole: bool,
}

/// One source image.
#[derive(Debug)]
pub struct Image {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
    /// The filesystem refused `RWF_NOWAIT` once: every read may wait.
    no_nowait: AtomicBool,
    /// The filesystem or device refused `FALLOC_FL_PUNCH_HOLE` /
    /// `FALLOC_FL_ZERO_RANGE` as unsupported once: not tried again.
    no_punch: AtomicBool,
    no_zero_range: AtomicBool,
}

impl Image {
    /// Opens an image for reading and writing and learns its size.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| Error::Open { path: path.to_owned(), source })?;
        Self::from_file(file, path)
    }

    /// Opens an image for reading only (offline tools, resync readers).
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Open { path: path.to_owned(), source })?;
        Self::from_file(file, path)
    }

    fn from_file(file: File, path: &Path) -> Result<Self> {
        let open_err = |source| Error::Open { path: path.to_owned(), source };
        let meta = file.metadata().map_err(open_err)?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            // A block device's metadata length is 0; its end is its size.
            nix::unistd::lseek(file.as_raw_fd(), 0, nix::unistd::Whence::SeekEnd)
                .map_err(|e| open_err(io::Error::from(e)))? as u64
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(Error::Invalid(format!("{} is neither a regular file nor a block device", path.display())));
        };
        Ok(Image {
            file,
            path: path.to_owned(),
            size,
            block_device,
            no_nowait: Default::default(),
            no_punch: Default::default(),
            no_zero_range: Default::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Fills `buf` from `offset`. A read that ends early is retried; reaching
    /// the end of the file before `buf` is full is an error, never zeroes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|source| Error::Read {
            path: self.path.clone(),
            offset,
            len: buf.len(),
            source,
        })
    }

    /// Fills `buf` from `offset` if the page cache holds all of it
    /// (`preadv2` with `RWF_NOWAIT`): `Ok(false)` as soon as the rest would
    /// have to wait for the disk, and then `buf` holds nothing usable. Also
    /// `Ok(false)`, always, on a filesystem that cannot tell (no
    /// `RWF_NOWAIT`): every read there may wait. Lets a caller keep reads
    /// that wait on the disk off threads that should never wait.
    pub fn read_at_if_cached(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        if self.no_nowait.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let len = buf.len();
        let error = |source| Error::Read { path: self.path.clone(), offset, len, source };
        let mut done = 0;
        while done < len {
            let rest = &mut buf[done..];
            let iov = libc::iovec { iov_base: rest.as_mut_ptr().cast(), iov_len: rest.len() };
            let at = (offset + done as u64) as libc::off_t;
            // SAFETY: one iovec over `rest`, which is valid for writes of
            // its length and borrowed for the whole call; the descriptor is
            // one `self.file` keeps open.
            let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
            if n > 0 {
                done += n as usize;
                continue;
            }
            // 0 is not proof of the end of the file here: Linux 5.9 and
            // 5.10 return it for uncached pages. The ordinary read that
            // follows reports a real end.
            if n == 0 {
                return Ok(false);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) => return Ok(false),
                Some(libc::EOPNOTSUPP) => {
                    self.no_nowait.store(true, Ordering::Relaxed);
                    return Ok(false);
                }
                _ => return Err(error(e)),
            }
        }
        Ok(true)
    }

    /// Writes all of `buf` at `offset`, retrying short writes.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|source| Error::Write {
            path: self.path.clone(),
            offset,
            len: buf.len(),
            source,
        })
    }

    /// Writes the slices one after another from `offset`, as one write of
    /// their concatenation without building it: one `pwritev` takes up to
    /// 1,024 of them. Short writes are retried from where they stopped.
    pub fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> Result<()> {
        const IOV_MAX: usize = 1024;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let error = |source: io::Error| Error::Write { path: self.path.clone(), offset, len: total, source };
        // The first slice not yet written whole, and how much of it is.
        let (mut first, mut skip) = (0, 0);
        let mut done = 0u64;
        loop {
            while first < bufs.len() && skip == bufs[first].len() {
                first += 1;
                skip = 0;
            }
            if first == bufs.len() {
                return Ok(());
            }
            let iov: Vec<io::IoSlice> = std::iter::once(&bufs[first][skip..])
                .chain(bufs[first + 1..].iter().copied())
                .take(IOV_MAX)
                .map(io::IoSlice::new)
                .collect();
            let at = offset + done;
            let n = match nix::sys::uio::pwritev(&self.file, &iov, at as libc::off_t) {
                Ok(0) => return Err(error(io::Error::from(ErrorKind::WriteZero))),
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(error(e.into())),
            };
            done += n as u64;
            (first, skip) = advance(bufs, first, skip, n);
        }
    }

    /// Starts writing back the dirty pages of `len` bytes at `offset`
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): it does not wait for
    /// them to complete (it may block while submitting them), so the disk
    /// gets to work while the caller prepares more, and a later
    /// [`Image::sync_data`], which durability still needs, has less left to
    /// wait for. A write error of that writeback is reported by that sync.
    pub fn start_writeback(&self, offset: u64, len: u64) -> Result<()> {
        // SAFETY: a system call on a descriptor `self.file` keeps open; no
        // memory is passed.
        let rc = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE)
        };
        if rc != 0 {
            return Err(Error::Writeback { path: self.path.clone(), source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn sync_data(&self) -> Result<()> {
        self.file.sync_data().map_err(|source| Error::Sync { path: self.path.clone(), source })
    }

    /// Deallocates a range (TRIM): afterwards it reads as zeroes.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.zero(offset, len, true, false)
    }

    /// Makes a range read as zeroes. `may_punch` allows deallocating it;
    /// `fast_only` refuses (with [`Error::SlowZero`]) rather than falling back
    /// to writing zero bytes.
    pub fn zero(&self, offset: u64, len: u64, may_punch: bool, fast_only: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        for attempt in self.zero_attempts(may_punch, fast_only) {
            match nix::fcntl::fallocate(self.file.as_raw_fd(), attempt.flags(), offset as i64, len as i64) {
                Ok(()) => return Ok(()),
                // The filesystem or device cannot do this at all: remembered.
                Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENODEV) => {
                    self.unsupported(attempt).store(true, Ordering::Relaxed)
                }
                // A block device refuses unaligned ranges: try the next.
                Err(nix::errno::Errno::EINVAL) => continue,
                Err(e) => {
                    return Err(Error::Fallocate {
                        path: self.path.clone(),
                        what: attempt.name(),
                        offset,
                        len,
                        source: e.into(),
                    })
                }
            }
        }
        if fast_only {
            return Err(Error::SlowZero { path: self.path.clone(), offset, len });
        }
        self.write_zeroes(offset, len)
    }

    /// Whether a fast-only zeroing is sure to be refused, before anything
    /// is tried: no way of zeroing fast is left to try. (The mirror
    /// refuses such a request before it journals it: the client is told
    /// nothing changed, so nothing may be recorded as changed.)
    pub fn fast_zero_refused(&self, may_punch: bool) -> bool {
        self.zero_attempts(may_punch, true).is_empty()
    }

    /// The ways of zeroing a range to try, in order, without those known
    /// unsupported. On a block device ZERO_RANGE may fall back to writing
    /// zeroes in the kernel: not fast, so a fast-only request may only
    /// punch.
    fn zero_attempts(&self, may_punch: bool, fast_only: bool) -> Vec<ZeroAttempt> {
        let candidates: &[ZeroAttempt] = match (may_punch, fast_only && self.block_device) {
            (true, true) => &[ZeroAttempt::Punch],
            (false, true) => &[],
            (true, false) => &[ZeroAttempt::Punch, ZeroAttempt::ZeroRange],
            (false, false) => &[ZeroAttempt::ZeroRange],
        };
        candidates.iter().copied().filter(|&a| !self.unsupported(a).load(Ordering::Relaxed)).collect()
    }

    fn unsupported(&self, attempt: ZeroAttempt) -> &AtomicBool {
        match attempt {
            ZeroAttempt::Punch => &self.no_punch,
            ZeroAttempt::ZeroRange => &self.no_zero_range,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            self.write_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Hints the kernel to read a range into the page cache (NBD `CACHE`).
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        nix::fcntl::posix_fadvise(
            self.file.as_raw_fd(),
            offset as i64,
            len as i64,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )
        .map_err(|e| Error::Read { path: self.path.clone(), offset, len: len as usize, source: e.into() })
    }

    /// Allocation status of `[offset, offset + len)`, from `SEEK_DATA` and
    /// `SEEK_HOLE`: a list of extents covering the range exactly. A
    /// filesystem that cannot tell reports everything as data, which is
    /// always truthful.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let push = |out: &mut Vec<Extent>, len: u64, hole: bool| {
            if len == 0 {
                return;
            }
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += len,
                _ => out.push(Extent { len, hole }),
            }
        };
        if self.block_device {
            push(&mut out, end.saturating_sub(offset), false);
            return Ok(out);
        }
        while pos < end {
            let data = match self.seek(pos, nix::unistd::Whence::SeekData) {
                Ok(Some(d)) => d.min(end),
                Ok(None) => end, // no data after pos: a hole to the end
                Err(e) if e.kind() == ErrorKind::Unsupported || e.raw_os_error() == Some(libc::EINVAL) => {
                    push(&mut out, end - pos, false);
                    break;
                }
                Err(source) => return Err(Error::Read { path: self.path.clone(), offset: pos, len: 0, source }),
            };
            push(&mut out, data - pos, true);
            if data >= end {
                break;
            }
            let hole = match self.seek(data, nix::unistd::Whence::SeekHole) {
                Ok(Some(h)) => h.min(end),
                Ok(None) => end,
                Err(source) => return Err(Error::Read { path: self.path.clone(), offset: data, len: 0, source }),
            };
            push(&mut out, hole - data, false);
            pos = hole;
        }
        Ok(out)
    }

    /// The allocated (data) ranges of the whole image, as `(offset, len)`.
    pub fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let mut pos = 0;
        let mut out = Vec::new();
        for e in self.extents(0, self.size)? {
            if !e.hole {
                out.push((pos, e.len));
            }
            pos += e.len;
        }
        Ok(out)
    }

    /// `lseek` with `SEEK_DATA`/`SEEK_HOLE`; `None` when there is none
    /// (ENXIO). The file position it moves is never used: all I/O is
    /// positional.
    fn seek(&self, pos: u64, whence: nix::unistd::Whence) -> io::Result<Option<u64>> {
        match nix::unistd::lseek(self.file.as_raw_fd(), pos as i64, whence) {
            Ok(p) => Ok(Some(p as u64)),
            Err(nix::errno::Errno::ENXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Where a vectored write stands after `n` more bytes went out: it stood
/// at byte `skip` of slice `first`; returns the same for after. A short
/// write that stops inside a slice resumes there, never at a slice's start.
fn advance(bufs: &[&[u8]], mut first: usize, mut skip: usize, mut n: usize) -> (usize, usize) {
    while n > 0 {
        let left = bufs[first].len() - skip;
        if n < left {
            return (first, skip + n);
        }
        n -= left;
        first += 1;
        skip = 0;
    }
    (first, skip)
}

/// A way of zeroing a range without writing zero bytes.
#[derive(Debug, Clone, Copy)]
enum ZeroAttempt {
    Punch,
    ZeroRange,
}

impl ZeroAttempt {
    fn flags(self) -> nix::fcntl::FallocateFlags {
        use nix::fcntl::FallocateFlags as F;
        match self {
            ZeroAttempt::Punch => F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
            ZeroAttempt::ZeroRange => F::FALLOC_FL_ZERO_RANGE | F::FALLOC_FL_KEEP_SIZE,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ZeroAttempt::Punch => "punch hole",
            ZeroAttempt::ZeroRange => "zero range",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_with(len: u64) -> (tempfile::TempDir, Image) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(len).unwrap();
        drop(f);
        let img = Image::open(&path).unwrap();
        (dir, img)
    }

    #[test]
    fn write_then_read_round_trips() {
        let (_d, img) = image_with(1 << 20);
        img.write_at(b"hello", 4093).unwrap();
        let mut buf = [0u8; 5];
        img.read_at(&mut buf, 4093).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn a_read_if_cached_answers_from_the_page_cache_and_declines_what_is_not() {
        // On a disk filesystem (tmpfs keeps every page in memory).
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("disk.img");
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let img = Image::open(&path).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        assert!(img.read_at_if_cached(&mut buf, 4093).unwrap(), "just written, so cached");
        assert!(buf[..] == data[4093..4093 + buf.len()], "the cached read returned other bytes");
        // Written back and dropped from the page cache: every read waits.
        img.sync_data().unwrap();
        // SAFETY: advice on a descriptor `img` keeps open; no memory is involved.
        let rc = unsafe { libc::posix_fadvise(img.file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        assert!(
            !img.read_at_if_cached(&mut buf, 512 << 10).unwrap(),
            "dropped from the cache, yet read without waiting"
        );
        img.read_at(&mut buf, 512 << 10).unwrap();
        assert!(buf[..] == data[512 << 10..(512 << 10) + buf.len()]);
    }

    #[test]
    fn a_vectored_write_lands_as_its_slices_concatenated() {
        let (_d, img) = image_with(8 << 20);
        // More slices than one pwritev takes, some empty, of odd sizes.
        let data: Vec<Vec<u8>> = (0..2500u32).map(|i| vec![(i % 251) as u8; (i % 7 * 301) as usize]).collect();
        let slices: Vec<&[u8]> = data.iter().map(|v| v.as_slice()).collect();
        img.write_vectored_at(&slices, 12345).unwrap();
        let expect = data.concat();
        let mut back = vec![0u8; expect.len()];
        img.read_at(&mut back, 12345).unwrap();
        assert!(back == expect);
        img.write_vectored_at(&[], 0).unwrap();
        img.write_vectored_at(&[&[], &[]], 0).unwrap();
    }

    #[test]
    fn a_short_vectored_write_resumes_at_the_first_byte_not_written() {
        let bufs: [&[u8]; 4] = [b"abc", b"", b"defg", b"h"];
        // Every split of the 8 bytes into a short write and the rest:
        // resuming where `advance` says gives back exactly the bytes left.
        for n in 0..=8 {
            let (first, skip) = advance(&bufs, 0, 0, n);
            let mut rest = bufs.get(first).map_or(Vec::new(), |b| b[skip..].to_vec());
            for b in bufs.iter().skip(first + 1) {
                rest.extend_from_slice(b);
            }
            assert_eq!(rest, b"abcdefgh"[n..], "after {n} bytes");
        }
        // From the middle of a slice, across the empty one.
        assert_eq!(advance(&bufs, 0, 1, 3), (2, 1));
        assert_eq!(advance(&bufs, 2, 3, 1), (3, 0));
    }

    #[test]
    fn writeback_started_early_changes_nothing_but_timing() {
        let (_d, img) = image_with(4 << 20);
        let data: Vec<u8> = (0..2 << 20).map(|i| (i % 253) as u8).collect();
        img.write_at(&data, 1 << 20).unwrap();
        img.start_writeback(1 << 20, 2 << 20).unwrap();
        img.sync_data().unwrap();
        let mut back = vec![0u8; data.len()];
        img.read_at(&mut back, 1 << 20).unwrap();
        assert!(back == data);
    }

    #[test]
    fn read_past_end_is_an_error_not_zeroes() {
        let (_d, img) = image_with(4096);
        let mut buf = [0u8; 10];
        let err = img.read_at(&mut buf, 4090).unwrap_err();
        assert!(err.to_string().contains("offset 4090"), "{err}");
    }

    #[test]
    fn extents_cover_the_range_and_find_data() {
        let (_d, img) = image_with(1 << 20);
        img.write_at(&[1u8; 4096], 65536).unwrap();
        let ex = img.extents(0, 1 << 20).unwrap();
        assert_eq!(ex.iter().map(|e| e.len).sum::<u64>(), 1 << 20);
        let data = img.data_ranges().unwrap();
        assert!(data.iter().any(|&(o, l)| o <= 65536 && o + l >= 65536 + 4096), "{data:?}");
    }

    #[test]
    fn punch_hole_reads_back_zeroes() {
        let (_d, img) = image_with(1 << 20);
        img.write_at(&[7u8; 8192], 0).unwrap();
        img.punch_hole(100, 5000).unwrap();
        let mut buf = vec![0u8; 8192];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 7));
        assert!(buf[100..5100].iter().all(|&b| b == 0));
        assert!(buf[5100..].iter().all(|&b| b == 7));
    }
}
