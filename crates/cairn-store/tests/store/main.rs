//! Integration tests of the recovery space: one binary, one module per concern.

mod common;
mod corruption;
mod faults;
mod gc;
mod model;
