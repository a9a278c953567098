//! Tests that run the `kinesin` binary as real processes.

mod common;
mod processes;
mod upgrade;
