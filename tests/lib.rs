//! Whole-system tests of Kinesin live in `it/`; this library is empty.
