//! Tests of the hardware probe's parsers and decisions over fixed inputs, and of `probe` on the
//! machine running the tests.

use expect_test::{Expect, expect};

use super::*;

/// Two sockets, two cores each, two SMT threads per core: 8 processors, 4 physical cores.
const CPUINFO_X86_TWO_SOCKETS_SMT: &str = "\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz
physical id\t: 0
core id\t\t: 0
cpu cores\t: 2
flags\t\t: fpu cx16 lahf_lm pni ssse3 sse4_1 sse4_2 popcnt avx avx2 fma f16c bmi1 bmi2 abm movbe xsave avx512f avx512cd avx512dq avx512bw avx512vl avx512_vnni amx_tile

processor\t: 1
physical id\t: 0
core id\t\t: 1

processor\t: 2
physical id\t: 1
core id\t\t: 0

processor\t: 3
physical id\t: 1
core id\t\t: 1

processor\t: 4
physical id\t: 0
core id\t\t: 0

processor\t: 5
physical id\t: 0
core id\t\t: 1

processor\t: 6
physical id\t: 1
core id\t\t: 0

processor\t: 7
physical id\t: 1
core id\t\t: 1
";

const CPUINFO_AARCH64: &str = "\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid asimdhp asimddp sve
CPU implementer\t: 0x41
CPU part\t: 0xd0c

processor\t: 1
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid asimdhp asimddp sve

Hardware\t: Ampere Altra
";

fn check_cpuinfo(text: &str, expect: Expect) {
    expect.assert_debug_eq(&parse_cpuinfo(text));
}

#[test]
fn parse_cpuinfo_reads_model_flags_and_topology_on_x86() {
    let cpuinfo = parse_cpuinfo(CPUINFO_X86_TWO_SOCKETS_SMT);
    assert_eq!(
        cpuinfo.model.as_deref(),
        Some("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz")
    );
    assert_eq!(cpuinfo.processors.len(), 8);
    assert!(cpuinfo.flags.iter().any(|flag| flag == "avx512_vnni"));
    assert_eq!(count_physical_cores(&cpuinfo, None), Some(4));
}

#[test]
fn parse_cpuinfo_on_aarch64_has_features_and_no_topology() {
    check_cpuinfo(
        CPUINFO_AARCH64,
        expect![[r#"
            CpuInfo {
                model: Some(
                    "Ampere Altra",
                ),
                flags: [
                    "fp",
                    "asimd",
                    "evtstrm",
                    "aes",
                    "pmull",
                    "sha1",
                    "sha2",
                    "crc32",
                    "cpuid",
                    "asimdhp",
                    "asimddp",
                    "sve",
                ],
                processors: [
                    Processor {
                        index: Some(
                            0,
                        ),
                        physical_id: None,
                        core_id: None,
                    },
                    Processor {
                        index: Some(
                            1,
                        ),
                        physical_id: None,
                        core_id: None,
                    },
                ],
            }
        "#]],
    );
    assert_eq!(
        count_physical_cores(&parse_cpuinfo(CPUINFO_AARCH64), None),
        None
    );
}

#[test]
fn parse_cpuinfo_of_nothing_is_empty() {
    assert_eq!(parse_cpuinfo(""), CpuInfo::default());
}

#[test]
fn physical_cores_count_only_allowed_processors() {
    let cpuinfo = parse_cpuinfo(CPUINFO_X86_TWO_SOCKETS_SMT);
    // Processors 0 and 4 are the two threads of socket 0 core 0; 1 is socket 0 core 1.
    let allowed = parse_cpu_list("0,4");
    assert_eq!(count_physical_cores(&cpuinfo, allowed.as_ref()), Some(1));
    let allowed = parse_cpu_list("0-1,4-5");
    assert_eq!(count_physical_cores(&cpuinfo, allowed.as_ref()), Some(2));
    let allowed = parse_cpu_list("0-7");
    assert_eq!(count_physical_cores(&cpuinfo, allowed.as_ref()), Some(4));
    let allowed = parse_cpu_list("32");
    assert_eq!(count_physical_cores(&cpuinfo, allowed.as_ref()), None);
}

#[test]
fn parse_cpu_list_reads_ranges_and_rejects_nonsense() {
    let list = |text: &str| parse_cpu_list(text).map(|cpus| cpus.into_iter().collect::<Vec<_>>());
    assert_eq!(list("0-3,8,10-11"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
    assert_eq!(list("5"), Some(vec![5]));
    assert_eq!(list(""), None);
    assert_eq!(list("3-1"), None);
    assert_eq!(list("a-b"), None);
    assert_eq!(list("0-99999999999"), None);
}

#[test]
fn parse_allowed_cpus_reads_proc_self_status() {
    let status =
        "Name:\tisthmus\nCpus_allowed:\tff\nCpus_allowed_list:\t0-1,6\nMems_allowed_list:\t0\n";
    let allowed = parse_allowed_cpus(status).map(|cpus| cpus.into_iter().collect::<Vec<_>>());
    assert_eq!(allowed, Some(vec![0, 1, 6]));
    assert_eq!(parse_allowed_cpus("Name:\tisthmus\n"), None);
}

/// A detector standing in for std's: knows the listed features as present, every other std
/// name as absent.
fn detector(present: &'static [&'static str]) -> impl Fn(&str) -> Option<bool> {
    move |std_name| Some(present.contains(&std_name))
}

fn flags(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn x86_64_level_follows_the_psabi_levels() {
    let level = |present: &[&'static str]| x86_64_level(&present.iter().copied().collect());
    assert_eq!(level(&[]), 1);
    let v2 = [
        "cx16", "lahf_lm", "popcnt", "sse3", "sse4.1", "sse4.2", "ssse3",
    ];
    assert_eq!(level(&v2), 2);
    let v3 = [
        &v2[..],
        &[
            "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "lzcnt", "movbe", "xsave",
        ],
    ]
    .concat();
    assert_eq!(level(&v3), 3);
    let v4 = [
        &v3[..],
        &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
    ]
    .concat();
    assert_eq!(level(&v4), 4);
    // AVX-512 without a v2 feature is still v1: levels are cumulative.
    let v4_without_popcnt: Vec<_> = v4
        .iter()
        .copied()
        .filter(|name| *name != "popcnt")
        .collect();
    assert_eq!(level(&v4_without_popcnt), 1);
}

#[test]
fn std_detection_wins_over_cpuinfo_and_cpuinfo_fills_the_gaps() {
    let cpuinfo_flags = flags("avx512f avx512_vnni amx_tile lahf_lm");
    // std says no AVX-512 (e.g. the OS does not save the registers): that wins over cpuinfo.
    let present = x86_features_present(Some(&cpuinfo_flags), detector(&["avx2"]));
    assert!(present.contains("avx2"));
    assert!(!present.contains("avx512f"));
    assert!(!present.contains("avx512vnni"));
    // std cannot detect AMX or lahf_lm on stable: cpuinfo decides.
    assert!(present.contains("amx_tile"));
    assert!(present.contains("lahf_lm"));
    assert!(!present.contains("amx_int8"));
}

#[test]
fn without_std_detection_cpuinfo_flags_decide() {
    let cpuinfo_flags = flags(
        "cx16 lahf_lm pni ssse3 sse4_1 sse4_2 popcnt avx avx2 fma f16c bmi1 bmi2 abm movbe xsave",
    );
    let present = x86_features_present(Some(&cpuinfo_flags), |_| None);
    assert!(present.contains("sse3"), "pni is reported as sse3");
    assert!(present.contains("lzcnt"), "abm is reported as lzcnt");
    assert_eq!(x86_64_level(&present), 3);
}

#[test]
fn without_cpuinfo_lahf_lm_is_assumed() {
    let present = x86_features_present(
        None,
        detector(&["cmpxchg16b", "popcnt", "sse3", "sse4.1", "sse4.2", "ssse3"]),
    );
    assert_eq!(x86_64_level(&present), 2);
}

const MEMINFO: &str = "\
MemTotal:       65536000 kB
MemFree:         1000000 kB
MemAvailable:   32768000 kB
Buffers:          123456 kB
";

#[test]
fn parse_meminfo_converts_kibibytes_to_bytes() {
    assert_eq!(
        parse_meminfo(MEMINFO),
        MemInfo {
            total_bytes: Some(65_536_000 * 1024),
            available_bytes: Some(32_768_000 * 1024),
        }
    );
    assert_eq!(parse_meminfo("MemTotal: lots kB\n"), MemInfo::default());
    assert_eq!(parse_meminfo(""), MemInfo::default());
}

#[test]
fn parse_cgroup_memory_limit_reads_max_and_numbers() {
    assert_eq!(parse_cgroup_memory_limit("max\n"), None);
    assert_eq!(
        parse_cgroup_memory_limit("4294967296\n"),
        Some(4_294_967_296)
    );
    // cgroup v1's "unlimited" is a huge number; capping MemTotal by it changes nothing.
    assert_eq!(
        parse_cgroup_memory_limit("9223372036854771712\n"),
        Some(9_223_372_036_854_771_712)
    );
    assert_eq!(parse_cgroup_memory_limit(""), None);
    assert_eq!(parse_cgroup_memory_limit("-1"), None);
}

#[test]
fn parse_proc_self_cgroup_finds_v2_and_v1_memory_paths() {
    let unified = parse_proc_self_cgroup("0::/system.slice/isthmus.service\n");
    assert_eq!(
        unified,
        CgroupMembership {
            unified: Some("/system.slice/isthmus.service".to_owned()),
            memory_v1: None,
        }
    );
    let hybrid = parse_proc_self_cgroup(
        "9:name=systemd:/\n5:cpu,cpuacct:/\n4:memory:/kubepods/pod1/ctr\n0::/\n",
    );
    assert_eq!(
        hybrid,
        CgroupMembership {
            unified: Some("/".to_owned()),
            memory_v1: Some("/kubepods/pod1/ctr".to_owned()),
        }
    );
    assert_eq!(parse_proc_self_cgroup(""), CgroupMembership::default());
}

#[test]
fn cgroup_ancestors_walk_up_to_the_root() {
    assert_eq!(
        cgroup_ancestors("/system.slice/isthmus.service"),
        ["/system.slice/isthmus.service", "/system.slice", "/"]
    );
    assert_eq!(cgroup_ancestors("/"), ["/"]);
    assert_eq!(cgroup_ancestors(""), ["/"]);
}

#[test]
fn effective_memory_caps_total_and_available_by_the_lowest_limit() {
    let meminfo = parse_meminfo(MEMINFO);
    let gibibyte = 1 << 30;
    let limit = |limit: u64| CgroupMemory {
        limit,
        working_set: None,
    };
    assert_eq!(
        effective_memory(&meminfo, &[]),
        (Some(65_536_000 * 1024), Some(32_768_000 * 1024))
    );
    assert_eq!(
        effective_memory(&meminfo, &[limit(8 * gibibyte), limit(4 * gibibyte)]),
        (Some(4 * gibibyte), Some(4 * gibibyte))
    );
    assert_eq!(
        effective_memory(&meminfo, &[limit(u64::MAX)]),
        (Some(65_536_000 * 1024), Some(32_768_000 * 1024))
    );
    assert_eq!(
        effective_memory(&MemInfo::default(), &[limit(gibibyte)]),
        (Some(gibibyte), None)
    );
    // An 8 GiB slice of which other services use 6 GiB leaves 2 GiB, whatever the host has.
    let slice = CgroupMemory {
        limit: 8 * gibibyte,
        working_set: Some(6 * gibibyte),
    };
    assert_eq!(
        effective_memory(&meminfo, &[slice, limit(u64::MAX)]),
        (Some(8 * gibibyte), Some(2 * gibibyte))
    );
}

#[test]
fn the_working_set_leaves_out_the_page_cache_the_kernel_can_drop() {
    let stat = "anon 1000\nfile 5000\ninactive_file 3000\nactive_file 2000\n";
    assert_eq!(memory_stat_value(stat, "inactive_file"), Some(3000));
    assert_eq!(memory_stat_value(stat, "file"), Some(5000));
    assert_eq!(memory_stat_value(stat, "total_inactive_file"), None);
}

fn profile(logical_cpus: usize, physical_cores: Option<usize>) -> HardwareProfile {
    HardwareProfile {
        logical_cpus,
        physical_cores,
        cpu_model: None,
        cpu_features: Vec::new(),
        x86_64_level: None,
        memory_total_bytes: None,
        memory_available_bytes: None,
    }
}

#[test]
fn default_inference_threads_prefers_physical_cores_within_logical_cpus() {
    assert_eq!(profile(16, Some(8)).default_inference_threads(), 8);
    assert_eq!(profile(16, None).default_inference_threads(), 16);
    // A cgroup quota of 2 CPUs on a 16-core machine.
    assert_eq!(profile(2, Some(16)).default_inference_threads(), 2);
    assert_eq!(profile(0, Some(0)).default_inference_threads(), 1);
    assert_eq!(profile(0, None).default_inference_threads(), 1);
}

#[test]
fn probe_describes_this_machine() {
    let profile = probe();
    assert!(profile.logical_cpus >= 1);
    let threads = profile.default_inference_threads();
    assert!((1..=profile.logical_cpus).contains(&threads));
    if cfg!(target_arch = "x86_64") {
        assert!(
            profile
                .x86_64_level
                .is_some_and(|level| (1..=4).contains(&level))
        );
        // Every reported feature is one of ours.
        assert!(
            profile
                .cpu_features
                .iter()
                .all(|name| X86_FEATURES.iter().any(|feature| feature.name == name))
        );
    }
    if let (Some(total), Some(available)) =
        (profile.memory_total_bytes, profile.memory_available_bytes)
    {
        assert!(available <= total);
    }
    assert!(
        profile.memory_total_bytes.is_some(),
        "Linux has /proc/meminfo"
    );
}
