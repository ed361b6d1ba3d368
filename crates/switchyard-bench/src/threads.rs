//! Tokio runtimes on threads of their own, one for each part of the benchmark process: the
//! load generator, the receiver and the raw paths. No part runs on another part's
//! scheduler, and the CPU time of each part can be read per thread name.

use tokio::runtime::{Builder, Handle, Runtime};

/// Thread name of the receiver's runtime.
pub const RECEIVER_THREADS: &str = "bench-receiver";
/// Thread name of the raw ingress and raw consumer runtime.
pub const RAW_THREADS: &str = "bench-raw";
/// Thread name of the load generator's runtime, which also runs the orchestration.
pub const LOAD_THREADS: &str = "bench-load";

/// A multi-thread runtime whose threads are all named `name`.
pub struct Threads {
    runtime: Option<Runtime>,
}

impl Threads {
    pub fn new(name: &str, workers: usize) -> std::io::Result<Self> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    pub fn handle(&self) -> Handle {
        match &self.runtime {
            Some(runtime) => runtime.handle().clone(),
            None => unreachable!("the runtime is only taken on drop"),
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        // Dropping a runtime inside another one would block; this does not.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
