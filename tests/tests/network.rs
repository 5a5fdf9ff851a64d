//! Failover onto the target network (issue 22): launch settings and the
//! network map recorded by `tern enable`, carried to the target in the
//! manifest, turned into launch.sh by `tern failover`, and the bridges
//! checked by `--boot`. The guest booted on a bridge is in
//! `scripts/vm-test.sh net`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tern_system_tests::*;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).expect("json")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A sparse image and empty cache and target directories in `dir`.
fn sites(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let img = dir.join("disk0.img");
    std::fs::File::create(&img).unwrap().set_len(4 << 20).unwrap();
    for d in ["cache", "target"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    img
}

fn enable(dir: &Path, extra: &[&str]) -> Output {
    let img = sites(dir);
    let mut c = tern_with_state(&dir.join("state"));
    c.args(["enable", "vm1", "--cache"])
        .arg(dir.join("cache"))
        .arg("--target")
        .arg(dir.join("target"))
        .arg("--disk")
        .arg(format!("disk0={}", img.display()))
        .args(["--journal-size", "64MiB"])
        .args(extra);
    c.output().expect("tern enable")
}

#[test]
fn enable_records_the_launch_settings_and_refuses_bad_ones_naming_them() {
    let root = tempfile::tempdir_in(test_root()).unwrap();
    let ok = root.path().join("ok");
    let out = enable(
        &ok,
        &[
            "--memory",
            "512MiB",
            "--cpus",
            "3",
            "--nic",
            "br-src",
            "--nic",
            "br-b,mac=52:54:00:AA:BB:CC,model=e1000",
            "--network",
            "br-src=br-dr",
            "--kernel",
            "/boot/vmlinuz",
            "--append",
            "console=ttyS0 root=/dev/vda",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let toml = std::fs::read_to_string(ok.join("state/vm1/vm.toml")).unwrap();
    for want in [
        "[policy.network]\nbr-src = \"br-dr\"",
        "[launch]\nmemory = \"512MiB\"\ncpus = 3\nkernel = \"/boot/vmlinuz\"\nappend = \"console=ttyS0 root=/dev/vda\"",
        "[[launch.nic]]\nbridge = \"br-b\"\nmac = \"52:54:00:aa:bb:cc\"\nmodel = \"e1000\"",
    ] {
        assert!(toml.contains(want), "{want:?} not in\n{toml}");
    }
    // The NIC without a MAC got one made from the VM's id: recorded, so
    // every failover gives it the same.
    let id = toml.lines().find_map(|l| l.strip_prefix("id = \"")).unwrap().replace('-', "");
    let mac = format!("52:54:00:{}:{}:{}", &id[0..2], &id[2..4], &id[4..6]);
    assert!(toml.contains(&format!("bridge = \"br-src\"\nmac = \"{mac}\"\nmodel = \"virtio-net-pci\"")), "{toml}");
    // A VM enabled without launch settings has no [launch] (vm.toml as
    // before), and the two read back (`tern ship` loads them).
    let plain = root.path().join("plain");
    assert!(enable(&plain, &[]).status.success());
    let plain_toml = std::fs::read_to_string(plain.join("state/vm1/vm.toml")).unwrap();
    assert!(!plain_toml.contains("launch") && !plain_toml.contains("network"), "{plain_toml}");
    for d in [&ok, &plain] {
        run(tern_with_state(&d.join("state")).args(["ship", "vm1", "--once"]));
    }
    let manifest = std::fs::read_to_string(ok.join("cache/vm1/manifest.toml")).unwrap();
    assert!(manifest.contains(&format!("mac = \"{mac}\"")), "{manifest}");
    let manifest = std::fs::read_to_string(plain.join("cache/vm1/manifest.toml")).unwrap();
    assert!(!manifest.contains("launch") && !manifest.contains("network"), "{manifest}");

    for (i, (args, want)) in [
        (&["--nic", "br0,mac=52:54:00:12:34"][..], "MAC address \"52:54:00:12:34\" must be six pairs"),
        (&["--nic", "br0,mac=01:00:5e:00:00:01"], "is a multicast address"),
        (&["--nic", "br-0123456789abc"], "invalid bridge name \"br-0123456789abc\""),
        (&["--nic", "br:0"], "invalid bridge name \"br:0\""),
        (&["--nic", "br0", "--network", "br1=br-dr"], "no NIC of the VM is on 'br1'"),
        (&["--nic", "br0", "--network", "br0=a", "--network", "br0=b"], "maps bridge 'br0' twice"),
        (&["--nic", "br0,mac=52:54:00:00:00:01", "--nic", "br1,mac=52:54:00:00:00:01"], "the same MAC address"),
        (&["--nic", "br0,speed=10"], "expected BRIDGE[,mac=MAC][,model=MODEL]"),
        (&["--kernel", "vmlinuz"], "must be an absolute path"),
        (&["--memory", "1MiB"], "launch memory 1MiB"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = root.path().join(format!("bad{i}"));
        let out = enable(&dir, args);
        let err = stderr(&out);
        assert!(!out.status.success() && err.contains(want), "{args:?}: want {want:?} in: {err}");
        assert!(!dir.join("state/vm1").exists(), "{args:?}: a refused enable left the VM");
    }
}

/// A protected VM, shipped and applied, whose vm.toml gained launch
/// settings after its first ship: two NICs, one on a mapped bridge.
fn vm_with_launch_settings() -> TestVm {
    let vm = TestVm::new(VmSpec { disk_size: 4 << 20, journal_size: "64MiB", ..Default::default() });
    vm.ship_once();
    let manifest = vm.cache_dir().join("manifest.toml");
    assert!(!std::fs::read_to_string(&manifest).unwrap().contains("launch"));
    let config = vm.state.join("vm1/vm.toml");
    let mut toml = std::fs::read_to_string(&config).unwrap();
    let disks = toml.find("[[disk]]").unwrap();
    toml.insert_str(
        disks,
        "[policy.network]\nbr-src = \"br-dr\"\n\n[launch]\nmemory = \"512MiB\"\ncpus = 3\nkernel = \"/srv/vmlinuz\"\nappend = \"console=ttyS0 it's\"\n\n[[launch.nic]]\nbridge = \"br-src\"\nmac = \"52:54:00:00:00:01\"\n\n[[launch.nic]]\nbridge = \"br-mgmt\"\n\n",
    );
    std::fs::write(&config, toml).unwrap();
    // The next ship carries them to the target (the manifest is replaced).
    let log = vm.ship_once();
    let shipped = std::fs::read_to_string(&manifest).unwrap();
    assert!(shipped.contains("br-src = \"br-dr\"") && shipped.contains("cpus = 3"), "{shipped}");
    assert!(shipped.contains("bridge = \"br-mgmt\"\nmac = \"52:54:00:"), "the made MAC is written out: {shipped}");
    assert!(log.contains("takes the policy and launch settings of vm.toml"), "{log}");
    vm
}

/// `tern failover` at a target site that knows the VM only from the cache
/// (a state directory of its own, no vm.toml).
fn failover_at_target(vm: &TestVm, args: &[&str]) -> Output {
    let mut c = tern_with_state(&vm.dir.path().join("target-state"));
    c.args(["failover", "vm1", "--json", "--cache"])
        .arg(vm.dir.path().join("cache"))
        .arg("--target")
        .arg(vm.dir.path().join("target"))
        .args(args);
    c.output().expect("tern failover")
}

fn failover_ok(vm: &TestVm, args: &[&str]) -> (serde_json::Value, String, PathBuf) {
    let out = failover_at_target(vm, args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    let j = json(&String::from_utf8_lossy(&out.stdout));
    let dir = PathBuf::from(j["directory"].as_str().unwrap());
    (j, std::fs::read_to_string(dir.join("launch.sh")).unwrap(), dir)
}

#[test]
fn launch_sh_has_the_launch_settings_and_the_bridges_the_failover_chose() {
    let vm = vm_with_launch_settings();
    let mac1 = {
        let m = std::fs::read_to_string(vm.cache_dir().join("manifest.toml")).unwrap();
        let at = m.find("bridge = \"br-mgmt\"\nmac = \"").unwrap() + "bridge = \"br-mgmt\"\nmac = \"".len();
        m[at..at + 17].to_string()
    };
    let common = |sh: &str| {
        assert!(sh.contains("-m 512M -smp 3"), "{sh}");
        assert!(sh.contains("-kernel /srv/vmlinuz"), "{sh}");
        assert!(sh.contains(r"-append 'console=ttyS0 it'\''s'"), "quoted for the shell: {sh}");
    };

    // A test failover without --test-network: no network at all.
    let (j, sh, _) = failover_ok(&vm, &["--test", "--latest", "--name", "none"]);
    common(&sh);
    assert!(sh.contains("-nic none") && !sh.contains("-netdev"), "{sh}");
    assert_eq!(j["network"], serde_json::json!([]));

    // --test-network: every NIC on that bridge, with its recorded MAC.
    let (j, sh, dir) = failover_ok(&vm, &["--test", "--latest-point", "--name", "iso", "--test-network", "br-iso"]);
    common(&sh);
    assert!(!sh.contains("-nic none"), "{sh}");
    for (i, mac, model) in [(0, "52:54:00:00:00:01", "virtio-net-pci"), (1, mac1.as_str(), "virtio-net-pci")] {
        let up = dir.join(format!("nic{i}-up"));
        assert!(
            sh.contains(&format!(
                "-netdev tap,id=net{i},script={},downscript=no -device {model},netdev=net{i},mac={mac}",
                up.display()
            )),
            "NIC {i}: {sh}"
        );
        assert!(std::fs::read_to_string(&up).unwrap().contains("master br-iso"), "{}", up.display());
        assert_eq!(j["network"][i]["bridge"], "br-iso");
        assert_eq!(j["network"][i]["mac"], mac);
    }
    assert!(sh.contains("[ -d /sys/class/net/br-iso/bridge ] ||"), "launch.sh checks the bridge: {sh}");
    let info = std::fs::read_to_string(dir.join("failover.toml")).unwrap();
    assert!(info.contains("source-bridge = \"br-src\"\nbridge = \"br-iso\""), "{info}");

    // The real failover: the mapped NIC on br-dr, the unmapped one on a
    // bridge of its own bridge's name.
    let (j, sh, dir) = failover_ok(&vm, &["--latest-point"]);
    common(&sh);
    assert_eq!(j["network"][0]["bridge"], "br-dr");
    assert_eq!(j["network"][0]["source_bridge"], "br-src");
    assert_eq!(j["network"][1]["bridge"], "br-mgmt");
    assert!(std::fs::read_to_string(dir.join("nic0-up")).unwrap().contains("master br-dr"));
    assert!(std::fs::read_to_string(dir.join("nic1-up")).unwrap().contains("master br-mgmt"));
    let info = std::fs::read_to_string(dir.join("failover.toml")).unwrap();
    assert!(
        info.contains("source-bridge = \"br-src\"\nbridge = \"br-dr\"")
            && info.contains("source-bridge = \"br-mgmt\"\nbridge = \"br-mgmt\""),
        "{info}"
    );
}

#[test]
fn boot_refuses_a_bridge_that_does_not_exist_naming_it_and_starts_nothing() {
    let vm = vm_with_launch_settings();
    let failovers = vm.dir.path().join("target/vm1/failover");
    let out = failover_at_target(&vm, &["--test", "--latest", "--boot", "--test-network", "br-nope"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no bridge 'br-nope' (NIC 0, MAC 52:54:00:00:00:01; NIC 1, MAC 52:54:00:")
            && err.contains("ip link add br-nope type bridge")
            && err.contains("nothing was started"),
        "{err}"
    );
    assert!(!failovers.exists(), "a refused --boot made a failover");
    // A real failover onto a missing bridge fences nothing either.
    let out = failover_at_target(&vm, &["--latest-point", "--boot"]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("no bridge 'br-dr' (NIC 0, MAC 52:54:00:00:00:01)"), "{err}");
    assert!(!vm.cache_dir().join("fence.toml").exists(), "the refused real failover fenced the source");
    assert!(!failovers.exists());
    // Without --boot, the failover is made (launch.sh checks the bridge
    // when it runs): --test-network does not need the bridge yet.
    let out = failover_at_target(&vm, &["--test", "--latest", "--test-network", "br-nope"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let launch = failovers.join("test-1/launch.sh");
    let ran = Command::new(&launch).output().unwrap();
    let err = stderr(&ran);
    assert!(!ran.status.success() && err.contains("there is no bridge br-nope on this host"), "{err}");
    // --test-network is a test failover's.
    let out = failover_at_target(&vm, &["--latest-point", "--test-network", "br-iso"]);
    assert!(!out.status.success() && stderr(&out).contains("--test"), "{}", stderr(&out));
}

/// `failover --group --boot` checks every member's bridges before it
/// fails any over: a member whose mapped bridge is missing leaves the
/// whole group untouched (no failover, no fence), even a member sorted
/// before it whose bridge is fine.
#[test]
fn a_group_boot_checks_every_members_bridges_before_failing_any_over() {
    let dir = tempfile::Builder::new().prefix("tern-net-group-").tempdir_in(test_root()).unwrap();
    let root = dir.path();
    let state = root.join("state");
    for d in ["cache", "target"] {
        std::fs::create_dir(root.join(d)).unwrap();
    }
    // "a" has no NIC (nothing to check), "b" one on a bridge mapped to one
    // this host does not have.
    for (vm, nic) in [("a", &[][..]), ("b", &["--nic", "br-src", "--network", "br-src=br-gone"][..])] {
        let img = root.join(format!("{vm}.img"));
        std::fs::File::create(&img).unwrap().set_len(4 << 20).unwrap();
        run(tern_with_state(&state)
            .args(["enable", vm, "--journal-size", "64MiB", "--cache"])
            .arg(root.join("cache"))
            .arg("--target")
            .arg(root.join("target"))
            .arg("--disk")
            .arg(format!("disk0={}", img.display()))
            .args(nic));
    }
    run(tern_with_state(&state).args(["group", "create", "g", "a", "b"]));
    let served: Vec<Served> = ["a", "b"]
        .iter()
        .map(|vm| {
            let socket = root.join(format!("{vm}.sock"));
            let log = root.join(format!("serve-{vm}.log"));
            let child = tern_with_state(&state)
                .args(["serve", vm, "--listen"])
                .arg(format!("unix:{}", socket.display()))
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let mut s = Served::adopt(child, log.clone(), "tern serve");
            wait_listening(&socket, &mut s.child, || std::fs::read_to_string(&log).unwrap_or_default());
            s
        })
        .collect();
    run(tern_with_state(&state).args(["tag", "--group", "g", "cut"]));
    for s in served {
        s.stop();
    }
    for vm in ["a", "b"] {
        run(tern_with_state(&state).args(["ship", vm, "--once"]));
    }
    run(tern_with_state(&state)
        .args(["apply", "--once", "--cache"])
        .arg(root.join("cache"))
        .arg("--target")
        .arg(root.join("target")));

    let group_failover = |args: &[&str]| {
        let out = tern_with_state(&state).args(["failover", "--group", "g"]).args(args).output().unwrap();
        (out.status.success(), stderr(&out))
    };
    let untouched = || {
        for vm in ["a", "b"] {
            assert!(!root.join(format!("target/{vm}/failover")).exists(), "VM {vm} was failed over");
            assert!(!root.join(format!("cache/{vm}/fence.toml")).exists(), "VM {vm} was fenced");
        }
    };
    let (ok, err) = group_failover(&["--boot"]);
    assert!(
        !ok && err.contains("VM 'b': no bridge 'br-gone' (NIC 0, MAC 52:54:00:")
            && err.contains("nothing is failed over"),
        "{err}"
    );
    untouched();
    let (ok, err) = group_failover(&["--test", "--boot", "--test-network", "br-nope"]);
    assert!(!ok && err.contains("VM 'b': no bridge 'br-nope'"), "{err}");
    untouched();
    // Without --boot the group fails over (test), b's NIC on the bridge
    // asked for.
    let (ok, err) = group_failover(&["--test", "--test-network", "br-iso", "--name", "drill"]);
    assert!(ok, "{err}");
    let info = std::fs::read_to_string(root.join("target/b/failover/drill/failover.toml")).unwrap();
    assert!(info.contains("bridge = \"br-iso\""), "{info}");
    let launch = std::fs::read_to_string(root.join("target/a/failover/drill/launch.sh")).unwrap();
    assert!(launch.contains("-nic none"), "{launch}");
}

/// `--test-network` for a VM with no NIC would give it no network without
/// a word: refused, saying how to add one.
#[test]
fn test_network_for_a_vm_without_a_nic_is_refused() {
    let vm = TestVm::new(VmSpec { disk_size: 4 << 20, journal_size: "64MiB", ..Default::default() });
    vm.ship_once();
    let out = failover_at_target(&vm, &["--test", "--latest", "--test-network", "br-iso"]);
    let err = stderr(&out);
    assert!(
        !out.status.success()
            && err.contains("--test-network br-iso: VM 'vm1' has no NIC in its launch settings")
            && err.contains("`--nic` at `tern enable`"),
        "{err}"
    );
    assert!(!vm.dir.path().join("target/vm1/failover").exists());
}

/// A test failover whose manifest cannot be read does not know the VM's
/// NICs: without --test-network it starts with the defaults and no network
/// (said), with one it is refused with the cache's error, not a "no NIC"
/// that would send the operator to the source's settings.
#[test]
fn test_network_with_an_unreadable_manifest_says_the_cache_is_the_trouble() {
    let vm = vm_with_launch_settings();
    failover_ok(&vm, &["--test", "--latest", "--name", "first"]); // applied: a point here
    std::fs::write(vm.cache_dir().join("manifest.toml"), "version = \"not a number\"\n").unwrap();
    // (--latest-point: the newest point here, nothing read from the cache.)
    let out = failover_at_target(&vm, &["--test", "--latest-point", "--test-network", "br-iso"]);
    let err = stderr(&out);
    assert!(
        !out.status.success()
            && err.contains(
                "--test-network br-iso: its NICs are in its launch settings, which cannot be read from the cache"
            )
            && err.contains("manifest")
            && !err.contains("has no NIC"),
        "{err}"
    );
    let made: Vec<_> = std::fs::read_dir(vm.dir.path().join("target/vm1/failover"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(made, ["first"], "nothing made");
    let out = failover_at_target(&vm, &["--test", "--latest-point", "--name", "plain"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("cannot be read from the cache") && err.contains("no NIC"), "{err}");
    let j = json(&String::from_utf8_lossy(&out.stdout));
    let sh = std::fs::read_to_string(PathBuf::from(j["directory"].as_str().unwrap()).join("launch.sh")).unwrap();
    assert!(sh.contains("-nic none"), "{sh}");
}

/// `tern reprotect` gives the reverse direction the VM's launch settings,
/// each NIC on the bridge it ran on after the failover (br-dr) and the
/// map inverted (br-dr=br-src), so a failback lands on the original
/// bridge; the MACs stay.
#[test]
fn reprotect_runs_the_reverse_direction_on_the_failed_over_bridges() {
    let vm = vm_with_launch_settings();
    let root = vm.dir.path();
    let out = failover_at_target(&vm, &["--latest"]);
    assert!(out.status.success(), "{}", stderr(&out));
    run(tern_with_state(&root.join("target-state"))
        .args(["commit", "vm1", "--cache"])
        .arg(root.join("cache"))
        .arg("--target")
        .arg(root.join("target")));
    for d in ["cache2", "target2"] {
        std::fs::create_dir(root.join(d)).unwrap();
    }
    run(tern_with_state(&root.join("state-b"))
        .args(["reprotect", "vm1", "--cache"])
        .arg(root.join("cache2"))
        .arg("--target")
        .arg(root.join("target2"))
        .arg("--from-target")
        .arg(root.join("target"))
        .arg("--from-cache")
        .arg(root.join("cache")));
    let back = std::fs::read_to_string(root.join("state-b/vm1/vm.toml")).unwrap();
    assert!(back.contains("[policy.network]\nbr-dr = \"br-src\"\n"), "{back}");
    assert!(back.contains("[launch]\nmemory = \"512MiB\"\ncpus = 3\n"), "{back}");
    assert!(back.contains("bridge = \"br-dr\"\nmac = \"52:54:00:00:00:01\""), "{back}");
    assert!(back.contains("bridge = \"br-mgmt\"\nmac = \"52:54:00:"), "{back}");
}
