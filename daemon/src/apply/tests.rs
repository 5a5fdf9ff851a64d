//! The applier's unit tests: segments written by hand into a temporary
//! cache, applied onto temporary replicas.

use super::*;
use tern_driver::journal::RecordHeader;
use tern_store::cache::{Epoch, ManifestDisk, MANIFEST_VERSION};
use tern_store::segment::{Compression, Encoder, SegmentBuilder};

fn manifest(id: uuid::Uuid, disks: &[(&str, u64)], epochs: &[(u64, u64)]) -> Manifest {
    Manifest {
        version: MANIFEST_VERSION,
        name: "vm1".into(),
        id,
        policy: tern_driver::vm::Policy::default(),
        journal_size: None,
        launch: None,
        disks: disks
            .iter()
            .map(|&(name, size)| ManifestDisk { name: name.into(), size, source: None, seed: None })
            .collect(),
        starts_in_window: false,
        epochs: epochs
            .iter()
            .map(|&(number, first_seq)| Epoch { number, first_seq, reason: "test".into(), closes_from: 0 })
            .collect(),
    }
}

/// A segment of one write of `len` bytes of `byte` at `offset` of disk 0.
fn write_segment(cache: &CacheDir, id: uuid::Uuid, epoch: u64, seq: u64, offset: u64, len: usize, byte: u8) {
    let mut b = SegmentBuilder::new(*id.as_bytes(), epoch, seq);
    let h = RecordHeader {
        seq,
        offset,
        time_ns: 1,
        length: len as u32,
        data_len: len as u32,
        disk: 0,
        kind: RecordKind::Write,
        flags: 0,
    };
    b.push(&h, &vec![byte; len]).unwrap();
    let (header, bytes) = Encoder::new(Compression::Zstd { level: 1 }).unwrap().encode(&b).unwrap();
    cache.write_segment(&header, &bytes, &mut |_| Ok(())).unwrap();
}

/// Issue 18 (item 1): inside a resync window there is no consistent
/// point at the newest data: `--latest` says so and names the newest
/// consistent point instead.
#[test]
fn latest_inside_a_resync_window_names_the_newest_consistent_point() {
    let dir = tempfile::tempdir().unwrap();
    let (cache_root, target_root) = (dir.path().join("cache"), dir.path().join("target"));
    std::fs::create_dir_all(&cache_root).unwrap();
    let cache_root = Store::dir(&cache_root);
    let cache = CacheDir::new(&cache_root, "vm1");
    std::fs::create_dir_all(&target_root).unwrap();
    let id = uuid::Uuid::from_bytes([7; 16]);
    let write_manifest = |m: &Manifest| cache.write_manifest(m, tern_store::object::Put::Overwrite).unwrap();
    write_manifest(&manifest(id, &[("disk0", 1 << 20)], &[(1, 1)]));
    write_segment(&cache, id, 1, 1, 0, 4096, 1);
    let first = latest::catch_up_and_point(&cache_root, &target_root, "vm1").expect("a point at seq 1");
    assert_eq!(first.seq, 1);
    // Records 2..4 were lost at the source (a host crash): epoch 2
    // starts at seq 5 inside a resync window.
    write_manifest(&manifest(id, &[("disk0", 1 << 20)], &[(1, 1), (2, 5)]));
    write_segment(&cache, id, 2, 5, 8192, 4096, 2);
    let err = format!("{:#}", latest::catch_up_and_point(&cache_root, &target_root, "vm1").unwrap_err());
    assert!(err.contains("inside a resync window at seq 5"), "{err}");
    assert!(err.contains(&format!("the newest consistent point is {} (seq 1)", first.id)), "{err}");
    assert!(err.contains("--latest-point"), "{err}");
    let points = TargetDir::new(&target_root, "vm1").list_points().unwrap();
    assert_eq!(points.len(), 1, "no point inside the window");
}

#[test]
fn a_manifest_whose_disks_change_under_a_running_applier_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cache_root, target_root) = (dir.path().join("cache"), dir.path().join("target"));
    std::fs::create_dir_all(&cache_root).unwrap();
    let cache_root = Store::dir(&cache_root);
    let cache = CacheDir::new(&cache_root, "vm1");
    let id = uuid::Uuid::from_bytes([9; 16]);
    let write_manifest = |m: &Manifest| cache.write_manifest(m, tern_store::object::Put::Overwrite).unwrap();
    write_manifest(&manifest(id, &[("disk0", 1 << 20)], &[(1, 1)]));
    write_segment(&cache, id, 1, 1, 0, 4096, 1);
    let options = ApplyOptions { once: true, keep_segments: true, ..Default::default() };
    let mut applier = VmApplier::open(&cache_root, &target_root, "vm1", &options).unwrap().unwrap();
    let stop = AtomicBool::new(false);
    assert_eq!(applier.step(&stop).unwrap(), 1);
    // The cache now claims a larger disk (and a new epoch, so the
    // applier re-reads it), and a write past the replica's end.
    write_manifest(&manifest(id, &[("disk0", 2 << 20)], &[(1, 1), (2, 100)]));
    write_segment(&cache, id, 2, 100, 1536 << 10, 4096, 2);
    let err = applier.step(&stop).expect_err("a disk that changed size must be refused");
    assert!(format!("{err:#}").contains("disk"), "{err:#}");
    let replica = TargetDir::new(&target_root, "vm1").replica_path("disk0");
    assert_eq!(std::fs::metadata(replica).unwrap().len(), 1 << 20, "the replica was extended");
}

#[test]
fn retiring_a_stream_interrupted_half_way_finishes_without_mixing_old_points_in() {
    let dir = tempfile::tempdir().unwrap();
    let target = TargetDir::new(dir.path(), "vm1");
    let old = uuid::Uuid::from_bytes([4; 16]);
    std::fs::create_dir_all(target.point_dir("10")).unwrap();
    std::fs::create_dir_all(target.replica_dir()).unwrap();
    std::fs::write(target.checkpoint_path(), "old").unwrap();
    // The crash came after the points were moved, before the replicas.
    std::fs::create_dir_all(target.history_dir(&old)).unwrap();
    std::fs::rename(target.points_dir(), target.history_dir(&old).join("points")).unwrap();
    retire_previous_stream(&target, &old).unwrap();
    assert!(target.history_dir(&old).join("points/10").is_dir(), "the old points stay in history");
    assert!(target.history_dir(&old).join("replica/checkpoint.toml").is_file());
    assert!(target.list_points().unwrap().is_empty() && !target.checkpoint_path().exists());
    assert!(target.points_dir().is_dir() && target.replica_dir().is_dir());
}

/// A cache store and a target site in a temporary directory (kept while
/// the first element lives), and VM vm1's place in the cache.
fn sites() -> (tempfile::TempDir, Store, std::path::PathBuf, CacheDir) {
    let dir = tempfile::tempdir().unwrap();
    let (cache_root, target_root) = (dir.path().join("cache"), dir.path().join("target"));
    std::fs::create_dir_all(&cache_root).unwrap();
    std::fs::create_dir_all(&target_root).unwrap();
    let cache_root = Store::dir(&cache_root);
    let cache = CacheDir::new(&cache_root, "vm1");
    (dir, cache_root, target_root, cache)
}

/// The VM failed over at point "1" (seq 1): nothing more is applied.
fn fence_at_seq_1(cache: &CacheDir) {
    let fence = tern_store::cache::Fence {
        version: 1,
        epoch: 2,
        point: "1".into(),
        seq: 1,
        failed_over_unix_ms: 1,
        committed: false,
        by_failback: false,
    };
    cache.write_toml(tern_store::cache::FENCE, &fence, "test").unwrap();
}

/// One pass of a fresh applier of vm1, which must apply one segment.
fn apply_once(cache_root: &Store, target_root: &std::path::Path, options: &ApplyOptions, stop: &AtomicBool) {
    let mut a = VmApplier::open(cache_root, target_root, "vm1", options).unwrap().unwrap();
    assert_eq!(a.step(stop).unwrap(), 1);
}

/// A segment of one group tag at `seq` that is not JSON: the pass
/// applying it fails (not a refused segment: an error mid-pass, like
/// ENOSPC or EIO).
fn write_unreadable_group_tag(cache: &CacheDir, id: uuid::Uuid, seq: u64) {
    let mut b = SegmentBuilder::new(*id.as_bytes(), 1, seq);
    let data = b"not json".to_vec();
    let h = RecordHeader {
        seq,
        offset: 0,
        time_ns: 1,
        length: 0,
        data_len: data.len() as u32,
        disk: 0,
        kind: RecordKind::Tag,
        flags: journal::TAG_GROUP,
    };
    b.push(&h, &data).unwrap();
    let (header, bytes) = Encoder::new(Compression::Zstd { level: 1 }).unwrap().encode(&b).unwrap();
    cache.write_segment(&header, &bytes, &mut |_| Ok(())).unwrap();
}

/// A pass that fails after writing a batch (here a tag it cannot parse; in
/// life ENOSPC, EIO, a kill) leaves the replica past its checkpoint. Once
/// the VM is fenced nothing is applied again, and `--latest` took a point
/// at the checkpoint holding a later write: torn. Now it is refused.
#[test]
fn no_point_at_a_checkpoint_a_failed_pass_wrote_past() {
    let (_dir, cache_root, target_root, cache) = sites();
    let id = uuid::Uuid::from_bytes([5; 16]);
    cache.write_manifest(&manifest(id, &[("disk0", 1 << 20)], &[(1, 1)]), tern_store::object::Put::Overwrite).unwrap();
    write_segment(&cache, id, 1, 1, 0, 4096, 1);
    let options = ApplyOptions { once: true, keep_segments: true, batch_limit: 4096, sync_limit: 1 << 30 };
    let stop = AtomicBool::new(false);
    apply_once(&cache_root, &target_root, &options, &stop);
    write_segment(&cache, id, 1, 2, 8192, 4096, 2);
    write_unreadable_group_tag(&cache, id, 3);
    {
        let mut a = VmApplier::open(&cache_root, &target_root, "vm1", &options).unwrap().unwrap();
        a.step(&stop).expect_err("the bad tag fails the pass");
    }
    fence_at_seq_1(&cache);
    let e = latest::catch_up_and_point(&cache_root, &target_root, "vm1").expect_err("a torn point");
    assert!(e.to_string().contains("wrote the replicas past seq 1 (up to seq 2)"), "{e:#}");
    assert!(TargetDir::new(&target_root, "vm1").list_points().unwrap().iter().all(|p| p.seq != 1));
}

/// Before the first segment is applied (manifest shipped, no segment
/// yet), `--latest` took a crash point at seq 0 of the empty (or seeded)
/// replica, although the stream's seq 1 opens the initial sync's window.
#[test]
fn no_point_before_an_initial_sync_is_applied() {
    let (_dir, cache_root, target_root, cache) = sites();
    let id = uuid::Uuid::from_bytes([6; 16]);
    let m = Manifest { starts_in_window: true, ..manifest(id, &[("disk0", 1 << 20)], &[(1, 1)]) };
    cache.write_manifest(&m, tern_store::object::Put::Overwrite).unwrap();
    let e = latest::catch_up_and_point(&cache_root, &target_root, "vm1").expect_err("a point of nothing");
    assert!(e.to_string().contains("inside a resync window at seq 0"), "{e:#}");
    // A stream whose disks were empty at enable starts consistent.
    let (_dir, cache_root, target_root, cache) = sites();
    cache.write_manifest(&manifest(id, &[("disk0", 1 << 20)], &[(1, 1)]), tern_store::object::Put::Overwrite).unwrap();
    assert_eq!(latest::catch_up_and_point(&cache_root, &target_root, "vm1").unwrap().seq, 0);
}

/// The same torn replica, unfenced: a reopened applier with a shorter
/// point interval (vm.toml changed, the manifest refreshed) took a crash
/// point at a segment boundary the failed pass had written past.
#[test]
fn no_crash_point_below_where_a_failed_pass_wrote() {
    let (_dir, cache_root, target_root, cache) = sites();
    let id = uuid::Uuid::from_bytes([8; 16]);
    let mut m = manifest(id, &[("disk0", 1 << 20)], &[(1, 1)]);
    cache.write_manifest(&m, tern_store::object::Put::Overwrite).unwrap();
    write_segment(&cache, id, 1, 1, 0, 4096, 1);
    write_segment(&cache, id, 1, 2, 8192, 4096, 2);
    write_unreadable_group_tag(&cache, id, 3);
    let options = ApplyOptions { once: true, keep_segments: true, batch_limit: 4096, sync_limit: 1 << 30 };
    let stop = AtomicBool::new(false);
    {
        let mut a = VmApplier::open(&cache_root, &target_root, "vm1", &options).unwrap().unwrap();
        a.step(&stop).expect_err("the bad tag fails the pass");
    }
    m.policy.interval = Duration::from_nanos(1);
    cache.write_manifest(&m, tern_store::object::Put::Overwrite).unwrap();
    {
        let mut a = VmApplier::open(&cache_root, &target_root, "vm1", &options).unwrap().unwrap();
        a.step(&stop).expect_err("the bad tag fails the pass again");
    }
    // Every point taken holds exactly the records up to its seq.
    let target = TargetDir::new(&target_root, "vm1");
    for p in target.list_points().unwrap() {
        let img = std::fs::read(target.point_dir(&p.id).join("disk0.img")).unwrap();
        assert!(p.seq >= 2 || img[8192] == 0, "point {} (seq {}) holds seq 2's write: torn", p.id, p.seq);
    }
}

/// A batch of trims only (the guest's fstrim) carries no data bytes; the
/// batch written before a tag's point then recorded no `written-seq`, and
/// a pass failing after it left the trims on the replica unannounced: a
/// fenced `--latest` cloned them into the checkpoint's point.
#[test]
fn a_batch_of_trims_only_is_recorded_as_written() {
    let (_dir, cache_root, target_root, cache) = sites();
    let id = uuid::Uuid::from_bytes([9; 16]);
    cache.write_manifest(&manifest(id, &[("disk0", 1 << 20)], &[(1, 1)]), tern_store::object::Put::Overwrite).unwrap();
    write_segment(&cache, id, 1, 1, 0, 4096, 1);
    let options = ApplyOptions { once: true, keep_segments: true, batch_limit: 4096, sync_limit: 1 << 30 };
    let stop = AtomicBool::new(false);
    apply_once(&cache_root, &target_root, &options, &stop);
    let segment = |seq: u64, kind: RecordKind, data: &[u8], length: u32| {
        let mut b = SegmentBuilder::new(*id.as_bytes(), 1, seq);
        let h =
            RecordHeader { seq, offset: 0, time_ns: 1, length, data_len: data.len() as u32, disk: 0, kind, flags: 0 };
        b.push(&h, data).unwrap();
        let (header, bytes) = Encoder::new(Compression::Zstd { level: 1 }).unwrap().encode(&b).unwrap();
        cache.write_segment(&header, &bytes, &mut |_| Ok(())).unwrap();
    };
    segment(2, RecordKind::Trim, &[], 4096); // the guest trims what seq 1 wrote
    segment(3, RecordKind::Tag, b"app", 0); // its batch is written, then the point
    write_unreadable_group_tag(&cache, id, 4); // then the pass fails
    {
        let mut a = VmApplier::open(&cache_root, &target_root, "vm1", &options).unwrap().unwrap();
        a.step(&stop).expect_err("the bad tag fails the pass");
    }
    let target = TargetDir::new(&target_root, "vm1");
    let checkpoint = target.read_checkpoint().unwrap().unwrap();
    assert_eq!((checkpoint.applied_seq, checkpoint.written_seq), (1, 2));
    fence_at_seq_1(&cache);
    let e = latest::catch_up_and_point(&cache_root, &target_root, "vm1").expect_err("a torn point");
    assert!(e.to_string().contains("wrote the replicas past seq 1 (up to seq 2)"), "{e:#}");
}

/// An epoch started for records lost from the cache begins where the ring
/// was not emptied: a window close already in it (an initial sync that
/// ended while the shipper was away) ended the epoch's window before the
/// comparison's, and points were taken of a replica still lacking the
/// lost records. Closes below the epoch's `closes-from` do not count.
#[test]
fn a_stale_window_close_does_not_end_a_cache_loss_epochs_window() {
    let points_in_epoch_2 = |closes_from: u64| {
        let (_dir, cache_root, target_root, cache) = sites();
        let id = uuid::Uuid::from_bytes([10; 16]);
        let mut m = manifest(id, &[("disk0", 1 << 20)], &[(1, 1), (2, 5)]);
        m.epochs[1].closes_from = closes_from;
        m.policy.interval = Duration::from_nanos(1);
        cache.write_manifest(&m, tern_store::object::Put::Overwrite).unwrap();
        write_segment(&cache, id, 1, 1, 0, 4096, 1);
        // Seqs 2..=4 were shipped and lost from the cache; epoch 2's first
        // segment holds a write and the stale close at 6.
        let mut b = SegmentBuilder::new(*id.as_bytes(), 2, 5);
        let rec = |seq, kind, flags, length: u32| RecordHeader {
            seq,
            offset: 8192,
            time_ns: 10 + seq,
            length,
            data_len: length,
            disk: 0,
            kind,
            flags,
        };
        b.push(&rec(5, RecordKind::Write, 0, 4096), &[5; 4096]).unwrap();
        b.push(&rec(6, RecordKind::Resync, journal::RESYNC_CLOSE, 0), &[]).unwrap();
        let (header, bytes) = Encoder::new(Compression::Zstd { level: 1 }).unwrap().encode(&b).unwrap();
        cache.write_segment(&header, &bytes, &mut |_| Ok(())).unwrap();
        write_segment(&cache, id, 2, 7, 16384, 4096, 7);
        let options = ApplyOptions { once: true, keep_segments: true, batch_limit: 4096, sync_limit: 1 << 30 };
        let mut a = VmApplier::open(&cache_root, &target_root, "vm1", &options).unwrap().unwrap();
        a.step(&AtomicBool::new(false)).unwrap();
        let points = TargetDir::new(&target_root, "vm1").list_points().unwrap();
        points.into_iter().filter(|p| p.epoch == 2).map(|p| p.seq).collect::<Vec<_>>()
    };
    assert_eq!(points_in_epoch_2(7), Vec::<u64>::new(), "no point before the comparison's window closes");
    // After a host crash the ring was emptied: its closes all count.
    assert!(!points_in_epoch_2(0).is_empty());
}
