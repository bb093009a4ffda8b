//! Sources of desired state. Every source delivers complete [`DesiredState`] snapshots over
//! one channel; the index merges them and only the index talks to the loader.
//!
//! ```text
//!  StandaloneSource (YAML file, polled) ─┐
//!  KubernetesSource (Services, Slices)  ─┴─► mpsc<SourceUpdate> ─► Index ─► Dataplane::apply
//! ```
//!
//! A source reports a file or object it cannot use as [`SourceEvent::Invalid`]; the index then
//! keeps the last good snapshot of that source, so the data plane keeps serving.

pub mod kubernetes;
pub mod standalone;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::model::DesiredState;

/// What a source reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// The complete desired state as this source now sees it.
    Snapshot(DesiredState),
    /// The source could not be read or is invalid; the message says where and what to fix.
    Invalid(String),
}

/// A report from one named source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceUpdate {
    /// Name of the source (e.g. `standalone`).
    pub source: &'static str,
    /// What happened.
    pub event: SourceEvent,
}

/// A producer of desired-state snapshots.
pub trait Source: Send + 'static {
    /// Stable name of the source, used by the index to keep one snapshot per source.
    fn name(&self) -> &'static str;
    /// Start producing updates into `tx` until the receiver is dropped.
    fn spawn(self: Box<Self>, tx: mpsc::Sender<SourceUpdate>) -> JoinHandle<()>;
}
