//! INQUIRY vital product data pages.

use crate::lun::{self, naa, Lun};
use crate::xcopy::third_party_copy_descriptors;

const PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2];

fn page_with(code: u8, body: Vec<u8>) -> Vec<u8> {
    let mut d = vec![0x00, code];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend(body);
    d
}

pub fn page(lun: &Lun, code: u8) -> Option<Vec<u8>> {
    let bs = lun.geo.block_size;
    Some(match code {
        0x00 => page_with(0x00, PAGES.to_vec()),
        0x80 => page_with(
            0x80,
            lun.ident
                .serial
                .as_bytes()
                .iter()
                .take(20)
                .copied()
                .collect(),
        ),
        0x83 => {
            let mut b = Vec::new();
            // Logical unit: NAA, binary.
            b.extend_from_slice(&[0x01, 0x03, 0x00, 0x10]);
            b.extend_from_slice(&naa(&lun.ident.uuid));
            let node = lun.ident.node_index;
            // Relative target port (PIV, association target port, iSCSI).
            b.extend_from_slice(&[0x51, 0x94, 0x00, 0x04, 0, 0]);
            b.extend_from_slice(&node.to_be_bytes());
            // Target port group.
            b.extend_from_slice(&[0x51, 0x95, 0x00, 0x04, 0, 0]);
            b.extend_from_slice(&node.to_be_bytes());
            // SCSI name string of the target port (UTF-8).
            let name = format!("{},t,0x{:04x}", lun.target_iqn, lun.portal_group_tag);
            let mut nb = name.into_bytes();
            nb.push(0);
            while !nb.len().is_multiple_of(4) {
                nb.push(0);
            }
            nb.truncate(252);
            b.extend_from_slice(&[0x53, 0x98, 0x00, nb.len() as u8]);
            b.extend(nb);
            page_with(0x83, b)
        }
        0x8f => page_with(0x8f, third_party_copy_descriptors()),
        0xb0 => {
            let mut b = vec![0u8; 0x3c];
            let max_xfer = lun.max_cmd_bytes / bs;
            b[1] = lun::MAX_COMPARE_WRITE_BLOCKS;
            b[2..4].copy_from_slice(&1u16.to_be_bytes()); // optimal transfer granularity
            b[4..8].copy_from_slice(&max_xfer.to_be_bytes());
            let opt = (lun.vol.max_io_bytes() / bs).clamp(1, max_xfer);
            b[8..12].copy_from_slice(&opt.to_be_bytes());
            b[12..16].copy_from_slice(&max_xfer.to_be_bytes()); // max prefetch
            b[16..20].copy_from_slice(&lun::MAX_UNMAP_BLOCKS.to_be_bytes());
            b[20..24].copy_from_slice(&lun::MAX_UNMAP_DESCRIPTORS.to_be_bytes());
            let per_phys = 1u32 << lun::lbppbe(bs);
            b[24..28].copy_from_slice(&per_phys.to_be_bytes()); // optimal unmap granularity
            b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
            b[32..40].copy_from_slice(&lun::MAX_WRITE_SAME_BLOCKS.to_be_bytes());
            // Atomic writes: one volume request, no alignment/granularity rules.
            b[40..44].copy_from_slice(&lun::max_atomic_blocks(lun).to_be_bytes());
            page_with(0xb0, b)
        }
        0xb1 => {
            let mut b = vec![0u8; 0x3c];
            b[1] = 0x01; // non-rotating medium
            page_with(0xb1, b)
        }
        0xb2 => {
            // LBPU, LBPWS, LBPWS10; provisioning type: thin.
            let b = vec![0x00, 0xe0, 0x02, 0x00];
            page_with(0xb2, b)
        }
        _ => return None,
    })
}
