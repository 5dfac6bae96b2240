//! Helpers shared by the integration tests (the tests themselves are in `main.rs`'s modules).
