//! End-to-end tests: faults.

mod support;
