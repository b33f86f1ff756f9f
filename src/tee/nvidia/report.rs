//! The few facts the daemon reads from its own GPU's attestation report (GPU-ATTESTATION.md
//! §1): lengths from the parsed fields (never "the last 96 bytes"), the signed length, the
//! MeasurementRecord, and the opaque DRIVER_VERSION, VBIOS_VERSION and FWID. This is not a
//! verifier — the daemon never verifies its own evidence; the offline verifier is the
//! verifier crate's.

/// Length of the SPDM GET_MEASUREMENTS request that starts every report.
pub const REQUEST_LEN: usize = 37;
/// Offset of the request nonce.
pub const NONCE_OFFSET: usize = 4;
/// Length of the raw `r‖s` ECDSA P-384 signature.
pub const SIGNATURE_LEN: usize = 96;

const OPAQUE_DRIVER_VERSION: u16 = 3;
const OPAQUE_VBIOS_VERSION: u16 = 6;
const OPAQUE_FWID: u16 = 20;

/// What the daemon takes from a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportView {
    /// Bytes covered by the signature: request ‖ response up to the signature.
    pub signed_len: usize,
    /// The MeasurementRecord (all blocks, as sent).
    pub measurements: std::ops::Range<usize>,
    /// Opaque DRIVER_VERSION, when present.
    pub driver_version: Option<String>,
    /// Opaque VBIOS_VERSION formatted as NVIDIA does (`96.00.9f.00.01`), when present.
    pub vbios_version: Option<String>,
    /// Opaque FWID (48 bytes), when present.
    pub fwid: Option<Vec<u8>>,
}

fn take(bytes: &[u8], at: usize, len: usize, what: &str) -> Result<std::ops::Range<usize>, String> {
    let end = at
        .checked_add(len)
        .filter(|end| *end <= bytes.len())
        .ok_or_else(|| {
            format!(
                "{what} ({len} bytes at offset {at}) runs past the end of the {}-byte report",
                bytes.len()
            )
        })?;
    Ok(at..end)
}

/// Parses the report's framing and the opaque fields named above.
pub fn parse(bytes: &[u8]) -> Result<ReportView, String> {
    take(bytes, 0, REQUEST_LEN, "the SPDM request")?;
    let r = REQUEST_LEN;
    let header = take(bytes, r, 8, "the MEASUREMENTS header")?;
    let h = &bytes[header];
    if h[1] != 0x60 {
        return Err(format!(
            "the response code is {:#04x}, not MEASUREMENTS (0x60)",
            h[1]
        ));
    }
    let l1 = usize::from(h[5]) | usize::from(h[6]) << 8 | usize::from(h[7]) << 16;
    let measurements = take(bytes, r + 8, l1, "the measurement record")?;
    let nonce = take(bytes, measurements.end, 32, "the responder nonce")?;
    let l2_at = take(bytes, nonce.end, 2, "the opaque length")?;
    let l2 = usize::from(u16::from_le_bytes([
        bytes[l2_at.start],
        bytes[l2_at.start + 1],
    ]));
    let opaque = take(bytes, l2_at.end, l2, "the opaque data")?;
    let signature = take(bytes, opaque.end, SIGNATURE_LEN, "the signature")?;
    let mut view = ReportView {
        signed_len: signature.start,
        measurements,
        driver_version: None,
        vbios_version: None,
        fwid: None,
    };
    let data = &bytes[opaque];
    let mut at = 0;
    while at < data.len() {
        let head = take(data, at, 4, "an opaque field header")?;
        let kind = u16::from_le_bytes([data[head.start], data[head.start + 1]]);
        let size = usize::from(u16::from_le_bytes([
            data[head.start + 2],
            data[head.start + 3],
        ]));
        let value = &data[take(data, head.end, size, "an opaque field")?];
        match kind {
            OPAQUE_DRIVER_VERSION => {
                let text = value.split(|b| *b == 0).next().unwrap_or_default();
                view.driver_version = Some(String::from_utf8_lossy(text).into_owned());
            }
            OPAQUE_VBIOS_VERSION if value.len() >= 5 => {
                view.vbios_version = Some(format!(
                    "{:02x}.{:02x}.{:02x}.{:02x}.{:02x}",
                    value[3], value[2], value[1], value[0], value[4]
                ));
            }
            OPAQUE_FWID => view.fwid = Some(value.to_vec()),
            _ => {}
        }
        at = head.end + size;
    }
    Ok(view)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_nvtrust_report_parses_by_its_fields() {
        let bytes = std::fs::read("tests/data/nvidia-sim/report.bin").unwrap();
        let view = parse(&bytes).unwrap();
        assert_eq!(view.signed_len, 4021);
        assert_eq!(view.measurements.len(), 3520);
        assert_eq!(view.driver_version.as_deref(), Some("550.90.07"));
        assert_eq!(view.vbios_version.as_deref(), Some("96.00.9f.00.01"));
        assert_eq!(
            hex::encode(view.fwid.unwrap()),
            "f5c384aebb579217a2c66b17ed0f28e6a9b8d639041acd7b4721cec004f7275494ba94bb5cdfdb3055ee051762b1f75d"
        );
        // Cut anywhere: an error naming the part, never a panic.
        for len in [0, 36, 40, 3600, 4021, 4116] {
            assert!(parse(&bytes[..len]).is_err(), "{len}");
        }
    }
}
