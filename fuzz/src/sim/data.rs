//! What a simulated write puts in each io_unit: its value id, the unit's index in the blob,
//! and a fill derived from both, so a read names the write it shows (or zeros) and any
//! misplaced, mixed or corrupted unit is caught.

use super::model::UNIT;

const WORDS: usize = (UNIT / 8) as usize;

fn word(value: u64, unit: u64, index: usize) -> u64 {
    value.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (unit << 32) ^ index as u64
}

/// The bytes of `units` io_units from `first`, all written by value `value` (non-zero).
pub fn encode(value: u64, first: u64, units: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((units * UNIT) as usize);
    for unit in first..first + units {
        out.extend_from_slice(&value.to_le_bytes());
        out.extend_from_slice(&unit.to_le_bytes());
        for index in 2..WORDS {
            out.extend_from_slice(&word(value, unit, index).to_le_bytes());
        }
    }
    out
}

/// The value id io_unit `unit` holds (0: zeros), or what is wrong with it.
pub fn decode(bytes: &[u8], unit: u64) -> Result<u64, String> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let at = |index: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[index * 8..index * 8 + 8]);
        u64::from_le_bytes(word)
    };
    let value = at(0);
    let written_at = at(1);
    if value == 0 || written_at != unit {
        return Err(format!(
            "unit {unit} holds bytes that are not a write of this unit (value {value}, unit {written_at})"
        ));
    }
    for index in 2..WORDS {
        if at(index) != word(value, unit, index) {
            return Err(format!(
                "unit {unit} holds value {value} corrupted at word {index}"
            ));
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_misplacement() {
        let bytes = encode(7, 3, 2);
        assert_eq!(decode(&bytes[..UNIT as usize], 3), Ok(7));
        assert_eq!(decode(&bytes[UNIT as usize..], 4), Ok(7));
        assert!(decode(&bytes[..UNIT as usize], 4).is_err());
        assert_eq!(decode(&[0; UNIT as usize], 9), Ok(0));
        let mut torn = bytes[..UNIT as usize].to_vec();
        torn[100] ^= 1;
        assert!(decode(&torn, 3).is_err());
    }
}
