//! Integration tests of the recovery space: one binary, one module per concern.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod common;
mod corruption;
mod deferred;
mod faults;
mod gc;
mod model;
mod patches;
mod s3;
