//! The location daemon's HTTP API, against a real `cairn serve` process on free loopback
//! ports (issue 4 §6): the operator session, "Replicate now" racing a running job, a
//! failed job and the protection status, kill -9 and SIGTERM during a job, roles, bad
//! input, the OpenAPI document, metrics, the audit log, pagination and filters.
//!
//! Slow jobs are made with a server pre-hook that waits for a file the test creates (a
//! gate), so no test depends on how long anything takes.

mod auth;
mod common;
mod input;
mod jobs;
mod misc;
mod session;
