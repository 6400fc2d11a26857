//! The end-to-end tests: whole sites in-process over real mutual TLS, on
//! SQLite and PostgreSQL, linked once into one test binary. Each store test
//! is two tests, `<name>::sqlite` and `<name>::postgres` (`store_test!`),
//! each with its own runtime, store and log capture.

mod admin;
mod alarms;
mod browser;
mod concurrency;
mod console;
mod gateway;
mod limits;
mod peers;
mod pool;
mod python_client;
mod python_peer_client;
mod replicas;
mod site;
mod tallies;
mod tickets;
mod transcript;
mod vault;
