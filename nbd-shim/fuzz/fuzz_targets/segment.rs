//! The cache store's untrusted input: segment files, block-hash files and
//! manifests, as `tern apply` and `tern ship` read them. Decoding must
//! never panic; what decodes must re-encode to a file that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_store::hashes::BlockHashes;
use tern_store::segment::{Encoder, Segment, SegmentBuilder};

fuzz_target!(|data: &[u8]| {
    if let Ok(seg) = Segment::decode(data, None) {
        let h = &seg.header;
        let mut b = SegmentBuilder::new(h.vm_id, h.epoch, h.first_seq);
        for (r, d) in seg.records() {
            b.push(r, d).expect("a decoded record re-pushes");
        }
        b.set_window(h.window);
        let (_, bytes) = Encoder::new(h.compression).expect("level").encode(&b).expect("encode");
        let again = Segment::decode(&bytes, Some(h.vm_id)).expect("re-encoded segment decodes");
        assert_eq!(again.len(), seg.len());
    }
    if let Ok(hashes) = BlockHashes::decode(data) {
        assert_eq!(BlockHashes::decode(&hashes.encode()).expect("round trip"), hashes);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tern_store::cache::Manifest::parse(std::path::Path::new("fuzz"), text);
    }
});
