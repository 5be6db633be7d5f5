//! Fault injection: placeholder replaced by the fault-injection suite.

mod support;
