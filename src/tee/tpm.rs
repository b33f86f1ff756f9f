//! `tpm` evidence provider: TPM 2.0 quotes through `tss-esapi`, in the shape Trustee's `tpm`
//! verifier accepts (KBS-PROTOCOL.md, "Evidence shapes").
//!
//! # The attestation key (AK)
//!
//! Trustee accepts only RSA AKs that sign with RSASSA-PKCS1-v1_5 / SHA-256 (ECC and RSA-PSS
//! AKs are rejected), so that is the only kind this provider makes or loads. Two sources
//! ([`AkSource`]):
//!
//! - [`AkSource::Persistent`]: the image builder provisioned an AK at a persistent handle
//!   (conventionally `0x81010002`) and registered its public key with the broker. The key is
//!   checked on open: RSA, `restricted`, `sign`, not `decrypt`, scheme RSASSA with SHA-256;
//!   anything else is refused with the handle and what was found. This is the production
//!   choice: the AK is the same every boot, so the broker's `trusted_aks` entry stays valid.
//! - [`AkSource::Create`]: a fresh restricted RSA-2048 RSASSA/SHA-256 signing key is created
//!   with `TPM2_Create` under the **endorsement key**, the primary key of the **endorsement
//!   hierarchy** made each boot from the TCG default EK template (EK Credential Profile,
//!   template L-1: RSA-2048, AES-128-CFB, `adminWithPolicy` with the PolicySecret(endorsement)
//!   policy). The endorsement hierarchy because (a) its seed survives `TPM2_Clear`, so the
//!   EK is the same every boot; (b) the EK is the one key a TPM vendor certifies (EK
//!   certificate), and an AK that is a child of the EK can be tied to that certificate with
//!   `MakeCredential`/`ActivateCredential`, which is how a broker can later learn that the AK
//!   lives in *this* TPM; (c) it is what `tpm2_createak`, keylime and tss-esapi's `ak`
//!   module do, so operators meet no surprise. `TPM2_Create` draws a new random key, so **a
//!   created AK changes every boot**: [`Provider::describe`] says so (`ak_source`), and the
//!   operator has to register the `ak_public` it prints, or provision a persistent AK (see
//!   [`TpmProvider::persist_ak`]).
//!
//! # The application PCR
//!
//! cvm-warden extends its measurements into [`APP_PCR`] = 15 (SHA-256 bank):
//! - not PCR 8: Trustee binds `init-data` to PCR 8 (it must equal SHA-256(0³² ‖ digest),
//!   i.e. be extended exactly once since reset);
//! - not 16 or 23: those are resettable (debug / application-reset) and prove nothing;
//! - 15 is free in the stage-1 initramfs shape (firmware uses 0–7, the boot loader and
//!   systemd-stub 8–14). In the systemd shape systemd may also extend 15 (e.g.
//!   `systemd-pcrextend` of volume keys), so the audit log must record the value *before*
//!   cvm-warden's first extend: [`TpmProvider::pcr_value`] reads it.
//!
//! Only the SHA-256 bank is extended (the event log only has SHA-256 digests); the quote
//! selects only the SHA-256 bank, so a verifier never looks at the other banks.
//!
//! # Quotes that cannot race with an extend
//!
//! Every quote covers `sha256:0-23`. The PCR values are read first (`PCR_Read` returns at most
//! 8 values per call, so it loops), then the quote is made, then SHA-256 over the 24 values
//! must equal the quote's `pcrDigest`. If an extend slipped in between, the values are read
//! and quoted again, at most [`QUOTE_ATTEMPTS`] times; then the provider fails closed.

use std::cell::RefCell;
use std::fmt;
use std::path::PathBuf;
use std::rc::Rc;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rsa::pkcs8::EncodePublicKey;
use rsa::{BigUint, RsaPublicKey};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PcrHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Provision;
use tss_esapi::structures::{
    AttestInfo, Data, DigestValues, HashScheme, PcrSelectionList, PcrSelectionListBuilder, PcrSlot,
    Public, RsaScheme, Signature, SignatureScheme,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;
use tss_esapi::Context;

use super::{Provider, TeeError};
use crate::digest::Digest;
use crate::eventlog::RuntimeRegister;

pub use cvm_warden_verify::evidence::tpm::{qualifying_data, APP_PCR, PCR_COUNT};
/// The PCR selection every quote covers.
pub const PCR_SELECTION: &str = "sha256:0-23";
/// The default TCTI: the kernel's TPM resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// The conventional persistent handle of an image-provisioned AK.
pub const DEFAULT_PERSISTENT_AK: u32 = 0x8101_0002;
/// How many times a quote is retried when an extend raced with it, before failing closed.
pub const QUOTE_ATTEMPTS: usize = 3;
/// The kernel modules that provide `/dev/tpm*`.
pub(crate) const TPM_MODULES: &str = "tpm_crb or tpm_tis";

/// The TEE name of this provider.
const TEE: &str = "tpm";

/// SHA-256 PCR values, PCR 0 first.
pub(crate) type PcrValues = [[u8; 32]; PCR_COUNT];

/// The TPM context, shared between a provider and the runtime registers it hands out.
pub(crate) type SharedContext = Rc<RefCell<Context>>;

/// Where the attestation key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AkSource {
    /// Create a restricted RSA-2048 RSASSA/SHA-256 key under the endorsement key each boot
    /// (changes every boot).
    Create,
    /// Load the key the image builder provisioned at this persistent handle (`0x81xxxxxx`).
    Persistent(u32),
}

impl fmt::Display for AkSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AkSource::Create => f.write_str("created-this-boot"),
            AkSource::Persistent(handle) => write!(f, "persistent:0x{handle:08x}"),
        }
    }
}

/// A TPM 2.0 quote, marshalled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QuoteParts {
    /// `TPMS_ATTEST`, no size prefix.
    pub message: Vec<u8>,
    /// Marshalled `TPMT_SIGNATURE`.
    pub signature: Vec<u8>,
    /// The raw RSA signature inside it.
    pub raw_signature: Vec<u8>,
    /// The 24 SHA-256 PCR values the quote covers.
    pub pcrs: PcrValues,
}

/// The `tpm` evidence provider.
pub struct TpmProvider {
    tcti: String,
    ctx: SharedContext,
    ak: KeyHandle,
    ak_public: Vec<u8>,
    ak_source: AkSource,
}

impl fmt::Debug for TpmProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmProvider")
            .field("tcti", &self.tcti)
            .field("ak_source", &self.ak_source)
            .field("ak_public", &STANDARD.encode(&self.ak_public))
            .finish_non_exhaustive()
    }
}

impl TpmProvider {
    /// Opens the TPM at `tcti` (tss-esapi `TctiNameConf` form: `device:/dev/tpmrm0`,
    /// `swtpm:host=127.0.0.1,port=2321`, …) and makes or loads the AK.
    pub fn open(tcti: &str, ak: AkSource) -> Result<Self, TeeError> {
        let mut ctx = open_context(TEE, tcti)?;
        let (handle, public) = match ak {
            AkSource::Create => create_ak(&mut ctx)?,
            AkSource::Persistent(h) => {
                let (handle, public) = load_persistent_key(&mut ctx, h)?;
                check_ak_public(&public).map_err(|detail| TeeError::Config {
                    tee: TEE,
                    detail: format!(
                        "the key at persistent handle 0x{h:08x} cannot be the ak: {detail}; \
                         provision a restricted rsa signing key with scheme rsassa/sha256 \
                         there (Trustee accepts no other ak)"
                    ),
                })?;
                (handle, public)
            }
        };
        let ak_public = rsa_spki(&public).map_err(|detail| TeeError::Malformed {
            tee: TEE,
            what: "ak public key",
            detail,
        })?;
        Ok(Self {
            tcti: tcti.to_string(),
            ctx: Rc::new(RefCell::new(ctx)),
            ak: handle,
            ak_public,
            ak_source: ak,
        })
    }

    /// The AK public key, SubjectPublicKeyInfo DER (what `ak_public` carries, decoded).
    pub fn ak_public(&self) -> &[u8] {
        &self.ak_public
    }

    /// Where the AK came from.
    pub fn ak_source(&self) -> AkSource {
        self.ak_source
    }

    /// The SHA-256 value of PCR `index` (0–23), e.g. PCR 15 before the first extend.
    pub fn pcr_value(&mut self, index: u8) -> Result<[u8; 32], TeeError> {
        let mut ctx = self.ctx.borrow_mut();
        pcr_value(&mut ctx, index)
    }

    /// A quote over `sha256:0-23` with `qualifying` as qualifying data, in the `tpm` evidence
    /// shape (used for audit-log checkpoints; [`Provider::evidence`] uses `report_data[..32]`).
    pub fn quote_with(&mut self, qualifying: &[u8; 32]) -> Result<Value, TeeError> {
        let mut ctx = self.ctx.borrow_mut();
        let quote = consistent_quote(&mut ctx, self.ak, qualifying, SignatureScheme::Null)?;
        Ok(tpm_evidence_json(&self.ak_public, &quote))
    }

    /// Makes the AK persistent at `handle` (owner hierarchy, `TPM2_EvictControl`): the
    /// image-builder step that turns a created AK into one that survives reboots. Refused
    /// for an AK that is already persistent.
    pub fn persist_ak(&mut self, handle: u32) -> Result<(), TeeError> {
        if let AkSource::Persistent(current) = self.ak_source {
            return Err(TeeError::Config {
                tee: TEE,
                detail: format!(
                    "the ak is already persistent at 0x{current:08x}; open with ak = create \
                     to provision a new one"
                ),
            });
        }
        let persistent = persistent_handle(handle)?;
        let mut ctx = self.ctx.borrow_mut();
        ctx.execute_with_nullauth_session(|c| {
            c.evict_control(
                Provision::Owner,
                ObjectHandle::from(self.ak),
                Persistent::Persistent(persistent),
            )
        })
        .map_err(tss("EvictControl (persist the ak)"))?;
        Ok(())
    }
}

impl Provider for TpmProvider {
    fn tee(&self) -> &'static str {
        TEE
    }

    fn evidence(&mut self, report_data: &[u8; 48]) -> Result<Value, TeeError> {
        self.quote_with(&qualifying_data(report_data))
    }

    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, TeeError> {
        let mut qualifying = [0u8; 32];
        qualifying.copy_from_slice(&binding[..32]);
        self.quote_with(&qualifying)
    }

    fn runtime_register(&mut self) -> Result<Option<Box<dyn RuntimeRegister>>, TeeError> {
        Ok(Some(Box::new(TpmPcr::new(self.ctx.clone(), APP_PCR)?)))
    }

    fn describe(&self) -> Value {
        json!({
            "tcti": self.tcti,
            "ak_public": STANDARD.encode(&self.ak_public),
            "ak_source": self.ak_source.to_string(),
            "pcr": APP_PCR,
            "pcr_selection": PCR_SELECTION,
        })
    }
}

/// A PCR as a [`RuntimeRegister`]: `extend` is `PCR_Extend` of the SHA-256 bank.
pub struct TpmPcr {
    ctx: SharedContext,
    handle: PcrHandle,
    index: u8,
}

impl fmt::Debug for TpmPcr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmPcr")
            .field("index", &self.index)
            .finish()
    }
}

impl TpmPcr {
    pub(crate) fn new(ctx: SharedContext, index: u8) -> Result<Self, TeeError> {
        Ok(Self {
            ctx,
            handle: pcr_handle(index)?,
            index,
        })
    }
}

impl RuntimeRegister for TpmPcr {
    fn name(&self) -> String {
        format!("tpm pcr {}", self.index)
    }

    fn extend(&mut self, digest: &Digest) -> Result<(), std::io::Error> {
        let value = tss_esapi::structures::Digest::try_from(digest.0.to_vec())
            .map_err(|e| std::io::Error::other(format!("PCR_Extend pcr {}: {e}", self.index)))?;
        let mut values = DigestValues::new();
        values.set(HashingAlgorithm::Sha256, value);
        let mut ctx = self.ctx.borrow_mut();
        ctx.execute_with_nullauth_session(|c| c.pcr_extend(self.handle, values))
            .map_err(|e| std::io::Error::other(format!("PCR_Extend pcr {}: {e}", self.index)))
    }

    fn read(&mut self) -> Result<Option<Digest>, std::io::Error> {
        let mut ctx = self.ctx.borrow_mut();
        let value = pcr_value(&mut ctx, self.index)
            .map_err(|e| std::io::Error::other(format!("PCR_Read pcr {}: {e}", self.index)))?;
        Ok(Some(Digest(value)))
    }
}

// ---- shared with the az-snp-vtpm provider ----

/// Converts a TSS error into [`TeeError::Tpm`] naming the operation.
pub(crate) fn tss(operation: &'static str) -> impl FnOnce(tss_esapi::Error) -> TeeError {
    move |e| TeeError::Tpm {
        operation,
        detail: e.to_string(),
    }
}

/// The device path a `device` TCTI names (`device` alone is the TSS default `/dev/tpm0`).
pub(crate) fn tcti_device(tcti: &str) -> Option<PathBuf> {
    let rest = tcti.strip_prefix("device")?;
    match rest.strip_prefix(':') {
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ if rest.is_empty() || rest == ":" => Some(PathBuf::from("/dev/tpm0")),
        _ => None,
    }
}

/// Opens a TSS context; a missing device is [`TeeError::DeviceMissing`].
pub(crate) fn open_context(tee: &'static str, tcti: &str) -> Result<Context, TeeError> {
    let conf = TctiNameConf::from_str(tcti).map_err(|e| TeeError::Config {
        tee,
        detail: format!(
            "tcti {tcti:?} is not a tss tcti string ({e}); use e.g. {DEFAULT_TCTI:?} or \
             \"swtpm:host=127.0.0.1,port=2321\""
        ),
    })?;
    if let Some(device) = tcti_device(tcti) {
        if !device.exists() {
            return Err(TeeError::DeviceMissing {
                tee,
                device,
                module: TPM_MODULES,
            });
        }
    }
    Context::new(conf).map_err(|e| TeeError::Tpm {
        operation: "open the tpm (Esys_Initialize)",
        detail: format!("tcti {tcti}: {e}"),
    })
}

/// The selection `sha256:0-23`.
pub(crate) fn full_selection() -> Result<PcrSelectionList, TeeError> {
    let slots = (0..PCR_COUNT)
        .map(|i| pcr_slot(i as u32))
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(tss("build the pcr selection sha256:0-23"))
}

fn pcr_slot(index: u32) -> Result<PcrSlot, TeeError> {
    let bad = || TeeError::Config {
        tee: TEE,
        detail: format!("pcr {index} does not exist; pcrs are 0-23"),
    };
    if index as usize >= PCR_COUNT {
        return Err(bad());
    }
    PcrSlot::try_from(1u32 << index).map_err(|_| bad())
}

fn slot_index(slot: PcrSlot) -> usize {
    u32::from(slot).trailing_zeros() as usize
}

fn pcr_handle(index: u8) -> Result<PcrHandle, TeeError> {
    use PcrHandle::*;
    const HANDLES: [PcrHandle; PCR_COUNT] = [
        Pcr0, Pcr1, Pcr2, Pcr3, Pcr4, Pcr5, Pcr6, Pcr7, Pcr8, Pcr9, Pcr10, Pcr11, Pcr12, Pcr13,
        Pcr14, Pcr15, Pcr16, Pcr17, Pcr18, Pcr19, Pcr20, Pcr21, Pcr22, Pcr23,
    ];
    HANDLES
        .get(usize::from(index))
        .copied()
        .ok_or_else(|| TeeError::Config {
            tee: TEE,
            detail: format!("pcr {index} does not exist; pcrs are 0-23"),
        })
}

/// Reads the 24 SHA-256 PCRs (`PCR_Read` returns at most 8 per call).
pub(crate) fn read_pcrs(ctx: &mut Context) -> Result<PcrValues, TeeError> {
    let mut remaining = full_selection()?;
    let mut values = [[0u8; 32]; PCR_COUNT];
    let mut seen = [false; PCR_COUNT];
    // 24 PCRs, at least one per call: more rounds than that means the TPM returns nothing.
    for _ in 0..=PCR_COUNT {
        if remaining.is_empty() {
            break;
        }
        let (_, read, digests) = ctx
            .execute_without_session(|c| c.pcr_read(remaining.clone()))
            .map_err(tss("PCR_Read sha256:0-23"))?;
        let mut digests = digests.value().iter();
        let mut progress = false;
        for selection in read.get_selections() {
            if selection.hashing_algorithm() != HashingAlgorithm::Sha256 {
                return Err(malformed_pcrs("PCR_Read returned a bank other than sha256"));
            }
            for slot in selection.selected() {
                let index = slot_index(slot);
                let digest = digests
                    .next()
                    .ok_or_else(|| malformed_pcrs("PCR_Read returned fewer values than pcrs"))?;
                let value: [u8; 32] = digest.value().try_into().map_err(|_| {
                    malformed_pcrs("PCR_Read returned a sha256 value that is not 32 bytes")
                })?;
                let (Some(v), Some(s)) = (values.get_mut(index), seen.get_mut(index)) else {
                    return Err(malformed_pcrs("PCR_Read returned a pcr above 23"));
                };
                *v = value;
                *s = true;
                progress = true;
            }
        }
        if !progress {
            return Err(malformed_pcrs(
                "PCR_Read returned no values; is the sha256 bank allocated? (tpm2_pcrallocate)",
            ));
        }
        remaining
            .subtract(&read)
            .map_err(tss("PCR_Read (track the pcrs left to read)"))?;
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(malformed_pcrs(&format!(
            "PCR_Read never returned pcr {missing} of the sha256 bank"
        )));
    }
    Ok(values)
}

fn malformed_pcrs(detail: &str) -> TeeError {
    TeeError::Malformed {
        tee: TEE,
        what: "pcr values",
        detail: detail.to_string(),
    }
}

/// The SHA-256 value of one PCR.
pub(crate) fn pcr_value(ctx: &mut Context, index: u8) -> Result<[u8; 32], TeeError> {
    pcr_handle(index)?;
    let values = read_pcrs(ctx)?;
    Ok(values[usize::from(index)])
}

/// SHA-256 over the PCR values in index order: a `sha256:0-23` quote's `pcrDigest`.
pub(crate) fn pcr_digest(pcrs: &PcrValues) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for value in pcrs {
        hasher.update(value);
    }
    hasher.finalize().into()
}

/// Reads the PCRs, quotes, and checks the values match the quote's `pcrDigest`; retries
/// [`QUOTE_ATTEMPTS`] times when an extend raced in between, then fails closed.
pub(crate) fn consistent_quote(
    ctx: &mut Context,
    ak: KeyHandle,
    qualifying: &[u8],
    scheme: SignatureScheme,
) -> Result<QuoteParts, TeeError> {
    let selection = full_selection()?;
    let mut last = String::new();
    for _ in 0..QUOTE_ATTEMPTS {
        let pcrs = read_pcrs(ctx)?;
        let data = Data::try_from(qualifying.to_vec()).map_err(tss("Quote (qualifying data)"))?;
        let (attest, signature) = ctx
            .execute_with_nullauth_session(|c| c.quote(ak, data, scheme, selection.clone()))
            .map_err(tss("Quote sha256:0-23"))?;
        let AttestInfo::Quote { info } = attest.attested() else {
            return Err(malformed_quote(
                "the tpm answered Quote with a non-quote attestation",
            ));
        };
        if attest.extra_data().value() != qualifying {
            return Err(malformed_quote(
                "the quote's extraData is not the qualifying data sent",
            ));
        }
        let Signature::RsaSsa(rsa_signature) = &signature else {
            return Err(malformed_quote(
                "the quote is not signed with rsassa; the ak must be an rsassa/sha256 key",
            ));
        };
        if rsa_signature.hashing_algorithm() != HashingAlgorithm::Sha256 {
            return Err(malformed_quote(
                "the quote signature does not use sha256; the ak must be an rsassa/sha256 key",
            ));
        }
        let digest = pcr_digest(&pcrs);
        if info.pcr_digest().value() == digest {
            return Ok(QuoteParts {
                message: attest.marshall().map_err(tss("marshal TPMS_ATTEST"))?,
                signature: signature
                    .marshall()
                    .map_err(tss("marshal TPMT_SIGNATURE"))?,
                raw_signature: rsa_signature.signature().value().to_vec(),
                pcrs,
            });
        }
        last = format!(
            "pcrDigest {} but the pcrs read hash to {}",
            hex::encode(info.pcr_digest().value()),
            hex::encode(digest)
        );
    }
    Err(TeeError::Tpm {
        operation: "Quote (pcr values consistent with the quote)",
        detail: format!(
            "after {QUOTE_ATTEMPTS} attempts the pcr values still changed between read and \
             quote ({last}); something keeps extending pcrs, stop it and retry"
        ),
    })
}

fn malformed_quote(detail: &str) -> TeeError {
    TeeError::Malformed {
        tee: TEE,
        what: "quote",
        detail: detail.to_string(),
    }
}

fn persistent_handle(handle: u32) -> Result<PersistentTpmHandle, TeeError> {
    PersistentTpmHandle::new(handle).map_err(|_| TeeError::Config {
        tee: TEE,
        detail: format!(
            "0x{handle:08x} is not a persistent handle; persistent handles are \
             0x81000000-0x81ffffff (e.g. 0x{DEFAULT_PERSISTENT_AK:08x})"
        ),
    })
}

/// Loads the key at a persistent handle and reads its public area.
pub(crate) fn load_persistent_key(
    ctx: &mut Context,
    handle: u32,
) -> Result<(KeyHandle, Public), TeeError> {
    let persistent = persistent_handle(handle)?;
    let object = ctx
        .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(persistent)))
        .map_err(|e| TeeError::Tpm {
            operation: "load the persistent ak (TR_FromTPMPublic)",
            detail: format!(
                "no key at persistent handle 0x{handle:08x} ({e}); provision one there \
                 (tpm2_evictcontrol, or TpmProvider::persist_ak) or use ak = create"
            ),
        })?;
    let key = KeyHandle::from(object);
    let (public, _, _) = ctx
        .execute_without_session(|c| c.read_public(key))
        .map_err(tss("ReadPublic of the persistent ak"))?;
    Ok((key, public))
}

/// Creates the EK from the default template and a restricted RSA-2048 RSASSA/SHA-256 AK
/// under it; loads the AK and flushes the EK.
fn create_ak(ctx: &mut Context) -> Result<(KeyHandle, Public), TeeError> {
    let rsa = AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048);
    let ek = ek::create_ek_object_2(ctx, rsa, None).map_err(tss(
        "CreatePrimary of the endorsement key (default template)",
    ))?;
    let created = ak::create_ak_2(
        ctx,
        ek,
        HashingAlgorithm::Sha256,
        rsa,
        SignatureSchemeAlgorithm::RsaSsa,
        None,
        None,
    )
    .map_err(tss("Create of the ak under the endorsement key"));
    let loaded = created.and_then(|created| {
        let public = created.out_public.clone();
        ak::load_ak(ctx, ek, None, created.out_private, created.out_public)
            .map(|handle| (handle, public))
            .map_err(tss("Load of the ak"))
    });
    let flushed = ctx
        .flush_context(ObjectHandle::from(ek))
        .map_err(tss("FlushContext of the endorsement key"));
    let (handle, public) = loaded?;
    flushed?;
    Ok((handle, public))
}

/// Checks a public area is an AK Trustee accepts: RSA, restricted, sign, not decrypt,
/// RSASSA with SHA-256. The error says what was found.
pub(crate) fn check_ak_public(public: &Public) -> Result<(), String> {
    let Public::Rsa {
        object_attributes,
        parameters,
        ..
    } = public
    else {
        return Err("it is not an rsa key (ecc and other aks are rejected by Trustee)".into());
    };
    if !object_attributes.restricted() || !object_attributes.sign_encrypt() {
        return Err("it is not a restricted signing key".into());
    }
    if object_attributes.decrypt() {
        return Err("it is also a decryption key".into());
    }
    match parameters.rsa_scheme() {
        RsaScheme::RsaSsa(hash) if hash.hashing_algorithm() == HashingAlgorithm::Sha256 => Ok(()),
        RsaScheme::RsaSsa(hash) => Err(format!(
            "its scheme is rsassa with {:?}, not sha256",
            hash.hashing_algorithm()
        )),
        other => Err(format!("its scheme is {other:?}, not rsassa/sha256")),
    }
}

/// The SubjectPublicKeyInfo DER of an RSA public area.
pub(crate) fn rsa_spki(public: &Public) -> Result<Vec<u8>, String> {
    let Public::Rsa {
        parameters, unique, ..
    } = public
    else {
        return Err("not an rsa key".into());
    };
    let exponent = match parameters.exponent().value() {
        0 => 65537,
        e => e,
    };
    let key = RsaPublicKey::new(
        BigUint::from_bytes_be(unique.value()),
        BigUint::from(exponent),
    )
    .map_err(|e| format!("invalid rsa public key: {e}"))?;
    key.to_public_key_der()
        .map(|der| der.as_bytes().to_vec())
        .map_err(|e| format!("cannot encode the rsa public key: {e}"))
}

/// The explicit RSASSA/SHA-256 signing scheme (for AKs whose own scheme is null).
pub(crate) fn rsassa_sha256() -> SignatureScheme {
    SignatureScheme::RsaSsa {
        hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
    }
}

// ---- pure helpers ----

/// The `tpm` evidence JSON: `ak_public` (SPKI DER) and the quote, base64 standard with
/// padding, PCRs as lowercase hex in index order.
pub(crate) fn tpm_evidence_json(ak_public: &[u8], quote: &QuoteParts) -> Value {
    use cvm_warden_verify::schema::{Base64, Pcr, TpmEvidence, TpmQuote};
    let evidence = TpmEvidence {
        ak_public: Base64(ak_public.to_vec()),
        tpm_quote: TpmQuote {
            signature: Base64(quote.signature.clone()),
            message: Base64(quote.message.clone()),
            pcrs: quote.pcrs.iter().map(|p| Pcr(*p)).collect(),
        },
    };
    // Serializing plain strings and lists cannot fail.
    serde_json::to_value(evidence).unwrap_or(Value::Null)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn qualifying_data_is_the_first_32_bytes() {
        let mut rd = [0u8; 48];
        for (i, b) in rd.iter_mut().enumerate() {
            *b = i as u8;
        }
        let q = qualifying_data(&rd);
        assert_eq!(q.as_slice(), &rd[..32]);
    }

    #[test]
    fn evidence_json_has_exactly_the_trustee_shape() {
        let mut pcrs = [[0u8; 32]; PCR_COUNT];
        pcrs[15] = [0xab; 32];
        let quote = QuoteParts {
            message: vec![0xff, 0x54, 0x43, 0x47],
            signature: vec![0x00, 0x14, 0x00, 0x0b, 0x00, 0x01, 0x7f],
            raw_signature: vec![0x7f],
            pcrs,
        };
        let v = tpm_evidence_json(&[1, 2, 3], &quote);
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 2);
        assert_eq!(v["ak_public"], "AQID");
        let q = v["tpm_quote"].as_object().unwrap();
        assert_eq!(q.len(), 3);
        assert_eq!(v["tpm_quote"]["message"], "/1RDRw==");
        assert_eq!(v["tpm_quote"]["signature"], "ABQACwABfw==");
        let p = v["tpm_quote"]["pcrs"].as_array().unwrap();
        assert_eq!(p.len(), 24);
        assert_eq!(p[0], "0".repeat(64));
        assert_eq!(p[15], "ab".repeat(32));
    }

    #[test]
    fn pcr_digest_is_sha256_over_the_concatenation() {
        let mut pcrs = [[0u8; 32]; PCR_COUNT];
        pcrs[0][0] = 1;
        let mut concat = Vec::new();
        for p in &pcrs {
            concat.extend_from_slice(p);
        }
        assert_eq!(pcr_digest(&pcrs), <[u8; 32]>::from(Sha256::digest(&concat)));
    }

    #[test]
    fn selection_is_sha256_0_to_23() {
        let sel = full_selection().unwrap();
        let selections = sel.get_selections();
        assert_eq!(selections.len(), 1);
        assert_eq!(selections[0].hashing_algorithm(), HashingAlgorithm::Sha256);
        let idx: Vec<usize> = selections[0]
            .selected()
            .into_iter()
            .map(slot_index)
            .collect();
        assert_eq!(idx, (0..24).collect::<Vec<_>>());
        assert!(pcr_slot(24).is_err());
        assert!(pcr_handle(24).is_err());
        assert!(matches!(pcr_handle(15), Ok(PcrHandle::Pcr15)));
    }

    #[test]
    fn tcti_device_paths() {
        assert_eq!(
            tcti_device("device:/dev/tpmrm0"),
            Some(PathBuf::from("/dev/tpmrm0"))
        );
        assert_eq!(tcti_device("device"), Some(PathBuf::from("/dev/tpm0")));
        assert_eq!(tcti_device("swtpm:host=127.0.0.1,port=1"), None);
        assert_eq!(tcti_device("devicex"), None);
    }

    #[test]
    fn missing_device_names_the_path_and_both_modules() {
        let err = open_context(TEE, "device:/nonexistent/tpmrm0").unwrap_err();
        match &err {
            TeeError::DeviceMissing { device, module, .. } => {
                assert_eq!(device, &PathBuf::from("/nonexistent/tpmrm0"));
                assert_eq!(*module, "tpm_crb or tpm_tis");
            }
            other => panic!("{other}"),
        }
        let text = err.to_string();
        assert!(text.contains("/nonexistent/tpmrm0") && text.contains("tpm_crb or tpm_tis"));
    }

    #[test]
    fn bad_tcti_string_is_a_config_error() {
        let err = open_context(TEE, "bogus:whatever").unwrap_err();
        assert!(matches!(err, TeeError::Config { .. }), "{err}");
        assert!(err.to_string().contains("bogus:whatever"));
    }

    #[test]
    fn persistent_handle_range_is_checked() {
        assert!(persistent_handle(0x8101_0002).is_ok());
        let err = persistent_handle(0x0101_0002).unwrap_err();
        assert!(err.to_string().contains("0x01010002"), "{err}");
    }

    #[test]
    fn ak_source_display() {
        assert_eq!(AkSource::Create.to_string(), "created-this-boot");
        assert_eq!(
            AkSource::Persistent(0x8101_0002).to_string(),
            "persistent:0x81010002"
        );
    }

    fn rsa_public(restricted: bool, decrypt: bool, scheme: RsaScheme) -> Public {
        use tss_esapi::attributes::ObjectAttributesBuilder;
        use tss_esapi::interface_types::algorithm::PublicAlgorithm;
        use tss_esapi::structures::{PublicBuilder, PublicKeyRsa, PublicRsaParametersBuilder};
        let attrs = ObjectAttributesBuilder::new()
            .with_restricted(restricted)
            .with_sign_encrypt(true)
            .with_decrypt(decrypt)
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .build()
            .unwrap();
        let modulus = {
            let mut n = vec![0xc5u8; 256];
            n[255] |= 1;
            n
        };
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Rsa)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_rsa_parameters(
                PublicRsaParametersBuilder::new()
                    .with_scheme(scheme)
                    .with_key_bits(RsaKeyBits::Rsa2048)
                    .with_is_signing_key(true)
                    .with_is_decryption_key(decrypt)
                    .with_restricted(restricted)
                    .build()
                    .unwrap(),
            )
            .with_rsa_unique_identifier(PublicKeyRsa::try_from(modulus).unwrap())
            .build()
            .unwrap()
    }

    #[test]
    fn ak_checks() {
        let good = rsa_public(
            true,
            false,
            RsaScheme::RsaSsa(HashScheme::new(HashingAlgorithm::Sha256)),
        );
        check_ak_public(&good).unwrap();
        let spki = rsa_spki(&good).unwrap();
        let key =
            <RsaPublicKey as rsa::pkcs8::DecodePublicKey>::from_public_key_der(&spki).unwrap();
        assert_eq!(
            rsa::traits::PublicKeyParts::e(&key),
            &BigUint::from(65537u32)
        );

        let pss = rsa_public(
            true,
            false,
            RsaScheme::RsaPss(HashScheme::new(HashingAlgorithm::Sha256)),
        );
        assert!(check_ak_public(&pss).unwrap_err().contains("RsaPss"));
        let sha1 = rsa_public(
            true,
            false,
            RsaScheme::RsaSsa(HashScheme::new(HashingAlgorithm::Sha1)),
        );
        assert!(check_ak_public(&sha1).unwrap_err().contains("not sha256"));
        let unrestricted = rsa_public(
            false,
            false,
            RsaScheme::RsaSsa(HashScheme::new(HashingAlgorithm::Sha256)),
        );
        assert!(check_ak_public(&unrestricted)
            .unwrap_err()
            .contains("restricted"));
    }
}
