//! End-to-end tests of the `cairn` binary: operator sessions, bad input with its exit
//! codes and messages, and processes killed with SIGKILL mid-operation.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod block;
mod common;
mod crash;
mod daemon;
mod input;
mod live;
mod pairs;
mod session;
