//! Schema validation engine (placeholder until the engine lands).
