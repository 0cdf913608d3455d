//! micro-saga
