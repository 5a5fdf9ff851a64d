//! Human-readable sizes for configuration and the command line.
//!
//! `Size` parses `4096`, `64KiB`, `512MiB`, `1GiB`, `2TiB` (and `K`, `M`,
//! `G`, `T` as the same binary units, as qemu-img does) and prints the
//! largest unit that represents the value exactly, so a size written to
//! `vm.toml` reads back as the same number of bytes. `Rate` does the same
//! for bandwidth limits (`50MB/s`, `100Mbit/s`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Size(pub u64);

const UNITS: [(&str, u32); 5] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10), ("B", 0)];

impl Size {
    pub const fn kib(n: u64) -> Self {
        Size(n << 10)
    }
    pub const fn mib(n: u64) -> Self {
        Size(n << 20)
    }
    pub const fn gib(n: u64) -> Self {
        Size(n << 30)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// A rounded rendering for reports ("458.3 MiB"); `Display` is exact.
    pub fn approx(self) -> String {
        for (unit, shift) in UNITS {
            if shift > 0 && self.0 >= 1u64 << shift {
                return format!("{:.1} {unit}", self.0 as f64 / (1u64 << shift) as f64);
            }
        }
        format!("{} B", self.0)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, shift) in UNITS {
            if self.0 != 0 && self.0.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected a number with an optional unit like 64KiB, 1GiB"))?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "K" | "KiB" | "k" => 10,
            "M" | "MiB" => 20,
            "G" | "GiB" => 30,
            "T" | "TiB" => 40,
            other => return Err(format!("invalid size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB or TiB)")),
        };
        n.checked_mul(1u64 << shift).map(Size).ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A transfer rate in bytes per second, for bandwidth limits. Parses
/// `50MB/s`, `500KB/s`, `1GB/s` (decimal: links and object stores are sold
/// that way), `20MiB/s` (binary), `100Mbit/s`, `1Gbit/s` (bits), or a plain
/// number of bytes per second; prints the unit that represents it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate(pub u64);

/// Units of [`Rate`]: name and bytes per second, largest first within each
/// family, so `Display` picks the largest exact one.
const RATE_UNITS: [(&str, u64); 9] = [
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("Gbit", 125_000_000),
    ("Mbit", 125_000),
    ("kbit", 125),
];

impl Rate {
    pub fn bytes_per_second(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, bytes) in RATE_UNITS {
            if self.0 != 0 && self.0.is_multiple_of(bytes) {
                return write!(f, "{}{unit}/s", self.0 / bytes);
            }
        }
        write!(f, "{}B/s", self.0)
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let t = t.strip_suffix("/s").or_else(|| t.strip_suffix("ps")).unwrap_or(t);
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid rate {s:?}: expected a number and a unit like 50MB/s, 20MiB/s or 100Mbit/s")
        })?;
        let per = match unit.trim() {
            "" | "B" => 1,
            "k" | "K" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "kB" => 1_000,
            "Kbit" => 125,
            // Exact names only: "Mb" or "mb" could be bits or bytes.
            u => RATE_UNITS
                .iter()
                .find(|(name, _)| *name == u)
                .map(|(_, b)| *b)
                .ok_or_else(|| format!("invalid rate {s:?}: unknown unit {u:?} (use B, KB, MB, GB, KiB, MiB, GiB, kbit, Mbit or Gbit, per second)"))?,
        };
        n.checked_mul(per).map(Rate).ok_or_else(|| format!("rate {s:?} is too large"))
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A rate limit as given on the command line: a [`Rate`], or `unlimited`
/// (which lifts a limit the VM's policy sets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit(pub Option<Rate>);

impl FromStr for RateLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "unlimited" | "none" => Ok(RateLimit(None)),
            t => t.parse().map(|r| RateLimit(Some(r))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_exactly() {
        for (text, bytes, shown) in [
            ("1GiB", 1 << 30, "1GiB"),
            ("1G", 1 << 30, "1GiB"),
            ("64KiB", 65536, "64KiB"),
            ("1536MiB", 1536 << 20, "1536MiB"),
            ("4097", 4097, "4097B"),
        ] {
            let s: Size = text.parse().unwrap();
            assert_eq!(s.0, bytes);
            assert_eq!(s.to_string(), shown);
            assert_eq!(shown.parse::<Size>().unwrap(), s);
        }
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        for bad in ["", "GiB", "1.5GiB", "1 PB", "-1", "99999999999TiB"] {
            assert!(bad.parse::<Size>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rates_parse_in_bytes_and_bits_and_print_exactly() {
        for (text, bytes, shown) in [
            ("50MB/s", 50_000_000, "50MB/s"),
            ("20MiB/s", 20 << 20, "20MiB/s"),
            ("100Mbit/s", 12_500_000, "12500KB/s"),
            ("1Gbit/s", 125_000_000, "125MB/s"),
            ("500KB/s", 500_000, "500KB/s"),
            ("10M", 10_000_000, "10MB/s"),
            ("4097", 4097, "4097B/s"),
            ("8kbit/s", 1000, "1KB/s"),
        ] {
            let r: Rate = text.parse().unwrap();
            assert_eq!(r.0, bytes, "{text}");
            assert_eq!(r.to_string(), shown, "{text}");
            assert_eq!(shown.parse::<Rate>().unwrap(), r, "{shown}");
        }
        for bad in ["", "MB/s", "1.5MB/s", "-1MB/s", "100Mb/s", "50mb/s", "50 parsecs/s", "99999999999999GB/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?} accepted");
        }
        assert_eq!("unlimited".parse::<RateLimit>().unwrap(), RateLimit(None));
        assert_eq!("2MB/s".parse::<RateLimit>().unwrap(), RateLimit(Some(Rate(2_000_000))));
    }
}
