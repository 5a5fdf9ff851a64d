//! Guest freeze (`tern tag --freeze qga:SOCKET`, `[app-points]`) against
//! an agent on a socket that speaks qemu-ga's protocol and misbehaves as
//! real ones do: silent, refusing, late, with a previous client's answers
//! still in the channel. The real qemu-ga in a guest, with ext4 judged
//! clean or not, is `scripts/vm-test.sh freeze`.

use std::time::{Duration, Instant};

use tern_system_tests::qga::{Agent, Behaviour};
use tern_system_tests::*;

/// A VM and an agent behaving so.
fn vm_with_agent(behaviour: Behaviour) -> (TestVm, Agent) {
    let vm = TestVm::new(VmSpec::default());
    let agent = Agent::start(vm.dir.path(), behaviour);
    (vm, agent)
}

/// `tern tag vm1 LABEL` with `args`, as JSON.
fn tag(vm: &TestVm, label: &str, args: &[&str]) -> serde_json::Value {
    let out = run(vm.tern().args(["tag", "vm1", label, "--json"]).args(args));
    serde_json::from_str(&out).expect("tag --json")
}

/// The point the applier took at the tag labelled `label`.
fn point_of(vm: &TestVm, label: &str) -> serde_json::Value {
    vm.ship_once();
    let out = vm.apply_with(&vm.dir.path().join("cache"), &vm.dir.path().join("target"), &[], &[]);
    assert!(out.status.success(), "tern apply: {}", String::from_utf8_lossy(&out.stderr));
    vm.points(&vm.dir.path().join("target"))
        .into_iter()
        .find(|p| p["label"] == label)
        .unwrap_or_else(|| panic!("no point labelled {label}"))
}

#[test]
fn a_frozen_tag_is_an_application_consistent_point_thawed_after_the_tag() {
    let (vm, agent) = vm_with_agent(Behaviour::Answer);
    let t = tag(&vm, "nightly", &["--freeze", &agent.spec()]);
    assert_eq!(t["consistency"], "application", "{t}");
    assert_eq!(t["freeze"]["filesystems"], 2, "{t}");
    assert_eq!(t["freeze"]["thaw_confirmed"], true, "{t}");
    assert_eq!(agent.commands(), ["guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]);
    let p = point_of(&vm, "nightly");
    assert_eq!(p["kind"], "app");
    assert_eq!(p["consistency"], "application", "{p}");
    assert_eq!(p["quiesce"]["frozen"], true, "{p}");
    assert_eq!(p["quiesce"]["agent"], agent.spec(), "{p}");
}

#[test]
fn a_previous_clients_answers_in_the_channel_are_skipped() {
    let (vm, agent) = vm_with_agent(Behaviour::Stale);
    let t = tag(&vm, "stale", &["--freeze", &agent.spec()]);
    assert_eq!(t["consistency"], "application", "{t}");
    assert_eq!(t["freeze"]["filesystems"], 2, "{t}");
}

#[test]
fn a_silent_agent_gives_a_crash_consistent_point_after_the_deadline() {
    let (vm, agent) = vm_with_agent(Behaviour::Silent);
    let started = Instant::now();
    let t = tag(&vm, "silent", &["--freeze", &agent.spec(), "--freeze-timeout", "2s"]);
    let took = started.elapsed();
    // Never waited on forever: the deadline, not the agent, ends it (with
    // ample room for a loaded machine; nothing was sent to thaw).
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(t["consistency"], "crash", "{t}");
    let reason = t["freeze"]["reason"].as_str().unwrap();
    assert!(reason.contains("did not answer guest-sync-delimited"), "{reason}");
    assert_eq!(agent.commands(), ["guest-sync-delimited"], "no freeze is sent to an agent that does not sync");
    let p = point_of(&vm, "silent");
    assert_eq!(p["consistency"], "crash", "{p}");
    assert!(p["quiesce"]["reason"].as_str().unwrap().contains("did not answer"), "{p}");
    // `tern status` warns (exit 1) while the last app point's freeze failed.
    let status = vm.tern().args(["status", "--json"]).output().unwrap();
    assert_eq!(status.status.code(), Some(1), "{}", String::from_utf8_lossy(&status.stderr));
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s[0]["last_app_point"]["consistency"], "crash", "{s}");
    let text = String::from_utf8_lossy(&vm.tern().args(["status"]).output().unwrap().stdout).into_owned();
    assert!(text.contains("last app point 'silent'") && text.contains("CRASH-CONSISTENT"), "{text}");
    // A frozen point after it: healthy again.
    std::fs::create_dir(vm.dir.path().join("good")).unwrap();
    let good = Agent::start(&vm.dir.path().join("good"), Behaviour::Answer);
    tag(&vm, "again", &["--freeze", &good.spec()]);
    point_of(&vm, "again");
    let status = vm.tern().args(["status", "--json"]).output().unwrap();
    assert_eq!(status.status.code(), Some(0), "{}", String::from_utf8_lossy(&status.stderr));
}

#[test]
fn a_late_freeze_is_still_thawed_and_its_answer_not_taken_for_the_thaws() {
    let (vm, agent) = vm_with_agent(Behaviour::Late(Duration::from_secs(3)));
    let t = tag(&vm, "late", &["--freeze", &agent.spec(), "--freeze-timeout", "1s"]);
    assert_eq!(t["consistency"], "crash", "{t}");
    assert!(t["freeze"]["reason"].as_str().unwrap().contains("did not answer guest-fsfreeze-freeze"), "{t}");
    // The thaw was sent after the deadline and answered after the late
    // freeze's answer, which must not count as the thaw's.
    assert_eq!(agent.commands(), ["guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]);
    assert_eq!(t["freeze"]["thaw_confirmed"], true, "{t}");
    assert_eq!(point_of(&vm, "late")["consistency"], "crash");
}

#[test]
fn a_refused_freeze_or_no_agent_at_all_says_why_and_still_tags() {
    let (vm, agent) = vm_with_agent(Behaviour::Refuse);
    let t = tag(&vm, "refused", &["--freeze", &agent.spec()]);
    assert_eq!(t["consistency"], "crash", "{t}");
    assert!(t["freeze"]["reason"].as_str().unwrap().contains("fsfreeze is disabled"), "{t}");
    assert_eq!(agent.commands().last().map(String::as_str), Some("guest-fsfreeze-thaw"), "thawed all the same");

    let missing = vm.dir.path().join("no-such.sock");
    let t = tag(&vm, "absent", &["--freeze", &format!("qga:{}", missing.display())]);
    assert_eq!(t["consistency"], "crash", "{t}");
    let reason = t["freeze"]["reason"].as_str().unwrap();
    assert!(reason.contains(&missing.display().to_string()) && reason.contains("connect"), "{reason}");
}

#[test]
fn the_vms_freeze_policy_is_used_unless_told_otherwise() {
    let dir = tempfile::Builder::new().prefix("tern-freeze-").tempdir_in(test_root()).unwrap();
    let agent = Agent::start(dir.path(), Behaviour::Answer);
    let img = dir.path().join("disk0.img");
    std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    for d in ["cache", "target"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    let state = dir.path().join("state");
    let tern = || tern_with_state(&state);
    let enable = || {
        let mut c = tern();
        c.args(["enable", "vm1", "--cache"])
            .arg(dir.path().join("cache"))
            .arg("--target")
            .arg(dir.path().join("target"))
            .arg("--disk")
            .arg(format!("disk0={}", img.display()));
        c
    };
    // Bad input first: an agent that is not qga:ABSOLUTE-PATH.
    for bad in ["qga:", "qga:relative.sock", "/run/qga.sock"] {
        let out = enable().args(["--freeze", bad]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("qga:SOCKET"), "--freeze {bad}: {err}");
    }
    // A schedule with nobody to quiesce the guest would make crash points
    // called app points; a freeze longer than a minute holds the guest.
    let out = enable().args(["--app-interval", "1h"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("interval needs freeze"), "{err}");
    let out = enable().args(["--freeze", &agent.spec(), "--freeze-timeout", "5m"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("between 1s and 60s"), "{err}");
    run(enable().args(["--journal-size", "64MiB", "--freeze", &agent.spec(), "--freeze-timeout", "3s"]));
    let config = std::fs::read_to_string(state.join("vm1/vm.toml")).unwrap();
    assert!(config.contains("[app-points]") && config.contains(&agent.spec()), "{config}");
    let tag = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&run(tern().args(["tag", "vm1", "x", "--json"]).args(args))).unwrap()
    };
    assert_eq!(tag(&[])["consistency"], "application");
    assert_eq!(agent.commands().len(), 3, "the policy's agent was asked");
    let t = tag(&["--no-freeze"]);
    assert!(t["freeze"].is_null(), "{t}");
    assert_eq!(agent.commands().len(), 3, "--no-freeze asks no agent");
}

/// `tern serve` with `[app-points] interval` takes app points on its own,
/// frozen as the policy says.
#[test]
fn serve_takes_scheduled_app_points_through_the_agent() {
    let (vm, agent) = vm_with_agent(Behaviour::Answer);
    let config_path = vm.state.join("vm1/vm.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    assert!(!config.contains("[app-points]"), "enable writes no default [app-points]: {config}");
    let config = format!("{config}\n[app-points]\nfreeze = \"{}\"\ninterval = \"10s\"\n", agent.spec());
    std::fs::write(&config_path, config).unwrap();
    let serve = vm.serve(&[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.commands().iter().filter(|c| *c == "guest-fsfreeze-thaw").count() < 1 {
        assert!(Instant::now() < deadline, "no scheduled freeze in 60 s: {}", serve.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = serve.stop();
    assert!(log.contains("scheduled app point at seq"), "{log}");
    let p = point_of(&vm, "scheduled");
    assert_eq!(p["consistency"], "application", "{p}");
    assert_eq!(p["quiesce"]["filesystems"], 2, "{p}");
}

#[test]
fn an_unanswered_thaw_is_sent_again_and_one_never_answered_is_critical() {
    let (vm, agent) = vm_with_agent(Behaviour::LoseFirstThaw);
    let t = tag(&vm, "retried", &["--freeze", &agent.spec()]);
    assert_eq!(t["consistency"], "application", "{t}");
    assert_eq!(t["freeze"]["thaw_confirmed"], true, "{t}");
    let thaws = agent.commands().iter().filter(|c| *c == "guest-fsfreeze-thaw").count();
    assert_eq!(thaws, 2, "a second thaw on a new connection: {:?}", agent.commands());
    point_of(&vm, "retried");

    std::fs::create_dir(vm.dir.path().join("hung")).unwrap();
    let hung = Agent::start(&vm.dir.path().join("hung"), Behaviour::NeverThaw);
    let t = tag(&vm, "hung", &["--freeze", &hung.spec()]);
    // The point is application-consistent (frozen at the tag), but the
    // guest may still be frozen: status says so, critical (exit 2).
    assert_eq!(t["consistency"], "application", "{t}");
    assert_eq!(t["freeze"]["thaw_confirmed"], false, "{t}");
    let status = vm.tern().args(["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    let err = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(2), "{text}{err}");
    assert!(err.contains("may still be frozen") || text.contains("may still be frozen"), "{text}{err}");
    assert!(err.contains("tern thaw vm1"), "status says how to thaw: {err}");
    // `tern thaw` through an agent that answers: thawed, and status no
    // longer says the guest may be frozen.
    std::fs::create_dir(vm.dir.path().join("ok")).unwrap();
    let ok = Agent::start(&vm.dir.path().join("ok"), Behaviour::Answer);
    let out = run(vm.tern().args(["thaw", "vm1", "--freeze", &ok.spec()]));
    assert!(out.contains("thawed"), "{out}");
    assert_eq!(ok.commands(), ["guest-sync-delimited", "guest-fsfreeze-thaw", "guest-fsfreeze-status"]);
    let status = vm.tern().args(["status"]).output().unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&status.stdout), String::from_utf8_lossy(&status.stderr));
    assert!(!all.contains("may still be frozen"), "{all}");
}

#[test]
fn a_flooding_agent_is_cut_off_with_a_crash_consistent_point() {
    let (vm, agent) = vm_with_agent(Behaviour::Flood);
    let t = tag(&vm, "flood", &["--freeze", &agent.spec(), "--freeze-timeout", "5s"]);
    assert_eq!(t["consistency"], "crash", "{t}");
    assert!(t["freeze"]["reason"].as_str().unwrap().contains("without a line end"), "{t}");
}

/// Ctrl-C while the guest is frozen: the tag and the thaw are finished
/// first, then the command says it was interrupted.
#[test]
fn an_interrupted_tag_still_thaws_the_guest() {
    let (vm, agent) = vm_with_agent(Behaviour::Late(Duration::from_secs(2)));
    let child = vm
        .tern()
        .args(["tag", "vm1", "interrupted", "--freeze", &agent.spec(), "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.commands().iter().any(|c| c == "guest-fsfreeze-freeze") {
        assert!(Instant::now() < deadline, "no freeze sent");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("interrupted"), "{err}");
    assert_eq!(agent.commands().last().map(String::as_str), Some("guest-fsfreeze-thaw"), "thawed before exiting");
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(t["consistency"], "application", "the tag was finished: {t}");
}
