//! LEB128 unsigned integers, the one variable-length number form of every compact wire encoding
//! in the core (sync leaf lists and states, sketch cells, change tokens). Ten bounded lines kept
//! here rather than a crate, so each decoder maps the two failures to its own error type.

/// Why a number could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarintError {
    /// The bytes ended inside the number.
    Truncated,
    /// More than 64 bits.
    TooLong,
}

/// Appends `value` as LEB128.
pub fn put(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads one number at `*position` and moves past it.
pub fn take(bytes: &[u8], position: &mut usize) -> Result<u64, VarintError> {
    let mut value: u64 = 0;
    for index in 0..10 {
        let byte = *bytes.get(*position).ok_or(VarintError::Truncated)?;
        *position += 1;
        let bits = u64::from(byte & 0x7f);
        if index == 9 && bits > 1 {
            return Err(VarintError::TooLong);
        }
        value |= bits << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(VarintError::TooLong)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn numbers_round_trip(value in any::<u64>()) {
            let mut bytes = Vec::new();
            put(&mut bytes, value);
            let mut position = 0;
            prop_assert_eq!(take(&bytes, &mut position), Ok(value));
            prop_assert_eq!(position, bytes.len());
        }
    }

    #[test]
    fn short_and_overlong_numbers_are_refused() {
        assert_eq!(take(&[0x80], &mut 0), Err(VarintError::Truncated));
        assert_eq!(take(&[0xff; 10], &mut 0), Err(VarintError::TooLong));
        // Ten bytes whose last carries more than bit 63: would wrap silently without the check.
        let mut overlong = vec![0xff; 9];
        overlong.push(0x02);
        assert_eq!(take(&overlong, &mut 0), Err(VarintError::TooLong));
        let mut max = Vec::new();
        put(&mut max, u64::MAX);
        assert_eq!(take(&max, &mut 0), Ok(u64::MAX));
    }
}
