//! End-to-end tests: delivery.

mod support;
