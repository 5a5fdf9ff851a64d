//! Human-readable sizes for configuration and the command line.
//!
//! `Size` parses `4096`, `64KiB`, `512MiB`, `1GiB`, `2TiB` (and `K`, `M`,
//! `G`, `T` as the same binary units, as qemu-img does) and prints the
//! largest unit that represents the value exactly, so a size written to
//! `vm.toml` reads back as the same number of bytes.

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
}
