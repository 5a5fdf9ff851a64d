//! The durability model: what every file and directory holds now, what was
//! made durable, and what a power cut may leave. Nothing here knows FUSE, so the
//! rules tern's fsync-before-publish orderings are checked against are unit
//! tested on their own.
//!
//! The rules are strict POSIX, the weakest a real filesystem may be:
//! - a file's content and size are durable only up to its last `fsync` or
//!   `fdatasync`; that never makes its *name* durable;
//! - a directory's entries are durable only up to its last `fsync`; a rename
//!   between two directories is an unlink logged in one and a link logged in
//!   the other, each made durable by its own directory's fsync; a rename inside
//!   one directory is one atomic op;
//! - every state is the durable state plus the pending ops replayed in order,
//!   so a power cut only has to choose which pending ops survive.
//!
//! After a cut, what is no longer reachable from the root is freed. A file
//! whose move between directories half-survived may show up under both names,
//! as a hard link; a directory in that case keeps only the link found first
//! (breadth-first from the root, in name order), since it has one parent.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use fuser::{FileAttr, FileType, INodeNo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::content::{Content, FileOp, BLOCK};

pub const ROOT: u64 = 1;
const NAME_MAX: usize = 255;

/// A filesystem error as the errno the kernel passes on.
pub type FsResult<T> = Result<T, i32>;

/// An enum the control socket spells with one word per variant.
macro_rules! word_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $word:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($(#[$vmeta])* $variant,)+ }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($word => Ok($name::$variant),)+
                    _ => Err(format!("unknown {} {s:?} ({})", stringify!($name), [$($word),+].join(", "))),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $($name::$variant => $word,)+ })
            }
        }
    };
}

word_enum! {
    /// How a power cut treats what was not made durable.
    CutMode {
        /// Only the durable state survives.
        Drop = "drop",
        /// Per file a prefix of its pending ops, the next write possibly torn;
        /// per directory a prefix of its pending ops.
        Prefix = "prefix",
        /// Per file any subset of its pending ops in their order, writes
        /// possibly torn (a disk cache that reorders); directories as in `Prefix`.
        Subset = "subset",
    }
}

word_enum! {
    /// The operations a `fail` rule can target.
    FaultOp {
        Write = "write",
        /// `fsync`/`fdatasync` of a file and `fsync` of a directory.
        Fsync = "fsync",
        /// Any new name: create, mknod, mkdir, symlink, link.
        Create = "create",
        Rename = "rename",
        Fallocate = "fallocate",
    }
}

#[derive(Clone, Debug)]
struct Fault {
    op: FaultOp,
    errno: i32,
    path_substring: String,
    remaining: u64,
}

/// What a power cut did; ops are counted once each (kept, dropped or torn).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CutStats {
    pub files_with_pending: u64,
    pub file_ops_kept: u64,
    pub file_ops_dropped: u64,
    pub writes_torn: u64,
    pub dir_ops_kept: u64,
    pub dir_ops_dropped: u64,
    pub inodes_freed: u64,
}

/// Pending (not yet durable) work of one file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PendingFile {
    pub path: String,
    pub ops: u64,
    pub writes: u64,
    pub bytes: u64,
}

/// What would be lost to a `drop` cut right now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub used_bytes: u64,
    pub pending_file_ops: u64,
    pub pending_writes: u64,
    pub pending_bytes: u64,
    pub pending_dir_ops: u64,
    /// Files with pending ops, by path.
    pub pending: Vec<PendingFile>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum DirOp {
    Link {
        name: OsString,
        ino: u64,
    },
    Unlink {
        name: OsString,
    },
    /// Inside one directory, replacing `to` if it exists: atomic.
    Rename {
        from: OsString,
        to: OsString,
    },
}

fn apply_dir_op(entries: &mut BTreeMap<OsString, u64>, op: &DirOp) {
    match op {
        DirOp::Link { name, ino } => {
            entries.insert(name.clone(), *ino);
        }
        DirOp::Unlink { name } => {
            entries.remove(name);
        }
        DirOp::Rename { from, to } => {
            if let Some(ino) = entries.remove(from) {
                entries.insert(to.clone(), ino);
            }
        }
    }
}

#[derive(Debug, Default)]
struct FileNode {
    durable: Content,
    pending: Vec<FileOp>,
    /// `durable` with `pending` replayed, kept so reads are fast.
    current: Content,
}

#[derive(Debug, Default)]
struct DirNode {
    durable: BTreeMap<OsString, u64>,
    pending: Vec<DirOp>,
    current: BTreeMap<OsString, u64>,
}

#[derive(Debug)]
enum Body {
    File(FileNode),
    Dir(DirNode),
    /// The target never changes once created.
    Symlink(OsString),
    /// fifo, socket or device node: only its name matters.
    Special(FileType),
}

/// What kind of node [`Model::make_node`] creates.
#[derive(Clone, Debug)]
pub enum NewNode {
    File,
    Dir,
    Symlink(OsString),
    Special(FileType, u32),
}

#[derive(Debug)]
struct Inode {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    rdev: u32,
    nlink: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    /// The directory and name it was last linked under, for paths.
    parent: u64,
    name: OsString,
    /// Lookups the kernel holds (entry replies minus forgets) and open handles:
    /// such an inode is kept even when no name reaches it.
    kernel_refs: u64,
}

impl Inode {
    fn new(body: Body, perm: u16, uid: u32, gid: u32) -> Inode {
        let now = SystemTime::now();
        let nlink = if matches!(body, Body::Dir(_)) { 1 } else { 0 };
        Inode {
            body,
            perm,
            uid,
            gid,
            rdev: 0,
            nlink,
            atime: now,
            mtime: now,
            ctime: now,
            parent: ROOT,
            name: OsString::new(),
            kernel_refs: 0,
        }
    }

    fn kind(&self) -> FileType {
        match &self.body {
            Body::File(_) => FileType::RegularFile,
            Body::Dir(_) => FileType::Directory,
            Body::Symlink(_) => FileType::Symlink,
            Body::Special(kind) => *kind,
        }
    }
}

/// The whole filesystem, in memory.
#[derive(Debug)]
pub struct Model {
    inodes: BTreeMap<u64, Inode>,
    next_ino: u64,
    faults: Vec<Fault>,
    capacity: Option<u64>,
    used_blocks: u64,
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

impl Model {
    pub fn new() -> Model {
        let mut root = Inode::new(Body::Dir(DirNode::default()), 0o755, 0, 0);
        root.nlink = 2;
        Model {
            inodes: BTreeMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            faults: Vec::new(),
            capacity: None,
            used_blocks: 0,
        }
    }

    fn node(&self, ino: u64) -> FsResult<&Inode> {
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> FsResult<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: u64) -> FsResult<&DirNode> {
        match &self.node(ino)?.body {
            Body::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn file(&self, ino: u64) -> FsResult<&FileNode> {
        match &self.node(ino)?.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(libc::EISDIR),
            _ => Err(libc::EINVAL),
        }
    }

    /// The inode's path from the mount's root ("/a/b"), by its last name.
    pub fn path(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT && parts.len() < 256 {
            let Some(node) = self.inodes.get(&cur) else { break };
            parts.push(node.name.to_string_lossy().into_owned());
            cur = node.parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    fn child_path(&self, parent: u64, name: &OsStr) -> String {
        let base = self.path(parent);
        format!("{}/{}", base.trim_end_matches('/'), name.to_string_lossy())
    }

    pub fn attr(&self, ino: u64) -> FsResult<FileAttr> {
        let node = self.node(ino)?;
        let (size, blocks) = match &node.body {
            Body::File(f) => (f.current.size(), f.current.allocated_blocks() * (BLOCK / 512)),
            Body::Dir(d) => (BLOCK * (1 + d.current.len() as u64 / 64), BLOCK / 512),
            Body::Symlink(target) => (target.len() as u64, 0),
            Body::Special(_) => (0, 0),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: node.atime,
            mtime: node.mtime,
            ctime: node.ctime,
            crtime: node.ctime,
            kind: node.kind(),
            perm: node.perm,
            nlink: node.nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: node.rdev,
            blksize: BLOCK as u32,
            flags: 0,
        })
    }

    /// The kernel now holds one more reference to `ino` (an entry reply or an open).
    pub fn hold(&mut self, ino: u64) {
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.kernel_refs += 1;
        }
    }

    /// The kernel dropped `n` references (forget, release).
    pub fn let_go(&mut self, ino: u64, n: u64) {
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.kernel_refs = node.kernel_refs.saturating_sub(n);
        }
    }

    /// After an unmount the kernel holds nothing.
    pub fn unmounted(&mut self) {
        for node in self.inodes.values_mut() {
            node.kernel_refs = 0;
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<u64> {
        self.dir(parent)?.current.get(name).copied().ok_or(libc::ENOENT)
    }

    pub fn readdir(&self, ino: u64) -> FsResult<Vec<(u64, FileType, OsString)>> {
        let dir = self.dir(ino)?;
        let parent = self.node(ino)?.parent;
        let mut out = vec![(ino, FileType::Directory, ".".into()), (parent, FileType::Directory, "..".into())];
        for (name, &child) in &dir.current {
            let kind = self.inodes.get(&child).map_or(FileType::RegularFile, Inode::kind);
            out.push((child, kind, name.clone()));
        }
        Ok(out)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<OsString> {
        match &self.node(ino)?.body {
            Body::Symlink(target) => Ok(target.clone()),
            _ => Err(libc::EINVAL),
        }
    }

    fn check_fault(&mut self, op: FaultOp, paths: &[String]) -> FsResult<()> {
        for fault in &mut self.faults {
            if fault.op == op && fault.remaining > 0 && paths.iter().any(|p| p.contains(fault.path_substring.as_str()))
            {
                fault.remaining -= 1;
                log::info!("injected {op} failure (errno {}) on {}", fault.errno, paths.join(" -> "));
                return Err(fault.errno);
            }
        }
        self.faults.retain(|f| f.remaining > 0);
        Ok(())
    }

    fn fault_on_node(&mut self, op: FaultOp, ino: u64) -> FsResult<()> {
        if self.faults.is_empty() {
            return Ok(());
        }
        let path = self.path(ino);
        self.check_fault(op, &[path])
    }

    pub fn add_fault(&mut self, op: FaultOp, errno: i32, path_substring: &str, count: u64) {
        self.faults.push(Fault { op, errno, path_substring: path_substring.to_owned(), remaining: count });
    }

    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    pub fn set_capacity(&mut self, bytes: Option<u64>) {
        self.capacity = bytes;
    }

    /// (capacity in bytes, bytes in use) for statfs.
    pub fn space(&self) -> (Option<u64>, u64) {
        (self.capacity, self.used_blocks * BLOCK)
    }

    pub fn inode_count(&self) -> u64 {
        self.inodes.len() as u64
    }

    fn check_name(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        if self.dir(parent)?.current.contains_key(name) {
            return Err(libc::EEXIST);
        }
        Ok(())
    }

    /// Logs `op` in `dir`'s pending list and applies it to its current entries.
    fn log(&mut self, dir: u64, op: DirOp) -> FsResult<()> {
        let node = self.node_mut(dir)?;
        let Body::Dir(d) = &mut node.body else { return Err(libc::ENOTDIR) };
        apply_dir_op(&mut d.current, &op);
        d.pending.push(op);
        let now = SystemTime::now();
        node.mtime = now;
        node.ctime = now;
        Ok(())
    }

    /// Link counts and path after `ino` got the name `name` in `parent`.
    fn linked(&mut self, parent: u64, name: &OsStr, ino: u64) {
        let mut is_dir = false;
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.nlink += 1;
            node.parent = parent;
            node.name = name.to_owned();
            node.ctime = SystemTime::now();
            is_dir = matches!(node.body, Body::Dir(_));
        }
        if is_dir {
            if let Some(p) = self.inodes.get_mut(&parent) {
                p.nlink += 1;
            }
        }
    }

    /// Link counts after `ino` lost a name in `parent`.
    fn unlinked(&mut self, parent: u64, ino: u64) {
        let mut is_dir = false;
        if let Some(node) = self.inodes.get_mut(&ino) {
            is_dir = matches!(node.body, Body::Dir(_));
            node.nlink = if is_dir { 0 } else { node.nlink.saturating_sub(1) };
            node.ctime = SystemTime::now();
        }
        if is_dir {
            if let Some(p) = self.inodes.get_mut(&parent) {
                p.nlink = p.nlink.saturating_sub(1);
            }
        }
    }

    /// create, mknod, mkdir, symlink.
    pub fn make_node(
        &mut self,
        parent: u64,
        name: &OsStr,
        kind: NewNode,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> FsResult<u64> {
        self.check_name(parent, name)?;
        let (body, rdev) = match kind {
            NewNode::File => (Body::File(FileNode::default()), 0),
            NewNode::Dir => (Body::Dir(DirNode::default()), 0),
            NewNode::Symlink(target) => (Body::Symlink(target), 0),
            NewNode::Special(kind, rdev) => (Body::Special(kind), rdev),
        };
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut node = Inode::new(body, perm, uid, gid);
        node.rdev = rdev;
        self.inodes.insert(ino, node);
        if let Err(e) = self.add_name(parent, name, ino) {
            self.inodes.remove(&ino);
            return Err(e);
        }
        Ok(ino)
    }

    pub fn link(&mut self, ino: u64, parent: u64, name: &OsStr) -> FsResult<()> {
        if matches!(self.node(ino)?.body, Body::Dir(_)) {
            return Err(libc::EPERM);
        }
        self.check_name(parent, name)?;
        self.add_name(parent, name, ino)
    }

    /// Links `ino` as `name` in `parent`, unless a `create` fault fires.
    fn add_name(&mut self, parent: u64, name: &OsStr, ino: u64) -> FsResult<()> {
        if !self.faults.is_empty() {
            let path = self.child_path(parent, name);
            self.check_fault(FaultOp::Create, &[path])?;
        }
        self.log(parent, DirOp::Link { name: name.to_owned(), ino })?;
        self.linked(parent, name, ino);
        Ok(())
    }

    /// unlink (`dir` false) and rmdir (`dir` true).
    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> FsResult<()> {
        let ino = self.lookup(parent, name)?;
        match (&self.node(ino)?.body, dir) {
            (Body::Dir(d), true) if !d.current.is_empty() => return Err(libc::ENOTEMPTY),
            (Body::Dir(_), true) => {}
            (Body::Dir(_), false) => return Err(libc::EISDIR),
            (_, true) => return Err(libc::ENOTDIR),
            (_, false) => {}
        }
        self.log(parent, DirOp::Unlink { name: name.to_owned() })?;
        self.unlinked(parent, ino);
        Ok(())
    }

    /// Whether `ino` is `dir` or one of its ancestors.
    fn is_ancestor(&self, ino: u64, mut dir: u64) -> bool {
        for _ in 0..4096 {
            if dir == ino {
                return true;
            }
            if dir == ROOT {
                return false;
            }
            match self.inodes.get(&dir) {
                Some(node) => dir = node.parent,
                None => return false,
            }
        }
        true
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        noreplace: bool,
    ) -> FsResult<()> {
        let ino = self.lookup(parent, name)?;
        self.dir(new_parent)?;
        if new_name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        if !self.faults.is_empty() {
            let paths = [self.child_path(parent, name), self.child_path(new_parent, new_name)];
            self.check_fault(FaultOp::Rename, &paths)?;
        }
        let moving_dir = matches!(self.node(ino)?.body, Body::Dir(_));
        let replaced = self.dir(new_parent)?.current.get(new_name).copied();
        if let Some(old) = replaced {
            if old == ino {
                return Ok(());
            }
            if noreplace {
                return Err(libc::EEXIST);
            }
            match (&self.node(old)?.body, moving_dir) {
                (Body::Dir(d), true) if !d.current.is_empty() => return Err(libc::ENOTEMPTY),
                (Body::Dir(_), true) => {}
                (Body::Dir(_), false) => return Err(libc::EISDIR),
                (_, true) => return Err(libc::ENOTDIR),
                (_, false) => {}
            }
        }
        if moving_dir && self.is_ancestor(ino, new_parent) {
            return Err(libc::EINVAL);
        }
        if parent == new_parent {
            self.log(parent, DirOp::Rename { from: name.to_owned(), to: new_name.to_owned() })?;
        } else {
            self.log(parent, DirOp::Unlink { name: name.to_owned() })?;
            self.log(new_parent, DirOp::Link { name: new_name.to_owned(), ino })?;
        }
        if let Some(old) = replaced {
            self.unlinked(new_parent, old);
        }
        if moving_dir && parent != new_parent {
            for (dir, up) in [(parent, false), (new_parent, true)] {
                if let Some(node) = self.inodes.get_mut(&dir) {
                    node.nlink = if up { node.nlink + 1 } else { node.nlink.saturating_sub(1) };
                }
            }
        }
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.parent = new_parent;
            node.name = new_name.to_owned();
            node.ctime = SystemTime::now();
        }
        Ok(())
    }

    pub fn setattr(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> FsResult<()> {
        let node = self.node_mut(ino)?;
        if let Some(mode) = mode {
            node.perm = (mode & 0o7777) as u16;
        }
        node.uid = uid.unwrap_or(node.uid);
        node.gid = gid.unwrap_or(node.gid);
        node.atime = atime.unwrap_or(node.atime);
        node.mtime = mtime.unwrap_or(node.mtime);
        node.ctime = SystemTime::now();
        Ok(())
    }

    pub fn read(&self, ino: u64, off: u64, len: u64) -> FsResult<Vec<u8>> {
        Ok(self.file(ino)?.current.read(off, len))
    }

    /// Applies `op` to the file's current state and logs it as pending.
    fn file_op(&mut self, ino: u64, op: FileOp) -> FsResult<()> {
        let needed = self.file(ino)?.current.blocks_needed(&op);
        if let Some(capacity) = self.capacity {
            if needed > 0 && (self.used_blocks + needed) * BLOCK > capacity {
                return Err(libc::ENOSPC);
            }
        }
        let node = self.node_mut(ino)?;
        let Body::File(f) = &mut node.body else { return Err(libc::EINVAL) };
        let before = f.current.allocated_blocks();
        f.current.apply(&op);
        let after = f.current.allocated_blocks();
        f.pending.push(op);
        let now = SystemTime::now();
        node.mtime = now;
        node.ctime = now;
        self.used_blocks = self.used_blocks + after - before;
        Ok(())
    }

    pub fn write(&mut self, ino: u64, off: u64, data: &[u8]) -> FsResult<()> {
        self.file(ino)?;
        self.fault_on_node(FaultOp::Write, ino)?;
        self.file_op(ino, FileOp::Write { off, data: data.to_vec() })
    }

    pub fn set_len(&mut self, ino: u64, len: u64) -> FsResult<()> {
        self.file_op(ino, FileOp::SetLen { len })
    }

    /// fallocate modes 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE(|KEEP_SIZE).
    pub fn fallocate(&mut self, ino: u64, off: u64, len: u64, mode: i32) -> FsResult<()> {
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        let op = match mode {
            0 | KEEP => FileOp::Allocate { off, len, keep_size: mode == KEEP },
            m if m == libc::FALLOC_FL_PUNCH_HOLE | KEEP => FileOp::Punch { off, len },
            m if m == libc::FALLOC_FL_PUNCH_HOLE => return Err(libc::EINVAL),
            m if m & !KEEP == libc::FALLOC_FL_ZERO_RANGE => FileOp::ZeroRange { off, len, keep_size: m & KEEP != 0 },
            _ => return Err(libc::EOPNOTSUPP),
        };
        self.file(ino)?;
        self.fault_on_node(FaultOp::Fallocate, ino)?;
        self.file_op(ino, op)
    }

    /// `SEEK_DATA` / `SEEK_HOLE`.
    pub fn seek(&self, ino: u64, off: u64, whence: i32) -> FsResult<u64> {
        let content = &self.file(ino)?.current;
        let found = match whence {
            libc::SEEK_DATA => content.seek_data(off),
            libc::SEEK_HOLE => content.seek_hole(off),
            _ => return Err(libc::EINVAL),
        };
        found.ok_or(libc::ENXIO)
    }

    /// fsync/fdatasync of a file, fsync of a directory: what is current becomes durable.
    pub fn fsync(&mut self, ino: u64) -> FsResult<()> {
        self.node(ino)?;
        self.fault_on_node(FaultOp::Fsync, ino)?;
        match &mut self.node_mut(ino)?.body {
            Body::File(f) => {
                for op in f.pending.drain(..) {
                    f.durable.apply(&op);
                }
            }
            Body::Dir(d) => {
                for op in d.pending.drain(..) {
                    apply_dir_op(&mut d.durable, &op);
                }
            }
            Body::Symlink(_) | Body::Special(_) => {}
        }
        Ok(())
    }

    /// Everything current becomes durable (the kernel's writeback finished),
    /// then what no name, log or kernel reference reaches is freed.
    pub fn sync(&mut self) {
        for node in self.inodes.values_mut() {
            match &mut node.body {
                Body::File(f) => {
                    f.pending.clear();
                    f.durable = f.current.clone();
                }
                Body::Dir(d) => {
                    d.pending.clear();
                    d.durable = d.current.clone();
                }
                Body::Symlink(_) | Body::Special(_) => {}
            }
        }
        let mut live = BTreeSet::new();
        let mut todo: Vec<u64> =
            self.inodes.iter().filter(|(&ino, n)| ino == ROOT || n.kernel_refs > 0).map(|(&ino, _)| ino).collect();
        while let Some(ino) = todo.pop() {
            if !live.insert(ino) {
                continue;
            }
            if let Some(Inode { body: Body::Dir(d), .. }) = self.inodes.get(&ino) {
                todo.extend(d.current.values().copied());
            }
        }
        self.free_all_but(&live);
    }

    fn free_all_but(&mut self, live: &BTreeSet<u64>) -> u64 {
        let before = self.inodes.len();
        self.inodes.retain(|ino, _| live.contains(ino));
        self.used_blocks = self
            .inodes
            .values()
            .map(|n| if let Body::File(f) = &n.body { f.current.allocated_blocks() } else { 0 })
            .sum();
        (before - self.inodes.len()) as u64
    }

    pub fn stats(&self) -> Stats {
        let mut stats = Stats { used_bytes: self.used_blocks * BLOCK, ..Stats::default() };
        for (&ino, node) in &self.inodes {
            match &node.body {
                Body::File(f) => {
                    stats.files += 1;
                    if f.pending.is_empty() {
                        continue;
                    }
                    let mut p = PendingFile { path: self.path(ino), ops: f.pending.len() as u64, ..Default::default() };
                    for op in &f.pending {
                        if let FileOp::Write { data, .. } = op {
                            p.writes += 1;
                            p.bytes += data.len() as u64;
                        }
                    }
                    stats.pending_file_ops += p.ops;
                    stats.pending_writes += p.writes;
                    stats.pending_bytes += p.bytes;
                    stats.pending.push(p);
                }
                Body::Dir(d) => {
                    stats.dirs += 1;
                    stats.pending_dir_ops += d.pending.len() as u64;
                }
                Body::Symlink(_) | Body::Special(_) => {}
            }
        }
        stats
    }

    /// Replaces every file and directory by what a power cut could leave,
    /// chosen by `seed`; afterwards that is both durable and current.
    pub fn powercut(&mut self, seed: u64, mode: CutMode) -> CutStats {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut stats = CutStats::default();
        for node in self.inodes.values_mut() {
            node.kernel_refs = 0;
            match &mut node.body {
                Body::File(f) => {
                    let ops = std::mem::take(&mut f.pending);
                    stats.files_with_pending += u64::from(!ops.is_empty());
                    cut_file(&mut f.durable, &ops, mode, &mut rng, &mut stats);
                    f.current = f.durable.clone();
                }
                Body::Dir(d) => {
                    let ops = std::mem::take(&mut d.pending);
                    let keep = if mode == CutMode::Drop { 0 } else { rng.gen_range(0..=ops.len()) };
                    for op in &ops[..keep] {
                        apply_dir_op(&mut d.durable, op);
                    }
                    stats.dir_ops_kept += keep as u64;
                    stats.dir_ops_dropped += (ops.len() - keep) as u64;
                    d.current = d.durable.clone();
                }
                Body::Symlink(_) | Body::Special(_) => {}
            }
        }
        let live = self.relink();
        stats.inodes_freed = self.free_all_but(&live);
        stats
    }

    /// Walks the surviving tree from the root: drops second links to a
    /// directory and links to nothing, recounts links, re-derives paths.
    /// Returns the inodes reached.
    fn relink(&mut self) -> BTreeSet<u64> {
        let mut live = BTreeSet::from([ROOT]);
        let mut nlink = BTreeMap::from([(ROOT, 2u32)]);
        let mut queue = VecDeque::from([ROOT]);
        while let Some(dir) = queue.pop_front() {
            let entries: Vec<(OsString, u64)> = match self.inodes.get(&dir) {
                Some(Inode { body: Body::Dir(d), .. }) => d.current.iter().map(|(n, &i)| (n.clone(), i)).collect(),
                _ => continue,
            };
            for (name, child) in entries {
                let is_dir = self.inodes.get(&child).map(|n| matches!(n.body, Body::Dir(_)));
                let first = live.insert(child);
                if is_dir.is_none() || is_dir == Some(true) && !first {
                    log::warn!(
                        "power cut left {name:?} in {} as a second link to a directory; dropped",
                        self.path(dir)
                    );
                    if let Some(Inode { body: Body::Dir(d), .. }) = self.inodes.get_mut(&dir) {
                        d.current.remove(&name);
                        d.durable.remove(&name);
                    }
                    continue;
                }
                if is_dir == Some(true) {
                    *nlink.entry(dir).or_insert(2) += 1;
                    nlink.insert(child, 2);
                    queue.push_back(child);
                } else {
                    *nlink.entry(child).or_default() += 1;
                }
                if let (true, Some(node)) = (first, self.inodes.get_mut(&child)) {
                    node.parent = dir;
                    node.name = name;
                }
            }
        }
        for (ino, count) in nlink {
            if let Some(node) = self.inodes.get_mut(&ino) {
                node.nlink = count;
            }
        }
        live
    }
}

/// Applies to `durable` what `mode` lets survive of `ops`.
fn cut_file(durable: &mut Content, ops: &[FileOp], mode: CutMode, rng: &mut StdRng, stats: &mut CutStats) {
    match mode {
        CutMode::Drop => stats.file_ops_dropped += ops.len() as u64,
        CutMode::Prefix => {
            let keep = rng.gen_range(0..=ops.len());
            for op in &ops[..keep] {
                durable.apply(op);
            }
            stats.file_ops_kept += keep as u64;
            let mut dropped = ops.len() - keep;
            if let Some(next) = ops.get(keep) {
                if rng.gen_bool(0.5) && apply_torn(durable, next, rng) {
                    stats.writes_torn += 1;
                    dropped -= 1;
                }
            }
            stats.file_ops_dropped += dropped as u64;
        }
        CutMode::Subset => {
            for op in ops {
                match rng.gen_range(0..4) {
                    0 | 1 => stats.file_ops_dropped += 1,
                    3 if apply_torn(durable, op, rng) => stats.writes_torn += 1,
                    _ => {
                        durable.apply(op);
                        stats.file_ops_kept += 1;
                    }
                }
            }
        }
    }
}

/// Applies a random proper, non-empty subset of a write's sectors; the size
/// grows to the write's end or only as far as the sectors kept. Returns false
/// (and applies nothing) for anything but a write spanning two sectors or more.
fn apply_torn(content: &mut Content, op: &FileOp, rng: &mut StdRng) -> bool {
    let (Some(pieces), FileOp::Write { off, data }) = (op.sector_pieces(), op) else { return false };
    let mut keep: Vec<bool> = pieces.iter().map(|_| rng.gen_bool(0.5)).collect();
    if keep.iter().all(|&k| k) || keep.iter().all(|&k| !k) {
        let flip = rng.gen_range(0..keep.len());
        keep[flip] = !keep[flip];
    }
    for ((off, bytes), _) in pieces.iter().zip(&keep).filter(|(_, &k)| k) {
        content.apply(&FileOp::Write { off: *off, data: bytes.to_vec() });
    }
    if rng.gen_bool(0.5) {
        content.extend_to(off + data.len() as u64);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::SECTOR;

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn file(m: &mut Model, parent: u64, n: &str) -> u64 {
        m.make_node(parent, name(n), NewNode::File, 0o644, 0, 0).expect("create")
    }

    fn read_all(m: &Model, ino: u64) -> Vec<u8> {
        m.read(ino, 0, u64::MAX).expect("read")
    }

    fn lookup_path(m: &Model, path: &str) -> Option<u64> {
        path.split('/').filter(|p| !p.is_empty()).try_fold(ROOT, |dir, part| m.lookup(dir, name(part)).ok())
    }

    #[test]
    fn unsynced_write_is_gone_after_drop() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "f");
        m.fsync(ROOT).expect("fsync dir");
        m.write(f, 0, b"durable").expect("write");
        m.fsync(f).expect("fsync");
        m.write(f, 0, b"LOST").expect("write");

        let stats = m.powercut(1, CutMode::Drop);

        assert_eq!(read_all(&m, f), b"durable");
        assert_eq!(stats.file_ops_dropped, 1);
    }

    #[test]
    fn fsynced_file_whose_name_was_never_fsynced_is_gone() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "f");
        m.write(f, 0, b"data").expect("write");
        m.fsync(f).expect("fsync");

        let stats = m.powercut(1, CutMode::Drop);

        assert_eq!(m.lookup(ROOT, name("f")), Err(libc::ENOENT));
        assert!(m.attr(f).is_err(), "the inode was freed");
        assert_eq!(stats.inodes_freed, 1);
    }

    #[test]
    fn file_and_dir_fsync_survive_with_the_data() {
        let mut m = Model::new();
        let d = m.make_node(ROOT, name("d"), NewNode::Dir, 0o755, 0, 0).expect("mkdir");
        let f = file(&mut m, d, "f");
        m.write(f, 0, b"data").expect("write");
        m.fsync(f).expect("fsync");
        m.fsync(d).expect("fsync d");
        m.fsync(ROOT).expect("fsync root");

        m.powercut(7, CutMode::Drop);

        assert_eq!(lookup_path(&m, "/d/f"), Some(f));
        assert_eq!(read_all(&m, f), b"data");
        assert_eq!(m.attr(d).expect("attr").nlink, 2);
        assert_eq!(m.attr(ROOT).expect("attr").nlink, 3);
    }

    #[test]
    fn directory_never_made_durable_in_its_parent_vanishes_with_its_files() {
        let mut m = Model::new();
        let d = m.make_node(ROOT, name("d"), NewNode::Dir, 0o755, 0, 0).expect("mkdir");
        let f = file(&mut m, d, "f");
        m.fsync(f).expect("fsync");
        m.fsync(d).expect("fsync d");

        let stats = m.powercut(3, CutMode::Drop);

        assert_eq!(lookup_path(&m, "/d"), None);
        assert_eq!(stats.inodes_freed, 2);
        assert_eq!(m.inode_count(), 1);
    }

    /// The create-write-fsync-rename-fsync(dir) idiom, and the same without the
    /// last fsync.
    fn replace_via_rename(dir_fsync: bool) -> Model {
        let mut m = Model::new();
        let old = file(&mut m, ROOT, "final");
        m.write(old, 0, b"old").expect("write");
        m.fsync(old).expect("fsync");
        m.fsync(ROOT).expect("fsync root");
        let tmp = file(&mut m, ROOT, "tmp");
        m.write(tmp, 0, b"new").expect("write");
        m.fsync(tmp).expect("fsync");
        m.rename(ROOT, name("tmp"), ROOT, name("final"), false).expect("rename");
        if dir_fsync {
            m.fsync(ROOT).expect("fsync root");
        }
        m.powercut(11, CutMode::Drop);
        m
    }

    #[test]
    fn rename_with_dir_fsync_survives() {
        let m = replace_via_rename(true);
        let f = m.lookup(ROOT, name("final")).expect("final");
        assert_eq!(read_all(&m, f), b"new");
        assert_eq!(m.lookup(ROOT, name("tmp")), Err(libc::ENOENT));
    }

    #[test]
    fn rename_without_dir_fsync_leaves_the_old_name() {
        let m = replace_via_rename(false);
        let f = m.lookup(ROOT, name("final")).expect("final");
        assert_eq!(read_all(&m, f), b"old");
        assert_eq!(m.lookup(ROOT, name("tmp")), Err(libc::ENOENT), "tmp was never durable either");
    }

    #[test]
    fn same_dir_rename_is_atomic_under_prefix_cuts() {
        for seed in 0..64 {
            let mut m = Model::new();
            let a = file(&mut m, ROOT, "a");
            let b = file(&mut m, ROOT, "b");
            m.fsync(ROOT).expect("fsync root");
            m.rename(ROOT, name("a"), ROOT, name("b"), false).expect("rename");

            m.powercut(seed, CutMode::Prefix);

            let (la, lb) = (m.lookup(ROOT, name("a")).ok(), m.lookup(ROOT, name("b")).ok());
            assert!(la == Some(a) && lb == Some(b) || la.is_none() && lb == Some(a), "seed {seed}: a={la:?} b={lb:?}");
        }
    }

    #[test]
    fn cross_dir_move_of_a_directory_never_leaves_it_twice() {
        let mut seen_twice_candidate = false;
        for seed in 0..64 {
            let mut m = Model::new();
            let x = m.make_node(ROOT, name("x"), NewNode::Dir, 0o755, 0, 0).expect("mkdir");
            let y = m.make_node(ROOT, name("y"), NewNode::Dir, 0o755, 0, 0).expect("mkdir");
            let d = m.make_node(x, name("d"), NewNode::Dir, 0o755, 0, 0).expect("mkdir");
            m.sync();
            m.rename(x, name("d"), y, name("d"), false).expect("rename");

            m.powercut(seed, CutMode::Prefix);

            let places = [lookup_path(&m, "/x/d"), lookup_path(&m, "/y/d")];
            let count = places.iter().filter(|p| **p == Some(d)).count();
            seen_twice_candidate |= count == 1 && places[1] == Some(d);
            assert!(count <= 1, "seed {seed}: directory linked twice");
            assert_eq!(m.attr(ROOT).expect("attr").nlink, 4);
            let sum = m.attr(x).expect("x").nlink + m.attr(y).expect("y").nlink;
            assert_eq!(sum, 4 + count as u32, "seed {seed}: parent link counts");
        }
        assert!(seen_twice_candidate, "some seed keeps the link in y");
    }

    #[test]
    fn pending_truncate_punch_and_zero_range_are_dropped() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "f");
        m.write(f, 0, &[5u8; 3 * BLOCK as usize]).expect("write");
        m.sync();
        m.fallocate(f, 0, BLOCK, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE).expect("punch");
        m.fallocate(f, BLOCK, BLOCK, libc::FALLOC_FL_ZERO_RANGE).expect("zero");
        m.set_len(f, 100).expect("truncate");
        assert_eq!(m.attr(f).expect("attr").size, 100);

        m.powercut(5, CutMode::Drop);

        assert_eq!(read_all(&m, f), vec![5u8; 3 * BLOCK as usize]);
    }

    #[test]
    fn fallocate_rejects_unsupported_modes() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "f");
        assert_eq!(m.fallocate(f, 0, 1, libc::FALLOC_FL_COLLAPSE_RANGE), Err(libc::EOPNOTSUPP));
        assert_eq!(m.fallocate(f, 0, 1, libc::FALLOC_FL_PUNCH_HOLE), Err(libc::EINVAL));
    }

    /// Two overlapping writes then a third: the history `prefix` must respect.
    fn three_writes(m: &mut Model) -> (u64, Vec<Vec<u8>>) {
        let f = file(m, ROOT, "f");
        m.sync();
        let ops = [(0u64, b'a', 2 * BLOCK as usize), (BLOCK / 2, b'b', BLOCK as usize), (BLOCK + 512, b'c', 3072)];
        let mut states = vec![read_all(m, f)];
        for (off, byte, len) in ops {
            m.write(f, off, &vec![byte; len]).expect("write");
            states.push(read_all(m, f));
        }
        (f, states)
    }

    /// Sector `s` of `state` seen as a file of `len` bytes (zeroes past its end).
    fn sector(state: &[u8], len: usize, s: usize) -> Vec<u8> {
        let mut padded = state[..state.len().min(len)].to_vec();
        padded.resize(len, 0);
        let start = s * SECTOR as usize;
        padded[start..len.min(start + SECTOR as usize)].to_vec()
    }

    /// Property: a `prefix` cut leaves, for some k, a size between the sizes
    /// after k and k+1 ops and every sector as it was after the first k ops or
    /// after k+1 (the (k+1)-th torn by sector): never a later write without all
    /// the earlier ones.
    #[test]
    fn prefix_cut_leaves_a_prefix_with_at_most_the_next_write_torn() {
        let mut torn = 0;
        for seed in 0..200 {
            let mut m = Model::new();
            let (f, states) = three_writes(&mut m);
            m.fsync(ROOT).expect("fsync root");

            let stats = m.powercut(seed, CutMode::Prefix);

            torn += stats.writes_torn;
            let got = read_all(&m, f);
            let len = got.len();
            let ok = (0..states.len()).any(|k| {
                let (now, next) = (&states[k], &states[(k + 1).min(states.len() - 1)]);
                (now.len().min(next.len())..=now.len().max(next.len())).contains(&len)
                    && (0..len.div_ceil(SECTOR as usize)).all(|s| {
                        let g = sector(&got, len, s);
                        g == sector(now, len, s) || g == sector(next, len, s)
                    })
            });
            assert!(ok, "seed {seed}: state outside every prefix");
        }
        assert!(torn > 0, "some seed tears a write");
    }

    /// Property: a `subset` cut may reorder, but every 512-byte sector holds
    /// exactly one version: the durable one or one whole write's bytes.
    #[test]
    fn subset_cut_tears_only_at_sector_boundaries_and_can_reorder() {
        let mut reordered = false;
        for seed in 0..200 {
            let mut m = Model::new();
            let (f, _) = three_writes(&mut m);
            m.fsync(ROOT).expect("fsync root");

            m.powercut(seed, CutMode::Subset);

            let got = read_all(&m, f);
            for s in 0..got.len().div_ceil(SECTOR as usize) {
                let bytes = sector(&got, got.len(), s);
                let first = bytes[0];
                assert!(bytes.iter().all(|&b| b == first), "seed {seed}: sector {s} mixes two versions");
            }
            reordered |= got.contains(&b'c') && !got.contains(&b'a') && !got.contains(&b'b');
        }
        assert!(reordered, "some seed keeps the third write without the first two");
    }

    #[test]
    fn single_sector_write_is_never_torn() {
        for seed in 0..100 {
            let mut m = Model::new();
            let f = file(&mut m, ROOT, "f");
            m.write(f, 0, &[1u8; 1024]).expect("write");
            m.sync();
            m.write(f, 600, &[2u8; 300]).expect("write");

            let stats = m.powercut(seed, CutMode::Subset);

            assert_eq!(stats.writes_torn, 0);
            let got = read_all(&m, f);
            assert!(got[600..900].iter().all(|&b| b == got[600]), "seed {seed}");
        }
    }

    #[test]
    fn same_seed_gives_the_same_result() {
        let run = |seed| {
            let mut m = Model::new();
            let (f, _) = three_writes(&mut m);
            file(&mut m, ROOT, "g");
            let stats = m.powercut(seed, CutMode::Subset);
            (read_all(&m, f), m.lookup(ROOT, name("g")).is_ok(), stats)
        };
        assert_eq!(run(42), run(42));
        assert!((0..20).any(|s| run(s) != run(42)), "different seeds differ");
    }

    #[test]
    fn faults_fire_count_times_on_matching_paths_only() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "journal");
        let g = file(&mut m, ROOT, "other");
        m.add_fault(FaultOp::Fsync, libc::EIO, "journ", 2);

        assert_eq!(m.fsync(g), Ok(()));
        assert_eq!(m.fsync(f), Err(libc::EIO));
        assert_eq!(m.fsync(f), Err(libc::EIO));
        assert_eq!(m.fsync(f), Ok(()));
    }

    #[test]
    fn capacity_refuses_new_blocks_but_not_overwrites() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "f");
        m.set_capacity(Some(2 * BLOCK));
        m.write(f, 0, &[1u8; 2 * BLOCK as usize]).expect("fits");

        assert_eq!(m.write(f, 2 * BLOCK, b"x"), Err(libc::ENOSPC));
        assert_eq!(m.write(f, 10, b"overwrite"), Ok(()));
        assert_eq!(m.fallocate(f, 8 * BLOCK, BLOCK, 0), Err(libc::ENOSPC));
    }

    #[test]
    fn stats_report_pending_work_per_file() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "f");
        m.write(f, 0, &[1; 100]).expect("write");
        m.write(f, 100, &[1; 50]).expect("write");
        m.set_len(f, 10).expect("truncate");

        let stats = m.stats();

        assert_eq!(stats.pending, vec![PendingFile { path: "/f".into(), ops: 3, writes: 2, bytes: 150 }]);
        assert_eq!(stats.pending_dir_ops, 1);
    }

    #[test]
    fn sync_makes_everything_durable_and_frees_unlinked_files() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "f");
        let g = file(&mut m, ROOT, "g");
        m.write(f, 0, b"kept").expect("write");
        m.write(g, 0, &[1; 8192]).expect("write");
        m.remove(ROOT, name("g"), false).expect("unlink");

        m.sync();
        m.powercut(9, CutMode::Drop);

        assert_eq!(read_all(&m, f), b"kept");
        assert!(m.attr(g).is_err());
        assert_eq!(m.space().1, BLOCK);
    }

    #[test]
    fn symlink_and_hard_link_follow_their_directory() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "f");
        m.make_node(ROOT, name("s"), NewNode::Symlink("f".into()), 0o777, 0, 0).expect("symlink");
        m.fsync(ROOT).expect("fsync");
        m.link(f, ROOT, name("h")).expect("link");
        assert_eq!(m.attr(f).expect("attr").nlink, 2);

        m.powercut(2, CutMode::Drop);

        let s = m.lookup(ROOT, name("s")).expect("symlink survived");
        assert_eq!(m.readlink(s), Ok("f".into()));
        assert_eq!(m.lookup(ROOT, name("h")), Err(libc::ENOENT));
        assert_eq!(m.attr(f).expect("attr").nlink, 1);
    }
}
