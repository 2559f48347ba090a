//! Just enough ELF reading to refuse a dynamically linked guest binary before it is
//! packed: the initramfs has no loader and no libc, so such a binary would fail in the
//! guest with a puzzling `No such file or directory`.

use std::fmt;

const PT_INTERP: u32 = 3;

/// Why a file is not a static x86-64 executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElfError {
    /// Not a little-endian 64-bit ELF file, or truncated.
    NotElf64,
    /// It asks for a program interpreter (a dynamic loader).
    Dynamic {
        /// The interpreter it names.
        interpreter: String,
    },
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotElf64 => write!(f, "not a little-endian 64-bit ELF file"),
            Self::Dynamic { interpreter } => write!(
                f,
                "dynamically linked (interpreter {interpreter}); build with \
                 RUSTFLAGS=\"-C target-feature=+crt-static\" and an explicit --target"
            ),
        }
    }
}

impl std::error::Error for ElfError {}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<usize> {
    let v = u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?);
    usize::try_from(v).ok()
}

/// Checks that `bytes` is a 64-bit little-endian ELF file with no program interpreter
/// (static, including static-pie).
pub fn check_static(bytes: &[u8]) -> Result<(), ElfError> {
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err(ElfError::NotElf64);
    }
    let phoff = u64_at(bytes, 0x20).ok_or(ElfError::NotElf64)?;
    let phentsize = usize::from(u16_at(bytes, 0x36).ok_or(ElfError::NotElf64)?);
    let phnum = usize::from(u16_at(bytes, 0x38).ok_or(ElfError::NotElf64)?);
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        if u32_at(bytes, at).ok_or(ElfError::NotElf64)? == PT_INTERP {
            let offset = u64_at(bytes, at + 8).ok_or(ElfError::NotElf64)?;
            let size = u64_at(bytes, at + 32).ok_or(ElfError::NotElf64)?;
            let raw = bytes.get(offset..offset + size).unwrap_or_default();
            let interpreter = String::from_utf8_lossy(raw)
                .trim_end_matches('\0')
                .to_owned();
            return Err(ElfError::Dynamic { interpreter });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 image with one program header of type `p_type`.
    fn elf(p_type: u32) -> Vec<u8> {
        let mut bytes = vec![0u8; 0x40 + 0x38 + 16];
        bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
        bytes[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        bytes[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        bytes[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        bytes[0x40..0x44].copy_from_slice(&p_type.to_le_bytes());
        let interp_at = 0x40 + 0x38;
        bytes[0x48..0x50].copy_from_slice(&(interp_at as u64).to_le_bytes());
        bytes[0x60..0x68].copy_from_slice(&5u64.to_le_bytes());
        bytes[interp_at..interp_at + 5].copy_from_slice(b"/ld\0\0");
        bytes
    }

    #[test]
    fn static_passes_dynamic_fails() {
        assert_eq!(check_static(&elf(1)), Ok(()));
        assert_eq!(
            check_static(&elf(PT_INTERP)),
            Err(ElfError::Dynamic {
                interpreter: "/ld".to_owned()
            })
        );
        assert_eq!(check_static(b"#!/bin/sh\n"), Err(ElfError::NotElf64));
        assert_eq!(check_static(&elf(1)[..0x30]), Err(ElfError::NotElf64));
    }

    #[test]
    fn this_test_binary_is_recognised() {
        let exe = std::env::current_exe().expect("current exe");
        let bytes = std::fs::read(exe).expect("read");
        // The host test binary is dynamic (no crt-static): the check must say so.
        assert!(matches!(
            check_static(&bytes),
            Err(ElfError::Dynamic { .. })
        ));
    }
}
