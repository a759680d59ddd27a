//! Lower-case hex, as used for secrets and MACs inside JSON messages.

/// Encodes bytes as lower-case hex.
pub fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes hex (either case); `None` on an odd length or a non-hex character.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    // `from_str_radix` alone would take a sign: "+f" must not decode as 0x0f.
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        assert_eq!(encode(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(decode("00ABff"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(decode("abc"), None);
        assert_eq!(decode("zz"), None);
        // A multi-byte character must not panic the slicing.
        assert_eq!(decode("é0"), None);
        // Found by mesh-fuzz: a sign is not a hex digit.
        assert_eq!(decode("+f"), None);
        assert_eq!(decode("0a+b"), None);
    }
}
