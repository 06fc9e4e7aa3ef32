//! Checks every op of one backend against another (normally the burn reference) on random inputs, odd sizes
//! included. Used by the test suites of every backend.
