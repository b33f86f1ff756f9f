#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use super::fake::{FakeGpu, FakeNvml};
use super::*;

const SIM: &str = "tests/data/nvidia-sim/gpu.json";
const UUID: &str = "GPU-5e1f0000-0000-4000-8000-000000000001";

fn sim() -> FakeNvml {
    FakeNvml::load(Path::new(SIM)).unwrap()
}

fn requirements() -> GpuRequirements {
    GpuRequirements {
        required: true,
        count: Some(1),
        arch: vec![Arch::Hopper],
        min_driver: None,
        min_vbios: None,
        allow_devtools: false,
        simulated: true,
        rims: Vec::new(),
        verify_at: None,
    }
}

fn precheck_with(nvml: FakeNvml, req: GpuRequirements) -> Result<Vec<GpuFacts>, String> {
    let mut gpus = Gpus::new(Ok(Box::new(nvml)), req);
    gpus.precheck().map_err(|e| e.to_string())
}

/// The real H100 vector replayed (`tests/data/nvidia/`): report and chain as recorded.
fn replayed() -> FakeNvml {
    let report = std::fs::read("tests/data/nvidia/nvtrust-hopperAttestationReport.bin").unwrap();
    let chain = std::fs::read("tests/data/nvidia/hopperCertChain.txt").unwrap();
    FakeNvml::new(
        "550.90.07",
        CcState {
            environment: CcEnvironment::Prod,
            cc_feature: true,
            devtools: false,
            multi_gpu_mode: MultiGpuMode::None,
        },
    )
    .with_gpu(FakeGpu::replay(
        UUID,
        Arch::Hopper,
        "96.00.9F.00.01",
        report,
        chain,
    ))
}

const JWK: &str = r#"{"kty":"EC","crv":"P-256","alg":"ECDH-ES+A256KW","x":"74gMjvgWiBeWwYjlcbAaxvcMUmJ0VtrkhnWO_9nGPd0","y":"XNvBHiSIOhJZgkKpWHW5aohU9kv_msmjOBC4HxVPVOU"}"#;
const NONCE: &str = "Dn/RSy3SMzL+nsKPkD5p6d9A91pHw5S8IiDW5WnBFsY=";

#[test]
fn a_gpu_in_cc_mode_passes_and_its_facts_are_measured() {
    let facts = precheck_with(sim(), requirements()).unwrap();
    assert_eq!(facts.len(), 1);
    let f = &facts[0];
    assert_eq!(
        (f.index, f.uuid.as_str(), f.arch.as_str()),
        (0, UUID, "hopper")
    );
    assert_eq!(f.driver_version, "550.90.07");
    assert_eq!(f.vbios_version, "96.00.9F.00.01");
    assert!(f.fwid.starts_with("f5c384ae"), "{}", f.fwid);
    let report = std::fs::read("tests/data/nvidia-sim/report.bin").unwrap();
    // As the verifier crate computes it (auditors and brokers compare the same value).
    assert_eq!(
        f.measurements_digest,
        hex::encode(
            cvm_warden_verify::evidence::nvidia::parse_report(&report)
                .unwrap()
                .measurements_digest()
        )
    );
    assert_eq!(f.measurements_digest.len(), 96);
    // The event: digest = SHA-256 of the description, which is the facts' JCS text.
    let event = f.event().unwrap();
    assert_eq!(event.kind, crate::eventlog::EventKind::Gpu);
    assert_eq!(
        event.digest,
        crate::digest::Digest::of(event.description.as_bytes())
    );
    let back: Value = serde_json::from_str(&event.description).unwrap();
    assert_eq!(back, event.details);
    assert_eq!(back["uuid"], UUID);
    assert!(event
        .description
        .starts_with("{\"arch\":\"hopper\",\"driver_version\""));
}

#[test]
fn cc_off_is_refused_naming_the_gpu_and_the_setting() {
    let mut nvml = sim();
    nvml.cc.cc_feature = false;
    let error = precheck_with(nvml, requirements()).unwrap_err();
    assert!(
        error.contains(&format!(
            "GPU 0 ({UUID}, hopper): confidential computing is off"
        )) && error.contains("[attestation.gpu] requires CC mode"),
        "{error}"
    );
    let mut nvml = sim();
    nvml.cc.environment = CcEnvironment::Sim;
    let error = precheck_with(nvml, requirements()).unwrap_err();
    assert!(
        error.contains("the CC environment is Sim, not PROD"),
        "{error}"
    );
}

#[test]
fn devtools_on_is_refused_unless_allowed() {
    let mut nvml = sim();
    nvml.cc.devtools = true;
    let error = precheck_with(nvml, requirements()).unwrap_err();
    assert!(
        error.contains(&format!(
            "GPU 0 ({UUID}, hopper): CC developer tools mode is on"
        )) && error.contains("allow_devtools = false"),
        "{error}"
    );
    let mut nvml = sim();
    nvml.cc.devtools = true;
    let mut req = requirements();
    req.allow_devtools = true;
    assert_eq!(precheck_with(nvml, req).unwrap().len(), 1);
}

#[test]
fn a_wrong_count_is_refused() {
    let mut req = requirements();
    req.count = Some(2);
    let error = precheck_with(sim(), req).unwrap_err();
    assert!(
        error.contains(&format!(
            "1 GPU(s) found (GPU 0 ({UUID}, hopper)), [attestation.gpu] count = 2"
        )),
        "{error}"
    );
    let mut none = sim();
    none.gpus.clear();
    let error = precheck_with(none, requirements()).unwrap_err();
    assert!(
        error.contains("0 GPU(s) found (none), [attestation.gpu] count = 1"),
        "{error}"
    );
    let mut none = sim();
    none.gpus.clear();
    let mut req = requirements();
    req.count = None;
    let error = precheck_with(none, req).unwrap_err();
    assert!(error.contains("no GPU found"), "{error}");
}

#[test]
fn a_wrong_arch_is_refused() {
    let mut req = requirements();
    req.arch = vec![Arch::Blackwell];
    let error = precheck_with(sim(), req).unwrap_err();
    assert!(
        error.contains(&format!(
            "GPU 0 ({UUID}) is hopper, [attestation.gpu] arch = [\"blackwell\"]"
        )),
        "{error}"
    );
    let mut nvml = sim();
    nvml.gpus[0].arch = Arch::Other("Ampere".into());
    let mut req = requirements();
    req.arch = vec![];
    let error = precheck_with(nvml, req).unwrap_err();
    assert!(
        error.contains("is ampere, [attestation.gpu] arch = [\"hopper\", \"blackwell\"]"),
        "{error}"
    );
}

#[test]
fn an_old_driver_or_vbios_is_refused() {
    let mut req = requirements();
    req.min_driver = Some("550.100".into());
    let error = precheck_with(sim(), req).unwrap_err();
    assert!(
        error.contains(&format!("GPU 0 ({UUID}): driver 550.90.07 is older than [attestation.gpu] min_driver = \"550.100\"")),
        "{error}"
    );
    let mut req = requirements();
    req.min_driver = Some("550.90.07".into());
    req.min_vbios = Some("96.00.9f.00.01".into());
    assert!(precheck_with(sim(), req).is_ok());
    let mut req = requirements();
    req.min_vbios = Some("96.00.a0".into());
    let error = precheck_with(sim(), req).unwrap_err();
    assert!(
        error.contains(
            "VBIOS 96.00.9F.00.01 is older than [attestation.gpu] min_vbios = \"96.00.a0\""
        ),
        "{error}"
    );
}

#[test]
fn versions_compare_as_dotted_numbers() {
    use std::cmp::Ordering::*;
    assert_eq!(compare_versions("550.90.07", "550.100", 10), Some(Less));
    assert_eq!(compare_versions("575.32", "550.90.07", 10), Some(Greater));
    assert_eq!(compare_versions("550.90", "550.90.0", 10), Some(Equal));
    assert_eq!(
        compare_versions("96.00.9f.00.01", "96.00.5E.00.01", 16),
        Some(Greater)
    );
    assert_eq!(compare_versions("96.00.9f", "96.00.9g", 16), None);
    assert_eq!(compare_versions("abc", "1", 10), None);
}

#[test]
fn nvml_missing_names_the_library_and_what_to_install() {
    // This machine has no NVIDIA driver: the real library does not load.
    let error = RealNvml::open().unwrap_err().to_string();
    assert!(
        error.starts_with("cannot load NVML (libnvidia-ml.so.1): ")
            && error.contains("install the NVIDIA driver"),
        "{error}"
    );
    let mut gpus = Gpus::new(
        RealNvml::open().map(|n| Box::new(n) as Box<dyn Nvml>),
        requirements(),
    );
    let error = gpus.precheck().unwrap_err().to_string();
    assert!(
        error.contains("[attestation.gpu] needs NVML, which is not available: cannot load NVML (libnvidia-ml.so.1)"),
        "{error}"
    );
    // Not required: no GPU, no evidence, nothing set ready.
    let mut req = requirements();
    req.required = false;
    req.count = None;
    let mut gpus = Gpus::new(RealNvml::open().map(|n| Box::new(n) as Box<dyn Nvml>), req);
    assert!(gpus.precheck().unwrap().is_empty());
    assert_eq!(
        gpus.evidence(NONCE, &serde_json::from_str(JWK).unwrap())
            .unwrap(),
        ""
    );
}

#[test]
fn evidence_has_exactly_guest_components_shape() {
    // The Trustee/guest-components string (derived from Trustee's hopper_coco vector):
    // parsing it with our types and writing it again gives the same bytes.
    let theirs =
        std::fs::read_to_string("tests/data/nvidia/trustee-hopper_coco-additional-evidence.json")
            .unwrap();
    let theirs = theirs.trim_end();
    let parsed: cvm_warden_verify::schema::AdditionalEvidence =
        serde_json::from_str(theirs).unwrap();
    assert_eq!(serde_json::to_string(&parsed).unwrap(), theirs);

    let mut gpus = Gpus::new(Ok(Box::new(replayed())), requirements());
    gpus.precheck().unwrap();
    let ours = gpus
        .evidence(NONCE, &serde_json::from_str(JWK).unwrap())
        .unwrap();
    // Same members in the same order at every level, compact.
    let shape = |text: &str| {
        let v: Value = serde_json::from_str(text).unwrap();
        let entry = v["nvidia"]["device_evidence_list"][0]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>();
        (
            v.as_object().unwrap().keys().cloned().collect::<Vec<_>>(),
            entry,
        )
    };
    assert_eq!(shape(&ours), shape(theirs));
    assert!(!ours.contains(' ') && !ours.contains('\n'));
    let v: Value = serde_json::from_str(&ours).unwrap();
    let entry = &v["nvidia"]["device_evidence_list"][0];
    assert_eq!(entry["arch"], "HOPPER");
    assert_eq!(entry["uuid"], UUID);
    assert_eq!(
        STANDARD
            .decode(entry["evidence"].as_str().unwrap())
            .unwrap(),
        std::fs::read("tests/data/nvidia/nvtrust-hopperAttestationReport.bin").unwrap()
    );
    assert_eq!(
        STANDARD
            .decode(entry["certificate"].as_str().unwrap())
            .unwrap(),
        std::fs::read("tests/data/nvidia/hopperCertChain.txt").unwrap()
    );
}

#[test]
fn the_replayed_vector_is_returned_whatever_nonce_is_asked() {
    let nvml = replayed();
    let calls = nvml.calls();
    let mut gpus = Gpus::new(Ok(Box::new(nvml)), requirements());
    gpus.precheck().unwrap();
    let ours = gpus
        .evidence(NONCE, &serde_json::from_str(JWK).unwrap())
        .unwrap();
    let v: Value = serde_json::from_str(&ours).unwrap();
    let report = STANDARD
        .decode(
            v["nvidia"]["device_evidence_list"][0]["evidence"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    // The recorded nonce, not §4's: a broker must refuse it (providers never verify).
    assert_eq!(
        hex::encode(&report[4..36]),
        "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb"
    );
    let asked =
        cvm_warden_verify::binding::device_nonce(NONCE, &serde_json::from_str(JWK).unwrap())
            .unwrap();
    assert!(calls
        .lock()
        .unwrap()
        .contains(&format!("attestation_report(0, {})", hex::encode(asked))));
}

#[test]
fn the_simulated_gpu_binds_the_device_nonce_and_signs_like_a_gpu() {
    let mut gpus = Gpus::new(Ok(Box::new(sim())), requirements());
    gpus.precheck().unwrap();
    let jwk: Value = serde_json::from_str(JWK).unwrap();
    let text = gpus.evidence(NONCE, &jwk).unwrap();
    let parsed: cvm_warden_verify::schema::AdditionalEvidence =
        serde_json::from_str(&text).unwrap();
    let entry = &parsed.nvidia.device_evidence_list[0];
    let report = STANDARD.decode(&entry.evidence).unwrap();
    // GPU-ATTESTATION.md §4 on the synthetic example: 009b3742…a716.
    assert_eq!(
        hex::encode(&report[4..36]),
        "009b3742e64ff8812526079a90b7ba8521cd8852f05a72f4d3a7ca4d77b7a716"
    );
    // ECDSA P-384 over request ‖ response up to the signature, by the chain's leaf.
    let chain = String::from_utf8(STANDARD.decode(&entry.certificate).unwrap()).unwrap();
    let leaf_pem = chain.split("-----END CERTIFICATE-----").next().unwrap();
    let b64: String = leaf_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = STANDARD.decode(b64.trim()).unwrap();
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(&der).unwrap();
    let point = cert
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    let parsed = cvm_warden_verify::evidence::nvidia::parse_report(&report).unwrap();
    let signed_len = parsed.signed_bytes().len();
    assert_eq!(signed_len, 4021);
    let key =
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P384_SHA384_FIXED, point);
    key.verify(&report[..signed_len], &report[signed_len..signed_len + 96])
        .unwrap();
    let mut tampered = report.clone();
    tampered[100] ^= 1;
    assert!(key
        .verify(
            &tampered[..signed_len],
            &tampered[signed_len..signed_len + 96]
        )
        .is_err());
    // The leaf carries the template's FWID (extension 2.23.133.5.4.1, last 48 bytes).
    assert!(hex::encode(&der).contains(&hex::encode(parsed.fwid().unwrap())));
}

#[test]
fn cc_state_is_checked_again_at_every_collection() {
    let mut nvml = sim();
    // Precheck takes one report; the first handshake the second; then CC is off.
    nvml.leave_cc_after = Some(2);
    let mut gpus = Gpus::new(Ok(Box::new(nvml)), requirements());
    gpus.precheck().unwrap();
    let jwk: Value = serde_json::from_str(JWK).unwrap();
    assert!(!gpus.evidence(NONCE, &jwk).unwrap().is_empty());
    let error = gpus.evidence(NONCE, &jwk).unwrap_err().to_string();
    assert!(error.contains("confidential computing is off"), "{error}");
}

#[test]
fn evidence_before_the_precheck_is_a_bug_not_an_empty_string() {
    let mut gpus = Gpus::new(Ok(Box::new(sim())), requirements());
    let error = gpus
        .evidence(NONCE, &serde_json::from_str(JWK).unwrap())
        .unwrap_err();
    assert!(
        error.to_string().contains("before the GPU precheck"),
        "{error}"
    );
}

#[test]
fn the_ready_state_is_set_and_cleared_through_nvml() {
    let nvml = sim();
    let calls = nvml.calls();
    let mut gpus = Gpus::new(Ok(Box::new(nvml)), requirements());
    gpus.precheck().unwrap();
    let set = gpus.set_ready(true).unwrap();
    assert_eq!(set["ready"], true);
    assert_eq!(set["devices"], json!([{"index": 0, "uuid": UUID}]));
    let cleared = gpus.set_ready(false).unwrap();
    assert_eq!(cleared["ready"], false);
    assert_eq!(cleared["was_set_by_cvm_warden"], true);
    let calls = calls.lock().unwrap();
    let ready: Vec<&String> = calls
        .iter()
        .filter(|c| c.starts_with("set_ready"))
        .collect();
    assert_eq!(ready, ["set_ready_state(true)", "set_ready_state(false)"]);
}

#[test]
fn the_provider_marks_simulated_and_devtools_gpus_insecure() {
    #[derive(Debug)]
    struct Primary;
    impl Provider for Primary {
        fn tee(&self) -> &'static str {
            "snp"
        }
        fn evidence(&mut self, _: &[u8; 48]) -> Result<Value, TeeError> {
            Ok(json!({}))
        }
        fn runtime_register(&mut self) -> Result<Option<Box<dyn RuntimeRegister>>, TeeError> {
            Ok(None)
        }
        fn describe(&self) -> Value {
            json!({"device": "/dev/sev-guest"})
        }
    }
    let mut req = requirements();
    req.simulated = false;
    let mut provider = GpuProvider::new(
        Box::new(Primary),
        Gpus::new(Ok(Box::new(replayed())), req.clone()),
    );
    assert!(!provider.insecure());
    assert_eq!(provider.tee(), "snp");
    let events = provider.device_precheck().unwrap().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(provider.describe()["gpu"]["devices"][0]["uuid"], UUID);
    assert_eq!(provider.describe()["device"], "/dev/sev-guest");
    req.allow_devtools = true;
    assert!(
        GpuProvider::new(Box::new(Primary), Gpus::new(Ok(Box::new(replayed())), req)).insecure()
    );
    assert!(GpuProvider::new(
        Box::new(Primary),
        Gpus::new(Ok(Box::new(sim())), requirements())
    )
    .insecure());
}

#[test]
fn the_inventory_lists_driver_gpus_and_cc_state_and_shows_failing_calls() {
    let mut nvml = sim();
    nvml.fail_on = Some("ready_state".into());
    let listed = inventory(&mut nvml);
    assert_eq!(listed["driver_version"], "550.90.07");
    assert_eq!(
        listed["gpus"],
        json!([{"index": 0, "uuid": UUID, "arch": "hopper", "vbios_version": "96.00.9F.00.01"}])
    );
    assert_eq!(
        listed["cc_state"],
        json!({"environment": "prod", "cc_feature": true, "devtools": false, "multi_gpu_mode": "none"})
    );
    assert_eq!(
        listed["ready_state"]["error"],
        "NVML ready_state failed: scripted failure (fake NVML)"
    );
}

#[test]
fn ready_is_never_set_before_the_precheck_and_clearing_needs_no_precheck() {
    let nvml = sim();
    let calls = nvml.calls();
    let mut gpus = Gpus::new(Ok(Box::new(nvml)), requirements());
    assert!(gpus
        .set_ready(true)
        .unwrap_err()
        .to_string()
        .contains("before the GPU precheck"));
    assert_eq!(gpus.set_ready(false).unwrap()["ready"], false);
    let calls = calls.lock().unwrap();
    assert_eq!(*calls, ["set_ready_state(false)"]);
    // No GPU found and none required: nothing to set or clear.
    let mut empty = sim();
    empty.gpus.clear();
    let calls = empty.calls();
    let mut req = requirements();
    req.required = false;
    req.count = None;
    let mut gpus = Gpus::new(Ok(Box::new(empty)), req);
    assert!(gpus.precheck().unwrap().is_empty());
    assert_eq!(gpus.set_ready(true).unwrap()["reason"], "no GPU");
    assert!(!calls
        .lock()
        .unwrap()
        .iter()
        .any(|c| c.starts_with("set_ready")));
}

#[test]
fn the_simulated_gpus_evidence_verifies_only_against_the_test_root() {
    use cvm_warden_verify::evidence::nvidia::{verify, RootKind, Roots, VerifyOptions};
    let mut gpus = Gpus::new(Ok(Box::new(sim())), requirements());
    let facts = gpus.precheck().unwrap();
    let jwk: Value = serde_json::from_str(JWK).unwrap();
    let text = gpus.evidence(NONCE, &jwk).unwrap();
    let parsed: cvm_warden_verify::schema::AdditionalEvidence =
        serde_json::from_str(&text).unwrap();
    let entry = &parsed.nvidia.device_evidence_list[0];
    let report = STANDARD.decode(&entry.evidence).unwrap();
    let chain = STANDARD.decode(&entry.certificate).unwrap();
    let nonce = cvm_warden_verify::binding::device_nonce(NONCE, &jwk).unwrap();
    // NVIDIA's root only (every real verifier): refused.
    let nvidia_only = VerifyOptions::new(std::time::SystemTime::now()).unwrap();
    assert!(verify(&report, &chain, &nonce, &nvidia_only).is_err());
    // The TEST root pinned explicitly: signature, chain, FWID and nonce verify, and the
    // verdict says the root is not NVIDIA's.
    let mut test_root = nvidia_only.clone();
    test_root.roots =
        Roots::with_extra(&std::fs::read("tests/data/nvidia-sim/root.pem").unwrap()).unwrap();
    let verified = verify(&report, &chain, &nonce, &test_root).unwrap();
    assert!(matches!(verified.root, RootKind::Other { .. }));
    assert!(verified.fwid_checked);
    assert_eq!(
        verified.claims.measurements_digest,
        facts[0].measurements_digest
    );
    // Another handshake's nonce is refused.
    assert!(verify(&report, &chain, &[0u8; 32], &test_root).is_err());
}

/// `[attestation.gpu] rims`: the precheck verifies each GPU's evidence against the RIM files
/// (the verifier crate's `nvidia::verify`, RIM half included) and names what does not hold.
#[test]
fn rims_are_checked_at_the_precheck_and_a_mismatch_names_the_gpu_and_the_rim() {
    let rim = |name: &str| {
        Path::new("verify/tests/vectors/nvidia/rims")
            .join(name)
            .to_path_buf()
    };
    // The simulated GPU runs driver 550.90.07: NVIDIA's 550.144.03 driver RIM (signature
    // valid until 2026-12-30) is for another driver.
    let mut req = requirements();
    req.rims = vec![rim("NV_GPU_DRIVER_GH100_550.144.03.xml")];
    req.verify_at = Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_797_724_800)); // 2026-12-20 (the TEST chain dates from 2026-12-05)
    let error = precheck_with(sim(), req.clone()).unwrap_err();
    assert!(
        error.contains("GPU 0 (GPU-5e1f0000-0000-4000-8000-000000000001) does not verify against [attestation.gpu] rims")
            && error.contains("NV_GPU_DRIVER_GH100_550.144.03.xml")
            && error.contains("550.144.03")
            && error.contains("550.90.07"),
        "{error}"
    );
    // A RIM whose signature was corrupted: refused on the signature, before any match.
    req.rims = vec![rim("incorrect_signature_driver_rim.xml")];
    let error = precheck_with(sim(), req.clone()).unwrap_err();
    assert!(error.to_lowercase().contains("signature"), "{error}");
    // After its signer expired (2026-12-30): refused, naming the certificate's end.
    req.rims = vec![rim("NV_GPU_DRIVER_GH100_550.144.03.xml")];
    req.verify_at = Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_798_761_600)); // 2027-01-01
    let error = precheck_with(sim(), req.clone()).unwrap_err();
    assert!(error.contains("2026-12-30"), "{error}");
    // A RIM that is not in the image.
    req.rims = vec![rim("no-such-rim.xml")];
    let error = precheck_with(sim(), req).unwrap_err();
    assert!(
        error.contains("cannot read the RIM") && error.contains("no-such-rim.xml"),
        "{error}"
    );
    // Without rims nothing is compared and the event says nothing about RIMs.
    let facts = precheck_with(sim(), requirements()).unwrap();
    assert!(facts[0].rims.is_empty());
    assert!(!facts[0].event().unwrap().description.contains("rims"));
}
