//! A probe of the machine the gateway runs on: CPUs, the vector extensions inference kernels
//! use, and memory, as limited by cgroups.
//!
//! The gateway derives defaults from it (inference threads, which llama.cpp CPU backend variant
//! can run, whether a model fits in memory) and reports it on the admin API. The parsing of
//! `/proc/cpuinfo`, `/proc/meminfo`, `/proc/self/status` and cgroup files is done by pure
//! functions over `&str`; [`probe`] only reads the files and calls them. Nothing here fails:
//! what cannot be read is `None`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

#[cfg(test)]
mod tests;

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HardwareProfile {
    /// CPUs this process may use: [`std::thread::available_parallelism`], which respects the
    /// affinity mask and cgroup CPU quotas.
    pub logical_cpus: usize,
    /// Distinct physical cores (unique `(physical id, core id)` in `/proc/cpuinfo`) among the
    /// CPUs this process may run on (`Cpus_allowed_list`); `None` when `/proc/cpuinfo` does not
    /// say (many ARM kernels, some VMs).
    pub physical_cores: Option<usize>,
    pub cpu_model: Option<String>,
    /// On x86: the extensions that matter to inference kernels, named as `/proc/cpuinfo` names
    /// them except where noted in [`X86_FEATURES`]; detected with `is_x86_feature_detected!`
    /// (which also checks that the OS saves the registers) where std supports the feature,
    /// from `/proc/cpuinfo` flags otherwise. Elsewhere: the `/proc/cpuinfo` feature list as is.
    pub cpu_features: Vec<String>,
    /// The highest x86-64 micro-architecture level (1 to 4) this CPU meets; `None` off x86-64.
    pub x86_64_level: Option<u8>,
    /// `/proc/meminfo` `MemTotal`, capped by the cgroup memory limit (v2 `memory.max`, v1
    /// `memory.limit_in_bytes`, of this process's cgroup and its ancestors) if lower.
    pub memory_total_bytes: Option<u64>,
    /// `/proc/meminfo` `MemAvailable`, capped by `memory_total_bytes`.
    pub memory_available_bytes: Option<u64>,
}

impl HardwareProfile {
    /// Safe default for llama.cpp inference threads: physical cores if known, else logical
    /// cpus, never above logical cpus, at least 1.
    ///
    /// Why physical cores: SMT siblings share one core's vector units and caches, and llama.cpp
    /// decode is bound by memory bandwidth and vector compute, so a second thread per core adds
    /// contention and synchronisation cost rather than throughput (llama.cpp's own default
    /// counts physical cores for the same reason). Never above logical CPUs, because a cgroup
    /// quota or affinity mask may allow fewer CPUs than there are cores, and oversubscribed
    /// threads stall each other at every barrier.
    pub fn default_inference_threads(&self) -> usize {
        let logical = self.logical_cpus.max(1);
        self.physical_cores
            .map_or(logical, |physical| physical.min(logical))
            .max(1)
    }
}

/// Probes the machine. Reads `/proc` and `/sys/fs/cgroup`; never fails.
pub fn probe() -> HardwareProfile {
    let logical_cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let cpuinfo = read("/proc/cpuinfo").map(|text| parse_cpuinfo(&text));
    let allowed_cpus = read("/proc/self/status").and_then(|text| parse_allowed_cpus(&text));
    let physical_cores = cpuinfo
        .as_ref()
        .and_then(|cpuinfo| count_physical_cores(cpuinfo, allowed_cpus.as_ref()));
    let cpu_model = cpuinfo.as_ref().and_then(|cpuinfo| cpuinfo.model.clone());
    let flags = cpuinfo.as_ref().map(|cpuinfo| cpuinfo.flags.as_slice());
    let (cpu_features, x86_64_level) = cpu_features(flags);
    let meminfo = read("/proc/meminfo").map_or_else(MemInfo::default, |text| parse_meminfo(&text));
    let cgroup_limits = read("/proc/self/cgroup")
        .map(|text| cgroup_memory_limits(&parse_proc_self_cgroup(&text)))
        .unwrap_or_default();
    let (memory_total_bytes, memory_available_bytes) = effective_memory(&meminfo, &cgroup_limits);
    HardwareProfile {
        logical_cpus,
        physical_cores,
        cpu_model,
        cpu_features,
        x86_64_level,
        memory_total_bytes,
        memory_available_bytes,
    }
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(path).ok()
}

/// What `/proc/cpuinfo` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CpuInfo {
    model: Option<String>,
    /// The first processor's feature flags (`flags` on x86, `Features` on ARM, `isa` on RISC-V).
    flags: Vec<String>,
    processors: Vec<Processor>,
}

/// One processor block of `/proc/cpuinfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Processor {
    index: Option<usize>,
    physical_id: Option<u32>,
    core_id: Option<u32>,
}

/// Keys that name the CPU model, in order of preference, across architectures.
const MODEL_KEYS: [&str; 6] = [
    "model name",
    "Model",
    "Hardware",
    "cpu model",
    "uarch",
    "cpu",
];
/// Keys that hold the feature flags, across architectures.
const FLAG_KEYS: [&str; 4] = ["flags", "Features", "features", "isa"];

fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut cpuinfo = CpuInfo::default();
    let mut model_rank = MODEL_KEYS.len();
    let mut current: Option<Processor> = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" => {
                cpuinfo.processors.extend(current.take());
                current = Some(Processor {
                    index: value.parse().ok(),
                    ..Processor::default()
                });
            }
            "physical id" => {
                if let Some(processor) = current.as_mut() {
                    processor.physical_id = value.parse().ok();
                }
            }
            "core id" => {
                if let Some(processor) = current.as_mut() {
                    processor.core_id = value.parse().ok();
                }
            }
            _ => {}
        }
        if let Some(rank) = MODEL_KEYS.iter().position(|candidate| *candidate == key)
            && rank < model_rank
            && !value.is_empty()
        {
            model_rank = rank;
            cpuinfo.model = Some(value.to_owned());
        }
        if FLAG_KEYS.contains(&key) && cpuinfo.flags.is_empty() {
            cpuinfo.flags = value.split_whitespace().map(str::to_owned).collect();
        }
    }
    cpuinfo.processors.extend(current);
    cpuinfo
}

/// Distinct `(physical id, core id)` pairs among the processors in `allowed` (all when `None`);
/// `None` when a counted processor lacks either id or none is counted.
fn count_physical_cores(cpuinfo: &CpuInfo, allowed: Option<&BTreeSet<usize>>) -> Option<usize> {
    let mut cores = BTreeSet::new();
    for processor in &cpuinfo.processors {
        let is_allowed = match (allowed, processor.index) {
            (None, _) => true,
            (Some(allowed), Some(index)) => allowed.contains(&index),
            (Some(_), None) => true,
        };
        if is_allowed {
            cores.insert((processor.physical_id?, processor.core_id?));
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// The `Cpus_allowed_list` of `/proc/self/status`.
fn parse_allowed_cpus(status: &str) -> Option<BTreeSet<usize>> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .and_then(|list| parse_cpu_list(list.trim()))
}

/// Upper bound on the CPUs a list may name, so a corrupt range cannot allocate without limit.
const CPU_LIST_CPUS_MAX: usize = 1 << 16;

/// A kernel CPU list such as `0-3,8,10-11`.
fn parse_cpu_list(list: &str) -> Option<BTreeSet<usize>> {
    let mut cpus = BTreeSet::new();
    for part in list
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        let (first, last): (usize, usize) = match part.split_once('-') {
            Some((first, last)) => (first.trim().parse().ok()?, last.trim().parse().ok()?),
            None => {
                let cpu = part.parse().ok()?;
                (cpu, cpu)
            }
        };
        if first > last || last >= CPU_LIST_CPUS_MAX {
            return None;
        }
        cpus.extend(first..=last);
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// An x86 feature: the name reported, the `/proc/cpuinfo` flag, and the name std's
/// `is_x86_feature_detected!` knows it by (`None` where std cannot detect it on stable).
#[derive(Debug, Clone, Copy)]
pub struct X86Feature {
    pub name: &'static str,
    pub cpuinfo_flag: &'static str,
    pub std_name: Option<&'static str>,
    /// Whether it is listed in [`HardwareProfile::cpu_features`] (the others only count
    /// towards [`HardwareProfile::x86_64_level`]).
    pub reported: bool,
}

const fn feature(
    name: &'static str,
    cpuinfo_flag: &'static str,
    std_name: Option<&'static str>,
) -> X86Feature {
    X86Feature {
        name,
        cpuinfo_flag,
        std_name,
        reported: true,
    }
}

const fn level_only(
    name: &'static str,
    cpuinfo_flag: &'static str,
    std_name: Option<&'static str>,
) -> X86Feature {
    X86Feature {
        name,
        cpuinfo_flag,
        std_name,
        reported: false,
    }
}

/// The x86 features probed. Reported names follow `/proc/cpuinfo` except `sse3` (`pni`),
/// `lzcnt` (`abm`), `avx512vnni`, `avx512bf16` and `avx512fp16` (`avx512_vnni`, ...).
pub const X86_FEATURES: [X86Feature; 30] = [
    level_only("cx16", "cx16", Some("cmpxchg16b")),
    level_only("lahf_lm", "lahf_lm", None),
    level_only("xsave", "xsave", Some("xsave")),
    feature("sse3", "pni", Some("sse3")),
    feature("ssse3", "ssse3", Some("ssse3")),
    feature("sse4.1", "sse4_1", Some("sse4.1")),
    feature("sse4.2", "sse4_2", Some("sse4.2")),
    feature("popcnt", "popcnt", Some("popcnt")),
    feature("avx", "avx", Some("avx")),
    feature("avx2", "avx2", Some("avx2")),
    feature("fma", "fma", Some("fma")),
    feature("f16c", "f16c", Some("f16c")),
    feature("bmi1", "bmi1", Some("bmi1")),
    feature("bmi2", "bmi2", Some("bmi2")),
    feature("lzcnt", "abm", Some("lzcnt")),
    feature("movbe", "movbe", Some("movbe")),
    feature("avx512f", "avx512f", Some("avx512f")),
    feature("avx512cd", "avx512cd", Some("avx512cd")),
    feature("avx512dq", "avx512dq", Some("avx512dq")),
    feature("avx512bw", "avx512bw", Some("avx512bw")),
    feature("avx512vl", "avx512vl", Some("avx512vl")),
    feature("avx512ifma", "avx512ifma", Some("avx512ifma")),
    feature("avx512vbmi", "avx512vbmi", Some("avx512vbmi")),
    feature("avx512vnni", "avx512_vnni", Some("avx512vnni")),
    feature("avx512bf16", "avx512_bf16", Some("avx512bf16")),
    feature("avx512fp16", "avx512_fp16", Some("avx512fp16")),
    feature("avx_vnni", "avx_vnni", Some("avxvnni")),
    feature("amx_tile", "amx_tile", None),
    feature("amx_int8", "amx_int8", None),
    feature("amx_bf16", "amx_bf16", None),
];

/// Features (by reported name) each x86-64 level adds, per the x86-64 psABI. Level 1 (the
/// baseline: cmov, cx8, fxsr, mmx, sse, sse2, ...) holds on every x86-64 CPU.
const X86_64_LEVEL_FEATURES: [(u8, &[&str]); 3] = [
    (
        2,
        &[
            "cx16", "lahf_lm", "popcnt", "sse3", "sse4.1", "sse4.2", "ssse3",
        ],
    ),
    (
        3,
        &[
            "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "lzcnt", "movbe", "xsave",
        ],
    ),
    (
        4,
        &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
    ),
];

/// The features and x86-64 level of this CPU; `cpuinfo_flags` is `None` when `/proc/cpuinfo`
/// could not be read.
fn cpu_features(cpuinfo_flags: Option<&[String]>) -> (Vec<String>, Option<u8>) {
    if !cfg!(any(target_arch = "x86_64", target_arch = "x86")) {
        return (
            cpuinfo_flags.map(<[String]>::to_vec).unwrap_or_default(),
            None,
        );
    }
    let present = x86_features_present(cpuinfo_flags, std_detects);
    let reported = X86_FEATURES
        .iter()
        .filter(|feature| feature.reported && present.contains(feature.name))
        .map(|feature| feature.name.to_owned())
        .collect();
    let level = cfg!(target_arch = "x86_64").then(|| x86_64_level(&present));
    (reported, level)
}

/// The reported names of the x86 features present: `detect` (std's detection) decides where it
/// answers, the `/proc/cpuinfo` flags otherwise. Without `/proc/cpuinfo`, `lahf_lm` (which std
/// cannot detect, and which every x86-64 CPU since 2006 has) counts as present.
fn x86_features_present(
    cpuinfo_flags: Option<&[String]>,
    detect: impl Fn(&str) -> Option<bool>,
) -> BTreeSet<&'static str> {
    X86_FEATURES
        .iter()
        .filter(|feature| {
            let detected = feature.std_name.and_then(&detect);
            match (detected, cpuinfo_flags) {
                (Some(detected), _) => detected,
                (None, Some(flags)) => flags.iter().any(|flag| flag == feature.cpuinfo_flag),
                (None, None) => feature.name == "lahf_lm",
            }
        })
        .map(|feature| feature.name)
        .collect()
}

/// The highest x86-64 level whose features (and those of the levels below) are all present.
fn x86_64_level(present: &BTreeSet<&str>) -> u8 {
    let mut level = 1;
    for (next, required) in X86_64_LEVEL_FEATURES {
        if !required.iter().all(|name| present.contains(name)) {
            break;
        }
        level = next;
    }
    level
}

/// std's run-time detection of an x86 feature (by std's name); `None` for names it does not
/// know, and off x86.
#[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
fn std_detects(std_name: &str) -> Option<bool> {
    Some(match std_name {
        "cmpxchg16b" => std::arch::is_x86_feature_detected!("cmpxchg16b"),
        "xsave" => std::arch::is_x86_feature_detected!("xsave"),
        "sse3" => std::arch::is_x86_feature_detected!("sse3"),
        "ssse3" => std::arch::is_x86_feature_detected!("ssse3"),
        "sse4.1" => std::arch::is_x86_feature_detected!("sse4.1"),
        "sse4.2" => std::arch::is_x86_feature_detected!("sse4.2"),
        "popcnt" => std::arch::is_x86_feature_detected!("popcnt"),
        "avx" => std::arch::is_x86_feature_detected!("avx"),
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        "fma" => std::arch::is_x86_feature_detected!("fma"),
        "f16c" => std::arch::is_x86_feature_detected!("f16c"),
        "bmi1" => std::arch::is_x86_feature_detected!("bmi1"),
        "bmi2" => std::arch::is_x86_feature_detected!("bmi2"),
        "lzcnt" => std::arch::is_x86_feature_detected!("lzcnt"),
        "movbe" => std::arch::is_x86_feature_detected!("movbe"),
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        "avx512cd" => std::arch::is_x86_feature_detected!("avx512cd"),
        "avx512dq" => std::arch::is_x86_feature_detected!("avx512dq"),
        "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
        "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
        "avx512ifma" => std::arch::is_x86_feature_detected!("avx512ifma"),
        "avx512vbmi" => std::arch::is_x86_feature_detected!("avx512vbmi"),
        "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
        "avx512bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
        "avx512fp16" => std::arch::is_x86_feature_detected!("avx512fp16"),
        "avxvnni" => std::arch::is_x86_feature_detected!("avxvnni"),
        _ => return None,
    })
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
fn std_detects(_std_name: &str) -> Option<bool> {
    None
}

/// What `/proc/meminfo` says, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct MemInfo {
    total_bytes: Option<u64>,
    available_bytes: Option<u64>,
}

fn parse_meminfo(text: &str) -> MemInfo {
    let mut meminfo = MemInfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "MemTotal" => &mut meminfo.total_bytes,
            "MemAvailable" => &mut meminfo.available_bytes,
            _ => continue,
        };
        *slot = parse_meminfo_amount(value);
    }
    meminfo
}

/// `16384 kB` (the kernel's kB are KiB) or a bare number of bytes.
fn parse_meminfo_amount(value: &str) -> Option<u64> {
    let mut words = value.split_whitespace();
    let number: u64 = words.next()?.parse().ok()?;
    match words.next() {
        None => Some(number),
        Some(unit) if unit.eq_ignore_ascii_case("kb") => number.checked_mul(1024),
        Some(_) => None,
    }
}

/// This process's cgroup paths, from `/proc/self/cgroup`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CgroupMembership {
    /// The cgroup v2 (unified) path: the `0::<path>` line.
    unified: Option<String>,
    /// The cgroup v1 memory controller's path: the `<n>:memory:<path>` line (or a line whose
    /// controller list includes `memory`).
    memory_v1: Option<String>,
}

fn parse_proc_self_cgroup(text: &str) -> CgroupMembership {
    let mut membership = CgroupMembership::default();
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            membership.unified = Some(path.to_owned());
        } else if controllers
            .split(',')
            .any(|controller| controller == "memory")
        {
            membership.memory_v1 = Some(path.to_owned());
        }
    }
    membership
}

/// A cgroup memory limit file (`memory.max` in v2, `memory.limit_in_bytes` in v1): `max`
/// (unlimited) is `None`, a number is the limit in bytes.
fn parse_cgroup_memory_limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => None,
        number => number.parse().ok(),
    }
}

/// The cgroup path and its ancestors up to the root: `/a/b` gives `/a/b`, `/a`, `/`.
fn cgroup_ancestors(path: &str) -> Vec<String> {
    let mut ancestors = Vec::new();
    let mut current = path.trim_end_matches('/');
    while !current.is_empty() {
        ancestors.push(current.to_owned());
        current = match current.rfind('/') {
            Some(index) => &current[..index],
            None => "",
        };
    }
    ancestors.push("/".to_owned());
    ancestors
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones.
fn cgroup_v2_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup");
    if unified.join("cgroup.controllers").exists() {
        unified.to_owned()
    } else {
        unified.join("unified")
    }
}

/// A memory limit on this process's cgroup or an ancestor, and that cgroup's working set
/// (its usage less the page cache it could drop at once), where the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CgroupMemory {
    limit: u64,
    working_set: Option<u64>,
}

/// Every memory limit on this process's cgroup and its ancestors, v2 and v1. A container
/// without its own cgroup namespace sees the host's path, which does not exist inside; walking
/// up to the root still finds the limit at the mount root, which is the container's cgroup.
fn cgroup_memory_limits(membership: &CgroupMembership) -> Vec<CgroupMemory> {
    let mut limits = Vec::new();
    let hierarchies = [
        (
            membership.unified.as_deref(),
            cgroup_v2_root(),
            ("memory.max", "memory.current", "inactive_file"),
        ),
        (
            membership.memory_v1.as_deref(),
            PathBuf::from("/sys/fs/cgroup/memory"),
            (
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            ),
        ),
    ];
    for (path, root, (limit_file, usage_file, inactive_key)) in hierarchies {
        let Some(path) = path else { continue };
        for ancestor in cgroup_ancestors(path) {
            let directory = root.join(ancestor.trim_start_matches('/'));
            let Some(limit) =
                read(directory.join(limit_file)).and_then(|text| parse_cgroup_memory_limit(&text))
            else {
                continue;
            };
            let usage = read(directory.join(usage_file)).and_then(|text| text.trim().parse().ok());
            let inactive = read(directory.join("memory.stat"))
                .and_then(|text| memory_stat_value(&text, inactive_key))
                .unwrap_or(0);
            limits.push(CgroupMemory {
                limit,
                working_set: usage.map(|usage: u64| usage.saturating_sub(inactive)),
            });
        }
    }
    limits
}

/// The value of `key` in a cgroup's `memory.stat` (`key value` lines).
fn memory_stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok())?
    })
}

/// Total memory capped by the lowest cgroup limit; available memory capped by that total and
/// by what each limited cgroup has left (its limit less its working set: other services in
/// the same slice use its limit too).
fn effective_memory(meminfo: &MemInfo, cgroups: &[CgroupMemory]) -> (Option<u64>, Option<u64>) {
    let limit = cgroups.iter().map(|cgroup| cgroup.limit).min();
    let total = match (meminfo.total_bytes, limit) {
        (Some(total), Some(limit)) => Some(total.min(limit)),
        (total, None) => total,
        (None, limit) => limit,
    };
    let headroom = cgroups
        .iter()
        .filter_map(|cgroup| {
            cgroup
                .working_set
                .map(|used| cgroup.limit.saturating_sub(used))
        })
        .min();
    let available = match (meminfo.available_bytes, total) {
        (Some(available), Some(total)) => Some(available.min(total)),
        (available, _) => available,
    };
    let available = match (available, headroom) {
        (Some(available), Some(headroom)) => Some(available.min(headroom)),
        (available, _) => available,
    };
    (total, available)
}
