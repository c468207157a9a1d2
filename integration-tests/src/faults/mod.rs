//! Support for the fault tests (`tests/faults.rs`): child processes to kill, and a TCP proxy
//! to freeze or cut one client's connection to etcd.

pub mod pause;
pub mod process;
pub mod proxy;
pub mod runner;
