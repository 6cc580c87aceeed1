//! Per-vCPU CPUID: KVM's supported set, with each vCPU's APIC id and the VM's topology
//! (one socket, `vcpus` cores, one thread each) written into the leaves that carry them.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY_EXT: u32 = 0x8000_001e;
const LEAF_EXTENDED_FEATURES: u32 = 0x8000_0001;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_AMD_CMP_LEGACY: u32 = 1 << 1;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `n` items (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts `entry` for vCPU `id` of `count`.
fn patch_entry(entry: &mut kvm_cpuid_entry2, id: u8, count: u8) {
    let apic_id = u32::from(id);
    let count = u32::from(count);
    let core_bits = bits_for(count);
    match entry.function {
        LEAF_FEATURES => {
            // EBX: [31:24] initial APIC id, [23:16] logical processors per package,
            // [15:8] CLFLUSH line size in quadwords.
            entry.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing the cache - 1
            // (one thread per core, so caches above L2 are shared by all cores).
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
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

/// The CPUID of vCPU `id` of `count`, derived from KVM's supported set.
pub fn for_vcpu(supported: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, id, count);
    }
    cpuid
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
        let c = for_vcpu(&supported, 2, 3);
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
    fn bit_widths() {
        assert_eq!([1, 2, 3, 4, 5, 254].map(bits_for), [0, 1, 2, 2, 3, 8]);
    }
}
