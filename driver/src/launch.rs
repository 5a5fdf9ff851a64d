//! A VM's launch settings (`[launch]` in `vm.toml`, `launch` in the
//! manifest): what a failover needs to start it at the target site —
//! memory, CPUs, an optional direct kernel boot, and its NICs with the
//! bridge each is on at the source and its MAC address. The network map
//! (`network` in the policy) says which target bridge stands for each
//! source bridge.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::units::Size;

/// Most NICs one VM may have.
pub const MAX_NICS: usize = 32;
/// The NIC model when none is given.
pub const DEFAULT_NIC_MODEL: &str = "virtio-net-pci";

/// `[launch]`: how a failover starts the VM. Every field has a default, so
/// a `vm.toml` without it (or a manifest without `launch`) means 2 GiB, 2
/// CPUs, no NIC: what launch.sh did before there were launch settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct LaunchConfig {
    /// The VM's memory. Default: 2GiB.
    pub memory: Size,
    /// Its virtual CPUs. Default: 2.
    pub cpus: u32,
    /// Direct kernel boot: the kernel, initrd and command line, as paths at
    /// the target site. Default: none (the disks' firmware boot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// The NICs, in the order the guest sees them.
    #[serde(rename = "nic", skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicConfig>,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        LaunchConfig { memory: Size::gib(2), cpus: 2, kernel: None, initrd: None, append: None, nics: Vec::new() }
    }
}

impl LaunchConfig {
    pub fn is_default(&self) -> bool {
        *self == LaunchConfig::default()
    }

    /// The same settings with every NIC's MAC address written out (the
    /// generated one where none was given), as the target must see them.
    pub fn with_macs(&self, vm_id: &uuid::Uuid) -> LaunchConfig {
        let mut out = self.clone();
        for (i, nic) in out.nics.iter_mut().enumerate() {
            if nic.mac.is_none() {
                nic.mac = Some(generated_mac(vm_id, i));
            }
        }
        out
    }

    /// The settings of the reverse direction (`tern reprotect`): each NIC
    /// on the bridge `network` maps it to (the one it runs on at the
    /// failover site), and the map inverted, so failing back puts it on
    /// its original bridge. A target bridge two source bridges map to is
    /// left out of the inverted map (its NICs keep that bridge's name).
    pub fn reversed(&self, network: &BTreeMap<String, String>) -> (LaunchConfig, BTreeMap<String, String>) {
        let mut out = self.clone();
        for nic in &mut out.nics {
            if let Some(target) = network.get(&nic.bridge) {
                nic.bridge = target.clone();
            }
        }
        let mut back = BTreeMap::new();
        for (source, target) in network {
            if network.values().filter(|t| *t == target).count() == 1 && source != target {
                back.insert(target.clone(), source.clone());
            }
        }
        (out, back)
    }

    /// Checks everything serde cannot; `network` is the policy's map,
    /// every source bridge of which must be some NIC's.
    pub fn validate(&self, network: &BTreeMap<String, String>) -> Result<(), String> {
        let memory = self.memory.bytes();
        if !(16 << 20..=16 << 40).contains(&memory) || !memory.is_multiple_of(1 << 20) {
            return Err(format!("launch memory {} must be a whole number of MiB between 16MiB and 16TiB", self.memory));
        }
        if !(1..=255).contains(&self.cpus) {
            return Err(format!("launch cpus {} must be between 1 and 255", self.cpus));
        }
        for (what, p) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if let Some(p) = p {
                if !p.is_absolute() || p.as_os_str().len() > 4096 {
                    return Err(format!("launch {what} {} must be an absolute path (at the target site)", p.display()));
                }
            }
        }
        if (self.initrd.is_some() || self.append.is_some()) && self.kernel.is_none() {
            return Err("launch initrd and append need a kernel (direct kernel boot)".into());
        }
        if let Some(a) = &self.append {
            if a.len() > 4096 || a.chars().any(|c| c.is_control()) {
                return Err("launch append must be one line of at most 4096 bytes".into());
            }
        }
        if self.nics.len() > MAX_NICS {
            return Err(format!("a VM may have at most {MAX_NICS} NICs, found {}", self.nics.len()));
        }
        for (i, nic) in self.nics.iter().enumerate() {
            validate_bridge(&nic.bridge).map_err(|e| format!("NIC {i}: {e}"))?;
            if let Some(mac) = &nic.mac {
                validate_mac(mac).map_err(|e| format!("NIC {i}: {e}"))?;
                if let Some(j) = self.nics[..i].iter().position(|o| o.mac.as_deref().is_some_and(|m| same_mac(m, mac)))
                {
                    return Err(format!("NICs {j} and {i} have the same MAC address {mac}: give each its own"));
                }
            }
            validate_model(&nic.model).map_err(|e| format!("NIC {i}: {e}"))?;
        }
        for (source, target) in network {
            validate_bridge(source).map_err(|e| format!("policy network: {e}"))?;
            validate_bridge(target).map_err(|e| format!("policy network: {e}"))?;
            if !self.nics.iter().any(|n| &n.bridge == source) {
                return Err(format!(
                    "policy network maps bridge '{source}' (to '{target}'), but no NIC of the VM is on '{source}': add the NIC (--nic {source}) or drop the mapping"
                ));
            }
        }
        Ok(())
    }
}

/// `[[launch.nic]]`: one network interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NicConfig {
    /// The bridge it is on at the source site.
    pub bridge: String,
    /// Its MAC address, kept across a failover (a DHCP reservation, a
    /// licence, the guest's own interface naming may depend on it).
    /// `tern enable` writes a generated one when none is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The qemu device model. Default: virtio-net-pci.
    #[serde(default = "default_model")]
    pub model: String,
}

fn default_model() -> String {
    DEFAULT_NIC_MODEL.into()
}

/// A stable, locally administered unicast MAC address for NIC `index` of
/// the VM `vm_id`: 52:54:00 (qemu's prefix) and three bytes from the id
/// and the index, so the same VM gets the same one on every enable of the
/// same id and its NICs never share one.
pub fn generated_mac(vm_id: &uuid::Uuid, index: usize) -> String {
    let b = vm_id.as_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2].wrapping_add(index as u8))
}

fn same_mac(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// A MAC address as qemu takes it: six pairs of hex digits separated by
/// `:`, and unicast (a multicast address on a NIC breaks its network).
pub fn validate_mac(mac: &str) -> Result<(), String> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if !ok {
        return Err(format!(
            "MAC address {mac:?} must be six pairs of hex digits separated by ':' (52:54:00:12:34:56)"
        ));
    }
    let first = u8::from_str_radix(parts[0], 16).expect("checked hex");
    if first & 1 != 0 {
        return Err(format!(
            "MAC address {mac} is a multicast address (the low bit of its first byte is set): a NIC needs a unicast one, like 52:54:00:12:34:56"
        ));
    }
    Ok(())
}

/// A bridge name as Linux takes an interface name (1 to 15 bytes, no '/',
/// ':' or whitespace, not '.' or '..'), and without ',' (qemu's option
/// separator) or other characters outside printable ASCII.
pub fn validate_bridge(name: &str) -> Result<(), String> {
    let ok = (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && !b"/:,".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid bridge name {name:?}: a Linux interface name is 1 to 15 bytes without '/', ':', ',' or whitespace"
        ))
    }
}

/// A qemu NIC device model (virtio-net-pci, e1000, ...).
fn validate_model(model: &str) -> Result<(), String> {
    let ok = !model.is_empty()
        && model.len() <= 64
        && model.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid NIC model {model:?}: a qemu device name like virtio-net-pci or e1000"))
    }
}

/// `--nic BRIDGE[,mac=MAC][,model=MODEL]` on the command line.
pub fn parse_nic(s: &str) -> Result<NicConfig, String> {
    let mut parts = s.split(',');
    let bridge = parts.next().unwrap_or_default().to_owned();
    validate_bridge(&bridge)?;
    let mut nic = NicConfig { bridge, mac: None, model: default_model() };
    for p in parts {
        match p.split_once('=') {
            Some(("mac", m)) => {
                validate_mac(m)?;
                nic.mac = Some(m.to_ascii_lowercase());
            }
            Some(("model", m)) => {
                validate_model(m)?;
                nic.model = m.to_owned();
            }
            _ => return Err(format!("{s:?}: expected BRIDGE[,mac=MAC][,model=MODEL], not {p:?}")),
        }
    }
    Ok(nic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_bridges_are_checked() {
        for good in ["52:54:00:12:34:56", "02:00:00:00:00:01", "AA:bb:cc:dd:ee:ff"] {
            validate_mac(good).unwrap();
        }
        for bad in ["52:54:00:12:34", "52:54:00:12:34:5g", "52-54-00-12-34-56", "01:00:5e:00:00:01", "525400123456"] {
            assert!(validate_mac(bad).is_err(), "{bad} accepted");
        }
        assert!(validate_mac("01:00:5e:00:00:01").unwrap_err().contains("multicast"));
        for good in ["br0", "br-src", "virbr0", "a", "x23456789012345"] {
            validate_bridge(good).unwrap();
        }
        for bad in ["", "x234567890123456", "br/0", "br 0", "br:0", "br,0", ".", "..", "bré"] {
            assert!(validate_bridge(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn generated_macs_are_stable_unicast_and_distinct() {
        let id = uuid::Uuid::from_bytes([0xab; 16]);
        assert_eq!(generated_mac(&id, 0), "52:54:00:ab:ab:ab");
        assert_eq!(generated_mac(&id, 1), "52:54:00:ab:ab:ac");
        validate_mac(&generated_mac(&id, 0)).unwrap();
        let l = LaunchConfig {
            nics: vec![parse_nic("br0").unwrap(), parse_nic("br1,model=e1000").unwrap()],
            ..Default::default()
        }
        .with_macs(&id);
        assert_eq!(l.nics[1].mac.as_deref(), Some("52:54:00:ab:ab:ac"));
        assert_eq!(l.nics[1].model, "e1000");
        l.validate(&BTreeMap::new()).unwrap();
    }

    #[test]
    fn the_reverse_direction_runs_on_the_mapped_bridges_and_maps_back() {
        let l =
            LaunchConfig { nics: vec![parse_nic("br-a").unwrap(), parse_nic("br-b").unwrap()], ..Default::default() };
        let map: BTreeMap<String, String> =
            [("br-a", "br-dr"), ("br-b", "br-b")].iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let (back, back_map) = l.reversed(&map);
        assert_eq!(back.nics[0].bridge, "br-dr");
        assert_eq!(back.nics[1].bridge, "br-b");
        assert_eq!(back_map.into_iter().collect::<Vec<_>>(), [("br-dr".to_string(), "br-a".to_string())]);
        back.validate(&l.reversed(&map).1).unwrap();
    }

    #[test]
    fn launch_validation_names_what_is_wrong() {
        let nic = |s: &str| parse_nic(s).unwrap();
        let mut l = LaunchConfig { nics: vec![nic("br-src,mac=52:54:00:00:00:01")], ..Default::default() };
        let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        l.validate(&map(&[("br-src", "br-dr")])).unwrap();
        let err = l.validate(&map(&[("br-other", "br-dr")])).unwrap_err();
        assert!(err.contains("'br-other'") && err.contains("no NIC"), "{err}");
        l.nics.push(nic("br-src,mac=52:54:00:00:00:01"));
        assert!(l.validate(&map(&[])).unwrap_err().contains("same MAC"));
        l.nics.pop();
        l.memory = Size::mib(8);
        assert!(l.validate(&map(&[])).unwrap_err().contains("memory"));
        l.memory = Size::gib(1);
        l.cpus = 0;
        assert!(l.validate(&map(&[])).unwrap_err().contains("cpus"));
        l.cpus = 1;
        l.append = Some("console=ttyS0".into());
        assert!(l.validate(&map(&[])).unwrap_err().contains("need a kernel"));
        l.kernel = Some("vmlinuz".into());
        assert!(l.validate(&map(&[])).unwrap_err().contains("absolute"));
        assert!(parse_nic("br0,speed=10").unwrap_err().contains("BRIDGE[,mac=MAC]"));
        assert!(parse_nic("br0,mac=zz").is_err());
    }
}
