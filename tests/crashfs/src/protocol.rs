//! The control socket's reply payloads, as `key=value` words, kept apart
//! from the socket so both ends share one encoder and one parser.
//!
//! `powercut` replies `ok files_with_pending=N file_ops_kept=N
//! file_ops_dropped=N writes_torn=N dir_ops_kept=N dir_ops_dropped=N
//! inodes_freed=N`; `stats` replies `ok files=N dirs=N used_bytes=N
//! pending_file_ops=N pending_writes=N pending_bytes=N pending_dir_ops=N`
//! followed by `pending:<path>=<ops>,<writes>,<bytes>` per file with pending
//! ops, the path percent-escaped (space, `%`, `=`, `,` and non-printable bytes).

use crate::model::{CutStats, PendingFile, Stats};

fn cut_fields(s: &mut CutStats) -> [(&'static str, &mut u64); 7] {
    [
        ("files_with_pending", &mut s.files_with_pending),
        ("file_ops_kept", &mut s.file_ops_kept),
        ("file_ops_dropped", &mut s.file_ops_dropped),
        ("writes_torn", &mut s.writes_torn),
        ("dir_ops_kept", &mut s.dir_ops_kept),
        ("dir_ops_dropped", &mut s.dir_ops_dropped),
        ("inodes_freed", &mut s.inodes_freed),
    ]
}

fn stats_fields(s: &mut Stats) -> [(&'static str, &mut u64); 7] {
    [
        ("files", &mut s.files),
        ("dirs", &mut s.dirs),
        ("used_bytes", &mut s.used_bytes),
        ("pending_file_ops", &mut s.pending_file_ops),
        ("pending_writes", &mut s.pending_writes),
        ("pending_bytes", &mut s.pending_bytes),
        ("pending_dir_ops", &mut s.pending_dir_ops),
    ]
}

fn encode_fields<const N: usize>(fields: [(&'static str, &mut u64); N]) -> Vec<String> {
    fields.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Sets the field named `key`; false when there is none.
fn set_field<const N: usize>(fields: [(&'static str, &mut u64); N], key: &str, value: &str) -> Result<bool, String> {
    for (k, v) in fields {
        if k == key {
            *v = value.parse().map_err(|_| format!("{key}={value}: not a number"))?;
            return Ok(true);
        }
    }
    Ok(false)
}

fn split(word: &str) -> Result<(&str, &str), String> {
    word.split_once('=').ok_or_else(|| format!("{word:?} is not key=value"))
}

pub fn encode_cut(stats: &CutStats) -> String {
    encode_fields(cut_fields(&mut stats.clone())).join(" ")
}

pub fn parse_cut(text: &str) -> Result<CutStats, String> {
    let mut stats = CutStats::default();
    for word in text.split_whitespace() {
        let (key, value) = split(word)?;
        set_field(cut_fields(&mut stats), key, value)?;
    }
    Ok(stats)
}

pub fn encode_stats(stats: &Stats) -> String {
    let mut words = encode_fields(stats_fields(&mut stats.clone()));
    for p in &stats.pending {
        words.push(format!("pending:{}={},{},{}", escape(&p.path), p.ops, p.writes, p.bytes));
    }
    words.join(" ")
}

pub fn parse_stats(text: &str) -> Result<Stats, String> {
    let mut stats = Stats::default();
    for word in text.split_whitespace() {
        let (key, value) = split(word)?;
        if let Some(path) = key.strip_prefix("pending:") {
            let nums: Vec<u64> =
                value.split(',').map(str::parse).collect::<Result<_, _>>().map_err(|_| format!("{word:?}"))?;
            let [ops, writes, bytes] = nums[..] else { return Err(format!("{word:?}: want ops,writes,bytes")) };
            stats.pending.push(PendingFile { path: unescape(path)?, ops, writes, bytes });
        } else {
            set_field(stats_fields(&mut stats), key, value)?;
        }
    }
    Ok(stats)
}

fn escape(path: &str) -> String {
    let mut out = String::new();
    for b in path.bytes() {
        if b.is_ascii_graphic() && !matches!(b, b'%' | b'=' | b',') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(text: &str) -> Result<String, String> {
    let mut bytes = Vec::new();
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = tail.get(..2).and_then(|h| std::str::from_utf8(h).ok()).ok_or("short % escape")?;
            bytes.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad % escape {hex:?}"))?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `EIO`, `ENOSPC`, `EDQUOT` (any case) or a positive number.
pub fn parse_errno(text: &str) -> Option<i32> {
    match text.to_ascii_uppercase().as_str() {
        "EIO" => Some(libc::EIO),
        "ENOSPC" => Some(libc::ENOSPC),
        "EDQUOT" => Some(libc::EDQUOT),
        n => n.parse().ok().filter(|&n| n > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_stats_round_trip() {
        let stats = CutStats { file_ops_kept: 3, writes_torn: 1, inodes_freed: 9, ..CutStats::default() };
        assert_eq!(parse_cut(&encode_cut(&stats)), Ok(stats));
    }

    #[test]
    fn stats_round_trip_with_awkward_paths() {
        let pending = PendingFile { path: "/a b/c=d,%é".into(), ops: 3, writes: 2, bytes: 100 };
        let stats = Stats { files: 2, pending_writes: 2, pending: vec![pending], ..Stats::default() };
        let text = encode_stats(&stats);
        assert_eq!(text.split_whitespace().count(), 8, "one word per field and pending file: {text}");
        assert_eq!(parse_stats(&text), Ok(stats));
    }

    #[test]
    fn errno_by_name_or_number() {
        assert_eq!(parse_errno("eio"), Some(libc::EIO));
        assert_eq!(parse_errno("EDQUOT"), Some(libc::EDQUOT));
        assert_eq!(parse_errno("28"), Some(28));
        assert_eq!(parse_errno("0"), None);
        assert_eq!(parse_errno("EPERM"), None);
    }
}
