//! The NVML attestation report: an SPDM 1.1 GET_MEASUREMENTS request (37 bytes) followed by
//! the GPU's signed MEASUREMENTS response (GPU-ATTESTATION.md §1; DMTF DSP0274 1.1).
//!
//! Every length comes from the parsed fields: the signature is the 96 bytes right after the
//! opaque data, and anything after it (the CoCo CI sample has one `0x00`) is counted in
//! [`Report::trailing`] and ignored — it is not signed.

use sha2::{Digest as _, Sha384};

use super::NvidiaError;

/// SPDM version 1.1, the only one NVIDIA GPUs speak and the only one accepted.
pub const SPDM_VERSION: u8 = 0x11;
/// Request code GET_MEASUREMENTS.
pub const GET_MEASUREMENTS: u8 = 0xE0;
/// Response code MEASUREMENTS.
pub const MEASUREMENTS: u8 = 0x60;
/// The request's length: version, code, param1, param2, nonce (32), slot id.
pub const REQUEST_LEN: usize = 37;
/// Offset of the caller's nonce in the request.
pub const NONCE_OFFSET: usize = 4;
/// ECDSA P-384 `r ‖ s`.
pub const SIGNATURE_LEN: usize = 96;
/// DMTF measurement specification, the only one accepted.
pub const DMTF_MEASUREMENT_SPEC: u8 = 1;

/// Opaque field ids (NVIDIA `OPAQUE_FIELD_ID_*`) this module reads by name.
pub mod opaque_id {
    /// DRIVER_VERSION: NUL-terminated ASCII.
    pub const DRIVER_VERSION: u16 = 3;
    /// GPU_INFO.
    pub const GPU_INFO: u16 = 4;
    /// VBIOS_VERSION: 8 bytes.
    pub const VBIOS_VERSION: u16 = 6;
    /// NVDEC0_STATUS: `0xAA` enabled, `0x55` disabled.
    pub const NVDEC0_STATUS: u16 = 11;
    /// MSRSCNT: one u32 (LE) per measurement block.
    pub const MSRSCNT: u16 = 12;
    /// CPRINFO.
    pub const CPRINFO: u16 = 13;
    /// BOARD_ID.
    pub const BOARD_ID: u16 = 14;
    /// CHIP_SKU: NUL-terminated ASCII.
    pub const CHIP_SKU: u16 = 15;
    /// CHIP_SKU_MOD: NUL-terminated ASCII.
    pub const CHIP_SKU_MOD: u16 = 16;
    /// PROJECT: NUL-terminated ASCII.
    pub const PROJECT: u16 = 17;
    /// PROJECT_SKU: NUL-terminated ASCII.
    pub const PROJECT_SKU: u16 = 18;
    /// PROJECT_SKU_MOD: NUL-terminated ASCII.
    pub const PROJECT_SKU_MOD: u16 = 19;
    /// FWID: 48 bytes, equal to the leaf certificate's FWID.
    pub const FWID: u16 = 20;
    /// PROTECTED_PCIE_STATUS.
    pub const PROTECTED_PCIE_STATUS: u16 = 21;
    /// SWITCH_PDI: 8-byte PDIs.
    pub const SWITCH_PDI: u16 = 22;
    /// SYS_ENABLE_STATUS (Blackwell).
    pub const SYS_ENABLE_STATUS: u16 = 33;
    /// OPAQUE_DATA_VERSION.
    pub const OPAQUE_DATA_VERSION: u16 = 34;
    /// CHIP_INFO (Blackwell+).
    pub const CHIP_INFO: u16 = 35;
    /// FEATURE_FLAG: 0 SPT, 1 MPT, 2 PPCIE.
    pub const FEATURE_FLAG: u16 = 36;
}

/// One measurement block of the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    /// The block's index (1..=64 on NVIDIA GPUs).
    pub index: u8,
    /// DMTFSpecMeasurementValueType (`0x01`: digest of mutable firmware).
    pub value_type: u8,
    /// The value (48 bytes, SHA-384, on NVIDIA GPUs).
    pub value: Vec<u8>,
}

/// One opaque TLV (`DataType u16 | DataSize u16 | Data`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpaqueField {
    /// The type id (unknown ids are kept as data).
    pub id: u16,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// A parsed NVML attestation report. Build it with [`parse_report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    bytes: Vec<u8>,
    nonce: [u8; 32],
    request_param2: u8,
    slot_id: u8,
    number_of_blocks: u8,
    measurements: Vec<Measurement>,
    responder_nonce: [u8; 32],
    opaque: Vec<OpaqueField>,
    signed_len: usize,
    trailing: usize,
}

/// Decodes a report file: raw bytes as NVML returns them, or hex text (NVIDIA's samples;
/// surrounding white space allowed). Raw reports start with `0x11`, which is no hex digit.
pub fn decode_report(file_bytes: &[u8]) -> Result<Vec<u8>, NvidiaError> {
    let trimmed = file_bytes.trim_ascii();
    let is_text = !trimmed.is_empty()
        && trimmed
            .iter()
            .all(|b| b.is_ascii_hexdigit() || b.is_ascii_whitespace());
    if !is_text {
        return Ok(file_bytes.to_vec());
    }
    let digits: Vec<u8> = trimmed
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    hex::decode(&digits).map_err(|e| NvidiaError::Encoding {
        what: "attestation report",
        detail: format!("the file looks like hex text but does not decode: {e}"),
    })
}

/// A cursor over the report with offsets for the error messages.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], NvidiaError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(NvidiaError::Malformed {
                what,
                offset: self.at,
                detail: format!(
                    "needs {n} byte(s), the report has {} left (truncated?)",
                    self.bytes.len().saturating_sub(self.at)
                ),
            });
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, NvidiaError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, NvidiaError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u24(&mut self, what: &'static str) -> Result<usize, NvidiaError> {
        let b = self.take(3, what)?;
        Ok(usize::from(b[0]) | usize::from(b[1]) << 8 | usize::from(b[2]) << 16)
    }

    fn array32(&mut self, what: &'static str) -> Result<[u8; 32], NvidiaError> {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.take(32, what)?);
        Ok(out)
    }
}

fn expect_byte(found: u8, want: u8, what: &'static str, offset: usize) -> Result<(), NvidiaError> {
    if found == want {
        return Ok(());
    }
    Err(NvidiaError::Malformed {
        what,
        offset,
        detail: format!("is 0x{found:02x}, expected 0x{want:02x}"),
    })
}

/// Parses a raw report (use [`decode_report`] first for hex text).
pub fn parse_report(bytes: &[u8]) -> Result<Report, NvidiaError> {
    let mut c = Cursor { bytes, at: 0 };
    // The request.
    let version = c.u8("request SPDMVersion")?;
    if version != SPDM_VERSION {
        return Err(NvidiaError::UnsupportedSpdmVersion {
            message: "request",
            found: version,
        });
    }
    expect_byte(c.u8("request code")?, GET_MEASUREMENTS, "request code", 1)?;
    let param1 = c.u8("request Param1")?;
    if param1 & 1 == 0 {
        return Err(NvidiaError::Malformed {
            what: "request Param1",
            offset: 2,
            detail: format!("is 0x{param1:02x}: no signature was requested"),
        });
    }
    let request_param2 = c.u8("request Param2")?;
    let nonce = c.array32("request nonce")?;
    let slot_id = c.u8("request SlotID")?;
    // The response.
    let response_start = c.at;
    let version = c.u8("response SPDMVersion")?;
    if version != SPDM_VERSION {
        return Err(NvidiaError::UnsupportedSpdmVersion {
            message: "response",
            found: version,
        });
    }
    expect_byte(
        c.u8("response code")?,
        MEASUREMENTS,
        "response code",
        response_start + 1,
    )?;
    c.take(2, "response Param1/Param2")?;
    let number_of_blocks = c.u8("NumberOfBlocks")?;
    let record_len = c.u24("MeasurementRecordLength")?;
    let record_start = c.at;
    let record = c.take(record_len, "MeasurementRecord")?;
    let measurements = parse_record(record, record_start, number_of_blocks)?;
    let responder_nonce = c.array32("response nonce")?;
    let opaque_len = usize::from(c.u16("OpaqueLength")?);
    let opaque_start = c.at;
    let opaque = parse_opaque(c.take(opaque_len, "OpaqueData")?, opaque_start)?;
    let signed_len = c.at;
    c.take(SIGNATURE_LEN, "Signature")?;
    Ok(Report {
        bytes: bytes[..c.at].to_vec(),
        nonce,
        request_param2,
        slot_id,
        number_of_blocks,
        measurements,
        responder_nonce,
        opaque,
        signed_len,
        trailing: bytes.len() - c.at,
    })
}

fn parse_record(
    record: &[u8],
    base: usize,
    number_of_blocks: u8,
) -> Result<Vec<Measurement>, NvidiaError> {
    let mut c = Cursor {
        bytes: record,
        at: 0,
    };
    let mut out: Vec<Measurement> = Vec::with_capacity(usize::from(number_of_blocks));
    while c.at < record.len() {
        let block_at = base + c.at;
        let index = c.u8("measurement block Index")?;
        let spec = c.u8("measurement block MeasurementSpecification")?;
        if spec != DMTF_MEASUREMENT_SPEC {
            return Err(NvidiaError::Malformed {
                what: "measurement block MeasurementSpecification",
                offset: block_at + 1,
                detail: format!(
                    "block {index} has specification 0x{spec:02x}; only 1 (DMTF) is defined"
                ),
            });
        }
        let size = usize::from(c.u16("measurement block MeasurementSize")?);
        let mut inner = Cursor {
            bytes: c.take(size, "measurement block Measurement")?,
            at: 0,
        };
        let value_type = inner.u8("DMTFSpecMeasurementValueType")?;
        let value_size = usize::from(inner.u16("DMTFSpecMeasurementValueSize")?);
        if value_size + 3 != size {
            return Err(NvidiaError::Malformed {
                what: "DMTFSpecMeasurementValueSize",
                offset: block_at + 5,
                detail: format!(
                    "block {index}: value size {value_size} + 3 is not the measurement size \
                     {size}"
                ),
            });
        }
        let value = inner.take(value_size, "DMTFSpecMeasurementValue")?.to_vec();
        if out.iter().any(|m| m.index == index) {
            return Err(NvidiaError::Malformed {
                what: "measurement block Index",
                offset: block_at,
                detail: format!("index {index} appears twice"),
            });
        }
        out.push(Measurement {
            index,
            value_type,
            value,
        });
    }
    if out.len() != usize::from(number_of_blocks) {
        return Err(NvidiaError::Malformed {
            what: "NumberOfBlocks",
            offset: base - 4,
            detail: format!(
                "says {number_of_blocks}, the measurement record holds {}",
                out.len()
            ),
        });
    }
    Ok(out)
}

fn parse_opaque(data: &[u8], base: usize) -> Result<Vec<OpaqueField>, NvidiaError> {
    let mut c = Cursor { bytes: data, at: 0 };
    let mut out: Vec<OpaqueField> = Vec::new();
    while c.at < data.len() {
        let at = base + c.at;
        let id = c.u16("opaque DataType")?;
        let size = usize::from(c.u16("opaque DataSize")?);
        let field = c.take(size, "opaque Data")?.to_vec();
        if out.iter().any(|f| f.id == id) {
            return Err(NvidiaError::Malformed {
                what: "opaque DataType",
                offset: at,
                detail: format!("field {id} appears twice"),
            });
        }
        out.push(OpaqueField { id, data: field });
    }
    Ok(out)
}

/// NUL-terminated ASCII (the part before the first NUL).
fn c_text(bytes: &[u8]) -> Option<&str> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    std::str::from_utf8(&bytes[..end])
        .ok()
        .filter(|s| s.is_ascii())
}

impl Report {
    /// The report's bytes up to the end of the signature (trailing bytes dropped).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The request's nonce (offset 4): the caller's 32 bytes, the only freshness binding.
    pub fn nonce(&self) -> [u8; 32] {
        self.nonce
    }

    /// The GPU's own nonce in the response (not checked: it is the GPU's randomness).
    pub fn responder_nonce(&self) -> [u8; 32] {
        self.responder_nonce
    }

    /// The request's Param2 (`0xFF`: all blocks) and SlotID.
    pub fn request_params(&self) -> (u8, u8) {
        (self.request_param2, self.slot_id)
    }

    /// The response's NumberOfBlocks.
    pub fn number_of_blocks(&self) -> u8 {
        self.number_of_blocks
    }

    /// DRIVER_VERSION, when present and ASCII.
    pub fn driver_version(&self) -> Option<&str> {
        self.opaque(opaque_id::DRIVER_VERSION).and_then(c_text)
    }

    /// VBIOS_VERSION as NVIDIA's tools print it: bytes 3, 2, 1, 0, 4 as two-digit hex
    /// joined by dots (`00 9f 00 96 01 00 00 00` → `96.00.9f.00.01`).
    pub fn vbios_version(&self) -> Option<String> {
        let v = self.opaque(opaque_id::VBIOS_VERSION)?;
        if v.len() < 5 {
            return None;
        }
        Some(format!(
            "{:02x}.{:02x}.{:02x}.{:02x}.{:02x}",
            v[3], v[2], v[1], v[0], v[4]
        ))
    }

    /// The FWID opaque field (type 20), when present and 48 bytes.
    pub fn fwid(&self) -> Option<[u8; 48]> {
        self.opaque(opaque_id::FWID)
            .and_then(|d| <[u8; 48]>::try_from(d).ok())
    }

    /// A NUL-terminated ASCII opaque field (PROJECT, CHIP_SKU, …).
    pub fn opaque_text(&self, id: u16) -> Option<&str> {
        self.opaque(id).and_then(c_text)
    }

    /// The measurement blocks, in report order.
    pub fn measurements(&self) -> &[Measurement] {
        &self.measurements
    }

    /// SHA-384 over every measurement block in ascending index order, each as
    /// `index (u8) ‖ value length (u16 little-endian) ‖ value`. Stable: the daemon extends
    /// it into its runtime register and the broker's policy may pin it.
    pub fn measurements_digest(&self) -> [u8; 48] {
        let mut sorted: Vec<&Measurement> = self.measurements.iter().collect();
        sorted.sort_by_key(|m| m.index);
        let mut hasher = Sha384::new();
        for m in sorted {
            hasher.update([m.index]);
            // Values come from a u16-sized block, so the length fits.
            hasher.update((m.value.len() as u16).to_le_bytes());
            hasher.update(&m.value);
        }
        hasher.finalize().into()
    }

    /// An opaque field's bytes by type id.
    pub fn opaque(&self, id: u16) -> Option<&[u8]> {
        self.opaque
            .iter()
            .find(|f| f.id == id)
            .map(|f| f.data.as_slice())
    }

    /// Every opaque field, in report order.
    pub fn opaque_fields(&self) -> &[OpaqueField] {
        &self.opaque
    }

    /// The signed bytes: request ‖ response up to (not including) the signature.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.bytes[..self.signed_len]
    }

    /// The signature, raw `r ‖ s` (48 + 48 bytes, big-endian).
    pub fn signature(&self) -> &[u8] {
        &self.bytes[self.signed_len..]
    }

    /// How many bytes followed the signature in the input (ignored, not signed).
    pub fn trailing(&self) -> usize {
        self.trailing
    }
}
