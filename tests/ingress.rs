//! End-to-end tests: ingress.

mod support;
