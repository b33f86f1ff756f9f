//! The runner's tests: every stage against fakes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::cell::{Cell, RefCell};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::*;
use crate::audit::{MemorySink, MemorySinkControl};
use crate::eventlog::NoRegister;
use crate::measure::{Manifest, MeasureError, Measurement};
use crate::policy::{parse, MemoryUsers};
use crate::stage::RealMeasurer;
use crate::sys::{FakeSys, SysCall};

const STAGES: [&str; 6] = [
    "perimeter",
    "measure",
    "attest",
    "unlock",
    "allowlist",
    "launch",
];

/// A bundle with one script, a kernel command line file and room for a copy.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bundle")).unwrap();
        std::fs::write(dir.path().join("bundle/run.sh"), "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::write(dir.path().join("bundle/data.txt"), "v1\n").unwrap();
        std::fs::write(dir.path().join("cmdline"), "console=ttyS0\n").unwrap();
        Fixture { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn bundle(&self) -> PathBuf {
        self.path("bundle")
    }

    fn copy_to(&self) -> PathBuf {
        self.path("copy")
    }

    /// A valid `initramfs` policy for the bundle, with `extra` appended.
    fn policy(&self, extra: &str) -> String {
        format!(
            "attestation = \"none\"\n\n[workload]\nbundle = {:?}\nsource = \"initramfs\"\nexec = [{:?}, \"--once\"]\nuser = \"flare\"\n{extra}",
            self.bundle().display().to_string(),
            self.bundle().join("run.sh").display().to_string(),
        )
    }

    /// The default policy with `source = "copy"` into [`Fixture::copy_to`], created here.
    fn copy_policy(&self) -> String {
        std::fs::create_dir(self.copy_to()).unwrap();
        self.policy("").replacen(
            "source = \"initramfs\"",
            &format!(
                "source = \"copy\"\ncopy_to = {:?}",
                self.copy_to().display().to_string()
            ),
            1,
        )
    }

    fn facts(&self, loaded: &LoadedPolicy) -> Facts {
        Facts {
            cmdline_path: self.path("cmdline"),
            policy_digest: loaded.policy_digest,
            operator_digest: loaded.operator_digest,
            shape: crate::lockdown::Shape::Pid1,
            sandbox: false,
        }
    }
}

fn users() -> MemoryUsers {
    MemoryUsers::new()
        .user("root", 0, 0)
        .user("flare", 1000, 1000)
        .group("root", 0)
        .group("flare", 1000)
}

fn load(text: &str) -> LoadedPolicy {
    parse(text, None, &users()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn memory_audit() -> (Audit, Arc<Mutex<Vec<String>>>) {
    let (sink, lines) = MemorySink::new();
    (Audit::new(vec![Box::new(sink)], true), lines)
}

fn records(lines: &Arc<Mutex<Vec<String>>>) -> Vec<Value> {
    lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn events(records: &[Value]) -> Vec<(String, String)> {
    records
        .iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap().to_string(),
                r["event"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(s, e)| ((*s).to_string(), (*e).to_string()))
        .collect()
}

/// The records of a boot whose every stage succeeded.
fn successful_boot() -> Vec<(String, String)> {
    let mut expected = pairs(&[("boot", "start"), ("boot", "planned")]);
    for stage in STAGES {
        expected.push((stage.to_string(), "begin".to_string()));
        expected.push((stage.to_string(), "ok".to_string()));
    }
    expected
}

/// `prepare` of `policy` (loaded here) for the fixture.
fn run_prepare(
    fixture: &Fixture,
    policy: &str,
    sys: &FakeSys,
    measurer: &dyn Measurer,
    audit: &Audit,
) -> Result<Ready, BootError> {
    run_prepare_with(fixture, policy, sys, measurer, audit, None)
}

/// [`run_prepare`] with a network effect and the `resolv.conf` it writes.
fn run_prepare_with(
    fixture: &Fixture,
    policy: &str,
    sys: &FakeSys,
    measurer: &dyn Measurer,
    audit: &Audit,
    net: Option<(&dyn crate::net::NetSys, &Path)>,
) -> Result<Ready, BootError> {
    let loaded = load(policy);
    let mut register = NoRegister;
    let env = Env {
        sys,
        measurer,
        register: &mut register,
        audit,
        broker: None,
        volumes: &crate::volume::FakeVolumes::new(),
        firewall: &mut crate::firewall::RecordingFirewall::new(),
        resolver: &crate::firewall::FakeResolver::new(),
        lockdown: &crate::lockdown::FakeLockdownSys::new("6.1.0"),
        lockdown_paths: &crate::lockdown::Paths::under(Path::new("/nonexistent/cvm-warden-test")),
        net,
    };
    prepare(&loaded, &fixture.facts(&loaded), env)
}

/// [`run_prepare`] of the fixture's default policy.
fn prepare_default(
    fixture: &Fixture,
    sys: &FakeSys,
    measurer: &dyn Measurer,
    audit: &Audit,
) -> Result<Ready, BootError> {
    run_prepare(fixture, &fixture.policy(""), sys, measurer, audit)
}

/// A [`Lifecycle`] without a checkpointer or volumes.
fn life<'a>(sys: &'a dyn Sys, audit: &'a Audit) -> Lifecycle<'a> {
    Lifecycle {
        sys,
        audit,
        volumes: Box::leak(Box::new(crate::volume::FakeVolumes::new())),
        checkpointer: None,
        checkpoint_interval: None,
        audit_file: None,
        stop_workload: no_stop,
        watch_power_button: false,
    }
}

/// The tests' stop request: counted, nothing signalled.
fn no_stop() {
    STOPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

static STOPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Records what the runner asked of it; never starts anything.
struct FakeLauncher {
    supervised: Cell<u32>,
    execed: Cell<u32>,
    plans: RefCell<Vec<LaunchPlan>>,
    code: i32,
    /// How often it runs the periodic work while "the workload runs".
    periodic_runs: u32,
    /// The interval it was given (the first periodic work's).
    interval: Cell<Option<std::time::Duration>>,
    /// How long "the workload runs" in fake time; `None`: `periodic_runs` intervals of the
    /// first periodic work.
    run_for: Option<std::time::Duration>,
    /// Every periodic work's interval.
    intervals: RefCell<Vec<std::time::Duration>>,
    /// (work index, fake time since the start) of every periodic run.
    runs: RefCell<Vec<(usize, std::time::Duration)>>,
    /// Fails the launch instead of running the workload.
    fail: bool,
}

impl FakeLauncher {
    fn new(code: i32) -> FakeLauncher {
        FakeLauncher {
            supervised: Cell::new(0),
            execed: Cell::new(0),
            plans: RefCell::new(Vec::new()),
            code,
            periodic_runs: 0,
            interval: Cell::new(None),
            run_for: None,
            intervals: RefCell::new(Vec::new()),
            runs: RefCell::new(Vec::new()),
            fail: false,
        }
    }

    fn called(&self) -> bool {
        self.supervised.get() + self.execed.get() > 0
    }
}

impl Launcher for FakeLauncher {
    fn supervise(
        &self,
        plan: &LaunchPlan,
        _sys: &dyn Sys,
        events: &mut dyn FnMut(&str, Value),
        periodic: Vec<Periodic<'_>>,
    ) -> Result<WorkloadExit, LaunchError> {
        self.supervised.set(self.supervised.get() + 1);
        self.plans.borrow_mut().push(plan.clone());
        if self.fail {
            return Err(LaunchError::Exec {
                path: plan.argv[0].clone().into(),
                source: nix::errno::Errno::ENOENT,
            });
        }
        events("started", json!({ "pid": 2 }));
        // Fake time: each work runs when due, as the supervisor runs it.
        let mut periodic = periodic;
        self.interval.set(periodic.first().map(|p| p.every));
        *self.intervals.borrow_mut() = periodic.iter().map(|p| p.every).collect();
        let start = std::time::Instant::now();
        let until = start
            + self.run_for.unwrap_or_else(|| {
                periodic
                    .first()
                    .map_or(std::time::Duration::ZERO, |p| p.every)
                    * self.periodic_runs
            });
        let mut next: Vec<std::time::Instant> = periodic.iter().map(|p| start + p.every).collect();
        while let Some((i, at)) = next.iter().copied().enumerate().min_by_key(|(_, at)| *at) {
            if at > until {
                break;
            }
            self.runs.borrow_mut().push((i, at - start));
            match (periodic[i].run)(at) {
                crate::launch::Next::OnSchedule => next[i] = at + periodic[i].every,
                crate::launch::Next::In(after) => next[i] = at + after,
                crate::launch::Next::StopWorkload => {
                    events("stopping", json!({ "pid": 2, "signal": "SIGTERM" }));
                    events("exited", json!({ "pid": 2, "code": 143 }));
                    return Ok(WorkloadExit {
                        code: 143,
                        restarts: 0,
                    });
                }
            }
        }
        events("exited", json!({ "pid": 2, "code": self.code }));
        Ok(WorkloadExit {
            code: self.code,
            restarts: 0,
        })
    }

    fn exec(&self, plan: &LaunchPlan) -> LaunchError {
        self.execed.set(self.execed.get() + 1);
        self.plans.borrow_mut().push(plan.clone());
        LaunchError::EmptyExec
    }
}

/// The real measurer, with a hook that runs before each bundle measurement.
struct HookedMeasurer<F: Fn()> {
    before: F,
}

impl<F: Fn()> Measurer for HookedMeasurer<F> {
    fn in_place(&self, dir: &Path) -> Result<Measurement, MeasureError> {
        (self.before)();
        RealMeasurer.in_place(dir)
    }

    fn copy(&self, src: &Path, dst: &Path) -> Result<Measurement, MeasureError> {
        (self.before)();
        RealMeasurer.copy(src, dst)
    }

    fn reference(&self, path: &Path) -> Result<Manifest, MeasureError> {
        RealMeasurer.reference(path)
    }

    fn flare_kit(
        &self,
        kit: &Path,
        root_ca_sha256: &crate::digest::Digest,
        withheld: &[String],
    ) -> Result<crate::measure::flare::VerifiedKit, MeasureError> {
        RealMeasurer.flare_kit(kit, root_ca_sha256, withheld)
    }
}

// ---- (a) every stage succeeds ----

#[test]
fn all_stages_succeed_in_order_and_every_record_is_insecure() {
    let fixture = Fixture::new();
    let sys = FakeSys::new().in_sandbox();
    let (audit, lines) = memory_audit();
    let ready = prepare_default(&fixture, &sys, &RealMeasurer, &audit).unwrap();

    let recs = records(&lines);
    assert_eq!(events(&recs), successful_boot());
    assert!(
        recs.iter().all(|r| r["insecure"] == json!(true)),
        "{recs:#?}"
    );
    // initramfs: measured in place, no mount of any kind; the service manager is told
    // once the perimeter is up.
    assert_eq!(
        sys.calls(),
        [SysCall::NotifyReady("perimeter up; measuring".to_string())]
    );
    // The event log ends with the separator, and the launch/ok record names it.
    let last = ready.event_log.events().last().unwrap();
    assert_eq!(last.kind, EventKind::Separator);
    assert_eq!(
        recs.last().unwrap()["details"]["separator"],
        json!(last.digest)
    );
    assert_eq!(
        ready.plan.launch.argv,
        [
            fixture.bundle().join("run.sh").display().to_string(),
            "--once".to_string()
        ]
    );

    let launcher = FakeLauncher::new(7);
    let shutdown = run_init(
        &ready,
        &launcher,
        &mut life(&sys, &audit),
        FailureAction::Poweroff,
    );
    assert_eq!(
        shutdown,
        Shutdown {
            action: FailureAction::Poweroff,
            code: 7
        }
    );
    assert_eq!((launcher.supervised.get(), launcher.execed.get()), (1, 0));
    let recs = records(&lines);
    let tail: Vec<_> = events(&recs).split_off(successful_boot().len());
    assert_eq!(
        tail,
        pairs(&[
            ("launch", "started"),
            ("launch", "exited"),
            ("launch", "workload_done"),
            ("shutdown", "exit"),
        ])
    );
    let done = &recs[recs.len() - 2]["details"];
    assert_eq!(done, &json!({ "code": 7, "restarts": 0 }));
    assert_eq!(recs.last().unwrap()["details"], json!({ "code": 7 }));
    assert!(recs.iter().all(|r| r["insecure"] == json!(true)));
    // The whole log verifies.
    let joined: String = lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    crate::audit::verify(joined.as_bytes()).unwrap();
}

#[test]
fn a_real_boot_closes_with_poweroff_or_halt() {
    for (action, closing) in [
        (FailureAction::Poweroff, "poweroff"),
        (FailureAction::Halt, "halt"),
    ] {
        let fixture = Fixture::new();
        let sys = FakeSys::new();
        let (audit, lines) = memory_audit();
        let ready = prepare_default(&fixture, &sys, &RealMeasurer, &audit).unwrap();
        let launcher = FakeLauncher::new(0);
        let shutdown = run_init(&ready, &launcher, &mut life(&sys, &audit), action);
        assert_eq!(shutdown, Shutdown { action, code: 0 });
        let last = events(&records(&lines)).pop().unwrap();
        assert_eq!(last, ("shutdown".to_string(), closing.to_string()));
        // The runner itself never powers anything off: the caller does.
        assert!(!sys
            .calls()
            .iter()
            .any(|c| matches!(c, SysCall::PowerOff(_))));
    }
}

// ---- (b) pinned digest mismatch ----

#[test]
fn a_changed_bundle_stops_the_boot_at_measure_and_names_the_file() {
    let fixture = Fixture::new();
    let reference = crate::measure::measure_in_place(&fixture.bundle()).unwrap();
    let manifest = fixture.path("manifest.json");
    reference.manifest.save_json(&manifest).unwrap();
    let policy = fixture.policy(&format!(
        "digest = \"{}\"\nmanifest = {:?}\n",
        reference.bundle_digest,
        manifest.display().to_string()
    ));
    // The pin matches before the change.
    {
        let sys = FakeSys::new();
        let (audit, _) = memory_audit();
        run_prepare(&fixture, &policy, &sys, &RealMeasurer, &audit).unwrap();
    }
    std::fs::write(fixture.bundle().join("data.txt"), "v2\n").unwrap();

    let sys = FakeSys::new().in_sandbox();
    let (audit, lines) = memory_audit();
    let error = run_prepare(&fixture, &policy, &sys, &RealMeasurer, &audit).unwrap_err();
    assert!(
        matches!(
            &error,
            BootError::Stage {
                stage: "measure",
                source: StageError::Measure { .. }
            }
        ),
        "{error:?}"
    );
    let recs = records(&lines);
    assert_eq!(
        events(&recs),
        pairs(&[
            ("boot", "start"),
            ("boot", "planned"),
            ("perimeter", "begin"),
            ("perimeter", "ok"),
            ("measure", "begin"),
            ("measure", "failed"),
        ])
    );
    let message = recs.last().unwrap()["details"]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("changed data.txt"), "{message}");
    assert!(!message.contains("run.sh"), "{message}");
    assert_eq!(message, chain(&error));

    // The launcher is never reached (there is no Ready); the failure path closes the log.
    let launcher = FakeLauncher::new(0);
    assert!(!launcher.called());
    let shutdown = fail(
        &mut life(&sys, &audit),
        FailureAction::Halt,
        &error,
        &EventLog::new(),
    );
    assert_eq!(
        shutdown,
        Shutdown {
            action: FailureAction::Halt,
            code: 1
        }
    );
    let recs = records(&lines);
    let tail: Vec<_> = events(&recs).split_off(6);
    assert_eq!(tail, pairs(&[("boot", "failed"), ("shutdown", "exit")]));
    assert_eq!(
        recs[6]["details"],
        json!({ "error": message, "workload_started": false })
    );
    assert_eq!(recs[7]["details"], json!({ "code": 1 }));

    // In a real boot the closing record is the failure action.
    let (audit, lines) = memory_audit();
    fail(
        &mut life(&FakeSys::new(), &audit),
        FailureAction::Halt,
        &error,
        &EventLog::new(),
    );
    assert_eq!(
        events(&records(&lines)),
        pairs(&[("boot", "failed"), ("shutdown", "halt")])
    );
}

// ---- (c) configured but unsupported features are refused at plan time ----

#[test]
fn unsupported_features_are_refused_before_any_stage_or_effect() {
    let fixture = Fixture::new();
    let initramfs = fixture.policy("");
    let cases = [(
        initramfs.replacen("source = \"initramfs\"", "source = \"verity\"", 1),
        "measure: workload.source = \"verity\" is not supported by this build yet; use \
         source = \"copy\" or \"initramfs\", or a release with dm-verity support",
    )];
    for (policy, expected) in cases {
        let sys = FakeSys::new();
        let (sink, lines) = MemorySink::new();
        let insecure = load(&policy).policy.attestation == crate::policy::Attestation::None;
        let audit = Audit::new(vec![Box::new(sink)], insecure);
        let error = run_prepare(&fixture, &policy, &sys, &RealMeasurer, &audit).unwrap_err();
        let BootError::Plan(source) = &error else {
            panic!("expected a plan error, got {error:?}");
        };
        assert!(
            matches!(source, StageError::Unsupported { .. }),
            "{source:?}"
        );
        assert_eq!(source.to_string(), expected);
        let recs = records(&lines);
        assert_eq!(
            events(&recs),
            pairs(&[("boot", "start"), ("boot", "plan_failed")])
        );
        assert_eq!(recs[1]["details"], json!({ "error": expected }));
        assert_eq!(sys.calls(), Vec::<SysCall>::new());
    }
}

// ---- (d) copy source ----

#[test]
fn copy_source_mounts_a_tmpfs_remounts_it_readonly_and_runs_from_the_copy() {
    let fixture = Fixture::new();
    let policy = fixture.copy_policy();
    let sys = FakeSys::new().in_sandbox();
    let (audit, lines) = memory_audit();
    let ready = run_prepare(&fixture, &policy, &sys, &RealMeasurer, &audit).unwrap();
    assert_eq!(events(&records(&lines)), successful_boot());
    let copy = fixture.copy_to();
    assert_eq!(
        sys.calls(),
        vec![
            SysCall::NotifyReady("perimeter up; measuring".to_string()),
            SysCall::MkdirAll(copy.clone()),
            SysCall::MountTmpfs {
                target: copy.clone(),
                mode: crate::stage::measure::COPY_TMPFS_MODE,
            },
            SysCall::RemountReadonly(copy.clone()),
        ]
    );
    let program = copy.join("run.sh").display().to_string();
    assert_eq!(ready.plan.launch.argv, [program.as_str(), "--once"]);
    // The copy holds the measured bytes.
    assert_eq!(
        std::fs::read_to_string(copy.join("run.sh")).unwrap(),
        "#!/bin/sh\nexit 0\n"
    );
    let launcher = FakeLauncher::new(0);
    run_init(
        &ready,
        &launcher,
        &mut life(&sys, &audit),
        FailureAction::Poweroff,
    );
    assert_eq!(launcher.plans.borrow()[0].argv[0], program);
}

#[test]
fn a_failing_tmpfs_mount_stops_the_boot_at_measure() {
    let fixture = Fixture::new();
    let policy = fixture.copy_policy();
    let sys = FakeSys::new().fail_on(crate::sys::Op::MountTmpfs, nix::errno::Errno::EPERM);
    let (audit, lines) = memory_audit();
    let error = run_prepare(&fixture, &policy, &sys, &RealMeasurer, &audit).unwrap_err();
    assert!(
        matches!(
            error,
            BootError::Stage {
                stage: "measure",
                source: StageError::Sys { .. }
            }
        ),
        "{error:?}"
    );
    let last = events(&records(&lines)).pop().unwrap();
    assert_eq!(last, ("measure".to_string(), "failed".to_string()));
    // Nothing was copied, nothing remounted.
    assert!(!sys
        .calls()
        .iter()
        .any(|c| matches!(c, SysCall::RemountReadonly(_))));
    assert_eq!(std::fs::read_dir(fixture.copy_to()).unwrap().count(), 0);
}

// ---- (e) a required audit sink that fails ----

fn required_memory_audit() -> (Audit, MemorySinkControl, Arc<Mutex<Vec<String>>>) {
    let (required, _) = MemorySink::new();
    let required = required.named("required").required(true);
    let control = required.control();
    let (other, lines) = MemorySink::new();
    let audit = Audit::new(
        vec![Box::new(required), Box::new(other.named("other"))],
        true,
    );
    (audit, control, lines)
}

/// The default policy prepared against `audit` (from [`required_memory_audit`]), which
/// must fail; the error and the events the other sink got.
fn required_sink_failure(
    measurer: &dyn Measurer,
    audit: &Audit,
    lines: &Arc<Mutex<Vec<String>>>,
) -> (BootError, Vec<(String, String)>) {
    let fixture = Fixture::new();
    let error = prepare_default(&fixture, &FakeSys::new(), measurer, audit).unwrap_err();
    (error, events(&records(lines)))
}

#[test]
fn a_required_sink_failing_from_the_start_stops_the_boot() {
    let (audit, control, lines) = required_memory_audit();
    control.fail_always(ErrorKind::PermissionDenied);
    let (error, evs) = required_sink_failure(&RealMeasurer, &audit, &lines);
    assert!(
        matches!(
            error,
            BootError::Audit(AuditError::RequiredSinkFailed { .. })
        ),
        "{error:?}"
    );
    assert_eq!(
        evs,
        pairs(&[("boot", "start"), ("audit", "sink_failed")]),
        "no stage may begin"
    );
    let launcher = FakeLauncher::new(0);
    assert!(!launcher.called());
}

#[test]
fn a_required_sink_failing_during_a_stage_stops_the_boot_before_launch() {
    let (audit, control, lines) = required_memory_audit();
    let measurer = HookedMeasurer {
        before: || control.fail_always(ErrorKind::Other),
    };
    let (error, evs) = required_sink_failure(&measurer, &audit, &lines);
    assert!(
        matches!(
            error,
            BootError::Audit(AuditError::RequiredSinkFailed { .. })
        ),
        "{error:?}"
    );
    // The measure stage's outcome was the first record the required sink refused; the
    // other sink still got it, and nothing after it.
    assert_eq!(
        evs.last().unwrap(),
        &("audit".to_string(), "sink_failed".to_string())
    );
    assert!(evs.contains(&("measure".to_string(), "ok".to_string())));
    assert!(!evs.contains(&("attest".to_string(), "begin".to_string())));
    assert!(!evs.contains(&("launch".to_string(), "begin".to_string())));
    let launcher = FakeLauncher::new(0);
    assert!(!launcher.called());
}

#[test]
fn a_required_sink_that_never_caught_up_stops_the_boot_before_launch() {
    let (audit, control, lines) = required_memory_audit();
    // NotFound before the first write: waiting (e.g. a file on a later volume), not
    // failed; still behind at launch, so the boot stops.
    control.fail_always(ErrorKind::NotFound);
    let (error, evs) = required_sink_failure(&RealMeasurer, &audit, &lines);
    assert!(
        matches!(
            error,
            BootError::Audit(AuditError::RequiredSinkBehind { .. })
        ),
        "{error:?}"
    );
    assert!(evs.contains(&("audit".to_string(), "sink_waiting".to_string())));
    assert_eq!(
        evs.last().unwrap(),
        &("launch".to_string(), "ok".to_string())
    );
}

// ---- (f) unit shape ----

#[test]
fn run_unit_records_exec_then_exec_failed_and_returns_1() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let ready = prepare_default(&fixture, &sys, &RealMeasurer, &audit).unwrap();
    let launcher = FakeLauncher::new(0);
    assert_eq!(run_unit(&ready, &launcher, &mut life(&sys, &audit)), 1);
    assert_eq!((launcher.supervised.get(), launcher.execed.get()), (0, 1));
    let recs = records(&lines);
    let tail: Vec<_> = events(&recs).split_off(successful_boot().len());
    assert_eq!(
        tail,
        pairs(&[
            ("launch", "exec"),
            ("launch", "exec_failed"),
            ("shutdown", "exit"),
        ])
    );
    let n = successful_boot().len();
    assert_eq!(recs[n]["details"]["argv"], json!(ready.plan.launch.argv));
    assert_eq!(
        recs[n + 1]["details"]["error"],
        json!(chain(&LaunchError::EmptyExec))
    );
    assert_eq!(recs[n + 2]["details"], json!({ "code": 1 }));
}

#[test]
fn chain_joins_every_cause() {
    let error = BootError::Stage {
        stage: "measure",
        source: StageError::ReadInput {
            path: PathBuf::from("/proc/cmdline"),
            source: std::io::Error::new(ErrorKind::NotFound, "gone").into(),
        },
    };
    assert_eq!(
        chain(&error),
        "stage measure failed: measure: cannot read /proc/cmdline: gone"
    );
}

// ---- attest and unlock with a recording fake broker ----

const SECRET: &[u8] = b"-----BEGIN PRIVATE KEY----- fl-client-key-bytes";

/// A recording [`stage::KeyBroker`]: answers from a table, never touches a network.
struct FakeBroker {
    attest_ok: bool,
    status: &'static str,
    deny: Option<String>,
    calls: Vec<String>,
    bindings: Vec<[u8; 64]>,
    /// GPUs beside the TEE (the real GPU logic over a fake NVML).
    gpus: Option<crate::tee::nvidia::Gpus>,
}

impl FakeBroker {
    fn new() -> FakeBroker {
        FakeBroker {
            attest_ok: true,
            status: "affirming",
            deny: None,
            calls: Vec::new(),
            bindings: Vec::new(),
            gpus: None,
        }
    }
}

impl stage::KeyBroker for FakeBroker {
    fn describe(&self) -> Value {
        json!({ "tee": "sample", "broker": "fake" })
    }

    fn insecure(&self) -> bool {
        true
    }

    fn attest(&mut self, attempt: &mut dyn FnMut(Value)) -> Result<Value, stage::BrokerError> {
        self.calls.push("attest".to_string());
        attempt(json!({ "call": "auth", "try": 1, "outcome": 200 }));
        if self.attest_ok {
            attempt(json!({ "call": "attest", "try": 1, "outcome": 200 }));
            Ok(json!({
                "broker": "https://kbs.example", "tee": "sample", "insecure": true,
                "nonce": "bm9uY2U=", "tee_pubkey": {"kty": "EC"}, "additional_evidence": "",
                "report_data": "00", "evidence": {}, "claims": {}, "status": self.status,
            }))
        } else {
            attempt(json!({ "call": "attest", "try": 1, "outcome": 401 }));
            Err("the key broker refused the evidence (AttestationFailed: bad quote)".into())
        }
    }

    fn fetch(
        &mut self,
        uri: &crate::policy::ResourceUri,
        attempt: &mut dyn FnMut(Value),
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, stage::BrokerError> {
        self.calls.push(format!("fetch {uri}"));
        attempt(json!({ "call": "resource", "resource": uri, "try": 1 }));
        if self.deny.as_deref() == Some(uri.to_string().as_str()) {
            return Err(
                format!("the key broker refused the evidence for {uri} (PolicyDeny)").into(),
            );
        }
        Ok(zeroize::Zeroizing::new(SECRET.to_vec()))
    }

    fn device_precheck(
        &mut self,
    ) -> Result<Option<Vec<crate::tee::DeviceFacts>>, stage::BrokerError> {
        let Some(gpus) = self.gpus.as_mut() else {
            return Ok(None);
        };
        self.calls.push("device_precheck".to_string());
        let facts = gpus.precheck()?;
        let events = facts
            .iter()
            .map(crate::tee::nvidia::GpuFacts::event)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(events))
    }

    fn set_devices_ready(&mut self, ready: bool) -> Result<Option<Value>, stage::BrokerError> {
        let Some(gpus) = self.gpus.as_mut() else {
            return Ok(None);
        };
        self.calls.push(format!("set_devices_ready({ready})"));
        Ok(Some(gpus.set_ready(ready)?))
    }

    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, stage::BrokerError> {
        self.calls.push("checkpoint".to_string());
        self.bindings.push(*binding);
        Ok(
            json!({ "tee": "sample", "evidence": { "svn": "1", "report_data": hex::encode(binding) } }),
        )
    }
}

fn broker_policy(fixture: &Fixture) -> String {
    fixture.policy("").replacen(
        "attestation = \"none\"",
        "attestation = { tee = \"sample\", kbs = \"http://127.0.0.1:9\", insecure_sample = true, insecure_http = true }\n\n[network]\n\n[[secret]]\nname = \"client.key\"\nresource = \"kbs:///default/secrets/client-key\"\n",
        1,
    )
}

fn prepare_with_broker(
    fixture: &Fixture,
    sys: &FakeSys,
    broker: &mut FakeBroker,
    audit: &Audit,
) -> Result<Ready, BootError> {
    let volumes = crate::volume::FakeVolumes::new();
    prepare_with(
        &broker_policy(fixture),
        fixture,
        sys,
        broker,
        &volumes,
        audit,
    )
}

fn prepare_with(
    policy: &str,
    fixture: &Fixture,
    sys: &FakeSys,
    broker: &mut FakeBroker,
    volumes: &dyn crate::volume::Volumes,
    audit: &Audit,
) -> Result<Ready, BootError> {
    let loaded = load(policy);
    let mut register = NoRegister;
    let env = Env {
        sys,
        measurer: &RealMeasurer,
        register: &mut register,
        audit,
        broker: Some(broker),
        volumes,
        firewall: &mut crate::firewall::RecordingFirewall::new(),
        resolver: &crate::firewall::FakeResolver::new(),
        lockdown: &crate::lockdown::FakeLockdownSys::new("6.1.0"),
        lockdown_paths: &crate::lockdown::Paths::under(Path::new("/nonexistent/cvm-warden-test")),
        net: None,
    };
    prepare(&loaded, &fixture.facts(&loaded), env)
}

fn volume_policy(fixture: &Fixture) -> String {
    format!(
        "{}\n[[volume]]\nname = \"workspace\"\ndevice = \"/dev/vdb\"\nkey = \"kbs:///default/keys/workspace\"\nmount = \"/workspace\"\nformat_if_blank = true\n",
        broker_policy(fixture)
    )
}

#[test]
fn blank_volume_is_formatted_opened_and_mounted_with_the_released_key() {
    use crate::volume::{DeviceState, FakeVolumes, VolumeOp};
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let mut broker = FakeBroker::new();
    let volumes = FakeVolumes::new().with_device("/dev/vdb", DeviceState::Blank);
    prepare_with(
        &volume_policy(&fixture),
        &fixture,
        &sys,
        &mut broker,
        &volumes,
        &audit,
    )
    .unwrap();
    assert_eq!(
        broker.calls,
        [
            "attest",
            "checkpoint",
            "fetch kbs:///default/keys/workspace",
            "fetch kbs:///default/secrets/client-key"
        ]
    );
    assert_eq!(
        volumes.ops(),
        [
            VolumeOp::Inspect,
            VolumeOp::Format,
            VolumeOp::CheckFormat,
            VolumeOp::TokenResources,
            VolumeOp::VerifyKey,
            VolumeOp::Open,
            VolumeOp::MkfsExt4,
            VolumeOp::Mount,
            VolumeOp::SetRootMode,
            VolumeOp::SetTokenState
        ]
    );
    assert_eq!(volumes.mappings(), ["workspace"]);
    for event in ["volume_format", "volume_ready"] {
        assert!(
            records(&lines)
                .iter()
                .any(|r| r["stage"] == "unlock" && r["event"] == event),
            "no unlock/{event} record"
        );
    }
    let ok = records(&lines)
        .into_iter()
        .find(|r| r["stage"] == "unlock" && r["event"] == "ok")
        .unwrap();
    assert_eq!(ok["details"]["volumes"][0]["formatted"], true);
    assert_eq!(ok["details"]["volumes"][0]["noexec"], true);
}

#[test]
fn volume_holding_data_without_header_is_refused_and_not_touched() {
    use crate::volume::{DeviceState, FakeVolumes, VolumeOp};
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, _lines) = memory_audit();
    let mut broker = FakeBroker::new();
    let volumes = FakeVolumes::new().with_device(
        "/dev/vdb",
        DeviceState::HoldsData {
            first_nonzero: 1000,
        },
    );
    let error = prepare_with(
        &volume_policy(&fixture),
        &fixture,
        &sys,
        &mut broker,
        &volumes,
        &audit,
    )
    .unwrap_err();
    let text = chain(&error);
    assert!(
        text.contains("refusing to format /dev/vdb: it holds data but no LUKS2 header"),
        "{text}"
    );
    assert_eq!(volumes.ops(), [VolumeOp::Inspect]);
    assert!(!sys
        .calls()
        .iter()
        .any(|c| matches!(c, SysCall::WritePrivate { .. })));
}

#[test]
fn broker_boot_attests_checkpoints_and_delivers_secrets_without_logging_them() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let mut broker = FakeBroker::new();
    prepare_with_broker(&fixture, &sys, &mut broker, &audit).unwrap();
    assert_eq!(
        broker.calls,
        [
            "attest",
            "checkpoint",
            "fetch kbs:///default/secrets/client-key"
        ]
    );
    let records = records(&lines);
    let attested = records
        .iter()
        .position(|r| r["event"] == "attested")
        .unwrap();
    // The checkpoint binds the hash of the record that holds the exchange.
    let head: Digest = serde_json::from_value(records[attested]["hash"].clone()).unwrap();
    assert_eq!(broker.bindings, [stage::attest::checkpoint_binding(&head)]);
    let ok = records
        .iter()
        .find(|r| r["stage"] == "attest" && r["event"] == "ok")
        .unwrap();
    assert_eq!(
        ok["details"]["checkpoint"]["head_seq"],
        records[attested]["seq"]
    );
    let tries = records.iter().filter(|r| r["event"] == "try").count();
    assert_eq!(tries, 3, "every broker try is a record");
    // The secret went to the tmpfs, owned by the workload user, and never into the log.
    let calls = sys.calls();
    assert!(calls.iter().any(|c| matches!(c,
        SysCall::Mount { target, data: Some(data), .. }
            if target == Path::new("/run/cvm-warden/secrets")
                && data == "mode=0500,uid=1000,gid=1000,size=4m,nr_inodes=256")));
    assert!(calls.iter().any(|c| matches!(c,
        SysCall::WritePrivate { path, len, uid: 1000, gid: 1000, .. }
            if path == Path::new("/run/cvm-warden/secrets/client.key") && *len == SECRET.len())));
    let all = lines.lock().unwrap().join("\n");
    assert!(!all.contains("fl-client-key-bytes"));
    assert!(!all.contains(&hex::encode(SECRET)));
}

#[test]
fn refused_attestation_fetches_nothing_and_stops_before_launch() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let mut broker = FakeBroker::new();
    broker.attest_ok = false;
    let error = prepare_with_broker(&fixture, &sys, &mut broker, &audit).unwrap_err();
    assert_eq!(broker.calls, ["attest"]);
    assert!(
        chain(&error).contains("attest: key broker exchange with http://127.0.0.1:9: the key broker refused the evidence"),
        "{}",
        chain(&error)
    );
    assert!(!sys
        .calls()
        .iter()
        .any(|c| matches!(c, SysCall::WritePrivate { .. })));
    let records = records(&lines);
    assert!(!records.iter().any(|r| r["stage"] == "unlock"));
}

#[test]
fn denied_secret_is_not_written_and_names_the_resource() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, _lines) = memory_audit();
    let mut broker = FakeBroker::new();
    broker.deny = Some("kbs:///default/secrets/client-key".to_string());
    let error = prepare_with_broker(&fixture, &sys, &mut broker, &audit).unwrap_err();
    let text = chain(&error);
    assert!(
        text.contains("unlock: secret \"client.key\" from kbs:///default/secrets/client-key: the key broker refused the evidence for kbs:///default/secrets/client-key (PolicyDeny)"),
        "{text}"
    );
    assert!(!sys
        .calls()
        .iter()
        .any(|c| matches!(c, SysCall::WritePrivate { .. })));
}

#[test]
fn the_register_value_before_the_first_extend_is_recorded() {
    use crate::eventlog::SimulatedPcr;
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let loaded = load(&fixture.policy(""));
    let firmware = Digest::of(b"extended by firmware before cvm-warden");
    let mut register = SimulatedPcr { value: firmware };
    let env = Env {
        sys: &sys,
        measurer: &RealMeasurer,
        register: &mut register,
        audit: &audit,
        broker: None,
        volumes: &crate::volume::FakeVolumes::new(),
        firewall: &mut crate::firewall::RecordingFirewall::new(),
        resolver: &crate::firewall::FakeResolver::new(),
        lockdown: &crate::lockdown::FakeLockdownSys::new("6.1.0"),
        lockdown_paths: &crate::lockdown::Paths::under(Path::new("/nonexistent/cvm-warden-test")),
        net: None,
    };
    let ready = prepare(&loaded, &fixture.facts(&loaded), env).unwrap();
    assert_eq!(ready.event_log.register_initial(), Some(firmware));
    let measured = records(&lines)
        .into_iter()
        .find(|r| r["stage"] == "measure" && r["event"] == "ok")
        .unwrap();
    assert_eq!(
        measured["details"]["register_initial"],
        serde_json::to_value(firmware).unwrap()
    );
    // The register replays from that value.
    let replay = ready
        .event_log
        .events()
        .iter()
        .fold(firmware, |v, e| SimulatedPcr::extended(&v, &e.digest));
    assert_eq!(register.value, replay);
}

#[test]
fn a_contraindicated_verdict_stops_the_boot_before_any_key() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, _lines) = memory_audit();
    let mut broker = FakeBroker::new();
    broker.status = "contraindicated";
    let error = prepare_with_broker(&fixture, &sys, &mut broker, &audit).unwrap_err();
    assert!(
        chain(&error).contains("the broker's verdict on this evidence is \"contraindicated\""),
        "{}",
        chain(&error)
    );
    assert_eq!(broker.calls, ["attest"]);
}

// ---- perimeter and allowlist with recording fakes ----

fn network_policy(fixture: &Fixture) -> String {
    fixture.policy(
        "\n[network]\ninbound = [{ port = 8002 }]\noutbound = [{ host = \"fl-server.example\", port = 8002 }]\n\n[lockdown]\nconsoles = \"off\"\nkernel_lockdown = \"confidentiality\"\nmodules = [\"dm_crypt\"]\n",
    )
}

#[test]
fn perimeter_and_allowlist_apply_measure_and_pin_once_and_a_sandbox_skips_host_settings() {
    use crate::firewall::{FakeResolver, RecordingFirewall};
    use crate::lockdown::{FakeLockdownSys, Paths};
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let loaded = load(&network_policy(&fixture));
    let mut facts = fixture.facts(&loaded);
    facts.sandbox = true;
    // A sandbox's lockdown touches only its own /tmp and standard input.
    let root = tempfile::tempdir().unwrap();
    let paths = Paths::under(root.path());
    std::fs::create_dir_all(paths.mountinfo.parent().unwrap()).unwrap();
    std::fs::write(
        &paths.mountinfo,
        "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw\n",
    )
    .unwrap();
    std::fs::create_dir_all(&paths.proc_self_fd).unwrap();
    std::os::unix::fs::symlink("/dev/pts/0", paths.proc_self_fd.join("0")).unwrap();
    std::fs::create_dir_all(paths.dev_null.parent().unwrap()).unwrap();
    std::fs::write(&paths.dev_null, "").unwrap();
    std::fs::create_dir_all(&paths.tmp).unwrap();
    let lockdown = FakeLockdownSys::new("6.1.0").with_kernel(&paths);
    let mut firewall = RecordingFirewall::new();
    let resolver = FakeResolver::new()
        .host("fl-server.example", &["192.0.2.10".parse().unwrap()])
        .nameservers(&["192.0.2.53".parse().unwrap()]);
    let mut register = crate::eventlog::SimulatedPcr::default();
    let env = Env {
        sys: &sys,
        measurer: &RealMeasurer,
        register: &mut register,
        audit: &audit,
        broker: None,
        volumes: &crate::volume::FakeVolumes::new(),
        firewall: &mut firewall,
        resolver: &resolver,
        lockdown: &lockdown,
        lockdown_paths: &paths,
        net: None,
    };
    let ready = prepare(&loaded, &facts, env).unwrap();
    // Two atomic transactions: the perimeter, then the allowlist.
    assert_eq!(firewall.transactions.len(), 2);
    let kinds: Vec<EventKind> = ready.event_log.events().iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Ruleset,
            EventKind::Policy,
            EventKind::KernelCmdline,
            EventKind::Bundle,
            EventKind::Ruleset,
            EventKind::Separator
        ]
    );
    let records = records(&lines);
    let perimeter = records
        .iter()
        .find(|r| r["stage"] == "perimeter" && r["event"] == "ok")
        .unwrap();
    assert_eq!(
        perimeter["details"]["firewall"]["digest"],
        serde_json::to_value(ready.event_log.events()[0].digest).unwrap()
    );
    let skipped = perimeter["details"]["sandbox_skipped"]["settings"].to_string();
    assert!(
        skipped.contains("sysctls") && skipped.contains("kernel modules"),
        "{skipped}"
    );
    // No host-wide effect was asked of the lockdown fake.
    let calls = format!("{:?}", lockdown.calls());
    assert!(
        !calls.contains("FinitModule") && !calls.contains("Swapoff"),
        "{calls}"
    );
    let allowlist = records
        .iter()
        .find(|r| r["stage"] == "allowlist" && r["event"] == "ok")
        .unwrap();
    assert_eq!(
        allowlist["details"]["firewall"]["digest"],
        serde_json::to_value(ready.event_log.events()[4].digest).unwrap()
    );
    // The allowlist uses the address pinned when the perimeter resolved both phases.
    let pins = allowlist["details"]["firewall"]["pins"].to_string();
    assert!(pins.contains("192.0.2.10"), "{pins}");
}

#[test]
fn a_hanging_nft_fails_the_perimeter_closed_within_its_timeout() {
    use crate::firewall::{FakeResolver, NftFirewall};
    use crate::tool::testing::{hanging, hanging_pids, left_alive};
    use crate::tool::{Tool, Tools};
    use std::time::Duration;
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let loaded = load(&fixture.policy(
        "\n[network]\ninbound = [{ port = 8002 }]\noutbound = [{ host = \"fl-server.example\", port = 8002 }]\n",
    ));
    let fake = hanging(fixture.dir.path(), "nft");
    // The boot's wiring (boot::wiring::prepare): one audited runner; here its nft is the fake.
    let tools = Tools::system()
        .with_candidates(Tool::Nft, [&fake])
        .with_timeout(Tool::Nft, Duration::from_millis(400))
        .audited(&audit);
    let resolver = FakeResolver::new()
        .host("fl-server.example", &["192.0.2.10".parse().unwrap()])
        .nameservers(&["192.0.2.53".parse().unwrap()]);
    let mut register = NoRegister;
    let env = Env {
        sys: &sys,
        measurer: &RealMeasurer,
        register: &mut register,
        audit: &audit,
        broker: None,
        volumes: &crate::volume::FakeVolumes::new(),
        firewall: &mut NftFirewall::with_tools(tools),
        resolver: &resolver,
        lockdown: &crate::lockdown::FakeLockdownSys::new("6.1.0"),
        lockdown_paths: &crate::lockdown::Paths::under(Path::new("/nonexistent/cvm-warden-test")),
        net: None,
    };
    let started = std::time::Instant::now();
    let error = prepare(&loaded, &fixture.facts(&loaded), env).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            error,
            BootError::Stage {
                stage: "perimeter",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        chain(&error).contains("did not finish within 400 ms"),
        "{}",
        chain(&error)
    );
    // Nothing after the perimeter ran; the tool's path is in the log before its failure.
    let records = records(&lines);
    assert_eq!(
        events(&records),
        pairs(&[
            ("boot", "start"),
            ("boot", "planned"),
            ("perimeter", "begin"),
            ("tool", "resolved"),
            ("perimeter", "failed"),
        ])
    );
    assert_eq!(
        records[3]["details"]["tool"],
        json!({ "name": "nft", "path": fake })
    );
    assert_eq!(
        left_alive(&hanging_pids(fixture.dir.path())),
        Vec::<i32>::new()
    );
}

#[test]
fn module_loading_is_disabled_last_by_the_allowlist_stage() {
    let fixture = Fixture::new();
    let loaded = load(&network_policy(&fixture));
    let plan = BootPlan::new(&loaded.policy, &fixture.facts(&loaded)).unwrap();
    let perimeter = plan.perimeter.lockdown.as_ref().unwrap();
    let keys: Vec<&str> = perimeter.sysctls.iter().map(|s| s.key).collect();
    assert!(!keys.contains(&"kernel.modules_disabled"), "{keys:?}");
    assert!(keys.contains(&"kernel.kexec_load_disabled"), "{keys:?}");
    assert_eq!(perimeter.modules, ["dm_crypt"]);
    let last = plan.allowlist.disable_modules.as_ref().unwrap();
    let keys: Vec<&str> = last.sysctls.iter().map(|s| s.key).collect();
    assert_eq!(keys, ["kernel.modules_disabled"]);
    assert!(last.modules.is_empty() && last.masks.is_empty() && !last.lock_root);
    // Before the TEE is opened the boot loads only the modules (its driver may be one).
    let first = crate::stage::perimeter::only_load_modules(perimeter.clone());
    assert_eq!(first.modules, ["dm_crypt"]);
    assert!(first.sysctls.is_empty() && first.kernel_lockdown.is_none());
    assert!(!first.swap_off && !first.tmp_tmpfs && !first.close_stdin && !first.lock_root);
    // A sandbox never disables module loading on its host.
    let mut facts = fixture.facts(&loaded);
    facts.sandbox = true;
    let plan = BootPlan::new(&loaded.policy, &facts).unwrap();
    assert!(plan.allowlist.disable_modules.is_none());
    assert!(plan.perimeter.lockdown.as_ref().unwrap().sysctls.is_empty());
}

#[test]
fn secrets_already_written_are_removed_when_a_later_one_is_refused() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let mut broker = FakeBroker::new();
    broker.deny = Some("kbs:///default/secrets/second".to_string());
    let policy = format!(
        "{}\n[[secret]]\nname = \"second\"\nresource = \"kbs:///default/secrets/second\"\n",
        broker_policy(&fixture)
    );
    let volumes = crate::volume::FakeVolumes::new();
    prepare_with(&policy, &fixture, &sys, &mut broker, &volumes, &audit).unwrap_err();
    let calls = sys.calls();
    // The first secret was written, then its tmpfs unmounted once the second was refused.
    assert!(calls
        .iter()
        .any(|c| matches!(c, SysCall::WritePrivate { .. })));
    assert!(calls
        .iter()
        .any(|c| matches!(c, SysCall::Umount(p) if p == Path::new("/run/cvm-warden/secrets"))));
    assert!(!sys
        .mounted()
        .contains(&PathBuf::from("/run/cvm-warden/secrets")));
    let removed = records(&lines)
        .into_iter()
        .find(|r| r["event"] == "secrets_removed")
        .unwrap();
    assert_eq!(removed["details"]["removed"], true);
}

// ---- checkpoints written by the runner ----

/// A recording [`Checkpointer`]: the bindings it was asked for; evidence echoes them.
struct RecordingCheckpointer {
    bindings: Vec<[u8; 64]>,
    /// Answer with an error from this call on (0-based).
    fail_from: Option<usize>,
}

impl RecordingCheckpointer {
    fn new() -> RecordingCheckpointer {
        RecordingCheckpointer {
            bindings: Vec::new(),
            fail_from: None,
        }
    }
}

impl Checkpointer for RecordingCheckpointer {
    fn describe(&self) -> Value {
        json!({ "tee": "sample", "broker": "fake" })
    }

    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, stage::BrokerError> {
        let n = self.bindings.len();
        self.bindings.push(*binding);
        if self.fail_from.is_some_and(|from| n >= from) {
            return Err("sample: the TEE device is gone".into());
        }
        Ok(json!({ "tee": "sample", "evidence": { "report_data": hex::encode(binding) } }))
    }
}

/// Checks that `checkpoint` (at index `i`) binds the record just before it.
fn assert_binds_previous(recs: &[Value], i: usize, kind: &str) {
    let cp = &recs[i];
    assert_eq!(
        (cp["stage"].as_str(), cp["event"].as_str()),
        (Some("audit"), Some("checkpoint"))
    );
    let details = &cp["details"];
    assert_eq!(details["kind"], kind);
    assert_eq!(details["head_seq"], recs[i - 1]["seq"]);
    assert_eq!(details["head"], recs[i - 1]["hash"]);
    assert_eq!(cp["prev"], recs[i - 1]["hash"]);
    let head: Digest = serde_json::from_value(details["head"].clone()).unwrap();
    assert_eq!(
        details["report_data"],
        hex::encode(stage::attest::checkpoint_binding(&head))
    );
    assert_eq!(
        details["evidence"]["evidence"]["report_data"],
        details["report_data"]
    );
    assert_eq!(details["tee"], json!({ "tee": "sample", "broker": "fake" }));
}

#[test]
fn pid1_writes_launch_periodic_and_closing_checkpoints_last_after_the_closing_record() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let ready = prepare_default(&fixture, &sys, &RealMeasurer, &audit).unwrap();
    let mut checkpointer = RecordingCheckpointer::new();
    let mut launcher = FakeLauncher::new(0);
    launcher.periodic_runs = 2;
    let mut life = life(&sys, &audit);
    life.checkpointer = Some(&mut checkpointer);
    life.checkpoint_interval = Some(std::time::Duration::from_secs(600));
    run_init(&ready, &launcher, &mut life, FailureAction::Poweroff);
    assert_eq!(
        launcher.interval.get(),
        Some(std::time::Duration::from_secs(600))
    );
    let recs = records(&lines);
    let tail: Vec<_> = events(&recs).split_off(successful_boot().len());
    assert_eq!(
        tail,
        pairs(&[
            ("launch", "started"),
            ("audit", "checkpoint"),
            ("audit", "checkpoint"),
            ("audit", "checkpoint"),
            ("launch", "exited"),
            ("launch", "workload_done"),
            ("shutdown", "poweroff"),
            ("audit", "checkpoint"),
        ])
    );
    let n = successful_boot().len();
    assert_binds_previous(&recs, n + 1, "launch");
    assert_binds_previous(&recs, n + 2, "periodic");
    assert_binds_previous(&recs, n + 3, "periodic");
    assert_binds_previous(&recs, recs.len() - 1, "closing");
    assert_eq!(checkpointer.bindings.len(), 4);
    // The event log and the register's start value, as attest/attested carries them.
    let closing = &recs.last().unwrap()["details"];
    assert_eq!(
        closing["event_log"],
        serde_json::to_value(ready.event_log.events()).unwrap()
    );
    assert_eq!(closing["register_initial"], Value::Null);
    // A log that ends with its closing checkpoint is complete.
    let joined: String = lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    let report = crate::audit::verify(joined.as_bytes()).unwrap();
    assert!(report.complete);
}

#[test]
fn a_tee_that_stops_answering_is_recorded_and_the_boot_goes_on() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let ready = prepare_default(&fixture, &sys, &RealMeasurer, &audit).unwrap();
    let mut checkpointer = RecordingCheckpointer::new();
    checkpointer.fail_from = Some(1);
    let mut launcher = FakeLauncher::new(3);
    launcher.periodic_runs = 1;
    let mut life = life(&sys, &audit);
    life.checkpointer = Some(&mut checkpointer);
    life.checkpoint_interval = Some(std::time::Duration::from_secs(60));
    let shutdown = run_init(&ready, &launcher, &mut life, FailureAction::Poweroff);
    assert_eq!(shutdown.code, 3);
    let recs = records(&lines);
    let tail: Vec<_> = events(&recs).split_off(successful_boot().len());
    assert_eq!(
        tail,
        pairs(&[
            ("launch", "started"),
            ("audit", "checkpoint"),
            ("audit", "checkpoint_failed"),
            ("launch", "exited"),
            ("launch", "workload_done"),
            ("shutdown", "poweroff"),
            ("audit", "checkpoint_failed"),
        ])
    );
    let failed = &recs[successful_boot().len() + 2];
    assert_eq!(
        failed["details"],
        json!({
            "kind": "periodic",
            "head_seq": recs[successful_boot().len() + 1]["seq"],
            "error": "sample: the TEE device is gone",
        })
    );
    let last = recs.last().unwrap();
    assert_eq!(last["details"]["kind"], "closing");
    assert_eq!(last["details"]["head_seq"], recs[recs.len() - 2]["seq"]);
}

#[test]
fn without_an_evidence_provider_no_checkpoint_is_written() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let ready = prepare_default(&fixture, &sys, &RealMeasurer, &audit).unwrap();
    let mut launcher = FakeLauncher::new(0);
    launcher.periodic_runs = 3;
    let mut life = life(&sys, &audit);
    life.checkpoint_interval = Some(std::time::Duration::from_secs(60));
    run_init(&ready, &launcher, &mut life, FailureAction::Poweroff);
    // No provider: the supervisor is not even asked to wake for one.
    assert_eq!(launcher.interval.get(), None);
    assert!(!records(&lines)
        .iter()
        .any(|r| r["stage"] == "audit" && r["event"].as_str().unwrap().starts_with("checkpoint")));
}

#[test]
fn a_failed_boot_and_the_unit_shape_end_with_the_closing_checkpoint() {
    // A failed boot: boot/failed, shutdown/halt, then the checkpoint over it, with the
    // events measured before the failure.
    let (audit, lines) = memory_audit();
    let mut checkpointer = RecordingCheckpointer::new();
    let sys = FakeSys::new();
    let mut measured = EventLog::new();
    measured.set_register_initial(Some(Digest::ZERO));
    let mut failed = life(&sys, &audit);
    failed.checkpointer = Some(&mut checkpointer);
    let error = BootError::Plan(StageError::Broker {
        stage: "attest",
        what: "test".into(),
        source: "refused".into(),
    });
    fail(&mut failed, FailureAction::Halt, &error, &measured);
    let recs = records(&lines);
    assert_eq!(
        events(&recs),
        pairs(&[
            ("boot", "failed"),
            ("shutdown", "halt"),
            ("audit", "checkpoint")
        ])
    );
    assert_binds_previous(&recs, 2, "closing");
    assert_eq!(
        recs[2]["details"]["register_initial"],
        serde_json::to_value(Digest::ZERO).unwrap()
    );

    // The unit shape: launch/exec, its checkpoint, then execve.
    let fixture = Fixture::new();
    let (audit, lines) = memory_audit();
    let ready = prepare_default(&fixture, &sys, &RealMeasurer, &audit).unwrap();
    let mut checkpointer = RecordingCheckpointer::new();
    let mut unit = life(&sys, &audit);
    unit.checkpointer = Some(&mut checkpointer);
    let launcher = FakeLauncher::new(0);
    run_unit(&ready, &launcher, &mut unit);
    let recs = records(&lines);
    let n = successful_boot().len();
    assert_eq!(
        events(&recs)[n..n + 2],
        pairs(&[("launch", "exec"), ("audit", "checkpoint")])
    );
    assert_binds_previous(&recs, n + 1, "closing");
    // exec failed (the fake): the shutdown record gets its own closing checkpoint.
    assert_eq!(
        events(&recs)[recs.len() - 2..],
        pairs(&[("shutdown", "exit"), ("audit", "checkpoint")])
    );
}

// ---- a failed launch removes the secrets and closes the volumes ----

/// A boot with a secret and a volume, then `launch` with a launcher that fails; returns the
/// records, the sys and the volumes.
fn failed_launch(
    unit: bool,
    audit_file: Option<&Path>,
) -> (Vec<Value>, FakeSys, crate::volume::FakeVolumes) {
    use crate::volume::{DeviceState, FakeVolumes};
    let fixture = Fixture::new();
    // The volume's mount point is a mount point (as RealVolumes leaves it).
    let sys = FakeSys::new().with_mounted(["/workspace"]);
    let (audit, lines) = memory_audit();
    let mut broker = FakeBroker::new();
    let volumes = FakeVolumes::new().with_device("/dev/vdb", DeviceState::Blank);
    let ready = prepare_with(
        &volume_policy(&fixture),
        &fixture,
        &sys,
        &mut broker,
        &volumes,
        &audit,
    )
    .unwrap();
    assert!(sys
        .mounted()
        .contains(&PathBuf::from("/run/cvm-warden/secrets")));
    assert_eq!(volumes.mappings(), ["workspace"]);
    let mut launcher = FakeLauncher::new(0);
    launcher.fail = true;
    let mut life = Lifecycle {
        sys: &sys,
        audit: &audit,
        volumes: &volumes,
        checkpointer: None,
        checkpoint_interval: None,
        audit_file,
        stop_workload: no_stop,
        watch_power_button: false,
    };
    if unit {
        assert_eq!(run_unit(&ready, &launcher, &mut life), 1);
    } else {
        let shutdown = run_init(&ready, &launcher, &mut life, FailureAction::Poweroff);
        assert_eq!(shutdown.code, 1);
    }
    (records(&lines), sys, volumes)
}

#[test]
fn a_failed_execve_removes_the_secrets_and_closes_the_volumes() {
    let (recs, sys, volumes) = failed_launch(true, None);
    assert!(!sys
        .mounted()
        .contains(&PathBuf::from("/run/cvm-warden/secrets")));
    assert!(!sys.mounted().contains(&PathBuf::from("/workspace")));
    assert!(volumes.mappings().is_empty());
    let tail: Vec<_> = events(&recs).split_off(recs.len() - 4);
    assert_eq!(
        tail,
        pairs(&[
            ("launch", "exec"),
            ("launch", "exec_failed"),
            ("launch", "cleanup"),
            ("shutdown", "exit"),
        ])
    );
    let cleanup = &recs[recs.len() - 2]["details"]["removed"];
    assert_eq!(cleanup[0]["what"], "secrets");
    assert_eq!(cleanup[0]["removed"], true);
    assert_eq!(cleanup[1]["name"], "workspace");
    assert_eq!(cleanup[1]["removed"], true);
}

#[test]
fn a_failed_pid1_launch_removes_the_secrets_but_keeps_the_audit_files_volume() {
    let (recs, sys, volumes) =
        failed_launch(false, Some(Path::new("/workspace/audit/cvm-warden.jsonl")));
    assert!(!sys
        .mounted()
        .contains(&PathBuf::from("/run/cvm-warden/secrets")));
    assert!(sys.mounted().contains(&PathBuf::from("/workspace")));
    assert_eq!(volumes.mappings(), ["workspace"]);
    let tail: Vec<_> = events(&recs).split_off(recs.len() - 3);
    assert_eq!(
        tail,
        pairs(&[
            ("launch", "failed"),
            ("launch", "cleanup"),
            ("shutdown", "poweroff"),
        ])
    );
    let cleanup = &recs[recs.len() - 2]["details"]["removed"];
    assert_eq!(cleanup[1]["removed"], false);
    assert!(cleanup[1]["error"]
        .as_str()
        .unwrap()
        .contains("holds the audit file"));
}

/// The checkpoints the runner writes are what the verifier reads: a sample provider's
/// evidence over each head passes its evidence check.
#[test]
fn the_verifier_checks_the_runners_checkpoints() {
    struct Sample(crate::tee::sample::SampleProvider);
    impl Checkpointer for Sample {
        fn describe(&self) -> Value {
            json!({ "tee": "sample", "provider": crate::tee::Provider::describe(&self.0) })
        }
        fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, stage::BrokerError> {
            Ok(json!({
                "tee": "sample",
                "evidence": crate::tee::Provider::checkpoint(&mut self.0, binding)?,
            }))
        }
    }
    let (audit, lines) = memory_audit();
    let mut sample = Sample(crate::tee::sample::SampleProvider::new());
    audit.record("boot", "start", json!({})).unwrap();
    for kind in [CheckpointKind::Launch, CheckpointKind::Periodic] {
        assert!(checkpoint(&audit, &mut sample, kind, &EventLog::new()));
        audit.record("launch", "tick", json!({})).unwrap();
    }
    audit
        .record("shutdown", "exit", json!({ "code": 0 }))
        .unwrap();
    assert!(checkpoint(
        &audit,
        &mut sample,
        CheckpointKind::Closing,
        &EventLog::new()
    ));
    let joined: String = lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    let outcome = cvm_warden_verify::verdict::verify_log_from(
        joined.as_bytes(),
        Path::new("memory"),
        cvm_warden_verify::check::Pins::default(),
    )
    .unwrap();
    let checked: Vec<&str> = outcome.evidence.iter().map(|f| f.what.as_str()).collect();
    assert_eq!(
        checked,
        [
            "launch checkpoint of seq 0",
            "periodic checkpoint of seq 2",
            "closing checkpoint of seq 5"
        ]
    );
    assert!(outcome.runs[0].complete);
}

// --- the module step -----------------------------------------------------------------------

/// A kernel tree with `dm_crypt` (needing `ecb`) and `configfs` as modules.
fn module_tree() -> (tempfile::TempDir, crate::lockdown::Paths) {
    let root = tempfile::tempdir().unwrap();
    let paths = crate::lockdown::Paths::under(root.path());
    let dir = paths.lib_modules.join("6.1.0");
    std::fs::create_dir_all(dir.join("kernel")).unwrap();
    std::fs::write(
        dir.join("modules.dep"),
        "kernel/dm-crypt.ko: kernel/ecb.ko\nkernel/ecb.ko:\nkernel/configfs.ko:\n",
    )
    .unwrap();
    std::fs::write(dir.join("modules.builtin"), "kernel/tpm_tis.ko\n").unwrap();
    for file in ["dm-crypt.ko", "ecb.ko", "configfs.ko"] {
        std::fs::write(dir.join("kernel").join(file), "module").unwrap();
    }
    std::fs::create_dir_all(&paths.sys_module).unwrap();
    (root, paths)
}

fn module_plan(names: &[&str]) -> crate::lockdown::ModulePlan {
    crate::lockdown::ModulePlan {
        modules: names
            .iter()
            .map(|name| crate::lockdown::PlannedModule {
                name: (*name).to_owned(),
                needed_by: vec!["kernel.modules".to_owned()],
                or: Vec::new(),
            })
            .collect(),
    }
}

#[test]
fn the_module_step_loads_records_once_and_mounts_configfs_when_it_appears() {
    use crate::lockdown::{FakeLockdownSys, LockdownCall, Shape};
    let (_root, paths) = module_tree();
    let lockdown = FakeLockdownSys::new("6.1.0").with_kernel(&paths);
    // configfs's directory appears once its module is loaded (here: already there).
    let sys = FakeSys::new().with_dirs(["/sys/kernel/config"]);
    let (audit, lines) = memory_audit();
    let step = ModuleStep {
        shape: Shape::Pid1,
        sandbox: false,
        lockdown: &lockdown,
        paths: &paths,
        sys: &sys,
        audit: &audit,
    };
    load_modules(&module_plan(&["dm_crypt", "configfs", "tpm_tis"]), &step).unwrap();
    let loads: Vec<_> = lockdown
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            LockdownCall::FinitModule { path, .. } => {
                Some(path.file_name().unwrap().to_string_lossy().into_owned())
            }
            _ => None,
        })
        .collect();
    assert_eq!(loads, ["ecb.ko", "dm-crypt.ko", "configfs.ko"]);
    let recs = records(&lines);
    assert_eq!(events(&recs), pairs(&[("boot", "modules_loaded")]));
    let details = &recs[0]["details"];
    assert_eq!(
        details["report"]["loaded"],
        serde_json::json!(["ecb", "dm_crypt", "configfs"])
    );
    assert_eq!(
        details["report"]["built_in"],
        serde_json::json!(["tpm_tis"])
    );
    assert_eq!(details["plan"]["load"][0]["name"], "dm_crypt");
    assert_eq!(details["configfs_mounted"], "/sys/kernel/config");
    assert!(sys.calls().iter().any(
        |c| matches!(c, SysCall::Mount { fstype, .. } if fstype.as_deref() == Some("configfs"))
    ));

    // An empty plan writes nothing; the systemd shape leaves configfs to systemd.
    let (audit, lines) = memory_audit();
    let sys = FakeSys::new().with_dirs(["/sys/kernel/config"]);
    let step = ModuleStep {
        shape: Shape::Systemd,
        sys: &sys,
        audit: &audit,
        ..step
    };
    load_modules(&module_plan(&[]), &step).unwrap();
    assert!(records(&lines).is_empty());
    load_modules(&module_plan(&["dm_crypt"]), &step).unwrap();
    assert!(sys.calls().is_empty());
}

#[test]
fn a_sandbox_loads_no_module_and_says_so() {
    use crate::lockdown::{FakeLockdownSys, Shape};
    let (_root, paths) = module_tree();
    let lockdown = FakeLockdownSys::new("6.1.0").with_kernel(&paths);
    let sys = FakeSys::new().in_sandbox();
    let (audit, lines) = memory_audit();
    let step = ModuleStep {
        shape: Shape::Pid1,
        sandbox: true,
        lockdown: &lockdown,
        paths: &paths,
        sys: &sys,
        audit: &audit,
    };
    load_modules(&module_plan(&["dm_crypt", "nowhere"]), &step).unwrap();
    assert!(lockdown.calls().is_empty());
    let recs = records(&lines);
    assert_eq!(events(&recs), pairs(&[("boot", "modules_skipped")]));
    assert!(recs[0]["details"]["reason"]
        .as_str()
        .unwrap()
        .contains("host-wide"));
}

#[test]
fn a_missing_module_fails_the_boot_naming_module_feature_and_directory() {
    use crate::lockdown::{FakeLockdownSys, Shape};
    let (_root, paths) = module_tree();
    let lockdown = FakeLockdownSys::new("6.1.0").with_kernel(&paths);
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let step = ModuleStep {
        shape: Shape::Pid1,
        sandbox: false,
        lockdown: &lockdown,
        paths: &paths,
        sys: &sys,
        audit: &audit,
    };
    let error = load_modules(&module_plan(&["dm_crypt", "virtio_net"]), &step).unwrap_err();
    assert!(lockdown.calls().is_empty());
    assert!(records(&lines).is_empty());
    let text = chain(&error);
    assert!(
        text.contains("kernel module virtio_net (needed by kernel.modules)"),
        "{text}"
    );
    assert!(
        text.contains(&paths.lib_modules.join("6.1.0").display().to_string()),
        "{text}"
    );
    assert!(text.contains("run depmod"), "{text}");
}

/// Every nft expression kind the rendered rulesets use has its module in
/// [`crate::lockdown::NETWORK_MODULES`], so a `[network]` policy loads what `nft` needs.
#[test]
fn the_network_modules_cover_every_expression_of_the_rendered_rulesets() {
    use crate::firewall::{run_render_command, FakeResolver, Phase, RenderFormat};
    // nft keyword in the ruleset → the module that implements it.
    const EXPRESSIONS: [(&str, &str); 9] = [
        ("ct ", "nft_ct"),
        (" reject", "nft_reject_inet"),
        (" limit ", "nft_limit"),
        (" log", "nft_log"),
        (" masquerade", "nft_masq"),
        (" snat ", "nft_nat"),
        (" dnat ", "nft_nat"),
        (" fib ", "nft_fib_inet"),
        (" quota ", "nft_quota"),
    ];
    let fixture = Fixture::new();
    let loaded = load(&network_policy(&fixture));
    let resolver = FakeResolver::new()
        .host("fl-server.example", &["192.0.2.10".parse().unwrap()])
        .nameservers(&["192.0.2.53".parse().unwrap()]);
    let modules = crate::lockdown::module_plan(&loaded.policy);
    let planned: Vec<&str> = modules.modules.iter().map(|m| m.name.as_str()).collect();
    let mut used = 0;
    for phase in [Phase::Perimeter, Phase::Allowlist] {
        let mut out = Vec::new();
        run_render_command(
            &loaded.policy,
            phase,
            RenderFormat::Nft,
            &resolver,
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("table inet"), "{text}");
        for (keyword, module) in EXPRESSIONS {
            if text.contains(keyword) {
                used += 1;
                assert!(
                    planned.contains(&module),
                    "{module} for {keyword:?}: {planned:?}"
                );
            }
        }
    }
    assert!(used > 0, "the rulesets use conntrack");
    for module in crate::lockdown::NETWORK_MODULES {
        assert!(planned.contains(&module), "{module}");
    }
}

/// `prepare` of `policy` with a network effect.
fn run_prepare_net(
    fixture: &Fixture,
    policy: &str,
    net: &crate::net::FakeNetSys,
    audit: &Audit,
) -> Result<Ready, BootError> {
    let resolv = fixture.path("resolv.conf");
    run_prepare_with(
        fixture,
        policy,
        &FakeSys::new(),
        &RealMeasurer,
        audit,
        Some((net, &resolv)),
    )
}

const ETH0: &str = "[network]\ninbound = [{ port = 8002 }]\n\n[network.interface.eth0]\naddress = \"10.0.2.15/24\"\ngateway = \"10.0.2.2\"\ndns = [\"10.0.2.3\"]\n";

#[test]
fn the_network_comes_up_after_the_perimeter_and_before_the_measure_stage() {
    let fixture = Fixture::new();
    let (audit, lines) = memory_audit();
    let net = crate::net::FakeNetSys::new().with_link(
        "eth0",
        crate::net::FakeLink {
            index: 2,
            mac: vec![0x52, 0x54, 0, 0x12, 0x34, 0x56],
            appears_after: std::time::Duration::from_millis(300),
            carrier_after: Some(std::time::Duration::from_millis(500)),
            up: false,
        },
    );
    run_prepare_net(&fixture, &fixture.policy(ETH0), &net, &audit).unwrap();
    let events = events(&records(&lines));
    let at = |stage: &str, event: &str| {
        events
            .iter()
            .position(|(s, e)| s == stage && e == event)
            .unwrap_or_else(|| panic!("no {stage}/{event} in {events:?}"))
    };
    assert!(at("perimeter", "ok") < at("network", "begin"));
    assert!(at("network", "ok") < at("measure", "begin"));
    let calls = net.calls();
    assert!(
        calls.contains(&crate::net::NetCall::SetUp(1)),
        "lo is brought up: {calls:?}"
    );
    assert!(
        calls.contains(&crate::net::NetCall::AddAddress(
            2,
            "10.0.2.15".parse().unwrap(),
            24
        )),
        "{calls:?}"
    );
    assert!(
        calls.iter().any(|c| matches!(c,
            crate::net::NetCall::WriteFile(path, text)
                if *path == fixture.path("resolv.conf") && text.contains("nameserver 10.0.2.3"))),
        "{calls:?}"
    );
}

#[test]
fn a_missing_interface_stops_the_boot_before_anything_is_measured() {
    let fixture = Fixture::new();
    let (audit, lines) = memory_audit();
    let net = crate::net::FakeNetSys::new();
    let error = run_prepare_net(&fixture, &fixture.policy(ETH0), &net, &audit).unwrap_err();
    assert!(matches!(error, BootError::Network(_)), "{error:?}");
    let records = records(&lines);
    let failed = records
        .iter()
        .find(|r| r["stage"] == "network" && r["event"] == "failed")
        .expect("network/failed");
    assert!(failed["details"]["error"]
        .as_str()
        .unwrap()
        .contains("eth0"));
    assert!(
        !events(&records)
            .iter()
            .any(|(s, _)| s == "measure" || s == "attest"),
        "a stage ran after the network failed"
    );
}

#[test]
fn a_required_sink_lost_while_the_workload_runs_stops_it_and_says_so() {
    let fixture = Fixture::new();
    let (audit, control, lines) = required_memory_audit();
    let ready = prepare_default(&fixture, &FakeSys::new(), &RealMeasurer, &audit).unwrap();
    // The audit file's disk fills up after launch.
    control.fail_always(ErrorKind::StorageFull);
    let sys = FakeSys::new();
    let before = STOPS.load(std::sync::atomic::Ordering::SeqCst);
    let mut life = life(&sys, &audit);
    let launcher = FakeLauncher::new(0);
    run_init(&ready, &launcher, &mut life, FailureAction::Poweroff);
    assert!(STOPS.load(std::sync::atomic::Ordering::SeqCst) > before);
    let records = records(&lines);
    let lost: Vec<&Value> = records
        .iter()
        .filter(|r| r["stage"] == "launch" && r["event"] == "audit_lost")
        .collect();
    assert_eq!(lost.len(), 1, "recorded once: {records:?}");
    assert_eq!(lost[0]["details"]["sink"], "required");
    let closing = records.iter().find(|r| r["stage"] == "shutdown").unwrap();
    assert_ne!(
        closing["details"]["code"], 0,
        "a run stopped for a lost log never ends clean"
    );
    assert!(records
        .iter()
        .any(|r| r["stage"] == "shutdown" && r["event"] == "poweroff"));
}

#[test]
fn a_dhcp_lease_is_recorded_and_its_server_pinned_in_the_allowlist() {
    let fixture = Fixture::new();
    let (audit, lines) = memory_audit();
    let server: std::net::Ipv4Addr = "10.0.2.2".parse().unwrap();
    let net = crate::net::FakeNetSys::new()
        .with_link(
            "eth0",
            crate::net::FakeLink {
                index: 2,
                mac: vec![0x52, 0x54, 0, 0x12, 0x34, 0x56],
                appears_after: std::time::Duration::ZERO,
                carrier_after: Some(std::time::Duration::ZERO),
                up: false,
            },
        )
        .with_dhcp(crate::net::FakeDhcpServer {
            server,
            address: "10.0.2.15".parse().unwrap(),
            mask: "255.255.255.0".parse().unwrap(),
            router: Some(server),
            dns: vec!["10.0.2.3".parse().unwrap()],
            ignore_first: 0,
            nak: false,
            noise: Vec::new(),
        });
    let policy =
        "[network]\ninbound = [{ port = 8002 }]\n\n[network.interface.eth0]\ndhcp = true\n";
    run_prepare_net(&fixture, &fixture.policy(policy), &net, &audit).unwrap();
    let records = records(&lines);
    let network = records
        .iter()
        .find(|r| r["stage"] == "network" && r["event"] == "ok")
        .unwrap();
    assert!(network.to_string().contains("10.0.2.15"), "{network}");
    let allowlist = records
        .iter()
        .find(|r| r["stage"] == "allowlist" && r["event"] == "ok")
        .unwrap();
    assert_eq!(
        allowlist["details"]["dhcp_servers"],
        json!([{ "interface": "eth0", "server": "10.0.2.2" }])
    );
}

// ---- (n) the NVIDIA FLARE startup kit ----

/// A copy policy whose bundle holds kit-a's participant folder as `site-1` (without its
/// private key, which the policy withholds).
fn flare_fixture() -> (Fixture, String) {
    let fixture = Fixture::new();
    let kits = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/flare");
    fn copy_dir(src: &Path, dst: &Path) {
        std::fs::create_dir(dst).unwrap();
        for entry in std::fs::read_dir(src).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &dst.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
            }
        }
    }
    copy_dir(&kits.join("kit-a/site-1"), &fixture.bundle().join("site-1"));
    std::fs::remove_file(fixture.bundle().join("site-1/startup/client.key")).unwrap();
    let pin = std::fs::read_to_string(kits.join("kit-a.root-ca-sha256")).unwrap();
    let policy = format!(
        "{}\n[workload.flare]\nstartup_kit = \"site-1\"\nroot_ca_sha256 = \"sha256:{}\"\nwithheld = [\"startup/client.key\"]\n",
        fixture.copy_policy(),
        pin.trim()
    );
    (fixture, policy)
}

#[test]
fn the_flare_kit_is_verified_in_the_copy_and_measured_after_the_bundle() {
    let (fixture, policy) = flare_fixture();
    let sys = FakeSys::new().in_sandbox();
    let (audit, lines) = memory_audit();
    let ready = run_prepare(&fixture, &policy, &sys, &RealMeasurer, &audit).unwrap();
    let pin = load(&policy).policy.workload.flare.unwrap().root_ca_sha256;
    let kit = fixture.copy_to().join("site-1");
    let verified =
        crate::measure::flare::verify_kit(&kit, &pin, &["startup/client.key".to_string()]).unwrap();

    let events = ready.event_log.events();
    let at = events
        .iter()
        .position(|e| e.kind == EventKind::Bundle)
        .unwrap();
    assert_eq!(events[at + 1].kind, EventKind::FlareRootCa);
    assert_eq!(events[at + 1].digest, pin);
    assert_eq!(
        events[at + 1].description,
        kit.join("startup/rootCA.pem").display().to_string()
    );
    assert_eq!(events[at + 2].kind, EventKind::FlareKit);
    assert_eq!(events[at + 2].digest, verified.listing_digest());
    assert!(events[at + 2]
        .description
        .starts_with(&kit.display().to_string()));
    assert!(events[at + 2].description.ends_with("1 withheld)"));

    // The outcome record carries the listing, so an auditor can recompute the event.
    let recs = records(&lines);
    let measured = recs
        .iter()
        .find(|r| r["stage"] == "measure" && r["event"] == "ok")
        .unwrap();
    let flare = &measured["details"]["flare"];
    let listing = flare["listing"].as_str().unwrap();
    assert_eq!(Digest::of(listing.as_bytes()), events[at + 2].digest);
    assert!(listing.contains("\nwithheld startup/client.key\n"));
    assert_eq!(flare["root_ca_sha256"], json!(pin));
    // `cvm-warden plan` shows the kit in the measure stage's plan.
    assert_eq!(
        ready.plan.measure.flare.as_ref().unwrap().root_ca_sha256,
        pin
    );
}

#[test]
fn a_tampered_flare_kit_stops_the_boot_at_measure_naming_the_file() {
    let (fixture, policy) = flare_fixture();
    std::fs::write(
        fixture.bundle().join("site-1/local/extra.py"),
        "import os\n",
    )
    .unwrap();
    let sys = FakeSys::new().in_sandbox();
    let (audit, lines) = memory_audit();
    let error = run_prepare(&fixture, &policy, &sys, &RealMeasurer, &audit).unwrap_err();
    assert!(
        matches!(
            &error,
            BootError::Stage {
                stage: "measure",
                source: StageError::Measure { .. }
            }
        ),
        "{error:?}"
    );
    let recs = records(&lines);
    assert_eq!(
        events(&recs).last().unwrap(),
        &("measure".to_string(), "failed".to_string())
    );
    let message = recs.last().unwrap()["details"]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("local/extra.py: not signed"), "{message}");
    assert!(message.contains("NVIDIA FLARE startup kit"), "{message}");
}

// ---- GPUs ([attestation.gpu]) with the simulated NVML ----

fn sim_gpus(
    change: impl FnOnce(&mut crate::tee::nvidia::fake::FakeNvml),
) -> (crate::tee::nvidia::Gpus, crate::tee::nvidia::fake::Calls) {
    use crate::tee::nvidia::{fake::FakeNvml, Arch, GpuRequirements, Gpus};
    let mut nvml = FakeNvml::load(Path::new("tests/data/nvidia-sim/gpu.json")).unwrap();
    change(&mut nvml);
    let calls = nvml.calls();
    let gpus = Gpus::new(
        Ok(Box::new(nvml)),
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
        },
    );
    (gpus, calls)
}

fn ready_calls(calls: &crate::tee::nvidia::fake::Calls) -> Vec<String> {
    calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.starts_with("set_ready"))
        .cloned()
        .collect()
}

#[test]
fn gpus_are_checked_after_the_perimeter_measured_and_set_ready_only_after_unlock() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let mut broker = FakeBroker::new();
    let (gpus, nvml_calls) = sim_gpus(|_| {});
    broker.gpus = Some(gpus);
    let ready = prepare_with_broker(&fixture, &sys, &mut broker, &audit).unwrap();
    assert_eq!(
        broker.calls,
        [
            "device_precheck",
            "attest",
            "checkpoint",
            "fetch kbs:///default/secrets/client-key",
            "set_devices_ready(true)"
        ]
    );
    assert_eq!(ready_calls(&nvml_calls), ["set_ready_state(true)"]);
    let recs = records(&lines);
    let order = events(&recs);
    let at = |pair: (&str, &str)| {
        order
            .iter()
            .position(|p| p.0 == pair.0 && p.1 == pair.1)
            .unwrap_or_else(|| panic!("no {pair:?} in {order:?}"))
    };
    assert!(at(("perimeter", "ok")) < at(("gpu", "ok")));
    assert!(at(("gpu", "ok")) < at(("measure", "begin")));
    assert!(at(("unlock", "ok")) < at(("gpu", "ready")));
    assert!(at(("gpu", "ready")) < at(("allowlist", "begin")));
    // The GPU's facts are a measurement event (extended before logged), after the perimeter
    // ruleset and before the policy, and in the audit record.
    let kinds: Vec<EventKind> = ready.event_log.events().iter().map(|e| e.kind).collect();
    assert_eq!(
        &kinds[..3],
        [EventKind::Ruleset, EventKind::Gpu, EventKind::Policy]
    );
    let gpu_event = &ready.event_log.events()[1];
    assert_eq!(
        gpu_event.digest,
        Digest::of(gpu_event.description.as_bytes())
    );
    let ok = &recs[at(("gpu", "ok"))]["details"]["devices"][0];
    assert_eq!(
        ok["facts"]["uuid"],
        "GPU-5e1f0000-0000-4000-8000-000000000001"
    );
    assert_eq!(ok["facts"]["driver_version"], "550.90.07");
    assert!(ok["facts"]["fwid"]
        .as_str()
        .unwrap()
        .starts_with("f5c384ae"));
    assert_eq!(ok["event"]["kind"], "gpu");
    let ready_rec = &recs[at(("gpu", "ready"))]["details"];
    assert_eq!(ready_rec["ready"], true);
}

#[test]
fn a_gpu_out_of_cc_mode_stops_the_boot_before_anything_is_measured_or_asked_for() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let mut broker = FakeBroker::new();
    let (gpus, nvml_calls) = sim_gpus(|nvml| nvml.cc.cc_feature = false);
    broker.gpus = Some(gpus);
    let error = prepare_with_broker(&fixture, &sys, &mut broker, &audit).unwrap_err();
    let text = chain(&error);
    assert!(
        text.contains("GPU precheck ([attestation.gpu])")
            && text.contains("GPU 0 (GPU-5e1f0000-0000-4000-8000-000000000001, hopper): confidential computing is off"),
        "{text}"
    );
    assert_eq!(broker.calls, ["device_precheck"]);
    assert!(ready_calls(&nvml_calls).is_empty());
    let order = events(&records(&lines));
    assert!(order.contains(&("gpu".to_string(), "failed".to_string())));
    assert!(!order.contains(&("measure".to_string(), "begin".to_string())));
}

#[test]
fn a_refused_attestation_never_sets_the_gpus_ready() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, _lines) = memory_audit();
    let mut broker = FakeBroker::new();
    broker.attest_ok = false;
    let (gpus, nvml_calls) = sim_gpus(|_| {});
    broker.gpus = Some(gpus);
    prepare_with_broker(&fixture, &sys, &mut broker, &audit).unwrap_err();
    assert!(ready_calls(&nvml_calls).is_empty());
    // The failed boot's shutdown clears it anyway (fail closed).
    let mut life = life(&sys, &audit);
    life.checkpointer = Some(&mut broker);
    let error = BootError::NotLaunched;
    fail(&mut life, FailureAction::Poweroff, &error, &EventLog::new());
    assert_eq!(ready_calls(&nvml_calls), ["set_ready_state(false)"]);
}

#[test]
fn the_gpus_ready_state_is_cleared_before_power_off_after_a_failed_launch() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let mut broker = FakeBroker::new();
    let (gpus, nvml_calls) = sim_gpus(|_| {});
    broker.gpus = Some(gpus);
    let ready = prepare_with_broker(&fixture, &sys, &mut broker, &audit).unwrap();
    let mut launcher = FakeLauncher::new(0);
    launcher.fail = true;
    let mut life = life(&sys, &audit);
    life.checkpointer = Some(&mut broker);
    let shutdown = run_init(&ready, &launcher, &mut life, FailureAction::Poweroff);
    assert_eq!(shutdown.code, 1);
    assert_eq!(
        ready_calls(&nvml_calls),
        ["set_ready_state(true)", "set_ready_state(false)"]
    );
    let recs = records(&lines);
    let order = events(&recs);
    let not_ready = order
        .iter()
        .position(|p| p.0 == "gpu" && p.1 == "not_ready")
        .unwrap();
    let closing = order
        .iter()
        .position(|p| p.0 == "shutdown" && p.1 == "poweroff")
        .unwrap();
    assert!(not_ready < closing, "{order:?}");
    assert!(order[..not_ready].contains(&("launch".to_string(), "failed".to_string())));
    assert_eq!(recs[not_ready]["details"]["ready"], false);
    assert_eq!(recs[not_ready]["details"]["was_set_by_cvm_warden"], true);
}

#[test]
fn a_failure_to_set_the_gpus_ready_stops_the_boot() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let mut broker = FakeBroker::new();
    let (gpus, _calls) = sim_gpus(|nvml| nvml.fail_on = Some("set_ready_state(true)".into()));
    broker.gpus = Some(gpus);
    let error = prepare_with_broker(&fixture, &sys, &mut broker, &audit).unwrap_err();
    assert!(
        chain(&error).contains("setting the GPUs ready (nvmlSystemSetConfComputeGpusReadyState)"),
        "{}",
        chain(&error)
    );
    let order = events(&records(&lines));
    assert!(order.contains(&("gpu".to_string(), "ready_failed".to_string())));
    assert!(!order.contains(&("allowlist".to_string(), "begin".to_string())));
}

#[test]
fn a_simulated_gpu_or_allowed_devtools_make_every_record_insecure() {
    let fixture = Fixture::new();
    let policy = |gpu: &str| {
        let text = broker_policy(&fixture)
            .replace("attestation = { tee = \"sample\", kbs = \"http://127.0.0.1:9\", insecure_sample = true, insecure_http = true }",
                &format!("[attestation]\ntee = \"tpm\"\nkbs = \"http://127.0.0.1:9\"\ninsecure_http = true\n\n[attestation.gpu]\n{gpu}\n"));
        // The workload table follows the attestation table: move the attestation last.
        let (attestation, rest) = text.split_at(text.find("[workload]").unwrap());
        let text = format!("{rest}\n{attestation}");
        load(&text)
    };
    assert!(!wiring::insecure(&policy("")));
    assert!(wiring::insecure(&policy("allow_devtools = true")));
    assert!(wiring::insecure(&policy(
        "simulate = \"/etc/cvm-warden/nvidia-sim/gpu.json\""
    )));
}

// ---- continuous trust: re-attestation while the workload runs ----

/// A scripted [`Reattester`] (and checkpointer): answers from its script, then affirms.
struct ScriptedReattester {
    inner: RecordingCheckpointer,
    script: std::collections::VecDeque<Result<Reattested, ReattestError>>,
    resources: Vec<Option<String>>,
    trust_lost: u32,
}

impl ScriptedReattester {
    fn new(script: Vec<Result<Reattested, ReattestError>>) -> ScriptedReattester {
        ScriptedReattester {
            inner: RecordingCheckpointer::new(),
            script: script.into(),
            resources: Vec::new(),
            trust_lost: 0,
        }
    }
}

fn affirmed() -> Result<Reattested, ReattestError> {
    Ok(Reattested {
        exchange: json!({
            "broker": "https://kbs.example", "tee": "sample", "insecure": true,
            "nonce": "bm9uY2Uy", "tee_pubkey": {"kty": "EC"}, "additional_evidence": "",
            "report_data": "00", "evidence": {}, "claims": {}, "status": "affirming",
        }),
        resource: Some(json!({ "resource": "kbs:///default/keys/liveness", "bytes": 32 })),
    })
}

fn refused(why: &str) -> Result<Reattested, ReattestError> {
    Err(ReattestError::Refused(why.to_owned().into()))
}

fn unreachable() -> Result<Reattested, ReattestError> {
    Err(ReattestError::Unreachable(
        "cannot reach the key broker at https://kbs.example (auth call, 5 tries in 120s)".into(),
    ))
}

impl Checkpointer for ScriptedReattester {
    fn describe(&self) -> Value {
        self.inner.describe()
    }

    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, stage::BrokerError> {
        self.inner.checkpoint(binding)
    }

    fn reattester(&mut self) -> Option<&mut dyn Reattester> {
        Some(self)
    }
}

impl Reattester for ScriptedReattester {
    fn reattest(
        &mut self,
        resource: Option<&crate::policy::ResourceUri>,
        attempt: &mut dyn FnMut(Value),
    ) -> Result<Reattested, ReattestError> {
        self.resources.push(resource.map(ToString::to_string));
        attempt(json!({ "call": "attest", "try": 1, "outcome": "HTTP 200" }));
        self.script.pop_front().unwrap_or_else(affirmed)
    }

    fn trust_lost(&mut self) -> Value {
        self.trust_lost += 1;
        json!({ "devices": ["gpu0"], "ready": false })
    }
}

/// What one supervised run with re-attestation left behind.
struct ReattestRun {
    recs: Vec<Value>,
    sys: FakeSys,
    volumes: crate::volume::FakeVolumes,
    reattester: ScriptedReattester,
    shutdown: Shutdown,
    /// Fake seconds of each re-attestation.
    at: Vec<u64>,
    /// The intervals the supervisor was given.
    intervals: Vec<std::time::Duration>,
    /// Index of the first record after the boot.
    start: usize,
}

/// A boot with a secret and a volume, then the workload "runs" for `run_for` seconds of fake
/// time with re-attestation every `interval` s (`grace` s) answering from `script`.
fn reattest_run(
    interval: u64,
    grace: u64,
    run_for: u64,
    script: Vec<Result<Reattested, ReattestError>>,
) -> ReattestRun {
    use crate::volume::{DeviceState, FakeVolumes};
    let fixture = Fixture::new();
    let sys = FakeSys::new().with_mounted(["/workspace"]);
    let (audit, lines) = memory_audit();
    let mut broker = FakeBroker::new();
    let volumes = FakeVolumes::new().with_device("/dev/vdb", DeviceState::Blank);
    let mut ready = prepare_with(
        &volume_policy(&fixture),
        &fixture,
        &sys,
        &mut broker,
        &volumes,
        &audit,
    )
    .unwrap();
    let stage::attest::Plan::Broker { reattest, .. } = &mut ready.plan.attest else {
        panic!("a broker policy");
    };
    // The policy's defaults, as `plan` shows them.
    assert_eq!((reattest.interval_secs, reattest.grace_secs), (600, 300));
    reattest.interval_secs = interval;
    reattest.grace_secs = grace;
    reattest.resource =
        Some(crate::policy::ResourceUri::parse("kbs:///default/keys/liveness").unwrap());
    let start = records(&lines).len();
    let mut reattester = ScriptedReattester::new(script);
    let mut launcher = FakeLauncher::new(0);
    launcher.run_for = Some(std::time::Duration::from_secs(run_for));
    let shutdown = {
        let mut life = Lifecycle {
            sys: &sys,
            audit: &audit,
            volumes: &volumes,
            checkpointer: Some(&mut reattester),
            checkpoint_interval: None,
            audit_file: None,
            stop_workload: no_stop,
            watch_power_button: false,
        };
        run_init(&ready, &launcher, &mut life, FailureAction::Poweroff)
    };
    let at = launcher
        .runs
        .borrow()
        .iter()
        .map(|(_, t)| t.as_secs())
        .collect();
    let intervals = launcher.intervals.borrow().clone();
    ReattestRun {
        recs: records(&lines),
        sys,
        volumes,
        reattester,
        shutdown,
        at,
        intervals,
        start,
    }
}

impl ReattestRun {
    fn tail(&self) -> Vec<(String, String)> {
        events(&self.recs)
            .split_off(self.start)
            .into_iter()
            .filter(|(stage, event)| stage != "attest" || event != "reattest_try")
            .collect()
    }

    fn find(&self, event: &str) -> &Value {
        self.recs
            .iter()
            .find(|r| r["event"] == event)
            .unwrap_or_else(|| panic!("no {event} record"))
    }

    fn secrets_and_volumes_gone(&self) -> bool {
        !self
            .sys
            .mounted()
            .contains(&PathBuf::from("/run/cvm-warden/secrets"))
            && !self.sys.mounted().contains(&PathBuf::from("/workspace"))
            && self.volumes.mappings().is_empty()
    }
}

#[test]
fn reattestation_runs_every_interval_audited_with_a_checkpoint_right_after_each() {
    let run = reattest_run(600, 300, 1800, vec![]);
    assert_eq!(run.intervals, [std::time::Duration::from_secs(600)]);
    assert_eq!(run.at, [600, 1200, 1800]);
    assert_eq!(
        run.tail(),
        pairs(&[
            ("launch", "started"),
            ("audit", "checkpoint"),
            ("attest", "reattested"),
            ("attest", "reattest_resource"),
            ("audit", "checkpoint"),
            ("attest", "reattested"),
            ("attest", "reattest_resource"),
            ("audit", "checkpoint"),
            ("attest", "reattested"),
            ("attest", "reattest_resource"),
            ("audit", "checkpoint"),
            ("launch", "exited"),
            ("launch", "workload_done"),
            ("shutdown", "poweroff"),
            ("audit", "checkpoint"),
        ])
    );
    assert_eq!(run.shutdown.code, 0);
    assert_eq!(
        run.reattester.resources,
        vec![Some("kbs:///default/keys/liveness".to_owned()); 3]
    );
    // Each try recorded with its round; the exchange in the attest stage's record type.
    let tries: Vec<&Value> = run
        .recs
        .iter()
        .filter(|r| r["event"] == "reattest_try")
        .collect();
    assert_eq!(tries.len(), 3);
    assert_eq!(tries[2]["details"]["round"], 3);
    let reattested = run.find("reattested");
    let details: cvm_warden_verify::schema::AttestedDetails =
        serde_json::from_value(reattested["details"].clone()).unwrap();
    assert_eq!(details.exchange.nonce, "bm9uY2Uy");
    assert_eq!(details.broker, "http://127.0.0.1:9");
    // The checkpoint binds the records of the re-attestation.
    let i = run
        .recs
        .iter()
        .position(|r| r["event"] == "checkpoint" && r["details"]["kind"] == "reattest")
        .unwrap();
    assert_binds_previous(&run.recs, i, "reattest");
    assert_eq!(run.recs[i - 2]["event"], "reattested");
    assert!(!run.secrets_and_volumes_gone());
    assert_eq!(run.reattester.trust_lost, 0);
}

#[test]
fn a_refused_reattestation_stops_the_workload_removes_secrets_and_volumes_and_powers_off() {
    let run = reattest_run(
        600,
        300,
        3600,
        vec![
            affirmed(),
            refused("the key broker at https://kbs.example rejected the tpm evidence (PolicyDeny)"),
        ],
    );
    assert_eq!(run.at, [600, 1200]);
    assert_eq!(
        run.tail(),
        pairs(&[
            ("launch", "started"),
            ("audit", "checkpoint"),
            ("attest", "reattested"),
            ("attest", "reattest_resource"),
            ("audit", "checkpoint"),
            ("attest", "reattest_failed"),
            ("launch", "stopping"),
            ("launch", "exited"),
            ("launch", "workload_done"),
            ("launch", "cleanup"),
            ("attest", "trust_lost"),
            ("shutdown", "poweroff"),
            ("audit", "checkpoint"),
        ])
    );
    let failed = &run.find("reattest_failed")["details"];
    assert_eq!(failed["kind"], "refused");
    assert_eq!(failed["round"], 2);
    assert!(
        failed["error"].as_str().unwrap().contains("PolicyDeny"),
        "{failed}"
    );
    assert!(run.secrets_and_volumes_gone());
    assert_eq!(run.reattester.trust_lost, 1);
    assert_eq!(
        run.find("trust_lost")["details"]["cleared"],
        json!({ "devices": ["gpu0"], "ready": false })
    );
    let closing = &run.find("poweroff")["details"];
    assert_eq!(run.recs.last().unwrap()["details"]["kind"], "closing");
    assert_eq!(closing["code"], 143);
    assert!(closing["reason"]
        .as_str()
        .unwrap()
        .starts_with("trust lost (refused): the key broker refused the re-attestation"));
    assert_eq!(run.shutdown.code, 143);
    assert_eq!(run.shutdown.action, FailureAction::Poweroff);
}

#[test]
fn an_unreachable_broker_is_retried_within_the_grace_then_the_schedule_goes_on() {
    let run = reattest_run(
        600,
        300,
        1400,
        vec![unreachable(), unreachable(), affirmed()],
    );
    // A quarter of the grace between tries, then the interval from the success.
    assert_eq!(run.at, [600, 675, 750, 1350]);
    let tail = run.tail();
    assert_eq!(
        tail[..7],
        pairs(&[
            ("launch", "started"),
            ("audit", "checkpoint"),
            ("attest", "reattest_unreachable"),
            ("attest", "reattest_unreachable"),
            ("attest", "reattested"),
            ("attest", "reattest_resource"),
            ("audit", "checkpoint"),
        ])
    );
    let second = run
        .recs
        .iter()
        .filter(|r| r["event"] == "reattest_unreachable")
        .nth(1)
        .unwrap();
    assert_eq!(second["details"]["try"], 2);
    assert_eq!(second["details"]["unreachable_ms"], 75_000);
    assert_eq!(second["details"]["retry_in_ms"], 75_000);
    assert!(!tail.iter().any(|(_, e)| e == "reattest_failed"));
    assert_eq!(run.shutdown.code, 0);
    assert!(!run.secrets_and_volumes_gone());
}

#[test]
fn an_unreachable_broker_past_the_grace_stops_the_workload() {
    let run = reattest_run(600, 300, 3600, (0..10).map(|_| unreachable()).collect());
    // Bounded: tries at 0, 75, 150, 225 and 300 s of the streak, then the stop.
    assert_eq!(run.at, [600, 675, 750, 825, 900]);
    let failed = &run.find("reattest_failed")["details"];
    assert_eq!(failed["kind"], "unreachable");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("stayed unreachable for 300s (5 tries), not shorter than attestation.reattest_grace (300s)"),
        "{error}"
    );
    assert!(run.secrets_and_volumes_gone());
    assert_eq!(run.shutdown.code, 143);
    assert!(run.find("poweroff")["details"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("trust lost (unreachable)"));
}

#[test]
fn a_zero_grace_stops_at_the_first_unreachable_broker() {
    let run = reattest_run(600, 0, 3600, vec![unreachable()]);
    assert_eq!(run.at, [600]);
    assert_eq!(
        run.find("reattest_failed")["details"]["kind"],
        "unreachable"
    );
}

#[test]
fn a_tee_that_stops_answering_at_reattestation_stops_the_workload() {
    let run = reattest_run(
        600,
        300,
        3600,
        vec![Err(ReattestError::Tee(
            "cannot produce snp evidence for the key broker: /dev/sev-guest: EIO".into(),
        ))],
    );
    assert_eq!(run.at, [600]);
    let failed = &run.find("reattest_failed")["details"];
    assert_eq!(failed["kind"], "tee");
    assert!(failed["error"].as_str().unwrap().contains("EIO"));
    assert!(run.secrets_and_volumes_gone());
    assert_eq!(run.reattester.trust_lost, 1);
    assert!(run.shutdown.code != 0);
}

#[test]
fn reattest_interval_zero_runs_none() {
    let run = reattest_run(0, 0, 3600, vec![refused("never asked")]);
    assert!(run.intervals.is_empty());
    assert!(run.at.is_empty());
    assert!(run.reattester.resources.is_empty());
    assert_eq!(run.shutdown.code, 0);
}

#[test]
fn reattestation_and_periodic_checkpoints_keep_their_own_schedules() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let mut broker = FakeBroker::new();
    let ready = prepare_with(
        &broker_policy(&fixture),
        &fixture,
        &sys,
        &mut broker,
        &crate::volume::FakeVolumes::new(),
        &audit,
    )
    .unwrap();
    let mut reattester = ScriptedReattester::new(vec![]);
    let mut launcher = FakeLauncher::new(0);
    launcher.run_for = Some(std::time::Duration::from_secs(1200));
    let mut life = life(&sys, &audit);
    life.checkpointer = Some(&mut reattester);
    life.checkpoint_interval = Some(std::time::Duration::from_secs(300));
    run_init(&ready, &launcher, &mut life, FailureAction::Poweroff);
    let kinds: Vec<String> = records(&lines)
        .iter()
        .filter(|r| r["event"] == "checkpoint")
        .map(|r| r["details"]["kind"].as_str().unwrap().to_owned())
        .collect();
    // Checkpoints at 300, 600, 900, 1200 s; re-attestation (default 600 s) at 600, 1200 s.
    assert_eq!(
        kinds,
        [
            "launch", "periodic", "periodic", "reattest", "periodic", "periodic", "reattest",
            "closing"
        ]
    );
}

#[test]
fn the_unit_shape_records_that_it_cannot_reattest_and_refuses_an_explicit_interval() {
    let fixture = Fixture::new();
    let sys = FakeSys::new();
    let (audit, lines) = memory_audit();
    let mut broker = FakeBroker::new();
    let ready = prepare_with(
        &broker_policy(&fixture),
        &fixture,
        &sys,
        &mut broker,
        &crate::volume::FakeVolumes::new(),
        &audit,
    )
    .unwrap();
    let launcher = FakeLauncher::new(0);
    run_unit(&ready, &launcher, &mut life(&sys, &audit));
    let recs = records(&lines);
    let i = recs
        .iter()
        .position(|r| r["event"] == "reattest_unavailable")
        .expect("attest/reattest_unavailable");
    assert_eq!(recs[i]["stage"], "attest");
    assert_eq!(recs[i]["details"]["interval_s"], 600);
    assert_eq!(recs[i + 1]["event"], "exec");
    // An explicit interval is refused when the unit's boot is planned.
    let text = broker_policy(&fixture).replace(
        "insecure_http = true }",
        "insecure_http = true, reattest_interval = \"5m\" }",
    );
    assert!(text.contains("reattest_interval"), "{text}");
    let loaded = parse(&text, None, &users()).unwrap();
    let facts = |shape| stage::Facts {
        cmdline_path: fixture.path("cmdline"),
        policy_digest: loaded.policy_digest,
        operator_digest: None,
        shape,
        sandbox: false,
    };
    let error = BootPlan::new(&loaded.policy, &facts(crate::lockdown::Shape::Systemd)).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("attestation.reattest_interval = \"300s\" in the systemd-unit shape"),
        "{error}"
    );
    assert!(BootPlan::new(&loaded.policy, &facts(crate::lockdown::Shape::Pid1)).is_ok());
    // "0" says so explicitly: accepted in both shapes.
    let off = parse(&text.replace("\"5m\"", "\"0\""), None, &users()).unwrap();
    assert!(BootPlan::new(&off.policy, &facts(crate::lockdown::Shape::Systemd)).is_ok());
}

/// The fake broker as the runner's checkpointer (as the real broker is one).
impl Checkpointer for FakeBroker {
    fn describe(&self) -> Value {
        stage::KeyBroker::describe(self)
    }

    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, stage::BrokerError> {
        stage::KeyBroker::checkpoint(self, binding)
    }

    fn set_devices_ready(&mut self, ready: bool) -> Result<Option<Value>, stage::BrokerError> {
        stage::KeyBroker::set_devices_ready(self, ready)
    }
}
