//! microvm: a small, fast KVM virtual machine monitor with a console multiplexer.

pub mod mux;
