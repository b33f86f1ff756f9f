//! `az-snp-vtpm` evidence provider: an Azure confidential VM on AMD SEV-SNP, where the
//! guest sees no `/dev/sev-guest` but a vTPM run by Azure's paravisor (HCL) at VMPL 0.
//!
//! How the evidence is bound (what Trustee's `az-snp-vtpm` verifier checks, version 2):
//!
//! 1. The 48-byte `report_data`, zero-padded to 64 bytes, is written to vTPM NV index
//!    [`REPORT_DATA_NV_INDEX`] (`0x01400002`; defined here, owner read/write, 64 bytes, when it
//!    is missing or has another size — as Azure's own tooling does).
//! 2. The paravisor then refreshes the HCL report in NV index [`HCL_REPORT_NV_INDEX`]
//!    (`0x01400001`): its variable data (a JSON document) carries the 64 bytes as `user-data`
//!    (hex) and the vTPM AK as the `HCLAkPub` JWK, and the SNP report inside it has
//!    `REPORT_DATA[..32] = SHA-256(variable data)`. Azure's tooling sleeps a fixed 3 s; this
//!    provider instead re-reads until `user-data` equals what it wrote (every
//!    [`AzureOptions::poll_interval`], up to [`AzureOptions::refresh_timeout`]) and fails
//!    closed when it never does, so a stale report is never sent.
//! 3. The vTPM AK (persistent handle [`AZURE_AK_HANDLE`], `0x81000003`) quotes the SHA-256
//!    PCRs 0–23 with qualifying data = the full 48-byte `report_data` (Trustee compares the
//!    quote's `extraData` with the report data byte for byte). The provider checks the AK
//!    equals `HCLAkPub` before quoting: the verifier trusts the quote only through that key.
//!
//! A checkpoint ([`Provider::checkpoint`], the audit-log binding of 64 bytes) takes the same
//! path with the same JSON shape, but the binding is used whole where the evidence pads:
//!
//! - `user-data` (NV [`REPORT_DATA_NV_INDEX`], then the refreshed HCL report) is the 64-byte
//!   binding itself, so the VCEK-signed SNP report binds all of it through
//!   `REPORT_DATA[..32] = SHA-256(variable data)`;
//! - the quote's qualifying data is the binding's first [`QUOTE_NONCE_LEN`] (48) bytes
//!   ([`checkpoint_quote_nonce`]): the same length the broker evidence's quote carries, which
//!   the Azure vTPM is known to accept (Trustee's v2 evidence), where 64 bytes may exceed its
//!   `TPM2B_DATA`.
//!
//! So for both, a verifier checks `user-data == binding zero-padded to 64 bytes` and
//! `extraData == the first 48 bytes of the binding`. A checkpoint's user-data ends in 16
//! bytes of SHA-512 output, never in the 16 zero bytes of broker evidence.
//!
//! The VCEK (which signs the SNP report) is not in the vTPM: Azure serves it, with the
//! ASK/ARK chain, from the instance metadata service (IMDS, [`IMDS_VCEK_URL`], the "THIM"
//! endpoint), which is what Azure's `az-snp-vtpm` crate and the Trustee attester use. It is
//! fetched once at open ([`VcekSource::Imds`]) or read from a cache file baked into the image
//! or written by an earlier boot step ([`VcekSource::File`], DER or PEM).
//!
//! Runtime measurements go into vTPM PCR 15 exactly as in the `tpm` provider
//! ([`super::tpm::APP_PCR`]).

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::handles::{KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::structures::{MaxNvBuffer, NvPublicBuilder, Public};
use tss_esapi::Context;

use super::tpm::{
    consistent_quote, load_persistent_key, open_context, pcr_value, rsa_spki, rsassa_sha256, tss,
    QuoteParts, SharedContext, TpmPcr, APP_PCR, PCR_SELECTION,
};
use super::{Provider, TeeError};
use crate::eventlog::RuntimeRegister;

/// vTPM NV index holding the HCL report.
pub const HCL_REPORT_NV_INDEX: u32 = 0x0140_0001;
/// vTPM NV index the guest writes its 64 bytes of report data to.
pub const REPORT_DATA_NV_INDEX: u32 = 0x0140_0002;
/// Persistent handle of the Azure vTPM attestation key.
pub const AZURE_AK_HANDLE: u32 = 0x8100_0003;
/// Azure IMDS endpoint that serves the VCEK and its chain (needs `Metadata: true`).
pub const IMDS_VCEK_URL: &str = "http://169.254.169.254/metadata/THIM/amd/certification";
pub use cvm_warden_verify::evidence::azure::{
    checkpoint_quote_nonce, parse_hcl_report, user_data_for, AzEvidence, HclReport,
    EVIDENCE_VERSION, HCL_HEADER_SIZE, QUOTE_NONCE_LEN, REQUEST_DATA_OFFSET, SNP_REPORT_SIZE,
    USER_DATA_SIZE, VAR_DATA_OFFSET,
};

const TEE: &str = "az-snp-vtpm";

fn malformed(detail: impl Into<String>) -> TeeError {
    TeeError::Malformed {
        tee: TEE,
        what: "hcl report",
        detail: detail.into(),
    }
}

/// Where the VCEK comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcekSource {
    /// Azure IMDS (`GET <url>` with `Metadata: true`; JSON with a `vcekCert` PEM).
    Imds(String),
    /// A cached VCEK certificate, DER or PEM (the first certificate of a PEM bundle).
    File(PathBuf),
}

impl fmt::Display for VcekSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VcekSource::Imds(url) => write!(f, "imds:{url}"),
            VcekSource::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

/// Options of [`AzSnpVtpmProvider::open_with`].
#[derive(Debug, Clone)]
pub struct AzureOptions {
    /// Where the VCEK comes from (default: IMDS).
    pub vcek: VcekSource,
    /// How long to wait for the paravisor to refresh the HCL report (default 10 s).
    pub refresh_timeout: Duration,
    /// How often to re-read it meanwhile (default 250 ms).
    pub poll_interval: Duration,
}

impl Default for AzureOptions {
    fn default() -> Self {
        Self {
            vcek: VcekSource::Imds(IMDS_VCEK_URL.to_string()),
            refresh_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(250),
        }
    }
}

/// The first certificate of a PEM text, DER (the verifier's PEM reader, on
/// `rustls-pki-types`: sections other than certificates are skipped, a broken section is
/// an error).
fn pem_first_certificate(text: &str) -> Result<Vec<u8>, String> {
    cvm_warden_verify::evidence::snp::pem_certificates(text.as_bytes())
        .map_err(|e| format!("the PEM text {e}"))?
        .into_iter()
        .next()
        .ok_or_else(|| "the PEM text holds no certificate".to_string())
}

/// A VCEK certificate given as DER or PEM, as DER; checks that it parses.
fn vcek_der(bytes: &[u8], source: &VcekSource) -> Result<Vec<u8>, TeeError> {
    let bad = |detail: String| TeeError::Config {
        tee: TEE,
        detail: format!(
            "the vcek from {source} is not usable: {detail}; give the VCEK certificate that \
             Azure IMDS serves ({IMDS_VCEK_URL}), DER or PEM"
        ),
    };
    let der = match std::str::from_utf8(bytes) {
        Ok(text) if text.contains("-----BEGIN") => pem_first_certificate(text).map_err(bad)?,
        _ => bytes.to_vec(),
    };
    sev::certs::snp::Certificate::from_der(&der)
        .map_err(|e| bad(format!("not an x.509 certificate ({e})")))?;
    Ok(der)
}

/// Fetches or reads the VCEK (DER).
pub fn load_vcek(source: &VcekSource) -> Result<Vec<u8>, TeeError> {
    match source {
        VcekSource::File(path) => {
            let bytes = std::fs::read(path).map_err(|e| TeeError::Device {
                tee: TEE,
                what: "cannot read the vcek cache",
                device: path.clone(),
                source: e,
            })?;
            vcek_der(&bytes, source)
        }
        VcekSource::Imds(url) => {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build();
            let imds_error = |detail: String| TeeError::Device {
                tee: TEE,
                what: "cannot get the vcek from azure imds at",
                device: PathBuf::from(url),
                source: std::io::Error::other(detail),
            };
            let body = agent
                .get(url)
                .set("Metadata", "true")
                .call()
                .map_err(|e| imds_error(e.to_string()))?
                .into_string()
                .map_err(|e| imds_error(e.to_string()))?;
            let json: Value = serde_json::from_str(&body)
                .map_err(|e| imds_error(format!("the answer is not json: {e}")))?;
            let pem = json
                .get("vcekCert")
                .and_then(Value::as_str)
                .ok_or_else(|| imds_error("the answer has no \"vcekCert\"".into()))?;
            vcek_der(pem.as_bytes(), source)
        }
    }
}

/// The `az-snp-vtpm` evidence JSON (shape version 2): quote in hex (raw RSA signature, the
/// `TPMS_ATTEST`, 24 SHA-256 PCRs), HCL report and VCEK DER in base64url with padding.
pub(crate) fn az_evidence_json(quote: &QuoteParts, hcl_report: &[u8], vcek: &[u8]) -> Value {
    json!({
        "version": EVIDENCE_VERSION,
        "tpm_quote": {
            "signature": hex::encode(&quote.raw_signature),
            "message": hex::encode(&quote.message),
            "pcrs": quote.pcrs.iter().map(hex::encode).collect::<Vec<_>>(),
        },
        "hcl_report": URL_SAFE.encode(hcl_report),
        "vcek": URL_SAFE.encode(vcek),
    })
}

/// The `az-snp-vtpm` evidence provider.
pub struct AzSnpVtpmProvider {
    tcti: String,
    ctx: SharedContext,
    ak: KeyHandle,
    ak_public: Vec<u8>,
    vcek: Vec<u8>,
    options: AzureOptions,
}

impl fmt::Debug for AzSnpVtpmProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzSnpVtpmProvider")
            .field("tcti", &self.tcti)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl AzSnpVtpmProvider {
    /// Opens the vTPM at `tcti` with the default options (VCEK from IMDS).
    pub fn open(tcti: &str) -> Result<Self, TeeError> {
        Self::open_with(tcti, AzureOptions::default())
    }

    /// Opens the vTPM: loads the AK at 0x81000003, reads the HCL report once (it must parse,
    /// bind its variable data, and name this AK as `HCLAkPub`), and gets the VCEK.
    pub fn open_with(tcti: &str, options: AzureOptions) -> Result<Self, TeeError> {
        let mut ctx = open_context(TEE, tcti)?;
        let (ak, public) =
            load_persistent_key(&mut ctx, AZURE_AK_HANDLE).map_err(|e| TeeError::Config {
                tee: TEE,
                detail: format!(
                    "the azure vtpm ak (persistent handle 0x{AZURE_AK_HANDLE:08x}) cannot be \
                     loaded: {e}; is this an azure confidential vm?"
                ),
            })?;
        let ak_public = azure_ak_spki(&public)?;
        let hcl = read_hcl_report(&mut ctx)?;
        let parsed = parse_hcl_report(&hcl)?;
        check_ak_matches(&parsed, &ak_public)?;
        let vcek = load_vcek(&options.vcek)?;
        Ok(Self {
            tcti: tcti.to_string(),
            ctx: std::rc::Rc::new(std::cell::RefCell::new(ctx)),
            ak,
            ak_public,
            vcek,
            options,
        })
    }

    /// The vTPM AK public key (SPKI DER), equal to the HCL report's `HCLAkPub`.
    pub fn ak_public(&self) -> &[u8] {
        &self.ak_public
    }

    /// The SHA-256 value of vTPM PCR `index` (0–23).
    pub fn pcr_value(&mut self, index: u8) -> Result<[u8; 32], TeeError> {
        pcr_value(&mut self.ctx.borrow_mut(), index)
    }

    /// Evidence with an HCL report refreshed to carry `user_data` and a quote over
    /// `qualifying`, made by the AK the report names.
    fn bound_evidence(
        &mut self,
        user_data: &[u8; USER_DATA_SIZE],
        qualifying: &[u8; QUOTE_NONCE_LEN],
    ) -> Result<Value, TeeError> {
        let (hcl_bytes, hcl) = self.fresh_hcl_report(user_data)?;
        check_ak_matches(&hcl, &self.ak_public)?;
        let quote = consistent_quote(
            &mut self.ctx.borrow_mut(),
            self.ak,
            qualifying,
            rsassa_sha256(),
        )?;
        Ok(az_evidence_json(&quote, &hcl_bytes, &self.vcek))
    }

    /// Writes `user_data` to 0x01400002 and waits until the HCL report carries it.
    fn fresh_hcl_report(
        &mut self,
        user_data: &[u8; USER_DATA_SIZE],
    ) -> Result<(Vec<u8>, HclReport), TeeError> {
        let mut ctx = self.ctx.borrow_mut();
        write_user_data(&mut ctx, user_data)?;
        let deadline = Instant::now() + self.options.refresh_timeout;
        loop {
            let bytes = read_hcl_report(&mut ctx)?;
            let parsed = parse_hcl_report(&bytes)?;
            if parsed.user_data.as_deref() == Some(&user_data[..]) {
                return Ok((bytes, parsed));
            }
            if Instant::now() >= deadline {
                let found = parsed
                    .user_data
                    .as_deref()
                    .map_or_else(|| "no user-data".to_string(), hex::encode);
                return Err(malformed(format!(
                    "after {:?} the HCL report at NV 0x{HCL_REPORT_NV_INDEX:08x} still \
                     carries {found}, not the report data written to 0x{REPORT_DATA_NV_INDEX:08x} \
                     ({}); the paravisor did not refresh it, so the evidence would be stale",
                    self.options.refresh_timeout,
                    hex::encode(user_data)
                )));
            }
            std::thread::sleep(self.options.poll_interval);
        }
    }
}

impl Provider for AzSnpVtpmProvider {
    fn tee(&self) -> &'static str {
        TEE
    }

    fn evidence(&mut self, report_data: &[u8; 48]) -> Result<Value, TeeError> {
        self.bound_evidence(&user_data_for(report_data), report_data)
    }

    /// user-data = the whole `binding`; quote qualifying data = its first 48 bytes (see the
    /// module documentation).
    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, TeeError> {
        self.bound_evidence(binding, &checkpoint_quote_nonce(binding))
    }

    fn runtime_register(&mut self) -> Result<Option<Box<dyn RuntimeRegister>>, TeeError> {
        Ok(Some(Box::new(TpmPcr::new(self.ctx.clone(), APP_PCR)?)))
    }

    fn describe(&self) -> Value {
        json!({
            "tcti": self.tcti,
            "ak_handle": format!("0x{AZURE_AK_HANDLE:08x}"),
            "ak_public": STANDARD.encode(&self.ak_public),
            "hcl_report_nv_index": format!("0x{HCL_REPORT_NV_INDEX:08x}"),
            "report_data_nv_index": format!("0x{REPORT_DATA_NV_INDEX:08x}"),
            "report_data": "user-data = 48-byte binding followed by 16 zero bytes; quote \
                            qualifying data = the 48-byte binding",
            "checkpoint_report_data": "user-data = the 64-byte checkpoint binding; quote \
                                       qualifying data = its first 48 bytes",
            "pcr": APP_PCR,
            "pcr_selection": PCR_SELECTION,
            "vcek_source": self.options.vcek.to_string(),
            "vcek_sha256": hex::encode(Sha256::digest(&self.vcek)),
        })
    }
}

/// The Azure AK must be an RSA signing key (the quote is made with RSASSA/SHA-256).
fn azure_ak_spki(public: &Public) -> Result<Vec<u8>, TeeError> {
    let bad = |detail: String| TeeError::Config {
        tee: TEE,
        detail: format!(
            "the key at 0x{AZURE_AK_HANDLE:08x} cannot be the azure ak: {detail}; this vtpm \
             is not the azure paravisor's"
        ),
    };
    if let Public::Rsa {
        object_attributes, ..
    } = public
    {
        if !object_attributes.sign_encrypt() {
            return Err(bad("it is not a signing key".into()));
        }
    }
    rsa_spki(public).map_err(bad)
}

fn check_ak_matches(hcl: &HclReport, ak_public: &[u8]) -> Result<(), TeeError> {
    if hcl.ak_public == ak_public {
        return Ok(());
    }
    Err(TeeError::Config {
        tee: TEE,
        detail: format!(
            "the vtpm ak at 0x{AZURE_AK_HANDLE:08x} ({}) is not the HCL report's HCLAkPub ({}); \
             the broker would reject every quote: the key at 0x{AZURE_AK_HANDLE:08x} was \
             replaced, restore the paravisor's ak",
            STANDARD.encode(ak_public),
            STANDARD.encode(&hcl.ak_public)
        ),
    })
}

fn nv_handle(index: u32) -> Result<NvIndexTpmHandle, TeeError> {
    NvIndexTpmHandle::new(index).map_err(tss("NV index handle"))
}

/// Resolves an NV index to an ESYS handle; the caller closes it.
fn open_nv(ctx: &mut Context, index: u32) -> Result<NvIndexHandle, tss_esapi::Error> {
    let tpm_handle = TpmHandle::NvIndex(NvIndexTpmHandle::new(index)?);
    ctx.execute_without_session(|c| c.tr_from_tpm_public(tpm_handle))
        .map(NvIndexHandle::from)
}

fn close_nv(ctx: &mut Context, handle: NvIndexHandle) {
    let mut object = ObjectHandle::from(handle);
    // Closing only drops the ESYS metadata; a failure leaks nothing in the TPM.
    let _ = ctx.tr_close(&mut object);
}

/// Reads a whole NV index (size from NV_ReadPublic, NV_Read in chunks).
fn read_nv(ctx: &mut Context, index: u32) -> Result<Vec<u8>, TeeError> {
    let handle = open_nv(ctx, index).map_err(|e| TeeError::Tpm {
        operation: "open the HCL report NV index",
        detail: format!(
            "NV index 0x{index:08x} is not defined ({e}): this is not an azure confidential \
             vm (az-snp-vtpm needs azure's paravisor)"
        ),
    })?;
    let result = read_nv_handle(ctx, handle, index);
    close_nv(ctx, handle);
    result
}

fn read_nv_handle(
    ctx: &mut Context,
    handle: NvIndexHandle,
    index: u32,
) -> Result<Vec<u8>, TeeError> {
    let (public, _) = ctx
        .execute_without_session(|c| c.nv_read_public(handle))
        .map_err(tss("NV_ReadPublic of the HCL report"))?;
    let size = public.data_size();
    let chunk = tss_esapi::abstraction::nv::max_nv_buffer_size(ctx)
        .map_err(tss("read TPM_PT_NV_BUFFER_MAX"))?
        .clamp(1, MaxNvBuffer::MAX_SIZE);
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        let want = chunk.min(size - out.len());
        let (Ok(want16), Ok(offset16)) = (u16::try_from(want), u16::try_from(out.len())) else {
            return Err(malformed(format!(
                "NV index 0x{index:08x} is {size} bytes, more than NV_Read can address"
            )));
        };
        let data = ctx
            .execute_with_nullauth_session(|c| c.nv_read(NvAuth::Owner, handle, want16, offset16))
            .map_err(tss("NV_Read of the HCL report"))?;
        if data.value().is_empty() {
            return Err(malformed(format!(
                "NV_Read of 0x{index:08x} returned nothing at offset {}",
                out.len()
            )));
        }
        out.extend_from_slice(data.value());
    }
    Ok(out)
}

fn read_hcl_report(ctx: &mut Context) -> Result<Vec<u8>, TeeError> {
    read_nv(ctx, HCL_REPORT_NV_INDEX)
}

/// Writes the user data to 0x01400002, defining the index (owner read/write, 64 bytes) when
/// it is missing or has another size.
fn write_user_data(ctx: &mut Context, user_data: &[u8; USER_DATA_SIZE]) -> Result<(), TeeError> {
    let index = nv_handle(REPORT_DATA_NV_INDEX)?;
    let existing = match open_nv(ctx, REPORT_DATA_NV_INDEX) {
        Ok(handle) => {
            let size = ctx
                .execute_without_session(|c| c.nv_read_public(handle))
                .map(|(public, _)| public.data_size());
            match size {
                Ok(USER_DATA_SIZE) => Some(handle),
                _ => {
                    ctx.execute_with_nullauth_session(|c| {
                        c.nv_undefine_space(Provision::Owner, handle)
                    })
                    .map_err(tss("NV_UndefineSpace of 0x01400002 (wrong size)"))?;
                    None
                }
            }
        }
        Err(_) => None,
    };
    let handle = match existing {
        Some(handle) => handle,
        None => {
            let attributes = NvIndexAttributesBuilder::new()
                .with_owner_write(true)
                .with_owner_read(true)
                .build()
                .map_err(tss("NV attributes of 0x01400002"))?;
            let public = NvPublicBuilder::new()
                .with_nv_index(index)
                .with_index_name_algorithm(HashingAlgorithm::Sha256)
                .with_index_attributes(attributes)
                .with_data_area_size(USER_DATA_SIZE)
                .build()
                .map_err(tss("NV public of 0x01400002"))?;
            ctx.execute_with_nullauth_session(|c| c.nv_define_space(Provision::Owner, None, public))
                .map_err(tss("NV_DefineSpace of 0x01400002"))?
        }
    };
    let buffer = MaxNvBuffer::try_from(user_data.to_vec()).map_err(tss("NV buffer"));
    let result = buffer.and_then(|buffer| {
        ctx.execute_with_nullauth_session(|c| c.nv_write(NvAuth::Owner, handle, buffer, 0))
            .map_err(tss("NV_Write of the report data to 0x01400002"))
    });
    close_nv(ctx, handle);
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use rsa::pkcs8::DecodePublicKey;
    use rsa::RsaPublicKey;
    use sev::parser::ByteParser;

    fn vector(path: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("verify/tests/vectors")
                .join(path),
        )
        .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// (name, HCL report, derived prefix, has a derived akpub.pem)
    const HCL_VECTORS: [(&str, &str, &str, bool); 6] = [
        (
            "trustee hcl-report.bin",
            "trustee/az-snp-vtpm/hcl-report.bin",
            "derived/trustee-az-hcl-report",
            true,
        ),
        (
            "azure-cvm-tooling hcl-report-snp.bin",
            "azure-cvm-tooling/hcl-report-snp.bin",
            "derived/azure-cvm-tooling-hcl-report-snp",
            false,
        ),
        (
            "evidence-v0",
            "derived/trustee-evidence-v0.hcl-report.bin",
            "derived/trustee-evidence-v0",
            true,
        ),
        (
            "evidence-v1",
            "derived/trustee-evidence-v1.hcl-report.bin",
            "derived/trustee-evidence-v1",
            true,
        ),
        (
            "evidence-v2",
            "derived/trustee-evidence-v2.hcl-report.bin",
            "derived/trustee-evidence-v2",
            true,
        ),
        (
            "evidence-genoa",
            "derived/trustee-evidence-genoa.hcl-report.bin",
            "derived/trustee-evidence-genoa",
            true,
        ),
    ];

    #[test]
    fn every_hcl_vector_splits_exactly_like_the_derived_files() {
        for (name, file, derived, has_ak) in HCL_VECTORS {
            let bytes = vector(file);
            let hcl = parse_hcl_report(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                hcl.snp_report,
                vector(&format!("{derived}.snp-report.bin")),
                "{name}"
            );
            assert_eq!(
                hcl.var_data,
                vector(&format!("{derived}.var-data.json")),
                "{name}"
            );
            assert_eq!(
                hcl.report.to_bytes().unwrap().as_slice(),
                &hcl.snp_report[..]
            );
            assert_eq!(
                &Sha256::digest(&hcl.var_data)[..],
                &hcl.report.report_data[..32],
                "{name}"
            );
            if has_ak {
                let pem = String::from_utf8(vector(&format!("{derived}.akpub.pem"))).unwrap();
                let expected = RsaPublicKey::from_public_key_pem(&pem).unwrap();
                let got = RsaPublicKey::from_public_key_der(&hcl.ak_public).unwrap();
                assert_eq!(got, expected, "{name}");
            } else {
                RsaPublicKey::from_public_key_der(&hcl.ak_public).unwrap();
            }
            assert!(hcl.vm_configuration.is_object(), "{name}");
        }
    }

    #[test]
    fn user_data_is_present_where_azure_writes_it() {
        let old = parse_hcl_report(&vector("azure-cvm-tooling/hcl-report-snp.bin")).unwrap();
        assert_eq!(old.user_data, None);
        let v0 = parse_hcl_report(&vector("derived/trustee-evidence-v0.hcl-report.bin")).unwrap();
        assert_eq!(v0.user_data, Some(vec![0u8; 64]));
    }

    /// The real v2 evidence shows the relation this provider relies on: user-data is the
    /// quote's 48-byte nonce (= report_data) followed by 16 zero bytes, and the quote verifies
    /// with the HCLAkPub the parser extracted.
    #[test]
    fn v2_user_data_is_report_data_padded_and_the_quote_nonce_is_report_data() {
        let hcl = parse_hcl_report(&vector("derived/trustee-evidence-v2.hcl-report.bin")).unwrap();
        let msg = vector("derived/trustee-evidence-v2.tpm-quote.msg.bin");
        let sig = vector("derived/trustee-evidence-v2.tpm-quote.sig.bin");
        let pcrs = vector("derived/trustee-evidence-v2.tpm-pcrs-sha256.bin");
        let q =
            crate::evidence::tpm::verify_quote(&msg, &sig, &hcl.ak_public, Some(&pcrs)).unwrap();
        let nonce = hex::decode(&q.extra_data).unwrap();
        let report_data: [u8; 48] = nonce.as_slice().try_into().unwrap();
        assert_eq!(
            hcl.user_data.as_deref(),
            Some(&user_data_for(&report_data)[..])
        );
    }

    #[test]
    fn quotes_of_the_other_vectors_verify_with_the_parsed_hcl_ak() {
        for (hcl, quote) in [
            (
                "trustee/az-snp-vtpm/hcl-report.bin",
                "derived/trustee-az-hcl-report",
            ),
            (
                "derived/trustee-evidence-v0.hcl-report.bin",
                "derived/trustee-evidence-v0",
            ),
            (
                "derived/trustee-evidence-genoa.hcl-report.bin",
                "derived/trustee-evidence-genoa",
            ),
        ] {
            let hcl = parse_hcl_report(&vector(hcl)).unwrap();
            let msg = vector(&format!("{quote}.tpm-quote.msg.bin"));
            let sig = vector(&format!("{quote}.tpm-quote.sig.bin"));
            crate::evidence::tpm::verify_quote(&msg, &sig, &hcl.ak_public, None)
                .unwrap_or_else(|e| panic!("{quote}: {e}"));
        }
    }

    #[test]
    fn one_bit_in_var_data_breaks_the_binding() {
        for (name, file, _, _) in HCL_VECTORS {
            let mut bytes = vector(file);
            bytes[VAR_DATA_OFFSET + 10] ^= 0x01;
            let err = parse_hcl_report(&bytes).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("REPORT_DATA[..32]"), "{name}: {text}");
        }
        // and one bit of REPORT_DATA itself
        let mut bytes = vector("derived/trustee-evidence-v2.hcl-report.bin");
        bytes[HCL_HEADER_SIZE + 0x50] ^= 0x80;
        assert!(parse_hcl_report(&bytes)
            .unwrap_err()
            .to_string()
            .contains("REPORT_DATA[..32]"));
    }

    #[test]
    fn structural_errors_are_named() {
        let good = vector("trustee/az-snp-vtpm/hcl-report.bin");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..100].to_vec(), "shorter than"),
            (
                {
                    let mut b = good.clone();
                    b[0] = b'X';
                    b
                },
                "HCLA",
            ),
            (
                {
                    let mut b = good.clone();
                    b[16] = 1;
                    b
                },
                "status",
            ),
            (
                {
                    let mut b = good.clone();
                    b[REQUEST_DATA_OFFSET + 8] = 4;
                    b
                },
                "az-tdx-vtpm",
            ),
            (
                {
                    let mut b = good.clone();
                    b[REQUEST_DATA_OFFSET + 12] = 2;
                    b
                },
                "hash type 2",
            ),
            (
                {
                    let mut b = good.clone();
                    b[REQUEST_DATA_OFFSET] ^= 1;
                    b
                },
                "request data size",
            ),
            (good[..VAR_DATA_OFFSET + 100].to_vec(), "past the end"),
        ];
        for (bytes, needle) in cases {
            let text = parse_hcl_report(&bytes).unwrap_err().to_string();
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }

    #[test]
    fn evidence_json_has_the_trustee_v2_shape() {
        let mut pcrs = [[0u8; 32]; 24];
        pcrs[8] = [0x11; 32];
        let quote = QuoteParts {
            message: vec![0xff, 0x54],
            signature: vec![0, 0x14, 0, 0x0b, 0, 2, 0xaa, 0xbb],
            raw_signature: vec![0xaa, 0xbb],
            pcrs,
        };
        let v = az_evidence_json(&quote, &[0xfb, 0xff], &[0xfe]);
        assert_eq!(v.as_object().unwrap().len(), 4);
        assert_eq!(v["version"], 2);
        assert_eq!(v["tpm_quote"]["signature"], "aabb");
        assert_eq!(v["tpm_quote"]["message"], "ff54");
        assert_eq!(v["tpm_quote"]["pcrs"].as_array().unwrap().len(), 24);
        assert_eq!(v["tpm_quote"]["pcrs"][8], "11".repeat(32));
        // base64url with padding, like the Trustee vectors.
        assert_eq!(v["hcl_report"], "-_8=");
        assert_eq!(v["vcek"], "_g==");
    }

    #[test]
    fn az_evidence_decodes_what_az_evidence_json_writes() {
        let mut pcrs = [[0u8; 32]; 24];
        pcrs[15] = [0x15; 32];
        let quote = QuoteParts {
            message: vec![0xff, 0x54, 0x80],
            signature: vec![0, 0x14, 0, 0x0b, 0, 2, 0xaa, 0xbb],
            raw_signature: vec![0xaa, 0xbb],
            pcrs,
        };
        let hcl = vector("derived/trustee-evidence-v2.hcl-report.bin");
        let vcek = vector("derived/trustee-evidence-v2.vcek.der");
        let json = az_evidence_json(&quote, &hcl, &vcek);
        let decoded = AzEvidence::from_json(&json).unwrap();
        assert_eq!(decoded.hcl_report, hcl);
        assert_eq!(decoded.vcek, vcek);
        assert_eq!(decoded.quote_message, quote.message);
        assert_eq!(decoded.quote_signature, quote.raw_signature);
        assert_eq!(decoded.pcrs, pcrs.to_vec());

        let broken = |edit: &dyn Fn(&mut Value)| {
            let mut v = json.clone();
            edit(&mut v);
            AzEvidence::from_json(&v).unwrap_err().to_string()
        };
        let cases: Vec<(String, &str)> = vec![
            (broken(&|v| v["version"] = 1.into()), "version is 1"),
            (broken(&|v| v["extra"] = 1.into()), "fields"),
            (
                broken(&|v| v["hcl_report"] = "@@".into()),
                "hcl_report is not base64url",
            ),
            (
                broken(&|v| v["tpm_quote"]["message"] = "xyz".into()),
                "message is not hex",
            ),
            (
                broken(&|v| {
                    v["tpm_quote"]["pcrs"].as_array_mut().unwrap().pop();
                }),
                "holds 23 values",
            ),
            (
                broken(&|v| v["tpm_quote"]["pcrs"][3] = "00".into()),
                "pcrs[3]",
            ),
        ];
        for (err, want) in cases {
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn checkpoint_nonce_is_the_first_48_bytes_and_user_data_the_whole_binding() {
        let mut binding = [0u8; 64];
        for (i, b) in binding.iter_mut().enumerate() {
            *b = 0x40 + i as u8;
        }
        let nonce = checkpoint_quote_nonce(&binding);
        assert_eq!(nonce.len(), QUOTE_NONCE_LEN);
        assert_eq!(&nonce[..], &binding[..48]);
        // Broker evidence pads the 48-byte nonce with zeros: a checkpoint binding (SHA-512
        // output) is a different user-data for the same nonce.
        assert_ne!(user_data_for(&nonce), binding);
    }

    #[test]
    fn vcek_from_der_and_pem_files() {
        let der = vector("derived/trustee-evidence-v2.vcek.der");
        let dir = tempfile::tempdir().unwrap();
        let der_path = dir.path().join("vcek.der");
        std::fs::write(&der_path, &der).unwrap();
        assert_eq!(load_vcek(&VcekSource::File(der_path)).unwrap(), der);

        // A PEM bundle [VCEK, ASK, ARK]: the first certificate is taken.
        let bundle = vector("trustee/az-snp-vtpm/vcek.pem");
        let pem_path = dir.path().join("vcek.pem");
        std::fs::write(&pem_path, &bundle).unwrap();
        let got = load_vcek(&VcekSource::File(pem_path)).unwrap();
        let text = String::from_utf8(bundle).unwrap();
        assert_eq!(got, pem_first_certificate(&text).unwrap());
        assert!(text.matches("BEGIN CERTIFICATE").count() == 3);

        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"not a certificate").unwrap();
        let err = load_vcek(&VcekSource::File(junk)).unwrap_err().to_string();
        assert!(err.contains("not usable"), "{err}");
        let missing = load_vcek(&VcekSource::File(dir.path().join("absent")))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("absent"), "{missing}");
    }

    /// The VCEK file read by the PEM reader: a key section before the certificate is
    /// skipped (as the hand-written parser did); broken base64 and a PEM without a
    /// certificate are refused, naming the file.
    #[test]
    fn vcek_pem_sections_base64_and_emptiness() {
        let dir = tempfile::tempdir().unwrap();
        let pem = String::from_utf8(vector("trustee/az-snp-vtpm/vcek-genoa.pem")).unwrap();
        let der = pem_first_certificate(&pem).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let key =
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        let mixed = write("mixed.pem", &format!("{key}{pem}"));
        assert_eq!(load_vcek(&VcekSource::File(mixed)).unwrap(), der);

        let body_line = pem.lines().nth(1).unwrap();
        let bad = pem.replacen(body_line, &body_line.replace('A', "!"), 1);
        assert_ne!(bad, pem);
        let bad = write("bad.pem", &bad);
        let err = load_vcek(&VcekSource::File(bad.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&bad.display().to_string()), "{err}");
        assert!(err.contains("not base64"), "{err}");

        let empty = write("key-only.pem", key);
        let err = load_vcek(&VcekSource::File(empty.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&empty.display().to_string()), "{err}");
        assert!(err.contains("holds no PEM certificate"), "{err}");
    }

    /// IMDS over real HTTP: a one-shot local server answers like Azure's THIM endpoint and
    /// checks the `Metadata: true` header.
    #[test]
    fn vcek_from_imds() {
        use std::io::{Read, Write};
        let pem = String::from_utf8(vector("trustee/az-snp-vtpm/vcek-genoa.pem")).unwrap();
        let body = json!({"vcekCert": pem, "certificateChain": "", "tcbm": "x"}).to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            let request = String::from_utf8_lossy(&request).to_lowercase();
            let status = if request.contains("metadata: true") {
                "200 OK"
            } else {
                "400 Bad Request"
            };
            write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        });
        let url = format!("http://{addr}/metadata/THIM/amd/certification");
        let der = load_vcek(&VcekSource::Imds(url)).unwrap();
        server.join().unwrap();
        assert_eq!(der, pem_first_certificate(&pem).unwrap());
    }

    #[test]
    fn user_data_pads_report_data_with_16_zero_bytes() {
        let rd = [7u8; 48];
        let ud = user_data_for(&rd);
        assert_eq!(&ud[..48], &rd[..]);
        assert_eq!(&ud[48..], &[0u8; 16]);
    }
}
