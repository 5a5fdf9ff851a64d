//! Recovery points at the target: taking one (every replica cloned as
//! applied, the catalog entry written, then renamed in: listed complete or
//! not at all) and thinning the catalog to the retention policy on the
//! stream's own clock.

use super::*;

/// What an app point's tag says about it (nothing, for a crash point).
#[derive(Debug, Default)]
pub(super) struct PointTag {
    pub label: Option<String>,
    pub group: Option<PointGroup>,
    pub quiesce: Option<Quiesce>,
}

impl VmApplier {
    /// Clones every replica (as applied up to `seq`) into a new point
    /// directory, writes its `point.toml`, and renames it into the
    /// catalog: a point is listed complete or not at all.
    pub(super) fn take_point(
        &mut self,
        seq: u64,
        epoch: u64,
        time_ns: u64,
        kind: PointKind,
        tag: PointTag,
    ) -> Result<()> {
        let PointTag { label, group, quiesce } = tag;
        let id = Point::make_id(seq, kind);
        if self.target.point_dir(&id).exists() {
            return Ok(()); // taken before a restart
        }
        let tmp = self.target.point_tmp_dir(&id);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        // The replicas' data first (part of applying, not of the point), so
        // the time logged is the clone's own.
        for image in &self.replicas {
            image.sync_data()?;
        }
        let started = std::time::Instant::now();
        let mut disks = BTreeMap::new();
        let mut method = CloneMethod::Reflink;
        for (d, image) in self.manifest.disks.iter().zip(&self.replicas) {
            let file = format!("{}.img", d.name);
            if clone_file(image.path(), &tmp.join(&file))? == CloneMethod::Copy {
                method = CloneMethod::Copy;
            }
            disks.insert(d.name.clone(), file);
        }
        fail::hit(Failpoint::ApplyPointCloned)?;
        if method == CloneMethod::Copy && !self.warned_copy {
            log::warn!(
                "VM '{}': {} cannot share extents (no reflink): points are full copies, slow and space-hungry; put the target on btrfs or xfs",
                self.name,
                self.target.root().display()
            );
            self.warned_copy = true;
        }
        let point = Point {
            version: TARGET_VERSION,
            id: id.clone(),
            seq,
            epoch,
            time_ns,
            kind,
            label,
            clone: method.name().into(),
            disks,
            group,
            quiesce,
        };
        write_durably(&tmp.join("point.toml"), toml::to_string(&point)?.as_bytes())?;
        let dir = self.target.point_dir(&id);
        std::fs::rename(&tmp, &dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
        tern_driver::fs::sync_dir(&self.target.points_dir())?;
        log::info!(
            "VM '{}': {}-consistent point {id} at seq {seq} (source time {}), {} in {:.1?}{}",
            self.name,
            point.consistency(),
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(time_ns)),
            method.name(),
            started.elapsed(),
            match &point.quiesce {
                Some(q) if q.frozen => format!(" (the guest frozen through {})", q.agent),
                Some(q) => format!(" (the guest freeze failed: {})", q.reason.as_deref().unwrap_or("no reason given")),
                None => String::new(),
            }
        );
        Ok(())
    }

    /// Deletes the points retention no longer keeps, ages measured on the
    /// stream's clock (see [`stream_now`]).
    pub(super) fn thin_points(&self) -> Result<()> {
        let points = self.target.list_points()?;
        let policy = &self.manifest.policy;
        let now = stream_now(&self.checkpoint, &points);
        // The other members' catalogs, where this target holds them.
        let target_root = self.target.root().parent().unwrap_or(self.target.root());
        let complete = tern_store::target::newest_complete_group_points(&points, &self.name, |member| {
            TargetDir::new(target_root, member).list_points().ok()
        });
        for id in expired_points(&points, now, policy.keep_all, policy.retention) {
            if complete.contains(&id) {
                continue;
            }
            let dir = self.target.point_dir(&id);
            // Renamed out of the catalog first: never a half-deleted point.
            fail::hit(Failpoint::ApplyPointExpire)?;
            let doomed: PathBuf = self.target.points_dir().join(format!(".tmp-expired-{id}"));
            std::fs::rename(&dir, &doomed).with_context(|| format!("cannot retire point {}", dir.display()))?;
            std::fs::remove_dir_all(&doomed)?;
            log::info!("VM '{}': point {id} expired (retention)", self.name);
        }
        Ok(())
    }
}
