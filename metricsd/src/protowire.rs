//! Protobuf varints for the direct encoders (`prometheus::writer`, `otlp::wire`): the
//! encoding prost writes, inlined into the caller instead of a call per byte.

pub(crate) use prost::encoding::encoded_len_varint;

/// Appends `v` as a varint.
#[inline(always)]
pub(crate) fn encode_varint(mut v: u64, buf: &mut Vec<u8>) {
    if v < 0x80 {
        buf.push(v as u8);
        return;
    }
    let mut tmp = [0u8; 10];
    let mut n = 0;
    while v >= 0x80 {
        tmp[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    tmp[n] = v as u8;
    buf.extend_from_slice(&tmp[..=n]);
}

/// Appends `values` as consecutive varints (a packed repeated field's body), whose
/// total length the caller knows: one reservation, one byte per small value.
#[inline]
pub(crate) fn encode_varints(values: &[u64], total: usize, buf: &mut Vec<u8>) {
    buf.reserve(total);
    for &v in values {
        if v < 0x80 {
            buf.push(v as u8);
        } else {
            encode_varint(v, buf);
        }
    }
}

/// Writes `v` as a varint at the start of `out` (at least 10 bytes); returns its length.
#[inline]
pub(crate) fn put_varint(mut v: u64, out: &mut [u8]) -> usize {
    let mut n = 0;
    while v >= 0x80 {
        if let Some(b) = out.get_mut(n) {
            *b = (v as u8) | 0x80;
        }
        v >>= 7;
        n += 1;
    }
    if let Some(b) = out.get_mut(n) {
        *b = v as u8;
    }
    n + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_prosts() {
        for v in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut ours = Vec::new();
            encode_varint(v, &mut ours);
            let mut theirs = Vec::new();
            prost::encoding::encode_varint(v, &mut theirs);
            assert_eq!(ours, theirs, "{v}");
            assert_eq!(ours.len(), encoded_len_varint(v));
            let mut slot = [0u8; 10];
            let n = put_varint(v, &mut slot);
            assert_eq!(&slot[..n], &theirs[..], "{v}");
        }
    }
}
