//! The `tpm` and `az-snp-vtpm` evidence providers against a real software TPM (`swtpm`).
//!
//! Every test that needs a TPM starts its own `swtpm socket --tpm2` on free ports with a
//! temporary state directory and kills it on drop (also when the test fails). When `swtpm`
//! is not installed the tests FAIL, naming it: they are never skipped silently.
//!
//! The Azure path cannot meet a real Azure vTPM here, so the test plays the paravisor: it
//! defines NV index 0x01400001 itself and fills it with an HCL report built from the real
//! `evidence-v2` vector whose variable data carries this swtpm's AK (as `HCLAkPub`) and the
//! expected `user-data`, with the SNP REPORT_DATA rebound to SHA-256 of that variable data
//! (so the SNP signature no longer verifies — the provider does not verify it, the broker
//! does). The provider's own code path (NV write of the report data, NV_ReadPublic, chunked
//! NV_Read, the parse and binding checks, the AK check, the quote) runs for real.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use cvm_warden::digest::Digest;
use cvm_warden::evidence::tpm::verify_quote;
use cvm_warden::tee::azure::{
    checkpoint_quote_nonce, parse_hcl_report, user_data_for, AzEvidence, AzSnpVtpmProvider,
    AzureOptions, VcekSource, AZURE_AK_HANDLE, HCL_REPORT_NV_INDEX, REPORT_DATA_NV_INDEX,
};
use cvm_warden::tee::tpm::{AkSource, TpmProvider, APP_PCR};
use cvm_warden::tee::{Provider, TeeError};
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::handles::{
    NvIndexHandle, NvIndexTpmHandle, ObjectHandle, PersistentTpmHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::structures::{MaxNvBuffer, NvPublicBuilder};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::Context;

#[path = "common/swtpm.rs"]
mod swtpm;
use swtpm::Swtpm;

/// A raw TSS context on `tpm` (the providers must be dropped first: swtpm serves one client).
fn context_of(tpm: &Swtpm) -> Context {
    Context::new(TctiNameConf::from_str(&tpm.tcti()).unwrap()).unwrap()
}

fn vector(path: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("verify/tests/vectors")
            .join(path),
    )
    .unwrap()
}

fn vector_path(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("verify/tests/vectors")
        .join(path)
}

fn report_data(seed: u8) -> [u8; 48] {
    let mut rd = [0u8; 48];
    for (i, b) in rd.iter_mut().enumerate() {
        *b = seed.wrapping_mul(31).wrapping_add(i as u8);
    }
    rd
}

/// The parts of `tpm` evidence, decoded; fails when the JSON has any other shape.
struct TpmEvidence {
    ak: Vec<u8>,
    msg: Vec<u8>,
    sig: Vec<u8>,
    pcrs: Vec<u8>,
    pcr_hex: Vec<String>,
}

fn decode_tpm_evidence(v: &Value) -> TpmEvidence {
    let top: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(top, ["ak_public", "tpm_quote"]);
    let q = v["tpm_quote"].as_object().unwrap();
    let mut keys: Vec<&String> = q.keys().collect();
    keys.sort();
    assert_eq!(keys, ["message", "pcrs", "signature"]);
    let pcr_hex: Vec<String> = q["pcrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert_eq!(pcr_hex.len(), 24);
    let mut pcrs = Vec::new();
    for p in &pcr_hex {
        assert_eq!(p.len(), 64);
        assert_eq!(p, &p.to_lowercase());
        pcrs.extend(hex::decode(p).unwrap());
    }
    let sig = STANDARD.decode(q["signature"].as_str().unwrap()).unwrap();
    // A marshalled TPMT_SIGNATURE: RSASSA (0x0014), SHA-256 (0x000b), size, signature.
    assert_eq!(&sig[..4], &[0x00, 0x14, 0x00, 0x0b]);
    TpmEvidence {
        ak: STANDARD.decode(v["ak_public"].as_str().unwrap()).unwrap(),
        msg: STANDARD.decode(q["message"].as_str().unwrap()).unwrap(),
        sig,
        pcrs,
        pcr_hex,
    }
}

#[test]
fn tpm_evidence_verifies_and_carries_report_data_cut_to_32() {
    let started = Instant::now();
    let swtpm = Swtpm::start();
    let mut tpm = TpmProvider::open(&swtpm.tcti(), AkSource::Create).unwrap();
    assert_eq!(tpm.tee(), "tpm");
    let rd = report_data(1);
    let evidence = tpm.evidence(&rd).unwrap();
    let e = decode_tpm_evidence(&evidence);
    // ak_public is SubjectPublicKeyInfo DER of an RSA-2048 key.
    let key = rsa::RsaPublicKey::from_public_key_der(&e.ak).unwrap();
    assert_eq!(key.size(), 256);
    assert_eq!(e.ak, tpm.ak_public());

    let q = verify_quote(&e.msg, &e.sig, &e.ak, Some(&e.pcrs)).unwrap();
    assert!(q.verified && q.pcrs_checked);
    assert_eq!(q.extra_data, hex::encode(&rd[..32]));
    assert_eq!(q.pcr_selection.len(), 1);
    assert_eq!(q.pcr_selection[0].hash, "sha256");
    assert_eq!(q.pcr_selection[0].pcrs, (0..24).collect::<Vec<u32>>());

    // Another key does not verify it; a changed pcr value does not match the digest.
    let other = vector("azure-cvm-tooling/akpub.pem");
    assert!(verify_quote(&e.msg, &e.sig, &other, Some(&e.pcrs)).is_err());
    let mut pcrs = e.pcrs.clone();
    pcrs[15 * 32] ^= 1;
    assert!(verify_quote(&e.msg, &e.sig, &e.ak, Some(&pcrs)).is_err());

    let d = tpm.describe();
    assert_eq!(d["tcti"], swtpm.tcti());
    assert_eq!(d["ak_public"], evidence["ak_public"]);
    assert_eq!(d["ak_source"], "created-this-boot");
    assert_eq!(d["pcr"], 15);
    assert_eq!(d["pcr_selection"], "sha256:0-23");
    eprintln!("tpm evidence test: {:?}", started.elapsed());
}

#[test]
fn extending_the_register_moves_pcr_15_and_the_next_quote_shows_it() {
    let started = Instant::now();
    let swtpm = Swtpm::start();
    let mut tpm = TpmProvider::open(&swtpm.tcti(), AkSource::Create).unwrap();
    let before = tpm.pcr_value(APP_PCR).unwrap();
    let pcr14 = tpm.pcr_value(14).unwrap();
    let mut register = tpm.runtime_register().unwrap().unwrap();
    assert_eq!(register.name(), "tpm pcr 15");
    let digest = Digest::of(b"bundle manifest");
    register.extend(&digest).unwrap();

    let mut expected = Sha256::new();
    expected.update(before);
    expected.update(digest.0);
    let expected: [u8; 32] = expected.finalize().into();
    let after = tpm.pcr_value(APP_PCR).unwrap();
    assert_eq!(after, expected);
    assert_ne!(after, before);
    assert_eq!(tpm.pcr_value(14).unwrap(), pcr14, "only pcr 15 moves");
    assert!(tpm.pcr_value(24).is_err());

    // The next quote covers the new value.
    let e = decode_tpm_evidence(&tpm.evidence(&report_data(2)).unwrap());
    assert_eq!(e.pcr_hex[15], hex::encode(expected));
    verify_quote(&e.msg, &e.sig, &e.ak, Some(&e.pcrs)).unwrap();

    // A checkpoint quote with arbitrary qualifying data has the same shape.
    let qualifying = [0x5a; 32];
    let c = decode_tpm_evidence(&tpm.quote_with(&qualifying).unwrap());
    let q = verify_quote(&c.msg, &c.sig, &c.ak, Some(&c.pcrs)).unwrap();
    assert_eq!(q.extra_data, hex::encode(qualifying));
    assert_eq!(c.pcr_hex[15], hex::encode(expected));

    // A second extend chains again.
    register.extend(&digest).unwrap();
    let mut again = Sha256::new();
    again.update(expected);
    again.update(digest.0);
    assert_eq!(
        tpm.pcr_value(APP_PCR).unwrap(),
        <[u8; 32]>::from(again.finalize())
    );
    eprintln!("pcr extend test: {:?}", started.elapsed());
}

#[test]
fn a_persistent_ak_is_loaded_checked_and_quotes() {
    let started = Instant::now();
    let swtpm = Swtpm::start();
    let handle = 0x8101_0002;
    let ak = {
        let mut tpm = TpmProvider::open(&swtpm.tcti(), AkSource::Create).unwrap();
        tpm.persist_ak(handle).unwrap();
        tpm.ak_public().to_vec()
    };
    let mut tpm = TpmProvider::open(&swtpm.tcti(), AkSource::Persistent(handle)).unwrap();
    assert_eq!(tpm.ak_public(), ak, "the same key after reopening");
    assert_eq!(tpm.describe()["ak_source"], "persistent:0x81010002");
    let rd = report_data(3);
    let e = decode_tpm_evidence(&tpm.evidence(&rd).unwrap());
    assert_eq!(e.ak, ak);
    let q = verify_quote(&e.msg, &e.sig, &e.ak, Some(&e.pcrs)).unwrap();
    assert_eq!(q.extra_data, hex::encode(&rd[..32]));
    let err = tpm.persist_ak(0x8101_0005).unwrap_err().to_string();
    assert!(err.contains("already persistent"), "{err}");
    drop(tpm);

    // Nothing at the handle: the error names it.
    let err = TpmProvider::open(&swtpm.tcti(), AkSource::Persistent(0x8101_0003))
        .unwrap_err()
        .to_string();
    assert!(err.contains("0x81010003"), "{err}");

    // A key that is not an AK (the EK: a restricted decryption key) is refused.
    {
        let mut ctx = context_of(&swtpm);
        let ek = tss_esapi::abstraction::ek::create_ek_object_2(
            &mut ctx,
            tss_esapi::abstraction::AsymmetricAlgorithmSelection::Rsa(
                tss_esapi::interface_types::key_bits::RsaKeyBits::Rsa2048,
            ),
            None,
        )
        .unwrap();
        ctx.execute_with_nullauth_session(|c| {
            c.evict_control(
                Provision::Owner,
                ObjectHandle::from(ek),
                Persistent::Persistent(PersistentTpmHandle::new(0x8101_0004).unwrap()),
            )
        })
        .unwrap();
    }
    let err = TpmProvider::open(&swtpm.tcti(), AkSource::Persistent(0x8101_0004)).unwrap_err();
    assert!(matches!(err, TeeError::Config { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("0x81010004") && text.contains("restricted signing"),
        "{text}"
    );
    eprintln!("persistent ak test: {:?}", started.elapsed());
}

#[test]
fn bad_tcti_and_missing_device_are_named_errors() {
    let err = TpmProvider::open("device:/dev/no-such-tpmrm0", AkSource::Create).unwrap_err();
    match &err {
        TeeError::DeviceMissing { device, module, .. } => {
            assert_eq!(device, Path::new("/dev/no-such-tpmrm0"));
            assert_eq!(*module, "tpm_crb or tpm_tis");
        }
        other => panic!("{other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("/dev/no-such-tpmrm0") && text.contains("tpm_crb or tpm_tis"),
        "{text}"
    );

    let err = TpmProvider::open("nonsense", AkSource::Create).unwrap_err();
    assert!(matches!(err, TeeError::Config { .. }), "{err}");
    assert!(err.to_string().contains("nonsense"));

    // Nobody listens on this port: the TSS error is reported with the tcti.
    let tcti = format!("swtpm:host=127.0.0.1,port={}", swtpm::free_port());
    let err = TpmProvider::open(&tcti, AkSource::Create).unwrap_err();
    assert!(matches!(err, TeeError::Tpm { .. }), "{err}");
    assert!(err.to_string().contains(&tcti), "{err}");

    let err = AzSnpVtpmProvider::open("device:/dev/no-such-tpmrm0").unwrap_err();
    assert!(
        matches!(
            err,
            TeeError::DeviceMissing {
                tee: "az-snp-vtpm",
                ..
            }
        ),
        "{err}"
    );
}

// ---- az-snp-vtpm ----

/// An HCL report like the paravisor's: the real v2 report with variable data carrying `ak`
/// (SPKI DER) as HCLAkPub and `user_data`, and REPORT_DATA[..32] rebound to its SHA-256.
/// libtpms limits an NV index to 2048 bytes, so the variable data keeps only HCLAkPub,
/// vm-configuration and user-data (like azure-cvm-tooling's 2048-byte vector).
fn synthetic_hcl_report(ak: &[u8], user_data: &[u8; 64]) -> Vec<u8> {
    let original = vector("derived/trustee-evidence-v2.hcl-report.bin");
    let var: Value =
        serde_json::from_slice(&vector("derived/trustee-evidence-v2.var-data.json")).unwrap();
    let key = rsa::RsaPublicKey::from_public_key_der(ak).unwrap();
    let mut jwk = var["keys"][0].clone();
    assert_eq!(jwk["kid"], "HCLAkPub");
    jwk["n"] = URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()).into();
    jwk["e"] = URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()).into();
    let new_var = serde_json::json!({
        "keys": [jwk],
        "vm-configuration": var["vm-configuration"],
        "user-data": hex::encode_upper(user_data),
    });
    let var_bytes = serde_json::to_vec(&new_var).unwrap();
    let var_len = u32::try_from(var_bytes.len()).unwrap();

    let mut out = original[..32 + 1184 + 20].to_vec();
    out[8..12].copy_from_slice(&(1216 + 20 + var_len).to_le_bytes()); // header.report_size
    let hash: [u8; 32] = Sha256::digest(&var_bytes).into();
    out[32 + 0x50..32 + 0x70].copy_from_slice(&hash); // SNP REPORT_DATA[..32]
    out[1216..1220].copy_from_slice(&(20 + var_len).to_le_bytes()); // data_size
    out[1232..1236].copy_from_slice(&var_len.to_le_bytes()); // variable_data_size
    out.extend_from_slice(&var_bytes);
    assert!(out.len() <= 2048, "{} bytes", out.len());
    out.resize(2048, 0);
    out
}

/// Defines NV `index` (owner read/write) and writes `data` in chunks.
fn define_nv(ctx: &mut Context, index: u32, data: &[u8]) {
    let attributes = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .build()
        .unwrap();
    let public = NvPublicBuilder::new()
        .with_nv_index(NvIndexTpmHandle::new(index).unwrap())
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(data.len())
        .build()
        .unwrap();
    let handle = ctx
        .execute_with_nullauth_session(|c| c.nv_define_space(Provision::Owner, None, public))
        .unwrap();
    for (i, chunk) in data.chunks(512).enumerate() {
        let buffer = MaxNvBuffer::try_from(chunk.to_vec()).unwrap();
        let offset = u16::try_from(i * 512).unwrap();
        ctx.execute_with_nullauth_session(|c| c.nv_write(NvAuth::Owner, handle, buffer, offset))
            .unwrap();
    }
}

/// Overwrites the defined NV `index` with `data` in chunks, as the paravisor refreshes the
/// HCL report.
fn rewrite_nv(ctx: &mut Context, index: u32, data: &[u8]) {
    let tpm_handle = TpmHandle::NvIndex(NvIndexTpmHandle::new(index).unwrap());
    let handle = NvIndexHandle::from(
        ctx.execute_without_session(|c| c.tr_from_tpm_public(tpm_handle))
            .unwrap(),
    );
    for (i, chunk) in data.chunks(512).enumerate() {
        let buffer = MaxNvBuffer::try_from(chunk.to_vec()).unwrap();
        let offset = u16::try_from(i * 512).unwrap();
        ctx.execute_with_nullauth_session(|c| c.nv_write(NvAuth::Owner, handle, buffer, offset))
            .unwrap();
    }
}

fn read_nv(ctx: &mut Context, index: u32) -> Vec<u8> {
    let index = NvIndexTpmHandle::new(index).unwrap();
    ctx.execute_with_nullauth_session(|c| {
        tss_esapi::abstraction::nv::read_full(c, NvAuth::Owner, index)
    })
    .unwrap()
}

/// Makes a swtpm look like an Azure vTPM: an AK at 0x81000003 and, when `hcl` returns one,
/// an HCL report at 0x01400001. Returns the AK (SPKI DER).
fn azure_like(swtpm: &Swtpm, hcl: impl FnOnce(&[u8]) -> Option<Vec<u8>>) -> Vec<u8> {
    let ak = {
        let mut tpm = TpmProvider::open(&swtpm.tcti(), AkSource::Create).unwrap();
        tpm.persist_ak(AZURE_AK_HANDLE).unwrap();
        tpm.ak_public().to_vec()
    };
    if let Some(report) = hcl(&ak) {
        define_nv(&mut context_of(swtpm), HCL_REPORT_NV_INDEX, &report);
    }
    ak
}

fn fast_options() -> AzureOptions {
    AzureOptions {
        vcek: VcekSource::File(vector_path("derived/trustee-evidence-v2.vcek.der")),
        refresh_timeout: Duration::from_millis(300),
        poll_interval: Duration::from_millis(50),
    }
}

#[test]
fn az_snp_vtpm_evidence_runs_the_nv_and_quote_path_on_swtpm() {
    let started = Instant::now();
    let swtpm = Swtpm::start();
    let rd = report_data(4);
    let ak = azure_like(&swtpm, |ak| {
        Some(synthetic_hcl_report(ak, &user_data_for(&rd)))
    });
    let nv_contents = read_nv(&mut context_of(&swtpm), HCL_REPORT_NV_INDEX);
    // A leftover 0x01400002 of the wrong size must be replaced by a 64-byte one.
    define_nv(&mut context_of(&swtpm), REPORT_DATA_NV_INDEX, &[0xee; 16]);

    let mut az = AzSnpVtpmProvider::open_with(&swtpm.tcti(), fast_options()).unwrap();
    assert_eq!(az.tee(), "az-snp-vtpm");
    assert_eq!(az.ak_public(), ak);
    let evidence = az.evidence(&rd).unwrap();

    let mut keys: Vec<&String> = evidence.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["hcl_report", "tpm_quote", "vcek", "version"]);
    assert_eq!(evidence["version"], 2);
    let hcl_bytes = URL_SAFE
        .decode(evidence["hcl_report"].as_str().unwrap())
        .unwrap();
    assert_eq!(hcl_bytes, nv_contents, "the whole NV index, read in chunks");
    let vcek = URL_SAFE.decode(evidence["vcek"].as_str().unwrap()).unwrap();
    assert_eq!(vcek, vector("derived/trustee-evidence-v2.vcek.der"));

    // What the broker checks: the quote verifies with HCLAkPub of the HCL report, its nonce
    // is the whole report_data, the PCRs match, user-data binds report_data.
    let hcl = parse_hcl_report(&hcl_bytes).unwrap();
    assert_eq!(hcl.user_data.as_deref(), Some(&user_data_for(&rd)[..]));
    let q = &evidence["tpm_quote"];
    let msg = hex::decode(q["message"].as_str().unwrap()).unwrap();
    let sig = hex::decode(q["signature"].as_str().unwrap()).unwrap();
    assert_eq!(
        sig.len(),
        256,
        "the raw rsa signature, as Trustee's TpmQuote"
    );
    let pcr_list = q["pcrs"].as_array().unwrap();
    assert_eq!(pcr_list.len(), 24);
    let pcrs: Vec<u8> = pcr_list
        .iter()
        .flat_map(|p| hex::decode(p.as_str().unwrap()).unwrap())
        .collect();
    let verified = verify_quote(&msg, &sig, &hcl.ak_public, Some(&pcrs)).unwrap();
    assert_eq!(verified.extra_data, hex::encode(rd));

    let d = az.describe();
    assert_eq!(d["ak_handle"], "0x81000003");
    assert_eq!(d["hcl_report_nv_index"], "0x01400001");
    assert_eq!(d["report_data_nv_index"], "0x01400002");
    assert_eq!(d["pcr"], 15);
    assert_eq!(d["ak_public"], STANDARD.encode(&ak));

    // The register extends vTPM pcr 15 and the next quote shows it.
    let before = az.pcr_value(APP_PCR).unwrap();
    let mut register = az.runtime_register().unwrap().unwrap();
    assert_eq!(register.name(), "tpm pcr 15");
    register.extend(&Digest::of(b"x")).unwrap();
    assert_ne!(az.pcr_value(APP_PCR).unwrap(), before);

    // Another report_data: nothing refreshes the swtpm's HCL report, so the provider must
    // refuse the stale report instead of sending it.
    let err = az.evidence(&report_data(5)).unwrap_err().to_string();
    assert!(err.contains("did not refresh"), "{err}");
    drop(register);
    drop(az);

    // The report data was written to 0x01400002 (64 bytes: report_data, 16 zero bytes).
    let written = read_nv(&mut context_of(&swtpm), REPORT_DATA_NV_INDEX);
    assert_eq!(written, user_data_for(&report_data(5)));
    eprintln!("az-snp-vtpm test: {:?}", started.elapsed());
}

/// A 64-byte checkpoint binding (SHA-512-like: no zero tail).
fn checkpoint_binding(seed: u8) -> [u8; 64] {
    let mut b = [0u8; 64];
    for (i, x) in b.iter_mut().enumerate() {
        *x = seed.wrapping_mul(17).wrapping_add(i as u8).wrapping_add(1) | 0x01;
    }
    b
}

#[test]
fn az_snp_vtpm_checkpoint_binds_the_whole_binding_in_user_data_and_48_bytes_in_the_quote() {
    let started = Instant::now();
    let swtpm = Swtpm::start();
    let rd = report_data(6);
    let ak = azure_like(&swtpm, |ak| {
        Some(synthetic_hcl_report(ak, &user_data_for(&rd)))
    });
    let binding = checkpoint_binding(7);

    // The broker exchange, then an extend of vTPM pcr 15 (what the event log does).
    let mut az = AzSnpVtpmProvider::open_with(&swtpm.tcti(), fast_options()).unwrap();
    let exchange = az.evidence(&rd).unwrap();
    let pcr15_initial = az.pcr_value(APP_PCR).unwrap();
    let digest = Digest::of(b"bundle manifest");
    let mut register = az.runtime_register().unwrap().unwrap();
    register.extend(&digest).unwrap();
    let mut replay = Sha256::new();
    replay.update(pcr15_initial);
    replay.update(digest.0);
    let replay: [u8; 32] = replay.finalize().into();

    // Nothing refreshed the HCL report for the binding yet: the checkpoint fails closed.
    let err = az.checkpoint(&binding).unwrap_err().to_string();
    assert!(
        err.contains("did not refresh") && err.contains(&hex::encode(binding)),
        "{err}"
    );
    drop(register);
    drop(az);
    // The whole binding, not a padded prefix, was written to 0x01400002.
    assert_eq!(
        read_nv(&mut context_of(&swtpm), REPORT_DATA_NV_INDEX),
        binding
    );

    // Play the paravisor: the HCL report now carries the binding as user-data.
    rewrite_nv(
        &mut context_of(&swtpm),
        HCL_REPORT_NV_INDEX,
        &synthetic_hcl_report(&ak, &binding),
    );
    let mut az = AzSnpVtpmProvider::open_with(&swtpm.tcti(), fast_options()).unwrap();
    let checkpoint = az.checkpoint(&binding).unwrap();
    drop(az);

    // Same v2 shape as the broker evidence.
    let e = AzEvidence::from_json(&checkpoint).unwrap();
    let x = AzEvidence::from_json(&exchange).unwrap();
    assert_eq!(e.vcek, x.vcek);
    assert_eq!(
        e.hcl_report,
        read_nv(&mut context_of(&swtpm), HCL_REPORT_NV_INDEX)
    );

    // What a verifier checks: the HCL report binds its variable data (parse), user-data is
    // the whole binding, the quote verifies with HCLAkPub (the exchange's AK), its extraData
    // is the first 48 bytes of the binding, and pcr 15 is the replay of the logged extend.
    let hcl = parse_hcl_report(&e.hcl_report).unwrap();
    assert_eq!(hcl.user_data.as_deref(), Some(&binding[..]));
    assert_eq!(hcl.ak_public, ak);
    assert_eq!(
        parse_hcl_report(&x.hcl_report).unwrap().ak_public,
        hcl.ak_public
    );
    assert_eq!(e.quote_signature.len(), 256);
    let pcrs: Vec<u8> = e.pcrs.iter().flatten().copied().collect();
    let q = verify_quote(
        &e.quote_message,
        &e.quote_signature,
        &hcl.ak_public,
        Some(&pcrs),
    )
    .unwrap();
    assert!(q.verified && q.pcrs_checked);
    assert_eq!(q.extra_data, hex::encode(&binding[..48]));
    assert_eq!(q.extra_data, hex::encode(checkpoint_quote_nonce(&binding)));
    assert_eq!(e.pcrs[usize::from(APP_PCR)], replay);

    // The exchange quote carried the 48-byte report data and the pre-extend pcr 15; its
    // user-data is zero-padded, unlike the checkpoint's.
    let xq = verify_quote(&x.quote_message, &x.quote_signature, &ak, None).unwrap();
    assert_eq!(xq.extra_data, hex::encode(rd));
    assert_eq!(x.pcrs[usize::from(APP_PCR)], pcr15_initial);
    assert_eq!(
        parse_hcl_report(&x.hcl_report)
            .unwrap()
            .user_data
            .as_deref(),
        Some(&user_data_for(&rd)[..])
    );
    eprintln!("az-snp-vtpm checkpoint test: {:?}", started.elapsed());
}

#[test]
fn az_snp_vtpm_refuses_a_foreign_ak_and_a_vm_without_hcl_report() {
    let started = Instant::now();
    // HCLAkPub is another key than the one at 0x81000003.
    let swtpm = Swtpm::start();
    let other = vector("derived/trustee-evidence-v2.akpub.pem");
    let other =
        rsa::RsaPublicKey::from_public_key_pem(std::str::from_utf8(&other).unwrap()).unwrap();
    let other = rsa::pkcs8::EncodePublicKey::to_public_key_der(&other)
        .unwrap()
        .as_bytes()
        .to_vec();
    azure_like(&swtpm, |_| Some(synthetic_hcl_report(&other, &[0; 64])));
    let err = AzSnpVtpmProvider::open_with(&swtpm.tcti(), fast_options())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HCLAkPub") && err.contains("0x81000003"),
        "{err}"
    );
    drop(swtpm);

    // No HCL report: not an Azure CVM.
    let swtpm = Swtpm::start();
    azure_like(&swtpm, |_| None);
    let err = AzSnpVtpmProvider::open_with(&swtpm.tcti(), fast_options())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("0x01400001") && err.contains("not an azure confidential vm"),
        "{err}"
    );
    drop(swtpm);

    // No AK at 0x81000003.
    let swtpm = Swtpm::start();
    let err = AzSnpVtpmProvider::open_with(&swtpm.tcti(), fast_options())
        .unwrap_err()
        .to_string();
    assert!(err.contains("0x81000003"), "{err}");
    eprintln!("az-snp-vtpm refusal test: {:?}", started.elapsed());
}
