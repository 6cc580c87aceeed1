//! Per-vCPU CPUID: KVM's supported set, normalized the way a careful VMM must.
//!
//! Starting from `KVM_GET_SUPPORTED_CPUID` (which already holds only what the host CPU
//! and KVM can both do), [`for_vcpu`]:
//! - writes each vCPU's APIC id and the VM's topology (one socket, `vcpus` cores, one
//!   thread each) into the leaves that carry them (1, 4, 0xb, 0x1f, 0x8000_0001,
//!   0x8000_0008, 0x8000_001d, 0x8000_001e), and sets the hypervisor bit;
//! - sets the TSC-deadline timer bit (leaf 1 ECX[24]) when KVM emulates it
//!   (`KVM_CAP_TSC_DEADLINE_TIMER`): KVM's supported list leaves it clear because the
//!   timer lives in KVM's local APIC, not in the host CPU. With it, Linux arms its timer
//!   with one MSR write and skips calibrating the local APIC timer against the PIT at boot;
//! - gives the guest a brand string (leaves 0x8000_0002..4): the host's when it has one,
//!   else a neutral one, so the guest does not fall back to a family-table name;
//! - adds nothing else: features stay what KVM reported, the paravirtual leaves
//!   (0x4000_0000..) included (kvm-clock and its stable bit, PV EOI, PV TLB flush, ...).

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_EXT_MAX: u32 = 0x8000_0000;
const LEAF_EXTENDED_FEATURES: u32 = 0x8000_0001;
const LEAF_BRAND: [u32; 3] = [0x8000_0002, 0x8000_0003, 0x8000_0004];
const LEAF_AMD_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_TOPOLOGY_EXT: u32 = 0x8000_001e;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_AMD_CMP_LEGACY: u32 = 1 << 1;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The brand string when the host has none (48 bytes, NUL-padded).
const DEFAULT_BRAND: &[u8] = b"microvm virtual CPU";

/// Errors building a vCPU's CPUID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    /// The normalized list does not fit KVM's limit.
    #[error("CPUID needs {0} entries, more than KVM's limit of {KVM_MAX_CPUID_ENTRIES}")]
    TooManyEntries(usize),
}

/// What KVM offers beyond its supported CPUID list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmCpuFeatures {
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: KVM's local APIC has the TSC-deadline mode.
    pub tsc_deadline: bool,
}

/// The host CPU's own CPUID; a trait so that tests can give fixed answers.
pub trait HostCpuid {
    /// EAX, EBX, ECX, EDX of leaf `leaf`, subleaf `sub`.
    fn cpuid(&self, leaf: u32, sub: u32) -> [u32; 4];
}

/// The CPU microvm runs on.
pub struct NativeCpuid;

impl HostCpuid for NativeCpuid {
    fn cpuid(&self, leaf: u32, sub: u32) -> [u32; 4] {
        let r = core::arch::x86_64::__cpuid_count(leaf, sub);
        [r.eax, r.ebx, r.ecx, r.edx]
    }
}

/// Bits needed to number `n` items (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The host's brand string as the three leaves' registers, if it has a non-empty one.
fn host_brand(host: &dyn HostCpuid) -> Option<[[u32; 4]; 3]> {
    if host.cpuid(LEAF_EXT_MAX, 0)[0] < LEAF_BRAND[2] {
        return None;
    }
    let regs = LEAF_BRAND.map(|leaf| host.cpuid(leaf, 0));
    regs.iter().flatten().any(|&r| r != 0).then_some(regs)
}

/// Packs up to 48 bytes of `text` into the brand leaves' registers (NUL-padded).
fn brand_regs(text: &[u8]) -> [[u32; 4]; 3] {
    let mut bytes = [0u8; 48];
    let n = text.len().min(47);
    bytes[..n].copy_from_slice(&text[..n]);
    let mut regs = [[0u32; 4]; 3];
    for (i, chunk) in bytes.chunks_exact(4).enumerate() {
        regs[i / 4][i % 4] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    regs
}

/// Makes sure the brand leaves exist and say something (see the module notes).
fn ensure_brand(entries: &mut Vec<kvm_cpuid_entry2>, host: &dyn HostCpuid) {
    let has_brand = LEAF_BRAND
        .iter()
        .all(|&leaf| entries.iter().any(|e| e.function == leaf))
        && entries
            .iter()
            .filter(|e| LEAF_BRAND.contains(&e.function))
            .any(|e| e.eax | e.ebx | e.ecx | e.edx != 0);
    if has_brand {
        return;
    }
    let regs = host_brand(host).unwrap_or_else(|| brand_regs(DEFAULT_BRAND));
    for (leaf, [eax, ebx, ecx, edx]) in LEAF_BRAND.into_iter().zip(regs) {
        entries.retain(|e| e.function != leaf);
        entries.push(kvm_cpuid_entry2 {
            function: leaf,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        });
    }
    match entries.iter_mut().find(|e| e.function == LEAF_EXT_MAX) {
        Some(max) => max.eax = max.eax.max(LEAF_BRAND[2]),
        None => entries.push(kvm_cpuid_entry2 {
            function: LEAF_EXT_MAX,
            eax: LEAF_BRAND[2],
            ..Default::default()
        }),
    }
}

/// Adjusts `entry` for vCPU `id` of `count`.
fn patch_entry(entry: &mut kvm_cpuid_entry2, id: u8, count: u8, kvm: KvmCpuFeatures) {
    let apic_id = u32::from(id);
    let count = u32::from(count);
    let core_bits = bits_for(count);
    match entry.function {
        LEAF_FEATURES => {
            // EBX: [31:24] initial APIC id, [23:16] logical processors per package,
            // [15:8] CLFLUSH line size in quadwords.
            entry.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
            entry.ecx |= ECX_HYPERVISOR;
            if kvm.tsc_deadline {
                entry.ecx |= ECX_TSC_DEADLINE;
            }
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS | LEAF_AMD_CACHE_TOPOLOGY => {
            // Both: EAX[7:5] cache level, EAX[25:14] threads sharing the cache - 1 (one
            // thread per core, so caches above L2 are shared by all cores). Leaf 4 also
            // has EAX[31:26]: cores per package - 1 (reserved in 0x8000_001d).
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & !(0xfff << 14)) | (sharing << 14);
            if entry.function == LEAF_CACHE_PARAMS {
                entry.eax = (entry.eax & 0x03ff_ffff) | ((count - 1) << 26);
            }
        }
        LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                }
                1 => {
                    entry.eax = core_bits;
                    entry.ebx = count;
                    entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        // Report cores through the legacy CMP bit on AMD-style topologies.
        LEAF_EXTENDED_FEATURES if count > 1 => entry.ecx |= ECX_AMD_CMP_LEGACY,
        LEAF_AMD_ADDR_SIZES => {
            // ECX[15:12]: APIC id bits for the core; ECX[7:0]: cores - 1.
            entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
        }
        LEAF_AMD_TOPOLOGY_EXT => {
            // EAX: extended APIC id; EBX[7:0]: core id, [15:8]: threads per core - 1;
            // ECX: node 0, one node per package.
            entry.eax = apic_id;
            entry.ebx = apic_id & 0xff;
            entry.ecx = 0;
        }
        _ => {}
    }
}

/// The CPUID of vCPU `id` of `count`, derived from KVM's supported set (see the module
/// notes).
pub fn for_vcpu(
    supported: &CpuId,
    host: &dyn HostCpuid,
    kvm: KvmCpuFeatures,
    id: u8,
    count: u8,
) -> Result<CpuId, CpuidError> {
    let mut entries = supported.as_slice().to_vec();
    ensure_brand(&mut entries, host);
    for entry in &mut entries {
        patch_entry(entry, id, count, kvm);
    }
    CpuId::from_entries(&entries).map_err(|_| CpuidError::TooManyEntries(entries.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    /// A host CPU with no brand string and no extended leaves.
    struct Bare;
    impl HostCpuid for Bare {
        fn cpuid(&self, _: u32, _: u32) -> [u32; 4] {
            [0; 4]
        }
    }

    /// A host CPU whose brand string is "Test CPU".
    struct Branded;
    impl HostCpuid for Branded {
        fn cpuid(&self, leaf: u32, _: u32) -> [u32; 4] {
            match leaf {
                LEAF_EXT_MAX => [0x8000_0008, 0, 0, 0],
                0x8000_0002 => brand_regs(b"Test CPU")[0],
                0x8000_0003..=0x8000_0004 => [0; 4],
                _ => [0; 4],
            }
        }
    }

    fn find(c: &CpuId, function: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function)
            .unwrap_or_else(|| panic!("leaf {function:#x} missing"))
    }

    fn brand_of(c: &CpuId) -> String {
        let bytes: Vec<u8> = LEAF_BRAND
            .iter()
            .flat_map(|&l| {
                let e = find(c, l);
                [e.eax, e.ebx, e.ecx, e.edx]
            })
            .flat_map(u32::to_le_bytes)
            .collect();
        String::from_utf8_lossy(&bytes)
            .trim_end_matches('\0')
            .to_string()
    }

    #[test]
    fn apic_id_and_topology() {
        let supported = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_EXT_TOPOLOGY, 0),
            entry(LEAF_EXT_TOPOLOGY, 1),
            entry(LEAF_EXT_TOPOLOGY, 2),
            entry(LEAF_AMD_ADDR_SIZES, 0),
        ])
        .unwrap();
        let c = for_vcpu(&supported, &Bare, KvmCpuFeatures::default(), 2, 3).unwrap();
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[1].ebx, e[1].edx, e[1].ecx >> 8), (1, 2, LEVEL_TYPE_SMT));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 3, LEVEL_TYPE_CORE));
        assert_eq!(e[3].ebx, 0);
        assert_eq!(e[4].ecx & 0xff, 2);
        assert_eq!((e[4].ecx >> 12) & 0xf, 2);
    }

    #[test]
    fn tsc_deadline_only_when_kvm_has_it() {
        let supported = CpuId::from_entries(&[entry(LEAF_FEATURES, 0)]).unwrap();
        let without = for_vcpu(&supported, &Bare, KvmCpuFeatures::default(), 0, 1).unwrap();
        assert_eq!(find(&without, LEAF_FEATURES).ecx & ECX_TSC_DEADLINE, 0);
        let kvm = KvmCpuFeatures { tsc_deadline: true };
        let with = for_vcpu(&supported, &Bare, kvm, 0, 1).unwrap();
        assert_ne!(find(&with, LEAF_FEATURES).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn brand_string_from_the_host_or_a_default() {
        let supported = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: LEAF_EXT_MAX,
                eax: 0x8000_0001,
                ..Default::default()
            },
            entry(LEAF_EXTENDED_FEATURES, 0),
        ])
        .unwrap();
        let kvm = KvmCpuFeatures::default();
        let c = for_vcpu(&supported, &Branded, kvm, 0, 1).unwrap();
        assert_eq!(brand_of(&c), "Test CPU");
        assert_eq!(find(&c, LEAF_EXT_MAX).eax, 0x8000_0004, "max leaf raised");
        let c = for_vcpu(&supported, &Bare, kvm, 0, 1).unwrap();
        assert_eq!(brand_of(&c), "microvm virtual CPU");
        // KVM's own non-empty brand leaves are kept as they are.
        let mut listed = c.as_slice().to_vec();
        listed.retain(|e| e.function != LEAF_EXT_MAX);
        let again = for_vcpu(&CpuId::from_entries(&listed).unwrap(), &Branded, kvm, 0, 1);
        assert_eq!(brand_of(&again.unwrap()), "microvm virtual CPU");
    }

    #[test]
    fn cache_sharing_follows_the_topology() {
        let l1 = kvm_cpuid_entry2 {
            function: LEAF_AMD_CACHE_TOPOLOGY,
            eax: (1 << 5) | 1 | (7 << 14),
            ..Default::default()
        };
        let l3 = kvm_cpuid_entry2 {
            function: LEAF_AMD_CACHE_TOPOLOGY,
            index: 3,
            eax: (3 << 5) | 3 | (15 << 14),
            ..Default::default()
        };
        let leaf4_l3 = kvm_cpuid_entry2 {
            function: LEAF_CACHE_PARAMS,
            index: 3,
            eax: (3 << 5) | 3 | (15 << 14) | (31 << 26),
            ..Default::default()
        };
        let supported = CpuId::from_entries(&[l1, l3, leaf4_l3]).unwrap();
        let c = for_vcpu(&supported, &Bare, KvmCpuFeatures::default(), 0, 4).unwrap();
        let e = c.as_slice();
        assert_eq!((e[0].eax >> 14) & 0xfff, 0, "L1 not shared");
        assert_eq!(e[0].eax & 0x3fff, (1 << 5) | 1, "type and level kept");
        assert_eq!((e[1].eax >> 14) & 0xfff, 3, "L3 shared by the 4 cores");
        assert_eq!((e[2].eax >> 14) & 0xfff, 3);
        assert_eq!(e[2].eax >> 26, 3, "4 cores per package");
    }

    #[test]
    fn too_many_entries_is_an_error() {
        let many = vec![entry(0x4000_0100, 0); KVM_MAX_CPUID_ENTRIES];
        let supported = CpuId::from_entries(&many).unwrap();
        assert!(matches!(
            for_vcpu(&supported, &Bare, KvmCpuFeatures::default(), 0, 1),
            Err(CpuidError::TooManyEntries(_))
        ));
    }

    #[test]
    fn bit_widths() {
        assert_eq!([1, 2, 3, 4, 5, 254].map(bits_for), [0, 1, 2, 2, 3, 8]);
    }

    #[test]
    fn brand_packing() {
        let r = brand_regs(b"ABCDEFGH");
        assert_eq!(r[0][0], u32::from_le_bytes(*b"ABCD"));
        assert_eq!(r[0][1], u32::from_le_bytes(*b"EFGH"));
        assert_eq!(r[2][3], 0, "NUL-terminated");
    }
}
