//! The kernel modules a policy needs, derived from its features ([`module_plan`], pure, in
//! `cvm-warden plan`), and loading them with their dependencies ([`load_planned`]): an
//! initramfs has no modprobe and no udev, so the boot resolves every module through
//! `/lib/modules/<release>/modules.dep` itself and loads the files with `finit_module`,
//! dependencies first, before the stages that need them.
//!
//! What needs what (soft dependencies such as `libcrc32c` → a `crc32c` implementation are not
//! in `modules.dep`, so they are listed here):
//! - `[network]`: `nf_tables`, `nft_ct` (every rule matches or sets conntrack state and
//!   marks; `nf_conntrack` comes with it), `nf_conntrack`, and `crc32c_generic` (the crc32c
//!   that `libcrc32c`, under `nf_conntrack`, asks the crypto API for);
//! - every `[[volume]]`: `dm_crypt` with the `xts` and `ecb` templates (`aes-xts-plain64`;
//!   without `ecb`: "Error allocating crypto tfm (-ENOENT)"), `af_alg` and `algif_skcipher`
//!   (libcryptsetup's keyslot cipher), `ext4` and `crc32c_generic` (its metadata checksums);
//!   with `integrity`: `dm_integrity` and `authenc`;
//! - `tee = "tpm"` or `"az-snp-vtpm"`: `tpm_tis` or `tpm_crb` (either serves);
//!   `tee = "snp"`: `sev_guest`; `tee = "tdx"`: `tdx_guest` and `configfs`;
//! - `kernel.modules` and `lockdown.modules`: as listed.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Serialize;

use super::apply::{module_index, module_loaded, read_optional};
use super::effects::LockdownSys;
use super::error::LockdownError;
use super::kmod::{compression, module_name};
use super::Paths;
use crate::policy::{Attestation, Policy, Tee};

/// Modules `[network]` needs (the rendered rulesets use only `ct` beyond the core).
pub const NETWORK_MODULES: [&str; 4] = ["nf_tables", "nf_conntrack", "nft_ct", "crc32c_generic"];
/// Modules every `[[volume]]` needs.
pub const VOLUME_MODULES: [&str; 7] = [
    "dm_crypt",
    "xts",
    "ecb",
    "af_alg",
    "algif_skcipher",
    "ext4",
    "crc32c_generic",
];
/// Modules a `[[volume]]` with `integrity` needs in addition.
pub const INTEGRITY_MODULES: [&str; 2] = ["dm_integrity", "authenc"];
/// TPM drivers: either serves.
pub const TPM_MODULES: [&str; 2] = ["tpm_tis", "tpm_crb"];

/// One module the boot loads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedModule {
    /// The module's name (`-` written as `_`).
    pub name: String,
    /// The features that need it, e.g. `[network]`, `kernel.modules`.
    pub needed_by: Vec<String>,
    /// Modules any one of which serves instead (the TPM drivers): this one may then be
    /// absent.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub or: Vec<String>,
}

/// Every module the policy needs, in load order; printed by `cvm-warden plan` as
/// `"modules": {"load": [{"name", "needed_by", "or"?}, …]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ModulePlan {
    /// The modules (dependencies are resolved when loading).
    #[serde(rename = "load")]
    pub modules: Vec<PlannedModule>,
}

impl ModulePlan {
    fn add(&mut self, module: &str, feature: &str, or: &[&str]) {
        let name = module_name(module);
        match self.modules.iter_mut().find(|m| m.name == name) {
            Some(planned) => {
                if !planned.needed_by.iter().any(|f| f == feature) {
                    planned.needed_by.push(feature.to_owned());
                }
            }
            None => self.modules.push(PlannedModule {
                name,
                needed_by: vec![feature.to_owned()],
                or: or.iter().map(|m| module_name(m)).collect(),
            }),
        }
    }

    /// Whether nothing is to be loaded.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}

/// The modules `policy` needs (see the module documentation). Pure.
pub fn module_plan(policy: &Policy) -> ModulePlan {
    let mut plan = ModulePlan::default();
    for module in &policy.kernel.modules {
        plan.add(module, "kernel.modules", &[]);
    }
    if let Some(lockdown) = &policy.lockdown {
        for module in &lockdown.modules {
            plan.add(module, "lockdown.modules", &[]);
        }
    }
    if let Attestation::Broker { tee, .. } = &policy.attestation {
        let feature = format!("attestation.tee = {:?}", tee.as_str());
        match tee {
            Tee::Tpm | Tee::AzSnpVtpm => {
                for (i, module) in TPM_MODULES.iter().enumerate() {
                    let others: Vec<&str> = TPM_MODULES
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, m)| *m)
                        .collect();
                    plan.add(module, &feature, &others);
                }
            }
            Tee::Snp => plan.add("sev-guest", &feature, &[]),
            Tee::Tdx => {
                plan.add("tdx-guest", &feature, &[]);
                plan.add("configfs", &feature, &[]);
            }
            Tee::Sample => {}
        }
    }
    if policy.network.is_some() {
        for module in NETWORK_MODULES {
            plan.add(module, "[network]", &[]);
        }
    }
    for volume in &policy.volumes {
        let feature = format!("[[volume]] {}", volume.name);
        for module in VOLUME_MODULES {
            plan.add(module, &feature, &[]);
        }
        if volume.integrity.is_some() {
            let feature = format!("[[volume]] {} integrity", volume.name);
            for module in INTEGRITY_MODULES {
                plan.add(module, &feature, &[]);
            }
        }
    }
    plan
}

/// What [`load_planned`] found and did; the details of the `boot/modules_loaded` record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ModuleReport {
    /// The running kernel's release.
    pub release: String,
    /// Where the modules were looked up (`/lib/modules/<release>`).
    pub modules_dir: PathBuf,
    /// Modules loaded now, dependencies included, in load order.
    pub loaded: Vec<String>,
    /// Planned modules that were loaded already (`/sys/module/<name>`).
    pub already_loaded: Vec<String>,
    /// Planned modules built into the kernel (`modules.builtin`).
    pub built_in: Vec<String>,
    /// Planned modules that are absent while another that serves instead is present.
    pub absent_served: Vec<String>,
}

/// How one wanted module was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found {
    /// `/sys/module/<name>` exists.
    Loaded,
    /// In `modules.builtin`.
    BuiltIn,
    /// Loaded now; the module's own file.
    LoadedNow(PathBuf),
    /// Absent, but one of its alternatives serves.
    Served,
}

/// One module to load: its name, what needs it (for the error), and its alternatives.
pub(crate) struct Wanted<'a> {
    pub name: &'a str,
    pub needed_by: &'a str,
    pub or: &'a [String],
}

/// Resolves every wanted module before loading any (a missing one stops with nothing
/// loaded), then loads the files in dependency order. Returns how each wanted module was
/// found (same order) and the names loaded now.
pub(crate) fn resolve_and_load(
    wanted: &[Wanted<'_>],
    sys: &dyn LockdownSys,
    paths: &Paths,
) -> Result<(Vec<Found>, Vec<String>, String), LockdownError> {
    let (release, index) = module_index(sys, paths)?;
    if wanted.is_empty() {
        return Ok((Vec::new(), Vec::new(), release));
    }
    let dir = paths.lib_modules.join(&release);
    // An alternative serves when it is there already, or when it is wanted too (so loaded
    // below) and can be loaded.
    let serves = |name: &str| {
        module_loaded(paths, name)
            || index.is_builtin(name)
            || (wanted
                .iter()
                .any(|w| module_name(w.name) == module_name(name))
                && index
                    .load_order(name)
                    .is_some_and(|order| order.iter().all(|(_, path)| path.exists())))
    };
    let mut found: Vec<Option<Found>> = Vec::with_capacity(wanted.len());
    let mut work: Vec<(usize, Vec<(String, PathBuf)>)> = Vec::new();
    // Soft dependencies are optional unless a wanted module needs them through modules.dep
    // or is one: a missing optional file is left out, a failing optional load is skipped.
    let soft = index.soft_dependencies();
    let mut hard: BTreeSet<String> = BTreeSet::new();
    for module in wanted {
        hard.extend(index.hard_names(module.name));
    }
    let optional: BTreeSet<String> = soft.difference(&hard).cloned().collect();
    for (i, module) in wanted.iter().enumerate() {
        if module_loaded(paths, module.name) {
            found.push(Some(Found::Loaded));
        } else if index.is_builtin(module.name) {
            found.push(Some(Found::BuiltIn));
        } else if let Some(mut order) = index.load_order(module.name) {
            order.retain(|(name, path)| path.exists() || !optional.contains(name));
            if let Some((dep_name, path)) = order.iter().find(|(_, path)| !path.exists()) {
                if module.or.iter().any(|m| serves(m)) {
                    found.push(Some(Found::Served));
                    continue;
                }
                return Err(LockdownError::ModuleFileMissing {
                    module: dep_name.clone(),
                    needed_by: module.needed_by.to_owned(),
                    path: path.clone(),
                });
            }
            found.push(None);
            work.push((i, order));
        } else if module.or.iter().any(|m| serves(m)) {
            found.push(Some(Found::Served));
        } else {
            return Err(LockdownError::ModuleNotFound {
                module: module_name(module.name),
                needed_by: module.needed_by.to_owned(),
                release: release.clone(),
                modules_dep: dir.join("modules.dep"),
            });
        }
    }
    let mut loaded_now: Vec<String> = Vec::new();
    if !work.is_empty() {
        load_files(&work, sys, paths, &release, &optional, &mut loaded_now)?;
    }
    for (i, order) in work {
        let own = order
            .last()
            .map(|(_, path)| path.clone())
            .unwrap_or_default();
        found[i] = Some(Found::LoadedNow(own));
    }
    Ok((
        found
            .into_iter()
            .map(|f| f.unwrap_or(Found::Served))
            .collect(),
        loaded_now,
        release,
    ))
}

fn load_files(
    work: &[(usize, Vec<(String, PathBuf)>)],
    sys: &dyn LockdownSys,
    paths: &Paths,
    release: &str,
    optional: &BTreeSet<String>,
    loaded_now: &mut Vec<String>,
) -> Result<(), LockdownError> {
    let disabled = paths.sysctl("kernel.modules_disabled");
    if read_optional(&disabled, "kernel.modules_disabled")?
        .as_deref()
        .map(str::trim)
        == Some("1")
    {
        return Err(LockdownError::ModulesAlreadyDisabled {
            modules: work
                .iter()
                .flat_map(|(_, order)| order.iter().map(|(name, _)| name.clone()))
                .filter(|name| !module_loaded(paths, name))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        });
    }
    let kernel_compression = read_optional(&paths.sys_module.join("compression"), "compression")?
        .map(|t| t.trim().to_owned());
    for (_, order) in work {
        for (name, path) in order {
            if loaded_now.contains(name) || module_loaded(paths, name) {
                continue;
            }
            let compressed = match compression(path) {
                None => false,
                Some(format) if kernel_compression.as_deref() == Some(format) => true,
                Some(format) => {
                    return Err(LockdownError::ModuleCompression {
                        module: name.clone(),
                        path: path.clone(),
                        format: format.to_owned(),
                        kernel: kernel_compression,
                    })
                }
            };
            match sys.finit_module(path, compressed) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                // An optional soft dependency that does not load (wrong CPU): skipped, as
                // modprobe does; what needed it fails by itself if nothing else serves.
                Err(_) if optional.contains(name) => continue,
                Err(source) => {
                    return Err(LockdownError::ModuleLoad {
                        module: name.clone(),
                        path: path.clone(),
                        release: release.to_owned(),
                        compressed,
                        source,
                    })
                }
            }
            loaded_now.push(name.clone());
        }
    }
    Ok(())
}

/// Loads every module of `plan` that is neither loaded nor built in, with its dependencies,
/// dependencies first. A module that is needed but neither loaded, built in nor in
/// `modules.dep` (and that no alternative serves) stops it before anything is loaded,
/// naming the module, the feature that needs it and the index searched.
pub fn load_planned(
    plan: &ModulePlan,
    sys: &dyn LockdownSys,
    paths: &Paths,
) -> Result<ModuleReport, LockdownError> {
    let needed_by: Vec<String> = plan
        .modules
        .iter()
        .map(|m| m.needed_by.join(", "))
        .collect();
    let wanted: Vec<Wanted<'_>> = plan
        .modules
        .iter()
        .zip(&needed_by)
        .map(|(m, needed_by)| Wanted {
            name: &m.name,
            needed_by,
            or: &m.or,
        })
        .collect();
    let (found, loaded, release) = resolve_and_load(&wanted, sys, paths)?;
    let mut report = ModuleReport {
        modules_dir: paths.lib_modules.join(&release),
        release,
        loaded,
        ..ModuleReport::default()
    };
    for (module, found) in plan.modules.iter().zip(found) {
        let name = module.name.clone();
        match found {
            Found::Loaded => report.already_loaded.push(name),
            Found::BuiltIn => report.built_in.push(name),
            Found::Served => report.absent_served.push(name),
            Found::LoadedNow(_) => {}
        }
    }
    Ok(report)
}
