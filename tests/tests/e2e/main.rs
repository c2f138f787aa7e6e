//! End-to-end tests: one binary, one module per problem of DESIGN.md §1
//! (plus the foundation every problem stands on).

mod auth;
mod cli_targets;
mod deadlines;
mod error_table;
mod foundation;
mod jobs_cli;
mod problem1_counter_cutover;
mod problem2_stream_sync;
mod problem3_unit_migration;
mod problem4_backfill_attribute;
mod problem5_incremental_extract;
mod python_client;
mod rpc_fuzz;
mod tls;
mod trace;
mod walkthrough;
