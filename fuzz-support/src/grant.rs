//! `grant_request`: the grant frame parser, [`GrantRequest::parse`], on any bytes.

use telemetry_abi::{
    GRANT_FRAME_SIZE, GRANT_MAGIC, GRANT_VERSION, GrantOp, GrantRequest, GrantRequestError,
    MIN_CAPACITY,
};
use zerocopy::IntoBytes;

/// Parses `data` as one grant frame and checks the verdict field by field against the
/// rules of `abi/README.md`; an accepted frame re-encodes to the same bytes.
pub fn run(data: &[u8]) {
    let parsed = GrantRequest::parse(data);
    if let Err(e) = parsed {
        assert!(!e.to_string().is_empty());
    }
    if data.len() != GRANT_FRAME_SIZE {
        assert_eq!(parsed, Err(GrantRequestError::Size(data.len())));
        return;
    }
    let word = |at: usize, n: usize| {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&data[at..at + n]);
        u64::from_le_bytes(b)
    };
    let (magic, version, op) = (word(0, 4), word(4, 2), word(6, 2));
    let (capacity, flags, reserved) = (word(8, 4), word(12, 4), word(24, 8));
    let returning = op == u64::from(GrantOp::RETURN.0);
    let known_op = op == u64::from(GrantOp::RING.0) || returning;
    // A returned ring (op 2) asks for no capacity.
    let capacity_ok = capacity == 0
        || (!returning && capacity >= u64::from(MIN_CAPACITY) && capacity.is_power_of_two());
    let valid = magic == u64::from(GRANT_MAGIC)
        && version == u64::from(GRANT_VERSION)
        && known_op
        && flags == 0
        && reserved == 0
        && capacity_ok;
    match parsed {
        Ok(request) => {
            assert!(valid, "accepted an invalid frame {data:02x?}");
            assert_eq!(request.as_bytes(), data, "an accepted frame re-encodes");
            assert!(request.is_well_formed());
        }
        Err(e) => {
            assert!(!valid, "refused a valid frame {data:02x?}: {e}");
            // The first rule broken is the one named.
            let expected = if magic != u64::from(GRANT_MAGIC) {
                GrantRequestError::Magic(magic as u32)
            } else if version != u64::from(GRANT_VERSION) {
                GrantRequestError::Version(version as u16)
            } else if !known_op {
                GrantRequestError::Op(op as u16)
            } else if flags != 0 || reserved != 0 {
                GrantRequestError::Reserved
            } else {
                GrantRequestError::Capacity(capacity as u32)
            };
            assert_eq!(e, expected);
        }
    }
}
