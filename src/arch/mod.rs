//! Architecture-specific guest set-up. Only x86_64 is supported.

pub mod x86_64;

/// Guest memory as every layer of microvm uses it (created by `vstate::memory`).
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
