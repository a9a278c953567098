//! Tests that run the `kinesin` binary as real processes.

mod processes;
