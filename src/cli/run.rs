//! `microvm run`'s options -> the [`VmConfig`] of a boot whose initrd is the program's
//! initramfs (built by [`crate::ci::run_program`]).

use std::os::fd::OwnedFd;

use crate::arch::x86_64::kernel_probe::{self, KernelConsoles};
use crate::ci::run_program::{self, RunError};
use crate::cli::RunCommand;
use crate::cli::config::{BootSource, ConfigError, VmConfig};

/// Errors preparing `microvm run`.
#[derive(Debug, thiserror::Error)]
pub enum RunSetupError {
    /// A usage error in the VM options (exit status 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--initrd` given to `run`.
    #[error("microvm run builds its own initramfs; drop --initrd (add files with --include)")]
    InitrdGiven,
    /// The program or its initramfs.
    #[error(transparent)]
    Program(#[from] RunError),
}

impl RunSetupError {
    /// True for a usage error (exit status 2).
    pub fn is_usage(&self) -> bool {
        match self {
            RunSetupError::Config(_) | RunSetupError::InitrdGiven => true,
            RunSetupError::Program(e) => e.is_usage(),
        }
    }
}

/// The VM for `microvm run`, and the memfd holding its initramfs (keep it open until
/// the VM is built). The console's modules go in only when the kernel lacks a built-in
/// virtio console and `--modules` is given.
pub fn prepare(cmd: &RunCommand) -> Result<(VmConfig, OwnedFd), RunSetupError> {
    if cmd.vm.initrd.is_some() {
        return Err(RunSetupError::InitrdGiven);
    }
    let mut config = cmd.vm.to_config()?;
    let modules = match (&cmd.modules, &config.boot) {
        (Some(dir), BootSource::Linux { kernel, .. })
            if config.virtio_console
                && kernel_probe::probe(kernel) != KernelConsoles::Hvc0AtBoot =>
        {
            Some(dir.as_path())
        }
        _ => None,
    };
    let (fd, path) = run_program::initramfs(&cmd.program, &cmd.include, modules)?;
    if let BootSource::Linux { initrd, .. } = &mut config.boot {
        *initrd = Some(path);
    }
    Ok((config, fd))
}
