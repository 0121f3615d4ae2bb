//! Dropping the backing reference from a header: the plan of writes that
//! turns an overlay into a standalone image once it holds everything.
//!
//! What it owns: which bytes of the header area change, and in which order,
//! so that the image opens correctly after a crash at any point. It does no
//! I/O: [`drop_backing_plan`] returns the writes, and the caller performs
//! each one followed by an fdatasync before the next (`Meta`).
//!
//! The end state is what `qemu-img rebase -b ''` leaves: backing_file_offset
//! and backing_file_size are 0, the backing format extension is gone, and so
//! is backfill's remote-image pin (`qcow2::pin`, which only describes the
//! backing), the other extensions are kept in order, and the old name's
//! bytes are zeroed.
//!
//! Crash safety: a write of a few bytes inside one 512-byte sector lands
//! whole or not at all (the assumption QEMU's own header updates make);
//! a longer write may tear. The plan only changes meaning through short,
//! single-sector writes, and every longer write goes where nothing reads:
//!
//! 1. bytes 8..20 (backing_file_offset, backing_file_size) become 0: from
//!    here on the image is standalone. The old extension list is still
//!    whole, and a backing format extension without a backing file is
//!    ignored by readers (QEMU keeps it only to name a backing file's
//!    format; `Header::parse` does the same).
//! 2. the first 8 bytes of the extension area become the end marker: the
//!    list is empty (every extension QEMU writes is optional; autoclear
//!    features, such as bitmaps, were cleared when the image was opened for
//!    writing).
//! 3. the new list, except its first 8 bytes, followed by zeros to the end
//!    of the header cluster (over the old list's tail and the old name), is
//!    written behind that end marker, where no reader looks; a torn write
//!    here is harmless.
//! 4. the new list's first 8 bytes (the first extension's type and length)
//!    replace the end marker, which makes the new list visible at once.
//!
//! Each step is skipped when the bytes already hold its result, so a plan
//! computed from a header left half-way by a crash finishes the job; a
//! crash after step 2 and before step 4 leaves an image without header
//! extensions, which is valid (all of them are optional: the feature name
//! table only names bits, and autoclear features such as bitmaps were
//! already invalidated), and a new plan has nothing left to do.

use super::header::{Header, V2_HEADER_LEN};

/// One step of the plan: write `bytes` at `offset`, then fdatasync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderWrite {
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// The writes that drop the backing reference of the image whose header
/// area (its first cluster, or the whole file if shorter) is `area` and
/// parses as `header`. Empty when the image has no backing reference and
/// no backing format extension left.
pub fn drop_backing_plan(area: &[u8], header: &Header) -> Vec<HeaderWrite> {
    let hdr_len = if header.version >= 3 {
        header.header_length as usize
    } else {
        V2_HEADER_LEN as usize
    };
    let mut new_list = Vec::new();
    // The remote-image pin belongs to the backing reference and goes with it.
    for e in header
        .extensions
        .iter()
        .filter(|e| e.kind != super::pin::EXT_REMOTE_PIN)
    {
        new_list.extend_from_slice(&e.kind.to_be_bytes());
        new_list.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
        new_list.extend_from_slice(&e.data);
        new_list.resize(new_list.len().next_multiple_of(8), 0);
    }
    new_list.extend_from_slice(&[0u8; 8]);
    // Nothing but the header, its extensions and the backing name lives in
    // the first cluster (qcow2.rst), so everything after the new list is
    // zeroed: the old list's tail and the old name, wherever it was (a
    // resumed plan no longer knows, once backing_file_offset is 0).
    let region_end = area.len();
    let mut plan = Vec::new();
    if region_end < hdr_len + new_list.len() {
        // Cannot happen for a header `Header::parse` accepted (the new list
        // is the old one minus an extension); refuse rather than cut it.
        return plan;
    }
    if area[8..20].iter().any(|&b| b != 0) {
        plan.push(HeaderWrite {
            offset: 8,
            bytes: vec![0; 12],
        });
    }
    let mut target = vec![0u8; region_end - hdr_len];
    target[..new_list.len()].copy_from_slice(&new_list);
    if area[hdr_len..region_end] == target[..] {
        return plan;
    }
    if area[hdr_len..hdr_len + 8].iter().any(|&b| b != 0) {
        plan.push(HeaderWrite {
            offset: hdr_len as u64,
            bytes: vec![0; 8],
        });
    }
    if area[hdr_len + 8..region_end] != target[8..] {
        plan.push(HeaderWrite {
            offset: hdr_len as u64 + 8,
            bytes: target[8..].to_vec(),
        });
    }
    if target[..8].iter().any(|&b| b != 0) {
        plan.push(HeaderWrite {
            offset: hdr_len as u64,
            bytes: target[..8].to_vec(),
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::header::{qemu_feature_table, EXT_BITMAPS};

    /// A header area as QEMU lays it out, with a backing file.
    fn backed() -> (Vec<u8>, Header) {
        let mut h = Header::parse(&sample_area(), 1 << 20, "t").expect("sample parses");
        h.backing_file = Some("base.raw".into());
        h.backing_format = Some("raw".into());
        h.extensions = vec![
            qemu_feature_table(),
            crate::qcow2::Extension {
                kind: EXT_BITMAPS,
                data: vec![7; 24],
            },
        ];
        let mut area = h.serialize().expect("serializes");
        area.resize(65536, 0);
        let h = Header::parse(&area, 1 << 20, "t").expect("backed header parses");
        (area, h)
    }

    /// A minimal valid version 3 header area with no backing file.
    fn sample_area() -> Vec<u8> {
        let h = Header {
            size: 1 << 20,
            l1_size: 1,
            extensions: Vec::new(),
            backing_file: None,
            backing_format: None,
            ..crate::qcow2::testutil::sample_header()
        };
        let mut area = h.serialize().expect("serializes");
        area.resize(65536, 0);
        area
    }

    fn apply(area: &mut [u8], w: &HeaderWrite) {
        let o = w.offset as usize;
        area[o..o + w.bytes.len()].copy_from_slice(&w.bytes);
    }

    #[test]
    fn every_prefix_parses_and_the_end_is_standalone() {
        let (mut area, h) = backed();
        let plan = drop_backing_plan(&area, &h);
        assert_eq!(plan.len(), 4, "{plan:?}");
        for w in &plan {
            // Only the step that writes behind the end marker is long.
            if w.offset != u64::from(h.header_length) + 8 {
                assert!(w.bytes.len() <= 12);
                assert_eq!(w.offset / 512, (w.offset + w.bytes.len() as u64 - 1) / 512);
            }
            apply(&mut area, w);
            let mid = Header::parse(&area, 1 << 20, "t").expect("every prefix parses");
            assert_eq!(mid.backing_file, None);
        }
        let end = Header::parse(&area, 1 << 20, "t").expect("end parses");
        assert_eq!(end.backing_format, None);
        assert_eq!((end.backing_file_offset, end.backing_file_size), (0, 0));
        assert_eq!(
            end.extensions, h.extensions,
            "other extensions kept in order"
        );
        assert!(
            !area.windows(8).any(|w| w == b"base.raw"),
            "the old name is zeroed"
        );
        assert!(
            drop_backing_plan(&area, &end).is_empty(),
            "a second plan has nothing to do"
        );
    }

    #[test]
    fn a_plan_from_a_half_done_header_finishes_it() {
        let (area, h) = backed();
        let plan = drop_backing_plan(&area, &h);
        let mut done = area.clone();
        for w in &plan {
            apply(&mut done, w);
        }
        for k in 0..plan.len() {
            let mut mid = area.clone();
            for w in &plan[..k] {
                apply(&mut mid, w);
            }
            let mh = Header::parse(&mid, 1 << 20, "t").expect("prefix parses");
            for w in drop_backing_plan(&mid, &mh) {
                apply(&mut mid, &w);
            }
            let end = Header::parse(&mid, 1 << 20, "t").expect("resumed parses");
            assert_eq!((end.backing_file, end.backing_format), (None, None));
            if k == 2 || k == 3 {
                // The list was emptied: nothing left to restore it from.
                assert!(end.extensions.is_empty());
            } else {
                assert_eq!(mid, done, "resumed after {k} steps");
            }
        }
    }

    #[test]
    fn the_remote_pin_goes_with_the_backing() {
        let (_, mut h) = backed();
        let pin = crate::qcow2::Extension {
            kind: crate::qcow2::pin::EXT_REMOTE_PIN,
            data: vec![1; 40],
        };
        h.extensions.push(pin);
        let mut area = h.serialize().expect("serializes");
        area.resize(65536, 0);
        let h = Header::parse(&area, 1 << 20, "t").expect("parses");
        for w in &drop_backing_plan(&area, &h) {
            apply(&mut area, w);
            Header::parse(&area, 1 << 20, "t").expect("every prefix parses");
        }
        let end = Header::parse(&area, 1 << 20, "t").expect("end parses");
        assert_eq!(end.extensions, h.extensions[..2]);
    }

    #[test]
    fn no_backing_no_writes() {
        let area = sample_area();
        let h = Header::parse(&area, 1 << 20, "t").expect("parses");
        assert!(drop_backing_plan(&area, &h).is_empty());
    }
}
